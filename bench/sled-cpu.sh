#!/usr/bin/env bash
# bench/sled-cpu.sh: CPU and context switches per request of a sled
# controller under a fixed 4 KiB load through the real protocol, plus fio's
# QD1 durable 4 KiB write latency on the same file as the baseline.
#   append: BENCH_STREAMS (default 16) writers of 4 KiB durable appends
#   read:   BENCH_STREAMS readers of 4 KiB chunks of what was appended
# For each phase: sled CPU us per request (utime+stime of every thread from
# /proc/<pid>/stat) and context switches per request (voluntary and not,
# summed over /proc/<pid>/task/*/status), before/after the phase.
# Env: BENCH_SECONDS (default 5), RACKBLOCK_BIN (default: build release),
# SLED_WORKER_THREADS (passed as --worker-threads; default: the binary's).
# Output: BENCH lines (bench/README.md conventions).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-5}
streams=${BENCH_STREAMS:-16}
for tool in fio python3 fallocate curl; do
  command -v $tool >/dev/null || { echo "bench/sled-cpu.sh: $tool is missing" >&2; exit 1; }
done
if [ -z "${RACKBLOCK_BIN:-}" ]; then
  cargo build --release -q -p cli --bin rackblock
  bin="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
else
  bin="$RACKBLOCK_BIN"
fi
out="$root/bench/out"; work="$out/sled-cpu-work"
rm -rf "$work"; mkdir -p "$work"
dev_bytes=$((2 * 1024 * 1024 * 1024))
fallocate -l $dev_bytes "$work/dev0.img"
# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh"
write_sled_rack $dev_bytes "$work/dev0.img"
if curl -s -o /dev/null http://127.0.0.1:17101/health 2>/dev/null; then
  echo "bench/sled-cpu.sh: 127.0.0.1:17101 is already in use" >&2; exit 1
fi
pid=""
stop_sled() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi; }
trap 'stop_sled; rm -f "$work"/*.img' EXIT

# fio baseline: QD1 durable 4 KiB writes (O_DIRECT write + fdatasync, as a
# sled append: write, then a shared flush) on the file.
fio --name=base --filename="$work/dev0.img" --direct=1 --fdatasync=1 --ioengine=io_uring --rw=write \
    --bs=4k --iodepth=1 --size=256m --time_based --runtime=$seconds --output-format=json \
    --output="$work/fio-qd1.json" >/dev/null
fio_p50=$(python3 -c "import json; j=json.load(open('$work/fio-qd1.json'))['jobs'][0]; print(j['write']['clat_ns']['percentile']['50.000000']/1000)")
fio_iops=$(python3 -c "import json; j=json.load(open('$work/fio-qd1.json'))['jobs'][0]; print(j['write']['iops'])")
dd if=/dev/zero of="$work/dev0.img" bs=4096 count=2 conv=notrunc status=none
dd if=/dev/zero of="$work/other.img" bs=4096 count=2 conv=notrunc status=none

threads_arg=()
[ -n "${SLED_WORKER_THREADS:-}" ] && threads_arg=(--worker-threads "$SLED_WORKER_THREADS")
"$bin" "${threads_arg[@]}" sled-controller --config "$work/sled.toml" >"$work/sled.log" 2>&1 &
pid=$!
healthy=no
for _ in $(seq 1 200); do curl -sf http://127.0.0.1:17101/health >/dev/null 2>&1 && { healthy=yes; break; }; sleep 0.1; done
[ $healthy = yes ] || { echo "bench/sled-cpu.sh: sled controller did not become healthy" >&2; tail -5 "$work/sled.log" >&2; exit 1; }

sample() { # -> "ticks ctxsw threads"
  python3 - "$pid" <<'PY'
import os, sys
pid = sys.argv[1]
stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
ticks = int(stat[11]) + int(stat[12])
switches = 0; threads = 0
for task in os.listdir(f"/proc/{pid}/task"):
    try:
        for line in open(f"/proc/{pid}/task/{task}/status"):
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
        threads += 1
    except OSError:
        pass
print(ticks, switches, threads)
PY
}
hz=$(getconf CLK_TCK)
kv() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
phase() { # name -> BENCH lines
  read -r t0 c0 _ <<<"$(sample)"
  line=$("$bin" sled bench $1 --address-a 127.0.1.61:17100 --address-b 127.0.2.61:17100 --credentials "$work/credentials" \
    --state "$work/state.txt" --seconds $seconds --streams $streams --chunk-bytes 4096)
  read -r t1 c1 threads <<<"$(sample)"
  ops=$(kv "$line" ops); iops=$(kv "$line" iops)
  python3 - <<PY
ops = $ops; cpu_us = ($t1 - $t0) * 1e6 / $hz; sw = $c1 - $c0
print(f"# sled $1 4k qd$streams: {ops} ops, {float('$iops'):.0f} IOPS, {cpu_us/1e6:.2f} CPU s, {sw} context switches, $threads threads")
print(f"BENCH sled.$1_4k.qd$streams.cpu_us_per_op value={cpu_us/ops:.1f} unit=us better=lower")
print(f"BENCH sled.$1_4k.qd$streams.ctxsw_per_op value={sw/ops:.2f} unit=switches better=lower")
print(f"BENCH sled.$1_4k.qd$streams.iops value={float('$iops'):.0f} unit=iops better=higher")
PY
}
phase append
phase read
# QD1 durable append latency (mean, from the IOPS of one stream) vs fio QD1 dsync writes.
line=$("$bin" sled bench append --address-a 127.0.1.61:17100 --address-b 127.0.2.61:17100 --credentials "$work/credentials" \
  --state "$work/state1.txt" --seconds $seconds --streams 1 --chunk-bytes 4096)
python3 - <<PY
ours = 1e6 / float("$(kv "$line" iops)"); base = 1e6 / float("$fio_iops")
print(f"BENCH sled.append_4k.qd1.mean_us value={ours:.1f} unit=us baseline={base:.1f} ratio={ours/base:.3f} better=lower")
print(f"# fio qd1 write+fdatasync write p50 (without the sync) {float('$fio_p50'):.1f} us")
PY
