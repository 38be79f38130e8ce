//! `slotforge build`: the data path of docs/architecture.md, top to bottom. Resolve every image,
//! flatten the on-disk ones into the rootfs tree, write the squashfs and refuse it if over any
//! cap, stage the external images into the images partition, write the ESP, then assemble the
//! disk in a temporary file that is renamed into place last. Nothing at the output path is
//! created or touched until every check has passed.

pub mod bundle;
pub mod images;
pub mod installer;
pub mod lock;
pub mod manifest;
pub mod pull;
pub mod rootfs;

use crate::format::esp::{self, BootEntry, EspFile};
use crate::compose::flatten::{apply_layer, flatten_image, LayerCtx};
use crate::base::hash::Digest;
use images::Stage;
use crate::format::layout::{self, Layout, Role, Slot};
use manifest::{LoadedManifest, Section, DEFAULT_LOADER_PATH};
use lock::LockFile;
use crate::oci::{Platform, ResolvedImage, Resolver};
use crate::base::progress::Progress;
use rootfs::{CapCheck, Contributor};
use crate::format::release::{ExternalImage, ExternalImages, Release};
use crate::format::squashfs;
use crate::format::tree::{components, Content, Kind, Meta, Node, Spill, Tree};
use crate::format::verity::{self, VerityInfo};
use crate::base::yaml::InputError;
use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};


pub struct BuildOptions {
    pub compose: ComposeOptions,
    pub output: PathBuf,
    /// External images to leave out of the images partition (the device pulls them).
    pub no_prefill: Vec<String>,
    /// Give slot A's first entry a boot counter (`slot-a+N.conf`), so even the first boot
    /// must be marked good by the agent.
    pub boot_tries: Option<u32>,
    /// Also write `<output>.bmap` (bmaptool) and/or a qcow2 copy beside the output.
    pub bmap: bool,
    pub qcow2: bool,
    /// Appended to slot A's entry options (the installer's `slotforge.install`).
    pub extra_cmdline: Option<String>,
}

/// Where images come from: platform, cache, network policy, lock.
#[derive(Clone)]
pub struct SourceOptions {
    pub platform: Platform,
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub insecure: Vec<String>,
    /// Build exactly what `<manifest>.lock` says.
    pub locked: bool,
    /// containers-registries.conf mirrors (`Mirrors::load()` reads the standard place).
    pub mirrors: crate::oci::mirrors::Mirrors,
}

impl SourceOptions {
    pub fn resolver(&self) -> Resolver {
        let mut r = Resolver::new(self.platform.clone(), self.cache_dir.clone(), self.offline, self.insecure.clone());
        r.mirrors = self.mirrors.clone();
        r
    }
}

