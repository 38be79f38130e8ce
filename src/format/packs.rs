//! Chunk packs: how a release's casync chunks travel through an OCI registry, which stores blobs,
//! not millions of small files. A push finds which of the rootfs's chunks are already in packs of
//! the releases the repository holds and points at them there; the chunks no earlier release has
//! go, in index order, into new packs of about 4 MiB. So a push uploads only new chunks, and a
//! device one release behind fetches one range request per 4 MiB of new chunks. The pack table
//! says where each chunk is (any pack the release lists, at any offset). Format:
//! docs/upgrade-protocol.md#releases-in-a-registry.

use crate::base::hash::Digest;
use crate::format::casync::Entry;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The pack table's media type (a layer of the release manifest, its bytes inline).
pub const MT_PACK_TABLE: &str = "application/vnd.slotforge.chunk-packs.v2+json";
/// The first format's table (packs covering consecutive stretches of the index), still read.
pub const MT_PACK_TABLE_V1: &str = "application/vnd.slotforge.chunk-packs.v1+json";
/// Whether a layer of this media type is a pack table (either format).
pub fn is_table(media_type: &str) -> bool {
    media_type == MT_PACK_TABLE || media_type == MT_PACK_TABLE_V1
}

/// A pack's media type.
pub const MT_PACK: &str = "application/vnd.slotforge.chunk-pack.v1";
/// New chunks go into one pack until it holds this many compressed bytes.
pub const PACK_TARGET: u64 = 4 << 20;
/// A known pack the release would take at most this many bytes from — and less than half of
/// it — is not worth a request of its own to a device that lacks them: its chunks are packed
/// anew instead (uploaded again).
pub const MIN_REUSE: u64 = 256 << 10;

/// Where each chunk of an index is, in which pack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackTable {
    pub packs: Vec<Pack>,
    /// Per chunk of the index, in order: `[pack, offset, length]` of its compressed bytes.
    pub chunks: Vec<[u64; 3]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pack {
    pub digest: Digest,
    pub size: u64,
}

/// Where one chunk's compressed bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: usize,
    pub offset: u64,
    pub len: u64,
}

/// The first format: packs cover consecutive stretches of the index (`chunks` of them each), a
/// chunk's `lengths` entry 0 where its id came earlier.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableV1 {
    packs: Vec<PackV1>,
    lengths: Vec<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackV1 {
    digest: Digest,
    size: u64,
    chunks: usize,
}

impl PackTable {
    /// Parse and check a table (either format) against the index it is for: one location per
    /// chunk, each inside a pack the table lists and no longer than a compressed chunk can be.
    /// The bytes there are checked against the chunk's id when they are read.
    pub fn parse(bytes: &[u8], index: &[Entry]) -> anyhow::Result<(Self, Vec<Location>)> {
        let t = match serde_json::from_slice::<PackTable>(bytes) {
            Ok(t) => t,
            Err(e) => match serde_json::from_slice::<TableV1>(bytes) {
                Ok(v1) => from_v1(v1, index)?,
                Err(_) => return Err(anyhow::Error::new(e).context("pack table")),
            },
        };
        if t.chunks.len() != index.len() {
            bail!("pack table: {} chunks for an index of {} chunks", t.chunks.len(), index.len());
        }
        let mut locs = Vec::with_capacity(index.len());
        for (i, &[p, offset, len]) in t.chunks.iter().enumerate() {
            let pack = t.packs.get(p as usize).with_context(|| format!("pack table: chunk {i} is in pack {p}, which the table does not list"))?;
            if len == 0 || len > 2 * crate::format::casync::MAX || offset.checked_add(len).is_none_or(|e| e > pack.size) {
                bail!("pack table: chunk {i} ({len} bytes at {offset}) does not fit pack {p} ({} bytes)", pack.size);
            }
            locs.push(Location { pack: p as usize, offset, len });
        }
        Ok((t, locs))
    }
}

