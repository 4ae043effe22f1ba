#!/usr/bin/env bash
# Quick start: install what is needed, build, and run a whole unit on this
# machine (`rackblock up`) in ./rackblock-data. Arguments go to `rackblock up`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/install-deps.sh"
cargo build --release --manifest-path "$root/Cargo.toml" -p cli --bin rackblock
exec "$root/target/release/rackblock" up "$@"
