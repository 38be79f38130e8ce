//! Delta bundles: a bundle made `--delta-from` a build in the field carries the new rootfs as
//! casync chunks, only those its bases lack; `slotforge upgrade` assembles the slot from the
//! disk's own slots and those chunks; Debian's `casync extract` rebuilds the same slot from the
//! bundle's store seeded with the old one; a delta the disk cannot assemble, or one with a
//! tampered chunk, is refused with the disk unchanged.

mod common;
use common::delta::*;
use common::*;
use std::path::Path;
use std::process::Command;

fn chunk_files(dir: &Path) -> usize {
    let store = dir.join("chunks");
    if !store.is_dir() {
        return 0;
    }
    std::fs::read_dir(&store).unwrap().map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count()).sum()
}

#[test]
fn a_delta_bundle_ships_only_new_chunks_and_upgrades_a_disk_of_its_base() {
    let fx = fixture();
    let p = fx.path();
    let disk = p.join("disk.img");
    build(&fx, &disk);
    let v1 = p.join("v1");
    let s1 = bundle(&fx, &v1, &[]);
    assert_eq!(chunk_files(&v1), 0, "a full bundle carries the rootfs whole, and its index");
    let v1_rootfs = layer_blob(&v1, MT_ROOTFS).unwrap();
    assert!(layer_blob(&v1, MT_CAIBX).is_some());
    release2(&fx);
    let full = p.join("v2");
    let sf = bundle(&fx, &full, &["--without-images"]);
    let delta = p.join("v2-delta");
    let sd = bundle(&fx, &delta, &["--without-images", "--delta-from", v1.to_str().unwrap()]);
    assert_eq!(sd["build_id"], sf["build_id"], "a delta is the same build");
    assert_eq!(sd["delta"]["bases"][0]["build_id"], s1["build_id"]);
    let (chunks, shipped) = (sd["delta"]["chunks"].as_u64().unwrap(), sd["delta"]["chunks_shipped"].as_u64().unwrap());
    // The fixture's rootfs is small (a few chunks); the changed file's chunk, the metadata's and
    // the hash tree's end change. bench/delta.sh measures real sizes.
    assert!(shipped >= 1 && shipped * 2 < chunks, "a one-file change ships a few chunks: {shipped} of {chunks}");
    assert_eq!(chunk_files(&delta) as u64, shipped);
    assert!(layer_blob(&delta, MT_ROOTFS).is_none(), "a delta leaves the rootfs blob out");
    let (fb, db) = (sf["bundle_bytes"].as_u64().unwrap(), sd["bundle_bytes"].as_u64().unwrap());
    assert!(db * 2 < fb, "delta {db} bytes vs full {fb}");
    // The same chunks from the disk of the base as from its bundle.
    let from_disk = bundle(&fx, &p.join("v2-delta-disk"), &["--without-images", "--delta-from", disk.to_str().unwrap()]);
    assert_eq!(from_disk["delta"]["chunks_shipped"], sd["delta"]["chunks_shipped"]);
    assert_eq!(from_disk["delta"]["bases"][0]["build_id"], s1["build_id"]);
    assert_eq!(from_disk["delta"]["boot_files_left_out"], serde_json::json!(["vmlinuz", "initrd.img"]), "the disk's ESP has the same kernel: {from_disk}");

    // casync rebuilds the new slot's data byte for byte from the delta's store seeded with the
    // old one; veritysetup, given the config's parameters, the hash area (the device's way too).
    let v2_rootfs = layer_blob(&full, MT_ROOTFS).unwrap();
    let v = bundle_config(&delta)["verity"].clone();
    let hash_offset = v["hash_offset"].as_u64().unwrap();
    let out = p.join("casync-out.img");
    // casync wants the index under a .caibx name.
    let caibx = p.join("rootfs.caibx");
    std::fs::copy(layer_blob(&delta, MT_CAIBX).unwrap(), &caibx).unwrap();
    let o = Command::new("casync")
        .args(["extract", "--store", delta.join("chunks").to_str().unwrap(), "--seed", v1_rootfs.to_str().unwrap(), caibx.to_str().unwrap(), out.to_str().unwrap()])
        .output()
        .expect("casync (apt-get install casync)");
    assert!(o.status.success(), "casync extract: {}", String::from_utf8_lossy(&o.stderr));
    let want = std::fs::read(&v2_rootfs).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), want[..hash_offset as usize], "casync extract of the delta + seed: the squashfs, to the hash offset");
    let o = Command::new("veritysetup")
        .args(["format", "--hash-offset", &hash_offset.to_string(), "--data-blocks", &v["data_blocks"].to_string(), "--salt", v["salt"].as_str().unwrap(), "--uuid", v["uuid"].as_str().unwrap()])
        .args([&out, &out])
        .output()
        .expect("veritysetup");
    assert!(o.status.success(), "veritysetup format: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains(v["root_hash"].as_str().unwrap()), "the signed root hash");
    assert_eq!(sha256_file(&out), sha256_file(&v2_rootfs), "casync extract + veritysetup format: the whole rootfs blob");
    // Without the seed, casync cannot: the store alone lacks the unchanged chunks.
    let o = Command::new("casync").args(["extract", "--store", delta.join("chunks").to_str().unwrap(), caibx.to_str().unwrap(), p.join("x").to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success(), "the store alone must not be enough");

    // The offline upgrade assembles slot b from slot a and the chunks, as a tar too. External
    // images the base holds unchanged stay out of the delta; the disk lists its own copies.
    let tar = p.join("v2-delta.tar");
    let st = bundle(&fx, &tar, &["--delta-from", v1.to_str().unwrap()]);
    assert_eq!(st["delta"]["images_left_out"], serde_json::json!(["edgeview", "analytics"]), "{st}");
    assert_eq!(st["delta"]["boot_files_left_out"], serde_json::json!(["vmlinuz", "initrd.img"]), "the kernel did not change: {st}");
    assert!(st["bundle_bytes"].as_u64().unwrap() < db + 64 * 1024, "no image travels: {st}");
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), tar.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(r["slot"], "b");
    assert_eq!((r["blobs_written"].as_u64(), r["images_to_pull"].as_array().map(Vec::len)), (Some(0), Some(0)), "{r}");
    assert_eq!(r["delta"]["from_store"].as_u64().unwrap(), shipped, "{r}");
    assert_eq!(r["delta"]["from_seeds"].as_u64().unwrap() + shipped, chunks, "{r}");
    assert_eq!(r["delta"]["seeds_chunked"], false, "the running slot is the base the bundle names: its chunks taken where the bundle says, the slot not read whole to find them: {r}");
    assert!(r["delta"]["tree_bytes"].as_u64().unwrap() > 0, "the hash area made on the device: {r}");
    let slot_b = p.join("slot-b.img");
    extract_partition(&disk, "rootfs_b", &slot_b);
    let want = std::fs::read(&v2_rootfs).unwrap();
    assert!(std::fs::read(&slot_b).unwrap().starts_with(&want), "slot b holds the new rootfs");
    let v: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["verify", disk.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    // The kernel slot b boots is slot a's, copied on the ESP.
    let esp = p.join("esp.img");
    extract_partition(&disk, "esp", &esp);
    assert_eq!(tool("mtype", &["-i", esp.to_str().unwrap(), "::/b/vmlinuz"]), tool("mtype", &["-i", esp.to_str().unwrap(), "::/a/vmlinuz"]));
}

#[test]
fn a_delta_the_disk_cannot_assemble_or_with_a_bad_chunk_is_refused_and_nothing_changes() {
    let fx = fixture();
    let p = fx.path();
    let v1 = p.join("v1");
    bundle(&fx, &v1, &["--without-images"]);
    // The disk runs another build (a different base image) than the delta's base.
    let base = p.join("images/base");
    std::fs::rename(&base, p.join("base.orig")).unwrap();
    oci_image(&base, "1", vec![(layer(&[E::Dir("bin/", 0o755), E::File("bin/busybox", noise(400_000, 99), 0o755)]), Comp::Gzip)], &[]);
    let disk = p.join("disk.img");
    build(&fx, &disk);
    std::fs::remove_dir_all(&base).unwrap();
    std::fs::rename(p.join("base.orig"), &base).unwrap();
    let before = sha256_file(&disk);
    release2(&fx);
    let delta = p.join("v2-delta");
    let sd = bundle(&fx, &delta, &["--without-images", "--delta-from", v1.to_str().unwrap()]);
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), delta.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "an unrelated disk cannot assemble the delta");
    assert!(e.contains("is a delta from") && e.contains(sd["delta"]["bases"][0]["build_id"].as_str().unwrap()) && e.contains("nothing was changed"), "{e}");
    assert_eq!(sha256_file(&disk), before, "disk unchanged");

    // A disk of the base, but a chunk of the bundle tampered with: refused, disk unchanged.
    let fx = fixture();
    let p = fx.path();
    let disk = p.join("disk.img");
    build(&fx, &disk);
    release2(&fx);
    let delta = p.join("v2-delta");
    bundle(&fx, &delta, &["--without-images", "--delta-from", disk.to_str().unwrap()]);
    let before = sha256_file(&disk);
    let victim = std::fs::read_dir(delta.join("chunks")).unwrap().next().unwrap().unwrap().path();
    let victim = std::fs::read_dir(victim).unwrap().next().unwrap().unwrap().path();
    let good = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, zstd::bulk::compress(&noise(20_000, 1), 3).unwrap()).unwrap();
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), delta.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("does not match its id") && e.contains("nothing was changed"), "{e}");
    assert_eq!(sha256_file(&disk), before, "disk unchanged");
    // A chunk removed: refused the same way.
    std::fs::remove_file(&victim).unwrap();
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), delta.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("neither in a seed nor in the store"));
    assert_eq!(sha256_file(&disk), before, "disk unchanged");
    // The good chunk back: it applies.
    std::fs::write(&victim, good).unwrap();
    ok(&slotforge(&["upgrade", disk.to_str().unwrap(), delta.to_str().unwrap()]));
    assert_ne!(sha256_file(&disk), before);
}

