#!/usr/bin/env bash
# bench/snapshot.sh: what a snapshot costs a host. A unit started by
# `rackblock up` (zonal plane, 3 head nodes, 6 sleds, 4+2; vol0 of 1 GiB in
# 256 MiB partitions, so a snapshot cuts 4 partitions over the head nodes),
# fio's nbd engine against the whole of vol0:
#   pause: 4 KiB random writes at QD32 with fio's per-I/O latency log
#     (--write_lat_log, unix-epoch timestamps) while BENCH_SNAPSHOTS (20)
#     snapshots are taken one after the other (`snapshot create`, a gap
#     between them). Per snapshot: the longest write completion latency of
#     the I/Os completing between its `snapshot create` start and 0.5 s
#     after it returned. Baseline (same run, same fio job): the same
#     figure over windows of the same length with no snapshot. p50 and p99
#     over the snapshots.                        goal: pause < 50 ms
#   iops: 4 KiB random write QD32 IOPS with 10 snapshots held (each taken
#     after a write burst over the whole volume, so every snapshot has a
#     layer to fill) against none, interleaved none/held over BENCH_ROUNDS
#     rounds (snapshots deleted between rounds); medians.   goal: >= 0.9x
# Every process is stopped by pid. Output: BENCH lines (conventions:
# bench/README.md) and bench/out/snapshot.json. BENCH_SECONDS (default 10)
# sets each IOPS job's length; BENCH_ROUNDS (default 2); BENCH_SKIP_BUILD=1
# uses the binary already built; BENCH_PROFILE
# (release, default, or debug: the debug build, on machines where a
# release build does not fit).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-2}
snapshots=${BENCH_SNAPSHOTS:-20}
held=10
profile=${BENCH_PROFILE:-release}
for tool in fio:fio python3:python3 curl:curl; do
  command -v "${tool%%:*}" >/dev/null || {
    echo "bench/snapshot.sh: ${tool%%:*} is missing: install the Debian package ${tool##*:} (scripts/install-deps.sh does)" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench/snapshot.sh: this fio has no nbd engine (fio >= 3.20 has)" >&2; exit 1; }
if [ "${BENCH_SKIP_BUILD:-0}" = 1 ]; then
  # The binary already built (a box too loaded to rebuild in time).
  echo "# BENCH_SKIP_BUILD=1: using the $profile rackblock already built" >&2
elif [ "$profile" = release ]; then
  cargo build --release -q -p cli --bin rackblock
else
  cargo build -q -p cli --bin rackblock
fi
bin="${CARGO_TARGET_DIR:-$root/target}/$profile/rackblock"
out="$root/bench/out"; work="$out/snapshot-work"
rm -rf "$work"; mkdir -p "$work"

# Ports of this bench (nbd.sh uses 19xxx): head nodes' data 21000, sleds'
# data 21100, admin 21201-21203, sleds 21301-21306, agent 21400, zonal 21500,
# NBD 21501.
base_port=21000; admin_base=21200
zonal=127.0.0.1:21500; nbd=127.0.0.1:21501
for port in 21000 21100 21201 21202 21203 21400 21500 21501; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || (exec 3<>/dev/tcp/127.0.1.1/$port) 2>/dev/null; then
    echo "bench/snapshot.sh: port $port is in use (another bench/snapshot.sh running?)" >&2; exit 1
  fi
done
region_bytes=$((1024 * 1024 * 1024))

# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh" # pids, stop_pids, drop_images
trap 'stop_pids; drop_images' EXIT

"$bin" up --data-dir "$work/unit" --base-port $base_port --admin-base-port $admin_base \
  --zonal-listen $zonal --nbd-listen $nbd --volume-size 1GiB --partition-size 256MiB --no-iscsi --wait-seconds 120 \
  >"$work/up.log" 2>&1 &
pids+=($!)
up_pid=$!
for _ in $(seq 1 1500); do
  grep -q "Ctrl-C stops the unit." "$work/up.log" && break
  kill -0 $up_pid 2>/dev/null || { echo "bench/snapshot.sh: rackblock up exited:" >&2; tail -20 "$work/up.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "Ctrl-C stops the unit." "$work/up.log" || { echo "bench/snapshot.sh: unit not up after 150 s:" >&2; tail -20 "$work/up.log" >&2; exit 1; }
export RACKBLOCK_ZONAL="https://$zonal" RACKBLOCK_ZONAL_CA="$work/unit/tls/ca.pem"
RACKBLOCK_TOKEN=$(cat "$work/unit/zonal-token"); export RACKBLOCK_TOKEN
export RACKBLOCK_RACK="$work/unit/rack.toml"
uri="nbd://$nbd/vol0"
now_ms() { date +%s%3N; }
snap() { # create|delete NAME
  timeout 120 "$bin" snapshot "$1" vol0 "$2" --output json >>"$work/snapshots.jsonl" 2>>"$work/snapshots.err" \
    || { echo "bench/snapshot.sh: snapshot $1 $2 failed:" >&2; tail -5 "$work/snapshots.err" >&2; return 1; }
}
fio_args() { # name seconds [extra...]: the QD32 4 KiB random-write job, in $job
  local name=$1 secs=$2; shift 2
  job=(--name="$name" --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k \
    --iodepth=32 --size="$region_bytes" --time_based --runtime="$secs" --output-format=json \
    --output="$work/$name.json" "$@")
}
fio_write() { # name seconds [extra...]: runs the job, bounded by its runtime + 120 s
  local name=$1 secs=$2; shift 2
  fio_args "$name" "$secs" "$@"
  timeout --kill-after=10 $((secs + 120)) fio "${job[@]}" >/dev/null 2>>"$work/fio.err" \
    || { echo "bench/snapshot.sh: fio $name failed or ran past its runtime + 120 s (rc $?):" >&2; tail -5 "$work/fio.err" >&2; return 1; }
}
# wait_pid PID SECONDS WHAT: waits for PID (a child) to end, at most
# SECONDS; past that, says so and SIGKILLs it. Returns the child's status
# (124 on the deadline).
wait_pid() {
  local pid=$1 secs=$2 what=$3
  for _ in $(seq 1 $((secs * 10))); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid"; return $?; }
    sleep 0.1
  done
  echo "bench/snapshot.sh: $what did not end within $secs s: killed" >&2
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  return 124
}
# A report of fio stopped by a signal starts with "fio: terminating on
# signal 15": the JSON is read from its first brace.
iops() { python3 -c "import json; t=open('$work/$1.json').read(); j=json.loads(t[t.index('{'):])['jobs'][0]; assert j['error'] == 0; print(j['write']['iops'])"; }

# ---- pause under QD32 writes
gap_ms=1500
# fio runs until the snapshots are done, then gets SIGTERM (it stops and
# writes its report and logs). fio itself is the background child here:
# the pid of a backgrounded shell function would be a subshell, which
# neither forwards the signal nor ends fio (the hang of the first release
# runs: fio ran out its whole runtime after the snapshots). A backgrounded
# command also has SIGINT ignored in a non-interactive shell: SIGTERM.
pause_secs=$(( snapshots * 30 + 60 ))
fio_args pause $pause_secs --write_lat_log="$work/pause" --log_unix_epoch=1
fio "${job[@]}" >/dev/null 2>>"$work/fio.err" &
fio_pid=$!
pids+=("$fio_pid")
sleep 3
kill -0 $fio_pid 2>/dev/null || { echo "bench/snapshot.sh: fio pause ended at start:" >&2; tail -5 "$work/fio.err" >&2; exit 1; }
: >"$work/windows.txt"
for i in $(seq 1 "$snapshots"); do
  # An aborted snapshot (a lease lost on a loaded machine) is counted and
  # left out of the pause figures.
  start=$(now_ms)
  if snap create "p$i"; then
    end=$(now_ms); echo "$start $end" >>"$work/windows.txt"
  else
    echo "p$i" >>"$work/aborted.txt"
  fi
  sleep $((gap_ms / 1000)).$((gap_ms % 1000))
  kill -0 $fio_pid 2>/dev/null || { echo "bench/snapshot.sh: fio ended before the snapshots" >&2; exit 1; }
done
echo "# pause: $(wc -l <"$work/windows.txt") of $snapshots snapshots ready; stopping fio" >&2
sleep 1
kill -TERM $fio_pid 2>/dev/null || true
rc=0; wait_pid $fio_pid 60 "fio pause (after SIGTERM)" || rc=$?
# fio stopped by a signal may exit non-zero; its report is what counts.
if [ $rc = 124 ] || ! iops pause >/dev/null 2>&1; then
  echo "bench/snapshot.sh: fio pause failed (rc $rc, no usable report):" >&2; tail -5 "$work/fio.err" >&2; exit 1
fi
for i in $(seq 1 "$snapshots"); do
  grep -qx "p$i" "$work/aborted.txt" 2>/dev/null || snap delete "p$i"
done

# ---- IOPS with 10 snapshots held against none, interleaved
declare -a none_iops held_iops
for r in $(seq 1 "$rounds"); do
  fio_write none-r$r "$seconds"
  none_iops+=("$(iops none-r$r)")
  for i in $(seq 1 $held); do
    # A burst over the whole volume before each snapshot.
    fio_write burst-r$r-$i 1
    snap create "h$r-$i" || echo "h$r-$i" >>"$work/aborted-held.txt"
  done
  fio_write held-r$r "$seconds"
  held_iops+=("$(iops held-r$r)")
  for i in $(seq 1 $held); do
    grep -qx "h$r-$i" "$work/aborted-held.txt" 2>/dev/null || snap delete "h$r-$i"
  done
  echo "# round $r: qd32 write iops none ${none_iops[-1]} with $held snapshots ${held_iops[-1]}" >&2
done
stop_pids

python3 - "$out/snapshot.json" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(df -T "$work" | awk 'NR==2{print $2}')" <<PY
import glob, json, os, statistics, sys
work = "$work"
windows = [tuple(int(x) for x in l.split()) for l in open(f"{work}/windows.txt")]
# fio lat log: "time_ms, latency_ns, ddir, bs, offset" (unix-epoch times
# with --log_unix_epoch; the time is the I/O's completion).
lat = []
for path in glob.glob(f"{work}/pause_lat.*.log"):
    for line in open(path):
        f = line.split(",")
        if len(f) >= 2:
            lat.append((int(f[0]), int(f[1])))
lat.sort()
import bisect
times = [t for t, _ in lat]
def max_in(a, b):
    i, j = bisect.bisect_left(times, a), bisect.bisect_right(times, b)
    return max((l for _, l in lat[i:j]), default=0) / 1e6
tail_ms = 500
pauses = [max_in(s, e + tail_ms) for s, e in windows]
# Baseline: the windows of the same length that start half a gap after
# each snapshot window (no snapshot in them).
base = []
for (s, e), nxt in zip(windows, windows[1:] + [(None, None)]):
    length = e + tail_ms - s
    bs = e + tail_ms + 100
    if nxt[0] is not None and bs + length > nxt[0]:
        continue
    base.append(max_in(bs, bs + length))
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else 0.0
# The CLI's JSON documents, one after the other (pretty-printed).
recorded, text, at, dec = [], open(f"{work}/snapshots.jsonl").read(), 0, json.JSONDecoder()
while True:
    at = text.find("{", at)
    if at < 0:
        break
    doc, at = dec.raw_decode(text, at)
    recorded.append(doc)
coord = [r["pause_us"] / 1000 for r in recorded if r.get("state") == "ready" and r.get("pause_us") is not None and r.get("name", "").startswith("p")]
none = [float(x) for x in "${none_iops[*]}".split()]
held = [float(x) for x in "${held_iops[*]}".split()]
mn, mh = statistics.median(none), statistics.median(held)
rows = [
  ("snapshot.pause.qd32.host_max_lat.p50_ms", pct(pauses, 50), pct(base, 50), "ms", "lower",
   "# goal: < 50 ms (longest QD32 write latency at the host around each of %d snapshots; baseline: same-length windows without one)" % len(pauses)),
  ("snapshot.pause.qd32.host_max_lat.p99_ms", pct(pauses, 99), pct(base, 99), "ms", "lower", None),
  ("snapshot.pause.coordinator.p50_ms", pct(coord, 50), 50.0, "ms", "lower",
   "# bound: 50 ms goal (the coordinator's measured pause: first cut sent to last release answered)"),
  ("snapshot.randwrite4k.qd32.held$held.iops", mh, mn, "iops", "higher",
   "# goal: ratio >= 0.9 (QD32 4 KiB random writes with $held snapshots held vs none, same run, interleaved, median of $rounds rounds)"),
]
aborted = len(open(f"{work}/aborted.txt").read().split()) if os.path.exists(f"{work}/aborted.txt") else 0
print(f"# {aborted} of $snapshots pause snapshots aborted (left out)")
aborted_held = len(open(f"{work}/aborted-held.txt").read().split()) if os.path.exists(f"{work}/aborted-held.txt") else 0
print(f"# {aborted_held} of the held snapshots aborted (fewer held in their round)")
print("# fio 3.33 nbd engine, vol0 1 GiB in 4 partitions, profile $profile; pause windows: snapshot create start .. return + %d ms" % tail_ms)
out = []
for name, value, baseline, unit, better, comment in rows:
    if comment:
        print(comment)
    ratio = value / baseline if baseline else 0.0
    print(f"BENCH {name} value={value:.1f} unit={unit} baseline={baseline:.1f} ratio={ratio:.3f} better={better}")
    out.append(dict(metric=name, value=value, unit=unit, baseline=baseline, ratio=ratio, better=better))
json.dump(dict(script="snapshot.sh", commit=sys.argv[2], nproc=os.cpu_count(),
               mem_bytes=os.sysconf("SC_PAGE_SIZE")*os.sysconf("SC_PHYS_PAGES"), fs=sys.argv[3],
               profile="$profile", seconds=$seconds, rounds=$rounds, pauses_ms=pauses, baseline_ms=base,
               coordinator_pauses_ms=coord, aborted=aborted, none_iops=none, held_iops=held, figures=out),
          open(sys.argv[1], "w"), indent=1)
PY
