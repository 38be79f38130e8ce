//! `slotforge build`: the data path of docs/architecture.md, top to bottom. Resolve every image,
//! flatten the on-disk ones into the rootfs tree, write the squashfs and refuse it if over any
//! cap, stage the external images into the images partition, write the ESP, then assemble the
//! disk in a temporary file that is renamed into place last. Nothing at the output path is
//! created or touched until every check has passed.

pub mod buildcache;
pub mod bundle;
pub mod images;
pub mod installer;
pub mod lock;
pub mod manifest;
pub mod pull;
pub mod push;
pub mod rootfs;
pub mod sources;
mod assemble;
mod compose;
mod disk;

pub use compose::{compose, ComposeOptions, Composed};
use manifest::update_keys;
pub use sources::{lock, pull, SourceOptions};

use crate::format::esp::{self, BootEntry, EspFile};
use crate::compose::flatten::{apply_layer, flatten_image, LayerCtx};
use crate::base::hash::Digest;
use images::Stage;
use crate::format::layout::{self, Layout, Role, Slot};
use manifest::{LoadedManifest, Section, DEFAULT_LOADER_PATH};
use lock::LockFile;
use crate::oci::{Platform, ResolvedImage, Resolver};
use crate::base::progress::Progress;
use rootfs::{CapCheck, Contributor};
use crate::format::release::{ExternalImage, ExternalImages, Release};
use crate::format::squashfs;
use crate::format::tree::{components, Content, Kind, Meta, Node, Spill, Tree};
use crate::format::verity::{self, VerityInfo};
use crate::base::yaml::InputError;
use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

pub struct BuildOptions {
    pub compose: ComposeOptions,
    pub output: PathBuf,
    /// External images to leave out of the images partition (the device pulls them).
    pub no_prefill: Vec<String>,
    /// Give slot A's first entry a boot counter (`slot-a+N.conf`), so even the first boot
    /// must be marked good by the agent.
    pub boot_tries: Option<u32>,
    /// Also write `<output>.bmap` (bmaptool) and/or a qcow2 copy beside the output.
    pub bmap: bool,
    pub qcow2: bool,
    /// Appended to slot A's entry options (the installer's `slotforge.install`).
    pub extra_cmdline: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BuildSummary {
    pub output: PathBuf,
    pub version: String,
    pub build_id: String,
    pub layout: String,
    pub generation: u32,
    pub disk_size: u64,
    /// Bytes actually written into the sparse image (its allocated data).
    pub bytes_written: u64,
    /// Bytes of slot A's contents: the squashfs and its dm-verity hash area.
    pub rootfs_bytes: u64,
    pub squashfs_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityInfo>,
    pub caps: Vec<CapCheck>,
    pub external_images: Vec<ExternalImage>,
    /// Key ids of the update keys installed in the rootfs; empty means its devices accept
    /// unsigned bundles.
    pub update_keys: Vec<String>,
    pub images_partition_bytes: u64,
    pub contributors: Vec<Contributor>,
    /// Wall-clock seconds per phase, in order.
    pub phases: Vec<(String, f64)>,
    /// How the build cache served the build (docs/guide.md#the-build-cache).
    pub cache: buildcache::CacheUse,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bmap: Option<(PathBuf, crate::format::bmap::BmapSummary)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2: Option<PathBuf>,
}

/// Build the disk image described by `opts`, in the order of docs/architecture.md: compose
/// (resolve → flatten → rootfs squashfs → caps → verity), the images partition, the ESP, then —
/// only now, next to the output — the disk; bmap and qcow2 copies last.
pub fn build(opts: &BuildOptions) -> anyhow::Result<BuildSummary> {
    let c = compose(&opts.compose)?;
    let mut phases = Phases(c.phases.clone(), std::time::Instant::now());
    let progress = opts.compose.progress;
    let images = disk::images_partition(&c, &opts.no_prefill, progress)?;
    phases.lap("images");
    let esp = disk::esp(&c, opts.boot_tries, opts.extra_cmdline.as_deref().unwrap_or(""))?;
    phases.lap("esp");
    let written = disk::write(&c, &opts.output, &esp, images.as_deref(), progress)?;
    phases.lap("disk");
    let (bmap, qcow2) = disk::media(&opts.output, opts.bmap, opts.qcow2)?;
    Ok(BuildSummary {
        output: opts.output.clone(),
        version: c.version().into(),
        build_id: c.build_id.clone(),
        layout: c.layout.name.clone(),
        generation: c.layout.generation,
        disk_size: c.layout.disk_size,
        bytes_written: written.bytes_written,
        rootfs_bytes: c.rootfs_bytes,
        squashfs_bytes: c.squashfs_bytes,
        verity: c.verity.clone(),
        caps: c.caps.clone(),
        external_images: c.parts.external.iter().map(|(e, _)| e.clone()).collect(),
        update_keys: update_keys(&c.manifest)?.into_iter().map(|k| k.0).collect(),
        images_partition_bytes: written.images_partition_bytes,
        contributors: c.parts.contributors.clone(),
        phases: phases.0,
        cache: c.cache_use().clone(),
        bmap,
        qcow2,
    })
}

/// The build refuses its inputs for a reason the user must act on (a rootfs over the cap of a
/// layout generation it must fit): not a failure of the tool. The CLI exits 3 for it, so a
/// harness can tell "refused, as the matrix may expect" from "the build broke".
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Wall time per phase of a build (`phases` in the JSON summary), rounded to milliseconds.
pub(crate) struct Phases(pub Vec<(String, f64)>, pub std::time::Instant);

impl Phases {
    pub fn new() -> Self {
        Phases(Vec::new(), std::time::Instant::now())
    }
    /// Close the phase that began at the last lap.
    pub fn lap(&mut self, name: &str) {
        self.0.push((name.to_string(), (self.1.elapsed().as_secs_f64() * 1000.0).round() / 1000.0));
        self.1 = std::time::Instant::now();
    }
}

/// The FAT volume id, derived from the layout name like the GUIDs.
pub fn esp_volume_id(l: &Layout) -> u32 {
    let g = layout::derived_guid(&[&l.name, "esp-volume-id"]);
    u32::from_le_bytes(g.as_bytes()[..4].try_into().unwrap())
}
