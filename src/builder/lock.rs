//! `system.lock`: every image reference of a manifest pinned to the digest it resolved to, so a
//! build is the same anywhere, any day (`build --locked`), whatever tags do meanwhile. JSON,
//! sorted by reference; written by `slotforge lock` next to the manifest.

use crate::base::hash::Digest;
use crate::oci::ResolvedImage;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockFile {
    pub format: u32,
    pub platform: String,
    pub images: Vec<LockedImage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockedImage {
    /// The reference exactly as the manifest writes it.
    pub reference: String,
    /// What the reference resolved to (an index for multi-platform images).
    pub digest: Digest,
    /// The platform's image manifest inside it.
    pub manifest: Digest,
}

/// `system.yml` → `system.lock`.
pub fn path_for(manifest: &Path) -> PathBuf {
    manifest.with_extension("lock")
}

impl LockFile {
    pub fn from_resolved<'a>(platform: &str, images: impl IntoIterator<Item = &'a ResolvedImage>) -> Self {
        let mut m = BTreeMap::new();
        for i in images {
            m.insert(i.reference.clone(), LockedImage { reference: i.reference.clone(), digest: i.top_digest.clone(), manifest: i.manifest_digest.clone() });
        }
        Self { format: FORMAT, platform: platform.to_string(), images: m.into_values().collect() }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading lock file {} (create it with `slotforge lock`)", path.display()))?;
        let l: LockFile = serde_json::from_str(&text).with_context(|| format!("lock file {}", path.display()))?;
        if l.format != FORMAT {
            bail!("lock file {} has format {}; this slotforge reads format {FORMAT}", path.display(), l.format);
        }
        Ok(l)
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("lock.tmp");
        std::fs::write(&tmp, crate::base::text::to_json(self))?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    pub fn pin(&self, reference: &str) -> Option<&Digest> {
        self.images.iter().find(|i| i.reference == reference).map(|i| &i.digest)
    }

    /// Refuse when the manifest's references and the lock's differ, or the platform does.
    pub fn check(&self, path: &Path, references: &[String], platform: &str) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if self.platform != platform {
            problems.push(format!("the lock is for {} but the build is for {platform}", self.platform));
        }
        for r in references {
            if self.pin(r).is_none() {
                problems.push(format!("{r} is in the manifest but not in the lock"));
            }
        }
        for i in &self.images {
            if !references.contains(&i.reference) {
                problems.push(format!("{} is in the lock but no longer in the manifest", i.reference));
            }
        }
        if !problems.is_empty() {
            bail!("the manifest and {} disagree; run `slotforge lock` to update it:\n  {}", path.display(), problems.join("\n  "));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_reports_both_directions() {
        let d = Digest::of_bytes(b"x");
        let l = LockFile { format: 1, platform: "linux/amd64".into(), images: vec![LockedImage { reference: "a".into(), digest: d.clone(), manifest: d }] };
        l.check(Path::new("s.lock"), &["a".into()], "linux/amd64").unwrap();
        let e = l.check(Path::new("s.lock"), &["b".into()], "linux/arm64").unwrap_err().to_string();
        assert!(e.contains("b is in the manifest but not in the lock"), "{e}");
        assert!(e.contains("a is in the lock but no longer"), "{e}");
        assert!(e.contains("linux/arm64"), "{e}");
    }
}
