//! The front door of image resolution: a reference in any transport (OCI layout, OCI archive,
//! docker-archive, registry through registries.conf mirrors and the blob cache) to one
//! verified [`ResolvedImage`]. The manifest walk itself is `image`; the transports are
//! `local`, `docker_archive` and `registry`.

use super::image::{oci_digest, resolve_descriptor, resolve_layout, ResolvedImage};
use super::local::OciDir;
use super::registry::{Registry, RegistrySource};
use super::{BlobSource, ImageRef, Platform};
use crate::base::cache::Cache;
use crate::base::hash::Digest;
use anyhow::{bail, Context};
use oci_spec::image::{Descriptor, MediaType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

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
