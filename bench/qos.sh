#!/usr/bin/env bash
# bench/qos.sh: how closely the attach agent's per-volume QoS holds its
# limits. fio's nbd engine against `rackblock attach --memory` exports (the
# throttle sits at the backend seam, in front of whatever serves the
# volume, so an in-memory export measures the limiter itself; on a unit
# the limit holds the same way as long as the unit can go faster than it):
#   --qos-iops 500,  4 KiB random write QD16      goal: within ±15 % of 500
#   --qos-iops 1000, 4 KiB random read QD16       goal: within ±5 % of 1000
#   --qos-bps 50MiB, 1 MiB sequential write QD4   goal: within ±5 % of 50 MiB/s
#   --qos-iops 200 --qos-burst-iops 2000 --qos-burst-length 2s, after idle,
#     one job logging IOPS per second: the first second (goal: near 2000);
#     from the 5th second on, once the 4000-op bucket is spent (goal:
#     within ±5 % of 200)
# Baseline: the configured limit (a bound, not a peer): ratio 1.0 is exact.
# BENCH_SECONDS (default 5) sets each steady job's length; RACKBLOCK_BIN
# a prebuilt binary. Every agent is
# stopped by pid. Output: BENCH lines and bench/out/qos.json.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-5}
for tool in fio:fio python3:python3; do
  command -v "${tool%%:*}" >/dev/null || {
    echo "bench/qos.sh: ${tool%%:*} is missing: install the Debian package ${tool##*:}" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench/qos.sh: this fio has no nbd engine (fio >= 3.20 has)" >&2; exit 1; }
# RACKBLOCK_BIN: use that binary instead of building the release one (the
# limiter's accuracy at these rates does not depend on the build profile).
if [ -n "${RACKBLOCK_BIN:-}" ]; then
  bin=$RACKBLOCK_BIN
else
  cargo build --release -q -p cli --bin rackblock
  bin="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
fi
out="$root/bench/out"; work="$out/qos-work"
rm -rf "$work"; mkdir -p "$work"
port=19501

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap stop_all EXIT

agent() { # name qos-flags... -> serves nbd://127.0.0.1:$port/name
  local name=$1; shift
  port=$((port + 1))
  : >"$work/$name.log"
  "$bin" attach "$name" --memory 1GiB --listen 127.0.0.1:$port "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    grep -q "serving" "$work/$name.log" && return 0
    sleep 0.1
  done
  echo "bench/qos.sh: agent $name did not start:" >&2; cat "$work/$name.log" >&2; exit 1
}
fio_job() { # export name rw bs iodepth seconds [fio args...] -> $work/name.json
  local export=$1 name=$2 rw=$3 bs=$4 qd=$5 runtime=$6; shift 6
  fio --name="$name" --ioengine=nbd --uri="nbd://127.0.0.1:$port/$export" --rw="$rw" --bs="$bs" \
    --iodepth="$qd" --size=512M --time_based --runtime="$runtime" --output-format=json \
    --output="$work/$name.json" "$@" >/dev/null 2>>"$work/fio.err"
}

agent iops500 --qos-iops 500
fio_job iops500 iops500 randwrite 4k 16 "$seconds"
agent iops1000 --qos-iops 1000
fio_job iops1000 iops1000 randread 4k 16 "$seconds"
agent bps50 --qos-bps 50MiB
fio_job bps50 bps50 write 1M 4 "$seconds"
agent burst --qos-iops 200 --qos-burst-iops 2000 --qos-burst-length 2s
sleep 3 # idle: the buckets are full
# One continuous job (a gap between jobs would earn tokens back), IOPS
# logged per second.
fio_job burst burst randwrite 4k 16 $((4 + seconds)) \
  --write_iops_log="$work/burst" --log_avg_msec=1000
stop_all

python3 - "$work" "$out/qos.json" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import json, os, sys
work, out, commit = sys.argv[1:4]
def job(name):
    j = json.load(open(f"{work}/{name}.json"))["jobs"][0]
    assert j["error"] == 0, (name, j["error"])
    return j
figures = []
def bench(name, value, unit, bound, comment):
    print(f"# bound: {comment}")
    print(f"BENCH {name} value={value:.1f} unit={unit} baseline={bound:.1f} ratio={value / bound:.3f} better=closer")
    figures.append(dict(name=name, value=value, unit=unit, baseline=bound))
bench("qos_iops_500_randwrite_4k_qd16", job("iops500")["write"]["iops"], "IOPS", 500, "--qos-iops 500")
bench("qos_iops_1000_randread_4k_qd16", job("iops1000")["read"]["iops"], "IOPS", 1000, "--qos-iops 1000")
bench("qos_bps_50mib_seqwrite_1m_qd4", job("bps50")["write"]["bw_bytes"] / 2**20, "MiB/s", 50, "--qos-bps 50MiB")
job("burst")
import glob
per_second = []  # (end of the second in ms, IOPS)
for path in glob.glob(f"{work}/burst_iops*.log"):
    for line in open(path):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 2:
            per_second.append((int(fields[0]), float(fields[1])))
per_second.sort()
print("# burst job, IOPS per second: " + " ".join(f"{v:.0f}" for _, v in per_second))
bench("qos_burst_first_second", per_second[0][1], "IOPS", 2000, "burst 2000 IOPS after idle")
steady = [v for t, v in per_second[4:]]
bench("qos_burst_then_steady", sum(steady) / len(steady), "IOPS", 200, "limit 200 IOPS once the burst bucket is spent (5th second on)")
json.dump(dict(script="qos.sh", commit=commit, nproc=os.cpu_count(), figures=figures), open(out, "w"), indent=1)
PY
