#!/usr/bin/env bash
# scripts/vm-test.sh: a kernel block device on rackblock, under head-node
# failover, in a throwaway VM.
#
# The build machines' kernel has no nbd module, so the kernel side runs in
# a software-emulated (TCG) VM: Debian's kernel with nbd.ko, busybox, our
# `rackblock` binary and e2fsprogs in an initramfs this script builds.
#
#   host                                        guest (qemu TCG, 1 vCPU)
#   rackblock up (3 head nodes, 6 sleds) ◀──┐   /init
#     host ports 127.0.0.{1,2,3}:PORT       │   rackblock attach vol0 --device /dev/nbd0
#   control file over HTTP 127.0.0.1:CTL ◀──┤     --rack rack.toml --attachment-file F
#   rackblock attachment create → F         │   mkfs.ext4, mount, write files with fsync
#     (copied into the initramfs)           │   (checksums, per-write latency)
#              slirp (user-mode network) ───┘
#   kill -9 the primary of the partition        kill -9 its own agent, restart it
#   being written; restart it; kill -9 the      (NBD_CMD_RECONFIGURE), the same after
#   Raft leader; revoke the attachment          SIGTERM while mounted; unmount,
#                                               e2fsck -fn, checksums, dmesg, detach
#
# Networking: the guest is a host of the unit and reaches it only where
# hosts do, the head nodes' host ports (`host` in the rack file: `up` puts
# them on 127.0.0.1-3, port --base-port); the unit ports on networks A and
# B (127.0.1.x, 127.0.2.x) are not routed to it (SECURITY.md). The guest's
# loopback has no 127.0.0.0/8 address of its own (its agent's admin port is
# on eth0), 127.0.0.0/24 is routed to slirp's gateway with route_localnet
# set, and slirp connects to those addresses on the host like any other
# destination. So the host ports in the rack file and in the partition maps
# the head nodes answer work unchanged in the guest, without proxies. The
# guest attaches straight to the unit (--rack) with an attachment the
# script mints on the host as an operator (`rackblock attachment create`,
# the file copied into the initramfs) and revokes at the end; the zonal
# plane stays on the host.
#
# Fetched once into a cache (RACKBLOCK_VM_CACHE, default
# ~/.cache/rackblock-vm) with `apt-get download` + `dpkg -x`, never
# installed (installing qemu-system-x86 would replace the machine's newer
# qemu-utils): qemu-system-x86 and the libraries/firmware it needs, the
# kernel package linux-image-amd64 depends on (its ABI resolved now),
# busybox-static. mke2fs and e2fsck are the host's (e2fsprogs), copied
# with their libraries. `--fetch` only fills the cache.
#
# Usage: scripts/vm-test.sh [--fetch]
#   RACKBLOCK_BIN      the rackblock binary (default target/debug/rackblock
#                      under CARGO_TARGET_DIR or ./target)
#   VM_TEST_TIMEOUT    bound on the whole test in seconds (default 900)
#   VM_TEST_KEEP=1     keep the work directory (logs, console)
# Prints PASS or FAIL with the figures; exits 0 only on PASS. Every process
# it starts is stopped by pid.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${RACKBLOCK_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rackblock-vm}
limit=${VM_TEST_TIMEOUT:-900}
started=$(date +%s)

log() { echo "vm-test: $*" >&2; }
die() { echo "vm-test: FAIL: $*" >&2; exit 1; }

