//! Upgrades between variants of different sizes (qemu-tests/variants/), proven on booted
//! systems: bundles applied online by the agent from a second disk, A/B switch with boot
//! counting, rollback after three failed tries, GC, power cuts at every apply step, an older
//! layout generation, images from the registry or from the bundle.

use slotforge_qemu_tests::fixtures::{self, Fixtures};
use slotforge_qemu_tests::vm::{Boot, Outcome};
use slotforge_qemu_tests::world::World;
use std::path::Path;
use std::sync::OnceLock;
use slotforge::format::agent::Kind;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_slotforge"))
}
fn fx() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| fixtures::build(bin()).expect("building QEMU fixtures"))
}
/// Tests run side by side (cargo's default: one per core); each has its own world, registry and
/// VM. TCG gives each guest one host thread, so two guests on two cores do not slow each other
/// much; bench/upgrade.sh runs them one at a time for its timings.
fn world() -> ((), World, Timer) {
    let t = Timer(std::time::Instant::now());
    ((), World::new(bin(), fx()), t)
}

/// Appends `{"test", "seconds"}` (on drop) and other measurements to `$SLOTFORGE_UPGRADE_REPORT`
/// for bench/upgrade.sh.
struct Timer(std::time::Instant);
impl Drop for Timer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            report(serde_json::json!({"seconds": self.0.elapsed().as_secs_f64()}));
        }
    }
}
fn report(mut v: serde_json::Value) {
    let Ok(p) = std::env::var("SLOTFORGE_UPGRADE_REPORT") else { return };
    v["test"] = std::thread::current().name().unwrap_or("").into();
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
    writeln!(f, "{v}").unwrap();
}

fn tail(b: &Boot) -> String {
    let log = b.log();
    log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}
fn one<'a>(b: &'a Boot, event: Kind) -> &'a slotforge::format::agent::Received {
    b.named(event).into_iter().next().unwrap_or_else(|| panic!("no {} event; serial:\n{}", event.name(), tail(b)))
}
fn status(b: &Boot) -> &slotforge::format::agent::Received {
    one(b, Kind::Status)
}
fn image_states(b: &Boot) -> Vec<(String, String)> {
    status(b)["images"].as_array().unwrap().iter().map(|i| (i["name"].as_str().unwrap().to_string(), i["state"].as_str().unwrap().to_string())).collect()
}
fn all_verified(b: &Boot) -> bool {
    image_states(b).iter().all(|(_, s)| s == "verified")
}
fn ended(b: &Boot, how: Kind) {
    assert_eq!(b.outcome, Outcome::Exited, "serial:\n{}", tail(b));
    assert!(b.has(how), "expected {}; serial:\n{}", how.name(), tail(b));
}

#[test]
fn small_to_large_and_back_down_to_small() {
    let (_g, w, _t) = world();
    let disk = w.build("small", 2, "dev");
    let large = w.bundle("large", 2, &[], &[]).unwrap();
    // Boot 1: running small on slot a, the large bundle attached: applied to slot b.
    let b = w.boot(&disk, Some(&large), None, false);
    ended(&b, Kind::Reboot);
    let a = one(&b, Kind::Applied);
    assert_eq!((a["slot"].as_str(), a["entry"].as_str(), a["install_number"].as_u64()), (Some("b"), Some("slot-b+3.conf"), Some(2)));
    // Boot 2: systemd-boot tries slot b; its three external images (50 MB one included) verify.
    let b = w.boot(&disk, None, None, false);
    ended(&b, Kind::Poweroff);
    assert_eq!(one(&b, Kind::Initramfs)["root"], "rootfs_b");
    assert_eq!(status(&b)["version"], "2.0.0");
    assert_eq!(image_states(&b).len(), 3);
    assert!(all_verified(&b), "{:?}", image_states(&b));
    assert_eq!(one(&b, Kind::MarkedGood)["entry"], "slot-b.conf");
    let gc = one(&b, Kind::Gc);
    assert_eq!(gc["kept_builds"].as_array().unwrap().len(), 2, "both slots' sets are kept: {gc}");
    // Two builds' sets on the partition: unique blobs vs what they occupy in 4 KiB blocks.
    let img = &w.inspect(&disk)["images"];
    let unique = img["unique_bytes"].as_u64().unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for b in img["builds"].as_array().unwrap() {
        for i in b["images"].as_array().unwrap() {
            for bl in i["blobs"].as_array().unwrap() {
                seen.insert(bl[0].as_str().unwrap().to_string(), bl[1].as_u64().unwrap());
            }
        }
    }
    let blocks: u64 = seen.values().map(|s| s.div_ceil(4096) * 4096).sum();
    let per_build: u64 = img["builds"].as_array().unwrap().iter().map(|b| b["bytes"].as_u64().unwrap()).sum();
    report(serde_json::json!({"builds": img["builds"].as_array().unwrap().len(), "unique_blob_bytes": unique, "allocated_blob_bytes": blocks, "sum_of_sets_bytes": per_build}));
    let fat = b.named(Kind::ServiceExited).into_iter().find(|e| e["name"] == "fat").unwrap();
    assert_eq!(fat["stdout"], "hello from the on-disk fat service\n");
    // Boot 3: back down to small, written to slot a with a higher install number.
    let small = w.bundle("small", 2, &[], &[]).unwrap();
    let b = w.boot(&disk, Some(&small), None, false);
    ended(&b, Kind::Reboot);
    let a = one(&b, Kind::Applied);
    assert_eq!((a["slot"].as_str(), a["install_number"].as_u64()), (Some("a"), Some(3)));
    assert_eq!(a["blobs_written"], 0, "small's images are still on the device: {a}");
    // Boot 4: the downgrade is tried first and becomes good.
    let b = w.boot(&disk, None, None, false);
    ended(&b, Kind::Poweroff);
    assert_eq!(one(&b, Kind::Initramfs)["root"], "rootfs_a");
    assert_eq!(status(&b)["version"], "1.0.0");
    assert_eq!(one(&b, Kind::MarkedGood)["entry"], "slot-a.conf");
    let mut e = w.entries(&disk);
    e.sort();
    assert_eq!(e, ["slot-a.conf", "slot-b.conf"]);
}

