//! The build cache: work a rebuild reuses instead of redoing, kept beside the blob cache (same
//! `--cache` directory). Today it holds sealed external images: sealing (flatten, squashfs,
//! dm-verity) is a pure function of the image's manifest digest, the mount points added and the
//! recipe of this slotforge version, so its output is stored under a key over exactly those and
//! reused bit-identically. An entry is a record (`build/sealed/<key>.json`) and the sealed file as
//! a content-addressed blob; both enter by rename, so builds sharing the cache never see half an
//! entry, and a hit is re-hashed while it is copied out: a corrupt entry is dropped and rebuilt,
//! never written into a disk. Least recently used entries go first when the cache is over its
//! bound (`cache prune`, and after every store).

use crate::base::cache::Cache;
use crate::base::hash::{Digest, VerifyingReader};
use crate::format::sealed::Sealed;
use crate::oci::ResolvedImage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Changes whenever sealing could produce other bytes for the same inputs: every slotforge
/// version is its own recipe (the squashfs library, compressor settings, tree rules).
const RECIPE: &str = concat!("slotforge-seal/", env!("CARGO_PKG_VERSION"), "/format-", "1");

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
    max_bytes: u64,
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
    pub max_bytes: u64,
}

fn key(image: &Digest, mkdirs: &[String]) -> String {
    let k = serde_json::json!({"recipe": RECIPE, "image": image.as_str(), "mkdirs": mkdirs});
    Digest::of_bytes(&serde_json::to_vec(&k).expect("serialisable")).hex().to_string()
}

impl BuildCache {
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let blobs = Cache::open(root)?;
        let dir = root.join("build/sealed");
        std::fs::create_dir_all(&dir)?;
        let max_bytes = std::env::var("SLOTFORGE_BUILD_CACHE_MAX").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MAX_BYTES);
        Ok(Self { blobs, dir, max_bytes })
    }

    fn record_path(&self, k: &str) -> PathBuf {
        self.dir.join(format!("{k}.json"))
    }

    /// The sealed image of `img` with `mkdirs`, copied to `out` and checked on the way (its
    /// sha256 and size against the record, the record against the key and its artifact).
    pub fn sealed(&self, img: &ResolvedImage, mkdirs: &[String], out: &Path) -> (Lookup, Option<(Sealed, Vec<u8>)>) {
        let k = key(&img.manifest_digest, mkdirs);
        let path = self.record_path(&k);
        let Ok(bytes) = std::fs::read(&path) else { return (Lookup::Miss, None) };
        match self.check_out(&bytes, img, mkdirs, out) {
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

    fn check_out(&self, bytes: &[u8], img: &ResolvedImage, mkdirs: &[String], out: &Path) -> anyhow::Result<(Sealed, Vec<u8>)> {
        let r: Record = serde_json::from_slice(bytes)?;
        anyhow::ensure!(r.recipe == RECIPE && r.image == img.manifest_digest.as_str() && r.mkdirs == mkdirs, "record for other inputs");
        anyhow::ensure!(Digest::of_bytes(r.artifact.as_bytes()).as_str() == r.sealed.artifact, "artifact digest");
        let d = Digest::parse(&r.sealed.digest).map_err(|e| anyhow::anyhow!(e))?;
        let mut src = VerifyingReader::new(self.blobs.open_blob(&d)?, d, r.sealed.size, "cached sealed image");
        std::io::copy(&mut src, &mut std::fs::File::create(out)?)?;
        Ok((r.sealed, r.artifact.into_bytes()))
    }

    /// Store a sealed image just made (`file`, its record), then keep the cache in its bound.
    pub fn put_sealed(&self, img: &ResolvedImage, mkdirs: &[String], file: &Path, sealed: &Sealed, artifact: &[u8]) -> anyhow::Result<()> {
        let d = Digest::parse(&sealed.digest).map_err(|e| anyhow::anyhow!(e))?;
        self.blobs.put(std::fs::File::open(file)?, &d, sealed.size, "sealed image")?;
        let r = Record { recipe: RECIPE.into(), image: img.manifest_digest.to_string(), mkdirs: mkdirs.to_vec(), sealed: sealed.clone(), artifact: String::from_utf8(artifact.to_vec())? };
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        serde_json::to_writer(&mut tmp, &r)?;
        tmp.persist(self.record_path(&key(&img.manifest_digest, mkdirs))).map_err(|e| e.error)?;
        self.prune(self.max_bytes)?;
        Ok(())
    }

    /// Every entry: (record path, sealed blob, its bytes, last use).
    fn entries(&self) -> Vec<(PathBuf, Digest, u64, std::time::SystemTime)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return vec![] };
        rd.filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                let r: Record = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                let used = e.metadata().ok()?.modified().ok()?;
                Some((e.path(), Digest::parse(&r.sealed.digest).ok()?, r.sealed.size, used))
            })
            .collect()
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
            let _ = std::fs::remove_file(self.blobs.blob_path(&d));
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
        Ok(Stats { dir: self.blobs.root().to_path_buf(), blobs, blob_bytes, sealed_entries: e.len(), sealed_bytes: e.iter().map(|x| x.2).sum(), max_bytes: self.max_bytes })
    }
}
