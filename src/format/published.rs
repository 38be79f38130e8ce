//! A release as it lives in an OCI registry: one OCI 1.1 artifact manifest whose config is the
//! bundle config (the bytes the signatures cover, also inline as `data`), whose layers are the
//! rootfs's casync index and pack table (inline too), the boot files, and the chunk packs — not
//! the rootfs blob: the chunks are in the packs. Signatures are artifacts whose `subject` is this
//! manifest, carrying the `.minisig` as a layer and as an annotation, so the referrers list alone
//! is enough to decide. The metadata a device needs before it fetches any content is thus two or
//! three requests: the manifest, the referrers API (404 on registries without it), the referrers
//! tag `sha256-<hex>`. Sealed external images travel with the release: their small blobs and
//! the sealed blob's chunk index inline, the sealed blob whole in the repository (read by range),
//! the sealed artifact a referrer of the image's manifest. Format:
//! docs/upgrade-protocol.md#releases-in-a-registry.

use crate::base::hash::Digest;
use crate::format::bundle::{Blob, ANN_KEY_ID, MT_CAIBX, MT_CONFIG, MT_EMPTY, MT_MINISIG, MT_SIGNATURE_ARTIFACT};
use crate::format::packs::{PackTable, MT_PACK, MT_PACK_TABLE, MT_PACK_TABLE_V1};
use crate::oci::image::{MT_OCI_INDEX, MT_OCI_MANIFEST};
use anyhow::{bail, Context};
use base64::Engine as _;
use serde_json::{json, Value};

/// The release manifest's `artifactType`.
pub const ARTIFACT_TYPE: &str = crate::format::bundle::MT_RELEASE;
/// On a signature artifact (and so on its descriptor in a referrers list): the `.minisig` text.
pub const ANN_MINISIG: &str = "io.slotforge.signature.minisig";
const TITLE: &str = "org.opencontainers.image.title";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A layer of the release besides the inline ones and the packs (kernel, initrd, a UKI).
pub struct File {
    pub media_type: String,
    pub blob: Blob,
    pub title: String,
}

/// On a layer that belongs to a sealed external image: which part of it (`manifest`, `config`,
/// `artifact`, `caibx`, `sealed`); `io.slotforge.sealed-for` names the image.
pub const ANN_PART: &str = "io.slotforge.sealed-part";
/// The casync index of a sealed image's blob.
pub const MT_SEALED_CAIBX: &str = "application/vnd.slotforge.sealed-image.caibx";

/// A sealed external image published with the release: what the device stores besides the
/// sealed blob — the image's manifest and config, the sealed artifact manifest — and the blob's
/// casync index, all inline; the sealed blob itself is in the repository (pushed whole, read by
/// range: only the chunks the device lacks), and the artifact manifest is pushed too, as a
/// referrer of the image's manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedImage {
    pub name: String,
    pub manifest_media_type: String,
    pub manifest: Vec<u8>,
    pub config_media_type: String,
    pub config: Vec<u8>,
    pub artifact: Vec<u8>,
    pub caibx: Vec<u8>,
    pub blob: Blob,
    /// Where the sealed blob's chunks are in the release's packs (a pack table, v2): the
    /// chunks new to the repository share packs with the rootfs's, so a device fetches a
    /// one-service update in one range request. A release without it (older pushes) is read
    /// from the sealed blob by range.
    pub table: Option<Vec<u8>>,
}

fn inline(mt: &str, b: &[u8], title: &str) -> Value {
    json!({"mediaType": mt, "digest": Digest::of_bytes(b).to_string(), "size": b.len(), "data": b64(b), "annotations": {TITLE: title}})
}