/// A first-format table as locations.
fn from_v1(t: TableV1, index: &[Entry]) -> anyhow::Result<PackTable> {
    if t.lengths.len() != index.len() || t.packs.iter().map(|p| p.chunks).sum::<usize>() != index.len() {
        bail!("pack table: {} lengths in {} packs for an index of {} chunks", t.lengths.len(), t.packs.len(), index.len());
    }
    let mut first = HashMap::new();
    let mut chunks = Vec::with_capacity(index.len());
    let mut i = 0;
    for (p, pack) in t.packs.iter().enumerate() {
        let mut offset = 0u64;
        for _ in 0..pack.chunks {
            let (e, len) = (&index[i], t.lengths[i]);
            let loc = if len == 0 {
                *first.get(&e.id).with_context(|| format!("pack table: chunk {i} is said to come earlier, but its id does not"))?
            } else {
                let l = [p as u64, offset, len];
                offset = offset.checked_add(len).filter(|o| *o <= pack.size).with_context(|| format!("pack table: chunk {i} runs past pack {p}"))?;
                first.entry(e.id).or_insert(l);
                l
            };
            chunks.push(loc);
            i += 1;
        }
    }
    Ok(PackTable { packs: t.packs.into_iter().map(|p| Pack { digest: p.digest, size: p.size }).collect(), chunks })
}

/// Chunks already in a registry's packs: those of the releases a push found there.
#[derive(Default)]
pub struct Known {
    packs: Vec<Pack>,
    by_digest: HashMap<Digest, usize>,
    at: HashMap<[u8; 32], Vec<Location>>,
}

impl Known {
    /// Add a release's table (checked against its index) to what is known.
    pub fn add(&mut self, table: &[u8], index: &[Entry]) -> anyhow::Result<()> {
        let (t, locs) = PackTable::parse(table, index)?;
        for (e, l) in index.iter().zip(locs) {
            let p = &t.packs[l.pack];
            let k = *self.by_digest.entry(p.digest.clone()).or_insert_with(|| {
                self.packs.push(p.clone());
                self.packs.len() - 1
            });
            let at = self.at.entry(e.id).or_default();
            let l = Location { pack: k, ..l };
            if !at.contains(&l) {
                at.push(l);
            }
        }
        Ok(())
    }
}

/// A release's tables (one per index), and how many of their packs are new.
pub struct Packed {
    pub tables: Vec<PackTable>,
    pub new_packs: usize,
    /// Distinct chunks found in known packs, and those packed anew.
    pub reused: usize,
    pub fresh: usize,
}

