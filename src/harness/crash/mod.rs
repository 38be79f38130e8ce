//! Crash-state replay: does a power cut at *any* instant of an operation leave a device that
//! boots a good slot? An operation (an apply, a first boot's boot counting + mark-good + GC) is
//! recorded in QEMU with the disk behind `blklogwrites` (every write and flush, in order:
//! `logwrites`); `plan` lists the states a cut can leave (every flush boundary, prefixes, torn
//! writes, subsets of the writes since the last flush); `replay` rebuilds each one on a scratch
//! copy of the disk as it was before — advancing through the log and undoing the sampled
//! writes — and `check`s it offline. The harness (`run.rs`, fault `crash-states`) boots a sample
//! of the states in QEMU as well. Reference: docs/upgrade-protocol.md#crash-states.

pub mod check;
pub mod plan;

use crate::format::logwrites::{self, Log};
use anyhow::Context;
use check::{Decision, Known, Region, Verdict};
use plan::{Kind, Sampling, State};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One recorded operation: the disk before it and the log of what it wrote.
#[derive(Debug, Clone)]
pub struct Recording {
    /// `apply`, `first-boot` (boot counting, mark-good, GC), …
    pub operation: String,
    pub before: PathBuf,
    pub log: PathBuf,
}

/// The offline verdicts on one state.
#[derive(Debug, Clone, Serialize)]
pub struct StateResult {
    pub label: String,
    pub kind: Kind,
    pub interval: usize,
    /// Write requests on the disk in this state (of the log's).
    pub writes: usize,
    pub gpt: Verdict,
    pub esp: Verdict,
    pub images: Verdict,
    pub decision: Decision,
    pub ok: bool,
}

/// Writes of an operation landing in one region.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegionWrites {
    pub writes: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OperationReport {
    pub operation: String,
    pub entries: usize,
    pub writes: usize,
    pub write_bytes: u64,
    pub flushes: usize,
    pub by_region: BTreeMap<String, RegionWrites>,
    /// No write touches a data partition or the slot that was booting before the operation.
    pub protected: Verdict,
    pub states: usize,
    pub failed: usize,
    /// Good states that boot only through a fallback: the entry systemd-boot prefers would fail
    /// and its boot counter hands over to another. The apply and first-boot protocols promise
    /// none (docs/upgrade-protocol.md#crash-states): every state's preferred entry is complete.
    pub fallbacks: usize,
    /// How many states boot each entry (`slot-a.conf → 0.1.0-…`).
    pub decisions: BTreeMap<String, usize>,
    /// Every state's verdicts, in log order.
    pub results: Vec<StateResult>,
    /// The plan (for rebuilding a state to boot it).
    #[serde(skip)]
    pub plan: Vec<State>,
    pub seconds: f64,
}

impl OperationReport {
    /// Flush states where the decision differs from the previous flush state's (not the first
    /// state: that is the disk before): where booting tells the most.
    pub fn decision_changes(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut last: Option<(Option<String>, Option<String>)> = None;
        for (i, r) in self.results.iter().enumerate().filter(|(_, r)| r.kind == Kind::Flush) {
            let d = (r.decision.entry.clone(), r.decision.build.clone());
            if last.as_ref().is_some_and(|l| *l != d) {
                out.push(i);
            }
            last = Some(d);
        }
        out
    }
}

/// The regions `[from, to)` bytes overlap.
fn touched(regions: &[Region], from: u64, to: u64) -> Vec<usize> {
    let mut v = vec![check::region_of(regions, from), check::region_of(regions, to.saturating_sub(1).max(from))];
    v.extend(regions.iter().enumerate().filter(|(_, r)| r.role != "gpt" && r.start >= from && r.start < to).map(|(i, _)| i));
    v.sort();
    v.dedup();
    v
}


/// A scratch disk moved through the log: forward in full, sampled writes applied and undone.
struct Replayer<'a> {
    log: &'a Log,
    log_file: File,
    disk: File,
    path: PathBuf,
    applied: usize,
    regions: &'a [Region],
    /// A generation per region, changed whenever its bytes may have; checks are memoised on them.
    gens: Vec<u64>,
    next_gen: u64,
}

