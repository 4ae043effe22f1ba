#!/usr/bin/env bash
# bench/failover-nbd.sh: the host's write pause when vol0's primary head
# node is `kill -9`ed under fio through NBD (issue 14 item 6; goal: longest
# write p99 < 1 s, 0 errors). Runs the ignored end-to-end test
# `nbd_e2e::primary_kill9_under_fio_over_nbd_pause_bench`: `rackblock up`
# (3 head nodes, 6 sleds, 4+2, vol0 of 1 GiB over NBD), then FIO_FAILOVER_REPS
# (default 20) repetitions of one fio run (nbd engine, 4 KiB random writes,
# QD8, verify=crc32c, FIO_FAILOVER_MIB MiB, default 32) with the primary
# killed 1.5 s in; fio's longest write completion is the pause. The killed
# node is started again before the next repetition. Zero fio errors and a
# verified read-back are asserted by the test.
# Build: release unless RACKBLOCK_BIN names a binary (a debug build is
# slower; say which one ran when recording figures). Bounded by
# BENCH_TIMEOUT_S (default 1800). Output: BENCH lines (bench/README.md) and
# bench/out/failover-nbd.json.
# FIO_FAILOVER_HALF_FULL=1: the half-full-log variant (the head nodes flush
# only above 60 % fill; each kill waits until the primary's write log is at
# least 45 % full; defaults FIO_FAILOVER_REPS=5, FIO_FAILOVER_MIB=640);
# metrics failover.nbd.kill9.primary.half_full_log.*, output
# bench/out/failover-nbd-half-full.json.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck source=bench/lib.sh
. bench/lib.sh
timeout_s=${BENCH_TIMEOUT_S:-1800}
for tool in fio python3 timeout; do
  command -v $tool >/dev/null || { echo "bench/failover-nbd.sh: $tool is missing" >&2; exit 1; }
done
out="$root/bench/out"; mkdir -p "$out"
variant=""
if [ "${FIO_FAILOVER_HALF_FULL:-0}" = 1 ]; then
  variant="-half-full"
  export FIO_FAILOVER_REPS=${FIO_FAILOVER_REPS:-5} FIO_FAILOVER_MIB=${FIO_FAILOVER_MIB:-640}
fi
profile=release
if [ -n "${RACKBLOCK_BIN:-}" ]; then
  profile=$(case "$RACKBLOCK_BIN" in */debug/*) echo debug ;; */release/*) echo release ;; *) echo custom ;; esac)
  test_args=()
else
  echo "# building release (rackblock and the e2e test binary)" >&2
  cargo build --release -q -p cli --bin rackblock
  export RACKBLOCK_BIN="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
  test_args=(--release)
fi
test_bin=$(e2e_test_bin "${test_args[@]}")
[ -x "$test_bin" ] || { echo "bench/failover-nbd.sh: no test binary found" >&2; exit 1; }
log="$out/failover-nbd$variant.log"
export FIO_FAILOVER_LOG_DIR="$out/failover-nbd$variant-logs"
rm -rf "$FIO_FAILOVER_LOG_DIR"
status=0
timeout --kill-after=10 "$timeout_s" "$test_bin" nbd_e2e::primary_kill9_under_fio_over_nbd_pause_bench \
  --ignored --exact --nocapture --test-threads=1 >"$log" 2>&1 || status=$?
grep -E "FIO_FAILOVER_(PAUSE|SUMMARY)|panicked" "$log" >&2 || true
python3 - "$log" "$out/failover-nbd$variant.json" "$profile" "$variant" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import json, math, os, re, sys
log, out_path, profile, variant, commit = sys.argv[1:6]
pauses = [float(m.group(1)) for m in
          (re.search(r"FIO_FAILOVER_PAUSE rep=\d+ victim=\S+ pause_ms=([\d.]+)", l) for l in open(log, errors="replace")) if m]
case = "half_full_log." if variant else ""
def pct(values, p):  # nearest rank
    s = sorted(values)
    return s[min(len(s), max(1, math.ceil(p * len(s)))) - 1] if s else float("nan")
print(f"# {len(pauses)} kills, {profile} build; bound: goal p99 < 1000 ms (issue 14 item 6), no baseline run")
figures = []
for name, p in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
    value = pct(pauses, p)
    metric = f"failover.nbd.kill9.primary.{case}longest_write.{name}"
    print(f"BENCH {metric} value={value:.0f} unit=ms bound=1000 better=lower")
    figures.append(dict(metric=metric, value=round(value, 1), unit="ms", samples=len(pauses)))
json.dump(dict(script="failover-nbd.sh", commit=commit, profile=profile, nproc=os.cpu_count(),
               figures=figures, pauses_ms=pauses), open(out_path, "w"), indent=2)
PY
# Where each kill's pause went (the unit's logs the test kept).
if [ -d "$FIO_FAILOVER_LOG_DIR" ]; then
  echo "# timeline, ms after each kill (slowest first):"
  python3 bench/failover-timeline.py "$log" "$FIO_FAILOVER_LOG_DIR" | sed 's/^/# /' || true
fi
exit $status
