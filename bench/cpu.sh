#!/usr/bin/env bash
# bench/cpu.sh: what a host's I/O costs, in CPU and in disk traffic, besides
# how fast it goes (issue 12 item 5, issue 13 item 5).
#
# Disk phase: fio's nbd engine against vol0 (4 GiB, 4 partitions of 1 GiB,
# primaries on every head node) of a unit started by `rackblock up`
# (release, 3 head nodes, 6 sleds, 4+2, attach agent), and in the same run,
# interleaved, against `qemu-nbd --cache=none -f raw` serving a raw file of
# the same size on the same disk. Both are written once in full first (ours
# then flushed), so reads hit the disk (ours: erasure-coded stripes). Jobs:
#   w32  4 KiB random write QD32 over the whole volume
#   r32  4 KiB random read  QD32 over the whole volume
#   w32p, r32p  the same over the first partition only (1 GiB)
#   w1   4 KiB random write QD1 with a flush after every write (p50, p99 of
#        write + flush)
#   sw, sr  1 MiB sequential write and read, QD4
#   idle    no I/O for BENCH_SECONDS: CPU % of one core (background work)
# The sled controllers' scrubber is off in both units (`up
# --scrub-bytes-per-second 0`): six sleds on one disk would read 6 x 32 MiB/s
# for a third of each minute, in some job windows and not in others (first
# runs: 2.5-3.6 bytes read per host byte per sled in those windows).
# For each job and each process of the target (head nodes, sled controllers,
# attach agent, control: zonal plane and the `up` supervisor; qemu-nbd):
# CPU µs per I/O (utime + stime, /proc/<pid>/stat) and context switches per
# I/O (per thread, /proc/<pid>/task/*/status), before and after the job, and
# for writes also after POST /flush returned on every head node. For w32,
# r32, sw, sr: disk bytes read and written per host byte, from
# /proc/diskstats of the device under the data directory (before the job to
# after the flush and `sync -f`; other tenants of the disk included) and from
# /proc/<pid>/io of the target's processes (ours only).
#
# Memory phase: the same w32 and r32 jobs against a unit whose devices and
# logs are on tmpfs (data directory under /dev/shm; 1 GiB vol0 in 4
# partitions of 256 MiB, `rackblock up --partition-size`), against
# `nbdkit memory` as the software ceiling, with the CPU per I/O of each.
#
# Output: BENCH lines (bench/README.md) and bench/out/cpu.json. Every process
# is stopped by pid; the tmpfs directory and device images are removed at
# exit (BENCH_KEEP_WORK=1 keeps the images under bench/out/cpu-work).
# BENCH_HOST_TLS=off runs both units with `up --no-host-tls` (the attach
# agent reaches the head nodes' host ports over plain TCP; default: TLS,
# as `up` runs them), to compare the CPU per I/O of host-port TLS.
# BENCH_SECONDS (default 3) sets each job's length, BENCH_ROUNDS (default 2)
# the rounds: filling and flushing 4 GiB takes ~2 minutes; the whole run
# took 5.5-6 minutes on 2 cores shared with others' builds
# (BENCH_SECONDS=5 BENCH_ROUNDS=3: about 9 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${BENCH_SECONDS:-3}
rounds=${BENCH_ROUNDS:-2}
host_tls_args=()
case ${BENCH_HOST_TLS:-on} in
  on) ;;
  off) host_tls_args=(--no-host-tls) ;;
  *) echo "bench/cpu.sh: BENCH_HOST_TLS is on or off, not ${BENCH_HOST_TLS}" >&2; exit 1 ;;
