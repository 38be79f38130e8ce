//! The online target: the running device, with the ESP and the images partition mounted and the
//! inactive slot a block device found by its GPT partition name.

use super::Target;
use crate::agent::AgentConfig;
use crate::entries::EntryReport;
use crate::hash::{digest_reader, Digest};
use crate::layout::{Layout, Partition, Slot};
use anyhow::{bail, Context};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub struct DeviceTarget {
    pub cfg: AgentConfig,
}

/// `/dev/<name>` of the partition whose GPT name is `label` (sysfs `PARTNAME=`), or
/// `<cfg.devices>/<label>` when a device directory is configured (tests).
pub fn partition_device(cfg: &AgentConfig, label: &str) -> anyhow::Result<PathBuf> {
    if let Some(d) = &cfg.devices {
        return Ok(d.join(label));
    }
    for e in std::fs::read_dir("/sys/class/block")? {
        let e = e?;
        let uevent = std::fs::read_to_string(e.path().join("uevent")).unwrap_or_default();
        if uevent.lines().any(|l| l == format!("PARTNAME={label}")) {
            return Ok(Path::new("/dev").join(e.file_name()));
        }
    }
    bail!("no block device with partition name {label}")
}

/// Flush the whole file system holding `p` (`syncfs`). On vfat, fsync of a directory does
/// not write its entries (they live in the block device's buffers), so a rename or unlink
/// followed by a power cut could be lost — measured by the power-cut boot test. `syncfs` writes
/// them.
pub fn sync_fs(p: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(p)?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Write `data` to `path` durably: a temporary file, fsync, rename, fsync of the directory.
pub fn write_durably(path: &Path, data: &mut dyn Read) -> anyhow::Result<()> {
    let dir = path.parent().unwrap();
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.partial", path.file_name().unwrap().to_string_lossy()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::copy(data, &mut f)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_fs(dir)?;
    Ok(())
}

impl Target for DeviceTarget {
    fn layout(&mut self) -> anyhow::Result<Layout> {
        let p = self.cfg.esp.join(crate::build::LAYOUT_RECORD);
        serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?).context("layout record")
    }
    fn running(&mut self) -> anyhow::Result<Slot> {
        let c = std::fs::read_to_string(&self.cfg.cmdline)?;
        match crate::cmdline::value(&c, "slotforge.slot").as_deref() {
            Some("a") => Ok(Slot::A),
            Some("b") => Ok(Slot::B),
            _ => bail!("the kernel command line names no slotforge.slot"),
        }
    }
    fn entries(&mut self) -> anyhow::Result<Vec<EntryReport>> {
        if !self.cfg.esp.join(crate::esp::ENTRIES_DIR).is_dir() && !self.cfg.esp.join(crate::esp::UKI_DIR).is_dir() {
            bail!("{} holds neither {} nor {}: is the ESP mounted?", self.cfg.esp.display(), crate::esp::ENTRIES_DIR, crate::esp::UKI_DIR);
        }
        Ok(crate::entries::list(&crate::entries::DirView(self.cfg.esp.clone())))
    }
    fn esp_remove(&mut self, path: &str) -> anyhow::Result<()> {
        let p = self.cfg.esp.join(path);
        std::fs::remove_file(&p)?;
        sync_fs(p.parent().unwrap())?;
        Ok(())
    }
    fn esp_write(&mut self, path: &str, data: &mut dyn Read) -> anyhow::Result<()> {
        write_durably(&self.cfg.esp.join(path), data)
    }
    fn images_index(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(std::fs::read(self.cfg.images.join("index.json")).ok())
    }
    fn images_has(&mut self, d: &Digest) -> anyhow::Result<bool> {
        Ok(self.cfg.images.join("blobs/sha256").join(d.hex()).is_file())
    }
    fn images_read(&mut self, d: &Digest) -> anyhow::Result<Vec<u8>> {
        Ok(std::fs::read(self.cfg.images.join("blobs/sha256").join(d.hex()))?)
    }
    fn images_put(&mut self, d: &Digest, src: &Path) -> anyhow::Result<()> {
        let store = crate::cache::Cache::open_layout(&self.cfg.images)?;
        let size = std::fs::metadata(src)?.len();
        store.put(std::fs::File::open(src)?, d, size, "bundle blob")
    }
    fn images_write_index(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        write_durably(&self.cfg.images.join("index.json"), &mut &bytes[..])
    }
    fn write_slot(&mut self, part: &Partition, src: &Path, digest: &Digest, step: &dyn Fn(&str)) -> anyhow::Result<()> {
        let dev = partition_device(&self.cfg, &part.name)?;
        let len = std::fs::metadata(src)?.len();
        if len > part.size {
            bail!("rootfs of {len} bytes does not fit partition {} ({} bytes)", part.name, part.size);
        }
        {
            let mut out = std::fs::OpenOptions::new().write(true).open(&dev).with_context(|| format!("opening {}", dev.display()))?;
            let mut input = std::fs::File::open(src)?;
            let half = len / 2;
            std::io::copy(&mut (&mut input).take(half), &mut out)?;
            out.sync_all()?;
            step("slot-half-written");
            std::io::copy(&mut input, &mut out)?;
            out.flush()?;
            out.sync_all()?;
        }
        let (got, _) = digest_reader(std::fs::File::open(&dev)?.take(len))?;
        if &got != digest {
            bail!("slot {}: read back {got}, wrote {digest}", part.name);
        }
        Ok(())
    }
    fn update_keys(&mut self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let dir = self.cfg.root.join(crate::signature::KEYS_DIR);
        let mut v = Vec::new();
        let Ok(rd) = std::fs::read_dir(&dir) else { return Ok(v) };
        for e in rd {
            let e = e?;
            if e.file_type()?.is_file() {
                v.push((e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path())?));
            }
        }
        v.sort();
        Ok(v)
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        sync_fs(&self.cfg.esp)?;
        Ok(())
    }
}
