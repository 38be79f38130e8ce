//! squashfs: writing a [`Tree`] ([`writer`], ours, so a rebuild can reuse compressed blocks and
//! the bytes are placed as we choose), reading a superblock back, and reading files out of an
//! image (squashfs-ng, libsquashfs). Reproducibility: children are written sorted, times come
//! from the tree, the superblock's `mkfs_time` is the build's epoch.

use crate::format::tree::Tree;
use anyhow::{bail, Context};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// `hsqs`, little-endian.
pub const MAGIC: u32 = 0x7371_7368;
pub const SUPERBLOCK_LEN: usize = 96;

pub mod writer;

/// Write `tree` to `out` (squashfs, zstd, 128 KiB blocks; [`writer`]); `mkfs_time` is stamped
/// into the superblock. Returns the file size.
pub fn write(tree: &Tree, out: &Path, mkfs_time: u32, on_node: &mut dyn FnMut()) -> anyhow::Result<u64> {
    Ok(writer::write(tree, out, mkfs_time, None, on_node)?.bytes)
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
