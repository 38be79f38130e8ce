//! The `crash-states` fault of an upgrade step: record the apply and the new slot's first boot
//! (boot counting, mark-good, GC) with every write logged, check every crash state offline
//! (`harness::crash`), then boot a budget of them in QEMU — each must reach a good slot, and an
//! apply's state must take a re-run of the apply through to the new slot.

use super::{Device, Options};
use crate::harness::crash::{self, plan::Sampling, OperationReport, Recording};
use crate::harness::vm::{self, Boot, Outcome};
use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use crate::format::agent::{Status, StatusState};

/// What one operation's replay found.
#[derive(Debug, Clone, Serialize)]
pub struct OpSummary {
    pub operation: String,
    pub log_entries: usize,
    pub writes: usize,
    pub write_bytes: u64,
    pub flushes: usize,
    pub by_region: BTreeMap<String, crash::RegionWrites>,
    pub states: usize,
    pub failed: usize,
    /// Good states that boot only through a fallback (asserted zero: a problem otherwise).
    pub fallbacks: usize,
    /// States by the entry (and build) they boot.
    pub decisions: BTreeMap<String, usize>,
    /// States whose ESP needed the boot-time repair (`fsck.vfat -a`) beyond the dirty bit.
    pub esp_repaired: usize,
    pub seconds: f64,
}

/// One state booted in QEMU.
#[derive(Debug, Clone, Serialize)]
pub struct BootedState {
    pub operation: String,
    pub state: String,
    /// The offline verdict on the state's ESP (what the boot-time repair had to do).
    pub esp_before: String,
    pub expected_slot: Option<String>,
    pub slot: Option<String>,
    pub status: Option<StatusState>,
    /// An apply's state: the re-run of the apply reached the new slot.
    pub rerun: Option<bool>,
    /// `fsck.vfat -n` of the disk after its boots (the guest repaired and unmounted it).
    pub esp_after: String,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CrashStep {
    pub operations: Vec<OpSummary>,
    pub booted: Vec<BootedState>,
    /// Every failure, one line each (empty: the step's crash check passed).
    pub problems: Vec<String>,
}


fn last_status(boots: &[Boot]) -> Option<Status> {
    boots.iter().rev().find_map(|b| b.status().cloned())
}

/// A recorded first boot is replayable only if it completed: the agent reported its `status`
/// and the guest powered off by itself (the log then holds the whole boot).
pub(crate) fn first_boot_recorded(b: &Boot) -> Result<(), String> {
    match (b.status().is_some(), b.outcome) {
        (true, Outcome::Exited) => Ok(()),
        (false, _) => Err("crash-states: the recorded first boot of the new slot never reached the agent's `status`, so its log is not replayed".into()),
        (true, o) => Err(format!("crash-states: the recorded first boot of the new slot did not power off by itself ({o:?}), so its log is incomplete and not replayed")),
    }
}

impl Device<'_> {
    /// Boot `disk` until a boot reports `status` (at most 4: a slot on probation that fails
    /// spends its tries first).
    fn boot_to_status(&self, disk: &Path, extra: &[PathBuf]) -> anyhow::Result<Vec<Boot>> {
        let mut out = Vec::new();
        for _ in 0..4 {
            let b = vm::boot(&self.vm_options(disk, "crash", extra), &|_| false)?;
            let done = b.status().is_some() || b.outcome != Outcome::Exited;
            out.push(b);
            if done {
                break;
            }
        }
        Ok(out)
    }

