//! The agent's update verbs: apply a bundle to the inactive slot (reported step by step, with a
//! test hook to hold it at a step so a test can cut the power there), and GC of image sets no
//! slot needs. The apply itself is `device::upgrade`.

use crate::device::upgrade::{self, device::DeviceTarget, gc};
use crate::device::{emit, AgentConfig};
use crate::format::agent::{ApplyReport, ApplyStep, Event, GcReport};
use crate::format::bundle::Bundle;
use std::path::Path;

/// How long `--pause-at` holds an apply: far longer than any test needs to cut the power.
const PAUSE: std::time::Duration = std::time::Duration::from_secs(600);

/// `agent apply SRC`: open the bundle (a tar is unpacked on the images partition, so its blobs
/// can be renamed into place), apply it to the inactive slot, report `apply-start`, each
/// `apply-step`, then `applied` or `apply-failed`.
pub fn apply(cfg: &AgentConfig, src: &Path, pause_at: Option<ApplyStep>) -> anyhow::Result<ApplyReport> {
    let b = Bundle::open(src, Some(&cfg.images.join(".partial")))?;
    emit(Event::ApplyStart { build_id: b.config.build_id.clone(), version: b.config.version.clone() });
    let mut t = DeviceTarget { cfg: cfg.clone() };
    let step = |s: ApplyStep| {
        emit(Event::ApplyStep { step: s });
        if pause_at == Some(s) {
            emit(Event::Paused { step: s });
            std::thread::sleep(PAUSE);
        }
    };
    match upgrade::apply_with(&mut t, &b, &step) {
        Ok(r) => {
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
