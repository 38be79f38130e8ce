#!/usr/bin/env bash
# Benchmark: what the chain of trust costs, side by side with the standard tools and with the
# previous way (no verity, unsigned), in one run. Rewrites the `trust` section of docs/benchmarks.md.
# - build: the same manifest with `verity: false` (before) and with verity (now): wall time, the
#   tree-writer phase, slot bytes and the tree's share; `veritysetup format` on the same squashfs.
# - signatures: `slotforge key verify` vs `minisign -V` on the same bundle config (20 runs each).
# - boot: the fresh-disk QEMU scenario with and without verity (kernel clock at agent start).
# Wall time and peak RSS from /usr/bin/time.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/.ci/deps.sh"
. "$repo/bench/lib.sh"
bench_setup /tmp/slotforge-bench-verity
# The build benchmark's inputs: a base of many small files (Python's stdlib and GCC's libs), a
# 40 MB on-disk service, a 6 MB kernel stand-in.
mkdir -p "$w/src/base/usr/lib" "$w/src/svc/opt" "$w/src/kernel"
cp -a /usr/lib/python3.11 /usr/lib/gcc "$w/src/base/usr/lib/"
head -c 40000000 /dev/urandom > "$w/src/svc/opt/blob"
head -c 6000000 /dev/urandom > "$w/src/kernel/kernel"
for i in base svc kernel; do mkimage "$w/img-$i" 1 "$w/src/$i"; done
printf 'MZ loader stand-in' > "$w/loader.efi"
manifest() { # VERITY
  cat <<YML
version: 1.0.0
kernel: {image: oci:img-kernel:1, cmdline: console=ttyS0}
init: [oci:img-base:1]
services:
  - {name: svc, image: oci:img-svc:1}
boot: {loader: file:loader.efi}
verity: $1
YML
}
manifest false > "$w/plain.yml"; manifest true > "$w/verity.yml"
"$sf" pull "$w/plain.yml" -q --cache "$w/cache" >/dev/null
for v in plain verity; do
  /usr/bin/time -f "%e %M" -o "$w/$v.time" "$sf" build "$w/$v.yml" --layout layouts/edge-v2.yaml -o "$w/$v.img" --cache "$w/cache" --json > "$w/$v.json" 2>/dev/null
done
# veritysetup format over the same squashfs (data blocks only), hash into its own file.
python3 - "$w" <<'PY'
import json, sys
w = sys.argv[1]
v = json.load(open(f"{w}/verity.json"))["verity"]
open(f"{w}/params", "w").write(f"{v['hash_offset']} {v['data_blocks']} {v['salt']} {v['uuid']} {v['root_hash']}\n")
PY
read -r off blocks salt uuid root < "$w/params"
"$sf" inspect "$w/verity.img" --json > "$w/inspect.json"
pstart=$(python3 -c "import json;print([p['start'] for p in json.load(open('$w/inspect.json'))['gpt']['partitions'] if p['name']=='rootfs_a'][0])")
dd if="$w/verity.img" of="$w/data.img" bs=4096 skip=$((pstart/4096)) count="$blocks" status=none
/usr/bin/time -f "%e %M" -o "$w/vs.time" veritysetup format "$w/data.img" "$w/hash.img" --salt="$salt" --uuid="$uuid" --data-blocks="$blocks" > "$w/vs.out"
vs_root=$(sed -n 's/^Root hash:[[:space:]]*//p' "$w/vs.out")

# Signatures.
"$sf" key generate bench -o "$w/keys" >/dev/null
sed -i '$a update-keys: [keys/bench.pub]' "$w/verity.yml"
/usr/bin/time -f "%e %M" -o "$w/bundle.time" "$sf" bundle "$w/verity.yml" --layout layouts/edge-v2.yaml -o "$w/update" --sign "$w/keys/bench.key" --cache "$w/cache" -q 2>/dev/null
cfg=$(python3 - "$w/update" <<'PY'
import json, sys
d = sys.argv[1]
idx = json.load(open(f"{d}/index.json"))
m = json.load(open(f"{d}/blobs/sha256/" + idx["manifests"][0]["digest"].split(":")[1]))
print(f"{d}/blobs/sha256/" + m["config"]["digest"].split(":")[1])
s = [x for x in idx["manifests"] if x.get("artifactType") == "application/vnd.slotforge.bundle.signature.v1"][0]
sm = json.load(open(f"{d}/blobs/sha256/" + s["digest"].split(":")[1]))
print(f"{d}/blobs/sha256/" + sm["layers"][0]["digest"].split(":")[1])
PY
)
cfg_blob=$(echo "$cfg" | sed -n 1p); sig_blob=$(echo "$cfg" | sed -n 2p)
t0=$(date +%s.%N); for i in $(seq 20); do "$sf" key verify "$w/update" --key "$w/keys/bench.pub" >/dev/null; done; t1=$(date +%s.%N)
for i in $(seq 20); do minisign -Vq -p "$w/keys/bench.pub" -m "$cfg_blob" -x "$sig_blob" >/dev/null; done; t2=$(date +%s.%N)

