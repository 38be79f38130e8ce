//! Writing an update bundle: the build's rootfs, kernel, initrd (or UKIs) and external images
//! staged as one OCI image layout, signed, and written as a directory or a reproducible tar.
//! The format and its reader are `format::bundle`.

use super::{compose, ComposeOptions};
use super::images::Stage;
use crate::format::bundle::*;
use crate::base::hash::{digest_reader, Digest};
use crate::oci::image::{MT_OCI_INDEX, MT_OCI_MANIFEST, REF_NAME};
use crate::format::layout::Slot;
use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};

pub struct BundleOptions {
    pub compose: ComposeOptions,
    pub output: PathBuf,
    /// Leave the external images out (the device pulls them from the registry).
    pub without_images: bool,
    /// minisign secret key files to sign the bundle's config with.
    pub sign: Vec<PathBuf>,
    /// Bases of a delta bundle: bundles or disk images of builds in the field.
    pub delta_from: Vec<PathBuf>,
}

/// What a delta bundle carries of its rootfs.
#[derive(Debug, Serialize)]
pub struct DeltaSummary {
    pub bases: Vec<BaseBuild>,
    pub chunks: usize,
    /// Chunks in the bundle's store (none of the bases has them), and their raw bytes.
    pub chunks_shipped: usize,
    pub chunk_bytes_shipped: u64,
    /// External images a base already holds (same entry, sealing included): left out, the
    /// device lists its own copy.
    pub images_left_out: Vec<String>,
    /// Boot files (`vmlinuz`, `initrd.img`) a base had: the device copies its own.
    pub boot_files_left_out: Vec<String>,
    /// Sealed images shipped as chunks (assembled on the device from the same service's
    /// earlier sealed image).
    pub sealed: Vec<SealedDelta>,
}

#[derive(Debug, Serialize)]
pub struct SealedDelta {
    pub name: String,
    pub bytes: u64,
    pub chunks: usize,
    pub chunks_shipped: usize,
    pub chunk_bytes_shipped: u64,
}

/// What a delta's bases hold: rootfs chunk ids, external-image entries (as JSON), the builds.
#[derive(Default)]
struct Bases {
    chunks: std::collections::HashSet<[u8; 32]>,
    /// Kernel and initrd digests of the bases (a device of a base boots them from its ESP).
    boot_files: std::collections::HashSet<Digest>,
    /// Per service name: the sealed blobs of the bases (digest, index) and their chunk ids.
    sealed: std::collections::HashMap<String, (Vec<(Digest, Vec<crate::format::casync::Entry>)>, std::collections::HashSet<[u8; 32]>)>,
    images: std::collections::HashSet<String>,
    builds: Vec<BaseBuild>,
    /// Each base build's rootfs index, by build id: carried in the delta for the device.
    indexes: std::collections::BTreeMap<String, Vec<crate::format::casync::Entry>>,
}

#[derive(Debug, Serialize)]
pub struct BundleSummary {
    pub output: PathBuf,
    pub build_id: String,
    pub version: String,
    pub rootfs_bytes: u64,
    pub bundle_bytes: u64,
    pub requires: Requires,
    /// Key ids of the signatures it carries.
    pub signed_by: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaSummary>,
}

