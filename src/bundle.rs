//! Update bundles: one OCI image layout (a directory, or a tar of one) so any registry or file
//! transport can carry it. Its `index.json` names the bundle manifest (ref = build id), whose
//! config is the bundle description and whose layers are the rootfs squashfs, the kernel and
//! the initrd; each external image of the build is in the same layout under its own ref.
//! Format: docs/upgrade-protocol.md#bundle.

use crate::build::{compose, ComposeOptions};
use crate::hash::{digest_reader, Digest};
use crate::images::Stage;
use crate::oci::image::{MT_OCI_INDEX, MT_OCI_MANIFEST, REF_NAME};
use crate::layout::Slot;
use crate::rootfs::ExternalImage;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;
pub const MT_CONFIG: &str = "application/vnd.slotforge.bundle.config.v1+json";
pub const MT_ROOTFS: &str = "application/vnd.slotforge.rootfs.squashfs";
pub const MT_KERNEL: &str = "application/vnd.slotforge.kernel";
pub const MT_INITRD: &str = "application/vnd.slotforge.initrd";
/// A (signed) Unified Kernel Image for one slot.
pub const MT_UKI: &str = "application/vnd.slotforge.uki";
/// The artifact type of a signature manifest (its `subject` is the bundle manifest).
pub const MT_SIGNATURE_ARTIFACT: &str = "application/vnd.slotforge.bundle.signature.v1";
/// A minisign signature file (`.minisig`) over the bundle's config blob.
pub const MT_MINISIG: &str = "application/vnd.minisign.signature.v1";
/// OCI 1.1's empty config for artifacts.
const MT_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const ANN_IMAGE: &str = "io.slotforge.bundle.image";
const ANN_KEY_ID: &str = "io.slotforge.signature.key-id";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
}

/// A layout generation the bundle's rootfs was checked against.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayoutReq {
    pub name: String,
    pub generation: u32,
    pub cap: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Requires {
    /// The squashfs size: the inactive slot's cap must hold it.
    pub rootfs_bytes: u64,
    /// The device's layout (name, generation) must be one of these.
    pub layouts: Vec<LayoutReq>,
}

/// The bundle description (the manifest's config blob).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BundleConfig {
    pub format: u32,
    pub build_id: String,
    pub version: String,
    pub rootfs: Blob,
    pub kernel: Blob,
    pub initrd: Option<Blob>,
    /// Kernel command line of the build (the entry adds root=, slot and build id).
    pub cmdline: String,
    pub requires: Requires,
    /// The rootfs blob's dm-verity parameters (the blob is the squashfs followed by its hash
    /// area); absent for a build with `verity: false`. Older agents ignore it and still boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<crate::verity::VerityInfo>,
    /// Boot through signed Unified Kernel Images: one per slot (`a`, `b`), each embedding that
    /// slot's command line. Empty for BLS (Type #1) entries.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ukis: std::collections::BTreeMap<String, Blob>,
    /// The build's external images (what its rootfs pins).
    pub images: Vec<ExternalImage>,
    /// Whether their blobs are in the bundle; if not, the device pulls them.
    pub images_included: bool,
}

pub struct BundleOptions {
    pub compose: ComposeOptions,
    pub output: PathBuf,
    /// Leave the external images out (the device pulls them from the registry).
    pub without_images: bool,
    /// minisign secret key files to sign the bundle's config with.
    pub sign: Vec<PathBuf>,
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
}

fn put_file(stage: &Stage, p: &Path) -> anyhow::Result<Blob> {
    let (digest, size) = digest_reader(std::fs::File::open(p)?)?;
    let dest = stage.path().join("blobs/sha256").join(digest.hex());
    if !dest.exists() {
        std::fs::copy(p, &dest)?;
    }
    Ok(Blob { digest, size })
}

