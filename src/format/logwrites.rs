//! dm-log-writes logs — what the kernel's dm-log-writes target and QEMU's `blklogwrites` block
//! driver record: every write, flush, FUA write and discard a disk saw, in order. The groundwork
//! of crash-state replay: parse the log (headers only, data is sought over), then rebuild the disk
//! as a power cut would have left it by applying a chosen subset of the writes onto a copy of the
//! disk as it was before the log began — every write up to a flush, or a prefix or any subset of
//! the writes since the last flush (what a volatile write cache may have persisted).
//!
//! Format (little-endian; measured against QEMU 7.2's blklogwrites with qemu-io): sector 0 of the
//! log holds the super block `{u64 magic = 0x6a736677736872, u64 version = 1, u64 nr_entries,
//! u32 sector_size}`; entries follow from sector 1, each one sector holding `{u64 sector,
//! u64 nr_sectors, u64 flags, u64 data_len}` (zero-padded; a mark's name in the same sector after
//! the header), then `nr_sectors` sectors of data for a write (zeros for a write-zeroes request),
//! none for a flush, a discard or a mark. Sectors are `sector_size` bytes (512 by default).

use anyhow::{bail, Context};
use std::io::{Read, Seek, SeekFrom, Write};

pub const MAGIC: u64 = 0x6a73_6677_7368_72;
pub const VERSION: u64 = 1;
pub const FLUSH: u64 = 1 << 0;
pub const FUA: u64 = 1 << 1;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;
pub const METADATA: u64 = 1 << 4;

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// First sector written (in `sector_size` units).
    pub sector: u64,
    pub sectors: u64,
    pub flags: u64,
    /// Where the data starts in the log (bytes); meaningful for writes only.
    pub data_at: u64,
    /// A mark's name.
    pub mark: Option<String>,
}

impl Entry {
    pub fn is_flush(&self) -> bool {
        self.flags & FLUSH != 0
    }
    /// A write that carries data in the log.
    pub fn is_write(&self) -> bool {
        self.sectors > 0 && self.flags & (DISCARD | MARK) == 0
    }
}

#[derive(Debug, Clone)]
pub struct Log {
    pub sector_size: u64,
    pub entries: Vec<Entry>,
}

impl Log {
    /// Indices of the flush entries: the points where everything before is on stable storage.
    pub fn flushes(&self) -> Vec<usize> {
        self.entries.iter().enumerate().filter(|(_, e)| e.is_flush()).map(|(i, _)| i).collect()
    }
    /// Writes (count) and bytes of write data.
    pub fn write_stats(&self) -> (usize, u64) {
        let w = self.entries.iter().filter(|e| e.is_write());
        (w.clone().count(), w.map(|e| e.sectors * self.sector_size).sum())
    }
}

/// Read the super block and every entry header of a log.
pub fn parse(mut r: impl Read + Seek) -> anyhow::Result<Log> {
    let mut sb = [0u8; 28];
    r.read_exact(&mut sb).context("reading the log's super block")?;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    if u64_at(&sb, 0) != MAGIC {
        bail!("not a dm-log-writes log (magic {:#x})", u64_at(&sb, 0));
    }
    if u64_at(&sb, 8) != VERSION {
        bail!("dm-log-writes log version {} (this reader knows {VERSION})", u64_at(&sb, 8));
    }
    let n = u64_at(&sb, 16);
    let ss = u32::from_le_bytes(sb[24..28].try_into().unwrap()) as u64;
    if !(512..=65536).contains(&ss) || !ss.is_power_of_two() {
        bail!("dm-log-writes log sector size {ss} is not a power of two from 512 to 65536");
    }
    let len = r.seek(SeekFrom::End(0))?;
    let mut at = ss;
    let mut entries = Vec::with_capacity(n.min(1 << 20) as usize);
    let mut h = vec![0u8; ss as usize];
    for i in 0..n {
        if at + ss > len {
            bail!("entry {i} of {n}: the log ends at byte {len}");
        }
        r.seek(SeekFrom::Start(at))?;
        r.read_exact(&mut h)?;
        let (sector, sectors, flags, data_len) = (u64_at(&h, 0), u64_at(&h, 8), u64_at(&h, 16), u64_at(&h, 24));
        let mark = (flags & MARK != 0).then(|| String::from_utf8_lossy(&h[32..(32 + data_len as usize).min(h.len())]).into_owned());
        let e = Entry { sector, sectors, flags, data_at: at + ss, mark };
        at += ss;
        if e.is_write() {
            at += sectors.checked_mul(ss).context("entry size overflows")?;
            if at > len {
                bail!("entry {i} of {n}: its {sectors} sectors of data run past the log's end");
            }
        }
        entries.push(e);
    }
    Ok(Log { sector_size: ss, entries })
}

/// Apply `which` entries of `log` (indices, in log order) to `disk`: each write's data copied from
/// the log to its sector, a discard as zeros, flushes and marks ignored. Streams in chunks.
pub fn apply(log: &Log, mut log_file: impl Read + Seek, mut disk: impl Write + Seek, which: impl IntoIterator<Item = usize>) -> anyhow::Result<u64> {
    let mut written = 0;
    for i in which {
        let e = log.entries.get(i).with_context(|| format!("no entry {i} in the log"))?;
        written += apply_sectors(log, &mut log_file, &mut disk, i, e.sectors)?;
    }
    Ok(written)
}

