//! The EFI system partition: FAT32 written with `fatfs`, holding systemd-boot as the removable-
//! media loader (`EFI/BOOT/BOOTX64.EFI`), each slot's kernel and initrd under `/<slot>/`,
//! `loader/loader.conf` and one Boot Loader Specification entry per slot. fatfs 0.3.6 writes
//! subdirectories that fsck.vfat rejects; [`fix_dot_entries`] repairs them after unmount.
//! Boot flow: docs/boot.md.

use anyhow::Context;
use fatfs::{Date, DateTime, FatType, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider};
use serde::Serialize;
use crate::base::time::civil;
use std::io::{Read, Seek, SeekFrom, Write};

pub const LOADER_PATH: &str = "EFI/BOOT/BOOTX64.EFI";
pub const LOADER_CONF: &str = "loader/loader.conf";
pub use crate::format::entries::{BootEntry, EntryReport, ENTRIES_DIR, SORT_KEY, UKI_DIR};
/// `timeout 0` boots the first entry at once; no `default`, so boot counting can fall back.
pub const LOADER_CONF_TEXT: &str = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n";

/// A file to put on the ESP.
pub struct EspFile {
    pub path: String,
    pub data: Box<dyn Read>,
}

#[derive(Debug)]
struct FixedTime(DateTime);
impl TimeProvider for FixedTime {
    fn get_current_date(&self) -> Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> DateTime {
        self.0
    }
}

/// A FAT timestamp for `epoch` (clamped to FAT's 1980..2107 range).
pub fn fat_time(epoch: u64) -> DateTime {
    let (y, m, d) = civil((epoch / 86_400) as i64);
    let secs = epoch % 86_400;
    let (y, m, d) = if y < 1980 { (1980, 1, 1) } else if y > 2107 { (2107, 12, 31) } else { (y, m, d) };
    DateTime {
        date: Date { year: y as u16, month: m as u16, day: d as u16 },
        time: Time { hour: (secs / 3600) as u16, min: (secs / 60 % 60) as u16, sec: (secs % 60) as u16, millis: 0 },
    }
}

/// Mount options with every new timestamp at `epoch`. Without a provider, fatfs 0.3.6 (built
/// without chrono) stamps month 0 — an invalid date that makes UEFI's FAT driver refuse
/// SetInfo, so systemd-boot could not rename an entry to count a boot.
pub fn options(epoch: u64) -> FsOptions {
    // fatfs wants a 'static provider; one small leak per mount is the price.
    let tp: &'static FixedTime = Box::leak(Box::new(FixedTime(fat_time(epoch))));
    FsOptions::new().time_provider(tp).update_accessed_date(false)
}

/// Format `dev` (the whole ESP) as FAT32 and write `files` (parent directories created).
pub fn write<D: Read + Write + Seek>(mut dev: D, volume_id: u32, epoch: u64, files: Vec<EspFile>) -> anyhow::Result<()> {
    fatfs::format_volume(
        &mut dev,
        FormatVolumeOptions::new().fat_type(FatType::Fat32).volume_id(volume_id).volume_label(*b"ESP        "),
    )
    .context("formatting the ESP as FAT32 (is it at least 33 MiB?)")?;
    dev.seek(SeekFrom::Start(0))?;
    {
        let fs = FileSystem::new(&mut dev, options(epoch))?;
        {
            let root = fs.root_dir();
            for mut f in files {
                put(&root, &f.path, &mut f.data)?;
            }
        }
        fs.unmount().context("ESP: unmounting")?;
    }
    dev.flush()?;
    fix_dot_entries(&mut dev)
}

/// Write `data` to `path` on a mounted FAT file system, creating parent directories.
pub fn put<T: fatfs::ReadWriteSeek>(root: &fatfs::Dir<T>, path: &str, data: &mut dyn Read) -> anyhow::Result<()> {
    let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let name = parts.pop().context("empty ESP path")?;
    let mut dir = root.clone();
    for p in parts {
        dir = match dir.open_dir(p) {
            Ok(d) => d,
            Err(_) => dir.create_dir(p).with_context(|| format!("ESP: creating {p}"))?,
        };
    }
    let mut out = dir.create_file(name).with_context(|| format!("ESP: creating {path}"))?;
    out.truncate()?;
    std::io::copy(data, &mut out).with_context(|| format!("ESP: writing {path} (is the ESP large enough?)"))?;
    out.flush()?;
    Ok(())
}

