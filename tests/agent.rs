//! The agent on the host, against a disk's partitions unpacked with the standard tools
//! (unsquashfs, debugfs rdump, mtools): status, pull-on-miss from a real registry, corrupt-blob
//! repair, the degraded policy, mark-good. The same binary runs in the QEMU guest (qemu-tests/).

mod common;
use common::registry::TestRegistry;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Device {
    root: PathBuf,
    esp: PathBuf,
    images: PathBuf,
    run: PathBuf,
    cmdline: PathBuf,
}

/// Unpack `disk` as a booted device would see it.
fn device(fx: &Fixture, disk: &Path) -> Device {
    let d = fx.path().join("device");
    let (root, esp, images, run) = (d.join("root"), d.join("esp"), d.join("images"), d.join("run"));
    std::fs::create_dir_all(&esp).unwrap();
    std::fs::create_dir_all(&images).unwrap();
    let part = |name: &str| {
        let p = d.join(format!("{name}.img"));
        extract_partition(disk, name, &p);
        p
    };
    tool("unsquashfs", &["-q", "-d", root.to_str().unwrap(), part("rootfs_a").to_str().unwrap()]);
    tool("debugfs", &["-R", &format!("rdump / {}", images.display()), part("images").to_str().unwrap()]);
    tool("mcopy", &["-s", "-i", part("esp").to_str().unwrap(), "::/loader", esp.to_str().unwrap()]);
    let rel: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join("etc/slotforge/release.json")).unwrap()).unwrap();
    let cmdline = d.join("cmdline");
    std::fs::write(&cmdline, format!("root=PARTLABEL=rootfs_a ro slotforge.slot=a slotforge.build={} console=ttyS0\n", rel["build_id"].as_str().unwrap())).unwrap();
    Device { root, esp, images, run, cmdline }
}

