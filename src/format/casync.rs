//! casync's content-defined chunking and its blob index (`.caibx`) and chunk store (`.castr`),
//! so a slotforge image can be served, inspected and extracted with casync or desync. The
//! chunker is casync's (buzhash over a 48-byte window, cut where `h mod d == d - 1` between the
//! minimum and maximum size, `d` derived from the average as casync derives it); chunk ids are
//! SHA-512/256 of the uncompressed bytes; store files are `xxxx/<id>.cacnk`, zstd. The pure core
//! ([`Chunker`], [`index_bytes`], [`parse_index`]) is checked byte for byte against `casync
//! make` (tests/casync.rs); [`chunk_file`] is the I/O edge. Hand-written: no maintained crate
//! implements casync's chunker and formats (docs/architecture.md).

use anyhow::{bail, Context};
use sha2::Digest as _;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const WINDOW: usize = 48;
/// casync's defaults: 16/64/256 KiB.
pub const MIN: u64 = 16 << 10;
pub const AVG: u64 = 64 << 10;
pub const MAX: u64 = 256 << 10;

/// A cut mark: 48 bytes whose buzhash meets casync's cut test for the default sizes, so a chunk
/// at least [`MIN`] long ends right after them, whatever came before. An image writer puts one
/// before each stretch it wants chunked on its own (a file's data, a fragment block, the tables),
/// so a change there does not spill into the chunks of its neighbours (docs/formats.md#rootfs-squashfs).
pub const CUT_MARK: [u8; WINDOW] = *b"slotforge: a chunk ends here (casync cut) 66023\n";

const FORMAT_INDEX: u64 = 0x9682_4d9c_7b12_9ff9;
const FORMAT_TABLE: u64 = 0xe75b_9e11_2f17_417d;
const TABLE_TAIL_MARKER: u64 = 0x4b4f_050e_5549_ecd1;
/// The feature flags `casync make` writes into a blob index: SHA-512/256 ids plus its default
/// archive flags (exclude-nodump, exclude-file).
const FEATURE_FLAGS: u64 = 0xb000_0000_0000_0000;
const HEADER_LEN: u64 = 48;
const ENTRY_LEN: u64 = 40;

