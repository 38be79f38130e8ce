#!/usr/bin/env bash
# Benchmark: pulling a multi-layer image (>= 100 MB) from a real registry on 127.0.0.1 with
# `slotforge pull` vs `skopeo copy docker://… oci:…`, side by side, cold and warm; wall time and
# peak RSS from /usr/bin/time. Rewrites the `pull` section of docs/benchmarks.md.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/.ci/deps.sh"
cd "$repo" && cargo build --release --quiet
sf="$repo/target/release/slotforge"
w="${BENCH_DIR:-/tmp/slotforge-bench-pull}"
rm -rf "$w" && mkdir -p "$w"
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
cat > "$w/registry.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $w/storage}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$w/registry.yml" >/dev/null 2>&1 &
regpid=$!
trap 'kill $regpid 2>/dev/null || true' EXIT
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

# A 4-layer image of 4 x 32 MB (incompressible, so gzip layers stay ~128 MB), and a tiny kernel image.
mk() { # LAYOUT TAG: one umoci layer per call of add
  umoci init --layout "$1"; umoci new --image "$1:$2"; }
add() { # LAYOUT TAG SRC
  umoci unpack --rootless --image "$1:$2" "$w/b" >/dev/null; cp -a "$3/." "$w/b/rootfs/"
  umoci repack --image "$1:$2" "$w/b"; rm -rf "$w/b"; }
mk "$w/big" 1
for i in 1 2 3 4; do mkdir -p "$w/src$i/data"; head -c 32000000 /dev/urandom > "$w/src$i/data/part$i"; add "$w/big" 1 "$w/src$i"; done
mk "$w/kernel" 1; mkdir -p "$w/ksrc"; head -c 1000000 /dev/urandom > "$w/ksrc/kernel"; add "$w/kernel" 1 "$w/ksrc"
skopeo copy -q --dest-tls-verify=false oci:"$w/big:1" docker://127.0.0.1:$port/big:1
skopeo copy -q --dest-tls-verify=false oci:"$w/kernel:1" docker://127.0.0.1:$port/kernel:1
size=$(du -sb "$w/storage/docker/registry/v2/blobs" | cut -f1)
printf 'MZ' > "$w/loader.efi"
cat > "$w/system.yml" <<YML
version: 1.0.0
kernel: {image: 127.0.0.1:$port/kernel:1}
services: [{name: big, image: 127.0.0.1:$port/big:1, ondisk: false}]
boot: {loader: file:loader.efi}
YML
t() { /usr/bin/time -f "%e %M" -o "$w/t" "$@" >/dev/null 2>"$w/err" || { cat "$w/err"; exit 1; }; cat "$w/t"; }
sync
sf_cold=$(t "$sf" pull "$w/system.yml" --cache "$w/cache" -q)
sf_warm=$(t "$sf" pull "$w/system.yml" --cache "$w/cache" -q)
sk_cold=$(t skopeo copy -q --src-tls-verify=false docker://127.0.0.1:$port/big:1 oci:"$w/skopeo:1")
sk_warm=$(t skopeo copy -q --src-tls-verify=false docker://127.0.0.1:$port/big:1 oci:"$w/skopeo:1")
row() { echo "$1" | awk '{printf "%s | %.0f", $1, $2/1024}'; }
python3 "$repo/bench/section.py" pull <<MD
## Registry pull: slotforge vs skopeo

Run on $(date -u +%Y-%m-%d), $(nproc) cores. A 4-layer image (4 × 32 MB incompressible, $((size / 1000000)) MB of
blobs in the registry) plus a 1 MB kernel image, served by Debian's docker-registry on
127.0.0.1; \`slotforge pull\` into an empty cache (cold), then again (warm), against
\`skopeo copy docker://… oci:DIR\` into an empty layout (cold), then again into the same layout (warm).
Both verify digests.

| | wall time (s) | peak RSS (MiB) |
|---|---|---|
| slotforge pull, cold | $(row "$sf_cold") |
| skopeo copy, cold | $(row "$sk_cold") |
| slotforge pull, warm | $(row "$sf_warm") |
| skopeo copy, warm | $(row "$sk_warm") |

slotforge streams each layer into a temporary file while hashing it (4 downloads at once) and
renames it into the cache only when size and digest match, so its memory does not grow with
layer size.
MD
echo "updated docs/benchmarks.md (section pull)"