    pub(super) fn crash_states(&self, bundle: &Path, budget: Option<usize>, opts: &Options, boots: &mut Vec<Boot>) -> anyhow::Result<CrashStep> {
        let dir = self.dir.join("crash");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut problems = Vec::new();
        // Record the apply.
        let before_apply = dir.join("before-apply.img");
        crash::check::copy_disk(&self.disk, &before_apply)?;
        let mut o = self.vm_options(&self.disk, "dev", &[bundle.to_path_buf()]);
        o.log_writes = Some(dir.join("apply.log"));
        let b = vm::boot(&o, &|_| false)?;
        let applied = b.applied().cloned();
        let exited = b.outcome == Outcome::Exited;
        boots.push(b);
        let Some(applied) = applied else {
            return Ok(CrashStep { operations: vec![], booted: vec![], problems: vec!["crash-states: the recorded apply did not complete (no `applied` event)".into()] });
        };
        if !exited {
            bail!("crash-states: the recording VM did not exit by itself, so the log is incomplete");
        }
        // Record the new slot's first boot: boot counting, mark-good, GC.
        let before_first = dir.join("before-first-boot.img");
        crash::check::copy_disk(&self.disk, &before_first)?;
        let mut o = self.vm_options(&self.disk, "dev", &[]);
        o.log_writes = Some(dir.join("first-boot.log"));
        let b = vm::boot(&o, &|_| false)?;
        let recorded = first_boot_recorded(&b);
        boots.push(b);
        if let Err(why) = recorded {
            // Its log is not a first boot that completed: replaying it would check states of an
            // operation that never happened. A failure of the step.
            return Ok(CrashStep { operations: vec![], booted: vec![], problems: vec![why] });
        }
        let sampling = if opts.crash_full { Sampling::full(1) } else { Sampling::sample(1) };
        let recs = [
            Recording { operation: "apply".into(), before: before_apply, log: dir.join("apply.log") },
            Recording { operation: "first-boot".into(), before: before_first, log: dir.join("first-boot.log") },
        ];
        let budget = opts.crash_boots.or(budget).unwrap_or(2);
        let mut operations = Vec::new();
        let mut booted = Vec::new();
        for (k, rec) in recs.iter().enumerate() {
            let r: OperationReport = crash::replay(rec, &sampling, &dir.join("scratch"), &|_, _| {}).with_context(|| format!("replaying the {} log", rec.operation))?;
            if !r.protected.ok {
                problems.push(format!("crash-states {}: {}", rec.operation, r.protected.detail));
            }
            if r.fallbacks > 0 {
                problems.push(format!("crash-states {}: {} states boot only through a fallback (their preferred entry would fail); the protocol promises none", rec.operation, r.fallbacks));
            }
            for s in r.results.iter().filter(|s| !s.ok).take(10) {
                let why: Vec<&str> = [&s.gpt, &s.esp, &s.images].iter().filter(|v| !v.ok).map(|v| v.detail.as_str()).chain((!s.decision.ok).then_some(s.decision.detail.as_str())).collect();
                problems.push(format!("crash-states {} {}: {}", rec.operation, s.label, why.join("; ")));
            }
            let esp_repaired = r.results.iter().filter(|s| s.esp.needs_repair()).count();
            // The first boot gets a quarter of the budget (at least one state when there are two),
            // the apply the rest: its states are where the new entry appears, where the ESP needs
            // the boot-time repair, and they re-run the apply.
            let first = if budget >= 2 { (budget / 4).max(1) } else { 0 };
            let mine = if k == 0 { budget - first } else { first };
            let log = crate::format::logwrites::parse(std::fs::File::open(&rec.log)?)?;
            let regions = crate::harness::crash::check::regions(&rec.before)?;
            for i in crash::pick_boots(&r, mine) {
                let state = &r.results[i];
                let disk = dir.join("state.img");
                crash::rebuild(rec, &log, &r.plan[i], &disk)?;
                let bs = self.boot_to_status(&disk, &[])?;
                let st = last_status(&bs);
                let slot = st.as_ref().and_then(|s| s.slot.clone());
                let status = st.as_ref().map(|s| s.state);
                let mut ok = slot.is_some() && slot == state.decision.slot && status == Some(StatusState::Ok);
                let mut rerun = None;
                if ok && rec.operation == "apply" && st.as_ref().is_some_and(|s| s.build_id != applied.build_id) {
                    // The power came back on the old slot: the update is offered again and must
                    // go through. (A state already booting the new build has nothing to re-run.)
                    let own = dir.join("bundle.disk");
                    std::fs::copy(bundle, &own)?;
                    let again = vm::boot(&self.vm_options(&disk, "crash", &[own]), &|_| false)?;
                    let re_applied = again.applied().is_some();
                    let next = if re_applied { self.boot_to_status(&disk, &[])? } else { vec![] };
                    let st2 = last_status(&next);
                    let good = re_applied && st2.as_ref().is_some_and(|s| s.slot.as_deref() == Some(applied.slot.as_str()) && s.build_id == applied.build_id);
                    rerun = Some(good);
                    ok &= good;
                }
                // The guest repaired its ESP at boot and unmounted it at power-off: clean now.
                let esp_after = match regions.iter().find(|g| g.role == "esp") {
                    Some(g) => crate::harness::crash::check::esp(&disk, g, &dir)?,
                    None => crate::harness::crash::check::Verdict { ok: true, detail: "no ESP".into() },
                };
                let esp_clean = esp_after.detail == "fsck.vfat -n: clean";
                ok &= esp_clean;
                if !ok {
                    problems.push(format!(
                        "crash-states {} {}: booted in QEMU: expected slot {:?} ok, observed slot {:?} {:?}{}{}",
                        rec.operation,
                        state.label,
                        state.decision.slot,
                        slot,
                        status,
                        if rerun == Some(false) { "; the re-run of the apply did not reach the new slot" } else { "" },
                        if esp_clean { String::new() } else { format!("; the ESP after the boots: {}", esp_after.detail) }
                    ));
                }
                booted.push(BootedState {
                    operation: rec.operation.clone(),
                    state: state.label.clone(),
                    esp_before: state.esp.detail.clone(),
                    expected_slot: state.decision.slot.clone(),
                    slot,
                    status,
                    rerun,
                    esp_after: esp_after.detail,
                    ok,
                });
                let _ = std::fs::remove_file(&disk);
            }
            operations.push(OpSummary {
                operation: r.operation.clone(),
                log_entries: r.entries,
                writes: r.writes,
                write_bytes: r.write_bytes,
                flushes: r.flushes,
                by_region: r.by_region.clone(),
                states: r.states,
                failed: r.failed,
                fallbacks: r.fallbacks,
                decisions: r.decisions.clone(),
                esp_repaired,
                seconds: r.seconds,
            });
            // The full report, for reading later (`--keep`).
            std::fs::write(dir.join(format!("{}.states.json", rec.operation)), serde_json::to_vec_pretty(&r)?)?;
        }
        let _ = std::fs::remove_dir_all(dir.join("scratch"));
        Ok(CrashStep { operations, booted, problems })
    }
}

