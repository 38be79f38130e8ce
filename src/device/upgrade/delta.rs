//! A delta bundle's parts assembled from what the device already holds: its rootfs from the
//! running slot and the bundle's chunk store — straight into the inactive slot when those two
//! suffice, else (chunks only the inactive slot has) in the scratch directory first — its sealed
//! images from their predecessors in the images partition, a left-out kernel or initrd from the
//! ESP. Each chunk is checked against its id, each blob against the signed digest, and nothing
//! is written to the device until every chunk is known to be at hand
//! (docs/upgrade-protocol.md#chunks-and-delta-bundles).

use super::Target;
use crate::base::hash::Digest;
use crate::format::agent::ApplyStep;
use crate::format::bundle::Bundle;
use crate::format::casync::{Assembled, Entry, Seeds};
use crate::format::layout::{Layout, Partition, Slot};
use anyhow::bail;
use std::path::PathBuf;

/// The files an apply writes: the bundle's own, or (a delta) ones assembled from the device's
/// slots and the bundle's chunks.
pub(super) struct ApplyFiles {
    /// The rootfs blob to copy into the slot: the bundle's, or one assembled in the scratch
    /// directory; `None` when it is assembled straight into the slot (`direct`).
    pub(super) path: Option<PathBuf>,
    pub(super) direct: Option<Direct>,
    /// The kernel and initrd to write: the bundle's, or (a delta that leaves them out) the
    /// same files found on the ESP, checked against the config's digests.
    pub(super) kernel: BootFile,
    pub(super) initrd: Option<BootFile>,
    /// Sealed images a delta carried as chunks, assembled: blob digest → file.
    pub(super) sealed: std::collections::BTreeMap<Digest, PathBuf>,
    pub(super) assembled: Option<Assembled>,
    /// Removed once the slot is written (the assembly of an interrupted apply stays, to resume).
    pub(super) work: Option<PathBuf>,
    pub(super) _tmp: Option<tempfile::TempDir>,
}

/// A kernel or initrd to write on the ESP: a file (the bundle's blob), or (a delta that left it
/// out) the same file on the ESP, already checked where it lies and copied within the ESP.
pub(super) enum BootFile {
    Path(PathBuf),
    Esp(String),
}

impl BootFile {
    /// Write it at `to` on the ESP: a file copied in; an ESP file copied across, checked again
    /// against `blob` on the way — or left as it is when it is that path already.
    pub(super) fn write(&self, t: &mut dyn Target, to: &str, blob: &crate::format::bundle::Blob) -> anyhow::Result<()> {
        match self {
            BootFile::Path(p) => t.esp_write(to, &mut std::fs::File::open(p)?),
            BootFile::Esp(from) if from == to => Ok(()),
            BootFile::Esp(from) => t.esp_copy(from, to, &blob.digest, blob.size),
        }
    }
}

/// A rootfs to assemble straight into the inactive slot: every chunk is in the running slot
/// (as the seeds say) or in the bundle's store (checked already).
pub(super) struct Direct {
    index: Vec<Entry>,
    seeds: Seeds,
    /// The seeds come from the bundle's seed offsets, unread: if the running slot is not the base
    /// they describe, it is chunked and the assembly goes on from where it stopped.
    indexed: bool,
    running: (std::fs::File, u64, u64),
}

