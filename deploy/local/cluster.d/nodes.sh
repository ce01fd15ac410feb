# shellcheck shell=bash
# The fluxmesh nodes: the binary they run, their env files (config),
# launch, endpoints.env's node lines, and add-node / remove-node.

# up_bin PROFILE: the fluxmesh binary `up` starts the nodes with:
# $FLUXMESH_BIN when set (it must be an executable file; the entry script
# made it absolute), else this checkout's target/PROFILE/fluxmesh, which up
# builds (PROFILE: local, or release with --release).
up_bin() {
    if [ -z "${FLUXMESH_BIN:-}" ]; then
        echo "$FM_ROOT/target/$1/fluxmesh"
    elif [ -f "$FLUXMESH_BIN" ] && [ -x "$FLUXMESH_BIN" ]; then
        echo "$FLUXMESH_BIN"
    else
        fm_die "FLUXMESH_BIN=$FLUXMESH_BIN is not an executable file"
    fi
}

# node_bin: the binary this cluster's nodes run, as up recorded it in
# NODE_BIN_FILE (target/release/fluxmesh for a cluster brought up before
# that file existed). start, restart and add-node use it too.
node_bin() {
    if [ -s "$NODE_BIN_FILE" ]; then cat "$NODE_BIN_FILE"; else echo "$FM_ROOT/target/release/fluxmesh"; fi
}

# note_bin_override: says so when FLUXMESH_BIN names another binary than
# the one the running cluster's nodes run (only up changes that).
note_bin_override() {
    if [ -n "${FLUXMESH_BIN:-}" ] && [ "$FLUXMESH_BIN" != "$(node_bin)" ]; then
        fm_log "FLUXMESH_BIN ignored: this cluster's nodes run $(node_bin); up with FLUXMESH_BIN restarts them all on another binary"
    fi
}

# launch_node I: starts node I from its env file (in its namespace with
# --netns); prints its PID.
launch_node() {
    local bin in_ns
    bin=$(node_bin)
    lab_ensure "node-$1"
    mapfile -t in_ns < <(lab_prefix "node-$1")
    (
        set -a
        # shellcheck disable=SC1090 # written by up and add-node
        source "$DIR/node-$1.env"
        set +a
        nohup "${in_ns[@]}" "$bin" run >>"$DIR/node-$1.log" 2>&1 &
        echo $!
    )
}

# is_node_process PID NAME: PID is this cluster's fluxmesh binary
# (node_bin), running as NAME (so a PID the system has since given to
# another process is never signalled).
is_node_process() {
    local cmd
    cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    [[ "$cmd" == "$(node_bin) run"* ]] || return 1
    tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -qx "FLUXMESH_NODE_ID=$2"
}

# node_ids: the numbers of the nodes in pids, ascending, space-separated.
node_ids() {
    [ -f "$PIDS" ] || return 0
    awk '$1 ~ /^node-[0-9]+$/ { print substr($1, 6) }' "$PIDS" | sort -n | paste -sd ' ' -
}

# node_env_get I KEY: KEY's value in node I's env file (quotes removed).
node_env_get() {
    sed -n "s/^$2='\(.*\)'\$/\1/p" "$DIR/node-$1.env"
}

