//! Sealed external images on the device: open the sealed blob with dm-verity under the root hash
//! the verified rootfs pins (device::agent::dmverity: a read-only loop device under a verity table),
//! mount the squashfs read-only where the runner binds a container's image from, read dm-verity's
//! verdict back (`corrupted` after a failed read), and rebuild a missing or corrupt sealed image
//! from its OCI image, bit-identically, before accepting it. Nothing is unpacked and no image
//! content is copied to RAM.

use crate::device::AgentConfig;
use crate::base::hash::{digest_reader, Digest};
use crate::oci::image::resolve_digest;
use crate::oci::local::OciDir;
use crate::oci::{BlobSource, Platform};
use crate::format::release::ExternalImage;
use crate::format::sealed::Sealed;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::sync::Arc;
pub use crate::format::agent::SealedState;

/// The device-mapper name of an external image's sealed filesystem.
pub fn dm_name(img: &ExternalImage) -> String {
    format!("slotforge-{}", img.name)
}

/// Where the sealed filesystem is mounted (the runner binds it into the container's bundle).
pub fn mount_point(cfg: &AgentConfig, img: &ExternalImage) -> PathBuf {
    cfg.run_dir.join("containers").join(&img.name).join("rootfs")
}

pub fn blob_path(cfg: &AgentConfig, s: &Sealed) -> PathBuf {
    cfg.images.join("blobs/sha256").join(s.digest.trim_start_matches("sha256:"))
}

/// dm-verity's verdict on an open device, as `veritysetup status` words it (`verified`,
/// `corrupted`).
pub fn verity_status(name: &str) -> Option<String> {
    super::dmverity::status(name)
}

/// Unmount and close an image's sealed filesystem (best effort; nothing open is fine).
pub fn close(cfg: &AgentConfig, img: &ExternalImage) {
    super::mount::umount(&mount_point(cfg, img));
    if Path::new("/dev/mapper").join(dm_name(img)).exists() {
        let _ = super::dmverity::remove(&dm_name(img));
    }
}

/// Open `img`'s sealed blob with dm-verity under the pinned root hash and mount it read-only.
pub fn open(cfg: &AgentConfig, img: &ExternalImage, s: &Sealed) -> anyhow::Result<SealedState> {
    open_on(cfg, img, s, &blob_path(cfg, s))
}

/// [`open`] over `file`: the sealed blob, or a block device serving it (a lazily started image).
pub fn open_on(cfg: &AgentConfig, img: &ExternalImage, s: &Sealed, file: &Path) -> anyhow::Result<SealedState> {
    close(cfg, img);
    let name = dm_name(img);
    // Every block the kernel hands up is checked against the tree up to the root hash, which
    // (like every other parameter of the table) comes from the verified rootfs.
    let dev = super::dmverity::open(&name, file, s).with_context(|| format!("{}: dm-verity refused the sealed image", img.name))?;
    let at = mount_point(cfg, img);
    std::fs::create_dir_all(&at)?;
    if let Err(e) = super::mount::mount(&dev, &at, Some(&s.filesystem), libc::MS_RDONLY | libc::MS_NODEV, None) {
        let _ = super::dmverity::remove(&name);
        return Err(e.context(format!("{}: mounting the sealed image", img.name)));
    }
    Ok(SealedState { root_hash: s.root_hash.clone(), device: Some(dev.display().to_string()), mounted: Some(at.display().to_string()), verity: verity_status(&name) })
}

/// The live state of `img`'s sealed filesystem (what `agent status` reports).
pub fn state(cfg: &AgentConfig, img: &ExternalImage, s: &Sealed) -> SealedState {
    let name = dm_name(img);
    let dev = Path::new("/dev/mapper").join(&name);
    let open = dev.exists();
    let at = mount_point(cfg, img);
    let mounted = is_mounted(cfg, img);
    SealedState {
        root_hash: s.root_hash.clone(),
        device: open.then(|| dev.display().to_string()),
        mounted: mounted.then(|| at.display().to_string()),
        verity: if open { verity_status(&name) } else { None },
    }
}

