//! The build cache: work a rebuild reuses instead of redoing, kept beside the blob cache (same
//! `--cache` directory). Two kinds of entry, each a pure function of what its key names:
//! - sealed external images: sealing (flatten, squashfs, dm-verity) depends only on the image's
//!   manifest digest, the mount points added and this slotforge version's recipe. An entry is a
//!   record (`build/sealed/<key>.json`) and the sealed file as a content-addressed blob;
//! - compressed squashfs blocks of the rootfs: a segment of a file or a fragment block, keyed by
//!   the sha256 of its raw bytes, the block size and the level (`build/blocks/xx/<key>`), with
//!   the sha256 of the compressed bytes inside.
//! Entries enter by rename, so builds sharing the cache never see half of one; every hit is
//! checked (sealed files re-hashed on the way out, blocks against their recorded hash and sizes):
//! a corrupt entry is dropped and the work redone, never written into a disk. Least recently used
//! entries go first when the cache is over its bound (`cache prune`, and after every build).

use crate::base::cache::Cache;
use crate::base::hash::{Digest, VerifyingReader};
use crate::format::sealed::Sealed;
use crate::oci::ResolvedImage;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::path::{Path, PathBuf};

/// Changes whenever sealing could produce other bytes for the same inputs: every slotforge
/// version is its own recipe (the squashfs library, compressor settings, tree rules).
/// What a cached sealed image was made by: the tool's version and the sealing recipe's.
fn recipe() -> String {
    format!("slotforge-seal/{}/format-{}", env!("CARGO_PKG_VERSION"), crate::format::sealed::FORMAT)
}

/// Default bound on the build cache's entries (`SLOTFORGE_BUILD_CACHE_MAX` bytes overrides).
pub const DEFAULT_MAX_BYTES: u64 = 8 << 30;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    recipe: String,
    image: String,
    mkdirs: Vec<String>,
    sealed: Sealed,
    /// The artifact manifest, exactly (its digest is `sealed.artifact`).
    artifact: String,
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
    /// An entry was there but did not check out (bytes, digest, record): dropped.
    Dropped,
}

/// How the build cache served one build (`cache` in the build's JSON summary).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CacheUse {
    pub sealed_hits: usize,
    pub sealed_misses: usize,
    /// Entries found corrupt, dropped and rebuilt.
    pub sealed_dropped: usize,
    /// Rootfs squashfs blocks taken from the cache, and compressed now.
    pub blocks_reused: usize,
    pub blocks_compressed: usize,
    /// Block entries found corrupt and dropped (their blocks compressed again).
    pub blocks_dropped: usize,
}

impl CacheUse {
    pub fn count(&mut self, l: Lookup) {
        match l {
            Lookup::Hit => self.sealed_hits += 1,
            Lookup::Miss => self.sealed_misses += 1,
            Lookup::Dropped => self.sealed_dropped += 1,
        }
    }
}

pub struct BuildCache {
    blobs: Cache,
    dir: PathBuf,
    blocks: PathBuf,
    max_bytes: u64,
    dropped_blocks: std::sync::atomic::AtomicUsize,
}

/// What `cache stats` reports.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub dir: PathBuf,
    pub blobs: usize,
    pub blob_bytes: u64,
    pub sealed_entries: usize,
    /// Bytes of the sealed files the entries name (part of `blob_bytes`).
    pub sealed_bytes: u64,
    /// Compressed rootfs blocks: entries and bytes.
    pub block_entries: usize,
    pub block_bytes: u64,
    pub max_bytes: u64,
}

fn key(image: &Digest, mkdirs: &[String], salt: &[u8; 32]) -> String {
    let k = serde_json::json!({"recipe": recipe(), "image": image.as_str(), "mkdirs": mkdirs, "salt": crate::base::hash::hex(salt)});
    Digest::of_bytes(&serde_json::to_vec(&k).expect("serialisable")).hex().to_string()
}

