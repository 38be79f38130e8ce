//! The external-images partition: ext4 whose root is one OCI image layout shared by every rootfs
//! build on the device. `index.json` has one entry per build id (`org.opencontainers.image.ref.name`)
//! pointing to a nested image index of that build's external images; blobs are stored once under
//! `blobs/sha256/`. `slotforge-images.json` beside it versions the format. ext4 is made with
//! `mke2fs -d` (no maintained Rust ext4 writer exists) and its clock-derived inode times are
//! pinned afterwards with `debugfs`, so the image is bit-reproducible. Reading it back on the host
//! goes through ext4-view. Format: docs/formats.md#external-images-partition.

use crate::base::hash::{digest_reader, Digest};
use crate::oci::image::{MT_OCI_INDEX, REF_NAME};
use crate::oci::ResolvedImage;
use crate::format::release::ExternalImage;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

pub const METADATA_FILE: &str = "slotforge-images.json";
pub const FORMAT_VERSION: u32 = 1;
pub const ANN_BUILD_ID: &str = "io.slotforge.build-id";
pub const ANN_VERSION: &str = "io.slotforge.version";
pub const ANN_REFERENCE: &str = "io.slotforge.reference";
/// ext4 block size; also the unit of the size estimate.
pub const BLOCK: u64 = 4096;

/// `slotforge-images.json`: format version and feature flags (composefs-style), so an agent
/// can tell whether it may read or write this partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub format: u32,
    /// Features a reader may ignore.
    pub compatible: Vec<String>,
    /// Features a reader may ignore but a writer must understand.
    pub ro_compatible: Vec<String>,
    /// Features anyone must understand to touch the partition.
    pub incompatible: Vec<String>,
}

impl Default for Metadata {
    fn default() -> Self {
        Self { format: FORMAT_VERSION, compatible: vec![], ro_compatible: vec![], incompatible: vec![] }
    }
}

/// One build's set of external images, as staged.
#[derive(Debug, Clone, Serialize)]
pub struct BuildSet {
    pub build_id: String,
    pub version: String,
    pub index_digest: Digest,
    pub index_size: u64,
}

pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// One image in a build's nested index.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub name: String,
    pub reference: String,
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub os: String,
    pub architecture: String,
    /// Its layers are not stored (a sealed image without `keep-layers`).
    pub layers_omitted: bool,
    /// Its sealed artifact manifest (digest, size), listed in the set right after it.
    pub sealed: Option<(Digest, u64)>,
}

impl IndexEntry {
    pub fn of(e: &ExternalImage, img: &ResolvedImage) -> Self {
        Self {
            name: e.name.clone(),
            reference: e.reference.clone(),
            media_type: img.manifest_media_type.clone(),
            digest: img.manifest_digest.clone(),
            size: img.manifest_bytes.len() as u64,
            os: img.platform.os.clone(),
            architecture: img.platform.architecture.clone(),
            layers_omitted: e.sealed.is_some() && !e.keep_layers,
            sealed: e.sealed.as_ref().and_then(|s| Some((Digest::parse(&s.artifact).ok()?, s.artifact_size))),
        }
    }
}

impl IndexEntry {
    /// The entry for an image as the rootfs pins it (`external-images.json`).
    pub fn pinned(e: &ExternalImage, manifest_size: u64) -> anyhow::Result<Self> {
        let p: crate::oci::Platform = e.platform.parse().unwrap_or_default();
        Ok(Self {
            name: e.name.clone(),
            reference: e.reference.clone(),
            media_type: e.media_type.clone(),
            digest: Digest::parse(&e.digest).map_err(|x| anyhow::anyhow!("{}: {x}", e.name))?,
            size: manifest_size,
            os: p.os,
            architecture: p.architecture,
            layers_omitted: !stores_layers(e),
            sealed: e.sealed.as_ref().map(|s| Ok::<_, anyhow::Error>((Digest::parse(&s.artifact).map_err(|x| anyhow::anyhow!("{}: {x}", e.name))?, s.artifact_size))).transpose()?,
        })
    }
}

