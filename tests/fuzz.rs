//! Fuzzing on stable Rust, every reader that takes outside bytes: seeds from `tests/corpus/`
//! (and a FAT volume and a tar layer made by our own writers) mutated by a deterministic PRNG —
//! bit flips, byte overwrites with boundary values, truncation, duplication, splices of other
//! seeds. "Errors are fine; panics are bugs": every case must return (Ok or Err), never panic.
//! `cargo test` runs SLOTFORGE_FUZZ_CASES (default 2000) cases per reader;
//! `SLOTFORGE_FUZZ_CASES=200000 cargo test --release --test fuzz` runs longer, and
//! `SLOTFORGE_FUZZ_SEED` picks another sequence. A failing case is written to
//! `target/fuzz-failures/` to be added to the corpus once fixed.

mod common;
use std::io::Cursor;
use std::path::{Path, PathBuf};

fn cases() -> u64 {
    std::env::var("SLOTFORGE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

const INTERESTING: &[u64] = &[0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 1 << 32, u64::MAX, u64::MAX / 2];

fn mutate(r: &mut Rng, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        let n = v.len().max(1);
        match r.below(7) {
            0 if !v.is_empty() => {
                let i = r.below(v.len());
                v[i] ^= 1 << r.below(8);
            }
            1 if !v.is_empty() => {
                let i = r.below(v.len());
                v[i] = r.next() as u8;
            }
            2 => {
                // A boundary value written as 1, 2, 4 or 8 little-endian bytes.
                let x = INTERESTING[r.below(INTERESTING.len())].to_le_bytes();
                let w = [1, 2, 4, 8][r.below(4)];
                let i = r.below(n);
                for k in 0..w {
                    if i + k < v.len() {
                        v[i + k] = x[k];
                    }
                }
            }
            3 => v.truncate(r.below(n)),
            4 if !v.is_empty() => {
                let a = r.below(v.len());
                let b = (a + r.below(64)).min(v.len());
                let chunk = v[a..b].to_vec();
                let at = r.below(v.len());
                v.splice(at..at, chunk);
            }
            5 if !others.is_empty() => {
                let o = &others[r.below(others.len())];
                if !o.is_empty() {
                    let a = r.below(o.len());
                    let b = (a + r.below(256)).min(o.len());
                    let at = r.below(n);
                    let end = (at + (b - a)).min(v.len());
                    v.splice(at..end, o[a..b].iter().copied());
                }
            }
            _ => {
                let i = r.below(n);
                v.insert(i.min(v.len()), r.next() as u8);
            }
        }
    }
    v
}

fn corpus(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(name)).unwrap()
}

/// Run `cases()` mutations of `seeds` through `f`; a panic is saved and fails the test.
fn fuzz(reader: &str, seeds: Vec<Vec<u8>>, f: impl Fn(&[u8])) {
    let seed = std::env::var("SLOTFORGE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5107_f0a6u64);
    let mut r = Rng(seed ^ reader.len() as u64 * 0x9E37_79B9_7F4A_7C15 | 1);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure: Option<(u64, Vec<u8>, String)> = None;
    let t = std::time::Instant::now();
    for s in &seeds {
        f(s); // the seeds themselves must pass
    }
    for i in 0..cases() {
        let pick = r.below(seeds.len());
        let input = mutate(&mut r, &seeds[pick], &seeds);
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&input))) {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            failure = Some((i, input, msg));
            break;
        }
    }
    std::panic::set_hook(prev);
    if let Some((i, input, msg)) = failure {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let p: PathBuf = dir.join(format!("{reader}-{i}.bin"));
        std::fs::write(&p, &input).unwrap();
        panic!("{reader}: case {i} panicked ({msg}); input saved to {}", p.display());
    }
    eprintln!("fuzz {reader}: {} cases in {:.2} s ({:.0}/s), no panic", cases(), t.elapsed().as_secs_f64(), cases() as f64 / t.elapsed().as_secs_f64().max(1e-9));
}

#[test]
fn gpt_headers() {
    fuzz("gpt-header", vec![corpus("gpt-header.bin")], |b| {
        let mut h = [0u8; 512];
        let n = b.len().min(512);
        h[..n].copy_from_slice(&b[..n]);
        let _ = slotforge::format::disk::check_gpt_header(&h, 1, 8 << 30);
    });
}

