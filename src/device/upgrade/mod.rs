//! Applying an update bundle to the inactive slot — the same steps offline (a disk image file)
//! and online (the running device), behind [`Target`]:
//! 1. refuse, changing nothing, a bundle the device's layout generation or the inactive slot's
//!    cap does not admit; a delta bundle's parts are assembled from the device's own first
//!    (`delta`), still writing nothing of the device;
//! 2. stage the new build's external images into the images partition (only missing blobs), then
//!    list them under the new build id (index.json replaced last);
//! 3. remove the inactive slot's boot entry, write its squashfs, sync, read back and verify;
//! 4. write its kernel and initrd, then its entry `slot-X+3.conf` with an install number above
//!    every other entry's (so even a downgrade is tried first).
//! Nothing of the running slot — entry, kernel, rootfs, image set — is touched. Protocol and
//! power-cut analysis: docs/upgrade-protocol.md.

pub use crate::format::agent::{ApplyReport, ApplyStep};

mod delta;
pub mod device;
pub mod pull;
pub mod file;
pub mod gc;

use delta::{assemble_rootfs, ApplyFiles, BootFile};

use crate::format::bundle::Bundle;
use crate::format::entries::{BootEntry, EntryReport};
use crate::base::hash::Digest;
use crate::format::images::{build_index_json, required_blobs, top_index_json, BuildSet, Idx, IndexEntry};
use crate::format::layout::{Layout, Partition, Slot};
use anyhow::{bail, Context};
use std::io::Read;
use std::path::Path;

/// Boot tries a new slot gets before systemd-boot falls back.
pub const TRIES: u32 = 3;

/// A device (or a disk image) an update can be applied to.
pub trait Target {
    /// The layout recorded on the ESP.
    fn layout(&mut self) -> anyhow::Result<Layout>;
    /// The slot that is running (online) or would boot (offline).
    fn running(&mut self) -> anyhow::Result<Slot>;
    /// Every boot entry on the ESP (both kinds).
    fn entries(&mut self) -> anyhow::Result<Vec<EntryReport>>;
    fn esp_remove(&mut self, path: &str) -> anyhow::Result<()>;
    /// Copy a file of the ESP to `dest`; false if the ESP has no such file.
    fn esp_copy_out(&mut self, path: &str, dest: &Path) -> anyhow::Result<bool>;
    /// The digest and size of a file of the ESP, read in place; `None` if there is no such file.
    fn esp_digest(&mut self, path: &str) -> anyhow::Result<Option<(Digest, u64)>>;
    /// Copy a file of the ESP to another of its paths (replacing it, durably), checked on the way
    /// against `digest` and `size`: a mismatch fails the write.
    fn esp_copy(&mut self, from: &str, to: &str, digest: &Digest, size: u64) -> anyhow::Result<()>;
    /// Write a file on the ESP (replacing it), durably.
    fn esp_write(&mut self, path: &str, data: &mut dyn Read) -> anyhow::Result<()>;
    /// The images partition's `index.json`, if any.
    fn images_index(&mut self) -> anyhow::Result<Option<Vec<u8>>>;
    fn images_has(&mut self, d: &Digest) -> anyhow::Result<bool>;
    fn images_read(&mut self, d: &Digest) -> anyhow::Result<Vec<u8>>;
    /// Store a verified blob (from a file of the bundle).
    fn images_put(&mut self, d: &Digest, src: &Path) -> anyhow::Result<()>;
    /// Replace `index.json` (atomically where the medium allows).
    fn images_write_index(&mut self, bytes: &[u8]) -> anyhow::Result<()>;
    /// Write a squashfs to `part`, sync, read it back and compare its digest. `step` is called
    /// with `slot-half-written` halfway.
    fn write_slot(&mut self, part: &Partition, src: &Path, digest: &Digest, step: &dyn Fn(ApplyStep)) -> anyhow::Result<()>;
    /// A slot partition opened read-only, and where it starts in that file: a seed for a delta.
    fn slot_seed(&mut self, part: &Partition) -> anyhow::Result<(std::fs::File, u64)>;
    /// The inactive slot's partition opened for reading and writing, and where it starts in that
    /// file: a delta's rootfs is assembled straight into it.
    fn slot_out(&mut self, part: &Partition) -> anyhow::Result<(std::fs::File, u64)>;
    /// A blob of the images partition opened for reading (a seed for a sealed image), if there.
    fn images_seed(&mut self, d: &Digest) -> anyhow::Result<Option<std::fs::File>>;
    /// Flush whatever the medium needs (an ESP image's FAT fix-up).
    fn finish(&mut self) -> anyhow::Result<()>;
    /// The files of `/etc/slotforge/update-keys/` in the rootfs of the running slot (online) or
    /// of the slot that would boot (offline): the only keys the decision may use.
    fn update_keys(&mut self) -> anyhow::Result<Vec<(String, Vec<u8>)>>;
}

