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
  docker-registry apache2-utils                              # a real registry (+ htpasswd) for the tests
  time                                                       # /usr/bin/time for the benchmarks
  systemd-boot-efi busybox-static                            # the shipped example and QEMU guests
  qemu-system-x86 ovmf netcat-openbsd cpio                   # QEMU boots (guestfwd uses nc)
  bmap-tools qemu-utils                                      # factory media: bmaptool, qemu-img
  runc                                                       # LinuxKit containers in the QEMU guests
  casync                                                     # chunk indexes checked byte for byte against casync make
  cryptsetup-bin minisign sbsigntool binutils faketime openssl  # dm-verity, bundle signatures, Secure Boot (UKI via objcopy; faketime: reproducible sbsign)
)
missing_pkgs() {
  missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}
# Two rounds: installing one package can remove another that conflicts with it. Seen here: the
# machine image's qemu-utils from bookworm-backports is removed by Debian 12's qemu-system-x86,
# and the second round installs the matching qemu-utils.
for round in 1 2; do
  missing_pkgs
  [ "${#missing[@]}" -eq 0 ] && break
  [ "$round" = 1 ] && $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
done
missing_pkgs
if [ "${#missing[@]}" -gt 0 ]; then
  echo "deps.sh: still missing after install: ${missing[*]}" >&2
  exit 1
fi
# The package's own service would listen on every interface; the tests start their own
# registries on 127.0.0.1 with their own configs.
if command -v systemctl >/dev/null && systemctl is-active --quiet docker-registry 2>/dev/null; then
  $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi
