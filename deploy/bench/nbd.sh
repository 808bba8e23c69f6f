#!/usr/bin/env bash
# NBD front-end benchmark: fio's nbd engine against replicator (slink 0 only; slink 0 plus an
# async local slink) and against qemu-nbd (cache=none, aio=io_uring) and nbdkit's file plugin
# serving an equal file on the same disk. Same jobs, one run, printed as ratios to qemu-nbd.
#
#   deploy/bench/nbd.sh            # full run (about 7 minutes: 4 jobs x 4 servers x 3 rounds)
#   RUNTIME=5 deploy/bench/nbd.sh  # shorter
#   JOBS=seq-write-1M-qd16 deploy/bench/nbd.sh   # only the named jobs (space-separated)
#   BEFORE_BIN=/path/to/old/replicator deploy/bench/nbd.sh
#       # adds that build's two rows ("before(...)") to the same run: a change measured side by
#       # side with the build it replaces, taking turns with the other servers on every job
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
RUNTIME=${RUNTIME:-6}
ROUNDS=${ROUNDS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
command -v fio >/dev/null && command -v qemu-nbd >/dev/null && command -v nbdkit >/dev/null || bash deploy/install-deps.sh
cargo build --release --bin replicator >/dev/null
bin="${CARGO_TARGET_DIR:-$root/target}/release/replicator"

work=$(mktemp -d "$root/bench-nbd.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# name|fio args
jobs=(
  "seq-write-1M-qd16|--rw=write --bs=1M --iodepth=16"
  "rand-write-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
  "rand-write-4k-qd1|--rw=randwrite --bs=4k --iodepth=1"
  "rand-read-4k-qd32|--rw=randread --bs=4k --iodepth=32"
)
if [ -n "${JOBS:-}" ]; then
  wanted=()
  for j in "${jobs[@]}"; do
    for w in $JOBS; do [ "${j%%|*}" = "$w" ] && wanted+=("$j"); done
  done
  [ ${#wanted[@]} -gt 0 ] || { echo "JOBS=$JOBS names no job" >&2; exit 2; }
  jobs=("${wanted[@]}")
fi

# run_fio URI JOBARGS -> prints "MiB/s IOPS"
run_fio() {
  local uri=$1; shift
  fio --name=b --ioengine=nbd --uri="$uri" --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" \
      --ramp_time=2 --output-format=json "$@" 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); d=json.loads(t[t.index("{"):])["jobs"][0]; io=d["write"] if d["write"]["io_bytes"] else d["read"]; print(io["bw"]/1024, io["iops"])'
}

prefill() { # the read job needs data on the device
  fio --name=fill --ioengine=nbd --uri="$1" --size="${SIZE_MIB}M" --rw=write --bs=1M --iodepth=16 >/dev/null 2>&1
}

declare -A result
declare -A uris
labels=(qemu-nbd nbdkit "replicator(slink0)" "replicator(+async)")
[ -n "${BEFORE_BIN:-}" ] && labels+=("before(slink0)" "before(+async)")

# qemu-nbd
truncate -s "${SIZE_MIB}M" "$work/qemu.img"
qemu-nbd -f raw --cache=none --aio=io_uring -t -b 127.0.0.1 -p 10901 -x qemu --shared=8 "$work/qemu.img" &
pids+=($!)
# nbdkit file plugin
truncate -s "${SIZE_MIB}M" "$work/nbdkit.img"
nbdkit -f -i 127.0.0.1 -p 10902 -e nbdkit file "$work/nbdkit.img" &
pids+=($!)
# replicator
export REPLICATOR_CONTROL="$work/control.sock"
"$bin" daemon --nbd 127.0.0.1:10903 --state-dir "$work/state" 2>"$work/daemon.log" &
pids+=($!)
for _ in $(seq 100); do "$bin" ls >/dev/null 2>&1 && break; sleep 0.1; done
sectors=$((SIZE_MIB * 2048))
replog_sectors=$((1024 * 2048))
cd "$work"
cat >solo.table <<T
0 $sectors replicator default 4 solo-replog.img 0 create $replog_sectors local 2 0 async ios=0 2 0 solo0.img - 0
T
cat >pair.table <<T
0 $sectors replicator default 4 pair-replog.img 0 create $replog_sectors local 2 0 async ios=0 2 0 pair0.img - 0 local 2 1 async 2 0 pair1.img core 2 2048 nosync
T
"$bin" create solo solo.table
"$bin" create pair pair.table
if [ -n "${BEFORE_BIN:-}" ]; then
  mkdir -p before
  sed 's/solo-replog.img/before\/solo-replog.img/; s/solo0.img/before\/solo0.img/' solo.table >before/solo.table
  sed 's/pair-replog.img/before\/pair-replog.img/; s/pair\([01]\).img/before\/pair\1.img/g' pair.table >before/pair.table
  REPLICATOR_CONTROL="$work/before/control.sock" "$BEFORE_BIN" daemon --nbd 127.0.0.1:10904 \
    --control "$work/before/control.sock" --state-dir "$work/before/state" 2>"$work/before/daemon.log" &
  pids+=($!)
  for _ in $(seq 100); do "$BEFORE_BIN" ls --control "$work/before/control.sock" >/dev/null 2>&1 && break; sleep 0.1; done
  "$BEFORE_BIN" create --control "$work/before/control.sock" solo before/solo.table
  "$BEFORE_BIN" create --control "$work/before/control.sock" pair before/pair.table
  uris["before(slink0)"]="nbd://127.0.0.1:10904/solo"
  uris["before(+async)"]="nbd://127.0.0.1:10904/pair"
fi
cd "$root"
sleep 1

uris[qemu-nbd]="nbd://127.0.0.1:10901/qemu"
uris[nbdkit]="nbd://127.0.0.1:10902/"
uris["replicator(slink0)"]="nbd://127.0.0.1:10903/solo"
uris["replicator(+async)"]="nbd://127.0.0.1:10903/pair"
for label in "${labels[@]}"; do prefill "${uris[$label]}"; done
# Servers take turns on each job, ROUNDS times; the median of the rounds is reported, so a noisy
# moment on this shared machine does not land on one server only.
for j in "${jobs[@]}"; do
  name=${j%%|*} args=${j#*|}
  for round in $(seq "$ROUNDS"); do
    for label in "${labels[@]}"; do
      # shellcheck disable=SC2086
      result["$label/$name/$round"]=$(run_fio "${uris[$label]}" $args)
    done
  done
  for label in "${labels[@]}"; do
    result["$label/$name"]=$(for round in $(seq "$ROUNDS"); do echo "${result[$label/$name/$round]}"; done |
      sort -k2 -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}')
  done
done

printf '\n%-20s %-22s %12s %10s %10s\n' job server MiB/s IOPS "vs qemu-nbd"
echo "(median of $ROUNDS rounds of ${RUNTIME}s per job and server; $SIZE_MIB MiB per export)"
for j in "${jobs[@]}"; do
  name=${j%%|*}
  read -r qbw qiops <<<"${result[qemu-nbd/$name]}"
  for label in "${labels[@]}"; do
    read -r bw iops <<<"${result[$label/$name]}"
    ratio=$(python3 -c "print(f'{$iops/$qiops:.2f}x' if $qiops else 'n/a')")
    printf '%-20s %-22s %12.1f %10.0f %10s\n' "$name" "$label" "$bw" "$iops" "$ratio"
  done
done
