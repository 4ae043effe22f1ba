#!/usr/bin/env bash
# Installs what rackblock's tests, benchmarks and `rackblock up` use beyond the
# Rust toolchain: NBD clients and fio, libiscsi's initiator tools and
# conformance suite (iscsi-inq, iscsi-ls, iscsi-test-cu) and tgt, the
# userspace iSCSI target the iSCSI tests compare against (Debian packages). Idempotent; skips what
# is already there. Needs root (or sudo) for apt-get.
# Never installs qemu-system-*: on these machines it would replace qemu-utils.
# The VM test's qemu, kernel and busybox are only downloaded and unpacked
# into a cache (scripts/vm-test.sh --fetch), after the packages below.
set -euo pipefail

fetch_vm() {
  "$(dirname "$0")/vm-test.sh" --fetch
}

need=()
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
command -v fio >/dev/null 2>&1 || need+=(fio)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
/usr/bin/python3 -c "import nbd" >/dev/null 2>&1 || need+=(python3-libnbd)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v iscsi-test-cu >/dev/null 2>&1 || need+=(libiscsi-bin)
command -v tgtd >/dev/null 2>&1 || need+=(tgt)

if [ ${#need[@]} -eq 0 ]; then
  fetch_vm
  exit 0
fi
echo "installing: ${need[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo=sudo; else
    echo "install-deps: not root and no sudo; please install: ${need[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# tgt's package starts tgtd as a service on install; the tests start their
# own. A policy-rc.d that refuses service starts (only if none exists) keeps
# the installation from starting daemons.
policy=/usr/sbin/policy-rc.d
added_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  added_policy=1
fi
installed=0
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || installed=$?
if [ -n "$added_policy" ]; then
  $sudo rm -f "$policy"
fi
[ $installed -ne 0 ] || fetch_vm || installed=$?
exit $installed
