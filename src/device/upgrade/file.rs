//! The offline target: a disk image file (refurbishing, testing). The ESP is changed with fatfs
//! through a window onto the image (then the FAT fix-up), the images partition with `debugfs -w`
//! on `IMAGE?offset=N` (no root, no loop devices), the slot by writing at its offset.

use super::Target;
use crate::format::entries::EntryReport;
use crate::base::hash::{digest_reader, Digest};
use crate::format::inspect::ReadOnly;
use crate::format::layout::{Layout, Partition, Slot};
use crate::base::window::{CachedWindow, Window};
use anyhow::{bail, Context};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use crate::format::agent::ApplyStep;

/// Files an upgrade writes carry the time of the upgrade.
fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(crate::DEFAULT_SOURCE_DATE_EPOCH)
}

pub struct FileTarget {
    path: PathBuf,
    layout: Layout,
    esp: fatfs::FileSystem<CachedWindow>,
}

impl FileTarget {
    /// Open a disk image, its layout read from the ESP's record (checked against the GPT).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Self::open_as(path, None)
    }

    /// Open a disk image whose layout the caller knows (the installer, about to write that layout
    /// into the record); it is still checked against the GPT.
    pub fn open_as(path: &Path, known: Option<Layout>) -> anyhow::Result<Self> {
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let gpt = crate::format::disk::read_gpt(&mut f)?;
        let esp = gpt.partitions.iter().find(|p| p.type_guid == crate::format::layout::types::ESP).context("the disk has no ESP")?;
        let mut w = Window::new(std::fs::OpenOptions::new().read(true).write(true).open(path)?, esp.start, esp.size);
        crate::format::fat::check_volume(&mut w, esp.size).context("the ESP")?;
        let layout: Layout = match known {
            Some(l) => l,
            None => {
                let ro = fatfs::FileSystem::new(ReadOnly(Window::new(File::open(path)?, esp.start, esp.size)), fatfs::FsOptions::new().update_accessed_date(false))?;
                let mut s = String::new();
                ro.root_dir().open_file(crate::format::layout::RECORD_PATH).context("the ESP has no layout record: not a slotforge disk")?.read_to_string(&mut s)?;
                serde_json::from_str(&s)?
            }
        };
        check_record(&layout, &gpt)?;
        drop(w);
        let w = CachedWindow::new(std::fs::OpenOptions::new().read(true).write(true).open(path)?, esp.start, esp.size);
        let esp = fatfs::FileSystem::new(w, crate::format::esp::options(now()))?;
        Ok(Self { path: path.into(), layout, esp })
    }

    fn images(&self) -> anyhow::Result<&Partition> {
        self.layout.by_role(crate::format::layout::Role::ExternalImages).context("the layout has no external-images partition")
    }

    fn ext4(&self) -> anyhow::Result<ext4_view::Ext4> {
        let p = self.images()?;
        ext4_view::Ext4::load(Box::new(Window::new(File::open(&self.path)?, p.start, p.size))).map_err(|e| anyhow::anyhow!("images partition: {e}"))
    }

    fn debugfs(&self, script: &str) -> anyhow::Result<()> {
        let p = self.images()?;
        let sf = tempfile::NamedTempFile::new()?;
        std::fs::write(sf.path(), script)?;
        let o = Command::new("debugfs").arg("-w").arg("-f").arg(sf.path()).arg(format!("{}?offset={}", self.path.display(), p.start)).output().context("running debugfs (install e2fsprogs)")?;
        let err = String::from_utf8_lossy(&o.stderr);
        let bad: Vec<&str> = err.lines().filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty() && !l.starts_with("Allocated inode")).collect();
        if !o.status.success() || !bad.is_empty() {
            bail!("debugfs on the images partition: {}", bad.join("; "));
        }
        Ok(())
    }
}

