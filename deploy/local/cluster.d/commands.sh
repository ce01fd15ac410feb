# shellcheck shell=bash
# The commands up, down, status, start and restart (add-node and
# remove-node are in nodes.sh).

# up [options]: see the entry script's header.
cmd_up() {
    local nodes=3 mirror="tel,evt" postgres=1 secure=0 route_tls=1 fsync=0 netns=0 profile=local
    while [ $# -gt 0 ]; do
        case "$1" in
            --release) profile=release; shift ;;
            --no-postgres) postgres=0; shift ;;
            --secure) secure=1; shift ;;
            --fsync-always) fsync=1; shift ;;
            --netns) netns=1; shift ;;
            --no-route-tls) route_tls=0; shift ;;
            --nodes) nodes="${2:?--nodes needs a number}"; shift 2 ;;
            --nodes=*) nodes="${1#*=}"; shift ;;
            --json-mirror) mirror="${2:?--json-mirror needs tel,evt or none}"; shift 2 ;;
            --json-mirror=*) mirror="${1#*=}"; shift ;;
            *) fm_die "unknown option $1" ;;
        esac
    done
    [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || fm_die "--nodes must be a positive number"
    [ "$route_tls" -eq 1 ] || [ "$secure" -eq 1 ] || fm_die "--no-route-tls goes with --secure"
    [ "$secure" -eq 1 ] || route_tls=0
    # The local CA's certificate names 127.0.0.1 only.
    [ "$netns" -eq 0 ] || [ "$secure" -eq 0 ] || fm_die "--netns goes without --secure"
    local mirror_toml="[]"
    case "$mirror" in
        none) ;;
        tel | evt | tel,evt | evt,tel) mirror_toml="[\"${mirror//,/\",\"}\"]" ;;
        *) fm_die "--json-mirror takes tel, evt, tel,evt or none" ;;
    esac
    local bin
    bin=$(up_bin "$profile")
    # What the README's tour runs besides this checkout's scripts.
    fm_apt mosquitto-clients curl

    if all_alive; then
        local running
        running=$(grep -c '^node-' "$PIDS" || true)
        local settings="$mirror_toml postgres=$postgres secure=$secure route_tls=$route_tls fsync=$fsync netns=$netns"
        if [ "$(cat "$DIR/settings" 2>/dev/null)" = "$settings" ] && [ -f "$ENDPOINTS" ] &&
            [ "$(node_bin)" = "$bin" ]; then
            if [ "$running" -eq "$nodes" ]; then
                fm_log "already up ($running nodes, $(mode)); endpoints in $ENDPOINTS"
                show_endpoints
                return 0
            fi
            # Only the node count differs: scale in place.
            fm_log "up with $running nodes; scaling to $nodes (the other members keep running)"
            while [ "$running" -lt "$nodes" ]; do
                cmd_add_node >/dev/null
                running=$((running + 1))
            done
            while [ "$running" -gt "$nodes" ]; do
                cmd_remove_node
                running=$((running - 1))
            done
            fm_log "cluster up: $NATS_SERVERS NATS servers, $nodes nodes ($(node_ids)), postgres=$postgres; endpoints in $ENDPOINTS"
            show_endpoints
            return 0
        fi
        if [ "$(node_bin)" != "$bin" ]; then
            fm_log "up with another fluxmesh binary ($(node_bin)); restarting everything on $bin"
        else
            fm_log "up with other settings; restarting with $nodes nodes, JSON mirror $mirror, postgres=$postgres, secure=$secure, route TLS=$route_tls, fsync always=$fsync, namespaces=$netns"
        fi
    fi
    [ -s "$PIDS" ] && cmd_down

    if [ -n "${FLUXMESH_BIN:-}" ]; then
        fm_venv
        fm_log "not building: the nodes run $bin (FLUXMESH_BIN)"
    else
        fm_cargo
        fm_venv
        fm_log "building fluxmesh (cargo profile $profile: target/$profile/fluxmesh)"
        cargo build --profile "$profile" --locked -p fluxmesh-node
    fi

    mkdir -p "$DIR"
    : >"$PIDS"
    echo "$nodes" >"$LAST_NODE_ID"
    echo "$bin" >"$NODE_BIN_FILE"
    # Written again once up succeeds (`start` and `restart` need no mode:
    # they reuse the config files written below).
    rm -f "$DIR/settings"
    secret_file "$DIR/admin-token"
    local admin_token nats_password="" scheme=nats
    admin_token=$(cat "$DIR/admin-token")
    if [ "$secure" -eq 1 ]; then
        command -v openssl >/dev/null 2>&1 || fm_apt openssl
        make_certs
        secret_file "$DIR/nats-password"
        secret_file "$DIR/nats-sys-password"
        secret_file "$DIR/nats-route-password"
        nats_password=$(cat "$DIR/nats-password")
        scheme=tls
    fi
    # From here on, members run in namespaces if asked (host_of, lab_*).
    LAB=$netns
    lab_on && lab_up
    up_nats "$secure" "$route_tls" "$fsync"
    if [ "$postgres" -eq 1 ]; then up_postgres; fi
    local urls="" i
    for i in $(seq 1 "$NATS_SERVERS"); do
        urls+="$scheme://$(host_of "nats-$i"):${NATS_CLIENT_PORTS[$((i - 1))]},"
    done
    urls="${urls%,}"
    up_nodes "$nodes" "$secure" "$postgres" "$mirror_toml" "$urls" "$admin_token" "$nats_password"
    mv "$ENDPOINTS.tmp" "$ENDPOINTS"
    echo "$mirror_toml postgres=$postgres secure=$secure route_tls=$route_tls fsync=$fsync netns=$netns" >"$DIR/settings"
    fm_log "cluster up: $NATS_SERVERS NATS servers, $nodes nodes, postgres=$postgres; endpoints in $ENDPOINTS"
    if [ "$secure" -eq 1 ]; then
        fm_log "secure mode: MQTT over TLS only (CA $TLS_DIR/ca.pem); devices need credentials (PUT /api/v1/devices/{id}/credentials); NATS over TLS with user fluxmesh; routes $([ "$route_tls" -eq 1 ] && echo "over mutual TLS" || echo "with a password, without TLS")"
    else
        fm_log "plain mode: devices connect anonymously over plain MQTT; NATS without TLS or auth (up --secure for both)"
    fi
    if lab_on; then
        fm_log "namespaces: each NATS server and node in its own (fm-nats-I, fm-node-I) on bridge $LAB_BRIDGE ($LAB_NET.0/24); chaos/partition-node and chaos/partition-nats can cut their links"
    fi
    fm_log "admin API: Authorization: Bearer \$FLUXMESH_ADMIN_TOKEN (secrets are in $ENDPOINTS, not shown)"
    show_endpoints
}

