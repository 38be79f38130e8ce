//! Sealed external images (docs/formats.md#sealed-images) read back from a built disk with the
//! standard tools: `veritysetup verify`/`dump` under the root hash the rootfs pins, `unsquashfs`,
//! and compared entry by entry (type, mode, owner, size, link target, mtime, xattrs, hard links)
//! with `umoci unpack` of the same image.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The fixture with an extra external service `rich` running the base image (every entry type,
/// xattrs, owners, whiteouts), read-only with a bind whose mount point the image lacks.
fn rich_manifest(fx: &Fixture, extra: &str) {
    let m = MANIFEST.replace(
        "files:\n",
        &format!("  - name: rich\n    image: oci:images/base:1\n    ondisk: false\n    readonly: true\n    binds: [\"/run:/var/run/host\"]\n{extra}files:\n"),
    );
    std::fs::write(fx.manifest(), m).unwrap();
}

struct Built {
    images: PathBuf,
    rootfs: PathBuf,
    ext: serde_json::Value,
}

fn build_and_read(fx: &Fixture, name: &str) -> Built {
    let out = fx.path().join(format!("{name}.img"));
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", layouts().join("demo.yaml").to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"]));
    let ext4 = fx.path().join(format!("{name}.images.ext4"));
    extract_partition(&out, "images", &ext4);
    tool("e2fsck", &["-fn", ext4.to_str().unwrap()]);
    let images = fx.path().join(format!("{name}.images"));
    std::fs::create_dir(&images).unwrap();
    tool("debugfs", &["-R", &format!("rdump / {}", images.display()), ext4.to_str().unwrap()]);
    let slot = fx.path().join(format!("{name}.rootfs"));
    extract_partition(&out, "rootfs_a", &slot);
    let rootfs = fx.path().join(format!("{name}.root"));
    tool("unsquashfs", &["-q", "-d", rootfs.to_str().unwrap(), slot.to_str().unwrap(), "etc/slotforge"]);
    let ext = serde_json::from_slice(&std::fs::read(rootfs.join("etc/slotforge/external-images.json")).unwrap()).unwrap();
    Built { images, rootfs, ext }
}

fn image<'a>(b: &'a Built, name: &str) -> &'a serde_json::Value {
    b.ext["images"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap_or_else(|| panic!("no {name} in {}", b.ext))
}

fn blob(b: &Built, digest: &str) -> PathBuf {
    b.images.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

/// path → what a reader sees: type, permission bits, owner, size or target, mtime, xattrs.
fn listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let ft = m.file_type();
            let what = if ft.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("symlink {}", std::fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                format!("file {} bytes sha {}", m.len(), sha256_file(&p))
            } else {
                format!("special {:o} rdev {}", m.mode() & 0o170000, m.rdev())
            };
            let x = tool("getfattr", &["-h", "-d", "-m", "-", "-e", "hex", "--absolute-names", p.to_str().unwrap()]);
            let xattrs: Vec<&str> = x.lines().filter(|l| l.contains('=')).collect();
            let mtime = if ft.is_dir() { String::new() } else { format!(" mtime {}", m.mtime()) };
            out.insert(rel, format!("{what} mode {:o} owner {}:{}{mtime} xattrs {xattrs:?}", m.mode() & 0o7777, m.uid(), m.gid()));
        }
    }
    out
}