/// Check that the bundle fits; the error says why and that nothing changed. The size checked is
/// the larger of what the config claims and the rootfs blob's real (digest-checked) size.
pub fn check_fits(b: &Bundle, layout: &Layout, inactive: &Partition) -> anyhow::Result<()> {
    let req = &b.config.requires;
    let rootfs_bytes = req.rootfs_bytes.max(b.config.rootfs.size);
    if !req.layouts.iter().any(|l| l.name == layout.name && l.generation == layout.generation) {
        let ok: Vec<String> = req.layouts.iter().map(|l| format!("{} generation {}", l.name, l.generation)).collect();
        bail!("bundle {} is for {}, not this device's layout {} generation {}; nothing was changed", b.config.build_id, ok.join(", "), layout.name, layout.generation);
    }
    if rootfs_bytes > inactive.fs_cap.min(inactive.size) {
        bail!(
            "bundle {} has a {}-byte rootfs but slot {} ({}) holds at most {} bytes ({} over); nothing was changed",
            b.config.build_id,
            rootfs_bytes,
            inactive.slot.map(|s| s.name()).unwrap_or("?"),
            inactive.name,
            inactive.fs_cap.min(inactive.size),
            rootfs_bytes - inactive.fs_cap.min(inactive.size)
        );
    }
    Ok(())
}


/// The builds listed in an images `index.json`.
pub fn builds_of(index: &[u8]) -> anyhow::Result<Vec<BuildSet>> {
    let top: Idx = serde_json::from_slice(index).context("images index.json")?;
    top.manifests
        .iter()
        .map(|m| {
            Ok(BuildSet {
                build_id: m.annotations.get(crate::oci::image::REF_NAME).cloned().unwrap_or_default(),
                version: m.annotations.get(crate::format::images::ANN_VERSION).cloned().unwrap_or_default(),
                index_digest: Digest::parse(&m.digest).map_err(|e| anyhow::anyhow!(e))?,
                index_size: m.size,
            })
        })
        .collect()
}

/// The points of an apply, in order; `step` is told each as it is passed (the agent reports them,
/// and the power-cut tests stop the machine there).
pub const STEPS: &[&str] = &["blob-written", "images-listed", "entry-removed", "slot-half-written", "slot-written", "kernel-written", "entry-written"];

/// Apply `b` to the inactive slot of `t`.
pub fn apply(t: &mut dyn Target, b: &Bundle) -> anyhow::Result<ApplyReport> {
    apply_with(t, b, &|_| {})
}

