//! Getting an external image the booted build pins onto the device: pulled by digest (mirror,
//! registries.conf, or its own registry; a sealed one as its sealed artifact where the registry
//! has it), rebuilt from what the partition holds, corrupt blobs
//! set aside and put back if the repair fails; an unsealed image unpacked for the runtime.

use crate::device::{emit, AgentConfig};
use crate::format::release::ExternalImage;
use super::status::{check_image, ImageState};
use anyhow::bail;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use crate::base::cache::Cache;
use crate::base::hash::Digest;
use crate::device::images::add_to_build;
use crate::format::images::IndexEntry;
use crate::oci::image::resolve_digest;
use crate::oci::local::OciDir;
use crate::oci::registry::{media_type_of, Registry, RegistrySource};
use crate::oci::{BlobSource, ImageRef, Platform};
use crate::format::tree::{materialize, Spill, Tree};
use crate::format::agent::Event;
/// Fetch `img` by digest into the images partition and list it in `build_id`'s set.
pub fn pull_image(cfg: &AgentConfig, build_id: &str, version: &str, img: &ExternalImage) -> anyhow::Result<u64> {
    let r = ImageRef::parse(&img.reference, Path::new("/")).map_err(|e| anyhow::anyhow!(e))?;
    let ImageRef::Registry { host, repo, .. } = r else {
        bail!("{} names no registry to pull from", img.reference);
    };
    let store = Arc::new(Cache::open_layout(&cfg.images)?);
    let digest = Digest::parse(&img.digest).map_err(|e| anyhow::anyhow!(e))?;
    let endpoints = cfg.endpoints(&host, &repo, true)?;
    let mut errors = Vec::new();
    let mut served = None;
    for ep in &endpoints {
        let mut insecure = cfg.insecure.clone();
        if ep.insecure {
            insecure.push(ep.host.clone());
        }
        let registry = Arc::new(Registry::new(&ep.host, &insecure)?);
        match registry.manifest(&ep.repo, digest.as_str()) {
            Ok((b, mt)) if Digest::of_bytes(&b) == digest => {
                served = Some((registry, ep.repo.clone(), ep.host.clone(), b, mt));
                break;
            }
            Ok(_) => errors.push(format!("{}/{}@{digest}: the registry's manifest does not match the pinned digest; refused", ep.host, ep.repo)),
            Err(e) => errors.push(format!("{}/{}: {e:#}", ep.host, ep.repo)),
        }
    }
    let Some((registry, repo, host, bytes, mt)) = served else {
        bail!("{}: {}", img.reference, errors.join("; "));
    };
    store.put(&bytes[..], &digest, bytes.len() as u64, "manifest")?;
    // A sealed image whose sealed artifact the registry has (`slotforge push --next-to-images`)
    // is fetched as it is — the sealed blob, checked against the pinned digest — not rebuilt.
    if let Some(s) = img.sealed.as_ref().filter(|_| !img.keep_layers) {
        if let Some(n) = fetch_sealed_artifact(&registry, &repo, &store, img, s, &bytes)? {
            add_to_build(&cfg.images, build_id, version, IndexEntry { media_type: media_type_of(&bytes).unwrap_or(mt), ..IndexEntry::pinned(img, bytes.len() as u64)? })?;
            return Ok(n + bytes.len() as u64);
        }
    }
    let src: Arc<dyn BlobSource> = Arc::new(RegistrySource { registry, repo, cache: store.clone(), offline: false, name: format!("{host}/{}", img.name) });
    let platform: Platform = img.platform.parse().unwrap_or_default();
    let resolved = resolve_digest(&img.reference, src.clone(), &digest, bytes.len() as u64, &mt, &platform)?;
    let mut fetched = 0;
    for l in &resolved.layers {
        if !store.has(&l.digest) {
            src.prefetch(&l.digest, l.size, &|_| {})?;
            fetched += l.size;
        }
    }
    // A sealed image is rebuilt from the pulled layers and must come out bit-identical to the
    // pinned one; its layers are then left to GC unless it keeps them.
    if let Some(s) = &img.sealed {
        super::sealed::reseal(cfg, img, s)?;
    }
    add_to_build(&cfg.images, build_id, version, IndexEntry { media_type: media_type_of(&bytes).unwrap_or(mt), ..IndexEntry::pinned(img, bytes.len() as u64)? })?;
    Ok(fetched + bytes.len() as u64 + resolved.config_bytes.len() as u64)
}

/// The sealed artifact of `img` from `repo`, if the registry has it under its pinned digest:
/// the config and sealed blobs fetched (each checked against its digest), the artifact and the
/// empty config stored. Returns the bytes fetched; `None` if the registry lacks the artifact.
fn fetch_sealed_artifact(reg: &Registry, repo: &str, store: &Cache, img: &ExternalImage, s: &crate::format::sealed::Sealed, manifest: &[u8]) -> anyhow::Result<Option<u64>> {
    let Some((artifact, _)) = reg.try_manifest(repo, &s.artifact)? else { return Ok(None) };
    let ad = Digest::of_bytes(&artifact);
    let a = crate::format::sealed::parse_artifact(&artifact);
    if ad.as_str() != s.artifact || a.as_ref().is_none_or(|a| a.blob != s.digest || a.blob_size != s.size || a.subject != img.digest) {
        return Ok(None);
    }
    let mv: serde_json::Value = serde_json::from_slice(manifest)?;
    let cd = Digest::parse(mv["config"]["digest"].as_str().unwrap_or("")).map_err(|e| anyhow::anyhow!(e))?;
    let mut n = 0;
    if !store.has(&cd) {
        let size = mv["config"]["size"].as_u64().unwrap_or(0);
        reg.fetch_blob(repo, &cd, size, store, &|_| {})?;
        n += size;
    }
    let sd = Digest::parse(&s.digest).map_err(|e| anyhow::anyhow!(e))?;
    if !store.has(&sd) {
        reg.fetch_blob(repo, &sd, s.size, store, &|_| {})?;
        n += s.size;
    }
    store.put(&artifact[..], &ad, artifact.len() as u64, "sealed artifact")?;
    let empty = crate::format::sealed::EMPTY_JSON;
    store.put(empty, &Digest::of_bytes(empty), empty.len() as u64, "empty")?;
    Ok(Some(n + artifact.len() as u64))
}

