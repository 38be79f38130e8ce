//! Chunk packs: how a release's casync chunks travel through an OCI registry, which stores blobs,
//! not millions of small files. Consecutive chunks of the rootfs index are grouped into packs
//! (blobs: the chunks' `.cacnk` files, one after the other) at content-defined points — after a
//! chunk whose id's first two bytes fall under a threshold — so an unchanged stretch of the image
//! gives the same pack, byte for byte, in every release: a push uploads only the packs the
//! registry lacks, and a device fetches only the ranges of packs holding chunks it lacks. The
//! pack table says where each chunk is. Format: docs/upgrade-protocol.md#releases-in-a-registry.

use crate::base::hash::Digest;
use crate::format::casync::Entry;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The pack table's media type (a layer of the release manifest, its bytes inline).
pub const MT_PACK_TABLE: &str = "application/vnd.slotforge.chunk-packs.v1+json";
/// A pack's media type.
pub const MT_PACK: &str = "application/vnd.slotforge.chunk-pack.v1";
/// A pack ends after a chunk whose id starts with a 16-bit number under this (1 in 64: about 4
/// MiB of 64 KiB chunks) ...
const CUT_BELOW: u16 = (65536 / 64) as u16;
/// ... or after this many chunks (at most 32 MiB of 256 KiB chunks).
const MAX_CHUNKS: usize = 128;

/// Where each chunk of an index is, in which pack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackTable {
    pub packs: Vec<Pack>,
    /// Per chunk of the index, in order: its compressed length in its pack, or 0 for a chunk
    /// whose id came earlier in the index (stored once, where it first came).
    pub lengths: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pack {
    pub digest: Digest,
    pub size: u64,
    /// How many chunks of the index, from where the previous pack's end, this pack covers.
    pub chunks: usize,
}

/// Where one chunk's compressed bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: usize,
    pub offset: u64,
    pub len: u64,
}

/// The index split into packs: the number of chunks of each, in order.
pub fn plan(index: &[Entry]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut n = 0;
    for (i, e) in index.iter().enumerate() {
        n += 1;
        if u16::from_be_bytes([e.id[0], e.id[1]]) < CUT_BELOW || n == MAX_CHUNKS || i + 1 == index.len() {
            out.push(n);
            n = 0;
        }
    }
    out
}

impl PackTable {
    /// Parse and check a table against the index it is for: one length per chunk, the packs
    /// covering exactly the index, every chunk inside its pack, a duplicate only after its first.
    pub fn parse(bytes: &[u8], index: &[Entry]) -> anyhow::Result<(Self, Vec<Location>)> {
        let t: PackTable = serde_json::from_slice(bytes).context("pack table")?;
        if t.lengths.len() != index.len() || t.packs.iter().map(|p| p.chunks).sum::<usize>() != index.len() {
            bail!("pack table: {} lengths in {} packs for an index of {} chunks", t.lengths.len(), t.packs.len(), index.len());
        }
        let locs = t.locate(index)?;
        Ok((t, locs))
    }

    /// Every chunk's location (a duplicate: where its id first came).
    fn locate(&self, index: &[Entry]) -> anyhow::Result<Vec<Location>> {
        let mut first = std::collections::HashMap::new();
        let mut out = Vec::with_capacity(index.len());
        let mut i = 0;
        for (p, pack) in self.packs.iter().enumerate() {
            let mut offset = 0u64;
            for _ in 0..pack.chunks {
                let (e, len) = (&index[i], self.lengths[i]);
                let loc = if len == 0 {
                    *first.get(&e.id).with_context(|| format!("pack table: chunk {i} is said to come earlier, but its id does not"))?
                } else {
                    let l = Location { pack: p, offset, len };
                    offset = offset.checked_add(len).filter(|o| *o <= pack.size).with_context(|| format!("pack table: chunk {i} runs past pack {p}"))?;
                    first.entry(e.id).or_insert(l);
                    l
                };
                out.push(loc);
                i += 1;
            }
        }
        Ok(out)
    }
}

/// Group `chunks` (index order, each with its compressed bytes; `None` for one whose id came
/// earlier) into packs as [`plan`] says, calling `write(pack bytes)` for each pack, which
/// returns its digest; returns the table.
pub fn pack(index: &[Entry], mut compressed: impl FnMut(usize) -> anyhow::Result<Option<Vec<u8>>>, mut write: impl FnMut(&[u8]) -> anyhow::Result<Digest>) -> anyhow::Result<PackTable> {
    let mut t = PackTable { packs: Vec::new(), lengths: Vec::with_capacity(index.len()) };
    let mut i = 0;
    for n in plan(index) {
        let mut buf = Vec::new();
        for _ in 0..n {
            match compressed(i)? {
                Some(c) => {
                    t.lengths.push(c.len() as u64);
                    buf.extend_from_slice(&c);
                }
                None => t.lengths.push(0),
            }
            i += 1;
        }
        let digest = write(&buf)?;
        t.packs.push(Pack { digest, size: buf.len() as u64, chunks: n });
    }
    Ok(t)
}