# rewrite_endpoints: rewrites the node lines of endpoints.env
# (FLUXMESH_NODES, FLUXMESH_NODE_IDS, FLUXMESH_MQTT_TLS, FLUXMESH_NODE{i}_*)
# from the nodes in pids and their env files; other lines stay as they are.
rewrite_endpoints() {
    local ids i count=0 tls_list="" secure=0
    ids=$(node_ids)
    grep -q 'secure=1' "$DIR/settings" 2>/dev/null && secure=1
    for i in $ids; do
        count=$((count + 1))
        [ "$secure" -eq 1 ] && tls_list+="$(node_env_get "$i" FLUXMESH_MQTT_TLS_LISTEN),"
    done
    (umask 077 && : >"$ENDPOINTS.tmp")
    chmod 600 "$ENDPOINTS.tmp"
    {
        local line
        while IFS= read -r line; do
            case "$line" in
                FLUXMESH_NODES=*) echo "FLUXMESH_NODES=$count"; echo "FLUXMESH_NODE_IDS=\"$ids\"" ;;
                FLUXMESH_NODE_IDS=* | FLUXMESH_NODE[0-9]*_*) ;;
                FLUXMESH_MQTT_TLS=*) echo "FLUXMESH_MQTT_TLS=${tls_list%,}" ;;
                *) echo "$line" ;;
            esac
        done <"$ENDPOINTS"
        for i in $ids; do
            if [ "$secure" -eq 1 ]; then
                echo "FLUXMESH_NODE${i}_MQTTS=$(node_env_get "$i" FLUXMESH_MQTT_TLS_LISTEN)"
                echo "FLUXMESH_NODE${i}_WSS=$(node_env_get "$i" FLUXMESH_MQTT_WSS_LISTEN)"
            else
                echo "FLUXMESH_NODE${i}_MQTT=$(node_env_get "$i" FLUXMESH_MQTT_LISTEN)"
                echo "FLUXMESH_NODE${i}_WS=$(node_env_get "$i" FLUXMESH_MQTT_WS_LISTEN)"
            fi
            echo "FLUXMESH_NODE${i}_HTTP=$(node_env_get "$i" FLUXMESH_HTTP_LISTEN)"
            echo "FLUXMESH_NODE${i}_PID=$(awk -v n="node-$i" '$1 == n {print $2}' "$PIDS")"
        done
    } >"$ENDPOINTS.tmp"
    mv "$ENDPOINTS.tmp" "$ENDPOINTS"
}

# member_ports: every loopback port a member of the cluster is configured
# with, running or not (a killed member comes back on its own ports).
member_ports() {
    local name _pid files=("$ENDPOINTS")
    while read -r name _pid; do
        case "$name" in
            nats-*) files+=("$DIR/$name.conf") ;;
            node-*) files+=("$DIR/$name.env") ;;
        esac
    done <"$PIDS"
    cat "${files[@]}" 2>/dev/null | grep -oE '(127\.0\.0\.1|10\.213\.0\.[0-9]+):[0-9]+' | cut -d: -f2 | sort -u | tr '\n' ' '
}

# pick_new_port WANT TAKEN: WANT if it is free and not in TAKEN (a
# space-separated list), else a free port not in TAKEN.
pick_new_port() {
    local want=$1 taken=" $2 " p
    if [[ "$taken" != *" $want "* ]]; then
        p=$(pick_port "$want")
        [[ "$taken" != *" $p "* ]] && { echo "$p"; return 0; }
    fi
    for _ in $(seq 1 20); do
        p=$(fm_free_port)
        [[ "$taken" != *" $p "* ]] && { echo "$p"; return 0; }
    done
    fm_die "no free port"
}