#[test]
fn large_to_large_prime_writes_only_the_changed_image() {
    let (_g, w, _t) = world();
    let disk = w.build("large", 2, "dev");
    let next = w.bundle("large2", 2, &[], &[]).unwrap();
    let b = w.boot(&disk, Some(&next), None, false);
    ended(&b, Kind::Reboot);
    let a = one(&b, Kind::Applied);
    // Only tools:2 is new: its manifest, config, sealed artifact manifest and sealed image (its
    // layers are not stored: sealed without keep-layers). The sealed image is the layers'
    // content recompressed plus a dm-verity tree (1/128): within 5 % of the new image's bytes.
    assert_eq!(a["blobs_written"], 4, "{a}");
    let written = a["image_bytes_written"].as_u64().unwrap();
    let new_content = w.image_bytes("svc-c", "2");
    eprintln!("large->large': {written} image bytes written for {new_content} bytes of new image content ({:.4}x), {} blobs already present", written as f64 / new_content as f64, a["blobs_present"]);
    assert!(written <= new_content * 105 / 100, "bytes written {written} vs {new_content} of new content");
    report(serde_json::json!({"image_bytes_written": written, "new_image_content": new_content, "rootfs_bytes_written": a["rootfs_bytes"]}));
    let b = w.boot(&disk, None, None, false);
    ended(&b, Kind::Poweroff);
    assert_eq!(status(&b)["version"], "2.0.1");
    assert!(all_verified(&b), "{:?}", image_states(&b));
    let tools = b.named(Kind::ServiceExited).into_iter().find(|e| e["name"] == "tools").unwrap();
    assert_eq!(tools["stdout"], "tools 2\n");
}

#[test]
fn a_delta_bundle_is_assembled_into_the_inactive_slot_survives_a_cut_halfway_resumes_and_boots() {
    let (_g, w, _t) = world();
    let disk = w.build("large", 2, "dev");
    // The delta against the disk as built: only rootfs chunks slot a lacks, no image it holds.
    let next = w.bundle("large2", 2, &[], &["--delta-from", disk.to_str().unwrap()]).unwrap();
    let full = w.bundle("large2", 2, &[], &[]).unwrap();
    let (db, fb) = (std::fs::metadata(&next).unwrap().len(), std::fs::metadata(&full).unwrap().len());
    assert!(db < fb, "delta {db} bytes, full {fb}");
    // A power cut halfway through the assembly, which goes straight into slot b: slot a boots.
    let b = w.boot(&disk, Some(&next), Some("slot-half-written"), false);
    assert_eq!(b.outcome, Outcome::Killed, "did not reach slot-half-written; serial:\n{}", tail(&b));
    // The next boot runs slot a and the apply again: it keeps the chunks slot b already holds.
    let b = w.boot(&disk, Some(&next), None, false);
    ended(&b, Kind::Reboot);
    assert_eq!(one(&b, Kind::Initramfs)["root"], "rootfs_a", "after the cut the good slot boots");
    let a = one(&b, Kind::Applied);
    let d = &a["delta"];
    let n = |k: &str| d[k].as_u64().unwrap();
    let (chunks, resumed, seeds, store) = (n("chunks"), n("resumed"), n("from_seeds"), n("from_store"));
    assert!(resumed * 3 >= chunks && resumed < chunks && seeds + store + resumed == chunks, "the rerun resumes from about half: {a}");
    report(serde_json::json!({"delta_bundle_bytes": db, "full_bundle_bytes": fb, "chunks": chunks, "resumed_after_cut": resumed, "from_seeds": seeds, "from_store": store}));
    let b = w.boot(&disk, None, None, false);
    ended(&b, Kind::Poweroff);
    assert_eq!(status(&b)["version"], "2.0.1");
    assert!(all_verified(&b), "{:?}", image_states(&b));
}

