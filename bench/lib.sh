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
# Every time in the image fixed (config, history, file mtimes): the same SRC gives the same
# digests in every run, so a bench's inputs do not vary between runs.
BENCH_TIME=2024-01-01T00:00:00Z
mkimage() { # LAYOUT TAG SRC
  [ -d "$1" ] || umoci init --layout "$1"; umoci new --image "$1:$2"
  umoci config --image "$1:$2" --created "$BENCH_TIME" --history.created "$BENCH_TIME"
  umoci unpack --rootless --image "$1:$2" "$w/bundle" >/dev/null
  cp -a "$3/." "$w/bundle/rootfs/"; find "$w/bundle/rootfs" -exec touch -h -d "$BENCH_TIME" {} +
  umoci repack --history.created "$BENCH_TIME" --image "$1:$2" "$w/bundle"; rm -rf "$w/bundle"
}
measure() { # OUTFILE CMD... -> appends "seconds maxrss_kib user_s sys_s fs_in_blocks fs_out_blocks"
  local out="$1"; shift
  /usr/bin/time -f "%e %M %U %S %I %O" -o "$w/t" "$@" >/dev/null 2>"$w/err" || { cat "$w/err"; exit 1; }
  cat "$w/t" >> "$out"
}
# The standard-tool pipeline for the bench's disk (base image at /, service `svc` on disk,
# external image `ext`, kernel; edge-v2's geometry) from $w/img-{base,svc,ext}:TAG, timed step by
# step into TIMES ("seconds peak_kib" per line). Usage: std_pipeline DIR TIMES [SVC_TAG] [EXT_TAG]
std_pipeline() {
  local p="$1" times="$2" svc="${3:-1}" ext="${4:-1}"
  rm -rf "$p"; mkdir -p "$p"
  measure "$times" umoci unpack --rootless --image "$w/img-base:1" "$p/base"
  measure "$times" umoci unpack --rootless --image "$w/img-svc:$svc" "$p/svc"
  mkdir -p "$p/base/rootfs/containers/services/svc"
  mv "$p/svc/rootfs" "$p/base/rootfs/containers/services/svc/rootfs"
  measure "$times" mksquashfs "$p/base/rootfs" "$p/rootfs.sqfs" -comp zstd -b 131072 -noappend -quiet
  measure "$times" mkfs.vfat -F 32 -C "$p/esp.img" $((256*1024))
  measure "$times" mmd -i "$p/esp.img" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/a
  measure "$times" mcopy -i "$p/esp.img" "$w/loader.efi" ::/EFI/BOOT/BOOTX64.EFI
  measure "$times" mcopy -i "$p/esp.img" "$w/src/kernel/kernel" ::/a/vmlinuz
  measure "$times" skopeo copy -q oci:"$w/img-ext:$ext" oci:"$p/stage:1.0.0"
  measure "$times" truncate -s 4G "$p/images.img"
  measure "$times" mke2fs -q -t ext4 -d "$p/stage" "$p/images.img"
  measure "$times" truncate -s 8G "$p/disk.img"
  measure "$times" sgdisk -n1:1M:+256M -t1:ef00 -c1:esp -n2:0:+512M -t2:8304 -c2:rootfs_a -n3:0:+512M -t3:8304 -c3:rootfs_b -n4:0:+4G -t4:8300 -c4:images -n5:0:0 -t5:8300 -c5:persist "$p/disk.img"
  measure "$times" dd if="$p/esp.img" of="$p/disk.img" bs=1M seek=1 conv=notrunc,sparse status=none
  measure "$times" dd if="$p/rootfs.sqfs" of="$p/disk.img" bs=1M seek=257 conv=notrunc,sparse status=none
  measure "$times" dd if="$p/images.img" of="$p/disk.img" bs=1M seek=1281 conv=notrunc,sparse status=none
}
# Random bytes from a seeded generator (AES-CTR over zeros): the same inputs, so the same chunk
# boundaries and numbers, on every run.
prng() { # SEED BYTES
  openssl enc -aes-128-ctr -nosalt -K "$(printf '%032x' "$1")" -iv 0 < /dev/zero 2>/dev/null | head -c "$2" || true
}
