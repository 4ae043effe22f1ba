#!/usr/bin/env bash
# bench/raft-term.sh: does the unit's Raft leader keep its term under write
# load (issue 14, item 7)? Runs the ignored end-to-end test
# `failover::raft_term_holds_under_write_load` alone, in release: a fresh
# unit (3 head nodes, 6 sleds, production timings) under LOAD_SECONDS
# (default 600) of verifying writes through the volume client. Prints the
# term at start and after the load, the leader, and the longest gap between
# two completions; fails if the leader changed.
# Bounded by BENCH_TIMEOUT_S (default LOAD_SECONDS + 300).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export LOAD_SECONDS=${LOAD_SECONDS:-600}
timeout_s=${BENCH_TIMEOUT_S:-$((LOAD_SECONDS + 300))}
echo "# building release (rackblock and the e2e test binary)" >&2
cargo build --release -q -p cli --bin rackblock
test_bin=$(cargo test --release -q -p tests --test it --no-run --message-format=json \
  | python3 -c 'import json,sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "it" and m.get("executable"):
        print(m["executable"])' | tail -1)
[ -x "$test_bin" ] || { echo "bench/raft-term.sh: no release test binary found" >&2; exit 1; }
export RACKBLOCK_BIN="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
status=0
timeout --kill-after=10 "$timeout_s" "$test_bin" failover::raft_term_holds_under_write_load \
  --ignored --exact --nocapture --test-threads=1 2>&1 | grep -E "raft term|panicked|test result" || status=$?
exit $status