# down [--purge]: stops every member by its PID (nodes, then NATS, then
# the standby and the primary); --purge also deletes .local/cluster.
# shellcheck disable=SC2120 # the entry script passes the options
cmd_down() {
    local purge=0
    [ "${1:-}" = "--purge" ] && purge=1
    if [ -s "$PIDS" ]; then
        # Nodes first (they drain into NATS), then NATS.
        { grep '^node-' "$PIDS" || true; } | while read -r name pid; do stop "$name" "$pid"; done
        { grep '^nats-' "$PIDS" || true; } | while read -r name pid; do stop "$name" "$pid"; done
        { grep '^pg-standby' "$PIDS" || true; } | while read -r name pid; do stop "$name" "$pid"; done
        { grep '^pg-primary' "$PIDS" || true; } | while read -r name pid; do stop "$name" "$pid"; done
        : >"$PIDS"
    else
        fm_log "nothing running"
    fi
    rm -f "$ENDPOINTS" "$ENDPOINTS.tmp"
    # Namespaces of this or an earlier --netns run (their members are gone).
    [ "$(id -u)" -ne 0 ] || lab_down
    if [ "$purge" -eq 1 ]; then
        rm -rf "$DIR"
        fm_log "data deleted"
    fi
}

# status: every member, its PID and whether it runs (nodes: is it ready);
# non-zero when one is dead.
cmd_status() {
    if ! [ -s "$PIDS" ]; then
        echo "down"
        return 0
    fi
    local bad=0
    echo "mode: $(mode)"
    while read -r name pid; do
        local state="dead"
        alive "$pid" && state="running"
        if [ "$state" = running ] && [[ "$name" == node-* ]] && [ -f "$ENDPOINTS" ]; then
            local i=${name#node-} http
            http=$(grep "^FLUXMESH_NODE${i}_HTTP=" "$ENDPOINTS" | cut -d= -f2)
            if wait_http "http://$http/readyz" 1; then state="ready ($http)"; else state="not ready ($http)"; fi
        fi
        [ "$state" = dead ] && bad=1
        printf '%-8s %-8s %s\n' "$name" "$pid" "$state"
    done <"$PIDS"
    return $bad
}

# start NAME: starts one member that is not running (after a kill) with the
# same ports and data, waits until it is ready, and records its PID.
cmd_start() {
    local name=${1:?start needs node-i or nats-i}
    [ -s "$PIDS" ] || fm_die "the cluster is not up"
    local old
    old=$(awk -v n="$name" '$1 == n {print $2}' "$PIDS")
    [ -n "$old" ] || fm_die "no member named $name"
    if alive "$old"; then
        fm_log "$name is already running ($old)"
        return 0
    fi
    fm_venv >/dev/null
    local i=${name#*-} pid
    # Each new PID is recorded as soon as it exists, so `down` stops it even
    # if it never becomes ready.
    case "$name" in
        node-*)
            note_bin_override
            pid=$(launch_node "$i")
            sed -i "s/^$name .*/$name $pid/" "$PIDS"
            sed -i "s/^FLUXMESH_NODE${i}_PID=.*/FLUXMESH_NODE${i}_PID=$pid/" "$ENDPOINTS"
            local http
            http=$(grep '^FLUXMESH_HTTP_LISTEN=' "$DIR/node-$i.env" | cut -d= -f2 | tr -d "'")
            wait_http "http://$http/readyz" 60 || fm_die "$name ($pid) not ready; log: $DIR/$name.log"
            ;;
        pg-*)
            pid=$(launch_pg "$name") || fm_die "$name did not start; log: $DIR/$name.log"
            sed -i "s/^$name .*/$name $pid/" "$PIDS"
            ;;
        nats-*)
            pid=$(launch_nats "$i")
            sed -i "s/^$name .*/$name $pid/" "$PIDS"
            local monitor
            monitor=$(sed -n 's/^http: //p' "$DIR/nats-$i.conf")
            wait_http "http://$monitor/healthz" 60 || fm_die "$name ($pid) not healthy; log: $DIR/$name.log"
            ;;
        *) fm_die "start takes node-i, nats-i, pg-primary or pg-standby" ;;
    esac
    fm_log "started $name ($pid)"
}

# restart NAME: stops one member by its PID, then starts it as `start` does.
cmd_restart() {
    local name=${1:?restart needs node-i, nats-i, pg-primary or pg-standby}
    [ -s "$PIDS" ] || fm_die "the cluster is not up"
    local pid
    pid=$(awk -v n="$name" '$1 == n {print $2}' "$PIDS")
    [ -n "$pid" ] || fm_die "no member named $name"
    stop "$name" "$pid"
    cmd_start "$name"
}
