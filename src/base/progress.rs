//! Progress bars for long work, drawn only when stderr is a terminal (and never with `--json`).

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

#[derive(Clone, Copy)]
pub struct Progress {
    enabled: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self { enabled: !quiet && std::io::stderr().is_terminal() }
    }
    pub fn hidden() -> Self {
        Self { enabled: false }
    }
    /// A group of bars drawn together (parallel downloads).
    pub fn multi(&self) -> MultiProgress {
        if self.enabled {
            MultiProgress::new()
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        }
    }
    /// A bar of `len` units (`bytes` selects byte formatting).
    pub fn bar(&self, what: &str, len: u64, bytes: bool) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let tmpl = if bytes {
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}"
        } else {
            "{prefix:>12} [{bar:30}] {pos}/{len} {msg}"
        };
        pb.set_style(ProgressStyle::with_template(tmpl).expect("valid template").progress_chars("=> "));
        pb.set_prefix(what.to_string());
        pb
    }
}
