//! `slotforge build`, `inspect` and `verify` on fixture images, every artefact read back with
//! the standard tools: sgdisk -v, fsck.vfat -n, unsquashfs, e2fsck -fn, debugfs rdump + skopeo.

mod common;
use common::*;
use std::path::Path;

fn build(fx: &Fixture, layout: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let l = layouts().join(layout);
    let m = fx.manifest();
    let mut args = vec!["build", m.to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    slotforge(&args)
}

#[test]
fn built_disk_passes_every_standard_reader() {
    let fx = fixture();
    let out = fx.path().join("disk.img");
    let summary: serde_json::Value = serde_json::from_str(&ok(&build(&fx, "demo.yaml", &out, &[]))).unwrap();
    let build_id = summary["build_id"].as_str().unwrap().to_string();
    assert!(build_id.starts_with("1.4.0-"), "{build_id}");

    // GPT.
    let v = tool("sgdisk", &["-v", out.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{v}");
    let p = tool("sgdisk", &["-p", out.to_str().unwrap()]);
    for name in ["esp", "rootfs_a", "rootfs_b", "images", "persist"] {
        assert!(p.contains(name), "{p}");
    }
    // Sparse: far fewer bytes allocated than the disk's size.
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&out).unwrap();
    assert!(md.blocks() * 512 < md.len() / 4, "not sparse: {} of {}", md.blocks() * 512, md.len());

    // ESP.
    let esp = fx.path().join("esp.img");
    extract_partition(&out, "esp", &esp);
    tool("fsck.vfat", &["-n", esp.to_str().unwrap()]);
    let dir = tool("mdir", &["-/", "-b", "-i", esp.to_str().unwrap(), "::"]);
    for f in ["::/EFI/BOOT/BOOTX64.EFI", "::/loader/loader.conf", "::/loader/entries/slot-a.conf", "::/a/vmlinuz", "::/a/initrd.img"] {
        assert!(dir.contains(f), "{f} missing from ESP:\n{dir}");
    }
    let entry = tool("mtype", &["-i", esp.to_str().unwrap(), "::/loader/entries/slot-a.conf"]);
    assert!(entry.contains("sort-key slotforge\n"), "{entry}");
    assert!(entry.contains("version 1\n"), "{entry}");
    // dm-verity in systemd's standard parameters; the tree follows the squashfs in the slot.
    let root_hash = summary["verity"]["root_hash"].as_str().unwrap().to_string();
    let offset = summary["verity"]["hash_offset"].as_u64().unwrap();
    assert!(
        entry.contains(&format!("root=/dev/mapper/root roothash={root_hash} systemd.verity_root_data=PARTLABEL=rootfs_a systemd.verity_root_hash=PARTLABEL=rootfs_a systemd.verity_root_options=hash-offset={offset} ro slotforge.slot=a slotforge.build={build_id} console=ttyS0")),
        "{entry}"
    );
    let conf = tool("mtype", &["-i", esp.to_str().unwrap(), "::/loader/loader.conf"]);
    assert!(conf.contains("timeout 0") && !conf.contains("default"), "{conf}");

    // Rootfs: content, owners, modes, xattrs, whiteouts.
    let sq = fx.path().join("rootfs_a.img");
    extract_partition(&out, "rootfs_a", &sq);
    let vs = tool("veritysetup", &["verify", sq.to_str().unwrap(), sq.to_str().unwrap(), &root_hash, &format!("--hash-offset={offset}")]);
    assert!(!vs.contains("fail"), "{vs}");
    let l = tool("unsquashfs", &["-lln", "-d", "", sq.to_str().unwrap()]);
    let line = |path: &str| l.lines().find(|x| x.ends_with(&format!(" {path}")) || x.contains(&format!(" {path} -> "))).unwrap_or_else(|| panic!("{path} not in:\n{l}")).to_string();
    assert!(line("/bin/busybox").starts_with("-rwxr-xr-x 0/0"), "{}", line("/bin/busybox"));
    assert!(line("/bin/sh").starts_with("lrwxrwxrwx") && line("/bin/sh").ends_with("/bin/sh -> busybox"));
    assert!(line("/dev/null").starts_with("crw-rw-rw- 0/0") && line("/dev/null").contains("1,  3"), "{}", line("/dev/null"));
    assert!(line("/dev/initctl").starts_with("prw-------"));
    assert!(line("/tmp").starts_with("drwxrwxrwt"));
    assert!(line("/home/user/.profile").starts_with("-rwsr-x--- 1000/100"), "{}", line("/home/user/.profile"));
    assert!(line("/etc/secret").starts_with("-rw------- 1000/1000"));
    assert!(!l.contains("/etc/removed"), "whiteout not applied");
    assert!(!l.contains("/var/cache/old"), "opaque whiteout not applied");
    assert!(line("/var/cache/new").starts_with("-rw-r--r--"));
    assert!(line("/var/cache").starts_with("drwx------"));
    assert!(!l.contains(".wh."), "whiteout markers leaked:\n{l}");
    assert!(line("/lib/modules/6.1/virtio.ko").starts_with("-rw-r--r--"), "kernel.tar not unpacked");
    // LinuxKit's layout: onboot in order (`000-`), a writable root (the default) under `lower/`
    // with `tmp/` and `rootfs/` as mount points, config.json and runtime.json beside it.
    assert!(line("/containers/onboot/000-setup/lower/bin/setup").starts_with("-rwxr-xr-x"));
    assert!(line("/containers/onboot/000-setup/rootfs").starts_with("drwxr-xr-x"));
    assert!(line("/containers/onboot/000-setup/tmp").starts_with("drwxr-xr-x"));
    assert!(l.contains("/containers/services/newlogd/lower/usr/bin/newlogd"));
    assert!(l.contains("/containers/services/newlogd/runtime.json"));
    assert!(l.contains("/containers/services/edgeview/config.json"));
    assert!(!l.contains("/containers/services/edgeview/lower/"), "external image flattened into the rootfs");
    // LinuxKit's `files:` defaults: 0600 files, parents (re)made with the entry's mode + x.
    assert!(line("/etc/hostname").starts_with("-rw------- 0/0"), "{}", line("/etc/hostname"));
    assert!(line("/etc").starts_with("drwx------ 0/0"), "{}", line("/etc"));
    assert!(!l.contains("/containers/services/analytics/lower/"), "external image flattened into the rootfs");
    // Hard link: one inode for both names.
    let x = tempfile::tempdir().unwrap();
    let dest = x.path().join("r");
    tool("unsquashfs", &["-d", dest.to_str().unwrap(), "-xattrs", sq.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(dest.join("bin/ls")).unwrap().ino(), std::fs::metadata(dest.join("bin/busybox")).unwrap().ino(), "hard link became a copy");
    let caps = tool("getfattr", &["-d", "-m", "-", "-e", "hex", dest.join("bin/ping").to_str().unwrap()]);
    assert!(caps.contains("security.capability=0x0100000200200000"), "{caps}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dest.join("containers/services/newlogd/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["process"]["args"], serde_json::json!(["/usr/bin/newlogd", "-v"]));
    assert!(cfg["process"]["env"].as_array().unwrap().contains(&"LOGLEVEL=debug".into()));
    assert_eq!(cfg["root"]["path"], "rootfs");
    let ext: serde_json::Value = serde_json::from_slice(&std::fs::read(dest.join("etc/slotforge/external-images.json")).unwrap()).unwrap();
    assert_eq!(ext["build_id"], build_id.as_str());
    let names: Vec<&str> = ext["images"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["analytics", "edgeview"]);
    let edgeview_digest = ext["images"][1]["digest"].as_str().unwrap().to_string();
    let rel: serde_json::Value = serde_json::from_slice(&std::fs::read(dest.join("etc/slotforge/release.json")).unwrap()).unwrap();
    assert_eq!(rel["version"], "1.4.0");

    // External-images partition: ext4, one OCI layout, a ref per build.
    let ext4 = fx.path().join("images.img");
    extract_partition(&out, "images", &ext4);
    tool("e2fsck", &["-fn", ext4.to_str().unwrap()]);
    let rd = fx.path().join("rdump");
    std::fs::create_dir(&rd).unwrap();
    tool("debugfs", &["-R", &format!("rdump / {}", rd.display()), ext4.to_str().unwrap()]);
    let inspect = tool("skopeo", &["inspect", "--raw", &format!("oci:{}:{build_id}", rd.display())]);
    let idx: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    // analytics (layers), edgeview (sealed: manifest without its layers) and edgeview's sealed artifact.
    assert_eq!(idx["manifests"].as_array().unwrap().len(), 3, "{idx}");
    assert!(inspect.contains(&edgeview_digest));
    assert_eq!(idx["manifests"][2]["artifactType"], "application/vnd.slotforge.sealed-image.v1", "{idx}");
    let meta = tool("skopeo", &["inspect", &format!("oci:{}:{build_id}", rd.display())]);
    assert!(meta.contains("\"Os\": \"linux\""), "{meta}");
    // analytics: manifest + config + 2 layers (one shared with edgeview); edgeview: manifest +
    // config, no layers; its artifact manifest + the empty config + the sealed blob; the build index.
    assert_eq!(std::fs::read_dir(rd.join("blobs/sha256")).unwrap().count(), 10);
    let md: serde_json::Value = serde_json::from_slice(&std::fs::read(rd.join("slotforge-images.json")).unwrap()).unwrap();
    assert_eq!(md["format"], 1);

    // inspect and verify read the same things back from the image.
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["inspect", out.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(r["slots"][0]["release"]["build_id"], build_id.as_str());
    assert_eq!(r["slots"][0]["cap"], 40 << 20);
    assert_eq!(r["slots"][1]["state"], "empty");
    assert_eq!(r["images"]["builds"][0]["build_id"], build_id.as_str());
    assert_eq!(r["esp"]["entries"][0]["file"], "slot-a.conf");
    assert_eq!(r["slots"][0]["rootfs_bytes"], summary["rootfs_bytes"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["verify", out.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn same_inputs_give_the_same_disk() {
    let fx = fixture();
    let a = fx.path().join("a.img");
    let b = fx.path().join("b.img");
    ok(&build(&fx, "demo.yaml", &a, &[]));
    std::thread::sleep(std::time::Duration::from_millis(1100)); // a new second for every clock read
    ok(&build(&fx, "demo.yaml", &b, &[]));
    assert_eq!(sha256_file(&a), sha256_file(&b));
    // A different SOURCE_DATE_EPOCH is a different (but again reproducible) image.
    let c = fx.path().join("c.img");
    let l = layouts().join("demo.yaml");
    let o = std::process::Command::new(bin())
        .args(["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", c.to_str().unwrap(), "-q"])
        .env("SOURCE_DATE_EPOCH", "1800000000")
        .output()
        .unwrap();
    ok(&o);
    assert_ne!(sha256_file(&a), sha256_file(&c));
}

#[test]
fn oversize_rootfs_is_refused_before_anything_is_written() {
    let fx = fixture();
    // A service so big the demo layout's 40 MiB cap cannot hold it.
    oci_image(&fx.path().join("images/huge"), "1", vec![(layer(&[E::File("data", noise(45 << 20, 9), 0o644)]), Comp::None)], &[]);
    let m = std::fs::read_to_string(fx.manifest()).unwrap().replace("services:\n", "services:\n  - name: huge\n    image: oci:images/huge:1\n");
    std::fs::write(fx.manifest(), m).unwrap();
    let out = fx.path().join("disk.img");
    let o = build(&fx, "demo.yaml", &out, &[]);
    assert_eq!(o.status.code(), Some(3), "a refusal, not a failure of the tool");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("refused: "), "{err}");
    assert!(err.contains("over the 41943040 byte (40.0 MiB) cap of layout demo generation 1"), "{err}");
    assert!(err.contains("huge"), "{err}");
    assert!(err.contains("Marking huge `ondisk: false`"), "{err}");
    assert!(!out.exists(), "output created for a refused build");
    let leftovers: Vec<_> = std::fs::read_dir(fx.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains("partial")).collect();
    assert!(leftovers.is_empty());
}

#[test]
fn an_existing_output_is_untouched_by_a_failed_build() {
    let fx = fixture();
    let out = fx.path().join("disk.img");
    std::fs::write(&out, b"previous image").unwrap();
    std::fs::write(fx.manifest(), MANIFEST.replace("oci:images/newlogd:1", "oci:images/missing:1")).unwrap();
    let o = build(&fx, "demo.yaml", &out, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("system.yml:12:12:"), "error must point at the image line: {err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous image");
}

#[test]
fn compat_generations_report_slack_and_refuse_what_does_not_fit() {
    let fx = fixture();
    let out = fx.path().join("disk.img");
    let v1 = layouts().join("edge-v1.yaml");
    let s: serde_json::Value = serde_json::from_str(&ok(&build(&fx, "edge-v2.yaml", &out, &["--compat", v1.to_str().unwrap()]))).unwrap();
    let caps = s["caps"].as_array().unwrap();
    assert_eq!(caps.len(), 2);
    assert_eq!(caps[0]["generation"], 2);
    assert_eq!(caps[1]["generation"], 1);
    assert_eq!(caps[1]["cap"], 290 << 20);
    assert_eq!(caps[1]["slack"].as_i64().unwrap(), (290 << 20) - s["rootfs_bytes"].as_i64().unwrap());
    // A tiny older generation the rootfs cannot fit: refused, naming that generation.
    let tiny = fx.path().join("tiny-v0.yaml");
    std::fs::write(&tiny, "name: tiny\ngeneration: 0\ndisk: {size: 64MiB}\npartitions:\n  - {name: esp, role: esp, size: 34MiB}\n  - {name: rootfs_a, role: rootfs, slot: a, size: 2MiB, fs_cap: 256KiB}\n  - {name: rootfs_b, role: rootfs, slot: b, size: 2MiB}\n  - {name: images, role: external-images, size: rest}\n").unwrap();
    let out2 = fx.path().join("disk2.img");
    let o = build(&fx, "edge-v2.yaml", &out2, &["--compat", tiny.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cap of layout tiny generation 0 partition rootfs_a"), "stderr: {err}");
    assert!(!out2.exists());
}

#[test]
fn malformed_manifest_and_layout_errors_name_file_line_and_column() {
    let fx = fixture();
    let out = fx.path().join("disk.img");
    std::fs::write(fx.manifest(), MANIFEST.replace("    env: [LOGLEVEL=debug]\n", "    env: [LOGLEVEL=debug\n")).unwrap();
    let o = build(&fx, "demo.yaml", &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    let m = fx.manifest();
    assert!(err.starts_with(&format!("error: {}:", m.display())), "{err}");
    let pos: Vec<u64> = err.trim_start_matches(&format!("error: {}:", m.display())).splitn(3, ':').take(2).map(|n| n.parse().unwrap()).collect();
    assert!(pos[0] >= 12, "line of the broken flow sequence: {err}");
    assert!(!out.exists());

    let fx = fixture();
    let bad = fx.path().join("bad.yaml");
    std::fs::write(&bad, "name: x\ndisk: {size: 1GiB}\npartitions:\n  - {name: esp, role: esp, size: 64MiB}\n  - {name: a, role: rootfs, slot: a, size: 100MiB}\n  - {name: b, role: rootfs, slot: a, size: 100MiB}\n").unwrap();
    let o = slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", bad.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("{}:6:", bad.display())) && err.contains("slot a is given to two rootfs partitions"), "{err}");
    assert!(!out.exists());
}

#[test]
fn path_traversing_layer_entry_is_refused() {
    for (name, bad) in [("dotdot", &b"../../etc/evil"[..]), ("absolute", &b"/etc/evil"[..])] {
        let fx = fixture();
        oci_image(&fx.path().join("images/newlogd"), "1", vec![(layer(&[E::RawFile(bad.to_vec(), b"pwned".to_vec())]), Comp::Gzip)], &[]);
        let out = fx.path().join("disk.img");
        let o = build(&fx, "demo.yaml", &out, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}");
        assert!(err.contains("oci:images/newlogd:1") && err.contains("sha256:") && err.contains(&String::from_utf8_lossy(bad).to_string()), "{name}: {err}");
        assert!(err.contains("outside the tree"), "{err}");
        assert!(!out.exists());
    }
    // Through a symlink: a layer that makes `evil -> /etc`, then writes `evil/passwd`.
    let fx = fixture();
    oci_image(&fx.path().join("images/newlogd"), "1", vec![(layer(&[E::Symlink("evil", "/etc"), E::File("evil/passwd", b"x".to_vec(), 0o644)]), Comp::Gzip)], &[]);
    let out = fx.path().join("disk.img");
    let o = build(&fx, "demo.yaml", &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("evil is a symlink; refusing to write through it"), "{err}");
}

fn blob_of(fx: &Fixture, image: &str, pick: impl Fn(&std::path::Path) -> bool) -> std::path::PathBuf {
    std::fs::read_dir(fx.path().join("images").join(image).join("blobs/sha256")).unwrap().map(|e| e.unwrap().path()).find(|p| pick(p)).unwrap()
}

#[test]
fn corrupt_or_truncated_blobs_are_refused() {
    // A flipped byte in an on-disk image's layer.
    let fx = fixture();
    let p = blob_of(&fx, "newlogd", |p| std::fs::metadata(p).unwrap().len() > 100_000);
    let mut data = std::fs::read(&p).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    std::fs::write(&p, &data).unwrap();
    let out = fx.path().join("disk.img");
    let o = build(&fx, "demo.yaml", &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && (err.contains("corrupt blob") || err.contains("corrupt deflate") || err.contains("invalid")), "{err}");
    assert!(!out.exists());

    // A truncated layer of an external image (copied, not flattened).
    let fx = fixture();
    let p = blob_of(&fx, "analytics", |p| std::fs::metadata(p).unwrap().len() > 400_000);
    let data = std::fs::read(&p).unwrap();
    std::fs::write(&p, &data[..data.len() / 2]).unwrap();
    let o = build(&fx, "demo.yaml", &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("truncated blob"), "{err}");
    assert!(!out.exists());

    // A tampered manifest.
    let fx = fixture();
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(fx.path().join("images/setup/index.json")).unwrap()).unwrap();
    let d = idx["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let mp = fx.path().join("images/setup/blobs/sha256").join(d);
    let m = std::fs::read_to_string(&mp).unwrap().replace("schemaVersion\":2", "schemaVersion\":3");
    std::fs::write(&mp, m).unwrap();
    let o = build(&fx, "demo.yaml", &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("corrupt blob"), "{err}");
}

#[test]
fn verify_catches_a_corrupted_blob_in_the_images_partition() {
    let fx = fixture();
    let out = fx.path().join("disk.img");
    ok(&build(&fx, "demo.yaml", &out, &[]));
    // The analytics layer is stored uncompressed: find a stretch of it on the disk and flip a byte.
    let needle = &noise(500_000, 8)[1000..1064];
    let mut disk = std::fs::read(&out).unwrap();
    let at = disk.windows(needle.len()).position(|w| w == needle).expect("layer bytes on disk");
    disk[at] ^= 0x55;
    std::fs::write(&out, &disk).unwrap();
    let o = slotforge(&["verify", out.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let failed: Vec<&serde_json::Value> = v["checks"].as_array().unwrap().iter().filter(|c| c["ok"] == false).collect();
    assert_eq!(failed.len(), 1, "{v}");
    assert_eq!(failed[0]["name"], "images-blobs");
}

#[test]
fn images_made_by_umoci_build() {
    let fx = fixture();
    let lay = fx.path().join("images/umoci-svc");
    let l = lay.to_str().unwrap();
    tool("umoci", &["init", "--layout", l]);
    tool("umoci", &["new", "--image", &format!("{l}:v1")]);
    let bundle = fx.path().join("bundle");
    tool("umoci", &["unpack", "--rootless", "--image", &format!("{l}:v1"), bundle.to_str().unwrap()]);
    std::fs::create_dir_all(bundle.join("rootfs/opt")).unwrap();
    std::fs::write(bundle.join("rootfs/opt/hello"), b"hello from umoci\n").unwrap();
    tool("umoci", &["repack", "--image", &format!("{l}:v1"), bundle.to_str().unwrap()]);
    tool("umoci", &["config", "--image", &format!("{l}:v1"), "--config.entrypoint", "/opt/hello"]);
    let m = MANIFEST.replace("oci:images/newlogd:1", "oci:images/umoci-svc:v1");
    std::fs::write(fx.manifest(), m).unwrap();
    let out = fx.path().join("disk.img");
    ok(&build(&fx, "demo.yaml", &out, &[]));
    let sq = fx.path().join("a.sqfs");
    extract_partition(&out, "rootfs_a", &sq);
    let l = tool("unsquashfs", &["-lln", sq.to_str().unwrap()]);
    assert!(l.contains("/containers/services/newlogd/lower/opt/hello"), "{l}");
}

#[test]
fn linuxkit_kernel_keys_and_metadata_files() {
    // ucode: prepended to the initrd on the ESP; tar: "" turns the modules tarball off;
    // files: metadata: json writes the manifest's LinuxKit sections.
    let fx = fixture();
    let ktar = layer(&[E::File("lib/modules/6.1/virtio.ko", noise(2_000, 1), 0o644)]);
    let (ucode, initrd) = (noise(3_000, 8), noise(50_000, 3));
    oci_image(
        &fx.path().join("images/kernel"),
        "6.1",
        vec![(layer(&[E::File("kernel", noise(300_000, 2), 0o644), E::File("initrd.img", initrd.clone(), 0o644), E::File("kernel.tar", ktar, 0o644), E::File("ucode.cpio", ucode.clone(), 0o644)]), Comp::Gzip)],
        &[],
    );
    let m = MANIFEST.replace("  image: oci:images/kernel:6.1\n", "  image: oci:images/kernel:6.1\n  tar: \"\"\n  ucode: ucode.cpio\n").replace("files:\n", "files:\n  - path: etc/linuxkit-config\n    metadata: json\n    mode: \"0644\"\n");
    std::fs::write(fx.manifest(), m).unwrap();
    let out = fx.path().join("disk.img");
    ok(&build(&fx, "demo.yaml", &out, &[]));
    let esp = fx.path().join("esp.img");
    extract_partition(&out, "esp", &esp);
    let got = fx.path().join("initrd");
    tool("mcopy", &["-i", esp.to_str().unwrap(), "::/a/initrd.img", got.to_str().unwrap()]);
    assert_eq!(std::fs::read(&got).unwrap(), [ucode, initrd].concat(), "the microcode cpio leads the initrd");
    let sq = fx.path().join("a.sqfs");
    extract_partition(&out, "rootfs_a", &sq);
    let x = tempfile::tempdir().unwrap();
    let dest = x.path().join("r");
    tool("unsquashfs", &["-d", dest.to_str().unwrap(), sq.to_str().unwrap()]);
    assert!(!dest.join("lib/modules").exists(), "tar: \"\" means no modules tarball");
    let md: serde_json::Value = serde_json::from_slice(&std::fs::read(dest.join("etc/linuxkit-config")).unwrap()).unwrap();
    assert_eq!(md["kernel"]["ucode"], "ucode.cpio");
    assert_eq!(md["onboot"][0]["name"], "setup");
    assert!(md["services"].as_array().unwrap().iter().any(|s| s["name"] == "edgeview" && s["ondisk"] == false), "{md}");
    assert!(md.get("boot").is_none(), "only LinuxKit's sections: {md}");
    // Each container's runtime.json, as LinuxKit writes it (every key, the root's mounts first).
    let rt: serde_json::Value = serde_json::from_slice(&std::fs::read(dest.join("containers/onboot/000-setup/runtime.json")).unwrap()).unwrap();
    assert_eq!(rt["mounts"][2]["destination"], "/containers/onboot/000-setup/rootfs");
    assert_eq!(rt["mounts"][2]["options"][0], "lowerdir=/containers/onboot/000-setup/lower");
    assert_eq!(rt["bindNS"]["net"], "");
}

/// LinuxKit reads `files: source: ~/REST` from the home directory (its sshd example's
/// `~/.ssh/id_rsa.pub`), and skips an `optional` source it cannot read.
#[test]
fn files_source_tilde_is_the_home_directory_and_optional_may_be_absent() {
    let fx = fixture();
    let home = fx.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(home.join(".ssh/id.pub"), "ssh-ed25519 AAAA test@home\n").unwrap();
    let m = std::fs::read_to_string(fx.manifest()).unwrap().replace(
        "files:\n",
        "files:\n  - path: root/.ssh/authorized_keys\n    source: ~/.ssh/id.pub\n    mode: \"0600\"\n  - path: etc/absent\n    source: ~/.ssh/none\n    optional: true\n",
    );
    std::fs::write(fx.manifest(), m).unwrap();
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    let run = || std::process::Command::new(bin()).args(["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]).env("HOME", &home).output().unwrap();
    ok(&run());
    let sq = fx.path().join("a.sqfs");
    extract_partition(&out, "rootfs_a", &sq);
    let x = tempfile::tempdir().unwrap();
    let dest = x.path().join("r");
    tool("unsquashfs", &["-d", dest.to_str().unwrap(), sq.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(dest.join("root/.ssh/authorized_keys")).unwrap(), "ssh-ed25519 AAAA test@home\n");
    assert!(!dest.join("etc/absent").exists(), "an optional source that cannot be read is skipped");
    // Without the key under $HOME it is an error naming the expanded path, nothing written.
    std::fs::remove_file(home.join(".ssh/id.pub")).unwrap();
    std::fs::remove_file(&out).unwrap();
    let o = run();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&home.join(".ssh/id.pub").display().to_string()), "{err}");
    assert!(!out.exists());
}

/// LinuxKit's `volumes:` as LinuxKit lays them out: `/containers/volumes/NAME/{lower,merged}`
/// (+ `tmp` when writable), `lower` holding the image's files or (`format: oci`) the image as an
/// OCI layout skopeo reads; binds and mounts naming a volume bound from its `merged` directory;
/// a read-only volume bound read-write, or an unknown one, refused with file:line:column and
/// nothing written.
#[test]
fn volumes_are_laid_out_and_bound_as_linuxkit_does() {
    let fx = fixture();
    let m = std::fs::read_to_string(fx.manifest()).unwrap();
    let with = |binds: &str| {
        m.replace("    image: oci:images/setup:1\n", &format!("    image: oci:images/setup:1\n{binds}"))
            .replace("files:\n", "volumes:\n  - name: scratch\n  - name: tools\n    image: oci:images/setup:1\n    readonly: true\n  - name: layout\n    image: oci:images/newlogd:1\n    format: oci\n    readonly: true\nfiles:\n")
    };
    std::fs::write(fx.manifest(), with("    binds.add: [\"scratch:/scratch\", \"tools:/tools:ro\"]\n    mounts:\n      - {type: bind, source: layout, destination: /layout, options: [rbind, ro]}\n")).unwrap();
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]));
    let sq = fx.path().join("a.sqfs");
    extract_partition(&out, "rootfs_a", &sq);
    let x = tempfile::tempdir().unwrap();
    let dest = x.path().join("r");
    tool("unsquashfs", &["-d", dest.to_str().unwrap(), sq.to_str().unwrap()]);
    let v = dest.join("containers/volumes");
    for d in ["scratch/lower", "scratch/merged", "scratch/tmp", "tools/lower", "tools/merged", "layout/lower", "layout/merged"] {
        assert!(v.join(d).is_dir(), "{d}");
    }
    assert!(!v.join("tools/tmp").exists() && !v.join("layout/tmp").exists(), "a read-only volume has no tmp: that is how the init tells");
    assert_eq!(std::fs::read_dir(v.join("scratch/lower")).unwrap().count(), 0, "an image-less volume is empty");
    assert_eq!(std::fs::read(v.join("tools/lower/bin/setup")).unwrap(), b"#!/bin/sh\n", "format: filesystem holds the image's files");
    let inspect = tool("skopeo", &["inspect", &format!("oci:{}:oci:images/newlogd:1", v.join("layout/lower").display())]);
    let j: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(j["Layers"].as_array().unwrap().len(), 1, "format: oci holds the image as a layout skopeo reads: {j}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dest.join("containers/onboot/000-setup/config.json")).unwrap()).unwrap();
    let mounts = cfg["mounts"].as_array().unwrap();
    let src = |d: &str| mounts.iter().find(|m| m["destination"] == d).map(|m| m["source"].as_str().unwrap().to_string());
    assert_eq!(src("/scratch").as_deref(), Some("/containers/volumes/scratch/merged"));
    assert_eq!(src("/tools").as_deref(), Some("/containers/volumes/tools/merged"));
    assert_eq!(src("/layout").as_deref(), Some("/containers/volumes/layout/merged"));

    // A read-only volume bound read-write, or a volume that does not exist: refused, nothing written.
    for (binds, want) in [("    binds: [\"tools:/tools\"]\n", "volume tools is read-only"), ("    binds: [\"nope:/n\"]\n", "volume nope not found")] {
        std::fs::write(fx.manifest(), with(binds)).unwrap();
        std::fs::remove_file(&out).ok();
        let o = slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want) && err.contains("system.yml:8:5"), "{binds}: {err}");
        assert!(!out.exists());
        // `check` finds it too, without fetching anything.
        let c = slotforge(&["check", fx.manifest().to_str().unwrap()]);
        assert!(!c.status.success() && String::from_utf8_lossy(&c.stderr).contains(want), "check: {}", String::from_utf8_lossy(&c.stderr));
    }
}

/// The build cache: a sealed external image is sealed once and reused bit-identically (hit and
/// miss counted in `--json`'s `cache`); a corrupted entry is detected, dropped and rebuilt with
/// the disk unchanged; two builds sharing one cache at once both succeed with the same disk;
/// `cache prune` empties it and `cache stats` says so.
#[test]
fn the_build_cache_reuses_sealed_images_and_never_a_corrupt_one() {
    let fx = fixture();
    let l = layouts().join("demo.yaml");
    let cache = fx.path().join("cache");
    let build = |out: &str, cache: &Path| -> (serde_json::Value, String) {
        let out = fx.path().join(out);
        let o = slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json", "--cache", cache.to_str().unwrap()]);
        let j: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        (j["cache"].clone(), sha256_file(&out))
    };
    let counts = |c: &serde_json::Value| (c["sealed_hits"].as_u64().unwrap(), c["sealed_misses"].as_u64().unwrap(), c["sealed_dropped"].as_u64().unwrap());
    let (c, cold) = build("cold.img", &cache);
    assert_eq!(counts(&c), (0, 1, 0), "one sealed image (edgeview), sealed and stored: {c}");
    let made = c["blocks_compressed"].as_u64().unwrap();
    assert!(made > 0 && c["blocks_reused"] == 0, "{c}");
    let (c, warm) = build("warm.img", &cache);
    assert_eq!(counts(&c), (1, 0, 0), "{c}");
    assert_eq!((c["blocks_reused"].as_u64().unwrap(), c["blocks_compressed"].as_u64().unwrap()), (made, 0), "every rootfs block from the cache: {c}");
    assert_eq!(warm, cold, "a rebuild from the cache is bit-identical");

    // A corrupt block entry: detected, dropped, its blocks compressed again; the disk unchanged.
    let mut entries: Vec<_> = walk_files(&cache.join("build/blocks"));
    entries.sort();
    let victim = &entries[0];
    let mut b = std::fs::read(victim).unwrap();
    *b.last_mut().unwrap() ^= 1;
    std::fs::write(victim, b).unwrap();
    let (c, again) = build("blocks-again.img", &cache);
    assert_eq!(c["blocks_dropped"], 1, "{c}");
    assert!(c["blocks_compressed"].as_u64().unwrap() >= 1, "{c}");
    assert_eq!(again, cold, "a corrupt block entry never reaches the disk");

    // Corrupt the cached sealed file: detected on the way out, dropped, sealed again.
    let stats = |cache: &Path| -> serde_json::Value { serde_json::from_str(&ok(&slotforge(&["cache", "stats", "--json", "--cache", cache.to_str().unwrap()]))).unwrap() };
    let s = stats(&cache);
    assert_eq!(s["sealed_entries"], 1, "{s}");
    let rec = std::fs::read_dir(cache.join("build/sealed")).unwrap().next().unwrap().unwrap().path();
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    let blob = cache.join("blobs/sha256").join(r["sealed"]["digest"].as_str().unwrap().trim_start_matches("sha256:"));
    let mut b = std::fs::read(&blob).unwrap();
    b[5000] ^= 0x40;
    std::fs::write(&blob, b).unwrap();
    let (c, again) = build("again.img", &cache);
    assert_eq!(counts(&c), (0, 0, 1), "the corrupt entry is dropped and rebuilt: {c}");
    assert_eq!(again, cold, "never written into a disk");
    assert_eq!(counts(&build("again2.img", &cache).0), (1, 0, 0), "the rebuilt entry serves the next build");

    // Two builds sharing one empty cache at once.
    let shared = fx.path().join("shared");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| build("p1.img", &shared));
        let b = s.spawn(|| build("p2.img", &shared));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!((a.1.as_str(), b.1.as_str()), (cold.as_str(), cold.as_str()), "concurrent builds on one cache: {:?} {:?}", a.0, b.0);
    assert_eq!(stats(&shared)["sealed_entries"], 1);

    // One file changed: only its blocks (and the fragment block it sits in) are compressed again.
    let m = std::fs::read_to_string(fx.manifest()).unwrap();
    std::fs::write(fx.manifest(), m.replace("contents: appliance", "contents: appliance-2")).unwrap();
    let (c, _) = build("changed.img", &cache);
    assert!(c["blocks_compressed"].as_u64().unwrap() <= 3 && c["blocks_reused"].as_u64().unwrap() + 3 >= made, "{c}");
    std::fs::write(fx.manifest(), m).unwrap();

    // Prune to nothing: the next build misses.
    let p: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["cache", "prune", "--max-bytes", "0", "--json", "--cache", cache.to_str().unwrap()]))).unwrap();
    assert!(p["dropped_entries"].as_u64().unwrap() > 1, "the sealed image and the blocks: {p}");
    assert_eq!(stats(&cache)["sealed_entries"], 0);
    assert_eq!(stats(&cache)["block_entries"], 0);
    assert_eq!(counts(&build("after-prune.img", &cache).0), (0, 1, 0));
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
