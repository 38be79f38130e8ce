# Shared by the bench scripts (sourced): the release binary, a work dir, fixed time, and
# OCI images made with umoci from directories.
# Usage: bench_setup DEFAULT_WORK_DIR  → sets $sf and $w (emptied, with $w/src).
bench_setup() {
  cd "$repo"
  cargo build --release --quiet
  sf="$repo/target/release/slotforge"
  w="${BENCH_DIR:-$1}"
  rm -rf "$w" && mkdir -p "$w/src"
  export SOURCE_DATE_EPOCH=1704067200
}
mkimage() { # LAYOUT TAG SRC
  umoci init --layout "$1"; umoci new --image "$1:$2"
  umoci unpack --rootless --image "$1:$2" "$w/bundle" >/dev/null
  cp -a "$3/." "$w/bundle/rootfs/"; umoci repack --image "$1:$2" "$w/bundle"; rm -rf "$w/bundle"
}
