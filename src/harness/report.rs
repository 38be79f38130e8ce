//! The report of a `slotforge test` run: each step's outcome, what it expected and observed, and
//! the whole run's counts; as JSON (`--json`, what `merge-reports` reads back) and JUnit XML. The
//! table a person reads is `run::table`.

use super::matrix::Expect;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// What became of one step of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepOutcome {
    Pass,
    Fail,
    /// Not run: an earlier step of its path failed.
    Skipped,
}

impl StepOutcome {
    pub fn name(self) -> &'static str {
        match self {
            StepOutcome::Pass => "pass",
            StepOutcome::Fail => "fail",
            StepOutcome::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for StepOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepResult {
    pub path: String,
    /// The path's place in the matrix (reports of shards merge back into matrix order).
    #[serde(default)]
    pub order: usize,
    pub index: usize,
    /// `install`, `upgrade v2`, `upgrade v2 (power-cut:slot-written)`, `boot (corrupt-image)`.
    pub label: String,
    /// `pass`, `fail` or `skipped` (an earlier step of the path failed).
    pub result: StepOutcome,
    pub seconds: f64,
    pub boots: usize,
    pub expect: Expect,
    pub observed: Value,
    /// Why it failed: the unmet expectations, what the guest said, the serial log's tail.
    pub message: String,
    pub serial: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub matrix: PathBuf,
    pub accel: String,
    pub jobs: usize,
    pub seconds: f64,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// `K/N` when this run was one shard of the matrix (`--shard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    pub steps: Vec<StepResult>,
}

impl Report {
    /// The run passed: nothing failed and at least one step ran and passed.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.steps.iter().any(|s| s.result == StepOutcome::Pass)
    }
}

fn xml(s: &str) -> String {
    s.chars()
        .filter(|c| *c == '\n' || *c == '\t' || !c.is_control())
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            c => c.to_string(),
        })
        .collect()
}

/// JUnit XML: one testsuite per path, one testcase per step.
pub fn junit(r: &Report) -> String {
    let mut out = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"slotforge test\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.3}\">\n", r.steps.len(), r.failed, r.skipped, r.seconds);
    let mut paths: Vec<&str> = r.steps.iter().map(|s| s.path.as_str()).collect();
    paths.dedup();
    for p in paths {
        let steps: Vec<&StepResult> = r.steps.iter().filter(|s| s.path == p).collect();
        let f = steps.iter().filter(|s| s.result == StepOutcome::Fail).count();
        let sk = steps.iter().filter(|s| s.result == StepOutcome::Skipped).count();
        let time: f64 = steps.iter().map(|s| s.seconds).sum();
        out += &format!("  <testsuite name=\"{}\" tests=\"{}\" failures=\"{f}\" skipped=\"{sk}\" time=\"{time:.3}\">\n", xml(p), steps.len());
        for s in steps {
            out += &format!("    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">", xml(p), xml(&format!("{:02} {}", s.index, s.label)), s.seconds);
            match s.result {
                StepOutcome::Fail => out += &format!("\n      <failure message=\"{}\">{}</failure>\n    ", xml(s.message.lines().next().unwrap_or("")), xml(&s.message)),
                StepOutcome::Skipped => out += &format!("\n      <skipped message=\"{}\"/>\n    ", xml(&s.message)),
                _ => {}
            }
            out += "</testcase>\n";
        }
        out += "  </testsuite>\n";
    }
    out += "</testsuites>\n";
    out
}
