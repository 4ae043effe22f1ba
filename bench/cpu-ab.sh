#!/usr/bin/env bash
# bench/cpu-ab.sh: same-run A/B of the CPU per I/O of two builds (or two
# settings) of the unit, process by process (issue 12 item 3: "each change
# measured before/after in the same run").
#
# Two memory-backed units run side by side (`rackblock up` on /dev/shm,
# 1 GiB vol0 in four 256 MiB partitions, sparse 2 GiB devices: with
# 512 MiB ones both units ran out of sled space after a few rounds of random
# writes, and the garbage collection that ran short of it was counted in the
# read jobs; scrubber off, no iSCSI, `--no-host-tls`
# unless BENCH_HOST_TLS=on), one per variant, both filled once; then fio's
# nbd engine runs each job on A, then B, then A, ... (BENCH_ROUNDS rounds,
# BENCH_SECONDS per job):
#   w32   4 KiB random write QD32 over the whole volume
#   r32   4 KiB random read  QD32 over the whole volume
#   w32p  4 KiB random write QD32 over the first partition (one primary,
#         one secondary: the head nodes' lines split primary from secondary)
#   r32p  4 KiB random read  QD32 over the first partition
# For each job and process: CPU µs per I/O (utime + stime) and context
# switches per I/O (every thread), from bench/procstat.py snapshots before
# and after the job; a unit's head nodes are named by role in the p jobs
# (the primary of partition 0 is the one whose CPU is highest).
#
# Variants: CPU_AB_A and CPU_AB_B, each `BINARY[,VAR=VALUE...]`: the
# rackblock binary and environment variables for its `up` (inherited by
# every daemon), e.g. `CPU_AB_B=$bin,RACKBLOCK_WORKER_THREADS=1`. Default:
# both the release build of this tree.
# BENCH_PERF=1: also `perf record` every process of variant A during one
# extra w32 and r32 job each, and print `perf report` by process and symbol
# (bench/out/cpu-ab/perf-*.txt).
# Output: a table on stdout and bench/out/cpu-ab/report.json. Every process
# is stopped by pid; /dev/shm is freed at exit (the daemons' logs are kept
# in bench/out/cpu-ab/logs-A and logs-B). A job window far longer than the
# job (a stall: I/O waiting out a failover on an overloaded box) is
# reported and left out of the sums.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-5}
rounds=${BENCH_ROUNDS:-2}
for tool in fio nbdinfo python3; do
  command -v "$tool" >/dev/null || { echo "bench/cpu-ab.sh: missing $tool (scripts/install-deps.sh)" >&2; exit 1; }
done
default_bin="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
if [ -z "${CPU_AB_A:-}" ] || [ -z "${CPU_AB_B:-}" ]; then
  cargo build --release -q -p cli --bin rackblock
fi
variant_a=${CPU_AB_A:-$default_bin}
variant_b=${CPU_AB_B:-$default_bin}
host_tls_args=(--no-host-tls)
[ "${BENCH_HOST_TLS:-off}" = on ] && host_tls_args=()
out="$root/bench/out/cpu-ab"; rm -rf "$out"; mkdir -p "$out/snap" "$out/fio"
shm="/dev/shm/rackblock-cpu-ab.$$"
volume_bytes=$((1 << 30)); partition_bytes=$((256 << 20))
# Ports: variant A 22000-22451, variant B 23000-23451 (other benches use
# 17xxx-21xxx).
for port in 22000 22201 22451 23000 23201 23451; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "bench/cpu-ab.sh: port $port is in use (another bench/cpu-ab.sh running?)" >&2; exit 1
  fi
done