fn agent(dev: &Device, args: &[&str]) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let o = Command::new(bin())
        .arg("agent")
        .args(args)
        .args(["--root", dev.root.to_str().unwrap(), "--esp", dev.esp.to_str().unwrap(), "--images", dev.images.to_str().unwrap()])
        .args(["--run-dir", dev.run.to_str().unwrap(), "--cmdline", dev.cmdline.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let events = out.lines().filter_map(|l| l.strip_prefix("@slotforge ")).map(|l| serde_json::from_str(l).unwrap()).collect();
    (o.status.code(), events, format!("{out}{}", String::from_utf8_lossy(&o.stderr)))
}

/// The fixture's manifest with edgeview unsealed too: these tests drive the unpack path on the
/// host (opening a sealed image needs device-mapper, which the QEMU tests have).
fn unsealed() -> String {
    MANIFEST.replace("    image: oci:images/edgeview:1.2\n    ondisk: false\n", "    image: oci:images/edgeview:1.2\n    ondisk: false\n    sealed: false\n")
}

fn ev<'a>(events: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

fn build(fx: &Fixture, extra: &[&str]) -> PathBuf {
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    let cache = fx.path().join("cache");
    let m = fx.manifest();
    let mut args = vec!["build", m.to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q", "--cache", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(&slotforge(&args));
    out
}

#[test]
fn a_fresh_disk_verifies_prepares_and_marks_good() {
    let fx = fixture();
    std::fs::write(fx.manifest(), unsealed()).unwrap();
    let disk = build(&fx, &["--boot-tries", "3"]);
    let dev = device(&fx, &disk);
    // systemd-boot would have renamed the entry before starting the kernel.
    std::fs::rename(dev.esp.join("loader/entries/slot-a+3.conf"), dev.esp.join("loader/entries/slot-a+2-1.conf")).unwrap();
    let (code, events, all) = agent(&dev, &["boot"]);
    assert_eq!(code, Some(0), "{all}");
    let checks = ev(&events, "image-check");
    assert_eq!(checks.len(), 2);
    assert!(checks.iter().all(|c| c["state"] == "verified"), "{all}");
    assert_eq!(ev(&events, "image-ready").len(), 2);
    assert_eq!(ev(&events, "marked-good")[0]["entry"], "slot-a.conf");
    assert!(dev.esp.join("loader/entries/slot-a.conf").exists());
    // The prepared tree is the image's content.
    assert_eq!(std::fs::read(dev.run.join("containers/edgeview/rootfs/bin/edgeview")).unwrap(), noise(600_000, 7));
    let status = ev(&events, "status")[0];
    assert_eq!(status["state"], "ok");
    assert_eq!(status["slot"], "a");
    assert_eq!(status["slots"][0]["boot"], "good");
    assert_eq!(status["slots"][1]["boot"], "none");
}

#[test]
fn a_missing_image_is_pulled_from_the_registry_and_kept() {
    let fx = fixture();
    let reg = TestRegistry::start(None);
    reg.push(&fx.path().join("images/edgeview"), "1.2", "edgeview:1.2");
    reg.push(&fx.path().join("images/analytics"), "3", "analytics:3");
    // External images come from the registry; edgeview is not pre-filled.
    let m = unsealed().replace("oci:images/edgeview:1.2", &format!("{}/edgeview:1.2", reg.host())).replace("oci:images/analytics:3", &format!("{}/analytics:3", reg.host()));
    std::fs::write(fx.manifest(), m).unwrap();
    let disk = build(&fx, &["--no-prefill", "edgeview"]);
    let dev = device(&fx, &disk);
    let (code, _, all) = agent(&dev, &["status"]);
    assert_eq!(code, Some(0), "{all}");
    let st: serde_json::Value = serde_json::from_str(&all[..all.rfind('}').unwrap() + 1]).unwrap();
    assert_eq!(st["state"], "degraded");
    let ev_state = st["images"].as_array().unwrap().iter().find(|i| i["name"] == "edgeview").unwrap();
    assert_eq!(ev_state["state"], "missing");
    let (code, events, all) = agent(&dev, &["boot", "--offline"]);
    assert_eq!(code, Some(3), "degraded exits 3: {all}");
    assert_eq!(ev(&events, "degraded")[0]["unavailable"], serde_json::json!(["edgeview"]));
    assert!(ev(&events, "marked-good").is_empty());
    let (code, events, all) = agent(&dev, &["boot"]);
    assert_eq!(code, Some(0), "{all}");
    assert_eq!(ev(&events, "image-pulled")[0]["name"], "edgeview");
    assert_eq!(ev(&events, "image-pulled")[0]["state"], "verified");
    // Kept: the next boot, with no network, finds it present and verified.
    let (code, events, all) = agent(&dev, &["boot", "--offline"]);
    assert_eq!(code, Some(0), "{all}");
    assert!(ev(&events, "image-check").iter().all(|c| c["state"] == "verified"), "{all}");
    // And skopeo reads the repaired layout: the build's set lists both images.
    let rel: serde_json::Value = serde_json::from_slice(&std::fs::read(dev.root.join("etc/slotforge/release.json")).unwrap()).unwrap();
    let raw = tool("skopeo", &["inspect", "--raw", &format!("oci:{}:{}", dev.images.display(), rel["build_id"].as_str().unwrap())]);
    assert!(raw.contains(&reg.digest("edgeview:1.2")) && raw.contains(&reg.digest("analytics:3")), "{raw}");
}

#[test]
fn a_corrupt_blob_is_detected_repulled_or_reported_degraded() {
    let fx = fixture();
    let reg = TestRegistry::start(None);
    reg.push(&fx.path().join("images/analytics"), "3", "analytics:3");
    std::fs::write(fx.manifest(), unsealed().replace("oci:images/analytics:3", &format!("{}/analytics:3", reg.host()))).unwrap();
    let disk = build(&fx, &[]);
    let dev = device(&fx, &disk);
    // Corrupt the analytics layer (uncompressed, 500 kB) in the partition.
    let needle = &noise(500_000, 8)[..64];
    let big = std::fs::read_dir(dev.images.join("blobs/sha256")).unwrap().map(|e| e.unwrap().path()).find(|p| std::fs::read(p).unwrap().windows(64).any(|w| w == needle)).unwrap();
    let mut data = std::fs::read(&big).unwrap();
    data[1000] ^= 1;
    std::fs::write(&big, &data).unwrap();
    let (code, events, all) = agent(&dev, &["boot", "--offline"]);
    assert_eq!(code, Some(3), "{all}");
    let a = ev(&events, "image-check").into_iter().find(|c| c["name"] == "analytics").unwrap();
    assert_eq!(a["state"], "corrupt");
    assert!(!dev.run.join("containers/analytics/rootfs").exists(), "an unverified image was prepared");
    let (code, events, all) = agent(&dev, &["boot"]);
    assert_eq!(code, Some(0), "{all}");
    assert_eq!(ev(&events, "image-pulled")[0]["state"], "verified");
    assert!(dev.run.join("containers/analytics/rootfs/bin/analytics").exists());
}

#[test]
fn an_image_that_fails_to_prepare_makes_the_boot_degraded_with_exit_3() {
    let fx = fixture();
    std::fs::write(fx.manifest(), unsealed()).unwrap();
    let disk = build(&fx, &["--boot-tries", "3"]);
    let dev = device(&fx, &disk);
    std::fs::rename(dev.esp.join("loader/entries/slot-a+3.conf"), dev.esp.join("loader/entries/slot-a+2-1.conf")).unwrap();
    // The run directory cannot hold the prepared trees (a file stands where it must go).
    std::fs::create_dir_all(&dev.run).unwrap();
    std::fs::write(dev.run.join("containers"), b"not a directory").unwrap();
    let (code, events, all) = agent(&dev, &["boot"]);
    assert!(!ev(&events, "image-prepare-failed").is_empty(), "{all}");
    assert_eq!(code, Some(3), "docs/agent.md: degraded exits 3\n{all}");
    let status = ev(&events, "status")[0];
    assert_eq!(status["state"], "degraded", "{status}");
    assert!(ev(&events, "marked-good").is_empty(), "a degraded boot is not marked good");
    assert!(dev.esp.join("loader/entries/slot-a+2-1.conf").exists());
}

#[test]
fn a_missing_sealed_image_is_rebuilt_from_the_pulled_image_bit_identically() {
    let fx = fixture();
    let reg = TestRegistry::start(None);
    reg.push(&fx.path().join("images/edgeview"), "1.2", "edgeview:1.2");
    std::fs::write(fx.manifest(), MANIFEST.replace("oci:images/edgeview:1.2", &format!("{}/edgeview:1.2", reg.host()))).unwrap();
    let full = build(&fx, &[]);
    let pinned: serde_json::Value = {
        let d = device(&fx, &full);
        let ext: serde_json::Value = serde_json::from_slice(&std::fs::read(d.root.join("etc/slotforge/external-images.json")).unwrap()).unwrap();
        ext["images"].as_array().unwrap().iter().find(|i| i["name"] == "edgeview").unwrap()["sealed"].clone()
    };
    std::fs::remove_dir_all(fx.path().join("device")).unwrap();
    let disk = build(&fx, &["--no-prefill", "edgeview"]);
    let dev = device(&fx, &disk);
    let sealed_blob = dev.images.join("blobs/sha256").join(pinned["digest"].as_str().unwrap().trim_start_matches("sha256:"));
    assert!(!sealed_blob.exists());
    let (_, events, all) = agent(&dev, &["boot"]);
    // Pulled by digest, sealed on the device with the build's code: the same bytes, so the same
    // root hash (a different result would be refused).
    let pulled = ev(&events, "image-pulled").into_iter().find(|e| e["name"] == "edgeview").unwrap_or_else(|| panic!("{all}"));
    assert_eq!(pulled["state"], "verified", "{all}");
    assert_eq!(pulled["sealed"], pinned["root_hash"]);
    assert_eq!(sha256_file(&sealed_blob), pinned["digest"].as_str().unwrap());
    let f = sealed_blob.to_str().unwrap();
    tool("veritysetup", &["verify", f, f, pinned["root_hash"].as_str().unwrap(), &format!("--hash-offset={}", pinned["hash_offset"])]);
    // Opening it needs device-mapper: this host may lack it (the QEMU tests open and mount it).
    let opened = ev(&events, "image-ready").into_iter().any(|e| e["name"] == "edgeview");
    let refused = ev(&events, "image-prepare-failed").into_iter().any(|e| e["name"] == "edgeview" && e["error"].as_str().unwrap_or("").contains("dm-verity"));
    assert!(opened || refused, "{all}");
    // The layers it was sealed from are left to GC (no keep-layers): GC drops edgeview's own
    // layer, keeps the one analytics (unsealed) shares, and keeps the sealed blob.
    let man: serde_json::Value = serde_json::from_slice(&std::fs::read(dev.images.join("blobs/sha256").join(reg.digest("edgeview:1.2").trim_start_matches("sha256:"))).unwrap()).unwrap();
    let layer = |i: usize| dev.images.join("blobs/sha256").join(man["layers"][i]["digest"].as_str().unwrap().trim_start_matches("sha256:"));
    assert!(layer(0).exists() && layer(1).exists(), "pulled layers are in the partition");
    let (code, events, all) = agent(&dev, &["gc"]);
    assert_eq!(code, Some(0), "{all}");
    let _ = events;
    assert!(layer(0).exists(), "the layer analytics shares was collected");
    assert!(!layer(1).exists(), "edgeview's own layer was kept without keep-layers");
    assert!(sealed_blob.exists());
    let rel: serde_json::Value = serde_json::from_slice(&std::fs::read(dev.root.join("etc/slotforge/release.json")).unwrap()).unwrap();
    let raw = tool("skopeo", &["inspect", "--raw", &format!("oci:{}:{}", dev.images.display(), rel["build_id"].as_str().unwrap())]);
    assert!(raw.contains(pinned["artifact"].as_str().unwrap()), "{raw}");
}

#[test]
fn a_missing_sealed_image_is_fetched_as_its_sealed_artifact_where_the_registry_has_it() {
    let fx = fixture();
    let reg = TestRegistry::start(None);
    reg.push(&fx.path().join("images/edgeview"), "1.2", "edgeview:1.2");
    let manifest = MANIFEST.replace("oci:images/edgeview:1.2", &format!("{}/edgeview:1.2", reg.host()));
    // Lazy start off: this test is about the whole fetch (the QEMU tests start images lazily).
    std::fs::write(fx.manifest(), manifest.replace("files:\n", "files:\n  - path: etc/slotforge/agent.json\n    contents: '{\"lazy\": false}'\n")).unwrap();
    // The release published with its sealed images next to their images.
    let tar = fx.path().join("v.tar");
    let (mf, l) = (fx.manifest(), layouts().join("demo.yaml"));
    ok(&slotforge(&["bundle", mf.to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", tar.to_str().unwrap(), "-q", "--cache", fx.path().join("cache").to_str().unwrap()]));
    let pushed: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["push", tar.to_str().unwrap(), &format!("{}/releases:1", reg.host()), "--next-to-images", "--json"]))).unwrap();
    assert_eq!(pushed["next_to_images"], serde_json::json!([format!("{}/edgeview", reg.host())]), "{pushed}");
    let disk = build(&fx, &["--no-prefill", "edgeview"]);
    let dev = device(&fx, &disk);
    let ext: serde_json::Value = serde_json::from_slice(&std::fs::read(dev.root.join("etc/slotforge/external-images.json")).unwrap()).unwrap();
    let pinned = ext["images"].as_array().unwrap().iter().find(|i| i["name"] == "edgeview").unwrap()["sealed"].clone();
    let sealed_blob = dev.images.join("blobs/sha256").join(pinned["digest"].as_str().unwrap().trim_start_matches("sha256:"));
    assert!(!sealed_blob.exists());
    let (_, events, all) = agent(&dev, &["boot"]);
    let pulled = ev(&events, "image-pulled").into_iter().find(|e| e["name"] == "edgeview").unwrap_or_else(|| panic!("{all}"));
    assert_eq!(pulled["state"], "verified", "{all}");
    assert_eq!(sha256_file(&sealed_blob), pinned["digest"].as_str().unwrap());
    assert!(ev(&events, "image-resealed").is_empty(), "not rebuilt: {all}");
    // Not one of its layers travelled: only the manifest, config, artifact and sealed blob.
    let man: serde_json::Value = serde_json::from_slice(&std::fs::read(dev.images.join("blobs/sha256").join(reg.digest("edgeview:1.2").trim_start_matches("sha256:"))).unwrap()).unwrap();
    let own_layer = dev.images.join("blobs/sha256").join(man["layers"][1]["digest"].as_str().unwrap().trim_start_matches("sha256:"));
    assert!(!own_layer.exists(), "edgeview's layer was not fetched");
    assert!(dev.images.join("blobs/sha256").join(pinned["artifact"].as_str().unwrap().trim_start_matches("sha256:")).exists());
}