/// casync's buzhash table (its `buzhash_table`): data the chunk boundaries depend on.
#[rustfmt::skip]
const TABLE: [u32; 256] = [
    0x458be752, 0xc10748cc, 0xfbbcdbb8, 0x6ded5b68, 0xb10a82b5, 0x20d75648, 0xdfc5665f, 0xa8428801,
    0x7ebf5191, 0x841135c7, 0x65cc53b3, 0x280a597c, 0x16f60255, 0xc78cbc3e, 0x294415f5, 0xb938d494,
    0xec85c4e6, 0xb7d33edc, 0xe549b544, 0xfdeda5aa, 0x882bf287, 0x3116737c, 0x05569956, 0xe8cc1f68,
    0x0806ac5e, 0x22a14443, 0x15297e10, 0x50d090e7, 0x4ba60f6f, 0xefd9f1a7, 0x5c5c885c, 0x82482f93,
    0x9bfd7c64, 0x0b3e7276, 0xf2688e77, 0x8fad8abc, 0xb0509568, 0xf1ada29f, 0xa53efdfe, 0xcb2b1d00,
    0xf2a9e986, 0x6463432b, 0x95094051, 0x5a223ad2, 0x9be8401b, 0x61e579cb, 0x1a556a14, 0x5840fdc2,
    0x9261ddf6, 0xcde002bb, 0x52432bb0, 0xbf17373e, 0x7b7c222f, 0x2955ed16, 0x9f10ca59, 0xe840c4c9,
    0xccabd806, 0x14543f34, 0x1462417a, 0x0d4a1f9c, 0x087ed925, 0xd7f8f24c, 0x7338c425, 0xcf86c8f5,
    0xb19165cd, 0x9891c393, 0x325384ac, 0x0308459d, 0x86141d7e, 0xc922116a, 0xe2ffa6b6, 0x53f52aed,
    0x2cd86197, 0xf5b9f498, 0xbf319c8f, 0xe0411fae, 0x977eb18c, 0xd8770976, 0x9833466a, 0xc674df7f,
    0x8c297d45, 0x8ca48d26, 0xc49ed8e2, 0x7344f874, 0x556f79c7, 0x6b25eaed, 0xa03e2b42, 0xf68f66a4,
    0x8e8b09a2, 0xf2e0e62a, 0x0d3a9806, 0x9729e493, 0x8c72b0fc, 0x160b94f6, 0x450e4d3d, 0x7a320e85,
    0xbef8f0e1, 0x21d73653, 0x4e3d977a, 0x1e7b3929, 0x1cc6c719, 0xbe478d53, 0x8d752809, 0xe6d8c2c6,
    0x275f0892, 0xc8acc273, 0x4cc21580, 0xecc4a617, 0xf5f7be70, 0xe795248a, 0x375a2fe9, 0x425570b6,
    0x8898dcf8, 0xdc2d97c4, 0x0106114b, 0x364dc22f, 0x1e0cad1f, 0xbe63803c, 0x5f69fac2, 0x4d5afa6f,
    0x1bc0dfb5, 0xfb273589, 0x0ea47f7b, 0x3c1c2b50, 0x21b2a932, 0x6b1223fd, 0x2fe706a8, 0xf9bd6ce2,
    0xa268e64e, 0xe987f486, 0x3eacf563, 0x1ca2018c, 0x65e18228, 0x2207360a, 0x57cf1715, 0x34c37d2b,
    0x1f8f3cde, 0x93b657cf, 0x31a019fd, 0xe69eb729, 0x8bca7b9b, 0x4c9d5bed, 0x277ebeaf, 0xe0d8f8ae,
    0xd150821c, 0x31381871, 0xafc3f1b0, 0x927db328, 0xe95effac, 0x305a47bd, 0x426ba35b, 0x1233af3f,
    0x686a5b83, 0x50e072e5, 0xd9d3bb2a, 0x8befc475, 0x487f0de6, 0xc88dff89, 0xbd664d5e, 0x971b5d18,
    0x63b14847, 0xd7d3c1ce, 0x7f583cf3, 0x72cbcb09, 0xc0d0a81c, 0x7fa3429b, 0xe9158a1b, 0x225ea19a,
    0xd8ca9ea3, 0xc763b282, 0xbb0c6341, 0x020b8293, 0xd4cd299d, 0x58cfa7f8, 0x91b4ee53, 0x37e4d140,
    0x95ec764c, 0x30f76b06, 0x5ee68d24, 0x679c8661, 0xa41979c2, 0xf2b61284, 0x4fac1475, 0x0adb49f9,
    0x19727a23, 0x15a7e374, 0xc43a18d5, 0x3fb1aa73, 0x342fc615, 0x924c0793, 0xbee2d7f0, 0x8a279de9,
    0x4aa2d70c, 0xe24dd37f, 0xbe862c0b, 0x177c22c2, 0x5388e5ee, 0xcd8a7510, 0xf901b4fd, 0xdbc13dbc,
    0x6c0bae5b, 0x64efe8c7, 0x48b02079, 0x80331a49, 0xca3d8ae6, 0xf3546190, 0xfed7108b, 0xc49b941b,
    0x32baf4a9, 0xeb833a4a, 0x88a3f1a5, 0x3a91ce0a, 0x3cc27da1, 0x7112e684, 0x4a3096b1, 0x3794574c,
    0xa3c8b6f3, 0x1d213941, 0x6e0a2e00, 0x233479f1, 0x0f4cd82f, 0x6093edd2, 0x5d7d209e, 0x464fe319,
    0xd4dcac9e, 0x0db845cb, 0xfb5e4bc3, 0xe0256ce1, 0x09fb4ed1, 0x0914be1e, 0xa5bdb2c3, 0xc6eb57bb,
    0x30320350, 0x3f397e91, 0xa67791bc, 0x86bc0e2c, 0xefa0a7e2, 0xe9ff7543, 0xe733612c, 0xd185897b,
    0x329e5388, 0x91dd236b, 0x2ecb0d93, 0xf4d82a3d, 0x35b5c03f, 0xe4e606f0, 0x05b21843, 0x37b45964,
    0x5eff22f4, 0x6027f4cc, 0x77178b3c, 0xae507131, 0x7bf7cabc, 0xf9c18d66, 0x593ade65, 0xd95ddf11,
];

/// casync's content-defined chunker, fed bytes in any slices; the cut points depend only on
/// the bytes.
#[derive(Debug, Clone)]
pub struct Chunker {
    min: u64,
    max: u64,
    discriminator: u32,
    h: u32,
    window: [u8; WINDOW],
    filled: usize,
    /// Bytes of the current chunk so far.
    size: u64,
}

/// casync's discriminator for an average chunk size (its cut test makes chunks ~1.32× larger
/// than a plain `h mod avg` would), kept within [min, max].
pub fn discriminator(min: u64, avg: u64, max: u64) -> u32 {
    let d = (avg as f64 / (-1.42888852e-7 * avg as f64 + 1.33237515)) as u64;
    d.clamp(min, max) as u32
}

impl Chunker {
    pub fn new(min: u64, avg: u64, max: u64) -> Self {
        Self { min, max, discriminator: discriminator(min, avg, max), h: 0, window: [0; WINDOW], filled: 0, size: 0 }
    }

    fn shall_cut(&self) -> bool {
        if self.size >= self.max {
            return true;
        }
        self.size >= self.min && self.h % self.discriminator == self.discriminator - 1
    }

