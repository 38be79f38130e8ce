//! Update bundles: one OCI image layout (a directory, or a tar of one) so any registry or file
//! transport can carry it. Its `index.json` names the bundle manifest (ref = build id), whose
//! config is the bundle description and whose layers are the rootfs squashfs, the kernel and
//! the initrd; each external image of the build is in the same layout under its own ref.
//! Format: docs/upgrade-protocol.md#bundle.

use crate::base::hash::Digest;
use crate::oci::image::MT_OCI_MANIFEST;
use crate::format::release::ExternalImage;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
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
pub const MT_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The rootfs blob's chunk index: casync's `.caibx` (docs/upgrade-protocol.md#chunks-and-delta-bundles).
pub const MT_CAIBX: &str = "application/vnd.slotforge.rootfs.caibx";
/// The `artifactType` of a release pushed to a registry (format::published).
pub const MT_RELEASE: &str = "application/vnd.slotforge.release.v1";
/// Where a delta's base holds the new rootfs's chunks (`casync::seed_offsets`).
pub const MT_SEED_OFFSETS: &str = "application/vnd.slotforge.seed-offsets.v1+zstd";
/// Where a bundle keeps its chunks: a casync store (`xxxx/<id>.cacnk`) beside the OCI layout.
pub const CHUNK_STORE: &str = "chunks";
pub const ANN_IMAGE: &str = "io.slotforge.bundle.image";
pub const ANN_KEY_ID: &str = "io.slotforge.signature.key-id";

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

/// A build a delta bundle was made against.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseBuild {
    pub build_id: String,
    pub version: String,
    /// The size of the base's rootfs blob and the dm-verity root hash its tree ends in: a slot
    /// whose image has this length and whose stored tree claims this root holds the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_hash: Option<String>,
    /// Where the base's rootfs holds each chunk of the new index (`casync::seed_offsets`, a
    /// blob of the bundle): a device whose slot holds that build finds the chunks it seeds from
    /// without chunking the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_offsets: Option<Blob>,
}

/// The rootfs blob cut into casync chunks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Chunks {
    /// The `.caibx` of the rootfs blob (squashfs and hash area).
    pub index: Blob,
    /// Set in a delta bundle, which leaves the rootfs blob out: its store holds only the chunks
    /// none of these builds has; the device assembles the rest from its own slots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delta_from: Vec<BaseBuild>,
    /// Sealed external images a delta carries as chunks, by the sealed blob's digest.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sealed: std::collections::BTreeMap<String, SealedChunks>,
}

/// A sealed image left out of a delta bundle: its index, and the sealed blobs of the bases (the
/// same service's earlier images) the device seeds the assembly from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SealedChunks {
    pub index: Blob,
    pub seeds: Vec<Digest>,
    /// Per seed (same order): where it holds each chunk of `index` (`casync::seed_offsets`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seed_offsets: Vec<Blob>,
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
    pub verity: Option<crate::format::verity::VerityInfo>,
    /// Boot through signed Unified Kernel Images: one per slot (`a`, `b`), each embedding that
    /// slot's command line. Empty for BLS (Type #1) entries.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ukis: std::collections::BTreeMap<String, Blob>,
    /// The build's external images (what its rootfs pins).
    pub images: Vec<ExternalImage>,
    /// Whether their blobs are in the bundle; if not, the device pulls them.
    pub images_included: bool,
    /// The rootfs blob's chunk index; in a delta bundle, what it is a delta against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Chunks>,
}