impl BuildCache {
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let blobs = Cache::open(root)?;
        let dir = root.join("build/sealed");
        let blocks = root.join("build/blocks");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&blocks)?;
        let max_bytes = std::env::var("SLOTFORGE_BUILD_CACHE_MAX").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MAX_BYTES);
        Ok(Self { blobs, dir, blocks, max_bytes, dropped_blocks: Default::default() })
    }

    fn record_path(&self, k: &str) -> PathBuf {
        self.dir.join(format!("{k}.json"))
    }

    /// The sealed image of `img` with `mkdirs`, copied to `out` and checked on the way (its
    /// sha256 and size against the record, the record against the key and its artifact).
    pub fn sealed(&self, img: &ResolvedImage, mkdirs: &[String], salt: &[u8; 32], out: &Path) -> (Lookup, Option<(Sealed, Vec<u8>)>) {
        let k = key(&img.manifest_digest, mkdirs, salt);
        let path = self.record_path(&k);
        let Ok(bytes) = std::fs::read(&path) else { return (Lookup::Miss, None) };
        match self.check_out(&bytes, img, mkdirs, salt, out) {
            Ok(v) => {
                // Used now: the last to be pruned.
                let _ = std::fs::File::options().append(true).open(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
                (Lookup::Hit, Some(v))
            }
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(out);
                if let Ok(r) = serde_json::from_slice::<Record>(&bytes) {
                    if let Ok(d) = Digest::parse(&r.sealed.digest) {
                        let _ = std::fs::remove_file(self.blobs.blob_path(&d));
                    }
                }
                (Lookup::Dropped, None)
            }
        }
    }

    fn check_out(&self, bytes: &[u8], img: &ResolvedImage, mkdirs: &[String], salt: &[u8; 32], out: &Path) -> anyhow::Result<(Sealed, Vec<u8>)> {
        let r: Record = serde_json::from_slice(bytes)?;
        anyhow::ensure!(r.recipe == recipe() && r.image == img.manifest_digest.as_str() && r.mkdirs == mkdirs && r.sealed.salt == crate::base::hash::hex(salt), "record for other inputs");
        anyhow::ensure!(Digest::of_bytes(r.artifact.as_bytes()).as_str() == r.sealed.artifact, "artifact digest");
        let d = Digest::parse(&r.sealed.digest).map_err(|e| anyhow::anyhow!(e))?;
        let mut src = VerifyingReader::new(self.blobs.open_blob(&d)?, d, r.sealed.size, "cached sealed image");
        std::io::copy(&mut src, &mut std::fs::File::create(out)?)?;
        Ok((r.sealed, r.artifact.into_bytes()))
    }

    /// Store a sealed image just made (`file`, its record), then keep the cache in its bound.
    pub fn put_sealed(&self, img: &ResolvedImage, mkdirs: &[String], salt: &[u8; 32], file: &Path, sealed: &Sealed, artifact: &[u8]) -> anyhow::Result<()> {
        let d = Digest::parse(&sealed.digest).map_err(|e| anyhow::anyhow!(e))?;
        self.blobs.put(std::fs::File::open(file)?, &d, sealed.size, "sealed image")?;
        let r = Record { recipe: recipe(), image: img.manifest_digest.to_string(), mkdirs: mkdirs.to_vec(), sealed: sealed.clone(), artifact: String::from_utf8(artifact.to_vec())? };
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        serde_json::to_writer(&mut tmp, &r)?;
        tmp.persist(self.record_path(&key(&img.manifest_digest, mkdirs, salt))).map_err(|e| e.error)?;
        self.prune(self.max_bytes)?;
        Ok(())
    }

    /// Every entry: (its file, the sealed blob it names if any, bytes, last use).
    fn entries(&self) -> Vec<(PathBuf, Option<Digest>, u64, std::time::SystemTime)> {
        let mut v: Vec<_> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                let r: Record = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                let used = e.metadata().ok()?.modified().ok()?;
                Some((e.path(), Some(Digest::parse(&r.sealed.digest).ok()?), r.sealed.size, used))
            })
            .collect();
        for sub in std::fs::read_dir(&self.blocks).into_iter().flatten().filter_map(|e| e.ok()) {
            for e in std::fs::read_dir(sub.path()).into_iter().flatten().filter_map(|e| e.ok()) {
                if let Ok(m) = e.metadata() {
                    if m.is_file() && !e.file_name().to_string_lossy().starts_with('.') {
                        v.push((e.path(), None, m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH)));
                    }
                }
            }
        }
        v
    }

    fn block_path(&self, key: &Digest) -> PathBuf {
        self.blocks.join(&key.hex()[..2]).join(key.hex())
    }

    /// Block entries found corrupt since the cache was opened.
    pub fn blocks_dropped(&self) -> usize {
        self.dropped_blocks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drop least recently used entries until theirs add up to at most `max_bytes`. Returns
    /// (entries, bytes) dropped. A build using an entry being dropped has it open or sees a
    /// miss: both are safe.
    pub fn prune(&self, max_bytes: u64) -> anyhow::Result<(usize, u64)> {
        let mut e = self.entries();
        e.sort_by_key(|x| std::cmp::Reverse(x.3));
        let (mut total, mut dropped, mut freed) = (0u64, 0usize, 0u64);
        for (path, d, size, _) in e {
            if total + size <= max_bytes {
                total += size;
                continue;
            }
            std::fs::remove_file(&path)?;
            if let Some(d) = d {
                let _ = std::fs::remove_file(self.blobs.blob_path(&d));
            }
            dropped += 1;
            freed += size;
        }
        Ok((dropped, freed))
    }

    pub fn stats(&self) -> anyhow::Result<Stats> {
        let (mut blobs, mut blob_bytes) = (0, 0);
        for e in std::fs::read_dir(self.blobs.root().join("blobs/sha256"))? {
            let m = e?.metadata()?;
            blobs += 1;
            blob_bytes += m.len();
        }
        let e = self.entries();
        let (sealed, blocks): (Vec<_>, Vec<_>) = e.iter().partition(|x| x.1.is_some());
        Ok(Stats {
            dir: self.blobs.root().to_path_buf(),
            blobs,
            blob_bytes,
            sealed_entries: sealed.len(),
            sealed_bytes: sealed.iter().map(|x| x.2).sum(),
            block_entries: blocks.len(),
            block_bytes: blocks.iter().map(|x| x.2).sum(),
            max_bytes: self.max_bytes,
        })
    }

    /// Keep the cache within its bound (after a build stored what it made).
    pub fn trim(&self) -> anyhow::Result<(usize, u64)> {
        self.prune(self.max_bytes)
    }
}

