//! Writing a [`Tree`] as squashfs 4.0 (zstd), by hand: so the bytes are ours to place. Data
//! blocks are compressed on every core in bounded batches and written in tree order (the bytes
//! do not depend on the thread count); a [`BlockStore`] can hand back a file's compressed blocks
//! or a fragment block compressed by an earlier build, so a rebuild compresses only what changed
//! and still writes the same bytes a cold build writes. Layout (as mksquashfs and the kernel
//! expect): superblock, data blocks, fragment blocks, inode table, directory table, fragment table,
//! id table, xattr tables; padded to 4 KiB. Inodes are numbered in post-order, the root last.
//! For delta updates the bytes are laid out so casync's chunks keep a change local: the data
//! begin at 16 KiB (the superblock, which every change rewrites, is a chunk of its own, mostly
//! zeros); a cut mark ([`CUT_MARK`]) precedes each file's data, each fragment block and the
//! tables; generated files (inline content: the build's metadata) are packed last, next to the
//! tables that change with any change (docs/formats.md#rootfs-squashfs).

use crate::base::hash::Digest;
use crate::format::casync::CUT_MARK;
use crate::format::tree::{Content, Kind, Node, Tree};
use anyhow::{bail, Context};
use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

pub const BLOCK_SIZE: u32 = 128 << 10;
/// zstd level for data and metadata (mksquashfs's and libsquashfs's default for zstd).
pub const LEVEL: i32 = 15;
const META: usize = 8192;
const UNCOMPRESSED_BLOCK: u32 = 1 << 24;
const NO_FRAGMENT: u32 = u32::MAX;
const NO_XATTR: u32 = u32::MAX;
const INVALID: u64 = u64::MAX;
/// Where the data begin: the superblock's chunk is [0, DATA_START) (casync's minimum chunk).
pub const DATA_START: u64 = crate::format::casync::MIN;
/// Bytes of raw data compressed per batch: what the writer holds in memory at most, twice.
const BATCH: usize = 32 << 20;

/// Compressed blocks a previous build made, keyed by the sha256 of the raw bytes they hold
/// (plus block size and level, which the store's key must include). `get` may return `None`
/// at any time; what it returns is checked by the writer against the sizes it claims.
pub trait BlockStore: Sync {
    /// A whole file's data blocks: each block's size word, then their bytes, concatenated.
    fn get(&self, key: &Digest) -> Option<(Vec<u32>, Vec<u8>)>;
    fn put(&self, key: &Digest, sizes: &[u32], bytes: &[u8]);
}

/// What the writer reused and made.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WriteStats {
    pub bytes: u64,
    pub files: usize,
    pub blocks_compressed: usize,
    pub blocks_reused: usize,
    pub fragment_blocks: usize,
}

/// A metadata stream: 8 KiB blocks, each compressed if that is smaller, with a 2-byte header.
struct MetaWriter {
    out: Vec<u8>,
    cur: Vec<u8>,
}

impl Default for MetaWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl MetaWriter {
    fn new() -> Self {
        Self { out: Vec::new(), cur: Vec::with_capacity(META) }
    }
    /// Where the next byte goes: (block start in the table, offset in the block).
    fn pos(&self) -> (u32, u16) {
        (self.out.len() as u32, self.cur.len() as u16)
    }
    fn put(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            let n = (META - self.cur.len()).min(b.len());
            self.cur.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.cur.len() == META {
                self.flush();
            }
        }
    }
    fn flush(&mut self) {
        if self.cur.is_empty() {
            return;
        }
        let c = zstd::bulk::compress(&self.cur, LEVEL).expect("zstd of 8 KiB in memory");
        if c.len() < self.cur.len() {
            self.out.extend_from_slice(&(c.len() as u16).to_le_bytes());
            self.out.extend_from_slice(&c);
        } else {
            self.out.extend_from_slice(&(self.cur.len() as u16 | 0x8000).to_le_bytes());
            self.out.extend_from_slice(&self.cur);
        }
        self.cur.clear();
    }
    fn finish(mut self) -> Vec<u8> {
        self.flush();
        self.out
    }
}

