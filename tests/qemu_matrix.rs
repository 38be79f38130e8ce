//! `slotforge test` on a matrix of the project's own variants (qemu-tests/variants/): a
//! rollback after a broken rootfs (the scenario tests/qemu_upgrade.rs used to drive by hand),
//! a power cut mid-apply then a completed upgrade (then the crash states of the next one), a thin bundle whose images come from the
//! registry (then a corrupted blob repaired from it; and the same without network: degraded),
//! a release pushed to the registry and pulled by tag by the guest's agent with the connection
//! cut half-way (the next boot goes on from what the first kept), a 500 MB sealed image missing at
//! first boot started lazily from the registry (its service runs before the image is complete),
//! a bundle signed by an untrusted key (on a disk, then pushed and pulled by tag) then a trusted one, an install through the USB
//! installer, an upgrade from a build with unsealed images to sealed ones and back, a third
//! build's upgrade recorded write by write whose crash states are checked offline and four
//! booted (three of the apply: the last on the old slot, the first on probation, one whose ESP
//! needs the boot-time repair; one of the first boot), and one path
//! whose expectation is deliberately wrong — which must fail with a diagnosis while the others
//! pass. The JUnit and JSON reports are read back.

use slotforge_qemu_tests::fixtures::{self, Fixtures};
use slotforge_qemu_tests::world::World;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_slotforge"))
}
fn fx() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| fixtures::build(bin()).expect("building QEMU fixtures"))
}

