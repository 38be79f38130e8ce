//! `slotforge build`: the data path of docs/architecture.md, top to bottom. Resolve every image,
//! flatten the on-disk ones into the rootfs tree, write the squashfs and refuse it if over any
//! cap, stage the external images into the images partition, write the ESP, then assemble the
//! disk in a temporary file that is renamed into place last. Nothing at the output path is
//! created or touched until every check has passed.

pub mod bundle;
pub mod images;
pub mod installer;
pub mod lock;
pub mod manifest;
pub mod pull;
pub mod rootfs;
pub mod sources;
mod assemble;
mod compose;

pub use compose::{compose, ComposeOptions, Composed};
use compose::update_keys;
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bmap: Option<(PathBuf, crate::format::bmap::BmapSummary)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2: Option<PathBuf>,
}

/// Build the disk image described by `opts`.
pub fn build(opts: &BuildOptions) -> anyhow::Result<BuildSummary> {
    let c = compose(&opts.compose)?;
    let mut phases = c.phases.clone();
    let mut clock = std::time::Instant::now();
    let mut lap = |name: &str| {
        phases.push((name.to_string(), (clock.elapsed().as_secs_f64() * 1000.0).round() / 1000.0));
        clock = std::time::Instant::now();
    };
    let (epoch, layout, build_id, work) = (c.epoch, &c.layout, &c.build_id, &c.work);
    let m = &c.manifest;
    let r = &c.resolved;
    let parts = &c.parts;
    let (sqfs, rootfs_bytes, caps) = (&c.rootfs_image, c.rootfs_bytes, c.caps.clone());
    let images_part = layout.by_role(Role::ExternalImages);

    // External-images partition.
    let mut images_file = None;
    if let Some(p) = images_part {
        let mut stage = Stage::new()?;
        let ext_bytes: u64 = parts.external.iter().map(|(e, _)| e.size).sum();
        let pb = opts.compose.progress.bar("images", ext_bytes, true);
        let mut pairs = Vec::new();
        for name in &opts.no_prefill {
            if !parts.external.iter().any(|(e, _)| &e.name == name) {
                bail!("--no-prefill {name}: the manifest has no external image of that name");
            }
        }
        for (e, idx) in parts.external.iter().filter(|(e, _)| !opts.no_prefill.contains(&e.name)) {
            let img = &r.containers[*idx].2;
            stage.add_external(e, img, parts.sealed.get(&e.name), &mut |n| pb.inc(n))?;
            pairs.push((e.clone(), img));
        }
        pb.finish_and_clear();
        stage.add_build(&build_id, m.version(), &pairs)?;
        stage.finish(epoch)?;
        let f = work.path().join("images.ext4");
        images::make_ext4(&stage, &f, p.size, &layout::derived_guid(&[&layout.name, "images-fs"]), "slotforge-images", epoch)?;
        images_file = Some(f);
    }
    lap("images");

    // ESP.
    let esp_part = layout.esp();
    let esp_file = work.path().join("esp.fat");
    let slot = Slot::A;
    let extra = opts.extra_cmdline.as_deref().unwrap_or("");
    let mut files = vec![
        EspFile { path: esp::LOADER_PATH.into(), data: c.loader_for_esp()?.open()? },
        EspFile { path: esp::LOADER_CONF.into(), data: Box::new(esp::LOADER_CONF_TEXT.as_bytes()) },
        EspFile { path: layout::RECORD_PATH.into(), data: Box::new(std::io::Cursor::new(crate::base::text::to_json(&layout))) },
    ];
    if c.uki() {
        // Type #2: one signed image holds kernel, initrd and the command line with its root hash.
        let uki = work.path().join("slot-a.efi");
        c.slot_uki(layout, slot, extra, &uki)?;
        files.push(EspFile { path: crate::format::entries::uki_path(slot, 1, opts.boot_tries), data: Box::new(std::fs::File::open(&uki)?) });
    } else {
        let entry = BootEntry {
            slot,
            title: format!("{} (slot {})", m.version(), slot.name()),
            version: 1,
            linux: format!("/{}/vmlinuz", slot.name()),
            initrd: parts.kernel.initrd.as_ref().map(|_| format!("/{}/initrd.img", slot.name())),
            options: c.slot_options(layout, slot, extra)?,
            tries: opts.boot_tries,
        };
        files.push(EspFile { path: entry.path(), data: Box::new(std::io::Cursor::new(entry.text().into_bytes())) });
        files.push(EspFile { path: entry.linux.clone(), data: parts.kernel.kernel.0.open()? });
        if let (Some(p), Some((c, _))) = (&entry.initrd, &parts.kernel.initrd) {
            files.push(EspFile { path: p.clone(), data: c.open()? });
        }
    }
    {
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&esp_file)?;
        f.set_len(esp_part.size)?;
        esp::write(f, esp_volume_id(&layout), epoch, files)?;
    }
    lap("esp");

    // The disk: only now is anything created next to the output.
    let mut disk = crate::format::disk::DiskWriter::create(&opts.output, &layout)?;
    let pb = opts.compose.progress.bar("disk", 3, false);
    disk.put(&mut std::fs::File::open(&esp_file)?, esp_part.start)?;
    pb.inc(1);
    disk.put(&mut std::fs::File::open(&sqfs)?, layout.rootfs(slot).start)?;
    pb.inc(1);
    let mut images_partition_bytes = 0;
    if let (Some(f), Some(p)) = (&images_file, images_part) {
        images_partition_bytes = disk.put(&mut std::fs::File::open(f)?, p.start)?;
    }
    pb.inc(1);
    let bytes_written = disk.bytes_written;
    disk.finish(&layout)?;
    pb.finish_and_clear();
    lap("disk");
    let mut bmap = None;
    if opts.bmap {
        let p = PathBuf::from(format!("{}.bmap", opts.output.display()));
        bmap = Some((p.clone(), crate::format::bmap::write_bmap(&opts.output, &p)?));
    }
    let mut qcow2 = None;
    if opts.qcow2 {
        let p = opts.output.with_extension("qcow2");
        crate::format::bmap::write_qcow2(&opts.output, &p)?;
        qcow2 = Some(p);
    }

    Ok(BuildSummary {
        output: opts.output.clone(),
        version: m.version().into(),
        build_id: build_id.clone(),
        layout: layout.name.clone(),
        generation: layout.generation,
        disk_size: layout.disk_size,
        bytes_written,
        rootfs_bytes,
        squashfs_bytes: c.squashfs_bytes,
        verity: c.verity.clone(),
        caps,
        external_images: parts.external.iter().map(|(e, _)| e.clone()).collect(),
        update_keys: update_keys(m)?.into_iter().map(|k| k.0).collect(),
        images_partition_bytes,
        contributors: parts.contributors.clone(),
        phases,
        bmap,
        qcow2,
    })
}

/// The FAT volume id, derived from the layout name like the GUIDs.
pub fn esp_volume_id(l: &Layout) -> u32 {
    let g = layout::derived_guid(&[&l.name, "esp-volume-id"]);
    u32::from_le_bytes(g.as_bytes()[..4].try_into().unwrap())
}