impl BundleConfig {
    /// The bases of a delta bundle (empty for a full one).
    pub fn delta_from(&self) -> &[BaseBuild] {
        self.chunks.as_ref().map(|c| c.delta_from.as_slice()).unwrap_or(&[])
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
    /// Where work files may go (a delta's assembled rootfs): the scratch directory given to
    /// [`Bundle::open`], so an interrupted apply finds its work again.
    pub scratch: Option<PathBuf>,
    /// Seeds the device worked out itself (a release pulled from a registry: where its running
    /// slot holds the chunks), used like a delta's bases; not signed, and needing no trust: every
    /// chunk is checked against its id.
    pub hints: Vec<BaseBuild>,
    /// Sealed images the device fetched as chunks itself (a release pulled from a registry), by
    /// sealed blob digest: the index it read and the seeds it found. As unsigned as `hints`: each
    /// chunk is checked against its id and the assembled image against the digest the config
    /// pins.
    pub sealed_hints: std::collections::BTreeMap<String, SealedChunks>,
    /// The chunk store when it is not the bundle's `chunks/` (a release layout's packs, unpacked).
    store: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
    _store_tmp: Option<tempfile::TempDir>,
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
            let mut budget = crate::format::tree::disk_budget(tmp.path());
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
                let hex = |h: &str, n: usize| h.len() == n && h.bytes().all(|c| c.is_ascii_hexdigit());
                let ok = matches!(names.as_slice(), [n] if n == "oci-layout" || n == "index.json")
                    || matches!(names.as_slice(), [b, a, h] if b == "blobs" && a == "sha256" && hex(h, 64))
                    || matches!(names.as_slice(), [c, x, h] if c == CHUNK_STORE && hex(x, 4) && h.strip_suffix(".cacnk").is_some_and(|i| hex(i, 64) && i.starts_with(x.as_str())));
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
        // Signature artifacts: listed in index.json (a bundle), or in a referrers index listed
        // there (a release copied from a registry with its `sha256-<hex>` tag, e.g. by skopeo).
        let mut listed: Vec<serde_json::Value> = Vec::new();
        for d in idx["manifests"].as_array().into_iter().flatten() {
            if d["mediaType"] == crate::oci::image::MT_OCI_INDEX {
                let Ok(nd) = Digest::parse(d["digest"].as_str().unwrap_or("")) else { continue };
                let Ok(nb) = read_verified(&dir, &nd, d["size"].as_u64().unwrap_or(0)) else { continue };
                let Ok(n) = serde_json::from_slice::<serde_json::Value>(&nb) else { continue };
                listed.extend(n["manifests"].as_array().into_iter().flatten().cloned());
            } else {
                listed.push(d.clone());
            }
        }
        let mut signatures = Vec::new();
        // (A copy may drop `artifactType` from the descriptors: then the manifest says.)
        for d in listed.iter().filter(|d| d["artifactType"] == MT_SIGNATURE_ARTIFACT || (d.get("artifactType").is_none() && d["mediaType"] == MT_OCI_MANIFEST && d["digest"] != m["digest"])) {
            // A damaged signature artifact is skipped: the decision then rests on the others.
            let Ok(sd) = Digest::parse(d["digest"].as_str().unwrap_or("")) else { continue };
            let Ok(sb) = read_verified(&dir, &sd, d["size"].as_u64().unwrap_or(0)) else { continue };
            let Ok(sm) = serde_json::from_slice::<serde_json::Value>(&sb) else { continue };
            if sm["subject"]["digest"].as_str() != Some(md.as_str()) || sm["artifactType"] != MT_SIGNATURE_ARTIFACT {
                continue;
            }
            for l in sm["layers"].as_array().into_iter().flatten().filter(|l| l["mediaType"] == MT_MINISIG) {
                let Ok(ld) = Digest::parse(l["digest"].as_str().unwrap_or("")) else { continue };
                if let Ok(text) = read_verified(&dir, &ld, l["size"].as_u64().unwrap_or(0)) {
                    signatures.push(String::from_utf8_lossy(&text).into_owned());
                }
            }
        }
        // A release copied out of a registry: its rootfs is in chunk packs; unpack them into a
        // casync store (under `scratch`) for the assembly, which checks every chunk by its id.
        let (store, store_tmp) = if man["artifactType"] == MT_RELEASE {
            let (dir_, t) = match scratch {
                Some(s) => {
                    std::fs::create_dir_all(s)?;
                    let t = tempfile::Builder::new().prefix("release-chunks-").tempdir_in(s)?;
                    (t.path().to_path_buf(), t)
                }
                None => {
                    let t = tempfile::Builder::new().prefix("slotforge-release-chunks-").tempdir()?;
                    (t.path().to_path_buf(), t)
                }
            };
            unpack_packs(&dir, &man, &dir_).context("unpacking the release's chunk packs")?;
            (Some(dir_), Some(t))
        } else {
            (None, None)
        };
        Ok(Self { dir, config, config_bytes, signatures, scratch: scratch.map(Path::to_path_buf), hints: vec![], sealed_hints: Default::default(), store, _tmp: tmp, _store_tmp: store_tmp })
    }