impl Replayer<'_> {
    fn bump(&mut self, i: usize) {
        let e = &self.log.entries[i];
        if !e.is_write() && e.flags & logwrites::DISCARD == 0 {
            return;
        }
        let ss = self.log.sector_size;
        for r in touched(self.regions, e.sector * ss, (e.sector + e.sectors) * ss) {
            self.next_gen += 1;
            self.gens[r] = self.next_gen;
        }
    }

    fn advance(&mut self, to: usize) -> anyhow::Result<()> {
        for i in self.applied..to {
            logwrites::apply(self.log, &mut self.log_file, &mut self.disk, [i])?;
            self.bump(i);
        }
        self.applied = self.applied.max(to);
        Ok(())
    }

    /// Apply a state's extra writes, keeping what they overwrite; returns the undo list.
    fn apply_extra(&mut self, s: &State, undo: &mut File) -> anyhow::Result<Vec<(u64, u64, u64)>> {
        let ss = self.log.sector_size;
        let mut saved = Vec::new();
        undo.set_len(0)?;
        undo.seek(SeekFrom::Start(0))?;
        let mut at = 0u64;
        for (k, &i) in s.extra.iter().enumerate() {
            let e = &self.log.entries[i];
            let sectors = if k + 1 == s.extra.len() { s.torn.unwrap_or(e.sectors) } else { e.sectors };
            let (off, len) = (e.sector * ss, sectors * ss);
            self.disk.seek(SeekFrom::Start(off))?;
            let n = std::io::copy(&mut Read::by_ref(&mut self.disk).take(len), undo)?;
            saved.push((off, n, at));
            at += n;
            logwrites::apply_sectors(self.log, &mut self.log_file, &mut self.disk, i, sectors)?;
            self.bump(i);
        }
        Ok(saved)
    }

    fn undo(&mut self, saved: &[(u64, u64, u64)], undo: &mut File) -> anyhow::Result<()> {
        for &(off, n, at) in saved.iter().rev() {
            undo.seek(SeekFrom::Start(at))?;
            self.disk.seek(SeekFrom::Start(off))?;
            std::io::copy(&mut Read::by_ref(undo).take(n), &mut self.disk)?;
        }
        Ok(())
    }
}

/// Rebuild one state of `rec` into `out` (to boot it).
pub fn rebuild(rec: &Recording, log: &Log, s: &State, out: &Path) -> anyhow::Result<()> {
    check::copy_disk(&rec.before, out)?;
    let mut lf = File::open(&rec.log)?;
    let mut disk = OpenOptions::new().read(true).write(true).open(out)?;
    logwrites::apply(log, &mut lf, &mut disk, 0..s.base)?;
    for (k, &i) in s.extra.iter().enumerate() {
        let n = if k + 1 == s.extra.len() { s.torn.unwrap_or(log.entries[i].sectors) } else { log.entries[i].sectors };
        logwrites::apply_sectors(log, &mut lf, &mut disk, i, n)?;
    }
    disk.sync_all()?;
    Ok(())
}

