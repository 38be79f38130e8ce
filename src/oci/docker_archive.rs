//! `docker-archive:PATH[:NAME:TAG]`, the tar `docker save` writes: `manifest.json` naming a
//! config and layer tars. It is unpacked to a private temporary directory (members with `..` or
//! absolute names refuse the archive) and presented as a Docker schema-2 image whose manifest
//! slotforge writes itself — as skopeo does when it reads such an archive.

use super::image::{LayerCompression, ResolvedImage, Layer};
use super::{BlobSource, Platform};
use crate::base::hash::{digest_reader, Digest};
use anyhow::{bail, Context};
use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

struct ArchiveSource {
    name: String,
    files: HashMap<Digest, PathBuf>,
    _tmp: tempfile::TempDir,
}

impl BlobSource for ArchiveSource {
    fn open_blob(&self, d: &Digest, _size: u64) -> std::io::Result<Box<dyn Read + Send>> {
        let p = self.files.get(d).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{d} is not in the archive")))?;
        Ok(Box::new(std::fs::File::open(p)?))
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

fn safe_member(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

pub fn resolve(reference: &str, tar_path: &Path, tag: Option<&str>, platform: &Platform) -> anyhow::Result<ResolvedImage> {
    let tmp = tempfile::Builder::new().prefix("slotforge-docker-archive-").tempdir()?;
    let f = std::fs::File::open(tar_path).with_context(|| format!("{reference}: opening {}", tar_path.display()))?;
    let mut ar = tar::Archive::new(f);
    for e in ar.entries().with_context(|| format!("{reference}: not a tar"))? {
        let mut e = e.with_context(|| format!("{reference}: reading the archive"))?;
        let path = e.path()?.into_owned();
        let Some(rel) = safe_member(&path) else {
            bail!("{reference}: archive member {} escapes the archive; refusing it", path.display());
        };
        if !e.header().entry_type().is_file() {
            continue;
        }
        let dest = tmp.path().join(&rel);
        std::fs::create_dir_all(dest.parent().unwrap())?;
        std::io::copy(&mut e, &mut std::fs::File::create(&dest)?)?;
    }
    let entries: Vec<Entry> = serde_json::from_slice(&std::fs::read(tmp.path().join("manifest.json")).with_context(|| format!("{reference}: no manifest.json: not a docker-archive"))?)
        .with_context(|| format!("{reference}: manifest.json"))?;
    let entry = match tag {
        Some(t) => entries
            .iter()
            .find(|e| e.repo_tags.iter().flatten().any(|rt| rt == t || rt.ends_with(&format!("/{t}"))))
            .ok_or_else(|| anyhow::anyhow!("{reference}: no image tagged {t} in the archive"))?,
        None => match entries.as_slice() {
            [one] => one,
            _ => bail!("{reference}: the archive holds {} images; name one with :NAME:TAG", entries.len()),
        },
    };
    let member = |p: &str| -> anyhow::Result<PathBuf> {
        let rel = safe_member(Path::new(p)).ok_or_else(|| anyhow::anyhow!("{reference}: manifest.json names {p:?} outside the archive"))?;
        Ok(tmp.path().join(rel))
    };
    let config_path = member(&entry.config)?;
    let config_bytes = std::fs::read(&config_path).with_context(|| format!("{reference}: config {}", entry.config))?;
    let config_digest = Digest::of_bytes(&config_bytes);
    let config = ImageConfiguration::from_reader(&config_bytes[..]).with_context(|| format!("{reference}: {} is not an image configuration", entry.config))?;
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    if os != platform.os || arch != platform.architecture {
        bail!("{reference}: the archive's image is {os}/{arch}, not {platform}");
    }
    let mut files = HashMap::new();
    files.insert(config_digest.clone(), config_path);
    let mut layers = Vec::new();
    let mut descs = Vec::new();
    for l in &entry.layers {
        let p = member(l)?;
        let mut magic = [0u8; 4];
        let n = std::fs::File::open(&p).with_context(|| format!("{reference}: layer {l}"))?.read(&mut magic)?;
        let (compression, mt) = match &magic[..n.min(4)] {
            [0x1f, 0x8b, ..] => (LayerCompression::Gzip, "application/vnd.docker.image.rootfs.diff.tar.gzip"),
            [0x28, 0xb5, 0x2f, 0xfd] => (LayerCompression::Zstd, "application/vnd.oci.image.layer.v1.tar+zstd"),
            _ => (LayerCompression::None, "application/vnd.docker.image.rootfs.diff.tar"),
        };
        let (digest, size) = digest_reader(std::fs::File::open(&p)?)?;
        descs.push(json!({"mediaType": mt, "size": size, "digest": digest.to_string()}));
        layers.push(Layer { digest: digest.clone(), size, media_type: mt.to_string(), compression });
        files.insert(digest, p);
    }
    let manifest_bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config_bytes.len(), "digest": config_digest.to_string()},
        "layers": descs,
    }))?;
    let manifest_digest = Digest::of_bytes(&manifest_bytes);
    let manifest = ImageManifest::from_reader(&manifest_bytes[..])?;
    // The synthesized manifest is a blob of this source too (the images partition copies it).
    let mpath = tmp.path().join("slotforge-manifest.json");
    std::fs::write(&mpath, &manifest_bytes)?;
    files.insert(manifest_digest.clone(), mpath);
    let source = Arc::new(ArchiveSource { name: reference.to_string(), files, _tmp: tmp });
    Ok(ResolvedImage {
        reference: reference.to_string(),
        source,
        platform: platform.clone(),
        top_digest: manifest_digest.clone(),
        manifest_digest,
        manifest_bytes,
        manifest_media_type: MT_DOCKER_MANIFEST.to_string(),
        manifest,
        config_digest,
        config_bytes,
        config,
        layers,
    })
}
