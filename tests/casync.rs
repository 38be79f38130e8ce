//! casync compatibility: `slotforge chunk` writes the blob index `casync make` writes for the
//! same file, byte for byte (same chunk boundaries, same SHA-512/256 ids, same header), and its
//! chunk store is one `casync extract` reads back. Files: random data across many chunks,
//! all-zero data (every chunk cut at the maximum), a file smaller than the hash window, an empty
//! one, and a real rootfs slot image built from the fixture.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn casync(args: &[&str]) {
    let o = Command::new("casync").args(args).output().expect("casync (apt-get install casync)");
    assert!(o.status.success(), "casync {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn same_as_casync(file: &Path, work: &Path) -> usize {
    let name = file.file_name().unwrap().to_str().unwrap();
    let theirs = work.join(format!("{name}.casync.caibx"));
    let ours = work.join(format!("{name}.ours.caibx"));
    casync(&["make", "--store", work.join("casync.castr").to_str().unwrap(), theirs.to_str().unwrap(), file.to_str().unwrap()]);
    let store = work.join("ours.castr");
    let j: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["chunk", file.to_str().unwrap(), "--store", store.to_str().unwrap(), "-o", ours.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap(), "{name}: our index differs from casync make's");
    // casync reads our store back into the same bytes.
    let out = work.join(format!("{name}.extracted"));
    casync(&["extract", "--store", store.to_str().unwrap(), ours.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(sha256_file(&out), sha256_file(file), "{name}: casync extract from our store");
    j["chunks"].as_u64().unwrap() as usize
}

#[test]
fn chunk_indexes_are_the_ones_casync_writes() {
    let w = tempfile::tempdir().unwrap();
    let d = w.path();
    let files: [(&str, Vec<u8>); 4] = [("random", noise(3_000_000, 11)), ("zeros", vec![0; 5_000_000]), ("tiny", b"tiny".to_vec()), ("empty", vec![])];
    for (name, data) in &files {
        std::fs::write(d.join(name), data).unwrap();
    }
    assert!(same_as_casync(&d.join("random"), d) > 20);
    assert_eq!(same_as_casync(&d.join("zeros"), d), 20, "all-zero data is cut at the 256 KiB maximum");
    assert_eq!(same_as_casync(&d.join("tiny"), d), 1);
    assert_eq!(same_as_casync(&d.join("empty"), d), 0);

    // A real slot image: the fixture's rootfs squashfs and its dm-verity tree.
    let fx = fixture();
    let disk = fx.path().join("disk.img");
    ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", layouts().join("demo.yaml").to_str().unwrap(), "-o", disk.to_str().unwrap(), "-q"]));
    let slot = d.join("rootfs_a");
    extract_partition(&disk, "rootfs_a", &slot);
    assert!(same_as_casync(&slot, d) > 1);
    // Chunking again adds nothing to the store.
    let j: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["chunk", slot.to_str().unwrap(), "--store", d.join("ours.castr").to_str().unwrap(), "-o", d.join("again.caibx").to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(j["new_chunks"], 0, "{j}");
}