    /// Scan `data`: the length of its prefix that ends the current chunk, or `None` when the
    /// chunk goes on past it. After a cut the chunker starts a new chunk.
    pub fn scan(&mut self, data: &[u8]) -> Option<usize> {
        for (i, &b) in data.iter().enumerate() {
            if self.filled < WINDOW {
                self.window[self.filled] = b;
                self.filled += 1;
                self.size += 1;
                if self.filled < WINDOW {
                    continue;
                }
                self.h = 0;
                for (k, &w) in self.window.iter().enumerate() {
                    self.h ^= TABLE[w as usize].rotate_left((WINDOW - 1 - k) as u32);
                }
            } else {
                let idx = (self.size % WINDOW as u64) as usize;
                self.h = self.h.rotate_left(1) ^ TABLE[self.window[idx] as usize].rotate_left(WINDOW as u32) ^ TABLE[b as usize];
                self.size += 1;
                if !self.shall_cut() {
                    self.window[idx] = b;
                    continue;
                }
            }
            if self.shall_cut() {
                self.h = 0;
                self.filled = 0;
                self.size = 0;
                return Some(i + 1);
            }
        }
        None
    }
}

/// A chunk of an index: where it ends in the blob, and its id (SHA-512/256 of its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub end: u64,
    pub id: [u8; 32],
}

impl Entry {
    pub fn hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

pub fn chunk_id(data: &[u8]) -> [u8; 32] {
    sha2::Sha512_256::digest(data).into()
}

/// A `.caibx` as `casync make` writes it for these chunks (casync's default sizes).
pub fn index_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut b = Vec::with_capacity((HEADER_LEN + 16 + ENTRY_LEN * (entries.len() as u64 + 1)) as usize);
    for v in [HEADER_LEN, FORMAT_INDEX, FEATURE_FLAGS, MIN, AVG, MAX, u64::MAX, FORMAT_TABLE] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for e in entries {
        b.extend_from_slice(&e.end.to_le_bytes());
        b.extend_from_slice(&e.id);
    }
    let table_size = 16 + ENTRY_LEN * (entries.len() as u64 + 1);
    for v in [0, 0, HEADER_LEN, table_size, TABLE_TAIL_MARKER] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// Read a `.caibx` back: its chunks, checked (header, marker, sizes, offsets strictly growing,
/// no chunk over `max` bytes). Refuses anything else rather than guessing.
pub fn parse_index(b: &[u8]) -> anyhow::Result<Vec<Entry>> {
    let u = |o: usize| -> anyhow::Result<u64> { Ok(u64::from_le_bytes(b.get(o..o + 8).context("index truncated")?.try_into().unwrap())) };
    if u(0)? != HEADER_LEN || u(8)? != FORMAT_INDEX {
        bail!("not a casync index");
    }
    let (min, max) = (u(24)?, u(40)?);
    if u(48)? != u64::MAX || u(56)? != FORMAT_TABLE {
        bail!("casync index: no chunk table");
    }
    let body = b.len().checked_sub(64 + ENTRY_LEN as usize).context("index truncated")?;
    if body % ENTRY_LEN as usize != 0 || u(b.len() - 8)? != TABLE_TAIL_MARKER {
        bail!("casync index: table not closed");
    }
    let n = body / ENTRY_LEN as usize;
    let mut out = Vec::with_capacity(n);
    let mut last = 0u64;
    for i in 0..n {
        let o = 64 + i * ENTRY_LEN as usize;
        let end = u(o)?;
        let len = end.checked_sub(last).filter(|l| *l > 0).context("casync index: chunk offsets do not grow")?;
        if len > max || (len < min && i + 1 < n) {
            bail!("casync index: chunk {i} of {len} bytes is outside {min}..{max}");
        }
        out.push(Entry { end, id: b[o + 8..o + 40].try_into().unwrap() });
        last = end;
    }
    Ok(out)
}

/// What chunking one file gave.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Chunked {
    pub index: PathBuf,
    pub bytes: u64,
    pub chunks: usize,
    /// Chunks this call added to the store (the rest were there already).
    pub new_chunks: usize,
    pub new_chunk_bytes: u64,
}

/// Where a chunk lives in a store.
pub fn chunk_path(store: &Path, id_hex: &str) -> PathBuf {
    store.join(&id_hex[..4]).join(format!("{id_hex}.cacnk"))
}

/// Cut what `r` yields into casync chunks (casync's default sizes), calling `f(bytes, end)` for
/// each in order; returns the total length. Holds at most one chunk and a 1 MiB buffer.
pub fn for_each_chunk(mut r: impl Read, mut f: impl FnMut(&[u8], u64) -> anyhow::Result<()>) -> anyhow::Result<u64> {
    let mut c = Chunker::new(MIN, AVG, MAX);
    let mut chunk: Vec<u8> = Vec::with_capacity(MAX as usize);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let mut rest = &buf[..n];
        while let Some(cut) = c.scan(rest) {
            chunk.extend_from_slice(&rest[..cut]);
            total += cut as u64;
            f(&chunk, total)?;
            chunk.clear();
            rest = &rest[cut..];
        }
        chunk.extend_from_slice(rest);
        total += rest.len() as u64;
    }
    if !chunk.is_empty() {
        f(&chunk, total)?;
    }
    Ok(total)
}

