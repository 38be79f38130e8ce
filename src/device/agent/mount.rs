//! mount(2)/umount(2) for the agent: sealed images mounted read-only, container mounts made
//! from LinuxKit's option strings.

use anyhow::bail;
use std::ffi::CString;
use std::path::Path;

pub(crate) fn cstr(p: &Path) -> anyhow::Result<CString> {
    Ok(CString::new(p.as_os_str().as_encoded_bytes())?)
}

pub(crate) fn mount(src: &Path, dst: &Path, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>) -> anyhow::Result<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    let t = fstype.map(CString::new).transpose()?;
    let o = data.map(CString::new).transpose()?;
    // SAFETY: every pointer is a valid NUL-terminated string or null, alive for the call.
    let rc = unsafe { libc::mount(s.as_ptr(), d.as_ptr(), t.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()), flags, o.as_ref().map_or(std::ptr::null(), |o| o.as_ptr().cast())) };
    if rc != 0 {
        bail!("mount {} on {}: {}", src.display(), dst.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn umount(p: &Path) {
    if let Ok(c) = cstr(p) {
        // SAFETY: a valid path string; failure (not mounted) is fine for a best-effort cleanup.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Every mount stacked at `p` (a bundle's root can hold the image bind and the read-only
/// self-bind over it), topmost first, until none is left.
pub(crate) fn umount_all(p: &Path) {
    let Ok(c) = cstr(p) else { return };
    for _ in 0..16 {
        // SAFETY: a valid path string; stops at the first failure (nothing mounted there).
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            break;
        }
    }
}

/// fstab-style options → `mount(2)` flags and the data string (what is not a flag), as
/// LinuxKit's init reads them.
pub fn mount_options(options: &[String]) -> (libc::c_ulong, String) {
    let table: &[(&str, bool, libc::c_ulong)] = &[
        ("async", true, libc::MS_SYNCHRONOUS),
        ("atime", true, libc::MS_NOATIME),
        ("bind", false, libc::MS_BIND),
        ("dev", true, libc::MS_NODEV),
        ("diratime", true, libc::MS_NODIRATIME),
        ("dirsync", false, libc::MS_DIRSYNC),
        ("exec", true, libc::MS_NOEXEC),
        ("mand", false, libc::MS_MANDLOCK),
        ("noatime", false, libc::MS_NOATIME),
        ("nodev", false, libc::MS_NODEV),
        ("nodiratime", false, libc::MS_NODIRATIME),
        ("noexec", false, libc::MS_NOEXEC),
        ("nomand", true, libc::MS_MANDLOCK),
        ("norelatime", true, libc::MS_RELATIME),
        ("nostrictatime", true, libc::MS_STRICTATIME),
        ("nosuid", false, libc::MS_NOSUID),
        ("private", false, libc::MS_PRIVATE),
        ("rbind", false, libc::MS_BIND | libc::MS_REC),
        ("relatime", false, libc::MS_RELATIME),
        ("remount", false, libc::MS_REMOUNT),
        ("ro", false, libc::MS_RDONLY),
        ("rw", true, libc::MS_RDONLY),
        ("shared", false, libc::MS_SHARED),
        ("slave", false, libc::MS_SLAVE),
        ("strictatime", false, libc::MS_STRICTATIME),
        ("suid", true, libc::MS_NOSUID),
        ("sync", false, libc::MS_SYNCHRONOUS),
        ("unbindable", false, libc::MS_UNBINDABLE),
    ];
    let mut flags = 0;
    let mut data = Vec::new();
    for o in options {
        match table.iter().find(|(n, _, _)| n == o) {
            Some((_, true, f)) => flags &= !f,
            Some((_, false, f)) => flags |= f,
            None => data.push(o.as_str()),
        }
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let o = |v: &[&str]| mount_options(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(o(&["rbind", "rshared"]), (libc::MS_BIND | libc::MS_REC, "rshared".into()), "rshared is not in LinuxKit's table: passed as data");
        assert_eq!(o(&["remount", "private"]), (libc::MS_REMOUNT | libc::MS_PRIVATE, String::new()));
        assert_eq!(o(&["ro", "rw", "nosuid"]), (libc::MS_NOSUID, String::new()), "rw clears ro");
        assert_eq!(o(&["lowerdir=/a", "upperdir=/b"]), (0, "lowerdir=/a,upperdir=/b".into()));
    }
}
