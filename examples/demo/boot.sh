#!/usr/bin/env bash
# Boot the example disk (out/demo.img, from examples/demo/build.sh) under QEMU + OVMF +
# systemd-boot, on a copy so the built image stays as it was. Prints the agent's events as the
# guest runs (one JSON object per line), then a summary: booted slot and build, the external
# image verified, each container's output. The guest powers itself off.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$repo/out"
[ -f "$out/demo.img" ] || { echo "out/demo.img is missing: run examples/demo/build.sh first" >&2; exit 1; }
cd "$repo"
cargo build --release --quiet -p slotforge-qemu-tests --bin slotforge-vm
cp --sparse=always "$out/demo.img" "$out/demo-boot.img"
rm -rf "$out/demo-boot.vm"
"$repo/target/release/slotforge-vm" boot "$out/demo-boot.img" --work "$out/demo-boot.vm"
