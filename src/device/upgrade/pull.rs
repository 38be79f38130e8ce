//! A release fetched from an OCI registry by tag, for the apply (format::published): resolve the
//! tag; read the signatures from the manifest's referrers and decide them with the running
//! slot's keys, and check the layout, before any content is fetched; then fetch only the chunks
//! neither the running slot nor an earlier, interrupted pull holds — one range request per pack
//! holding some — each checked against its id as it arrives and kept, so a dropped connection
//! costs at most the chunk in flight. The result is a [`Bundle`] the apply takes like
//! any other (docs/upgrade-protocol.md#releases-in-a-registry).

use super::Target;
use crate::base::hash::Digest;
use crate::format::bundle::{BaseBuild, Blob, Bundle, SealedChunks};
use crate::format::casync::{self, Entry, Seeds};
use crate::format::packs::PackTable;
use crate::format::published;
use crate::oci::mirrors::Endpoint;
use crate::oci::reference::ImageRef;
use crate::oci::registry::Registry;
use anyhow::{bail, Context};
use std::io::Read;
use std::path::{Path, PathBuf};

pub use crate::format::agent::{PullReport, PulledImage};
use std::collections::BTreeMap;

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
    // The wanted chunks by pack; the sealed images' join them (or, for a release without their
    // pack tables, are read from their sealed blobs by range).
    let starts: Vec<u64> = std::iter::once(0).chain(index.iter().map(|e| e.end)).collect();
    let mut wants = PackWants::default();
    for &i in &want {
        let l = locs[i];
        wants.add(&table.packs[l.pack], PackWant { owner: 0, entry: index[i].clone(), raw_len: (index[i].end - starts[i]) as usize, offset: l.offset, len: l.len });
    }
    let (sealed_hints, mut images) = fetch_sealed(t, &r, &store, &put, &mut wants, &mut bytes_fetched, on_bytes)?;
    let tally = fetch_packs(&r, &store, &wants, images.len() + 1, on_bytes)?;
    let fetched = tally[0].0;
    for (k, (n, b)) in tally.iter().enumerate() {
        bytes_fetched += b;
        if k > 0 {
            images[k - 1].chunks_fetched += n;
            images[k - 1].bytes_fetched += b;
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
    b.sealed_hints = sealed_hints;
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
        images,
    };
    Ok((b, report))
}

/// The sealed blobs the device holds, by service name: every image set's sealed artifacts
/// (`io.slotforge.sealed-for`), read from the images partition.
fn sealed_by_name(t: &mut dyn Target) -> anyhow::Result<BTreeMap<String, Vec<Digest>>> {
    let mut out: BTreeMap<String, Vec<Digest>> = BTreeMap::new();
    let Some(idx) = t.images_index()? else { return Ok(out) };
    for b in super::builds_of(&idx)? {
        let Ok(nested) = t.images_read(&b.index_digest) else { continue };
        let v: serde_json::Value = serde_json::from_slice(&nested).unwrap_or_default();
        for m in v["manifests"].as_array().into_iter().flatten() {
            let Some(name) = m["annotations"][crate::format::sealed::ANN_SEALED_FOR].as_str() else { continue };
            let Ok(ad) = Digest::parse(m["digest"].as_str().unwrap_or("")) else { continue };
            let Some(a) = t.images_read(&ad).ok().and_then(|b| crate::format::sealed::parse_artifact(&b)) else { continue };
            if let Ok(d) = Digest::parse(&a.blob) {
                let list = out.entry(name.to_string()).or_default();
                if !list.contains(&d) {
                    list.push(d);
                }
            }
        }
    }
    Ok(out)
}

