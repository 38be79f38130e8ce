//! Hostile inputs, refused at their root with a clear message and nothing written: layers whose
//! ids, symlinks, xattrs or depth do not fit what the kernel and squashfs can hold; layouts whose
//! arithmetic would wrap; GPTs that lie about their entry array; an ESP layout record that lies
//! about the GPT; JSON documents too large to be OCI documents.

mod common;
use common::*;
use std::path::Path;

/// A layer of raw tar entries: (path, header tweaks, data, PAX records).
fn raw_layer(entries: Vec<(String, tar::EntryType, Vec<u8>, u64, Vec<(String, Vec<u8>)>, Option<Vec<u8>>)>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, ty, data, uid, pax, link) in entries {
        if !pax.is_empty() {
            let refs: Vec<(&str, &[u8])> = pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
            b.append_pax_extensions(refs).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_mode(0o4755);
        h.set_uid(uid);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        match link {
            Some(l) => {
                b.append_link(&mut h, &path, std::path::Path::new(std::ffi::OsStr::new(std::str::from_utf8(&l).unwrap()))).unwrap();
            }
            None => {
                b.append_data(&mut h, &path, &data[..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Build the fixture with one more init image made of `layer`; returns stderr, asserting failure
/// and that no output was written.
fn build_refused(layer: Vec<u8>) -> String {
    let fx = fixture();
    oci_image(&fx.path().join("images/evil"), "1", vec![(layer, Comp::None)], &[]);
    std::fs::write(fx.manifest(), MANIFEST.replace("  - oci:images/base:1\n", "  - oci:images/base:1\n  - oci:images/evil:1\n")).unwrap();
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    let o = slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]);
    assert!(!o.status.success(), "built a disk from a hostile layer");
    assert!(!out.exists(), "a refused build wrote its output");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn an_owner_over_32_bits_is_refused_never_wrapped_to_root() {
    let e = build_refused(raw_layer(vec![("bin/su".into(), tar::EntryType::Regular, b"x".to_vec(), 1 << 32, vec![], None)]));
    assert!(e.contains("uid 4294967296 does not fit a 32-bit id") && e.contains("bin/su"), "{e}");
    let e = build_refused(raw_layer(vec![("bin/su".into(), tar::EntryType::Regular, b"x".to_vec(), 0, vec![("uid".into(), b"4294967296".to_vec())], None)]));
    assert!(e.contains("uid 4294967296 does not fit"), "{e}");
}

#[test]
fn a_pax_uid_overrides_the_header_as_in_docker() {
    let fx = fixture();
    let layer = raw_layer(vec![("opt/owned".into(), tar::EntryType::Regular, b"x".to_vec(), 0, vec![("uid".into(), b"4242".to_vec()), ("gid".into(), b"77".to_vec())], None)]);
    oci_image(&fx.path().join("images/evil"), "1", vec![(layer, Comp::None)], &[]);
    std::fs::write(fx.manifest(), MANIFEST.replace("  - oci:images/base:1\n", "  - oci:images/base:1\n  - oci:images/evil:1\n")).unwrap();
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]));
    let sq = fx.path().join("a.img");
    extract_partition(&out, "rootfs_a", &sq);
    let l = tool("unsquashfs", &["-lln", "-d", "", sq.to_str().unwrap()]);
    let line = l.lines().find(|x| x.ends_with("/opt/owned")).unwrap();
    assert!(line.starts_with("-rwsr-xr-x 4242/77"), "{line}");
}

#[test]
fn symlinks_xattrs_and_depths_the_kernel_cannot_hold_are_refused() {
    let long = vec![b'a'; 5000];
    let e = build_refused(raw_layer(vec![("bin/far".into(), tar::EntryType::Symlink, vec![], 0, vec![], Some(long))]));
    assert!(e.contains("symlink target of 5000 bytes"), "{e}");
    let e = build_refused(raw_layer(vec![("bin/x".into(), tar::EntryType::Regular, b"x".to_vec(), 0, vec![("SCHILY.xattr.user.big".into(), vec![7u8; 70_000])], None)]));
    assert!(e.contains("extended attribute user.big (70000 bytes) is over the kernel's limits"), "{e}");
    let deep: String = (0..1100).map(|_| "d/").collect::<String>() + "f";
    let e = build_refused(raw_layer(vec![(deep, tar::EntryType::Regular, b"x".to_vec(), 0, vec![], None)]));
    assert!(e.contains("1101 directories deep, more than the 1024"), "{e}");
}

/// The fixture built onto the demo layout, and a bundle of it when asked.
fn fixture_disk(with_bundle: bool) -> (Fixture, std::path::PathBuf, Option<std::path::PathBuf>) {
    let fx = fixture();
    let disk = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", disk.to_str().unwrap(), "-q"]));
    let b = with_bundle.then(|| {
        let b = fx.path().join("b.tar");
        ok(&slotforge(&["bundle", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", b.to_str().unwrap(), "-q"]));
        b
    });
    (fx, disk, b)
}

fn layout_error(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.yaml");
    std::fs::write(&p, text).unwrap();
    let fx = fixture();
    let out = fx.path().join("disk.img");
    let o = slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", p.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]);
    assert!(!o.status.success() && !out.exists());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const LAYOUT: &str = "name: evil\ngeneration: 1\ndisk: {size: 1GiB}\npartitions:\n  - {name: esp, role: esp, size: 64MiB}\n  - {name: rootfs_a, role: rootfs, slot: a, size: 64MiB}\n  - {name: rootfs_b, role: rootfs, slot: b, size: 64MiB}\n  - {name: images, role: external-images, size: 256MiB}\n  - {name: persist, role: data, size: rest}\n";

#[test]
fn layout_arithmetic_cannot_wrap() {
    let e = layout_error(&LAYOUT.replace("{name: images, role: external-images, size: 256MiB}", "{name: images, role: external-images, size: 18446744073709551615}"));
    assert!(e.contains("l.yaml:") && e.contains("larger than the 1073741824-byte disk"), "{e}");
    let e = layout_error(&LAYOUT.replace("{name: rootfs_b, role: rootfs, slot: b, size: 64MiB}", "{name: rootfs_b, role: rootfs, slot: b, size: 64MiB, start: 18446744073708503040}"));
    assert!(e.contains("larger than the"), "{e}");
    let many: String = (0..130).map(|i| format!("  - {{name: p{i}, role: data, size: 1MiB}}\n")).collect();
    let e = layout_error(&format!("{LAYOUT}{many}"));
    assert!(e.contains("at most 128"), "{e}");
}

/// CRC-32 (IEEE), as the GPT headers use.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

/// Rewrite a field of both GPT headers of `disk` and fix their CRCs, so only our checks stand in
/// the way.
fn patch_gpt(disk: &Path, offset: usize, value: &[u8]) {
    let mut b = std::fs::read(disk).unwrap();
    let alt = u64::from_le_bytes(b[512 + 32..512 + 40].try_into().unwrap()) as usize;
    for lba in [1usize, alt] {
        let h = lba * 512;
        b[h + offset..h + offset + value.len()].copy_from_slice(value);
        let size = u32::from_le_bytes(b[h + 12..h + 16].try_into().unwrap()) as usize;
        b[h + 16..h + 20].fill(0);
        let c = crc32(&b[h..h + size]);
        b[h + 16..h + 20].copy_from_slice(&c.to_le_bytes());
    }
    std::fs::write(disk, b).unwrap();
}

#[test]
fn a_gpt_lying_about_its_entries_is_refused_without_a_panic_or_a_gigabyte() {
    let (fx, disk, _) = fixture_disk(false);
    for (offset, value, want) in [(84usize, 256u32.to_le_bytes(), "entries of 256 bytes"), (80, (1u32 << 23).to_le_bytes(), "8388608 entries")] {
        let d = fx.path().join("evil.img");
        std::fs::copy(&disk, &d).unwrap();
        patch_gpt(&d, offset, &value);
        for cmd in ["inspect", "verify"] {
            let o = std::process::Command::new("/usr/bin/time").args(["-f", "%M", bin(), cmd, d.to_str().unwrap()]).output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success() && !err.contains("panicked"), "{cmd}: {err}");
            assert!(err.contains(want) || String::from_utf8_lossy(&o.stdout).contains(want), "{cmd}: {err}{}", String::from_utf8_lossy(&o.stdout));
            let kib: u64 = err.lines().last().unwrap().trim().parse().unwrap();
            assert!(kib < 64 * 1024, "{cmd} used {kib} KiB");
        }
        let o = slotforge(&["upgrade", d.to_str().unwrap(), "/nonexistent"]);
        assert!(!o.status.success());
    }
}

#[test]
fn an_esp_layout_record_that_disagrees_with_the_gpt_is_refused_by_upgrade() {
    let (fx, disk, b) = fixture_disk(true);
    let b = b.unwrap();
    // Move slot b to byte 0 in the record (the GPT is unchanged).
    let start = {
        let mut f = std::fs::File::open(&disk).unwrap();
        slotforge::format::disk::read_gpt(&mut f).unwrap().partitions.iter().find(|p| p.name == "esp").unwrap().start
    };
    let img = format!("{}@@{start}", disk.display());
    let rec = fx.path().join("layout.json");
    tool("mcopy", &["-n", "-i", &img, "::/slotforge/layout.json", rec.to_str().unwrap()]);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    for p in v["partitions"].as_array_mut().unwrap() {
        if p["name"] == "rootfs_b" {
            p["start"] = 0.into();
        }
    }
    std::fs::write(&rec, serde_json::to_vec(&v).unwrap()).unwrap();
    tool("mcopy", &["-o", "-i", &img, rec.to_str().unwrap(), "::/slotforge/layout.json"]);
    let before = sha256_file(&disk);
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), b.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("layout record puts rootfs_b at 0") && err.contains("refusing to write"), "{err}");
    assert_eq!(sha256_file(&disk), before);
}

#[test]
fn an_index_json_too_large_to_be_an_oci_document_is_refused_unread() {
    let fx = fixture();
    let idx = fx.path().join("images/setup/index.json");
    let f = std::fs::OpenOptions::new().append(true).open(&idx).unwrap();
    f.set_len(20 << 20).unwrap();
    drop(f);
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    let o = slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is over 16777216 bytes"), "{err}");
}

/// Make the ESP's `loader/` directory contain itself (a directory entry naming its own cluster).
fn esp_self_loop(disk: &Path) {
    let start = {
        let mut f = std::fs::File::open(disk).unwrap();
        slotforge::format::disk::read_gpt(&mut f).unwrap().partitions.iter().find(|p| p.name == "esp").unwrap().start as usize
    };
    let mut b = std::fs::read(disk).unwrap();
    let bs = &b[start..start + 512];
    let u16at = |o: usize| u16::from_le_bytes([bs[o], bs[o + 1]]) as usize;
    let (bps, spc, reserved, fats) = (u16at(11), bs[13] as usize, u16at(14), bs[16] as usize);
    let fat_size = u32::from_le_bytes(bs[36..40].try_into().unwrap()) as usize;
    let root = u32::from_le_bytes(bs[44..48].try_into().unwrap()) as usize;
    let data = start + (reserved + fats * fat_size) * bps;
    let at = |c: usize| data + (c - 2) * spc * bps;
    let cluster_of = |e: &[u8]| (u16::from_le_bytes([e[20], e[21]]) as usize) << 16 | u16::from_le_bytes([e[26], e[27]]) as usize;
    let loader = (0..spc * bps / 32).map(|i| &b[at(root) + i * 32..at(root) + i * 32 + 32]).find(|e| &e[..11] == b"LOADER     ").map(cluster_of).expect("loader/ in the root");
    let free = (0..spc * bps / 32).map(|i| at(loader) + i * 32).find(|&o| b[o] == 0).unwrap();
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(b"SELF       ");
    e[11] = 0x10;
    e[20..22].copy_from_slice(&((loader >> 16) as u16).to_le_bytes());
    e[26..28].copy_from_slice(&(loader as u16).to_le_bytes());
    b[free..free + 32].copy_from_slice(&e);
    std::fs::write(disk, b).unwrap();
}

#[test]
fn an_esp_directory_that_contains_itself_is_refused_not_walked_forever() {
    let (_fx, disk, b) = fixture_disk(true);
    let b = b.unwrap();
    esp_self_loop(&disk);
    let before = sha256_file(&disk);
    for args in [vec!["inspect", disk.to_str().unwrap(), "--json"], vec!["verify", disk.to_str().unwrap()], vec!["upgrade", disk.to_str().unwrap(), b.to_str().unwrap()]] {
        let t = std::time::Instant::now();
        let o = std::process::Command::new("timeout").arg("60").arg(bin()).args(&args).output().unwrap();
        let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert_ne!(o.status.code(), Some(124), "{args:?} hung");
        assert!(all.contains("used twice"), "{args:?}: {all}");
        assert!(t.elapsed().as_secs() < 30);
        if args[0] != "inspect" {
            assert!(!o.status.success(), "{args:?}: {all}");
        }
    }
    assert_eq!(sha256_file(&disk), before, "a refused upgrade changed the disk");
}

#[test]
fn a_compression_bomb_stops_at_the_unpack_budget_and_leaves_no_temp_files() {
    let fx = fixture();
    // 200 MB of zeros, about 200 KB gzip'd.
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(200 << 20);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "zeros", std::io::Read::take(std::io::repeat(0), 200 << 20)).unwrap();
    let layer = b.into_inner().unwrap().finish().unwrap();
    assert!(layer.len() < 1 << 20);
    oci_image(&fx.path().join("images/evil"), "1", vec![(layer, Comp::None)], &[]);
    // The layer is gzip; tell the manifest so by rewriting its media type.
    let dir = fx.path().join("images/evil");
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mdig = idx["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let mut man: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("blobs/sha256").join(&mdig)).unwrap()).unwrap();
    man["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
    let bytes = serde_json::to_vec(&man).unwrap();
    let nd = sha256_hex(&bytes);
    std::fs::write(dir.join("blobs/sha256").join(&nd), &bytes).unwrap();
    let mut idx2 = idx.clone();
    idx2["manifests"][0]["digest"] = format!("sha256:{nd}").into();
    idx2["manifests"][0]["size"] = bytes.len().into();
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&idx2).unwrap()).unwrap();
    std::fs::write(fx.manifest(), MANIFEST.replace("  - oci:images/base:1\n", "  - oci:images/base:1\n  - oci:images/evil:1\n")).unwrap();
    let tmp = fx.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    let o = std::process::Command::new(bin())
        .args(["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"])
        .env("TMPDIR", &tmp)
        .env("SLOTFORGE_UNPACK_BUDGET", (64u64 << 20).to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("67108864-byte budget") && err.contains("zeros"), "{err}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "temporary files left behind");
}

#[test]
fn an_opaque_whiteout_under_a_regular_file_is_refused_like_a_plain_one() {
    let file_then = |marker: &str| raw_layer(vec![("etc/conf".to_string(), tar::EntryType::Regular, b"x".to_vec(), 0, vec![], None), (format!("etc/conf/{marker}"), tar::EntryType::Regular, vec![], 0, vec![], None)]);
    let e = build_refused(file_then(".wh..wh..opq"));
    assert!(e.contains("opaque whiteout under a non-directory") && e.contains("etc/conf/.wh..wh..opq"), "{e}");
    let e = build_refused(file_then(".wh.x"));
    assert!(e.contains("whiteout under a non-directory"), "{e}");
}

#[test]
fn a_partition_of_size_zero_is_refused_with_its_position() {
    let e = layout_error(&LAYOUT.replace("{name: rootfs_b, role: rootfs, slot: b, size: 64MiB}", "{name: rootfs_b, role: rootfs, slot: b, size: 0}"));
    assert!(e.contains("l.yaml:7:51:") && e.contains("partition rootfs_b: size 0"), "{e}");
    let e = layout_error(&LAYOUT.replace("size: 256MiB}", "size: 0MiB}"));
    assert!(e.contains("l.yaml:8:") && e.contains("partition images: size 0"), "{e}");
}

#[test]
fn a_bad_file_mode_is_refused_at_its_position_and_leaves_no_temporary_file() {
    let fx = fixture();
    std::fs::write(fx.manifest(), MANIFEST.replace("mode: \"0600\"", "mode: \"99999\"")).unwrap();
    let tmp = fx.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    let (o_s, l_s) = (out.to_str().unwrap(), l.to_str().unwrap());
    for args in [vec!["build", "-o", o_s, "--layout", l_s], vec!["bundle", "-o", o_s, "--layout", l_s], vec!["check"], vec!["lock"]] {
        let manifest = fx.manifest();
        let mut a = args.clone();
        a.push(manifest.to_str().unwrap());
        let o = std::process::Command::new(bin()).args(&a).env("TMPDIR", &tmp).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("system.yml:") && err.contains("mode \"99999\" is not an octal permission"), "{}: {err}", args[0]);
        assert!(!out.exists(), "{}", args[0]);
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{} left {left:?} in TMPDIR", args[0]);
    }
}

#[test]
fn hostile_delta_bundles_are_refused_before_anything_is_written() {
    use common::delta::{build, bundle, release2, rewrite_config};
    let fx = fixture();
    let p = fx.path();
    let disk = p.join("disk.img");
    build(&fx, &disk);
    release2(&fx);
    let good = p.join("good");
    bundle(&fx, &good, &["--without-images", "--delta-from", disk.to_str().unwrap()]);
    let before = sha256_file(&disk);
    let try_with = |name: &str, f: &dyn Fn(&mut serde_json::Value, &Path)| -> String {
        let d = p.join(name);
        tool("cp", &["-a", good.to_str().unwrap(), d.to_str().unwrap()]);
        rewrite_config(&d, |c| f(c, &d));
        let o = slotforge(&["upgrade", disk.to_str().unwrap(), d.to_str().unwrap()]);
        assert!(!o.status.success(), "{name} was applied");
        assert_eq!(sha256_file(&disk), before, "{name}: disk unchanged");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // An index bomb: a claimed size far over what the rootfs admits, refused unread.
    let e = try_with("bomb", &|c, _| c["chunks"]["index"]["size"] = (1u64 << 40).into());
    assert!(e.contains("chunk index") && e.contains("at most"), "{e}");
    // An index whose chunks run past the rootfs (a real, well-formed index).
    let e = try_with("past", &|c, d| {
        let size = c["rootfs"]["size"].as_u64().unwrap();
        let mut b = std::fs::read(d.join("blobs/sha256").join(c["chunks"]["index"]["digest"].as_str().unwrap().trim_start_matches("sha256:"))).unwrap();
        let n = b.len();
        let last = n - 40 - 40; // the last entry's end offset
        b[last..last + 8].copy_from_slice(&(size + 65536).to_le_bytes());
        let h = sha256_hex(&b);
        std::fs::write(d.join("blobs/sha256").join(&h), &b).unwrap();
        c["chunks"]["index"]["digest"] = format!("sha256:{h}").into();
    });
    assert!(e.contains("describes") || e.contains("outside"), "{e}");
    // An index blob that is not the one the config pins.
    let e = try_with("swapped", &|c, _| c["chunks"]["index"]["digest"] = c["kernel"]["digest"].clone());
    assert!(e.contains("corrupt") || e.contains("chunk index"), "{e}");
    // Store chunks truncated, grown, or not zstd at all: refused by their ids, disk unchanged.
    let store_chunk = |d: &Path| {
        let sub = std::fs::read_dir(d.join("chunks")).unwrap().next().unwrap().unwrap().path();
        std::fs::read_dir(sub).unwrap().next().unwrap().unwrap().path()
    };
    for name in ["truncated", "grown", "garbage"] {
        let d = p.join(name);
        tool("cp", &["-a", good.to_str().unwrap(), d.to_str().unwrap()]);
        let c = store_chunk(&d);
        let raw = zstd::stream::decode_all(&std::fs::read(&c).unwrap()[..]).unwrap();
        let bad = match name {
            "truncated" => zstd::bulk::compress(&raw[..raw.len() / 2], 3).unwrap(),
            "grown" => zstd::bulk::compress(&[raw, vec![0; 4096]].concat(), 3).unwrap(),
            _ => b"not zstd".to_vec(),
        };
        std::fs::write(&c, bad).unwrap();
        let o = slotforge(&["upgrade", disk.to_str().unwrap(), d.to_str().unwrap()]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("nothing was changed") && (e.contains("does not match its id") || e.contains("not zstd")), "{name}: {e}");
        assert_eq!(sha256_file(&disk), before, "{name}: disk unchanged");
    }
    // Seed offsets that lie (every chunk said to be at the slot's start, validly encoded): no
    // wrong byte is taken from where they point — chunks are checked by id, the slot is chunked
    // instead — and the apply gives the same slot as the honest bundle.
    let d = p.join("lying-offsets");
    tool("cp", &["-a", good.to_str().unwrap(), d.to_str().unwrap()]);
    rewrite_config(&d, |c| {
        // One LEB128 per chunk: the first in place (1), every other one byte early (zigzag(-1) + 1 = 2).
        let n = (c["chunks"]["index"]["size"].as_u64().unwrap() - 64 - 40) / 40;
        let raw: Vec<u8> = (0..n).map(|i| if i == 0 { 1 } else { 2 }).collect();
        let blob = zstd::bulk::compress(&raw, 3).unwrap();
        let h = sha256_hex(&blob);
        std::fs::write(d.join("blobs/sha256").join(&h), &blob).unwrap();
        c["chunks"]["delta_from"][0]["seed_offsets"] = serde_json::json!({"digest": format!("sha256:{h}"), "size": blob.len()});
    });
    let honest = p.join("honest.img");
    std::fs::copy(&disk, &honest).unwrap();
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), d.to_str().unwrap(), "--json"]))).unwrap();
    ok(&slotforge(&["upgrade", honest.to_str().unwrap(), good.to_str().unwrap()]));
    let (x, y) = (p.join("x.img"), p.join("y.img"));
    extract_partition(&disk, "rootfs_b", &x);
    extract_partition(&honest, "rootfs_b", &y);
    assert_eq!(sha256_file(&x), sha256_file(&y), "lying offsets changed no byte of the slot: {r}");
    assert!(r["delta"]["resumed"].as_u64().unwrap() >= 1, "the assembly stopped at the first lie and went on from there: {r}");
    let v: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["verify", disk.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}