pub use crate::format::fat::fix_dot_entries;

#[derive(Debug, Clone, Serialize)]
pub struct EspReport {
    pub fat_type: String,
    pub volume_id: u32,
    pub loader_bytes: Option<u64>,
    pub loader_conf: Option<String>,
    pub entries: Vec<EntryReport>,
    /// Files an entry names that are missing.
    pub missing: Vec<String>,
}

/// Read the ESP back (loader, loader.conf, entries, and whether their files exist), after
/// checking the volume's structure (`fat::check_volume`: a disk image may come from anywhere).
pub fn read<D: Read + Write + Seek>(mut dev: D) -> anyhow::Result<EspReport> {
    let len = dev.seek(SeekFrom::End(0))?;
    crate::format::fat::check_volume(&mut dev, len)?;
    read_unchecked(dev)
}

/// [`read`] without the structure check, as a firmware's FAT driver reads: a volume a power cut
/// tore somewhere (a file being written) still yields the entries and files that are intact.
/// Only for volumes of known origin (the crash-state checker's own replays).
pub fn read_unchecked<D: Read + Write + Seek>(mut dev: D) -> anyhow::Result<EspReport> {
    dev.seek(SeekFrom::Start(0))?; // fatfs reads the boot sector from the current position
    let fs = FileSystem::new(dev, FsOptions::new().update_accessed_date(false)).context("ESP is not a FAT file system")?;
    let root = fs.root_dir();
    let size_of = |p: &str| -> Option<u64> {
        let mut f = root.open_file(p).ok()?;
        f.seek(SeekFrom::End(0)).ok()
    };
    let read_text = |p: &str| -> Option<String> {
        let mut f = root.open_file(p).ok()?;
        let mut s = String::new();
        f.read_to_string(&mut s).ok()?;
        Some(s)
    };
    let entries = crate::format::entries::list(&crate::format::entries::FatView(&root));
    let mut missing = Vec::new();
    for e in &entries {
        for p in [&e.linux, &e.initrd].into_iter().flatten() {
            if size_of(p.trim_start_matches('/')).is_none() {
                missing.push(format!("{}: {p}", e.file));
            }
        }
    }
    Ok(EspReport {
        fat_type: format!("{:?}", fs.fat_type()),
        volume_id: fs.volume_id(),
        loader_bytes: size_of(LOADER_PATH),
        loader_conf: read_text(LOADER_CONF),
        entries,
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::Slot;

    #[test]
    fn fat_time_of_epoch() {
        let t = fat_time(crate::DEFAULT_SOURCE_DATE_EPOCH);
        assert_eq!((t.date.year, t.date.month, t.date.day), (2024, 1, 1));
        let t = fat_time(1_000_000_000); // 2001-09-09T01:46:40Z
        assert_eq!((t.date.year, t.date.month, t.date.day, t.time.hour, t.time.min, t.time.sec), (2001, 9, 9, 1, 46, 40));
        assert_eq!(fat_time(0).date.year, 1980);
    }

    #[test]
    fn written_esp_reads_back() {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(64 << 20).unwrap();
        let e = BootEntry { slot: Slot::A, title: "t".into(), version: 1, linux: "/a/vmlinuz".into(), initrd: None, options: "x".into(), tries: None };
        let files = vec![
            EspFile { path: LOADER_PATH.into(), data: Box::new(&b"MZloader"[..]) },
            EspFile { path: format!("{ENTRIES_DIR}/{}", e.file_name()), data: Box::new(std::io::Cursor::new(e.text().into_bytes())) },
            EspFile { path: "a/vmlinuz".into(), data: Box::new(&b"kernel"[..]) },
        ];
        write(&mut f, 0x1234, 0, files).unwrap();
        let r = read(&mut f).unwrap();
        assert_eq!(r.loader_bytes, Some(8));
        assert_eq!(r.entries.len(), 1);
        assert_eq!(r.entries[0].linux.as_deref(), Some("/a/vmlinuz"));
        assert!(r.missing.is_empty());
    }
}