#[test]
fn sealed_image_verifies_under_the_pinned_root_hash_and_equals_umoci_unpack() {
    let fx = fixture();
    rich_manifest(&fx, "");
    let b = build_and_read(&fx, "a");
    let rich = image(&b, "rich");
    let s = &rich["sealed"];
    assert_eq!(s["filesystem"], "squashfs", "{rich}");
    assert_eq!(s["mkdirs"], serde_json::json!(["/var/run/host"]), "the bind's mount point is sealed in: {rich}");
    let file = blob(&b, s["digest"].as_str().unwrap());
    assert_eq!(std::fs::metadata(&file).unwrap().len(), s["size"].as_u64().unwrap());
    assert_eq!(sha256_file(&file), s["digest"].as_str().unwrap());
    let (root, off) = (s["root_hash"].as_str().unwrap(), s["hash_offset"].as_u64().unwrap().to_string());

    // veritysetup reads our superblock and tree and agrees with the pinned root hash.
    let f = file.to_str().unwrap();
    tool("veritysetup", &["verify", f, f, root, &format!("--hash-offset={off}")]);
    let dump = tool("veritysetup", &["dump", f, &format!("--hash-offset={off}")]);
    assert!(dump.contains(&format!("Salt:           \t{}", s["salt"].as_str().unwrap())) || dump.contains(s["salt"].as_str().unwrap()), "{dump}");
    assert!(dump.contains(&format!("Data blocks:    \t{}", s["data_blocks"])) || dump.contains(&s["data_blocks"].to_string()), "{dump}");
    // The artifact manifest ties the blob to the image and carries the same parameters.
    let art: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&b, s["artifact"].as_str().unwrap())).unwrap()).unwrap();
    assert_eq!(art["subject"]["digest"], rich["digest"], "{art}");
    assert_eq!(art["layers"][0]["digest"], s["digest"], "{art}");
    assert_eq!(art["layers"][0]["annotations"]["io.slotforge.verity.root-hash"], s["root_hash"], "{art}");

    // A flipped byte in the filesystem: veritysetup refuses it under the pinned hash.
    let bad = fx.path().join("bad.img");
    std::fs::copy(&file, &bad).unwrap();
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes[4096 * 3 + 17] ^= 0x40;
    std::fs::write(&bad, &bytes).unwrap();
    let o = std::process::Command::new("veritysetup").args(["verify", bad.to_str().unwrap(), bad.to_str().unwrap(), root, &format!("--hash-offset={off}")]).output().unwrap();
    assert!(!o.status.success(), "veritysetup accepted a corrupted sealed image");

    // The filesystem: squashfs that unsquashfs reads (the hash area after it is ignored by it).
    let sq = fx.path().join("sealed");
    tool("unsquashfs", &["-q", "-xattrs", "-d", sq.to_str().unwrap(), f]);
    let um = fx.path().join("umoci");
    tool("umoci", &["unpack", "--image", &format!("{}:1", fx.path().join("images/base").display()), um.to_str().unwrap()]);
    let (mut got, want) = (listing(&sq), listing(&um.join("rootfs")));
    assert!(want.len() >= 15 && want.contains_key("bin/ping") && want.contains_key("dev/null"), "{want:?}");
    // What LinuxKit's image fix-ups add or replace (src/linuxkit/bundle.rs), and the sealed mount point.
    for p in ["dev/pts", "dev/shm", "etc/hosts", "etc/resolv.conf", "etc/mtab", "proc", "sys", "var/run", "var/run/host"] {
        got.remove(p);
    }
    for (p, w) in &want {
        if ["dev", "etc"].contains(&p.as_str()) {
            continue; // directories the fix-ups make sure of (same here: they exist in the image)
        }
        assert_eq!(got.get(p), Some(w), "{p}: sealed vs umoci unpack");
    }
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k) && !["dev", "etc"].contains(&k.as_str())).collect();
    assert!(extra.is_empty(), "sealed image has entries umoci does not: {extra:?}");
    assert!(!got.contains_key("etc/removed") && got.contains_key("var/cache/new") && !got.contains_key("var/cache/old"), "whiteouts");
    assert_eq!(std::fs::metadata(sq.join("bin/ls")).unwrap().ino(), std::fs::metadata(sq.join("bin/busybox")).unwrap().ino(), "hard link became a copy");
    assert!(sq.join("var/run/host").is_dir());

    // Layers of a sealed image are not stored (no keep-layers); its manifest and config are.
    let man: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&b, rich["digest"].as_str().unwrap())).unwrap()).unwrap();
    assert!(blob(&b, man["config"]["digest"].as_str().unwrap()).exists());
    for l in man["layers"].as_array().unwrap() {
        assert!(!blob(&b, l["digest"].as_str().unwrap()).exists(), "layer {} stored without keep-layers", l["digest"]);
    }
    let _ = &b.rootfs;

    // slotforge verify recomputes each sealed image's tree up to the pinned root hash…
    let disk = fx.path().join("a.img");
    let v: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["verify", disk.to_str().unwrap(), "--json"]))).unwrap();
    let sealed_checks: Vec<&serde_json::Value> = v["checks"].as_array().unwrap().iter().filter(|c| c["name"].as_str().unwrap().starts_with("slot a sealed")).collect();
    assert_eq!(sealed_checks.len(), 2, "rich and edgeview: {v}");
    assert!(sealed_checks.iter().all(|c| c["ok"] == true), "{v}");
    // …and names the one whose bytes changed (the largest blob: edgeview's sealed image).
    slotforge::harness::faults::corrupt_largest_blob(&disk, fx.path()).unwrap();
    let o = slotforge(&["verify", disk.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bad: Vec<&str> = v["checks"].as_array().unwrap().iter().filter(|c| c["ok"] == false).map(|c| c["name"].as_str().unwrap()).collect();
    assert!(bad.contains(&"slot a sealed edgeview"), "{v}");
}

#[test]
fn keep_layers_stores_the_layers_and_sealing_is_reproducible() {
    let fx = fixture();
    rich_manifest(&fx, "    keep-layers: true\n");
    let a = build_and_read(&fx, "a");
    let rich = image(&a, "rich");
    assert_eq!(rich["keep_layers"], true);
    let man: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&a, rich["digest"].as_str().unwrap())).unwrap()).unwrap();
    for l in man["layers"].as_array().unwrap() {
        assert!(blob(&a, l["digest"].as_str().unwrap()).exists(), "layer {} missing with keep-layers", l["digest"]);
    }
    // The sealed image depends on the image and its mount points only, not on the build: a
    // different version of the appliance seals it to the same bytes.
    std::fs::write(fx.manifest(), std::fs::read_to_string(fx.manifest()).unwrap().replace("version: 1.4.0", "version: 1.5.0")).unwrap();
    let b = build_and_read(&fx, "b");
    assert_ne!(a.ext["build_id"], b.ext["build_id"]);
    assert_eq!(image(&b, "rich")["sealed"], rich["sealed"]);
}

#[test]
fn sealing_keys_are_checked_with_file_line_and_column() {
    let fx = fixture();
    // `sealed` on an on-disk image, `keep-layers` on an unsealed one.
    let m = MANIFEST.replace("    env: [LOGLEVEL=debug]\n", "    env: [LOGLEVEL=debug]\n    sealed: true\n");
    std::fs::write(fx.manifest(), m).unwrap();
    let o = slotforge(&["check", fx.manifest().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("system.yml:14:13") && err.contains("`sealed` applies to external images"), "{err}");
    let m = MANIFEST.replace("    sealed: false\n", "    sealed: false\n    keep-layers: true\n");
    std::fs::write(fx.manifest(), m).unwrap();
    let o = slotforge(&["check", fx.manifest().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("keep-layers") && err.contains("not sealed"), "{err}");
}