/// A lookup table (fragments, ids, xattr ids): its entries in metadata blocks at `at`, then
/// the index of those blocks' absolute positions. Returns (blocks, index).
fn table(entries: &[u8], at: u64) -> (Vec<u8>, Vec<u8>) {
    let mut blocks = Vec::new();
    let mut index = Vec::new();
    for chunk in entries.chunks(META) {
        index.extend_from_slice(&(at + blocks.len() as u64).to_le_bytes());
        let mut m = MetaWriter::new();
        m.put(chunk);
        blocks.extend_from_slice(&m.finish());
    }
    (blocks, index)
}

fn compress_block(raw: &[u8]) -> (u32, Vec<u8>) {
    let c = zstd::bulk::compress(raw, LEVEL).expect("zstd of one block in memory");
    if c.len() < raw.len() {
        (c.len() as u32, c)
    } else {
        (raw.len() as u32 | UNCOMPRESSED_BLOCK, raw.to_vec())
    }
}

fn read_range(c: &Content, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    c.read_at(offset, &mut buf)?;
    Ok(buf)
}

/// Where a regular file's data went.
#[derive(Debug, Clone, Default)]
struct FileData {
    start: u64,
    sizes: Vec<u32>,
    fragment: u32,
    frag_offset: u32,
}

/// The regular files of `t` in tree order (one per hard-link group).
fn files(t: &Tree) -> Vec<&Node> {
    fn go<'a>(n: &'a Node, seen: &mut std::collections::HashSet<u64>, out: &mut Vec<&'a Node>) {
        match &n.kind {
            Kind::Dir(ch) => ch.values().for_each(|c| go(c, seen, out)),
            Kind::File { link, .. } => {
                if link.is_none_or(|l| seen.insert(l)) {
                    out.push(n);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    go(&t.root, &mut Default::default(), &mut out);
    out
}

/// Blocks per segment: the unit a large file is compressed and cached in (4 MiB of data).
const SEGMENT_BLOCKS: u64 = 32;

/// One unit of compression work in a batch.
enum Job<'a> {
    /// Up to [`SEGMENT_BLOCKS`] consecutive blocks of a file of at least one block.
    Segment { idx: usize, content: &'a Content, offset: u64, len: u64 },
    /// A fragment block: whole small files, packed.
    Fragment { raw: Vec<u8> },
}

/// Compressed blocks: each block's size word and the bytes, and whether a store supplied them.
struct Done {
    idx: Option<usize>,
    first: bool,
    sizes: Vec<u32>,
    bytes: Vec<u8>,
    reused: bool,
}

/// The store key of raw bytes: their sha256 with the block size and level.
fn key(raw: &[u8]) -> Digest {
    let d = Digest::of_bytes(raw);
    Digest::of_bytes(format!("squashfs-blocks/{BLOCK_SIZE}/zstd-{LEVEL}/{d}").as_bytes())
}

/// Compress `raw` block by block, or take what `store` holds for it (checked: one size word per
/// block, sizes adding up to the bytes, none claiming more than a block).
fn compress(raw: &[u8], store: Option<&dyn BlockStore>) -> (Vec<u32>, Vec<u8>, bool) {
    let blocks = raw.len().div_ceil(BLOCK_SIZE as usize);
    let k = store.map(|_| key(raw));
    if let (Some(s), Some(k)) = (store, &k) {
        if let Some((sizes, bytes)) = s.get(k) {
            let lens: Vec<u64> = sizes.iter().map(|w| (w & !UNCOMPRESSED_BLOCK) as u64).collect();
            if sizes.len() == blocks && lens.iter().sum::<u64>() == bytes.len() as u64 && lens.iter().all(|l| *l > 0 && *l <= BLOCK_SIZE as u64) {
                return (sizes, bytes, true);
            }
        }
    }
    let mut sizes = Vec::with_capacity(blocks);
    let mut bytes = Vec::new();
    for b in raw.chunks(BLOCK_SIZE as usize) {
        let (w, c) = compress_block(b);
        sizes.push(w);
        bytes.extend_from_slice(&c);
    }
    if let (Some(s), Some(k)) = (store, &k) {
        s.put(k, &sizes, &bytes);
    }
    (sizes, bytes, false)
}

fn run_batch(jobs: Vec<Job<'_>>, store: Option<&dyn BlockStore>) -> anyhow::Result<Vec<Done>> {
    let n = jobs.len();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<anyhow::Result<Done>>>> = (0..n).map(|_| Default::default()).collect();
    let workers = std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1).min(n.max(1));
    let work = |job: &Job| -> anyhow::Result<Done> {
        Ok(match job {
            Job::Fragment { raw } => {
                let (sizes, bytes, reused) = compress(raw, store);
                Done { idx: None, first: false, sizes, bytes, reused }
            }
            Job::Segment { idx, content, offset, len } => {
                let (sizes, bytes, reused) = compress(&read_range(content, *offset, *len as usize)?, store);
                Done { idx: Some(*idx), first: *offset == 0, sizes, bytes, reused }
            }
        })
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                *slots[i].lock().unwrap() = Some(work(&jobs[i]));
            });
        }
    });
    slots.into_iter().map(|m| m.into_inner().unwrap().expect("every job ran")).collect()
}

