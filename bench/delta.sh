#!/usr/bin/env bash
# Delta bundles: what an update costs on the wire and on the device when it carries only the
# rootfs chunks the field lacks, against the full bundle of the same build, in the same run.
# Tree: the build bench's (Python 3.11 stdlib + GCC libraries) as the base image, a 40 MB
# on-disk service (`svc`: 20 MB of random bytes, 20 MB of C headers), a 64 MB external image (`ext`,
# sealed), layout edge-v2. Three changes from v1: (a) one file of the on-disk service, (b) the
# whole on-disk service replaced, (c) the external image bumped (one file). For each: the full
# bundle and a delta bundle `--delta-from` v1's bundle; their bytes; the compressed size of what
# changed (zstd -3 of the changed files); chunks reused; offline `slotforge upgrade` of a copy
# of v1's disk with each (wall, peak RSS). Rewrites the `delta` section of docs/benchmarks.md.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/.ci/deps.sh" >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get install -y -q time >/dev/null; }
command -v zstd >/dev/null || { apt-get install -y -q zstd >/dev/null; }
. "$repo/bench/lib.sh"
if [ "${DELTA_REPORT_ONLY:-}" = 1 ]; then
  # Re-render the section from the last run's files (its rows, applies and checks), measuring nothing.
  w="${BENCH_DIR:-/tmp/slotforge-delta}"