/// Read a build's nested index back into its entries (artifact entries attached to their image).
pub fn parse_build_index(bytes: &[u8]) -> anyhow::Result<(BTreeMap<String, String>, Vec<IndexEntry>)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).context("build index")?;
    let mut entries: Vec<IndexEntry> = Vec::new();
    let mut artifacts: Vec<(String, Digest, u64)> = Vec::new();
    for m in v["manifests"].as_array().into_iter().flatten() {
        let ann = |k: &str| m["annotations"][k].as_str().map(str::to_string);
        let digest = Digest::parse(m["digest"].as_str().unwrap_or("")).map_err(|e| anyhow::anyhow!(e))?;
        let size = m["size"].as_u64().unwrap_or(0);
        if let Some(name) = ann(crate::format::sealed::ANN_SEALED_FOR) {
            artifacts.push((name, digest, size));
            continue;
        }
        entries.push(IndexEntry {
            name: ann(REF_NAME).unwrap_or_default(),
            reference: ann(ANN_REFERENCE).unwrap_or_default(),
            media_type: m["mediaType"].as_str().unwrap_or(crate::oci::image::MT_OCI_MANIFEST).to_string(),
            digest,
            size,
            os: m["platform"]["os"].as_str().unwrap_or("linux").to_string(),
            architecture: m["platform"]["architecture"].as_str().unwrap_or("amd64").to_string(),
            layers_omitted: ann(crate::format::sealed::ANN_LAYERS).as_deref() == Some(crate::format::sealed::LAYERS_OMITTED),
            sealed: None,
        });
    }
    for (name, d, size) in artifacts {
        if let Some(e) = entries.iter_mut().find(|e| e.name == name) {
            e.sealed = Some((d, size));
        }
    }
    let annotations = v["annotations"].as_object().map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()).unwrap_or_default();
    Ok((annotations, entries))
}

/// Whether the images partition stores `e`'s layers (not for a sealed image without
/// `keep-layers`: its sealed filesystem is all the device reads).
pub fn stores_layers(e: &ExternalImage) -> bool {
    e.sealed.is_none() || e.keep_layers
}

/// Every blob the images partition must hold for `e`, given its manifest's bytes: manifest,
/// config, layers (when stored), and for a sealed image its artifact manifest, the empty
/// config and the sealed blob. Digest and size each.
pub fn required_blobs(e: &ExternalImage, manifest: &[u8]) -> anyhow::Result<Vec<(Digest, u64)>> {
    let d = |s: &str| Digest::parse(s).map_err(|x| anyhow::anyhow!("{}: {x}", e.name));
    let man: serde_json::Value = serde_json::from_slice(manifest).with_context(|| format!("{}: manifest", e.name))?;
    let mut v = vec![(d(&e.digest)?, manifest.len() as u64), (d(man["config"]["digest"].as_str().unwrap_or(""))?, man["config"]["size"].as_u64().unwrap_or(0))];
    if stores_layers(e) {
        for l in man["layers"].as_array().into_iter().flatten() {
            v.push((d(l["digest"].as_str().unwrap_or(""))?, l["size"].as_u64().unwrap_or(0)));
        }
    }
    if let Some(s) = &e.sealed {
        v.push((d(&s.artifact)?, s.artifact_size));
        v.push((Digest::of_bytes(crate::format::sealed::EMPTY_JSON), crate::format::sealed::EMPTY_JSON.len() as u64));
        v.push((d(&s.digest)?, s.size));
    }
    Ok(v)
}