work=$out
# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh"
cleanup() { # keep the daemons' logs, free the memory
  stop_pids
  local name
  for name in A B; do
    [ -d "$shm/$name/run" ] && mkdir -p "$out/logs-$name" && cp "$shm/$name"/run/*.log "$out/logs-$name/" 2>/dev/null
  done
  rm -rf "$shm"
}
trap cleanup EXIT
: >"$out/pids"

# start_unit NAME VARIANT BASE: `rackblock up` of VARIANT on ports from BASE.
start_unit() {
  local name=$1 variant=$2 base=$3
  local bin=${variant%%,*} envs=()
  [ "$variant" = "$bin" ] || IFS=, read -r -a envs <<<"${variant#*,}"
  [ -x "$bin" ] || { echo "bench/cpu-ab.sh: $bin is not an executable" >&2; exit 1; }
  mkdir -p "$shm/$name"
  env "${envs[@]}" "$bin" up --data-dir "$shm/$name" --base-port "$base" --admin-base-port $((base + 200)) \
    --zonal-listen 127.0.0.1:$((base + 450)) --nbd-listen 127.0.0.1:$((base + 451)) --wait-seconds 120 \
    --volume-size $volume_bytes --partition-size $partition_bytes --device-size-mib 2048 \
    --scrub-bytes-per-second 0 --no-iscsi "${host_tls_args[@]}" >"$out/$name-up.log" 2>&1 &
  local up_pid=$!
  pids+=("$up_pid")
  for _ in $(seq 1 1500); do
    grep -q "Ctrl-C stops the unit." "$out/$name-up.log" && break
    kill -0 "$up_pid" 2>/dev/null || { echo "bench/cpu-ab.sh: up ($name) exited:" >&2; tail -20 "$out/$name-up.log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q "Ctrl-C stops the unit." "$out/$name-up.log" || { echo "bench/cpu-ab.sh: $name not up" >&2; exit 1; }
  echo "$name control up $up_pid" >>"$out/pids"
  local file pname role
  for file in "$shm/$name"/run/*.pid; do
    pname=$(basename "$file" .pid)
    case $pname in hn-*) role=head_node ;; sled-*) role=sled ;; attach) role=attach ;; *) role=control ;; esac
    echo "$name $role $pname $(cat "$file")" >>"$out/pids"
  done
  for _ in $(seq 1 100); do nbdinfo --size "nbd://127.0.0.1:$((base + 451))/vol0" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench/cpu-ab.sh: $name's vol0 does not answer" >&2; exit 1
}
start_unit A "$variant_a" 22000
start_unit B "$variant_b" 23000
declare -A uri=([A]="nbd://127.0.0.1:22451/vol0" [B]="nbd://127.0.0.1:23451/vol0")
declare -A admin=([A]=22200 [B]=23200)

# flush NAME: POST /flush on every head node of unit NAME, so that the
# next write job starts with empty logs; a refusal (a partition failing
# over on a loaded box) is retried, then reported, not fatal.
flush() {
  local port attempt
  for port in $((${admin[$1]} + 1)) $((${admin[$1]} + 2)) $((${admin[$1]} + 3)); do
    for attempt in 1 2 3 4; do
      curl -sf -X POST --max-time 300 "http://127.0.0.1:$port/flush" >/dev/null && break
      [ "$attempt" = 4 ] && echo "# POST /flush on $port failed 4 times; going on" >&2
      sleep 2
    done
  done
}
fio_job() { # NAME OUTPUT rw size [extra]
  local name=$1 output=$2 rw=$3 size=$4; shift 4
  timeout $((seconds + 300)) fio --name=j --ioengine=nbd --uri="${uri[$name]}" --rw="$rw" --bs=4k \
    --iodepth=32 --size="$size" --output-format=json --output="$output" "$@" >/dev/null 2>>"$out/fio.err" \
    || { echo "bench/cpu-ab.sh: fio on $name failed:" >&2; tail -5 "$out/fio.err" >&2; exit 1; }
}
for name in A B; do
  fio_job "$name" "$out/fio/$name-fill.json" write $volume_bytes --bs=1M --iodepth=16
  flush "$name"
done
echo "# both units filled and flushed" >&2

jobs=("w32:randwrite:$volume_bytes" "r32:randread:$volume_bytes" "w32p:randwrite:$partition_bytes" "r32p:randread:$partition_bytes")
for r in $(seq 1 "$rounds"); do
  for job in "${jobs[@]}"; do
    IFS=: read -r jname rw size <<<"$job"
    for name in A B; do
      base="$name-$jname-r$r"
      python3 bench/procstat.py snap "$out/pids" "$out/snap/$base-a.json"
      fio_job "$name" "$out/fio/$base.json" "$rw" "$size" --time_based --runtime="$seconds"
      python3 bench/procstat.py snap "$out/pids" "$out/snap/$base-b.json"
      case $jname in w*) flush "$name" ;; esac
    done
  done
  echo "# round $r done" >&2
done

if [ "${BENCH_PERF:-0}" = 1 ]; then
  command -v perf >/dev/null || { echo "bench/cpu-ab.sh: BENCH_PERF=1 needs perf" >&2; exit 1; }
  perf_pids=$(awk '$1 == "A" && $2 != "control" { print $4 }' "$out/pids" | paste -sd,)
  for job in w32:randwrite r32:randread; do
    IFS=: read -r jname rw <<<"$job"
    perf record -q -p "$perf_pids" -o "$out/perf-$jname.data" -- sleep "$seconds" 2>>"$out/perf.err" &
    perf_pid=$!
    fio_job A "$out/fio/perf-$jname.json" "$rw" $volume_bytes --time_based --runtime="$seconds"
    wait "$perf_pid" || true
    perf report -i "$out/perf-$jname.data" --no-children --sort pid --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -20 >"$out/perf-$jname-pid.txt" || true
    perf report -i "$out/perf-$jname.data" --no-children --sort pid,sym --stdio --percent-limit 0.7 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | head -80 >"$out/perf-$jname.txt" || true
    perf report -i "$out/perf-$jname.data" --no-children --sort sym --stdio --percent-limit 0.5 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | head -60 >"$out/perf-$jname-sym.txt" || true
    if [ "$jname" = w32 ]; then flush A; fi
  done
fi
stop_pids

python3 - "$out" "$rounds" "$seconds" "${jobs[@]}" <<'PY'
import json, sys
out, rounds, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
jobs = [j.split(":")[0] for j in sys.argv[4:]]
def load(p):
    with open(p) as f: return json.load(f)
def ios(p):
    d = load(p)["jobs"][0]
    return d["read"]["total_ios"] + d["write"]["total_ios"], d["read"]["iops"] + d["write"]["iops"]
report = {}
for job in jobs:
    for name in "AB":
        rows = {}
        total_ios = 0; iops = []; per_round = []
        for r in range(1, rounds + 1):
            base = f"{out}/snap/{name}-{job}-r{r}"
            a, b = load(base + "-a.json"), load(base + "-b.json")
            n, rate = ios(f"{out}/fio/{name}-{job}-r{r}.json")
            window = b["time"] - a["time"]
            before = {p["pid"]: p for p in a["procs"]}
            cpu = 0.0
            for p in b["procs"]:
                if p["target"] != name or p["pid"] not in before: continue
                cpu += p["cpu_us"] - before[p["pid"]]["cpu_us"]
            # A window far longer than the job is a stall (I/O waiting out
            # a failover on an overloaded box): reported, left out.
            stalled = window > 2 * seconds + 5
            per_round.append(f"{cpu / max(n, 1):.0f}" + (f" (stalled {window:.0f} s, left out)" if stalled else ""))
            if stalled: continue
            total_ios += n; iops.append(rate)
            for p in b["procs"]:
                if p["target"] != name or p["pid"] not in before: continue
                q = before[p["pid"]]
                sw = sum(c - q["threads"].get(t, 0) for t, c in p["threads"].items())
                row = rows.setdefault(p["name"], [0.0, 0])
                row[0] += p["cpu_us"] - q["cpu_us"]; row[1] += sw
        total_ios = max(total_ios, 1)
        report[f"{name}-{job}"] = {"ios": total_ios, "iops": iops, "unit_cpu_us_per_io_by_round": per_round,
            "procs": {k: {"cpu_us_per_io": v[0] / total_ios, "switches_per_io": v[1] / total_ios} for k, v in rows.items()}}
with open(f"{out}/report.json", "w") as f: json.dump(report, f, indent=1)
for job in jobs:
    print(f"## {job}")
    a, b = report[f"A-{job}"], report[f"B-{job}"]
    print("  IOPS per round  A: " + " ".join(f"{x:.0f}" for x in a["iops"]) + "   B: " + " ".join(f"{x:.0f}" for x in b["iops"]))
    print("  unit CPU us per I/O by round  A: " + ", ".join(a["unit_cpu_us_per_io_by_round"]) + "   B: " + ", ".join(b["unit_cpu_us_per_io_by_round"]))
    def group(rep):
        g = {}
        for k, v in rep["procs"].items():
            key = "sleds" if k.startswith("sled") else k
            s = g.setdefault(key, [0.0, 0.0]); s[0] += v["cpu_us_per_io"]; s[1] += v["switches_per_io"]
        return g
    ga, gb = group(a), group(b)
    for k in sorted(set(ga) | set(gb)):
        va, vb = ga.get(k, [0, 0]), gb.get(k, [0, 0])
        print(f"  {k:10s} A {va[0]:7.1f} us ({va[1]:5.2f} sw)   B {vb[0]:7.1f} us ({vb[1]:5.2f} sw)")
    ta = [sum(v[0] for v in ga.values()), sum(v[1] for v in ga.values())]
    tb = [sum(v[0] for v in gb.values()), sum(v[1] for v in gb.values())]
    print(f"  {'unit':10s} A {ta[0]:7.1f} us ({ta[1]:5.2f} sw)   B {tb[0]:7.1f} us ({tb[1]:5.2f} sw)")
PY
