//! Raw FAT32 structures under the ESP: boot-sector geometry, cluster chains, the fix-up of what
//! fatfs 0.3.6 writes (`fix_dot_entries`, measured clean with fsck.vfat), and the consistency
//! check every ESP read from outside passes before fatfs mounts it (`check_volume`): fatfs
//! follows chains and directories as it finds them, so a looping chain or a directory that
//! contains itself made `inspect` balloon and `upgrade` hang.

use anyhow::bail;
use std::io::{Read, Seek, SeekFrom, Write};

/// FAT32 geometry from the boot sector.
struct Geometry {
    fats: u64,
    total_bytes: u64,
    fsinfo_sector: u64,
    bps: u64,
    spc: u64,
    fat_start: u64,
    data_start: u64,
    root_cluster: u32,
}

fn geometry(dev: &mut (impl Read + Seek)) -> anyhow::Result<Geometry> {
    let mut bs = [0u8; 512];
    dev.seek(SeekFrom::Start(0))?;
    dev.read_exact(&mut bs)?;
    let u16at = |o: usize| u16::from_le_bytes([bs[o], bs[o + 1]]) as u64;
    let u32at = |o: usize| u32::from_le_bytes(bs[o..o + 4].try_into().unwrap());
    if bs[510] != 0x55 || bs[511] != 0xAA {
        bail!("not a FAT boot sector (no 55 AA signature)");
    }
    let (bps, spc, reserved, fats) = (u16at(11), bs[13] as u64, u16at(14), bs[16] as u64);
    let fat_size = u32at(36) as u64;
    if u16at(22) != 0 || fat_size == 0 || bps == 0 || spc == 0 {
        bail!("not a FAT32 volume");
    }
    let total_sectors = if u16at(19) != 0 { u16at(19) } else { u32at(32) as u64 };
    Ok(Geometry { fats, total_bytes: total_sectors * bps, fsinfo_sector: u16at(48), bps, spc, fat_start: reserved * bps, data_start: (reserved + fats * fat_size) * bps, root_cluster: u32at(44) })
}

const DIRENT: usize = 32;
const ATTR_DIR: u8 = 0x10;
const ATTR_LFN: u8 = 0x0F;
const ATTR_VOLUME: u8 = 0x08;
const DELETED: u8 = 0xE5;
const DOT: &[u8; 11] = b".          ";
const DOTDOT: &[u8; 11] = b"..         ";

/// The live short entries of one directory cluster: up to the end marker, without deleted,
/// long-name and volume-label entries (`.` and `..` included; callers skip them as they need).
fn live_entries(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    buf.chunks(DIRENT).take_while(|e| e[0] != 0).filter(|e| e[0] != DELETED && e[11] != ATTR_LFN && e[11] & ATTR_VOLUME == 0)
}

impl Geometry {
    fn read_cluster(&self, dev: &mut (impl Read + Seek), c: u32) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.cluster_bytes()];
        dev.seek(SeekFrom::Start(self.cluster_offset(c)))?;
        dev.read_exact(&mut buf)?;
        Ok(buf)
    }
    fn cluster_offset(&self, c: u32) -> u64 {
        self.data_start + (c as u64 - 2) * self.spc * self.bps
    }
    fn cluster_bytes(&self) -> usize {
        (self.spc * self.bps) as usize
    }
    fn chain(&self, dev: &mut (impl Read + Seek), first: u32) -> anyhow::Result<Vec<u32>> {
        let mut out = vec![first];
        let mut c = first;
        loop {
            let mut e = [0u8; 4];
            dev.seek(SeekFrom::Start(self.fat_start + c as u64 * 4))?;
            dev.read_exact(&mut e)?;
            let next = u32::from_le_bytes(e) & 0x0FFF_FFFF;
            if next >= 0x0FFF_FFF8 {
                return Ok(out);
            }
            if next < 2 || out.len() > 1 << 20 {
                bail!("broken FAT cluster chain at cluster {c}");
            }
            out.push(next);
            c = next;
        }
    }
}

