//! Making the external-images partition at build time: the build's external images staged as
//! one OCI image layout in a directory, then `mke2fs -d` (no maintained Rust ext4 writer exists)
//! with its clock-derived inode times pinned by `debugfs`, so the partition is bit-reproducible.
//! The layout itself is `format::images`.

use crate::format::images::{build_index_json, stores_layers, top_index_json, BuildSet, IndexEntry, BLOCK, METADATA_FILE, Metadata, OCI_LAYOUT};
use crate::base::hash::Digest;
use crate::oci::{open_verified, ResolvedImage};
use crate::format::release::ExternalImage;
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A staging directory holding the OCI layout that becomes the partition's root.
pub struct Stage {
    dir: tempfile::TempDir,
    builds: BTreeMap<String, BuildSet>,
}

impl Stage {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("slotforge-images-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("blobs/sha256"))?;
        Ok(Self { dir, builds: BTreeMap::new() })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.path().join("blobs/sha256").join(d.hex())
    }

    /// Write `data` as a blob (exact bytes; its digest is what descriptors name).
    fn put_bytes(&self, data: &[u8]) -> anyhow::Result<(Digest, u64)> {
        let d = Digest::of_bytes(data);
        let p = self.blob_path(&d);
        if !p.exists() {
            std::fs::write(&p, data)?;
        }
        Ok((d, data.len() as u64))
    }

    /// Copy the blobs `e` needs (manifest, config, the layers unless sealed without
    /// `keep-layers`, the sealed artifact) in, verified. `sealed` is the sealed file and its
    /// artifact manifest. Returns bytes written.
    pub fn add_external(&self, e: &ExternalImage, img: &ResolvedImage, sealed: Option<&(PathBuf, Vec<u8>)>, on_bytes: &mut dyn FnMut(u64)) -> anyhow::Result<u64> {
        let mut written = self.add_image_blobs(img, stores_layers(e), on_bytes)?;
        if let (Some(s), Some((file, artifact))) = (&e.sealed, sealed) {
            let d = Digest::parse(&s.digest).map_err(|x| anyhow::anyhow!(x))?;
            let dest = self.blob_path(&d);
            if !dest.exists() {
                // Hard link when the work directory shares the file system, else copy.
                if std::fs::hard_link(file, &dest).is_err() {
                    std::fs::copy(file, &dest)?;
                }
                written += s.size;
                on_bytes(s.size);
            }
            written += self.put_bytes(artifact)?.1;
            self.put_bytes(crate::format::sealed::EMPTY_JSON)?;
        }
        Ok(written)
    }

    /// Copy every blob of `img` (manifest, config, layers) in, verified. Returns bytes written.
    pub fn add_image(&self, img: &ResolvedImage, on_bytes: &mut dyn FnMut(u64)) -> anyhow::Result<u64> {
        self.add_image_blobs(img, true, on_bytes)
    }

    fn add_image_blobs(&self, img: &ResolvedImage, layers: bool, on_bytes: &mut dyn FnMut(u64)) -> anyhow::Result<u64> {
        let mut written = 0;
        for (d, bytes) in [(&img.manifest_digest, &img.manifest_bytes), (&img.config_digest, &img.config_bytes)] {
            let p = self.blob_path(d);
            if !p.exists() {
                std::fs::write(&p, bytes)?;
                written += bytes.len() as u64;
            }
        }
        for l in img.layers.iter().filter(|_| layers) {
            let dest = self.blob_path(&l.digest);
            if dest.exists() {
                continue; // shared with another image or build: stored once
            }
            let tmp = dest.with_extension("partial");
            let mut r = open_verified(&*img.source, &l.digest, l.size, &format!("layer {}", l.digest))?;
            let mut f = std::fs::File::create(&tmp)?;
            let n = std::io::copy(&mut r, &mut f).map_err(|e| anyhow::anyhow!("{e}"));
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            std::fs::rename(&tmp, &dest)?;
            written += n;
            on_bytes(n);
        }
        Ok(written)
    }

    /// Record one build: a nested index of its images (sorted by name), tagged with the build id.
    pub fn add_build(&mut self, build_id: &str, version: &str, images: &[(ExternalImage, &ResolvedImage)]) -> anyhow::Result<&BuildSet> {
        let entries: Vec<IndexEntry> = images.iter().map(|(e, img)| IndexEntry::of(e, img)).collect();
        let bytes = build_index_json(build_id, version, entries);
        let (index_digest, index_size) = self.put_bytes(&bytes)?;
        let set = BuildSet { build_id: build_id.into(), version: version.into(), index_digest, index_size };
        self.builds.insert(build_id.to_string(), set);
        Ok(&self.builds[build_id])
    }

