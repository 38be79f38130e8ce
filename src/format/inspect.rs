//! `inspect` and `verify`: everything read back from the disk image itself — the GPT, each
//! slot's squashfs and its metadata, the ESP and its boot entries, and every build in the
//! external-images partition — and the checks that say whether the disk is sound.

use crate::format::layout::RECORD_PATH as LAYOUT_RECORD;
use crate::format::disk::{read_gpt, GptReport};
use crate::format::esp::{self, EspReport};
use crate::format::images::{self, PartitionReport};
use crate::format::layout::{types, Layout};
use crate::format::release::{ExternalImages, Release, EXTERNAL_PATH, RELEASE_PATH};
use crate::format::squashfs::{self, Superblock};
use crate::format::verity;
use crate::base::window::Window;
use anyhow::Context;
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct SlotReport {
    pub slot: String,
    pub partition: String,
    pub partition_bytes: u64,
    /// `empty` (no squashfs) or `squashfs`.
    pub state: String,
    pub superblock: Option<Superblock>,
    pub rootfs_bytes: Option<u64>,
    pub cap: Option<u64>,
    pub slack: Option<i64>,
    pub release: Option<Release>,
    pub external_images: Option<ExternalImages>,
    /// The slot's dm-verity hash area, if it has one.
    pub verity: Option<SlotVerity>,
    pub error: Option<String>,
}

/// What `inspect` reads of a slot's dm-verity: the superblock after the squashfs and the root
/// hash its boot entry carries.
#[derive(Debug, Serialize)]
pub struct SlotVerity {
    pub hash_offset: u64,
    pub data_blocks: u64,
    pub salt: String,
    pub uuid: String,
    pub tree_bytes: u64,
    /// From the slot's boot entry (`roothash=`); `None` when no entry names one.
    pub root_hash: Option<String>,
    /// The entry's `hash-offset=`, which must equal `hash_offset`.
    pub entry_hash_offset: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub gpt: GptReport,
    pub layout: Option<Layout>,
    pub slots: Vec<SlotReport>,
    pub esp: Option<EspReport>,
    pub images: Option<PartitionReport>,
    pub errors: Vec<String>,
}

fn find<'a>(g: &'a GptReport, ty: &str) -> impl Iterator<Item = &'a crate::format::disk::GptEntry> {
    let ty = ty.to_string();
    g.partitions.iter().filter(move |p| p.type_guid == ty)
}