/// [`apply`], calling `step` at each of [`STEPS`].
pub fn apply_with(t: &mut dyn Target, b: &Bundle, step: &dyn Fn(ApplyStep)) -> anyhow::Result<ApplyReport> {
    let cfg = &b.config;
    let layout = t.layout()?;
    let slot = t.running()?.other();
    let part = layout.rootfs(slot).clone();
    // 1. Trust, then fit, then (a delta) the rootfs assembled, then contents — all before the
    // first write to the device.
    let (signature, options, uki, mut rootfs) = preflight(t, b, &layout, slot, &part)?;
    // 2. External images: blobs first, the build's listing last.
    let images = stage_images(t, b, &rootfs.sealed, step)?;
    // 3. The inactive slot: its entries go first, so a half-written slot is never booted.
    let existing = t.entries()?;
    let install = existing.iter().map(EntryReport::install_number).max().unwrap_or(0) + 1;
    for e in existing.iter().filter(|e| e.slot.as_deref() == Some(slot.name())) {
        t.esp_remove(&e.path)?;
    }
    step(ApplyStep::EntryRemoved);
    match (rootfs.direct.take(), &rootfs.path) {
        (Some(d), _) => {
            // A delta assembled straight into the slot: its tree is checked on the slot, which
            // reads back what was written.
            let a = delta::assemble_into_slot(t, b, &part, d, step)?;
            // A tree the device made was made from the slot read back and gave the signed root.
            let tree_checked = a.tree_bytes > 0;
            rootfs.assembled = Some(a);
            let (f, start) = t.slot_seed(&part)?;
            let mut w = crate::base::window::Window::new(f, start, part.size);
            check_rootfs(b, &mut w, tree_checked).map_err(|e| anyhow::anyhow!("{e:#} (slot {} was written; the running slot is untouched)", part.name))?;
            if cfg.verity.is_none() {
                // No tree to check it by: read the slot back whole.
                std::io::Seek::seek(&mut w, std::io::SeekFrom::Start(0))?;
                let (got, _) = crate::base::hash::digest_reader((&mut w).take(cfg.rootfs.size))?;
                if got != cfg.rootfs.digest {
                    bail!("slot {}: read back {got}, assembled {}; the running slot is untouched", part.name, cfg.rootfs.digest);
                }
            }
        }
        (None, Some(p)) => t.write_slot(&part, p, &cfg.rootfs.digest, step)?,
        (None, None) => unreachable!("an apply has a rootfs blob or a direct assembly"),
    }
    step(ApplyStep::SlotWritten);
    // 4. Kernel, initrd, then the entry on probation (a UKI is both at once).
    let entry = write_boot_files(t, b, &rootfs, slot, install, options, uki, step)?;
    rootfs.done();
    t.finish()?;
    step(ApplyStep::EntryWritten);
    Ok(ApplyReport {
        slot: slot.name().into(),
        build_id: cfg.build_id.clone(),
        version: cfg.version.clone(),
        install_number: install,
        entry,
        blobs_present: images.present,
        blobs_written: images.written,
        image_bytes_written: images.bytes,
        rootfs_bytes: cfg.rootfs.size,
        images_to_pull: images.to_pull,
        signature,
        root_hash: cfg.verity.as_ref().map(|v| v.root_hash.clone()),
        delta: rootfs.assembled.clone(),
        pulled: None,
    })
}

/// Everything checked before the first write: the signature against the running slot's keys,
/// the blobs against their digests, the fit, the rootfs, the command line and version, the UKI.
/// Returns the signature decision, the new entry's options and the slot's UKI blob (UKI mode).
type Preflight<'a> = (crate::format::signature::Decision, String, Option<&'a crate::format::bundle::Blob>, ApplyFiles);

