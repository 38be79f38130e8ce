//! `slotforge push BUNDLE REF`: a bundle published as a release in an OCI registry
//! (format::published): its rootfs cut into casync chunks, those the repository's earlier
//! releases hold pointed at in their packs and only the others packed and uploaded
//! (format::packs); its boot files;
//! its sealed external images (the sealed blob whole, its artifact a referrer of the image);
//! its signatures as referrers of the release manifest — through the referrers API where the
//! registry has it, else the referrers tag `sha256-<hex>`.

use crate::base::hash::Digest;
use crate::format::bundle::{Blob, Bundle, MT_INITRD, MT_KERNEL, MT_UKI};
use crate::format::casync;
use crate::format::published;
use crate::oci::image::{MT_OCI_INDEX, MT_OCI_MANIFEST};
use crate::oci::reference::ImageRef;
use crate::oci::registry::Registry;
use std::io::Read;
use anyhow::{bail, Context};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct PushSummary {
    pub reference: String,
    pub manifest_digest: String,
    pub build_id: String,
    pub version: String,
    pub chunks: usize,
    /// Packs the release's chunks are in, and of those the ones uploaded (new chunks; the rest
    /// are earlier releases' packs, pointed at).
    pub packs: usize,
    pub packs_uploaded: usize,
    /// Distinct chunks found in packs of the releases the repository holds (`releases_seen` of
    /// them), and those packed anew.
    pub chunks_reused: usize,
    pub chunks_new: usize,
    pub releases_seen: usize,
    /// Bytes of every blob uploaded (packs, boot files, sealed images, metadata).
    pub bytes_uploaded: u64,
    /// Sealed external images published with the release, and of those the ones whose sealed
    /// blob the registry did not have.
    pub sealed_images: usize,
    pub sealed_uploaded: usize,
    /// `--next-to-images`: the image repositories (`HOST/REPO`) that received a sealed artifact.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub next_to_images: Vec<String>,
    pub signatures: usize,
    /// `api` (the registry indexed the signatures' subject) or `tag` (`sha256-<hex>`).
    pub referrers: String,
}

