#!/usr/bin/env bash
# Long-link benchmark: two daemons on this machine, the link between them through the in-repo
# link emulator (replicator-linkemu: 50 ms one-way = 100 ms RTT, rate-capped), because these
# machines lack sch_netem; on a host with netem, deploy/netem/netem-link.sh builds the same link
# with namespaces (set LINK=netem to only print that hint).
#
# For each link rate (RATES, default "100mbit 1gbit"), in one run:
#  (a) 4 KiB random write latency p50/p99 at QD1 with an async remote site vs no remote site;
#  (b) shipping throughput during sustained 1 MiB writes, as a share of the link rate
#      (bytes the tcp slink put on the wire per second, measured over a window mid-run);
#  (c) 4 KiB write latency with a sync remote site (expected: about one RTT plus local).
#
# Before each measurement, the async groups' backlog is shipped first (at most DRAIN_MAX seconds),
# so one measurement's backlog is not load on the next.
#
#   deploy/bench/link.sh                 # about 7 minutes (14 with BEFORE_BIN)
#   RUNTIME=5 RATES=100mbit deploy/bench/link.sh
#   BEFORE_BIN=/path/to/old/replicator deploy/bench/link.sh
#       # adds that build's rows ("before") to the same run: its own daemons and emulator, taking
#       # turns with this build on every (a) round and (c); (b) runs one build at a time, which
#       # is stopped afterwards (the first of the two alternates between link rates)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
RUNTIME=${RUNTIME:-10}
# (a) also runs at a fixed rate below every link rate tested (RATE_IOPS x 4 KiB), so it measures
# what shipping costs a write, not what a saturated link costs.
RATE_IOPS=${RATE_IOPS:-1000}
# Where the secondary keeps its files. On one machine the secondary's fdatasyncs share the
# primary's disk, which a real second site does not; SECONDARY_DIR=/dev/shm models a disk of its
# own (the CPU stays shared).
SECONDARY_DIR=${SECONDARY_DIR:-}
# CPU sets (taskset -c) for the primary side (daemon and fio) and the far side (secondary daemon
# and emulator): PRIMARY_CPUS=0 SECONDARY_CPUS=1 keeps the far side's work off the primary's CPU,
# as a second site and a real network would. Empty: all processes share every CPU.
PRIMARY_CPUS=${PRIMARY_CPUS:-}
SECONDARY_CPUS=${SECONDARY_CPUS:-}
# Nice value of the far side (secondary daemon and emulator). A second site is another host: its
# work costs the primary no CPU. FAR_NICE=19 approximates that on one machine without taking a
# CPU away from the primary (as pinning does): the far side runs on what the primary leaves idle.
# 0 (default): the far side competes with the primary as an equal.
FAR_NICE=${FAR_NICE:-0}
# (a) runs ROUNDS times, with and without the remote site taking turns; the median is reported,
# so a noisy moment on this shared machine does not land on one side only.
ROUNDS=${ROUNDS:-3}
# Command prefixes (taskset and nice exec the program, so a background PID is the program's own).
on_primary=(); [ -n "$PRIMARY_CPUS" ] && on_primary=(taskset -c "$PRIMARY_CPUS")
on_far=(nice -n "$FAR_NICE"); [ -n "$SECONDARY_CPUS" ] && on_far+=(taskset -c "$SECONDARY_CPUS")
RATES=${RATES:-"100mbit 1gbit"}
DELAY=${DELAY:-50ms}
command -v fio >/dev/null && command -v jq >/dev/null || bash deploy/install-deps.sh
cargo build --release --bin replicator -p replicator -q
cargo build --release -p slink --bin replicator-linkemu -q
tdir="${CARGO_TARGET_DIR:-$root/target}/release"
bin="$tdir/replicator"
emu="$tdir/replicator-linkemu"

work=$(mktemp -d "$root/bench-link.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for l in "$work"/*/*/b; do [ -L "$l" ] && rm -rf "$(readlink "$l")"; done
  rm -rf "$work"
}
trap cleanup EXIT
head -c 32 /dev/urandom | base64 >"$work/key"
DEV_MIB=2048
sectors=$((DEV_MIB * 2048))
ring=$((1024 * 2048))