fn preflight<'a>(t: &mut dyn Target, b: &'a Bundle, layout: &Layout, slot: Slot, part: &Partition) -> anyhow::Result<Preflight<'a>> {
    let cfg = &b.config;
    let keys = crate::format::signature::trusted_keys(&t.update_keys()?).context("reading the running slot's update keys")?;
    let signature = crate::format::signature::decide(&b.config_bytes, &b.signatures, &keys).map_err(|e| anyhow::anyhow!("bundle {} refused: {e:#}; nothing was changed", cfg.build_id))?;
    check_fits(b, layout, part)?;
    // The rootfs whole in the bundle, or (a delta, a release pulled from a registry) as chunks.
    let whole = b.blob_path(&cfg.rootfs.digest).exists();
    let rootfs = if whole {
        ApplyFiles { path: Some(b.blob_path(&cfg.rootfs.digest)), direct: None, kernel: BootFile::Path(b.blob_path(&cfg.kernel.digest)), initrd: cfg.initrd.as_ref().map(|i| BootFile::Path(b.blob_path(&i.digest))), sealed: Default::default(), assembled: None, work: None, _tmp: None }
    } else {
        assemble_rootfs(t, b, layout, slot.other())?
    };
    // A blob of the bundle is checked here; an assembled one was checked as it was assembled, a
    // boot file on the ESP where it lies.
    let own_rootfs = rootfs.path.as_ref().filter(|_| whole);
    let boot = [(&cfg.kernel, Some(&rootfs.kernel))].into_iter().chain(cfg.initrd.iter().map(|i| (i, rootfs.initrd.as_ref())));
    let boot_blobs = boot.filter_map(|(blob, f)| match f {
        Some(BootFile::Path(p)) => Some((blob, p)),
        _ => None,
    });
    let files = whole.then_some(&cfg.rootfs).into_iter().zip(own_rootfs).chain(boot_blobs);
    for (blob, path) in files {
        let (d, n) = crate::base::hash::digest_reader(std::fs::File::open(path).with_context(|| format!("bundle blob {} missing", blob.digest))?)?;
        if d != blob.digest || n != blob.size {
            bail!("bundle blob {} is corrupt; nothing was changed", blob.digest);
        }
    }
    if let Some(p) = &rootfs.path {
        check_rootfs(b, &mut std::fs::File::open(p)?, false)?;
    }
    let options = crate::format::cmdline::entry_options(&part.name, slot, &cfg.build_id, cfg.verity.as_ref(), &cfg.cmdline).map_err(|e| anyhow::anyhow!("bundle {}: {e:#}; nothing was changed", cfg.build_id))?;
    // The version goes into the entry's title line: one line of printable text, like the manifest's.
    if cfg.version.is_empty() || !cfg.version.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)) {
        bail!("bundle {}: version {:?} may hold only letters, digits and . _ - +; nothing was changed", cfg.build_id, cfg.version);
    }
    let uki = check_uki(b, slot, &options, &t.entries()?)?;
    Ok((signature, options, uki, rootfs))
}

/// What staging a bundle's external images did.
struct StagedImages {
    present: usize,
    written: usize,
    bytes: u64,
    to_pull: Vec<String>,
}

