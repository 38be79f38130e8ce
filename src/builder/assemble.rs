//! Assembling the rootfs tree of a build: init images at `/`, the kernel's modules, each
//! container's LinuxKit bundle (on-disk ones unpacked, external ones as metadata, sealed when
//! asked), `files:`, and slotforge's own metadata; the kernel, initrd and boot loader set aside
//! for the ESP.

use super::*;
use super::manifest::{service, update_keys};
use super::sources::Resolved;

/// A regular file inside a flattened tree, by path.
pub(super) fn tree_file(t: &Tree, path: &str) -> Option<(Content, u64)> {
    match &t.get(&components(path.as_bytes(), true).ok()?)?.kind {
        Kind::File { content, size, .. } => Some((content.clone(), *size)),
        _ => None,
    }
}

/// What the ESP needs from the kernel image.
pub(super) struct KernelFiles {
    pub(super) kernel: (Content, u64),
    pub(super) initrd: Option<(Content, u64)>,
}

/// The assembled rootfs tree and everything the later steps need from it.
pub(super) struct RootfsParts {
    pub(super) tree: Tree,
    pub(super) contributors: Vec<Contributor>,
    pub(super) kernel: KernelFiles,
    pub(super) loader: Content,
    pub(super) external: Vec<(ExternalImage, usize)>,
    /// Sealed external images by name: the sealed file (in the work directory) and its
    /// artifact manifest.
    pub(super) sealed: BTreeMap<String, (PathBuf, Vec<u8>)>,
    /// How the build cache served this build.
    pub(super) cache_use: super::buildcache::CacheUse,
}

/// The rootfs tree being assembled, and who put how much into it (for the oversize report).
struct Assembly<'a> {
    m: &'a LoadedManifest,
    epoch: u64,
    root: Tree,
    contributors: Vec<Contributor>,
    spill: &'a mut Spill,
    /// The flatten progress bar, advanced by layer bytes.
    pb: indicatif::ProgressBar,
    /// Layers flattened into the root so far (whiteouts only reach lower layers).
    layer_no: u32,
    cache: Option<&'a super::buildcache::BuildCache>,
    cache_use: super::buildcache::CacheUse,
}

/// Assemble the rootfs of a build, in the order of docs/architecture.md: init images, the
/// kernel image, the boot loader, each container, `files:`, slotforge's metadata.
pub(super) fn assemble(m: &LoadedManifest, r: &Resolved, build_id: &str, epoch: u64, spill: &mut Spill, work: &Path, cache: Option<&super::buildcache::BuildCache>, progress: Progress) -> anyhow::Result<RootfsParts> {
    let layer_bytes: u64 = r.init.iter().chain(std::iter::once(&r.kernel)).chain(r.loader.iter()).chain(r.volumes.iter().map(|v| &v.1)).chain(
        r.containers.iter().filter(|(s, i, _)| !service(m, *s, *i).is_external()).map(|(_, _, img)| img)
    ).flat_map(|i| i.layers.iter().map(|l| l.size)).sum();
    let pb = progress.bar("flatten", layer_bytes, true);
    let mut a = Assembly { m, epoch, root: Tree::new(epoch), contributors: Vec::new(), spill, pb: pb.clone(), layer_no: 0, cache, cache_use: Default::default() };
    a.init_images(&r.init)?;
    let kernel = a.kernel_image(&r.kernel)?;
    let loader = a.boot_loader(r.loader.as_ref())?;
    a.volumes(r)?;
    let (external, sealed) = a.containers(r, work)?;
    pb.finish_and_clear();
    a.files()?;
    a.metadata(build_id, &external)?;
    let Assembly { root, mut contributors, cache_use, .. } = a;
    for (o, b) in root.bytes_by_origin() {
        if let Some(c) = contributors.get_mut(o as usize) {
            c.bytes += b;
        }
    }
    Ok(RootfsParts { tree: root, contributors, kernel, loader, external, sealed, cache_use })
}

