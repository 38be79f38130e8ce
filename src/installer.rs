//! The offline USB installer. `slotforge installer` builds the target disk, then a small
//! bootable image of the same appliance (its own GPT, ESP and rootfs) whose boot entry carries
//! `slotforge.install`, plus a `payload` partition holding the target image's data extents (a
//! JSON header with the target layout and a sha256 per extent, then the bytes). Booted, the
//! appliance's init runs `slotforge agent install`: it picks the first disk that is not itself,
//! fits the layout to it (`rest` grows; too small → refused, nothing written), writes the extents
//! and a fresh GPT, records the fitted layout on the target's ESP, reads everything back and
//! verifies it. No network. Guide: docs/guide.md#usb-install.

use crate::build::{build, BuildOptions, ComposeOptions};
use crate::hash::{digest_reader, Digest};
use crate::layout::{Layout, Role, ALIGN};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const PAYLOAD_LABEL: &str = "payload";
pub const FORMAT: u32 = 1;
/// The header is preceded by its length (8 bytes, little-endian) and padded to this.
const HEADER_ALIGN: u64 = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PayloadHeader {
    pub format: u32,
    /// The layout file's text: the device re-plans it for the target disk's size.
    pub layout_yaml: String,
    pub layout_name: String,
    pub image_size: u64,
    pub build_id: String,
    /// Data extents of the target image inside its partitions (not the GPT areas).
    pub extents: Vec<Extent>,
}

/// Data extents of `f` within `[from, to)`, each with its sha256.
fn extents(f: &mut File, from: u64, to: u64) -> anyhow::Result<Vec<Extent>> {
    let ranges = crate::window::data_extents(f, from, to).context("SEEK_DATA")?;
    ranges.into_iter().map(|(a, b)| Ok(Extent { offset: a, len: b - a, sha256: crate::window::sha256_range(f, a, b - a)? })).collect()
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
    let tl = crate::layout::parse(&c.layout, &layout_yaml)?;
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
    let a = tl.rootfs(crate::layout::Slot::A);
    let images = tl.by_role(Role::ExternalImages).map(|p| p.size).unwrap_or(0);
    let mib = |b: u64| b.div_ceil(ALIGN);
    let payload_mib = mib(payload_size) + 1;
    let images_mib = if images > 0 { mib(images).min(mib(t.external_images.iter().map(|e| e.size).sum::<u64>()) * 2 + 32) } else { 0 };
    let total = 1 + mib(esp.size) + 2 * mib(a.size) + images_mib + payload_mib + 1;
    let mut yaml = format!("name: {}-installer\ngeneration: 1\ndisk: {{size: {total}MiB}}\npartitions:\n", tl.name);
    yaml += &format!("  - {{name: {}, role: esp, size: {}MiB}}\n", esp.name, mib(esp.size));
    yaml += &format!("  - {{name: {}, role: rootfs, slot: a, size: {}MiB, fs_cap: {}}}\n", a.name, mib(a.size), a.fs_cap);
    // Slot b stays empty, but every cap check takes the smaller slot: same size as a.
    yaml += &format!("  - {{name: {}, role: rootfs, slot: b, size: {}MiB, fs_cap: {}}}\n", tl.rootfs(crate::layout::Slot::B).name, mib(a.size), a.fs_cap);
    if images_mib > 0 {
        yaml += &format!("  - {{name: {}, role: external-images, size: {images_mib}MiB}}\n", tl.by_role(Role::ExternalImages).unwrap().name);
    }
    yaml += &format!("  - {{name: {PAYLOAD_LABEL}, role: data, size: rest}}\n");
    let ilayout = work.path().join("installer.yaml");
    std::fs::write(&ilayout, yaml)?;
    build(&BuildOptions { compose: copy(ilayout.clone()), output: opts.output.clone(), no_prefill: vec![], boot_tries: None, bmap: false, qcow2: false, extra_cmdline: Some("slotforge.install".into()) })?;
    // The payload, written into the finished installer image.
    let il = crate::layout::load(&ilayout)?;
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

/// Read the payload header from the payload partition device.
pub fn read_header(dev: &mut File) -> anyhow::Result<(PayloadHeader, u64)> {
    let mut len = [0u8; 8];
    dev.seek(SeekFrom::Start(0))?;
    dev.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n == 0 || n > 64 << 20 {
        bail!("no installer payload here");
    }
    let mut h = vec![0u8; n as usize];
    dev.read_exact(&mut h)?;
    let header: PayloadHeader = serde_json::from_slice(&h).context("installer payload header")?;
    if header.format != FORMAT {
        bail!("installer payload format {} is not supported", header.format);
    }
    Ok((header, (8 + n).div_ceil(HEADER_ALIGN) * HEADER_ALIGN))
}

/// Fit the payload's layout to a target of `size` bytes; the partitions written must not move.
pub fn fit(header: &PayloadHeader, size: u64) -> anyhow::Result<Layout> {
    let orig = crate::layout::parse(Path::new("payload layout"), &header.layout_yaml)?;
    let fitted = crate::layout::parse_for_disk(Path::new("payload layout"), &header.layout_yaml, size)
        .map_err(|e| anyhow::anyhow!("the target disk ({size} bytes) is too small for layout {}: {}", header.layout_name, e.message))?;
    for (a, b) in orig.partitions.iter().zip(&fitted.partitions).take(orig.partitions.len() - 1) {
        if a.start != b.start || a.size != b.size {
            bail!("layout {} cannot be fitted without moving partition {}", header.layout_name, a.name);
        }
    }
    Ok(fitted)
}

/// Copy the extents from the payload to `target`, GPT for `layout`, read back and verify.
pub fn install(payload: &mut File, data_start: u64, header: &PayloadHeader, target: &Path, layout: &Layout, progress: &dyn Fn(u64, u64)) -> anyhow::Result<u64> {
    let total: u64 = header.extents.iter().map(|e| e.len).sum();
    let mut t = std::fs::OpenOptions::new().read(true).write(true).open(target).with_context(|| format!("opening {}", target.display()))?;
    let mut pos = data_start;
    let mut done = 0;
    for e in &header.extents {
        payload.seek(SeekFrom::Start(pos))?;
        t.seek(SeekFrom::Start(e.offset))?;
        std::io::copy(&mut (&mut *payload).take(e.len), &mut t)?;
        pos += e.len;
        done += e.len;
        progress(done, total);
    }
    crate::disk::write_gpt(&mut t, layout)?;
    t.sync_all()?;
    // The fitted layout goes on the target's ESP, so inspect/verify/agent see the real disk.
    {
        use crate::upgrade::Target;
        let mut ft = crate::upgrade::file::FileTarget::open_as(target, Some(layout.clone()))?;
        ft.esp_write(crate::layout::RECORD_PATH, &mut std::io::Cursor::new(crate::rootfs::to_json(layout)))?;
        ft.finish()?;
    }
    // Read back every extent written into a partition the fix-up did not touch.
    let esp = layout.esp();
    let mut t = File::open(target)?;
    for e in &header.extents {
        if e.offset >= esp.start && e.offset < esp.start + esp.size {
            continue; // the ESP was changed on purpose (layout record); fsck-level check is verify's
        }
        t.seek(SeekFrom::Start(e.offset))?;
        let (d, _) = digest_reader((&mut t).take(e.len))?;
        if d != Digest::parse(&format!("sha256:{}", e.sha256)).map_err(|x| anyhow::anyhow!(x))? {
            bail!("read-back of {} at {} does not match: the target disk is faulty", target.display(), e.offset);
        }
    }
    Ok(total)
}