    /// Write `oci-layout`, `index.json` (one entry per build, sorted) and the metadata file.
    pub fn finish(&self, epoch: u64) -> anyhow::Result<()> {
        let root = self.dir.path();
        std::fs::write(root.join("oci-layout"), OCI_LAYOUT)?;
        std::fs::write(root.join("index.json"), top_index_json(self.builds.values().cloned().collect()))?;
        std::fs::write(root.join(METADATA_FILE), crate::base::text::to_json(&Metadata::default()))?;
        set_times(root, epoch)?;
        Ok(())
    }

    /// Bytes the staged content needs, rounded to blocks, plus ext4 overhead.
    pub fn estimated_size(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for e in walk(self.dir.path())? {
            total += std::fs::metadata(&e)?.len().div_ceil(BLOCK) * BLOCK + BLOCK;
        }
        Ok(total)
    }
}

fn walk(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if p.is_dir() {
            let mut kids: Vec<PathBuf> = std::fs::read_dir(&p)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
            kids.sort();
            out.extend(kids);
        }
        i += 1;
    }
    Ok(out)
}

fn set_times(root: &Path, epoch: u64) -> anyhow::Result<()> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    for p in walk(root)? {
        std::fs::File::open(&p)?.set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))?;
    }
    Ok(())
}

/// The mke2fs.conf used for every build, so the host's /etc/mke2fs.conf cannot change the
/// features (and bytes) of the partition. Features all supported by Linux ≥ 4.x.
const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 65536
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

/// Make an ext4 image of `size` bytes at `out` holding `stage`, reproducibly.
pub fn make_ext4(stage: &Stage, out: &Path, size: u64, uuid: &uuid::Uuid, label: &str, epoch: u64) -> anyhow::Result<()> {
    let need = stage.estimated_size()?;
    // Journal (up to 64 MiB for large partitions), inode tables and group descriptors.
    let overhead = (size / 50).max(8 << 20);
    if need + overhead > size {
        bail!(
            "the external images need about {} but the external-images partition holds {}; enlarge it in the layout or move images back on disk",
            crate::base::text::mib(need + overhead),
            crate::base::text::mib(size)
        );
    }
    let conf = tempfile::NamedTempFile::new()?;
    std::fs::write(conf.path(), MKE2FS_CONF)?;
    let f = std::fs::File::create(out)?;
    f.set_len(size)?;
    drop(f);
    let fake_time = epoch.to_string();
    let u = uuid.to_string();
    let status = Command::new("mke2fs")
        .env("MKE2FS_CONFIG", conf.path())
        .env("E2FSPROGS_FAKE_TIME", &fake_time)
        .args(["-t", "ext4", "-F", "-q", "-m", "0", "-L", label, "-U", &u])
        .arg("-E")
        .arg(format!("hash_seed={u},root_owner=0:0,lazy_itable_init=1,nodiscard"))
        .arg("-d")
        .arg(stage.path())
        .arg(out)
        .output()
        .context("running mke2fs (install e2fsprogs)")?;
    if !status.status.success() {
        bail!("mke2fs failed: {}", String::from_utf8_lossy(&status.stderr).trim());
    }
    // mke2fs -d stamps each copied inode's ctime/atime (and crtime) with the clock; pin them.
    let mut script = String::new();
    for p in walk(stage.path())? {
        let rel = p.strip_prefix(stage.path()).unwrap();
        let spec = format!("/{}", rel.display());
        for field in ["atime", "ctime", "mtime", "crtime"] {
            script += &format!("sif \"{spec}\" {field} @{epoch}\nsif \"{spec}\" {field}_extra 0\n");
        }
    }
    for field in ["atime", "ctime", "mtime", "crtime"] {
        script += &format!("sif /lost+found {field} @{epoch}\nsif /lost+found {field}_extra 0\n");
    }
    let sf = tempfile::NamedTempFile::new()?;
    std::fs::write(sf.path(), script)?;
    let o = Command::new("debugfs")
        .env("E2FSPROGS_FAKE_TIME", &fake_time)
        .arg("-w")
        .arg("-f")
        .arg(sf.path())
        .arg(out)
        .output()
        .context("running debugfs (install e2fsprogs)")?;
    let err = String::from_utf8_lossy(&o.stderr);
    let bad: Vec<&str> = err.lines().filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty()).collect();
    if !o.status.success() || !bad.is_empty() {
        bail!("debugfs could not pin inode times: {}", bad.join("; "));
    }
    Ok(())
}
