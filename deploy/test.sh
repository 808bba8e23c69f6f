#!/usr/bin/env bash
# The test command (README.md): installs what the tests need, checks formatting and lints, then runs
# every test of the workspace with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --release --bins
cargo nextest run --workspace --release --no-fail-fast
