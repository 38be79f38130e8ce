#!/usr/bin/env bash
# Debian packages slotforge needs to build (libsquashfs, libclang for bindgen) and the real
# readers and tools its tests run. Idempotent; used by .ci/run and the README's commands.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
PKGS=(
  build-essential pkg-config libsquashfs-dev libclang-dev   # build: squashfs-ng via bindgen
  e2fsprogs                                                  # mke2fs -d, debugfs (runtime)
  squashfs-tools dosfstools mtools gdisk attr skopeo umoci   # real readers in the tests
  systemd-boot-efi busybox-static                            # the shipped example
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