/// Make a missing or corrupt image whole again: a sealed image whose layers are all here
/// (`keep-layers`) is resealed locally, without the network; otherwise it is pulled by digest
/// (and resealed). Returns the bytes fetched or written.
pub fn repair(cfg: &AgentConfig, build_id: &str, version: &str, img: &ExternalImage) -> anyhow::Result<u64> {
    if let Some(s) = &img.sealed {
        let local = (|| -> anyhow::Result<bool> {
            let m = std::fs::read(cfg.images.join("blobs/sha256").join(img.digest.trim_start_matches("sha256:")))?;
            let man: serde_json::Value = serde_json::from_slice(&m)?;
            Ok(man["layers"].as_array().into_iter().flatten().all(|l| cfg.images.join("blobs/sha256").join(l["digest"].as_str().unwrap_or("x").trim_start_matches("sha256:")).exists()))
        })()
        .unwrap_or(false);
        if local {
            match super::sealed::reseal(cfg, img, s) {
                Ok(n) => {
                    add_to_build(&cfg.images, build_id, version, IndexEntry::pinned(img, std::fs::metadata(cfg.images.join("blobs/sha256").join(img.digest.trim_start_matches("sha256:")))?.len())?)?;
                    emit(Event::ImageResealed { name: img.name.clone(), root_hash: s.root_hash.clone(), bytes: n, from: "local layers".into() });
                    return Ok(n);
                }
                Err(e) => emit(Event::ImageResealFailed { name: img.name.clone(), error: format!("{e:#}") }),
            }
        }
    }
    if cfg.offline {
        bail!("offline, and the image cannot be rebuilt from what the device holds");
    }
    pull_image(cfg, build_id, version, img)
}

/// Unpack a verified image from the partition to `<run_dir>/containers/<name>/rootfs`.
pub fn prepare(cfg: &AgentConfig, img: &ExternalImage) -> anyhow::Result<PathBuf> {
    let dir = cfg.run_dir.join("containers").join(&img.name);
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    std::fs::create_dir_all(&dir)?;
    let src: Arc<dyn BlobSource> = Arc::new(OciDir::open(&cfg.images, format!("images:{}", img.name))?);
    let digest = Digest::parse(&img.digest).map_err(|e| anyhow::anyhow!(e))?;
    let size = std::fs::metadata(cfg.images.join("blobs/sha256").join(digest.hex()))?.len();
    let platform: Platform = img.platform.parse().unwrap_or_default();
    let resolved = resolve_digest(&img.name, src, &digest, size, &img.media_type, &platform)?;
    // Spill next to the destination so contents are renamed into place, not copied.
    let spill_parent = dir.join(".spill");
    std::fs::create_dir_all(&spill_parent)?;
    let mut spill = Spill::new_in(&spill_parent)?;
    let mut tree = Tree::new(0);
    crate::compose::flatten::flatten_image(&mut tree, &resolved, &mut spill, 0, &mut 0, &mut |_| {})?;
    crate::linuxkit::bundle::fixups(&mut tree, None, 0, 0).map_err(|e| anyhow::anyhow!("{}: {e}", img.name))?;
    materialize(&tree, &rootfs)?;
    drop(spill);
    let _ = std::fs::remove_dir_all(&spill_parent);
    Ok(rootfs)
}

/// Move blobs that failed their check to `.partial/` (returns original and new paths).
fn quarantine(cfg: &AgentConfig, blobs: &[String]) -> Vec<(PathBuf, PathBuf)> {
    let dir = cfg.images.join(".partial");
    let _ = std::fs::create_dir_all(&dir);
    blobs
        .iter()
        .filter_map(|b| {
            let hex = b.trim_start_matches("sha256:");
            let orig = cfg.images.join("blobs/sha256").join(hex);
            let q = dir.join(format!("{hex}.corrupt"));
            std::fs::rename(&orig, &q).ok().map(|_| (orig, q))
        })
        .collect()
}

/// Repair an image that is not verified: its bad blobs set aside (a corrupt blob is corrupt for
/// every build sharing it), then [`repair`]; on failure the blobs are put back (the state stays
/// and nothing is lost). Returns the new state.
pub fn fix(cfg: &AgentConfig, build_id: &str, version: &str, img: &ExternalImage, st: ImageState) -> ImageState {
    let aside = quarantine(cfg, &st.bad_blobs);
    match repair(cfg, build_id, version, img) {
        Ok(bytes) => {
            for (_, q) in &aside {
                let _ = std::fs::remove_file(q);
            }
            let st = check_image(&cfg.images, build_id, img);
            emit(Event::ImagePulled { name: img.name.clone(), digest: img.digest.clone(), bytes, state: st.state.clone(), sealed: img.sealed.as_ref().map(|s| s.root_hash.clone()) });
            st
        }
        Err(e) => {
            for (orig, q) in &aside {
                let _ = std::fs::rename(q, orig);
            }
            if cfg.offline {
                emit(Event::ImagePullSkipped { name: img.name.clone(), reason: "offline".into(), error: format!("{e:#}") });
            } else {
                emit(Event::ImagePullFailed { name: img.name.clone(), digest: img.digest.clone(), error: format!("{e:#}") });
            }
            st
        }
    }
}