/// Sealed external images the release carries and the device lacks: their small blobs (inline
/// in the manifest, checked against what the config pins) stored with the bundle; the sealed
/// blob's chunks found in the device's sealed images of the same service (chunked here; where
/// they are is handed to the apply); the others added to `wants` (in the release's packs,
/// fetched with the rootfs's) or, for a release without the image's pack table, read by range
/// from the sealed blob — one request per run of missing chunks — each checked against its id
/// and kept. The apply assembles each image and checks it against the digest the config pins.
fn fetch_sealed(t: &mut dyn Target, r: &Resolved, store: &Path, put: &dyn Fn(&[u8]) -> anyhow::Result<Blob>, wants: &mut PackWants, bytes_fetched: &mut u64, on_bytes: &dyn Fn(u64)) -> anyhow::Result<(BTreeMap<String, SealedChunks>, Vec<PulledImage>)> {
    let mut hints = BTreeMap::new();
    let mut report = Vec::new();
    if r.parsed.sealed.is_empty() {
        return Ok((hints, report));
    }
    let on_device = sealed_by_name(t)?;
    let lie = |name: &str, what: &str| anyhow::anyhow!("release {}: the {what} of sealed image {name} is not the one its config pins; nothing was changed", r.reference);
    for si in &r.parsed.sealed {
        let e = r.config.images.iter().find(|e| e.name == si.name).ok_or_else(|| lie(&si.name, "image"))?;
        let s = e.sealed.as_ref().ok_or_else(|| lie(&si.name, "sealed blob"))?;
        if si.blob.digest.as_str() != s.digest || si.blob.size != s.size {
            return Err(lie(&si.name, "sealed blob"));
        }
        if t.images_has(&si.blob.digest)? {
            continue;
        }
        if Digest::of_bytes(&si.manifest).as_str() != e.digest {
            return Err(lie(&si.name, "manifest"));
        }
        if Digest::of_bytes(&si.artifact).as_str() != s.artifact {
            return Err(lie(&si.name, "sealed artifact"));
        }
        let mv: serde_json::Value = serde_json::from_slice(&si.manifest)?;
        if mv["config"]["digest"].as_str() != Some(Digest::of_bytes(&si.config).as_str()) {
            return Err(lie(&si.name, "config"));
        }
        for b in [&si.manifest, &si.config, &si.artifact] {
            put(b)?;
        }
        put(crate::format::sealed::EMPTY_JSON)?;
        let index = casync::parse_index(&si.caibx).with_context(|| format!("release {}: index of sealed image {}", r.reference, si.name))?;
        // The whole blob, or (a release pushed since the device makes hash areas) its data.
        if !matches!(index.last().map(|e| e.end), Some(end) if end == s.size || end == s.hash_offset) || index.len() as u64 > s.size / casync::MIN + 1 {
            return Err(lie(&si.name, "chunk index"));
        }
        let index_blob = put(&si.caibx)?;
        // The device's earlier sealed images of this service: chunked once here, their chunks'
        // places handed to the apply.
        let mut seeds = Seeds::default();
        let mut sc = SealedChunks { index: index_blob, seeds: vec![], seed_offsets: vec![] };
        for sd in on_device.get(&si.name).into_iter().flatten() {
            let Some(f) = t.images_seed(sd)? else { continue };
            let len = f.metadata()?.len();
            let seed_index = casync::index_of(std::io::BufReader::new(crate::base::window::Window::new(f.try_clone()?, 0, len)))?;
            seeds.add_at(&format!("sealed image {sd}"), f, 0, &index, &casync::offsets_of(&index, &seed_index));
            sc.seeds.push(sd.clone());
            sc.seed_offsets.push(put(&casync::seed_offsets(&index, &seed_index))?);
        }
        let starts: Vec<u64> = std::iter::once(0).chain(index.iter().map(|e| e.end)).collect();
        let mut seen = std::collections::HashSet::new();
        // Missing: neither in a seed nor kept by an interrupted pull (each id once).
        let missing: Vec<usize> = (0..index.len()).filter(|&i| !seeds.has(&index[i].id) && !casync::chunk_path(store, &index[i].hex()).exists() && seen.insert(index[i].id)).collect();
        let local = index.iter().filter(|e| !seen.contains(&e.id)).count();
        let mut pi = PulledImage { name: si.name.clone(), chunks: index.len(), chunks_local: local, chunks_fetched: 0, bytes_fetched: 0 };
        // In the release's packs: fetched with the rootfs's chunks, one request per pack.
        if let Some(tb) = &si.table {
            let (table, locs) = PackTable::parse(tb, &index).with_context(|| format!("release {}: pack table of sealed image {}", r.reference, si.name))?;
            for &i in &missing {
                let l = locs[i];
                wants.add(&table.packs[l.pack], PackWant { owner: report.len() + 1, entry: index[i].clone(), raw_len: (starts[i + 1] - starts[i]) as usize, offset: l.offset, len: l.len });
            }
            hints.insert(s.digest.clone(), sc);
            report.push(pi);
            continue;
        }
        for run in runs(&missing, &starts, RUN_GAP) {
            let mut attempts = 0;
            loop {
                let todo: Vec<usize> = run.iter().copied().filter(|&i| !casync::chunk_path(store, &index[i].hex()).exists()).collect();
                let (Some(&first), Some(&last)) = (todo.first(), todo.last()) else { break };
                attempts += 1;
                let res = (|| -> anyhow::Result<()> {
                    let mut rd = r.reg.blob_range(&r.repo, &si.blob.digest, starts[first], starts[last + 1])?;
                    let mut pos = starts[first];
                    for &i in &todo {
                        std::io::copy(&mut Read::take(&mut rd, starts[i] - pos), &mut std::io::sink())?;
                        let mut c = vec![0u8; (starts[i + 1] - starts[i]) as usize];
                        rd.read_exact(&mut c).with_context(|| format!("sealed image {} bytes {}..{}", si.name, starts[i], starts[i + 1]))?;
                        pos = starts[i + 1];
                        keep_raw_chunk(store, &index[i], &c)?;
                        pi.chunks_fetched += 1;
                        pi.bytes_fetched += c.len() as u64;
                        *bytes_fetched += c.len() as u64;
                        on_bytes(c.len() as u64);
                    }
                    Ok(())
                })();
                match res {
                    Ok(()) => break,
                    Err(_) if attempts < 4 => std::thread::sleep(std::time::Duration::from_millis(250 * attempts)),
                    Err(e) => return Err(e.context(format!("fetching sealed image {} of {} (what arrived is kept; a rerun goes on from there)", si.name, r.reference))),
                }
            }
        }
        hints.insert(s.digest.clone(), sc);
        report.push(pi);
    }
    Ok((hints, report))
}