else
bench_setup /tmp/slotforge-delta
rows="$w/rows"; : > "$rows"; rm -f "$w"/apply-*
mkdir -p "$w/src/base/usr/lib" "$w/src/svc/opt" "$w/src/ext/opt" "$w/src/kernel"
cp -a /usr/lib/python3.11 /usr/lib/gcc "$w/src/base/usr/lib/"
prng 1 20000000 > "$w/src/svc/opt/blob"
{ find /usr/include -type f -name '*.h' -print0 | sort -z | xargs -0 cat 2>/dev/null | head -c 20000000 > "$w/src/svc/opt/text"; } || true
echo 1 > "$w/src/svc/opt/conf"
prng 2 64000000 > "$w/src/ext/opt/model"; echo 1 > "$w/src/ext/opt/conf"
prng 3 6000000 > "$w/src/kernel/kernel"
for i in base svc ext kernel; do mkimage "$w/img-$i" 1 "$w/src/$i"; done
# (a) one file of svc (a config line); (b) svc replaced; (c) ext bumped (one file).
echo 2 > "$w/src/svc/opt/conf"; mkimage "$w/img-svc" 2 "$w/src/svc"
zstd -3 -q -c "$w/src/svc/opt/conf" | wc -c > "$w/change-a"
rm -rf "$w/src/svc3"; mkdir -p "$w/src/svc3/opt"
prng 4 20000000 > "$w/src/svc3/opt/blob"; LC_ALL=C sort "$w/src/svc/opt/text" > "$w/src/svc3/opt/text"; echo 3 > "$w/src/svc3/opt/conf"
mkimage "$w/img-svc" 3 "$w/src/svc3"
cat "$w/src/svc3/opt/blob" "$w/src/svc3/opt/text" "$w/src/svc3/opt/conf" | zstd -3 -q -c | wc -c > "$w/change-b"
echo 2 > "$w/src/ext/opt/conf"; mkimage "$w/img-ext" 2 "$w/src/ext"
zstd -3 -q -c "$w/src/ext/opt/conf" | wc -c > "$w/change-c"
printf 'MZ loader stand-in' > "$w/loader.efi"
yml() { # VERSION SVC EXT
  printf 'version: %s\nkernel: {image: oci:img-kernel:1, cmdline: console=ttyS0}\ninit: [oci:img-base:1]\nservices:\n  - {name: svc, image: oci:img-svc:%s}\n  - {name: ext, image: oci:img-ext:%s, ondisk: false}\nboot: {loader: file:loader.efi}\n' "$1" "$2" "$3"
}
yml 1.0.0 1 1 > "$w/v1.yml"; yml 1.0.1 2 1 > "$w/a.yml"; yml 1.1.0 3 1 > "$w/b.yml"; yml 1.0.1 1 2 > "$w/c.yml"
L="$repo/layouts/edge-v2.yaml"
# The example (examples/demo, its images as build.sh made them): the same three changes.
[ -d "$repo/out/demo-work/images/base" ] || bash "$repo/examples/demo/build.sh" >/dev/null
cp -a "$repo/out/demo-work/images" "$w/eximg"
addfile() { # LAYOUT FROM TO PATH CONTENT: image TO = image FROM with one file written
  rm -rf "$w/bundle"; umoci unpack --rootless --image "$1:$2" "$w/bundle" >/dev/null
  mkdir -p "$(dirname "$w/bundle/rootfs/$4")"; printf '%s' "$5" > "$w/bundle/rootfs/$4"; touch -d "$BENCH_TIME" "$w/bundle/rootfs/$4"
  umoci repack --history.created "$BENCH_TIME" --image "$1:$3" "$w/bundle"; rm -rf "$w/bundle"
}
addfile "$w/eximg/hello" 1 2 etc/motd "release 2"; printf 'release 2' | zstd -3 -q -c | wc -c > "$w/change-ea"
mkdir -p "$w/src/hello3/opt"; prng 5 3000000 > "$w/src/hello3/opt/blob"; mkimage "$w/eximg/hello" 3 "$w/src/hello3"
zstd -3 -q -c "$w/src/hello3/opt/blob" | wc -c > "$w/change-eb"
addfile "$w/eximg/bigsvc" 1 2 opt/big/conf "2"; printf '2' | zstd -3 -q -c | wc -c > "$w/change-ec"
exyml() { # VERSION HELLO BIGSVC
  sed -e "s|^version: .*|version: $1|" -e "s|oci:images/hello:1|oci:eximg/hello:$2|" -e "s|oci:images/bigsvc:1|oci:eximg/bigsvc:$3|" -e "s|oci:images/|oci:eximg/|" "$repo/examples/demo/system.yml"
}
exyml 0.1.0 1 1 > "$w/ex-v1.yml"; exyml 0.1.1 2 1 > "$w/ea.yml"; exyml 0.2.0 3 1 > "$w/eb.yml"; exyml 0.1.1 1 2 > "$w/ec.yml"
EL="$repo/layouts/demo.yaml"
cd "$w"
"$sf" build v1.yml --layout "$L" -o v1.img -q --cache cache 2>/dev/null
"$sf" bundle v1.yml --layout "$L" -o v1.tar --json --cache cache > v1.json 2>/dev/null
"$sf" build ex-v1.yml --layout "$EL" -o ex-v1.img -q --cache cache 2>/dev/null
"$sf" bundle ex-v1.yml --layout "$EL" -o ex-v1.tar --json --cache cache > ex-v1.json 2>/dev/null
apply() { # DISK BUNDLE -> "wall rss"
  cp --sparse=always "$1" "$w/t.img"
  # faketime: the apply stamps FAT times from the clock; fixed, both disks can be compared whole.
  /usr/bin/time -f "%e %M" -o "$w/m" faketime -f '2026-01-01 00:00:00' "$sf" upgrade "$w/t.img" "$2" --json > "$w/r.json" 2>"$w/err" || { cat "$w/err"; exit 1; }
  sha256sum "$w/t.img" | cut -d' ' -f1 > "$w/sha-$(basename "$2")"
  rm -f "$w/t.img"
  cat "$w/m"
}
for c in a b c ea eb ec; do
  case $c in e*) base=ex-v1; lay="$EL" ;; *) base=v1; lay="$L" ;; esac
  "$sf" bundle $c.yml --layout "$lay" -o full-$c.tar --json --cache cache > full-$c.json 2>/dev/null
  "$sf" bundle $c.yml --layout "$lay" -o delta-$c.tar --json --cache cache --delta-from $base.tar > delta-$c.json 2>/dev/null
  # Three applies of each, alternating (the page cache warm for both); the median is reported.
  for i in 1 2 3; do
    apply $base.img full-$c.tar >> "$w/apply-full-$c"
    apply $base.img delta-$c.tar >> "$w/apply-delta-$c"; cp r.json applied-$c.json
  done
  # The slot the delta assembled must be the full bundle's: compare the applied disks' slot b.
  python3 - "$w" "$c" <<'PY' >> "$rows"
import json, sys
w, c = sys.argv[1], sys.argv[2]
f, d, r = (json.load(open(f"{w}/{n}")) for n in (f"full-{c}.json", f"delta-{c}.json", f"applied-{c}.json"))
print("|".join(str(x) for x in [c, f["bundle_bytes"], d["bundle_bytes"], open(f"{w}/change-{c}").read().strip(), f["rootfs_bytes"],
      d["delta"]["chunks"], d["delta"]["chunks_shipped"], d["delta"]["chunk_bytes_shipped"], ",".join(d["delta"]["images_left_out"]) or "-",
      r["delta"]["from_seeds"], r["delta"]["from_store"]]))
PY
done
fi
python3 - "$w" <<'PY' | python3 "$repo/bench/section.py" delta
import json, sys, os, datetime, tarfile
w = sys.argv[1]
rows = [l.strip().split("|") for l in open(f"{w}/rows")]
cpu = open("/proc/cpuinfo").read().split("model name")[1].split(":")[1].split("\n")[0].strip()
what = {"a": "bench (a) one file of the on-disk service", "b": "bench (b) the on-disk service replaced", "c": "bench (c) the external image bumped",
        "ea": "example (a) one file added to `hello`", "eb": "example (b) `hello` replaced (3 MB)", "ec": "example (c) `bigsvc` bumped (one file added)"}