# up_nodes NODES SECURE POSTGRES MIRROR_TOML URLS ADMIN_TOKEN NATS_PASSWORD:
# up's nodes 1..NODES. Picks their ports; writes endpoints.env.tmp (the
# cluster's lines, then each node's as it starts; up moves it into place);
# writes node-I.env (mode 600), starts the node (its PID into pids); then
# waits until every node is ready. POSTGRES=1: the nodes use
# PG_PRIMARY_URL and PG_STANDBY_URL (from up_postgres).
up_nodes() {
    local nodes=$1 secure=$2 postgres=$3 mirror_toml=$4 urls=$5 admin_token=$6 nats_password=$7 i
    local storage_env=""
    if [ "$postgres" -eq 1 ]; then
        # In namespaces, the nodes reach Postgres on the bridge.
        local pg_host
        pg_host=$(host_of host)
        storage_env="FLUXMESH_STORAGE_PRIMARY='${PG_PRIMARY_URL//127.0.0.1/$pg_host}'
FLUXMESH_STORAGE_REPLICAS='[\"${PG_STANDBY_URL//127.0.0.1/$pg_host}\"]'"
    fi

    # Nodes share this machine's cores; more threads than that only adds
    # context switches.
    local threads=$(( $(nproc) / nodes ))
    [ "$threads" -ge 1 ] || threads=1
    # A node raises its open-files limit to the hard one; it takes as many
    # MQTT connections as that leaves room for (at least the default
    # 10000: past its limit the node says so when it starts).
    local files max_connections=10000
    files=$(ulimit -Hn)
    [ "$files" = unlimited ] && files=1048576
    [ $((files - 1024)) -gt "$max_connections" ] && max_connections=$((files - 1024))

    local mqtt_ports=() mqtt_list=""
    for i in $(seq 1 "$nodes"); do
        if [ "$secure" -eq 1 ]; then
            mqtt_ports+=("$(pick_port $((8882 + i)))")
        else
            mqtt_ports+=("$(pick_port $((1882 + i)))")
        fi
        mqtt_list+="$(host_of "node-$i"):${mqtt_ports[$((i - 1))]},"
    done
    (umask 077 && : >"$ENDPOINTS.tmp")
    chmod 600 "$ENDPOINTS.tmp"
    {
        echo "FLUXMESH_NATS_URLS=$urls"
        echo "FLUXMESH_NODES=$nodes"
        echo "FLUXMESH_NODE_IDS=\"$(seq -s ' ' 1 "$nodes")\""
        echo "FLUXMESH_ADMIN_TOKEN=$admin_token"
        if [ "$secure" -eq 1 ]; then
            echo "FLUXMESH_NATS_USER=fluxmesh"
            echo "FLUXMESH_NATS_PASSWORD=$nats_password"
            echo "FLUXMESH_CA_FILE=$TLS_DIR/ca.pem"
            echo "FLUXMESH_MQTT_TLS=${mqtt_list%,}"
        fi
        if [ "$postgres" -eq 1 ]; then
            echo "FLUXMESH_PG_PRIMARY=$PG_PRIMARY_URL"
            echo "FLUXMESH_PG_REPLICAS=$PG_STANDBY_URL"
        fi
    } >"$ENDPOINTS.tmp"
    local security_env
    if [ "$secure" -eq 1 ]; then
        security_env="FLUXMESH_AUTH_ALLOW_ANONYMOUS='false'
FLUXMESH_NATS_USER='fluxmesh'
FLUXMESH_NATS_PASSWORD='$nats_password'
FLUXMESH_NATS_TLS_REQUIRED='true'
FLUXMESH_NATS_TLS_CA_FILE='$TLS_DIR/ca.pem'
FLUXMESH_MQTT_TCP_ENABLED='false'
FLUXMESH_MQTT_TLS_ENABLED='true'
FLUXMESH_MQTT_TLS_CERT_FILE='$TLS_DIR/server.pem'
FLUXMESH_MQTT_TLS_KEY_FILE='$TLS_DIR/server.key'"
    else
        security_env="FLUXMESH_AUTH_ALLOW_ANONYMOUS='true'"
    fi
    for i in $(seq 1 "$nodes"); do
        local mqtt=${mqtt_ports[$((i - 1))]} http mqtt_env ws host
        host=$(host_of "node-$i")
        http=$(pick_port $((8079 + i)))
        # MQTT over WebSocket: ws:// (wss:// in secure mode), any path.
        ws=$(pick_port $((9082 + i)))
        if [ "$secure" -eq 1 ]; then
            mqtt_env="FLUXMESH_MQTT_TLS_LISTEN='$host:$mqtt'
FLUXMESH_MQTT_WSS_ENABLED='true'
FLUXMESH_MQTT_WSS_LISTEN='$host:$ws'"
        else
            mqtt_env="FLUXMESH_MQTT_LISTEN='$host:$mqtt'
FLUXMESH_MQTT_WS_ENABLED='true'
FLUXMESH_MQTT_WS_LISTEN='$host:$ws'"
        fi
        (umask 077 && : >"$DIR/node-$i.env")
        chmod 600 "$DIR/node-$i.env"
        cat >"$DIR/node-$i.env" <<ENV
FLUXMESH_NODE_ID='node-$i'
FLUXMESH_NATS_URLS='$urls'
$mqtt_env
FLUXMESH_HTTP_LISTEN='$host:$http'
FLUXMESH_INGEST_JSON_MIRROR='$mirror_toml'
FLUXMESH_RUNTIME_WORKER_THREADS='$threads'
FLUXMESH_MQTT_MAX_CONNECTIONS='$max_connections'
FLUXMESH_RULES_SEED_DIR='$FM_ROOT/configs/rules'
FLUXMESH_NATS_REPLICAS='3'
FLUXMESH_AUTH_ADMIN_TOKEN='$admin_token'
$security_env
$storage_env
ENV
        local pid
        pid=$(launch_node "$i")
        echo "node-$i $pid" >>"$PIDS"
        {
            if [ "$secure" -eq 1 ]; then
                echo "FLUXMESH_NODE${i}_MQTTS=$host:$mqtt"
                echo "FLUXMESH_NODE${i}_WSS=$host:$ws"
            else
                echo "FLUXMESH_NODE${i}_MQTT=$host:$mqtt"
                echo "FLUXMESH_NODE${i}_WS=$host:$ws"
            fi
            echo "FLUXMESH_NODE${i}_HTTP=$host:$http"
            echo "FLUXMESH_NODE${i}_PID=$pid"
        } >>"$ENDPOINTS.tmp"
    done
    for i in $(seq 1 "$nodes"); do
        local http
        http=$(grep "^FLUXMESH_NODE${i}_HTTP=" "$ENDPOINTS.tmp" | cut -d= -f2)
        wait_http "http://$http/readyz" 60 || fail_up "node-$i not ready" "$DIR/node-$i.log"
    done
}

