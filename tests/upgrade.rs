//! Bundles and offline upgrades of disk image files: what is written where, what is refused
//! (and that a refusal changes nothing), across layout generations; read back with inspect,
//! verify and skopeo.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn build(fx: &Fixture, layout: &str, out: &Path) {
    let l = layouts().join(layout);
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]));
}

fn bundle(fx: &Fixture, layout: &str, compat: Option<&str>, out: &Path) -> serde_json::Value {
    let l = layouts().join(layout);
    let mut args = vec!["bundle".to_string(), fx.manifest().display().to_string(), "--layout".into(), l.display().to_string(), "-o".into(), out.display().to_string(), "--json".into()];
    if let Some(c) = compat {
        args.push("--compat".into());
        args.push(layouts().join(c).display().to_string());
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    serde_json::from_str(&ok(&slotforge(&a))).unwrap()
}

fn inspect(disk: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&slotforge(&["inspect", disk.to_str().unwrap(), "--json"]))).unwrap()
}

/// A second release: a changed edgeview (new top layer) and version 1.5.0.
fn release2(fx: &Fixture) {
    oci_image(
        &fx.path().join("images/edgeview"),
        "1.3",
        vec![(layer(&[E::File("lib/libshared.so", noise(300_000, 6), 0o644)]), Comp::Gzip), (layer(&[E::File("bin/edgeview", noise(650_000, 70), 0o755)]), Comp::Zstd)],
        &["/bin/edgeview"],
    );
    std::fs::write(fx.manifest(), MANIFEST.replace("version: 1.4.0", "version: 1.5.0").replace("edgeview:1.2", "edgeview:1.3")).unwrap();
}

#[test]
fn offline_upgrade_writes_slot_b_only_new_blobs_and_a_counted_entry() {
    let fx = fixture();
    let disk = fx.path().join("disk.img");
    build(&fx, "demo.yaml", &disk);
    let before = inspect(&disk);
    let b1 = before["slots"][0]["release"]["build_id"].as_str().unwrap().to_string();
    release2(&fx);
    let tar = fx.path().join("update.oci.tar");
    let s = bundle(&fx, "demo.yaml", None, &tar);
    // The bundle is an OCI layout skopeo reads: the external image is addressable in it.
    let listing = tool("tar", &["tf", tar.to_str().unwrap()]);
    assert!(listing.contains("oci-layout") && listing.contains("index.json"));
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), tar.to_str().unwrap(), "--json"]);
    let r: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(r["slot"], "b");
    assert_eq!(r["entry"], "slot-b+3.conf");
    assert_eq!(r["install_number"], 2);
    // Shared blobs (analytics, the shared layer, the empty config) were already there: only
    // edgeview's new manifest, config, sealed artifact manifest and sealed image are written
    // (sealed without keep-layers: its layers are not stored).
    assert_eq!(r["blobs_written"], 4, "{r}");
    let after = inspect(&disk);
    assert_eq!(after["slots"][1]["release"]["build_id"], s["build_id"]);
    assert_eq!(after["slots"][0]["release"]["build_id"], b1.as_str(), "slot a untouched");
    let files: Vec<&str> = after["esp"]["entries"].as_array().unwrap().iter().map(|e| e["file"].as_str().unwrap()).collect();
    assert_eq!(files, ["slot-a.conf", "slot-b+3.conf"]);
    let builds: Vec<&str> = after["images"]["builds"].as_array().unwrap().iter().map(|b| b["build_id"].as_str().unwrap()).collect();
    assert!(builds.contains(&b1.as_str()) && builds.contains(&s["build_id"].as_str().unwrap()), "{builds:?}");
    let v: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["verify", disk.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    // Real readers still agree.
    tool("sgdisk", &["-v", disk.to_str().unwrap()]);
    let esp = fx.path().join("esp.img");
    extract_partition(&disk, "esp", &esp);
    tool("fsck.vfat", &["-n", esp.to_str().unwrap()]);
    let ext = fx.path().join("images.img");
    extract_partition(&disk, "images", &ext);
    tool("e2fsck", &["-fn", ext.to_str().unwrap()]);
    let entry = tool("mtype", &["-i", esp.to_str().unwrap(), "::/loader/entries/slot-b+3.conf"]);
    assert!(entry.contains("version 2\n") && entry.contains("systemd.verity_root_data=PARTLABEL=rootfs_b") && entry.contains("slotforge.slot=b"), "{entry}");
    // The new slot's tree, read with the parameters on its entry, verifies with veritysetup.
    let root_hash = slotforge::format::cmdline::value(&entry, "roothash").unwrap();
    let offset = slotforge::format::cmdline::verity_of(entry.lines().find(|l| l.starts_with("options ")).unwrap()).unwrap().1;
    assert_eq!(after["slots"][1]["verity"]["root_hash"], root_hash.as_str());
    let slot_b = fx.path().join("rootfs_b.img");
    extract_partition(&disk, "rootfs_b", &slot_b);
    tool("veritysetup", &["verify", slot_b.to_str().unwrap(), slot_b.to_str().unwrap(), &root_hash, &format!("--hash-offset={offset}")]);
}

