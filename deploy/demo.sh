#!/usr/bin/env bash
# The main job: a replicated group on this machine, file-backed, no manual setup.
#
# Brings up `replicator daemon` with a group from deploy/tables/quickstart-local.table (a primary
# device and a second site, both files under ./run/), writes through NBD with qemu-io, waits for
# the second site's lag to return to zero, byte-compares the two sites, shows status and metrics,
# and stops the daemon cleanly. Leave it running with KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

command -v qemu-io >/dev/null && command -v jq >/dev/null || bash deploy/install-deps.sh
cargo build --release --bin replicator
bin="${CARGO_TARGET_DIR:-$root/target}/release/replicator"

run="$root/run"
rm -rf "$run" && mkdir -p "$run"
export REPLICATOR_CONTROL="$run/control.sock"
NBD_PORT=${NBD_PORT:-10809}
METRICS_PORT=${METRICS_PORT:-9109}

"$bin" daemon --nbd "127.0.0.1:$NBD_PORT" --metrics "127.0.0.1:$METRICS_PORT" \
  --state-dir "$run/state" 2>"$run/daemon.log" &
daemon=$!
trap '[ -z "${KEEP:-}" ] && kill $daemon 2>/dev/null; true' EXIT
for _ in $(seq 100); do "$bin" ls >/dev/null 2>&1 && break; sleep 0.1; done

echo "== create r1 from deploy/tables/quickstart-local.table"
cat deploy/tables/quickstart-local.table
"$bin" create r1 deploy/tables/quickstart-local.table
"$bin" ls

uri="nbd://127.0.0.1:$NBD_PORT/r1"
echo "== nbdinfo $uri"
command -v nbdinfo >/dev/null && nbdinfo "$uri" | sed -n '1,12p' || true

echo "== a client writes 48 MiB through NBD (qemu-io), then reads it back"
for i in $(seq 0 11); do
  qemu-io -f raw "$uri" -c "write -P $((i + 1)) $((i * 4))M 4M" >/dev/null
done
qemu-io -f raw "$uri" -c "read -P 12 44M 4M" | tail -1
echo "== status right after the writes"
"$bin" status r1
"$bin" status r1 --json | jq -c '.slinks[] | {slink, mode, state, lag_ios, lag_bytes, lag_seconds, dirty_bytes}'

echo "== waiting for the second site's lag to return to 0"
for _ in $(seq 600); do
  lag=$("$bin" status r1 --json | jq '[.slinks[].lag_ios] | add')
  [ "$lag" = 0 ] && break
  sleep 0.1
done
"$bin" status r1 --json | jq -c '.slinks[] | {slink, lag_ios, lag_bytes, lag_seconds}'
size=$((64 * 1024 * 1024))
if cmp -n "$size" run/primary0.img run/secondary0.img; then
  echo "== the two sites are byte-identical (cmp of $size bytes)"
else
  echo "== MISMATCH between the sites" >&2
  exit 1
fi

echo "== a few metrics (http://127.0.0.1:$METRICS_PORT/metrics)"
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null | grep -E '^replicator_slink_lag_(ios|bytes)' || true

if [ -n "${KEEP:-}" ]; then
  echo "== daemon left running (pid $daemon); REPLICATOR_CONTROL=$REPLICATOR_CONTROL"
else
  kill -TERM $daemon && wait $daemon
  echo "== daemon stopped cleanly"
fi