# add-node: one more node, with a copy of a running node's config (mode,
# NATS, Postgres, JSON mirror, threads) and fresh ports; waits until it is
# ready, records its PID, rewrites endpoints.env, prints its name.
cmd_add_node() {
    [ $# -eq 0 ] || fm_die "add-node takes no arguments"
    if ! [ -s "$PIDS" ] || ! [ -f "$ENDPOINTS" ] || ! [ -f "$DIR/settings" ]; then
        fm_die "the cluster is not up: deploy/local/cluster up"
    fi
    [ -x "$(node_bin)" ] ||
        fm_die "$(node_bin), the binary this cluster's nodes run, is missing: deploy/local/cluster up (again) builds or names it"
    note_bin_override
    local ids template="" i last=0
    ids=$(node_ids)
    # The template: the lowest-numbered node that runs.
    for i in $ids; do
        if alive "$(awk -v n="node-$i" '$1 == n {print $2}' "$PIDS")" && [ -f "$DIR/node-$i.env" ]; then
            template=$i
            break
        fi
    done
    [ -n "$template" ] || fm_die "no running node to copy the config from; deploy/local/cluster up --nodes N"
    [ -s "$LAST_NODE_ID" ] && last=$(cat "$LAST_NODE_ID")
    for i in $ids; do [ "$i" -gt "$last" ] && last=$i; done
    local id=$((last + 1)) name taken http mqtt ws mqtt_key=FLUXMESH_MQTT_LISTEN mqtt_base=1882 host
    local ws_key=FLUXMESH_MQTT_WS_LISTEN
    name="node-$id"
    if grep -q 'secure=1' "$DIR/settings"; then
        mqtt_key=FLUXMESH_MQTT_TLS_LISTEN
        mqtt_base=8882
        ws_key=FLUXMESH_MQTT_WSS_LISTEN
    fi
    host=$(host_of "$name")
    taken=$(member_ports)
    http=$(pick_new_port $((8079 + id)) "$taken")
    mqtt=$(pick_new_port $((mqtt_base + id)) "$taken $http")
    ws=$(pick_new_port $((9082 + id)) "$taken $http $mqtt")
    (umask 077 && : >"$DIR/$name.env")
    chmod 600 "$DIR/$name.env"
    sed -e "s/^FLUXMESH_NODE_ID=.*/FLUXMESH_NODE_ID='$name'/" \
        -e "s/^FLUXMESH_HTTP_LISTEN=.*/FLUXMESH_HTTP_LISTEN='$host:$http'/" \
        -e "s/^$mqtt_key=.*/$mqtt_key='$host:$mqtt'/" \
        -e "s/^$ws_key=.*/$ws_key='$host:$ws'/" \
        "$DIR/node-$template.env" >"$DIR/$name.env"
    if [ "$(node_env_get "$id" FLUXMESH_NODE_ID)" != "$name" ] ||
        [ "$(node_env_get "$id" FLUXMESH_HTTP_LISTEN)" != "$host:$http" ] ||
        [ "$(node_env_get "$id" "$mqtt_key")" != "$host:$mqtt" ]; then
        fm_die "could not make $DIR/$name.env from node-$template.env"
    fi
    echo "$id" >"$LAST_NODE_ID"
    local started pid
    started=$(now_ms)
    pid=$(launch_node "$id")
    # Recorded at once, so `down` stops it even if it never becomes ready.
    echo "$name $pid" >>"$PIDS"
    if ! wait_http "http://$host:$http/readyz" 60; then
        tail -n 20 "$DIR/$name.log" >&2 || true
        stop "$name" "$pid"
        forget "$name"
        fm_die "$name ($pid) not ready within 60 s; stopped; log: $DIR/$name.log"
    fi
    rewrite_endpoints
    fm_log "added $name ($pid, config of node-$template): MQTT $host:$mqtt, HTTP $host:$http; ready in $(($(now_ms) - started)) ms"
    echo "$name"
}

# remove-node [NAME] [--timeout S]: drains NAME (default the highest-
# numbered node) with SIGTERM by PID, polls until it exits (SIGKILL after S
# seconds, default 60, and exit 1), then drops it from pids and
# endpoints.env. The last node is not removed (that is `down`).
cmd_remove_node() {
    local name="" timeout=60
    while [ $# -gt 0 ]; do
        case "$1" in
            --timeout) timeout="${2:?--timeout needs seconds}"; shift 2 ;;
            --timeout=*) timeout="${1#*=}"; shift ;;
            node-*) [ -z "$name" ] || fm_die "remove-node takes one name"; name=$1; shift ;;
            *) fm_die "remove-node [node-i] [--timeout S]" ;;
        esac
    done
    [[ "$timeout" =~ ^[1-9][0-9]*$ ]] || fm_die "--timeout must be a positive number of seconds"
    if ! [ -s "$PIDS" ] || ! [ -f "$ENDPOINTS" ]; then fm_die "the cluster is not up"; fi
    local ids count=0 i
    ids=$(node_ids)
    for i in $ids; do count=$((count + 1)); done
    [ "$count" -gt 0 ] || fm_die "no node to remove"
    [ -n "$name" ] || name="node-$(echo "$ids" | awk '{print $NF}')"
    [[ "$name" =~ ^node-[0-9]+$ ]] || fm_die "remove-node takes node-i"
    local pid
    pid=$(awk -v n="$name" '$1 == n {print $2}' "$PIDS")
    [ -n "$pid" ] || fm_die "no member named $name (nodes: $ids)"
    [ "$count" -gt 1 ] || fm_die "$name is the last node; deploy/local/cluster down stops everything"
    local started waited=0 clean=1
    started=$(now_ms)
    if alive "$pid" && is_node_process "$pid" "$name"; then
        kill -TERM "$pid"
        local deadline=$((started + timeout * 1000))
        while alive "$pid"; do
            if [ "$(now_ms)" -ge "$deadline" ]; then
                fm_log "$name ($pid) did not exit within $timeout s of SIGTERM; SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                clean=0
                deadline=$(($(now_ms) + 10000))
                while alive "$pid" && [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.05; done
                break
            fi
            sleep 0.05
        done
        waited=$(($(now_ms) - started))
    elif alive "$pid"; then
        fm_log "PID $pid is no longer $name (the system reused it); not signalling it"
    else
        fm_log "$name ($pid) was not running"
    fi
    forget "$name"
    rewrite_endpoints
    if [ "$clean" -eq 1 ]; then
        fm_log "removed $name ($pid): drained and exited in $waited ms"
    else
        fm_die "removed $name ($pid), but it had to be killed"
    fi
}