fn sha(p: &Path) -> String {
    sha256_file(p)
}

#[test]
fn bundles_that_do_not_fit_are_refused_and_change_nothing() {
    let fx = fixture();
    let disk = fx.path().join("disk.img");
    build(&fx, "demo.yaml", &disk);
    let before = sha(&disk);
    // A bundle for another product line / generation.
    let other = fx.path().join("edge.tar");
    bundle(&fx, "edge-v2.yaml", None, &other);
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), other.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is for edge generation 2, not this device's layout demo generation 1") && err.contains("nothing was changed"), "{err}");
    assert_eq!(sha(&disk), before);
    // A bundle whose rootfs is bigger than the demo slots, for a layout that claims the demo
    // name and generation but larger slots (a mislabelled bundle): refused by the cap check.
    let big = fx.path().join("big.yaml");
    std::fs::write(&big, std::fs::read_to_string(layouts().join("demo.yaml")).unwrap().replace("disk: {size: 256MiB}", "disk: {size: 512MiB}").replace("size: 48MiB, fs_cap: 40MiB", "size: 120MiB, fs_cap: 100MiB")).unwrap();
    oci_image(&fx.path().join("images/huge"), "1", vec![(layer(&[E::File("data", noise(45 << 20, 9), 0o644)]), Comp::None)], &[]);
    std::fs::write(fx.manifest(), MANIFEST.replace("services:\n", "services:\n  - name: huge\n    image: oci:images/huge:1\n")).unwrap();
    // `bundle` itself refuses it against the real demo layout…
    let tar = fx.path().join("huge.tar");
    let l = layouts().join("demo.yaml");
    let o = slotforge(&["bundle", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", tar.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("over the"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!tar.exists());
    // …and `upgrade` refuses the mislabelled one.
    let o = slotforge(&["bundle", fx.manifest().to_str().unwrap(), "--layout", big.to_str().unwrap(), "-o", tar.to_str().unwrap(), "-q"]);
    ok(&o);
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), tar.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("slot b (rootfs_b) holds at most 41943040 bytes") && err.contains("nothing was changed"), "{err}");
    assert_eq!(sha(&disk), before);
}

#[test]
fn an_older_generation_takes_a_bundle_built_to_stay_compatible_with_it() {
    let fx = fixture();
    let disk: PathBuf = fx.path().join("v1.img");
    build(&fx, "edge-v1.yaml", &disk);
    release2(&fx);
    let tar = fx.path().join("n.tar");
    let s = bundle(&fx, "edge-v2.yaml", Some("edge-v1.yaml"), &tar);
    assert_eq!(s["requires"]["layouts"].as_array().unwrap().len(), 2);
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), tar.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(r["slot"], "b");
    let after = inspect(&disk);
    assert_eq!(after["slots"][1]["release"]["version"], "1.5.0");
    assert_eq!(after["layout"]["generation"], 1);
    // Without --compat the same release is refused by the generation-1 device.
    let tar2 = fx.path().join("v2only.tar");
    bundle(&fx, "edge-v2.yaml", None, &tar2);
    let disk2 = fx.path().join("v1b.img");
    build(&fx, "edge-v1.yaml", &disk2);
    let o = slotforge(&["upgrade", disk2.to_str().unwrap(), tar2.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not this device's layout edge generation 1"));
}
