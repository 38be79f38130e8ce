#!/usr/bin/env bash
# Sealed external images vs the previous way (unsealed: every blob re-hashed, the image unpacked
# into tmpfs), in the same run, under QEMU: the fresh-disk scenario of tests/qemu.rs with a 65 MB
# and a 500 MB external image, each sealed and unsealed. Reports the agent's time from the first
# image check to all images ready, the work per image, tmpfs bytes under /run and all tmpfs
# (Shmem) after `agent boot`, and the bytes in the images partition. VMs get 2 GiB so the
# unsealed 500 MB image fits in tmpfs at all. Rewrites the `sealed-boot` section of docs/benchmarks.md.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/.ci/deps.sh"
cd "$repo"
w=$(mktemp -d)
cat > "$w/layout.yaml" <<'L'
# The demo layout with room for a 500 MB external image (twice: layers or sealed).
name: bench-sealed
generation: 1
disk: {size: 2GiB}
partitions:
  - {name: esp,      role: esp,      size: 48MiB}
  - {name: rootfs_a, role: rootfs,   slot: a, size: 48MiB, fs_cap: 40MiB}
  - {name: rootfs_b, role: rootfs,   slot: b, size: 48MiB, fs_cap: 40MiB}
  - {name: images,   role: external-images, size: 1400MiB}
  - {name: persist,  role: data,     size: rest}
L
report="$w/report.jsonl"
cargo build --release --workspace --tests >/dev/null 2>&1
for size in 65000000 500000000; do
  for sealed in true false; do
    SLOTFORGE_BOOT_REPORT=$report SLOTFORGE_QEMU_PAYLOAD=$size SLOTFORGE_QEMU_SEALED=$sealed SLOTFORGE_QEMU_LAYOUT="$w/layout.yaml" \
      SLOTFORGE_QEMU_MEMORY=2048 SLOTFORGE_QEMU_TIMEOUT=900 \
      cargo test --release --test qemu -- --test-threads=1 fresh_disk >"$w/log-$size-$sealed" 2>&1 || { tail -30 "$w/log-$size-$sealed"; exit 1; }
  done
done
python3 - "$report" <<'PY' | python3 "$repo/bench/section.py" sealed-boot
import json, sys, datetime, os
rows = [json.loads(l) for l in open(sys.argv[1])]
print("## Sealed external images at boot: sealed vs unpacked\n")
print(f"Run on {datetime.date.today()}, {os.cpu_count()} cores, accelerator **{rows[0]['accel']}**, 2 GiB guest, `bash bench/sealed-boot.sh`:")
print("the fresh-disk scenario of tests/qemu.rs, one external image of incompressible data (busybox + payload),")
print("built once sealed (the default) and once with `sealed: false` (the previous way: every blob re-hashed at boot,")
print("the image unpacked into tmpfs under /run). `images ready` is the agent's own clock from the first image check")
print("to the last image ready (check + dm-verity open + mount, or check + unpack); `check` the hashing part of it.")
print("`/run tmpfs` is `du -skx /run` after `agent boot` (image contents copied to RAM), `Shmem` all tmpfs in use.")
print("`partition` is the bytes of blobs in the images partition (`slotforge inspect`).\n")
print("| image | stored | images ready (s) | check (s) | /run tmpfs (MB) | Shmem (MB) | partition (MB) | boot total (s) |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    m = r.get("memory") or {}
    kind = "sealed" if r["sealed"] else "unsealed (unpacked)"
    print(f"| {r['payload']/1e6:.0f} MB | {kind} | {r['images_ready_s'] or 0:.2f} | {r['check_s']:.2f} | {m.get('run_kb', 0)/1024:.1f} | {m.get('shmem_kb', 0)/1024:.1f} | {(r['images_partition_bytes'] or 0)/1e6:.1f} | {r['total_s']:.0f} |")
s = {r["payload"]: r for r in rows if r["sealed"]}
u = {r["payload"]: r for r in rows if not r["sealed"]}
if len(s) == 2 and len(u) == 2:
    a, b = sorted(s)
    print(f"\nSealed: {s[a]['images_ready_s']:.2f} s for {a/1e6:.0f} MB and {s[b]['images_ready_s']:.2f} s for {b/1e6:.0f} MB "
          f"(unsealed: {u[a]['images_ready_s']:.1f} s and {u[b]['images_ready_s']:.1f} s). "
          "The sealed time does not grow with the image: the check hashes the manifest, config and artifact manifest and stats the "
          "sealed file; dm-verity checks blocks as they are read. The rest of the sealed time is the dm-verity open — a loop "
          "device and a verity table by ioctl (docs/agent.md#opening-a-sealed-image), no process started — and the mount, the "
          "same for any size. Goal: under 0.1 s per image: "
          + ", ".join(f"{p/1e6:.0f} MB {'met' if s[p]['images_ready_s'] < 0.1 else 'not met'}" for p in (a, b))
          + " (under TCG; not measured natively: this build host's kernel has no device-mapper). The unsealed way costs RAM "
          "equal to the unpacked image for as long as the device runs.")
PY
rm -rf "$w"
echo "updated docs/benchmarks.md (section sealed-boot)"
