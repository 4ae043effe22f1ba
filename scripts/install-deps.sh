#!/usr/bin/env bash
# Installs what rackblock's tests, benchmarks and `rackblock up` use beyond the
# Rust toolchain: NBD clients and fio (Debian packages). Idempotent; skips what
# is already there. Needs root (or sudo) for apt-get.
# Never installs qemu-system-*: on these machines it would replace qemu-utils.
set -euo pipefail

need=()
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
command -v fio >/dev/null 2>&1 || need+=(fio)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
/usr/bin/python3 -c "import nbd" >/dev/null 2>&1 || need+=(python3-libnbd)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v curl >/dev/null 2>&1 || need+=(curl)

if [ ${#need[@]} -eq 0 ]; then
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
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