/// The ESP's layout record says where things are, but the GPT is what the disk really holds:
/// every partition of the record must be the GPT's, same start and size, or nothing is written
/// (a record with a slot at byte 0 once made `upgrade` write over the GPT).
fn check_record(layout: &Layout, gpt: &crate::format::disk::GptReport) -> anyhow::Result<()> {
    for p in &layout.partitions {
        match gpt.partitions.iter().find(|g| g.name == p.name) {
            Some(g) if g.start == p.start && g.size == p.size => {}
            Some(g) => bail!("the ESP's layout record puts {} at {}+{} but the GPT at {}+{}; refusing to write to this disk", p.name, p.start, p.size, g.start, g.size),
            None => bail!("the ESP's layout record names partition {}, which the GPT does not have; refusing to write to this disk", p.name),
        }
    }
    Ok(())
}

impl Target for FileTarget {
    fn layout(&mut self) -> anyhow::Result<Layout> {
        Ok(self.layout.clone())
    }
    /// The slot that would boot: the highest install number among entries not exhausted.
    fn running(&mut self) -> anyhow::Result<Slot> {
        let best = self
            .entries()?
            .into_iter()
            .filter(|e| e.tries_left != Some(0))
            .filter_map(|e| match e.slot.as_deref() {
                Some("a") => Some((e.install_number(), Slot::A)),
                Some("b") => Some((e.install_number(), Slot::B)),
                _ => None,
            })
            .max_by_key(|(v, _)| *v);
        Ok(best.map(|b| b.1).unwrap_or(Slot::A))
    }
    fn entries(&mut self) -> anyhow::Result<Vec<EntryReport>> {
        Ok(crate::format::entries::list(&crate::format::entries::FatView(&self.esp.root_dir())))
    }
    fn esp_remove(&mut self, path: &str) -> anyhow::Result<()> {
        self.esp.root_dir().remove(path).with_context(|| format!("ESP: removing {path}"))?;
        Ok(())
    }
    fn esp_write(&mut self, path: &str, data: &mut dyn Read) -> anyhow::Result<()> {
        crate::format::esp::put(&self.esp.root_dir(), path, data)
    }
    fn esp_copy_out(&mut self, path: &str, dest: &Path) -> anyhow::Result<bool> {
        let Ok(mut f) = self.esp.root_dir().open_file(path) else { return Ok(false) };
        std::io::copy(&mut f, &mut File::create(dest)?)?;
        Ok(true)
    }
    fn esp_digest(&mut self, path: &str) -> anyhow::Result<Option<(Digest, u64)>> {
        let Ok(f) = self.esp.root_dir().open_file(path) else { return Ok(None) };
        Ok(Some(digest_reader(f).with_context(|| format!("ESP: reading {path}"))?))
    }
    fn esp_copy(&mut self, from: &str, to: &str, digest: &Digest, size: u64) -> anyhow::Result<()> {
        let root = self.esp.root_dir();
        let src = root.open_file(from).with_context(|| format!("ESP: opening {from}"))?;
        crate::format::esp::put(&root, to, &mut crate::base::hash::VerifyingReader::new(src, digest.clone(), size, format!("ESP {from}")))
    }
    fn images_index(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.ext4()?.read("/index.json").ok())
    }
    fn images_has(&mut self, d: &Digest) -> anyhow::Result<bool> {
        Ok(self.ext4()?.exists(format!("/blobs/sha256/{}", d.hex()).as_str()).unwrap_or(false))
    }
    fn images_read(&mut self, d: &Digest) -> anyhow::Result<Vec<u8>> {
        self.ext4()?.read(format!("/blobs/sha256/{}", d.hex()).as_str()).map_err(|e| anyhow::anyhow!("{d}: {e}"))
    }
    fn images_put(&mut self, d: &Digest, src: &Path) -> anyhow::Result<()> {
        self.debugfs(&format!("write \"{}\" /blobs/sha256/{}\n", src.display(), d.hex()))
    }
    fn images_write_index(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let tmp = tempfile::NamedTempFile::new()?;
        std::fs::write(tmp.path(), bytes)?;
        let rm = if self.images_index()?.is_some() { "rm /index.json\n" } else { "" };
        self.debugfs(&format!("{rm}write \"{}\" /index.json\n", tmp.path().display()))
    }
    fn write_slot(&mut self, part: &Partition, src: &Path, digest: &Digest, _step: &dyn Fn(ApplyStep)) -> anyhow::Result<()> {
        let len = std::fs::metadata(src)?.len();
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&self.path)?;
        let mut w = Window::new(f.try_clone()?, part.start, part.size);
        std::io::copy(&mut File::open(src)?, &mut w)?;
        f.sync_all()?;
        f.seek(SeekFrom::Start(part.start))?;
        let (got, _) = digest_reader((&mut f).take(len))?;
        if &got != digest {
            bail!("slot {}: read back {got}, wrote {digest}", part.name);
        }
        Ok(())
    }
    fn images_seed(&mut self, d: &Digest) -> anyhow::Result<Option<File>> {
        // Read out of the ext4 image into an unlinked temporary file (streamed).
        let fs = self.ext4()?;
        let Ok(mut src) = fs.open(format!("/blobs/sha256/{}", d.hex()).as_str()) else { return Ok(None) };
        let mut f = tempfile::tempfile()?;
        std::io::copy(&mut src, &mut f)?;
        Ok(Some(f))
    }
    fn slot_seed(&mut self, part: &Partition) -> anyhow::Result<(File, u64)> {
        Ok((File::open(&self.path)?, part.start))
    }
    fn slot_out(&mut self, part: &Partition) -> anyhow::Result<(File, u64)> {
        Ok((std::fs::OpenOptions::new().read(true).write(true).open(&self.path)?, part.start))
    }
    fn update_keys(&mut self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let slot = self.running()?;
        let part = self.layout.rootfs(slot).clone();
        let mut f = File::open(&self.path)?;
        let Some((_, tmp)) = crate::format::squashfs::extract(&mut f, part.start, part.size)? else {
            bail!("slot {} would boot but holds no rootfs; its update keys cannot be read", slot.name());
        };
        crate::format::squashfs::read_dir_files(tmp.path(), crate::format::signature::KEYS_DIR)
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        let esp = self.layout.esp().clone();
        // Unmount by replacing the file system with a fresh read of the same window.
        // The stand-in never reads past its boot sector: the old one's unmount writes after it.
        let w = CachedWindow::new(std::fs::OpenOptions::new().read(true).write(true).open(&self.path)?, esp.start, esp.size);
        let old = std::mem::replace(&mut self.esp, fatfs::FileSystem::new(w, crate::format::esp::options(now()))?);
        old.unmount()?;
        let mut w = Window::new(std::fs::OpenOptions::new().read(true).write(true).open(&self.path)?, esp.start, esp.size);
        crate::format::esp::fix_dot_entries(&mut w)?;
        w.flush()?;
        File::open(&self.path)?.sync_all()?;
        Ok(())
    }
}

