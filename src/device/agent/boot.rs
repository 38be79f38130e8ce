//! The agent's boot sequence: check → pull what is missing or corrupt → make verified images
//! ready (a missing sealed one started lazily from its registry) → mark the boot good (only if
//! every image is verified or lazily served) → report. The containers are then
//! run by `runner`.

use super::status::{check_image, read_release, writable, ImageState};
use crate::device::{emit, AgentConfig};
use crate::format::release::ExternalImage;
use anyhow::Context;
use std::path::PathBuf;
use super::fetch::{fix, prepare};
use crate::format::agent::Event;
use crate::format::agent::{BootState, ImageStatus};

/// Rename the booted slot's entry (a `.conf` or a UKI) to drop its boot counter (Boot Loader
/// Specification boot counting). Returns the new name, or `None` if it had no counter.
pub fn mark_good(cfg: &AgentConfig) -> anyhow::Result<Option<String>> {
    let cmdline = std::fs::read_to_string(&cfg.cmdline).unwrap_or_default();
    let slot = crate::format::cmdline::value(&cmdline, "slotforge.slot").context("no slotforge.slot= on the kernel command line")?;
    let entries = crate::format::entries::list(&crate::format::entries::DirView(cfg.esp.clone()));
    let Some(e) = entries.iter().filter(|e| e.slot.as_deref() == Some(slot.as_str()) && e.tries_left.is_some()).max_by_key(|e| e.install_number()) else {
        return Ok(None);
    };
    let good = e.good_path();
    std::fs::rename(cfg.esp.join(&e.path), cfg.esp.join(&good))?;
    crate::base::durable::sync_fs(&cfg.esp)?;
    Ok(Some(good.rsplit('/').next().unwrap_or(&good).to_string()))
}

/// The build id an ESP entry boots (`slotforge.build=` in its options).
fn entry_build(cfg: &AgentConfig, entry: &str) -> Option<String> {
    let entries = crate::format::entries::list(&crate::format::entries::DirView(cfg.esp.clone()));
    let e = entries.iter().find(|e| e.file == entry)?;
    crate::format::cmdline::value(e.options.as_deref()?, "slotforge.build")
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
            emit(Event::ImageReady { name: img.name.clone(), path, sealed: sealed.clone(), seconds: t.elapsed().as_secs_f64() });
            st.sealed = sealed;
            true
        }
        Err(e) => {
            emit(Event::ImagePrepareFailed { name: img.name.clone(), error: format!("{e:#}") });
            st.state = ImageStatus::Corrupt;
            st.detail = Some(format!("{e:#}"));
            false
        }
    }
}

/// The boot sequence. Returns the final status.
pub fn boot(cfg: &AgentConfig) -> anyhow::Result<super::status::Status> {
    let (rel, ext) = read_release(&cfg.root)?;
    let cmdline = std::fs::read_to_string(&cfg.cmdline).unwrap_or_default();
    let slot = crate::format::cmdline::value(&cmdline, "slotforge.slot");
    emit(Event::AgentStart { slot: slot.clone(), version: rel.version.clone(), build_id: rel.build_id.clone(), images: ext.images.len() });
    writable(&cfg.images)?;
    // The other slot's entry exhausted its tries: systemd-boot fell back to us.
    for s in super::status::slot_states(&cfg.esp) {
        if Some(&s.slot) != slot.as_ref() && s.boot == BootState::Bad {
            let build = entry_build(cfg, s.entry.as_deref().unwrap_or(""));
            emit(Event::RolledBack { from_slot: s.slot.clone(), from_build: build.clone(), entry: s.entry.clone(), to_slot: slot.clone() });
        }
    }
    let mut states: Vec<ImageState> = Vec::new();
    let started = std::time::Instant::now();
    for img in &ext.images {
        let t = std::time::Instant::now();
        let mut st = check_image(&cfg.images, &ext.build_id, img);
        emit(Event::ImageCheck { name: img.name.clone(), digest: img.digest.clone(), state: st.state.clone(), detail: st.detail.clone(), bytes: st.bytes.clone(), seconds: t.elapsed().as_secs_f64() });
        // A sealed image that is missing (not corrupt) starts at once from its registry, if the
        // registry has its sealed artifact; else it is fetched whole first.
        if st.state == ImageStatus::Missing && cfg.lazy && !cfg.offline {
            if let Some(s) = &img.sealed {
                match super::lazy::start(cfg, &ext.build_id, &rel.version, img, s) {
                    Ok((sealed, _)) => {
                        st.state = ImageStatus::Lazy;
                        st.detail = None;
                        emit(Event::ImageReady { name: img.name.clone(), path: super::sealed::mount_point(cfg, img), sealed: Some(sealed.clone()), seconds: t.elapsed().as_secs_f64() });
                        st.sealed = Some(sealed);
                        states.push(st);
                        continue;
                    }
                    Err(e) => emit(Event::ImageLazyUnavailable { name: img.name.clone(), error: format!("{e:#}") }),
                }
            }
        }
        if st.state != ImageStatus::Verified {
            st = fix(cfg, &ext.build_id, &rel.version, img, st);
        }
        if st.state == ImageStatus::Verified {
            let t = std::time::Instant::now();
            if !make_ready(cfg, img, &mut st, t) {
                // A sealed blob dm-verity or the kernel refuses is set aside and rebuilt.
                if let Some(s) = &img.sealed {
                    st.bad_blobs = vec![s.digest.clone()];
                    st = fix(cfg, &ext.build_id, &rel.version, img, st);
                    if st.state == ImageStatus::Verified {
                        make_ready(cfg, img, &mut st, t);
                    }
                }
            }
        }
        states.push(st);
    }
    // From the first check to the last image ready (or given up on): what the services wait for.
    emit(Event::ImagesReady { images: states.len(), ready: states.iter().filter(|s| s.state.ready()).count(), seconds: started.elapsed().as_secs_f64() });
    let bad: Vec<&str> = states.iter().filter(|s| !s.state.ready()).map(|s| s.name.as_str()).collect();
    if bad.is_empty() {
        match mark_good(cfg) {
            Ok(entry) => {
                emit(Event::MarkedGood { entry: entry.clone() });
                let keep = crate::device::upgrade::gc::builds_in_use(&cfg.esp, &ext.build_id);
                match crate::device::upgrade::gc::gc(&cfg.images, &keep) {
                    Ok(r) => emit(Event::Gc(r.clone())),
                    Err(e) => emit(Event::GcFailed { error: format!("{e:#}") }),
                }
            }
            Err(e) => emit(Event::MarkGoodFailed { error: format!("{e:#}") }),
        }
    } else {
        emit(Event::Degraded { unavailable: bad.iter().map(|s| s.to_string()).collect() });
    }
    // The final state is what this sequence saw, prepare failures included (re-checking from
    // disk would call an image that failed to prepare "verified" and exit 0).
    let st = super::status::status_with(cfg, states)?;
    emit(Event::Status(st.clone()));
    Ok(st)
}

/// `agent mark-good`: [`mark_good`], reported as a `marked-good` event.
pub fn mark_good_reported(cfg: &AgentConfig) -> anyhow::Result<Option<String>> {
    let entry = mark_good(cfg)?;
    emit(Event::MarkedGood { entry: entry.clone() });
    Ok(entry)
}
