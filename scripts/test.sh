#!/usr/bin/env bash
# The test command: installs test tools, builds the `rackblock` binary the
# end-to-end tests start, checks that the fuzz target still builds, then runs
# every test of the workspace. Exits non-zero when any test fails. The last
# line sums up all test binaries: `tests: N passed, N failed`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build -p cli --bin rackblock
cargo build --manifest-path fuzz/Cargo.toml --bins

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit $status
