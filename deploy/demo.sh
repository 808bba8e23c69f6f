#!/usr/bin/env bash
# The main job: two sites on this machine, replicating over TCP on loopback, file-backed, no
# manual setup.
#
# Site B: a daemon that accepts slinks (--slink-listen) and holds a secondary device.
# Site A: a daemon whose device `dev0` is replicated to site B by a tcp slink.
# A client writes through NBD at site A (qemu-io), the demo shows the lag at site A returning to
# zero through `status --json`, byte-compares the device at both sites, and stops both daemons
# with SIGTERM. KEEP=1 leaves them running.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

command -v qemu-io >/dev/null && command -v jq >/dev/null && command -v curl >/dev/null \
  || bash deploy/install-deps.sh
cargo build --release --bin replicator
bin="${CARGO_TARGET_DIR:-$root/target}/release/replicator"

run="$root/run"
rm -rf "$run" && mkdir -p "$run/siteA" "$run/siteB"
head -c 32 /dev/urandom | base64 >"$run/link.key"   # the sites' pre-shared key (never sent)
A="--control $run/siteA/control.sock"
B="--control $run/siteB/control.sock"

"$bin" daemon $B --nbd 127.0.0.1:10810 --state-dir "$run/siteB/state" \
  --site-id siteB --psk-file "$run/link.key" --slink-listen 127.0.0.1:7410 --allow siteA \
  2>"$run/siteB/daemon.log" &
pid_b=$!
"$bin" daemon $A --nbd 127.0.0.1:10809 --metrics 127.0.0.1:9109 --state-dir "$run/siteA/state" \
  --site-id siteA --psk-file "$run/link.key" --peer siteB@127.0.0.1:7410 \
  2>"$run/siteA/daemon.log" &
pid_a=$!
trap 'if [ -z "${KEEP:-}" ]; then kill $pid_a $pid_b 2>/dev/null || true; fi' EXIT
for _ in $(seq 100); do "$bin" ls $A >/dev/null 2>&1 && "$bin" ls $B >/dev/null 2>&1 && break; sleep 0.1; done

echo "== site B: create --secondary dev0 (deploy/tables/quickstart-secondary.table)"
"$bin" create $B --secondary dev0 deploy/tables/quickstart-secondary.table
echo "== site A: create dev0 (deploy/tables/quickstart-primary.table)"
grep -v '^#' deploy/tables/quickstart-primary.table
"$bin" create $A dev0 deploy/tables/quickstart-primary.table
"$bin" ls $A

uri="nbd://127.0.0.1:10809/dev0"
echo "== a client writes 48 MiB through NBD at site A (qemu-io)"
for i in $(seq 0 11); do
  qemu-io -f raw "$uri" -c "write -P $((i + 1)) $((i * 4))M 4M" >/dev/null
done
echo "== status at site A right after the writes"
"$bin" status $A dev0
"$bin" status $A dev0 --json | jq -c '.slinks[] | {slink, transport, mode, state, lag_ios, lag_bytes, lag_seconds, dirty_bytes}'

echo "== waiting for site B's lag to return to 0"
for _ in $(seq 600); do
  lag=$("$bin" status $A dev0 --json | jq '[.slinks[].lag_ios] | add')
  [ "$lag" = 0 ] && break
  sleep 0.1
done
"$bin" status $A dev0 --json | jq -c '.slinks[] | {slink, lag_ios, lag_bytes, lag_seconds, link: .link.state}'
for _ in $(seq 100); do
  [ "$("$bin" status $B dev0 --json | jq '.slinks[0].lag_ios')" = 0 ] && break; sleep 0.1
done
echo "== site B (secondary) status"
"$bin" status $B dev0 --json | jq -c '{role, last_lsn: .replog.last_lsn, applied: .slinks[0].applied_lsn}'
size=$((64 * 1024 * 1024))
if cmp -n "$size" run/siteA/dev0.img run/siteB/dev0.img; then
  echo "== the device is byte-identical at both sites (cmp of $size bytes)"
else
  echo "== MISMATCH between the sites" >&2
  exit 1
fi
echo "== site B's export is read-only; reading it back through NBD:"
qemu-io -r -f raw nbd://127.0.0.1:10810/dev0 -c "read -P 12 44M 4M" | tail -1

echo "== a few metrics of site A (http://127.0.0.1:9109/metrics)"
curl -s "http://127.0.0.1:9109/metrics" | grep -E '^replicator_slink_lag_(ios|bytes|seconds)' || true

if [ -n "${KEEP:-}" ]; then
  echo "== daemons left running (site A pid $pid_a, site B pid $pid_b)"
else
  kill -TERM $pid_a $pid_b && wait $pid_a $pid_b
  echo "== both daemons stopped cleanly"
fi
