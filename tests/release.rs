//! Releases through a registry, against Debian's docker-registry on 127.0.0.1: `slotforge push`
//! publishes a signed bundle (chunk packs, boot files, the signature as a referrer through the
//! `sha256-<hex>` tag, as this registry has no referrers API); skopeo reads the artifact and its
//! referrers; `slotforge upgrade DISK docker://…` decides the signature before it fetches any
//! content, fetches only the chunks the disk's running slot lacks, resumes a pull cut off, and
//! refuses a tag moved to an unsigned or foreign-signed release with the disk unchanged; a
//! release carries its sealed external images (the sealed artifact a referrer of its image) and
//! a bumped one travels as the chunks the device's earlier sealed image lacks.

mod common;
use common::*;
use slotforge_qemu_tests::registry::{CuttingProxy, RequestLog, TestRegistry};
use std::path::{Path, PathBuf};

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let j: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["key", "generate", name, "-o", dir.to_str().unwrap(), "--json"]))).unwrap();
    j["secret_key"].as_str().unwrap().into()
}

/// The fixture's manifest at `version`, trusting keys/release.pub, its on-disk service `newlogd`
/// holding `payload`.
fn release(fx: &Fixture, version: &str, payload: Vec<u8>) {
    oci_image(&fx.path().join("images/newlogd"), "1", vec![(layer(&[E::File("usr/bin/newlogd", payload, 0o755)]), Comp::Gzip)], &["/usr/bin/newlogd", "-v"]);
    std::fs::write(fx.manifest(), format!("{}update-keys:\n  - keys/release.pub\n", MANIFEST.replace("version: 1.4.0", &format!("version: {version}")))).unwrap();
}

fn bundle(fx: &Fixture, out: &Path, key: Option<&Path>) -> serde_json::Value {
    let (m, l) = (fx.manifest(), layouts().join("demo.yaml"));
    let mut args = vec!["bundle", m.to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json", "--without-images"];
    if let Some(k) = key {
        args.extend(["--sign", k.to_str().unwrap()]);
    }
    serde_json::from_str(&ok(&slotforge(&args))).unwrap()
}

fn push(b: &Path, reference: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&slotforge(&["push", b.to_str().unwrap(), reference, "--json"]))).unwrap()
}

fn skopeo_raw(reference: &str) -> serde_json::Value {
    serde_json::from_str(&tool("skopeo", &["inspect", "--raw", "--tls-verify=false", reference])).unwrap()
}

fn rootfs_of(bundle_dir_tar: &Path, p: &Path) -> Vec<u8> {
    let d = p.join("unpacked");
    std::fs::create_dir_all(&d).unwrap();
    tool("tar", &["-xf", bundle_dir_tar.to_str().unwrap(), "-C", d.to_str().unwrap()]);
    common::delta::layer_blob(&d, common::delta::MT_ROOTFS).map(|b| std::fs::read(b).unwrap()).unwrap()
}

