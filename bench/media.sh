#!/usr/bin/env bash
# Factory flashing: the bmap of the disk bench/run.sh builds (edge-v2, 8 GiB) — mapped bytes vs
# image size — and `bmaptool copy` vs `dd` of the same image to a file standing in for a device,
# side by side. Rewrites the `media` section of docs/benchmarks.md.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
w="${BENCH_DIR:-/tmp/slotforge-bench}"
[ -f "$w/system.yml" ] || bash "$repo/bench/run.sh" >/dev/null
cd "$repo" && cargo build --release --quiet
export SOURCE_DATE_EPOCH=1704067200
"$repo/target/release/slotforge" build "$w/system.yml" --layout "$repo/layouts/edge-v2.yaml" -o "$w/media.img" --bmap -q >/dev/null
size=$(stat -c %s "$w/media.img")
mapped=$(grep -o '<MappedBlocksCount> [0-9]*' "$w/media.img.bmap" | awk '{print $2 * 4096}')
t() { /usr/bin/time -f "%e %M" -o "$w/t" "$@" >/dev/null 2>&1; cat "$w/t"; }
rm -f "$w/dev-bmap" "$w/dev-dd"; : > "$w/dev-bmap"
sync; bm=$(t bmaptool copy --bmap "$w/media.img.bmap" "$w/media.img" "$w/dev-bmap")
sync; dd=$(t dd if="$w/media.img" of="$w/dev-dd" bs=4M conv=fsync status=none)
same=$(cmp -s "$w/dev-bmap" "$w/media.img" && echo yes || echo no)
python3 "$repo/bench/section.py" media <<MD
## Factory flashing: bmap

Run on $(date -u +%Y-%m-%d). The edge-v2 disk of the build benchmark: image $size bytes, of which the
bmap maps $mapped bytes ($(python3 -c "print(f'{$mapped/$size*100:.2f}')") %). Copied to a file standing in for the
device (the same disk), each with /usr/bin/time:

| | wall time (s) | peak RSS (MiB) | checks data |
|---|---|---|---|
| \`bmaptool copy\` (mapped ranges, sha256 each) | $(echo $bm | awk '{printf "%s | %.0f", $1, $2/1024}') | yes |
| \`dd bs=4M conv=fsync\` (every byte) | $(echo $dd | awk '{printf "%s | %.0f", $1, $2/1024}') | no |

The bmaptool copy is byte-identical to the image: $same.
MD
echo "updated docs/benchmarks.md (section media)"