# --- fetch -----------------------------------------------------------------
abi=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$abi" ] || die "cannot resolve the kernel package of linux-image-amd64 (apt-get update?)"
kver=${abi#linux-image-}
root=$cache/root-$kver
packages=(qemu-system-x86 qemu-system-common qemu-system-data seabios libcapstone4 libfdt1
  libslirp0 libvdeplug2 busybox-static "$abi")
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # one fetch at a time (the cache is shared by every checkout)
if [ ! -f "$root/.complete" ]; then
  log "fetching ${packages[*]} into $cache"
  rm -rf "$root" "$cache/debs"
  mkdir -p "$cache/debs" "$root"
  (cd "$cache/debs" && apt-get download "${packages[@]}" >/dev/null 2>"$cache/apt.log") ||
    die "apt-get download failed: $(tail -3 "$cache/apt.log")"
  for deb in "$cache/debs"/*.deb; do dpkg -x "$deb" "$root"; done
  rm -rf "$cache/debs"
  touch "$root/.complete"
fi
flock -u 9
qemu=$root/usr/bin/qemu-system-x86_64
qemu_env=(env LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu"
  QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu")
missing=$("${qemu_env[@]}" ldd "$qemu" | awk '/not found/ {print $1}' | tr '\n' ' ')
[ -z "$missing" ] || die "qemu needs libraries this machine lacks: $missing"
busybox=$root/bin/busybox
kernel=$root/boot/vmlinuz-$kver
[ -x "$busybox" ] && [ -f "$kernel" ] || die "the cache $root is incomplete; remove it"
if [ "${1:-}" = "--fetch" ]; then
  log "cache ready: $root"
  exit 0
fi

bin=${RACKBLOCK_BIN:-${CARGO_TARGET_DIR:-$here/target}/debug/rackblock}
[ -x "$bin" ] || die "no rackblock binary at $bin (cargo build -p cli, or set RACKBLOCK_BIN)"
for tool in mke2fs e2fsck python3 strip; do
  command -v "$tool" >/dev/null || die "$tool is missing on this host"
done
python=/usr/bin/python3
[ -x $python ] || python=$(command -v python3)

work=$(mktemp -d /tmp/rackblock-vm.XXXXXX)
data=$work/unit
console=$work/console.log
up_pid="" qemu_pid="" ctl_pid=""
restarted=()

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
stop_pid() { # pid signal-first grace-seconds
  local pid=$1
  alive "$pid" || return 0
  kill "-$2" "$pid" 2>/dev/null || true
  for _ in $(seq 1 $(($3 * 10))); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  stop_pid "$qemu_pid" KILL 5
  stop_pid "$ctl_pid" TERM 5
  for pid in "${restarted[@]}"; do stop_pid "$pid" TERM 10; done
  stop_pid "$up_pid" TERM 40
  # Daemons `up` started that outlived it (it was killed): ours, by pid file.
  for file in "$data"/run/*.pid; do
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    if alive "$pid" && grep -q "$work" "/proc/$pid/cmdline" 2>/dev/null; then kill -KILL "$pid"; fi
  done
  if [ "${VM_TEST_KEEP:-}" = 1 ] || [ $rc -ne 0 ]; then
    log "logs kept in $work (console.log, unit/run/*.log)"
  else
    rm -rf "$work"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

left() { echo $((limit - ($(date +%s) - started))); }
check_time() { [ "$(left)" -gt 0 ] || die "over the time bound of ${limit}s ($1)"; }

# --- the unit on the host ----------------------------------------------------
# Ports above the kernel's ephemeral range (32768-60999) and the tests'
# (10000-30000), one block of 400 per run: the unit's data ports (base and
# base+100) on 127.0.1.x/127.0.2.x, admin, zonal, NBD and control ports on
# 127.0.0.1 (base+1 .. base+302).
slot=$(($$ % 10))
base_port=$((61000 + slot * 400))
admin_base=$base_port
zonal=127.0.0.1:$((admin_base + 300))
ctl_port=$((admin_base + 302))
# Sparse 1 GiB devices: room for every partition's 4+2 extents, so the
# head nodes flush their logs to the sleds as in production (with 256 MiB
# devices no extent fits and every write stays in the logs).
log "starting the unit (rackblock up, data in $data)"
"$bin" up --data-dir "$data" --sleds 6 --devices-per-sled 1 --device-size-mib 1024 \
  --base-port $base_port --admin-base-port $admin_base --zonal-listen $zonal \
  --nbd-listen 127.0.0.1:$((admin_base + 301)) --no-iscsi \
  --volume-size 256MiB --partition-size 64MiB --scrub-bytes-per-second 0 \
  >"$work/up.log" 2>&1 &
up_pid=$!

# Meanwhile, the initramfs.
initramfs=$work/initramfs
mkdir -p "$initramfs"/{bin,sbin,etc,lib/modules,proc,sys,dev,tmp,mnt,run}
cp "$busybox" "$initramfs/bin/busybox"
strip -o "$initramfs/bin/rackblock" "$bin"
cp "$(command -v mke2fs)" "$initramfs/sbin/mke2fs"
cp "$(command -v e2fsck)" "$initramfs/sbin/e2fsck"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$initramfs/etc/"
for exe in "$bin" "$(command -v mke2fs)" "$(command -v e2fsck)"; do
  for lib in $(ldd "$exe" | awk '/=> \// {print $3} /^[ \t]*\/lib/ {print $1}'); do
    mkdir -p "$initramfs$(dirname "$lib")"
    cp -L "$lib" "$initramfs$lib"
  done
done
# Modules: the closure of what the guest needs, dependencies first.
moddir=$root/lib/modules/$kver/kernel
declare -A modfile=() seen=()
while IFS= read -r file; do
  name=$(basename "$file"); name=${name%.xz}; name=${name%.zst}; name=${name%.ko}
  modfile[${name//-/_}]=$file
done < <(find "$moddir" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')
order=()
add_module() {
  local name=$1 file deps dep
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  file=${modfile[$name]:-}
  [ -n "$file" ] || die "kernel $kver has no module $name"
  case $file in
    *.xz) "$busybox" xzcat "$file" >"$initramfs/lib/modules/$name.ko" ;;
    *.zst) zstd -dc "$file" >"$initramfs/lib/modules/$name.ko" ;;
    *) cp "$file" "$initramfs/lib/modules/$name.ko" ;;
  esac
  deps=$(tr '\0' '\n' <"$initramfs/lib/modules/$name.ko" | grep -a '^depends=' | head -1 | cut -d= -f2)
  for dep in ${deps//,/ }; do add_module "${dep//-/_}"; done
  order+=("$name")
}
for module in virtio_pci virtio_net nbd crc32c_generic ext4; do add_module $module; done
printf '%s\n' "${order[@]}" >"$initramfs/etc/modules.order"

cat >"$initramfs/init" <<'GUEST'
#!/bin/busybox sh
# The guest side of scripts/vm-test.sh (see there).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ln -sf /proc/mounts /etc/mtab
. /etc/vmtest.env
say() { echo "VMTEST $*"; }
fail() {
  say "FAIL $*"
  echo "--- agent log"; tail -n 30 /tmp/agent.log 2>/dev/null
  echo "--- dmesg"; dmesg | tail -n 40
  say "END"
  poweroff -f
}
now() { cut -d' ' -f1 /proc/uptime; }
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%d", (b - a) * 1000 }'; }
say "init $(now)"
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m.ko || fail "insmod $m"; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
# The head nodes' host ports are the host's loopback addresses 127.0.0.x:
# route them through slirp (see scripts/vm-test.sh); the guest keeps no
# 127.0.0.0/8 address of its own.
ip addr del 127.0.0.1/8 dev lo
sysctl -w net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1 >/dev/null
ip route add 127.0.0.0/24 via 10.0.2.2 dev eth0
ADMIN=10.0.2.15:9400
ctl() { printf 'GET /%s HTTP/1.0\r\n\r\n' "$1" | nc -w 5 10.0.2.2 "$CTL_PORT" 2>/dev/null | tail -n 1; }

AGENT=""
start_agent() { # [device]: none lets the agent choose (a free one, or its own left behind)
  : >>/tmp/agent.log
  RUST_LOG=info /bin/rackblock attach vol0 --rack /etc/rack.toml --attachment-file /etc/attachment \
    --unit-ca /etc/unit-ca.pem --admin $ADMIN --device $1 >>/tmp/agent.log 2>&1 &
  AGENT=$!
}
served() { n=$(grep -c '^serving vol0' /tmp/agent.log 2>/dev/null); echo "${n:-0}"; }
wait_serving() { # how many "serving" lines the log must have
  i=0
  while [ "$(served)" -lt "$1" ]; do
    kill -0 "$AGENT" 2>/dev/null || fail "the agent exited"
    i=$((i + 1)); [ $i -lt 1800 ] || fail "the agent did not attach in 180 s"
    sleep 0.1
  done
}
say "network $(now)"
start_agent /dev/nbd0
wait_serving 1
say "attached $(now) $(grep '^serving vol0' /tmp/agent.log | tail -n 1)"
[ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 4096 ] || fail "logical block size"
[ "$(cat /sys/block/nbd0/size)" -gt 0 ] || fail "device size 0"
# A second agent for the same device is refused (exit 4) before it
# registers anything.
/bin/rackblock attach vol0 --device /dev/nbd0 --rack /etc/rack.toml --attachment-file /etc/attachment \
  --unit-ca /etc/unit-ca.pem >/tmp/second.log 2>&1
[ $? = 4 ] || fail "a second agent for /dev/nbd0 was not refused: $(cat /tmp/second.log)"
/sbin/mke2fs -q -t ext4 -F -E nodiscard /dev/nbd0 || fail "mkfs.ext4"
mount -t ext4 -o errors=remount-ro /dev/nbd0 /mnt || fail "mount"
say "writing $(now)"
: >/tmp/sums
i=0; max=0; maxfile=0
while :; do
  i=$((i + 1))
  dd if=/dev/urandom of=/tmp/chunk bs=64k count=4 2>/dev/null
  sum=$(sha256sum /tmp/chunk | cut -d' ' -f1)
  t0=$(now)
  dd if=/tmp/chunk of=/mnt/f$i bs=64k conv=fsync 2>/dev/null || fail "write of f$i"
  t1=$(now)
  echo "$sum  /mnt/f$i" >>/tmp/sums
  ms=$(ms_between "$t0" "$t1")
  if [ "$ms" -gt "$max" ]; then max=$ms; maxfile=$i; fi
  say "wrote $i ${ms}ms"
  [ "$(ctl phase)" = stop ] && break
  [ $i -lt "$MAX_FILES" ] || break
done
say "stall ${max}ms f$maxfile files $i"
sync
# The agent's own view of the failovers (its admin port).
pause=$(printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc -w 5 ${ADMIN%:*} ${ADMIN#*:} |
  awk '/^rackblock_agent_failover_pause_longest_seconds / { printf "%d", $2 * 1000 }')
say "agent-pause ${pause:-?}ms"

# A service stop (SIGTERM) while mounted leaves the device, configured,
# to the next agent, which takes it back (NBD_CMD_RECONFIGURE).
kill -TERM "$AGENT"
wait "$AGENT"
rc=$?
[ $rc = 0 ] || fail "the agent exited with $rc on SIGTERM"
grep -q 'is in use: left for a restarted agent' /tmp/agent.log ||
  fail "SIGTERM while mounted did not leave the device to the next agent"
/bin/rackblock attach --list | grep -q '/dev/nbd0 (waiting for its agent' ||
  fail "attach --list does not show the device waiting for its agent"
start_agent # no path: it finds the device its volume's previous agent left
wait_serving 2
grep '^serving vol0' /tmp/agent.log | tail -n 1 | grep -q ' as /dev/nbd0 ' || fail "the agent chose another device"
[ "$(grep -c 'taken back' /tmp/agent.log)" = 1 ] || fail "the next agent did not take /dev/nbd0 back"
say "agent-stop-restart ok"

# The agent dies (kill -9) and a new one takes the device back; a write
# issued in between waits in the kernel.
kill -9 "$AGENT"
wait "$AGENT" 2>/dev/null
t0=$(now)
( dd if=/tmp/chunk of=/mnt/across bs=64k conv=fsync 2>/dev/null; echo $? >/tmp/across.rc ) &
writer=$!
sleep 2
start_agent /dev/nbd0
wait_serving 3
[ "$(grep -c 'taken back' /tmp/agent.log)" = 2 ] || fail "the new agent did not take /dev/nbd0 back"
wait $writer
t1=$(now)
[ "$(cat /tmp/across.rc)" = 0 ] || fail "the write across the agent restart failed"
echo "$(sha256sum /tmp/chunk | cut -d' ' -f1)  /mnt/across" >>/tmp/sums
say "agent-restart $(ms_between "$t0" "$t1")ms"
/bin/rackblock attach --list
/bin/rackblock attach --list | grep -q '/dev/nbd0 (connected)' || fail "attach --list"
/bin/rackblock detach /dev/nbd0 >/tmp/detach.log 2>&1
[ $? = 4 ] || fail "detach of a mounted device was not refused: $(cat /tmp/detach.log)"

grep ' /mnt ' /proc/mounts | grep -q ' rw' || fail "/mnt is no longer mounted read-write: $(grep ' /mnt ' /proc/mounts)"
umount /mnt || fail "umount"
/sbin/e2fsck -fn /dev/nbd0 >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck -fn"; }
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/nbd0 /mnt || fail "mount again"
sha256sum -c /tmp/sums >/tmp/check.log 2>&1 || { grep -v ': OK' /tmp/check.log; fail "checksums"; }
checked=$(grep -c ': OK$' /tmp/check.log)
umount /mnt || fail "umount"
errors=$(dmesg | grep -iE 'I/O error|EXT4-fs error|EXT4-fs warning|Buffer I/O|blk_update_request|remounting filesystem read-only' || true)
[ -z "$errors" ] || fail "kernel log: $errors"
/bin/rackblock detach /dev/nbd0 || fail "detach"
wait "$AGENT"
rc=$?
[ $rc = 0 ] || fail "the agent exited with $rc after detach"
# Without a path the kernel picks a free device (CONNECT without an
# index); detach by volume name.
start_agent
wait_serving 4
device=$(grep '^serving vol0' /tmp/agent.log | tail -n 1 | sed -n 's/.* as \(\/dev\/nbd[0-9]*\).*/\1/p')
[ -n "$device" ] && [ -b "$device" ] || fail "no device from an attach without a path"
/bin/rackblock detach vol0 || fail "detach vol0"
wait "$AGENT"
rc=$?
[ $rc = 0 ] || fail "the agent of $device exited with $rc after detach vol0"
[ -z "$(/bin/rackblock attach --list | grep nbd)" ] || fail "a device is still listed after detach"
say "auto-device $device ok"
say "PASS checked $checked files, longest write stall ${max}ms (f$maxfile)"
say "END"
poweroff -f
GUEST
chmod +x "$initramfs/init"

# --- wait for the unit -------------------------------------------------------
for _ in $(seq 1 1200); do
  grep -q "^unit .* is up" "$work/up.log" && break
  alive "$up_pid" || die "rackblock up failed: $(tail -5 "$work/up.log")"
  sleep 0.1
done
grep -q "^unit .* is up" "$work/up.log" || die "the unit did not come up in 120 s"
export RACKBLOCK_ZONAL=https://$zonal RACKBLOCK_ZONAL_CA=$data/tls/ca.pem RACKBLOCK_TOKEN=$(cat "$data/zonal-token") RACKBLOCK_RACK=$data/rack.toml
rb() { "$bin" "$@"; }
volume_id=$(rb --output json volume describe vol0 | $python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
cp "$data/rack.toml" "$initramfs/etc/rack.toml"
# The host ports require TLS under `up`: the guest trusts the unit's CA.
cp "$data/tls/ca.pem" "$initramfs/etc/unit-ca.pem"
# The guest's attachment, minted here by the operator (the unit keeps only
# its token's digest); the file is all the guest gets besides the rack file.
rb attachment create "$volume_id" --host vm-test --out "$work/attachment" 2>>"$work/up.log" ||
  die "attachment create failed: $(tail -3 "$work/up.log")"
attachment_id=$(sed -n 's/^attachment_id = //p' "$work/attachment")
[ -n "$attachment_id" ] || die "no attachment_id in $work/attachment"
cp "$work/attachment" "$initramfs/etc/attachment"
cat >"$initramfs/etc/vmtest.env" <<EOF
CTL_PORT=$ctl_port
MAX_FILES=400
EOF
(cd "$initramfs" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$work/initramfs.gz")

# The guest asks for /phase over HTTP: "go" until the host has done its kills.
mkdir -p "$work/ctl"
echo go >"$work/ctl/phase"
(cd "$work/ctl" && exec $python -m http.server $ctl_port --bind 127.0.0.1 >"$work/ctl.log" 2>&1) &
ctl_pid=$!

# --- the VM --------------------------------------------------------------------
log "booting the VM (kernel $kver, TCG)"
boot_start=$(date +%s.%N)
"${qemu_env[@]}" "$qemu" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" \
  -machine pc -accel tcg -cpu max -m 1024 -smp 1 -nographic -no-reboot -vga none \
  -kernel "$kernel" -initrd "$work/initramfs.gz" \
  -append "console=ttyS0 panic=-1 quiet" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= \
  </dev/null >"$console" 2>&1 &
qemu_pid=$!

wait_console() { # pattern what
  while ! grep -q "$1" "$console"; do
    grep -q "VMTEST FAIL" "$console" && die "guest: $(sed -n '/VMTEST FAIL/,$p' "$console")"
    alive "$qemu_pid" || die "the VM stopped before '$2': $(tail -20 "$console")"
    check_time "$2"
    sleep 0.2
  done
}
wrote() { grep -c "VMTEST wrote" "$console" || true; }
wait_progress() { # after: wait for 3 more writes than that
  local target=$(($1 + 3))
  while [ "$(wrote)" -lt $target ]; do
    grep -q "VMTEST FAIL" "$console" && die "guest: $(sed -n '/VMTEST FAIL/,$p' "$console")"
    alive "$qemu_pid" || die "the VM stopped: $(tail -20 "$console")"
    check_time "$2"
    sleep 0.2
  done
}

wait_console "VMTEST init" "boot"
boot_seconds=$($python -c "print(round($(date +%s.%N) - $boot_start, 1))")
log "guest /init after ${boot_seconds}s"
wait_console "VMTEST attached" "attach"
log "guest: $(grep 'VMTEST attached' "$console")"
wait_console "VMTEST writing" "mkfs and mount"
wait_progress 0 "first writes"

# The partition being written: the volume's primary partition whose write
# counter grows fastest right now.
busiest() {
  $python - "$data/rack.toml" "$volume_id" <<'PY'
import json, sys, time, tomllib, urllib.request
rack = tomllib.load(open(sys.argv[1], "rb"))
volume = int(sys.argv[2])
def sample():
    out = {}
    for node in rack["head_node"]:
        try:
            with urllib.request.urlopen(f"http://{node['admin']}/partitions", timeout=2) as r:
                body = json.load(r)
        except Exception:
            continue
        for p in body.get("partitions", []):
            if p.get("volume") == volume and p.get("role") == "primary":
                out[p["partition"]] = (node["id"], p.get("writes", 0))
    return out
a = sample(); time.sleep(2); b = sample()
best = max(b, key=lambda k: b[k][1] - a.get(k, (None, 0))[1])
print(best, b[best][0], b[best][1] - a.get(best, (None, 0))[1])
PY
}
kill_node() { # head-node id
  local pid
  pid=$(cat "$data/run/$1.pid")
  kill -KILL "$pid"
  log "kill -9 $1 (pid $pid)"
}

read -r partition victim delta < <(busiest) || die "cannot tell which partition is being written"
log "partition $partition of vol0 is being written ($delta writes in 2 s); its primary is $victim"
before=$(wrote)
kill_node "$victim"
kill1=$(date +%s.%N)
wait_progress "$before" "writes after the primary's kill"
log "writes go on after the kill of $victim ($(wrote) files)"

# Bring it back (as `up` started it), so the unit keeps a Raft majority.
"$bin" head-node --config "$data/config/$victim.toml" >>"$data/run/$victim.log" 2>&1 &
restarted+=($!)
echo $! >"$data/run/$victim.pid"
admin=$($python -c "import tomllib,sys; r=tomllib.load(open('$data/rack.toml','rb')); print([h['admin'] for h in r['head_node'] if h['id']=='$victim'][0])")
for _ in $(seq 1 600); do
  [ "$($python -c "import urllib.request; print(urllib.request.urlopen('http://$admin/health', timeout=2).status)" 2>/dev/null)" = 200 ] && break
  check_time "restart of $victim"
  sleep 0.2
done
log "$victim is back"
sleep 3

leader=$(rb --output json head-node list | $python -c 'import json,sys; print(json.load(sys.stdin)["leader"])')
[ -n "$leader" ] && [ "$leader" != None ] || die "no Raft leader after the restart"
before=$(wrote)
kill_node "$leader"
wait_progress "$before" "writes after the leader's kill"
log "writes go on after the kill of the Raft leader $leader ($(wrote) files)"
echo stop >"$work/ctl/phase"

wait_console "VMTEST END" "the guest's checks"
for _ in $(seq 1 100); do alive "$qemu_pid" || break; sleep 0.1; done
total=$(($(date +%s) - started))
echo "--- guest"
grep -E "VMTEST (init|network|attached|writing|stall|agent-pause|agent-stop-restart|agent-restart|auto-device|PASS|FAIL)" "$console" | tr -d '\r'
if grep -q "VMTEST PASS" "$console"; then
  # The guest's agents leave an operator's attachment alone: revoking it
  # is the operator's part.
  rb attachment revoke "$volume_id" "$attachment_id" 2>>"$work/up.log" ||
    die "attachment revoke failed: $(tail -3 "$work/up.log")"
  stall=$(sed -n 's/.*VMTEST stall \([0-9]*\)ms.*/\1/p' "$console")
  pause=$(sed -n 's/.*VMTEST agent-pause \([0-9?]*\)ms.*/\1/p' "$console")
  echo "PASS vm-test: boot to /init ${boot_seconds}s, longest guest write stall ${stall} ms (the agent's longest failover pause ${pause} ms) across the kills of $victim (primary of partition $partition) and $leader (Raft leader), total ${total}s"
  exit 0
fi
sed -n '/VMTEST FAIL/,$p' "$console"
echo "FAIL vm-test (total ${total}s)"
exit 1
