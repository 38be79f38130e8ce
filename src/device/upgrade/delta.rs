//! A delta bundle's parts assembled on the device before the first write: its rootfs from both
//! slots and the bundle's chunk store, its sealed images from their predecessors in the images
//! partition, a left-out kernel or initrd from the ESP — each chunk checked against its id, each
//! blob against the signed digest (docs/upgrade-protocol.md#chunks-and-delta-bundles).

use super::Target;
use crate::base::hash::Digest;
use crate::format::bundle::Bundle;
use crate::format::layout::{Layout, Slot};
use anyhow::bail;

/// The files an apply writes: the bundle's own, or (a delta) ones assembled from the device's
/// slots and the bundle's chunks into the scratch directory.
pub(super) struct ApplyFiles {
    pub(super) path: std::path::PathBuf,
    /// The kernel and initrd to write: the bundle's, or (a delta that leaves them out) the
    /// same files found on the ESP, checked against the config's digests.
    pub(super) kernel: std::path::PathBuf,
    pub(super) initrd: Option<std::path::PathBuf>,
    /// Sealed images a delta carried as chunks, assembled: blob digest → file.
    pub(super) sealed: std::collections::BTreeMap<Digest, std::path::PathBuf>,
    pub(super) assembled: Option<crate::format::casync::Assembled>,
    /// Removed once the slot is written (the assembly of an interrupted apply stays, to resume).
    pub(super) work: Option<std::path::PathBuf>,
    pub(super) _tmp: Option<tempfile::TempDir>,
}