/// Whether a fragment block ends after this small file: decided by the file's own bytes (a
/// 64-bit FNV-1a, one file in 16), so a change to one file moves the fragment boundaries only
/// until the next such file and the blocks after it are the same bytes as before — found again
/// by a block store and by content-defined chunking.
fn ends_fragment(content: &[u8]) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in content {
        h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % 16 == 0
}

/// The data writer: batches of jobs in file order, results written in the same order.
struct DataWriter<'t, W: Write> {
    out: W,
    list: Vec<&'t Node>,
    store: Option<&'t dyn BlockStore>,
    data: HashMap<*const Node, FileData>,
    frag_table: Vec<u8>,
    pos: u64,
    jobs: Vec<Job<'t>>,
    /// The members of each fragment job queued, in order.
    pending: Vec<Vec<*const Node>>,
    /// Fragment blocks, spooled: they go after every file's data blocks, so a changed small file
    /// moves no data block of a large one (the verity tree over them and their casync chunks
    /// stay the same). Their table entries hold spool offsets until then.
    frags: std::fs::File,
    frags_len: u64,
    stats: WriteStats,
}

impl<'t, W: Write> DataWriter<'t, W> {
    fn flush(&mut self) -> anyhow::Result<()> {
        let done = run_batch(std::mem::take(&mut self.jobs), self.store)?;
        let mut pending = std::mem::take(&mut self.pending).into_iter();
        for d in done {
            if d.reused {
                self.stats.blocks_reused += d.sizes.len();
            } else {
                self.stats.blocks_compressed += d.sizes.len();
            }
            match d.idx {
                Some(idx) => {
                    let e = self.data.entry(self.list[idx] as *const Node).or_insert_with(|| FileData { fragment: NO_FRAGMENT, ..Default::default() });
                    if d.first {
                        self.out.write_all(&CUT_MARK)?;
                        self.pos += CUT_MARK.len() as u64;
                        e.start = self.pos;
                    }
                    e.sizes.extend_from_slice(&d.sizes);
                }
                None => {
                    let index = (self.frag_table.len() / 16) as u32;
                    self.frags.write_all(&CUT_MARK)?;
                    self.frags_len += CUT_MARK.len() as u64;
                    self.frag_table.extend_from_slice(&self.frags_len.to_le_bytes());
                    self.frag_table.extend_from_slice(&d.sizes[0].to_le_bytes());
                    self.frag_table.extend_from_slice(&0u32.to_le_bytes());
                    for n in pending.next().expect("a member list per fragment job") {
                        self.data.get_mut(&n).expect("fragment member recorded").fragment = index;
                    }
                    self.stats.fragment_blocks += 1;
                    self.frags.write_all(&d.bytes)?;
                    self.frags_len += d.bytes.len() as u64;
                    continue;
                }
            }
            self.out.write_all(&d.bytes)?;
            self.pos += d.bytes.len() as u64;
        }
        Ok(())
    }

    /// Pack a small file (`bytes`, of `me`) into the fragment being filled, ending it first if
    /// the file would not fit and after it if the file's bytes say so ([`ends_fragment`]).
    fn add_small(&mut self, me: *const Node, bytes: &[u8], raw: &mut Vec<u8>, members: &mut Vec<*const Node>) {
        if raw.len() + bytes.len() > BLOCK_SIZE as usize {
            self.end_fragment(raw, members);
        }
        self.data.get_mut(&me).expect("small file recorded").frag_offset = raw.len() as u32;
        raw.extend_from_slice(bytes);
        members.push(me);
        if ends_fragment(bytes) {
            self.end_fragment(raw, members);
        }
    }

