# shellcheck shell=bash
# The 3-server NATS JetStream cluster: each server's config, made from the
# templates in configs/nats/, and its launch.

NATS_TEMPLATES="$FM_ROOT/configs/nats"

# nats_template NAME KEY=VALUE...: configs/nats/NAME on stdout, without its
# header (the comment and blank lines it starts with), each @KEY@ replaced
# by VALUE. One pass: a VALUE (a password, a path) is never searched for
# placeholders. A placeholder with no VALUE is an error.
nats_template() {
    local file="$NATS_TEMPLATES/$1" kv key text out=""
    shift
    local -A value=()
    for kv in "$@"; do value[${kv%%=*}]=${kv#*=}; done
    [ -r "$file" ] || fm_die "$file is missing"
    text=$(awk 'body || !/^(#|$)/ { body = 1; print }' "$file")
    while [[ "$text" =~ @([A-Z][A-Z0-9_]*)@ ]]; do
        key=${BASH_REMATCH[1]}
        [[ -v "value[$key]" ]] || fm_die "$file: no value for @$key@"
        out+=${text%%"@$key@"*}${value[$key]}
        text=${text#*"@$key@"}
    done
    printf '%s\n' "$out$text"
}

# up_nats SECURE ROUTE_TLS FSYNC: picks each server's ports, writes nats-I.conf
# (mode 600), starts the servers (their PIDs into pids) and waits until
# every one is healthy; sets NATS_CLIENT_PORTS (the client ports, by
# server). Secure: the certificates and passwords are made already.
up_nats() {
    local secure=$1 route_tls=$2 fsync=$3 i p
    local sync_interval=2m
    [ "$fsync" -eq 1 ] && sync_interval=always
    local client_ports=() cluster_ports=() monitor_ports=()
    for i in $(seq 1 "$NATS_SERVERS"); do
        client_ports+=("$(pick_port $((4221 + i)))")
        cluster_ports+=("$(pick_port $((6221 + i)))")
        monitor_ports+=("$(pick_port $((8221 + i)))")
    done
    local routes="" route_auth="" secure_values=()
    if [ "$secure" -eq 1 ]; then
        local route_password route_tls_conf=""
        route_password=$(cat "$DIR/nats-route-password")
        # A route must know the route password (it is in the URLs).
        route_auth="route:$route_password@"
        if [ "$route_tls" -eq 1 ]; then
            route_tls_conf=$'\n'"$(nats_template route-tls.conf TLS_DIR="$TLS_DIR")"
        fi
        secure_values=(TLS_DIR="$TLS_DIR" NATS_PASSWORD="$(cat "$DIR/nats-password")"
            SYS_PASSWORD="$(cat "$DIR/nats-sys-password")" ROUTE_PASSWORD="$route_password"
            ROUTE_TLS="$route_tls_conf")
    fi
    for i in $(seq 1 "$NATS_SERVERS"); do
        routes+="nats-route://${route_auth}$(host_of "nats-$i"):${cluster_ports[$((i - 1))]}, "
    done
    routes="${routes%, }"

    for i in $(seq 1 "$NATS_SERVERS"); do
        local idx=$((i - 1)) conf="$DIR/nats-$i.conf"
        # Each mode keeps its own JetStream data: secure mode's streams live
        # in the FLUXMESH account, plain mode's in the global one.
        local store="$DIR/nats-$i"
        [ "$secure" -eq 1 ] && store="$DIR/nats-$i-secure"
        mkdir -p "$store"
        (umask 077 && : >"$conf")
        chmod 600 "$conf"
        lab_ensure "nats-$i"
        local values=(SERVER_NAME="nats-$i" HOST="$(host_of "nats-$i")" CLIENT_PORT="${client_ports[$idx]}"
            MONITOR_PORT="${monitor_ports[$idx]}" CLUSTER_PORT="${cluster_ports[$idx]}"
            STORE_DIR="$store" ROUTES="$routes" SYNC_INTERVAL="$sync_interval")
        if [ "$secure" -eq 1 ]; then
            nats_template server-secure.conf "${values[@]}" "${secure_values[@]}" >"$conf"
        else
            nats_template server.conf "${values[@]}" >"$conf"
        fi
        echo "nats-$i $(launch_nats "$i")" >>"$PIDS"
    done
    for i in $(seq 1 "$NATS_SERVERS"); do
        wait_http "http://$(host_of "nats-$i"):${monitor_ports[$((i - 1))]}/healthz" 60 ||
            fail_up "nats-$i not healthy" "$DIR/nats-$i.log"
    done
    if [ "$secure" -eq 1 ]; then
        fm_log "NATS cluster up (TLS, user fluxmesh): ${client_ports[*]}"
    else
        fm_log "NATS cluster up: ${client_ports[*]}"
    fi
    # shellcheck disable=SC2034 # read by cmd_up (commands.sh)
    NATS_CLIENT_PORTS=("${client_ports[@]}")
}

# launch_nats I: starts nats-server I from its config (in its namespace
# with --netns); prints its PID.
launch_nats() {
    local in_ns
    mapfile -t in_ns < <(lab_prefix "nats-$1")
    nohup "${in_ns[@]}" "$FM_NATS_SERVER_BIN" -c "$DIR/nats-$1.conf" >>"$DIR/nats-$1.log" 2>&1 &
    echo $!
}