/// Store one chunk (zstd) unless the store has it; true if it was written. By rename, so a store
/// shared by several writers never holds half a chunk.
pub fn store_chunk(store: &Path, e: &Entry, data: &[u8]) -> anyhow::Result<bool> {
    let p = chunk_path(store, &e.hex());
    if p.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(p.parent().unwrap())?;
    let mut tmp = tempfile::NamedTempFile::new_in(p.parent().unwrap())?;
    zstd::stream::copy_encode(data, tmp.as_file_mut(), 3)?;
    tmp.persist(&p).map_err(|e| e.error)?;
    Ok(true)
}

/// Chunk `file` with casync's defaults: write its index to `index` and every chunk the store
/// lacks into `store`. Streams the file.
pub fn chunk_file(file: &Path, index: &Path, store: &Path) -> anyhow::Result<Chunked> {
    chunk_file_except(file, u64::MAX, index, store, &|_| false)
}

/// [`chunk_file`] of the first `len` bytes of `file` (an image's data, without the dm-verity
/// hash area the device makes itself), leaving out of the store every chunk `skip` names (what
/// a delta's bases hold).
pub fn chunk_file_except(file: &Path, len: u64, index: &Path, store: &Path, skip: &dyn Fn(&[u8; 32]) -> bool) -> anyhow::Result<Chunked> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?.take(len);
    let mut entries = Vec::new();
    let (mut new_chunks, mut new_bytes) = (0usize, 0u64);
    let total = for_each_chunk(f, |chunk, end| {
        let e = Entry { end, id: chunk_id(chunk) };
        if !skip(&e.id) && store_chunk(store, &e, chunk)? {
            new_chunks += 1;
            new_bytes += chunk.len() as u64;
        }
        entries.push(e);
        Ok(())
    })?;
    crate::base::durable::write_durably(index, &mut &index_bytes(&entries)[..])?;
    Ok(Chunked { index: index.to_path_buf(), bytes: total, chunks: entries.len(), new_chunks, new_chunk_bytes: new_bytes })
}

/// The chunk ids of what `r` yields (what a seed or a base offers).
pub fn ids_of(r: impl Read) -> anyhow::Result<std::collections::HashSet<[u8; 32]>> {
    Ok(index_of(r)?.into_iter().map(|e| e.id).collect())
}

/// The chunks of what `r` yields, in order: its index.
pub fn index_of(r: impl Read) -> anyhow::Result<Vec<Entry>> {
    let mut v = Vec::new();
    for_each_chunk(r, |c, end| {
        v.push(Entry { end, id: chunk_id(c) });
        Ok(())
    })?;
    Ok(v)
}

/// Where a base blob holds each chunk of a new index: per chunk of `new`, the offset in the blob
/// `base` describes of a chunk with the same id, if any. Encoded (docs/upgrade-protocol.md#seed-offsets)
/// as one unsigned LEB128 per chunk — 0: not in the base; else zigzag(base offset − new offset)
/// + 1, so a chunk at the same place is one byte — the whole zstd-compressed: a delta tells the
/// device where its slot holds what it needs in a few hundred bytes instead of the base's index.
pub fn seed_offsets(new: &[Entry], base: &[Entry]) -> Vec<u8> {
    let at = offsets_of(new, base);
    let mut raw = Vec::with_capacity(new.len() * 2);
    let mut start = 0u64;
    for (e, a) in new.iter().zip(&at) {
        let v = match a {
            None => 0,
            Some(b) => {
                let d = *b as i64 - start as i64;
                (((d << 1) ^ (d >> 63)) as u64) + 1
            }
        };
        let mut v = v;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                raw.push(byte);
                break;
            }
            raw.push(byte | 0x80);
        }
        start = e.end;
    }
    zstd::bulk::compress(&raw, 19).expect("in-memory zstd")
}

/// Per chunk of `new`: the offset in the blob `base` describes of the first chunk with its id.
pub fn offsets_of(new: &[Entry], base: &[Entry]) -> Vec<Option<u64>> {
    let mut at = std::collections::HashMap::new();
    let mut start = 0u64;
    for e in base {
        at.entry(e.id).or_insert(start);
        start = e.end;
    }
    new.iter().map(|e| at.get(&e.id).copied()).collect()
}

