# shellcheck shell=bash
# http_of_nodes prints a list that callers split on purpose:
# shellcheck disable=SC2046,SC2119,SC2120
# Shared by the chaos scripts: run the load generator against the local
# cluster, inject one fault in the middle, and judge the invariants.
#
# Each script defines fault() and sources this file, then calls chaos_main.
# Options (all scripts): --rate R (msg/s, default 10000), --duration S
# (default 20), --devices D (default 12).
#
# fault() runs a third of the way into the load and sets FAILOVER_MS and
# RECOVERY_MS (a number, or "timeout": a violation), FAULT_NOTE (shown), and
# may set FAULT_FAIL (a reason: a violation). A partition sets CUT_AT and
# HEAL_AT (`now` values); the result then also gives serve_cut_ms and
# serve_heal_ms, read from the longest time a device went without a PUBACK
# (see chaos_main). It can read LOAD_STARTED (Unix
# seconds), LOAD_NODE_IDS (the nodes the devices were spread over) and
# CHAOS_OUT (the load generator's JSON report; its text report and
# progress are in $CHAOS_OUT.progress; to put notes beside). A
# script that sets PUBACK_GAP_LIMIT_MS before chaos_main also fails when a
# device went longer than that without a PUBACK while publishing
# (max_puback_gap_ms, measured by the load generator; every script prints
# it).
#
# Nodes are the ones in endpoints.env's FLUXMESH_NODE_IDS (numbers can have
# gaps after add-node / remove-node).
#
# Works against a plain or a --secure cluster: the admin API gets the
# bearer token from endpoints.env; on a secure one, the run's devices get a
# fresh secret through the admin API and connect over TLS, and the
# verifier reads NATS over TLS as user fluxmesh.
set -euo pipefail
# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/local/lib.sh"
# shellcheck source=benches/loadgen-report.sh
source "$(dirname "${BASH_SOURCE[0]}")/../benches/loadgen-report.sh"
cd "$FM_ROOT"

CHAOS_DIR="$FM_LOCAL/chaos"
ENDPOINTS="$FM_LOCAL/cluster/endpoints.env"
RATE=10000
DURATION=20
DEVICES=12

chaos_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --rate) RATE="${2:?}"; shift 2 ;;
            --duration) DURATION="${2:?}"; shift 2 ;;
            --devices) DEVICES="${2:?}"; shift 2 ;;
            *) fm_die "unknown option $1 (--rate R --duration S --devices D)" ;;
        esac
    done
    if ! [[ "$DURATION" =~ ^[0-9]+$ ]] || [ "$DURATION" -lt 10 ] || [ "$DURATION" -gt 300 ]; then
        fm_die "--duration must be 10..300 seconds"
    fi
}

# Every node's HTTP address, except node $1 (a number, if given).
http_of_nodes() {
    local skip=${1:-0} i
    for i in $(fm_node_ids); do
        [ "$i" = "$skip" ] && continue
        local v="FLUXMESH_NODE${i}_HTTP"
        echo -n "${!v} "
    done
}

# random_node: the number of a node picked at random.
random_node() {
    local ids
    read -r -a ids <<<"$(fm_node_ids)"
    echo "${ids[RANDOM % ${#ids[@]}]}"
}

now() { python3 -c 'import time; print(f"{time.time():.3f}")'; }

# Partitions (chaos/partition-*) need a cluster in network namespaces
# (deploy/local/cluster up --netns): each NATS server and node has its own,
# and a link is cut by iptables rules inside one of them.
# shellcheck source=deploy/local/cluster.d/netns.sh
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/local/cluster.d/netns.sh"
# Members this run cut links of (nats-J, node-I).
CUT_MEMBERS=()

lab_required() {
    grep -q 'netns=1' "$FM_LOCAL/cluster/settings" 2>/dev/null ||
        fm_die "partitions need the cluster in network namespaces: deploy/local/cluster up --netns (as root)"
}

# nats_addr J: nats-J's address in the namespaces.
nats_addr() { LAB=1 host_of "nats-$1"; }

# cut_links NAME ADDR...: inside NAME's namespace (nats-J, node-I), drops
# every packet to or from each ADDR, both ways, until heal_links NAME. The
# connections stay open on both ends, as on a dropped link.
cut_links() {
    local ns="fm-$1" addr
    CUT_MEMBERS+=("$1")
    shift
    for addr in "$@"; do
        ip netns exec "$ns" iptables -w -I INPUT -s "$addr" -j DROP
        ip netns exec "$ns" iptables -w -I OUTPUT -d "$addr" -j DROP
    done
}

# heal_links NAME: removes every rule cut_links put in NAME's namespace.
heal_links() {
    ip netns exec "fm-$1" iptables -w -F INPUT
    ip netns exec "fm-$1" iptables -w -F OUTPUT
}

