//! Image sources: parse a reference (containers-transports(5) syntax), resolve it to one image
//! manifest for the wanted platform, and hand out its blobs through readers that check size and
//! sha256 against the descriptor. Local layouts and archives live in `local`; registries plug in
//! behind the same [`BlobSource`] trait.

pub mod auth;
pub mod docker_archive;
pub mod image;
pub mod local;
pub mod mirrors;
pub mod reference;
pub mod registry;
pub mod resolver;

pub use image::{LayerCompression, ResolvedImage};
pub use resolver::Resolver;

/// The largest JSON document (an `index.json`, a manifest) read from outside: OCI documents
/// are kilobytes; a 1.5 GB `index.json` used to be read whole by the resolver and the agent.
pub const MAX_JSON: u64 = 16 << 20;

/// Read a JSON document from `p`, refusing one over [`MAX_JSON`] before reading it.
pub fn read_json_file(p: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
    let mut v = Vec::new();
    f.take(MAX_JSON + 1).read_to_end(&mut v)?;
    if v.len() as u64 > MAX_JSON {
        anyhow::bail!("{} is over {MAX_JSON} bytes: not an OCI document slotforge will read", p.display());
    }
    Ok(v)
}
pub use reference::{ImageRef, Platform};

use crate::base::hash::{Digest, VerifyingReader};
use std::io::Read;

/// Where an image's blobs come from.
pub trait BlobSource: Send + Sync {
    /// Raw (unverified) bytes of a blob; callers go through [`open_verified`].
    fn open_blob(&self, digest: &Digest, size: u64) -> std::io::Result<Box<dyn Read + Send>>;
    /// A manifest or index by digest (registries serve these from another endpoint).
    fn open_manifest(&self, digest: &Digest, size: u64) -> std::io::Result<Box<dyn Read + Send>> {
        self.open_blob(digest, size)
    }
    /// A human name for messages (`oci:fixtures/base:1`).
    fn describe(&self) -> String;
    /// Whether reading the blob needs no network.
    fn is_cached(&self, _digest: &Digest) -> bool {
        true
    }
    /// Make the blob local ahead of use (a download into the cache for registries).
    fn prefetch(&self, _digest: &Digest, _size: u64, _on_bytes: &dyn Fn(u64)) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A blob reader that fails unless exactly `size` bytes with `digest` come out.
pub fn open_verified(
    src: &dyn BlobSource,
    digest: &Digest,
    size: u64,
    what: &str,
) -> anyhow::Result<VerifyingReader<Box<dyn Read + Send>>> {
    let r = src
        .open_blob(digest, size)
        .map_err(|e| anyhow::anyhow!("{}: blob {digest} ({what}): {e}", src.describe()))?;
    Ok(VerifyingReader::new(r, digest.clone(), size, format!("{}: {what}", src.describe())))
}

/// Read a small blob (manifest, config, index) whole, verified. Refuses blobs over `LIMIT`.
pub fn read_small_blob(src: &dyn BlobSource, digest: &Digest, size: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    const LIMIT: u64 = 8 << 20; // manifests and configs are KiB; anything this big is not one
    if size > LIMIT {
        anyhow::bail!("{}: {what} {digest} claims {size} bytes, more than the {LIMIT} allowed for metadata", src.describe());
    }
    let raw = if what == "manifest" { src.open_manifest(digest, size) } else { src.open_blob(digest, size) }
        .map_err(|e| anyhow::anyhow!("{}: {what} {digest}: {e}", src.describe()))?;
    let mut buf = Vec::with_capacity(size as usize);
    VerifyingReader::new(raw, digest.clone(), size, format!("{}: {what}", src.describe())).read_to_end(&mut buf)?;
    Ok(buf)
}
