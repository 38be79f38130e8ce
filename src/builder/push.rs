//! `slotforge push BUNDLE REF`: a bundle published as a release in an OCI registry
//! (format::published): its rootfs cut into casync chunks and packed (format::packs), so a
//! registry that holds an earlier release receives only the packs that changed; its boot files;
//! its signatures as referrers of the release manifest — through the referrers API where the
//! registry has it, else the referrers tag `sha256-<hex>`.

use crate::base::hash::Digest;
use crate::format::bundle::{Blob, Bundle, MT_INITRD, MT_KERNEL, MT_UKI};
use crate::format::casync;
use crate::format::published;
use crate::oci::image::{MT_OCI_INDEX, MT_OCI_MANIFEST};
use crate::oci::reference::ImageRef;
use crate::oci::registry::Registry;
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
    pub packs: usize,
    /// Packs the registry did not have (the rest an earlier release pushed already).
    pub packs_uploaded: usize,
    /// Bytes of every blob uploaded (packs, boot files, metadata).
    pub bytes_uploaded: u64,
    pub signatures: usize,
    /// `api` (the registry indexed the signatures' subject) or `tag` (`sha256-<hex>`).
    pub referrers: String,
}

/// Push the bundle at `src` (directory or tar; a full bundle) to `reference` (`[docker://]HOST/REPO:TAG`).
pub fn push(src: &Path, reference: &str, insecure: &[String], on_pack: &mut dyn FnMut(usize, usize)) -> anyhow::Result<PushSummary> {
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
    let mut bytes_uploaded = 0u64;
    let mut put = |d: &Digest, bytes: &[u8]| -> anyhow::Result<bool> {
        let up = reg.push_blob(&repo, d, bytes)?;
        if up {
            bytes_uploaded += bytes.len() as u64;
        }
        Ok(up)
    };
    // The rootfs's chunks, packed in index order (a chunk seen before is stored once).
    let index = casync::index_of(std::io::BufReader::new(std::fs::File::open(&rootfs)?))?;
    let f = std::fs::File::open(&rootfs)?;
    let starts: Vec<u64> = std::iter::once(0).chain(index.iter().map(|e| e.end)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut packs_uploaded = 0;
    let total = crate::format::packs::plan(&index).len();
    let mut done = 0;
    let table = crate::format::packs::pack(
        &index,
        |i| {
            if !seen.insert(index[i].id) {
                return Ok(None);
            }
            let mut buf = vec![0u8; (index[i].end - starts[i]) as usize];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, starts[i])?;
            Ok(Some(zstd::bulk::compress(&buf, 3)?))
        },
        |pack| {
            let d = Digest::of_bytes(pack);
            if put(&d, pack)? {
                packs_uploaded += 1;
            }
            done += 1;
            on_pack(done, total);
            Ok(d)
        },
    )?;
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
    let manifest = published::manifest(&b.config_bytes, &caibx, &table, &files);
    let md = Digest::of_bytes(&manifest);
    reg.put_manifest(&repo, &tag, &manifest, MT_OCI_MANIFEST)?;
    // Signatures: referrers of the release manifest.
    let mut referrers = "api";
    put(&Digest::of_bytes(b"{}"), b"{}")?;
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
        packs: table.packs.len(),
        packs_uploaded,
        bytes_uploaded,
        signatures: b.signatures.len(),
        referrers: if b.signatures.is_empty() { "none".into() } else { referrers.into() },
    })
}