impl Assembly<'_> {
    /// A new contributor; its index is the origin of the nodes it puts in the tree.
    fn contributor(&mut self, kind: &str, name: &str, reference: Option<&str>, movable: bool) -> u32 {
        self.contributors.push(Contributor { kind: kind.into(), name: name.into(), reference: reference.map(str::to_string), bytes: 0, movable });
        self.contributors.len() as u32 - 1
    }

    /// Flatten `img` into the root, after the layers already there.
    fn flatten_into_root(&mut self, img: &ResolvedImage, origin: u32) -> anyhow::Result<()> {
        let pb = self.pb.clone();
        flatten_image(&mut self.root, img, self.spill, origin, &mut self.layer_no, &mut |n| pb.inc(n))
    }

    /// Flatten `img` into a tree of its own.
    fn flatten_into(&mut self, t: &mut Tree, img: &ResolvedImage, origin: u32) -> anyhow::Result<()> {
        let pb = self.pb.clone();
        flatten_image(t, img, self.spill, origin, &mut 0, &mut |n| pb.inc(n))
    }

    /// Init images, flattened at `/` in order, each with LinuxKit's init fix-ups.
    fn init_images(&mut self, init: &[ResolvedImage]) -> anyhow::Result<()> {
        for img in init {
            let o = self.contributor("init", &img.reference, Some(&img.reference), false);
            self.flatten_into_root(img, o)?;
            crate::linuxkit::bundle::fixups(&mut self.root, Some(crate::linuxkit::bundle::INIT_RESOLV_CONF), self.epoch, o).map_err(|e| anyhow::anyhow!("{}: {e}", img.reference))?;
        }
        Ok(())
    }

    /// The kernel image: the kernel and initrd go to the ESP (the microcode cpio of `ucode`
    /// leading the initrd); its modules tarball into the rootfs.
    fn kernel_image(&mut self, kimg: &ResolvedImage) -> anyhow::Result<KernelFiles> {
        let kspec = self.m.manifest.kernel.as_ref().unwrap();
        let reference = &kimg.reference;
        let ko = self.contributor("kernel", "modules", Some(reference), false);
        let mut ktree = Tree::new(self.epoch);
        self.flatten_into(&mut ktree, kimg, ko)?;
        let named = |p: &str, key: &str| tree_file(&ktree, p).ok_or_else(|| anyhow::anyhow!("{reference}: kernel image has no regular file {p}{key}"));
        let kernel = match &kspec.binary {
            Some(p) => named(p, "")?,
            None => tree_file(&ktree, "kernel")
                .or_else(|| tree_file(&ktree, "boot/vmlinuz"))
                .ok_or_else(|| anyhow::anyhow!("{reference}: kernel image has neither /kernel nor /boot/vmlinuz; set kernel.binary"))?,
        };
        let initrd = match &kspec.initrd {
            Some(p) => Some(named(p, "")?),
            None => tree_file(&ktree, "initrd.img").or_else(|| tree_file(&ktree, "boot/initrd.img")),
        };
        // LinuxKit refuses a kernel image without its tarball unless `tar: none`; slotforge accepts
        // one without the default `kernel.tar` (a distribution kernel packed as an image has none),
        // and refuses only a tarball named explicitly and missing (docs/manifest.md).
        let ktar = kspec.tar_name().and_then(|t| match tree_file(&ktree, t) {
            Some((c, _)) => Some(Ok((t, c))),
            None if kspec.tar.is_none() => None,
            None => Some(Err(anyhow::anyhow!("{reference}: kernel image has no {t} (kernel.tar)"))),
        });
        if let Some(k) = ktar {
            let (ktar, content) = k?;
            let ctx = LayerCtx { image: reference, layer: ktar, layer_no: self.layer_no + 1, origin: ko };
            apply_layer(&mut self.root, content.open()?, &ctx, self.spill)?;
        }
        // LinuxKit's `ucode`: a microcode cpio the kernel must see first, so it leads the initrd.
        let initrd = match &kspec.ucode {
            None => initrd,
            Some(u) => {
                let (ucode, _) = named(u, " (kernel.ucode)")?;
                let mut joined: Box<dyn std::io::Read> = ucode.open()?;
                if let Some((c, _)) = &initrd {
                    joined = Box::new(joined.chain(c.open()?));
                }
                Some(self.spill.store(&mut joined)?)
            }
        };
        Ok(KernelFiles { kernel, initrd })
    }

    /// The UEFI boot loader: from its image (at `loader_path`), or a file on the build host.
    fn boot_loader(&mut self, img: Option<&ResolvedImage>) -> anyhow::Result<Content> {
        let m = self.m;
        let loader_path = m.boot().loader_path.clone().unwrap_or_else(|| DEFAULT_LOADER_PATH.into());
        if let Some(img) = img {
            let mut lt = Tree::new(self.epoch);
            self.flatten_into(&mut lt, img, 0)?;
            return Ok(tree_file(&lt, &loader_path).ok_or_else(|| anyhow::anyhow!("{}: boot loader image has no regular file {loader_path}", img.reference))?.0);
        }
        let v = &m.boot().loader.value;
        let p = m.dir().join(v.strip_prefix("file:").unwrap());
        if !p.is_file() {
            if m.manifest.boot.is_none() {
                bail!("{}: no `boot:` section, so the build host's systemd-boot is used, and {} is missing: install Debian's systemd-boot-efi package (apt-get install systemd-boot-efi) or name a loader in `boot: {{loader: ...}}`", m.path.display(), p.display());
            }
            bail!("{}: boot.loader {v}: {} is not a file (Debian ships systemd-boot in systemd-boot-efi)", m.path.display(), p.display());
        }
        Ok(Content::Path(p))
    }

    /// LinuxKit's named volumes: `/containers/volumes/NAME/{lower,merged[,tmp]}`, `lower`
    /// holding the image's files (`format: filesystem`, the default), the image as an OCI
    /// layout (`format: oci`), or nothing.
    fn volumes(&mut self, r: &Resolved) -> anyhow::Result<()> {
        let (m, epoch) = (self.m, self.epoch);
        for (i, v) in m.manifest.volumes.iter().enumerate() {
            let name = &v.name.value;
            let img = r.volumes.iter().find(|(j, _)| *j == i).map(|(_, img)| img);
            let o = self.contributor("volume", name, img.map(|i| i.reference.as_str()), false);
            let lower = format!("{}/lower", crate::linuxkit::volume::base_dir(name));
            let at = |e: String| anyhow::Error::new(InputError::spanned(&m.path, &v.name, format!("volume {name}: {e}")));
            if let (Some(img), Some(p)) = (img, v.platforms.as_ref()) {
                let want = img.platform.to_string();
                if let Some(other) = p.value.iter().find(|x| **x != want) {
                    return Err(InputError::spanned(&m.path, p, format!("volume {name}: platform {other}: slotforge lays out the build's platform ({want}) only")).into());
                }
            }
            if let Some(img) = img {
                self.volume_contents(v, img, &lower, o).map_err(|e| at(format!("{e:#}")))?;
            }
            // After the contents: a directory put over an existing one keeps what it holds.
            for d in crate::linuxkit::volume::dirs(name, v.readonly) {
                self.root.insert(&components(d.as_bytes(), true).unwrap(), Node::dir(Meta::new(0o755, epoch), u32::MAX, o)).map_err(|e| anyhow::anyhow!("{d}: {e}"))?;
            }
        }
        Ok(())
    }

    /// What fills a volume's `lower`: the image's files, or the image as an OCI layout.
    fn volume_contents(&mut self, v: &super::manifest::Volume, img: &ResolvedImage, lower: &str, o: u32) -> anyhow::Result<()> {
        if v.oci_layout() {
            return self.oci_layout(img, lower, o);
        }
        let mut sub = Tree::new(self.epoch);
        self.flatten_into(&mut sub, img, o)?;
        self.root.graft(&components(lower.as_bytes(), true).unwrap(), sub, o).map_err(|e| anyhow::anyhow!("{lower}: {e}"))
    }

    /// `img` as an OCI image layout at `dir`: `oci-layout`, `index.json` naming its manifest by
    /// its reference, and the manifest, config and layer blobs exactly as they were pulled.
    fn oci_layout(&mut self, img: &ResolvedImage, dir: &str, o: u32) -> anyhow::Result<()> {
        let epoch = self.epoch;
        let blob = |d: &Digest| format!("{dir}/blobs/sha256/{}", d.hex());
        rootfs::put_file(&mut self.root, &format!("{dir}/oci-layout"), crate::format::images::OCI_LAYOUT.to_vec(), 0o644, epoch, o)?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::oci::image::MT_OCI_INDEX,
            "manifests": [{
                "mediaType": img.manifest_media_type,
                "digest": img.manifest_digest.to_string(),
                "size": img.manifest_bytes.len(),
                "platform": img.platform,
                "annotations": {"org.opencontainers.image.ref.name": img.reference},
            }],
        });
        rootfs::put_file(&mut self.root, &format!("{dir}/index.json"), serde_json::to_vec(&index)?, 0o644, epoch, o)?;
        rootfs::put_file(&mut self.root, &blob(&img.manifest_digest), img.manifest_bytes.clone(), 0o644, epoch, o)?;
        rootfs::put_file(&mut self.root, &blob(&img.config_digest), img.config_bytes.clone(), 0o644, epoch, o)?;
        for l in &img.layers {
            let mut r = crate::oci::open_verified(img.source.as_ref(), &l.digest, l.size, "layer")?;
            let (content, size) = self.spill.store(&mut r)?;
            self.pb.inc(l.size);
            rootfs::put_content(&mut self.root, &blob(&l.digest), content, size, 0o644, epoch, o)?;
        }
        Ok(())
    }

    /// Every onboot/onshutdown/service container: its LinuxKit bundle (`config.json`,
    /// `runtime.json`, mount points); an on-disk image unpacked into it, an external one
    /// recorded (and sealed into `work`). Returns the external images and the sealed files.
    #[allow(clippy::type_complexity)]
    fn containers(&mut self, r: &Resolved, work: &Path) -> anyhow::Result<(Vec<(ExternalImage, usize)>, BTreeMap<String, (PathBuf, Vec<u8>)>)> {
        let (m, epoch) = (self.m, self.epoch);
        let ids = m.ids();
        let volumes = m.volumes();
        let mut external = Vec::new();
        let mut sealed_files = BTreeMap::new();
        let mut unpacked = BTreeMap::new();
        for (idx, (section, i, img)) in r.containers.iter().enumerate() {
            let entry = &m.section(*section)[*i];
            let s = &entry.value;
            let name = s.name();
            let o = self.contributor(section.dir(), name, Some(&img.reference), !s.is_external() && *section != Section::Onshutdown);
            let defaults = rootfs::image_defaults(img);
            let at = |e: String| anyhow::Error::new(InputError::spanned(&m.path, entry, format!("{} {name}: {e}", section.dir())));
            let label = match &defaults.label {
                Some(text) => crate::linuxkit::spec::parse_label(&img.reference, text).map_err(at)?,
                None => Default::default(),
            };
            let s = &crate::linuxkit::volume::resolve(s, &volumes).map_err(at)?;
            let (spec, runtime) = crate::linuxkit::oci::config_to_oci(s, &label, &defaults, &ids).map_err(at)?;
            let dir = crate::linuxkit::bundle::bundle_dir(*section, *i, name);
            let b = crate::linuxkit::bundle::plan(dir, &spec, &runtime, &img.reference, !s.is_external(), &mut unpacked);
            rootfs::put_file(&mut self.root, &format!("{}/config.json", b.dir), b.config_json, 0o644, epoch, o)?;
            rootfs::put_file(&mut self.root, &format!("{}/runtime.json", b.dir), b.runtime_json, 0o644, epoch, o)?;
            for mp in &b.mount_points {
                self.root.insert(&components(mp.as_bytes(), true).unwrap(), Node::dir(Meta::new(0o755, epoch), u32::MAX, o)).map_err(|e| anyhow::anyhow!("{mp}: {e}"))?;
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
                    let (sealed, artifact) = self.seal(img, &mkdirs, crate::format::sealed::salt(name), &file).with_context(|| format!("sealing external image {name}"))?;
                    e.sealed = Some(sealed);
                    e.keep_layers = s.keeps_layers();
                    sealed_files.insert(name.to_string(), (file, artifact));
                }
                rootfs::put_file(&mut self.root, &format!("{}/image.json", b.dir), crate::base::text::to_json(&e), 0o644, epoch, o)?;
                external.push((e, idx));
            } else if let Some(at_dir) = &b.unpack_at {
                let mut sub = Tree::new(epoch);
                self.flatten_into(&mut sub, img, o)?;
                crate::linuxkit::bundle::fixups(&mut sub, None, epoch, o).map_err(|e| anyhow::anyhow!("{}: {e}", img.reference))?;
                if b.readonly {
                    // runc makes missing mount points itself; in a read-only slot it cannot, so
                    // they are made here (LinuxKit's unpacked root is writable at that moment).
                    crate::format::sealed::add_mount_points(&mut sub, &mount_points(&spec), epoch, o).with_context(|| img.reference.clone())?;
                }
                self.root.graft(&components(at_dir.as_bytes(), true).unwrap(), sub, o).map_err(|e| anyhow::anyhow!("{at_dir}: {e}"))?;
            }
        }
        Ok((external, sealed_files))
    }

    /// An external image sealed into `file`: from the build cache when it holds this seal
    /// (checked on the way out), else sealed now and stored there.
    fn seal(&mut self, img: &ResolvedImage, mkdirs: &[String], salt: [u8; 32], file: &Path) -> anyhow::Result<(crate::format::sealed::Sealed, Vec<u8>)> {
        if let Some(c) = self.cache {
            let (l, hit) = c.sealed(img, mkdirs, &salt, file);
            self.cache_use.count(l);
            if let Some(v) = hit {
                return Ok(v);
            }
        }
        let mut sp = Spill::with_limit(img.layers.iter().map(|l| l.size).sum::<u64>().saturating_mul(16).max(1 << 30))?;
        let blocks: Option<&dyn crate::format::squashfs::writer::BlockStore> = self.cache.map(|c| c as _);
        let (sealed, artifact) = crate::compose::seal::seal(img, mkdirs, salt, file, &mut sp, &mut |_| {}, blocks)?;
        if let Some(c) = self.cache {
            // A cache that cannot take the entry costs the next build time, not this one.
            let _ = c.put_sealed(img, mkdirs, &salt, file, &sealed, &artifact);
        }
        Ok((sealed, artifact))
    }

    /// The manifest's `files:` entries, in order.
    fn files(&mut self) -> anyhow::Result<()> {
        let (m, epoch) = (self.m, self.epoch);
        let fo = self.contributor("files", "files:", None, false);
        let ids = m.ids();
        let mut added = std::collections::BTreeSet::new();
        for (n, f) in m.manifest.files.iter().enumerate() {
            rootfs::apply_file_entry(&mut self.root, m, n, &ids, &mut added, epoch, fo).map_err(|e| anyhow::Error::new(InputError::spanned(&m.path, &f.path, format!("{e:#}"))))?;
        }
        Ok(())
    }

    /// slotforge's own files: the update keys, `release.json`, `external-images.json`.
    fn metadata(&mut self, build_id: &str, external: &[(ExternalImage, usize)]) -> anyhow::Result<()> {
        let (m, epoch) = (self.m, self.epoch);
        let so = self.contributor("slotforge", "metadata", None, false);
        for (id, text) in update_keys(m)? {
            rootfs::put_file(&mut self.root, &format!("{}/{id}.pub", crate::format::signature::KEYS_DIR), text.into_bytes(), 0o644, epoch, so)?;
        }
        let release = Release { format: crate::format::release::METADATA_FORMAT, version: m.version().into(), build_id: build_id.into(), source_date_epoch: epoch, builder: format!("slotforge {}", env!("CARGO_PKG_VERSION")) };
        rootfs::put_file(&mut self.root, crate::format::release::RELEASE_PATH, crate::base::text::to_json(&release), 0o644, epoch, so)?;
        let mut ext_sorted: Vec<ExternalImage> = external.iter().map(|(e, _)| e.clone()).collect();
        ext_sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let ext = ExternalImages { format: crate::format::release::METADATA_FORMAT, build_id: build_id.into(), images: ext_sorted };
        rootfs::put_file(&mut self.root, crate::format::release::EXTERNAL_PATH, crate::base::text::to_json(&ext), 0o644, epoch, so)
    }
}

/// The mount destinations of a container that must exist in a read-only root (not under
/// /dev, /proc or /sys, which the runtime mounts whole).
pub(super) fn mount_points(spec: &crate::linuxkit::oci::Spec) -> Vec<String> {
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