/// Write the new build's external-image blobs the device lacks (each checked), then list the
/// build's set in the partition's index.
fn stage_images(t: &mut dyn Target, b: &Bundle, assembled: &std::collections::BTreeMap<Digest, std::path::PathBuf>, step: &dyn Fn(ApplyStep)) -> anyhow::Result<StagedImages> {
    let cfg = &b.config;
    let (mut present, mut written, mut bytes) = (0, 0, 0u64);
    let mut entries = Vec::new();
    let mut to_pull = Vec::new();
    let mut temps = Vec::new();
    for e in &cfg.images {
        let md = Digest::parse(&e.digest).map_err(|x| anyhow::anyhow!(x))?;
        let mpath = b.blob_path(&md);
        if !cfg.images_included || !mpath.exists() {
            // Not in the bundle: list it now if the device already holds all of it (another
            // build shares it), else the agent pulls it at first boot.
            if t.images_has(&md)? {
                let mbytes = t.images_read(&md)?;
                let mut all = Digest::of_bytes(&mbytes) == md;
                if all {
                    for (d, _) in required_blobs(e, &mbytes)? {
                        all &= t.images_has(&d)?;
                    }
                }
                if all {
                    present += 1;
                    entries.push(IndexEntry::pinned(e, mbytes.len() as u64)?);
                    continue;
                }
            }
            to_pull.push(e.name.clone());
            continue;
        }
        let mbytes = std::fs::read(&mpath)?;
        if Digest::of_bytes(&mbytes) != md {
            bail!("bundle: manifest of {} is corrupt", e.name);
        }
        for (d, size) in required_blobs(e, &mbytes)? {
            if t.images_has(&d)? {
                present += 1;
                continue;
            }
            // An assembled sealed image was hashed whole as it was assembled; a bundle blob now.
            // The empty config of a sealed artifact is known bytes: a release copied from a
            // registry may not carry it as a blob.
            let empty = Digest::of_bytes(crate::format::sealed::EMPTY_JSON);
            let src = match assembled.get(&d) {
                Some(p) => p.clone(),
                None if d == empty && !b.blob_path(&d).exists() => {
                    let t = tempfile::NamedTempFile::new()?;
                    std::fs::write(t.path(), crate::format::sealed::EMPTY_JSON)?;
                    let p = t.path().to_path_buf();
                    temps.push(t);
                    p
                }
                None => {
                    let p = b.blob_path(&d);
                    let (got, n) = crate::base::hash::digest_reader(std::fs::File::open(&p).with_context(|| format!("bundle lacks blob {d} of {}", e.name))?)?;
                    if got != d || n != size {
                        bail!("bundle blob {d} of {} is corrupt", e.name);
                    }
                    p
                }
            };
            t.images_put(&d, &src)?;
            written += 1;
            bytes += size;
            if written == 1 {
                step(ApplyStep::BlobWritten);
            }
        }
        entries.push(IndexEntry::pinned(e, mbytes.len() as u64)?);
    }
    if !entries.is_empty() {
        let nested = build_index_json(&cfg.build_id, &cfg.version, entries);
        let nd = Digest::of_bytes(&nested);
        let tmp = tempfile::NamedTempFile::new()?;
        std::fs::write(tmp.path(), &nested)?;
        if !t.images_has(&nd)? {
            t.images_put(&nd, tmp.path())?;
        }
        let mut builds = match t.images_index()? {
            Some(i) => builds_of(&i)?,
            None => vec![],
        };
        builds.retain(|x| x.build_id != cfg.build_id);
        builds.push(BuildSet { build_id: cfg.build_id.clone(), version: cfg.version.clone(), index_digest: nd, index_size: nested.len() as u64 });
        t.images_write_index(&top_index_json(builds))?;
        step(ApplyStep::ImagesListed);
    }

    Ok(StagedImages { present, written, bytes, to_pull })
}

/// The new slot's kernel and initrd and its entry with a boot counter (or its UKI, which is
/// both); returns the entry's file name.
#[allow(clippy::too_many_arguments)]
fn write_boot_files(t: &mut dyn Target, b: &Bundle, files: &ApplyFiles, slot: Slot, install: u64, options: String, uki: Option<&crate::format::bundle::Blob>, step: &dyn Fn(ApplyStep)) -> anyhow::Result<String> {
    let cfg = &b.config;
    let s = slot.name();
    Ok(match uki {
        Some(blob) => {
            step(ApplyStep::KernelWritten);
            let path = crate::format::entries::uki_path(slot, install, Some(TRIES));
            t.esp_write(&path, &mut std::fs::File::open(b.blob_path(&blob.digest))?)?;
            path.rsplit('/').next().unwrap().to_string()
        }
        None => {
            files.kernel.write(t, &format!("{s}/vmlinuz"), &cfg.kernel)?;
            if let (Some(i), Some(blob)) = (&files.initrd, &cfg.initrd) {
                i.write(t, &format!("{s}/initrd.img"), blob)?;
            }
            step(ApplyStep::KernelWritten);
            let entry = BootEntry {
                slot,
                title: format!("{} (slot {s})", cfg.version),
                version: install,
                linux: format!("/{s}/vmlinuz"),
                initrd: cfg.initrd.as_ref().map(|_| format!("/{s}/initrd.img")),
                options,
                tries: Some(TRIES),
            };
            t.esp_write(&entry.path(), &mut std::io::Cursor::new(entry.text().into_bytes()))?;
            entry.file_name()
        }
    })
}

