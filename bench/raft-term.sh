#!/usr/bin/env bash
# bench/raft-term.sh: does the unit's Raft leader keep its term under write
# load (issue 14, item 7)? Runs the end-to-end test
# `failover::raft_term_holds_under_write_load` alone, in release: a fresh
# unit (3 head nodes, 6 sleds, production timings) under LOAD_SECONDS
# (default 600) of verifying writes through the volume client. Prints the
# term at start and after the load, the leader, and the longest gap between
# two completions; fails if the leader changed. Then, from the head nodes'
# logs: elections started, AppendEntries that timed out at the leader, and
# Raft log writes slower than 50 ms (count, total, longest), and leases that
# ran out before their renewal came (count, longest gap without a lease).
# BENCH_FIO_JOBS (default 0): that many fio jobs of 4 KiB O_DIRECT random
# writes with an fsync each run beside it on this disk (the contention
# that raised the term before the control connections and priority).
# Bounded by BENCH_TIMEOUT_S (default LOAD_SECONDS + 300).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck source=bench/lib.sh
. bench/lib.sh
export LOAD_SECONDS=${LOAD_SECONDS:-600}
timeout_s=${BENCH_TIMEOUT_S:-$((LOAD_SECONDS + 300))}
fio_jobs=${BENCH_FIO_JOBS:-0}
out="$root/bench/out"; logs="$out/raft-term-logs"
rm -rf "$logs"; mkdir -p "$logs"
echo "# building release (rackblock and the e2e test binary)" >&2
cargo build --release -q -p cli --bin rackblock
test_bin=$(e2e_test_bin --release)
[ -x "$test_bin" ] || { echo "bench/raft-term.sh: no release test binary found" >&2; exit 1; }
export RACKBLOCK_BIN="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
fio_pid=
if [ "$fio_jobs" -gt 0 ]; then
  command -v fio >/dev/null || { echo "bench/raft-term.sh: fio is missing" >&2; exit 1; }
  timeout "$timeout_s" fio --name=disk-load --filename="$out/raft-term-fio.img" --size=256M \
    --rw=randwrite --bs=4k --direct=1 --fsync=1 --time_based --runtime="$timeout_s" \
    --numjobs="$fio_jobs" >/dev/null 2>&1 &
  fio_pid=$!
fi
status=0
FAILOVER_KEEP_LOGS="$logs" timeout --kill-after=10 "$timeout_s" "$test_bin" \
  failover::raft_term_holds_under_write_load --exact --nocapture --test-threads=1 2>&1 \
  | grep -E "raft term|panicked|test result" || status=$?
if [ -n "$fio_pid" ]; then kill "$fio_pid" 2>/dev/null || true; wait "$fio_pid" 2>/dev/null || true; fi
rm -f "$out/raft-term-fio.img"
for log in "$logs"/hn-*.log; do
  [ -e "$log" ] || continue
  python3 - "$log" <<'PY'
import re, sys
path = sys.argv[1]
elections = timeouts = 0
slow = []
gaps = []
for line in open(path, errors="replace"):
    if "do trigger election" in line:
        elections += 1
    elif "RPCError" in line and "AppendEntries" in line:
        timeouts += 1
    elif "lease renewed after it lapsed" in line:
        m = re.search(r"gap_ms=(\d+)", line)
        if m:
            gaps.append(int(m.group(1)))
    elif "slow raft log write" in line:
        m = re.search(r"total_ms=(\d+)", line)
        if m:
            slow.append(int(m.group(1)))
name = path.rsplit("/", 1)[-1][:-4]
print(f"{name}: elections started {elections}, AppendEntries failed {timeouts}, "
      f"raft log writes >= 50 ms: {len(slow)} ({sum(slow)} ms in all, longest {max(slow, default=0)} ms), "
      f"leases lapsed before renewal: {len(gaps)} (longest gap {max(gaps, default=0)} ms)")
PY
done
exit $status