/// The release manifest.
pub fn manifest(config: &[u8], caibx: &[u8], table: &PackTable, files: &[File], sealed: &[SealedImage]) -> Vec<u8> {
    let table_bytes = serde_json::to_vec(table).expect("serialisable");
    let mut layers = vec![inline(MT_CAIBX, caibx, "rootfs.caibx"), inline(MT_PACK_TABLE, &table_bytes, "packs.json")];
    layers.extend(files.iter().map(|f| json!({"mediaType": f.media_type, "digest": f.blob.digest, "size": f.blob.size, "annotations": {TITLE: f.title}})));
    for si in sealed {
        let n = &si.name;
        let part = |mut l: Value, p: &str| {
            l["annotations"][ANN_PART] = p.into();
            l["annotations"][crate::format::sealed::ANN_SEALED_FOR] = n.as_str().into();
            l
        };
        layers.push(part(inline(&si.manifest_media_type, &si.manifest, &format!("{n}.manifest.json")), "manifest"));
        layers.push(part(inline(&si.config_media_type, &si.config, &format!("{n}.config.json")), "config"));
        layers.push(part(inline(MT_OCI_MANIFEST, &si.artifact, &format!("{n}.sealed.json")), "artifact"));
        layers.push(part(inline(MT_SEALED_CAIBX, &si.caibx, &format!("{n}.caibx")), "caibx"));
        layers.push(part(json!({"mediaType": crate::format::sealed::MT_SEALED, "digest": si.blob.digest, "size": si.blob.size, "annotations": {TITLE: format!("{n}.sealed")}}), "sealed"));
        if let Some(t) = &si.table {
            layers.push(part(inline(MT_PACK_TABLE, t, &format!("{n}.packs.json")), "packs"));
        }
    }
    // Every pack a table points into, once.
    let mut packs: Vec<crate::format::packs::Pack> = table.packs.clone();
    for t in sealed.iter().filter_map(|si| si.table.as_deref()) {
        for p in serde_json::from_slice::<PackTable>(t).map(|t| t.packs).unwrap_or_default() {
            if !packs.iter().any(|q| q.digest == p.digest) {
                packs.push(p);
            }
        }
    }
    layers.extend(packs.iter().enumerate().map(|(i, p)| json!({"mediaType": MT_PACK, "digest": p.digest, "size": p.size, "annotations": {TITLE: format!("pack-{i}")}})));
    serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MT_CONFIG, "digest": Digest::of_bytes(config).to_string(), "size": config.len(), "data": b64(config)},
        "layers": layers,
    }))
    .expect("serialisable")
}

/// A signature artifact of the release manifest `subject` (digest, size): the `.minisig` blob
/// `sig` as its layer and its text as an annotation.
pub fn signature_manifest(subject: (&Digest, u64), sig: &Blob, text: &str, key_id: &str) -> Vec<u8> {
    let empty = Digest::of_bytes(b"{}");
    serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "artifactType": MT_SIGNATURE_ARTIFACT,
        "config": {"mediaType": MT_EMPTY, "digest": empty, "size": 2, "data": "e30="},
        "layers": [{"mediaType": MT_MINISIG, "digest": sig.digest, "size": sig.size, "annotations": {TITLE: "config.minisig", ANN_KEY_ID: key_id}}],
        "subject": {"mediaType": MT_OCI_MANIFEST, "digest": subject.0, "size": subject.1},
        "annotations": {ANN_KEY_ID: key_id, ANN_MINISIG: text},
    }))
    .expect("serialisable")
}

/// The referrers tag of a manifest (the OCI 1.1 fallback for registries without the API).
pub fn referrers_tag(d: &Digest) -> String {
    format!("sha256-{}", d.hex())
}