impl ApplyFiles {
    pub(super) fn done(&self) {
        if let Some(w) = &self.work {
            let _ = std::fs::remove_file(w);
            for f in self.sealed.values().filter(|f| f.parent() == w.parent()) {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// Where a slot's hash area would start: after its squashfs, padded to a verity block.
pub(super) fn hash_offset(f: &mut std::fs::File, start: u64) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    let sb = f.seek(SeekFrom::Start(start)).ok().and_then(|_| crate::format::squashfs::read_superblock(f).ok().flatten())?;
    Some(sb.bytes_used.div_ceil(crate::format::verity::BLOCK) * crate::format::verity::BLOCK)
}

/// How much of a slot partition holds its image: the squashfs, padded to a verity block, and
/// the hash area a verity build appends (an unused tail is not worth scanning).
pub(super) fn image_len(f: &mut std::fs::File, start: u64, part_size: u64) -> u64 {
    let Some(data) = hash_offset(f, start) else { return 0 };
    (data + crate::format::verity::hash_area_bytes(data / crate::format::verity::BLOCK)).min(part_size)
}

/// Plan (and, if it needs the inactive slot's chunks, do) the assembly of a delta bundle's
/// rootfs, and gather its other parts, writing nothing of the device. The rootfs is assembled
/// straight into the inactive slot later ([`assemble_into_slot`]) when the running slot and
/// the store hold every chunk — the usual case: the delta was made against what runs. Otherwise
/// it is assembled here, from both slots and the store, into the bundle's scratch directory (a
/// rerun after a cut resumes there) and copied into the slot like a full bundle's.
pub(super) fn assemble_rootfs(t: &mut dyn Target, b: &Bundle, layout: &Layout, running: Slot) -> anyhow::Result<ApplyFiles> {
    let cfg = &b.config;
    let Some(index) = b.rootfs_index()? else { bail!("bundle {} lacks its rootfs and has no chunk index; nothing was changed", cfg.build_id) };
    let store = b.chunk_store();
    let bases: Vec<String> = cfg.delta_from().iter().map(|x| format!("{} ({})", x.build_id, x.version)).collect();
    let cannot = |e: anyhow::Error| match bases.is_empty() {
        true => anyhow::anyhow!("bundle {} carries its rootfs as chunks; this device cannot assemble it: {e:#}; nothing was changed", cfg.build_id),
        false => anyhow::anyhow!("bundle {} is a delta from {}; this device cannot assemble it: {e:#} (neither slot holds one of those builds?); nothing was changed", cfg.build_id, bases.join(", ")),
    };
    let in_store = |e: &Entry| crate::format::casync::chunk_path(&store, &e.hex()).exists();
    // Both slots, and the images they hold (by length).
    let mut slots = Vec::new();
    for slot in [running, running.other()] {
        let part = layout.rootfs(slot);
        let (mut f, start) = t.slot_seed(part)?;
        let len = image_len(&mut f, start, part.size);
        slots.push((slot, f, start, len));
    }
    // The running slot where the bundle says a base holds the chunks, else chunked.
    let (_, rf, rstart, rlen) = &slots[0];
    let mut seeds = Seeds::default();
    let mut indexed = false;
    // Which build the running slot holds: the root hash its stored tree claims (dm-verity keeps
    // a running slot's data to its tree; offline, a slot that lies fails its chunks' ids and is
    // then chunked).
    let root = hash_offset(&mut rf.try_clone()?, *rstart).and_then(|o| crate::format::verity::stored_root(&mut crate::base::window::Window::new(rf.try_clone().ok()?, *rstart, *rlen), o).ok());
    for base in cfg.delta_from().iter().chain(&b.hints) {
        let Some(root) = &root else { break };
        if let Some(at) = b.seed_offsets(base, *rlen, root, &index) {
            seeds.add_at(&format!("slot {} as {}", running.name(), base.build_id), rf.try_clone()?, *rstart, &index, &at);
            indexed = true;
        }
    }
    if !index.iter().all(|e| seeds.has(&e.id) || in_store(e)) && *rlen > 0 {
        seeds = Seeds::default();
        indexed = false;
        seeds.add(&format!("slot {}", running.name()), rf.try_clone()?, *rstart, *rlen)?;
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
    let (rootfs, direct, assembled) = if index.iter().all(|e| seeds.has(&e.id) || in_store(e)) {
        // Straight into the slot: the store's chunks are checked now, so a bad one changes nothing.
        let mut start = 0;
        for e in &index {
            if !seeds.has(&e.id) {
                crate::format::casync::read_chunk(&store, e, (e.end - start) as usize).map_err(cannot)?;
            }
            start = e.end;
        }
        let running = (rf.try_clone()?, *rstart, *rlen);
        (None, Some(Direct { index, seeds, indexed, running }), None)
    } else {
        // Chunks only the inactive slot has (a device that rolled back, say): assembled here,
        // where the inactive slot is still a seed.
        let (_, f, start, len) = &slots[1];
        if *len > 0 {
            seeds.add(&format!("slot {}", running.other().name()), f.try_clone()?, *start, *len)?;
        }
        let mut out = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let (mut a, mut h) = crate::format::casync::assemble_hashing(&index, &seeds, &store, &out).map_err(cannot)?;
        a.seeds_chunked = !indexed || *len > 0;
        if a.bytes < cfg.rootfs.size {
            let (p, root) = rootfs_tree(cfg)?;
            let tree = make_tree(&mut out, a.bytes, cfg.rootfs.size, &p, root).map_err(|e| anyhow::anyhow!("bundle {}: the rootfs assembled from its chunks: {e:#}; nothing was changed", cfg.build_id))?;
            sha2::Digest::update(&mut h, &tree);
            a.tree_bytes = tree.len() as u64;
        }
        let d = Digest::from_hasher(h);
        let len = out.metadata()?.len();
        drop(out);
        if d != cfg.rootfs.digest || len != cfg.rootfs.size {
            let _ = std::fs::remove_file(&path);
            bail!("bundle {}: the rootfs assembled from its chunks is {d}, not {}; nothing was changed", cfg.build_id, cfg.rootfs.digest);
        }
        (Some(path.clone()), None, Some(a))
    };
    // A kernel or initrd the delta left out (a base had the same one) is the one some slot of the
    // device boots: checked where it lies on the ESP now, copied within the ESP (checked again) when
    // the boot files are written.
    let scratch = tmp.as_ref().map(|t| t.path().to_path_buf()).unwrap_or_else(|| dir.clone());
    let mut from_esp = |blob: &crate::format::bundle::Blob, file: &str| -> anyhow::Result<BootFile> {
        let own = b.blob_path(&blob.digest);
        if own.exists() {
            return Ok(BootFile::Path(own));
        }
        // The inactive slot's own copy first: a rerun after a cut finds it in place.
        for slot in [running.other(), running] {
            let path = format!("{}/{file}", slot.name());
            if t.esp_digest(&path)? == Some((blob.digest.clone(), blob.size)) {
                return Ok(BootFile::Esp(path));
            }
        }
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
        let Some((index, sc)) = b.sealed_index(&d, s.size, s.hash_offset)? else { continue };
        // Each predecessor the device holds: where the bundle says it holds the chunks, else chunked.
        let mut seeds = Seeds::default();
        let mut held = Vec::new();
        for (i, sd) in sc.seeds.iter().enumerate() {
            if let Some(f) = t.images_seed(sd)? {
                let len = f.metadata()?.len();
                match sc.seed_offsets.get(i).and_then(|o| b.offsets_in(o, len, &index)) {
                    Some(at) => seeds.add_at(&format!("sealed image {sd}"), f.try_clone()?, 0, &index, &at),
                    None => seeds.add(&format!("sealed image {sd}"), f.try_clone()?, 0, len)?,
                };
                held.push((sd, f, len));
            }
        }
        let out_path = scratch.join(format!("sealed-{}.assembling", d.hex()));
        let mut out = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&out_path)?;
        let mut r = crate::format::casync::assemble_hashing(&index, &seeds, &store, &out);
        if r.is_err() && !held.is_empty() {
            // A seed is not where the offsets said: chunk the seeds, go on from what is done.
            let mut scanned = Seeds::default();
            for (sd, f, len) in held {
                scanned.add(&format!("sealed image {sd}"), f, 0, len)?;
            }
            r = crate::format::casync::assemble_hashing(&index, &scanned, &store, &out);
        }
        let (sa, mut sh) = r
            .map_err(|x| anyhow::anyhow!("bundle {} is a delta from {}; this device cannot assemble the sealed image of {}: {x:#}; nothing was changed", cfg.build_id, bases.join(", "), e.name))?;
        if sa.bytes < s.size {
            // The index covered the image's data: its hash area is made here, as the build made it.
            let tree = s
                .tree_params(&e.digest)
                .and_then(|p| make_tree(&mut out, sa.bytes, s.size, &p, &s.root_hash))
                .map_err(|x| anyhow::anyhow!("bundle {}: the sealed image of {} assembled from its chunks: {x:#}; nothing was changed", cfg.build_id, e.name))?;
            sha2::Digest::update(&mut sh, &tree);
        }
        let sd = Digest::from_hasher(sh);
        let len = out.metadata()?.len();
        drop(out);
        if (sd, len) != (d.clone(), s.size) {
            let _ = std::fs::remove_file(&out_path);
            bail!("bundle {}: the sealed image of {} assembled from its chunks is not {d}; nothing was changed", cfg.build_id, e.name);
        }
        sealed.insert(d, out_path);
    }
    Ok(ApplyFiles { path: rootfs, direct, kernel, initrd, sealed, assembled, work: Some(path), _tmp: tmp })
}

/// Assemble the rootfs straight into the inactive slot `part` (its entry is gone already):
/// chunks already in place — an interrupted run's — are kept up to the first that is not,
/// `slot-half-written` is passed halfway (synced first), every chunk is checked against its id in
/// the signed index, and the caller then checks the slot read back (its dm-verity tree). If the running
/// slot is not what the base index said, it is chunked and the assembly goes on.
pub(super) fn assemble_into_slot(t: &mut dyn Target, b: &Bundle, part: &Partition, d: Direct, step: &dyn Fn(ApplyStep)) -> anyhow::Result<Assembled> {
    let cfg = &b.config;
    let (out, start) = t.slot_out(part)?;
    let half = cfg.rootfs.size / 2;
    let mut passed = false;
    let mut progress = |done: u64| -> anyhow::Result<()> {
        if !passed && done >= half {
            out.sync_data()?;
            step(ApplyStep::SlotHalfWritten);
            passed = true;
        }
        Ok(())
    };
    let store = b.chunk_store();
    // The index is the one the config pins (Bundle::rootfs_index) and every chunk is checked
    // against its id: the whole is the signed rootfs without hashing it again; the caller reads
    // the slot back (its dm-verity tree, or its digest) before any entry names it.
    // The store's chunks were checked in assemble_rootfs; the slot's hash area (or, without verity,
    // its digest read back) checks what was written before any entry names it.
    let mut r = crate::format::casync::assemble_at(&d.index, &d.seeds, &store, &out, start, cfg.rootfs.size, false, true, &mut progress);
    let chunked = !d.indexed || r.is_err();
    if r.is_err() && d.indexed {
        let (f, s, len) = d.running;
        let mut scanned = Seeds::default();
        scanned.add("running slot", f, s, len)?;
        r = crate::format::casync::assemble_at(&d.index, &scanned, &store, &out, start, cfg.rootfs.size, false, true, &mut progress);
    }
    let (mut a, _) = r.map_err(|e| anyhow::anyhow!("bundle {}: assembling slot {}: {e:#}; the running slot is untouched", cfg.build_id, part.name))?;
    a.seeds_chunked = chunked;
    if a.bytes < cfg.rootfs.size && cfg.verity.is_some() {
        // The index covered the data: the hash area is made from the slot as written (that read
        // is the read-back check: it must give the signed root hash), then written after it.
        let (p, root) = rootfs_tree(cfg)?;
        let mut w = crate::base::window::Window::new(out.try_clone()?, start, part.size);
        a.tree_bytes = make_tree(&mut w, a.bytes, cfg.rootfs.size, &p, root).map(|t| t.len() as u64).map_err(|e| anyhow::anyhow!("bundle {}: slot {} as assembled: {e:#}; the running slot is untouched", cfg.build_id, part.name))?;
        a.bytes += a.tree_bytes;
    }
    out.sync_all()?;
    if a.bytes != cfg.rootfs.size {
        bail!("bundle {}: slot {} was assembled from {} bytes of chunks, not {}; the running slot is untouched", cfg.build_id, part.name, a.bytes, cfg.rootfs.size);
    }
    Ok(a)
}

/// The rootfs's dm-verity parameters and root hash, as its config records them.
fn rootfs_tree(cfg: &crate::format::bundle::BundleConfig) -> anyhow::Result<(crate::format::verity::Params, &str)> {
    let v = cfg.verity.as_ref().ok_or_else(|| anyhow::anyhow!("bundle {}: its chunk index stops short of its rootfs, which has no dm-verity tree to complete it", cfg.build_id))?;
    Ok((crate::format::verity::Params::of_info(v)?, v.root_hash.as_str()))
}

/// Complete an image whose `data` bytes were assembled from an index that covers its data: its
/// hash area, made from those bytes with `p`, must give `root` and end the image at `size`; it
/// is then written after the data. Returns the hash area.
fn make_tree<F: std::io::Read + std::io::Write + std::io::Seek>(f: &mut F, data: u64, size: u64, p: &crate::format::verity::Params, root: &str) -> anyhow::Result<Vec<u8>> {
    let tree = crate::format::verity::hash_area_bytes(p.data_blocks);
    if p.hash_offset() != data || data + tree != size {
        bail!("its index covers {data} bytes; its dm-verity tree of {} data blocks ({tree} bytes) would not end it at {size}", p.data_blocks);
    }
    Ok(crate::format::verity::write_tree(f, p, root)?.bytes)
}