/// FSInfo's free-cluster count and next-free hint: fatfs leaves them "unknown", which
/// fsck.vfat reports; count the free clusters and record them.
fn write_fsinfo(g: &Geometry, dev: &mut (impl Read + Write + Seek)) -> anyhow::Result<()> {
    const FREE_COUNT: u64 = 488;
    const NEXT_FREE: u64 = 492;
    let fat_bytes = (g.data_start - g.fat_start) / g.fats;
    let mut fat = vec![0u8; fat_bytes as usize];
    dev.seek(SeekFrom::Start(g.fat_start))?;
    dev.read_exact(&mut fat)?;
    let clusters = ((g.total_bytes - g.data_start) / (g.spc * g.bps)) as usize;
    let entries = fat.chunks(4).skip(2).take(clusters).map(|c| u32::from_le_bytes(c.try_into().unwrap()) & 0x0FFF_FFFF);
    let (mut free, mut first_free) = (0u32, None);
    for (i, e) in entries.enumerate() {
        if e == 0 {
            free += 1;
            first_free.get_or_insert(i as u32 + 2);
        }
    }
    let off = g.fsinfo_sector * g.bps;
    dev.seek(SeekFrom::Start(off + FREE_COUNT))?;
    dev.write_all(&free.to_le_bytes())?;
    dev.seek(SeekFrom::Start(off + NEXT_FREE))?;
    dev.write_all(&first_free.unwrap_or(0xFFFF_FFFF).to_le_bytes())?;
    Ok(())
}

fn entry_cluster(e: &[u8]) -> u32 {
    (u16::from_le_bytes([e[20], e[21]]) as u32) << 16 | u16::from_le_bytes([e[26], e[27]]) as u32
}

/// Repair every subdirectory fatfs 0.3.6 wrote: its `.` and `..` must be the first two entries
/// (fatfs puts a long-name entry before each) and `..` of a child of the root must name
/// cluster 0 (fatfs names the root cluster). fsck.vfat -n is clean afterwards.
pub fn fix_dot_entries(dev: &mut (impl Read + Write + Seek)) -> anyhow::Result<()> {
    let len = dev.seek(SeekFrom::End(0))?;
    check_volume(dev, len)?;
    let g = geometry(dev)?;
    write_fsinfo(&g, dev)?;
    let mut queue = vec![g.root_cluster];
    while let Some(dir) = queue.pop() {
        for c in g.chain(dev, dir)? {
            let buf = g.read_cluster(dev, c)?;
            for e in live_entries(&buf) {
                if e[11] & ATTR_DIR == 0 || &e[..11] == DOT || &e[..11] == DOTDOT {
                    continue;
                }
                let child = entry_cluster(e);
                fix_dir(&g, dev, child, dir)?;
                queue.push(child);
            }
        }
    }
    Ok(())
}

fn fix_dir(g: &Geometry, dev: &mut (impl Read + Write + Seek), cluster: u32, parent: u32) -> anyhow::Result<()> {
    let mut buf = vec![0u8; g.cluster_bytes()];
    let off = g.cluster_offset(cluster);
    dev.seek(SeekFrom::Start(off))?;
    dev.read_exact(&mut buf)?;
    // The leading run of long-name and dot entries.
    let mut n = 0;
    let (mut dot, mut dotdot) = (None, None);
    while n * DIRENT < buf.len() {
        let e = &buf[n * DIRENT..(n + 1) * DIRENT];
        if e[11] == ATTR_LFN && e[0] != 0 && e[0] != DELETED {
            n += 1;
        } else if &e[..11] == DOT {
            dot = Some(e.to_vec());
            n += 1;
        } else if &e[..11] == DOTDOT {
            dotdot = Some(e.to_vec());
            n += 1;
            break; // what follows belongs to the directory's real entries, long names included
        } else {
            break;
        }
    }
    let (Some(mut dot), Some(mut dotdot)) = (dot, dotdot) else {
        bail!("directory at cluster {cluster} has no . and .. entries");
    };
    let parent_field = if parent == g.root_cluster { 0 } else { parent };
    let set_cluster = |e: &mut [u8], c: u32| {
        e[20..22].copy_from_slice(&((c >> 16) as u16).to_le_bytes());
        e[26..28].copy_from_slice(&(c as u16).to_le_bytes());
    };
    set_cluster(&mut dot, cluster);
    set_cluster(&mut dotdot, parent_field);
    let mut fixed = buf[..n * DIRENT].to_vec();
    fixed[..DIRENT].copy_from_slice(&dot);
    fixed[DIRENT..2 * DIRENT].copy_from_slice(&dotdot);
    for slot in 2..n {
        let e = &mut fixed[slot * DIRENT..(slot + 1) * DIRENT];
        e.fill(0);
        e[0] = DELETED;
    }
    if fixed != buf[..n * DIRENT] {
        dev.seek(SeekFrom::Start(off))?;
        dev.write_all(&fixed)?;
    }
    Ok(())
}

