//! The agent's boot sequence: check → pull what is missing or corrupt → make verified images
//! ready → mark the boot good (only if every image verified) → report. The containers are then
//! run by `runner`.

use super::status::{check_image, read_release, writable, ImageState};
use super::{emit, AgentConfig};
use crate::cache::Cache;
use crate::hash::Digest;
use crate::images::{add_to_build, IndexEntry};
use crate::oci::image::resolve_digest;
use crate::oci::local::OciDir;
use crate::oci::registry::{media_type_of, Registry, RegistrySource};
use crate::oci::{BlobSource, ImageRef, Platform};
use crate::rootfs::ExternalImage;
use crate::tree::{materialize, Spill, Tree};
use anyhow::{bail, Context};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Fetch `img` by digest into the images partition and list it in `build_id`'s set.
pub fn pull_image(cfg: &AgentConfig, build_id: &str, version: &str, img: &ExternalImage) -> anyhow::Result<u64> {
    let r = ImageRef::parse(&img.reference, Path::new("/")).map_err(|e| anyhow::anyhow!(e))?;
    let ImageRef::Registry { host, repo, .. } = r else {
        bail!("{} names no registry to pull from", img.reference);
    };
    let store = Arc::new(Cache::open_layout(&cfg.images)?);
    let digest = Digest::parse(&img.digest).map_err(|e| anyhow::anyhow!(e))?;
    // Where to fetch from: agent.json's `mirror` if set, else the rootfs's (or the
    // environment's) containers-registries.conf, else the reference's own registry.
    let endpoints = match &cfg.mirror {
        Some(m) => vec![crate::oci::mirrors::Endpoint { host: m.clone(), repo: repo.clone(), insecure: false, mirror: true }],
        None => {
            let conf = match std::env::var_os("CONTAINERS_REGISTRIES_CONF") {
                Some(p) => crate::oci::mirrors::Mirrors::load_from(Path::new(&p), true)?,
                None => crate::oci::mirrors::Mirrors::load_from(&cfg.root.join(crate::oci::mirrors::DEFAULT_PATH.trim_start_matches('/')), false)?,
            };
            conf.endpoints(&host, &repo, true).map_err(|e| anyhow::anyhow!(e))?
        }
    };
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
                    emit("image-resealed", json!({"name": img.name, "root_hash": s.root_hash, "bytes": n, "from": "local layers"}));
                    return Ok(n);
                }
                Err(e) => emit("image-reseal-failed", json!({"name": img.name, "error": format!("{e:#}")})),
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
    crate::flatten::flatten_image(&mut tree, &resolved, &mut spill, 0, &mut 0, &mut |_| {})?;
    crate::linuxkit::bundle::fixups(&mut tree, None, 0, 0).map_err(|e| anyhow::anyhow!("{}: {e}", img.name))?;
    materialize(&tree, &rootfs)?;
    drop(spill);
    let _ = std::fs::remove_dir_all(&spill_parent);
    Ok(rootfs)
}

/// Rename the booted slot's entry (a `.conf` or a UKI) to drop its boot counter (Boot Loader
/// Specification boot counting). Returns the new name, or `None` if it had no counter.
pub fn mark_good(cfg: &AgentConfig) -> anyhow::Result<Option<String>> {
    let cmdline = std::fs::read_to_string(&cfg.cmdline).unwrap_or_default();
    let slot = crate::cmdline::value(&cmdline, "slotforge.slot").context("no slotforge.slot= on the kernel command line")?;
    let entries = crate::entries::list(&crate::entries::DirView(cfg.esp.clone()));
    let Some(e) = entries.iter().filter(|e| e.slot.as_deref() == Some(slot.as_str()) && e.tries_left.is_some()).max_by_key(|e| e.install_number()) else {
        return Ok(None);
    };
    let good = e.good_path();
    std::fs::rename(cfg.esp.join(&e.path), cfg.esp.join(&good))?;
    crate::durable::sync_fs(&cfg.esp)?;
    Ok(Some(good.rsplit('/').next().unwrap_or(&good).to_string()))
}