# fio_lat URI [FIO ARGS] -> "p50_us p99_us iops" (total latency: submission + completion)
fio_lat() {
  local uri=$1; shift
  "${on_primary[@]}" fio --name=lat --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=1 --size=256M \
      --time_based --runtime="$RUNTIME" --ramp_time=1 --lat_percentiles=1 --output-format=json "$@" 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); w=json.loads(t[t.index("{"):])["jobs"][0]["write"]; p=w["lat_ns"]["percentile"]; print(p["50.000000"]/1e3, p["99.000000"]/1e3, w["iops"])'
}

# The builds measured: this one ("after") and, with BEFORE_BIN, an older one ("before"). Each has
# daemons, emulator and groups of its own; they take turns on every measurement.
builds=(after)
declare -A bin_of=([after]="$bin")
if [ -n "${BEFORE_BIN:-}" ]; then
  [ -x "$BEFORE_BIN" ] || { echo "BEFORE_BIN=$BEFORE_BIN is not an executable" >&2; exit 2; }
  builds+=(before)
  bin_of[before]=$BEFORE_BIN
fi
# The async groups' backlog must be shipped before a measurement starts, or it would be measured
# as load on whatever runs next (an unthrottled (a) round writes faster than 100 Mbit/s ships).
DRAIN_MAX=${DRAIN_MAX:-120}
declare -A nbd_of dir_of pids_of

# start_build LABEL RATE PORT: that build's secondary, emulator and primary, with its groups
start_build() {
  local label=$1 rate=$2 port=$3 b=${bin_of[$1]}
  local s_listen=127.0.0.1:$port e_listen=127.0.0.1:$((port + 1)) e_ctl=127.0.0.1:$((port + 2))
  local nbd=$((port + 3)) d=$work/$rate/$label
  mkdir -p "$d/a"
  if [ -n "$SECONDARY_DIR" ]; then
    local sb; sb=$(mktemp -d "$SECONDARY_DIR/bench-link-b.XXXXXX"); ln -s "$sb" "$d/b"
  else
    mkdir -p "$d/b"
  fi
  "${on_far[@]}" "$b" daemon --control "$d/b/c.sock" --state-dir "$d/b/st" --site-id siteB --psk-file "$work/key" \
    --slink-listen "$s_listen" --allow siteA 2>"$d/b/log" &
  pids+=($!); pids_of[$label]+=" $!"
  "${on_far[@]}" "$emu" --listen "$e_listen" --upstream "$s_listen" --delay "$DELAY" --rate "$rate" --control "$e_ctl" 2>"$d/emu.log" &
  pids+=($!); pids_of[$label]+=" $!"
  "${on_primary[@]}" "$b" daemon --control "$d/a/c.sock" --nbd "127.0.0.1:$nbd" --state-dir "$d/a/st" --site-id siteA \
    --psk-file "$work/key" --peer "siteB@$e_listen" 2>"$d/a/log" &
  pids+=($!); pids_of[$label]+=" $!"
  for _ in $(seq 100); do "$b" ls --control "$d/a/c.sock" >/dev/null 2>&1 && "$b" ls --control "$d/b/c.sock" >/dev/null 2>&1 && break; sleep 0.1; done
  (cd "$d/b"
   for g in async sync; do
     echo "0 $sectors replicator default 4 $g-replog.img 0 create $ring local 2 0 async 2 0 $g-dev.img - 0" >$g.table
     "$b" create --control "$d/b/c.sock" --secondary "$g" $g.table
   done)
  (cd "$d/a"
   echo "0 $sectors replicator default 4 solo-replog.img 0 create $ring local 2 0 async 2 0 solo.img - 0" >solo.table
   echo "0 $sectors replicator default 4 async-replog.img 0 create $ring local 2 0 async 2 0 async.img - 0 tcp 3 1 async $e_listen 2 0 async disk 3 2048 async.dirty nosync" >async.table
   echo "0 $sectors replicator default 4 sync-replog.img 0 create $ring local 2 0 async 2 0 sync.img - 0 tcp 3 1 sync $e_listen 2 0 sync - 0" >sync.table
   for g in solo async sync; do "$b" create --control "$d/a/c.sock" "$g" $g.table; done)
  for g in async sync; do
    for _ in $(seq 200); do
      [ "$("$b" status --control "$d/a/c.sock" $g --json | jq -r '.slinks[1].link.state')" = up ] && break; sleep 0.1
    done
  done
  nbd_of[$label]=$nbd dir_of[$label]=$d
}

