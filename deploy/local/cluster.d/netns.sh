# shellcheck shell=bash
# up --netns: every NATS server and every node in a network namespace of
# its own, so that chaos/partition-node and chaos/partition-nats can cut
# links between them (iptables inside a namespace) while everything else
# keeps working.
#
# The namespaces (fm-nats-I, fm-node-I) hang off one bridge, fm-br0, in
# this machine's own namespace, on the private subnet 10.213.0.0/24: the
# bridge is 10.213.0.1 (Postgres listens there too, and the load
# generators, psql and curl reach every member from here), nats-I is
# 10.213.0.(10+I), node-I 10.213.0.(100+I). The namespaces have no default
# route, so nothing they send can leave the machine. `down` removes them
# and the bridge. Needs root (namespaces, veth pairs) and iptables.

LAB_NET=10.213.0
LAB_BRIDGE=fm-br0

# lab_on: whether this cluster runs in namespaces (up --netns).
lab_on() { [ "${LAB:-0}" = 1 ]; }

# host_of NAME: the address NAME (nats-I, node-I, or host: what runs in
# this machine's own namespace) listens on.
host_of() {
    if ! lab_on; then
        echo 127.0.0.1
        return
    fi
    case "$1" in
        host) echo "$LAB_NET.1" ;;
        nats-*) echo "$LAB_NET.$((10 + ${1#nats-}))" ;;
        node-*)
            local i=${1#node-}
            [ "$i" -le 150 ] || fm_die "--netns has room for nodes 1..150"
            echo "$LAB_NET.$((100 + i))"
            ;;
        *) fm_die "host_of: no address for $1" ;;
    esac
}

# lab_prefix NAME: what runs a command inside NAME's namespace (nothing
# without --netns), one word per line for mapfile.
lab_prefix() {
    lab_on || return 0
    printf '%s\n' ip netns exec "fm-$1"
}

# lab_up: the bridge (once), after checking nothing else uses the subnet.
lab_up() {
    [ "$(id -u)" -eq 0 ] || fm_die "--netns needs root (network namespaces and veth pairs)"
    command -v ip >/dev/null 2>&1 || fm_apt iproute2
    command -v iptables >/dev/null 2>&1 || fm_apt iptables
    if ! ip link show "$LAB_BRIDGE" >/dev/null 2>&1; then
        if ip -4 -o addr show | grep -v " $LAB_BRIDGE " | grep -q " inet $LAB_NET\."; then
            fm_die "$LAB_NET.0/24 is already used on this machine; --netns needs it"
        fi
        ip link add "$LAB_BRIDGE" type bridge
        ip addr add "$LAB_NET.1/24" dev "$LAB_BRIDGE"
        ip link set "$LAB_BRIDGE" up
    fi
}

# lab_ensure NAME: NAME's namespace, its veth pair on the bridge and its
# address (once).
lab_ensure() {
    lab_on || return 0
    local ns="fm-$1" addr
    addr=$(host_of "$1")
    ip netns list | grep -qw "^$ns" && return 0
    ip netns add "$ns"
    ip link add "$ns" type veth peer name eth0 netns "$ns"
    ip link set "$ns" master "$LAB_BRIDGE" up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
}

# lab_down: every namespace of the cluster, and the bridge.
lab_down() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^fm-(nats|node)-[0-9]+$/ {print $1}'); do
        ip netns del "$ns" && fm_log "removed namespace $ns"
    done
    if ip link show "$LAB_BRIDGE" >/dev/null 2>&1; then
        ip link del "$LAB_BRIDGE" && fm_log "removed bridge $LAB_BRIDGE"
    fi
}