/// A referrers list (the API's answer or the fallback tag's index) with `add` (a manifest:
/// bytes) in it, replacing an entry of the same digest.
pub fn with_referrer(list: Option<&[u8]>, add: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut idx: Value = match list {
        Some(b) => serde_json::from_slice(b).context("referrers index")?,
        None => json!({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": []}),
    };
    let m: Value = serde_json::from_slice(add)?;
    let d = Digest::of_bytes(add);
    let mut desc = json!({"mediaType": MT_OCI_MANIFEST, "digest": d, "size": add.len(), "artifactType": m["artifactType"]});
    if m.get("annotations").is_some() {
        desc["annotations"] = m["annotations"].clone();
    }
    let list = idx["manifests"].as_array_mut().context("referrers index without manifests")?;
    list.retain(|x| x["digest"] != json!(d));
    list.push(desc);
    Ok(serde_json::to_vec(&idx)?)
}

/// The `.minisig` texts a referrers list carries for the release.
pub fn signatures(list: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(list) else { return vec![] };
    // A list copied by a tool that drops `artifactType` keeps the annotations; the texts are
    // checked against the config in any case.
    v["manifests"].as_array().into_iter().flatten().filter(|d| d["artifactType"] == MT_SIGNATURE_ARTIFACT || d.get("artifactType").is_none()).filter_map(|d| d["annotations"][ANN_MINISIG].as_str().map(str::to_string)).collect()
}

/// What a device reads out of a release manifest: the config bytes (checked against their
/// descriptor), the inline index and pack table, the boot files and the packs.
pub struct Parsed {
    pub config: Vec<u8>,
    pub caibx: Vec<u8>,
    pub table: Vec<u8>,
    pub files: Vec<File>,
    pub sealed: Vec<SealedImage>,
}

pub fn parse(bytes: &[u8]) -> anyhow::Result<Parsed> {
    let m: Value = serde_json::from_slice(bytes).context("release manifest")?;
    if m["artifactType"] != ARTIFACT_TYPE {
        bail!("not a slotforge release (artifactType {})", m["artifactType"]);
    }
    let data = |d: &Value, what: &str| -> anyhow::Result<Vec<u8>> {
        let b = base64::engine::general_purpose::STANDARD.decode(d["data"].as_str().with_context(|| format!("release manifest: {what} is not inline"))?).with_context(|| format!("release manifest: {what}"))?;
        let want = Digest::parse(d["digest"].as_str().unwrap_or("")).map_err(|e| anyhow::anyhow!("release manifest: {what}: {e}"))?;
        if Digest::of_bytes(&b) != want || d["size"].as_u64() != Some(b.len() as u64) {
            bail!("release manifest: the inline {what} is not the blob its descriptor names");
        }
        Ok(b)
    };
    if m["config"]["mediaType"] != MT_CONFIG {
        bail!("release manifest: config media type {}", m["config"]["mediaType"]);
    }
    let config = data(&m["config"], "config")?;
    let layers = m["layers"].as_array().context("release manifest without layers")?;
    let find = |mt: &str| layers.iter().find(|l| l["mediaType"] == mt).with_context(|| format!("release manifest has no {mt} layer"));
    let caibx = data(find(MT_CAIBX)?, "rootfs index")?;
    let sealed_part = |l: &Value| l["annotations"][crate::format::sealed::ANN_SEALED_FOR].is_string();
    let table = data(layers.iter().find(|l| !sealed_part(l) && crate::format::packs::is_table(l["mediaType"].as_str().unwrap_or(""))).context("release manifest has no pack table layer")?, "pack table")?;
    let blob = |l: &Value| -> anyhow::Result<Blob> {
        let digest = Digest::parse(l["digest"].as_str().unwrap_or("")).map_err(|e| anyhow::anyhow!("release manifest: {e}"))?;
        Ok(Blob { digest, size: l["size"].as_u64().unwrap_or(0) })
    };
    let mut files = Vec::new();
    let mut parts: std::collections::BTreeMap<String, std::collections::BTreeMap<String, &Value>> = Default::default();
    for l in layers.iter().filter(|l| sealed_part(l) || ![MT_CAIBX, MT_PACK_TABLE, MT_PACK_TABLE_V1, MT_PACK].contains(&l["mediaType"].as_str().unwrap_or(""))) {
        if let (Some(name), Some(part)) = (l["annotations"][crate::format::sealed::ANN_SEALED_FOR].as_str(), l["annotations"][ANN_PART].as_str()) {
            if parts.entry(name.into()).or_default().insert(part.into(), l).is_some() {
                bail!("release manifest: sealed image {name} has two {part} layers");
            }
            continue;
        }
        files.push(File { media_type: l["mediaType"].as_str().unwrap_or("").into(), blob: blob(l)?, title: l["annotations"][TITLE].as_str().unwrap_or("").into() });
    }
    let mut sealed = Vec::new();
    for (name, p) in parts {
        let get = |k: &str| p.get(k).copied().with_context(|| format!("release manifest: sealed image {name} has no {k} layer"));
        let mt = |l: &Value| l["mediaType"].as_str().unwrap_or("").to_string();
        sealed.push(SealedImage {
            manifest_media_type: mt(get("manifest")?),
            manifest: data(get("manifest")?, "image manifest")?,
            config_media_type: mt(get("config")?),
            config: data(get("config")?, "image config")?,
            artifact: data(get("artifact")?, "sealed artifact")?,
            caibx: data(get("caibx")?, "sealed index")?,
            blob: blob(get("sealed")?)?,
            table: p.get("packs").map(|l| data(l, "sealed image pack table")).transpose()?,
            name,
        });
    }
    Ok(Parsed { config, caibx, table, files, sealed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::packs::Pack;

    #[test]
    fn a_release_manifest_reads_back_and_lies_are_refused() {
        let table = PackTable { packs: vec![Pack { digest: Digest::of_bytes(b"p"), size: 1 }], chunks: vec![[0, 0, 1]] };
        let kernel = File { media_type: "application/vnd.slotforge.kernel".into(), blob: Blob { digest: Digest::of_bytes(b"k"), size: 1 }, title: "vmlinuz".into() };
        let si = SealedImage { name: "svc".into(), manifest_media_type: MT_OCI_MANIFEST.into(), manifest: b"{\"m\":1}".to_vec(), config_media_type: "application/vnd.oci.image.config.v1+json".into(), config: b"{}".to_vec(), artifact: b"{\"a\":1}".to_vec(), caibx: b"ix".to_vec(), blob: Blob { digest: Digest::of_bytes(b"sealed"), size: 6 }, table: Some(serde_json::to_vec(&PackTable { packs: vec![Pack { digest: Digest::of_bytes(b"q"), size: 1 }], chunks: vec![[0, 0, 1]] }).unwrap()) };
        let m = manifest(b"{\"c\":1}", b"caibx", &table, &[kernel], std::slice::from_ref(&si));
        let p = parse(&m).unwrap();
        assert_eq!(p.sealed, vec![si], "the sealed image reads back, and is not a boot file");
        assert_eq!((p.config.as_slice(), p.caibx.as_slice()), (&b"{\"c\":1}"[..], &b"caibx"[..]));
        assert_eq!(serde_json::from_slice::<PackTable>(&p.table).unwrap(), table);
        assert_eq!(p.files.len(), 1);
        let packs = serde_json::from_slice::<Value>(&m).unwrap()["layers"].as_array().unwrap().iter().filter(|l| l["mediaType"] == MT_PACK).count();
        assert_eq!(packs, 2, "the rootfs's pack and the sealed image's, each listed once");
        assert_eq!(p.files[0].title, "vmlinuz");
        // Inline bytes that are not their descriptor's blob.
        let mut v: Value = serde_json::from_slice(&m).unwrap();
        v["config"]["data"] = b64(b"{\"c\":2}").into();
        assert!(parse(&serde_json::to_vec(&v).unwrap()).is_err());
        // The referrers list: a signature added (twice: once), read back.
        let sig = signature_manifest((&Digest::of_bytes(&m), m.len() as u64), &Blob { digest: Digest::of_bytes(b"s"), size: 1 }, "untrusted comment: x\nRW..", "ABCD");
        let l = with_referrer(None, &sig).unwrap();
        let l = with_referrer(Some(&l), &sig).unwrap();
        assert_eq!(signatures(&l), vec!["untrusted comment: x\nRW..".to_string()]);
        assert_eq!(referrers_tag(&Digest::of_bytes(b"")), "sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