# stop_build LABEL: its processes go (kill -9: a bench's files are thrown away), so a backlog it
# still ships costs the next measurement no CPU
stop_build() {
  local p
  for p in ${pids_of[$1]}; do kill -9 "$p" 2>/dev/null || true; done
  for p in ${pids_of[$1]}; do wait "$p" 2>/dev/null || true; done
  pids_of[$1]=""
}

# slink1 LABEL FIELD: a field of the async group's tcp slink, from that build's primary
slink1() { "${bin_of[$1]}" status --control "${dir_of[$1]}/a/c.sock" async --json | jq ".slinks[1].$2"; }

# drain: wait until every running build's async group has shipped everything (at most DRAIN_MAX s)
drain() {
  local label waited=0
  for label in "${builds[@]}"; do
    [ -n "${pids_of[$label]}" ] || continue
    while [ "$(slink1 "$label" lag_ios)" != 0 ] || [ "$(slink1 "$label" dirty_bytes)" != 0 ]; do
      if [ "$waited" -ge "$((DRAIN_MAX * 10))" ]; then
        echo "warning: $label's async group still behind after ${DRAIN_MAX}s; measuring anyway" >&2
        drained=no
        return
      fi
      sleep 0.1; waited=$((waited + 1))
    done
  done
}

results=()
drained=yes
port=11500
rate_no=0
for rate in $RATES; do
  port=$((port + 10))
  for i in "${!builds[@]}"; do start_build "${builds[$i]}" "$rate" $((port + 5 * i)); done
  d=$work/$rate
  : >"$d/lat"
  # (a) the builds take turns, the first one changing every round; lines are "BUILD CONFIG p50 p99 iops"
  order=("${builds[@]}")
  for round in $(seq "$ROUNDS"); do
    for label in "${order[@]}"; do
      u="nbd://127.0.0.1:${nbd_of[$label]}"
      drain; echo "$label solo $(fio_lat "$u/solo")" >>"$d/lat"
      drain; echo "$label async $(fio_lat "$u/async")" >>"$d/lat"
      drain; echo "$label rsolo $(fio_lat "$u/solo" --rate_iops="$RATE_IOPS")" >>"$d/lat"
      drain; echo "$label rasync $(fio_lat "$u/async" --rate_iops="$RATE_IOPS")" >>"$d/lat"
    done
    if [ ${#order[@]} -gt 1 ]; then order=("${order[1]}" "${order[0]}"); fi
  done
  # median over the rounds of p50 and of p99, per build and configuration
  med() { awk -v b="$1" -v k="$2" -v c="$3" '$1 == b && $2 == k {print $c}' "$d/lat" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  declare -A sync_p50 sync_p99 ship app
  for label in "${order[@]}"; do
    drain
    read -r sync_p50[$label] sync_p99[$label] _ <<<"$(fio_lat "nbd://127.0.0.1:${nbd_of[$label]}/sync")"
  done

  # (b) sustained 1 MiB writes to the async device; sample the slink's wire bytes mid-run. One
  # build at a time, which then stops (its backlog would load the next one's run); the first
  # build alternates from one link rate to the next.
  b_order=("${builds[@]}")
  if [ ${#builds[@]} -gt 1 ] && [ $((rate_no % 2)) = 1 ]; then b_order=("${builds[1]}" "${builds[0]}"); fi
  for label in "${b_order[@]}"; do
    drain
    total=$((RUNTIME * 2 + 4))
    "${on_primary[@]}" fio --name=seq --ioengine=nbd --uri="nbd://127.0.0.1:${nbd_of[$label]}/async" --rw=write --bs=1M --iodepth=8 \
        --size=${DEV_MIB}M --time_based --runtime=$total --output-format=json >"$d/$label/seq.json" 2>/dev/null &
    fio_pid=$!
    sleep 3
    b0=$(slink1 "$label" link.bytes_sent)
    t0=$(date +%s.%N)
    sleep "$RUNTIME"
    b1=$(slink1 "$label" link.bytes_sent)
    t1=$(date +%s.%N)
    wait $fio_pid || true
    app[$label]=$(python3 -c 'import json; t=open("'"$d/$label/seq.json"'").read(); w=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print(w["bw"]/1024)')
    ship[$label]=$(python3 -c "print(($b1-$b0)*8/($t1-$t0))")
    stop_build "$label"
  done
  link_bps=$(python3 -c "r='$rate'; m={'k':1e3,'m':1e6,'g':1e9}; print(float(r[:-4])*m[r[-4]] if r.endswith('bit') else float(r)*8)")
  for label in "${builds[@]}"; do
    results+=("$rate|$label|$(med "$label" solo 3)|$(med "$label" solo 4)|$(med "$label" async 3)|$(med "$label" async 4)|$(med "$label" rsolo 3)|$(med "$label" rsolo 4)|$(med "$label" rasync 3)|$(med "$label" rasync 4)|${sync_p50[$label]}|${sync_p99[$label]}|${ship[$label]}|$link_bps|${app[$label]}")
  done
  unset sync_p50 sync_p99 ship app
  sed "s/^/$rate /" "$d/lat" >>"$work/rounds"
  rate_no=$((rate_no + 1))
done

echo
echo "link: in-repo emulator (replicator-linkemu), one-way delay $DELAY (RTT = 2x), rate capped per direction"
echo "secondary's files: ${SECONDARY_DIR:-same file system as the primary}; CPUs: primary side ${PRIMARY_CPUS:-all}, far side ${SECONDARY_CPUS:-all} at nice $FAR_NICE"
echo "(a): median of $ROUNDS rounds of ${RUNTIME}s, with and without the remote site taking turns${BEFORE_BIN:+, and the two builds}"
if [ -n "${BEFORE_BIN:-}" ]; then echo "before = $BEFORE_BIN; after = $bin"; fi
[ "$drained" = yes ] || echo "NOTE: some measurement started before an async backlog had drained (see the warnings)"
echo "(a) every round, in the order run (link build config p50_us p99_us iops):"
sed 's/^/  /' "$work/rounds"
for r in "${results[@]}"; do
  IFS='|' read -r -a v <<<"$r"
  python3 - "$RATE_IOPS" "${v[@]}" <<'PY'
import sys
rate_iops = sys.argv[1]
rate, build, sp50, sp99, ap50, ap99, rsp50, rsp99, rap50, rap99, yp50, yp99, ship, link, app = sys.argv[2:]
f = lambda v: float(v) / 1e3  # us -> ms
print(f"--- link {rate}, {build}")
print(f"(a) 4 KiB QD1 writes, as fast as they go: no remote p50/p99 {f(sp50):.3f}/{f(sp99):.3f} ms; "
      f"async remote {f(ap50):.3f}/{f(ap99):.3f} ms; p99 ratio {float(ap99)/float(sp99):.2f}x")
print(f"(a) 4 KiB QD1 writes at {rate_iops}/s:          no remote p50/p99 {f(rsp50):.3f}/{f(rsp99):.3f} ms; "
      f"async remote {f(rap50):.3f}/{f(rap99):.3f} ms; p99 ratio {float(rap99)/float(rsp99):.2f}x")
print(f"(b) shipping during sustained 1 MiB writes (app wrote {float(app):.0f} MiB/s): "
      f"{float(ship)/1e6:.1f} Mbit/s = {100*float(ship)/float(link):.1f}% of the link rate")
print(f"(c) 4 KiB QD1 writes with a sync remote site: p50/p99 {f(yp50):.1f}/{f(yp99):.1f} ms")
PY
done
