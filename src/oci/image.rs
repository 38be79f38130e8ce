//! Resolving a reference to one image: index.json → (image index → platform) → manifest →
//! config, each blob read through a verifying reader. Docker schema-2 media types are accepted
//! beside OCI's.

use super::local::OciDir;
use super::registry::{Registry, RegistrySource};
use super::{read_small_blob, BlobSource, ImageRef, Platform};
use crate::cache::Cache;
use crate::hash::Digest;
use anyhow::{bail, Context};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

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

/// Resolves references: local layouts and archives directly, registries through the cache.
pub struct Resolver {
    pub platform: Platform,
    pub cache_dir: PathBuf,
    /// Use only the cache for registry images.
    pub offline: bool,
    /// Registry hosts reached over plain http besides loopback ones.
    pub insecure: Vec<String>,
    /// containers-registries.conf: mirrors tried before (or instead of) a reference's host.
    pub mirrors: super::mirrors::Mirrors,
    cache: OnceLock<Arc<Cache>>,
    registries: Mutex<HashMap<String, Arc<Registry>>>,
}

impl Resolver {
    pub fn new(platform: Platform, cache_dir: PathBuf, offline: bool, insecure: Vec<String>) -> Self {
        Self { platform, cache_dir, offline, insecure, mirrors: Default::default(), cache: OnceLock::new(), registries: Mutex::new(HashMap::new()) }
    }

    pub fn cache(&self) -> anyhow::Result<Arc<Cache>> {
        if let Some(c) = self.cache.get() {
            return Ok(c.clone());
        }
        let c = Arc::new(Cache::open(&self.cache_dir)?);
        Ok(self.cache.get_or_init(|| c).clone())
    }

    fn registry(&self, host: &str, insecure: bool) -> anyhow::Result<Arc<Registry>> {
        let mut m = self.registries.lock().unwrap();
        if let Some(r) = m.get(host) {
            return Ok(r.clone());
        }
        let mut list = self.insecure.clone();
        if insecure {
            list.push(host.to_string());
        }
        let r = Arc::new(Registry::new(host, &list)?);
        m.insert(host.to_string(), r.clone());
        Ok(r)
    }

    /// The manifest `reference` (a tag or digest) of `host/repo`, from the first endpoint
    /// registries.conf gives that answers; returns it with the registry and repository that
    /// served it (blobs come from the same place).
    fn fetch_manifest(&self, host: &str, repo: &str, reference: &str) -> anyhow::Result<(Vec<u8>, String, Arc<Registry>, String)> {
        let by_digest = reference.contains(':');
        let endpoints = self.mirrors.endpoints(host, repo, by_digest).map_err(|e| anyhow::anyhow!(e))?;
        let mut errors = Vec::new();
        for ep in &endpoints {
            let registry = self.registry(&ep.host, ep.insecure)?;
            match registry.manifest(&ep.repo, reference) {
                Ok((b, mt)) => return Ok((b, mt, registry, ep.repo.clone())),
                Err(e) => errors.push(format!("{}/{}: {e:#}", ep.host, ep.repo)),
            }
        }
        if endpoints.len() == 1 {
            anyhow::bail!("{}", errors.remove(0));
        }
        anyhow::bail!("no registries.conf endpoint served {host}/{repo}:{reference}:\n  {}", errors.join("\n  "))
    }

