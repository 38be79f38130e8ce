//! The crash-state checker's decision ("which entry would systemd-boot start, and does it boot")
//! on real disk images: an entry is judged against the files of its own build (an older kernel
//! under the new entry fails, and the counter falls back — a fallback, counted apart), and an
//! entry without a `linux` line is dropped as systemd-boot drops it.

mod common;
use common::*;
use slotforge::harness::crash::check::{decide, regions, Known};
use std::path::Path;

/// Overwrite partition `name` of `disk` with the contents of `file`.
fn put_partition(disk: &Path, name: &str, file: &Path) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(disk).unwrap();
    let g = slotforge::format::disk::read_gpt(&mut f).unwrap();
    let p = g.partitions.iter().find(|p| p.name == name).unwrap();
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(p.start)).unwrap();
    std::io::copy(&mut std::fs::File::open(file).unwrap(), &mut f).unwrap();
}

/// Edit the ESP of `disk` with mtools: `edit(esp_image)`.
fn edit_esp(disk: &Path, dir: &Path, edit: impl FnOnce(&Path)) {
    let esp = dir.join("esp.edit");
    extract_partition(disk, "esp", &esp);
    edit(&esp);
    put_partition(disk, "esp", &esp);
}

#[test]
fn entries_are_judged_against_their_own_build_and_entries_without_linux_are_dropped() {
    let fx = fixture();
    let l = layouts().join("demo.yaml");
    // Build 1 on the disk; build 2 (another kernel, another version) applied offline to slot b.
    let old = fx.path().join("old.img");
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", old.to_str().unwrap(), "-q"]));
    let ktar = layer(&[E::Dir("lib/modules/6.2/", 0o755)]);
    oci_image(&fx.path().join("images/kernel"), "6.2", vec![(layer(&[E::File("kernel", noise(300_000, 77), 0o644), E::File("initrd.img", noise(50_000, 78), 0o644), E::File("kernel.tar", ktar, 0o644)]), Comp::Gzip)], &[]);
    let m2 = fx.path().join("v2.yml");
    std::fs::write(&m2, MANIFEST.replace("version: 1.4.0", "version: 1.5.0").replace("oci:images/kernel:6.1", "oci:images/kernel:6.2")).unwrap();
    let bundle = fx.path().join("v2.tar");
    ok(&slotforge(&["bundle", m2.to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", bundle.to_str().unwrap(), "-q"]));
    let new = fx.path().join("new.img");
    std::fs::copy(&old, &new).unwrap();
    ok(&slotforge(&["upgrade", new.to_str().unwrap(), bundle.to_str().unwrap()]));
    let known = Known::from_disks(&[&old, &new]).unwrap();
    let regs = regions(&old).unwrap();
    let scratch = tempfile::tempdir().unwrap();

    let d = decide(&new, &regs, &known, scratch.path()).unwrap();
    assert!(d.ok && !d.fallback && d.entry.as_deref() == Some("slot-b+3.conf") && d.slot.as_deref() == Some("b"), "{d:?}");

    // The old build's kernel under the new entry: not the file its build wrote. Before, every
    // known kernel digest passed; now the entry fails and its counter falls back to slot a.
    let mixed = fx.path().join("mixed.img");
    std::fs::copy(&new, &mixed).unwrap();
    edit_esp(&mixed, fx.path(), |esp| {
        let k = fx.path().join("old-kernel");
        tool("mcopy", &["-o", "-i", esp.to_str().unwrap(), "::/a/vmlinuz", k.to_str().unwrap()]);
        tool("mcopy", &["-o", "-i", esp.to_str().unwrap(), k.to_str().unwrap(), "::/b/vmlinuz"]);
    });
    let d = decide(&mixed, &regs, &known, scratch.path()).unwrap();
    assert!(d.ok && d.fallback && d.slot.as_deref() == Some("a"), "{d:?}");
    assert!(d.detail.contains("/b/vmlinuz is not the linux build 1.5.0-"), "{}", d.detail);

    // The new entry without its linux line: systemd-boot drops it; slot a boots, no fallback.
    let nolinux = fx.path().join("nolinux.img");
    std::fs::copy(&new, &nolinux).unwrap();
    edit_esp(&nolinux, fx.path(), |esp| {
        let e = fx.path().join("entry.conf");
        tool("mcopy", &["-o", "-i", esp.to_str().unwrap(), "::/loader/entries/slot-b+3.conf", e.to_str().unwrap()]);
        let text: String = std::fs::read_to_string(&e).unwrap().lines().filter(|l| !l.starts_with("linux")).map(|l| format!("{l}\n")).collect();
        std::fs::write(&e, text).unwrap();
        tool("mcopy", &["-o", "-i", esp.to_str().unwrap(), e.to_str().unwrap(), "::/loader/entries/slot-b+3.conf"]);
    });
    let d = decide(&nolinux, &regs, &known, scratch.path()).unwrap();
    assert!(d.ok && !d.fallback && d.entry.as_deref() == Some("slot-a.conf"), "{d:?}");
    assert!(d.detail.contains("slot-b+3.conf has no linux line (systemd-boot drops it)"), "{}", d.detail);
}