#[test]
fn pe_headers_of_ukis() {
    fuzz("pe", vec![corpus("pe-headers.bin")], |b| {
        let _ = slotforge::format::uki::parse_headers(b);
        let _ = slotforge::format::uki::read_section(&mut Cursor::new(b.to_vec()), ".cmdline", 1 << 16);
    });
}

#[test]
fn verity_and_squashfs_superblocks() {
    fuzz("verity-superblock", vec![corpus("verity-superblock.bin")], |b| {
        let mut h = [0u8; 512];
        let n = b.len().min(512);
        h[..n].copy_from_slice(&b[..n]);
        if let Ok(p) = slotforge::format::verity::parse_superblock(&h, 0) {
            // A parsed superblock may claim any size: checking must fail cleanly, not allocate it.
            let mut dev = Cursor::new(vec![0u8; 64 << 10]);
            let _ = slotforge::format::verity::check(&mut dev, 8192.min(p.data_blocks.saturating_mul(4096)), None);
        }
    });
    fuzz("squashfs-superblock", vec![corpus("squashfs-superblock.bin")], |b| {
        let mut h = [0u8; slotforge::format::squashfs::SUPERBLOCK_LEN];
        let n = b.len().min(h.len());
        h[..n].copy_from_slice(&b[..n]);
        let _ = slotforge::format::squashfs::parse_superblock(&h);
    });
}

#[test]
fn boot_entries_and_command_lines() {
    fuzz("entry", vec![corpus("entry.conf")], |b| {
        let t = String::from_utf8_lossy(b);
        let e = slotforge::format::entries::parse_conf("slot-a+2-1.conf", &t);
        let _ = e.options.as_deref().map(slotforge::format::cmdline::verity_of);
        let _ = slotforge::format::entries::parse_uki(&t.chars().take(64).collect::<String>(), Some(&t), Some(&t));
        let _ = slotforge::format::entries::parse_name(&t);
    });
}

#[test]
fn manifests_and_layouts() {
    fuzz("manifest", vec![corpus("manifest.yml")], |b| {
        let _ = slotforge::builder::manifest::parse(Path::new("system.yml"), &String::from_utf8_lossy(b));
    });
    fuzz("layout", vec![corpus("layout.yaml")], |b| {
        let _ = slotforge::format::layout::parse(Path::new("layout.yaml"), &String::from_utf8_lossy(b));
    });
}

