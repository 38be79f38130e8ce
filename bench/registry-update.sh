#!/usr/bin/env bash
# Releases through a registry: what a device spends to update by tag (`slotforge upgrade DISK
# docker://…`, the code `agent update` runs) against carrying the whole bundle, and what a push
# uploads, in the same run. Debian's docker-registry on 127.0.0.1. Tree: the build bench's
# (Python 3.11 + GCC libraries) as the base image and a 40 MB on-disk service `svc` (20 MB
# random, 20 MB text), layout edge-v2, bundles `--without-images` (a pushed release carries no
# external image). Two updates of v1: (a) one file of `svc`, (b) `svc` replaced. Not measured
# here yet: under TCG in a guest, and the lazy start of a missing image (issue 22).
# Rewrites the `registry-update` section of docs/benchmarks.md.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/.ci/deps.sh" >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get install -y -q time >/dev/null; }
command -v zstd >/dev/null || { apt-get install -y -q zstd >/dev/null; }
. "$repo/bench/lib.sh"
bench_setup /tmp/slotforge-registry-update
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog: {level: error, accesslog: {disabled: true}}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: "127.0.0.1:%s"}\n' "$w/storage" "$port" > "$w/registry.yml"
docker-registry serve "$w/registry.yml" >/dev/null 2>&1 & reg=$!
trap 'kill $reg 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
mkdir -p "$w/src/base/usr/lib" "$w/src/svc/opt" "$w/src/kernel"
cp -a /usr/lib/python3.11 /usr/lib/gcc "$w/src/base/usr/lib/"
prng 1 20000000 > "$w/src/svc/opt/blob"
{ find /usr/include -type f -name '*.h' -print0 | sort -z | xargs -0 cat 2>/dev/null | head -c 20000000 > "$w/src/svc/opt/text"; } || true
echo 1 > "$w/src/svc/opt/conf"
prng 3 6000000 > "$w/src/kernel/kernel"
for i in base svc kernel; do mkimage "$w/img-$i" 1 "$w/src/$i"; done
echo 2 > "$w/src/svc/opt/conf"; mkimage "$w/img-svc" 2 "$w/src/svc"
zstd -3 -q -c "$w/src/svc/opt/conf" | wc -c > "$w/change-a"
mkdir -p "$w/src/svc3/opt"; prng 4 20000000 > "$w/src/svc3/opt/blob"; LC_ALL=C sort "$w/src/svc/opt/text" > "$w/src/svc3/opt/text"; echo 3 > "$w/src/svc3/opt/conf"
mkimage "$w/img-svc" 3 "$w/src/svc3"
cat "$w/src/svc3/opt/"* | zstd -3 -q -c | wc -c > "$w/change-b"
printf 'MZ loader stand-in' > "$w/loader.efi"
yml() { printf 'version: %s\nkernel: {image: oci:img-kernel:1, cmdline: console=ttyS0}\ninit: [oci:img-base:1]\nservices:\n  - {name: svc, image: oci:img-svc:%s}\nboot: {loader: file:loader.efi}\n' "$1" "$2"; }
yml 1.0.0 1 > "$w/v1.yml"; yml 1.0.1 2 > "$w/a.yml"; yml 1.1.0 3 > "$w/b.yml"
L="$repo/layouts/edge-v2.yaml"
cd "$w"
"$sf" build v1.yml --layout "$L" -o v1.img -q --cache cache 2>/dev/null
"$sf" bundle v1.yml --layout "$L" -o v1.tar --without-images --json --cache cache > v1.json 2>/dev/null
/usr/bin/time -f "%e %M" -o push-v1.t "$sf" push v1.tar "127.0.0.1:$port/bench:v1" --json > push-v1.json
for c in a b; do
  "$sf" bundle $c.yml --layout "$L" -o $c.tar --without-images --json --cache cache > bundle-$c.json 2>/dev/null
  /usr/bin/time -f "%e %M" -o push-$c.t "$sf" push $c.tar "127.0.0.1:$port/bench:$c" --json > push-$c.json
  # The device: a copy of v1's disk updated by tag, and (for comparison) from the whole bundle.
  cp --sparse=always v1.img t.img
  /usr/bin/time -f "%e %M" -o pull-$c.t "$sf" upgrade t.img "docker://127.0.0.1:$port/bench:$c" --json > pull-$c.json
  cp --sparse=always v1.img t.img
  /usr/bin/time -f "%e %M" -o full-$c.t "$sf" upgrade t.img $c.tar --json > full-$c.json
  rm -f t.img
