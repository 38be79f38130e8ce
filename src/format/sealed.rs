//! Sealed external images: an image flattened (the rootfs's flattener, LinuxKit's image fix-ups)
//! into a reproducible squashfs with a dm-verity tree appended, so the device opens it under a
//! root hash pinned in the verified rootfs and mounts it in place — no re-hash of every byte, no
//! unpacking into RAM. The sealed file is a blob of the images partition's OCI layout, tied to
//! its image by an artifact manifest whose `subject` is the image manifest. A sealed image is a
//! pure function of (image manifest digest, extra mount points, verity salt, [`FORMAT`]); the
//! salt is per service, so the next version of an image hashes its unchanged blocks the same
//! (a delta carries only the tree blocks over changed data), and the rootfs pins it: the build
//! and the device (repairing a corrupt or missing one from the pulled image) make the same bytes.
//! Format: docs/formats.md#sealed-images.

use crate::base::hash::Digest;
use crate::oci::image::MT_OCI_MANIFEST;
use crate::format::tree::{components, Meta, Node, Tree};
use crate::format::verity::VerityInfo;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Version of the sealing recipe (flattener + fix-ups + squashfs options + verity parameters).
/// A change that alters the bytes of a sealed image must bump it.
pub const FORMAT: u32 = 3;
/// The artifact manifest's `artifactType`.
pub const ARTIFACT_TYPE: &str = "application/vnd.slotforge.sealed-image.v1";
/// The sealed blob: squashfs, zero-padded to 4 KiB, then the dm-verity hash area.
pub const MT_SEALED: &str = "application/vnd.slotforge.sealed-image.squashfs.verity.v1";
/// OCI 1.1's empty descriptor (`{}`), the config of artifacts that have none.
pub const MT_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON: &[u8] = b"{}";
/// On a sealed artifact's entry in a build's nested index: the external image's name.
pub const ANN_SEALED_FOR: &str = "io.slotforge.sealed-for";
/// On an image's entry in a build's nested index: `omitted` when its layers are not stored.
pub const ANN_LAYERS: &str = "io.slotforge.layers";
pub const LAYERS_OMITTED: &str = "omitted";
const ANN_ROOT_HASH: &str = "io.slotforge.verity.root-hash";
const ANN_SALT: &str = "io.slotforge.verity.salt";
const ANN_HASH_OFFSET: &str = "io.slotforge.verity.hash-offset";
const ANN_DATA_BLOCKS: &str = "io.slotforge.verity.data-blocks";
const ANN_FORMAT: &str = "io.slotforge.sealed.format";
const ANN_FS: &str = "io.slotforge.sealed.filesystem";
const ANN_MKDIRS: &str = "io.slotforge.sealed.mkdirs";
/// The filesystem of sealed images (chosen by measurement: docs/benchmarks.md#sealed).
pub const FILESYSTEM: &str = "squashfs";

/// What the rootfs pins about a sealed image (`external-images.json`, key `sealed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    pub format: u32,
    pub filesystem: String,
    /// sha256 of the whole sealed blob (filesystem + hash area).
    pub digest: String,
    pub size: u64,
    /// The artifact manifest tying the blob to its image.
    pub artifact: String,
    pub artifact_size: u64,
    /// dm-verity parameters (what `veritysetup open` needs besides the file).
    pub root_hash: String,
    pub salt: String,
    pub hash_offset: u64,
    pub data_blocks: u64,
    pub data_block_size: u64,
    pub hash_block_size: u64,
    /// Directories added to the image (mount points a read-only container needs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mkdirs: Vec<String>,
}

/// The seed of a sealed image's verity UUID: everything its bytes depend on but the salt.
pub fn seed(image_digest: &str, mkdirs: &[String]) -> String {
    seed_of(FORMAT, image_digest, mkdirs)
}

fn seed_of(format: u32, image_digest: &str, mkdirs: &[String]) -> String {
    format!("slotforge sealed image\0{format}\0{image_digest}\0{}", mkdirs.join("\0"))
}