#[test]
fn a_signed_release_is_pushed_read_by_skopeo_and_pulled_by_tag_fetching_only_what_the_disk_lacks() {
    let reg = TestRegistry::start(None);
    let fx = fixture();
    let p = fx.path();
    let key = keygen(&p.join("keys"), "release");
    release(&fx, "1.4.0", noise(24_000_000, 1));
    let disk = p.join("disk.img");
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", layouts().join("demo.yaml").to_str().unwrap(), "-o", disk.to_str().unwrap(), "-q"]));
    let v1 = p.join("v1.tar");
    bundle(&fx, &v1, Some(&key));
    let repo = format!("docker://{}/appliance", reg.host());
    let s1 = push(&v1, &format!("{repo}:1.4.0"));
    assert_eq!(s1["packs_uploaded"], s1["packs"], "a first push uploads every pack: {s1}");
    assert_eq!(s1["referrers"], "tag", "docker-registry has no referrers API: {s1}");
    // v2: 64 KiB of the service's 24 MB changed.
    let mut payload = noise(24_000_000, 1);
    payload[12_000_000..12_065_536].copy_from_slice(&noise(65_536, 9));
    release(&fx, "1.5.0", payload);
    let v2 = p.join("v2.tar");
    bundle(&fx, &v2, Some(&key));
    let s2 = push(&v2, &format!("{repo}:1.5.0"));
    let packs = s2["packs"].as_u64().unwrap();
    // The chunks 1.4.0 has are pointed at in its packs; the few new ones (64 KiB changed: a
    // handful of chunks, far under 4 MiB) go into one new pack.
    assert_eq!((s2["packs_uploaded"].as_u64(), s2["releases_seen"].as_u64()), (Some(1), Some(1)), "{s2}");
    assert!(s2["chunks_new"].as_u64().unwrap() <= 8 && s2["chunks_reused"].as_u64().unwrap() > 100, "{s2}");
    assert!(s2["bytes_uploaded"].as_u64().unwrap() < 2 << 20, "a push uploads the new chunks, not the packs they fell in: {s2}");
    let again = push(&v2, &format!("{repo}:1.5.0"));
    assert_eq!((again["packs_uploaded"].as_u64(), again["chunks_new"].as_u64()), (Some(0), Some(0)), "a second push of the same release uploads no pack: {again}");
    assert_eq!(again["manifest_digest"], s2["manifest_digest"], "and puts the same release manifest");

    // skopeo reads the artifact and the referrers tag naming its signature.
    let m = skopeo_raw(&format!("{repo}:1.5.0"));
    assert_eq!(m["artifactType"], "application/vnd.slotforge.release.v1", "{m}");
    assert_eq!(m["config"]["mediaType"], "application/vnd.slotforge.bundle.config.v1+json");
    let md = s2["manifest_digest"].as_str().unwrap();
    let refs = skopeo_raw(&format!("{repo}:sha256-{}", md.trim_start_matches("sha256:")));
    let sig = &refs["manifests"][0];
    assert_eq!(sig["artifactType"], "application/vnd.slotforge.bundle.signature.v1", "{refs}");
    let sm = skopeo_raw(&format!("{repo}@{}", sig["digest"].as_str().unwrap()));
    assert_eq!(sm["subject"]["digest"], md, "the signature's subject is the release manifest");

    let stick_disk = p.join("stick-disk.img");
    std::fs::copy(&disk, &stick_disk).unwrap();
    // The disk (running 1.4.0) pulls 1.5.0 by tag through a logging proxy: the manifest and the
    // referrers decide before any blob is asked for; then only packs' ranges, one per pack.
    let log = RequestLog::start(reg.port);
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), &format!("docker://127.0.0.1:{}/appliance:1.5.0", log.port), "--json"]))).unwrap();
    let lines = log.take();
    let first_blob = lines.iter().position(|l| l.contains("/blobs/")).unwrap();
    assert!(first_blob <= 3 && lines[..first_blob].iter().all(|l| l.contains("/manifests/") || l.contains("/referrers/")), "metadata first, at most 3 requests: {lines:?}");
    let pulled = &r["pulled"];
    assert_eq!(pulled["requests"].as_u64().unwrap() as usize, lines.len(), "the report counts what the registry saw: {lines:?}");
    let (chunks, fetched) = (pulled["chunks"].as_u64().unwrap(), pulled["chunks_fetched"].as_u64().unwrap());
    assert!(fetched >= 1 && fetched * 4 < chunks, "only the changed chunks travel: {pulled}");
    // The kernel and initrd are the disk's own (copied from its ESP): every blob request is a
    // pack's range, at most one per pack.
    let blob_requests = lines.iter().filter(|l| l.contains("/blobs/")).count();
    assert!(blob_requests <= packs as usize, "{lines:?}");
    // One release behind, the device lacks only the new pack's chunks: one range request (the
    // goal: at most 3 for the metadata and 1 per 4 MiB of change).
    assert_eq!(blob_requests, 1, "{lines:?}");
    assert_eq!(lines.len(), first_blob + blob_requests, "{lines:?}");
    assert_eq!(r["version"], "1.5.0");
    assert_eq!(r["signature"]["state"], "signed", "{r}");
    assert_eq!(r["delta"]["from_store"].as_u64().unwrap(), fetched, "{r}");
    // Slot b holds 1.5.0's rootfs byte for byte, and the disk verifies.
    let slot_b = p.join("slot-b.img");
    extract_partition(&disk, "rootfs_b", &slot_b);
    let want = rootfs_of(&v2, p);
    assert!(std::fs::read(&slot_b).unwrap().starts_with(&want), "slot b holds the pushed rootfs");
    let v: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["verify", disk.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(v["ok"], true, "{v}");

    // skopeo copies the release and its referrers tag into an OCI layout (a USB stick); the
    // offline upgrade applies it the same way, signature included.
    let stick = p.join("stick");
    let hex = md.trim_start_matches("sha256:");
    for t in ["1.5.0".to_string(), format!("sha256-{hex}")] {
        tool("skopeo", &["copy", "-q", "--all", "--src-tls-verify=false", &format!("{repo}:{t}"), &format!("oci:{}:{t}", stick.display())]);
    }
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", stick_disk.to_str().unwrap(), stick.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!((r["version"].as_str(), r["signature"]["state"].as_str()), (Some("1.5.0"), Some("signed")), "{r}");
    let stick_b = p.join("stick-b.img");
    extract_partition(&stick_disk, "rootfs_b", &stick_b);
    assert_eq!(sha256_file(&stick_b), sha256_file(&slot_b), "the stick's release wrote the same slot");
}

