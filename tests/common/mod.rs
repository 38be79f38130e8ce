//! Test support: OCI image layouts made by the tests themselves (tar layers with every entry
//! type, PAX xattrs, whiteouts, any compression), the slotforge binary, and real readers.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use slotforge_qemu_tests::registry;

pub mod delta;

use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn sha256_hex(data: &[u8]) -> String {
    slotforge::base::hash::hex(&Sha256::digest(data))
}

pub enum E {
    File(&'static str, Vec<u8>, u32),
    FileOwned(&'static str, Vec<u8>, u32, u64, u64),
    FileX(&'static str, Vec<u8>, Vec<(&'static str, Vec<u8>)>),
    Dir(&'static str, u32),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
    CharDev(&'static str, u32, u32),
    Fifo(&'static str),
    /// A raw name written as-is (no validation), for traversal tests.
    RawFile(Vec<u8>, Vec<u8>),
}

#[derive(Clone, Copy)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body_len = key.len() + value.len() + 3; // ' ' '=' '\n'
    let mut len = body_len + 1;
    while len.to_string().len() + body_len != len {
        len = len.to_string().len() + body_len;
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn set_raw_name(h: &mut tar::Header, name: &[u8]) {
    let n = &mut h.as_old_mut().name;
    n.fill(0);
    n[..name.len()].copy_from_slice(name);
}

pub fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mtime = 1_600_000_000;
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::File(p, d, mode) | E::FileOwned(p, d, mode, _, _) => {
                if let E::FileOwned(_, _, _, uid, gid) = e {
                    h.set_uid(*uid);
                    h.set_gid(*gid);
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(d.len() as u64);
                h.set_path(p).unwrap();
                h.set_cksum();
                b.append(&h, &d[..]).unwrap();
            }
            E::FileX(p, d, xattrs) => {
                let mut pax = Vec::new();
                for (k, v) in xattrs {
                    pax.extend(pax_record(&format!("SCHILY.xattr.{k}"), v));
                }
                let mut xh = tar::Header::new_ustar();
                xh.set_entry_type(tar::EntryType::XHeader);
                xh.set_path(format!("PaxHeaders/{p}")).unwrap();
                xh.set_size(pax.len() as u64);
                xh.set_mode(0o644);
                xh.set_cksum();
                b.append(&xh, &pax[..]).unwrap();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o755);
                h.set_size(d.len() as u64);
                h.set_path(p).unwrap();
                h.set_cksum();
                b.append(&h, &d[..]).unwrap();
            }
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                h.set_path(p).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                h.set_path(p).unwrap();
                h.set_link_name(t).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                h.set_path(p).unwrap();
                h.set_link_name(t).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::CharDev(p, ma, mi) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
                h.set_path(p).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o600);
                h.set_size(0);
                h.set_path(p).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::RawFile(name, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                set_raw_name(&mut h, name);
                h.set_cksum();
                b.append(&h, &d[..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn compress(data: &[u8], c: Comp) -> (Vec<u8>, &'static str) {
    match c {
        Comp::None => (data.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
        }
        Comp::Zstd => (zstd::encode_all(data, 1).unwrap(), "application/vnd.oci.image.layer.v1.tar+zstd"),
    }
}

fn put_blob(dir: &Path, data: &[u8]) -> String {
    let hex = sha256_hex(data);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(&hex), data).unwrap();
    format!("sha256:{hex}")
}

/// Write (or add to) an OCI layout at `dir` with one image tagged `tag`. Returns its manifest digest.
pub fn oci_image(dir: &Path, tag: &str, layers: Vec<(Vec<u8>, Comp)>, entrypoint: &[&str]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, c) in &layers {
        diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
        let (blob, mt) = compress(tar, *c);
        let d = put_blob(dir, &blob);
        descs.push(json!({"mediaType": mt, "digest": d, "size": blob.len()}));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin:/usr/bin", "MODE=test"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap();
    let cd = put_blob(dir, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs
    }))
    .unwrap();
    let md = put_blob(dir, &manifest);
    let idx_path = dir.join("index.json");
    let mut idx: serde_json::Value = std::fs::read(&idx_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(json!({"schemaVersion": 2, "manifests": []}));
    let list = idx["manifests"].as_array_mut().unwrap();
    list.retain(|d| d["annotations"]["org.opencontainers.image.ref.name"] != tag);
    list.push(json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag}}));
    std::fs::write(&idx_path, serde_json::to_vec(&idx).unwrap()).unwrap();
    md
}

/// Deterministic incompressible bytes (so sizes in tests are predictable).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    slotforge_qemu_tests::fixtures::payload(len, seed)
}

/// A complete fixture: kernel, base (two layers with whiteouts), an on-disk service, two
/// external services (one sharing a layer with the other), a loader file, and a manifest.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn manifest(&self) -> PathBuf {
        self.dir.path().join("system.yml")
    }
}

pub const MANIFEST: &str = "version: 1.4.0
kernel:
  image: oci:images/kernel:6.1
  cmdline: console=ttyS0
init:
  - oci:images/base:1
onboot:
  - name: setup
    image: oci:images/setup:1