    /// Resolve `reference` (as written; relative paths against `base`). With `pin` (from a lock
    /// file) a registry image is fetched by that digest whatever its tag says now, and a local
    /// one must still resolve to it.
    pub fn resolve(&self, reference: &str, base: &Path, pin: Option<&Digest>) -> anyhow::Result<ResolvedImage> {
        let r = ImageRef::parse(reference, base).map_err(|e| anyhow::anyhow!(e))?;
        let platform = &self.platform;
        let img = match &r {
            ImageRef::OciDir { path, tag } => resolve_layout(reference, OciDir::open(path, reference.to_string())?, tag.clone(), platform)?,
            ImageRef::OciArchive { path, tag } => resolve_layout(reference, OciDir::open_archive(path, reference.to_string())?, tag.clone(), platform)?,
            ImageRef::DockerArchive { path, tag } => super::docker_archive::resolve(reference, path, tag.as_deref(), platform)?,
            ImageRef::Registry { host, repo, tag, digest } => {
                let cache = self.cache()?;
                // Where blobs come from: the endpoint that served the manifest (or, for a
                // manifest already cached, the first endpoint).
                let first = self.mirrors.endpoints(host, repo, true).map_err(|e| anyhow::anyhow!(e))?.remove(0);
                let mut served = (self.registry(&first.host, first.insecure)?, first.repo);
                let want = match (pin, digest) {
                    (Some(p), _) => Some(p.clone()),
                    (None, Some(d)) => Some(Digest::parse(d).map_err(|e| anyhow::anyhow!("{reference}: {e}"))?),
                    (None, None) => None,
                };
                let (top, bytes, mt) = match want {
                    Some(d) if cache.has(&d) => {
                        let b = std::fs::read(cache.blob_path(&d))?;
                        let mt = super::registry::media_type_of(&b).unwrap_or_default();
                        (d, b, mt)
                    }
                    Some(d) if self.offline => bail!("{reference}: manifest {d} is not in the cache {} (offline; run `slotforge pull` first)", cache.root().display()),
                    Some(d) => {
                        let (b, mt, reg, r) = self.fetch_manifest(host, repo, d.as_str())?;
                        served = (reg, r);
                        let got = Digest::of_bytes(&b);
                        if got != d {
                            bail!("{reference}: the registry's manifest for {d} hashes to {got}; refusing it");
                        }
                        cache.put_bytes(&b)?;
                        (d, b, mt)
                    }
                    None => {
                        let t = tag.clone().unwrap_or_else(|| "latest".into());
                        if self.offline {
                            let (d, mt) = cache.get_ref(host, repo, &t).ok_or_else(|| {
                                anyhow::anyhow!("{reference}: tag {t} was never resolved into the cache {} (offline; run `slotforge pull` first)", cache.root().display())
                            })?;
                            let b = std::fs::read(cache.blob_path(&d)).with_context(|| format!("{reference}: manifest {d} missing from the cache"))?;
                            (d, b, mt)
                        } else {
                            let (b, mt, reg, r) = self.fetch_manifest(host, repo, &t)?;
                            served = (reg, r);
                            let d = cache.put_bytes(&b)?;
                            cache.set_ref(host, repo, &t, &d, &mt)?;
                            (d, b, mt)
                        }
                    }
                };
                let src: Arc<dyn BlobSource> = Arc::new(RegistrySource { registry: served.0, repo: served.1, cache, offline: self.offline, name: reference.to_string() });
                let desc = Descriptor::new(MediaType::from(mt.as_str()), bytes.len() as u64, oci_digest(&top)?);
                resolve_descriptor(reference, src, desc, platform, 0, top)?
            }
        };
        if let Some(p) = pin {
            if &img.top_digest != p {
                bail!("{reference} now resolves to {} but the lock file pins {p}; run `slotforge lock` to accept the change", img.top_digest);
            }
        }
        Ok(img)
    }
}

/// Resolve a manifest known by digest inside `src` (the agent: an image in the images partition).
pub fn resolve_digest(reference: &str, src: Arc<dyn BlobSource>, digest: &Digest, size: u64, media_type: &str, platform: &Platform) -> anyhow::Result<ResolvedImage> {
    let desc = Descriptor::new(MediaType::from(media_type), size, oci_digest(digest)?);
    resolve_descriptor(reference, src, desc, platform, 0, digest.clone())
}

fn oci_digest(d: &Digest) -> anyhow::Result<oci_spec::image::Digest> {
    oci_spec::image::Digest::from_str(d.as_str()).map_err(|e| anyhow::anyhow!("{d}: {e}"))
}

fn resolve_layout(reference: &str, src: OciDir, tag: Option<String>, platform: &Platform) -> anyhow::Result<ResolvedImage> {
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

fn resolve_descriptor(reference: &str, src: Arc<dyn BlobSource>, desc: Descriptor, platform: &Platform, depth: u32, top: Digest) -> anyhow::Result<ResolvedImage> {
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