#[test]
fn a_matrix_runs_through_slotforge_test_with_junit_and_json_reports() {
    let w = World::new(bin(), fx()).with_bulk();
    let d = w.dir.path();
    let matrix = format!(
        r#"variants:
  small: {{manifest: {small}}}
  large: {{manifest: {large}}}
  signed: {{manifest: {signed}}}
  signed2: {{manifest: {signed2}, key: {release}}}
  unsealed: {{manifest: {unsealed}}}
  small2: {{manifest: {small2}}}
  bulk: {{manifest: {bulk}}}
layouts:
  gen2: {gen2}
  gen3: {gen3}
registry: 127.0.0.1:{port}
paths:
  # First: the longest path (its last step records and replays crash states), so the other job
  # runs the rest meanwhile.
  - name: power-cut
    install: {{variant: small, layout: gen2}}
    steps:
      - upgrade: large
        fault: power-cut:slot-written
        expect: {{slot: a, variant: small}}
      - upgrade: large
        expect: {{slot: b, variant: large, state: ok, rolled_back: false}}
      - upgrade: small2
        fault: crash-states:4
        expect: {{slot: a, variant: small2, state: ok}}
  - name: rollback
    install: {{variant: small, layout: gen2}}
    steps:
      - upgrade: large
        fault: bad-rootfs
        expect: {{slot: a, variant: small, rolled_back: true, state: ok}}
  - name: wrong-expectation
    install: {{variant: small, layout: gen2, expect: {{slot: b}}}}
    steps:
      - boot: true
  - name: thin
    install: {{variant: small, layout: gen2}}
    steps:
      - upgrade: large
        supply: registry
        expect: {{slot: b, variant: large, state: ok}}
      - boot: true
        fault: corrupt-image
        expect: {{slot: b, variant: large, state: ok}}
  - name: thin-offline
    install: {{variant: small, layout: gen2}}
    steps:
      - upgrade: large
        supply: registry
        fault: network-down
        expect: {{slot: b, variant: large, state: degraded}}
  - name: lazy
    install: {{variant: small, layout: gen3}}
    steps:
      - upgrade: bulk
        supply: registry
        expect: {{slot: b, variant: bulk, state: ok, lazy: true}}
      - boot: true
        expect: {{slot: b, variant: bulk, state: ok}}
  - name: by-tag
    install: {{variant: small, layout: gen2}}
    steps:
      - upgrade: large
        supply: registry-bundle
        fault: network-cut
        expect: {{slot: b, variant: large, state: ok}}
  - name: delta
    install: {{variant: small, layout: gen2}}
    steps:
      - upgrade: large
        supply: delta
        expect: {{slot: b, variant: large, state: ok}}
  - name: keys
    install: {{variant: signed, layout: gen2}}
    steps:
      - upgrade: signed2
        fault: wrong-key
        expect: {{refused: true, slot: a, variant: signed}}
      - upgrade: signed2
        supply: registry-bundle
        fault: wrong-key
        expect: {{refused: true, slot: a, variant: signed}}
      - upgrade: signed2
        expect: {{slot: b, variant: signed2}}
  - name: usb
    install: {{variant: small, layout: gen2, via: installer}}
  - name: seal
    install: {{variant: unsealed, layout: gen2}}
    steps:
      - upgrade: small
        expect: {{slot: b, variant: small, state: ok}}
      - upgrade: unsealed
        expect: {{slot: a, variant: unsealed, state: ok}}
"#,
        small = w.manifest("small").display(),
        large = w.manifest("large").display(),
        signed = w.manifest("signed").display(),
        signed2 = w.manifest("signed2").display(),
        unsealed = w.manifest("unsealed").display(),
        small2 = w.manifest("small2").display(),
        bulk = w.manifest("bulk").display(),
        gen3 = World::layout(3).display(),
        release = w.key("release").display(),
        port = w.reg.port,
        gen2 = World::layout(2).display(),
    );
    let m = d.join("upgrades.yaml");
    std::fs::write(&m, matrix).unwrap();
    let junit = d.join("report.xml");
    let keep = d.join("keep");
    // SLOTFORGE_MATRIX_ONLY=GLOB runs only those paths (while working on one).
    let only = std::env::var("SLOTFORGE_MATRIX_ONLY").ok();
    let o = Command::new(bin())
        .args(["test", m.to_str().unwrap(), "--json", "--junit", junit.to_str().unwrap(), "--keep", keep.to_str().unwrap(), "--jobs", "2", "--cache", d.join("cache").to_str().unwrap()])
        .args(only.iter().flat_map(|o| ["--only", o.as_str()]))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stderr);
    if only.is_some() {
        // A developer's run of some paths: their table is the result.
        assert_eq!(o.status.code(), Some(0), "{table}");
        eprintln!("{table}\n{}", String::from_utf8_lossy(&o.stdout));
        return;
    }
    assert_eq!(o.status.code(), Some(2), "one path fails on purpose:\n{table}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {table}"));
    let steps = r["steps"].as_array().unwrap();
    let result = |path: &str, i: usize| steps.iter().find(|s| s["path"] == path && s["index"] == i).unwrap_or_else(|| panic!("{path}/{i} missing:\n{table}"));
    for (p, n) in [("rollback", 2), ("power-cut", 4), ("thin", 3), ("thin-offline", 2), ("lazy", 3), ("by-tag", 2), ("delta", 2), ("keys", 4), ("usb", 1), ("seal", 3)] {
        for i in 0..n {
            assert_eq!(result(p, i)["result"], "pass", "{p}/{i}: {}\n{table}", result(p, i)["message"]);
        }
    }
    assert_eq!(result("rollback", 1)["observed"]["rolled_back"], true);
    assert_eq!(result("rollback", 1)["boots"], 5, "the apply, exactly three failed tries of the broken slot, the fallback");
    assert_eq!(result("rollback", 1)["observed"]["outcomes"], serde_json::json!(["Exited", "Exited", "Exited", "Exited", "Exited"]));
    assert_eq!(result("power-cut", 1)["observed"]["outcomes"][0], "Killed", "the first boot of the step is the cut");
    assert!(result("keys", 1)["observed"]["refusal"].as_str().unwrap().contains("nothing was changed"), "{}", result("keys", 1)["observed"]);
    // The same bundle pushed and pulled by tag in the guest: refused on its signature before
    // any content was fetched.
    let by_tag = result("keys", 2)["observed"]["refusal"].as_str().unwrap().to_string();
    assert!(by_tag.contains("refused") && by_tag.contains("nothing was fetched or changed"), "{by_tag}");
    assert_eq!(result("usb", 0)["boots"], 2, "the installer's boot, then the target's");
    // By tag, the connection cut half-way: the first boot's pull failed (kept what arrived), the
    // next boot's pull went on from there — fewer chunks than a clean pull of the same disk —
    // and the new slot booted; the failed first pull is not a refusal.
    let tag = &result("by-tag", 1)["observed"];
    assert_eq!(tag["refused"], false, "{tag}");
    let cut = &tag["network_cut"];
    let (resumed, clean) = (cut["resumed_chunks_fetched"].as_u64().unwrap(), cut["clean_chunks_fetched"].as_u64().unwrap());
    assert!(resumed > 0 && resumed < clean, "{cut}");
    assert!(tag["pulled"]["chunks_local"].as_u64().unwrap() > 0 && tag["pulled"]["reference"].as_str().unwrap().starts_with("10.0.2.100:5000/slotforge-test/by-tag:"), "{tag}");
    assert_eq!(tag["pulled"]["requests_before_decision"], 3, "{tag}");
    // Lazy: the 500 MB sealed image, missing at the new slot's first boot, was exposed from the
    // registry at once and its service (reading its first megabyte through dm-verity) ran before
    // the image was complete; the boot was marked good.
    let lazy = &result("lazy", 1)["observed"];
    let l = &lazy["lazy_images"][0];
    assert_eq!((l["name"].as_str(), l["service_before_filled"].as_bool()), (Some("bulk"), Some(true)), "{lazy}");
    let waited = l["service_started_at"].as_f64().unwrap() - l["found_missing_at"].as_f64().unwrap();
    assert!(waited > 0.0 && l["seconds"].as_f64().unwrap() < 30.0, "{l}");
    assert!(lazy["images"].as_array().unwrap().iter().any(|i| i["name"] == "bulk" && (i["state"] == "lazy" || i["state"] == "verified")), "{lazy}");
    // svc-c:2 (5 MB) was filled in during that boot and put in place: the next boot finds it
    // whole and verified, like any image of the partition.
    let tools = lazy["lazy_images"].as_array().unwrap().iter().find(|l| l["name"] == "tools").unwrap_or_else(|| panic!("{lazy}"));
    assert!(tools["filled"]["bytes_fetched"].as_u64().unwrap() > 4_000_000, "{tools}");
    let next = &result("lazy", 2)["observed"];
    assert!(next["images"].as_array().unwrap().iter().any(|i| i["name"] == "tools" && i["state"] == "verified"), "{next}");
    // The deliberately wrong expectation: reported as a failure, with what was observed.
    let bad = result("wrong-expectation", 0);
    assert_eq!(bad["result"], "fail");
    let msg = bad["message"].as_str().unwrap();
    assert!(msg.contains("expected slot = \"b\", observed \"a\""), "{msg}");
    assert!(msg.contains("last serial lines"), "{msg}");
    assert_eq!(result("wrong-expectation", 1)["result"], "skipped");
    // Unsealed → sealed → back: the sealed build's boot ran GC keeping both slots' sets, so the
    // unsealed build finds its layers again (every blob re-hashed: state ok).
    let seal = |i: usize| result("seal", i)["observed"]["images"][0].clone();
    assert!(seal(0)["sealed"].is_null(), "unsealed build runs its image unpacked: {}", seal(0));
    assert_eq!(seal(1)["sealed"]["verity"], "verified", "{}", seal(1));
    assert!(seal(2)["sealed"].is_null(), "{}", seal(2));
    assert_eq!((r["passed"].as_u64(), r["failed"].as_u64(), r["skipped"].as_u64()), (Some(26), Some(1), Some(1)), "{table}");
    assert!(table.contains("rollback") && table.contains("1 failed"), "{table}");
    // JUnit read back: three suites, one failure, one skipped.
    let x = std::fs::read_to_string(&junit).unwrap();
    assert!(x.starts_with("<?xml") && x.contains("<testsuites name=\"slotforge test\" tests=\"28\" failures=\"1\" skipped=\"1\""), "{x}");
    assert_eq!(x.matches("<testsuite ").count(), 11);
    assert!(x.contains("<failure message=\"expected slot = &quot;b&quot;, observed &quot;a&quot;\">"), "{x}");
    // --keep: the builds (each variant built once) and every path's serial logs are there.
    assert!(keep.join("builds/small-gen2.img").exists());
    assert!(std::fs::read_dir(keep.join("paths/power-cut/vm")).unwrap().filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with(".serial.log")));
    // Crash states of the third build's upgrade (small → large → small2 onto slot a): the apply
    // and the first boot — whose GC drops small's set — recorded, every sampled state checked
    // offline and sound, none booting only through a fallback, four booted in QEMU — of the apply
    // the last state before the new entry exists (still the old slot: the apply re-runs to the new
    // slot), the first where it exists (the probation boot of the new slot) and one whose ESP needs
    // the boot-time repair; of the first boot the state after systemd-boot's counting rename —
    // each leaving a clean ESP.
    let c = &result("power-cut", 3)["observed"]["crash_states"];
    let ops = c["operations"].as_array().unwrap();
    assert_eq!(ops.iter().map(|o| o["operation"].as_str().unwrap()).collect::<Vec<_>>(), ["apply", "first-boot"], "{c}");
    for o in ops {
        assert!(o["states"].as_u64().unwrap() > o["flushes"].as_u64().unwrap(), "every flush boundary and samples between: {o}");
        assert_eq!(o["failed"], 0, "{o}");
        assert_eq!(o["fallbacks"], 0, "no state boots only through a fallback: {o}");
    }
    let apply_to: Vec<&String> = ops[0]["decisions"].as_object().unwrap().keys().collect();
    assert!(apply_to.iter().any(|k| k.starts_with("slot-b")) && apply_to.iter().any(|k| k.starts_with("slot-a+3")), "the apply's states boot the old slot, then the new one on probation: {apply_to:?}");
    assert!(ops[0]["by_region"]["rootfs_a"]["writes"].as_u64().unwrap() > 0 && ops[0]["by_region"]["rootfs_b"].is_null(), "{}", ops[0]);
    // The recorded first boot is the path's last boot of its disk.
    let last_dev = (0..).map(|n| keep.join(format!("paths/power-cut/vm/dev.boot{n}.serial.log"))).take_while(|p| p.exists()).last().unwrap();
    let events = slotforge::format::agent::events::parse(&std::fs::read_to_string(&last_dev).unwrap());
    let gc: Vec<&slotforge::format::agent::GcReport> = slotforge::format::agent::events::known(&events).filter_map(|e| if let slotforge::format::agent::Event::Gc(r) = e { Some(r) } else { None }).collect();
    assert!(gc.len() == 1 && gc[0].removed_builds.len() == 1 && gc[0].removed_blobs > 0, "the recorded first boot's GC dropped small's set: {gc:?}");
    let booted = c["booted"].as_array().unwrap();
    assert_eq!(booted.len(), 4, "{c}");
    assert!(booted.iter().all(|b| b["ok"] == true && b["esp_after"] == "fsck.vfat -n: clean"), "{c}");
    let apply: Vec<&serde_json::Value> = booted.iter().filter(|b| b["operation"] == "apply").collect();
    assert_eq!(apply.len(), 3, "{c}");
    assert!(apply.iter().any(|b| b["slot"] == "b" && b["rerun"] == true), "a state on the old slot, the apply re-run: {c}");
    assert!(apply.iter().any(|b| b["slot"] == "a" && b["rerun"].is_null()), "a state where the new entry exists: the probation boot of slot a: {c}");
    assert!(apply.iter().any(|b| b["esp_before"].as_str().is_some_and(|e| e.contains("after fsck.vfat -a") && (e.contains("leaked") || e.contains("damage") || e.contains("FSInfo")))), "a state whose ESP needs the boot-time repair: {c}");
    let first: Vec<&serde_json::Value> = booted.iter().filter(|b| b["operation"] == "first-boot").collect();
    assert!(first.len() == 1 && first[0]["slot"] == "a", "{c}");
    // Independently: replaying the whole apply log onto the disk before gives, byte for byte, the
    // disk QEMU left; and `slotforge crash-states` on the kept first-boot recording agrees with
    // the step.
    let cd = keep.join("paths/power-cut/crash");
    let log = slotforge::format::logwrites::parse(std::fs::File::open(cd.join("apply.log")).unwrap()).unwrap();
    let replayed = d.join("replayed.img");
    std::fs::copy(cd.join("before-apply.img"), &replayed).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&replayed).unwrap();
    slotforge::format::logwrites::apply(&log, std::fs::File::open(cd.join("apply.log")).unwrap(), &mut f, 0..log.entries.len()).unwrap();
    drop(f);
    let sha = |p: &Path| String::from_utf8(Command::new("sha256sum").arg(p).output().unwrap().stdout).unwrap()[..64].to_string();
    assert_eq!(sha(&replayed), sha(&cd.join("before-first-boot.img")), "the whole log replayed = the disk after the apply");
    let o = Command::new(bin()).args(["crash-states", cd.join("before-first-boot.img").to_str().unwrap(), cd.join("first-boot.log").to_str().unwrap(), "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((again["states"].clone(), again["failed"].clone()), (ops[1]["states"].clone(), serde_json::json!(0)), "same log, same sample, same verdicts");
    // The checker sees what would not boot: the whole apply except its writes to slot a (an entry
    // on probation naming a slot never written) boots slot b only by systemd-boot's fallback; with
    // slot b's rootfs also damaged, no entry boots and the state fails.
    let regions = slotforge::harness::crash::check::regions(&cd.join("before-apply.img")).unwrap();
    let slot_a = regions.iter().find(|r| r.name == "rootfs_a").unwrap().clone();
    let torn = d.join("no-slot.img");
    std::fs::copy(cd.join("before-apply.img"), &torn).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&torn).unwrap();
    let keep_out = (0..log.entries.len()).filter(|&i| !(slot_a.start..slot_a.end).contains(&(log.entries[i].sector * 512)));
    slotforge::format::logwrites::apply(&log, std::fs::File::open(cd.join("apply.log")).unwrap(), &mut f, keep_out).unwrap();
    drop(f);
    let known = slotforge::harness::crash::check::Known::from_disks(&[&cd.join("before-apply.img"), &cd.join("before-first-boot.img")]).unwrap();
    let dec = slotforge::harness::crash::check::decide(&torn, &regions, &known, d).unwrap();
    assert!(dec.ok && dec.fallback && dec.slot.as_deref() == Some("b"), "{dec:?}");
    assert!(dec.detail.contains("slot-a+3.conf would not boot") && dec.detail.contains("slot a"), "{dec:?}");
    let slot_b = regions.iter().find(|r| r.name == "rootfs_b").unwrap();
    slotforge::harness::faults::flip_byte(&torn, slot_b.start + 2000).unwrap();
    let dec = slotforge::harness::crash::check::decide(&torn, &regions, &known, d).unwrap();
    assert!(!dec.ok && dec.entry.is_none(), "{dec:?}");
    // --only picks one path; nothing else runs.
    let o = Command::new(bin()).args(["test", m.to_str().unwrap(), "--only", "wrong-*", "--json", "--cache", d.join("cache").to_str().unwrap()]).output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["steps"].as_array().unwrap().iter().all(|s| s["path"] == "wrong-expectation"), "{r}");
}
