//! Composing a build: resolve → flatten → the rootfs squashfs → the cap check against every
//! layout generation → its dm-verity tree. What every output (disk, bundle, installer) is made
//! from; nothing outside temporary directories is written.

use super::*;
use super::Refused;
use super::assemble::{assemble, RootfsParts};
use super::manifest::service;
use super::sources::{load_lock, resolve_all, Resolved};


/// A build id: the version plus 12 hex digits of a hash over every input that shapes the
/// rootfs. Same inputs → same id; any change → a new id, and a new set in the images partition.
pub(super) fn build_id(m: &LoadedManifest, r: &Resolved, epoch: u64) -> anyhow::Result<String> {
    let mf = &m.manifest;
    let kernel = mf.kernel.as_ref().unwrap();
    let mut files = Vec::new();
    for f in &mf.files {
        let content = if let Some(c) = &f.contents {
            Digest::of_bytes(c.as_bytes()).to_string()
        } else if let Some(s) = &f.source {
            let p = m.source_path(s);
            match std::fs::File::open(&p) {
                Ok(file) => crate::base::hash::digest_reader(file)?.0.to_string(),
                // An optional source that cannot be read is left out of the rootfs (and so of the id).
                Err(_) if f.optional => "absent".to_string(),
                Err(e) => anyhow::bail!("files: {}: source {}: {e}", f.path.value, p.display()),
            }
        } else {
            String::new()
        };
        files.push(json!({"entry": f, "content": content}));
    }
    let containers: Vec<_> = r
        .containers
        .iter()
        .map(|(sec, i, img)| {
            let s = service(m, *sec, *i);
            json!({"section": sec, "entry": s, "digest": img.manifest_digest})
        })
        .collect();
    let volumes: Vec<_> = mf
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| json!({"entry": v, "digest": r.volumes.iter().find(|(j, _)| *j == i).map(|(_, img)| img.manifest_digest.to_string())}))
        .collect();
    let inputs = json!({
        "slotforge-build-id": 2,
        "version": m.version(),
        "source_date_epoch": epoch,
        "kernel": {"digest": r.kernel.manifest_digest, "spec": kernel},
        "init": r.init.iter().map(|i| i.manifest_digest.to_string()).collect::<Vec<_>>(),
        "containers": containers,
        "files": files,
        "verity": m.verity(),
        "update_keys": update_keys(m)?.into_iter().map(|k| k.0).collect::<Vec<_>>(),
    });
    let mut inputs = inputs;
    if !volumes.is_empty() {
        // Only when there are any, so the ids of builds without volumes stay what they were.
        inputs["volumes"] = json!(volumes);
    }
    let d = Digest::of_bytes(&serde_json::to_vec(&inputs)?);
    Ok(format!("{}-{}", m.version(), &d.hex()[..12]))
}


/// What every output (a disk, a bundle) is made from: the manifest resolved, the rootfs
/// written to a temporary squashfs and checked against every cap.
pub struct ComposeOptions {
    pub manifest: PathBuf,
    pub layout: PathBuf,
    /// Other layout generations the rootfs must also fit.
    pub compat: Vec<PathBuf>,
    pub sources: SourceOptions,
    pub progress: Progress,
}

pub struct Composed {
    pub epoch: u64,
    pub manifest: LoadedManifest,
    pub layout: Layout,
    pub compat: Vec<Layout>,
    pub(super) resolved: Resolved,
    pub build_id: String,
    pub(super) parts: RootfsParts,
    /// What goes into a rootfs slot: the squashfs, then (with verity) its hash area.
    pub rootfs_image: PathBuf,
    pub squashfs_bytes: u64,
    /// Bytes of `rootfs_image`: what the slot's cap is checked against.
    pub rootfs_bytes: u64,
    pub verity: Option<VerityInfo>,
    pub caps: Vec<CapCheck>,
    pub phases: Vec<(String, f64)>,
    pub work: tempfile::TempDir,
    _spill: Spill,
}