    /// A bundle whose parts were fetched into `dir` (`blobs/sha256/`, `chunks/`): the config's
    /// bytes and the signatures found for it.
    pub fn from_parts(dir: &Path, config_bytes: Vec<u8>, signatures: Vec<String>, scratch: Option<&Path>) -> anyhow::Result<Self> {
        let config: BundleConfig = serde_json::from_slice(&config_bytes).context("bundle config")?;
        if config.format != FORMAT {
            bail!("bundle format {} is not supported (this slotforge reads {FORMAT})", config.format);
        }
        Ok(Self { dir: dir.to_path_buf(), config, config_bytes, signatures, scratch: scratch.map(Path::to_path_buf), hints: vec![], sealed_hints: Default::default(), store: None, _tmp: None, _store_tmp: None })
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    /// The bundle's chunk store (casync's layout).
    pub fn chunk_store(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(|| self.dir.join(CHUNK_STORE))
    }

    /// The rootfs blob's chunks, read from the index blob (its size bounded by what the rootfs
    /// may hold, its digest and its chunks' sum checked against the config).
    pub fn rootfs_index(&self) -> anyhow::Result<Option<Vec<crate::format::casync::Entry>>> {
        let Some(c) = &self.config.chunks else { return Ok(None) };
        self.read_index(&c.index, self.config.rootfs.size, self.config.verity.as_ref().map(|v| v.hash_offset), "rootfs").map(Some)
    }

    /// The chunks of a sealed image the bundle carries as chunks (bounded and checked as the
    /// rootfs's), and the seeds it names.
    pub fn sealed_index(&self, sealed: &Digest, size: u64, hash_offset: u64) -> anyhow::Result<Option<(Vec<crate::format::casync::Entry>, &SealedChunks)>> {
        let Some(sc) = self.config.chunks.as_ref().and_then(|c| c.sealed.get(sealed.as_str())).or_else(|| self.sealed_hints.get(sealed.as_str())) else { return Ok(None) };
        Ok(Some((self.read_index(&sc.index, size, Some(hash_offset), &format!("sealed image {sealed}"))?, sc)))
    }

    /// Where a seed blob of `size` bytes holds each chunk of `index`, as the bundle says (`blob`).
    pub fn offsets_in(&self, blob: &Blob, size: u64, index: &[crate::format::casync::Entry]) -> Option<Vec<Option<u64>>> {
        if blob.size > MAX_METADATA_BLOB {
            return None;
        }
        let b = std::fs::read(self.blob_path(&blob.digest)).ok().filter(|b| b.len() as u64 == blob.size && Digest::of_bytes(b) == blob.digest)?;
        let at = crate::format::casync::parse_seed_offsets(&b, index).ok()?;
        let mut start = 0;
        for (e, a) in index.iter().zip(&at) {
            if a.is_some_and(|a| a + (e.end - start) > size) {
                return None;
            }
            start = e.end;
        }
        Some(at)
    }

    /// Where a slot holding `base` — an image of `size` bytes whose tree claims `root` — has each
    /// chunk of `index` (the new rootfs's), if the bundle says; `None` when it does not or the
    /// slot is not that base.
    pub fn seed_offsets(&self, base: &BaseBuild, size: u64, root: &str, index: &[crate::format::casync::Entry]) -> Option<Vec<Option<u64>>> {
        let blob = base.seed_offsets.as_ref().filter(|_| base.rootfs_size == Some(size) && base.root_hash.as_deref() == Some(root))?;
        self.offsets_in(blob, size, index)
    }

    /// A chunk index of an image of `size` bytes, read and bounded: it describes the whole image
    /// or (`data`: its dm-verity hash offset) the data before the hash area, which the device
    /// then makes itself.
    fn read_index(&self, index: &Blob, size: u64, data: Option<u64>, what: &str) -> anyhow::Result<Vec<crate::format::casync::Entry>> {
        let id = &self.config.build_id;
        let most = 64 + 40 * (size / crate::format::casync::MIN + 2);
        if index.size > most {
            bail!("bundle {id}: a {}-byte chunk index for a {size}-byte {what} (at most {most}); refusing it", index.size);
        }
        let b = std::fs::read(self.blob_path(&index.digest)).with_context(|| format!("bundle blob {} (chunk index of the {what}) missing", index.digest))?;
        if b.len() as u64 != index.size || Digest::of_bytes(&b) != index.digest {
            bail!("bundle blob {} (chunk index of the {what}) is corrupt", index.digest);
        }
        let e = crate::format::casync::parse_index(&b).with_context(|| format!("bundle {id}: chunk index of the {what}"))?;
        let end = e.last().map(|e| e.end).unwrap_or(0);
        if end != size && Some(end) != data {
            let data = data.map(|d| format!(" or its data's {d}")).unwrap_or_default();
            bail!("bundle {id}: the chunk index of the {what} describes {end} bytes, not {size}{data}");
        }
        Ok(e)
    }
}

/// Every chunk a release layout's packs hold (as its pack table says), written into the casync
/// store `store` as it is in the pack (compressed; checked when the assembly reads it).
fn unpack_packs(dir: &Path, man: &serde_json::Value, store: &Path) -> anyhow::Result<()> {
    let layer = |is: &dyn Fn(&str) -> bool, what: &str| -> anyhow::Result<Vec<u8>> {
        let l = man["layers"].as_array().and_then(|a| a.iter().find(|l| is(l["mediaType"].as_str().unwrap_or("")))).with_context(|| format!("release without a {what} layer"))?;
        let d = Digest::parse(l["digest"].as_str().unwrap_or("")).map_err(|e| anyhow::anyhow!(e))?;
        read_verified(dir, &d, l["size"].as_u64().unwrap_or(0))
    };
    let index = crate::format::casync::parse_index(&layer(&|mt| mt == MT_CAIBX, MT_CAIBX)?)?;
    crate::format::packs::unpack(&dir.join("blobs/sha256"), &layer(&crate::format::packs::is_table, "pack table")?, &index, store)
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

/// What a device trusting `keys` would decide about a bundle's signatures.
#[derive(Debug, Clone, Serialize)]
pub struct KeyCheck {
    pub ok: bool,
    pub build_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<crate::format::signature::Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `slotforge key verify`: check a bundle's signatures against minisign public key files, as a
/// device whose rootfs lists them under `update-keys:` would. Nothing is changed.
pub fn check_keys(bundle: &Path, keys: &[PathBuf]) -> anyhow::Result<KeyCheck> {
    let b = Bundle::open(bundle, None)?;
    let files: Vec<(String, Vec<u8>)> = keys
        .iter()
        .map(|k| Ok((format!("{}.pub", k.display()), std::fs::read(k).map_err(|e| anyhow::anyhow!("{}: {e}", k.display()))?)))
        .collect::<anyhow::Result<_>>()?;
    let trusted = crate::format::signature::trusted_keys(&files)?;
    let build_id = b.config.build_id.clone();
    Ok(match crate::format::signature::decide(&b.config_bytes, &b.signatures, &trusted) {
        Ok(d) => KeyCheck { ok: true, build_id, decision: Some(d), error: None },
        Err(e) => KeyCheck { ok: false, build_id, decision: None, error: Some(format!("{e:#}")) },
    })
}