/// Rebuild and check every planned state of `rec` (scratch files in `scratch`). `progress` is
/// called with (states done, states planned).
pub fn replay(rec: &Recording, sampling: &Sampling, scratch: &Path, progress: &dyn Fn(usize, usize)) -> anyhow::Result<OperationReport> {
    let t = std::time::Instant::now();
    std::fs::create_dir_all(scratch)?;
    let log = logwrites::parse(File::open(&rec.log).with_context(|| format!("opening {}", rec.log.display()))?).with_context(|| format!("reading {}", rec.log.display()))?;
    let regions = check::regions(&rec.before)?;
    let plan = plan::plan(&log, sampling);
    let disk_path = scratch.join(format!("{}.state.img", rec.operation));
    // The disk after the whole operation: its boot files are "complete" too.
    check::copy_disk(&rec.before, &disk_path)?;
    {
        let mut d = OpenOptions::new().read(true).write(true).open(&disk_path)?;
        logwrites::apply(&log, File::open(&rec.log)?, &mut d, 0..log.entries.len())?;
    }
    let known = Known::from_disks(&[&rec.before, &disk_path])?;
    // What the operation wrote, by region; and whether it kept off what it must not touch.
    let mut by_region: BTreeMap<String, RegionWrites> = BTreeMap::new();
    let ss = log.sector_size;
    let mut hits: BTreeMap<String, usize> = BTreeMap::new();
    let before_decision = check::decide(&rec.before, &regions, &known, scratch)?;
    let running = inspect_partition_of(&rec.before, before_decision.slot.as_deref())?;
    for e in log.entries.iter().filter(|e| e.is_write()) {
        for r in touched(&regions, e.sector * ss, (e.sector + e.sectors) * ss) {
            let w = by_region.entry(regions[r].name.clone()).or_default();
            w.writes += 1;
            w.bytes += e.sectors * ss;
            if regions[r].role == "data" || Some(&regions[r].name) == running.as_ref() {
                *hits.entry(regions[r].name.clone()).or_default() += 1;
            }
        }
    }
    let protected = if hits.is_empty() {
        Verdict { ok: true, detail: format!("no write touches the data partitions{}", running.as_ref().map(|r| format!(" or {r}, the slot booting before")).unwrap_or_default()) }
    } else {
        Verdict { ok: false, detail: format!("written: {}", hits.iter().map(|(k, v)| format!("{k} ({v} writes)")).collect::<Vec<_>>().join(", ")) }
    };
    check::copy_disk(&rec.before, &disk_path)?;
    let mut rp = Replayer {
        log: &log,
        log_file: File::open(&rec.log)?,
        disk: OpenOptions::new().read(true).write(true).open(&disk_path)?,
        path: disk_path.clone(),
        applied: 0,
        regions: &regions,
        gens: vec![0; regions.len()],
        next_gen: 0,
    };
    let mut undo = tempfile::tempfile_in(scratch)?;
    let find = |role: &str| regions.iter().position(|r| r.role == role);
    let (gpt_r, esp_r, img_r) = (regions.len() - 1, find("esp"), find("external-images"));
    let mut memo: HashMap<(u8, Vec<u64>), Verdict> = HashMap::new();
    let mut dmemo: HashMap<Vec<u64>, Decision> = HashMap::new();
    let mut results = Vec::new();
    let mut writes_before = vec![0usize; log.entries.len() + 1];
    for (i, e) in log.entries.iter().enumerate() {
        writes_before[i + 1] = writes_before[i] + e.is_write() as usize;
    }
    for (n, s) in plan.iter().enumerate() {
        progress(n, plan.len());
        rp.advance(s.base)?;
        let gens_before = rp.gens.clone();
        let saved = rp.apply_extra(s, &mut undo)?;
        rp.disk.flush()?;
        let path = rp.path.clone();
        let mut cached = |kind: u8, region: Option<usize>, f: &dyn Fn(&Region) -> anyhow::Result<Verdict>| -> anyhow::Result<Verdict> {
            let Some(r) = region else {
                return Ok(Verdict { ok: true, detail: "none on this disk".into() });
            };
            let key = (kind, vec![rp.gens[r]]);
            if let Some(v) = memo.get(&key) {
                return Ok(v.clone());
            }
            let v = f(&regions[r])?;
            memo.insert(key, v.clone());
            Ok(v)
        };
        let gpt = cached(0, Some(gpt_r), &|_| check::gpt(&path))?;
        let esp = cached(1, esp_r, &|r| check::esp(&path, r, scratch))?;
        let images = cached(2, img_r, &|r| check::ext4(&path, r, scratch))?;
        let dkey: Vec<u64> = regions.iter().enumerate().filter(|(_, r)| r.role != "data").map(|(i, _)| rp.gens[i]).collect();
        let decision = match dmemo.get(&dkey) {
            Some(d) => d.clone(),
            None => {
                let d = check::decide(&path, &regions, &known, scratch)?;
                dmemo.insert(dkey, d.clone());
                d
            }
        };
        rp.undo(&saved, &mut undo)?;
        rp.gens = gens_before;
        let writes = writes_before[s.base] + s.extra.len();
        let ok = gpt.ok && esp.ok && images.ok && decision.ok;
        results.push(StateResult { label: s.label(), kind: s.kind, interval: s.interval, writes, gpt, esp, images, decision, ok });
    }
    progress(plan.len(), plan.len());
    drop(rp);
    let _ = std::fs::remove_file(&disk_path);
    let mut decisions = BTreeMap::new();
    for r in &results {
        let k = match (&r.decision.entry, &r.decision.build) {
            (Some(e), Some(b)) => format!("{e} → {b}"),
            (Some(e), None) => e.clone(),
            _ => "no bootable entry".into(),
        };
        *decisions.entry(k).or_default() += 1;
    }
    let (writes, write_bytes) = log.write_stats();
    let failed = results.iter().filter(|r| !r.ok).count() + (!protected.ok) as usize;
    let fallbacks = results.iter().filter(|r| r.ok && r.decision.fallback).count();
    Ok(OperationReport {
        operation: rec.operation.clone(),
        entries: log.entries.len(),
        writes,
        write_bytes,
        flushes: log.flushes().len(),
        by_region,
        protected,
        states: results.len(),
        failed,
        fallbacks,
        decisions,
        results,
        plan,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// The partition of `slot` on `disk`.
fn inspect_partition_of(disk: &Path, slot: Option<&str>) -> anyhow::Result<Option<String>> {
    let Some(slot) = slot else { return Ok(None) };
    let rep = crate::format::inspect::inspect(disk)?;
    Ok(rep.slots.iter().find(|s| s.slot == slot).map(|s| s.partition.clone()))
}

/// States to boot within `budget`: around each flush boundary where the decision changes, the
/// last state before it and the first after it (never the disk before the operation: its boot
/// is the recording itself); then the first state whose ESP needs the boot-time repair beyond
/// the dirty flag; then others spread evenly over the log (by position, so a run is repeatable).
pub fn pick_boots(r: &OperationReport, budget: usize) -> Vec<usize> {
    let flushes: Vec<usize> = (0..r.results.len()).filter(|&i| r.results[i].kind == Kind::Flush).collect();
    let mut pick: Vec<usize> = Vec::new();
    for c in r.decision_changes() {
        let before = flushes.iter().rev().find(|&&f| f < c).copied().filter(|&f| f > 0);
        for i in before.into_iter().chain([c]) {
            if !pick.contains(&i) {
                pick.push(i);
            }
        }
    }
    if let Some(i) = r.results.iter().position(|s| s.esp.needs_repair()) {
        if !pick.contains(&i) {
            pick.push(i);
        }
    }
    pick.truncate(budget);
    let rest: Vec<usize> = (0..r.results.len()).filter(|i| !pick.contains(i)).collect();
    let want = budget.saturating_sub(pick.len()).min(rest.len());
    for k in 0..want {
        // Evenly spaced through the remaining states: k-th of `want` slices, its middle.
        let i = rest[(2 * k + 1) * rest.len() / (2 * want)];
        pick.push(i);
    }
    pick.sort();
    pick.dedup();
    pick
}

/// A few lines a person reads: what was written, how many states, where they boot, failures.
pub fn summary(r: &OperationReport) -> String {
    let mut out = format!(
        "{}: {} log entries, {} writes ({:.1} MiB), {} flushes; {} crash states checked offline in {:.0} s, {} failed\n",
        r.operation,
        r.entries,
        r.writes,
        r.write_bytes as f64 / 1048576.0,
        r.flushes,
        r.states,
        r.seconds,
        r.failed
    );
    for (k, w) in &r.by_region {
        out += &format!("  writes to {k}: {} ({:.1} MiB)\n", w.writes, w.bytes as f64 / 1048576.0);
    }
    out += &format!("  {}: {}\n", if r.protected.ok { "ok" } else { "FAILED" }, r.protected.detail);
    out += &format!("  {} good states, {} of them only through a fallback (the preferred entry would fail)\n", r.states - r.failed.min(r.states), r.fallbacks);
    for (k, n) in &r.decisions {
        out += &format!("  {n} states boot {k}\n");
    }
    for s in r.results.iter().filter(|s| !s.ok) {
        let why: Vec<&str> = [&s.gpt, &s.esp, &s.images].iter().filter(|v| !v.ok).map(|v| v.detail.as_str()).chain((!s.decision.ok).then_some(s.decision.detail.as_str())).collect();
        out += &format!("  FAILED {}: {}\n", s.label, why.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(kind: Kind, entry: &str, esp: &str) -> StateResult {
        let v = |d: &str| Verdict { ok: true, detail: d.into() };
        StateResult {
            label: String::new(),
            kind,
            interval: 0,
            writes: 0,
            gpt: v("ok"),
            esp: v(esp),
            images: v("ok"),
            decision: Decision { entry: Some(entry.into()), slot: None, build: Some("b1".into()), fallback: false, ok: true, detail: String::new() },
            ok: true,
        }
    }

    #[test]
    fn boots_go_first_where_the_decision_changes_then_to_a_repaired_esp_then_spread() {
        let clean = "fsck.vfat -n: clean";
        let leaked = "fsck.vfat -n: dirty bit (cut while mounted), 3 leaked clusters; clean after fsck.vfat -a, entries kept";
        let results = vec![
            state(Kind::Flush, "slot-a.conf", clean),
            state(Kind::Prefix, "slot-a.conf", leaked),
            state(Kind::Flush, "slot-a.conf", clean),
            state(Kind::Subset, "slot-a.conf", clean),
            state(Kind::Flush, "slot-b+3.conf", clean),
            state(Kind::Torn, "slot-b+3.conf", clean),
            state(Kind::Flush, "slot-b+3.conf", clean),
        ];
        // 0 the disk before, 2 the last flush on slot a, 4 the first on slot b+3.
        let r = OperationReport {
            operation: "apply".into(),
            entries: 0,
            writes: 0,
            write_bytes: 0,
            flushes: 0,
            by_region: BTreeMap::new(),
            protected: Verdict { ok: true, detail: String::new() },
            states: results.len(),
            failed: 0,
            fallbacks: 0,
            decisions: BTreeMap::new(),
            results,
            plan: vec![],
            seconds: 0.0,
        };
        assert_eq!(r.decision_changes(), vec![4]);
        assert_eq!(pick_boots(&r, 1), vec![2], "the last state before the change first");
        assert_eq!(pick_boots(&r, 2), vec![2, 4], "then the first after it");
        assert_eq!(pick_boots(&r, 3), vec![1, 2, 4], "then the ESP the boot-time repair must fix");
        assert_eq!(pick_boots(&r, 4).len(), 4);
        assert_eq!(pick_boots(&r, 99).len(), 7, "never more than there are");
    }
}

/// `slotforge crash-states`: what a replay of a recorded log is asked to do.
pub struct ReplayOptions {
    /// Every prefix and torn write, 8 subsets per interval (else a sample).
    pub full: bool,
    pub seed: u64,
    /// The medium's atomic write unit in bytes: a power of two from 512.
    pub atomic_write: u64,
    /// Scratch directory (default: a temporary one).
    pub scratch: Option<std::path::PathBuf>,
}

/// Replay `log` onto the disk as it was `before` and check every planned state. `progress`
/// gets (states done, states planned).
pub fn replay_recording(before: &Path, log: &Path, o: &ReplayOptions, progress: &dyn Fn(usize, usize)) -> anyhow::Result<OperationReport> {
    if o.atomic_write < 512 || !o.atomic_write.is_power_of_two() {
        anyhow::bail!("--atomic-write {}: a power of two from 512", o.atomic_write);
    }
    let tmp = tempfile::Builder::new().prefix("slotforge-crash-").tempdir()?;
    let scratch = o.scratch.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let rec = Recording { operation: "replay".into(), before: before.to_path_buf(), log: log.to_path_buf() };
    let mut sampling = if o.full { plan::Sampling::full(o.seed) } else { plan::Sampling::sample(o.seed) };
    sampling.atomic = o.atomic_write / 512;
    replay(&rec, &sampling, &scratch, progress)
}
