#!/usr/bin/env bash
# bench/nbd.sh: a host's view. fio's nbd engine against vol0 of a unit
# started by `rackblock up` (zonal plane, 3 head nodes, 6 sleds with two
# file-backed devices each, 4+2, vol0 served by the attach agent) and, in
# the same run, interleaved (qemu-nbd, ours, qemu-nbd, ours, ...), against
# `qemu-nbd --cache=none -f raw` serving a raw file on the same disk;
# medians over BENCH_ROUNDS rounds:
#   4 KiB random write QD1 with a flush after every write (--fsync=1, which
#     sends NBD_CMD_FLUSH): p50, p99 of write clat + flush latency
#     goal: p50 <= 1.5x qemu-nbd's
#   4 KiB random write QD32: IOPS               goal: >= 1.0x qemu-nbd
#   4 KiB random read QD32 (written data): IOPS goal: >= 1.0x qemu-nbd
#   1 MiB sequential write and read (QD4): MB/s goal for reads: >= 1.0x
# Both targets hold the same 1 GiB region, written once before the rounds
# (ours then flushed to the sleds, so reads come from erasure-coded stripes
# unless a later write is still in the log); files under bench/out/nbd-work.
# Every process is stopped by pid. Output: BENCH lines (conventions:
# bench/README.md) and bench/out/nbd.json.
# BENCH_SECONDS (default 5) sets each job's length; BENCH_ROUNDS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-5}
rounds=${BENCH_ROUNDS:-3}
seq_qd=4
for tool in fio:fio qemu-nbd:qemu-utils python3:python3 curl:curl; do
  command -v "${tool%%:*}" >/dev/null || {
    echo "bench/nbd.sh: ${tool%%:*} is missing: install the Debian package ${tool##*:} (scripts/install-deps.sh does)" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench/nbd.sh: this fio has no nbd engine (fio >= 3.20 has)" >&2; exit 1; }
cargo build --release -q -p cli --bin rackblock
bin="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
out="$root/bench/out"; work="$out/nbd-work"
rm -rf "$work"; mkdir -p "$work"

# Ports of this bench (sled.sh uses 17xxx, datapath.sh 18xxx): head nodes'
# data 19000, sleds' data 19100, admin 19201-19203 and 19301-19306.
base_port=19000; admin_base=19200
zonal=127.0.0.1:19400; ours_nbd=127.0.0.1:19401; qemu_port=19402
for port in 19000 19100 19201 19202 19203 19400 19401 $qemu_port; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || (exec 3<>/dev/tcp/127.0.1.1/$port) 2>/dev/null; then
    echo "bench/nbd.sh: port $port is in use (another bench/nbd.sh running?)" >&2; exit 1
  fi
done
region_bytes=$((1024 * 1024 * 1024))

# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh" # pids, stop_pids, drop_images
trap 'stop_pids; drop_images' EXIT

# qemu-nbd's raw file, written once so reads hit the disk.
dd if=/dev/zero of="$work/qemu.img" bs=1M count=$((region_bytes / 1048576)) oflag=direct status=none
qemu-nbd --cache=none -f raw --persistent --shared=8 --bind 127.0.0.1 --port $qemu_port \
  --export-name base "$work/qemu.img" >"$work/qemu-nbd.log" 2>&1 &
pids+=($!)

"$bin" up --data-dir "$work/unit" --base-port $base_port --admin-base-port $admin_base \
  --zonal-listen $zonal --nbd-listen $ours_nbd --volume-size 4GiB --wait-seconds 120 \
  >"$work/up.log" 2>&1 &
pids+=($!)
up_pid=$!
for _ in $(seq 1 1500); do
  grep -q "Ctrl-C stops the unit." "$work/up.log" && break
  kill -0 $up_pid 2>/dev/null || { echo "bench/nbd.sh: rackblock up exited:" >&2; tail -20 "$work/up.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "Ctrl-C stops the unit." "$work/up.log" || { echo "bench/nbd.sh: unit not up after 150 s:" >&2; tail -20 "$work/up.log" >&2; exit 1; }
for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/$qemu_port) 2>/dev/null && break
  sleep 0.1
done

ours_uri="nbd://$ours_nbd/vol0"; qemu_uri="nbd://127.0.0.1:$qemu_port/base"
fio_job() { # target name rw bs iodepth [extra...] -> $work/<target>-<name><suffix>.json
  local target=$1 name=$2 rw=$3 bs=$4 qd=$5; shift 5
  local uri=$ours_uri; [ "$target" = qemu ] && uri=$qemu_uri
  timeout $((seconds + 60)) fio --name=$name --ioengine=nbd --uri="$uri" --rw=$rw --bs=$bs \
    --iodepth=$qd --size=$region_bytes --output-format=json \
    --output="$work/$target-$name$suffix.json" "$@" >/dev/null 2>>"$work/fio.err" \
    || { echo "bench/nbd.sh: fio $name on $target failed:" >&2; tail -5 "$work/fio.err" >&2; return 1; }
}
timed() { fio_job "$@" --time_based --runtime=$seconds; }
field() { # target name expr
  python3 -c "import json; j=json.load(open('$work/$1-$2$suffix.json'))['jobs'][0]; assert j['error'] == 0, j['error']; print($3)"
}
# Durable QD1 write: the write's completion latency plus its flush's.
durable='(j["write"]["clat_ns"]["percentile"]["%s"] + j["sync"]["lat_ns"]["percentile"]["%s"]) / 1000'

# Both regions written once; ours then flushed to the sleds.
suffix=""
fio_job ours fill write 1M 4
fio_job qemu fill write 1M 4
for h in 1 2 3; do
  curl -sf -X POST --max-time 120 "http://127.0.0.1:$((admin_base + h))/flush" >"$work/flush-$h.json" \
    || { echo "bench/nbd.sh: POST /flush on hn-$h failed" >&2; exit 1; }
done

declare -a q1p50 q1p99 q32w q32r qsw qsr o1p50 o1p99 o32w o32r osw osr
for r in $(seq 1 "$rounds"); do
  suffix="-r$r"
  for target in qemu ours; do
    timed $target w1 randwrite 4k 1 --fsync=1
    timed $target w32 randwrite 4k 32
    timed $target r32 randread 4k 32
    timed $target sw write 1M $seq_qd
    timed $target sr read 1M $seq_qd
  done
  q1p50+=("$(field qemu w1 "$(printf "$durable" 50.000000 50.000000)")")
  q1p99+=("$(field qemu w1 "$(printf "$durable" 99.000000 99.000000)")")
  o1p50+=("$(field ours w1 "$(printf "$durable" 50.000000 50.000000)")")
  o1p99+=("$(field ours w1 "$(printf "$durable" 99.000000 99.000000)")")
  q32w+=("$(field qemu w32 "j['write']['iops']")"); o32w+=("$(field ours w32 "j['write']['iops']")")
  q32r+=("$(field qemu r32 "j['read']['iops']")");  o32r+=("$(field ours r32 "j['read']['iops']")")
  qsw+=("$(field qemu sw "j['write']['bw_bytes']/1e6")"); osw+=("$(field ours sw "j['write']['bw_bytes']/1e6")")
  qsr+=("$(field qemu sr "j['read']['bw_bytes']/1e6")");  osr+=("$(field ours sr "j['read']['bw_bytes']/1e6")")
  echo "# round $r: qd1 durable write p50 qemu-nbd ${q1p50[-1]} ours ${o1p50[-1]} us | qd32 write qemu-nbd ${q32w[-1]} ours ${o32w[-1]} iops | qd32 read qemu-nbd ${q32r[-1]} ours ${o32r[-1]} iops | seq write qemu-nbd ${qsw[-1]} ours ${osw[-1]} MB/s | seq read qemu-nbd ${qsr[-1]} ours ${osr[-1]} MB/s" >&2
done
stop_pids

python3 - "$out/nbd.json" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(df -T "$work" | awk 'NR==2{print $2}')" <<PY
import json, statistics, sys, os
med = lambda xs: statistics.median(float(x) for x in xs)
rows = [
  ("nbd.randwrite4k.qd1.fsync.p50_us", "${o1p50[*]}", "${q1p50[*]}", "us", "lower", "# goal: ratio <= 1.5 (durable 4 KiB write at QD1 vs qemu-nbd's write + flush)"),
  ("nbd.randwrite4k.qd1.fsync.p99_us", "${o1p99[*]}", "${q1p99[*]}", "us", "lower", None),
  ("nbd.randwrite4k.qd32.iops", "${o32w[*]}", "${q32w[*]}", "iops", "higher", "# goal: ratio >= 1.0 (no flushes on either side)"),
  ("nbd.randread4k.qd32.iops", "${o32r[*]}", "${q32r[*]}", "iops", "higher", "# goal: ratio >= 1.0 (reads of written data)"),
  ("nbd.seqwrite1m.qd$seq_qd.mb_per_s", "${osw[*]}", "${qsw[*]}", "MB/s", "higher", None),
  ("nbd.seqread1m.qd$seq_qd.mb_per_s", "${osr[*]}", "${qsr[*]}", "MB/s", "higher", "# goal: ratio >= 1.0"),
]
print("# baseline: qemu-nbd --cache=none -f raw serving a raw file on the same disk, fio 3.33 nbd engine on both,")
print("# same run, interleaved, median of $rounds rounds of ${seconds} s; QD1 latency = fio write clat + flush (sync) latency percentiles")
out = []
for name, values, bases, unit, better, comment in rows:
    value, base = med(values.split()), med(bases.split())
    if comment:
        print(comment)
    ratio = value / base if base else 0.0
    print(f"BENCH {name} value={value:.1f} unit={unit} baseline={base:.1f} ratio={ratio:.3f} better={better}")
    out.append(dict(metric=name, value=value, unit=unit, baseline=base, ratio=ratio, better=better,
                    rounds=[float(x) for x in values.split()], baseline_rounds=[float(x) for x in bases.split()],
                    **({"goal": comment[2:]} if comment else {})))
json.dump(dict(script="nbd.sh", commit=sys.argv[2], nproc=os.cpu_count(),
               mem_bytes=os.sysconf("SC_PAGE_SIZE")*os.sysconf("SC_PHYS_PAGES"), fs=sys.argv[3],
               seconds=$seconds, rounds=$rounds, seq_qd=$seq_qd, region_bytes=$region_bytes,
               baseline="qemu-nbd --cache=none -f raw", figures=out), open(sys.argv[1], "w"), indent=1)
PY
