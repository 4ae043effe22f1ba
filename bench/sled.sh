#!/usr/bin/env bash
# bench/sled.sh: a sled controller on loopback against fio on the same backing
# file, in the same run, interleaved (fio, sled, fio, sled, ...), medians.
#   1 MiB append throughput (durable: each append waits for a device flush)
#   1 MiB read throughput
#   4 KiB random read latency at QD1 (p50, p99)
# Output: BENCH lines (conventions: bench/README.md) and bench/out/sled.json.
# BENCH_SECONDS (default 5) sets each job's length; BENCH_ROUNDS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-5}
rounds=${BENCH_ROUNDS:-3}
streams=${BENCH_STREAMS:-4}
for tool in fio python3 fallocate; do
  command -v $tool >/dev/null || { echo "bench/sled.sh: $tool is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
cargo build --release -q -p cli --bin rackblock
bin="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
out="$root/bench/out"; work="$out/sled-work"
rm -rf "$work"; mkdir -p "$work"
dev_bytes=$((8 * 1024 * 1024 * 1024))
for d in 0 1; do fallocate -l $dev_bytes "$work/dev$d.img"; done
# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh"
write_sled_rack $dev_bytes "$work/dev0.img" "$work/dev1.img"

if curl -s -o /dev/null http://127.0.0.1:17101/health 2>/dev/null; then
  echo "bench/sled.sh: 127.0.0.1:17101 is already in use (another sled controller running?)" >&2; exit 1
fi
pid=""
stop_sled() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi; }
trap 'stop_sled; drop_images' EXIT

fio_job() { # rw bs iodepth -> json file
  fio --name=base --filename="$work/dev0.img" --direct=1 --ioengine=io_uring --rw=$1 --bs=$2 \
      --iodepth=$3 --size=$dev_bytes --time_based --runtime=$seconds --output-format=json \
      --output="$work/fio-$1.json" >/dev/null
}
fio_field() { # file expr
  python3 -c "import json,sys; j=json.load(open('$1'))['jobs'][0]; print($2)"
}
ours() { # phase -> key=value line
  "$bin" sled bench $1 --address-a 127.0.1.61:17100 --address-b 127.0.2.61:17100 --credentials "$work/credentials" \
    --state "$work/state.txt" --seconds $seconds --streams $streams
}
kv() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

declare -a fw fr fp50 fp99 ow or op50 op99
for r in $(seq 1 $rounds); do
  stop_sled
  fio_job write 1M $streams;   fw+=("$(fio_field "$work/fio-write.json" "j['write']['bw_bytes']/1e6")")
  fio_job read 1M $streams;    fr+=("$(fio_field "$work/fio-read.json" "j['read']['bw_bytes']/1e6")")
  fio_job randread 4k 1
  fp50+=("$(fio_field "$work/fio-randread.json" "j['read']['clat_ns']['percentile']['50.000000']/1000")")
  fp99+=("$(fio_field "$work/fio-randread.json" "j['read']['clat_ns']['percentile']['99.000000']/1000")")
  # fresh sled format on the same (now written) files
  for d in 0 1; do dd if=/dev/zero of="$work/dev$d.img" bs=4096 count=2 conv=notrunc status=none; done
  dd if=/dev/zero of="$work/other.img" bs=4096 count=2 conv=notrunc status=none
  "$bin" sled-controller --config "$work/sled.toml" >"$work/sled.log" 2>&1 &
  pid=$!
  healthy=no
  for _ in $(seq 1 200); do curl -sf http://127.0.0.1:17101/health >/dev/null 2>&1 && { healthy=yes; break; }; sleep 0.1; done
  [ $healthy = yes ] || { echo "bench/sled.sh: sled controller did not become healthy:" >&2; tail -5 "$work/sled.log" >&2; exit 1; }
  line=$(ours append);   ow+=("$(kv "$line" mb_per_s)")
  line=$(ours read);     or+=("$(kv "$line" mb_per_s)")
  line=$(ours randread); op50+=("$(kv "$line" p50_us)"); op99+=("$(kv "$line" p99_us)")
  stop_sled
  echo "# round $r: fio write ${fw[-1]} read ${fr[-1]} MB/s, 4k p50 ${fp50[-1]} us | sled append ${ow[-1]} read ${or[-1]} MB/s, 4k p50 ${op50[-1]} us" >&2
done

python3 - "$out/sled.json" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(df -T "$work" | awk 'NR==2{print $2}')" <<PY
import json, statistics, sys, os
med = lambda xs: statistics.median(float(x) for x in xs)
rows = [
  ("sled.append1m.qd$streams.mb_per_s", med("${ow[*]}".split()), med("${fw[*]}".split()), "MB/s", "higher"),
  ("sled.read1m.qd$streams.mb_per_s", med("${or[*]}".split()), med("${fr[*]}".split()), "MB/s", "higher"),
  ("sled.randread4k.qd1.p50_us", med("${op50[*]}".split()), med("${fp50[*]}".split()), "us", "lower"),
  ("sled.randread4k.qd1.p99_us", med("${op99[*]}".split()), med("${fp99[*]}".split()), "us", "lower"),
]
print("# baseline: fio io_uring O_DIRECT on the same backing file, same run, median of $rounds rounds;")
print("# sled appends are durable (each waits for a shared fdatasync), fio writes are not")
out = []
for name, value, base, unit, better in rows:
    ratio = value / base if base else 0.0
    print(f"BENCH {name} value={value:.1f} unit={unit} baseline={base:.1f} ratio={ratio:.3f} better={better}")
    out.append(dict(metric=name, value=value, unit=unit, baseline=base, ratio=ratio, better=better))
json.dump(dict(script="sled.sh", commit=sys.argv[2], nproc=os.cpu_count(),
               mem_bytes=os.sysconf("SC_PAGE_SIZE")*os.sysconf("SC_PHYS_PAGES"), fs=sys.argv[3],
               seconds=$seconds, rounds=$rounds, figures=out), open(sys.argv[1], "w"), indent=1)
PY