# Boot: the fresh-disk scenario with and without verity.
r1=$(mktemp); r0=$(mktemp)
SLOTFORGE_BOOT_REPORT=$r1 cargo test --release --test qemu -- --test-threads=1 fresh_disk >/dev/null 2>&1 || true
SLOTFORGE_BOOT_REPORT=$r0 SLOTFORGE_QEMU_VERITY=false cargo test --release --test qemu -- --test-threads=1 fresh_disk >/dev/null 2>&1 || true

python3 - "$w" "$t0" "$t1" "$t2" "$vs_root" "$root" "$r1" "$r0" <<'PY' | python3 "$repo/bench/section.py" trust
import json, sys, datetime, os
w, t0, t1, t2, vs_root, root, r1, r0 = sys.argv[1:]
t0, t1, t2 = float(t0), float(t1), float(t2)
p = json.load(open(f"{w}/plain.json")); v = json.load(open(f"{w}/verity.json"))
tm = lambda f: [float(x) for x in open(f"{w}/{f}").read().split()]
pt, vt, st, bt = tm("plain.time"), tm("verity.time"), tm("vs.time"), tm("bundle.time")
ph = dict(v["phases"])
tree = v["verity"]["tree_bytes"]
print("## Chain of trust: dm-verity, signatures\n")
print(f"Run on {datetime.date.today()}, {os.cpu_count()} cores. Inputs as in the build benchmark: a base of")
print("Python 3.11's stdlib and GCC's libraries, a 40 MB on-disk service; layout `edge-v2`. `bash bench/verity.sh`.\n")
print("| | before (`verity: false`) | now (verity) | `veritysetup format` |")
print("|---|---|---|---|")
print(f"| build wall time (s) | {pt[0]:.2f} | {vt[0]:.2f} | |")
print(f"| peak RSS (MiB) | {pt[1]/1024:.0f} | {vt[1]/1024:.0f} | {st[1]/1024:.0f} |")
print(f"| hash tree of the slot (s) | — | {ph.get('verity', 0):.2f} | {st[0]:.2f} |")
print(f"| slot bytes | {p['rootfs_bytes']} | {v['rootfs_bytes']} | |")
print(f"| tree (superblock + levels) bytes | — | {tree} ({100*tree/v['squashfs_bytes']:.2f} % of the squashfs) | same bytes, root hash {'equal' if vs_root == root else 'DIFFERENT'} |")
print("\nOne run each: build wall times differ by run-to-run noise (about a second here); the tree itself is the")
print("`verity` phase above.")
print(f"\nSignature check of a bundle: `slotforge key verify` {1000*(t1-t0)/20:.1f} ms per run (process start, bundle open,")
print(f"Ed25519 over the config blob) vs `minisign -V` on the same config and signature {1000*(t2-t1)/20:.1f} ms (20 runs each).")
print(f"`slotforge bundle --sign` of this build: {bt[0]:.2f} s in all.\n")
def kernel_agent(f):
    rows = [json.loads(l) for l in open(f)] if os.path.getsize(f) else []
    return rows[0] if rows else None
a, b = kernel_agent(r1), kernel_agent(r0)
if a and b:
    print("Boot under TCG (fresh-disk scenario, OVMF + systemd-boot, Debian 6.1):\n")
    print("| | total (s) | kernel→agent (s) |")
    print("|---|---|---|")
    print(f"| without verity | {b['total_s']:.1f} | {b['kernel_to_agent_s'] or 0:.1f} |")
    print(f"| with verity (veritysetup open in the initramfs, every block hashed on read) | {a['total_s']:.1f} | {a['kernel_to_agent_s'] or 0:.1f} |")
PY
rm -f "$r1" "$r0"
echo "updated docs/benchmarks.md (section trust)"