/// What a volume may hold before we call it hostile: directory nesting (an ESP has a handful of
/// levels) and entries in all.
pub const MAX_DIR_DEPTH: usize = 32;
pub const MAX_ENTRIES: usize = 100_000;

/// Check a FAT32 volume read from outside (`len` bytes) before fatfs mounts it: sane geometry
/// inside the medium; every chain reached from the root in range, ending, and no cluster used
/// twice (which is what a loop, a cross-link or a directory containing itself looks like);
/// bounded depth and entry count. Pure over `dev`; reads the FAT and the directories only.
pub fn check_volume(dev: &mut (impl Read + Seek), len: u64) -> anyhow::Result<()> {
    let g = geometry(dev)?;
    if ![512, 1024, 2048, 4096].contains(&g.bps) || !g.spc.is_power_of_two() || g.spc > 128 || !(1..=2).contains(&g.fats) {
        bail!("FAT boot sector: {} bytes per sector, {} sectors per cluster, {} FATs is not a FAT32 layout", g.bps, g.spc, g.fats);
    }
    if g.total_bytes > len || g.data_start >= g.total_bytes || g.fat_start == 0 || g.fat_start >= g.data_start {
        bail!("FAT boot sector: the volume ({} bytes, data from byte {}) does not fit the {len}-byte partition", g.total_bytes, g.data_start);
    }
    let clusters = (g.total_bytes - g.data_start) / (g.spc * g.bps);
    let fat_entries = (g.data_start - g.fat_start) / g.fats / 4;
    let max_cluster = (clusters + 1).min(fat_entries.saturating_sub(1));
    let in_range = |c: u32| (2..=max_cluster).contains(&(c as u64));
    if !in_range(g.root_cluster) {
        bail!("FAT: root directory cluster {} is outside 2..={max_cluster}", g.root_cluster);
    }
    let mut fat = vec![0u8; ((max_cluster + 1) * 4) as usize];
    dev.seek(SeekFrom::Start(g.fat_start))?;
    dev.read_exact(&mut fat)?;
    let next = |c: u32| u32::from_le_bytes(fat[c as usize * 4..c as usize * 4 + 4].try_into().unwrap()) & 0x0FFF_FFFF;
    let mut used = vec![false; (max_cluster + 1) as usize];
    let mut chain = |first: u32, what: &str| -> anyhow::Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut c = first;
        loop {
            if !in_range(c) {
                bail!("FAT: {what}: cluster {c} is outside 2..={max_cluster}");
            }
            if std::mem::replace(&mut used[c as usize], true) {
                bail!("FAT: {what}: cluster {c} is used twice (a loop or a cross-link)");
            }
            out.push(c);
            let n = next(c);
            if n >= 0x0FFF_FFF8 {
                return Ok(out);
            }
            c = n;
        }
    };
    let mut entries = 0usize;
    let mut queue = vec![(g.root_cluster, 0usize, String::from("/"))];
    while let Some((dir, depth, path)) = queue.pop() {
        if depth > MAX_DIR_DEPTH {
            bail!("FAT: {path} is nested more than {MAX_DIR_DEPTH} directories deep");
        }
        for c in chain(dir, &format!("directory {path}"))? {
            let buf = g.read_cluster(dev, c)?;
            for e in live_entries(&buf) {
                if &e[..11] == DOT || &e[..11] == DOTDOT {
                    continue;
                }
                entries += 1;
                if entries > MAX_ENTRIES {
                    bail!("FAT: more than {MAX_ENTRIES} directory entries");
                }
                let name = format!("{path}{}", String::from_utf8_lossy(&e[..11]).trim_end());
                let first = entry_cluster(e);
                let size = u32::from_le_bytes(e[28..32].try_into().unwrap()) as u64;
                if e[11] & ATTR_DIR != 0 {
                    queue.push((first, depth + 1, format!("{name}/")));
                } else if size > 0 {
                    let n = chain(first, &format!("file {name}"))?.len() as u64;
                    if n * (g.cluster_bytes() as u64) < size {
                        bail!("FAT: file {name} claims {size} bytes but its chain holds {n} clusters");
                    }
                }
            }
        }
    }
    Ok(())
}
