//! A release fetched from an OCI registry by tag, for the apply (format::published): resolve the
//! tag; read the signatures from the manifest's referrers and decide them with the running
//! slot's keys, and check the layout, before any content is fetched; then fetch only the chunks
//! neither the running slot nor an earlier, interrupted pull holds — one range request per pack
//! holding some — each checked against its id as it arrives and kept, so a dropped connection
//! costs at most the chunk in flight. The result is a [`Bundle`] the apply takes like
//! any other (docs/upgrade-protocol.md#releases-in-a-registry).

use super::Target;
use crate::base::hash::Digest;
use crate::format::bundle::{BaseBuild, Blob, Bundle};
use crate::format::casync::{self, Entry, Seeds};
use crate::format::packs::PackTable;
use crate::format::published;
use crate::oci::mirrors::Endpoint;
use crate::oci::reference::ImageRef;
use crate::oci::registry::Registry;
use anyhow::{bail, Context};
use std::io::Read;
use std::path::{Path, PathBuf};

pub use crate::format::agent::PullReport;

/// A release resolved and trusted, nothing of its content fetched yet.
pub struct Resolved {
    reg: Registry,
    repo: String,
    pub reference: String,
    /// `HOST/REPO` that served it (the reference's own, or a mirror).
    pub served_by: String,
    pub manifest: Digest,
    parsed: published::Parsed,
    pub signatures: Vec<String>,
    pub config: crate::format::bundle::BundleConfig,
    pub decision: crate::format::signature::Decision,
    /// Requests sent until the decision.
    pub requests: usize,
}

/// Resolve `reference` (`[docker://]HOST/REPO:TAG` or `@sha256:…`) at its own registry, read its
/// signatures and decide them with `t`'s keys, check `t`'s layout: all before any content.
pub fn resolve(t: &mut dyn Target, reference: &str, insecure: &[String]) -> anyhow::Result<Resolved> {
    resolve_via(t, reference, insecure, &|host, repo, _| Ok(vec![Endpoint { host: host.into(), repo: repo.into(), insecure: false, mirror: false }]))
}

/// [`resolve`], the release read from the first of `endpoints(host, repo, by_digest)` that
/// serves its manifest (a mirror first, as registries.conf orders them). A mirror is trusted no
/// more than the registry: the signatures decide.
pub fn resolve_via(t: &mut dyn Target, reference: &str, insecure: &[String], endpoints: &dyn Fn(&str, &str, bool) -> anyhow::Result<Vec<Endpoint>>) -> anyhow::Result<Resolved> {
    let ImageRef::Registry { host, repo: asked_repo, tag, digest } = ImageRef::parse(reference, Path::new("/")).map_err(|e| anyhow::anyhow!(e))? else {
        bail!("{reference:?} is not a registry reference ([docker://]HOST/REPO:TAG)");
    };
    let at = digest.clone().or(tag.clone()).unwrap_or_else(|| "latest".into());
    let mut errors = Vec::new();
    let mut served = None;
    for ep in endpoints(&host, &asked_repo, digest.is_some())? {
        let mut insecure = insecure.to_vec();
        if ep.insecure {
            insecure.push(ep.host.clone());
        }
        let reg = Registry::new(&ep.host, &insecure)?;
        match reg.manifest(&ep.repo, &at) {
            Ok((bytes, _)) => {
                served = Some((reg, ep, bytes));
                break;
            }
            Err(e) => errors.push(format!("{}/{}: {e:#}", ep.host, ep.repo)),
        }
    }
    let Some((reg, ep, bytes)) = served else { bail!("{reference}: {}", errors.join("; ")) };
    let repo = ep.repo.clone();
    let md = Digest::of_bytes(&bytes);
    if digest.as_deref().is_some_and(|d| d != md.as_str()) {
        bail!("{reference}: the registry's manifest is {md}, not the digest asked for");
    }
    let parsed = published::parse(&bytes).with_context(|| format!("{reference}"))?;
    // Referrers: the API, else the fallback tag.
    let list = match reg.referrers(&repo, &md)? {
        Some(l) => Some(l),
        None => reg.try_manifest(&repo, &published::referrers_tag(&md))?.map(|(b, _)| b),
    };
    let signatures = list.as_deref().map(published::signatures).unwrap_or_default();
    let config: crate::format::bundle::BundleConfig = serde_json::from_slice(&parsed.config).context("release config")?;
    let keys = crate::format::signature::trusted_keys(&t.update_keys()?).context("reading the running slot's update keys")?;
    let decision = crate::format::signature::decide(&parsed.config, &signatures, &keys).map_err(|e| anyhow::anyhow!("release {reference} ({}) refused: {e:#}; nothing was fetched or changed", config.build_id))?;
    let layout = t.layout()?;
    if !config.requires.layouts.iter().any(|l| l.name == layout.name && l.generation == layout.generation) {
        bail!("release {reference} ({}) is not for this device's layout {} generation {}; nothing was fetched or changed", config.build_id, layout.name, layout.generation);
    }
    let requests = reg.requests();
    Ok(Resolved { reg, reference: format!("{host}/{asked_repo}:{at}"), served_by: format!("{}/{}", ep.host, ep.repo), repo, manifest: md, parsed, signatures, config, decision, requests })
}

