//! Running one matrix on several machines: a deterministic split of its paths into N shards,
//! balanced by how many boots each path is expected to take (a TCG boot is 15–20 s: boots are
//! the cost), and the merge of the shards' reports into the report one machine would have
//! written. Pure; `slotforge test --shard K/N` and `slotforge merge-reports` are its users.

use super::matrix::{Fault, PathSpec};
use super::report::{Report, StepOutcome};

/// `K/N`: the K-th (1-based) of N shards — GitLab's `CI_NODE_INDEX/CI_NODE_TOTAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--shard {s:?}: K/N with 1 <= K <= N (e.g. 2/4)");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n): (usize, usize) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if n == 0 || k == 0 || k > n {
            return Err(bad());
        }
        Ok(Shard { k, n })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

/// Boots a path is expected to take: the install (two through an installer), one per `boot`
/// step, two per upgrade (the apply, the new slot's first boot), more for faults that add boots
/// (a broken slot spends its three tries and falls back; crash states record two boots and boot
/// their budget, each possibly re-running the apply).
pub fn expected_boots(p: &PathSpec) -> usize {
    let install = if p.install.via.as_ref().is_some_and(|v| v.value == "installer") { 2 } else { 1 };
    let steps: usize = p
        .steps
        .iter()
        .map(|s| {
            let s = &s.value;
            let base = if s.upgrade.is_some() { 2 } else { 1 };
            match s.fault.as_ref().and_then(|f| Fault::parse(&f.value).ok()) {
                Some(Fault::BadRootfs) => base + 3,
                Some(Fault::PowerCut(_)) => base + 1,
                Some(Fault::CrashStates(n)) => base + 2 * n.unwrap_or(2),
                _ => base,
            }
        })
        .sum();
    install + steps
}

/// The shard (0-based) of each path: longest first onto the least-loaded shard, ties to the
/// lower path index and the lower shard, so every machine computes the same split.
pub fn split(costs: &[usize], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(costs[i]), i));
    let mut load = vec![0usize; n.max(1)];
    let mut shard = vec![0; costs.len()];
    for i in order {
        let s = (0..load.len()).min_by_key(|&s| (load[s], s)).unwrap();
        load[s] += costs[i];
        shard[i] = s;
    }
    shard
}

/// Whether path `index` of `paths` runs in `shard` (all of them without one).
pub fn runs_here(paths: &[PathSpec], index: usize, shard: Option<Shard>) -> bool {
    let Some(sh) = shard else { return true };
    let costs: Vec<usize> = paths.iter().map(expected_boots).collect();
    split(&costs, sh.n)[index] == sh.k - 1
}