/// The build id an ESP entry boots (`slotforge.build=` in its options).
fn entry_build(cfg: &AgentConfig, entry: &str) -> Option<String> {
    let entries = crate::entries::list(&crate::entries::DirView(cfg.esp.clone()));
    let e = entries.iter().find(|e| e.file == entry)?;
    crate::cmdline::value(e.options.as_deref()?, "slotforge.build")
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
            emit("image-pulled", json!({"name": img.name, "digest": img.digest, "bytes": bytes, "state": st.state, "sealed": img.sealed.as_ref().map(|s| &s.root_hash)}));
            st
        }
        Err(e) => {
            for (orig, q) in &aside {
                let _ = std::fs::rename(q, orig);
            }
            if cfg.offline {
                emit("image-pull-skipped", json!({"name": img.name, "reason": "offline", "error": format!("{e:#}")}));
            } else {
                emit("image-pull-failed", json!({"name": img.name, "digest": img.digest, "error": format!("{e:#}")}));
            }
            st
        }
    }
}

/// Make a verified image ready where the runner binds it from: a sealed image opened with
/// dm-verity and mounted read-only, an unsealed one unpacked.
fn ready(cfg: &AgentConfig, img: &ExternalImage) -> anyhow::Result<(PathBuf, Option<super::sealed::SealedState>)> {
    match &img.sealed {
        Some(s) => {
            let st = super::sealed::open(cfg, img, s)?;
            Ok((super::sealed::mount_point(cfg, img), Some(st)))
        }
        None => Ok((prepare(cfg, img)?, None)),
    }
}

/// [`ready`], reported (`image-ready` or `image-prepare-failed`, then `corrupt`); `true` if ready.
fn make_ready(cfg: &AgentConfig, img: &ExternalImage, st: &mut ImageState, t: std::time::Instant) -> bool {
    match ready(cfg, img) {
        Ok((path, sealed)) => {
            emit("image-ready", json!({"name": img.name, "path": path, "sealed": sealed, "seconds": t.elapsed().as_secs_f64()}));
            st.sealed = sealed;
            true
        }
        Err(e) => {
            emit("image-prepare-failed", json!({"name": img.name, "error": format!("{e:#}")}));
            st.state = "corrupt".into();
            st.detail = Some(format!("{e:#}"));
            false
        }
    }
}

