//! The device's writes to its live external-images partition: adding a pulled or rebuilt image
//! to a build's set, crash-safely. The partition's format (indexes, metadata) is
//! `format::images`.

use crate::format::images::{build_index_json, parse_build_index, top_index_json, BuildSet, Idx, IndexEntry, ANN_VERSION, OCI_LAYOUT};
use crate::base::hash::Digest;
use crate::oci::image::REF_NAME;
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::Path;

/// On a live partition (the agent): make `entry` part of `build_id`'s set, creating the build's
/// index if needed. The new nested index is written first, `index.json` replaced last (write,
/// fsync, rename), so a power cut leaves either the old or the new set, never a broken one.
pub fn add_to_build(root: &Path, build_id: &str, version: &str, entry: IndexEntry) -> anyhow::Result<()> {
    let store = crate::base::cache::Cache::open_layout(root)?;
    let idx_path = root.join("index.json");
    let top: Idx = match std::fs::read(&idx_path) {
        Ok(b) => serde_json::from_slice(&b).context("index.json")?,
        Err(_) => Idx { manifests: vec![], annotations: BTreeMap::new() },
    };
    let mut builds = Vec::new();
    let mut entries = Vec::new();
    let mut version = version.to_string();
    for b in &top.manifests {
        let id = b.annotations.get(REF_NAME).cloned().unwrap_or_default();
        let d = Digest::parse(&b.digest).map_err(|e| anyhow::anyhow!(e))?;
        if id == build_id {
            let (ann, nested) = parse_build_index(&std::fs::read(store.blob_path(&d))?).with_context(|| format!("build {id} index"))?;
            version = ann.get(ANN_VERSION).cloned().unwrap_or(version);
            entries.extend(nested);
        } else {
            builds.push(BuildSet { build_id: id, version: b.annotations.get(ANN_VERSION).cloned().unwrap_or_default(), index_digest: d, index_size: b.size });
        }
    }
    entries.retain(|e| e.name != entry.name);
    entries.push(entry);
    let bytes = build_index_json(build_id, &version, entries);
    let index_digest = store.put_bytes(&bytes)?;
    builds.push(BuildSet { build_id: build_id.into(), version, index_digest, index_size: bytes.len() as u64 });
    if !root.join("oci-layout").exists() {
        std::fs::write(root.join("oci-layout"), OCI_LAYOUT)?;
    }
    let tmp = root.join(".index.json.partial");
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &top_index_json(builds))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &idx_path)?;
    crate::base::durable::sync_fs(root)?;
    Ok(())
}
