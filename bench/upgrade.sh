#!/usr/bin/env bash
# Upgrade numbers: runs the QEMU upgrade scenarios (tests/qemu_upgrade.rs), which append their
# measurements to a report: time per scenario, image bytes written per upgrade vs the new
# image content, and what two builds' image sets occupy vs their unique blobs. Rewrites the
# `upgrade` section of docs/benchmarks.md.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/.ci/deps.sh"
cd "$repo"
r=$(mktemp)
SLOTFORGE_UPGRADE_REPORT=$r cargo test --release --test qemu_upgrade -- --test-threads=1 >/dev/null 2>&1
python3 - "$r" <<'PY' | python3 "$repo/bench/section.py" upgrade
import json, sys, datetime, os
rows = [json.loads(l) for l in open(sys.argv[1])]
print("## Upgrades under QEMU\n")
print(f"Run on {datetime.date.today()}, {os.cpu_count()} cores, TCG. Each scenario builds its disk and bundles and boots")
print("as often as it needs (see tests/qemu_upgrade.rs); fixtures are built once per run.\n")
print("| scenario | seconds |\n|---|---|")
for r in rows:
    if "seconds" in r:
        print(f"| {r['test'].replace('_', ' ')} | {r['seconds']:.0f} |")
for r in rows:
    if "image_bytes_written" in r:
        w, n = r["image_bytes_written"], r["new_image_content"]
        print(f"\nlarge → large′ (one external image changed): {w} image bytes written for {n} bytes of new image content: **{w/n:.4f}×** (goal ≤ 1.05×); the rootfs slot write is {r['rootfs_bytes_written']} bytes (the whole squashfs, by design).")
    if "unique_blob_bytes" in r:
        u, a, s = r["unique_blob_bytes"], r["allocated_blob_bytes"], r["sum_of_sets_bytes"]
        print(f"\nImages partition holding {r['builds']} builds (small and large): unique blobs {u} bytes, occupying {a} bytes in 4 KiB blocks: **{a/u:.4f}×** (goal ≤ 1.01×); the sets counted separately would be {s} bytes.")
PY
rm -f "$r"
echo "updated docs/benchmarks.md (section upgrade)"