/// The boot sequence. Returns the final status.
pub fn boot(cfg: &AgentConfig) -> anyhow::Result<super::status::Status> {
    let (rel, ext) = read_release(&cfg.root)?;
    let cmdline = std::fs::read_to_string(&cfg.cmdline).unwrap_or_default();
    let slot = crate::cmdline::value(&cmdline, "slotforge.slot");
    emit("agent-start", json!({"slot": slot, "version": rel.version, "build_id": rel.build_id, "images": ext.images.len()}));
    writable(&cfg.images)?;
    // The other slot's entry exhausted its tries: systemd-boot fell back to us.
    for s in super::status::slot_states(&cfg.esp) {
        if Some(&s.slot) != slot.as_ref() && s.boot == "bad" {
            let build = entry_build(cfg, s.entry.as_deref().unwrap_or(""));
            emit("rolled-back", json!({"from_slot": s.slot, "from_build": build, "entry": s.entry, "to_slot": slot}));
        }
    }
    let mut states: Vec<ImageState> = Vec::new();
    let started = std::time::Instant::now();
    for img in &ext.images {
        let t = std::time::Instant::now();
        let mut st = check_image(&cfg.images, &ext.build_id, img);
        emit("image-check", json!({"name": img.name, "digest": img.digest, "state": st.state, "detail": st.detail, "bytes": st.bytes, "seconds": t.elapsed().as_secs_f64()}));
        if st.state != "verified" {
            st = fix(cfg, &ext.build_id, &rel.version, img, st);
        }
        if st.state == "verified" {
            let t = std::time::Instant::now();
            if !make_ready(cfg, img, &mut st, t) {
                // A sealed blob dm-verity or the kernel refuses is set aside and rebuilt.
                if let Some(s) = &img.sealed {
                    st.bad_blobs = vec![s.digest.clone()];
                    st = fix(cfg, &ext.build_id, &rel.version, img, st);
                    if st.state == "verified" {
                        make_ready(cfg, img, &mut st, t);
                    }
                }
            }
        }
        states.push(st);
    }
    // From the first check to the last image ready (or given up on): what the services wait for.
    emit("images-ready", json!({"images": states.len(), "ready": states.iter().filter(|s| s.state == "verified").count(), "seconds": started.elapsed().as_secs_f64()}));
    let bad: Vec<&str> = states.iter().filter(|s| s.state != "verified").map(|s| s.name.as_str()).collect();
    if bad.is_empty() {
        match mark_good(cfg) {
            Ok(entry) => {
                emit("marked-good", json!({"entry": entry}));
                let keep = crate::upgrade::gc::builds_in_use(&cfg.esp, &ext.build_id);
                match crate::upgrade::gc::gc(&cfg.images, &keep) {
                    Ok(r) => emit("gc", serde_json::to_value(&r)?),
                    Err(e) => emit("gc-failed", json!({"error": format!("{e:#}")})),
                }
            }
            Err(e) => emit("mark-good-failed", json!({"error": format!("{e:#}")})),
        }
    } else {
        emit("degraded", json!({"unavailable": bad}));
    }
    // The final state is what this sequence saw, prepare failures included (re-checking from
    // disk would call an image that failed to prepare "verified" and exit 0).
    let st = super::status::status_with(cfg, states)?;
    emit("status", serde_json::to_value(&st)?);
    Ok(st)
}

/// `agent install`, booted from an installer: the payload partition's disk is this one; the
/// target is the first other disk. Too small → `install-refused`, nothing written.
pub fn install(cfg: &AgentConfig) -> anyhow::Result<()> {
    let payload = crate::upgrade::device::partition_device(cfg, crate::installer::PAYLOAD_LABEL)?;
    let part = payload.file_name().unwrap().to_string_lossy().into_owned();
    let own = std::fs::canonicalize(format!("/sys/class/block/{part}"))?.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut disks: Vec<String> = std::fs::read_dir("/sys/block")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| ["vd", "sd", "nvme", "mmcblk", "hd"].iter().any(|p| n.starts_with(p)) && *n != own)
        .collect();
    disks.sort();
    let Some(target) = disks.first().cloned() else {
        emit("install-refused", json!({"error": "no target disk besides the installer"}));
        bail!("no target disk besides the installer ({own})");
    };
    let size = std::fs::read_to_string(format!("/sys/block/{target}/size"))?.trim().parse::<u64>()? * 512;
    let dev = PathBuf::from(format!("/dev/{target}"));
    let mut pf = std::fs::File::open(&payload)?;
    let (header, data_start) = crate::installer::read_header(&mut pf)?;
    let layout = match crate::installer::fit(&header, size) {
        Ok(l) => l,
        Err(e) => {
            emit("install-refused", json!({"target": dev, "size": size, "error": format!("{e:#}")}));
            return Err(e);
        }
    };
    emit("install-start", json!({"target": dev, "size": size, "build_id": header.build_id, "bytes": header.extents.iter().map(|e| e.len).sum::<u64>()}));
    let last = std::cell::Cell::new(0u64);
    let t = std::time::Instant::now();
    let bytes = crate::installer::install(&mut pf, data_start, &header, &dev, &layout, &|done, total| {
        let pct = done * 100 / total.max(1);
        if pct >= last.get() + 25 || done == total {
            last.set(pct);
            emit("install-progress", json!({"percent": pct, "bytes": done}));
        }
    })?;
    emit("installed", json!({"target": dev, "bytes": bytes, "disk_size": layout.disk_size, "seconds": t.elapsed().as_secs_f64()}));
    Ok(())
}