/// The tables for `indexes` (the rootfs's, then the sealed images'): a chunk `known` holds is
/// pointed at where it is (in the known pack that holds the most of the release's chunks, so a
/// device fetches from few packs); the others, once each, in order, are packed anew —
/// `compressed(k, i)` gives chunk `i` of index `k` compressed, `write(pack)` stores a new pack
/// and returns its digest, a pack is closed once it holds [`PACK_TARGET`] bytes — so the new
/// chunks of every index share packs. A known pack the release would take at most `min_reuse`
/// bytes from is passed over: its chunks are packed anew (a device one release behind would
/// otherwise spend a request on a release it skipped). `on_chunk(done, total)` counts the new
/// chunks.
pub fn pack(indexes: &[&[Entry]], known: &Known, min_reuse: u64, mut compressed: impl FnMut(usize, usize) -> anyhow::Result<Vec<u8>>, mut write: impl FnMut(&[u8]) -> anyhow::Result<Digest>, mut on_chunk: impl FnMut(usize, usize)) -> anyhow::Result<Packed> {
    #[derive(Clone, Copy)]
    enum Place {
        Known(Location),
        Fresh(Location),
    }
    // How many of the release's distinct chunks each known pack holds.
    let mut cover: HashMap<usize, usize> = HashMap::new();
    let mut firsts = Vec::new();
    let mut place: HashMap<[u8; 32], Option<Place>> = HashMap::new();
    for (k, index) in indexes.iter().enumerate() {
        for (i, e) in index.iter().enumerate() {
            if place.insert(e.id, None).is_none() {
                firsts.push((k, i));
                for l in known.at.get(&e.id).into_iter().flatten() {
                    *cover.entry(l.pack).or_default() += 1;
                }
            }
        }
    }
    // Each known chunk's best place; the bytes the release would take from each known pack.
    let mut best: HashMap<[u8; 32], Location> = HashMap::new();
    let mut used: HashMap<usize, u64> = HashMap::new();
    for &(k, i) in &firsts {
        let id = indexes[k][i].id;
        if let Some(cands) = known.at.get(&id) {
            let l = *cands.iter().max_by_key(|l| (cover[&l.pack], std::cmp::Reverse(l.pack))).expect("a known chunk has a place");
            *used.entry(l.pack).or_default() += l.len;
            best.insert(id, l);
        }
    }
    best.retain(|_, l| used[&l.pack] > min_reuse || used[&l.pack] * 2 >= known.packs[l.pack].size);
    let fresh: Vec<(usize, usize)> = firsts.iter().copied().filter(|&(k, i)| !best.contains_key(&indexes[k][i].id)).collect();
    let (mut buf, mut fresh_packs) = (Vec::new(), Vec::<(Digest, u64)>::new());
    for (n, &(k, i)) in fresh.iter().enumerate() {
        let c = compressed(k, i)?;
        place.insert(indexes[k][i].id, Some(Place::Fresh(Location { pack: fresh_packs.len(), offset: buf.len() as u64, len: c.len() as u64 })));
        buf.extend_from_slice(&c);
        if buf.len() as u64 >= PACK_TARGET || n + 1 == fresh.len() {
            fresh_packs.push((write(&buf)?, buf.len() as u64));
            buf.clear();
        }
        on_chunk(n + 1, fresh.len());
    }
    for (id, l) in best {
        place.insert(id, Some(Place::Known(l)));
    }
    // Each table's packs in the order its index first uses them.
    let tables = indexes
        .iter()
        .map(|index| {
            let mut t = PackTable { packs: Vec::new(), chunks: Vec::with_capacity(index.len()) };
            let (mut known_no, mut fresh_no) = (HashMap::new(), HashMap::new());
            for e in index.iter() {
                let (l, no) = match place[&e.id].expect("every chunk placed") {
                    Place::Known(l) => (l, *known_no.entry(l.pack).or_insert_with(|| {
                        t.packs.push(known.packs[l.pack].clone());
                        t.packs.len() - 1
                    })),
                    Place::Fresh(l) => (l, *fresh_no.entry(l.pack).or_insert_with(|| {
                        let (digest, size) = fresh_packs[l.pack].clone();
                        t.packs.push(Pack { digest, size });
                        t.packs.len() - 1
                    })),
                };
                t.chunks.push([no as u64, l.offset, l.len]);
            }
            t
        })
        .collect();
    Ok(Packed { tables, new_packs: fresh_packs.len(), reused: firsts.len() - fresh.len(), fresh: fresh.len() })
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

    /// Pack `idx` against `known`, chunk `i` compressing to `i+10` bytes of `i`.
    fn packed(idx: &[Entry], known: &Known, packs: &mut Vec<Vec<u8>>) -> (Packed, PackTable) {
        let p = pack(&[idx], known, 0, |_, i| Ok(vec![idx[i].id[0]; 10 + i]), |b| {
            packs.push(b.to_vec());
            Ok(Digest::of_bytes(b))
        }, |_, _| {})
        .unwrap();
        let t = p.tables[0].clone();
        (p, t)
    }

    #[test]
    fn new_chunks_go_into_new_packs_and_known_ones_are_pointed_at_where_they_are() {
        // A first release: everything new, one pack (far under 4 MiB); a repeated id stored once.
        let v1 = index(&[1, 2, 3, 2, 4]);
        let mut packs = Vec::new();
        let (p1, t1) = packed(&v1, &Known::default(), &mut packs);
        assert_eq!((p1.new_packs, p1.fresh, p1.reused), (1, 4, 0));
        assert_eq!(t1.chunks, vec![[0, 0, 10], [0, 10, 11], [0, 21, 12], [0, 10, 11], [0, 33, 14]]);
        let bytes = serde_json::to_vec(&t1).unwrap();
        let (_, locs) = PackTable::parse(&bytes, &v1).unwrap();
        assert_eq!((locs[1], locs[2]), (Location { pack: 0, offset: 10, len: 11 }, Location { pack: 0, offset: 21, len: 12 }));
        // The next release changes chunk 3 and adds one: only those two are packed, after the
        // known pack in the table; the known chunks keep their places.
        let mut known = Known::default();
        known.add(&bytes, &v1).unwrap();
        let v2 = index(&[1, 2, 9, 2, 4, 8]);
        let (p2, t2) = packed(&v2, &known, &mut packs);
        assert_eq!((p2.new_packs, p2.fresh, p2.reused), (1, 2, 3));
        assert_eq!(t2.packs[0], t1.packs[0]);
        assert_eq!(t2.chunks, vec![[0, 0, 10], [0, 10, 11], [1, 0, 12], [0, 10, 11], [0, 33, 14], [1, 12, 15]]);
        assert_eq!(packs[1], [vec![9u8; 12], vec![8u8; 15]].concat());
        // Pushed again: nothing new.
        known.add(&serde_json::to_vec(&t2).unwrap(), &v2).unwrap();
        let (p3, t3) = packed(&v2, &known, &mut packs);
        assert_eq!((p3.new_packs, t3.chunks.clone()), (0, t2.chunks.clone()));
    }

    #[test]
    fn the_new_chunks_of_several_indexes_share_packs_each_table_listing_its_own() {
        let (rootfs, sealed) = (index(&[1, 2]), index(&[2, 3]));
        let p = pack(&[&rootfs, &sealed], &Known::default(), 0, |k, i| Ok(vec![k as u8; 10 + i]), |b| Ok(Digest::of_bytes(b)), |_, _| {}).unwrap();
        assert_eq!((p.new_packs, p.fresh), (1, 3), "chunk 2 stored once, all in one pack");
        assert_eq!(p.tables[0].chunks, vec![[0, 0, 10], [0, 10, 11]]);
        assert_eq!(p.tables[1].chunks, vec![[0, 10, 11], [0, 21, 11]]);
        assert_eq!(p.tables[0].packs, p.tables[1].packs);
    }

    #[test]
    fn a_chunk_in_several_known_packs_is_taken_from_the_one_holding_most_of_the_release() {
        let mut known = Known::default();
        let a = PackTable { packs: vec![Pack { digest: Digest::of_bytes(b"a"), size: 100 }], chunks: vec![[0, 0, 10]] };
        let b = PackTable { packs: vec![Pack { digest: Digest::of_bytes(b"b"), size: 100 }], chunks: vec![[0, 0, 10], [0, 10, 10], [0, 20, 10]] };
        known.add(&serde_json::to_vec(&a).unwrap(), &index(&[1])).unwrap();
        known.add(&serde_json::to_vec(&b).unwrap(), &index(&[2, 1, 3])).unwrap();
        let (_, t) = packed(&index(&[1, 3]), &known, &mut Vec::new());
        assert_eq!(t.packs, b.packs);
        assert_eq!(t.chunks, vec![[0, 10, 10], [0, 20, 10]]);
    }

    #[test]
    fn a_known_pack_the_release_takes_little_from_is_passed_over() {
        // v1's pack holds 1, 2, 3; a's pack holds 4 (a release the device may have skipped).
        let mut known = Known::default();
        let t = |d: &[u8], chunks: Vec<[u64; 3]>| serde_json::to_vec(&PackTable { packs: vec![Pack { digest: Digest::of_bytes(d), size: 300 }], chunks }).unwrap();
        known.add(&t(b"v1", vec![[0, 0, 100], [0, 100, 100], [0, 200, 100]]), &index(&[1, 2, 3])).unwrap();
        known.add(&t(b"a", vec![[0, 0, 100]]), &index(&[4])).unwrap();
        let b = index(&[1, 2, 4, 5]);
        let p = pack(&[&b], &known, 150, |_, i| Ok(vec![i as u8; 10]), |x| Ok(Digest::of_bytes(x)), |_, _| {}).unwrap();
        // 200 bytes from v1's pack: pointed at; 100 of a's 300: chunk 4 packed anew with 5.
        assert_eq!((p.reused, p.fresh, p.new_packs), (2, 2, 1));
        assert_eq!(p.tables[0].chunks, vec![[0, 0, 100], [0, 100, 100], [1, 0, 10], [1, 10, 10]]);
        assert_eq!(p.tables[0].packs[0].digest, Digest::of_bytes(b"v1"));
        // A small pack the release takes half of or more is still pointed at.
        let p = pack(&[&index(&[3, 6])], &known, 150, |_, i| Ok(vec![i as u8; 10]), |x| Ok(Digest::of_bytes(x)), |_, _| {}).unwrap();
        assert_eq!((p.reused, p.fresh), (0, 2), "100 of v1's 300 bytes: packed anew");
        known.add(&t(b"c", vec![[0, 0, 100], [0, 100, 100]]), &index(&[6, 7])).unwrap();
        let p = pack(&[&index(&[6, 7, 8])], &known, 250, |_, i| Ok(vec![i as u8; 10]), |x| Ok(Digest::of_bytes(x)), |_, _| {}).unwrap();
        assert_eq!((p.reused, p.fresh), (2, 1), "200 of c's 300 bytes: pointed at");
    }

    #[test]
    fn new_packs_close_at_the_target_size() {
        let idx: Vec<Entry> = (0..20u8).map(|i| Entry { end: (i as u64 + 1) * 100, id: [i; 32] }).collect();
        let mut n = 0;
        let p = pack(&[&idx], &Known::default(), 0, |_, _| Ok(vec![0u8; (PACK_TARGET / 8) as usize + 1]), |b| {
            n += 1;
            Ok(Digest::of_bytes(b))
        }, |_, _| {})
        .unwrap();
        // 8 chunks of just over an eighth fill a pack: 8 + 8 + 4.
        assert_eq!((p.new_packs, n), (3, 3));
        assert_eq!(p.tables[0].chunks.iter().filter(|c| c[0] == 2).count(), 4);
    }

    #[test]
    fn a_first_format_table_reads_as_locations_and_lies_are_refused() {
        let idx = index(&[1, 2, 1]);
        let d = Digest::of_bytes(b"p");
        let v1 = format!(r#"{{"packs":[{{"digest":"{d}","size":30,"chunks":3}}],"lengths":[10,20,0]}}"#);
        let (t, locs) = PackTable::parse(v1.as_bytes(), &idx).unwrap();
        assert_eq!(t.chunks, vec![[0, 0, 10], [0, 10, 20], [0, 0, 10]]);
        assert_eq!(locs[2], Location { pack: 0, offset: 0, len: 10 });
        let bad_v1 = format!(r#"{{"packs":[{{"digest":"{d}","size":30,"chunks":3}}],"lengths":[0,20,10]}}"#);
        assert!(PackTable::parse(bad_v1.as_bytes(), &idx).is_err(), "a repeat before its first");
        let ok = PackTable { packs: vec![Pack { digest: d, size: 30 }], chunks: vec![[0, 0, 10], [0, 10, 20], [0, 0, 10]] };
        for (i, bad) in [[0, 25, 10], [1, 0, 10], [0, 0, 0]].into_iter().enumerate() {
            let mut t = ok.clone();
            t.chunks[i] = bad;
            assert!(PackTable::parse(&serde_json::to_vec(&t).unwrap(), &idx).is_err(), "{bad:?}");
        }
        assert!(PackTable::parse(&serde_json::to_vec(&ok).unwrap(), &idx[..2]).is_err(), "a count off");
        assert!(PackTable::parse(br#"{"packs":[],"chunks":[],"x":1}"#, &[]).is_err(), "an unknown key");
    }
}
