#!/usr/bin/env bash
# bench/qos.sh: how closely per-volume QoS holds, set in the unit's volume
# record (`rackblock volume modify vol0 ...`) and enforced by the attach
# agent of vol0 that `rackblock up` starts; fio's nbd engine, BENCH_SECONDS
# (default 10) per steady job:
#   --iops 1000: 4 KiB random write QD16 and random read QD16
#                                                  goal: 950-1050 IOPS
#   --bandwidth 50MiB: 1 MiB sequential write QD4 and read QD4
#                                                  goal: 47-53 MiB/s
#   --iops 500 --burst-iops 2000 --burst-length 2s, after 10 s idle: one
#     4 KiB random read job, IOPS per second printed; the first second
#     (goal: near 2000), from the 5th second on (goal: 500)
#   live change: during a job at --iops 1000, `volume modify vol0 --iops
#     300`; when the agent's admin port shows the new limit, and the first
#     second fio measures under 330 (goal: within 6 s of the command)
#   no loss without limits: vol0 unlimited, 4 KiB random write QD32 and
#     random read QD32 against two more agents of vol0 in the same run,
#     one with the QoS layer in the path (as every agent of a unit volume
#     has) and one started with the hidden --qos-bypass (the layer left
#     out: what a build without QoS would serve), interleaved A B A B A B,
#     medians of BENCH_ROUNDS (default 3) rounds of BENCH_SHORT_SECONDS
#     (default 5); with each agent's CPU per I/O (utime+stime from
#     /proc/<pid>/stat)            goal: ratio >= 0.97 (noise on 2 cores)
# Baseline: the configured limit (a bound, not a peer) for the limits; the
# bypass agent for the overhead. Every process is stopped by pid; ports
# 22000-22455. Output: BENCH lines and bench/out/qos.json.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-10}
short=${BENCH_SHORT_SECONDS:-5}
rounds=${BENCH_ROUNDS:-3}
for tool in fio:fio python3:python3 curl:curl; do
  command -v "${tool%%:*}" >/dev/null || {
    echo "bench/qos.sh: ${tool%%:*} is missing: install the Debian package ${tool##*:}" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench/qos.sh: this fio has no nbd engine (fio >= 3.20 has)" >&2; exit 1; }
if [ -n "${RACKBLOCK_BIN:-}" ]; then
  bin=$RACKBLOCK_BIN
else
  cargo build --release -q -p cli --bin rackblock
  bin="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
fi
out="$root/bench/out"; work="$out/qos-work"
rm -rf "$work"; mkdir -p "$work"

base_port=22000; admin_base=22200
zonal=127.0.0.1:22450; up_nbd=127.0.0.1:22451; up_admin=127.0.0.1:22400
with_nbd=127.0.0.1:22452; with_admin=127.0.0.1:22453
bypass_nbd=127.0.0.1:22454; bypass_admin=127.0.0.1:22455
for port in 22000 22100 22201 22202 22203 22400 22450 22451 22452 22453 22454 22455; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || (exec 3<>/dev/tcp/127.0.1.1/$port) 2>/dev/null; then
    echo "bench/qos.sh: port $port is in use (another bench/qos.sh running?)" >&2; exit 1
  fi
done

# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh" # pids, stop_pids, drop_images
trap 'stop_pids; drop_images' EXIT

"$bin" up --data-dir "$work/unit" --base-port $base_port --admin-base-port $admin_base \
  --zonal-listen $zonal --nbd-listen $up_nbd --attach-admin $up_admin --no-iscsi \
  --volume-size 4GiB --wait-seconds 120 >"$work/up.log" 2>&1 &
pids+=($!)
up_pid=$!
for _ in $(seq 1 1500); do
  grep -q "Ctrl-C stops the unit." "$work/up.log" && break
  kill -0 $up_pid 2>/dev/null || { echo "bench/qos.sh: rackblock up exited:" >&2; tail -20 "$work/up.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "Ctrl-C stops the unit." "$work/up.log" || { echo "bench/qos.sh: unit not up after 150 s:" >&2; tail -20 "$work/up.log" >&2; exit 1; }
export RACKBLOCK_ZONAL="https://$zonal" RACKBLOCK_ZONAL_CA="$work/unit/tls/ca.pem" RACKBLOCK_TOKEN
RACKBLOCK_TOKEN=$(cat "$work/unit/zonal-token")

cli() { "$bin" "$@" >>"$work/cli.log" 2>&1 || { echo "bench/qos.sh: rackblock $* failed:" >&2; tail -5 "$work/cli.log" >&2; exit 1; }; }
# The agent's IOPS (or bps) limit in force, from its admin port.
limit_of() { # admin dimension
  curl -sf "http://$1/metrics" | awk -v d="$2" '$1 == "rackblock_agent_qos_limit{dimension=\"" d "\"}" { print $2 }'
}
# Waits (at most 15 s) until vol0's agent enforces `dimension = value`;
# prints the seconds it took.
wait_limit() { # dimension value
  local start now
  start=$(date +%s.%N)
  for _ in $(seq 1 150); do
    if awk -v have="$(limit_of $up_admin "$1")" -v want="$2" 'BEGIN { exit !(have != "" && have + 0 == want + 0) }'; then
      now=$(date +%s.%N); python3 -c "print(f'{$now - $start:.2f}')"; return 0
    fi
    sleep 0.1
  done
  echo "bench/qos.sh: the agent never enforced $1 = $2 (it has $(limit_of $up_admin "$1"))" >&2; exit 1
}
fio_job() { # uri name rw bs iodepth seconds [fio args...] -> $work/name.json
  local uri=$1 name=$2 rw=$3 bs=$4 qd=$5 runtime=$6; shift 6
  timeout $((runtime + 60)) fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" \
    --iodepth="$qd" --size=1G --time_based --runtime="$runtime" --output-format=json \
    --output="$work/$name.json" "$@" >/dev/null 2>>"$work/fio.err" \
    || { echo "bench/qos.sh: fio $name failed:" >&2; tail -5 "$work/fio.err" >&2; exit 1; }
}
vol0="nbd://$up_nbd/vol0"

# Written once, so that reads come from the unit's data, not holes.
timeout 600 fio --name=fill --ioengine=nbd --uri="$vol0" --rw=write --bs=1M --iodepth=8 --size=1G \
  --output-format=json --output="$work/fill.json" >/dev/null 2>>"$work/fio.err" \
  || { echo "bench/qos.sh: filling vol0 failed:" >&2; tail -5 "$work/fio.err" >&2; exit 1; }
# Flushed to the sleds before measuring: a flush of the fill running under
# the first jobs would take the unit below the limits they measure.
for h in 1 2 3; do
  curl -sf -X POST --max-time 300 "http://127.0.0.1:$((admin_base + h))/flush" >/dev/null \
    || echo "# (flush on hn-$h did not answer 200)"
done

cli volume modify vol0 --iops 1000
took=$(wait_limit iops 1000)
echo "# --iops 1000 in force on the agent after $took s"
fio_job "$vol0" iops1000-write randwrite 4k 16 "$seconds"
fio_job "$vol0" iops1000-read randread 4k 16 "$seconds"

cli volume modify vol0 --clear-qos --bandwidth 50MiB
wait_limit bps 52428800 >/dev/null
fio_job "$vol0" bw50-write write 1M 4 "$seconds"
fio_job "$vol0" bw50-read read 1M 4 "$seconds"

cli volume modify vol0 --clear-qos --iops 500 --burst-iops 2000 --burst-length 2s
wait_limit iops 500 >/dev/null
sleep 10 # idle: the burst credit (2000 x 2 s = 4000 I/Os, earned at 500/s) fills
fio_job "$vol0" burst randread 4k 16 "$seconds" --write_iops_log="$work/burst" --log_avg_msec=1000

cli volume modify vol0 --clear-qos --iops 1000
wait_limit iops 1000 >/dev/null
live_seconds=$((seconds + 4))
fio_start=$(date +%s.%N)
fio_job "$vol0" live randread 4k 16 "$live_seconds" --write_iops_log="$work/live" --log_avg_msec=1000 &
fio_pid=$!
sleep 4
change_start=$(date +%s.%N)
cli volume modify vol0 --iops 300
change_acked=$(date +%s.%N)
change_in_force=$(wait_limit iops 300)
wait $fio_pid
echo "$fio_start $change_start $change_acked $change_in_force" >"$work/live.times"

# Overhead without limits: two more agents of vol0, with and without the
# QoS layer.
cli volume modify vol0 --clear-qos
wait_limit iops 0 >/dev/null
agent() { # name nbd admin [flags...]
  local name=$1 nbd=$2 admin=$3; shift 3
  "$bin" attach vol0 --listen "$nbd" --admin "$admin" --host "qos-$name" --unit-ca "$work/unit/tls/ca.pem" "$@" >"$work/agent-$name.log" 2>&1 &
  pids+=($!)
  echo $! >"$work/agent-$name.pid"
  for _ in $(seq 1 300); do
    grep -q "serving" "$work/agent-$name.log" && return 0
    sleep 0.1
  done
  echo "bench/qos.sh: agent $name did not start:" >&2; cat "$work/agent-$name.log" >&2; exit 1
}
agent with $with_nbd $with_admin
agent bypass $bypass_nbd $bypass_admin --qos-bypass
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
for round in $(seq 1 "$rounds"); do
  for target in with bypass; do
    nbd=$with_nbd; [ $target = bypass ] && nbd=$bypass_nbd
    pid=$(cat "$work/agent-$target.pid")
    for job in randwrite randread; do
      before=$(cpu_ticks "$pid")
      fio_job "nbd://$nbd/vol0" "$target-$job-$round" $job 4k 32 "$short"
      echo "$(cpu_ticks "$pid") $before" >"$work/$target-$job-$round.cpu"
    done
  done
done
stop_pids

python3 - "$work" "$out/qos.json" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "$seconds" "$(getconf CLK_TCK)" "$rounds" <<'PY'
import json, os, statistics, sys
work, out, commit, seconds, clk_tck, rounds = sys.argv[1:7]
seconds, clk_tck, rounds = int(seconds), int(clk_tck), int(rounds)
def job(name):
    j = json.load(open(f"{work}/{name}.json"))["jobs"][0]
    assert j["error"] == 0, (name, j["error"])
    return j
figures = []
def line(name, value, unit, baseline, better, comment=None):
    if comment:
        print(f"# {comment}")
    print(f"BENCH {name} value={value:.1f} unit={unit} baseline={baseline:.1f} "
          f"ratio={value / baseline:.3f} better={better}")
    figures.append(dict(name=name, value=value, unit=unit, baseline=baseline, better=better))
def per_second(prefix):
    rows = []
    for name in sorted(os.listdir(work)):
        if name.startswith(prefix + "_iops") and name.endswith(".log"):
            for text in open(f"{work}/{name}"):
                fields = [f.strip() for f in text.split(",")]
                if len(fields) >= 2:
                    rows.append((int(fields[0]), float(fields[1])))
    # One row per second (fio logs reads and writes separately).
    by_second = {}
    for ms, v in rows:
        by_second[ms] = by_second.get(ms, 0.0) + v
    return sorted(by_second.items())

line("qos.iops1000.randwrite4k.qd16", job("iops1000-write")["write"]["iops"], "iops", 1000,
     "closer", f"bound: volume record --iops 1000 (goal 950-1050), {seconds} s")
line("qos.iops1000.randread4k.qd16", job("iops1000-read")["read"]["iops"], "iops", 1000, "closer")
line("qos.bw50mib.seqwrite1m.qd4", job("bw50-write")["write"]["bw_bytes"] / 2**20, "MiB/s", 50,
     "closer", "bound: volume record --bandwidth 50MiB (goal 47-53)")
line("qos.bw50mib.seqread1m.qd4", job("bw50-read")["read"]["bw_bytes"] / 2**20, "MiB/s", 50, "closer")

job("burst")
burst = per_second("burst")
print("# burst after 10 s idle (--iops 500 --burst-iops 2000 --burst-length 2s), IOPS per second: "
      + " ".join(f"{v:.0f}" for _, v in burst))
line("qos.burst.first_second", burst[0][1], "iops", 2000, "closer",
     "bound: the burst rate 2000 (the peak bucket's 0.1 s depth adds up to 200 in the first second)")
steady = [v for _, v in burst[4:]]
line("qos.burst.after_4s", statistics.mean(steady), "iops", 500, "closer",
     "bound: the limit 500 once the 4000-I/O credit is spent (2.7 s at 2000/s net of refill)")

job("live")
fio_start, change_start, change_acked, in_force = open(f"{work}/live.times").read().split()
fio_start, change_start, change_acked, in_force = map(float, (fio_start, change_start, change_acked, in_force))
live = per_second("live")
print("# live change --iops 1000 -> 300 at %.1f s into the job, IOPS per second: %s"
      % (change_start - fio_start, " ".join(f"{v:.0f}" for _, v in live)))
after = [(ms / 1000.0, v) for ms, v in live if ms / 1000.0 > change_start - fio_start and v <= 330]
first_low = (after[0][0] - (change_start - fio_start)) if after else float("nan")
print(f"# volume modify answered after {change_acked - change_start:.2f} s; the agent enforced "
      f"300 {in_force:.2f} s after that; fio's first second under 330 IOPS ended {first_low:.1f} s "
      "after the command")
line("qos.live_change.in_force_seconds", (change_acked - change_start) + in_force, "s", 6, "lower",
     "bound: 6 s from `volume modify` to the agent's limit (map refresh every 2 s)")
line("qos.live_change.fio_under_limit_seconds", first_low, "s", 6, "lower")

def med(target, rw, key):
    return statistics.median(job(f"{target}-{rw}-{r}")[key]["iops"] for r in range(1, rounds + 1))
def cpu_us_per_io(target, rw, key):
    values = []
    for r in range(1, rounds + 1):
        after, before = map(int, open(f"{work}/{target}-{rw}-{r}.cpu").read().split())
        ios = job(f"{target}-{rw}-{r}")[key]["total_ios"]
        values.append((after - before) / clk_tck * 1e6 / max(ios, 1))
    return statistics.median(values)
for rw, key in (("randwrite", "write"), ("randread", "read")):
    with_qos, bypass = med("with", rw, key), med("bypass", rw, key)
    line(f"qos.unlimited.{rw}4k.qd32.iops", with_qos, "iops", bypass, "higher",
         f"baseline: the same agent with --qos-bypass (no QoS layer), same run, medians of {rounds}")
    line(f"qos.unlimited.{rw}4k.qd32.agent_cpu_us_per_io", cpu_us_per_io("with", rw, key), "us",
         cpu_us_per_io("bypass", rw, key), "lower")
json.dump(dict(script="qos.sh", commit=commit, nproc=os.cpu_count(),
               memory_kib=int(open("/proc/meminfo").readline().split()[1]), figures=figures),
          open(out, "w"), indent=1)
PY
