//! The whole disk: a GPT (via the `gpt` crate, with fixed GUIDs and a protective MBR) and
//! partition contents copied in sparsely, written to a temporary file beside the output and
//! renamed into place only when complete, so a failed build never leaves a half-written image.

use crate::format::layout::{Layout, SECTOR};
use crate::base::window::copy_file_sparse;
use anyhow::{bail, Context};
use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition::Partition as GptPartition;
use gpt::partition_types::Type;
use gpt::GptConfig;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

/// A disk image being written: a temp file in the output's directory.
pub struct DiskWriter {
    tmp: tempfile::NamedTempFile,
    out: PathBuf,
    pub bytes_written: u64,
}

impl DiskWriter {
    pub fn create(out: &Path, layout: &Layout) -> anyhow::Result<Self> {
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()))
            .suffix(".partial")
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        tmp.as_file().set_len(layout.disk_size)?;
        Ok(Self { tmp, out: out.to_path_buf(), bytes_written: 0 })
    }

    /// Copy the file `src` into the disk at `offset` (holes stay holes, zero runs too).
    pub fn put(&mut self, src: &mut File, offset: u64) -> anyhow::Result<u64> {
        let (total, written) = copy_file_sparse(src, self.tmp.as_file_mut(), offset)?;
        self.bytes_written += written;
        Ok(total)
    }

    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// Write the GPT and protective MBR, fsync, and rename into place.
    pub fn finish(mut self, layout: &Layout) -> anyhow::Result<()> {
        write_gpt(self.tmp.as_file_mut(), layout)?;
        // A temp file is created 0600; an image is an ordinary artefact.
        use std::os::unix::fs::PermissionsExt;
        self.tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
        self.tmp.as_file().sync_all()?;
        self.tmp.persist(&self.out).map_err(|e| anyhow::anyhow!("renaming into {}: {}", self.out.display(), e.error))?;
        Ok(())
    }
}

/// Write primary and backup GPT plus the protective MBR for `layout` onto `dev`.
pub fn write_gpt(dev: &mut File, layout: &Layout) -> anyhow::Result<()> {
    let mut disk = GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .change_partition_count(true)
        .create_from_device(&mut *dev, Some(layout.disk_guid))
        .context("initialising the GPT")?;
    let mut parts = BTreeMap::new();
    for p in &layout.partitions {
        parts.insert(
            p.number,
            GptPartition {
                part_type_guid: Type { guid: p.type_guid, os: gpt::partition_types::OperatingSystem::Linux },
                part_guid: p.guid,
                first_lba: p.first_lba(),
                last_lba: p.last_lba(),
                flags: 0,
                name: p.name.clone(),
            },
        );
    }
    disk.update_partitions(parts).context("setting GPT partitions")?;
    disk.write().context("writing the GPT")?;
    let sectors = layout.disk_size / SECTOR;
    let mbr = ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(dev).context("writing the protective MBR")?;
    Ok(())
}

/// A partition as read back from a disk's GPT.
#[derive(Debug, Clone, Serialize)]
pub struct GptEntry {
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub guid: String,
    pub start: u64,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GptReport {
    pub disk_guid: String,
    pub disk_size: u64,
    pub partitions: Vec<GptEntry>,
}

/// Read the GPT; the `gpt` crate checks the header and partition-array CRCs of both copies.
/// The most partition entries a GPT we read may declare. We write 128 (the UEFI minimum); the
/// gpt crate allocates `entries × entry size` before checking anything (2^23 entries took 1 GiB).
pub const MAX_GPT_ENTRIES: u64 = 1024;
/// The only entry size we read: 128 bytes (the gpt crate panics on others; UEFI allows 128·2^n).
pub const GPT_ENTRY_SIZE: u64 = 128;

/// Check one GPT header (512 bytes read at its LBA) against what the medium really holds, before
/// any library sees it. Returns the alternate header's LBA.
pub fn check_gpt_header(b: &[u8; 512], lba: u64, disk_size: u64) -> anyhow::Result<u64> {
    let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as u64;
    let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let where_ = format!("GPT header at LBA {lba}");
    if &b[0..8] != b"EFI PART" {
        bail!("{where_}: no EFI PART signature: not a GPT disk");
    }
    let sectors = disk_size / SECTOR;
    let (hsize, my, alt, entries_lba, n, esize) = (u32at(12), u64at(24), u64at(32), u64at(72), u32at(80), u32at(84));
    if !(92..=512).contains(&hsize) || my != lba || alt >= sectors {
        bail!("{where_}: header size {hsize}, own LBA {my}, alternate LBA {alt} do not fit a {sectors}-sector disk");
    }
    if esize != GPT_ENTRY_SIZE || n == 0 || n > MAX_GPT_ENTRIES {
        bail!("{where_}: {n} entries of {esize} bytes (slotforge reads 1 to {MAX_GPT_ENTRIES} entries of {GPT_ENTRY_SIZE} bytes)");
    }
    let end = entries_lba.checked_mul(SECTOR).and_then(|o| o.checked_add(n * esize));
    if end.is_none_or(|e| e > disk_size) || entries_lba == 0 {
        bail!("{where_}: its entry array at LBA {entries_lba} ({n} × {esize} bytes) lies outside the {disk_size}-byte disk");
    }
    Ok(alt)
}

pub fn read_gpt(dev: &mut File) -> anyhow::Result<GptReport> {
    let disk_size = dev.seek(std::io::SeekFrom::End(0))?;
    if disk_size < 3 * SECTOR {
        bail!("a {disk_size}-byte file cannot hold a GPT");
    }
    let mut hdr = [0u8; 512];
    dev.seek(std::io::SeekFrom::Start(SECTOR))?;
    dev.read_exact(&mut hdr)?;
    let alt = check_gpt_header(&hdr, 1, disk_size)?;
    let first_usable = u64::from_le_bytes(hdr[40..48].try_into().unwrap());
    let last_usable = u64::from_le_bytes(hdr[48..56].try_into().unwrap());
    dev.seek(std::io::SeekFrom::Start(alt * SECTOR))?;
    dev.read_exact(&mut hdr)?;
    check_gpt_header(&hdr, alt, disk_size)?;
    dev.seek(std::io::SeekFrom::Start(0))?;
    let disk = GptConfig::new()
        .writable(false)
        .logical_block_size(LogicalBlockSize::Lb512)
        .only_valid_headers(true)
        .open_from_device(&mut *dev)
        .context("reading the GPT (both headers and their CRCs must be valid)")?;
    let partitions = disk
        .partitions()
        .iter()
        .map(|(n, p)| {
            // Every partition must lie inside the disk: sizes and offsets from outside are
            // checked arithmetic, never wrapped.
            let start = p.first_lba.checked_mul(SECTOR);
            let size = p.last_lba.checked_add(1).and_then(|e| e.checked_sub(p.first_lba)).and_then(|x| x.checked_mul(SECTOR));
            match (start, size) {
                (Some(start), Some(size)) if p.first_lba >= first_usable && p.last_lba <= last_usable && start.checked_add(size).is_some_and(|e| e <= disk_size) => Ok(GptEntry {
                    number: *n,
                    name: p.name.clone(),
                    type_guid: p.part_type_guid.guid.to_string(),
                    guid: p.part_guid.to_string(),
                    start,
                    size,
                }),
                _ => bail!("GPT partition {n} ({}) spans LBA {}..={}, outside the usable LBAs {first_usable}..={last_usable} of the {disk_size}-byte disk", p.name, p.first_lba, p.last_lba),
            }
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(GptReport { disk_guid: disk.guid().to_string(), disk_size, partitions })
}
