//! Image sources: parse a reference (containers-transports(5) syntax), resolve it to one image
//! manifest for the wanted platform, and hand out its blobs through readers that check size and
//! sha256 against the descriptor. Local layouts and archives live in `local`; registries plug in
//! behind the same [`BlobSource`] trait.

pub mod image;
pub mod local;
pub mod reference;

pub use image::{resolve, LayerCompression, ResolvedImage};
pub use reference::{ImageRef, Platform};

use crate::hash::{Digest, VerifyingReader};
use std::io::Read;

/// Where an image's blobs come from.
pub trait BlobSource: Send + Sync {
    /// Raw (unverified) bytes of a blob; callers go through [`open_verified`].
    fn open_blob(&self, digest: &Digest) -> std::io::Result<Box<dyn Read + Send>>;
    /// A human name for messages (`oci:fixtures/base:1`).
    fn describe(&self) -> String;
}

/// A blob reader that fails unless exactly `size` bytes with `digest` come out.
pub fn open_verified(
    src: &dyn BlobSource,
    digest: &Digest,
    size: u64,
    what: &str,
) -> anyhow::Result<VerifyingReader<Box<dyn Read + Send>>> {
    let r = src
        .open_blob(digest)
        .map_err(|e| anyhow::anyhow!("{}: blob {digest} ({what}): {e}", src.describe()))?;
    Ok(VerifyingReader::new(r, digest.clone(), size, format!("{}: {what}", src.describe())))
}

/// Read a small blob (manifest, config, index) whole, verified. Refuses blobs over `limit`.
pub fn read_small_blob(src: &dyn BlobSource, digest: &Digest, size: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    const LIMIT: u64 = 8 << 20; // manifests and configs are KiB; anything this big is not one
    if size > LIMIT {
        anyhow::bail!("{}: {what} {digest} claims {size} bytes, more than the {LIMIT} allowed for metadata", src.describe());
    }
    let mut buf = Vec::with_capacity(size as usize);
    open_verified(src, digest, size, what)?.read_to_end(&mut buf)?;
    Ok(buf)
}
