#!/usr/bin/env bash
# bench/iscsi.sh: a host's view over iSCSI, against initiators nobody here
# wrote. vol0 of a unit started by `rackblock up` (3 head nodes, 6 sleds,
# 4+2; the attach agent serves vol0 over iSCSI) and, in the same run,
# interleaved (tgt, ours, tgt, ours, ...), `tgtd` (Debian's userspace
# target) serving a raw file on the same disk; medians over BENCH_ROUNDS:
#   4 KiB random read QD32, IOPS (libiscsi's iscsi-perf --random)
#   goal (issue 16): ratio >= 1.0 against tgt's one copy
# and, per round, the CPU each process used during the job (utime + stime
# from /proc/<pid>/stat before and after; iscsi-perf's from its rusage),
# as % of one core over the job's wall time and as CPU µs per I/O: the
# agent, the head nodes, the sleds and the rest of the unit for ours,
# tgtd for tgt, and the initiator for both; the load average is printed.
# Writes are not measured: this machine has no iSCSI initiator that writes
# (iscsi-perf only reads; qemu-img's iscsi driver is in qemu-block-extra,
# which is not installed next to the pinned qemu-utils; no kernel
# initiator). Both LUNs hold written data: tgt's raw file is written with
# dd, ours through NBD (fio) and flushed to the sleds. Every process is stopped by pid (tgtd
# ignores SIGTERM: its target is deleted and it is told to exit with
# tgtadm, SIGKILL as a fallback). Output: BENCH lines (bench/README.md)
# and bench/out/iscsi.json. BENCH_SECONDS (default 5), BENCH_ROUNDS (3),
# BENCH_BIN (below).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-5}
rounds=${BENCH_ROUNDS:-3}
for tool in iscsi-perf:libiscsi-bin tgtd:tgt tgtadm:tgt fio:fio python3:python3 curl:curl; do
  command -v "${tool%%:*}" >/dev/null || {
    echo "bench/iscsi.sh: ${tool%%:*} is missing: install the Debian package ${tool##*:} (scripts/install-deps.sh does)" >&2; exit 1; }
done
# BENCH_BIN: a rackblock binary to measure instead of this tree's release
# build (e.g. one already built when the machine is too loaded to build).
if [ -n "${BENCH_BIN:-}" ]; then
  bin=$BENCH_BIN
else
  cargo build --release -q -p cli --bin rackblock
  bin="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
fi
out="$root/bench/out"; work="$out/iscsi-work"
rm -rf "$work"; mkdir -p "$work"

# Ports of this bench (nbd.sh uses 19xxx, cpu.sh 20xxx): head nodes' data
# 21000, sleds' 21100, admin 21201-21203 and 21301-21306, the agent's admin
# 21400, zonal 21450, NBD 21451, our portal 21452, tgt's portal 21453,
# tgt's control port 21454.
base_port=21000; admin_base=21200
zonal=127.0.0.1:21450; ours_nbd=127.0.0.1:21451; ours_portal=127.0.0.1:21452
tgt_portal=127.0.0.1:21453; tgt_control=21454
for port in 21000 21100 21201 21400 21450 21451 21452 21453; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || (exec 3<>/dev/tcp/127.0.1.1/$port) 2>/dev/null; then
    echo "bench/iscsi.sh: port $port is in use (another bench/iscsi.sh running?)" >&2; exit 1
  fi
done
region_mib=1024
ours_target=iqn.2026-12.io.rackblock:vol0
tgt_target=iqn.2026-12.io.rackblock:bench-tgt

# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh" # pids, stop_pids, drop_images
tgt_pid=""
stop_tgt() {
  [ -n "$tgt_pid" ] || return 0
  tgtadm -C $tgt_control --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
  tgtadm -C $tgt_control --op delete --mode system >/dev/null 2>&1 || true
  for _ in $(seq 1 100); do kill -0 "$tgt_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$tgt_pid" 2>/dev/null || true
  wait "$tgt_pid" 2>/dev/null || true
  tgt_pid=""
}
stop_all() { stop_tgt; stop_pids; }
trap 'stop_all; drop_images' EXIT

# tgt's raw file, written once so reads hit the disk.
dd if=/dev/zero of="$work/tgt.img" bs=1M count=$region_mib oflag=direct status=none
tgtd -f -C $tgt_control --iscsi portal=$tgt_portal >"$work/tgtd.log" 2>&1 &
tgt_pid=$!
made=0
for _ in $(seq 1 300); do
  if tgtadm -C $tgt_control --lld iscsi --op new --mode target --tid 1 -T $tgt_target >/dev/null 2>&1; then made=1; break; fi
  sleep 0.1
done
[ $made = 1 ] || { echo "bench/iscsi.sh: tgtd did not come up:" >&2; tail -5 "$work/tgtd.log" >&2; exit 1; }
tgtadm -C $tgt_control --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$work/tgt.img"
tgtadm -C $tgt_control --lld iscsi --op bind --mode target --tid 1 -I ALL

"$bin" up --data-dir "$work/unit" --base-port $base_port --admin-base-port $admin_base \
  --zonal-listen $zonal --nbd-listen $ours_nbd --iscsi-listen $ours_portal \
  --volume-size ${region_mib}MiB --wait-seconds 120 >"$work/up.log" 2>&1 &