/// Apply the first `sectors` sectors of entry `i` only: a write torn by a power cut (a disk
/// persists whole sectors, not whole requests). Returns the bytes written.
pub fn apply_sectors(log: &Log, mut log_file: impl Read + Seek, mut disk: impl Write + Seek, i: usize, sectors: u64) -> anyhow::Result<u64> {
    let e = log.entries.get(i).with_context(|| format!("no entry {i} in the log"))?;
    if e.sectors == 0 || e.flags & MARK != 0 {
        return Ok(0);
    }
    let n = sectors.min(e.sectors);
    let mut buf = vec![0u8; (n * log.sector_size).min(1 << 20) as usize];
    let mut left = n * log.sector_size;
    disk.seek(SeekFrom::Start(e.sector * log.sector_size))?;
    if e.flags & DISCARD != 0 {
        buf.fill(0);
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            disk.write_all(&buf[..k])?;
            left -= k as u64;
        }
    } else {
        log_file.seek(SeekFrom::Start(e.data_at))?;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            log_file.read_exact(&mut buf[..k])?;
            disk.write_all(&buf[..k])?;
            left -= k as u64;
        }
    }
    Ok(n * log.sector_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A log in the format above, built by hand: a write, a flush, a discard, a mark, a write.
    fn sample() -> Vec<u8> {
        let ss = 512usize;
        let mut v = vec![0u8; ss];
        v[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        v[8..16].copy_from_slice(&1u64.to_le_bytes());
        v[16..24].copy_from_slice(&5u64.to_le_bytes());
        v[24..28].copy_from_slice(&512u32.to_le_bytes());
        let entry = |v: &mut Vec<u8>, sector: u64, n: u64, flags: u64, data: &[u8]| {
            let mut h = vec![0u8; ss];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&n.to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            if flags & MARK != 0 {
                h[24..32].copy_from_slice(&(data.len() as u64).to_le_bytes());
                h[32..32 + data.len()].copy_from_slice(data);
            }
            v.extend_from_slice(&h);
            if flags & (MARK | DISCARD) == 0 {
                v.extend_from_slice(data);
            }
        };
        entry(&mut v, 2, 2, 0, &[0xab; 1024]);
        entry(&mut v, 0, 0, FLUSH, &[]);
        entry(&mut v, 3, 1, DISCARD, &[]);
        entry(&mut v, 0, 0, MARK, b"apply-start");
        entry(&mut v, 0, 1, FUA, &[0xcd; 512]);
        v
    }

    #[test]
    fn parses_entries_flushes_and_marks() {
        let log = parse(Cursor::new(sample())).unwrap();
        assert_eq!(log.entries.len(), 5);
        assert_eq!(log.flushes(), vec![1]);
        assert_eq!(log.entries[3].mark.as_deref(), Some("apply-start"));
        assert_eq!(log.write_stats(), (2, 1536));
        assert_eq!(log.entries[4].data_at, 512 * 8, "super, write header + 2 data sectors, flush, discard, mark, the last write's header");
    }

    #[test]
    fn replays_any_subset_onto_the_disk_before() {
        let raw = sample();
        let log = parse(Cursor::new(raw.clone())).unwrap();
        let mut disk = Cursor::new(vec![0x11u8; 4096]);
        apply(&log, Cursor::new(raw.clone()), &mut disk, 0..2).unwrap();
        let d = disk.get_ref();
        assert!(d[1024..2048].iter().all(|b| *b == 0xab) && d[..1024].iter().all(|b| *b == 0x11));
        apply(&log, Cursor::new(raw.clone()), &mut disk, 2..5).unwrap();
        let d = disk.get_ref();
        assert!(d[1536..2048].iter().all(|b| *b == 0), "discarded → zeros");
        assert!(d[..512].iter().all(|b| *b == 0xcd));
        // Only the last write (a cache that kept it and lost the first).
        let mut disk = Cursor::new(vec![0x11u8; 4096]);
        apply(&log, Cursor::new(raw.clone()), &mut disk, [4]).unwrap();
        assert!(disk.get_ref()[1024..2048].iter().all(|b| *b == 0x11));
        // The first write torn after one of its two sectors.
        let mut disk = Cursor::new(vec![0x11u8; 4096]);
        assert_eq!(apply_sectors(&log, Cursor::new(raw), &mut disk, 0, 1).unwrap(), 512);
        let d = disk.get_ref();
        assert!(d[1024..1536].iter().all(|b| *b == 0xab) && d[1536..2048].iter().all(|b| *b == 0x11));
    }

    #[test]
    fn refuses_what_is_not_a_log_or_is_cut_short() {
        assert!(parse(Cursor::new(vec![0u8; 1024])).unwrap_err().to_string().contains("not a dm-log-writes log"));
        let mut cut = sample();
        cut.truncate(512 * 2 + 100);
        assert!(parse(Cursor::new(cut)).is_err());
    }
}