/// Read [`seed_offsets`] back for `new`: one offset (or none) per chunk. Decompresses at most 10
/// bytes per chunk; anything else (short, long, overflowing) is refused.
pub fn parse_seed_offsets(b: &[u8], new: &[Entry]) -> anyhow::Result<Vec<Option<u64>>> {
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::new(b)?.take(new.len() as u64 * 10 + 1).read_to_end(&mut raw).context("seed offsets: not zstd")?;
    let mut out = Vec::with_capacity(new.len());
    let mut bytes = raw.iter();
    let mut start = 0u64;
    for e in new {
        let mut v = 0u64;
        for shift in (0..).step_by(7) {
            let byte = *bytes.next().context("seed offsets: too short")?;
            if shift > 63 || (shift == 63 && byte > 1) {
                bail!("seed offsets: a value overflows");
            }
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        out.push(match v {
            0 => None,
            v => {
                let z = v - 1;
                let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
                Some(u64::try_from(start as i64 + d).ok().context("seed offsets: an offset before the blob")?)
            }
        });
        start = e.end;
    }
    if bytes.next().is_some() {
        bail!("seed offsets: longer than the index");
    }
    Ok(out)
}

/// Files already on the machine whose chunks an assembly may copy instead of fetching them: a
/// map from chunk id to where it was found. Every chunk is checked against its id again when
/// it is read, so a seed that changed since it was scanned only costs a fetch from the store.
#[derive(Default)]
pub struct Seeds {
    files: Vec<(String, std::fs::File)>,
    map: std::collections::HashMap<[u8; 32], (usize, u64, u32)>,
}

impl Seeds {
    /// Chunk `len` bytes of `file` from `offset`; returns how many chunks it offers.
    pub fn add(&mut self, name: &str, file: std::fs::File, offset: u64, len: u64) -> anyhow::Result<usize> {
        use std::io::{Seek, SeekFrom};
        let mut r = file.try_clone()?;
        r.seek(SeekFrom::Start(offset))?;
        let no = self.files.len();
        let before = self.map.len();
        let map = &mut self.map;
        for_each_chunk(std::io::BufReader::new(r).take(len), |c, end| {
            map.entry(chunk_id(c)).or_insert((no, offset + end - c.len() as u64, c.len() as u32));
            Ok(())
        })
        .with_context(|| format!("reading seed {name}"))?;
        self.files.push((name.to_string(), file));
        Ok(self.map.len() - before)
    }

    /// Offer chunks of `file` where `at` says they lie from `offset` (the `i`th of `index` at
    /// `at[i]`), without reading them: a device whose slot is a delta's base skips chunking it.
    /// A chunk that is not where it was said to be is simply not found there.
    pub fn add_at(&mut self, name: &str, file: std::fs::File, offset: u64, index: &[Entry], at: &[Option<u64>]) -> usize {
        let no = self.files.len();
        let before = self.map.len();
        let mut start = 0u64;
        for (e, a) in index.iter().zip(at) {
            if let Some(a) = a {
                self.map.entry(e.id).or_insert((no, offset + a, (e.end - start) as u32));
            }
            start = e.end;
        }
        self.files.push((name.to_string(), file));
        self.map.len() - before
    }

    pub fn has(&self, id: &[u8; 32]) -> bool {
        self.map.contains_key(id)
    }

    /// The chunk's bytes from a seed, if a seed had it and still has it.
    fn read(&self, e: &Entry, len: usize) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let &(no, at, n) = self.map.get(&e.id)?;
        if n as usize != len {
            return None;
        }
        let mut buf = vec![0u8; len];
        self.files[no].1.read_exact_at(&mut buf, at).ok()?;
        (chunk_id(&buf) == e.id).then_some(buf)
    }
}

/// Read a chunk from a store: decompressed to at most `len` + 1 bytes, checked against its length
/// and id. A missing chunk is `Ok(None)`; a corrupt, short or oversized one is an error.
pub fn read_chunk(store: &Path, e: &Entry, len: usize) -> anyhow::Result<Option<Vec<u8>>> {
    read_chunk_as(store, e, len, true)
}

/// [`read_chunk`], the id checked only with `check` (a caller that checked the store's chunks
/// already and checks the whole it writes; the length is always checked).
fn read_chunk_as(store: &Path, e: &Entry, len: usize, check: bool) -> anyhow::Result<Option<Vec<u8>>> {
    let p = chunk_path(store, &e.hex());
    let f = match std::fs::File::open(&p) {
        Ok(f) => f,
        Err(x) if x.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(x) => return Err(x).with_context(|| format!("opening chunk {}", e.hex())),
    };
    let mut buf = Vec::with_capacity(len);
    zstd::stream::read::Decoder::new(f)?.take(len as u64 + 1).read_to_end(&mut buf).with_context(|| format!("chunk {} is not zstd", e.hex()))?;
    if buf.len() != len || (check && chunk_id(&buf) != e.id) {
        bail!("chunk {} does not match its id ({} bytes, {len} expected)", e.hex(), buf.len());
    }
    Ok(Some(buf))
}

/// What an assembly took from where.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Assembled {
    pub chunks: usize,
    pub bytes: u64,
    /// Chunks a previous, interrupted assembly had already written (checked).
    pub resumed: usize,
    pub from_seeds: usize,
    pub from_store: usize,
    pub store_bytes: u64,
    /// Bytes of dm-verity hash area the device made from the assembled data (the index covered
    /// the data only); 0 when the chunks held it.
    #[serde(default)]
    pub tree_bytes: u64,
    /// Whether a seed had to be chunked (read whole) to find the chunks: not when the bundle said
    /// where the running slot holds them and it did.
    #[serde(default)]
    pub seeds_chunked: bool,
}

