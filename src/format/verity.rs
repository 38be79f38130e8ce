//! dm-verity hash trees, in the on-disk format `veritysetup format` writes (cryptsetup's
//! "verity" superblock, version 1, hash type 1: every hash is SHA-256 over salt ‖ block), so
//! the kernel's dm-verity target, `veritysetup verify` and systemd-veritysetup read what we
//! write. One writer serves every user (the rootfs slots today, sealed images later): it takes a
//! reader of the data and returns the superblock + tree bytes and the root hash; where they are
//! stored is the caller's business. Format: docs/formats.md#dm-verity.

use crate::base::hash::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Data and hash block size. 4 KiB is veritysetup's default and the page size dm-verity wants.
pub const BLOCK: u64 = 4096;
/// SHA-256.
pub const DIGEST_LEN: usize = 32;
/// Hashes per hash block: 4096 / 32 = 128 = 2^7.
const PER_BLOCK_BITS: u32 = 7;
/// The verity superblock occupies the first 512 bytes of the hash area; the tree starts at the
/// next hash block (cryptsetup: `hash_offset + round_up(sizeof(verity_sb), hash_block_size)`).
pub const SUPERBLOCK_LEN: usize = 512;
/// `verity\0\0`.
pub const SIGNATURE: &[u8; 8] = b"verity\0\0";
/// Hash type 1: the salt is prepended to each block (type 0 is Chrome OS's, salt appended).
const HASH_TYPE_NORMAL: u32 = 1;
const ALGORITHM: &str = "sha256";

/// What a verity device needs besides the data: recorded in boot entries, bundles and inspect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerityInfo {
    /// Hex SHA-256 root hash (what `roothash=` carries).
    pub root_hash: String,
    /// Hex salt.
    pub salt: String,
    /// Byte offset of the verity superblock from the start of the device (= the data size,
    /// rounded up to [`BLOCK`]).
    pub hash_offset: u64,
    pub data_blocks: u64,
    pub data_block_size: u64,
    pub hash_block_size: u64,
    /// Superblock block + tree, in bytes.
    pub tree_bytes: u64,
    pub uuid: String,
    pub algorithm: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("dm-verity needs at least 2 data blocks of {BLOCK} bytes, got {0}")]
    TooSmall(u64),
    #[error("reading the data: {0}")]
    Io(#[from] std::io::Error),
    #[error("no verity superblock at byte {0}")]
    NoSuperblock(u64),
    #[error("verity superblock at byte {offset}: {what}")]
    BadSuperblock { offset: u64, what: String },
}

/// The parameters a tree is made with.
#[derive(Debug, Clone)]
pub struct Params {
    pub data_blocks: u64,
    pub salt: [u8; 32],
    pub uuid: [u8; 16],
}