/// A chunk to fetch from a pack: for whom (0: the rootfs; k: the k-th sealed image fetched),
/// which, its raw length, where in the pack.
struct PackWant {
    owner: usize,
    entry: Entry,
    raw_len: usize,
    offset: u64,
    len: u64,
}

/// The chunks to fetch, by pack (each id once).
#[derive(Default)]
struct PackWants {
    packs: BTreeMap<Digest, Vec<PackWant>>,
    ids: std::collections::HashSet<[u8; 32]>,
}

impl PackWants {
    fn add(&mut self, pack: &crate::format::packs::Pack, w: PackWant) {
        if self.ids.insert(w.entry.id) {
            self.packs.entry(pack.digest.clone()).or_default().push(w);
        }
    }
}

/// Fetch `wants`: per pack, one range request from the first chunk still missing to the last,
/// each chunk checked (bounded zstd decode, its id) and kept as it arrives; a dropped connection
/// is retried from the first chunk still missing (3 more times). Returns, per owner, the chunks
/// and bytes fetched.
fn fetch_packs(r: &Resolved, store: &Path, wants: &PackWants, owners: usize, on_bytes: &dyn Fn(u64)) -> anyhow::Result<Vec<(usize, u64)>> {
    let mut tally = vec![(0usize, 0u64); owners];
    for (digest, list) in &wants.packs {
        let mut attempts = 0;
        loop {
            let mut missing: Vec<&PackWant> = list.iter().filter(|w| !casync::chunk_path(store, &w.entry.hex()).exists()).collect();
            missing.sort_by_key(|w| w.offset);
            let (Some(first), Some(end)) = (missing.first().map(|w| w.offset), missing.iter().map(|w| w.offset + w.len).max()) else { break };
            attempts += 1;
            let res = (|| -> anyhow::Result<()> {
                let mut rd = r.reg.blob_range(&r.repo, digest, first, end)?;
                let mut pos = first;
                for w in &missing {
                    if w.offset < pos {
                        bail!("pack {digest}: chunks overlap at {}", w.offset);
                    }
                    std::io::copy(&mut Read::take(&mut rd, w.offset - pos), &mut std::io::sink())?;
                    let mut c = vec![0u8; w.len as usize];
                    rd.read_exact(&mut c).with_context(|| format!("pack {digest} bytes {}..{}", w.offset, w.offset + w.len))?;
                    pos = w.offset + w.len;
                    keep_chunk(store, &w.entry, w.raw_len, &c)?;
                    tally[w.owner].0 += 1;
                    tally[w.owner].1 += w.len;
                    on_bytes(w.len);
                }
                Ok(())
            })();
            match res {
                Ok(()) => break,
                Err(_) if attempts < 4 => std::thread::sleep(std::time::Duration::from_millis(250 * attempts)),
                Err(e) => return Err(e.context(format!("fetching chunks of {} (what arrived is kept; a rerun goes on from there)", r.reference))),
            }
        }
    }
    Ok(tally)
}

/// Bytes of unneeded data a range read may carry to join two runs of missing chunks into one
/// request.
const RUN_GAP: u64 = 256 << 10;

/// Runs of the chunks `missing` (index order) that one range request fetches: neighbours, or
/// apart by at most `gap` bytes of chunks not needed.
pub fn runs(missing: &[usize], starts: &[u64], gap: u64) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    for &i in missing {
        match out.last_mut() {
            Some(run) if starts[i] - starts[*run.last().unwrap() + 1] <= gap => run.push(i),
            _ => out.push(vec![i]),
        }
    }
    out
}

/// Check a chunk's bytes against its id and store them compressed, as casync does.
fn keep_raw_chunk(store: &Path, e: &Entry, raw: &[u8]) -> anyhow::Result<()> {
    if casync::chunk_id(raw) != e.id {
        bail!("chunk {} from the registry does not match its id; refused", e.hex());
    }
    let p = casync::chunk_path(store, &e.hex());
    std::fs::create_dir_all(p.parent().unwrap())?;
    let mut tmp = tempfile::NamedTempFile::new_in(p.parent().unwrap())?;
    std::io::Write::write_all(tmp.as_file_mut(), &zstd::bulk::compress(raw, 1)?)?;
    tmp.persist(&p).map_err(|e| e.error)?;
    Ok(())
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