#[test]
fn a_foreign_or_unsigned_release_is_refused_before_any_content_and_a_cut_pull_resumes() {
    let reg = TestRegistry::start(None);
    let fx = fixture();
    let p = fx.path();
    let key = keygen(&p.join("keys"), "release");
    let other = keygen(&p.join("other"), "other");
    release(&fx, "1.4.0", noise(24_000_000, 1));
    let disk = p.join("disk.img");
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", layouts().join("demo.yaml").to_str().unwrap(), "-o", disk.to_str().unwrap(), "-q"]));
    let before = sha256_file(&disk);
    release(&fx, "1.5.0", noise(24_000_000, 2));
    let repo = format!("{}/appliance", reg.host());
    let log = RequestLog::start(reg.port);
    let via_log = format!("docker://127.0.0.1:{}/appliance:1.5.0", log.port);
    for (name, k) in [("foreign", Some(other.as_path())), ("unsigned", None)] {
        // The tag moved to a release signed by another key, then to an unsigned one.
        let b = p.join(format!("{name}.tar"));
        bundle(&fx, &b, k);
        push(&b, &format!("{repo}:1.5.0"));
        log.take();
        let o = slotforge(&["upgrade", disk.to_str().unwrap(), &via_log]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("refused") && e.contains("nothing was fetched"), "{name}: {e}");
        let lines = log.take();
        assert!(!lines.iter().any(|l| l.contains("/blobs/")), "{name}: no content byte asked for: {lines:?}");
        assert_eq!(sha256_file(&disk), before, "{name}: disk unchanged");
    }
    // Signed by the trusted key, pulled through a proxy that cuts the first two connections
    // after 1 MB: the pull goes on from the first chunk still missing and completes, each chunk
    // fetched once.
    let good = p.join("good.tar");
    bundle(&fx, &good, Some(&key));
    push(&good, &format!("{repo}:1.5.0"));
    let clean = p.join("clean.img");
    std::fs::copy(&disk, &clean).unwrap();
    let want: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", clean.to_str().unwrap(), &format!("docker://{repo}:1.5.0"), "--json"]))).unwrap();
    let cut = CuttingProxy::start(reg.port, 2, 1_000_000);
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), &format!("docker://127.0.0.1:{}/appliance:1.5.0", cut.port), "--json"]))).unwrap();
    assert!(cut.connections.load(std::sync::atomic::Ordering::SeqCst) >= 3, "the cuts happened");
    assert_eq!(r["pulled"]["chunks_fetched"], want["pulled"]["chunks_fetched"], "no chunk fetched twice: {r} vs {want}");
    assert_eq!(r["pulled"]["bytes_fetched"], want["pulled"]["bytes_fetched"]);
    let (x, y) = (p.join("x.img"), p.join("y.img"));
    extract_partition(&disk, "rootfs_b", &x);
    extract_partition(&clean, "rootfs_b", &y);
    assert_eq!(sha256_file(&x), sha256_file(&y), "the cut pull wrote the same slot");

    // Every connection cut after 600 KB: the pull gives up after its retries, keeps what arrived
    // whole and changes nothing; the rerun straight to the registry fetches only the rest.
    release(&fx, "1.6.0", noise(24_000_000, 3));
    let v3 = p.join("v3.tar");
    bundle(&fx, &v3, Some(&key));
    push(&v3, &format!("{repo}:1.6.0"));
    let before = sha256_file(&clean);
    let cut = CuttingProxy::start(reg.port, usize::MAX, 600_000);
    let scratch = p.join("scratch");
    let o = slotforge(&["upgrade", clean.to_str().unwrap(), &format!("docker://127.0.0.1:{}/appliance:1.6.0", cut.port), "--scratch", scratch.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("a rerun goes on"), "{e}");
    assert_eq!(sha256_file(&clean), before, "a cut pull changes nothing");
    let work = std::fs::read_dir(&scratch).unwrap().next().unwrap().unwrap().path();
    let kept = walk_files(&work.join("chunks"));
    assert!(kept > 0, "chunks that arrived whole are kept");
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", clean.to_str().unwrap(), &format!("docker://{repo}:1.6.0"), "--scratch", scratch.to_str().unwrap(), "--json"]))).unwrap();
    let pulled = &r["pulled"];
    assert_eq!(r["version"], "1.6.0");
    assert!(pulled["chunks_local"].as_u64().unwrap() >= kept as u64, "the kept chunks count as local: {pulled}");
    assert!(pulled["chunks_fetched"].as_u64().unwrap() + kept as u64 <= pulled["chunks"].as_u64().unwrap(), "{pulled}");
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0, "a finished pull leaves no work behind");
}