/// The chunk ids the bases' devices hold, and the builds they are: from a bundle, its chunk index
/// (or its rootfs chunked); from a disk, every slot holding a slotforge rootfs.
fn base_chunks(paths: &[PathBuf]) -> anyhow::Result<Bases> {
    use crate::format::casync;
    let mut bases = Bases::default();
    let Bases { chunks: ids, images, builds, boot_files, sealed, indexes } = &mut bases;
    for p in paths {
        let what = || format!("--delta-from {}", p.display());
        let is_bundle = p.is_dir() || p.extension().is_some_and(|e| e == "tar");
        if is_bundle {
            let b = Bundle::open(p, None).with_context(what)?;
            let index = match b.rootfs_index().with_context(what)? {
                Some(e) => e,
                None => casync::index_of(std::io::BufReader::new(std::fs::File::open(b.blob_path(&b.config.rootfs.digest)).with_context(what)?))?,
            };
            ids.extend(index.iter().map(|e| e.id));
            indexes.entry(b.config.build_id.clone()).or_insert(index);
            images.extend(b.config.images.iter().map(|e| serde_json::to_string(e).unwrap_or_default()));
            for e in &b.config.images {
                let Some(s) = &e.sealed else { continue };
                let Ok(d) = Digest::parse(&s.digest) else { continue };
                if let Ok(f) = std::fs::File::open(b.blob_path(&d)) {
                    let entry = sealed.entry(e.name.clone()).or_default();
                    let index = casync::index_of(std::io::BufReader::new(f))?;
                    entry.1.extend(index.iter().map(|x| x.id));
                    entry.0.push((d, index));
                }
            }
            if b.config.ukis.is_empty() {
                boot_files.extend(std::iter::once(&b.config.kernel).chain(b.config.initrd.iter()).map(|x| x.digest.clone()));
            }
            builds.push(BaseBuild { build_id: b.config.build_id.clone(), version: b.config.version.clone(), rootfs_size: Some(b.config.rootfs.size), root_hash: b.config.verity.as_ref().map(|v| v.root_hash.clone()), seed_offsets: None });
        } else {
            let rep = crate::format::inspect::inspect(p).with_context(what)?;
            let gpt = crate::format::disk::read_gpt(&mut std::fs::File::open(p)?)?;
            let mut any = false;
            for s in &rep.slots {
                let (Some(rel), Some(len)) = (&s.release, s.rootfs_bytes) else { continue };
                let Some(g) = gpt.partitions.iter().find(|g| g.name == s.partition) else { continue };
                use std::io::{Read, Seek, SeekFrom};
                let mut f = std::fs::File::open(p)?;
                f.seek(SeekFrom::Start(g.start))?;
                let index = casync::index_of(std::io::BufReader::new(f).take(len))?;
                ids.extend(index.iter().map(|e| e.id));
                indexes.entry(rel.build_id.clone()).or_insert(index);
                images.extend(s.external_images.iter().flat_map(|x| &x.images).map(|e| serde_json::to_string(e).unwrap_or_default()));
                if !builds.iter().any(|x: &BaseBuild| x.build_id == rel.build_id) {
                    let root_hash = match &s.verity {
                        Some(v) => Some(crate::format::verity::stored_root(&mut crate::base::window::Window::new(std::fs::File::open(p)?, g.start, g.size), v.hash_offset).with_context(what)?),
                        None => None,
                    };
                    builds.push(BaseBuild { build_id: rel.build_id.clone(), version: rel.version.clone(), rootfs_size: Some(len), root_hash, seed_offsets: None });
                }
                any = true;
            }
            if !any {
                bail!("{}: no slot of this disk holds a slotforge rootfs", what());
            }
            // The kernels and initrds its slots boot (BLS entries): a delta may leave them out.
            boot_files.extend(crate::format::inspect::esp_file_digests(p, &rep, &["a/vmlinuz", "b/vmlinuz", "a/initrd.img", "b/initrd.img"]).with_context(what)?);
            // The sealed images its slots pin, from its images partition: seeds by service name.
            if let Some(fs) = crate::format::inspect::open_images(p, &rep).with_context(what)? {
                for e in rep.slots.iter().filter_map(|s| s.external_images.as_ref()).flat_map(|x| &x.images) {
                    let Some(s) = &e.sealed else { continue };
                    let Ok(d) = Digest::parse(&s.digest) else { continue };
                    if sealed.get(&e.name).is_some_and(|(ds, _)| ds.iter().any(|(x, _)| *x == d)) {
                        continue;
                    }
                    if let Ok(f) = fs.open(format!("/blobs/sha256/{}", d.hex()).as_str()) {
                        let entry = sealed.entry(e.name.clone()).or_default();
                        let index = casync::index_of(std::io::BufReader::new(f))?;
                        entry.1.extend(index.iter().map(|x| x.id));
                        entry.0.push((d, index));
                    }
                }
            }
        }
    }
    Ok(bases)
}

fn put_file(stage: &Stage, p: &Path) -> anyhow::Result<Blob> {
    let (digest, size) = digest_reader(std::fs::File::open(p)?)?;
    let dest = stage.path().join("blobs/sha256").join(digest.hex());
    if !dest.exists() {
        std::fs::copy(p, &dest)?;
    }
    Ok(Blob { digest, size })
}