impl Params {
    /// Parameters for `data_bytes` of data, with a salt and UUID derived from `seed` (a build
    /// id): the same build gives the same tree, bit for bit.
    pub fn derived(data_bytes: u64, seed: &str) -> Self {
        let salt: [u8; 32] = Sha256::digest(format!("slotforge dm-verity salt\0{seed}").as_bytes()).into();
        let u = Sha256::digest(format!("slotforge dm-verity uuid\0{seed}").as_bytes());
        let uuid = *uuid::Builder::from_custom_bytes(u[..16].try_into().unwrap()).as_uuid().as_bytes();
        Self { data_blocks: data_bytes.div_ceil(BLOCK), salt, uuid }
    }
    /// The same parameters with the salt derived from `seed` instead: a salt that stays the same
    /// from build to build (the rootfs: per layout name) keeps the hashes of unchanged blocks the
    /// same, so a delta carries only the tree blocks over changed data.
    pub fn salted(mut self, seed: &str) -> Self {
        self.salt = Sha256::digest(format!("slotforge dm-verity salt\0{seed}").as_bytes()).into();
        self
    }
    /// The same parameters with this salt (a sealed image's, as its rootfs pins it).
    pub fn with_salt(mut self, salt: [u8; 32]) -> Self {
        self.salt = salt;
        self
    }
    pub fn hash_offset(&self) -> u64 {
        self.data_blocks * BLOCK
    }
    /// The parameters a tree was made with, as a config records them (to make the same tree
    /// again: a device that assembled the data from chunks writes the hash area itself).
    pub fn of_info(v: &VerityInfo) -> anyhow::Result<Self> {
        let uuid = uuid::Uuid::parse_str(&v.uuid).map_err(|e| anyhow::anyhow!("verity uuid {:?}: {e}", v.uuid))?;
        Self::of_pin(v.data_blocks, &v.salt, *uuid.as_bytes(), (v.data_block_size, v.hash_block_size), v.hash_offset, &v.algorithm)
    }
    /// The parameters from their parts, checked to be what [`build`] makes (4 KiB blocks,
    /// SHA-256, a 32-byte salt, the hash area right after the data).
    pub fn of_pin(data_blocks: u64, salt_hex: &str, uuid: [u8; 16], blocks: (u64, u64), hash_offset: u64, algorithm: &str) -> anyhow::Result<Self> {
        let salt = crate::base::hash::unhex(salt_hex).filter(|s| s.len() == 32).ok_or_else(|| anyhow::anyhow!("verity salt {salt_hex:?} is not 32 bytes of hex"))?;
        anyhow::ensure!(blocks == (BLOCK, BLOCK) && algorithm == ALGORITHM, "verity with {}/{}-byte blocks and {algorithm} (only {BLOCK} and {ALGORITHM} are made)", blocks.0, blocks.1);
        let p = Self { data_blocks, salt: salt.try_into().unwrap(), uuid };
        anyhow::ensure!(p.hash_offset() == hash_offset && data_blocks >= 2, "verity hash offset {hash_offset} does not follow {data_blocks} data blocks");
        Ok(p)
    }
}

/// Number of tree levels above the data (cryptsetup's rule: until one block holds them all).
fn levels(data_blocks: u64) -> u32 {
    let mut l = 0;
    while PER_BLOCK_BITS * l < 64 && (data_blocks - 1) >> (PER_BLOCK_BITS * l) != 0 {
        l += 1;
    }
    l
}

/// Blocks at level `i` (0 = hashes of the data blocks).
fn level_blocks(data_blocks: u64, i: u32) -> u64 {
    let shift = PER_BLOCK_BITS * (i + 1);
    if shift >= 64 {
        1
    } else {
        data_blocks.div_ceil(1 << shift)
    }
}

fn salted(salt: &[u8], block: &[u8]) -> [u8; DIGEST_LEN] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The 512-byte verity superblock.
pub fn superblock(p: &Params) -> [u8; SUPERBLOCK_LEN] {
    let mut b = [0u8; SUPERBLOCK_LEN];
    b[0..8].copy_from_slice(SIGNATURE);
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..16].copy_from_slice(&HASH_TYPE_NORMAL.to_le_bytes());
    b[16..32].copy_from_slice(&p.uuid);
    b[32..32 + ALGORITHM.len()].copy_from_slice(ALGORITHM.as_bytes());
    b[64..68].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    b[68..72].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    b[72..80].copy_from_slice(&p.data_blocks.to_le_bytes());
    b[80..82].copy_from_slice(&(p.salt.len() as u16).to_le_bytes());
    b[88..88 + p.salt.len()].copy_from_slice(&p.salt);
    b
}