/// Fetch what the apply of `r` needs into `dir` (kept between runs: what is there is not
/// fetched again) and return it as a bundle.
pub fn fetch(t: &mut dyn Target, r: Resolved, dir: &Path, on_bytes: &dyn Fn(u64)) -> anyhow::Result<(Bundle, PullReport)> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |b: &[u8]| -> anyhow::Result<Blob> {
        let d = Digest::of_bytes(b);
        crate::base::durable::write_durably(&blobs.join(d.hex()), &mut &b[..])?;
        Ok(Blob { digest: d, size: b.len() as u64 })
    };
    put(&r.parsed.config)?;
    let index = casync::parse_index(&r.parsed.caibx).context("release rootfs index")?;
    // The config pins the index; the index's chunks the rootfs.
    if r.config.chunks.as_ref().map(|c| &c.index.digest) != Some(&Digest::of_bytes(&r.parsed.caibx)) {
        bail!("release {}: its rootfs index is not the one its config pins; nothing was changed", r.reference);
    }
    put(&r.parsed.caibx)?;
    let (table, locs) = PackTable::parse(&r.parsed.table, &index).with_context(|| r.reference.clone())?;
    let mut bytes_fetched = 0u64;
    // Which chunks are here already: the running slot's (chunked), the store's.
    let store = dir.join(crate::format::bundle::CHUNK_STORE);
    let layout = t.layout()?;
    let running = t.running()?;
    let part = layout.rootfs(running).clone();
    let (mut f, start) = t.slot_seed(&part)?;
    let len = super::delta::image_len(&mut f, start, part.size);
    let mut seeds = Seeds::default();
    let mut hint = None;
    if len > 0 {
        let slot_index = casync::index_of(std::io::BufReader::new(crate::base::window::Window::new(f.try_clone()?, start, len)))?;
        seeds.add_at("running slot", f.try_clone()?, start, &index, &casync::offsets_of(&index, &slot_index));
        // The apply finds them the same way, without chunking the slot again.
        let root = super::delta::hash_offset(&mut f, start).and_then(|o| crate::format::verity::stored_root(&mut crate::base::window::Window::new(f.try_clone().ok()?, start, len), o).ok());
        if let Some(root) = root {
            let offsets = put(&casync::seed_offsets(&index, &slot_index))?;
            hint = Some(BaseBuild { build_id: format!("running slot {}", running.name()), version: String::new(), rootfs_size: Some(len), root_hash: Some(root), seed_offsets: Some(offsets) });
        }
    }
    let mut want: Vec<usize> = Vec::new();
    let mut local = 0;
    let mut wanted_ids = std::collections::HashSet::new();
    for (i, e) in index.iter().enumerate() {
        if seeds.has(&e.id) || casync::chunk_path(&store, &e.hex()).exists() {
            local += 1;
        } else if wanted_ids.insert(e.id) {
            want.push(i);
        }
    }
    // One range request per pack holding wanted chunks; each chunk checked and kept as it comes.
    let starts: Vec<u64> = std::iter::once(0).chain(index.iter().map(|e| e.end)).collect();
    let mut fetched = 0;
    for (p, _, _) in crate::format::packs::ranges(&locs, want.iter().copied()) {
        let mut attempts = 0;
        loop {
            let missing: Vec<usize> = want.iter().copied().filter(|&i| locs[i].pack == p && !casync::chunk_path(&store, &index[i].hex()).exists()).collect();
            let Some(&(_, a, b)) = crate::format::packs::ranges(&locs, missing.iter().copied()).first() else { break };
            attempts += 1;
            let pack = &table.packs[p];
            let res = (|| -> anyhow::Result<()> {
                let mut rd = r.reg.blob_range(&r.repo, &pack.digest, a, b)?;
                let mut order = missing.clone();
                order.sort_by_key(|&i| locs[i].offset);
                let mut pos = a;
                for i in order {
                    let l = locs[i];
                    std::io::copy(&mut Read::take(&mut rd, l.offset - pos), &mut std::io::sink())?;
                    let mut c = vec![0u8; l.len as usize];
                    rd.read_exact(&mut c).with_context(|| format!("pack {} bytes {}..{}", pack.digest, l.offset, l.offset + l.len))?;
                    pos = l.offset + l.len;
                    keep_chunk(&store, &index[i], (index[i].end - starts[i]) as usize, &c)?;
                    fetched += 1;
                    bytes_fetched += l.len;
                    on_bytes(l.len);
                }
                Ok(())
            })();
            match res {
                Ok(()) => break,
                Err(e) if attempts < 4 => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(250 * attempts));
                }
                Err(e) => return Err(e.context(format!("fetching chunks of {} (what arrived is kept; a rerun goes on from there)", r.reference))),
            }
        }
    }
    // Boot files: a kernel or initrd one of the slots boots already is copied from the ESP
    // (checked by digest), the others fetched.
    let cache = crate::base::cache::Cache::open_layout(dir)?;
    for f in &r.parsed.files {
        let name = match f.media_type.as_str() {
            crate::format::bundle::MT_KERNEL => Some("vmlinuz"),
            crate::format::bundle::MT_INITRD => Some("initrd.img"),
            _ => None,
        };
        for slot in [running, running.other()] {
            let Some(name) = name.filter(|_| !cache.has(&f.blob.digest)) else { break };
            let tmp = dir.join(format!(".esp-{name}"));
            if t.esp_copy_out(&format!("{}/{name}", slot.name()), &tmp)? {
                let _ = cache.put(std::fs::File::open(&tmp)?, &f.blob.digest, f.blob.size, name);
            }
            let _ = std::fs::remove_file(&tmp);
        }
        if !cache.has(&f.blob.digest) {
            r.reg.fetch_blob(&r.repo, &f.blob.digest, f.blob.size, &cache, on_bytes)?;
            bytes_fetched += f.blob.size;
        }
    }
    let mut b = Bundle::from_parts(dir, r.parsed.config.clone(), r.signatures.clone(), Some(dir))?;
    b.hints.extend(hint);
    let report = PullReport {
        reference: r.reference.clone(),
        served_by: r.served_by.clone(),
        manifest_digest: r.manifest.to_string(),
        build_id: r.config.build_id.clone(),
        version: r.config.version.clone(),
        signature: r.decision.clone(),
        chunks: index.len(),
        chunks_local: local,
        chunks_fetched: fetched,
        bytes_fetched,
        requests: r.reg.requests(),
        requests_before_decision: r.requests,
    };
    Ok((b, report))
}

/// Check a chunk's compressed bytes (bounded decode, its id) and store them as casync does.
fn keep_chunk(store: &Path, e: &Entry, len: usize, compressed: &[u8]) -> anyhow::Result<()> {
    let mut raw = Vec::with_capacity(len);
    zstd::stream::read::Decoder::new(compressed)?.take(len as u64 + 1).read_to_end(&mut raw).with_context(|| format!("chunk {} is not zstd", e.hex()))?;
    if raw.len() != len || casync::chunk_id(&raw) != e.id {
        bail!("chunk {} from the registry does not match its id; refused", e.hex());
    }
    let p = casync::chunk_path(store, &e.hex());
    std::fs::create_dir_all(p.parent().unwrap())?;
    let mut tmp = tempfile::NamedTempFile::new_in(p.parent().unwrap())?;
    std::io::Write::write_all(tmp.as_file_mut(), compressed)?;
    tmp.persist(&p).map_err(|e| e.error)?;
    Ok(())
}

/// Where a pull of `manifest` keeps its work under `scratch`.
pub fn work_dir(scratch: &Path, manifest: &Digest) -> PathBuf {
    scratch.join(format!("release-{}", &manifest.hex()[..16]))
}