services:
  - name: newlogd
    image: oci:images/newlogd:1
    env: [LOGLEVEL=debug]
  - name: edgeview
    image: oci:images/edgeview:1.2
    ondisk: false
  - name: analytics
    image: oci:images/analytics:3
    ondisk: false
    sealed: false
files:
  - path: etc/hostname
    contents: appliance
  - path: etc/secret
    contents: s3cret
    mode: \"0600\"
    uid: 1000
    gid: 1000
boot:
  loader: file:loader.efi
";

pub fn fixture() -> Fixture {
    let dir = tempfile::Builder::new().prefix("slotforge-fixture-").tempdir().unwrap();
    let img = dir.path().join("images");
    // Kernel image: kernel, initrd and a modules tarball.
    let ktar = layer(&[E::Dir("lib/modules/6.1/", 0o755), E::File("lib/modules/6.1/virtio.ko", noise(20_000, 1), 0o644)]);
    oci_image(
        &img.join("kernel"),
        "6.1",
        vec![(layer(&[E::File("kernel", noise(300_000, 2), 0o644), E::File("initrd.img", noise(50_000, 3), 0o644), E::File("kernel.tar", ktar, 0o644)]), Comp::Gzip)],
        &[],
    );
    // Base: every entry type, xattrs, and a second layer with whiteouts.
    let l1 = layer(&[
        E::Dir("bin/", 0o755),
        E::File("bin/busybox", noise(400_000, 4), 0o755),
        E::Symlink("bin/sh", "busybox"),
        E::Hardlink("bin/ls", "bin/busybox"),
        E::FileX("bin/ping", b"ping".to_vec(), vec![("security.capability", vec![1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])]),
        E::Dir("dev/", 0o755),
        E::CharDev("dev/null", 1, 3),
        E::Fifo("dev/initctl"),
        E::Dir("etc/", 0o755),
        E::File("etc/os-release", b"ID=fixture\n".to_vec(), 0o644),
        E::File("etc/removed", b"gone\n".to_vec(), 0o644),
        E::Dir("var/", 0o755),
        E::Dir("var/cache/", 0o755),
        E::File("var/cache/old", b"old\n".to_vec(), 0o644),
        E::Dir("tmp/", 0o1777),
        E::FileOwned("home/user/.profile", b"x\n".to_vec(), 0o4750, 1000, 100),
    ]);
    let l2 = layer(&[
        E::File("etc/.wh.removed", vec![], 0o644),
        E::Dir("var/cache/", 0o700),
        E::File("var/cache/.wh..wh..opq", vec![], 0o644),
        E::File("var/cache/new", b"new\n".to_vec(), 0o644),
    ]);
    oci_image(&img.join("base"), "1", vec![(l1, Comp::Gzip), (l2, Comp::None)], &[]);
    oci_image(&img.join("setup"), "1", vec![(layer(&[E::File("bin/setup", b"#!/bin/sh\n".to_vec(), 0o755)]), Comp::Zstd)], &["/bin/setup"]);
    oci_image(&img.join("newlogd"), "1", vec![(layer(&[E::File("usr/bin/newlogd", noise(200_000, 5), 0o755)]), Comp::Gzip)], &["/usr/bin/newlogd", "-v"]);
    let shared = layer(&[E::File("lib/libshared.so", noise(300_000, 6), 0o644)]);
    oci_image(&img.join("edgeview"), "1.2", vec![(shared.clone(), Comp::Gzip), (layer(&[E::File("bin/edgeview", noise(600_000, 7), 0o755)]), Comp::Zstd)], &["/bin/edgeview"]);
    oci_image(&img.join("analytics"), "3", vec![(shared, Comp::Gzip), (layer(&[E::File("bin/analytics", noise(500_000, 8), 0o755)]), Comp::None)], &["/bin/analytics"]);
    std::fs::write(dir.path().join("loader.efi"), b"MZ systemd-boot stand-in").unwrap();
    std::fs::write(dir.path().join("system.yml"), MANIFEST).unwrap();
    Fixture { dir }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_slotforge")
}

pub fn layouts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("layouts")
}

pub fn slotforge(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env_remove("SOURCE_DATE_EPOCH").output().expect("run slotforge")
}

pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run a real tool; panics with its output if it fails.
pub fn tool(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd} is not installed ({e}); run .ci/run or apt-get install it"));
    assert!(o.status.success(), "{cmd} {args:?} failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Copy partition `name` of `disk` out to its own file.
pub fn extract_partition(disk: &Path, name: &str, out: &Path) {
    let mut f = std::fs::File::open(disk).unwrap();
    let g = slotforge::format::disk::read_gpt(&mut f).unwrap();
    let p = g.partitions.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no partition {name}"));
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(p.start)).unwrap();
    let mut o = std::fs::File::create(out).unwrap();
    std::io::copy(&mut f.take(p.size), &mut o).unwrap();
}

pub fn sha256_file(p: &Path) -> String {
    let (d, _) = slotforge::base::hash::digest_reader(std::fs::File::open(p).unwrap()).unwrap();
    d.to_string()
}
