//! `supply: registry-bundle`: the step's bundle is pushed to the matrix's registry under a tag of
//! its own (after the release the device runs, which the step's points into), and the guest's second disk carries only the reference (the appliance's init runs
//! `slotforge agent update` with it); `fault: network-cut` drops the guest's connection half-way
//! through that release's download and requires the next boot to go on from what it kept. A
//! `supply: registry` step expecting `lazy: true` publishes the variant's sealed images next to
//! their images first.

use super::super::netcut::Cut;
use super::super::vm::{Boot, GUEST_REGISTRY};
use super::Device;
use crate::format::agent::PullReport;
use anyhow::{bail, Context};
use serde_json::json;
use std::path::Path;
use std::process::Command;

/// What the second disk of a `registry-bundle` step starts with; the reference follows on the
/// same line (docs/testing.md).
pub const POINTER: &str = "docker://";

/// A repository name from a path name (OCI repository names are lower case, and a separator
/// stands between two alphanumerics).
pub fn repo_name(path: &str) -> String {
    let mut out = String::new();
    for c in path.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() { "path".into() } else { out }
}

impl Device<'_> {
    /// The port of the matrix's registry (`supply: registry-bundle` requires one).
    fn registry_port(&self) -> anyhow::Result<u16> {
        let r = self.sh.m.matrix.registry.as_ref().context("supply: registry-bundle needs `registry:`")?;
        super::super::matrix::registry_port(&r.value).map_err(anyhow::Error::msg)
    }

    /// `REPO:TAG` of this step's release in the matrix's registry.
    fn release_name(&self) -> String {
        format!("slotforge-test/{}:step-{}", repo_name(&self.dir.file_name().unwrap_or_default().to_string_lossy()), self.steps)
    }

    /// Push `bundle` as this step's release — after `base`, the release the device runs, under
    /// `step-N-base`, so the step's release points at its chunks as a fleet's would — and write
    /// the second disk naming it as the guest reaches it. Returns the disk.
    pub(super) fn publish(&mut self, bundle: &Path, disk: &Path, base: Option<&Path>) -> anyhow::Result<std::path::PathBuf> {
        let port = self.registry_port()?;
        let name = self.release_name();
        if let Some(base) = base {
            let base_ref = format!("127.0.0.1:{port}/{name}-base");
            self.sh.slotforge(&["push", &base.to_string_lossy(), &base_ref, "--json"]).map_err(anyhow::Error::new).with_context(|| format!("pushing the running release to {base_ref}"))?;
        }
        let host_ref = format!("127.0.0.1:{port}/{name}");
        let out = self.sh.slotforge(&["push", &bundle.to_string_lossy(), &host_ref, "--json"]).map_err(anyhow::Error::new).with_context(|| format!("pushing the release to {host_ref}"))?;
        let pushed: serde_json::Value = serde_json::from_str(&out).context("push summary")?;
        self.extra.insert("release".into(), json!({"reference": format!("{GUEST_REGISTRY}/{name}"), "manifest_digest": pushed["manifest_digest"]}));
        let mut data = format!("{POINTER}{GUEST_REGISTRY}/{name}\n").into_bytes();
        data.resize(4096, 0);
        std::fs::write(disk, data)?;
        Ok(disk.to_path_buf())
    }

    /// Publish the sealed images of `bundle` (a full one) next to their images in the matrix's
    /// registry (`slotforge push --next-to-images`, the release itself under this step's tag).
    pub(super) fn publish_sealed(&mut self, bundle: &Path) -> anyhow::Result<()> {
        let host_ref = format!("127.0.0.1:{}/{}-images", self.registry_port()?, self.release_name());
        let out = self.sh.slotforge(&["push", &bundle.to_string_lossy(), &host_ref, "--next-to-images", "--json"]).map_err(anyhow::Error::new).with_context(|| format!("publishing the sealed images ({host_ref})"))?;
        let pushed: serde_json::Value = serde_json::from_str(&out).context("push summary")?;
        self.extra.insert("sealed_published".into(), pushed["next_to_images"].clone());
        Ok(())
    }

    /// What a clean pull of this step's release fetches on the device's disk as it is now: the
    /// same pull and apply `agent update` runs, offline on a copy.
    fn clean_pull(&self) -> anyhow::Result<PullReport> {
        let copy = self.dir.join("clean-pull.img");
        let st = Command::new("cp").arg("--sparse=always").arg(&self.disk).arg(&copy).status()?;
        if !st.success() {
            bail!("copying {}", self.disk.display());
        }
        let host_ref = format!("docker://127.0.0.1:{}/{}", self.registry_port()?, self.release_name());
        let r = self.sh.slotforge(&["upgrade", &copy.to_string_lossy(), &host_ref, "--scratch", &self.dir.join("clean-pull").to_string_lossy(), "--json"]);
        let _ = std::fs::remove_file(&copy);
        let _ = std::fs::remove_dir_all(self.dir.join("clean-pull"));
        let v: serde_json::Value = serde_json::from_str(&r.map_err(anyhow::Error::new).context("the clean pull the cut is measured against")?)?;
        serde_json::from_value(v["pulled"].clone()).context("the clean pull's report")
    }

    /// `fault: network-cut`: boot with the registry behind a relay that drops the connection
    /// once half of what a clean pull fetches has passed (and everything after, for that boot);
    /// the apply must fail. Then boot with the network back: the pull must go on from the
    /// chunks the first boot kept (fetch fewer than a clean pull), apply, and the new slot boot.
    pub(super) fn network_cut(&mut self, pointer: &Path, boots: &mut Vec<Boot>) -> anyhow::Result<()> {
        let clean = self.clean_pull()?;
        let after = (clean.bytes_fetched / 2).max(1);
        let port = self.registry_port()?;
        let cut = Cut::start(port, after)?;
        self.network = Some(cut.port());
        let b = self.boot(&[pointer.to_path_buf()], None);
        self.network = Some(port);
        let b = b?;
        let (was_cut, failed, applied) = (cut.was_cut(), b.apply_failed().is_some(), b.applied().is_some());
        drop(cut);
        boots.push(b);
        if !was_cut || applied || !failed {
            bail!("network-cut: the download was {} and the apply {} (a clean pull fetches {} bytes; the cut was set at {after})", if was_cut { "cut" } else { "never cut" }, if applied { "completed" } else if failed { "failed" } else { "never ran" }, clean.bytes_fetched);
        }
        let b = self.boot(&[pointer.to_path_buf()], None)?;
        let resumed = b.applied().and_then(|a| a.pulled.clone());
        boots.push(b);
        let Some(resumed) = resumed else { return Ok(()) };
        self.extra.insert("network_cut".into(), json!({"cut_after_bytes": after, "clean_chunks_fetched": clean.chunks_fetched, "clean_bytes_fetched": clean.bytes_fetched, "resumed_chunks_fetched": resumed.chunks_fetched, "resumed_bytes_fetched": resumed.bytes_fetched}));
        if resumed.chunks_fetched >= clean.chunks_fetched {
            bail!("network-cut: the boot after the cut fetched {} chunks, a clean pull {}: nothing the first boot fetched was kept", resumed.chunks_fetched, clean.chunks_fetched);
        }
        self.boot_until_status(boots)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_names_become_repository_names() {
        assert_eq!(super::repo_name("By_Tag.2"), "by-tag-2");
        assert_eq!(super::repo_name("--x--"), "x");
        assert_eq!(super::repo_name("__"), "path");
    }
}
