#!/usr/bin/env bash
# Build the shipped example disk image on a fresh Debian machine:
#   installs the packages it needs, turns Debian's kernel, busybox-static and systemd-boot into
#   OCI images (with umoci), builds examples/demo/system.yml onto layouts/demo.yaml with
#   slotforge, and verifies the result. Output: out/demo.img (and out/demo.json, the summary).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$repo/out"
work="$out/demo-work"
bash "$repo/.ci/deps.sh"
mkdir -p "$out" "$work"
cd "$repo"
cargo build --release --quiet
sf="$repo/target/release/slotforge"

mkimage() { # mkimage LAYOUT TAG SRC_DIR [ENTRYPOINT]
  local lay="$1" tag="$2" src="$3"
  rm -rf "$lay" "$work/bundle"
  umoci init --layout "$lay"
  umoci new --image "$lay:$tag"
  umoci unpack --rootless --image "$lay:$tag" "$work/bundle" >/dev/null
  cp -a "$src/." "$work/bundle/rootfs/"
  umoci repack --image "$lay:$tag" "$work/bundle"
  [ -z "${4:-}" ] || umoci config --image "$lay:$tag" --config.entrypoint "$4"
  rm -rf "$work/bundle"
}

# Kernel: Debian's, from the linux-image .deb (only vmlinuz; modules come with the QEMU fixtures).
kpkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
if [ ! -f "$work/kernel-src/kernel" ]; then
  (cd "$work" && chmod a+rwx . && apt-get download "$kpkg" >/dev/null)
  rm -rf "$work/deb" && dpkg-deb -x "$work/${kpkg}"_*.deb "$work/deb"
  mkdir -p "$work/kernel-src" && cp "$work"/deb/boot/vmlinuz-* "$work/kernel-src/kernel"
fi
mkimage "$work/images/kernel" 6.1 "$work/kernel-src"

# Base: busybox-static with its applet links.
rm -rf "$work/base-src" && mkdir -p "$work/base-src/bin" "$work/base-src/etc" "$work/base-src/proc" "$work/base-src/sys" "$work/base-src/dev" "$work/base-src/tmp"
cp /bin/busybox "$work/base-src/bin/busybox"
for a in sh ls cat echo mount umount sleep; do ln -sf busybox "$work/base-src/bin/$a"; done
mkimage "$work/images/base" 1 "$work/base-src"

# Two services: one on disk, one external (kept out of the rootfs, pre-filled in the images partition).
rm -rf "$work/hello-src" && mkdir -p "$work/hello-src/bin" && cp /bin/busybox "$work/hello-src/bin/busybox"
mkimage "$work/images/hello" 1 "$work/hello-src" /bin/busybox
rm -rf "$work/big-src" && mkdir -p "$work/big-src/opt/big" && cp /bin/busybox "$work/big-src/opt/big/busybox"
head -c 8000000 /dev/urandom > "$work/big-src/opt/big/model.bin"
mkimage "$work/images/bigsvc" 1 "$work/big-src" /opt/big/busybox

cp "$here/system.yml" "$work/system.yml"
"$sf" build "$work/system.yml" --layout "$repo/layouts/demo.yaml" -o "$out/demo.img" --json > "$out/demo.json"
"$sf" verify "$out/demo.img"
"$sf" inspect "$out/demo.img"
echo "demo image: $out/demo.img"