pids+=($!)
up_pid=$!
for _ in $(seq 1 1500); do
  grep -q "Ctrl-C stops the unit." "$work/up.log" && break
  kill -0 $up_pid 2>/dev/null || { echo "bench/iscsi.sh: rackblock up exited:" >&2; tail -20 "$work/up.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "Ctrl-C stops the unit." "$work/up.log" || { echo "bench/iscsi.sh: unit not up after 150 s:" >&2; tail -20 "$work/up.log" >&2; exit 1; }

url() { # target -> iSCSI URL of its LUN
  if [ "$1" = ours ]; then echo "iscsi://$ours_portal/$ours_target/0"; else echo "iscsi://$tgt_portal/$tgt_target/1"; fi
}
# Ours written once over NBD (1 MiB requests), then flushed to the sleds.
timeout 600 fio --name=fill --ioengine=nbd --uri="nbd://$ours_nbd/vol0" --rw=write --bs=1M \
  --iodepth=4 --size=${region_mib}M >"$work/ours-fill.txt" 2>&1 \
  || { echo "bench/iscsi.sh: fill of vol0 failed:" >&2; tail -5 "$work/ours-fill.txt" >&2; exit 1; }
for h in 1 2 3; do
  curl -sf -X POST --max-time 120 "http://127.0.0.1:$((admin_base + h))/flush" >"$work/flush-$h.json" \
    || { echo "bench/iscsi.sh: POST /flush on hn-$h failed" >&2; exit 1; }
done

# The processes whose CPU a round reports: "group pid" lines.
: >"$work/procs-ours"
for file in "$work"/unit/run/*.pid; do
  name=$(basename "$file" .pid)
  case $name in attach) group=agent ;; hn-*) group=head_nodes ;; sled-*) group=sleds ;; *) group=unit_other ;; esac
  echo "$group $(cat "$file")" >>"$work/procs-ours"
done
echo "unit_other $up_pid" >>"$work/procs-ours"
echo "tgtd $tgt_pid" >"$work/procs-tgt"
cpu_snap() { # procs-file -> "group ticks" lines (utime + stime)
  while read -r group pid; do
    awk -v g="$group" '{ sub(/^.*\) /, ""); print g, $12 + $13 }' "/proc/$pid/stat" 2>/dev/null || true
  done <"$1"
}

# iscsi-perf prints a line per second ("iops current N") until interrupted;
# the median of its per-second IOPS after the first is the figure. Prints
# "IOPS cpu-summary".
perf_read() { # target round -> IOPS and CPU
  local log="$work/$1-read-r$2.txt" procs="$work/procs-$1"
  cpu_snap "$procs" >"$work/cpu-$1-r$2-a.txt"
  local start; start=$(date +%s.%N)
  python3 -c 'import resource, subprocess, sys
subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(r.ru_utime + r.ru_stime)' "$log" timeout -s INT $((seconds + 1)) iscsi-perf -m 32 -b 8 -r "$(url "$1")" \
    >"$work/cpu-$1-r$2-initiator.txt" || true
  local end; end=$(date +%s.%N)
  cpu_snap "$procs" >"$work/cpu-$1-r$2-b.txt"
  python3 - "$log" "$work/cpu-$1-r$2" "$start" "$end" <<'PY'
import collections, os, re, statistics, sys
log, cpu, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
text = open(log, errors="replace").read()
iops = [float(m.group(1)) for m in re.finditer(r"iops current (\d+)", text)]
total = sum(iops)
iops = iops[1:] if len(iops) > 2 else iops  # the ramp-up second
ticks = os.sysconf("SC_CLK_TCK")
def snap(path):
    out = collections.Counter()
    for line in open(path):
        group, value = line.split()
        out[group] += int(value)
    return out
a, b = snap(cpu + "-a.txt"), snap(cpu + "-b.txt")
seconds = {g: (b[g] - a[g]) / ticks for g in b if g in a}
seconds["initiator"] = float(open(cpu + "-initiator.txt").read().strip() or 0)
wall = end - start
parts = " ".join(
    f"{g}={100 * s / wall:.0f}%/{1e6 * s / total if total else 0:.0f}us"
    for g, s in sorted(seconds.items()))
print(statistics.median(iops) if iops else 0, parts)
PY
}
declare -a tr or_
for r in $(seq 1 "$rounds"); do
  read -r iops cpu_tgt < <(perf_read tgt "$r"); tr+=("$iops")
  read -r iops cpu_ours < <(perf_read ours "$r"); or_+=("$iops")
  echo "# round $r: 4k randread qd32 tgt ${tr[-1]} ours ${or_[-1]} iops (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  echo "# round $r CPU, % of one core / µs per I/O: tgt: $cpu_tgt; ours: $cpu_ours" >&2
done
stop_all

python3 - "$out/iscsi.json" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(df -T "$work" | awk 'NR==2{print $2}')" <<PY
import json, statistics, sys, os
med = lambda xs: statistics.median(float(x) for x in xs)
rows = [
  ("iscsi.randread4k.qd32.iops", "${or_[*]}", "${tr[*]}", "iops", "higher", "# goal: ratio >= 1.0 against tgt on a raw file (iscsi-perf --random)"),
]
figures = []
for name, ours, base, unit, better, comment in rows:
    o, b = med(ours.split()), med(base.split())
    ratio = o / b if b else 0.0
    if comment:
        print(comment)
    print(f"BENCH {name} value={o:.0f} unit={unit} baseline={b:.0f} ratio={ratio:.3f} better={better}")
    figures.append({"metric": name, "value": o, "unit": unit, "baseline": b, "ratio": ratio, "better": better})
json.dump({"commit": sys.argv[2], "machine": {"nproc": os.cpu_count(), "fs": sys.argv[3]}, "figures": figures},
          open(sys.argv[1], "w"), indent=2)
PY