impl Sealed {
    /// The dm-verity parameters this pin's tree was made with, for the image `image_digest`
    /// (the UUID is derived, not pinned): a device that assembled the image's data from chunks
    /// makes the same hash area.
    pub fn tree_params(&self, image_digest: &str) -> anyhow::Result<crate::format::verity::Params> {
        let uuid = crate::format::verity::Params::derived(0, &seed_of(self.format, image_digest, &self.mkdirs)).uuid;
        crate::format::verity::Params::of_pin(self.data_blocks, &self.salt, uuid, (self.data_block_size, self.hash_block_size), self.hash_offset, "sha256")
    }
}

/// The verity salt of the sealed images of service `name`: the same for every version of its
/// image (format 1 derived it from the image digest, so every hash of a bumped image changed).
pub fn salt(name: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(format!("slotforge sealed image salt\0{name}").as_bytes()).into()
}

/// The salt a rootfs pins, as bytes (32 of them, hex).
pub fn pinned_salt(s: &Sealed) -> anyhow::Result<[u8; 32]> {
    let b = (0..s.salt.len()).step_by(2).map(|i| s.salt.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect::<Option<Vec<u8>>>();
    b.and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or_else(|| anyhow::anyhow!("pinned verity salt {:?} is not 32 bytes of hex", s.salt))
}

/// The artifact manifest for a sealed blob of the image `subject` (digest, size, media type).
/// Deterministic: the same sealed image gives the same bytes, hence the same digest, on the
/// build host and on the device.
pub fn artifact_manifest(subject: (&str, u64, &str), blob: (&str, u64), v: &VerityInfo, mkdirs: &[String]) -> Vec<u8> {
    let mut ann = serde_json::Map::new();
    ann.insert(ANN_ROOT_HASH.into(), v.root_hash.clone().into());
    ann.insert(ANN_SALT.into(), v.salt.clone().into());
    ann.insert(ANN_HASH_OFFSET.into(), v.hash_offset.to_string().into());
    ann.insert(ANN_DATA_BLOCKS.into(), v.data_blocks.to_string().into());
    ann.insert(ANN_FS.into(), FILESYSTEM.into());
    if !mkdirs.is_empty() {
        ann.insert(ANN_MKDIRS.into(), mkdirs.join(",").into());
    }
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MT_EMPTY, "digest": Digest::of_bytes(EMPTY_JSON).to_string(), "size": EMPTY_JSON.len(), "data": "e30="},
        "layers": [{"mediaType": MT_SEALED, "digest": blob.0, "size": blob.1, "annotations": ann}],
        "subject": {"mediaType": subject.2, "digest": subject.0, "size": subject.1},
        "annotations": {ANN_FORMAT: FORMAT.to_string()}
    }))
    .expect("serialisable")
}

/// The parts of an artifact manifest a reader needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactRef {
    pub blob: String,
    pub blob_size: u64,
    pub subject: String,
    pub root_hash: String,
}

/// Parse an artifact manifest written by [`artifact_manifest`]; `None` if it is not one.
pub fn parse_artifact(bytes: &[u8]) -> Option<ArtifactRef> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v["artifactType"] != ARTIFACT_TYPE {
        return None;
    }
    let l = &v["layers"][0];
    Some(ArtifactRef {
        blob: l["digest"].as_str()?.to_string(),
        blob_size: l["size"].as_u64()?,
        subject: v["subject"]["digest"].as_str()?.to_string(),
        root_hash: l["annotations"][ANN_ROOT_HASH].as_str()?.to_string(),
    })
}

/// Add each of `mkdirs` (absolute paths) as a 0755 directory owned by root where the image
/// has nothing; existing entries are left alone.
pub fn add_mount_points(t: &mut Tree, mkdirs: &[String], mtime: u64, origin: u32) -> anyhow::Result<()> {
    for d in mkdirs {
        let c = components(d.trim_start_matches('/').as_bytes(), true).map_err(|e| anyhow::anyhow!("mount point {d}: {e}"))?;
        if !c.is_empty() && t.get(&c).is_none() {
            t.insert(&c, Node::dir(Meta::new(0o755, mtime), u32::MAX, origin)).map_err(|e| anyhow::anyhow!("mount point {d}: {e}"))?;
        }
    }
    Ok(())
}

