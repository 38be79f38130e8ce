//! The online target: the running device, with the ESP and the images partition mounted and the
//! inactive slot a block device found by its GPT partition name.

use super::Target;
use crate::device::AgentConfig;
use crate::format::entries::EntryReport;
use crate::base::hash::{digest_reader, Digest};
use crate::format::layout::{Layout, Partition, Slot};
use anyhow::{bail, Context};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use crate::format::agent::ApplyStep;

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

pub use crate::base::durable::{sync_fs, write_durably};

impl Target for DeviceTarget {
    fn layout(&mut self) -> anyhow::Result<Layout> {
        let p = self.cfg.esp.join(crate::format::layout::RECORD_PATH);
        let layout: Layout = serde_json::from_slice(&crate::oci::read_json_file(&p)?).context("layout record")?;
        // The record on the (writable, unsigned) ESP must agree with the partition table the
        // kernel read: same start and size for every partition, found by its GPT name.
        if self.cfg.devices.is_none() {
            for part in &layout.partitions {
                let dev = partition_device(&self.cfg, &part.name)?;
                let sys = Path::new("/sys/class/block").join(dev.file_name().unwrap_or_default());
                let read = |f: &str| std::fs::read_to_string(sys.join(f)).ok().and_then(|v| v.trim().parse::<u64>().ok());
                if read("start").map(|s| s * 512) != Some(part.start) || read("size").map(|s| s * 512) != Some(part.size) {
                    bail!("the ESP's layout record puts {} at {}+{} but the kernel's partition table disagrees; refusing to write", part.name, part.start, part.size);
                }
            }
        }
        Ok(layout)
    }
    fn running(&mut self) -> anyhow::Result<Slot> {
        let c = std::fs::read_to_string(&self.cfg.cmdline)?;
        match crate::format::cmdline::value(&c, "slotforge.slot").as_deref() {
            Some("a") => Ok(Slot::A),
            Some("b") => Ok(Slot::B),
            _ => bail!("the kernel command line names no slotforge.slot"),
        }
    }
    fn entries(&mut self) -> anyhow::Result<Vec<EntryReport>> {
        if !self.cfg.esp.join(crate::format::esp::ENTRIES_DIR).is_dir() && !self.cfg.esp.join(crate::format::esp::UKI_DIR).is_dir() {
            bail!("{} holds neither {} nor {}: is the ESP mounted?", self.cfg.esp.display(), crate::format::esp::ENTRIES_DIR, crate::format::esp::UKI_DIR);
        }
        Ok(crate::format::entries::list(&crate::format::entries::DirView(self.cfg.esp.clone())))
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
    fn esp_copy_out(&mut self, path: &str, dest: &Path) -> anyhow::Result<bool> {
        match std::fs::copy(self.cfg.esp.join(path), dest) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("ESP: reading {path}")),
        }
    }
    fn esp_digest(&mut self, path: &str) -> anyhow::Result<Option<(Digest, u64)>> {
        match std::fs::File::open(self.cfg.esp.join(path)) {
            Ok(f) => Ok(Some(crate::base::hash::digest_reader(f).with_context(|| format!("ESP: reading {path}"))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("ESP: opening {path}")),
        }
    }
    fn esp_copy(&mut self, from: &str, to: &str, digest: &Digest, size: u64) -> anyhow::Result<()> {
        let src = std::fs::File::open(self.cfg.esp.join(from)).with_context(|| format!("ESP: opening {from}"))?;
        write_durably(&self.cfg.esp.join(to), &mut crate::base::hash::VerifyingReader::new(src, digest.clone(), size, format!("ESP {from}")))
    }
    fn images_index(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(crate::oci::read_json_file(&self.cfg.images.join("index.json")).ok())
    }
    fn images_has(&mut self, d: &Digest) -> anyhow::Result<bool> {
        Ok(self.cfg.images.join("blobs/sha256").join(d.hex()).is_file())
    }
    fn images_read(&mut self, d: &Digest) -> anyhow::Result<Vec<u8>> {
        Ok(std::fs::read(self.cfg.images.join("blobs/sha256").join(d.hex()))?)
    }
    fn images_put(&mut self, d: &Digest, src: &Path) -> anyhow::Result<()> {
        let store = crate::base::cache::Cache::open_layout(&self.cfg.images)?;
        let size = std::fs::metadata(src)?.len();
        store.put(std::fs::File::open(src)?, d, size, "bundle blob")
    }
    fn images_write_index(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        write_durably(&self.cfg.images.join("index.json"), &mut &bytes[..])
    }
    fn write_slot(&mut self, part: &Partition, src: &Path, digest: &Digest, step: &dyn Fn(ApplyStep)) -> anyhow::Result<()> {
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
            step(ApplyStep::SlotHalfWritten);
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
    fn slot_seed(&mut self, part: &Partition) -> anyhow::Result<(std::fs::File, u64)> {
        let dev = partition_device(&self.cfg, &part.name)?;
        Ok((std::fs::File::open(&dev).with_context(|| format!("opening {}", dev.display()))?, 0))
    }
    fn slot_out(&mut self, part: &Partition) -> anyhow::Result<(std::fs::File, u64)> {
        let dev = partition_device(&self.cfg, &part.name)?;
        Ok((std::fs::OpenOptions::new().read(true).write(true).open(&dev).with_context(|| format!("opening {}", dev.display()))?, 0))
    }
    fn images_seed(&mut self, d: &Digest) -> anyhow::Result<Option<std::fs::File>> {
        Ok(std::fs::File::open(self.cfg.images.join("blobs/sha256").join(d.hex())).ok())
    }
    fn update_keys(&mut self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let dir = self.cfg.root.join(crate::format::signature::KEYS_DIR);
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