/// Lines under the results table for one step's crash check.
pub fn table_lines(path: &str, label: &str, c: &Value) -> String {
    let mut out = String::new();
    for o in c["operations"].as_array().into_iter().flatten() {
        out += &format!(
            "{path}/{label}: {} — {} writes ({:.1} MiB), {} flushes; {} crash states checked offline, {} failed, {} needed the ESP repair\n",
            o["operation"].as_str().unwrap_or(""),
            o["writes"],
            o["write_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            o["flushes"],
            o["states"],
            o["failed"],
            o["esp_repaired"]
        );
    }
    let booted = c["booted"].as_array().map(|b| b.len()).unwrap_or(0);
    let good = c["booted"].as_array().into_iter().flatten().filter(|b| b["ok"] == true).count();
    out += &format!("{path}/{label}: {booted} crash states booted in QEMU, {good} reached a good slot\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(serial: &str, outcome: Outcome) -> Boot {
        Boot { outcome, events: crate::format::agent::events::parse(serial), serial_path: PathBuf::new(), seconds: 1.0, accel: "tcg" }
    }

    #[test]
    fn a_first_boot_that_never_reached_status_is_a_failure_not_a_log_to_replay() {
        let status = "@slotforge {\"event\":\"status\",\"slot\":\"b\",\"version\":\"2\",\"build_id\":\"x\",\"state\":\"ok\",\"slots\":[],\"images\":[]}\n";
        assert_eq!(first_boot_recorded(&boot(status, Outcome::Exited)), Ok(()));
        let e = first_boot_recorded(&boot("@slotforge {\"event\":\"initramfs-failed\",\"root\":\"x\",\"why\":\"mount\"}\n", Outcome::Exited)).unwrap_err();
        assert!(e.contains("never reached the agent's `status`"), "{e}");
        let e = first_boot_recorded(&boot(status, Outcome::TimedOut)).unwrap_err();
        assert!(e.contains("did not power off by itself (TimedOut)"), "{e}");
    }
}