/// Parse a superblock: (data blocks, salt, uuid). Only what we write is accepted (SHA-256,
/// 4 KiB blocks, hash type 1).
pub fn parse_superblock(b: &[u8; SUPERBLOCK_LEN], offset: u64) -> Result<Params, VerityError> {
    if &b[0..8] != SIGNATURE {
        return Err(VerityError::NoSuperblock(offset));
    }
    let bad = |what: String| VerityError::BadSuperblock { offset, what };
    let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    if u32at(8) != 1 || u32at(12) != HASH_TYPE_NORMAL {
        return Err(bad(format!("version {} hash type {} (expected 1, 1)", u32at(8), u32at(12))));
    }
    let alg = String::from_utf8_lossy(&b[32..64]).trim_end_matches('\0').to_string();
    if alg != ALGORITHM || u32at(64) as u64 != BLOCK || u32at(68) as u64 != BLOCK {
        return Err(bad(format!("{alg} with {}/{}-byte blocks (expected sha256, {BLOCK})", u32at(64), u32at(68))));
    }
    let salt_len = u16::from_le_bytes([b[80], b[81]]) as usize;
    if salt_len != 32 {
        return Err(bad(format!("salt of {salt_len} bytes (expected 32)")));
    }
    Ok(Params {
        data_blocks: u64::from_le_bytes(b[72..80].try_into().unwrap()),
        salt: b[88..120].try_into().unwrap(),
        uuid: b[16..32].try_into().unwrap(),
    })
}

/// A computed hash area: the superblock block followed by the levels, top level first.
pub struct HashTree {
    pub root: [u8; DIGEST_LEN],
    pub bytes: Vec<u8>,
}

impl HashTree {
    pub fn info(&self, p: &Params) -> VerityInfo {
        VerityInfo {
            root_hash: hex(&self.root),
            salt: hex(&p.salt),
            hash_offset: p.hash_offset(),
            data_blocks: p.data_blocks,
            data_block_size: BLOCK,
            hash_block_size: BLOCK,
            tree_bytes: self.bytes.len() as u64,
            uuid: uuid::Uuid::from_bytes(p.uuid).to_string(),
            algorithm: ALGORITHM.into(),
        }
    }
}

/// Bytes of the hash area (superblock block + tree) for `data_blocks` blocks of data.
pub fn hash_area_bytes(data_blocks: u64) -> u64 {
    BLOCK + (0..levels(data_blocks)).map(|i| level_blocks(data_blocks, i)).sum::<u64>() * BLOCK
}

/// Compute the hash area of `p.data_blocks` blocks read from `data` (the last one zero-padded).
/// Memory: the tree only (1/128 of the data), never the data.
pub fn build(mut data: impl Read, p: &Params) -> Result<HashTree, VerityError> {
    if p.data_blocks < 2 {
        return Err(VerityError::TooSmall(p.data_blocks));
    }
    let n = levels(p.data_blocks);
    // Level 0: one digest per data block, packed 128 to a zero-padded hash block.
    let mut level: Vec<u8> = Vec::with_capacity((level_blocks(p.data_blocks, 0) * BLOCK) as usize);
    let mut buf = vec![0u8; BLOCK as usize];
    for _ in 0..p.data_blocks {
        let mut got = 0;
        while got < buf.len() {
            let k = data.read(&mut buf[got..])?;
            if k == 0 {
                break;
            }
            got += k;
        }
        buf[got..].fill(0);
        level.extend_from_slice(&salted(&p.salt, &buf));
    }
    let pad = |v: &mut Vec<u8>| v.resize(v.len().div_ceil(BLOCK as usize) * BLOCK as usize, 0);
    pad(&mut level);
    let mut levels_bytes = vec![level];
    for _ in 1..n {
        let below = levels_bytes.last().unwrap();
        let mut next = Vec::with_capacity(below.len() / 128 + BLOCK as usize);
        for blk in below.chunks(BLOCK as usize) {
            next.extend_from_slice(&salted(&p.salt, blk));
        }
        pad(&mut next);
        levels_bytes.push(next);
    }
    let top = levels_bytes.last().unwrap();
    debug_assert_eq!(top.len() as u64, BLOCK);
    let root = salted(&p.salt, top);
    let mut bytes = Vec::with_capacity(hash_area_bytes(p.data_blocks) as usize);
    bytes.extend_from_slice(&superblock(p));
    bytes.resize(BLOCK as usize, 0);
    for l in levels_bytes.iter().rev() {
        bytes.extend_from_slice(l);
    }
    Ok(HashTree { root, bytes })
}

