//! The offline USB installer. `slotforge installer` builds the target disk, then a small
//! bootable image of the same appliance (its own GPT, ESP and rootfs) whose boot entry carries
//! `slotforge.install`, plus a `payload` partition holding the target image's data extents (a
//! JSON header with the target layout and a sha256 per extent, then the bytes). Booted, the
//! appliance's init runs `slotforge agent install`: it picks the first disk that is not itself,
//! fits the layout to it (`rest` grows; too small → refused, nothing written), writes the extents
//! and a fresh GPT, records the fitted layout on the target's ESP, reads everything back and
//! verifies it. No network. Guide: docs/guide.md#usb-install.

use super::{build, BuildOptions, ComposeOptions};
use crate::format::installer::{Extent, PayloadHeader, FORMAT, HEADER_ALIGN, PAYLOAD_LABEL};
use crate::format::layout::{Layout, Role, ALIGN};
use anyhow::{bail, Context};
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

/// Data extents of `f` within `[from, to)`, each with its sha256.
fn extents(f: &mut File, from: u64, to: u64) -> anyhow::Result<Vec<Extent>> {
    let ranges = crate::base::window::data_extents(f, from, to).context("SEEK_DATA")?;
    ranges.into_iter().map(|(a, b)| Ok(Extent { offset: a, len: b - a, sha256: crate::base::window::sha256_range(f, a, b - a)? })).collect()
}

/// The partitions an install writes: everything but the `rest`-sized last one, which must be last.
fn rest_start(l: &Layout) -> u64 {
    l.partitions.last().map(|p| if p.role == Role::Data { p.start } else { p.start + p.size }).unwrap_or(ALIGN)
}

pub struct InstallerOptions {
    pub compose: ComposeOptions,
    pub output: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct InstallerSummary {
    pub output: PathBuf,
    pub build_id: String,
    pub target_image_size: u64,
    pub payload_bytes: u64,
    pub installer_size: u64,
}

/// `slotforge installer`.
pub fn installer(opts: &InstallerOptions) -> anyhow::Result<InstallerSummary> {
    let work = tempfile::Builder::new().prefix("slotforge-installer-").tempdir()?;
    let target = work.path().join("target.img");
    let c = &opts.compose;
    let copy = |layout: PathBuf| ComposeOptions { manifest: c.manifest.clone(), layout, compat: c.compat.clone(), sources: c.sources.clone(), progress: c.progress };
    let t = build(&BuildOptions { compose: copy(c.layout.clone()), output: target.clone(), no_prefill: vec![], boot_tries: None, bmap: false, qcow2: false, extra_cmdline: None })?;
    let layout_yaml = std::fs::read_to_string(&c.layout)?;
    let tl = crate::format::layout::parse(&c.layout, &layout_yaml)?;
    if tl.partitions.last().map(|p| p.role) != Some(Role::Data) {
        bail!("the installer needs the layout's last partition to be a data partition it can size to the target disk");
    }
    let mut f = File::open(&target)?;
    let ex = extents(&mut f, ALIGN, rest_start(&tl))?;
    let header = PayloadHeader { format: FORMAT, layout_yaml, layout_name: tl.name.clone(), image_size: tl.disk_size, build_id: t.build_id.clone(), extents: ex };
    let hbytes = serde_json::to_vec(&header)?;
    let data: u64 = header.extents.iter().map(|e| e.len).sum();
    let payload_size = (8 + hbytes.len() as u64).div_ceil(HEADER_ALIGN) * HEADER_ALIGN + data;
    // The installer's own layout: the target's ESP and slot sizes, a small images partition,
    // and the payload.
    let esp = tl.esp();
    let a = tl.rootfs(crate::format::layout::Slot::A);
    let images = tl.by_role(Role::ExternalImages).map(|p| p.size).unwrap_or(0);
    let mib = |b: u64| b.div_ceil(ALIGN);
    let payload_mib = mib(payload_size) + 1;
    let images_mib = if images > 0 { mib(images).min(mib(t.external_images.iter().map(|e| e.size).sum::<u64>()) * 2 + 32) } else { 0 };
    let total = 1 + mib(esp.size) + 2 * mib(a.size) + images_mib + payload_mib + 1;
    let mut yaml = format!("name: {}-installer\ngeneration: 1\ndisk: {{size: {total}MiB}}\npartitions:\n", tl.name);
    yaml += &format!("  - {{name: {}, role: esp, size: {}MiB}}\n", esp.name, mib(esp.size));
    yaml += &format!("  - {{name: {}, role: rootfs, slot: a, size: {}MiB, fs_cap: {}}}\n", a.name, mib(a.size), a.fs_cap);
    // Slot b stays empty, but every cap check takes the smaller slot: same size as a.
    yaml += &format!("  - {{name: {}, role: rootfs, slot: b, size: {}MiB, fs_cap: {}}}\n", tl.rootfs(crate::format::layout::Slot::B).name, mib(a.size), a.fs_cap);
    if images_mib > 0 {
        yaml += &format!("  - {{name: {}, role: external-images, size: {images_mib}MiB}}\n", tl.by_role(Role::ExternalImages).unwrap().name);
    }
    yaml += &format!("  - {{name: {PAYLOAD_LABEL}, role: data, size: rest}}\n");
    let ilayout = work.path().join("installer.yaml");
    std::fs::write(&ilayout, yaml)?;
    build(&BuildOptions { compose: copy(ilayout.clone()), output: opts.output.clone(), no_prefill: vec![], boot_tries: None, bmap: false, qcow2: false, extra_cmdline: Some("slotforge.install".into()) })?;
    // The payload, written into the finished installer image.
    let il = crate::format::layout::load(&ilayout)?;
    let p = il.partitions.iter().find(|p| p.name == PAYLOAD_LABEL).unwrap();
    let mut out = std::fs::OpenOptions::new().write(true).open(&opts.output)?;
    out.seek(SeekFrom::Start(p.start))?;
    out.write_all(&(hbytes.len() as u64).to_le_bytes())?;
    out.write_all(&hbytes)?;
    let mut pos = p.start + (8 + hbytes.len() as u64).div_ceil(HEADER_ALIGN) * HEADER_ALIGN;
    for e in &header.extents {
        f.seek(SeekFrom::Start(e.offset))?;
        out.seek(SeekFrom::Start(pos))?;
        std::io::copy(&mut (&mut f).take(e.len), &mut out)?;
        pos += e.len;
    }
    out.sync_all()?;
    Ok(InstallerSummary { output: opts.output.clone(), build_id: t.build_id, target_image_size: tl.disk_size, payload_bytes: payload_size, installer_size: il.disk_size })
}