impl Composed {
    /// The external images with their resolved sources.
    pub fn external(&self) -> Vec<(&ExternalImage, &ResolvedImage)> {
        self.parts.external.iter().map(|(e, i)| (e, &self.resolved.containers[*i].2)).collect()
    }
    /// A sealed external image's file and artifact manifest.
    pub fn sealed_file(&self, name: &str) -> Option<&(PathBuf, Vec<u8>)> {
        self.parts.sealed.get(name)
    }
    pub fn kernel(&self) -> &Content {
        &self.parts.kernel.kernel.0
    }
    pub fn initrd(&self) -> Option<&Content> {
        self.parts.kernel.initrd.as_ref().map(|c| &c.0)
    }
    pub fn loader(&self) -> &Content {
        &self.parts.loader
    }
    pub fn cmdline(&self) -> &str {
        &self.manifest.manifest.kernel.as_ref().unwrap().cmdline
    }
    pub fn version(&self) -> &str {
        self.manifest.version()
    }
    /// How the build cache served this build.
    pub fn cache_use(&self) -> &super::buildcache::CacheUse {
        &self.parts.cache_use
    }

    fn boot(&self) -> &manifest::Boot {
        self.manifest.boot()
    }
    pub fn uki(&self) -> bool {
        self.boot().uki
    }

    /// The Secure Boot key and certificate, if the manifest asks for signing.
    fn secure_boot(&self) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
        let Some(sb) = &self.boot().secure_boot else { return Ok(None) };
        let get = |v: &serde_saphyr::Spanned<String>| -> anyhow::Result<PathBuf> {
            let p = self.manifest.dir().join(&v.value);
            if !p.is_file() {
                return Err(InputError::spanned(&self.manifest.path, v, format!("{} is not a file", p.display())).into());
            }
            Ok(p)
        };
        Ok(Some((get(&sb.key)?, get(&sb.cert)?)))
    }

    /// The command line of `slot`'s entry on `layout`.
    pub fn slot_options(&self, layout: &Layout, slot: Slot, extra: &str) -> anyhow::Result<String> {
        crate::format::cmdline::entry_options(&layout.rootfs(slot).name, slot, &self.build_id, self.verity.as_ref(), &format!("{} {extra}", self.cmdline()))
    }

    /// Write `slot`'s Unified Kernel Image (signed when the manifest asks) to `out`. Returns
    /// whether a signature, if any, is reproducible (see [`crate::format::uki::sign`]).
    pub fn slot_uki(&self, layout: &Layout, slot: Slot, extra: &str, out: &std::path::Path) -> anyhow::Result<bool> {
        let dir = tempfile::Builder::new().prefix("uki-").tempdir_in(self.work.path())?;
        let kernel = dir.path().join("linux");
        std::io::copy(&mut self.kernel().open()?, &mut std::fs::File::create(&kernel)?)?;
        let initrd = match self.initrd() {
            Some(i) => {
                let p = dir.path().join("initrd");
                std::io::copy(&mut i.open()?, &mut std::fs::File::create(&p)?)?;
                Some(p)
            }
            None => None,
        };
        let stub = self.boot().stub.as_ref().map(|s| self.manifest.dir().join(s)).unwrap_or_else(|| crate::format::uki::DEFAULT_STUB.into());
        let cmdline = self.slot_options(layout, slot, extra)?;
        let osrel = crate::format::uki::os_release(self.version(), &self.build_id, slot.name());
        let parts = crate::format::uki::Parts { stub: &stub, kernel: &kernel, initrd: initrd.as_deref(), cmdline: &cmdline, os_release: &osrel };
        crate::format::uki::assemble(&parts, out, self.epoch, dir.path())?;
        match self.secure_boot()? {
            Some((key, cert)) => crate::format::uki::sign(out, &key, &cert, self.epoch),
            None => Ok(true),
        }
    }

    /// The boot loader as it goes on the ESP: signed when the manifest asks.
    pub fn loader_for_esp(&self) -> anyhow::Result<Content> {
        let Some((key, cert)) = self.secure_boot()? else { return Ok(self.loader().clone()) };
        let p = self.work.path().join("BOOTX64.EFI");
        std::io::copy(&mut self.loader().open()?, &mut std::fs::File::create(&p)?)?;
        crate::format::uki::sign(&p, &key, &cert, self.epoch)?;
        Ok(Content::Path(p))
    }
}