print("## Delta bundles: what an update carries\n")
print(f"Run on {datetime.date.today()}, {os.cpu_count()} cores, {cpu}: `bash bench/delta.sh`. Base image: the build bench's")
print("tree (Python 3.11 stdlib + GCC libraries); a 40 MB on-disk service (20 MB random, 20 MB text; random bytes from a")
print("seeded generator; every time in the images fixed, so the bench tree's inputs are the same in every run on one")
print("machine — the example's images are build.sh's, made once); a 64 MB")
print("external image (sealed); layout `edge-v2`. The example: examples/demo's images (build.sh), layout `demo`, the same")
print("three changes to its on-disk service `hello` and its sealed external `bigsvc`. Each change's full bundle and its delta `--delta-from` v1's")
print("bundle, same run; *change, compressed*: zstd -3 of the changed files; *apply*: offline `slotforge upgrade` of")
print("a copy of v1's disk under a fixed clock (FAT times), three times each, alternating: the median wall time and the")
print("largest peak RSS; the disk's bytes after the full and after the delta apply are compared whole (*same disk*).\n")
print("| change | full bundle | delta bundle | delta ÷ full | change, compressed | goal: 1.5 × change + 1 % of rootfs | rootfs chunks shipped / all | chunk bytes shipped | sealed image: chunks shipped / all (bytes) | images left out | index ÷ rootfs | apply full s (RSS MiB) | apply delta s (RSS MiB) | same disk |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    c, full, delta, change, rootfs, chunks, shipped, sbytes, left, seeds, store = r
    full, delta, change, rootfs = int(full), int(delta), int(change), int(rootfs)
    goal = 1.5 * change + 0.01 * rootfs
    def median(f):
        runs = sorted((float(a), int(b)) for a, b in (l.split() for l in open(f) if l.strip()))
        return runs[len(runs) // 2][0], max(r[1] for r in runs)
    fa, da = median(f"{w}/apply-full-{c}"), median(f"{w}/apply-delta-{c}")
    same = "yes" if open(f"{w}/sha-full-{c}.tar").read() == open(f"{w}/sha-delta-{c}.tar").read() else "NO"
    with tarfile.open(f"{w}/delta-{c}.tar") as t:
        cfgs = [m for m in t.getmembers() if m.isfile() and m.name.startswith("blobs/")]
        # casync's index: 64 bytes of header, 40 per chunk, 40 of tail; the blob of that size.
        idx_bytes = next((m.size for m in cfgs if m.size == 104 + 40 * int(chunks)), 0)
    mib = lambda b: f"{b/1048576:.2f} MiB"
    sealed = json.load(open(f"{w}/delta-{c}.json"))["delta"].get("sealed", [])
    sl = "; ".join(f"{x['name']}: {x['chunks_shipped']} / {x['chunks']} ({mib(x['chunk_bytes_shipped'])})" for x in sealed) or "-"
    print(f"| {what[c]} | {mib(full)} | {mib(delta)} | {delta/full:.3f} | {mib(change)} | {mib(goal)} ({'met' if delta <= goal else 'not met'}) | {shipped} / {chunks} | {mib(int(sbytes))} | {sl} | {left} | {idx_bytes/rootfs*100:.3f} % | {fa[0]:.2f} ({fa[1]/1024:.0f}) | {da[0]:.2f} ({da[1]/1024:.0f}) | {same} |")
print()
print("The delta leaves out the rootfs chunks v1's bundle holds, every external image v1 holds unchanged and v1's")
print("kernel; a bumped sealed image travels as the chunks v1's sealed image of the same service lacks, and for v1 it")
print("says where v1's rootfs holds each chunk (seed offsets, ~1 byte a chunk compressed). The device recognises its")
print("running slot as v1 (length and stored dm-verity root), copies those chunks from it straight into the inactive")
print("slot with the store's (every chunk checked once against its id in the signed index, the store's before anything is")
print("written; the whole not hashed again), then makes")
print("the slot's dm-verity hash area from what it wrote (that read is the read-back; it must give the signed root hash):")
print("the indexes cover the images' data, so no tree block travels; the sealed image is assembled from its predecessor")
print("and its hash area made the same way (tests/delta.rs). A full apply reads the bundle's rootfs three times (digest,")
print("tree, copy) and the slot once (read-back). The squashfs writer keeps a change local to its chunks (the superblock")
print("a chunk of its own, a casync cut mark before each file's data, fragment block and the tables, the build's")
print("generated files last; docs/formats.md#rootfs-squashfs). The goal's *change, compressed* counts the changed files")
print("only; every delta also carries the new rootfs's index (40 bytes a chunk, *index ÷ rootfs*), and row (c)'s the")
print("sealed image's index and metadata.")
PY
echo "updated docs/benchmarks.md (section delta)"
