//! Resolving a reference to one image: index.json → (image index → platform) → manifest →
//! config, each blob read through a verifying reader. Docker schema-2 media types are accepted
//! beside OCI's.

use super::local::OciDir;
use super::{read_small_blob, BlobSource, Platform};
use crate::base::hash::Digest;
use anyhow::{bail, Context};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use std::str::FromStr;
use std::sync::Arc;

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// One image, resolved and with its metadata blobs verified.
pub struct ResolvedImage {
    /// The reference as written in the manifest.
    pub reference: String,
    pub source: Arc<dyn BlobSource>,
    pub platform: Platform,
    /// What the reference itself points at (an index for multi-platform images); this is what
    /// a lock file pins.
    pub top_digest: Digest,
    pub manifest_digest: Digest,
    /// The manifest's exact bytes (what its digest is over).
    pub manifest_bytes: Vec<u8>,
    pub manifest_media_type: String,
    pub manifest: ImageManifest,
    pub config_digest: Digest,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfiguration,
    pub layers: Vec<Layer>,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub compression: LayerCompression,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl ResolvedImage {
    /// Bytes of manifest + config + layers as stored (compressed).
    pub fn stored_size(&self) -> u64 {
        self.manifest_bytes.len() as u64 + self.config_bytes.len() as u64 + self.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

fn digest_of(d: &Descriptor) -> anyhow::Result<Digest> {
    Digest::parse(&d.digest().to_string()).map_err(|e| anyhow::anyhow!(e))
}

fn compression_of(media_type: &str) -> anyhow::Result<LayerCompression> {
    Ok(if media_type.ends_with("+gzip") || media_type.ends_with(".tar.gzip") || media_type.ends_with("tar.gz") {
        LayerCompression::Gzip
    } else if media_type.ends_with("+zstd") {
        LayerCompression::Zstd
    } else if media_type.ends_with(".tar") || media_type.ends_with("layer.v1.tar") {
        LayerCompression::None
    } else {
        bail!("layer media type {media_type:?} is not a tar, tar+gzip or tar+zstd layer")
    })
}

/// Resolve a manifest known by digest inside `src` (the agent: an image in the images partition).
pub fn resolve_digest(reference: &str, src: Arc<dyn BlobSource>, digest: &Digest, size: u64, media_type: &str, platform: &Platform) -> anyhow::Result<ResolvedImage> {
    let desc = Descriptor::new(MediaType::from(media_type), size, oci_digest(digest)?);
    resolve_descriptor(reference, src, desc, platform, 0, digest.clone())
}

pub(crate) fn oci_digest(d: &Digest) -> anyhow::Result<oci_spec::image::Digest> {
    oci_spec::image::Digest::from_str(d.as_str()).map_err(|e| anyhow::anyhow!("{d}: {e}"))
}

pub(crate) fn resolve_layout(reference: &str, src: OciDir, tag: Option<String>, platform: &Platform) -> anyhow::Result<ResolvedImage> {
    let index_bytes = src.index_bytes()?;
    let src: Arc<dyn BlobSource> = Arc::new(src);
    let index = ImageIndex::from_reader(&index_bytes[..]).with_context(|| format!("{reference}: index.json is not an OCI image index"))?;
    let candidates: Vec<&Descriptor> = match &tag {
        Some(t) => index
            .manifests()
            .iter()
            .filter(|d| d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).map(|n| n == t).unwrap_or(false))
            .collect(),
        None => index.manifests().iter().collect(),
    };
    let desc = match candidates.as_slice() {
        [one] => (*one).clone(),
        [] => {
            let tags: Vec<String> = index.manifests().iter().filter_map(|d| d.annotations().as_ref()?.get(REF_NAME).cloned()).collect();
            bail!("{reference}: no image tagged {:?} in the layout (tags there: {})", tag.unwrap_or_default(), if tags.is_empty() { "none".into() } else { tags.join(", ") });
        }
        _ => bail!("{reference}: the layout holds {} images; name one with :TAG", candidates.len()),
    };
    let top = digest_of(&desc)?;
    resolve_descriptor(reference, src, desc, platform, 0, top)
}

pub(crate) fn resolve_descriptor(reference: &str, src: Arc<dyn BlobSource>, desc: Descriptor, platform: &Platform, depth: u32, top: Digest) -> anyhow::Result<ResolvedImage> {
    let mt = desc.media_type().to_string();
    let digest = digest_of(&desc)?;
    let bytes = read_small_blob(&*src, &digest, desc.size(), "manifest")?;
    let is_index = mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST || {
        // Some writers leave mediaType off the descriptor; look inside.
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        v.get("manifests").is_some()
    };
    if is_index {
        if depth > 2 {
            bail!("{reference}: image indexes nested deeper than 2");
        }
        let idx = ImageIndex::from_reader(&bytes[..]).with_context(|| format!("{reference}: {digest} is not an image index"))?;
        let chosen = idx
            .manifests()
            .iter()
            .find(|d| match d.platform() {
                Some(p) => {
                    p.os().to_string() == platform.os
                        && p.architecture().to_string() == platform.architecture
                        && (platform.variant.is_none() || p.variant().as_deref() == platform.variant.as_deref())
                }
                None => false,
            })
            .cloned();
        let Some(chosen) = chosen else {
            let have: Vec<String> = idx
                .manifests()
                .iter()
                .filter_map(|d| d.platform().as_ref().map(|p| format!("{}/{}", p.os(), p.architecture())))
                .collect();
            bail!("{reference}: no {platform} image in its index (it has: {})", if have.is_empty() { "none with a platform".into() } else { have.join(", ") });
        };
        return resolve_descriptor(reference, src, chosen, platform, depth + 1, top);
    }
    if !(mt == MT_OCI_MANIFEST || mt == MT_DOCKER_MANIFEST || mt.is_empty() || mt == "application/octet-stream") {
        bail!("{reference}: {digest} has media type {mt:?}, not an image manifest");
    }
    let manifest = ImageManifest::from_reader(&bytes[..]).with_context(|| format!("{reference}: {digest} is not an image manifest"))?;
    let config_desc = manifest.config();
    let config_digest = digest_of(config_desc)?;
    let config_bytes = read_small_blob(&*src, &config_digest, config_desc.size(), "config")?;
    let config = ImageConfiguration::from_reader(&config_bytes[..]).with_context(|| format!("{reference}: config {config_digest} is not an image configuration"))?;
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let media_type = l.media_type().to_string();
        layers.push(Layer {
            digest: digest_of(l)?,
            size: l.size(),
            compression: compression_of(&media_type).with_context(|| format!("{reference}"))?,
            media_type,
        });
    }
    let manifest_media_type = if mt.is_empty() { MT_OCI_MANIFEST.to_string() } else { mt };
    Ok(ResolvedImage {
        reference: reference.to_string(),
        source: src,
        platform: platform.clone(),
        top_digest: top,
        manifest_digest: digest,
        manifest_bytes: bytes,
        manifest_media_type,
        manifest,
        config_digest,
        config_bytes,
        config,
        layers,
    })
}
