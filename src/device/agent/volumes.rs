//! LinuxKit's named volumes at boot, as LinuxKit's init makes them: each
//! `/containers/volumes/NAME/merged` becomes an overlay of `lower` under a tmpfs upper layer
//! (in `tmp`) when the build left a `tmp` directory, else `lower` bound read-only. Done once,
//! before the first onboot container; writes to a writable volume last until power-off and are
//! shared by every container that binds it. Layout: [`crate::linuxkit::volume`].

use super::mount::mount;
use crate::format::agent::Event;
use crate::device::emit;
use std::path::Path;

/// Make one volume's `merged` directory: read-only bind or overlay. Returns whether read-only.
fn mount_volume(dir: &Path) -> anyhow::Result<bool> {
    let (lower, merged, tmp) = (dir.join("lower"), dir.join("merged"), dir.join("tmp"));
    for (p, what) in [(&lower, "lower"), (&merged, "merged")] {
        if !p.is_dir() {
            anyhow::bail!("no {what} directory");
        }
    }
    if !tmp.is_dir() {
        mount(&lower, &merged, None, libc::MS_BIND, None)?;
        mount(Path::new("none"), &merged, None, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY, None)?;
        return Ok(true);
    }
    mount(Path::new("tmpfs"), &tmp, Some("tmpfs"), libc::MS_RELATIME, Some("mode=0755"))?;
    let (upper, work) = (tmp.join("upper"), tmp.join("work"));
    std::fs::create_dir(&upper)?;
    std::fs::create_dir(&work)?;
    let data = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
    mount(Path::new("overlay"), &merged, Some("overlay"), libc::MS_RELATIME, Some(&data))?;
    Ok(false)
}

/// Every volume under `root`, in name order; each reported as `volume-mounted` or
/// `volume-failed` (a container binding a failed volume then fails to start, as under LinuxKit).
pub fn mount_all(root: &Path) {
    let base = root.join(crate::linuxkit::volume::VOLUMES_DIR);
    let Ok(rd) = std::fs::read_dir(&base) else { return };
    let mut names: Vec<String> = rd.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    for name in names {
        match mount_volume(&base.join(&name)) {
            Ok(readonly) => emit(Event::VolumeMounted { name, readonly }),
            Err(e) => emit(Event::VolumeFailed { name, error: format!("{e:#}") }),
        }
    }
}
