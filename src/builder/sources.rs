//! Where a build's images come from: every reference of the manifest resolved to a pinned,
//! verified image (a lock file's digests when `--locked`), blobs fetched into the cache
//! (`lock` and `pull` are this step on its own).

use super::*;

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

/// Everything a manifest names, resolved to digests with its metadata verified.
pub(super) struct Resolved {
    pub(super) kernel: ResolvedImage,
    pub(super) init: Vec<ResolvedImage>,
    pub(super) containers: Vec<(Section, usize, ResolvedImage)>,
    /// Volumes filled from an image: the volume's index in `volumes:`, the image.
    pub(super) volumes: Vec<(usize, ResolvedImage)>,
    pub(super) loader: Option<ResolvedImage>,
}

impl Resolved {
    /// Every resolved image (kernel, init, containers, loader).
    pub fn all(&self) -> Vec<&ResolvedImage> {
        std::iter::once(&self.kernel).chain(&self.init).chain(self.containers.iter().map(|c| &c.2)).chain(self.volumes.iter().map(|v| &v.1)).chain(&self.loader).collect()
    }
}

/// Every image reference the manifest names, in manifest order.
pub fn manifest_references(m: &LoadedManifest) -> Vec<String> {
    let mf = &m.manifest;
    let mut v: Vec<String> = mf.kernel.iter().map(|k| k.image.value.clone()).collect();
    v.extend(mf.init.iter().map(|i| i.value.clone()));
    v.extend(m.containers().map(|(_, s)| s.image.as_ref().expect("checked").value.clone()));
    v.extend(mf.volumes.iter().filter_map(|v| v.image()).map(|i| i.value.clone()));
    v.extend(Some(m.boot()).filter(|b| !b.loader.value.starts_with("file:")).map(|b| b.loader.value.clone()));
    v
}

/// Resolve everything the manifest names, pinned by `lock` when given. Offline, every
/// reference is tried and all that are missing are reported together.
pub(super) fn resolve_all(m: &LoadedManifest, resolver: &Resolver, lock: Option<&LockFile>, progress: Progress) -> anyhow::Result<Resolved> {
    let mf = &m.manifest;
    let kernel = mf.kernel.as_ref().ok_or_else(|| anyhow::anyhow!("{}: the manifest has no `kernel:` section; a bootable disk needs one", m.path.display()))?;
    let boot = m.boot();
    let total = 1 + mf.init.len() + m.containers().count() + mf.volumes.iter().filter(|v| v.image().is_some()).count() + usize::from(!boot.loader.value.starts_with("file:"));
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
    let volumes: Vec<_> = mf.volumes.iter().enumerate().filter_map(|(i, v)| Some((i, res(v.image()?)))).collect();
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
        volumes: volumes.into_iter().map(|(i, r)| r.map(|r| (i, r))).collect::<anyhow::Result<_>>()?,
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
pub(super) fn load_lock(m: &LoadedManifest, src: &SourceOptions) -> anyhow::Result<Option<LockFile>> {
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
