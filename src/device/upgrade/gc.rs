//! Garbage collection of the external-images partition after a good boot: keep exactly the
//! image sets of the builds slot A and slot B hold (the booted build, and the other slot's build
//! named by its boot entry), drop every other set from `index.json` (replaced atomically first),
//! then delete the blobs no kept set reaches (a sealed image's artifact and sealed blob are
//! listed in the set; the layers of a sealed image without `keep-layers` are not reached). Rollback
//! never loses its images.

use crate::base::hash::Digest;
use crate::format::images::top_index_json;
use anyhow::Context;
use std::collections::BTreeSet;
use std::path::Path;
pub use crate::format::agent::GcReport;

/// Build ids the slots hold: the booted one, and each other slot's from its entry's options.
pub fn builds_in_use(esp: &Path, booted_build: &str) -> BTreeSet<String> {
    let mut keep = BTreeSet::from([booted_build.to_string()]);
    for e in crate::format::entries::list(&crate::format::entries::DirView(esp.to_path_buf())) {
        if let Some(b) = e.options.as_deref().and_then(|o| crate::format::cmdline::value(o, "slotforge.build")) {
            keep.insert(b);
        }
    }
    keep
}

pub fn gc(images: &Path, keep: &BTreeSet<String>) -> anyhow::Result<GcReport> {
    let idx_path = images.join("index.json");
    let Ok(bytes) = std::fs::read(&idx_path) else { return Ok(GcReport::default()) };
    let builds = super::builds_of(&bytes)?;
    let (kept, removed): (Vec<_>, Vec<_>) = builds.into_iter().partition(|b| keep.contains(&b.build_id));
    let mut report = GcReport { kept_builds: kept.iter().map(|b| b.build_id.clone()).collect(), removed_builds: removed.iter().map(|b| b.build_id.clone()).collect(), ..Default::default() };
    if !removed.is_empty() {
        crate::base::durable::write_durably(&idx_path, &mut &top_index_json(kept.clone())[..])?;
    }
    // Everything the kept sets reach.
    let blob = |d: &str| images.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let mut live: BTreeSet<String> = BTreeSet::new();
    for b in &kept {
        live.insert(b.index_digest.hex().to_string());
        let nested: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(b.index_digest.as_str())).with_context(|| format!("build {} index", b.build_id))?)?;
        for m in nested["manifests"].as_array().into_iter().flatten() {
            let md = m["digest"].as_str().unwrap_or("");
            live.insert(md.trim_start_matches("sha256:").to_string());
            // A sealed image without `keep-layers` keeps its manifest and config, not its layers.
            let layers = m["annotations"][crate::format::sealed::ANN_LAYERS] != crate::format::sealed::LAYERS_OMITTED;
            if let Ok(mb) = std::fs::read(blob(md)) {
                let man: serde_json::Value = serde_json::from_slice(&mb).unwrap_or_default();
                for d in std::iter::once(&man["config"]).chain(man["layers"].as_array().into_iter().flatten().filter(|_| layers)) {
                    if let Some(x) = d["digest"].as_str() {
                        live.insert(x.trim_start_matches("sha256:").to_string());
                    }
                }
            }
        }
    }
    for e in std::fs::read_dir(images.join("blobs/sha256"))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !live.contains(&name) && Digest::parse(&format!("sha256:{name}")).is_ok() {
            report.removed_bytes += e.metadata()?.len();
            std::fs::remove_file(e.path())?;
            report.removed_blobs += 1;
        }
    }
    let _ = std::fs::remove_dir_all(images.join(".partial"));
    // Blocks of lazily started images no kept set needs any more.
    for e in std::fs::read_dir(images.join(".lazy")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let hex = name.split('.').next().unwrap_or("");
        if !live.contains(hex) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(report)
}