/// Resolve, flatten, write the squashfs, check the caps. Nothing outside temp dirs is written.
pub fn compose(opts: &ComposeOptions) -> anyhow::Result<Composed> {
    let epoch = crate::source_date_epoch()?;
    let m = manifest::load(&opts.manifest)?;
    let layout = layout::load(&opts.layout)?;
    let compat: Vec<Layout> = opts.compat.iter().map(|p| layout::load(p)).collect::<anyhow::Result<_>>()?;
    let has_external = m.containers().any(|(_, s)| s.is_external());
    if has_external && layout.by_role(Role::ExternalImages).is_none() {
        bail!("{} has `ondisk: false` images but layout {} has no external-images partition", m.path.display(), opts.layout.display());
    }
    let mut phases = super::Phases::new();
    let lock = load_lock(&m, &opts.sources)?;
    let r = resolve_all(&m, &opts.sources.resolver(), lock.as_ref(), opts.progress)?;
    crate::builder::pull::prefetch(&r.all(), opts.progress)?;
    let build_id = build_id(&m, &r, epoch)?;
    phases.lap("resolve");
    // Unpacked contents may take 16× the largest slot cap (a squashfs compresses them); more is
    // a bomb, not a rootfs.
    let largest_cap = std::iter::once(&layout).chain(compat.iter()).flat_map(|l| [l.rootfs(Slot::A).fs_cap, l.rootfs(Slot::B).fs_cap]).max().unwrap_or(0);
    let mut spill = Spill::with_limit(largest_cap.saturating_mul(16).max(1 << 30))?;
    let work = tempfile::Builder::new().prefix("slotforge-build-").tempdir()?;
    // The build cache is an optimisation: a cache directory that cannot be opened costs time only.
    let cache = super::buildcache::BuildCache::open(&opts.sources.cache_dir).ok();
    let parts = assemble(&m, &r, &build_id, epoch, &mut spill, work.path(), cache.as_ref(), opts.progress)?;
    phases.lap("flatten");
    let sqfs = work.path().join("rootfs.squashfs");
    let pb = opts.progress.bar("squashfs", parts.tree.count(), false);
    let blocks: Option<&dyn squashfs::writer::BlockStore> = cache.as_ref().map(|c| c as _);
    let w = squashfs::writer::write(&parts.tree, &sqfs, epoch as u32, blocks, &mut || pb.inc(1))?;
    let squashfs_bytes = w.bytes;
    let mut parts = parts;
    parts.cache_use.blocks_reused = w.blocks_reused;
    parts.cache_use.blocks_compressed = w.blocks_compressed;
    if let Some(c) = &cache {
        parts.cache_use.blocks_dropped = c.blocks_dropped();
        // Over its bound, the cache drops what was used least recently (never this build's).
        let _ = c.trim();
    }
    pb.finish_and_clear();
    phases.lap("squashfs");
    // The slot holds the squashfs, padded to a block, then its dm-verity hash area; its size is
    // a function of the squashfs size, so the cap is checked before the tree is computed.
    let (rootfs_bytes, verity_bytes) = if m.verity() {
        let p = rootfs_verity(squashfs_bytes, &build_id, &layout);
        let area = verity::hash_area_bytes(p.data_blocks);
        (p.hash_offset() + area, area)
    } else {
        (squashfs_bytes, 0)
    };
    let mut all: Vec<&Layout> = vec![&layout];
    all.extend(compat.iter());
    let caps = rootfs::cap_checks(rootfs_bytes, verity_bytes, &all);
    if let Some(bad) = caps.iter().find(|c| c.slack < 0) {
        return Err(Refused(rootfs::oversize_message(bad, &parts.contributors)).into());
    }
    let verity = if m.verity() { Some(verity::append_with(&sqfs, |len| rootfs_verity(len, &build_id, &layout)).context("computing the rootfs dm-verity tree")?) } else { None };
    if verity.is_some() {
        phases.lap("verity");
    }
    Ok(Composed { epoch, manifest: m, layout, compat, resolved: r, build_id, parts, rootfs_image: sqfs, squashfs_bytes, rootfs_bytes, verity, caps, phases: phases.0, work, _spill: spill })
}

/// The rootfs's dm-verity parameters: the UUID per build, the salt per layout name, so that
/// consecutive builds share the hashes of every unchanged block (docs/formats.md#dm-verity-rootfs-slots).
fn rootfs_verity(data_bytes: u64, build_id: &str, layout: &Layout) -> verity::Params {
    verity::Params::derived(data_bytes, build_id).salted(&format!("rootfs\0{}", layout.name))
}