    /// Queue the fragment being filled, if it holds anything.
    fn end_fragment(&mut self, raw: &mut Vec<u8>, members: &mut Vec<*const Node>) {
        if !raw.is_empty() {
            self.jobs.push(Job::Fragment { raw: std::mem::take(raw) });
            self.pending.push(std::mem::take(members));
        }
    }

    /// After the last data block: the spooled fragment blocks, and their table entries made
    /// absolute.
    fn finish_fragments(&mut self) -> anyhow::Result<()> {
        self.frags.seek(SeekFrom::Start(0))?;
        let n = std::io::copy(&mut std::io::Read::take(&mut self.frags, self.frags_len), &mut self.out)?;
        anyhow::ensure!(n == self.frags_len, "fragment spool shorter than written");
        for e in self.frag_table.chunks_mut(16) {
            let at = u64::from_le_bytes(e[..8].try_into().unwrap()) + self.pos;
            e[..8].copy_from_slice(&at.to_le_bytes());
        }
        self.pos += self.frags_len;
        Ok(())
    }
}

/// Write the data and fragment blocks of every regular file, from [`DATA_START`] of `out`, each
/// after a cut mark. Files of a block or more get data blocks (their last one short); smaller
/// ones go into fragment blocks, the generated ones last.
fn write_data<W: Write>(t: &Tree, out: W, store: Option<&dyn BlockStore>) -> anyhow::Result<(HashMap<*const Node, FileData>, Vec<u8>, u64, WriteStats, W)> {
    let list = files(t);
    let mut w = DataWriter { out, list: list.clone(), store, data: HashMap::new(), frag_table: Vec::new(), pos: DATA_START - CUT_MARK.len() as u64, jobs: Vec::new(), pending: Vec::new(), frags: tempfile::tempfile()?, frags_len: 0, stats: WriteStats::default() };
    let mut frag_raw: Vec<u8> = Vec::new();
    let mut frag_members: Vec<*const Node> = Vec::new();
    let mut generated: Vec<usize> = Vec::new();
    let mut batch_bytes = 0u64;
    for (idx, node) in list.iter().enumerate() {
        let Kind::File { content, size, .. } = &node.kind else { unreachable!() };
        let me = *node as *const Node;
        w.stats.files += 1;
        if *size >= BLOCK_SIZE as u64 {
            let seg = SEGMENT_BLOCKS * BLOCK_SIZE as u64;
            let mut offset = 0;
            while offset < *size {
                let len = (*size - offset).min(seg);
                w.jobs.push(Job::Segment { idx, content, offset, len });
                offset += len;
                batch_bytes += len;
                if batch_bytes >= BATCH as u64 {
                    w.flush()?;
                    batch_bytes = 0;
                }
            }
            continue;
        }
        w.data.insert(me, FileData { fragment: NO_FRAGMENT, ..Default::default() });
        if *size == 0 {
            continue;
        }
        if matches!(content, Content::Inline(_)) {
            generated.push(idx);
            continue;
        }
        w.add_small(me, &read_range(content, 0, *size as usize)?, &mut frag_raw, &mut frag_members);
        batch_bytes += *size;
        if batch_bytes >= BATCH as u64 {
            w.flush()?;
            batch_bytes = 0;
        }
    }
    // The generated files last, in fragment blocks of their own, next to the tables.
    w.end_fragment(&mut frag_raw, &mut frag_members);
    for idx in generated {
        let Kind::File { content, size, .. } = &list[idx].kind else { unreachable!() };
        w.add_small(list[idx] as *const Node, &read_range(content, 0, *size as usize)?, &mut frag_raw, &mut frag_members);
    }
    w.end_fragment(&mut frag_raw, &mut frag_members);
    w.flush()?;
    w.finish_fragments()?;
    Ok((w.data, w.frag_table, w.pos, w.stats, w.out))
}

/// uids/gids → the id table's indices.
#[derive(Default)]
struct Ids(BTreeMap<u32, u16>, Vec<u32>);

impl Ids {
    fn idx(&mut self, id: u32) -> anyhow::Result<u16> {
        if let Some(i) = self.0.get(&id) {
            return Ok(*i);
        }
        let i = u16::try_from(self.1.len()).context("more than 65536 distinct uids/gids")?;
        self.0.insert(id, i);
        self.1.push(id);
        Ok(i)
    }
}

