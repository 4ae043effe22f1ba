#!/usr/bin/env bash
# bench/unit-auth.sh: the CPU per I/O of unit-port authentication (issue 15
# item 2, "what it must show"): the same data path with and without the
# 16-byte HMAC-SHA256 tag after every unit-port frame, in the same run.
#
# Two memory-backed units started side by side by `rackblock up` (release,
# 3 head nodes, 6 sleds, 4+2, attach agent; devices and logs under
# /dev/shm; 512 MiB vol0 in 4 partitions of 128 MiB, scrubber off, no
# iSCSI): `mac` as every unit runs, `nomac` with the bench switch
# RACKBLOCK_BENCH_UNIT_PORT_NO_FRAME_MAC=1 in the environment of `up` and
# so of every daemon and tool it starts (proto/src/auth.rs: the handshake
# still runs, the frames carry no tag; the switch is in the handshake's
# proofs, so it takes both ends). Host-port TLS stays as `up` runs it (on)
# in both. Each volume is filled once, then fio's nbd engine runs 4 KiB
# random write and read at QD32, BENCH_SECONDS (default 5) per job,
# alternating mac / nomac job by job (the order flips every round), for
# BENCH_ROUNDS (default 3) rounds.
#
# CPU per I/O: utime + stime of every process of the unit
# (/proc/PID/stat, bench/procstat.py) over the job, divided by fio's
# completed I/Os; also head nodes, sleds and the attach agent apart. The
# writes' flush to the sleds happens in the background, in the job's
# window and after it: POST /flush on every head node after each write
# job, inside the measured window, so the sled appends (tagged too) are
# counted where they belong.
#
# Output: BENCH lines on stdout (bench/README.md) and
# bench/out/unit-auth.json. Every process is stopped by pid; the tmpfs
# directory is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-5}
rounds=${BENCH_ROUNDS:-3}
for tool in fio nbdinfo python3 curl; do
  command -v "$tool" >/dev/null || { echo "bench/unit-auth.sh: missing $tool (scripts/install-deps.sh)" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench/unit-auth.sh: this fio has no nbd engine" >&2; exit 1; }
[ "$(df --output=fstype /dev/shm 2>/dev/null | tail -1)" = tmpfs ] \
  || { echo "bench/unit-auth.sh: /dev/shm is not a tmpfs" >&2; exit 1; }
if [ -z "${RACKBLOCK_BIN:-}" ]; then
  cargo build --release -q -p cli --bin rackblock
fi
bin="${RACKBLOCK_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/rackblock}"
out="$root/bench/out"; work="$out/unit-auth-work"
rm -rf "$work"; mkdir -p "$work/fio" "$work/snap"
shm="/dev/shm/rackblock-unit-auth.$$"
volume_bytes=$((512 << 20)); partition_bytes=$((128 << 20))

# Ports: mac unit data 23000/23100, admin 23201-3, 23301-6, attach 23400,
# zonal 23450, NBD 23451; nomac unit the same + 500.
for port in 23000 23100 23201 23400 23450 23451 23500 23600 23701 23900 23950 23951; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "bench/unit-auth.sh: port $port is in use (another bench/unit-auth.sh running?)" >&2; exit 1
  fi
done

# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh" # pids, stop_pids
cleanup() {
  stop_pids
  if [ -d "$shm" ]; then
    mkdir -p "$work/logs"
    for unit in mac nomac; do
      for log in "$shm/$unit"/run/*.log; do
        [ -e "$log" ] && cp "$log" "$work/logs/$unit-$(basename "$log")"
      done
    done
    rm -rf "$shm"
  fi
}
trap cleanup EXIT

declare -A uri flush_ports
# start_unit NAME BASE [env...]: `rackblock up` under /dev/shm, waited for.
start_unit() {
  local name=$1 base=$2; shift 2
  env "$@" "$bin" up --data-dir "$shm/$name" --base-port "$base" --admin-base-port $((base + 200)) \
    --zonal-listen "127.0.0.1:$((base + 450))" --nbd-listen "127.0.0.1:$((base + 451))" \
    --no-iscsi --wait-seconds 150 \
    --volume-size "$volume_bytes" --partition-size "$partition_bytes" --device-size-mib 512 \
    --scrub-bytes-per-second 0 >"$work/$name-up.log" 2>&1 &
  local up_pid=$!
  pids+=("$up_pid")
  for _ in $(seq 1 1800); do
    grep -q "Ctrl-C stops the unit." "$work/$name-up.log" && break
    kill -0 "$up_pid" 2>/dev/null || { echo "bench/unit-auth.sh: rackblock up ($name) exited:" >&2; tail -20 "$work/$name-up.log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q "Ctrl-C stops the unit." "$work/$name-up.log" \
    || { echo "bench/unit-auth.sh: unit $name not up after 180 s" >&2; tail -20 "$work/$name-up.log" >&2; exit 1; }
  echo "$name control up $up_pid" >>"$work/pids"
  local file role unit_name
  for file in "$shm/$name"/run/*.pid; do
    unit_name=$(basename "$file" .pid)
    case $unit_name in
      hn-*) role=head_node ;; sled-*) role=sled ;; attach) role=attach ;; *) role=control ;;
    esac
    echo "$name $role $unit_name $(cat "$file")" >>"$work/pids"
  done
  uri[$name]="nbd://127.0.0.1:$((base + 451))/vol0"
  flush_ports[$name]="$((base + 201)) $((base + 202)) $((base + 203))"
  for _ in $(seq 1 100); do nbdinfo --size "${uri[$name]}" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench/unit-auth.sh: ${uri[$name]} does not answer" >&2; exit 1
}

flush_unit() {
  local port
  for port in ${flush_ports[$1]}; do
    curl -sf -X POST --max-time 300 "http://127.0.0.1:$port/flush" >/dev/null \
      || { echo "bench/unit-auth.sh: POST /flush on 127.0.0.1:$port failed" >&2; return 1; }
  done
}

# job UNIT JOB ROUND rw: snapshot, fio, (writes: flush), snapshot.
job() {
  local unit=$1 name=$2 round=$3 rw=$4
  local base="$unit-$name-r$round"
  python3 bench/procstat.py snap "$work/pids" "$work/snap/$base-a.json"
  timeout $((seconds + 300)) fio --name="$name" --ioengine=nbd --uri="${uri[$unit]}" --rw="$rw" --bs=4k \
    --iodepth=32 --size=$volume_bytes --time_based --runtime="$seconds" \
    --output-format=json --output="$work/fio/$base.json" >/dev/null 2>>"$work/fio.err" \
    || { echo "bench/unit-auth.sh: fio $name on $unit failed" >&2; tail -5 "$work/fio.err" >&2; return 1; }
  [ "$rw" = randread ] || flush_unit "$unit"
  python3 bench/procstat.py snap "$work/pids" "$work/snap/$base-b.json"
}

mkdir -p "$shm"
: >"$work/pids"
started=$(date +%s)
start_unit mac 23000
start_unit nomac 23500 RACKBLOCK_BENCH_UNIT_PORT_NO_FRAME_MAC=1
grep -q "BENCH SWITCH" "$shm/nomac"/run/hn-1.log \
  || { echo "bench/unit-auth.sh: the nomac unit's head nodes do not report the bench switch" >&2; exit 1; }
! grep -q "BENCH SWITCH" "$shm/mac"/run/hn-1.log \
  || { echo "bench/unit-auth.sh: the mac unit runs with the bench switch" >&2; exit 1; }
for unit in mac nomac; do
  fio --name=fill --ioengine=nbd --uri="${uri[$unit]}" --rw=write --bs=1M --iodepth=16 \
    --size=$volume_bytes >/dev/null 2>>"$work/fio.err"
  flush_unit "$unit"
done
echo "# both units up and filled in $(( $(date +%s) - started )) s, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for r in $(seq 1 "$rounds"); do
  order="mac nomac"; [ $((r % 2)) = 0 ] && order="nomac mac"
  for unit in $order; do job "$unit" w32 "$r" randwrite; done
  for unit in $order; do job "$unit" r32 "$r" randread; done
  echo "# round $r done at $(( $(date +%s) - started )) s, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done

python3 - "$work" "$out/unit-auth.json" "$rounds" "$seconds" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
work, out, rounds, seconds, commit, load = sys.argv[1:7]
rows = []
for r in range(1, int(rounds) + 1):
    for job, side in (("w32", "write"), ("r32", "read")):
        for unit in ("mac", "nomac"):
            base = f"{work}/snap/{unit}-{job}-r{r}"
            a = {p["pid"]: p for p in json.load(open(base + "-a.json"))["procs"] if p["target"] == unit}
            b = {p["pid"]: p for p in json.load(open(base + "-b.json"))["procs"] if p["target"] == unit}
            fio = json.load(open(f"{work}/fio/{unit}-{job}-r{r}.json"))["jobs"][0][side]
            ios = fio["total_ios"]
            by_role = {}
            for pid, after in b.items():
                if pid in a:
                    by_role.setdefault(after["role"], 0.0)
                    by_role[after["role"]] += after["cpu_us"] - a[pid]["cpu_us"]
            total = sum(by_role.values())
            row = {"job": job, "round": r, "unit": unit, "ios": ios, "iops": round(fio["iops"]),
                   "cpu_us_per_io": round(total / ios, 1),
                   **{f"{role}_us_per_io": round(v / ios, 1) for role, v in sorted(by_role.items())}}
            rows.append(row)
            print(f"BENCH unit-auth {job} r{r} {unit}: {row['cpu_us_per_io']} us/io all, "
                  f"{row.get('head_node_us_per_io', 0)} head nodes, {row.get('sled_us_per_io', 0)} sleds, "
                  f"{row.get('attach_us_per_io', 0)} agent, {row['iops']} IOPS")
json.dump({"commit": commit, "seconds": int(seconds), "load_at_end": load, "rows": rows},
          open(out, "w"), indent=1)
PY