# http_status_within URL CODE SECONDS: 0 once URL answers CODE, 1 if it
# has not within SECONDS.
http_status_within() {
    python3 - "$@" <<'PY'
import sys, time, urllib.error, urllib.request
url, code, deadline = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])
while time.time() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except Exception:
        status = 0
    if status == code:
        sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
PY
}

# chaos_cleanup: on exit, stops the load generator (by its PID) and heals
# every link this run cut, whatever happened.
chaos_cleanup() {
    [ -z "${CHAOS_LOADGEN:-}" ] || kill "$CHAOS_LOADGEN" 2>/dev/null || true
    local member
    for member in "${CUT_MEMBERS[@]+"${CUT_MEMBERS[@]}"}"; do
        heal_links "$member" 2>/dev/null || true
    done
}

# ms_since AT: whole milliseconds from AT (a `now` value) until now.
ms_since() { python3 -c 'import sys, time; print(int((time.time() - float(sys.argv[1])) * 1000))' "$1"; }

# settle LIVE SINCE NODE...: ms from SINCE until every NODE sees LIVE nodes
# and every shard validly held by its desired owner; "timeout" if not in 30 s.
settle() {
    local live=$1 since=$2
    shift 2
    FLUXMESH_ADMIN_TOKEN="${FLUXMESH_ADMIN_TOKEN:-}" python3 chaos/settle.py --live "$live" --since "$since" --timeout 30 "$@" ||
        echo timeout
}