fn put_content(stage: &Stage, c: &crate::format::tree::Content) -> anyhow::Result<Blob> {
    let tmp = stage.path().join(".content");
    std::io::copy(&mut c.open()?, &mut std::fs::File::create(&tmp)?)?;
    let b = put_file(stage, &tmp)?;
    std::fs::remove_file(tmp)?;
    Ok(b)
}

fn put_bytes(stage: &Stage, bytes: &[u8]) -> anyhow::Result<Blob> {
    let digest = Digest::of_bytes(bytes);
    std::fs::write(stage.path().join("blobs/sha256").join(digest.hex()), bytes)?;
    Ok(Blob { digest, size: bytes.len() as u64 })
}

fn put_json(stage: &Stage, v: &serde_json::Value) -> anyhow::Result<Blob> {
    put_bytes(stage, &serde_json::to_vec(v)?)
}

/// `slotforge bundle`: compose the build (refused if over any cap) and write its bundle.
pub fn bundle(opts: &BundleOptions) -> anyhow::Result<BundleSummary> {
    // Keys first: a wrong password should fail before minutes of composing.
    let password = std::env::var(crate::format::signature::PASSWORD_ENV).ok();
    let keys: Vec<_> = opts
        .sign
        .iter()
        .map(|p| {
            let t = std::fs::read_to_string(p).with_context(|| format!("reading secret key {}", p.display()))?;
            crate::format::signature::parse_secret(&t, password.clone()).with_context(|| format!("secret key {}", p.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    let bases = if opts.delta_from.is_empty() { None } else { Some(base_chunks(&opts.delta_from)?) };
    let c = compose(&opts.compose)?;
    let stage = Stage::new()?;
    // The rootfs: whole in a full bundle; in a delta, only the chunks no base has. Both carry
    // its casync index.
    let rootfs = match &bases {
        None => put_file(&stage, &c.rootfs_image)?,
        Some(_) => {
            let (digest, size) = digest_reader(std::fs::File::open(&c.rootfs_image)?)?;
            Blob { digest, size }
        }
    };
    let caibx = c.work.path().join("rootfs.caibx");
    let store = stage.path().join(CHUNK_STORE);
    // The index covers the squashfs (to the hash offset): the device makes the dm-verity tree
    // from the data, as the build did, so no hash block travels (docs/upgrade-protocol.md).
    let data_len = c.verity.as_ref().map_or(u64::MAX, |v| v.hash_offset);
    let chunked = crate::format::casync::chunk_file_except(&c.rootfs_image, data_len, &caibx, &store, &|id| bases.as_ref().is_none_or(|b| b.chunks.contains(id)))?;
    let rootfs_index = put_file(&stage, &caibx)?;
    let mut delta = bases.as_ref().map(|b| DeltaSummary { bases: b.builds.clone(), chunks: chunked.chunks, chunks_shipped: chunked.new_chunks, chunk_bytes_shipped: chunked.new_chunk_bytes, images_left_out: vec![], boot_files_left_out: vec![], sealed: vec![] });
    let mut sealed_chunks = std::collections::BTreeMap::new();
    // Seed offsets of a delta (its bases' rootfs, sealed images' predecessors): layers of their own.
    let mut base_layers = Vec::new();
    let kernel = put_content(&stage, c.kernel())?;
    let initrd = c.initrd().map(|i| put_content(&stage, i)).transpose()?;
    // A delta leaves out a kernel or initrd a base had (BLS boot: the device copies it from its
    // ESP, checked against the digest).
    let on_base = |x: &Blob| !c.uki() && bases.as_ref().is_some_and(|b| b.boot_files.contains(&x.digest));
    let boot_left_out: Vec<&Blob> = std::iter::once(&kernel).chain(initrd.iter()).filter(|x| on_base(x)).collect();
    for x in &boot_left_out {
        std::fs::remove_file(stage.path().join("blobs/sha256").join(x.digest.hex()))?;
    }
    if let Some(d) = delta.as_mut() {
        d.boot_files_left_out = boot_left_out.iter().map(|x| if x.digest == kernel.digest { "vmlinuz" } else { "initrd.img" }.to_string()).collect();
    }
    let mut index = Vec::new();
    let mut images = Vec::new();
    for (e, img) in c.external() {
        let on_base = bases.as_ref().is_some_and(|b| b.images.contains(&serde_json::to_string(e).unwrap_or_default()));
        if on_base {
            if let Some(d) = delta.as_mut() {
                d.images_left_out.push(e.name.clone());
            }
        }
        if !opts.without_images && !on_base {
            stage.add_external(e, img, c.sealed_file(&e.name), &mut |_| {})?;
            // A delta ships a sealed image as the chunks the same service's sealed image on the
            // base lacks; the device assembles it from that one.
            let seeds = bases.as_ref().and_then(|b| b.sealed.get(&e.name));
            if let (Some((seed_digests, seed_ids)), Some(s), Some((file, _))) = (seeds, &e.sealed, c.sealed_file(&e.name)) {
                let d = Digest::parse(&s.digest).map_err(|x| anyhow::anyhow!(x))?;
                std::fs::remove_file(stage.path().join("blobs/sha256").join(d.hex()))?;
                let idx = c.work.path().join(format!("sealed-{}.caibx", e.name));
                let ch = crate::format::casync::chunk_file_except(file, s.hash_offset, &idx, &store, &|id| seed_ids.contains(id))?;
                let index = put_file(&stage, &idx)?;
                // Where each seed holds the new image's chunks: the device copies them unscanned.
                let new = crate::format::casync::parse_index(&std::fs::read(&idx)?)?;
                let mut seed_offsets = Vec::new();
                for (_, seed_index) in seed_digests {
                    let blob = put_bytes(&stage, &crate::format::casync::seed_offsets(&new, seed_index))?;
                    base_layers.push(json!({"mediaType": MT_SEED_OFFSETS, "digest": blob.digest, "size": blob.size, "annotations": {"org.opencontainers.image.title": format!("sealed-{}.offsets", e.name)}}));
                    seed_offsets.push(blob);
                }
                sealed_chunks.insert(s.digest.clone(), SealedChunks { index, seeds: seed_digests.iter().map(|(d, _)| d.clone()).collect(), seed_offsets });
                if let Some(dl) = delta.as_mut() {
                    dl.sealed.push(SealedDelta { name: e.name.clone(), bytes: ch.bytes, chunks: ch.chunks, chunks_shipped: ch.new_chunks, chunk_bytes_shipped: ch.new_chunk_bytes });
                }
            }
            index.push(json!({"mediaType": img.manifest_media_type, "digest": img.manifest_digest.to_string(), "size": img.manifest_bytes.len(),
                "annotations": {REF_NAME: format!("{}.{}", c.build_id, e.name), ANN_IMAGE: e.name}}));
        }
        images.push(e.clone());
    }
    images.sort_by(|a, b| a.name.cmp(&b.name));
    let mut layouts = vec![&c.layout];
    layouts.extend(c.compat.iter());
    // UKI mode: one signed image per slot, each embedding that slot's command line. The slot
    // partition names must agree across the layouts it is for (they are inside the signature).
    let mut ukis = std::collections::BTreeMap::new();
    let mut uki_layers = Vec::new();
    if c.uki() {
        for l in &c.compat {
            for slot in [Slot::A, Slot::B] {
                if l.rootfs(slot).name != c.layout.rootfs(slot).name {
                    bail!("layout {} names slot {} {}, layout {} names it {}: a UKI embeds the partition name, so one bundle cannot serve both", l.name, slot.name(), l.rootfs(slot).name, c.layout.name, c.layout.rootfs(slot).name);
                }
            }
        }
        for slot in [Slot::A, Slot::B] {
            let f = c.work.path().join(format!("uki-{}.efi", slot.name()));
            c.slot_uki(&c.layout, slot, "", &f)?;
            let blob = put_file(&stage, &f)?;
            uki_layers.push(json!({"mediaType": MT_UKI, "digest": blob.digest, "size": blob.size, "annotations": {"org.opencontainers.image.title": format!("slot-{}.efi", slot.name())}}));
            ukis.insert(slot.name().to_string(), blob);
        }
    }
    let requires = Requires {
        rootfs_bytes: c.rootfs_bytes,
        layouts: c.caps.iter().zip(&layouts).map(|(cap, l)| LayoutReq { name: l.name.clone(), generation: l.generation, cap: cap.cap }).collect(),
    };
    // A delta says where each base holds the new rootfs's chunks: a device running that build
    // seeds from its slot without chunking it (docs/upgrade-protocol.md#chunks-and-delta-bundles).
    if let (Some(b), Some(d)) = (&bases, delta.as_mut()) {
        let new = crate::format::casync::parse_index(&std::fs::read(&caibx)?)?;
        for bb in d.bases.iter_mut() {
            let Some(e) = b.indexes.get(&bb.build_id) else { continue };
            let blob = put_bytes(&stage, &crate::format::casync::seed_offsets(&new, e))?;
            base_layers.push(json!({"mediaType": MT_SEED_OFFSETS, "digest": blob.digest, "size": blob.size, "annotations": {"org.opencontainers.image.title": format!("base-{}.offsets", bb.build_id)}}));
            if bb.root_hash.is_none() {
                // No tree to recognise it by (a build without verity): the device chunks its slot.
                bb.rootfs_size = None;
                continue;
            }
            // The base's whole image (data and hash area, as its slot holds it), not its index's end.
            bb.seed_offsets = Some(blob);
        }
    }
    let config = BundleConfig {
        format: FORMAT,
        build_id: c.build_id.clone(),
        version: c.version().into(),
        rootfs: rootfs.clone(),
        kernel: kernel.clone(),
        initrd: initrd.clone(),
        cmdline: c.cmdline().into(),
        requires: requires.clone(),
        verity: c.verity.clone(),
        ukis,
        images,
        images_included: !opts.without_images,
        chunks: Some(Chunks { index: rootfs_index.clone(), delta_from: delta.as_ref().map(|d| d.bases.clone()).unwrap_or_default(), sealed: sealed_chunks }),
    };
    let cfg_bytes = serde_json::to_vec(&config)?;
    let cfg = put_bytes(&stage, &cfg_bytes)?;
    // A delta's rootfs blob is not in the layout, so no layer names it.
    let mut layers = Vec::new();
    if delta.is_none() {
        layers.push(json!({"mediaType": MT_ROOTFS, "digest": rootfs.digest, "size": rootfs.size, "annotations": {"org.opencontainers.image.title": "rootfs.img"}}));
    }
    layers.push(json!({"mediaType": MT_CAIBX, "digest": rootfs_index.digest, "size": rootfs_index.size, "annotations": {"org.opencontainers.image.title": "rootfs.caibx"}}));
    layers.extend(base_layers);
    if !on_base(&kernel) {
        layers.push(json!({"mediaType": MT_KERNEL, "digest": kernel.digest, "size": kernel.size, "annotations": {"org.opencontainers.image.title": "vmlinuz"}}));
    }
    layers.extend(uki_layers);
    if let Some(i) = initrd.as_ref().filter(|i| !on_base(i)) {
        layers.push(json!({"mediaType": MT_INITRD, "digest": i.digest, "size": i.size, "annotations": {"org.opencontainers.image.title": "initrd.img"}}));
    }
    let manifest = put_json(&stage, &json!({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "artifactType": MT_CONFIG,
        "config": {"mediaType": MT_CONFIG, "digest": cfg.digest, "size": cfg.size}, "layers": layers}))?;
    index.insert(0, json!({"mediaType": MT_OCI_MANIFEST, "digest": manifest.digest, "size": manifest.size, "annotations": {REF_NAME: c.build_id}}));
    // Signatures: one OCI 1.1 artifact per key whose subject is the bundle manifest and whose
    // layer is the .minisig over the config blob (which pins every other blob by digest).
    let mut signed_by = Vec::new();
    for (sk, id) in &keys {
        let comment = format!("slotforge bundle {} version {} config {}", c.build_id, c.version(), cfg.digest);
        let sig = put_bytes(&stage, crate::format::signature::sign(sk, &cfg_bytes, &comment)?.as_bytes())?;
        let empty = put_bytes(&stage, b"{}")?;
        let sm = put_json(&stage, &json!({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "artifactType": MT_SIGNATURE_ARTIFACT,
            "config": {"mediaType": MT_EMPTY, "digest": empty.digest, "size": empty.size},
            "layers": [{"mediaType": MT_MINISIG, "digest": sig.digest, "size": sig.size, "annotations": {"org.opencontainers.image.title": "config.minisig", ANN_KEY_ID: id}}],
            "subject": {"mediaType": MT_OCI_MANIFEST, "digest": manifest.digest, "size": manifest.size}}))?;
        index.push(json!({"mediaType": MT_OCI_MANIFEST, "digest": sm.digest, "size": sm.size, "artifactType": MT_SIGNATURE_ARTIFACT, "annotations": {ANN_KEY_ID: id}}));
        signed_by.push(id.clone());
    }
    std::fs::write(stage.path().join("index.json"), serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": index}))?)?;
    std::fs::write(stage.path().join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let bytes = write_out(stage.path(), &opts.output, c.epoch)?;
    Ok(BundleSummary { output: opts.output.clone(), build_id: c.build_id.clone(), version: c.version().into(), rootfs_bytes: c.rootfs_bytes, bundle_bytes: bytes, requires, signed_by, delta })
}

/// A tar (sorted members, fixed times and owners) if `out` ends in `.tar`, else a directory.
fn write_out(dir: &Path, out: &Path, epoch: u64) -> anyhow::Result<u64> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = vec![dir.join("oci-layout"), dir.join("index.json")];
    let mut blobs: Vec<PathBuf> = std::fs::read_dir(dir.join("blobs/sha256"))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    blobs.sort();
    files.extend(blobs);
    let store = dir.join(CHUNK_STORE);
    let mut dirs = vec!["blobs/".to_string(), "blobs/sha256/".to_string()];
    if store.is_dir() {
        let mut subs: Vec<PathBuf> = std::fs::read_dir(&store)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        subs.sort();
        dirs.push(format!("{CHUNK_STORE}/"));
        for s in subs {
            dirs.push(format!("{}/", s.strip_prefix(dir).unwrap().display()));
            let mut chunks: Vec<PathBuf> = std::fs::read_dir(&s)?.map(|e| e.map(|e| e.path())).filter(|p| p.as_ref().map_or(true, |p| p.extension().is_some_and(|e| e == "cacnk"))).collect::<Result<_, _>>()?;
            chunks.sort();
            files.extend(chunks);
        }
    }
    if out.extension().is_some_and(|e| e == "tar") {
        let tmp = tempfile::Builder::new().prefix(".bundle.").suffix(".partial").tempfile_in(parent)?;
        let mut b = tar::Builder::new(tmp.as_file());
        let mut total = 0;
        for d in &dirs {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_path(d)?;
            h.set_mode(0o755);
            h.set_mtime(epoch);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, std::io::empty())?;
        }
        for f in &files {
            let rel = f.strip_prefix(dir).unwrap();
            let len = std::fs::metadata(f)?.len();
            let mut h = tar::Header::new_ustar();
            h.set_path(rel)?;
            h.set_mode(0o644);
            h.set_mtime(epoch);
            h.set_size(len);
            h.set_cksum();
            b.append(&h, std::fs::File::open(f)?)?;
            total += len;
        }
        b.finish()?;
        drop(b);
        tmp.as_file().sync_all()?;
        tmp.persist(out).map_err(|e| anyhow::anyhow!("writing {}: {}", out.display(), e.error))?;
        Ok(total)
    } else {
        if out.exists() {
            bail!("{} exists; remove it or name a .tar", out.display());
        }
        let tmp = tempfile::Builder::new().prefix(".bundle.").tempdir_in(parent)?;
        for d in &dirs {
            std::fs::create_dir_all(tmp.path().join(d))?;
        }
        let mut total = 0;
        for f in &files {
            total += std::fs::copy(f, tmp.path().join(f.strip_prefix(dir).unwrap()))?;
        }
        std::fs::rename(tmp.keep(), out).with_context(|| format!("writing {}", out.display()))?;
        Ok(total)
    }
}
