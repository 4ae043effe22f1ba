#!/usr/bin/env bash
# Runs the deterministic simulation of the partition data path
# (head-node/tests/it/sim.rs) over any number of seeds.
#
#   scripts/sim.sh                # 1000 seeds from seed 1
#   scripts/sim.sh 20000 5000     # 20000 seeds from seed 5000
#   SIM_SEED=3468 cargo test -p head-node --test it -- sim:: --nocapture   # one seed, full trace
#
# Every seed runs. Prints one line per failing seed (what broke; rerun it
# with SIM_SEED for the events that led there), then the summary
# `sim: N seeds, A writes acknowledged, C crashes, T take-overs, F failed`;
# exits non-zero when a seed failed. Honours CARGO_TARGET_DIR. Debug build:
# the engine's debug assertions are part of the checks.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
count="${1:-1000}"
first="${2:-1}"
cd "$root"
SIM_SEEDS="$count" SIM_FIRST_SEED="$first" \
    cargo test --quiet -p head-node --test it -- sim:: --nocapture 2>&1 |
    grep -E '^(sim:|simulation seed|[0-9]+ of [0-9]+ seeds failed)'
exit "${PIPESTATUS[0]}"
