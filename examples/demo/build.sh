#!/usr/bin/env bash
# Build the shipped example disk image on a fresh Debian machine:
#   installs the packages it needs, makes the reference kernel and appliance images and two
#   service images (OCI layouts, with umoci), builds examples/demo/system.yml onto
#   layouts/demo.yaml with slotforge (the host's systemd-boot as loader), and verifies the
#   result. Output: out/demo.img (and out/demo.json, the summary). Boot it: examples/demo/boot.sh
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

# Kernel (Debian's, with the reference initramfs) and the appliance base (busybox, the agent,
# runc, the reference init): the same reference images the QEMU tests boot.
cargo build --release --quiet -p slotforge-qemu-tests --bin slotforge-vm
"$repo/target/release/slotforge-vm" images "$work/images" --agent "$sf"

# Two services: one on disk, one external (kept out of the rootfs, pre-filled in the images partition).
rm -rf "$work/hello-src" && mkdir -p "$work/hello-src/bin" && cp /bin/busybox "$work/hello-src/bin/busybox"
mkimage "$work/images/hello" 1 "$work/hello-src" /bin/busybox
rm -rf "$work/big-src" && mkdir -p "$work/big-src/opt/big" && cp /bin/busybox "$work/big-src/opt/big/busybox"
# Deterministic incompressible bytes (AES-CTR of zeros), so the same inputs give the same disk.
(openssl enc -aes-128-ctr -K 00000000000000000000000000000000 -iv 00000000000000000000000000000000 -nosalt < /dev/zero 2>/dev/null || true) | head -c 8000000 > "$work/big-src/opt/big/model.bin"
mkimage "$work/images/bigsvc" 1 "$work/big-src" /opt/big/busybox

cp "$here/system.yml" "$work/system.yml"
"$sf" build "$work/system.yml" --layout "$repo/layouts/demo.yaml" -o "$out/demo.img" --json > "$out/demo.json"
"$sf" verify "$out/demo.img"
"$sf" inspect "$out/demo.img"
echo "demo image: $out/demo.img"
