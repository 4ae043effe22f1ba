#!/usr/bin/env bash
# bench/datapath.sh: the data path end to end (volume client -> primary head
# node -> secondary head node, flush to 4+2 erasure-coded stripes on sleds)
# against fio on a raw file on the same disk, in the same run, interleaved
# (fio, ours, fio, ours, ...), medians over BENCH_ROUNDS rounds:
#   4 KiB random write at QD1: p50, p99 latency (ours are durable on two head
#     nodes' logs; fio's baseline: io_uring O_DIRECT + fdatasync per write)
#   4 KiB random write and random read at QD32: IOPS (reads of flushed data)
#   1 MiB sequential write and read: MB/s; sequential write also beside the
#     physical bound: fio's sequential write MB/s / write amplification 3.5
#     (2 head-node logs + (k+m)/k = 1.5 on the sleds)
# Unit: 3 head nodes + 6 sleds (two file-backed devices each) on loopback,
# files under bench/out/datapath-work. Every process is stopped by pid.
#   1 MiB sequential read: the unit's CPU (head nodes + sleds, from
#     /proc/<pid>/stat) per MiB beside fio's own CPU per MiB, and the sled
#     read requests per MiB (rackblock_sled_operations_total{op="read"}) beside
#     the bound of one request per data column (4 per MiB at 4+2)
# Output: BENCH lines (conventions: bench/README.md) and bench/out/datapath.json.
# BENCH_SECONDS (default 5) sets each job's length; BENCH_ROUNDS (default 3).
# RACKBLOCK_BIN runs that binary instead of building one (e.g. an older
# build, for a before/after comparison); otherwise the release build goes to
# $CARGO_TARGET_DIR (default target/).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-5}
rounds=${BENCH_ROUNDS:-3}
seq_qd=${BENCH_SEQ_QD:-4}
for tool in fio python3 fallocate curl; do
  command -v $tool >/dev/null || { echo "bench/datapath.sh: $tool is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
if [ -n "${RACKBLOCK_BIN:-}" ]; then
  bin=$RACKBLOCK_BIN
else
  cargo build --release -q -p cli --bin rackblock
  bin="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
fi
out="$root/bench/out"; work="$out/datapath-work"
rm -rf "$work"; mkdir -p "$work"

dev_bytes=$((1024 * 1024 * 1024))
# 1 GiB volume in four 256 MiB partitions over the three head nodes: random
# I/O reaches every primary, a sequential stream moves from one to the next.
volume_gib=1
partition_mib=256
region_bytes=$((volume_gib * 1024 * 1024 * 1024))
base_port=18000
head_admin() { echo "127.0.0.1:$((base_port + $1))"; }   # head node 1..3
sled_admin() { echo "127.0.0.1:$((base_port + 110 + $1))"; } # sled 1..6
for h in 1 2 3; do
  if curl -s -o /dev/null "http://$(head_admin $h)/health" 2>/dev/null; then
    echo "bench/datapath.sh: $(head_admin $h) is already in use (another unit running?)" >&2; exit 1
  fi
done

{
  printf '[unit]\nname = "bench"\ncolumn_size_bytes = 67108864\nerasure_codes = ["4+2"]\n\n'
  for h in 1 2 3; do
    printf '[[head_node]]\nid = "hn-%d"\naddress_a = "127.0.1.%d:%d"\naddress_b = "127.0.2.%d:%d"\nadmin = "%s"\nhost = "127.0.0.%d:%d"\n\n' \
      $h $h $base_port $h $base_port "$(head_admin $h)" $h $base_port
  done
  for s in 1 2 3 4 5 6; do
    printf '[[sled]]\nid = "sled-%d"\naddress_a = "127.0.1.%d:%d"\naddress_b = "127.0.2.%d:%d"\nadmin = "%s"\n' \
      $s $((100 + s)) $((base_port + 100)) $((100 + s)) $((base_port + 100)) "$(sled_admin $s)"
    for d in 0 1; do
      fallocate -l $dev_bytes "$work/sled-$s-dev$d.img"
      printf '[[sled.device]]\npath = "%s"\nsize_bytes = %d\nfault_domain = "fd-%d"\n' "$work/sled-$s-dev$d.img" $dev_bytes $s
    done
    printf '\n'
  done
} > "$work/rack.toml"
# The unit's keys beside the rack file (SECURITY.md); `volume register` and
# `volume bench` use the operator key found there.
"$bin" rack init-credentials --rack "$work/rack.toml" >/dev/null
for s in 1 2 3 4 5 6; do
  printf 'rack_file = "%s"\nsled_id = "sled-%d"\nscrub_bytes_per_second = 0\nscrub_pass_interval_ms = 600000\n' \
    "$work/rack.toml" $s > "$work/sled-$s.toml"
done
for h in 1 2 3; do
  printf 'rack_file = "%s"\nhead_node_id = "hn-%d"\ndata_dir = "%s"\n' "$work/rack.toml" $h "$work/hn-$h" > "$work/hn-$h.toml"
done
# The baseline's raw file, written once so reads hit the disk (reads of
# unwritten extents never would).
fio_bytes=$((1024 * 1024 * 1024))
dd if=/dev/zero of="$work/fio.img" bs=1M count=$((fio_bytes / 1048576)) oflag=direct status=none

pids=()
stop_all() { # head nodes first (started last), so none reads from a stopped sled
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true; wait "${pids[i]}" 2>/dev/null || true
  done
  pids=()
}
# Device images and logs of several GiB stay behind otherwise: drop every
# file over 16 MiB at exit (logs and JSON stay), unless BENCH_KEEP_WORK=1.
drop_images() { [ "${BENCH_KEEP_WORK:-0}" = 1 ] || find "$work" -type f -size +16M -delete 2>/dev/null || true; }
trap 'stop_all; drop_images' EXIT
wait_http() { # url what -> waits (bounded) until the body matches $3 (default: any 200)
  for _ in $(seq 1 600); do
    body=$(curl -sf "$1" 2>/dev/null) && { [ -z "${3:-}" ] || echo "$body" | grep -q "$3"; } && return 0
    sleep 0.1
  done
  echo "bench/datapath.sh: $2 not ready after 60 s ($1); logs in $work" >&2; exit 1
}
for s in 1 2 3 4 5 6; do
  "$bin" sled-controller --config "$work/sled-$s.toml" >"$work/sled-$s.log" 2>&1 &
  pids+=($!)
done
for s in 1 2 3 4 5 6; do wait_http "http://$(sled_admin $s)/health" "sled-$s"; done
for h in 1 2 3; do
  "$bin" head-node --config "$work/hn-$h.toml" >"$work/hn-$h.log" 2>&1 &
  pids+=($!)
done
for h in 1 2 3; do wait_http "http://$(head_admin $h)/health" "hn-$h"; done
registered=no
for _ in $(seq 1 60); do
  if "$bin" volume register --rack "$work/rack.toml" --id 1 --name bench --size-gib $volume_gib \
       --code 4+2 --partition-size-mib $partition_mib >"$work/register.log" 2>&1; then registered=yes; break; fi
  sleep 0.5
done
[ $registered = yes ] || { echo "bench/datapath.sh: volume register failed:" >&2; cat "$work/register.log" >&2; exit 1; }
for h in 1 2 3; do wait_http "http://$(head_admin $h)/partitions" "hn-$h data path" '"ready":true'; done
echo "# unit up and volume registered after ${SECONDS} s" >&2

flush_all() {
  for h in 1 2 3; do
    curl -sf -X POST --max-time 120 "http://$(head_admin $h)/flush" >"$work/flush-$h.json" \
      || { echo "bench/datapath.sh: POST /flush on hn-$h failed: $(cat "$work/flush-$h.json")" >&2; exit 1; }
  done
}
fio_job() { # name rw bs iodepth [extra...] -> $work/fio-<name>.json
  local name=$1 rw=$2 bs=$3 qd=$4; shift 4
  fio --name=base --filename="$work/fio.img" --direct=1 --ioengine=io_uring --rw=$rw --bs=$bs \
      --iodepth=$qd --size=$fio_bytes --time_based --runtime=$seconds --output-format=json \
      --output="$work/fio-$name.json" "$@" >/dev/null
}
fio_field() { # name expr
  python3 -c "import json; j=json.load(open('$work/fio-$1.json'))['jobs'][0]; print($2)"
}
ours() { # phase qd -> key=value line
  "$bin" volume bench $1 --rack "$work/rack.toml" --volume 1 --state "$work/state.txt" \
    --seconds $seconds --qd $2 --region-bytes $region_bytes 2>>"$work/bench.log" | tee -a "$work/ours.txt" \
    || { echo "bench/datapath.sh: volume bench $1 --qd $2 failed:" >&2; tail -5 "$work/bench.log" >&2; return 1; }
}
kv() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
unit_cpu_ticks() { # utime + stime of every process of the unit
  local p total=0
  for p in "${pids[@]}"; do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo $total
}
sled_read_requests() { # sled read requests answered, summed over the sleds
  local s total=0 n
  for s in 1 2 3 4 5 6; do
    n=$(curl -sf "http://$(sled_admin $s)/metrics" | awk '/^rackblock_sled_operations_total\{/ && /op="read"/ {sum += $NF} END {printf "%d", sum}')
    total=$((total + ${n:-0}))
  done
  echo $total
}
clk_tck=$(getconf CLK_TCK)
# fio's QD1 durable write: the write's completion latency plus its fdatasync.
sync_lat='(j["sync"]["lat_ns"]["percentile"]["%s"] if "percentile" in j.get("sync",{}).get("lat_ns",{}) else 0)'

declare -a f1p50 f1p99 f32w f32r fsw fsr o1p50 o1p99 o32w o32r osw osr fcpu ocpu oreq
for r in $(seq 1 "$rounds"); do
  fio_job w1 randwrite 4k 1 --fdatasync=1
  f1p50+=("$(fio_field w1 "(j['write']['clat_ns']['percentile']['50.000000'] + $(printf "$sync_lat" 50.000000))/1000")")
  f1p99+=("$(fio_field w1 "(j['write']['clat_ns']['percentile']['99.000000'] + $(printf "$sync_lat" 99.000000))/1000")")
  line=$(ours randwrite 1); o1p50+=("$(kv "$line" p50_us)"); o1p99+=("$(kv "$line" p99_us)")
  fio_job w32 randwrite 4k 32;  f32w+=("$(fio_field w32 "j['write']['iops']")")
  line=$(ours randwrite 32);    o32w+=("$(kv "$line" iops)")
  fio_job sw write 1M $seq_qd;  fsw+=("$(fio_field sw "j['write']['bw_bytes']/1e6")")
  line=$(ours seqwrite $seq_qd); osw+=("$(kv "$line" mb_per_s)")
  # Reads of flushed data: everything written so far goes to the sleds.
  t0=$(date +%s.%N); flush_all; flush_s=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
  fio_job r32 randread 4k 32;   f32r+=("$(fio_field r32 "j['read']['iops']")")
  line=$(ours randread 32);     o32r+=("$(kv "$line" iops)")
  fio_job sr read 1M $seq_qd;   fsr+=("$(fio_field sr "j['read']['bw_bytes']/1e6")")
  # fio's CPU (usr + sys, % of its runtime) per MiB it read.
  fcpu+=("$(fio_field sr "(j['usr_cpu'] + j['sys_cpu']) / 100 * j['job_runtime'] / (j['read']['io_bytes'] / 1048576)")")
  cpu0=$(unit_cpu_ticks); req0=$(sled_read_requests)
  line=$(ours seqread $seq_qd); osr+=("$(kv "$line" mb_per_s)")
  cpu1=$(unit_cpu_ticks); req1=$(sled_read_requests)
  mib=$(python3 -c "print(max($(kv "$line" bytes), 1) / 1048576)")
  ocpu+=("$(python3 -c "print(($cpu1 - $cpu0) * 1000 / $clk_tck / $mib)")")
  oreq+=("$(python3 -c "print(($req1 - $req0) / $mib)")")
  echo "# round $r: qd1 write p50 fio ${f1p50[-1]} ours ${o1p50[-1]} us | qd32 write fio ${f32w[-1]} ours ${o32w[-1]} iops | qd32 read fio ${f32r[-1]} ours ${o32r[-1]} iops | seq write fio ${fsw[-1]} ours ${osw[-1]} MB/s | seq read fio ${fsr[-1]} ours ${osr[-1]} MB/s, cpu/MiB fio ${fcpu[-1]} unit ${ocpu[-1]} ms, sled reads/MiB ${oreq[-1]} | flush ${flush_s} s" >&2
done
stop_all
echo "# done after ${SECONDS} s" >&2

python3 - "$out/datapath.json" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(df -T "$work" | awk 'NR==2{print $2}')" <<PY
import json, statistics, sys, os
med = lambda xs: statistics.median(float(x) for x in xs)
seq_write_fio = med("${fsw[*]}".split())
amplification = 2 + (4 + 2) / 4
rows = [
  ("datapath.randwrite4k.qd1.p50_us", med("${o1p50[*]}".split()), med("${f1p50[*]}".split()), "us", "lower", None),
  ("datapath.randwrite4k.qd1.p99_us", med("${o1p99[*]}".split()), med("${f1p99[*]}".split()), "us", "lower", None),
  ("datapath.randwrite4k.qd32.iops", med("${o32w[*]}".split()), med("${f32w[*]}".split()), "iops", "higher", None),
  ("datapath.randread4k.qd32.iops", med("${o32r[*]}".split()), med("${f32r[*]}".split()), "iops", "higher", None),
  ("datapath.seqwrite1m.qd$seq_qd.mb_per_s", med("${osw[*]}".split()), seq_write_fio, "MB/s", "higher", None),
  ("datapath.seqwrite1m.qd$seq_qd.vs_bound.mb_per_s", med("${osw[*]}".split()), seq_write_fio / amplification, "MB/s", "higher",
   f"# bound: fio sequential write MB/s {seq_write_fio:.1f} / write amplification {amplification} (2 head-node logs + (k+m)/k at 4+2)"),
  ("datapath.seqread1m.qd$seq_qd.mb_per_s", med("${osr[*]}".split()), med("${fsr[*]}".split()), "MB/s", "higher", None),
  ("datapath.seqread1m.qd$seq_qd.cpu_ms_per_mib", med("${ocpu[*]}".split()), med("${fcpu[*]}".split()), "ms", "lower",
   "# baseline: fio's own CPU per MiB read; ours: the unit's (3 head nodes + 6 sleds), the client's not counted"),
  ("datapath.seqread1m.qd$seq_qd.sled_reads_per_mib", med("${oreq[*]}".split()), 4.0, "requests", "lower",
   "# bound: one sled read request per data column a MiB covers (4 at 4+2)"),
]
print("# baseline: fio io_uring O_DIRECT on a raw file on the same disk, same run, interleaved, median of $rounds rounds of ${seconds} s;")
print("# QD1 write baseline latency = fio write clat + fdatasync latency percentiles (--fdatasync=1): ours are durable on two head nodes")
print("# QD32 writes: fio without flushes (the issue's goal); reads: ours of data flushed to 4+2 stripes (POST /flush first)")
out = []
for name, value, base, unit, better, comment in rows:
    if comment:
        print(comment)
    ratio = value / base if base else 0.0
    print(f"BENCH {name} value={value:.1f} unit={unit} baseline={base:.1f} ratio={ratio:.3f} better={better}")
    out.append(dict(metric=name, value=value, unit=unit, baseline=base, ratio=ratio, better=better,
                    **({"bound": comment[2:]} if comment else {})))
json.dump(dict(script="datapath.sh", commit=sys.argv[2], nproc=os.cpu_count(),
               mem_bytes=os.sysconf("SC_PAGE_SIZE")*os.sysconf("SC_PHYS_PAGES"), fs=sys.argv[3],
               seconds=$seconds, rounds=$rounds, seq_qd=$seq_qd, figures=out), open(sys.argv[1], "w"), indent=1)
PY