done
python3 - "$w" <<'PY' | python3 "$repo/bench/section.py" registry-update
import json, sys, os, datetime, math
w = sys.argv[1]
cpu = open("/proc/cpuinfo").read().split("model name")[1].split(":")[1].split("\n")[0].strip()
mib = lambda b: f"{b/1048576:.2f} MiB"
t = lambda n: open(f"{w}/{n}.t").read().split()
print("## Releases through a registry: what an update by tag costs\n")
print(f"Run on {datetime.date.today()}, {os.cpu_count()} cores, {cpu}: `bash bench/registry-update.sh`. Debian's docker-registry on")
print("127.0.0.1; the build bench's tree (Python 3.11 + GCC libraries) with a 40 MB on-disk service `svc`, layout `edge-v2`,")
print("bundles `--without-images`. v1 pushed first; each update pushed after it; the device is a copy of v1's disk updated")
print("offline by tag (`slotforge upgrade DISK docker://…`, the code `agent update` runs), on the host, not under TCG.\n")
p1 = json.load(open(f"{w}/push-v1.json"))
print(f"Push of v1: {p1['chunks']} chunks in {p1['packs']} packs, {mib(p1['bytes_uploaded'])} uploaded in {t('push-v1')[0]} s.\n")
print("| update | whole bundle | push: packs uploaded / all (bytes) | pull: bytes fetched | pull: chunks fetched / all | requests: metadata + content | goal: ≤ 3 + 1 per 4 MiB of change | apply by tag s (RSS MiB) | apply whole bundle s (RSS MiB) |")
print("|---|---|---|---|---|---|---|---|---|")
what = {"a": "(a) one file of `svc`", "b": "(b) `svc` replaced"}
for c in ["a", "b"]:
    b, p, r, f = (json.load(open(f"{w}/{n}-{c}.json")) for n in ("bundle", "push", "pull", "full"))
    size = os.path.getsize(f"{w}/{c}.tar")
    pl = r["pulled"]
    change = int(open(f"{w}/change-{c}").read())
    goal = 3 + math.ceil(change / (4 << 20))
    meta, content = pl["requests_before_decision"], pl["requests"] - pl["requests_before_decision"]
    tp, tf = t(f"pull-{c}"), t(f"full-{c}")
    print(f"| {what[c]} | {mib(size)} | {p['packs_uploaded']} / {p['packs']} ({mib(p['bytes_uploaded'])}) | {mib(pl['bytes_fetched'])} | {pl['chunks_fetched']} / {pl['chunks']} | {meta} + {content} | {goal} ({'met' if meta + content <= goal else 'not met'}) | {tp[0]} ({int(tp[1])/1024:.0f}) | {tf[0]} ({int(tf[1])/1024:.0f}) |")
print()
print("*Requests* are the registry client's own count (tests/release.rs checks it equals what a logging proxy in front of")
print("the registry saw); the metadata ones are the manifest (config, index and pack table inline), the referrers API")
print("(404 on this registry) and the `sha256-<digest>` tag, all before any content. The content requests are one range")
print("per pack holding a missing chunk; a pack is ~4 MiB of chunks, so a change scattered over many packs costs one")
print("request per pack it touches, bounded by the number of packs. The kernel and initrd are taken from the disk's ESP")
print("(same digest), so nothing else is fetched.")
PY
echo "updated docs/benchmarks.md (section registry-update)"