/// A UKI bundle carries one signed UKI per slot; the one for `slot` must exist, match its
/// digest, and embed exactly the command line this device computes for it (so the root hash and
/// partition inside the signed image are the ones the config names). The boot mode (BLS entries
/// or UKIs) must be the running one's: a mixed ESP would not order entries by install number.
fn check_uki<'a>(b: &'a Bundle, slot: Slot, options: &str, existing: &[EntryReport]) -> anyhow::Result<Option<&'a crate::format::bundle::Blob>> {
    let cfg = &b.config;
    let running_kind = existing.iter().find(|e| e.slot.as_deref() == Some(slot.other().name())).map(|e| e.kind.as_str());
    let want = if cfg.ukis.is_empty() { "bls" } else { "uki" };
    if let Some(k) = running_kind {
        if k != want {
            bail!("bundle {} boots through {want} entries but the running slot boots through {k} entries; switching boot mode in an update is not supported; nothing was changed", cfg.build_id);
        }
    }
    if cfg.ukis.is_empty() {
        return Ok(None);
    }
    let blob = cfg.ukis.get(slot.name()).ok_or_else(|| anyhow::anyhow!("bundle {} has no UKI for slot {}; nothing was changed", cfg.build_id, slot.name()))?;
    let path = b.blob_path(&blob.digest);
    let (d, n) = crate::base::hash::digest_reader(std::fs::File::open(&path).with_context(|| format!("bundle blob {} missing", blob.digest))?)?;
    if d != blob.digest || n != blob.size {
        bail!("bundle blob {} (UKI of slot {}) is corrupt; nothing was changed", blob.digest, slot.name());
    }
    let embedded = crate::format::uki::read_section(&mut std::fs::File::open(&path)?, ".cmdline", 64 * 1024)
        .map_err(|e| anyhow::anyhow!("bundle {}: the UKI of slot {} is not readable: {e:#}; nothing was changed", cfg.build_id, slot.name()))?
        .map(|c| String::from_utf8_lossy(&c).trim_end_matches(['\0', '\n']).to_string());
    if embedded.as_deref() != Some(options) {
        bail!("bundle {}: the UKI of slot {} embeds the command line {:?}, not {options:?}; nothing was changed", cfg.build_id, slot.name(), embedded.unwrap_or_default());
    }
    Ok(Some(blob))
}

/// The rootfs blob must be what its config says: a squashfs whose superblock size fits the
/// blob, and with verity, a hash area at the stated offset whose tree matches the data and
/// whose root hash is the one that goes on the command line.
fn check_rootfs(b: &Bundle, f: &mut (impl Read + std::io::Seek), tree_checked: bool) -> anyhow::Result<()> {
    let cfg = &b.config;
    f.seek(std::io::SeekFrom::Start(0))?;
    let sb = crate::format::squashfs::read_superblock(f)
        .ok()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("bundle {}: its rootfs is not a squashfs; nothing was changed", cfg.build_id))?;
    if sb.bytes_used > cfg.rootfs.size {
        bail!("bundle {}: its squashfs claims {} bytes but the blob has {}; nothing was changed", cfg.build_id, sb.bytes_used, cfg.rootfs.size);
    }
    if let Some(v) = &cfg.verity {
        if v.hash_offset != sb.bytes_used.div_ceil(crate::format::verity::BLOCK) * crate::format::verity::BLOCK {
            bail!("bundle {}: verity hash offset {} does not follow its {}-byte squashfs; nothing was changed", cfg.build_id, v.hash_offset, sb.bytes_used);
        }
        if tree_checked {
            return Ok(());
        }
        crate::format::verity::check(f, v.hash_offset, Some(&v.root_hash)).map_err(|e| anyhow::anyhow!("bundle {}: rootfs dm-verity: {e:#}; nothing was changed", cfg.build_id))?;
    }
    Ok(())
}