/// Append a hash area to the data file `path` (padded to a whole block first) and return its
/// parameters. The file then holds exactly what goes into the partition.
pub fn append(path: &Path, seed: &str) -> anyhow::Result<VerityInfo> {
    append_with(path, |len| Params::derived(len, seed))
}

/// [`append`] with the parameters `params` gives for the data's length.
pub fn append_with(path: &Path, params: impl FnOnce(u64) -> Params) -> anyhow::Result<VerityInfo> {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let len = f.metadata()?.len();
    let p = params(len);
    let tree = build(std::io::BufReader::new((&mut f).take(len)), &p)?;
    f.set_len(p.hash_offset())?;
    f.seek(SeekFrom::Start(p.hash_offset()))?;
    f.write_all(&tree.bytes)?;
    f.sync_all()?;
    Ok(tree.info(&p))
}

/// Make the hash area of the data before `p.hash_offset()` in `dev` and write it there — once
/// its root is `expected_root` (else nothing is written): a device that assembled an image's
/// data from chunks completes it, and the read this takes is its read-back check. The tree's
/// bytes are the build's (same parameters, same data); they are returned (a caller hashing the
/// whole blob adds them).
pub fn write_tree<F: Read + Write + Seek>(dev: &mut F, p: &Params, expected_root: &str) -> anyhow::Result<HashTree> {
    dev.seek(SeekFrom::Start(0))?;
    let tree = build(std::io::BufReader::with_capacity(1 << 20, &mut *dev).take(p.hash_offset()), p)?;
    let info = tree.info(p);
    if info.root_hash != expected_root {
        anyhow::bail!("the data's root hash is {}, not the expected {expected_root}", info.root_hash);
    }
    dev.seek(SeekFrom::Start(p.hash_offset()))?;
    dev.write_all(&tree.bytes)?;
    dev.flush()?;
    Ok(tree)
}

/// The parameters of the superblock at `hash_offset`, which must cover the data before it.
fn read_superblock<R: Read + Seek>(dev: &mut R, hash_offset: u64) -> anyhow::Result<Params> {
    dev.seek(SeekFrom::Start(hash_offset))?;
    let mut sb = [0u8; SUPERBLOCK_LEN];
    dev.read_exact(&mut sb)?;
    let p = parse_superblock(&sb, hash_offset)?;
    if p.hash_offset() != hash_offset {
        anyhow::bail!("verity superblock at byte {hash_offset} covers {} data blocks, which end at byte {}", p.data_blocks, p.hash_offset());
    }
    Ok(p)
}

/// The root hash the tree stored at `hash_offset` claims — SHA-256(salt ‖ its top block) —
/// read without the data (two blocks). It names the data only where the data is known to match
/// the tree (a slot dm-verity runs from); used to recognise a build, never to trust bytes.
pub fn stored_root<R: Read + Seek>(dev: &mut R, hash_offset: u64) -> anyhow::Result<String> {
    let p = read_superblock(dev, hash_offset)?;
    let mut top = vec![0u8; BLOCK as usize];
    dev.seek(SeekFrom::Start(hash_offset + BLOCK))?;
    dev.read_exact(&mut top)?;
    Ok(hex(&salted(&p.salt, &top)))
}

