//! Factory media: the bmap that `bmaptool copy` flashes and checks, and the qcow2 copy, both
//! checked with the real tools (Debian's bmap-tools, qemu-img).

mod common;
use common::*;

#[test]
fn bmaptool_flashes_only_mapped_blocks_and_checks_them() {
    let fx = fixture();
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    let s: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "--bmap", "--qcow2", "--json"]))).unwrap();
    let bmap = fx.path().join("disk.img.bmap");
    let mapped = s["bmap"][1]["mapped_bytes"].as_u64().unwrap();
    let size = s["disk_size"].as_u64().unwrap();
    assert!(mapped < size / 4, "mapped {mapped} of {size}");
    // A device stand-in: bmaptool copies into an existing file and verifies every range.
    let target = fx.path().join("device.img");
    std::fs::write(&target, b"").unwrap();
    tool("bmaptool", &["copy", "--bmap", bmap.to_str().unwrap(), out.to_str().unwrap(), target.to_str().unwrap()]);
    assert_eq!(sha256_file(&target), sha256_file(&out), "the flashed copy equals the image");
    // A byte changed inside a mapped range: bmaptool refuses it.
    let mut data = std::fs::read(&out).unwrap();
    data[(1 << 20) + 3] ^= 1; // the ESP's boot sector, which is mapped
    std::fs::write(&out, &data).unwrap();
    let o = std::process::Command::new("bmaptool").args(["copy", "--bmap", bmap.to_str().unwrap(), out.to_str().unwrap(), target.to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success(), "bmaptool accepted a corrupted image");
    assert!(String::from_utf8_lossy(&o.stderr).to_lowercase().contains("checksum"), "{}", String::from_utf8_lossy(&o.stderr));
    // qcow2: consistent, and the same content as the raw image (before the corruption).
    let q = fx.path().join("disk.qcow2");
    tool("qemu-img", &["check", q.to_str().unwrap()]);
    std::fs::write(&out, { data[(1 << 20) + 3] ^= 1; &data }).unwrap();
    tool("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", out.to_str().unwrap(), q.to_str().unwrap()]);
}