fn put_content(stage: &Stage, c: &crate::tree::Content) -> anyhow::Result<Blob> {
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
    let password = std::env::var(crate::signature::PASSWORD_ENV).ok();
    let keys: Vec<_> = opts
        .sign
        .iter()
        .map(|p| {
            let t = std::fs::read_to_string(p).with_context(|| format!("reading secret key {}", p.display()))?;
            crate::signature::parse_secret(&t, password.clone()).with_context(|| format!("secret key {}", p.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    let c = compose(&opts.compose)?;
    let stage = Stage::new()?;
    let rootfs = put_file(&stage, &c.rootfs_image)?;
    let kernel = put_content(&stage, c.kernel())?;
    let initrd = c.initrd().map(|i| put_content(&stage, i)).transpose()?;
    let mut index = Vec::new();
    let mut images = Vec::new();
    for (e, img) in c.external() {
        if !opts.without_images {
            stage.add_external(e, img, c.sealed_file(&e.name), &mut |_| {})?;
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
    };
    let cfg_bytes = serde_json::to_vec(&config)?;
    let cfg = put_bytes(&stage, &cfg_bytes)?;
    let mut layers = vec![json!({"mediaType": MT_ROOTFS, "digest": rootfs.digest, "size": rootfs.size, "annotations": {"org.opencontainers.image.title": "rootfs.img"}}),
        json!({"mediaType": MT_KERNEL, "digest": kernel.digest, "size": kernel.size, "annotations": {"org.opencontainers.image.title": "vmlinuz"}})];
    layers.extend(uki_layers);
    if let Some(i) = &initrd {
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
        let sig = put_bytes(&stage, crate::signature::sign(sk, &cfg_bytes, &comment)?.as_bytes())?;
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
    Ok(BundleSummary { output: opts.output.clone(), build_id: c.build_id.clone(), version: c.version().into(), rootfs_bytes: c.rootfs_bytes, bundle_bytes: bytes, requires, signed_by })
}

/// A tar (sorted members, fixed times and owners) if `out` ends in `.tar`, else a directory.
fn write_out(dir: &Path, out: &Path, epoch: u64) -> anyhow::Result<u64> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = vec![dir.join("oci-layout"), dir.join("index.json")];
    let mut blobs: Vec<PathBuf> = std::fs::read_dir(dir.join("blobs/sha256"))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    blobs.sort();
    files.extend(blobs);
    if out.extension().is_some_and(|e| e == "tar") {
        let tmp = tempfile::Builder::new().prefix(".bundle.").suffix(".partial").tempfile_in(parent)?;
        let mut b = tar::Builder::new(tmp.as_file());
        let mut total = 0;
        for d in ["blobs/", "blobs/sha256/"] {
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
        std::fs::create_dir_all(tmp.path().join("blobs/sha256"))?;
        let mut total = 0;
        for f in &files {
            total += std::fs::copy(f, tmp.path().join(f.strip_prefix(dir).unwrap()))?;
        }
        std::fs::rename(tmp.keep(), out).with_context(|| format!("writing {}", out.display()))?;
        Ok(total)
    }
}

/// A bundle opened for applying: its layout directory (unpacked if it came as a tar).
pub struct Bundle {
    pub dir: PathBuf,
    pub config: BundleConfig,
    /// The config blob's exact bytes: what the signatures cover.
    pub config_bytes: Vec<u8>,
    /// The `.minisig` texts of every signature artifact whose subject is the bundle manifest.
    pub signatures: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Bundle {
    /// Open a bundle directory, a tar file, or a block device holding the tar. A tar is unpacked
    /// into a temporary directory under `scratch` (on the device: the images partition, so its
    /// blobs can later be renamed into place).
    pub fn open(src: &Path, scratch: Option<&Path>) -> anyhow::Result<Self> {
        let (dir, tmp) = if src.is_dir() {
            (src.to_path_buf(), None)
        } else {
            let tmp = match scratch {
                Some(s) => {
                    std::fs::create_dir_all(s)?;
                    tempfile::Builder::new().prefix("bundle-").tempdir_in(s)?
                }
                None => tempfile::Builder::new().prefix("slotforge-bundle-").tempdir()?,
            };
            let f = std::fs::File::open(src).with_context(|| format!("opening bundle {}", src.display()))?;
            // What a hostile stick may make us write: the free space of the scratch file system
            // less a reserve, counted while copying (members are verified by digest later).
            let mut budget = crate::tree::disk_budget(tmp.path());
            let mut ar = tar::Archive::new(std::io::BufReader::new(f));
            for e in ar.entries()? {
                let mut e = e?;
                let p = e.path()?.into_owned();
                let names: Vec<String> = p.components().filter_map(|c| match c {
                    std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
                    _ => None,
                }).collect();
                if p.components().any(|c| matches!(c, std::path::Component::ParentDir | std::path::Component::RootDir)) {
                    bail!("bundle member {} escapes the bundle; refusing it", p.display());
                }
                let ok = matches!(names.as_slice(), [n] if n == "oci-layout" || n == "index.json") || matches!(names.as_slice(), [b, a, h] if b == "blobs" && a == "sha256" && h.len() == 64);
                if !ok || !e.header().entry_type().is_file() {
                    continue;
                }
                let dest = tmp.path().join(names.join("/"));
                std::fs::create_dir_all(dest.parent().unwrap())?;
                let n = std::io::copy(&mut (&mut e).take(budget.saturating_add(1)), &mut std::fs::File::create(&dest)?)?;
                if n > budget {
                    bail!("bundle member {} would not fit the free space of {} (a bundle larger than the device can hold?)", p.display(), tmp.path().display());
                }
                budget -= n;
            }
            (tmp.path().to_path_buf(), Some(tmp))
        };
        let idx: serde_json::Value = serde_json::from_slice(&crate::oci::read_json_file(&dir.join("index.json")).context("bundle index.json")?)?;
        let m = idx["manifests"].as_array().and_then(|a| a.iter().find(|d| d["mediaType"] == MT_OCI_MANIFEST && d["annotations"].get(ANN_IMAGE).is_none())).context("bundle index names no bundle manifest")?;
        let md = Digest::parse(m["digest"].as_str().unwrap_or("")).map_err(|e| anyhow::anyhow!(e))?;
        let mbytes = read_verified(&dir, &md, m["size"].as_u64().unwrap_or(0))?;
        let man: serde_json::Value = serde_json::from_slice(&mbytes)?;
        if man["config"]["mediaType"] != MT_CONFIG {
            bail!("not a slotforge bundle (config media type {})", man["config"]["mediaType"]);
        }
        let cd = Digest::parse(man["config"]["digest"].as_str().unwrap_or("")).map_err(|e| anyhow::anyhow!(e))?;
        let config_bytes = read_verified(&dir, &cd, man["config"]["size"].as_u64().unwrap_or(0))?;
        let config: BundleConfig = serde_json::from_slice(&config_bytes).context("bundle config")?;
        if config.format != FORMAT {
            bail!("bundle format {} is not supported (this slotforge reads {FORMAT})", config.format);
        }
        let mut signatures = Vec::new();
        for d in idx["manifests"].as_array().into_iter().flatten().filter(|d| d["artifactType"] == MT_SIGNATURE_ARTIFACT) {
            // A damaged signature artifact is skipped: the decision then rests on the others.
            let Ok(sd) = Digest::parse(d["digest"].as_str().unwrap_or("")) else { continue };
            let Ok(sb) = read_verified(&dir, &sd, d["size"].as_u64().unwrap_or(0)) else { continue };
            let Ok(sm) = serde_json::from_slice::<serde_json::Value>(&sb) else { continue };
            if sm["subject"]["digest"].as_str() != Some(md.as_str()) {
                continue;
            }
            for l in sm["layers"].as_array().into_iter().flatten().filter(|l| l["mediaType"] == MT_MINISIG) {
                let Ok(ld) = Digest::parse(l["digest"].as_str().unwrap_or("")) else { continue };
                if let Ok(text) = read_verified(&dir, &ld, l["size"].as_u64().unwrap_or(0)) {
                    signatures.push(String::from_utf8_lossy(&text).into_owned());
                }
            }
        }
        Ok(Self { dir, config, config_bytes, signatures, _tmp: tmp })
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }
}

/// JSON documents and signatures of a bundle are small; a larger claim is refused before
/// anything is read, so a hostile bundle cannot make the reader balloon.
pub const MAX_METADATA_BLOB: u64 = 4 << 20;

fn read_verified(dir: &Path, d: &Digest, size: u64) -> anyhow::Result<Vec<u8>> {
    let p = dir.join("blobs/sha256").join(d.hex());
    let on_disk = std::fs::metadata(&p).with_context(|| format!("bundle blob {d} missing"))?.len();
    if size > MAX_METADATA_BLOB || on_disk != size {
        bail!("bundle blob {d}: {on_disk} bytes on disk, {size} claimed (metadata blobs are at most {MAX_METADATA_BLOB}); refusing it");
    }
    let b = std::fs::read(dir.join("blobs/sha256").join(d.hex())).with_context(|| format!("bundle blob {d} missing"))?;
    if Digest::of_bytes(&b) != *d || b.len() as u64 != size {
        bail!("bundle blob {d} is corrupt");
    }
    Ok(b)
}