/// The shards' reports as one: steps in matrix order, counts summed, the slowest shard's time.
/// Refused if they are of different matrices, or two report the same step.
pub fn merge(reports: Vec<Report>) -> Result<Report, String> {
    let Some(first) = reports.first() else { return Err("no reports to merge".into()) };
    let matrix = first.matrix.clone();
    let accel = first.accel.clone();
    let mut steps = Vec::new();
    let mut seconds: f64 = 0.0;
    let mut jobs = 0;
    for r in reports {
        if r.matrix != matrix {
            return Err(format!("reports of different matrices: {} and {}", matrix.display(), r.matrix.display()));
        }
        seconds = seconds.max(r.seconds);
        jobs += r.jobs;
        steps.extend(r.steps);
    }
    steps.sort_by(|a, b| (a.order, a.index, &a.path).cmp(&(b.order, b.index, &b.path)));
    if let Some(w) = steps.windows(2).find(|w| w[0].path == w[1].path && w[0].index == w[1].index) {
        return Err(format!("two reports hold step {}/{}: shards overlap", w[0].path, w[0].label));
    }
    let count = |k: StepOutcome| steps.iter().filter(|s| s.result == k).count();
    Ok(Report { matrix, accel, jobs, seconds, passed: count(StepOutcome::Pass), failed: count(StepOutcome::Fail), skipped: count(StepOutcome::Skipped), shard: None, steps })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::report::StepResult;

    const M: &str = "variants:\n  v1: {manifest: a.yml}\n  v2: {manifest: b.yml}\nlayouts:\n  l: l.yaml\npaths:\n  - name: plain\n    install: {variant: v1, layout: l}\n  - name: upgrade\n    install: {variant: v1, layout: l}\n    steps:\n      - upgrade: v2\n  - name: crash\n    install: {variant: v1, layout: l}\n    steps:\n      - upgrade: v2\n        fault: crash-states:3\n  - name: rollback\n    install: {variant: v1, layout: l}\n    steps:\n      - upgrade: v2\n        fault: bad-rootfs\n  - name: cut\n    install: {variant: v1, layout: l}\n    steps:\n      - upgrade: v2\n        fault: power-cut:slot-written\n      - upgrade: v2\n  - name: usb\n    install: {variant: v1, layout: l, via: installer}\n    steps:\n      - boot: true\n";

    fn paths() -> Vec<PathSpec> {
        crate::harness::matrix::parse(std::path::Path::new("m.yaml"), M).unwrap().matrix.paths
    }

    #[test]
    fn boots_expected_per_path() {
        let b: Vec<usize> = paths().iter().map(expected_boots).collect();
        assert_eq!(b, [1, 3, 9, 6, 6, 3]);
    }

    #[test]
    fn every_path_runs_in_exactly_one_shard_the_same_everywhere_and_balanced() {
        let p = paths();
        let costs: Vec<usize> = p.iter().map(expected_boots).collect();
        for n in 1..=7 {
            let mut seen = vec![0; p.len()];
            let mut load = vec![0; n];
            for k in 1..=n {
                for i in 0..p.len() {
                    if runs_here(&p, i, Some(Shard { k, n })) {
                        seen[i] += 1;
                        load[k - 1] += costs[i];
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "n={n}: {seen:?}");
            let (max, min) = (*load.iter().max().unwrap(), *load.iter().min().unwrap());
            assert!(max - min <= *costs.iter().max().unwrap(), "n={n}: loads {load:?}");
            assert_eq!(split(&costs, n), split(&costs, n), "deterministic");
        }
        // Longest first onto the least-loaded shard: crash 9 → 0, rollback 6 → 1, cut 6 → 1 (12),
        // upgrade 3 → 0 (12), usb 3 → 0 (tie, lower shard: 15), plain 1 → 1 (13).
        assert_eq!(split(&costs, 2), [1, 0, 0, 1, 1, 0]);
    }

    fn step(path: &str, order: usize, index: usize, result: StepOutcome) -> StepResult {
        StepResult { path: path.into(), order, index, label: format!("s{index}"), result, seconds: 1.0, boots: 1, expect: Default::default(), observed: serde_json::Value::Null, message: String::new(), serial: None }
    }

    fn report(steps: Vec<StepResult>, shard: Option<&str>) -> Report {
        let count = |k| steps.iter().filter(|s| s.result == k).count();
        Report { matrix: "m.yaml".into(), accel: "tcg".into(), jobs: 1, seconds: steps.len() as f64, passed: count(StepOutcome::Pass), failed: count(StepOutcome::Fail), skipped: count(StepOutcome::Skipped), shard: shard.map(str::to_string), steps }
    }

    #[test]
    fn merged_shards_are_the_unsharded_report() {
        let p = paths();
        // The unsharded run: every step of every path, in matrix order.
        let all: Vec<StepResult> = p.iter().enumerate().flat_map(|(o, ps)| (0..=ps.steps.len()).map(move |i| step(&ps.name.value, o, i, if o == 3 && i == 1 { StepOutcome::Fail } else { StepOutcome::Pass }))).collect();
        let whole = report(all.clone(), None);
        for n in 1..=4 {
            // Each shard reports its own paths' steps (in its own order: reversed here).
            let shards: Vec<Report> = (1..=n)
                .map(|k| {
                    let mut mine: Vec<StepResult> = all.iter().filter(|s| runs_here(&p, s.order, Some(Shard { k, n }))).cloned().collect();
                    mine.reverse();
                    report(mine, Some(&format!("{k}/{n}")))
                })
                .collect();
            let m = merge(shards).unwrap();
            let key = |r: &Report| r.steps.iter().map(|s| (s.path.clone(), s.index, s.result)).collect::<Vec<_>>();
            assert_eq!(key(&m), key(&whole), "n={n}");
            assert_eq!((m.passed, m.failed, m.skipped, m.shard.clone()), (whole.passed, whole.failed, whole.skipped, None));
            assert!(!m.ok(), "a failed step fails the merged run");
        }
    }

    #[test]
    fn merge_refuses_overlapping_shards_and_other_matrices() {
        let a = report(vec![step("x", 0, 0, StepOutcome::Pass)], Some("1/2"));
        let b = report(vec![step("x", 0, 0, StepOutcome::Pass)], Some("2/2"));
        assert!(merge(vec![a, b]).unwrap_err().contains("shards overlap"));
        let mut c = report(vec![step("y", 1, 0, StepOutcome::Pass)], None);
        c.matrix = "other.yaml".into();
        assert!(merge(vec![report(vec![], None), c]).unwrap_err().contains("different matrices"));
        assert!("0/3".parse::<Shard>().is_err() && "4/3".parse::<Shard>().is_err() && "x".parse::<Shard>().is_err());
        assert_eq!("2/3".parse::<Shard>().unwrap(), Shard { k: 2, n: 3 });
    }
}