/// Write the blob `entries` describe into `out`, each chunk from (in this order) what `out`
/// already holds at its place (an interrupted earlier run), a seed, or the store — every one
/// checked against its id before it is written. A chunk found nowhere is an error naming it;
/// `out` then holds a prefix a later run resumes from. Returns what came from where and the
/// sha256 of the whole (hashed on the way, so the caller need not read it again). Memory: one
/// chunk.
pub fn assemble(entries: &[Entry], seeds: &Seeds, store: &Path, out: &std::fs::File) -> anyhow::Result<(Assembled, crate::base::hash::Digest)> {
    let (a, h) = assemble_hashing(entries, seeds, store, out)?;
    Ok((a, crate::base::hash::Digest::from_hasher(h)))
}

/// [`assemble`], the SHA-256 of what was written left open: a caller that appends to the blob
/// (a dm-verity hash area) hashes the whole without reading it again.
pub fn assemble_hashing(entries: &[Entry], seeds: &Seeds, store: &Path, out: &std::fs::File) -> anyhow::Result<(Assembled, sha2::Sha256)> {
    let have = out.metadata()?.len();
    let (a, h) = assemble_at(entries, seeds, store, out, 0, have, true, false, &mut |_| Ok(()))?;
    out.set_len(a.bytes)?;
    out.sync_all()?;
    Ok((a, h.expect("hashed")))
}

/// Threads finding and checking chunks in [`assemble_at`].
const FINDERS: usize = 2;