/// Push the bundle at `src` (directory or tar; a full bundle) to `reference` (`[docker://]HOST/REPO:TAG`).
pub fn push(src: &Path, reference: &str, insecure: &[String], next_to_images: bool, on_chunk: &mut dyn FnMut(usize, usize)) -> anyhow::Result<PushSummary> {
    let b = Bundle::open(src, None).with_context(|| format!("opening bundle {}", src.display()))?;
    let cfg = &b.config;
    let rootfs = b.blob_path(&cfg.rootfs.digest);
    if !rootfs.exists() {
        bail!("bundle {} is a delta (its rootfs is not in it); push the full bundle: the registry stores its chunks in packs, so an earlier release's packs are not uploaded again", cfg.build_id);
    }
    let ImageRef::Registry { host, repo, tag: Some(tag), digest: None } = ImageRef::parse(reference, Path::new(".")).map_err(|e| anyhow::anyhow!(e))? else {
        bail!("push to {reference:?}: give a registry reference with a tag, [docker://]HOST/REPO:TAG");
    };
    let reg = Registry::new(&host, insecure)?;
    let bytes_uploaded = std::cell::Cell::new(0u64);
    let mut put = |d: &Digest, bytes: &[u8]| -> anyhow::Result<bool> {
        let up = reg.push_blob(&repo, d, bytes)?;
        if up {
            bytes_uploaded.set(bytes_uploaded.get() + bytes.len() as u64);
        }
        Ok(up)
    };
    // The chunks of the rootfs and of the sealed images the release carries: those in packs of
    // releases the repository holds pointed at there, the others packed anew, together.
    // The data only (as the bundle's index): the device makes the dm-verity tree.
    let data_len = b.config.verity.as_ref().map_or(u64::MAX, |v| v.hash_offset);
    let index = casync::index_of(std::io::BufReader::new(std::fs::File::open(&rootfs)?.take(data_len)))?;
    let sources = sealed_sources(&b)?;
    let mut blobs = vec![(std::fs::File::open(&rootfs)?, starts_of(&index))];
    for s in &sources {
        blobs.push((std::fs::File::open(&s.path)?, starts_of(&s.index)));
    }
    let indexes: Vec<&[casync::Entry]> = std::iter::once(index.as_slice()).chain(sources.iter().map(|s| s.index.as_slice())).collect();
    let (known, releases_seen) = known_chunks(&reg, &repo)?;
    let mut packs_uploaded = 0;
    let packed = crate::format::packs::pack(
        &indexes,
        &known,
        crate::format::packs::MIN_REUSE,
        |k, i| {
            let (f, starts) = &blobs[k];
            let mut buf = vec![0u8; (starts[i + 1] - starts[i]) as usize];
            std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, starts[i])?;
            Ok(zstd::bulk::compress(&buf, 3)?)
        },
        |pack| {
            let d = Digest::of_bytes(pack);
            if put(&d, pack)? {
                packs_uploaded += 1;
            }
            Ok(d)
        },
        |done, total| on_chunk(done, total),
    )?;
    let all_packs = packed.tables.iter().flat_map(|t| t.packs.iter().map(|p| &p.digest)).collect::<std::collections::HashSet<_>>().len();
    let mut tables = packed.tables.into_iter();
    let table = tables.next().expect("the rootfs's table");
    // Boot files, then the inline metadata (registries want every layer's blob).
    let mut files = vec![published::File { media_type: MT_KERNEL.into(), blob: cfg.kernel.clone(), title: "vmlinuz".into() }];
    files.extend(cfg.initrd.iter().map(|i| published::File { media_type: MT_INITRD.into(), blob: i.clone(), title: "initrd.img".into() }));
    files.extend(cfg.ukis.iter().map(|(s, u)| published::File { media_type: MT_UKI.into(), blob: u.clone(), title: format!("slot-{s}.efi") }));
    for f in &files {
        let p = b.blob_path(&f.blob.digest);
        let bytes = std::fs::read(&p).with_context(|| format!("bundle blob {} ({})", f.blob.digest, f.title))?;
        put(&f.blob.digest, &bytes)?;
    }
    let caibx = casync::index_bytes(&index);
    let table_bytes = serde_json::to_vec(&table)?;
    for bytes in [&b.config_bytes, &caibx, &table_bytes] {
        put(&Digest::of_bytes(bytes), bytes)?;
    }
    put(&Digest::of_bytes(b"{}"), b"{}")?;
    let mut referrers = "api";
    let (sealed, sealed_uploaded, sealed_bytes) = push_sealed(&reg, &repo, sources, tables.collect(), &mut put, &mut referrers)?;
    let next_to = if next_to_images { publish_next_to_images(&reg, &host, &b)? } else { vec![] };
    bytes_uploaded.set(bytes_uploaded.get() + sealed_bytes);
    let manifest = published::manifest(&b.config_bytes, &caibx, &table, &files, &sealed);
    let md = Digest::of_bytes(&manifest);
    reg.put_manifest(&repo, &tag, &manifest, MT_OCI_MANIFEST)?;
    // Signatures: referrers of the release manifest.
    for text in &b.signatures {
        let sig = Blob { digest: Digest::of_bytes(text.as_bytes()), size: text.len() as u64 };
        put(&sig.digest, text.as_bytes())?;
        let key_id = crate::format::signature::signature_key_id(text).unwrap_or_default();
        let sm = published::signature_manifest((&md, manifest.len() as u64), &sig, text, &key_id);
        let sd = Digest::of_bytes(&sm);
        if !reg.put_manifest(&repo, sd.as_str(), &sm, MT_OCI_MANIFEST)? {
            referrers = "tag";
            let rt = published::referrers_tag(&md);
            let existing = reg.try_manifest(&repo, &rt)?.map(|(b, _)| b);
            let list = published::with_referrer(existing.as_deref(), &sm)?;
            reg.put_manifest(&repo, &rt, &list, MT_OCI_INDEX)?;
        }
    }
    Ok(PushSummary {
        reference: format!("{host}/{repo}:{tag}"),
        manifest_digest: md.to_string(),
        build_id: cfg.build_id.clone(),
        version: cfg.version.clone(),
        chunks: index.len(),
        packs: all_packs,
        packs_uploaded,
        chunks_reused: packed.reused,
        chunks_new: packed.fresh,
        releases_seen,
        bytes_uploaded: bytes_uploaded.get(),
        sealed_images: sealed.len(),
        sealed_uploaded,
        next_to_images: next_to,
        signatures: b.signatures.len(),
        referrers: if b.signatures.is_empty() { "none".into() } else { referrers.into() },
    })
}

