//! The agent's update verbs: apply a bundle to the inactive slot (reported step by step, with a
//! test hook to hold it at a step so a test can cut the power there), and GC of image sets no
//! slot needs. The apply itself is `device::upgrade`.

use crate::device::upgrade::{self, device::DeviceTarget, gc};
use crate::device::{emit, AgentConfig};
use crate::format::agent::{ApplyReport, ApplyStep, Event, GcReport};
use crate::format::bundle::Bundle;
use std::path::Path;

/// Where `agent update` keeps the chunks of a release it is pulling, on the images partition.
pub const PULLS: &str = ".pulls";

/// How long `--pause-at` holds an apply: far longer than any test needs to cut the power.
const PAUSE: std::time::Duration = std::time::Duration::from_secs(600);

/// `agent apply SRC`: open the bundle (a tar is unpacked on the images partition, so its blobs
/// can be renamed into place), apply it to the inactive slot, report `apply-start`, each
/// `apply-step`, then `applied` or `apply-failed`.
pub fn apply(cfg: &AgentConfig, src: &Path, pause_at: Option<ApplyStep>) -> anyhow::Result<ApplyReport> {
    let b = Bundle::open(src, Some(&cfg.images.join(".partial")))?;
    apply_bundle(cfg, &b, None, pause_at)
}

/// `agent update REF`: the release pulled from a registry — its signatures decided with the
/// running slot's keys and its layout checked before any content is fetched, then only the
/// chunks the running slot lacks, kept in `.pulls/` of the images partition so a pull cut off
/// goes on where it stopped (at the next boot too) — and applied like any bundle. `--check`: print what the tag names
/// and whether the device would take it (JSON), fetching no content.
pub fn update(cfg: &AgentConfig, reference: &str, check: bool, pause_at: Option<ApplyStep>) -> anyhow::Result<()> {
    let mut t = DeviceTarget { cfg: cfg.clone() };
    let r = match upgrade::pull::resolve_via(&mut t, reference, &cfg.insecure, &|h, r, d| cfg.endpoints(h, r, d)) {
        Ok(r) => r,
        Err(e) if check => {
            println!("{}", serde_json::json!({"reference": reference, "available": false, "error": format!("{e:#}")}));
            return Ok(());
        }
        Err(e) => {
            emit(Event::ApplyFailed { error: format!("{e:#}") });
            return Err(e);
        }
    };
    if check {
        let running = std::fs::read(cfg.root.join(crate::format::release::RELEASE_PATH)).ok().and_then(|b| serde_json::from_slice::<crate::format::release::Release>(&b).ok()).map(|r| r.build_id);
        println!(
            "{}",
            serde_json::json!({"reference": r.reference, "available": true, "manifest_digest": r.manifest.to_string(), "build_id": r.config.build_id, "version": r.config.version,
                "signature": r.decision, "running_build_id": running, "newer": running.as_deref() != Some(r.config.build_id.as_str()), "requests": r.requests})
        );
        return Ok(());
    }
    // Kept across boots (GC clears `.partial/` after every good boot, `.pulls/` it leaves):
    // only the release being pulled now keeps its chunks there.
    let pulls = cfg.images.join(PULLS);
    let dir = upgrade::pull::work_dir(&pulls, &r.manifest);
    for e in std::fs::read_dir(&pulls).into_iter().flatten().flatten() {
        if e.path() != dir {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let (b, pulled) = match upgrade::pull::fetch(&mut t, r, &dir, &|_| {}) {
        Ok(v) => v,
        Err(e) => {
            emit(Event::ApplyFailed { error: format!("{e:#}") });
            return Err(e);
        }
    };
    apply_bundle(cfg, &b, Some(pulled), pause_at)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn apply_bundle(cfg: &AgentConfig, b: &Bundle, pulled: Option<crate::format::agent::PullReport>, pause_at: Option<ApplyStep>) -> anyhow::Result<ApplyReport> {
    emit(Event::ApplyStart { build_id: b.config.build_id.clone(), version: b.config.version.clone() });
    let mut t = DeviceTarget { cfg: cfg.clone() };
    let step = |s: ApplyStep| {
        emit(Event::ApplyStep { step: s });
        if pause_at == Some(s) {
            emit(Event::Paused { step: s });
            std::thread::sleep(PAUSE);
        }
    };
    match upgrade::apply_with(&mut t, b, &step) {
        Ok(mut r) => {
            r.pulled = pulled;
            emit(Event::Applied(r.clone()));
            Ok(r)
        }
        Err(e) => {
            emit(Event::ApplyFailed { error: format!("{e:#}") });
            Err(e)
        }
    }
}

/// `agent gc`: keep the image sets of the booted build and of the other slot's entry, drop the
/// rest; reported as a `gc` event.
pub fn gc(cfg: &AgentConfig) -> anyhow::Result<GcReport> {
    let (rel, _) = super::status::read_release(&cfg.root)?;
    let keep = gc::builds_in_use(&cfg.esp, &rel.build_id);
    let r = gc::gc(&cfg.images, &keep)?;
    emit(Event::Gc(r.clone()));
    Ok(r)
}
