//! Writing a [`Tree`] as a squashfs image with squashfs-ng (libsquashfs, zstd, multi-threaded),
//! and reading a squashfs superblock back. Reproducibility: children are added sorted, times come
//! from the tree, and the superblock's `mkfs_time` (which the library sets to "now") is
//! overwritten with the build's epoch.

use crate::format::tree::{Kind, Node, Tree};
use anyhow::{bail, Context};
use squashfs_ng::write::{Source, SourceData, Writer};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

/// `hsqs`, little-endian.
pub const MAGIC: u32 = 0x7371_7368;
/// Superblock field offsets (squashfs 4.0).
const OFF_MKFS_TIME: u64 = 8;
pub const SUPERBLOCK_LEN: usize = 96;

/// Write `tree` to `out`; `mkfs_time` is stamped into the superblock. Returns the file size.
pub fn write(tree: &Tree, out: &Path, mkfs_time: u32, on_node: &mut dyn FnMut()) -> anyhow::Result<u64> {
    let mut w = Writer::open(out).with_context(|| format!("creating squashfs {}", out.display()))?;
    let mut links: HashMap<u64, u32> = HashMap::new();
    add(&mut w, &tree.root, &mut links, on_node, &mut Vec::new())?;
    w.finish().context("finishing squashfs")?;
    drop(w);
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(out)?;
    f.seek(SeekFrom::Start(OFF_MKFS_TIME))?;
    f.write_all(&mkfs_time.to_le_bytes())?;
    f.sync_all()?;
    Ok(f.metadata()?.len())
}

fn add(w: &mut Writer, n: &Node, links: &mut HashMap<u64, u32>, on_node: &mut dyn FnMut(), path: &mut Vec<u8>) -> anyhow::Result<u32> {
    if let Kind::File { link: Some(l), .. } = &n.kind {
        if let Some(ino) = links.get(l) {
            return Ok(*ino);
        }
    }
    let data = match &n.kind {
        Kind::Dir(children) => {
            let mut ids = Vec::with_capacity(children.len());
            for (name, child) in children {
                let len = path.len();
                path.push(b'/');
                path.extend_from_slice(name);
                let id = add(w, child, links, on_node, path)?;
                path.truncate(len);
                ids.push((OsString::from_vec(name.clone()), id));
            }
            // BTreeMap order is bytewise, which is the order squashfs directories need.
            SourceData::Dir(Box::new(ids.into_iter()))
        }
        Kind::File { content, .. } => SourceData::File(content.open()?),
        Kind::Symlink(t) => SourceData::Symlink(std::path::PathBuf::from(OsString::from_vec(t.clone()))),
        Kind::CharDev(ma, mi) => SourceData::CharDev(*ma, *mi),
        Kind::BlockDev(ma, mi) => SourceData::BlockDev(*ma, *mi),
        Kind::Fifo => SourceData::Fifo,
    };
    let mtime = u32::try_from(n.meta.mtime).unwrap_or(u32::MAX);
    let src = Source {
        data,
        uid: n.meta.uid,
        gid: n.meta.gid,
        mode: n.meta.mode,
        modified: mtime,
        xattrs: n.meta.xattrs.iter().map(|(k, v)| (OsString::from(k), v.clone())).collect(),
        flags: 0,
    };
    let id = w.add(src).with_context(|| format!("adding {} to the squashfs", String::from_utf8_lossy(if path.is_empty() { b"/" } else { path })))?;
    if let Kind::File { link: Some(l), .. } = &n.kind {
        links.insert(*l, id);
    }
    on_node();
    Ok(id)
}

/// The fields of a squashfs superblock that inspect and verify report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Superblock {
    pub inodes: u32,
    pub mkfs_time: u32,
    pub block_size: u32,
    pub compression: &'static str,
    pub bytes_used: u64,
    pub version: String,
}

/// Parse a superblock; `None` when the magic is absent (an empty slot).
pub fn parse_superblock(b: &[u8; SUPERBLOCK_LEN]) -> anyhow::Result<Option<Superblock>> {
    let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u16at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    if u32at(0) != MAGIC {
        return Ok(None);
    }
    let (major, minor) = (u16at(28), u16at(30));
    if major != 4 {
        bail!("squashfs version {major}.{minor} is not 4.0");
    }
    let block_size = u32at(12);
    if !block_size.is_power_of_two() || block_size.trailing_zeros() != u16at(22) as u32 {
        bail!("squashfs superblock is inconsistent (block size {block_size}, log {})", u16at(22));
    }
    let compression = match u16at(20) {
        1 => "gzip",
        2 => "lzma",
        3 => "lzo",
        4 => "xz",
        5 => "lz4",
        6 => "zstd",
        other => bail!("squashfs compressor id {other} is unknown"),
    };
    Ok(Some(Superblock {
        inodes: u32at(4),
        mkfs_time: u32at(8),
        block_size,
        compression,
        bytes_used: u64::from_le_bytes(b[40..48].try_into().unwrap()),
        version: format!("{major}.{minor}"),
    }))
}

pub fn read_superblock(r: &mut impl Read) -> anyhow::Result<Option<Superblock>> {
    let mut b = [0u8; SUPERBLOCK_LEN];
    r.read_exact(&mut b)?;
    parse_superblock(&b)
}

/// Read one file out of a squashfs image file (the metadata files inspect reports).
pub fn read_file(image: &Path, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let ar = squashfs_ng::read::Archive::open(image).with_context(|| format!("opening squashfs {}", image.display()))?;
    let Some(node) = ar.get(path).with_context(|| format!("looking up {path}"))? else {
        return Ok(None);
    };
    let mut f = node.as_file().with_context(|| format!("{path} is not a file"))?;
    Ok(Some(f.to_bytes().with_context(|| format!("reading {path}"))?))
}

/// The regular files directly in directory `dir` of a squashfs image file: (name, contents).
/// An absent directory gives an empty list.
pub fn read_dir_files(image: &Path, dir: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let ar = squashfs_ng::read::Archive::open(image).with_context(|| format!("opening squashfs {}", image.display()))?;
    let Some(node) = ar.get(dir).with_context(|| format!("looking up {dir}"))? else {
        return Ok(vec![]);
    };
    let mut out = Vec::new();
    for child in node.as_dir().with_context(|| format!("{dir} is not a directory"))? {
        let child = child.with_context(|| format!("reading {dir}"))?;
        let name = child.name().unwrap_or_default();
        if child.is_file().unwrap_or(false) {
            let bytes = child.as_file().with_context(|| format!("{dir}/{name}"))?.to_bytes().with_context(|| format!("reading {dir}/{name}"))?;
            out.push((name, bytes));
        }
    }
    out.sort();
    Ok(out)
}

/// Copy the squashfs at `start` of `dev` (a disk image) into a temporary file, for the readers
/// that want a path; `None` when there is no squashfs there.
pub fn extract(dev: &mut (impl Read + Seek), start: u64, limit: u64) -> anyhow::Result<Option<(Superblock, tempfile::NamedTempFile)>> {
    dev.seek(SeekFrom::Start(start))?;
    let Some(sb) = read_superblock(dev)? else { return Ok(None) };
    if sb.bytes_used > limit {
        bail!("squashfs claims {} bytes but the partition has {limit}", sb.bytes_used);
    }
    let mut tmp = tempfile::NamedTempFile::new()?;
    dev.seek(SeekFrom::Start(start))?;
    std::io::copy(&mut Read::by_ref(dev).take(sb.bytes_used), tmp.as_file_mut())?;
    Ok(Some((sb, tmp)))
}