/// Check a sealed blob read from `r` against what the rootfs pins: the verity UUID derives from
/// the image digest and mount points, the salt is the pinned one, the tree recomputed from the
/// data must equal the stored one and end in the pinned root hash. Streams; holds only the tree.
pub fn check_blob(mut r: impl std::io::Read, image_digest: &str, s: &Sealed) -> anyhow::Result<()> {
    let p = crate::format::verity::Params::derived(s.hash_offset, &seed(image_digest, &s.mkdirs)).with_salt(pinned_salt(s)?);
    if p.hash_offset() != s.hash_offset || p.data_blocks != s.data_blocks {
        anyhow::bail!("pinned hash offset {} and {} data blocks do not agree", s.hash_offset, s.data_blocks);
    }
    let tree = crate::format::verity::build(std::io::Read::take(&mut r, s.hash_offset), &p)?;
    let root = crate::base::hash::hex(&tree.root);
    if root != s.root_hash {
        anyhow::bail!("the data hashes to root {root}, the rootfs pins {}", s.root_hash);
    }
    let mut stored = Vec::with_capacity(tree.bytes.len());
    r.read_to_end(&mut stored)?;
    if stored != tree.bytes {
        anyhow::bail!("the stored dm-verity tree differs from the data's");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> VerityInfo {
        VerityInfo { root_hash: "ab".repeat(32), salt: "cd".repeat(32), hash_offset: 8192, data_blocks: 2, data_block_size: 4096, hash_block_size: 4096, tree_bytes: 8192, uuid: String::new(), algorithm: "sha256".into() }
    }

    #[test]
    fn artifact_manifest_is_deterministic_and_names_its_subject() {
        let subj = ("sha256:".to_string() + &"1".repeat(64), 500u64, MT_OCI_MANIFEST);
        let blob = ("sha256:".to_string() + &"2".repeat(64), 16384u64);
        let a = artifact_manifest((&subj.0, subj.1, subj.2), (&blob.0, blob.1), &info(), &[]);
        assert_eq!(a, artifact_manifest((&subj.0, subj.1, subj.2), (&blob.0, blob.1), &info(), &[]));
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["subject"]["digest"], subj.0.as_str());
        assert_eq!(v["config"]["digest"], "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a");
        assert_eq!(v["layers"][0]["annotations"][ANN_HASH_OFFSET], "8192");
        let r = parse_artifact(&a).unwrap();
        assert_eq!((r.blob.as_str(), r.blob_size, r.subject.as_str()), (blob.0.as_str(), blob.1, subj.0.as_str()));
        assert_eq!(r.root_hash, "ab".repeat(32));
        // Mount points are part of what was sealed.
        let b = artifact_manifest((&subj.0, subj.1, subj.2), (&blob.0, blob.1), &info(), &["/var/log".into()]);
        assert_ne!(a, b);
        assert!(parse_artifact(br#"{"schemaVersion":2,"layers":[]}"#).is_none());
    }

    #[test]
    fn seed_depends_on_image_and_mount_points() {
        assert_ne!(seed("sha256:a", &[]), seed("sha256:b", &[]));
        assert_ne!(seed("sha256:a", &[]), seed("sha256:a", &["/x".into()]));
        assert_ne!(salt("app"), salt("web"));
    }

    #[test]
    fn a_pinned_salt_must_be_32_bytes_of_hex() {
        let mut s = Sealed { format: FORMAT, filesystem: FILESYSTEM.into(), digest: String::new(), size: 0, artifact: String::new(), artifact_size: 0, root_hash: String::new(), salt: crate::base::hash::hex(&salt("app")), hash_offset: 0, data_blocks: 0, data_block_size: 4096, hash_block_size: 4096, mkdirs: vec![] };
        assert_eq!(pinned_salt(&s).unwrap(), salt("app"));
        for bad in ["", "ab", &"zz".repeat(32), &"ab".repeat(33), &"é".repeat(32)] {
            s.salt = bad.to_string();
            assert!(pinned_salt(&s).is_err(), "{bad:?}");
        }
    }
}
