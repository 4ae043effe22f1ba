#!/usr/bin/env bash
# bench/idle.sh: what a unit costs with no I/O at all (issue 12 item 3,
# issue 14 item 7). For each binary given (LABEL=PATH, alternated in the
# order given, so that old and new see the same machine), starts
# `rackblock up` on tmpfs (3 head nodes, 6 sleds, vol0 of 4 GiB in 1 GiB
# partitions, attach agent, scrubber off), waits IDLE_SETTLE_SECONDS
# (default 10) after it is up, then measures IDLE_SECONDS (default 30):
# CPU (utime + stime from /proc/<pid>/stat, % of one core) and context
# switches per second (every thread's voluntary + nonvoluntary, from
# /proc/<pid>/task/*/status) per process, the head nodes and the unit in
# all; the Raft term before and after (`unit status`); then stops the unit.
# Prints the load average beside each run: the box is shared.
#
#   bench/idle.sh base=/path/to/old/rackblock new=target/release/rackblock base=... new=...
#
# Without arguments: one run of this tree's release build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
settle=${IDLE_SETTLE_SECONDS:-10}
seconds=${IDLE_SECONDS:-30}
shm_parent=/dev/shm
if [ $# -eq 0 ]; then
  cargo build --release -q -p cli --bin rackblock
  set -- "this=${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
fi
out="$root/bench/out"; mkdir -p "$out"
# Ports: data 22000/22100, admin 22201-3, 22301-6, attach 22400, zonal
# 22450, NBD 22451.
for port in 22000 22100 22201 22202 22203 22301 22400 22450 22451; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || (exec 3<>/dev/tcp/127.0.1.1/$port) 2>/dev/null; then
    echo "bench/idle.sh: port $port is in use (another bench/idle.sh running?)" >&2; exit 1
  fi
done
dir=""
up_pid=""
cleanup() {
  if [ -n "$up_pid" ]; then
    kill "$up_pid" 2>/dev/null || true
    for _ in $(seq 1 600); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
    up_pid=""
  fi
  if [ -n "$dir" ]; then rm -rf "$dir"; dir=""; fi
}
trap cleanup EXIT

# snapshot PIDFILE: "name ticks switches" per process.
snapshot() {
  while read -r name pid; do
    local ticks switches=0
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    for status in /proc/"$pid"/task/*/status; do
      switches=$((switches + $(awk '/^(voluntary|nonvoluntary)_ctxt_switches/ {s += $2} END {print s + 0}' "$status" 2>/dev/null || echo 0)))
    done
    echo "$name $ticks $switches"
  done <"$1"
}

hz=$(getconf CLK_TCK)
printf '%-6s %-8s %10s %12s %s\n' label process "cpu_%" "switches/s" ""
for spec in "$@"; do
  label=${spec%%=*}; bin=${spec#*=}
  [ -x "$bin" ] || { echo "bench/idle.sh: $bin is not executable" >&2; exit 1; }
  dir="$shm_parent/rackblock-idle-bench.$$"
  rm -rf "$dir"; mkdir -p "$dir"
  "$bin" up --data-dir "$dir/unit" --base-port 22000 --admin-base-port 22200 \
    --zonal-listen 127.0.0.1:22450 --nbd-listen 127.0.0.1:22451 --no-iscsi \
    --scrub-bytes-per-second 0 --wait-seconds 150 >"$out/idle-$label-up.log" 2>&1 &
  up_pid=$!
  for _ in $(seq 1 1600); do
    grep -q "Ctrl-C stops the unit." "$out/idle-$label-up.log" && break
    kill -0 "$up_pid" 2>/dev/null || { echo "bench/idle.sh: rackblock up ($label) exited:" >&2; tail -20 "$out/idle-$label-up.log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q "Ctrl-C stops the unit." "$out/idle-$label-up.log" \
    || { echo "bench/idle.sh: unit ($label) not up:" >&2; tail -20 "$out/idle-$label-up.log" >&2; exit 1; }
  : >"$dir/pids"
  for file in "$dir"/unit/run/*.pid; do echo "$(basename "$file" .pid) $(cat "$file")" >>"$dir/pids"; done
  term() { "$bin" unit status --rack "$dir/unit/rack.toml" 2>/dev/null | grep -oiE 'term[ =:]+[0-9]+' | head -1 | grep -oE '[0-9]+' || echo "?"; }
  sleep "$settle"
  term_before=$(term)
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  snapshot "$dir/pids" >"$dir/a"
  sleep "$seconds"
  snapshot "$dir/pids" >"$dir/b"
  term_after=$(term)
  python3 - "$dir/a" "$dir/b" "$hz" "$seconds" "$label" "$load" "$term_before" "$term_after" <<'PY'
import sys
a_path, b_path, hz, seconds, label, load, t0, t1 = sys.argv[1:]
hz, seconds = float(hz), float(seconds)
def read(path):
    return {n: (int(t), int(s)) for n, t, s in (line.split() for line in open(path))}
a, b = read(a_path), read(b_path)
rows, heads, unit = [], [0.0, 0.0], [0.0, 0.0]
for name in sorted(b):
    if name not in a:
        continue
    cpu = (b[name][0] - a[name][0]) / hz / seconds * 100
    sw = (b[name][1] - a[name][1]) / seconds
    rows.append((name, cpu, sw))
    unit[0] += cpu; unit[1] += sw
    if name.startswith("hn-"):
        heads[0] += cpu; heads[1] += sw
for name, cpu, sw in rows:
    print(f"{label:<6} {name:<8} {cpu:10.2f} {sw:12.0f}")
print(f"{label:<6} {'heads':<8} {heads[0]:10.2f} {heads[1]:12.0f}")
print(f"{label:<6} {'unit':<8} {unit[0]:10.2f} {unit[1]:12.0f}   load {load}, raft term {t0} -> {t1}")
PY
  cleanup
done