/// Check the hash area stored at `hash_offset` of `dev` (a partition or a slot image) against
/// the data before it and, when given, the expected root hash. Returns the recomputed info.
pub fn check<R: Read + Seek>(dev: &mut R, hash_offset: u64, expected_root: Option<&str>) -> anyhow::Result<VerityInfo> {
    let p = read_superblock(dev, hash_offset)?;
    dev.seek(SeekFrom::Start(0))?;
    let tree = build(std::io::BufReader::new(&mut *dev).take(hash_offset), &p)?;
    dev.seek(SeekFrom::Start(hash_offset))?;
    let mut stored = vec![0u8; tree.bytes.len()];
    dev.read_exact(&mut stored)?;
    let info = tree.info(&p);
    if stored != tree.bytes {
        let first = stored.chunks(BLOCK as usize).zip(tree.bytes.chunks(BLOCK as usize)).position(|(a, b)| a != b).unwrap_or(0);
        anyhow::bail!("the stored verity tree differs from the data (first at hash block {first}): the data or the tree is corrupt");
    }
    if let Some(want) = expected_root {
        if want != info.root_hash {
            anyhow::bail!("root hash {} does not match the expected {want}", info.root_hash);
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_counts_follow_cryptsetup() {
        assert_eq!(levels(2), 1);
        assert_eq!(levels(128), 1);
        assert_eq!(levels(129), 2);
        assert_eq!(levels(128 * 128), 2);
        assert_eq!(levels(128 * 128 + 1), 3);
        assert_eq!(hash_area_bytes(129), BLOCK * (1 + 2 + 1));
    }

    #[test]
    fn tree_is_deterministic_and_sensitive() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let p = Params::derived(data.len() as u64, "b1");
        let a = build(&data[..], &p).unwrap();
        let mut file = std::io::Cursor::new([&data[..], &vec![0; (p.hash_offset() as usize) - data.len()][..], &a.bytes[..]].concat());
        assert_eq!(stored_root(&mut file, p.hash_offset()).unwrap(), hex(&a.root), "the root a stored tree claims");
        let b = build(&data[..], &p).unwrap();
        assert_eq!(a.root, b.root);
        assert_eq!(a.bytes.len() as u64, hash_area_bytes(p.data_blocks));
        let mut d2 = data.clone();
        d2[123_456] ^= 1;
        assert_ne!(build(&d2[..], &p).unwrap().root, a.root);
        assert_ne!(build(&data[..], &Params::derived(data.len() as u64, "b2")).unwrap().root, a.root);
        let sb: [u8; SUPERBLOCK_LEN] = a.bytes[..SUPERBLOCK_LEN].try_into().unwrap();
        let q = parse_superblock(&sb, 0).unwrap();
        assert_eq!((q.data_blocks, q.salt, q.uuid), (p.data_blocks, p.salt, p.uuid));
    }

    #[test]
    fn a_tree_written_from_recorded_parameters_is_the_builds() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 29) as u8).collect();
        let p = Params::derived(data.len() as u64, "w");
        let t = build(&data[..], &p).unwrap();
        let info = t.info(&p);
        let q = Params::of_info(&info).unwrap();
        let mut dev = data.clone();
        dev.resize(p.hash_offset() as usize, 0);
        let mut c = std::io::Cursor::new(dev.clone());
        assert!(write_tree(&mut c, &q, &"0".repeat(64)).is_err());
        assert_eq!(c.get_ref().len() as u64, p.hash_offset(), "a wrong root writes nothing");
        write_tree(&mut c, &q, &info.root_hash).unwrap();
        dev.extend_from_slice(&t.bytes);
        assert_eq!(c.into_inner(), dev, "the same hash area, superblock included");
        let mut bad = info.clone();
        bad.hash_offset += BLOCK;
        assert!(Params::of_info(&bad).is_err());
    }

    #[test]
    fn check_finds_corruption() {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 13) as u8).collect();
        let p = Params::derived(data.len() as u64, "x");
        let t = build(&data[..], &p).unwrap();
        let mut dev = data.clone();
        dev.resize(p.hash_offset() as usize, 0);
        dev.extend_from_slice(&t.bytes);
        let root = hex(&t.root);
        assert!(check(&mut std::io::Cursor::new(dev.clone()), p.hash_offset(), Some(&root)).is_ok());
        let mut bad = dev.clone();
        bad[5] ^= 0x80;
        assert!(check(&mut std::io::Cursor::new(bad), p.hash_offset(), Some(&root)).is_err());
        assert!(check(&mut std::io::Cursor::new(dev), p.hash_offset(), Some(&"0".repeat(64))).is_err());
    }
}
