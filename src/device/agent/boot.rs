//! The agent's boot sequence: check → pull what is missing or corrupt → make verified images
//! ready → mark the boot good (only if every image verified) → report. The containers are then
//! run by `runner`.

use super::status::{check_image, read_release, writable, ImageState};
use crate::device::{emit, AgentConfig};
use crate::format::release::ExternalImage;
use anyhow::Context;
use serde_json::json;
use std::path::PathBuf;
use super::fetch::{fix, prepare};

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
    let slot = crate::format::cmdline::value(&cmdline, "slotforge.slot");
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
                let keep = crate::device::upgrade::gc::builds_in_use(&cfg.esp, &ext.build_id);
                match crate::device::upgrade::gc::gc(&cfg.images, &keep) {
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
