//! The readers behind inspect/verify on damaged images: errors are fine, panics are bugs, and a
//! damaged GPT or ESP is reported as a failed check.

mod common;
use common::*;
use std::io::{Seek, SeekFrom, Write};

fn demo_disk(fx: &Fixture) -> std::path::PathBuf {
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]));
    out
}

fn flip(path: &std::path::Path, at: u64, len: usize, seed: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&noise(len, seed)).unwrap();
}

fn failed_checks(path: &std::path::Path) -> Vec<String> {
    let o = slotforge(&["verify", path.to_str().unwrap(), "--json"]);
    assert!(o.status.code() == Some(2) || o.status.code() == Some(1), "verify must fail: {}", String::from_utf8_lossy(&o.stdout));
    match serde_json::from_slice::<serde_json::Value>(&o.stdout) {
        Ok(v) => v["checks"].as_array().unwrap().iter().filter(|c| c["ok"] == false).map(|c| c["name"].as_str().unwrap().to_string()).collect(),
        Err(_) => vec![String::from_utf8_lossy(&o.stderr).into_owned()],
    }
}

#[test]
fn damaged_primary_gpt_entries_fail_verify() {
    let fx = fixture();
    let d = demo_disk(&fx);
    flip(&d, 2 * 512 + 56, 8, 1); // inside entry 1's name: the entry-array CRC no longer matches
    let f = failed_checks(&d);
    assert!(f.iter().any(|c| c == "gpt" || c.contains("GPT")), "{f:?}");
}

#[test]
fn damaged_esp_fails_verify() {
    let fx = fixture();
    let d = demo_disk(&fx);
    flip(&d, 1 << 20, 512, 2); // the ESP's boot sector
    let f = failed_checks(&d);
    assert!(f.iter().any(|c| c == "esp" || c == "read"), "{f:?}");
}

#[test]
fn damaged_squashfs_superblock_fails_verify() {
    let fx = fixture();
    let d = demo_disk(&fx);
    let mut disk = std::fs::File::open(&d).unwrap();
    let g = slotforge::format::disk::read_gpt(&mut disk).unwrap();
    let a = g.partitions.iter().find(|p| p.name == "rootfs_a").unwrap();
    flip(&d, a.start + 40, 8, 3); // bytes_used
    let f = failed_checks(&d);
    assert!(f.iter().any(|c| c == "slot a"), "{f:?}");
}

#[test]
fn random_damage_never_panics_the_readers() {
    let fx = fixture();
    let clean = demo_disk(&fx);
    let len = std::fs::metadata(&clean).unwrap().len();
    let mut disk = std::fs::File::open(&clean).unwrap();
    let g = slotforge::format::disk::read_gpt(&mut disk).unwrap();
    // Hit the metadata regions where parsers look: GPT, the start of each partition.
    let mut targets = vec![0u64, 512, 1024, len - 512 * 33];
    for p in &g.partitions {
        for off in [0u64, 512, 1024, 4096, 8192, 65536, 1 << 20] {
            targets.push(p.start + off);
        }
    }
    let work = fx.path().join("work.img");
    for (i, t) in targets.iter().enumerate() {
        std::fs::copy(&clean, &work).unwrap();
        flip(&work, *t, 256, i as u64 + 100);
        let r = std::panic::catch_unwind(|| {
            let _ = slotforge::format::inspect::inspect(&work);
            let _ = slotforge::format::inspect::verify(&work);
        });
        assert!(r.is_ok(), "reader panicked on damage at offset {t}");
    }
}