esac
missing=()
for tool in fio:fio qemu-nbd:qemu-utils nbdkit:nbdkit nbdinfo:libnbd-bin python3:python3 curl:curl findmnt:util-linux; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool%%:*} (Debian package ${tool##*:})")
done
if [ ${#missing[@]} -gt 0 ]; then
  printf 'bench/cpu.sh: missing: %s\n' "${missing[@]}" >&2
  echo "bench/cpu.sh: scripts/install-deps.sh installs them" >&2
  exit 1
fi
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench/cpu.sh: this fio has no nbd engine (fio >= 3.20 has)" >&2; exit 1; }
nbdkit memory --dump-plugin >/dev/null 2>&1 || { echo "bench/cpu.sh: nbdkit has no memory plugin" >&2; exit 1; }
shm_parent=/dev/shm
[ "$(df --output=fstype "$shm_parent" 2>/dev/null | tail -1)" = tmpfs ] \
  || { echo "bench/cpu.sh: $shm_parent is not a tmpfs (the memory-backed unit lives there)" >&2; exit 1; }
cargo build --release -q -p cli --bin rackblock
bin="${CARGO_TARGET_DIR:-$root/target}/release/rackblock"
out="$root/bench/out"; work="$out/cpu-work"
rm -rf "$work"; mkdir -p "$work/fio" "$work/snap"
shm="$shm_parent/rackblock-cpu-bench.$$"

# Ports (sled.sh 17xxx, datapath.sh 18xxx, nbd.sh and qos.sh 19xxx): disk
# unit data 20000/20100, admin 20201-3, 20301-6, attach 20400; memory unit
# data 20500/20600, admin 20701-3, 20801-6, attach 20900; zonal 20450/20950,
# NBD 20451/20951, qemu-nbd 20452, nbdkit 20453.
for port in 20000 20100 20201 20202 20203 20400 20450 20451 20452 20453 20500 20600 20701 20702 20703 20900 20950 20951; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || (exec 3<>/dev/tcp/127.0.1.1/$port) 2>/dev/null; then
    echo "bench/cpu.sh: port $port is in use (another bench/cpu.sh running?)" >&2; exit 1
  fi
done
volume_bytes=$((4 << 30)); partition_bytes=$((1 << 30))
mem_volume_bytes=$((1 << 30)); mem_partition_bytes=$((256 << 20))

# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh" # pids, stop_pids, drop_images
watch_pid=""
cleanup() {
  if [ -n "$watch_pid" ]; then kill "$watch_pid" 2>/dev/null || true; wait "$watch_pid" 2>/dev/null || true; fi
  stop_pids
  if [ -d "$shm" ]; then # keep the memory unit's logs, free its memory
    mkdir -p "$work/mem-run"; cp "$shm"/unit/run/*.log "$work/mem-run/" 2>/dev/null || true
    rm -rf "$shm"
  fi
  drop_images
}
trap cleanup EXIT

# start_unit TARGET DATA_DIR BASE_PORT ADMIN_BASE ZONAL NBD [up args...]:
# starts `rackblock up`, waits for vol0 over NBD, appends its processes to
# $work/pids (`target role name pid`).
start_unit() {
  local target=$1 dir=$2 base=$3 admin=$4 zonal=$5 nbd=$6; shift 6
  "$bin" up --data-dir "$dir" --base-port "$base" --admin-base-port "$admin" \
    --zonal-listen "$zonal" --nbd-listen "$nbd" --wait-seconds 120 "${host_tls_args[@]}" "$@" >"$work/$target-up.log" 2>&1 &
  local up_pid=$!
  pids+=("$up_pid")
  for _ in $(seq 1 1500); do
    grep -q "Ctrl-C stops the unit." "$work/$target-up.log" && break
    kill -0 "$up_pid" 2>/dev/null || { echo "bench/cpu.sh: rackblock up ($target) exited:" >&2; tail -20 "$work/$target-up.log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q "Ctrl-C stops the unit." "$work/$target-up.log" \
    || { echo "bench/cpu.sh: unit ($target) not up after 150 s:" >&2; tail -20 "$work/$target-up.log" >&2; exit 1; }
  echo "$target control up $up_pid" >>"$work/pids"
  local file name role
  for file in "$dir"/run/*.pid; do
    name=$(basename "$file" .pid)
    case $name in
      hn-*) role=head_node ;; sled-*) role=sled ;; attach) role=attach ;; *) role=control ;;
    esac
    echo "$target $role $name $(cat "$file")" >>"$work/pids"
  done
}
# wait_nbd URI: until the export answers (bounded).
wait_nbd() {
  for _ in $(seq 1 100); do nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench/cpu.sh: $1 does not answer" >&2; exit 1
}

declare -A uri flush_ports
# fio_run TARGET JOB ROUND rw bs iodepth [extra...]: snapshot a, the job,
# snapshot b, flush (a unit: POST /flush on every head node) and sync -f,
# snapshot c. ROUND "fill" runs without snapshots.
fio_run() {
  local target=$1 job=$2 round=$3 rw=$4 bs=$5 qd=$6; shift 6
  local base="$target-$job-r$round" data_dir=$work
  case $target in mem|nbdkit) data_dir=$shm ;; esac
  if [ "$round" != fill ]; then
    python3 bench/procstat.py snap "$work/pids" "$work/snap/$base-a.json" "$data_dir"
    python3 bench/procstat.py watch "$work/pids" "$work/snap/$base-w.json" "$target" $((seconds + 300)) &
    watch_pid=$!
  fi
  timeout $((seconds + 300)) fio --name="$job" --ioengine=nbd --uri="${uri[$target]}" --rw="$rw" --bs="$bs" \
    --iodepth="$qd" --output-format=json --output="$work/fio/$base.json" "$@" >/dev/null 2>>"$work/fio.err" \
    || { echo "bench/cpu.sh: fio $job on $target failed:" >&2; tail -5 "$work/fio.err" >&2; return 1; }
  if [ "$round" != fill ]; then
    kill "$watch_pid"; wait "$watch_pid" || true; watch_pid=""
    python3 bench/procstat.py snap "$work/pids" "$work/snap/$base-b.json" "$data_dir"
  fi
  local port
  for port in ${flush_ports[$target]:-}; do
    curl -sf -X POST --max-time 300 "http://127.0.0.1:$port/flush" >>"$work/flush.json" \
      || { echo "bench/cpu.sh: POST /flush on 127.0.0.1:$port failed" >&2; return 1; }
  done
  sync -f "$data_dir"
  [ "$round" = fill ] || python3 bench/procstat.py snap "$work/pids" "$work/snap/$base-c.json" "$data_dir"
}
timed() { fio_run "$@" --time_based --runtime="$seconds"; }

started=$(date +%s)
: >"$work/pids"
# ---- disk phase: ours against qemu-nbd on the same disk ----
truncate -s $volume_bytes "$work/qemu.img"
qemu-nbd --cache=none -f raw --persistent --shared=8 --bind 127.0.0.1 --port 20452 \
  --export-name base "$work/qemu.img" >"$work/qemu-nbd.log" 2>&1 &
pids+=($!); echo "qemu server qemu-nbd $!" >>"$work/pids"
start_unit ours "$work/unit" 20000 20200 127.0.0.1:20450 127.0.0.1:20451 --volume-size "$volume_bytes" \
  --scrub-bytes-per-second 0
uri[qemu]="nbd://127.0.0.1:20452/base"; uri[ours]="nbd://127.0.0.1:20451/vol0"
flush_ports[ours]="20201 20202 20203"
wait_nbd "${uri[qemu]}"; wait_nbd "${uri[ours]}"
size=$(nbdinfo --size "${uri[ours]}")
[ "$size" = $volume_bytes ] || { echo "bench/cpu.sh: vol0 is $size bytes, not $volume_bytes (a stale $work/unit?)" >&2; exit 1; }
echo "# disk: $(python3 bench/procstat.py device "$work") under $work ($(df --output=fstype "$work" | tail -1))" >&2
for target in qemu ours; do fio_run $target fill fill write 1M 16 --size=$volume_bytes; done
echo "# filled both 4 GiB volumes in $(( $(date +%s) - started )) s" >&2
# What each target costs with no I/O at all (timers, leases, heartbeats,
# polls), to read the per-I/O figures against, QD1's above all.
for target in qemu ours; do
  python3 bench/procstat.py snap "$work/pids" "$work/snap/$target-idle-a.json" "$work"
  sleep "$seconds"
  python3 bench/procstat.py snap "$work/pids" "$work/snap/$target-idle-b.json" "$work"
done

# Interleaved job by job: the baseline, then ours.
for r in $(seq 1 "$rounds"); do
  for target in qemu ours; do timed $target w32 "$r" randwrite 4k 32 --size=$volume_bytes; done
  for target in qemu ours; do timed $target r32 "$r" randread 4k 32 --size=$volume_bytes; done
  for target in qemu ours; do timed $target w32p "$r" randwrite 4k 32 --size=$partition_bytes; done
  for target in qemu ours; do timed $target r32p "$r" randread 4k 32 --size=$partition_bytes; done
  for target in qemu ours; do timed $target w1 "$r" randwrite 4k 1 --fsync=1 --size=$volume_bytes; done
  for target in qemu ours; do timed $target sw "$r" write 1M 4 --size=$volume_bytes; done
  for target in qemu ours; do timed $target sr "$r" read 1M 4 --size=$volume_bytes; done
  echo "# disk phase round $r done at $(( $(date +%s) - started )) s" >&2
done
stop_pids
rm -f "$work/qemu.img"

# ---- memory phase: a unit on tmpfs against nbdkit memory ----
nbdkit -f -i 127.0.0.1 -p 20453 memory size=$mem_volume_bytes >"$work/nbdkit.log" 2>&1 &
pids+=($!); echo "nbdkit server nbdkit $!" >>"$work/pids"
mkdir -p "$shm"
start_unit mem "$shm/unit" 20500 20700 127.0.0.1:20950 127.0.0.1:20951 \
  --volume-size "$mem_volume_bytes" --partition-size "$mem_partition_bytes" --device-size-mib 512 \
  --scrub-bytes-per-second 0
uri[nbdkit]="nbd://127.0.0.1:20453/"; uri[mem]="nbd://127.0.0.1:20951/vol0"
flush_ports[mem]="20701 20702 20703"
wait_nbd "${uri[nbdkit]}"; wait_nbd "${uri[mem]}"
for target in nbdkit mem; do fio_run $target fill fill write 1M 16 --size=$mem_volume_bytes; done
for r in $(seq 1 "$rounds"); do
  for target in nbdkit mem; do timed $target w32 "$r" randwrite 4k 32 --size=$mem_volume_bytes; done
  for target in nbdkit mem; do timed $target r32 "$r" randread 4k 32 --size=$mem_volume_bytes; done
done
echo "# memory phase done at $(( $(date +%s) - started )) s" >&2
stop_pids

python3 bench/cpu_report.py "$work" "$out/cpu.json" "$rounds" "$seconds" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(df --output=fstype "$work" | tail -1)"