/// Whether `img`'s sealed filesystem is mounted (from the mount table, without a process start).
pub fn is_mounted(cfg: &AgentConfig, img: &ExternalImage) -> bool {
    let at = mount_point(cfg, img);
    std::fs::read_to_string("/proc/self/mountinfo").ok().is_some_and(|mi| mi.lines().any(|l| l.split(' ').nth(4) == Some(at.to_str().unwrap_or(""))))
}

/// Rebuild `img`'s sealed image from its OCI image in the images partition (its layers must be
/// there: kept, or just pulled), exactly as the build did; accept it only if it is bit-identical
/// to what the rootfs pins (same digest, so the same root hash), then put the sealed blob and
/// its artifact manifest in place. Returns the bytes written.
pub fn reseal(cfg: &AgentConfig, img: &ExternalImage, s: &Sealed) -> anyhow::Result<u64> {
    let src: Arc<dyn BlobSource> = Arc::new(OciDir::open(&cfg.images, format!("images:{}", img.name))?);
    let digest = Digest::parse(&img.digest).map_err(|e| anyhow::anyhow!(e))?;
    let size = std::fs::metadata(cfg.images.join("blobs/sha256").join(digest.hex()))?.len();
    let platform: Platform = img.platform.parse().unwrap_or_default();
    let resolved = resolve_digest(&img.name, src, &digest, size, &img.media_type, &platform)?;
    // Spill and output on the images partition (disk), not in RAM.
    let partial = cfg.images.join(".partial");
    std::fs::create_dir_all(&partial)?;
    let out = partial.join(format!("{}.sealed", img.name));
    let mut spill = crate::format::tree::Spill::new_in(&partial)?;
    let (got, artifact) = crate::compose::seal::seal(&resolved, &s.mkdirs, crate::format::sealed::pinned_salt(s)?, &out, &mut spill, &mut |_| {}, None)?;
    drop(spill);
    if got.digest != s.digest || got.root_hash != s.root_hash || got.artifact != s.artifact {
        let _ = std::fs::remove_file(&out);
        bail!("{}: the rebuilt sealed image has root hash {} (digest {}), but the rootfs pins {} ({}); refused", img.name, got.root_hash, got.digest, s.root_hash, s.digest);
    }
    let (d, n) = digest_reader(std::fs::File::open(&out)?)?;
    if d.as_str() != s.digest || n != s.size {
        bail!("{}: the rebuilt sealed image changed on disk; refused", img.name);
    }
    let store = crate::base::cache::Cache::open_layout(&cfg.images)?;
    store.put_bytes(&artifact)?;
    store.put_bytes(crate::format::sealed::EMPTY_JSON)?;
    let dest = blob_path(cfg, s);
    std::fs::rename(&out, &dest)?;
    crate::base::durable::sync_fs(&cfg.images)?;
    Ok(n)
}

/// Read `img`'s open sealed device end to end (every block checked by dm-verity against the
/// pinned root hash). Returns the bytes read; an I/O error means dm-verity refused a block
/// (the device then reports `corrupted`).
pub fn scrub(img: &ExternalImage) -> anyhow::Result<u64> {
    use std::io::Read;
    let dev = Path::new("/dev/mapper").join(dm_name(img));
    let mut f = std::fs::File::open(&dev).with_context(|| format!("{} is not open", dev.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => n += k as u64,
            Err(e) => bail!("{}: read error at byte {n}: {e}", dev.display()),
        }
    }
}

/// A sealed image dm-verity caught corrupt and that could not be repaired this boot: marked in
/// the run directory (tmpfs, so a reboot checks again), so the status says `corrupt` although
/// the blob is present and closed.
pub fn mark_corrupt(cfg: &AgentConfig, img: &ExternalImage, corrupt: bool) {
    let p = cfg.run_dir.join("corrupt").join(&img.name);
    if corrupt {
        let _ = std::fs::create_dir_all(p.parent().unwrap());
        let _ = std::fs::write(&p, b"");
    } else {
        let _ = std::fs::remove_file(&p);
    }
}

pub fn marked_corrupt(cfg: &AgentConfig, img: &ExternalImage) -> bool {
    cfg.run_dir.join("corrupt").join(&img.name).exists()
}
