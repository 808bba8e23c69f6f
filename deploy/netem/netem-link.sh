#!/usr/bin/env bash
# A two-namespace test link: site A (10.77.0.1) and site B (10.77.0.2) joined by a veth pair, with
# the link shaped by `tc` on both ends (each direction gets the same shaping).
#
#   netem-link.sh check                      does this kernel have sch_netem / sch_tbf?
#   netem-link.sh up [--delay 50ms] [--jitter 5ms] [--loss 0.1%] [--rate 1gbit] [--tbf]
#   netem-link.sh exec a|b CMD...            run CMD in site A's or site B's namespace
#   netem-link.sh status                     show addresses and qdiscs
#   netem-link.sh down                       remove both namespaces
#
# `--delay` is one-way (RTT = 2 x delay). Without sch_netem (these build machines lack it) the
# script says so and stops, unless `--tbf` is given: then the link is rate-limited only (tc tbf),
# with no delay, jitter or loss. For delay/jitter/partition without netem use the in-repo link
# emulator (`replicator-linkemu`, slink/src/linkemu/). Tests print which path they used.
#
# Needs root (ip netns, tc). Names are prefixed so they do not collide with anything else.
set -euo pipefail

PREFIX=${NETEM_PREFIX:-slinkemu}
NS_A=$PREFIX-a
NS_B=$PREFIX-b
VETH_A=$PREFIX-va
VETH_B=$PREFIX-vb
IP_A=10.77.0.1
IP_B=10.77.0.2

die() { echo "netem-link: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "needs root (ip netns, tc)"; }

# Tries a qdisc kind on a throwaway veth pair in a throwaway namespace (veth, not dummy: some
# kernels have no dummy driver).
qdisc_works() {
    local kind=$1; shift
    local ns=$PREFIX-probe
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns" || return 2
    ip -n "$ns" link add probe0 type veth peer name probe1 2>/dev/null || { ip netns del "$ns"; return 2; }
    ip -n "$ns" link set probe0 up
    local ok=1
    if tc -n "$ns" qdisc add dev probe0 root "$kind" "$@" 2>/dev/null; then ok=0; fi
    ip netns del "$ns"
    return $ok
}

have_netem() {
    modprobe sch_netem 2>/dev/null || true
    qdisc_works netem delay 1ms
}

have_tbf() {
    modprobe sch_tbf 2>/dev/null || true
    qdisc_works tbf rate 1mbit burst 32kbit latency 50ms
}

cmd_check() {
    need_root
    if have_netem; then
        echo "sch_netem: available (delay, jitter, loss, rate)"
    else
        echo "sch_netem: NOT available on kernel $(uname -r): tc netem cannot delay, jitter or drop here"
    fi
    if have_tbf; then
        echo "sch_tbf: available (rate limit only; use: netem-link.sh up --tbf --rate R)"
    else
        echo "sch_tbf: NOT available"
    fi
}

shape() {
    # shape NS DEV: apply the chosen qdisc on DEV inside NS.
    local ns=$1 dev=$2
    if [ "$MODE" = netem ]; then
        local args=(delay "$DELAY")
        [ -n "$JITTER" ] && args+=("$JITTER" distribution normal)
        [ -n "$LOSS" ] && args+=(loss "$LOSS")
        [ -n "$RATE" ] && args+=(rate "$RATE")
        # The queue must hold rate x delay; 100000 packets covers 1 Gbit/s x 100 ms.
        args+=(limit 100000)
        tc -n "$ns" qdisc add dev "$dev" root netem "${args[@]}"
    else
        # Burst sized for the rate (at least 64 KiB), latency bounds the queue.
        tc -n "$ns" qdisc add dev "$dev" root tbf rate "$RATE" burst 256kb latency 200ms
    fi
}

cmd_up() {
    need_root
    DELAY=0ms JITTER= LOSS= RATE= MODE=netem
    while [ $# -gt 0 ]; do
        case $1 in
            --delay) DELAY=$2; shift 2 ;;
            --jitter) JITTER=$2; shift 2 ;;
            --loss) LOSS=$2; shift 2 ;;
            --rate) RATE=$2; shift 2 ;;
            --tbf) MODE=tbf; shift ;;
            *) die "unknown option $1" ;;
        esac
    done
    if [ "$MODE" = netem ]; then
        if ! have_netem; then
            echo "netem-link: sch_netem is NOT available on this kernel ($(uname -r))." >&2
            echo "  tc netem cannot add delay, jitter or loss here." >&2
            if have_tbf; then
                echo "  Options: 'netem-link.sh up --tbf --rate 100mbit' (rate limit only, works here)," >&2
            fi
            echo "  or the in-repo link emulator: replicator-linkemu --listen A --upstream B --delay 50ms --rate 1gbit" >&2
            exit 3
        fi
    else
        [ -n "$RATE" ] || die "--tbf needs --rate"
        [ "$DELAY" = 0ms ] && [ -z "$JITTER" ] && [ -z "$LOSS" ] \
            || die "--tbf shapes the rate only: drop --delay/--jitter/--loss (or use netem or replicator-linkemu)"
        have_tbf || die "sch_tbf is not available either"
    fi
    cmd_down >/dev/null 2>&1 || true
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip link add "$VETH_A" netns "$NS_A" type veth peer name "$VETH_B" netns "$NS_B"
    ip -n "$NS_A" addr add $IP_A/24 dev "$VETH_A"
    ip -n "$NS_B" addr add $IP_B/24 dev "$VETH_B"
    for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
    ip -n "$NS_A" link set "$VETH_A" up
    ip -n "$NS_B" link set "$VETH_B" up
    shape "$NS_A" "$VETH_A"
    shape "$NS_B" "$VETH_B"
    echo "link path: $MODE ($([ "$MODE" = netem ] && echo "tc netem delay=$DELAY jitter=${JITTER:-0} loss=${LOSS:-0} rate=${RATE:-unlimited}" || echo "tc tbf rate=$RATE, no delay"))"
    echo "site A: ip netns exec $NS_A ... ($IP_A)   site B: ip netns exec $NS_B ... ($IP_B)"
}

cmd_down() {
    need_root
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    echo "removed $NS_A and $NS_B"
}

cmd_status() {
    for ns in "$NS_A" "$NS_B"; do
        if ip netns list | grep -qw "$ns"; then
            echo "== $ns"
            ip -n "$ns" -brief addr
            tc -n "$ns" qdisc show
        else
            echo "== $ns: absent"
        fi
    done
}

cmd_exec() {
    need_root
    local side=${1:-}; shift || true
    case $side in
        a) exec ip netns exec "$NS_A" "$@" ;;
        b) exec ip netns exec "$NS_B" "$@" ;;
        *) die "exec a|b CMD..." ;;
    esac
}

case ${1:-} in
    check) shift; cmd_check "$@" ;;
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    status) shift; cmd_status "$@" ;;
    exec) shift; cmd_exec "$@" ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