/// How many releases a push reads for chunks it need not upload again.
const MAX_RELEASES_SEEN: usize = 256;

/// The chunks already in packs of the releases the repository holds (its tags other than
/// referrers tags, sorted, at most [`MAX_RELEASES_SEEN`]; a tag that is not a release, or whose
/// table does not read, is passed over), and how many releases that was.
fn known_chunks(reg: &Registry, repo: &str) -> anyhow::Result<(crate::format::packs::Known, usize)> {
    let mut known = crate::format::packs::Known::default();
    let mut tags: Vec<String> = reg.tags(repo, 4096)?.into_iter().filter(|t| !t.starts_with("sha256-")).collect();
    tags.sort();
    let (mut seen, mut releases) = (std::collections::HashSet::new(), 0);
    for tag in tags {
        if releases >= MAX_RELEASES_SEEN {
            break;
        }
        let Some((bytes, _)) = reg.try_manifest(repo, &tag)? else { continue };
        if !seen.insert(Digest::of_bytes(&bytes)) {
            continue;
        }
        let Ok(p) = published::parse(&bytes) else { continue };
        let Ok(index) = casync::parse_index(&p.caibx) else { continue };
        if known.add(&p.table, &index).is_ok() {
            releases += 1;
        }
        for si in &p.sealed {
            if let (Some(t), Ok(index)) = (&si.table, casync::parse_index(&si.caibx)) {
                let _ = known.add(t, &index);
            }
        }
    }
    Ok((known, releases))
}

/// Where each chunk of an index starts, and the end.
fn starts_of(index: &[casync::Entry]) -> Vec<u64> {
    std::iter::once(0).chain(index.iter().map(|e| e.end)).collect()
}

/// A sealed external image the bundle carries, to publish with the release.
struct SealedSource {
    name: String,
    media_type: String,
    blob: Blob,
    path: std::path::PathBuf,
    manifest: Vec<u8>,
    config: Vec<u8>,
    config_media_type: String,
    artifact: Vec<u8>,
    index: Vec<casync::Entry>,
}

/// The sealed external images the bundle carries (with its images; not one whose layers are
/// kept, `keep-layers`): a bundle without them leaves the device to pull them at first boot.
fn sealed_sources(b: &Bundle) -> anyhow::Result<Vec<SealedSource>> {
    let mut out = Vec::new();
    if !b.config.images_included {
        return Ok(out);
    }
    let parse = |s: &str| Digest::parse(s).map_err(|e| anyhow::anyhow!(e));
    for e in &b.config.images {
        let Some(s) = e.sealed.as_ref().filter(|_| !e.keep_layers) else { continue };
        let sd = parse(&s.digest)?;
        let path = b.blob_path(&sd);
        if !path.exists() {
            continue;
        }
        let read = |d: &Digest, what: &str| std::fs::read(b.blob_path(d)).with_context(|| format!("bundle blob {d} ({} {what})", e.name));
        let manifest = read(&parse(&e.digest)?, "manifest")?;
        let mv: serde_json::Value = serde_json::from_slice(&manifest).with_context(|| format!("{} manifest", e.name))?;
        let config = read(&parse(mv["config"]["digest"].as_str().unwrap_or(""))?, "config")?;
        let artifact = read(&parse(&s.artifact)?, "sealed artifact")?;
        let index = casync::index_of(std::io::BufReader::new(std::fs::File::open(&path)?.take(s.hash_offset)))?;
        out.push(SealedSource {
            name: e.name.clone(),
            media_type: e.media_type.clone(),
            blob: Blob { digest: sd, size: s.size },
            path,
            config_media_type: mv["config"]["mediaType"].as_str().unwrap_or("application/vnd.oci.image.config.v1+json").to_string(),
            manifest,
            config,
            artifact,
            index,
        });
    }
    Ok(out)
}

