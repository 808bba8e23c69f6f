#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a bare Debian 12 machine.
# Idempotent: a package that is already there is not fetched again.
set -euo pipefail

packages=(
  fio            # load and verify through fio's nbd engine; the replog benchmark's peer
  qemu-utils     # qemu-io, qemu-img, qemu-nbd (the NBD peer in benchmarks)
  libnbd-bin     # nbdinfo, nbdcopy, nbdsh
  nbdfuse        # nbdfuse: an NBD export as a file, for loop device + mkfs tests
  nbdkit         # the second NBD peer in benchmarks
  fuse3          # nbdfuse needs fusermount3
  e2fsprogs      # mkfs.ext4, e2fsck
  util-linux     # losetup, mount
  iproute2       # ip netns, tc
  jq             # reading `status --json` in scripts
  curl           # scraping /metrics in the demo
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