#[test]
fn oversize_is_refused_by_bundle_and_by_apply_and_changes_nothing() {
    let (_g, w, _t) = world();
    let err = w.bundle("oversize", 2, &[], &[]).unwrap_err();
    assert!(err.contains("over the") && err.contains("huge"), "{err}");
    // A bundle that claims generation 2 but was checked against bigger slots.
    let fake = w.dir.path().join("field-fake.yaml");
    std::fs::write(&fake, std::fs::read_to_string(World::layout(2)).unwrap().replace("size: 64MiB, fs_cap: 56MiB", "size: 128MiB, fs_cap: 120MiB").replace("size: 640MiB", "size: 1GiB")).unwrap();
    let m = w.manifest("oversize");
    let tar = w.dir.path().join("oversize.tar");
    let o = std::process::Command::new(bin()).args(["bundle", m.to_str().unwrap(), "--layout", fake.to_str().unwrap(), "-o", tar.to_str().unwrap(), "-q", "--cache", w.dir.path().join("cache").to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let disk = w.build("small", 2, "dev");
    // Offline: refused, the image file bit-identical.
    let sha = |p: &Path| slotforge::base::hash::digest_reader(std::fs::File::open(p).unwrap()).unwrap().0;
    let before = sha(&disk);
    let o = std::process::Command::new(bin()).args(["upgrade", disk.to_str().unwrap(), tar.to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("nothing was changed"));
    assert_eq!(sha(&disk), before);
    // Online: the agent refuses it; slot b stays empty and the next boot is slot a again.
    let b = w.boot(&disk, Some(&tar), None, false);
    ended(&b, Kind::Poweroff);
    let f = one(&b, Kind::ApplyFailed);
    assert!(f["error"].as_str().unwrap().contains("holds at most"), "{f}");
    assert!(b.named(Kind::ApplyStep).is_empty(), "nothing was written");
    assert_eq!(w.entries(&disk), ["slot-a.conf"]);
    assert_eq!(w.inspect(&disk)["slots"][1]["state"], "empty");
}

#[test]
fn a_device_that_trusts_a_key_applies_only_bundles_it_signed_and_boots_them_under_dm_verity() {
    let (_g, w, _t) = world();
    let disk = w.build("signed", 2, "dev");
    let unsigned = w.bundle("signed2", 2, &[], &[]).unwrap();
    let rogue = w.bundle("signed2", 2, &[], &["--sign", w.key("rogue").to_str().unwrap()]).unwrap();
    let good = w.bundle("signed2", 2, &[], &["--sign", w.key("release").to_str().unwrap()]).unwrap();
    // Running 1.0.0 from a verity root; an unsigned bundle, then a foreign-signed one: refused
    // before anything is written.
    for (bundle, why) in [(&unsigned, "the bundle is unsigned"), (&rogue, "which this device does not trust")] {
        let b = w.boot(&disk, Some(bundle), None, false);
        ended(&b, Kind::Poweroff);
        let f = one(&b, Kind::ApplyFailed);
        assert!(f["error"].as_str().unwrap().contains(why) && f["error"].as_str().unwrap().contains("nothing was changed"), "{f}");
        assert!(b.named(Kind::ApplyStep).is_empty(), "nothing was written: {:?}", b.named(Kind::ApplyStep));
        assert_eq!(w.entries(&disk), ["slot-a.conf"]);
        let rd = &status(&b)["root_device"];
        assert_eq!(rd["dm_name"], "root", "/ is the dm-verity device: {rd}");
    }
    let b = w.boot(&disk, Some(&good), None, false);
    ended(&b, Kind::Reboot);
    let a = one(&b, Kind::Applied);
    assert_eq!(a["signature"]["state"], "signed", "{a}");
    let root_hash = a["root_hash"].as_str().unwrap().to_string();
    // The new slot boots from dm-verity under the root hash its entry carries.
    let b = w.boot(&disk, None, None, false);
    ended(&b, Kind::Poweroff);
    assert_eq!(status(&b)["version"], "1.1.0");
    let v = one(&b, Kind::Verity);
    assert_eq!((v["root_hash"].as_str(), v["status"].as_str()), (Some(root_hash.as_str()), Some("verified")), "{v}");
    let uuid = w.inspect(&disk)["slots"][1]["verity"]["uuid"].as_str().unwrap().replace('-', "");
    let rd = &status(&b)["root_device"];
    assert_eq!((rd["dm_name"].as_str(), rd["root_hash"].as_str()), (Some("root"), Some(root_hash.as_str())), "{rd}");
    assert!(rd["dm_uuid"].as_str().unwrap().contains(&uuid), "dm uuid names the slot's verity superblock uuid {uuid}: {rd}");
}

/// The firmware's and systemd-boot's words for an image whose signature does not verify.
const REFUSED: [&str; 2] = ["Access Denied", "Security Violation"];

#[test]
fn secure_boot_runs_the_signed_chain_and_an_edited_uki_is_refused_then_the_old_slot_boots() {
    let (_g, w, _t) = world();
    let disk = w.build("secure", 2, "dev");
    let next = w.bundle("secure2", 2, &[], &[]).unwrap();
    let sb = |o: &mut slotforge_qemu_tests::vm::VmOptions| {
        o.secure_boot = true;
        o.stop_on_serial = REFUSED.iter().map(|s| s.to_string()).collect();
    };
    // Boot 1, Secure Boot enforced: signed systemd-boot → signed UKI → dm-verity root. The
    // update (a signed UKI per slot) is applied to slot b.
    let b = w.boot_with(&disk, Some(&next), None, false, sb);
    ended(&b, Kind::Reboot);
    assert_eq!(status(&b)["secure_boot"], true, "the firmware enforces Secure Boot");
    let insp = w.inspect(&disk);
    assert_eq!(one(&b, Kind::Verity)["root_hash"], insp["slots"][0]["verity"]["root_hash"]);
    assert_eq!(one(&b, Kind::Applied)["entry"], "slotforge-2-b+3.efi");
    // Edit the command line inside slot b's UKI on the ESP (same length, so the PE stays whole):
    // its signature no longer matches, the firmware refuses it at every try, and after three
    // tries systemd-boot boots slot a.
    let esp_at = insp["gpt"]["partitions"].as_array().unwrap().iter().find(|p| p["name"] == "esp").unwrap()["start"].as_u64().unwrap();
    let img = format!("{}@@{esp_at}", disk.display());
    let local = w.dir.path().join("b.efi");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["mcopy", "-n", "-i", &img, "::/EFI/Linux/slotforge-2-b+3.efi", local.to_str().unwrap()]);
    let mut bytes = std::fs::read(&local).unwrap();
    let at = bytes.windows(7).position(|w| w == b"panic=1").expect("the UKI's command line");
    bytes[at..at + 7].copy_from_slice(b"panic=9");
    std::fs::write(&local, &bytes).unwrap();
    run(&["mcopy", "-o", "-i", &img, local.to_str().unwrap(), "::/EFI/Linux/slotforge-2-b+3.efi"]);
    let mut refused = 0;
    let mut last = None;
    for _ in 0..6 {
        let b = w.boot_with(&disk, None, None, false, sb);
        if b.outcome == Outcome::Killed {
            assert!(REFUSED.iter().any(|r| b.log().contains(r)));
            assert!(b.named(Kind::Initramfs).is_empty(), "no kernel of slot b ran");
            refused += 1;
            continue;
        }
        last = Some(b);
        break;
    }
    assert_eq!(refused, 3, "slot b's edited UKI must be refused exactly three times");
    let b = last.unwrap();
    ended(&b, Kind::Poweroff);
    assert_eq!(one(&b, Kind::Initramfs)["root"], "rootfs_a");
    assert_eq!(status(&b)["secure_boot"], true);
    let rb = one(&b, Kind::RolledBack);
    assert_eq!((rb["from_slot"].as_str(), rb["to_slot"].as_str()), (Some("b"), Some("a")));
}

#[test]
fn power_cuts_at_every_apply_step_always_leave_a_good_slot_and_a_rerun_completes() {
    let (_g, w, _t) = world();
    let disk = w.build("small", 2, "dev");
    let next = w.bundle("small2", 2, &[], &[]).unwrap();
    // Two of the named steps (mid-slot, after the kernel; qemu_matrix's power-cut path cuts at
    // slot-written): every other instant is covered by the crash-state replay (tests/qemu_matrix.rs,
    // the power-cut path's crash-states step), which also boots states and re-runs the apply.
    let steps = ["slot-half-written", "kernel-written"];
    let mut expect_running: Option<String> = None;
    for step in steps {
        // The cut: the apply stops at `step` and QEMU is killed.
        let b = w.boot(&disk, Some(&next), Some(step), false);
        assert_eq!(b.outcome, Outcome::Killed, "did not reach {step}; serial:\n{}", tail(&b));
        let st = status(&b);
        assert_eq!(st["state"], "ok", "before the cut at {step} the running slot was good");
        if let Some(v) = &expect_running {
            assert_eq!(st["version"], v.as_str(), "the previous re-run's slot is the one booting");
        }
        // Next boot: a good slot comes up, and the re-run of the apply completes.
        let b = w.boot(&disk, Some(&next), None, false);
        ended(&b, Kind::Reboot);
        assert_eq!(status(&b)["state"], "ok", "after a cut at {step}: {}", tail(&b));
        let booted = status(&b)["slot"].as_str().unwrap().to_string();
        let entry = b.named(Kind::Status)[0]["slots"].as_array().unwrap().iter().find(|s| s["slot"] == booted.as_str()).unwrap()["boot"].clone();
        assert_eq!(entry, "good", "after a cut at {step} the booted slot is good");
        let a = one(&b, Kind::Applied);
        assert_eq!(a["entry"].as_str().unwrap(), format!("slot-{}+3.conf", if booted == "a" { "b" } else { "a" }));
        expect_running = Some("1.1.0".into());
    }
    // The last apply boots and becomes good.
    let b = w.boot(&disk, None, None, false);
    ended(&b, Kind::Poweroff);
    assert_eq!(status(&b)["version"], "1.1.0");
    assert!(!b.named(Kind::MarkedGood).is_empty());
    let v = std::process::Command::new(bin()).args(["verify", disk.to_str().unwrap()]).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn an_older_generation_takes_a_bundle_built_compatible_with_it() {
    let (_g, w, _t) = world();
    let disk = w.build("small", 1, "old");
    assert!(w.bundle("small2", 1, &[], &[]).is_ok());
    let plain = w.bundle("small2", 2, &[], &[]).unwrap();
    let b = w.boot(&disk, Some(&plain), None, false);
    ended(&b, Kind::Poweroff);
    assert!(one(&b, Kind::ApplyFailed)["error"].as_str().unwrap().contains("not this device's layout field generation 1"));
    let compat = w.bundle("small2", 2, &[1], &[]).unwrap();
    let b = w.boot(&disk, Some(&compat), None, false);
    ended(&b, Kind::Reboot);
    assert_eq!(one(&b, Kind::Applied)["slot"], "b");
    let b = w.boot(&disk, None, None, false);
    ended(&b, Kind::Poweroff);
    assert_eq!(status(&b)["version"], "1.1.0");
    assert_eq!(one(&b, Kind::MarkedGood)["entry"], "slot-b.conf");
    assert_eq!(w.inspect(&disk)["layout"]["generation"], 1);
}

#[test]
fn new_images_from_the_registry_only_or_from_the_bundle_only_both_end_verified() {
    let (_g, w, _t) = world();
    // Registry only: a bundle without images, network on.
    let disk = w.build("small", 2, "reg");
    let thin = w.bundle("large", 2, &[], &["--without-images"]).unwrap();
    let b = w.boot(&disk, Some(&thin), None, true);
    ended(&b, Kind::Reboot);
    let mut pull: Vec<String> = one(&b, Kind::Applied)["images_to_pull"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    pull.sort();
    assert_eq!(pull, ["model", "tools"], "svc-a is shared with small and needs no pull");
    let b = w.boot(&disk, None, None, true);
    ended(&b, Kind::Poweroff);
    assert_eq!(status(&b)["version"], "2.0.0");
    assert_eq!(b.named(Kind::ImagePulled).len(), 2);
    assert!(all_verified(&b), "{:?}", image_states(&b));
    assert!(!b.named(Kind::MarkedGood).is_empty());
    // Bundle only: everything in the bundle, no network at all.
    let disk = w.build("small", 2, "bun");
    let full = w.bundle("large", 2, &[], &[]).unwrap();
    let b = w.boot(&disk, Some(&full), None, false);
    ended(&b, Kind::Reboot);
    let b = w.boot(&disk, None, None, false);
    ended(&b, Kind::Poweroff);
    assert!(b.named(Kind::ImagePulled).is_empty());
    assert!(all_verified(&b), "{:?}", image_states(&b));
}