impl ApplyFiles {
    pub(super) fn done(&self) {
        if let Some(w) = &self.work {
            let _ = std::fs::remove_file(w);
            for f in std::iter::once(&self.kernel).chain(self.initrd.iter()).chain(self.sealed.values()).filter(|f| f.parent() == w.parent()) {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// How much of a slot partition holds its image: the squashfs, padded to a verity block, and
/// the hash area a verity build appends (an unused tail is not worth scanning).
fn image_len(f: &mut std::fs::File, start: u64, part_size: u64) -> u64 {
    use std::io::{Seek, SeekFrom};
    let sb = f.seek(SeekFrom::Start(start)).ok().and_then(|_| crate::format::squashfs::read_superblock(f).ok().flatten());
    let Some(sb) = sb else { return 0 };
    let data = sb.bytes_used.div_ceil(crate::format::verity::BLOCK) * crate::format::verity::BLOCK;
    (data + crate::format::verity::hash_area_bytes(data / crate::format::verity::BLOCK)).min(part_size)
}

/// Assemble a delta bundle's rootfs from the chunks of both slots and of the bundle's store,
/// each checked against its id, the whole against the config's digest. Nothing of the device is
/// written; the work file lives in the bundle's scratch directory, so a rerun after a cut
/// resumes where it stopped.
pub(super) fn assemble_rootfs(t: &mut dyn Target, b: &Bundle, layout: &Layout, running: Slot) -> anyhow::Result<ApplyFiles> {
    let cfg = &b.config;
    let Some(index) = b.rootfs_index()? else { bail!("bundle {} lacks its rootfs and has no chunk index; nothing was changed", cfg.build_id) };
    let store = b.chunk_store();
    // Fast path: the bundle carries its bases' indexes; a slot holding a base is offered as that
    // index says, unread. Its chunks are still checked against their ids when copied.
    let mut seeds = crate::format::casync::Seeds::default();
    let mut slots = Vec::new();
    for slot in [running, running.other()] {
        let part = layout.rootfs(slot);
        let (mut f, start) = t.slot_seed(part)?;
        let len = image_len(&mut f, start, part.size);
        if len == 0 {
            continue;
        }
        for base in cfg.delta_from() {
            if let Some(idx) = b.base_index(base, len) {
                seeds.add_indexed(&format!("slot {} as {}", slot.name(), base.build_id), f.try_clone()?, start, &idx);
            }
        }
        slots.push((slot, f, start, len));
    }
    let (dir, tmp) = match &b.scratch {
        Some(s) => {
            std::fs::create_dir_all(s)?;
            (s.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("slotforge-assemble-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let path = dir.join(format!("rootfs-{}.assembling", cfg.rootfs.digest.hex()));
    let out = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
    let bases: Vec<String> = cfg.delta_from().iter().map(|x| format!("{} ({})", x.build_id, x.version)).collect();
    let mut assembled = crate::format::casync::assemble(&index, &seeds, &store, &out);
    if assembled.is_err() {
        // A slot is not what a base index says (another build, or no index carried): find its
        // chunks by chunking it — the running slot, then the inactive one if chunks are still
        // missing — and go on from what was assembled.
        let mut scanned = crate::format::casync::Seeds::default();
        for (slot, f, start, len) in slots {
            if slot != running && index.iter().all(|e| scanned.has(&e.id) || crate::format::casync::chunk_path(&store, &e.hex()).exists()) {
                break;
            }
            scanned.add(&format!("slot {}", slot.name()), f, start, len)?;
        }
        assembled = crate::format::casync::assemble(&index, &scanned, &store, &out);
    }
    let (a, d) = assembled.map_err(|e| {
        anyhow::anyhow!("bundle {} is a delta from {}; this device cannot assemble it: {e:#} (neither slot holds one of those builds?); nothing was changed", cfg.build_id, bases.join(", "))
    })?;
    drop(out);
    if d != cfg.rootfs.digest || a.bytes != cfg.rootfs.size {
        let _ = std::fs::remove_file(&path);
        bail!("bundle {}: the rootfs assembled from its chunks is {d}, not {}; nothing was changed", cfg.build_id, cfg.rootfs.digest);
    }
    // A kernel or initrd the delta left out (a base had the same one) is the one some slot of the
    // device boots: copied from the ESP and checked like a bundle blob below.
    let scratch = tmp.as_ref().map(|t| t.path().to_path_buf()).unwrap_or_else(|| dir.clone());
    let mut from_esp = |blob: &crate::format::bundle::Blob, file: &str| -> anyhow::Result<std::path::PathBuf> {
        let own = b.blob_path(&blob.digest);
        if own.exists() {
            return Ok(own);
        }
        let dest = scratch.join(format!("{file}-{}", blob.digest.hex()));
        for slot in [running, running.other()] {
            if t.esp_copy_out(&format!("{}/{file}", slot.name()), &dest)? && crate::base::hash::digest_reader(std::fs::File::open(&dest)?)?.0 == blob.digest {
                return Ok(dest);
            }
        }
        let _ = std::fs::remove_file(&dest);
        bail!("bundle {} is a delta from {} and leaves out its {file}, which neither slot's boot files match; nothing was changed", cfg.build_id, bases.join(", "))
    };
    let kernel = from_esp(&cfg.kernel, "vmlinuz")?;
    let initrd = cfg.initrd.as_ref().map(|i| from_esp(i, "initrd.img")).transpose()?;
    // Sealed images carried as chunks: assembled now, from the device's sealed images the bundle
    // names as seeds, so a failure still changes nothing.
    let mut sealed = std::collections::BTreeMap::new();
    for e in &cfg.images {
        let Some(s) = &e.sealed else { continue };
        let d = Digest::parse(&s.digest).map_err(|x| anyhow::anyhow!(x))?;
        if b.blob_path(&d).exists() || t.images_has(&d)? {
            continue;
        }
        let Some((index, seed_digests)) = b.sealed_index(&d, s.size)? else { continue };
        let mut seeds = crate::format::casync::Seeds::default();
        for sd in seed_digests {
            if let Some(f) = t.images_seed(sd)? {
                let len = f.metadata()?.len();
                seeds.add(&format!("sealed image {sd}"), f, 0, len)?;
            }
        }
        let out_path = scratch.join(format!("sealed-{}.assembling", d.hex()));
        let out = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&out_path)?;
        let (sa, sd) = crate::format::casync::assemble(&index, &seeds, &store, &out)
            .map_err(|x| anyhow::anyhow!("bundle {} is a delta from {}; this device cannot assemble the sealed image of {}: {x:#}; nothing was changed", cfg.build_id, bases.join(", "), e.name))?;
        drop(out);
        if (sd, sa.bytes) != (d.clone(), s.size) {
            let _ = std::fs::remove_file(&out_path);
            bail!("bundle {}: the sealed image of {} assembled from its chunks is not {d}; nothing was changed", cfg.build_id, e.name);
        }
        sealed.insert(d, out_path);
    }
    Ok(ApplyFiles { path: path.clone(), kernel, initrd, sealed, assembled: Some(a), work: Some(path), _tmp: tmp })
}

