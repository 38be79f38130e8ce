//! Open and close a sealed image's dm-verity device with the kernel's own interfaces: a file is
//! attached to a read-only, self-clearing loop device, device-mapper is handed the verity table
//! under the parameters the verified rootfs pins (root hash, salt, sizes, hash offset — the
//! on-disk superblock is not consulted), and the node is made in `/dev/mapper`. The same
//! device `veritysetup open` makes, without its process start per image on every boot.
//! Requests: format::dm, format::loopdev.

use crate::format::dm::{self, VerityTable};
use crate::format::loopdev;
use crate::format::sealed::Sealed;
use anyhow::{bail, Context};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

fn ioctl(fd: &File, req: u64, arg: *mut u8) -> std::io::Result<i32> {
    // SAFETY: the request's argument is a buffer of the length its encoding states (or null).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

fn control() -> anyhow::Result<File> {
    OpenOptions::new().read(true).write(true).open("/dev/mapper/control").context("/dev/mapper/control (is dm_mod loaded?)")
}

fn dm(ctl: &File, req: u64, mut b: Vec<u8>, what: &str, name: &str) -> anyhow::Result<Vec<u8>> {
    ioctl(ctl, req, b.as_mut_ptr()).with_context(|| format!("device-mapper {what} {name}"))?;
    Ok(b)
}

fn major_minor(rdev: u64) -> (u32, u32) {
    (libc::major(rdev), libc::minor(rdev))
}

/// Attach `file` read-only to a free loop device that clears itself when device-mapper lets go.
/// Returns the open loop device (kept open until the table holds it).
fn attach_loop(file: &Path) -> anyhow::Result<File> {
    let backing = File::open(file).with_context(|| file.display().to_string())?;
    let ctl = File::open("/dev/loop-control").context("/dev/loop-control (is the loop module loaded?)")?;
    let mut cfg = loopdev::config(backing.as_raw_fd() as u32, loopdev::READ_ONLY | loopdev::AUTOCLEAR);
    // Another process may take the free device between the two calls: ask again.
    for _ in 0..16 {
        let n = ioctl(&ctl, loopdev::LOOP_CTL_GET_FREE, std::ptr::null_mut()).context("finding a free loop device")?;
        let dev = OpenOptions::new().read(true).open(format!("/dev/loop{n}")).with_context(|| format!("/dev/loop{n}"))?;
        match ioctl(&dev, loopdev::LOOP_CONFIGURE, cfg.as_mut_ptr()) {
            Ok(_) => return Ok(dev),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            Err(e) => return Err(e).with_context(|| format!("attaching {} to /dev/loop{n}", file.display())),
        }
    }
    bail!("no free loop device for {}", file.display())
}

/// Open `name` over `source` (the sealed blob, or a block device serving it) under `s`'s pinned
/// parameters; returns `/dev/mapper/NAME`. Nothing is left behind if it fails.
pub fn open(name: &str, source: &Path, s: &Sealed) -> anyhow::Result<PathBuf> {
    let meta = std::fs::metadata(source).with_context(|| source.display().to_string())?;
    let (held, rdev) = if meta.file_type().is_block_device() {
        (None, meta.rdev())
    } else {
        let l = attach_loop(source)?;
        let rdev = l.metadata()?.rdev();
        (Some(l), rdev)
    };
    let dev = major_minor(rdev);
    let t = VerityTable { data_dev: dev, hash_dev: dev, data_block_size: s.data_block_size, hash_block_size: s.hash_block_size, data_blocks: s.data_blocks, hash_offset: s.hash_offset, root_hash: s.root_hash.clone(), salt: s.salt.clone() };
    let ctl = control()?;
    let bad_name = || anyhow::anyhow!("device-mapper name {name:?}");
    let created = dm(&ctl, dm::DM_DEV_CREATE, dm::request(name, 0, dm::HEADER_LEN).ok_or_else(bad_name)?, "create", name)?;
    let (major, minor) = dm::reply_dev(&created).context("device-mapper create: no device number")?;
    let live = (|| {
        dm(&ctl, dm::DM_TABLE_LOAD, dm::table_load(name, &t).ok_or_else(bad_name)?, "verity table for", name)?;
        dm(&ctl, dm::DM_DEV_SUSPEND, dm::request(name, 0, dm::HEADER_LEN).ok_or_else(bad_name)?, "resume", name)?;
        let node = Path::new("/dev/mapper").join(name);
        let _ = std::fs::remove_file(&node);
        let c = std::ffi::CString::new(node.as_os_str().as_encoded_bytes())?;
        // SAFETY: mknod with a NUL-terminated path and a block device number.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(major, minor)) } < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| node.display().to_string());
        }
        Ok(node)
    })();
    drop(held); // device-mapper holds the loop device now (or never will: it clears itself)
    if live.is_err() {
        let _ = remove(name);
    }
    live
}

/// Remove `name` and its node (its loop device, if any, clears itself).
pub fn remove(name: &str) -> anyhow::Result<()> {
    let ctl = control()?;
    let r = dm(&ctl, dm::DM_DEV_REMOVE, dm::request(name, 0, dm::HEADER_LEN).context("device-mapper name")?, "remove", name);
    let _ = std::fs::remove_file(Path::new("/dev/mapper").join(name));
    r.map(|_| ())
}

/// dm-verity's verdict on `name` (`verified`, `corrupted`), `None` if it is not open.
pub fn status(name: &str) -> Option<String> {
    let ctl = control().ok()?;
    let b = dm(&ctl, dm::DM_TABLE_STATUS, dm::status_request(name, dm::REPLY_LEN)?, "status", name).ok()?;
    dm::verity_verdict(&dm::parse_status(&b).ok()?).map(str::to_string)
}