/// A block entry: `n` u32, `n` size words, the sha256 of the bytes, the bytes.
impl crate::format::squashfs::writer::BlockStore for BuildCache {
    fn get(&self, key: &Digest) -> Option<(Vec<u32>, Vec<u8>)> {
        let p = self.block_path(key);
        let b = std::fs::read(&p).ok()?;
        let parsed = (|| {
            let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
            let sizes_end = 4 + 4 * n;
            let sizes: Vec<u32> = b.get(4..sizes_end)?.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
            let hash = b.get(sizes_end..sizes_end + 32)?;
            let bytes = b.get(sizes_end + 32..)?;
            (sha2::Sha256::digest(bytes).as_slice() == hash).then(|| (sizes, bytes.to_vec()))
        })();
        match parsed {
            Some(v) => {
                let _ = std::fs::File::options().append(true).open(&p).and_then(|f| f.set_modified(std::time::SystemTime::now()));
                Some(v)
            }
            None => {
                let _ = std::fs::remove_file(&p);
                self.dropped_blocks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                None
            }
        }
    }

    fn put(&self, key: &Digest, sizes: &[u32], bytes: &[u8]) {
        let p = self.block_path(key);
        if p.exists() {
            return;
        }
        let write = || -> std::io::Result<()> {
            let dir = p.parent().unwrap();
            std::fs::create_dir_all(dir)?;
            let mut tmp = tempfile::Builder::new().prefix(".").tempfile_in(dir)?;
            let mut head = Vec::with_capacity(4 + 4 * sizes.len() + 32);
            head.extend_from_slice(&(sizes.len() as u32).to_le_bytes());
            sizes.iter().for_each(|s| head.extend_from_slice(&s.to_le_bytes()));
            head.extend_from_slice(&sha2::Sha256::digest(bytes));
            std::io::Write::write_all(&mut tmp, &head)?;
            std::io::Write::write_all(&mut tmp, bytes)?;
            tmp.persist(&p).map_err(|e| e.error)?;
            Ok(())
        };
        // A cache that cannot take the entry costs the next build time, not this one.
        let _ = write();
    }
}
