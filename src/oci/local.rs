//! Local image sources: an OCI image layout directory (`oci:`) and a tar of one (`oci-archive:`).
//! An archive is unpacked into a private temporary directory first; only `oci-layout`,
//! `index.json` and `blobs/<alg>/<hex>` members are taken, so a crafted archive cannot write
//! anywhere else.

use super::BlobSource;
use crate::base::hash::Digest;
use anyhow::{bail, Context};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

pub struct OciDir {
    dir: PathBuf,
    name: String,
    _tmp: Option<tempfile::TempDir>,
}

impl OciDir {
    pub fn open(dir: &Path, name: String) -> anyhow::Result<Self> {
        let layout = dir.join("oci-layout");
        let text = std::fs::read_to_string(&layout)
            .with_context(|| format!("{name}: {} is not an OCI image layout (no readable oci-layout file)", dir.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{name}: {} is not JSON", layout.display()))?;
        if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            bail!("{name}: {} has imageLayoutVersion {:?}; only 1.0.0 is understood", layout.display(), v.get("imageLayoutVersion"));
        }
        Ok(Self { dir: dir.to_path_buf(), name, _tmp: None })
    }

    /// Unpack an `oci-archive:` tar to a temporary directory and open it.
    pub fn open_archive(tar_path: &Path, name: String) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("slotforge-archive-").tempdir()?;
        let f = File::open(tar_path).with_context(|| format!("{name}: opening {}", tar_path.display()))?;
        let mut ar = tar::Archive::new(f);
        for entry in ar.entries().with_context(|| format!("{name}: reading {}", tar_path.display()))? {
            let mut entry = entry.with_context(|| format!("{name}: reading {}", tar_path.display()))?;
            let path = entry.path()?.into_owned();
            let norm: Vec<_> = path.components().filter(|c| !matches!(c, Component::CurDir)).collect();
            let ok = norm.iter().all(|c| matches!(c, Component::Normal(_)));
            let names: Vec<String> = norm.iter().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            let wanted = matches!(names.as_slice(), [n] if n == "oci-layout" || n == "index.json")
                || matches!(names.as_slice(), [b, alg, hex] if b == "blobs" && !alg.is_empty() && !hex.is_empty() && !hex.contains('.'));
            if !ok {
                bail!("{name}: archive member {} escapes the layout; refusing the archive", path.display());
            }
            if !wanted || !entry.header().entry_type().is_file() {
                continue;
            }
            let dest = tmp.path().join(names.join("/"));
            std::fs::create_dir_all(dest.parent().unwrap())?;
            let mut out = File::create(&dest)?;
            std::io::copy(&mut entry, &mut out).with_context(|| format!("{name}: unpacking {}", path.display()))?;
        }
        let mut s = Self::open(tmp.path(), name)?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    pub fn index_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let p = self.dir.join("index.json");
        super::read_json_file(&p).with_context(|| format!("{}: its index.json", self.name))
    }
}

impl BlobSource for OciDir {
    fn open_blob(&self, digest: &Digest, _size: u64) -> std::io::Result<Box<dyn Read + Send>> {
        let p = self.dir.join("blobs").join("sha256").join(digest.hex());
        Ok(Box::new(File::open(&p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?))
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}
