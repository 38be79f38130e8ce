//! The offline USB installer, booted in QEMU next to a blank target disk: it writes the target,
//! fits the layout to the disk, verifies, powers off; the target then boots alone with every
//! external image verified. A too-small target is refused and left untouched.

use slotforge_qemu_tests::fixtures::{self, Fixtures};
use slotforge_qemu_tests::vm::{self, Outcome, VmOptions};
use slotforge_qemu_tests::world::World;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use slotforge::format::agent::Kind;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_slotforge"))
}
fn fx() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| fixtures::build(bin()).expect("building QEMU fixtures"))
}
static SERIAL: Mutex<()> = Mutex::new(());

fn boot(w: &World, disk: &Path, extra: &[&Path], name: &str) -> vm::Boot {
    let mut o = VmOptions::new(disk, &w.dir.path().join("vm"), name);
    o.memory_mb = 768;
    o.extra_disks = extra.iter().map(|p| p.to_path_buf()).collect();
    let b = vm::boot_to_end(&o).unwrap();
    assert_eq!(b.outcome, Outcome::Exited, "serial:\n{}", b.log());
    b
}

fn one<'a>(b: &'a vm::Boot, e: Kind) -> &'a slotforge::format::agent::Received {
    b.named(e).into_iter().next().unwrap_or_else(|| panic!("no {}; serial:\n{}", e.name(), b.log()))
}

#[test]
fn the_usb_installer_writes_a_bootable_target_and_refuses_a_small_one() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = World::new(bin(), fx());
    let m = w.manifest("small");
    let usb = w.dir.path().join("usb.img");
    let o = std::process::Command::new(bin())
        .args(["installer", m.to_str().unwrap(), "--layout", World::layout(2).to_str().unwrap(), "-o", usb.to_str().unwrap(), "--json", "--cache", w.dir.path().join("cache").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(s["installer_size"].as_u64().unwrap() < s["target_image_size"].as_u64().unwrap() / 2, "the installer is small: {s}");

    // A target smaller than the layout needs: refused, not one byte written.
    let small = w.dir.path().join("small-target.img");
    std::fs::File::create(&small).unwrap().set_len(400 << 20).unwrap();
    let b = boot(&w, &usb, &[&small], "usb1");
    assert!(one(&b, Kind::InstallRefused)["error"].as_str().unwrap().contains("too small"));
    assert!(b.named(Kind::Installed).is_empty());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&small).unwrap().blocks(), 0, "the refused target was written to");

    // A 1 GiB target: installed, the data partition grown to the disk.
    let target = w.dir.path().join("target.img");
    std::fs::File::create(&target).unwrap().set_len(1 << 30).unwrap();
    let b = boot(&w, &usb, &[&target], "usb2");
    let start = one(&b, Kind::InstallStart);
    assert_eq!(start["size"], 1u64 << 30);
    let done = one(&b, Kind::Installed);
    eprintln!("install under {}: {} bytes in {:.1} s (boot total {:.1} s)", b.accel, done["bytes"], done["seconds"].as_f64().unwrap(), b.seconds);
    assert!(!b.named(Kind::InstallProgress).is_empty());
    let v = std::process::Command::new(bin()).args(["verify", target.to_str().unwrap(), "--json"]).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    let i = w.inspect(&target);
    assert_eq!(i["layout"]["disk_size"], 1u64 << 30);
    let persist = i["gpt"]["partitions"].as_array().unwrap().last().unwrap().clone();
    assert!(persist["size"].as_u64().unwrap() > 400 << 20, "{persist}");

    // The target boots alone: its external image present and verified, no network.
    let b = boot(&w, &target, &[], "target");
    let st = one(&b, Kind::Status);
    assert_eq!((st["state"].as_str(), st["slot"].as_str(), st["version"].as_str()), (Some("ok"), Some("a"), Some("1.0.0")));
    assert!(b.named(Kind::ImagePulled).is_empty());
}