chaos_main() {
    local kind=$1
    shift
    chaos_args "$@"
    [ -f "$ENDPOINTS" ] || fm_die "the local cluster is not up: run deploy/local/cluster up"
    deploy/local/cluster status >/dev/null || fm_die "the local cluster is not healthy: deploy/local/cluster status"
    fm_cargo
    fm_venv >/dev/null
    # The load generator in the profile the nodes were built with: their
    # dependencies are built already (the load does not measure speed).
    local profile
    profile=$(fm_cluster_profile)
    cargo build --profile "$profile" --locked -q -p fluxmesh-benches
    # shellcheck disable=SC1090
    source "$ENDPOINTS"
    mkdir -p "$CHAOS_DIR"
    local prefix
    prefix="chaos-$kind-$(date +%s)-$RANDOM"
    local out="$CHAOS_DIR/$prefix.out"
    # shellcheck disable=SC2034 # for fault()
    CHAOS_OUT=$out
    # shellcheck disable=SC2034 # for fault(): the devices are $prefix-0..
    CHAOS_PREFIX=$prefix
    local mqtt
    mqtt=$(fm_node_list MQTT)
    # shellcheck disable=SC2034 # for fault()
    LOAD_NODE_IDS=$(fm_node_ids)
    local secure_args=() secret=""
    if [ -n "${FLUXMESH_MQTT_TLS:-}" ]; then
        mqtt="$FLUXMESH_MQTT_TLS"
        secure_args=(--tls-ca "$FLUXMESH_CA_FILE" --nats-ca "$FLUXMESH_CA_FILE")
        secret=$(fm_new_secret)
    fi
    local ready
    ready=$(settle "$FLUXMESH_NODES" "$(now)" $(http_of_nodes))
    [ "$ready" != timeout ] || fm_die "the cluster did not settle (or its admin token was refused)"

    echo "== chaos $kind: $DEVICES devices, QoS1, $RATE msg/s for $DURATION s (prefix $prefix)"
    echo "   invariant 1: every PUBACKed message is in the telemetry streams"
    echo "   invariant 2: every stored message applied once; every state frame once, seq 1..n"
    echo "   invariant 5: shards owned again within a bounded, measured time"
    if [ -n "$secret" ]; then
        echo "   secure cluster: MQTT over TLS, $DEVICES devices with credentials"
        FLUXMESH_DEVICE_SECRET="$secret" fm_provision_devices "$(fm_node_list HTTP | cut -d, -f1)" "$prefix" "$DEVICES"
    fi
    # Secrets reach the load generator through its environment only.
    LOAD_STARTED=$(now)
    FLUXMESH_DEVICE_SECRET="$secret" FLUXMESH_NATS_USER="${FLUXMESH_NATS_USER:-}" \
        FLUXMESH_NATS_PASSWORD="${FLUXMESH_NATS_PASSWORD:-}" "./target/$profile/fluxmesh-loadgen" \
        --mqtt "$mqtt" --nats "$FLUXMESH_NATS_URLS" "${secure_args[@]+"${secure_args[@]}"}" \
        --devices "$DEVICES" --rate "$RATE" --qos 1 --payload 64 --duration "$DURATION" \
        --prefix "$prefix" --verify --verify-processing --report json >"$out" 2>"$out.progress" &
    CHAOS_LOADGEN=$!
    # If this script stops early, so does the load generator, and every
    # cut link heals.
    trap chaos_cleanup EXIT
    # The fault lands a third of the way in.
    sleep $((DURATION / 3))
    FAILOVER_MS="" RECOVERY_MS="" FAULT_NOTE="" FAULT_FAIL="" CUT_AT="" HEAL_AT=""
    fault
    wait "$CHAOS_LOADGEN" || { CHAOS_LOADGEN=""; cat "$out" "$out.progress" >&2; fm_die "load generator failed"; }
    CHAOS_LOADGEN=""

    local acked stored lost resent behind twice frames dup_frames missing_frames
    acked=$(loadgen_field verify.acked <"$out")
    stored=$(loadgen_field verify.stored <"$out")
    lost=$(loadgen_field verify.acked_but_missing <"$out")
    resent=$(loadgen_field verify.stored_twice <"$out")
    behind=$(loadgen_field verify_processing.applied_behind <"$out")
    twice=$(loadgen_field verify_processing.applied_twice <"$out")
    frames=$(loadgen_field verify_processing.state_frames <"$out")
    dup_frames=$(loadgen_field verify_processing.duplicate_state_frames <"$out")
    missing_frames=$(loadgen_field verify_processing.missing_state_frames <"$out")
    local sent gap gap_device gap_from over_1s
    sent=$(loadgen_field mesh.sent <"$out")
    gap=$(loadgen_field mesh.puback_gap.max_ms <"$out")
    gap_device=$(loadgen_field mesh.puback_gap.device <"$out")
    gap_from=$(loadgen_field mesh.puback_gap.from_unix_ms <"$out")
    over_1s=$(loadgen_field mesh.puback_gap.devices_over_1s <"$out")
    for v in acked stored lost behind twice dup_frames missing_frames gap; do
        [ -n "${!v}" ] || { cat "$out" "$out.progress" >&2; fm_die "could not read the load generator's verdict ($v)"; }
    done

    # A fault script may check more once the load is over.
    if declare -F after_load >/dev/null; then
        after_load "$stored"
    fi

    local verdict=PASS
    if [ "$lost" -ne 0 ] || [ "$behind" -ne 0 ] || [ "$twice" -ne 0 ] || [ "$dup_frames" -ne 0 ] ||
        [ "$missing_frames" -ne 0 ] || [ "$FAILOVER_MS" = timeout ] || [ "$RECOVERY_MS" = timeout ] ||
        [ -n "$FAULT_FAIL" ]; then
        verdict=FAIL
    fi
    if [ -n "${PUBACK_GAP_LIMIT_MS:-}" ] && [ "$gap" -gt "$PUBACK_GAP_LIMIT_MS" ]; then
        verdict=FAIL
        FAULT_FAIL+="${FAULT_FAIL:+; }a device went $gap ms without a PUBACK (limit $PUBACK_GAP_LIMIT_MS ms)"
    fi
    # A partition: when devices were served again, from the longest PUBACK
    # gap. After the cut: when that gap ended, counted from the cut, if it
    # began before the heal (0: no device waited past the cut). After the
    # heal: when it ended, counted from the heal, if it ended after the heal
    # (a majority cut stops every acknowledgement until the heal; a healed
    # server's return can stall JetStream again), else 0.
    local serve=""
    if [ -n "$CUT_AT" ] && [ -n "$HEAL_AT" ] && [ -n "$gap_from" ]; then
        serve=$(python3 -c 'import sys
start, gap, cut, heal = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) * 1000, float(sys.argv[4]) * 1000
end = start + gap
print(f"serve_cut_ms={max(0, int(end - cut)) if start < heal else 0} serve_heal_ms={max(0, int(end - heal))}")' \
            "$gap_from" "$gap" "$CUT_AT" "$HEAL_AT")
    fi
    local gap_when=""
    [ -n "$gap_from" ] && gap_when="at $(python3 -c 'import sys
a = int(sys.argv[1]) / 1000 - float(sys.argv[3])
print(f"{a:.1f}-{a + int(sys.argv[2]) / 1000:.1f}")' "$gap_from" "$gap" "$LOAD_STARTED") s into the load"
    echo "   sent=$sent acked=$acked stored=$stored lost=$lost resent_stored_twice=$resent"
    echo "   applied_behind=$behind applied_twice=$twice state_frames=$frames duplicate_state_frames=$dup_frames missing_state_frames=$missing_frames"
    echo "   max_puback_gap_ms=$gap (device $gap_device, $gap_when; devices over 1 s: ${over_1s:-?})"
    echo "   failover_ms=$FAILOVER_MS recovery_ms=$RECOVERY_MS ${serve:+$serve }${FAULT_NOTE}"
    [ -z "$FAULT_FAIL" ] || echo "   violation: $FAULT_FAIL"
    echo "RESULT kind=$kind verdict=$verdict sent=$sent acked=$acked stored=$stored lost=$lost duplicated=$dup_frames failover_ms=$FAILOVER_MS recovery_ms=$RECOVERY_MS max_puback_gap_ms=$gap${serve:+ $serve}"
    [ "$verdict" = PASS ] || { echo "   details: $out" >&2; exit 1; }
}