/// Xattr sets → the xattr id table's indices (identical sets share one id).
#[derive(Default)]
struct Xattrs {
    kv: MetaWriter,
    ids: Vec<u8>,
    by_set: HashMap<Vec<u8>, u32>,
}


impl Xattrs {
    fn id(&mut self, x: &BTreeMap<String, Vec<u8>>) -> anyhow::Result<u32> {
        if x.is_empty() {
            return Ok(NO_XATTR);
        }
        let mut set = Vec::new();
        for (k, v) in x {
            let (kind, name) = if let Some(n) = k.strip_prefix("user.") {
                (0u16, n)
            } else if let Some(n) = k.strip_prefix("trusted.") {
                (1, n)
            } else if let Some(n) = k.strip_prefix("security.") {
                (2, n)
            } else {
                bail!("xattr {k}: squashfs stores user., trusted. and security. names only");
            };
            set.extend_from_slice(&kind.to_le_bytes());
            set.extend_from_slice(&(name.len() as u16).to_le_bytes());
            set.extend_from_slice(name.as_bytes());
            set.extend_from_slice(&(v.len() as u32).to_le_bytes());
            set.extend_from_slice(v);
        }
        if let Some(id) = self.by_set.get(&set) {
            return Ok(*id);
        }
        let (block, offset) = self.kv.pos();
        self.kv.put(&set);
        let id = (self.ids.len() / 16) as u32;
        self.ids.extend_from_slice(&(((block as u64) << 16) | offset as u64).to_le_bytes());
        self.ids.extend_from_slice(&(x.len() as u32).to_le_bytes());
        self.ids.extend_from_slice(&(set.len() as u32).to_le_bytes());
        self.by_set.insert(set, id);
        Ok(id)
    }
}

/// The inode and directory tables being written, post-order.
struct Meta<'a> {
    inodes: MetaWriter,
    dirs: MetaWriter,
    ids: Ids,
    xattrs: Xattrs,
    numbers: HashMap<*const Node, u32>,
    links: HashMap<u64, (u64, u32)>,
    nlinks: HashMap<u64, u32>,
    data: &'a HashMap<*const Node, FileData>,
    on_node: &'a mut dyn FnMut(),
}

/// Inode numbers in post-order (children before their directory, the root last); hard links
/// share the number of the group's first member.
fn number(n: &Node, next: &mut u32, numbers: &mut HashMap<*const Node, u32>, links: &mut HashMap<u64, u32>, nlinks: &mut HashMap<u64, u32>) {
    if let Kind::Dir(ch) = &n.kind {
        for c in ch.values() {
            number(c, next, numbers, links, nlinks);
        }
    }
    if let Kind::File { link: Some(l), .. } = &n.kind {
        *nlinks.entry(*l).or_default() += 1;
        if let Some(no) = links.get(l) {
            numbers.insert(n as *const Node, *no);
            return;
        }
        links.insert(*l, *next);
    }
    numbers.insert(n as *const Node, *next);
    *next += 1;
}

fn basic_type(k: &Kind) -> u16 {
    match k {
        Kind::Dir(_) => 1,
        Kind::File { .. } => 2,
        Kind::Symlink(_) => 3,
        Kind::BlockDev(..) => 4,
        Kind::CharDev(..) => 5,
        Kind::Fifo => 6,
    }
}

