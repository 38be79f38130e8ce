//! Durable changes on a mounted file system (the device's ESP and images partition): write a
//! temporary file, fsync, rename, then `syncfs` — the order a power cut cannot tear. Used by the
//! images partition, upgrades, GC and the agent, so it sits below all of them.

use std::io::Read;
use std::path::Path;

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
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
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