/// The byte ranges of packs to fetch for the chunks `want` (indexes into the index): per pack,
/// one range from the first wanted chunk's start to the last one's end — one request per pack.
pub fn ranges(locs: &[Location], want: impl IntoIterator<Item = usize>) -> Vec<(usize, u64, u64)> {
    let mut per: std::collections::BTreeMap<usize, (u64, u64)> = Default::default();
    for i in want {
        let l = locs[i];
        let r = per.entry(l.pack).or_insert((l.offset, l.offset + l.len));
        r.0 = r.0.min(l.offset);
        r.1 = r.1.max(l.offset + l.len);
    }
    per.into_iter().map(|(p, (a, b))| (p, a, b)).collect()
}

/// Copy every chunk the packs in `blobs` (a layout's `blobs/sha256/`) hold, as `table` places
/// them for `index`, into the casync store `store`, compressed as it is (the assembly checks
/// each chunk by its id when it reads it).
pub fn unpack(blobs: &std::path::Path, table: &[u8], index: &[Entry], store: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let (t, locs) = PackTable::parse(table, index)?;
    let packs: Vec<std::fs::File> = t.packs.iter().map(|p| std::fs::File::open(blobs.join(p.digest.hex())).with_context(|| format!("pack {} missing", p.digest))).collect::<anyhow::Result<_>>()?;
    for (e, l) in index.iter().zip(&locs) {
        let dest = crate::format::casync::chunk_path(store, &e.hex());
        // A compressed chunk is never much over its raw size (256 KiB at most).
        if dest.exists() || l.len > 2 * crate::format::casync::MAX {
            continue;
        }
        let mut buf = vec![0u8; l.len as usize];
        packs[l.pack].read_exact_at(&mut buf, l.offset)?;
        std::fs::create_dir_all(dest.parent().unwrap())?;
        std::fs::write(&dest, &buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(ids: &[u8]) -> Vec<Entry> {
        ids.iter().enumerate().map(|(i, b)| Entry { end: (i as u64 + 1) * 100, id: [*b; 32] }).collect()
    }

    #[test]
    fn packs_cut_by_content_and_a_table_locates_every_chunk() {
        // 0x00.. ids cut; 0xff.. ids do not: [ff ff 00] [ff 00] [ff]
        let idx = index(&[0xff, 0xff, 0x00, 0xff, 0x00, 0xff]);
        assert_eq!(plan(&idx), vec![3, 2, 1]);
        // The same stretch after an insertion packs the same way from the first cut on.
        let shifted = index(&[0x01, 0xff, 0xff, 0x00, 0xff, 0x00, 0xff]);
        assert_eq!(plan(&shifted), vec![1, 3, 2, 1]);
        // Chunk 3 (0xff) repeats an earlier id: stored once.
        let mut seen = std::collections::HashSet::new();
        let mut packs = Vec::new();
        let t = pack(&idx, |i| Ok(seen.insert(idx[i].id).then(|| vec![i as u8; 10 + i])), |b| {
            packs.push(b.to_vec());
            Ok(Digest::of_bytes(b))
        })
        .unwrap();
        assert_eq!(t.lengths, vec![10, 0, 12, 0, 0, 0]);
        let bytes = serde_json::to_vec(&t).unwrap();
        let (_, locs) = PackTable::parse(&bytes, &idx).unwrap();
        assert_eq!(locs[1], locs[0], "a repeated id is found where it first came");
        assert_eq!(locs[2], Location { pack: 0, offset: 10, len: 12 });
        assert_eq!(ranges(&locs, [1, 2]), vec![(0, 0, 22)]);
        // Lies are refused: a length past its pack, a duplicate before its first, a count off.
        let mut bad = t.clone();
        bad.lengths[2] = 1000;
        assert!(PackTable::parse(&serde_json::to_vec(&bad).unwrap(), &idx).is_err());
        let mut bad = t.clone();
        bad.lengths[0] = 0;
        assert!(PackTable::parse(&serde_json::to_vec(&bad).unwrap(), &idx).is_err());
        assert!(PackTable::parse(&bytes, &idx[..5]).is_err());
        assert!(PackTable::parse(br#"{"packs":[],"lengths":[],"x":1}"#, &[]).is_err());
    }
}