#[test]
fn bundle_configs() {
    let cfg = br#"{"format":1,"build_id":"1.0-abc","version":"1.0","rootfs":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"kernel":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"initrd":null,"cmdline":"console=ttyS0","requires":{"rootfs_bytes":1,"layouts":[{"name":"edge","generation":2,"cap":10}]},"images":[],"images_included":true}"#;
    let delta = String::from_utf8_lossy(cfg).replace(r#""images_included":true}"#, r#""images_included":true,"chunks":{"index":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":104},"delta_from":[{"build_id":"0.9-x","version":"0.9"}],"sealed":{"sha256:0000000000000000000000000000000000000000000000000000000000000000":{"index":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":144},"seeds":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}}}"#);
    assert!(serde_json::from_str::<slotforge::format::bundle::BundleConfig>(&delta).is_ok(), "the delta seed parses");
    fuzz("bundle-config", vec![cfg.to_vec(), delta.into_bytes()], |b| {
        let _ = serde_json::from_slice::<slotforge::format::bundle::BundleConfig>(b);
    });
}

#[test]
fn tar_layers() {
    use common::{layer, noise, E};
    let seed = layer(&[
        E::Dir("bin/", 0o755),
        E::File("bin/busybox", noise(3000, 4), 0o755),
        E::Symlink("bin/sh", "busybox"),
        E::Hardlink("bin/ls", "bin/busybox"),
        E::FileX("bin/ping", b"ping".to_vec(), vec![("security.capability", vec![1, 0, 0, 2])]),
        E::FileOwned("home/u/.profile", b"x\n".to_vec(), 0o4750, 1000, 100),
        E::File("etc/.wh.gone", vec![], 0o644),
        E::CharDev("dev/null", 1, 3),
    ]);
    fuzz("tar-layer", vec![seed], |b| {
        let mut t = slotforge::format::tree::Tree::new(0);
        let mut spill = slotforge::format::tree::Spill::with_limit(16 << 20).unwrap();
        let ctx = slotforge::compose::flatten::LayerCtx { image: "fuzz", layer: "layer", layer_no: 1, origin: 0 };
        let _ = slotforge::compose::flatten::apply_layer(&mut t, b, &ctx, &mut spill);
    });
}

#[test]
fn fat_volumes() {
    // A real ESP made by our writer; mutations land in its first 64 KiB (boot sector, FSInfo,
    // FATs, root directory), where a reader's decisions are made.
    let mut dev = Cursor::new(vec![0u8; 40 << 20]);
    let files = vec![
        slotforge::format::esp::EspFile { path: "EFI/BOOT/BOOTX64.EFI".into(), data: Box::new(&b"MZ loader"[..]) },
        slotforge::format::esp::EspFile { path: "loader/entries/slot-a.conf".into(), data: Box::new(&b"title t\nversion 1\noptions x\n"[..]) },
        slotforge::format::esp::EspFile { path: "a/vmlinuz".into(), data: Box::new(std::io::Read::take(std::io::repeat(7), 100_000)) },
    ];
    slotforge::format::esp::write(&mut dev, 1, slotforge::DEFAULT_SOURCE_DATE_EPOCH, files).unwrap();
    let head = dev.get_ref()[..64 << 10].to_vec();
    let dev = std::cell::RefCell::new(dev);
    fuzz("fat", vec![head.clone()], |b| {
        let mut c = dev.borrow_mut();
        let n = b.len().min(64 << 10);
        c.get_mut()[..n].copy_from_slice(&b[..n]);
        c.get_mut()[n..64 << 10].copy_from_slice(&head[n..]);
        if slotforge::format::fat::check_volume(&mut *c, 40 << 20).is_ok() {
            // Only a volume that passed the check reaches fatfs, as in inspect and upgrade.
            let _ = slotforge::format::esp::read(&mut *c);
        }
    });
}

#[test]
fn casync_indexes_and_chunks() {
    use slotforge::format::casync::{chunk_id, index_bytes, parse_index, read_chunk, Entry};
    let data = common::noise(300_000, 3);
    let e = vec![Entry { end: 70_000, id: chunk_id(&data[..70_000]) }, Entry { end: 200_000, id: chunk_id(&data[70_000..200_000]) }, Entry { end: 300_000, id: chunk_id(&data[200_000..]) }];
    fuzz("casync-index", vec![index_bytes(&e), index_bytes(&e[..1])], |b| {
        let _ = parse_index(b);
    });
    // A chunk file from the store: decoded to at most its length + 1 and checked against its id.
    let store = tempfile::tempdir().unwrap();
    let entry = Entry { end: 70_000, id: chunk_id(&data[..70_000]) };
    let p = slotforge::format::casync::chunk_path(store.path(), &entry.hex());
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let good = zstd::bulk::compress(&data[..70_000], 3).unwrap();
    fuzz("casync-chunk", vec![good], |b| {
        std::fs::write(&p, b).unwrap();
        if let Ok(Some(d)) = read_chunk(store.path(), &entry, 70_000) {
            assert!(d == data[..70_000], "a chunk that is not its id's bytes was accepted");
        }
    });
    // A delta's seed offsets: the varints mutated (then compressed, as a bundle carries them);
    // whatever is accepted has one offset per chunk, none before the blob.
    use slotforge::format::casync::{parse_seed_offsets, seed_offsets};
    let shifted: Vec<Entry> = e.iter().map(|x| Entry { end: x.end + 5000, id: x.id }).collect();
    let raw = zstd::bulk::decompress(&seed_offsets(&e, &shifted), 1 << 20).unwrap();
    fuzz("seed-offsets", vec![raw, vec![1, 1, 1], vec![0, 0, 0]], |b| {
        if let Ok(at) = parse_seed_offsets(&zstd::bulk::compress(b, 1).unwrap(), &e) {
            assert_eq!(at.len(), e.len());
        }
    });
}