impl Meta<'_> {
    fn header(&mut self, n: &Node, kind: u16) -> anyhow::Result<Vec<u8>> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&kind.to_le_bytes());
        b.extend_from_slice(&(n.meta.mode & 0o7777).to_le_bytes());
        b.extend_from_slice(&self.ids.idx(n.meta.uid)?.to_le_bytes());
        b.extend_from_slice(&self.ids.idx(n.meta.gid)?.to_le_bytes());
        b.extend_from_slice(&u32::try_from(n.meta.mtime).unwrap_or(u32::MAX).to_le_bytes());
        b.extend_from_slice(&self.numbers[&(n as *const Node)].to_le_bytes());
        Ok(b)
    }

    /// Write `n`'s inode (and for a directory, its children and listing first). Returns its
    /// inode reference.
    fn write(&mut self, n: &Node, parent: u32) -> anyhow::Result<u64> {
        if let Kind::File { link: Some(l), .. } = &n.kind {
            if let Some((r, _)) = self.links.get(l) {
                return Ok(*r);
            }
        }
        let me = self.numbers[&(n as *const Node)];
        let xattr = self.xattrs.id(&n.meta.xattrs)?;
        let mut b;
        match &n.kind {
            Kind::Dir(ch) => {
                let mut entries = Vec::with_capacity(ch.len());
                for (name, c) in ch {
                    let r = self.write(c, me)?;
                    entries.push((name, r, self.numbers[&(c as *const Node)], basic_type(&c.kind)));
                }
                let (start, offset) = self.dirs.pos();
                let size = self.listing(&entries)?;
                let subdirs = ch.values().filter(|c| matches!(c.kind, Kind::Dir(_))).count() as u32;
                let file_size = size + 3;
                if xattr == NO_XATTR && file_size <= u16::MAX as u32 {
                    b = self.header(n, 1)?;
                    for v in [start, 2 + subdirs] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                    b.extend_from_slice(&(file_size as u16).to_le_bytes());
                    b.extend_from_slice(&offset.to_le_bytes());
                    b.extend_from_slice(&parent.to_le_bytes());
                } else {
                    b = self.header(n, 8)?;
                    for v in [2 + subdirs, file_size, start, parent] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                    b.extend_from_slice(&0u16.to_le_bytes());
                    b.extend_from_slice(&offset.to_le_bytes());
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
            }
            Kind::File { size, link, .. } => {
                let d = &self.data[&(n as *const Node)];
                let nlink = link.map(|l| self.nlinks[&l]).unwrap_or(1);
                if xattr == NO_XATTR && nlink == 1 && d.start <= u32::MAX as u64 && *size <= u32::MAX as u64 {
                    b = self.header(n, 2)?;
                    for v in [d.start as u32, d.fragment, d.frag_offset, *size as u32] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                } else {
                    b = self.header(n, 9)?;
                    for v in [d.start, *size, 0] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                    for v in [nlink, d.fragment, d.frag_offset, xattr] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                }
                for s in &d.sizes {
                    b.extend_from_slice(&s.to_le_bytes());
                }
            }
            Kind::Symlink(target) => {
                b = self.header(n, if xattr == NO_XATTR { 3 } else { 10 })?;
                b.extend_from_slice(&1u32.to_le_bytes());
                b.extend_from_slice(&(target.len() as u32).to_le_bytes());
                b.extend_from_slice(target);
                if xattr != NO_XATTR {
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
            }
            Kind::BlockDev(ma, mi) | Kind::CharDev(ma, mi) => {
                let t = if matches!(n.kind, Kind::BlockDev(..)) { 4 } else { 5 };
                b = self.header(n, if xattr == NO_XATTR { t } else { t + 7 })?;
                let rdev = (mi & 0xff) | (ma << 8) | ((mi & !0xff) << 12);
                b.extend_from_slice(&1u32.to_le_bytes());
                b.extend_from_slice(&rdev.to_le_bytes());
                if xattr != NO_XATTR {
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
            }
            Kind::Fifo => {
                b = self.header(n, if xattr == NO_XATTR { 6 } else { 13 })?;
                b.extend_from_slice(&1u32.to_le_bytes());
                if xattr != NO_XATTR {
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
            }
        }
        let (block, offset) = self.inodes.pos();
        self.inodes.put(&b);
        let r = ((block as u64) << 16) | offset as u64;
        if let Kind::File { link: Some(l), .. } = &n.kind {
            self.links.insert(*l, (r, me));
        }
        (self.on_node)();
        Ok(r)
    }

    /// A directory's listing: runs of entries under a header naming their inode block and a
    /// base inode number (at most 256 per run, deltas within i16). Returns its size in bytes.
    fn listing(&mut self, entries: &[(&Vec<u8>, u64, u32, u16)]) -> anyhow::Result<u32> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < entries.len() {
            let (block, base) = ((entries[i].1 >> 16) as u32, entries[i].2);
            let run = entries[i..]
                .iter()
                .take(256)
                .take_while(|e| (e.1 >> 16) as u32 == block && (e.2 as i64 - base as i64).abs() <= i16::MAX as i64)
                .count();
            out.extend_from_slice(&(run as u32 - 1).to_le_bytes());
            out.extend_from_slice(&block.to_le_bytes());
            out.extend_from_slice(&base.to_le_bytes());
            for (name, r, no, t) in &entries[i..i + run] {
                if name.is_empty() || name.len() > 256 {
                    bail!("a name of {} bytes cannot be in a squashfs directory", name.len());
                }
                out.extend_from_slice(&((*r & 0xffff) as u16).to_le_bytes());
                out.extend_from_slice(&((*no as i64 - base as i64) as i16).to_le_bytes());
                out.extend_from_slice(&t.to_le_bytes());
                out.extend_from_slice(&(name.len() as u16 - 1).to_le_bytes());
                out.extend_from_slice(name);
            }
            i += run;
        }
        self.dirs.put(&out);
        Ok(out.len() as u32)
    }
}

/// Write `tree` to `out` as squashfs; `mkfs_time` goes into the superblock. Returns what was
/// written and reused.
pub fn write(tree: &Tree, out: &Path, mkfs_time: u32, store: Option<&dyn BlockStore>, on_node: &mut dyn FnMut()) -> anyhow::Result<WriteStats> {
    let f = std::fs::File::create(out).with_context(|| format!("creating squashfs {}", out.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    w.write_all(&vec![0u8; DATA_START as usize - CUT_MARK.len()])?;
    let (data, frag_entries, mut pos, mut stats, mut w) = write_data(tree, w, store)?;
    let (mut numbers, mut links, mut nlinks) = (HashMap::new(), HashMap::new(), HashMap::new());
    let mut next = 1;
    number(&tree.root, &mut next, &mut numbers, &mut links, &mut nlinks);
    let inode_count = next - 1;
    let mut m = Meta { inodes: MetaWriter::new(), dirs: MetaWriter::new(), ids: Ids::default(), xattrs: Xattrs::default(), numbers, links: HashMap::new(), nlinks, data: &data, on_node };
    let root = m.write(&tree.root, inode_count + 1)?;
    let Meta { inodes, dirs, ids, xattrs, .. } = m;
    w.write_all(&CUT_MARK)?;
    pos += CUT_MARK.len() as u64;
    let mut put = |bytes: &[u8], pos: &mut u64| -> std::io::Result<u64> {
        let at = *pos;
        w.write_all(bytes)?;
        *pos += bytes.len() as u64;
        Ok(at)
    };
    let inode_table = put(&inodes.finish(), &mut pos)?;
    let dir_table = put(&dirs.finish(), &mut pos)?;
    let (fb, fi) = table(&frag_entries, pos);
    put(&fb, &mut pos)?;
    let frag_table = put(&fi, &mut pos)?;
    let id_bytes: Vec<u8> = ids.1.iter().flat_map(|i| i.to_le_bytes()).collect();
    let (ib, ii) = table(&id_bytes, pos);
    put(&ib, &mut pos)?;
    let id_table = put(&ii, &mut pos)?;
    let xattr_table = if xattrs.ids.is_empty() {
        INVALID
    } else {
        let kv_start = put(&xattrs.kv.finish(), &mut pos)?;
        let (xb, xi) = table(&xattrs.ids, pos);
        put(&xb, &mut pos)?;
        let mut head = Vec::new();
        head.extend_from_slice(&kv_start.to_le_bytes());
        head.extend_from_slice(&((xattrs.ids.len() / 16) as u32).to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(&xi);
        put(&head, &mut pos)?
    };
    let bytes_used = pos;
    let pad = (4096 - bytes_used % 4096) % 4096;
    w.write_all(&vec![0u8; pad as usize])?;
    let mut sb = Vec::with_capacity(super::SUPERBLOCK_LEN);
    for v in [super::MAGIC, inode_count, mkfs_time, BLOCK_SIZE, (frag_entries.len() / 16) as u32] {
        sb.extend_from_slice(&v.to_le_bytes());
    }
    let flags: u16 = if xattr_table == INVALID { 0x200 } else { 0 };
    for v in [6u16, BLOCK_SIZE.trailing_zeros() as u16, flags, ids.1.len() as u16, 4, 0] {
        sb.extend_from_slice(&v.to_le_bytes());
    }
    for v in [root, bytes_used, id_table, xattr_table, inode_table, dir_table, frag_table, INVALID] {
        sb.extend_from_slice(&v.to_le_bytes());
    }
    let mut f = w.into_inner().map_err(|e| e.into_error())?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&sb)?;
    f.sync_all()?;
    stats.bytes = bytes_used + pad;
    Ok(stats)
}