#[test]
fn a_bumped_sealed_image_travels_as_chunks_and_is_assembled_from_its_predecessor() {
    let fx = fixture();
    let p = fx.path();
    let disk = p.join("disk.img");
    build(&fx, &disk);
    let v1 = p.join("v1");
    bundle(&fx, &v1, &[]);
    // edgeview 1.3: its binary with a few bytes changed (the shared layer as before).
    let mut bin = noise(600_000, 7);
    bin[300_000..300_017].copy_from_slice(b"a one-line change");
    oci_image(&p.join("images/edgeview"), "1.3", vec![(layer(&[E::File("lib/libshared.so", noise(300_000, 6), 0o644)]), Comp::Gzip), (layer(&[E::File("bin/edgeview", bin, 0o755)]), Comp::Zstd)], &["/bin/edgeview"]);
    std::fs::write(fx.manifest(), MANIFEST.replace("version: 1.4.0", "version: 1.5.0").replace("edgeview:1.2", "edgeview:1.3")).unwrap();
    let full = bundle(&fx, &p.join("v2.tar"), &[]);
    let delta = bundle(&fx, &p.join("v2-delta.tar"), &["--delta-from", v1.to_str().unwrap()]);
    let s = &delta["delta"]["sealed"][0];
    assert_eq!(s["name"], "edgeview", "{delta}");
    let (chunks, shipped) = (s["chunks"].as_u64().unwrap(), s["chunks_shipped"].as_u64().unwrap());
    // A small image (12 chunks): the changed block's chunks, the metadata's, and the hash tree
    // (its salt is per image) travel.
    assert!(shipped >= 1 && shipped < chunks, "{s}");
    assert_eq!(delta["delta"]["images_left_out"], serde_json::json!(["analytics"]));
    let (fb, db) = (full["bundle_bytes"].as_u64().unwrap(), delta["bundle_bytes"].as_u64().unwrap());
    assert!(db * 3 < fb, "delta {db} bytes, full {fb}");
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), p.join("v2-delta.tar").to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(r["images_to_pull"], serde_json::json!([]), "{r}");
    // The images partition now holds edgeview 1.3's sealed image, checked by verify (digest and
    // dm-verity tree of every pinned sealed image).
    let v: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["verify", disk.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let inspect: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["inspect", disk.to_str().unwrap(), "--json"]))).unwrap();
    let b2 = inspect["images"]["builds"].as_array().unwrap().iter().find(|b| b["build_id"] == delta["build_id"]).unwrap().to_string();
    assert!(!b2.contains("missing"), "{b2}");
}