#[derive(Debug, Serialize)]
pub struct BuildSummary {
    pub output: PathBuf,
    pub version: String,
    pub build_id: String,
    pub layout: String,
    pub generation: u32,
    pub disk_size: u64,
    /// Bytes actually written into the sparse image (its allocated data).
    pub bytes_written: u64,
    /// Bytes of slot A's contents: the squashfs and its dm-verity hash area.
    pub rootfs_bytes: u64,
    pub squashfs_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityInfo>,
    pub caps: Vec<CapCheck>,
    pub external_images: Vec<ExternalImage>,
    /// Key ids of the update keys installed in the rootfs; empty means its devices accept
    /// unsigned bundles.
    pub update_keys: Vec<String>,
    pub images_partition_bytes: u64,
    pub contributors: Vec<Contributor>,
    /// Wall-clock seconds per phase, in order.
    pub phases: Vec<(String, f64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bmap: Option<(PathBuf, crate::format::bmap::BmapSummary)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2: Option<PathBuf>,
}

/// Everything a manifest names, resolved to digests with its metadata verified.
struct Resolved {
    kernel: ResolvedImage,
    init: Vec<ResolvedImage>,
    containers: Vec<(Section, usize, ResolvedImage)>,
    loader: Option<ResolvedImage>,
}

impl Resolved {
    /// Every resolved image (kernel, init, containers, loader).
    pub fn all(&self) -> Vec<&ResolvedImage> {
        std::iter::once(&self.kernel).chain(&self.init).chain(self.containers.iter().map(|c| &c.2)).chain(&self.loader).collect()
    }
}

/// Every image reference the manifest names, in manifest order.
pub fn manifest_references(m: &LoadedManifest) -> Vec<String> {
    let mf = &m.manifest;
    let mut v: Vec<String> = mf.kernel.iter().map(|k| k.image.value.clone()).collect();
    v.extend(mf.init.iter().map(|i| i.value.clone()));
    v.extend(m.containers().map(|(_, s)| s.image.as_ref().expect("checked").value.clone()));
    v.extend(Some(m.boot()).filter(|b| !b.loader.value.starts_with("file:")).map(|b| b.loader.value.clone()));
    v
}

/// Resolve everything the manifest names, pinned by `lock` when given. Offline, every
/// reference is tried and all that are missing are reported together.
fn resolve_all(m: &LoadedManifest, resolver: &Resolver, lock: Option<&LockFile>, progress: Progress) -> anyhow::Result<Resolved> {
    let mf = &m.manifest;
    let kernel = mf.kernel.as_ref().ok_or_else(|| anyhow::anyhow!("{}: the manifest has no `kernel:` section; a bootable disk needs one", m.path.display()))?;
    let boot = m.boot();
    let total = 1 + mf.init.len() + m.containers().count() + usize::from(!boot.loader.value.starts_with("file:"));
    let pb = progress.bar("resolve", total as u64, false);
    let base = m.dir();
    let at = |s: &serde_saphyr::Spanned<String>| {
        let file = m.path.clone();
        let loc = s.referenced;
        move |e: anyhow::Error| anyhow::Error::new(InputError::at(&file, &loc, format!("{e:#}")))
    };
    let failures = std::cell::RefCell::new(Vec::new());
    let res = |s: &serde_saphyr::Spanned<String>| -> anyhow::Result<ResolvedImage> {
        pb.set_message(s.value.clone());
        let r = resolver.resolve(&s.value, base, lock.and_then(|l| l.pin(&s.value))).map_err(at(s));
        pb.inc(1);
        if resolver.offline {
            // Keep going, so one error lists everything that is missing.
            if let Err(e) = &r {
                failures.borrow_mut().push(format!("{e:#}"));
            }
        }
        r
    };
    let kernel = res(&kernel.image);
    let init: Vec<_> = mf.init.iter().map(&res).collect();
    let mut containers = Vec::new();
    for section in [Section::Onboot, Section::Onshutdown, Section::Services] {
        for (i, s) in m.section(section).iter().enumerate() {
            containers.push((section, i, res(s.value.image.as_ref().expect("checked"))));
        }
    }
    let loader = if boot.loader.value.starts_with("file:") { None } else { Some(res(&boot.loader)) };
    pb.finish_and_clear();
    let failures = failures.into_inner();
    if !failures.is_empty() {
        bail!("offline build: not in the cache {}:\n  {}", resolver.cache_dir.display(), failures.join("\n  "));
    }
    let r = Resolved {
        kernel: kernel?,
        init: init.into_iter().collect::<anyhow::Result<_>>()?,
        containers: containers.into_iter().map(|(a, b, c)| c.map(|c| (a, b, c))).collect::<anyhow::Result<_>>()?,
        loader: loader.transpose()?,
    };
    if resolver.offline {
        let missing = crate::builder::pull::missing(&r.all());
        if !missing.is_empty() {
            bail!("offline build: {} blobs are not in the cache {}:\n  {}", missing.len(), resolver.cache_dir.display(), missing.join("\n  "));
        }
    }
    Ok(r)
}

/// The lock file a build must follow, checked against the manifest (`--locked`).
fn load_lock(m: &LoadedManifest, src: &SourceOptions) -> anyhow::Result<Option<LockFile>> {
    if !src.locked {
        return Ok(None);
    }
    let path = crate::builder::lock::path_for(&m.path);
    let l = LockFile::load(&path)?;
    l.check(&path, &manifest_references(m), &src.platform.to_string())?;
    Ok(Some(l))
}

/// `slotforge lock`: resolve every reference online and write `<manifest>.lock`.
pub fn lock(manifest: &std::path::Path, src: &SourceOptions, progress: Progress) -> anyhow::Result<(PathBuf, LockFile)> {
    let m = manifest::load(manifest)?;
    let r = resolve_all(&m, &src.resolver(), None, progress)?;
    let l = LockFile::from_resolved(&src.platform.to_string(), r.all());
    let path = crate::builder::lock::path_for(&m.path);
    l.write(&path)?;
    Ok((path, l))
}

/// `slotforge pull`: fill the cache with every blob the manifest needs (locked if asked).
pub fn pull(manifest: &std::path::Path, src: &SourceOptions, progress: Progress) -> anyhow::Result<crate::builder::pull::PullStats> {
    let m = manifest::load(manifest)?;
    let lock = load_lock(&m, src)?;
    let resolver = src.resolver();
    let r = resolve_all(&m, &resolver, lock.as_ref(), Progress::hidden())?;
    crate::builder::pull::prefetch(&r.all(), progress)
}

fn service(m: &LoadedManifest, section: Section, i: usize) -> &manifest::Service {
    &m.section(section)[i].value
}

/// A build id: the version plus 12 hex digits of a hash over every input that shapes the
/// rootfs. Same inputs → same id; any change → a new id, and a new set in the images partition.
fn build_id(m: &LoadedManifest, r: &Resolved, epoch: u64) -> anyhow::Result<String> {
    let mf = &m.manifest;
    let kernel = mf.kernel.as_ref().unwrap();
    let mut files = Vec::new();
    for f in &mf.files {
        let content = if let Some(c) = &f.contents {
            Digest::of_bytes(c.as_bytes()).to_string()
        } else if let Some(s) = &f.source {
            let p = m.dir().join(s);
            crate::base::hash::digest_reader(std::fs::File::open(&p).with_context(|| format!("files: {}: source {}", f.path.value, p.display()))?)?.0.to_string()
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
    let d = Digest::of_bytes(&serde_json::to_vec(&inputs)?);
    Ok(format!("{}-{}", m.version(), &d.hex()[..12]))
}

/// The manifest's `update-keys:`, read and checked: (key id, public key file text), sorted by id.
fn update_keys(m: &LoadedManifest) -> anyhow::Result<Vec<(String, String)>> {
    let mut keys = Vec::new();
    for k in &m.manifest.update_keys {
        let p = m.dir().join(&k.value);
        let text = std::fs::read_to_string(&p).map_err(|e| InputError::spanned(&m.path, k, format!("update key {}: {e}", p.display())))?;
        let key = crate::format::signature::parse_public(&text).map_err(|e| InputError::spanned(&m.path, k, format!("update key {}: {e:#}", p.display())))?;
        keys.push((key.id.clone(), crate::format::signature::public_text(&key)?));
    }
    keys.sort();
    keys.dedup_by(|a, b| a.0 == b.0);
    Ok(keys)
}

/// A regular file inside a flattened tree, by path.
fn tree_file(t: &Tree, path: &str) -> Option<(Content, u64)> {
    match &t.get(&components(path.as_bytes(), true).ok()?)?.kind {
        Kind::File { content, size, .. } => Some((content.clone(), *size)),
        _ => None,
    }
}

/// What the ESP needs from the kernel image.
struct KernelFiles {
    kernel: (Content, u64),
    initrd: Option<(Content, u64)>,
}

/// The assembled rootfs tree and everything the later steps need from it.
struct RootfsParts {
    tree: Tree,
    contributors: Vec<Contributor>,
    kernel: KernelFiles,
    loader: Content,
    external: Vec<(ExternalImage, usize)>,
    /// Sealed external images by name: the sealed file (in the work directory) and its
    /// artifact manifest.
    sealed: BTreeMap<String, (PathBuf, Vec<u8>)>,
}

fn assemble(m: &LoadedManifest, r: &Resolved, build_id: &str, epoch: u64, spill: &mut Spill, work: &Path, progress: Progress) -> anyhow::Result<RootfsParts> {
    let mf = &m.manifest;
    let kspec = mf.kernel.as_ref().unwrap();
    let mut contributors: Vec<Contributor> = Vec::new();
    let mut contributor = |kind: &str, name: &str, reference: Option<&str>, movable: bool| {
        contributors.push(Contributor { kind: kind.into(), name: name.into(), reference: reference.map(str::to_string), bytes: 0, movable });
        contributors.len() as u32 - 1
    };
    let layer_bytes: u64 = r.init.iter().chain(std::iter::once(&r.kernel)).chain(r.loader.iter()).chain(
        r.containers.iter().filter(|(s, i, _)| !service(m, *s, *i).is_external()).map(|(_, _, img)| img)
    ).flat_map(|i| i.layers.iter().map(|l| l.size)).sum();
    let pb = progress.bar("flatten", layer_bytes, true);
    let mut tick = |n: u64| pb.inc(n);

    let mut root = Tree::new(epoch);
    let mut layer_no = 0;
    for img in &r.init {
        let o = contributor("init", &img.reference, Some(&img.reference), false);
        flatten_image(&mut root, img, spill, o, &mut layer_no, &mut tick)?;
        crate::linuxkit::bundle::fixups(&mut root, Some(crate::linuxkit::bundle::INIT_RESOLV_CONF), epoch, o).map_err(|e| anyhow::anyhow!("{}: {e}", img.reference))?;
    }

    // Kernel image: the kernel and initrd go to the ESP; its modules tarball into the rootfs.
    let ko = contributor("kernel", "modules", Some(&r.kernel.reference), false);
    let mut ktree = Tree::new(epoch);
    flatten_image(&mut ktree, &r.kernel, spill, ko, &mut 0, &mut tick)?;
    let kernel = match &kspec.binary {
        Some(p) => tree_file(&ktree, p).ok_or_else(|| anyhow::anyhow!("{}: kernel image has no regular file {p}", r.kernel.reference))?,
        None => tree_file(&ktree, "kernel")
            .or_else(|| tree_file(&ktree, "boot/vmlinuz"))
            .ok_or_else(|| anyhow::anyhow!("{}: kernel image has neither /kernel nor /boot/vmlinuz; set kernel.binary", r.kernel.reference))?,
    };
    let initrd = match &kspec.initrd {
        Some(p) => Some(tree_file(&ktree, p).ok_or_else(|| anyhow::anyhow!("{}: kernel image has no regular file {p}", r.kernel.reference))?),
        None => tree_file(&ktree, "initrd.img").or_else(|| tree_file(&ktree, "boot/initrd.img")),
    };
    // LinuxKit refuses a kernel image without its tarball unless `tar: none`; slotforge accepts
    // one without the default `kernel.tar` (a distribution kernel packed as an image has none),
    // and refuses only a tarball named explicitly and missing (docs/manifest.md).
    let ktar = kspec.tar_name().and_then(|t| match tree_file(&ktree, t) {
        Some((c, _)) => Some(Ok((t, c))),
        None if kspec.tar.is_none() => None,
        None => Some(Err(anyhow::anyhow!("{}: kernel image has no {t} (kernel.tar)", r.kernel.reference))),
    });
    if let Some(k) = ktar {
        let (ktar, content) = k?;
        let ctx = LayerCtx { image: &r.kernel.reference, layer: ktar, layer_no: layer_no + 1, origin: ko };
        apply_layer(&mut root, content.open()?, &ctx, spill)?;
    }
    // LinuxKit's `ucode`: a microcode cpio the kernel must see first, so it leads the initrd.
    let initrd = match &kspec.ucode {
        None => initrd,
        Some(u) => {
            let (ucode, _) = tree_file(&ktree, u).ok_or_else(|| anyhow::anyhow!("{}: kernel image has no regular file {u} (kernel.ucode)", r.kernel.reference))?;
            let mut joined: Box<dyn std::io::Read> = ucode.open()?;
            if let Some((c, _)) = &initrd {
                joined = Box::new(joined.chain(c.open()?));
            }
            Some(spill.store(&mut joined)?)
        }
    };

    let loader_path = m.boot().loader_path.clone().unwrap_or_else(|| DEFAULT_LOADER_PATH.into());
    let loader = match &r.loader {
        Some(img) => {
            let mut lt = Tree::new(epoch);
            flatten_image(&mut lt, img, spill, 0, &mut 0, &mut tick)?;
            tree_file(&lt, &loader_path).ok_or_else(|| anyhow::anyhow!("{}: boot loader image has no regular file {loader_path}", img.reference))?.0
        }
        None => {
            let v = &m.boot().loader.value;
            let p = m.dir().join(v.strip_prefix("file:").unwrap());
            if !p.is_file() {
                if mf.boot.is_none() {
                    bail!("{}: no `boot:` section, so the build host's systemd-boot is used, and {} is missing: install Debian's systemd-boot-efi package (apt-get install systemd-boot-efi) or name a loader in `boot: {{loader: ...}}`", m.path.display(), p.display());
                }
                bail!("{}: boot.loader {v}: {} is not a file (Debian ships systemd-boot in systemd-boot-efi)", m.path.display(), p.display());
            }
            Content::Path(p)
        }
    };

    let mut external = Vec::new();
    let mut sealed_files = BTreeMap::new();
    let ids = m.ids();
    let mut unpacked = BTreeMap::new();
    for (idx, (section, i, img)) in r.containers.iter().enumerate() {
        let entry = &m.section(*section)[*i];
        let s = &entry.value;
        let name = s.name();
        let o = contributor(section.dir(), name, Some(&img.reference), !s.is_external() && *section != Section::Onshutdown);
        let defaults = rootfs::image_defaults(img);
        let at = |e: String| anyhow::Error::new(InputError::spanned(&m.path, entry, format!("{} {name}: {e}", section.dir())));
        let label = match &defaults.label {
            Some(text) => crate::linuxkit::spec::parse_label(&img.reference, text).map_err(at)?,
            None => Default::default(),
        };
        let (spec, runtime) = crate::linuxkit::oci::config_to_oci(s, &label, &defaults, &ids).map_err(at)?;
        let dir = crate::linuxkit::bundle::bundle_dir(*section, *i, name);
        let b = crate::linuxkit::bundle::plan(dir, &spec, &runtime, &img.reference, !s.is_external(), &mut unpacked);
        rootfs::put_file(&mut root, &format!("{}/config.json", b.dir), b.config_json, 0o644, epoch, o)?;
        rootfs::put_file(&mut root, &format!("{}/runtime.json", b.dir), b.runtime_json, 0o644, epoch, o)?;
        for mp in &b.mount_points {
            root.insert(&components(mp.as_bytes(), true).unwrap(), Node::dir(Meta::new(0o755, epoch), u32::MAX, o)).map_err(|e| anyhow::anyhow!("{mp}: {e}"))?;
        }
        if s.is_external() {
            let mut e = rootfs::external_image_of(name, *section, img);
            e.bundle = b.dir.clone();
            e.readonly = b.readonly;
            if s.is_sealed() {
                // A read-only container's mount points must exist in its sealed image (runc
                // cannot make them there); a writable one gets them in its overlay.
                let mkdirs = if b.readonly { mount_points(&spec) } else { vec![] };
                let file = work.join(format!("sealed-{name}.img"));
                let mut sp = Spill::with_limit(img.layers.iter().map(|l| l.size).sum::<u64>().saturating_mul(16).max(1 << 30))?;
                let (sealed, artifact) = crate::compose::seal::seal(img, &mkdirs, &file, &mut sp, &mut |_| {}).with_context(|| format!("sealing external image {name}"))?;
                e.sealed = Some(sealed);
                e.keep_layers = s.keeps_layers();
                sealed_files.insert(name.to_string(), (file, artifact));
            }
            rootfs::put_file(&mut root, &format!("{}/image.json", b.dir), crate::base::text::to_json(&e), 0o644, epoch, o)?;
            external.push((e, idx));
        } else if let Some(at_dir) = &b.unpack_at {
            let mut sub = Tree::new(epoch);
            flatten_image(&mut sub, img, spill, o, &mut 0, &mut tick)?;
            crate::linuxkit::bundle::fixups(&mut sub, None, epoch, o).map_err(|e| anyhow::anyhow!("{}: {e}", img.reference))?;
            if b.readonly {
                // runc makes missing mount points itself; in a read-only slot it cannot, so
                // they are made here (LinuxKit's unpacked root is writable at that moment).
                crate::format::sealed::add_mount_points(&mut sub, &mount_points(&spec), epoch, o).with_context(|| img.reference.clone())?;
            }
            root.graft(&components(at_dir.as_bytes(), true).unwrap(), sub, o).map_err(|e| anyhow::anyhow!("{at_dir}: {e}"))?;
        }
    }
    pb.finish_and_clear();

    let fo = contributor("files", "files:", None, false);
    let mut added = std::collections::BTreeSet::new();
    for (n, f) in mf.files.iter().enumerate() {
        rootfs::apply_file_entry(&mut root, m, n, &ids, &mut added, epoch, fo).map_err(|e| anyhow::Error::new(InputError::spanned(&m.path, &f.path, format!("{e:#}"))))?;
    }
    let so = contributor("slotforge", "metadata", None, false);
    for (id, text) in update_keys(m)? {
        rootfs::put_file(&mut root, &format!("{}/{id}.pub", crate::format::signature::KEYS_DIR), text.into_bytes(), 0o644, epoch, so)?;
    }
    let release = Release { format: crate::format::release::METADATA_FORMAT, version: m.version().into(), build_id: build_id.into(), source_date_epoch: epoch, builder: format!("slotforge {}", env!("CARGO_PKG_VERSION")) };
    rootfs::put_file(&mut root, crate::format::release::RELEASE_PATH, crate::base::text::to_json(&release), 0o644, epoch, so)?;
    let mut ext_sorted: Vec<ExternalImage> = external.iter().map(|(e, _)| e.clone()).collect();
    ext_sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let ext = ExternalImages { format: crate::format::release::METADATA_FORMAT, build_id: build_id.into(), images: ext_sorted };
    rootfs::put_file(&mut root, crate::format::release::EXTERNAL_PATH, crate::base::text::to_json(&ext), 0o644, epoch, so)?;

    for (o, b) in root.bytes_by_origin() {
        if let Some(c) = contributors.get_mut(o as usize) {
            c.bytes += b;
        }
    }
    Ok(RootfsParts { tree: root, contributors, kernel: KernelFiles { kernel, initrd }, loader, external, sealed: sealed_files })
}

/// The mount destinations of a container that must exist in a read-only root (not under
/// /dev, /proc or /sys, which the runtime mounts whole).
fn mount_points(spec: &crate::linuxkit::oci::Spec) -> Vec<String> {
    let mut v: Vec<String> = spec
        .mounts
        .iter()
        .map(|mt| mt.destination.trim_start_matches('/').to_string())
        .filter(|d| !d.is_empty() && !["dev", "proc", "sys"].iter().any(|p| d == p || d.starts_with(&format!("{p}/"))))
        .filter(|d| components(d.as_bytes(), true).is_ok())
        .map(|d| format!("/{d}"))
        .collect();
    v.sort();
    v.dedup();
    v
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
    resolved: Resolved,
    pub build_id: String,
    parts: RootfsParts,
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
    let mut phases = Vec::new();
    let mut clock = std::time::Instant::now();
    let mut lap = |name: &str| {
        phases.push((name.to_string(), (clock.elapsed().as_secs_f64() * 1000.0).round() / 1000.0));
        clock = std::time::Instant::now();
    };
    let lock = load_lock(&m, &opts.sources)?;
    let r = resolve_all(&m, &opts.sources.resolver(), lock.as_ref(), opts.progress)?;
    crate::builder::pull::prefetch(&r.all(), opts.progress)?;
    let build_id = build_id(&m, &r, epoch)?;
    lap("resolve");
    // Unpacked contents may take 16× the largest slot cap (a squashfs compresses them); more is
    // a bomb, not a rootfs.
    let largest_cap = std::iter::once(&layout).chain(compat.iter()).flat_map(|l| [l.rootfs(Slot::A).fs_cap, l.rootfs(Slot::B).fs_cap]).max().unwrap_or(0);
    let mut spill = Spill::with_limit(largest_cap.saturating_mul(16).max(1 << 30))?;
    let work = tempfile::Builder::new().prefix("slotforge-build-").tempdir()?;
    let parts = assemble(&m, &r, &build_id, epoch, &mut spill, work.path(), opts.progress)?;
    lap("flatten");
    let sqfs = work.path().join("rootfs.squashfs");
    let pb = opts.progress.bar("squashfs", parts.tree.count(), false);
    let squashfs_bytes = squashfs::write(&parts.tree, &sqfs, epoch as u32, &mut || pb.inc(1))?;
    pb.finish_and_clear();
    lap("squashfs");
    // The slot holds the squashfs, padded to a block, then its dm-verity hash area; its size is
    // a function of the squashfs size, so the cap is checked before the tree is computed.
    let (rootfs_bytes, verity_bytes) = if m.verity() {
        let p = verity::Params::derived(squashfs_bytes, &build_id);
        let area = verity::hash_area_bytes(p.data_blocks);
        (p.hash_offset() + area, area)
    } else {
        (squashfs_bytes, 0)
    };
    let mut all: Vec<&Layout> = vec![&layout];
    all.extend(compat.iter());
    let caps = rootfs::cap_checks(rootfs_bytes, verity_bytes, &all);
    if let Some(bad) = caps.iter().find(|c| c.slack < 0) {
        bail!("{}", rootfs::oversize_message(bad, &parts.contributors));
    }
    let verity = if m.verity() { Some(verity::append(&sqfs, &build_id).context("computing the rootfs dm-verity tree")?) } else { None };
    if verity.is_some() {
        lap("verity");
    }
    Ok(Composed { epoch, manifest: m, layout, compat, resolved: r, build_id, parts, rootfs_image: sqfs, squashfs_bytes, rootfs_bytes, verity, caps, phases, work, _spill: spill })
}

/// Build the disk image described by `opts`.
pub fn build(opts: &BuildOptions) -> anyhow::Result<BuildSummary> {
    let c = compose(&opts.compose)?;
    let mut phases = c.phases.clone();
    let mut clock = std::time::Instant::now();
    let mut lap = |name: &str| {
        phases.push((name.to_string(), (clock.elapsed().as_secs_f64() * 1000.0).round() / 1000.0));
        clock = std::time::Instant::now();
    };
    let (epoch, layout, build_id, work) = (c.epoch, &c.layout, &c.build_id, &c.work);
    let m = &c.manifest;
    let r = &c.resolved;
    let parts = &c.parts;
    let (sqfs, rootfs_bytes, caps) = (&c.rootfs_image, c.rootfs_bytes, c.caps.clone());
    let images_part = layout.by_role(Role::ExternalImages);

    // External-images partition.
    let mut images_file = None;
    if let Some(p) = images_part {
        let mut stage = Stage::new()?;
        let ext_bytes: u64 = parts.external.iter().map(|(e, _)| e.size).sum();
        let pb = opts.compose.progress.bar("images", ext_bytes, true);
        let mut pairs = Vec::new();
        for name in &opts.no_prefill {
            if !parts.external.iter().any(|(e, _)| &e.name == name) {
                bail!("--no-prefill {name}: the manifest has no external image of that name");
            }
        }
        for (e, idx) in parts.external.iter().filter(|(e, _)| !opts.no_prefill.contains(&e.name)) {
            let img = &r.containers[*idx].2;
            stage.add_external(e, img, parts.sealed.get(&e.name), &mut |n| pb.inc(n))?;
            pairs.push((e.clone(), img));
        }
        pb.finish_and_clear();
        stage.add_build(&build_id, m.version(), &pairs)?;
        stage.finish(epoch)?;
        let f = work.path().join("images.ext4");
        images::make_ext4(&stage, &f, p.size, &layout::derived_guid(&[&layout.name, "images-fs"]), "slotforge-images", epoch)?;
        images_file = Some(f);
    }
    lap("images");

    // ESP.
    let esp_part = layout.esp();
    let esp_file = work.path().join("esp.fat");
    let slot = Slot::A;
    let extra = opts.extra_cmdline.as_deref().unwrap_or("");
    let mut files = vec![
        EspFile { path: esp::LOADER_PATH.into(), data: c.loader_for_esp()?.open()? },
        EspFile { path: esp::LOADER_CONF.into(), data: Box::new(esp::LOADER_CONF_TEXT.as_bytes()) },
        EspFile { path: layout::RECORD_PATH.into(), data: Box::new(std::io::Cursor::new(crate::base::text::to_json(&layout))) },
    ];
    if c.uki() {
        // Type #2: one signed image holds kernel, initrd and the command line with its root hash.
        let uki = work.path().join("slot-a.efi");
        c.slot_uki(layout, slot, extra, &uki)?;
        files.push(EspFile { path: crate::format::entries::uki_path(slot, 1, opts.boot_tries), data: Box::new(std::fs::File::open(&uki)?) });
    } else {
        let entry = BootEntry {
            slot,
            title: format!("{} (slot {})", m.version(), slot.name()),
            version: 1,
            linux: format!("/{}/vmlinuz", slot.name()),
            initrd: parts.kernel.initrd.as_ref().map(|_| format!("/{}/initrd.img", slot.name())),
            options: c.slot_options(layout, slot, extra)?,
            tries: opts.boot_tries,
        };
        files.push(EspFile { path: entry.path(), data: Box::new(std::io::Cursor::new(entry.text().into_bytes())) });
        files.push(EspFile { path: entry.linux.clone(), data: parts.kernel.kernel.0.open()? });
        if let (Some(p), Some((c, _))) = (&entry.initrd, &parts.kernel.initrd) {
            files.push(EspFile { path: p.clone(), data: c.open()? });
        }
    }
    {
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&esp_file)?;
        f.set_len(esp_part.size)?;
        esp::write(f, esp_volume_id(&layout), epoch, files)?;
    }
    lap("esp");

    // The disk: only now is anything created next to the output.
    let mut disk = crate::format::disk::DiskWriter::create(&opts.output, &layout)?;
    let pb = opts.compose.progress.bar("disk", 3, false);
    disk.put(&mut std::fs::File::open(&esp_file)?, esp_part.start)?;
    pb.inc(1);
    disk.put(&mut std::fs::File::open(&sqfs)?, layout.rootfs(slot).start)?;
    pb.inc(1);
    let mut images_partition_bytes = 0;
    if let (Some(f), Some(p)) = (&images_file, images_part) {
        images_partition_bytes = disk.put(&mut std::fs::File::open(f)?, p.start)?;
    }
    pb.inc(1);
    let bytes_written = disk.bytes_written;
    disk.finish(&layout)?;
    pb.finish_and_clear();
    lap("disk");
    let mut bmap = None;
    if opts.bmap {
        let p = PathBuf::from(format!("{}.bmap", opts.output.display()));
        bmap = Some((p.clone(), crate::format::bmap::write_bmap(&opts.output, &p)?));
    }
    let mut qcow2 = None;
    if opts.qcow2 {
        let p = opts.output.with_extension("qcow2");
        crate::format::bmap::write_qcow2(&opts.output, &p)?;
        qcow2 = Some(p);
    }

    Ok(BuildSummary {
        output: opts.output.clone(),
        version: m.version().into(),
        build_id: build_id.clone(),
        layout: layout.name.clone(),
        generation: layout.generation,
        disk_size: layout.disk_size,
        bytes_written,
        rootfs_bytes,
        squashfs_bytes: c.squashfs_bytes,
        verity: c.verity.clone(),
        caps,
        external_images: parts.external.iter().map(|(e, _)| e.clone()).collect(),
        update_keys: update_keys(m)?.into_iter().map(|k| k.0).collect(),
        images_partition_bytes,
        contributors: parts.contributors.clone(),
        phases,
        bmap,
        qcow2,
    })
}

/// The FAT volume id, derived from the layout name like the GUIDs.
pub fn esp_volume_id(l: &Layout) -> u32 {
    let g = layout::derived_guid(&[&l.name, "esp-volume-id"]);
    u32::from_le_bytes(g.as_bytes()[..4].try_into().unwrap())
}