/// `slotforge upgrade IMAGE BUNDLE`: apply a bundle to the inactive slot of a disk image file.
pub fn upgrade_image(image: &Path, bundle: &Path) -> anyhow::Result<super::ApplyReport> {
    let b = crate::format::bundle::Bundle::open(bundle, None)?;
    let mut t = FileTarget::open(image)?;
    super::apply(&mut t, &b)
}

/// `slotforge upgrade IMAGE docker://REF`: the release pulled from a registry (its signatures
/// decided with the keys of the slot that would boot before any content is fetched; only the
/// chunks that slot lacks fetched, into `scratch` — kept there if the pull is cut, so a rerun
/// with the same `scratch` goes on), then applied.
pub fn upgrade_from_registry(image: &Path, reference: &str, scratch: Option<&Path>) -> anyhow::Result<super::ApplyReport> {
    let mut t = FileTarget::open(image)?;
    let r = super::pull::resolve(&mut t, reference, &[])?;
    let tmp;
    let dir = match scratch {
        Some(s) => super::pull::work_dir(s, &r.manifest),
        None => {
            tmp = tempfile::Builder::new().prefix("slotforge-pull-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let (b, pulled) = super::pull::fetch(&mut t, r, &dir, &|_| {})?;
    let mut report = super::apply(&mut t, &b)?;
    report.pulled = Some(pulled);
    if scratch.is_some() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}