/// edgeview as an 8 MB image, its binary changed in 17 bytes at `change` (if any).
fn edgeview(fx: &Fixture, tag: &str, change: bool) {
    let mut bin = noise(8_000_000, 7);
    if change {
        bin[4_000_000..4_000_017].copy_from_slice(b"a one-line change");
    }
    oci_image(&fx.path().join("images/edgeview"), tag, vec![(layer(&[E::File("lib/libshared.so", noise(300_000, 6), 0o644)]), Comp::Gzip), (layer(&[E::File("bin/edgeview", bin, 0o755)]), Comp::Zstd)], &["/bin/edgeview"]);
}

#[test]
fn a_release_carries_its_sealed_images_and_a_bumped_one_travels_as_the_chunks_the_device_lacks() {
    let reg = TestRegistry::start(None);
    let fx = fixture();
    let p = fx.path();
    let layout = layouts().join("demo.yaml");
    edgeview(&fx, "1.2", false);
    let disk = p.join("disk.img");
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", layout.to_str().unwrap(), "-o", disk.to_str().unwrap(), "-q"]));
    // 1.5.0: edgeview bumped to 1.3 (17 bytes of its 8 MB binary changed); a full bundle.
    edgeview(&fx, "1.3", true);
    std::fs::write(fx.manifest(), MANIFEST.replace("version: 1.4.0", "version: 1.5.0").replace("edgeview:1.2", "edgeview:1.3")).unwrap();
    let v2 = p.join("v2.tar");
    let m = fx.manifest();
    let b: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["bundle", m.to_str().unwrap(), "--layout", layout.to_str().unwrap(), "-o", v2.to_str().unwrap(), "--json"]))).unwrap();
    let repo = format!("{}/appliance", reg.host());
    let s = push(&v2, &format!("docker://{repo}:1.5.0"));
    assert_eq!((s["sealed_images"].as_u64(), s["sealed_uploaded"].as_u64()), (Some(1), Some(1)), "edgeview is sealed, analytics is not: {s}");
    assert_eq!(push(&v2, &format!("docker://{repo}:1.5.0"))["sealed_uploaded"], 0, "pushed again: the sealed blob is there");

    // The sealed artifact is a referrer of edgeview 1.3's manifest (the referrers tag here),
    // exactly the artifact the images partition holds, and skopeo reads it.
    let cfg: serde_json::Value = {
        let d = p.join("v2-dir");
        std::fs::create_dir_all(&d).unwrap();
        tool("tar", &["-xf", v2.to_str().unwrap(), "-C", d.to_str().unwrap()]);
        let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("index.json")).unwrap()).unwrap();
        let blob = |x: &str| std::fs::read(d.join("blobs/sha256").join(x.trim_start_matches("sha256:"))).unwrap();
        let man: serde_json::Value = serde_json::from_slice(&blob(idx["manifests"][0]["digest"].as_str().unwrap())).unwrap();
        serde_json::from_slice(&blob(man["config"]["digest"].as_str().unwrap())).unwrap()
    };
    assert_eq!(cfg["build_id"], b["build_id"]);
    let ev = cfg["images"].as_array().unwrap().iter().find(|i| i["name"] == "edgeview").unwrap();
    let image = ev["digest"].as_str().unwrap();
    let refs = skopeo_raw(&format!("docker://{repo}:sha256-{}", image.trim_start_matches("sha256:")));
    assert_eq!(refs["manifests"][0]["artifactType"], "application/vnd.slotforge.sealed-image.v1", "{refs}");
    assert_eq!(refs["manifests"][0]["digest"], ev["sealed"]["artifact"], "{refs}");
    let art = skopeo_raw(&format!("docker://{repo}@{}", ev["sealed"]["artifact"].as_str().unwrap()));
    assert_eq!(art["subject"]["digest"], image, "{art}");
    assert_eq!(art["layers"][0]["digest"], ev["sealed"]["digest"], "{art}");

    // Pulled by tag onto the 1.4.0 disk through a logging proxy: the sealed image is assembled
    // from edgeview 1.2's sealed image on the disk plus the chunks it lacks.
    let full_disk = p.join("full.img");
    std::fs::copy(&disk, &full_disk).unwrap();
    let stick_disk = p.join("stick-disk.img");
    std::fs::copy(&disk, &stick_disk).unwrap();
    let legacy_disk = p.join("legacy-disk.img");
    std::fs::copy(&disk, &legacy_disk).unwrap();
    let log = RequestLog::start(reg.port);
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), &format!("docker://127.0.0.1:{}/appliance:1.5.0", log.port), "--json"]))).unwrap();
    let lines = log.take();
    assert_eq!(r["images_to_pull"], serde_json::json!([]), "nothing is left to pull at first boot (analytics, unsealed and unchanged, is on the disk): {r}");
    let img = &r["pulled"]["images"][0];
    assert_eq!(img["name"], "edgeview", "{r}");
    let (chunks, fetched, local) = (img["chunks"].as_u64().unwrap(), img["chunks_fetched"].as_u64().unwrap(), img["chunks_local"].as_u64().unwrap());
    assert!(fetched >= 1 && fetched * 4 < chunks && fetched + local == chunks, "only the changed chunks of the sealed image travel: {img}");
    assert!(img["bytes_fetched"].as_u64().unwrap() < ev["sealed"]["size"].as_u64().unwrap() / 4, "{img}");
    let sealed_hex = ev["sealed"]["digest"].as_str().unwrap().trim_start_matches("sha256:");
    // Its chunks are in the release's packs with the rootfs's: one range request per pack
    // holding some chunk the disk lacks, none to the sealed blob.
    assert_eq!(lines.iter().filter(|l| l.contains(sealed_hex)).count(), 0, "{lines:?}");
    let blob_requests = lines.iter().filter(|l| l.contains("/blobs/")).count();
    assert!(blob_requests >= 1 && blob_requests as u64 <= s["packs"].as_u64().unwrap() && lines.len() == 3 + blob_requests, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["verify", disk.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    // The same as applying the whole bundle: byte for byte.
    ok(&slotforge(&["upgrade", full_disk.to_str().unwrap(), v2.to_str().unwrap()]));
    // The same as applying the whole bundle: the slots byte for byte; the ESP and the images
    // partition file for file (their entries carry the time of the offline write).
    let part = |d: &Path, name: &str| {
        let out = p.join(format!("{}-{name}", d.file_stem().unwrap().to_string_lossy()));
        extract_partition(d, name, &out);
        out
    };
    for slot in ["rootfs_a", "rootfs_b"] {
        assert_eq!(sha256_file(&part(&disk, slot)), sha256_file(&part(&full_disk, slot)), "pulled by tag or applied whole: {slot} differs");
    }
    let files = |d: &Path| {
        let (esp, images) = (part(d, "esp"), part(d, "images"));
        let out = p.join(format!("{}-files", d.file_stem().unwrap().to_string_lossy()));
        std::fs::create_dir_all(out.join("images")).unwrap();
        tool("mcopy", &["-s", "-n", "-i", esp.to_str().unwrap(), "::/", out.join("esp").to_str().unwrap()]);
        tool("debugfs", &["-R", &format!("rdump / {}", out.join("images").display()), images.to_str().unwrap()]);
        assert!(std::fs::read_dir(out.join("images/blobs/sha256")).unwrap().count() > 5 && out.join("esp/loader").is_dir(), "both file systems were read");
        out
    };
    let pulled_files = files(&disk);
    tool("diff", &["-r", pulled_files.to_str().unwrap(), files(&full_disk).to_str().unwrap()]);
    // skopeo copies the release (its sealed blob a layer) onto a stick; applied offline, the same.
    let stick = p.join("stick");
    tool("skopeo", &["copy", "-q", "--all", "--src-tls-verify=false", &format!("docker://{repo}:1.5.0"), &format!("oci:{}:1.5.0", stick.display())]);
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", stick_disk.to_str().unwrap(), stick.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(r["images_to_pull"], serde_json::json!([]), "{r}");
    tool("diff", &["-r", pulled_files.to_str().unwrap(), files(&stick_disk).to_str().unwrap()]);

    // A release pushed before sealed images' chunks went into the packs (no `packs` part): the
    // missing chunks are read from the sealed blob by range instead, and the slot is the same.
    let mut old = skopeo_raw(&format!("docker://{repo}:1.5.0"));
    old["layers"].as_array_mut().unwrap().retain(|l| l["annotations"]["io.slotforge.sealed-part"] != "packs");
    let client = slotforge::oci::registry::Registry::new(&reg.host(), &[reg.host()]).unwrap();
    client.put_manifest("appliance", "legacy", &serde_json::to_vec(&old).unwrap(), "application/vnd.oci.image.manifest.v1+json").unwrap();
    let log = RequestLog::start(reg.port);
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", legacy_disk.to_str().unwrap(), &format!("docker://127.0.0.1:{}/appliance:legacy", log.port), "--json"]))).unwrap();
    let lines = log.take();
    assert!(r["pulled"]["images"][0]["chunks_fetched"].as_u64().unwrap() >= 1, "{r}");
    assert!(lines.iter().any(|l| l.contains(sealed_hex)), "{lines:?}");
    assert_eq!(sha256_file(&part(&legacy_disk, "rootfs_b")), sha256_file(&part(&full_disk, "rootfs_b")));
    let v: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["verify", legacy_disk.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

fn walk_files(d: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(d) else { return 0 };
    rd.map(|e| e.unwrap().path()).map(|p| if p.is_dir() { walk_files(&p) } else { 1 }).sum()
}
