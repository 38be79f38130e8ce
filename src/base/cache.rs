//! The content-addressed blob cache shared by every build (default `$XDG_CACHE_HOME/slotforge`,
//! else `~/.cache/slotforge`; `--cache DIR`). A blob enters only through [`Cache::put`]: streamed
//! to a temporary file, its size and sha256 checked, then renamed to `blobs/sha256/<hex>`, so an
//! interrupted or tampered download never leaves a blob behind. Tags seen online are remembered
//! under `refs/` so an `--offline` build can resolve them again.

use crate::base::hash::{Digest, VerifyingReader};
use anyhow::Context;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub struct Cache {
    root: PathBuf,
    tmp: PathBuf,
}

impl Cache {
    pub fn default_dir() -> PathBuf {
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(x).join("slotforge");
        }
        match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".cache/slotforge"),
            None => std::env::temp_dir().join("slotforge-cache"),
        }
    }

    pub fn open(root: &Path) -> anyhow::Result<Self> {
        for d in ["blobs/sha256", "refs", "tmp"] {
            std::fs::create_dir_all(root.join(d)).with_context(|| format!("creating cache {}", root.join(d).display()))?;
        }
        Ok(Self { root: root.to_path_buf(), tmp: root.join("tmp") })
    }

    /// The blob store of an OCI image layout (the external-images partition): the same verified
    /// put, with downloads in progress under `.partial/`.
    pub fn open_layout(root: &Path) -> anyhow::Result<Self> {
        for d in ["blobs/sha256", ".partial"] {
            std::fs::create_dir_all(root.join(d)).with_context(|| format!("creating {}", root.join(d).display()))?;
        }
        Ok(Self { root: root.to_path_buf(), tmp: root.join(".partial") })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    pub fn open_blob(&self, d: &Digest) -> std::io::Result<File> {
        File::open(self.blob_path(d))
    }

    /// Stream `r` into the cache as blob `d` of `size` bytes. Nothing is left behind on error.
    pub fn put(&self, r: impl Read, d: &Digest, size: u64, what: &str) -> anyhow::Result<()> {
        if self.has(d) {
            return Ok(());
        }
        let mut tmp = tempfile::NamedTempFile::new_in(&self.tmp)?;
        let mut vr = VerifyingReader::new(r, d.clone(), size, what.to_string());
        std::io::copy(&mut vr, tmp.as_file_mut()).map_err(|e| anyhow::anyhow!("{e}"))?;
        tmp.as_file().sync_all()?;
        tmp.persist(self.blob_path(d)).map_err(|e| anyhow::anyhow!("storing {d} in the cache: {}", e.error))?;
        Ok(())
    }

    /// Store small bytes (a manifest) under their own digest.
    pub fn put_bytes(&self, data: &[u8]) -> anyhow::Result<Digest> {
        let d = Digest::of_bytes(data);
        self.put(data, &d, data.len() as u64, "manifest")?;
        Ok(d)
    }

    fn ref_path(&self, host: &str, repo: &str, tag: &str) -> PathBuf {
        let safe = |s: &str| s.replace(['/', ':'], "_");
        self.root.join("refs").join(safe(host)).join(safe(repo)).join(safe(tag))
    }

    /// Remember that `host/repo:tag` pointed at manifest `d` (with its media type).
    pub fn set_ref(&self, host: &str, repo: &str, tag: &str, d: &Digest, media_type: &str) -> anyhow::Result<()> {
        let p = self.ref_path(host, repo, tag);
        std::fs::create_dir_all(p.parent().unwrap())?;
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{d}\n{media_type}\n"))?;
        std::fs::rename(tmp, p)?;
        Ok(())
    }

    pub fn get_ref(&self, host: &str, repo: &str, tag: &str) -> Option<(Digest, String)> {
        let s = std::fs::read_to_string(self.ref_path(host, repo, tag)).ok()?;
        let mut l = s.lines();
        let d = Digest::parse(l.next()?).ok()?;
        Some((d, l.next().unwrap_or("").to_string()))
    }

    /// Files left in `tmp/` (interrupted downloads in progress or killed). For tests and `pull`.
    pub fn temp_files(&self) -> usize {
        std::fs::read_dir(&self.tmp).map(|r| r.count()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_verifies_and_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let data = b"layer bytes".to_vec();
        let d = Digest::of_bytes(&data);
        assert!(c.put(&b"layer bytez"[..], &d, data.len() as u64, "t").is_err());
        assert!(!c.has(&d));
        assert!(c.put(&data[..5], &d, data.len() as u64, "t").is_err());
        assert!(!c.has(&d));
        assert_eq!(c.temp_files(), 0);
        c.put(&data[..], &d, data.len() as u64, "t").unwrap();
        assert!(c.has(&d));
        c.set_ref("127.0.0.1:5000", "a/b", "v1", &d, "mt").unwrap();
        assert_eq!(c.get_ref("127.0.0.1:5000", "a/b", "v1").unwrap().0, d);
    }
}
