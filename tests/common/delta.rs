//! Delta bundles in tests: the fixture's manifest bundled and built on the demo layout, its
//! release 2, a bundle directory's layers, and a config rewritten as a hostile stick may.

use super::*;
use std::path::{Path, PathBuf};

pub fn bundle(fx: &Fixture, out: &Path, extra: &[&str]) -> serde_json::Value {
    let l = layouts().join("demo.yaml");
    let m = fx.manifest();
    let mut args = vec!["bundle", m.to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&slotforge(&args))).unwrap()
}

/// Build the fixture's manifest onto a demo-layout disk at `out`.
pub fn build(fx: &Fixture, out: &Path) {
    let (m, l) = (fx.manifest(), layouts().join("demo.yaml"));
    ok(&slotforge(&["build", m.to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]));
}

/// The blob of a bundle directory's manifest layer of `media_type`.
pub fn layer_blob(dir: &Path, media_type: &str) -> Option<PathBuf> {
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(idx["manifests"][0]["digest"].as_str().unwrap())).unwrap()).unwrap();
    m["layers"].as_array().unwrap().iter().find(|l| l["mediaType"] == media_type).map(|l| blob(l["digest"].as_str().unwrap()))
}

/// A bundle directory's config.
pub fn bundle_config(dir: &Path) -> serde_json::Value {
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(idx["manifests"][0]["digest"].as_str().unwrap())).unwrap()).unwrap();
    serde_json::from_slice(&std::fs::read(blob(m["config"]["digest"].as_str().unwrap())).unwrap()).unwrap()
}

pub const MT_ROOTFS: &str = "application/vnd.slotforge.rootfs.squashfs";
pub const MT_CAIBX: &str = "application/vnd.slotforge.rootfs.caibx";

/// Release 2: one file of the on-disk service changed (same size), version 1.5.0.
pub fn release2(fx: &Fixture) {
    let mut b = noise(200_000, 5);
    b[100_000..100_017].copy_from_slice(b"a one-line change");
    oci_image(&fx.path().join("images/newlogd"), "1", vec![(layer(&[E::File("usr/bin/newlogd", b, 0o755)]), Comp::Gzip)], &["/usr/bin/newlogd", "-v"]);
    std::fs::write(fx.manifest(), MANIFEST.replace("version: 1.4.0", "version: 1.5.0")).unwrap();
}

/// Rewrite an (unsigned) bundle directory's config through `f`, re-pinning it in its manifest
/// and index.json — what a hostile bundle on a stick may do.
pub fn rewrite_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let blob = |d: &str| dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let put = |b: &[u8]| {
        let d = sha256_hex(b);
        std::fs::write(dir.join("blobs/sha256").join(&d), b).unwrap();
        (format!("sha256:{d}"), b.len())
    };
    let mut idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(idx["manifests"][0]["digest"].as_str().unwrap())).unwrap()).unwrap();
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(m["config"]["digest"].as_str().unwrap())).unwrap()).unwrap();
    f(&mut c);
    let (cd, cn) = put(&serde_json::to_vec(&c).unwrap());
    m["config"]["digest"] = cd.into();
    m["config"]["size"] = cn.into();
    let (md, mn) = put(&serde_json::to_vec(&m).unwrap());
    idx["manifests"][0]["digest"] = md.into();
    idx["manifests"][0]["size"] = mn.into();
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&idx).unwrap()).unwrap();
}