/// [`assemble`] into `out` from byte `offset` (a slot inside a disk, or a partition), of which
/// the first `have` bytes may hold an earlier run's work: a chunk there whose bytes are its id's
/// is kept (each finder thread stops looking after its first miss: writes go in order, so little
/// beyond is done). `progress` is told the bytes done after each chunk written. Does not sync.
/// Two stages: two threads find and check chunks (SHA-512/256 of each, the costly part), the
/// caller's writes them in order and, with `hash_whole`, hashes the whole (SHA-256); at most four
/// chunks wait. Without it the caller relies on the ids: every chunk written matched its id, so
/// the whole is what an index it trusts (one a signed config pins) describes. With
/// `store_checked` the store's chunks are taken without their ids checked again (the caller
/// checked every one before writing anything, and checks the whole it wrote: a store file
/// changed in between is caught there).
#[allow(clippy::too_many_arguments)]
pub fn assemble_at(entries: &[Entry], seeds: &Seeds, store: &Path, out: &std::fs::File, offset: u64, have: u64, hash_whole: bool, store_checked: bool, progress: &mut dyn FnMut(u64) -> anyhow::Result<()>) -> anyhow::Result<(Assembled, Option<sha2::Sha256>)> {
    use std::os::unix::fs::FileExt;
    #[derive(PartialEq)]
    enum From {
        Out,
        Seed,
        Store,
    }
    // Stage 1, on two threads (chunk i on thread i % 2): each chunk's bytes, from where they are,
    // checked against its id. A chunk already in place is kept whatever its neighbours hold (its
    // bytes are its id's); each thread stops looking in `out` at its first miss.
    let starts: Vec<u64> = std::iter::once(0).chain(entries.iter().map(|e| e.end)).collect();
    let find = |w: usize, tx: std::sync::mpsc::SyncSender<anyhow::Result<(From, Vec<u8>)>>| {
        let mut resuming = true;
        for (i, e) in entries.iter().enumerate().skip(w).step_by(FINDERS) {
            let start = starts[i];
            let len = (e.end - start) as usize;
            let mut got = None;
            if resuming && e.end <= have {
                let mut cur = vec![0u8; len];
                if out.read_exact_at(&mut cur, offset + start).is_ok() && chunk_id(&cur) == e.id {
                    got = Some(Ok((From::Out, cur)));
                }
            }
            let item = got.unwrap_or_else(|| {
                resuming = false;
                match seeds.read(e, len) {
                    Some(d) => Ok((From::Seed, d)),
                    None => match read_chunk_as(store, e, len, !store_checked) {
                        Ok(Some(d)) => Ok((From::Store, d)),
                        Ok(None) => Err(anyhow::anyhow!("chunk {} (bytes {start}..{}) is neither in a seed nor in the store", e.hex(), e.end)),
                        Err(x) => Err(x),
                    },
                }
            });
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                return;
            }
        }
    };
    std::thread::scope(|sc| {
        let mut rxs = Vec::new();
        for w in 0..FINDERS {
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            let find = &find;
            sc.spawn(move || find(w, tx));
            rxs.push(rx);
        }
        // Stage 2: written in order, hashed on the way.
        let mut a = Assembled::default();
        let mut whole = sha2::Sha256::new();
        let mut start = 0u64;
        for (i, e) in entries.iter().enumerate() {
            let (from, data) = rxs[i % FINDERS].recv().map_err(|_| anyhow::anyhow!("chunk reader stopped"))??;
            let len = data.len() as u64;
            match from {
                From::Out => a.resumed += 1,
                From::Seed => a.from_seeds += 1,
                From::Store => {
                    a.from_store += 1;
                    a.store_bytes += len;
                }
            }
            if from != From::Out {
                out.write_all_at(&data, offset + start)?;
            }
            if hash_whole {
                whole.update(&data);
            }
            a.chunks += 1;
            a.bytes += len;
            start = e.end;
            if from != From::Out {
                progress(start)?;
            }
        }
        Ok((a, hash_whole.then_some(whole)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cuts(data: &[u8], step: usize) -> Vec<usize> {
        let mut c = Chunker::new(MIN, AVG, MAX);
        let (mut out, mut pos) = (Vec::new(), 0);
        for piece in data.chunks(step) {
            let mut rest = piece;
            let mut at = pos;
            while let Some(n) = c.scan(rest) {
                at += n;
                out.push(at);
                rest = &rest[n..];
            }
            pos += piece.len();
        }
        out
    }

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; (x >> 24) as u8 }).collect()
    }

    #[test]
    fn a_cut_mark_ends_a_chunk_of_at_least_the_minimum() {
        // After any bytes, a chunk of MIN or more ends right after the mark; a shorter one does not.
        for (lead, at) in [(MIN as usize - WINDOW, Some(MIN as usize)), (40_000, Some(40_000 + WINDOW)), (1_000, None)] {
            let mut d = noise(lead);
            d.extend_from_slice(&CUT_MARK);
            let got = cuts(&d, 777).first().copied();
            match at {
                Some(at) => assert_eq!(got, Some(at), "a cut at the mark's end after {lead} bytes"),
                None => assert!(got.is_none_or(|c| c > d.len()), "no cut before the minimum"),
            }
        }
        // Noise before the mark may cut on its own first; the mark still cuts once MIN is reached.
        let mut d = noise(100_000);
        d.extend_from_slice(&CUT_MARK);
        assert_eq!(cuts(&d, 4096).last().copied(), Some(d.len()));
    }

    #[test]
    fn cuts_depend_on_the_bytes_only_and_keep_within_min_and_max() {
        let d = noise(3 << 20);
        let a = cuts(&d, 1 << 20);
        assert_eq!(a, cuts(&d, 4093), "how the bytes are handed in changes nothing");
        let mut last = 0;
        for c in &a {
            assert!((MIN as usize..=MAX as usize).contains(&(c - last)), "{}", c - last);
            last = *c;
        }
        // Content-defined: bytes inserted at the front shift the cuts after them, not their places in the content.
        let mut e = noise(1000);
        e.extend_from_slice(&d);
        let b: Vec<usize> = cuts(&e, 1 << 20).into_iter().map(|c| c - 1000).collect();
        assert!(a.iter().filter(|c| b.contains(c)).count() >= a.len() - 3, "resynchronised after an insertion");
        assert_eq!(discriminator(MIN, AVG, MAX), 49535);
    }

    #[test]
    fn an_index_reads_back_and_a_bad_one_is_refused() {
        let e = vec![Entry { end: 20_000, id: [1; 32] }, Entry { end: 30_000, id: [2; 32] }];
        let b = index_bytes(&e);
        assert_eq!(parse_index(&b).unwrap(), e);
        let mut bad = b.clone();
        bad[64..72].copy_from_slice(&40_000u64.to_le_bytes());
        assert!(parse_index(&bad).is_err(), "offsets must grow");
        let big = index_bytes(&[Entry { end: MAX + 1, id: [0; 32] }, Entry { end: MAX + 20_000, id: [0; 32] }]);
        assert!(parse_index(&big).is_err(), "oversized chunk");
        assert!(parse_index(&b[..b.len() - 1]).is_err());
    }

    fn index_of(data: &[u8]) -> Vec<Entry> {
        let mut v = Vec::new();
        for_each_chunk(data, |c, end| {
            v.push(Entry { end, id: chunk_id(c) });
            Ok(())
        })
        .unwrap();
        v
    }

    fn file_with(data: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, data).unwrap();
        f
    }

    #[test]
    fn seed_offsets_read_back_and_hostile_ones_are_refused() {
        let old = noise(1 << 20);
        let mut new = noise(200_000);
        new.extend_from_slice(&old);
        let (ni, oi) = (index_of(&new), index_of(&old));
        let b = seed_offsets(&ni, &oi);
        let at = parse_seed_offsets(&b, &ni).unwrap();
        // Every chunk found is where the old blob has it (its bytes equal), negative shifts included.
        let mut start = 0u64;
        let mut found = 0;
        for (e, a) in ni.iter().zip(&at) {
            if let Some(a) = a {
                assert_eq!(&old[*a as usize..(*a + e.end - start) as usize], &new[start as usize..e.end as usize]);
                found += 1;
            }
            start = e.end;
        }
        assert!(found >= ni.len() - 5, "{found} of {}", ni.len());
        assert!(b.len() < ni.len() * 3, "{} bytes for {} chunks", b.len(), ni.len());
        // Too short, too long, overflowing, before the blob, a bomb: refused.
        let raw = zstd::bulk::decompress(&b, 1 << 20).unwrap();
        let z = |r: &[u8]| zstd::bulk::compress(r, 3).unwrap();
        assert!(parse_seed_offsets(&z(&raw[..raw.len() - 1]), &ni).is_err());
        assert!(parse_seed_offsets(&z(&[&raw[..], &[0]].concat()), &ni).is_err());
        assert!(parse_seed_offsets(&z(&[0xff; 11]), &ni[..1]).is_err());
        assert!(parse_seed_offsets(&z(&[2]), &ni[..1]).is_err(), "offset -1");
        assert!(parse_seed_offsets(&z(&vec![0u8; 100 << 20]), &ni).is_err());
        assert!(parse_seed_offsets(b"not zstd", &ni).is_err());
    }

    #[test]
    fn assembly_takes_seeds_first_checks_every_chunk_and_resumes() {
        let old = noise(2 << 20);
        let mut new = old.clone();
        new[700_000..700_100].copy_from_slice(&[7; 100]);
        new.extend_from_slice(&noise(300_000)[..]);
        let idx = index_of(&new);
        let store = tempfile::tempdir().unwrap();
        let mut seeds = Seeds::default();
        seeds.add("old", file_with(&old), 0, old.len() as u64).unwrap();
        // Only what the seed lacks goes into the store.
        let mut start = 0;
        for e in &idx {
            if !seeds.has(&e.id) {
                store_chunk(store.path(), e, &new[start as usize..e.end as usize]).unwrap();
            }
            start = e.end;
        }
        let out = tempfile::tempfile().unwrap();
        let (a, d) = assemble(&idx, &seeds, store.path(), &out).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut &out, &mut got).unwrap();
        assert!(got == new, "assembled bytes differ");
        assert_eq!(d, crate::base::hash::Digest::of_bytes(&new));
        assert!(a.from_seeds > 0 && a.from_store > 0 && a.from_store < 8, "{a:?}");
        // The seed offered by where the new chunks lie in it (a delta's seed offsets) instead of
        // chunked: the same result, nothing scanned.
        let at = parse_seed_offsets(&seed_offsets(&idx, &index_of(&old)), &idx).unwrap();
        assert_eq!(at.iter().filter(|a| a.is_some()).count(), idx.iter().filter(|e| seeds.has(&e.id)).count());
        let mut placed = Seeds::default();
        placed.add_at("old", file_with(&old), 0, &idx, &at);
        let out = tempfile::tempfile().unwrap();
        assert_eq!(assemble(&idx, &placed, store.path(), &out).unwrap(), (a.clone(), d.clone()));
        // Offsets that are not the file's (here: one byte off) offer chunks that fail their id
        // check: none is taken from it, and the store alone lacks them.
        let mut wrong = Seeds::default();
        wrong.add_at("old", file_with(&old), 1, &idx, &at);
        let out = tempfile::tempfile().unwrap();
        assert!(assemble(&idx, &wrong, store.path(), &out).is_err(), "a chunk the seed does not hold where its index says must not be taken");
        // Interrupted after 10 chunks (and with half of the 11th written): a rerun redoes only the rest.
        let out = tempfile::tempfile().unwrap();
        out.set_len(0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&out, &new[..(idx[10].end + 5000) as usize], 0).unwrap();
        let (a, d) = assemble(&idx, &seeds, store.path(), &out).unwrap();
        assert_eq!(a.resumed, 11, "{a:?}");
        assert_eq!(d, crate::base::hash::Digest::of_bytes(&new), "resumed chunks are hashed too");
        // Without the seed, the store alone lacks chunks: refused with the chunk named.
        let out = tempfile::tempfile().unwrap();
        let e = assemble(&idx, &Seeds::default(), store.path(), &out).unwrap_err().to_string();
        assert!(e.contains("neither in a seed nor in the store"), "{e}");
        // A store chunk whose bytes are not its id's is refused, whatever the seed says.
        let starts: Vec<u64> = std::iter::once(0).chain(idx.iter().map(|e| e.end)).collect();
        let v = idx.iter().position(|e| !seeds.has(&e.id)).unwrap();
        let p = chunk_path(store.path(), &idx[v].hex());
        std::fs::write(&p, zstd::bulk::compress(&[0u8; 1000], 3).unwrap()).unwrap();
        let out = tempfile::tempfile().unwrap();
        let e = assemble(&idx, &seeds, store.path(), &out).unwrap_err().to_string();
        assert!(e.contains("does not match its id"), "{e}");
        std::fs::remove_file(&p).unwrap();
        store_chunk(store.path(), &idx[v], &new[starts[v] as usize..idx[v].end as usize]).unwrap();
        // A seed that changed after it was scanned is not trusted: its chunk is read from the store or refused.
        let seed_file = file_with(&old);
        let mut seeds = Seeds::default();
        seeds.add("old", seed_file.try_clone().unwrap(), 0, old.len() as u64).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&seed_file, &[0xff; 4096], 0).unwrap();
        let out = tempfile::tempfile().unwrap();
        assert!(assemble(&idx, &seeds, store.path(), &out).is_err(), "a seed changed under the assembly must not be written");
    }
}