fn read_slot(disk: &mut File, p: &crate::format::disk::GptEntry, layout: Option<&Layout>, esp: Option<&EspReport>) -> SlotReport {
    let lp = layout.and_then(|l| l.partitions.iter().find(|q| q.name == p.name));
    let mut rep = SlotReport {
        slot: lp.and_then(|q| q.slot).map(|s| s.name().to_string()).unwrap_or_else(|| p.name.clone()),
        partition: p.name.clone(),
        partition_bytes: p.size,
        state: "empty".into(),
        superblock: None,
        rootfs_bytes: None,
        cap: lp.map(|q| q.fs_cap),
        slack: None,
        release: None,
        external_images: None,
        verity: None,
        error: None,
    };
    let res = (|| -> anyhow::Result<()> {
        let Some((sb, tmp)) = squashfs::extract(disk, p.start, p.size)? else { return Ok(()) };
        rep.state = "squashfs".into();
        let data_end = sb.bytes_used.div_ceil(verity::BLOCK) * verity::BLOCK;
        rep.rootfs_bytes = Some(data_end);
        rep.superblock = Some(sb.clone());
        // The entry of this slot (by name) carries the root hash.
        let entry = esp.and_then(|e| e.entries.iter().find(|en| en.slot.as_deref() == Some(rep.slot.as_str())));
        let from_entry = entry.and_then(|e| e.options.as_deref()).and_then(crate::format::cmdline::verity_of);
        if data_end + verity::SUPERBLOCK_LEN as u64 <= p.size {
            disk.seek(SeekFrom::Start(p.start + data_end))?;
            let mut b = [0u8; verity::SUPERBLOCK_LEN];
            disk.read_exact(&mut b)?;
            match verity::parse_superblock(&b, data_end) {
                Ok(vp) => {
                    let tree_bytes = verity::hash_area_bytes(vp.data_blocks);
                    rep.rootfs_bytes = Some(data_end + tree_bytes);
                    rep.verity = Some(SlotVerity {
                        hash_offset: data_end,
                        data_blocks: vp.data_blocks,
                        salt: crate::base::hash::hex(&vp.salt),
                        uuid: uuid::Uuid::from_bytes(vp.uuid).to_string(),
                        tree_bytes,
                        root_hash: from_entry.as_ref().map(|v| v.0.clone()),
                        entry_hash_offset: from_entry.as_ref().map(|v| v.1),
                    });
                }
                Err(verity::VerityError::NoSuperblock(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        rep.slack = rep.cap.map(|c| c as i64 - rep.rootfs_bytes.unwrap() as i64);
        let rel = squashfs::read_file(tmp.path(), RELEASE_PATH)?.context("no /etc/slotforge/release.json: not built by slotforge")?;
        rep.release = Some(serde_json::from_slice(&rel).context(RELEASE_PATH)?);
        if let Some(ext) = squashfs::read_file(tmp.path(), EXTERNAL_PATH)? {
            rep.external_images = Some(serde_json::from_slice(&ext).context(EXTERNAL_PATH)?);
        }
        Ok(())
    })();
    if let Err(e) = res {
        rep.error = Some(format!("{e:#}"));
    }
    rep
}

/// Read everything back from `path`.
pub fn inspect(path: &Path) -> anyhow::Result<InspectReport> {
    inspect_with(path, true)
}

/// [`inspect`]; `check_fat: false` reads the ESP as a firmware would, without refusing a volume
/// whose structure a power cut left inconsistent (only for disks of known origin: crash states).
pub fn inspect_with(path: &Path, check_fat: bool) -> anyhow::Result<InspectReport> {
    let mut disk = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let gpt = read_gpt(&mut disk)?;
    let mut errors = Vec::new();
    let mut esp_report = None;
    let mut layout = None;
    if let Some(p) = find(&gpt, types::ESP).next() {
        let w = Window::new(File::open(path)?, p.start, p.size);
        match if check_fat { esp::read(ReadOnly(w)) } else { esp::read_unchecked(ReadOnly(w)) } {
            Ok(r) => esp_report = Some(r),
            Err(e) => errors.push(format!("ESP {}: {e:#}", p.name)),
        }
        layout = read_layout_record(path, p.start, p.size, check_fat).unwrap_or_else(|e| {
            errors.push(format!("ESP {}: {LAYOUT_RECORD}: {e:#}", p.name));
            None
        });
    } else {
        errors.push("no EFI system partition".into());
    }
    let roots: Vec<_> = find(&gpt, types::ROOT_X86_64).chain(find(&gpt, types::USR_X86_64)).cloned().collect();
    let slots = roots.iter().map(|p| read_slot(&mut disk, p, layout.as_ref(), esp_report.as_ref())).collect();
    let mut images = None;
    if let Some(p) = images_partition(&gpt, layout.as_ref()) {
        match open_ext4(path, p.start, p.size).and_then(|fs| images::read_report(&fs)) {
            Ok(r) => images = Some(r),
            Err(e) => errors.push(format!("external-images partition {}: {e:#}", p.name)),
        }
    }
    Ok(InspectReport { gpt, layout, slots, esp: esp_report, images, errors })
}

/// The sha256 of each of `files` (paths on the ESP) the disk's ESP holds; absent ones skipped.
pub fn esp_file_digests(path: &Path, rep: &InspectReport, files: &[&str]) -> anyhow::Result<Vec<crate::base::hash::Digest>> {
    let Some(p) = find(&rep.gpt, types::ESP).next() else { return Ok(vec![]) };
    let fs = fatfs::FileSystem::new(ReadOnly(Window::new(File::open(path)?, p.start, p.size)), fatfs::FsOptions::new().update_accessed_date(false))?;
    let mut out = Vec::new();
    for f in files {
        if let Ok(file) = fs.root_dir().open_file(f) {
            out.push(crate::base::hash::digest_reader(file)?.0);
        }
    }
    Ok(out)
}

/// The external-images partition of an inspected disk, opened read-only (None if it has none).
pub fn open_images(path: &Path, rep: &InspectReport) -> anyhow::Result<Option<ext4_view::Ext4>> {
    match images_partition(&rep.gpt, rep.layout.as_ref()) {
        Some(p) => open_ext4(path, p.start, p.size).map(Some),
        None => Ok(None),
    }
}

fn images_partition<'a>(gpt: &'a GptReport, layout: Option<&Layout>) -> Option<&'a crate::format::disk::GptEntry> {
    let name = layout?.partitions.iter().find(|p| p.role == crate::format::layout::Role::ExternalImages)?.name.clone();
    gpt.partitions.iter().find(|p| p.name == name)
}

fn open_ext4(path: &Path, start: u64, size: u64) -> anyhow::Result<ext4_view::Ext4> {
    let w = Window::new(File::open(path)?, start, size);
    ext4_view::Ext4::load(Box::new(w)).map_err(|e| anyhow::anyhow!("not a readable ext4 file system: {e}"))
}

fn read_layout_record(path: &Path, start: u64, size: u64, check_fat: bool) -> anyhow::Result<Option<Layout>> {
    if check_fat {
        crate::format::fat::check_volume(&mut Window::new(File::open(path)?, start, size), size)?;
    }
    let fs = fatfs::FileSystem::new(ReadOnly(Window::new(File::open(path)?, start, size)), fatfs::FsOptions::new().update_accessed_date(false))?;
    let mut f = match fs.root_dir().open_file(LAYOUT_RECORD) {
        Ok(f) => f,
        Err(_) => return Ok(None),
    };
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok(Some(serde_json::from_str(&s)?))
}

/// A window that refuses writes, so reading a FAT volume can never change the image.
pub struct ReadOnly<F>(pub Window<F>);
impl<F: Read + Seek> Read for ReadOnly<F> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}
impl<F: Seek> Seek for ReadOnly<F> {
    fn seek(&mut self, p: SeekFrom) -> std::io::Result<u64> {
        self.0.seek(p)
    }
}
impl<F> std::io::Write for ReadOnly<F> {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "read-only"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub checks: Vec<Check>,
}

/// Every check `verify` makes; `ok` only if all pass.
pub fn verify(path: &Path) -> anyhow::Result<VerifyReport> {
    let mut checks = Vec::new();
    let rep = match inspect(path) {
        Ok(r) => r,
        Err(e) => {
            checks.push(Check { name: "gpt".into(), ok: false, detail: format!("{e:#}") });
            return Ok(VerifyReport { ok: false, checks });
        }
    };
    checks.extend(disk_checks(&rep));
    for s in &rep.slots {
        checks.extend(slot_checks(path, &rep, s)?);
    }
    let booted_any = rep.slots.iter().any(|s| s.error.is_none() && s.state != "empty");
    checks.push(Check { name: "rootfs".into(), ok: booted_any, detail: if booted_any { "at least one slot holds a rootfs".into() } else { "no slot holds a rootfs".into() } });
    checks.extend(esp_check(&rep));
    checks.extend(blobs_check(path, &rep)?);
    let ok = checks.iter().all(|c| c.ok);
    Ok(VerifyReport { ok, checks })
}

/// What must hold for the disk to boot `slot`: the GPT and layout, the slot's rootfs, its
/// dm-verity tree under its entry's root hash, its build's external images (sealed trees
/// recomputed), the ESP and the images partition's blobs — the other slot may be anything (the
/// crash-state checker asks this of the slot systemd-boot would start).
pub fn verify_slot(path: &Path, rep: &InspectReport, slot: &str) -> anyhow::Result<VerifyReport> {
    let mut checks = disk_checks(rep);
    match rep.slots.iter().find(|s| s.slot == slot) {
        Some(s) => {
            checks.extend(slot_checks(path, rep, s)?);
            if s.state == "empty" {
                checks.push(Check { name: format!("slot {slot}"), ok: false, detail: "holds no rootfs".into() });
            }
        }
        None => checks.push(Check { name: format!("slot {slot}"), ok: false, detail: "no such slot".into() }),
    }
    checks.extend(esp_check(rep));
    checks.extend(blobs_check(path, rep)?);
    let ok = checks.iter().all(|c| c.ok);
    Ok(VerifyReport { ok, checks })
}

fn disk_checks(rep: &InspectReport) -> Vec<Check> {
    let mut checks = vec![Check { name: "gpt".into(), ok: true, detail: format!("{} partitions, primary and backup headers and entry CRCs valid", rep.gpt.partitions.len()) }];
    // Read errors of the ESP and the images partition (a slot's own error is its check's).
    for e in &rep.errors {
        checks.push(Check { name: "read".into(), ok: false, detail: e.clone() });
    }
    if let Some(l) = &rep.layout {
        let same = l.partitions.len() == rep.gpt.partitions.len() && l.partitions.iter().zip(&rep.gpt.partitions).all(|(a, b)| a.name == b.name && a.start == b.start && a.size == b.size);
        checks.push(Check { name: "layout".into(), ok: same, detail: format!("GPT {} the recorded layout {} generation {}", if same { "matches" } else { "differs from" }, l.name, l.generation) });
    }
    checks
}

fn esp_check(rep: &InspectReport) -> Vec<Check> {
    vec![match &rep.esp {
        Some(e) => {
            let ok = e.loader_bytes.is_some_and(|b| b > 0) && e.missing.is_empty() && !e.entries.is_empty() && e.fat_type == "Fat32";
            Check { name: "esp".into(), ok, detail: format!("{}, loader {} bytes, {} entries{}", e.fat_type, e.loader_bytes.unwrap_or(0), e.entries.len(), if e.missing.is_empty() { String::new() } else { format!(", missing: {}", e.missing.join(", ")) }) }
        }
        None => Check { name: "esp".into(), ok: false, detail: "unreadable".into() },
    }]
}

fn blobs_check(path: &Path, rep: &InspectReport) -> anyhow::Result<Vec<Check>> {
    let Some(img) = &rep.images else { return Ok(vec![]) };
    let p = images_partition(&rep.gpt, rep.layout.as_ref()).unwrap();
    let fs = open_ext4(path, p.start, p.size)?;
    let problems = images::verify_blobs(&fs, img);
    Ok(vec![Check { name: "images-blobs".into(), ok: problems.is_empty(), detail: if problems.is_empty() { format!("{} blobs, {} bytes, all digests match", img.unique_blobs, img.unique_bytes) } else { problems.join("; ") } }])
}

/// One slot's checks: its rootfs, its dm-verity tree, its build's external images.
fn slot_checks(path: &Path, rep: &InspectReport, s: &SlotReport) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| checks.push(Check { name: name.into(), ok, detail });
    let name = format!("slot {}", s.slot);
    match (&s.error, s.state.as_str()) {
        (Some(e), _) => check(&name, false, e.clone()),
        (None, "empty") => check(&name, true, "empty".into()),
        (None, _) => {
            let fits = s.slack.is_none_or(|x| x >= 0);
            let rel = s.release.as_ref().unwrap();
            check(&name, fits, format!("rootfs {} bytes{}, build {} version {}{}", s.rootfs_bytes.unwrap_or(0), if s.verity.is_some() { " (squashfs + dm-verity tree)" } else { "" }, rel.build_id, rel.version, match s.slack {
                Some(x) => format!(", slack {x} bytes"),
                None => String::new(),
            }));
        }
    }
    if let Some(v) = &s.verity {
        let name = format!("slot {} verity", s.slot);
        let p = rep.gpt.partitions.iter().find(|g| g.name == s.partition).unwrap();
        let mut w = Window::new(File::open(path)?, p.start, p.size);
        let res = match v.entry_hash_offset {
            Some(off) if off != v.hash_offset => Err(anyhow::anyhow!("the boot entry says hash-offset={off}, the tree is at {}", v.hash_offset)),
            _ => verity::check(&mut w, v.hash_offset, v.root_hash.as_deref()),
        };
        match res {
            Ok(info) => check(&name, true, match &v.root_hash {
                Some(_) => format!("tree of {} blocks matches the data and the entry's root hash {}", v.data_blocks, info.root_hash),
                None => format!("tree of {} blocks matches the data (root hash {}; no boot entry names it)", v.data_blocks, info.root_hash),
            }),
            Err(e) => check(&name, false, format!("{e:#}")),
        }
    } else if s.state == "squashfs" {
        let entry = rep.esp.as_ref().and_then(|e| e.entries.iter().find(|en| en.slot.as_deref() == Some(s.slot.as_str())));
        if entry.and_then(|e| e.options.as_deref()).and_then(crate::format::cmdline::verity_of).is_some() {
            check(&format!("slot {} verity", s.slot), false, "the boot entry names a root hash but the slot has no verity tree".into());
        }
    }
    let Some(ext) = &s.external_images else { return Ok(checks) };
    let name = format!("slot {} external images", s.slot);
    if ext.images.is_empty() {
        check(&name, true, "none needed".into());
        return Ok(checks);
    }
    let Some(img) = &rep.images else {
        check(&name, false, "the disk has no readable external-images partition".into());
        return Ok(checks);
    };
    let Some(b) = img.builds.iter().find(|b| b.build_id == ext.build_id) else {
        check(&name, false, format!("build {} is not in the external-images partition", ext.build_id));
        return Ok(checks);
    };
    let missing: Vec<String> = ext.images.iter().filter(|e| !b.images.iter().any(|i| i.name == e.name && i.digest == e.digest)).map(|e| format!("{} {}", e.name, e.digest)).collect();
    check(&name, missing.is_empty(), if missing.is_empty() { format!("{} images of build {} present", ext.images.len(), ext.build_id) } else { format!("missing: {}", missing.join(", ")) });
    // Each sealed image: listed with its artifact, and its dm-verity tree recomputed up to the
    // root hash this slot pins.
    let p = images_partition(&rep.gpt, rep.layout.as_ref()).unwrap();
    let fs = open_ext4(path, p.start, p.size)?;
    for e in &ext.images {
        let Some(sl) = &e.sealed else { continue };
        let listed = b.images.iter().any(|i| i.name == e.name && i.sealed.as_deref() == Some(sl.artifact.as_str()));
        let r = if !listed {
            Err(anyhow::anyhow!("artifact {} is not listed in build {}'s set", sl.artifact, ext.build_id))
        } else {
            images::LayoutFs::open(&fs, &format!("/blobs/sha256/{}", sl.digest.trim_start_matches("sha256:"))).and_then(|f| crate::format::sealed::check_blob(f, &e.digest, sl))
        };
        let what = format!("slot {} sealed {}", s.slot, e.name);
        match r {
            Ok(()) => check(&what, true, format!("dm-verity root {} matches ({} bytes)", sl.root_hash, sl.size)),
            Err(x) => check(&what, false, format!("{x:#}")),
        }
    }
    Ok(checks)
}