/// A build's nested image index: its images sorted by name, annotated with build id and version.
pub fn build_index_json(build_id: &str, version: &str, mut entries: Vec<IndexEntry>) -> Vec<u8> {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut manifests: Vec<serde_json::Value> = Vec::new();
    for e in &entries {
        let mut ann = json!({REF_NAME: e.name, ANN_REFERENCE: e.reference});
        if e.layers_omitted {
            ann[crate::format::sealed::ANN_LAYERS] = crate::format::sealed::LAYERS_OMITTED.into();
        }
        manifests.push(json!({
            "mediaType": e.media_type,
            "digest": e.digest.to_string(),
            "size": e.size,
            "platform": {"architecture": e.architecture, "os": e.os},
            "annotations": ann
        }));
        if let Some((d, size)) = &e.sealed {
            manifests.push(json!({
                "mediaType": crate::oci::image::MT_OCI_MANIFEST,
                "artifactType": crate::format::sealed::ARTIFACT_TYPE,
                "digest": d.to_string(),
                "size": size,
                "annotations": {crate::format::sealed::ANN_SEALED_FOR: e.name}
            }));
        }
    }
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_OCI_INDEX,
        "manifests": manifests,
        "annotations": {ANN_BUILD_ID: build_id, ANN_VERSION: version}
    }))
    .expect("serialisable")
}

/// The partition's `index.json`: one entry per build, sorted by build id.
pub fn top_index_json(mut builds: Vec<BuildSet>) -> Vec<u8> {
    builds.sort_by(|a, b| a.build_id.cmp(&b.build_id));
    let manifests: Vec<serde_json::Value> = builds
        .iter()
        .map(|b| {
            json!({
                "mediaType": MT_OCI_INDEX,
                "digest": b.index_digest.to_string(),
                "size": b.index_size,
                "annotations": {REF_NAME: b.build_id, ANN_VERSION: b.version}
            })
        })
        .collect();
    serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests})).expect("serialisable")
}

/// Read access to a partition's OCI layout: ext4 inside a disk image, or a directory.
pub trait LayoutFs {
    fn read(&self, path: &str) -> anyhow::Result<Vec<u8>>;
    fn open(&self, path: &str) -> anyhow::Result<Box<dyn Read + '_>>;
}

impl LayoutFs for ext4_view::Ext4 {
    fn read(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        ext4_view::Ext4::read(self, path).map_err(|e| anyhow::anyhow!("{path}: {e}"))
    }
    fn open(&self, path: &str) -> anyhow::Result<Box<dyn Read + '_>> {
        Ok(Box::new(ext4_view::Ext4::open(self, path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?))
    }
}

impl LayoutFs for Path {
    fn read(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        std::fs::read(self.join(path.trim_start_matches('/'))).with_context(|| path.to_string())
    }
    fn open(&self, path: &str) -> anyhow::Result<Box<dyn Read + '_>> {
        Ok(Box::new(std::fs::File::open(self.join(path.trim_start_matches('/'))).with_context(|| path.to_string())?))
    }
}

/// What one build id holds, read back from the partition.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub build_id: String,
    pub version: Option<String>,
    pub index_digest: String,
    pub images: Vec<ImageReport>,
    /// Bytes of this build's blobs (shared ones counted in every build that uses them).
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub name: String,
    pub reference: Option<String>,
    pub digest: String,
    pub bytes: u64,
    pub blobs: Vec<(String, u64)>,
    /// Its sealed artifact manifest, when the set lists one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    pub metadata: Metadata,
    pub builds: Vec<BuildReport>,
    /// Distinct blobs referenced, and their bytes.
    pub unique_blobs: usize,
    pub unique_bytes: u64,
}

/// The parts of OCI descriptors, indexes and manifests that slotforge reads back (shared by
/// inspect, the agent and upgrades).
#[derive(Deserialize)]
pub(crate) struct Desc {
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}
#[derive(Deserialize)]
pub(crate) struct Idx {
    pub(crate) manifests: Vec<Desc>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}
#[derive(Deserialize)]
pub(crate) struct Man {
    pub(crate) config: Desc,
    pub(crate) layers: Vec<Desc>,
}

fn blob_path(d: &str) -> anyhow::Result<String> {
    let d = Digest::parse(d).map_err(|e| anyhow::anyhow!(e))?;
    Ok(format!("/blobs/sha256/{}", d.hex()))
}

