#!/usr/bin/env bash
# The test command: installs test tools, builds the `rackblock` binary the
# end-to-end tests start, then runs every test of the workspace, and checks
# that the fuzz target still builds. Exits non-zero when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build -p cli --bin rackblock
cargo test --workspace --no-fail-fast "$@"
cargo build --manifest-path fuzz/Cargo.toml --bins