/// The sealed images published: the sealed blob whole (if the registry lacks it: the sealed
/// artifact needs it), the small blobs, and the sealed artifact manifest as a referrer of the
/// image's manifest (referrers API, else the tag `sha256-<hex of the image manifest>`); their
/// chunks are in the release's packs too (`tables`, one per image). Returns the images for the
/// release manifest, how many sealed blobs were uploaded and their bytes.
fn push_sealed(reg: &Registry, repo: &str, sources: Vec<SealedSource>, tables: Vec<crate::format::packs::PackTable>, put: &mut dyn FnMut(&Digest, &[u8]) -> anyhow::Result<bool>, referrers: &mut &str) -> anyhow::Result<(Vec<published::SealedImage>, usize, u64)> {
    let mut out = Vec::new();
    let (mut uploaded, mut bytes) = (0, 0);
    for (s, table) in sources.into_iter().zip(tables) {
        let caibx = casync::index_bytes(&s.index);
        let table = serde_json::to_vec(&table)?;
        if reg.push_blob_file(repo, &s.blob.digest, &s.path, s.blob.size)? {
            uploaded += 1;
            bytes += s.blob.size;
        }
        // Inline layers too: registries want every layer's blob.
        for bytes in [&s.manifest, &s.config, &s.artifact, &caibx, &table] {
            put(&Digest::of_bytes(bytes), bytes)?;
        }
        // The sealed artifact as it is in the images partition: a referrer of the image.
        let (md, ad) = (Digest::of_bytes(&s.manifest), Digest::of_bytes(&s.artifact));
        if !reg.put_manifest(repo, ad.as_str(), &s.artifact, MT_OCI_MANIFEST)? {
            *referrers = "tag";
            let rt = published::referrers_tag(&md);
            let existing = reg.try_manifest(repo, &rt)?.map(|(b, _)| b);
            reg.put_manifest(repo, &rt, &published::with_referrer(existing.as_deref(), &s.artifact)?, MT_OCI_INDEX)?;
        }
        out.push(published::SealedImage {
            name: s.name,
            manifest_media_type: s.media_type,
            manifest: s.manifest,
            config_media_type: s.config_media_type,
            config: s.config,
            artifact: s.artifact,
            caibx,
            blob: s.blob,
            table: Some(table),
        });
    }
    Ok((out, uploaded, bytes))
}

/// `--next-to-images`: each sealed image the bundle carries, published in its image's own
/// repository when that is on `host` (the registry pushed to): the sealed blob, the empty config
/// and the artifact manifest, a referrer of the image's manifest there. Returns the repositories.
fn publish_next_to_images(reg: &Registry, host: &str, b: &Bundle) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in &b.config.images {
        let Some(s) = e.sealed.as_ref() else { continue };
        let sd = Digest::parse(&s.digest).map_err(|e| anyhow::anyhow!(e))?;
        let (path, artifact) = (b.blob_path(&sd), b.blob_path(&Digest::parse(&s.artifact).map_err(|e| anyhow::anyhow!(e))?));
        if !path.exists() || !artifact.exists() {
            continue;
        }
        let Ok(ImageRef::Registry { host: ih, repo, .. }) = ImageRef::parse(&e.reference, Path::new(".")) else { continue };
        if ih != host {
            continue;
        }
        reg.push_blob_file(&repo, &sd, &path, s.size)?;
        reg.push_blob(&repo, &Digest::of_bytes(crate::format::sealed::EMPTY_JSON), crate::format::sealed::EMPTY_JSON)?;
        let bytes = std::fs::read(&artifact)?;
        if !reg.put_manifest(&repo, &s.artifact, &bytes, MT_OCI_MANIFEST)? {
            let md = Digest::parse(&e.digest).map_err(|e| anyhow::anyhow!(e))?;
            let rt = published::referrers_tag(&md);
            let existing = reg.try_manifest(&repo, &rt)?.map(|(b, _)| b);
            reg.put_manifest(&repo, &rt, &published::with_referrer(existing.as_deref(), &bytes)?, MT_OCI_INDEX)?;
        }
        out.push(format!("{host}/{repo}"));
    }
    Ok(out)
}
