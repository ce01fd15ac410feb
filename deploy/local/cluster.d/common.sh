# shellcheck shell=bash
# What every part of deploy/local/cluster uses: processes and their PIDs,
# ports, readiness polls, secrets, the mode and endpoints.env on screen.

# alive PID: running, and not a zombie nobody has reaped yet.
alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# Prefer a well-known port when it is free, else any free one.
pick_port() {
    local want=$1
    if python3 - "$want" <<'PY' 2>/dev/null; then echo "$want"; else fm_free_port; fi
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.close()
PY
}

# wait_http URL SECONDS: polls until URL answers 2xx.
wait_http() {
    python3 - "$1" "$2" <<'PY'
import sys, time, urllib.request
url, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            if 200 <= r.status < 300:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit(1)
PY
}

# fail_up WHAT LOG: stops what up started, shows the log, exits non-zero.
fail_up() {
    tail -n 20 "$2" >&2 || true
    cmd_down >/dev/null 2>&1 || true
    fm_die "$1; full log: $2"
}

all_alive() {
    [ -s "$PIDS" ] || return 1
    while read -r _ pid; do alive "$pid" || return 1; done <"$PIDS"
}

# forget NAME: removes NAME's line from pids.
forget() {
    awk -v n="$1" '$1 != n' "$PIDS" >"$PIDS.tmp"
    mv "$PIDS.tmp" "$PIDS"
}

now_ms() { date +%s%3N; }

# secret_file FILE: a random hex secret in FILE (made once, mode 600).
secret_file() {
    [ -s "$1" ] || (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(24))' >"$1")
    chmod 600 "$1"
}

# mode: "plain", "secure" or "secure, routes without TLS", as the running
# cluster was brought up.
mode() {
    local fsync=""
    grep -q 'fsync=1' "$DIR/settings" 2>/dev/null && fsync=", fsync always"
    grep -q 'netns=1' "$DIR/settings" 2>/dev/null && fsync+=", namespaces"
    if grep -q 'secure=1 route_tls=1' "$DIR/settings" 2>/dev/null; then
        echo "secure$fsync"
    elif grep -q 'secure=1' "$DIR/settings" 2>/dev/null; then
        echo "secure, routes without TLS$fsync"
    else
        echo "plain$fsync"
    fi
}

# show_endpoints: endpoints.env with its secrets left out (they stay in
# the file, mode 600).
show_endpoints() {
    awk -v f="$ENDPOINTS" '
        /^[A-Z0-9_]*(TOKEN|PASSWORD)=/ { sub(/=.*/, "=<secret: see " f ">") }
        /^FLUXMESH_PG_/ { gsub(/:[^:@\/]*@/, ":***@") }
        { print }' "$ENDPOINTS"
}

# stop NAME PID: SIGTERM (Postgres: SIGINT, its fast shutdown), wait up to
# 20 s, then SIGKILL.
stop() {
    local name=$1 pid=$2 signal=TERM
    alive "$pid" || return 0
    [[ "$name" == pg-* ]] && signal=INT
    kill -$signal "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do alive "$pid" || { fm_log "stopped $name ($pid)"; return 0; }; sleep 0.1; done
    fm_log "$name ($pid) ignored SIGTERM; killing"
    kill -KILL "$pid" 2>/dev/null || true
}