/// Read the layout's structure (not blob contents) back.
pub fn read_report(fs: &dyn LayoutFs) -> anyhow::Result<PartitionReport> {
    let metadata: Metadata = serde_json::from_slice(&fs.read(&format!("/{METADATA_FILE}"))?).context(METADATA_FILE)?;
    if metadata.format > FORMAT_VERSION || !metadata.incompatible.is_empty() {
        bail!("external-images partition has format {} with incompatible features {:?}; this slotforge understands format {FORMAT_VERSION}", metadata.format, metadata.incompatible);
    }
    let top: Idx = serde_json::from_slice(&fs.read("/index.json")?).context("index.json")?;
    let mut builds = Vec::new();
    let mut unique: BTreeMap<String, u64> = BTreeMap::new();
    for b in &top.manifests {
        let build_id = b.annotations.get(REF_NAME).cloned().unwrap_or_default();
        let idx: Idx = serde_json::from_slice(&fs.read(&blob_path(&b.digest)?)?).with_context(|| format!("build {build_id}: index {}", b.digest))?;
        unique.insert(b.digest.clone(), b.size);
        let mut images = Vec::new();
        let mut bytes = b.size;
        // Images first, then each sealed artifact joins its image's blobs.
        let (artifacts, plain): (Vec<&Desc>, Vec<&Desc>) = idx.manifests.iter().partition(|m| m.annotations.contains_key(crate::format::sealed::ANN_SEALED_FOR));
        for m in plain.into_iter().chain(artifacts) {
            let man: Man = serde_json::from_slice(&fs.read(&blob_path(&m.digest)?)?).with_context(|| format!("build {build_id}: manifest {}", m.digest))?;
            let mut blobs = vec![(m.digest.clone(), m.size), (man.config.digest.clone(), man.config.size)];
            if m.annotations.get(crate::format::sealed::ANN_LAYERS).map(String::as_str) != Some(crate::format::sealed::LAYERS_OMITTED) {
                blobs.extend(man.layers.iter().map(|l| (l.digest.clone(), l.size)));
            }
            let ib: u64 = blobs.iter().map(|b| b.1).sum();
            bytes += ib;
            for (d, s) in &blobs {
                unique.insert(d.clone(), *s);
            }
            if let Some(name) = m.annotations.get(crate::format::sealed::ANN_SEALED_FOR) {
                if let Some(i) = images.iter_mut().find(|i: &&mut ImageReport| &i.name == name) {
                    i.sealed = Some(m.digest.clone());
                    i.bytes += ib;
                    i.blobs.extend(blobs);
                    continue;
                }
            }
            images.push(ImageReport {
                name: m.annotations.get(REF_NAME).cloned().unwrap_or_default(),
                reference: m.annotations.get(ANN_REFERENCE).cloned(),
                digest: m.digest.clone(),
                bytes: ib,
                blobs,
                sealed: None,
            });
        }
        builds.push(BuildReport { build_id, version: idx.annotations.get(ANN_VERSION).cloned(), index_digest: b.digest.clone(), images, bytes });
    }
    Ok(PartitionReport { metadata, builds, unique_blobs: unique.len(), unique_bytes: unique.values().sum() })
}

/// Stream every blob the layout references and check its size and sha256.
/// Returns the problems found (empty when all blobs are intact).
pub fn verify_blobs(fs: &dyn LayoutFs, report: &PartitionReport) -> Vec<String> {
    let mut all: BTreeMap<&str, u64> = BTreeMap::new();
    for b in &report.builds {
        for i in &b.images {
            for (d, s) in &i.blobs {
                all.insert(d, *s);
            }
        }
    }
    let mut problems = Vec::new();
    for (d, size) in all {
        let res = blob_path(d).and_then(|p| fs.open(&p)).and_then(|r| Ok(digest_reader(r)?));
        match res {
            Ok((got, n)) if got.as_str() == d && n == size => {}
            Ok((got, n)) => problems.push(format!("blob {d}: content is {n} bytes hashing to {got} (expected {size} bytes)")),
            Err(e) => problems.push(format!("blob {d}: {e:#}")),
        }
    }
    problems
}
