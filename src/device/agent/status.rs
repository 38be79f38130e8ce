//! What the agent knows about the device: booted slot and build, both slots' boot-counting
//! state, and each external image of the booted build — verified, missing or corrupt — checked
//! blob by blob against the digests the rootfs pins.

use crate::device::AgentConfig;
use crate::base::hash::{digest_reader, Digest};
use crate::format::images::{Idx, METADATA_FILE};
use crate::oci::image::REF_NAME;
use crate::format::release::{ExternalImage, ExternalImages, Release, EXTERNAL_PATH, RELEASE_PATH};
use std::path::Path;
pub use crate::format::agent::{BootState, ImageState, ImageStatus, RootDevice, SlotState, Status, StatusState};

/// The global `SecureBoot` EFI variable: 4 attribute bytes, then 1 = enforcing.
const SECURE_BOOT_VAR: &str = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

fn secure_boot() -> Option<bool> {
    std::fs::read(SECURE_BOOT_VAR).ok().and_then(|b| b.get(4).map(|v| *v == 1))
}

/// `major:minor` of the last mount at `/` in a mountinfo text (proc(5): field 5 is the mount
/// point, field 3 the device).
pub fn root_dev(mountinfo: &str) -> Option<String> {
    mountinfo.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&"/")).then(|| f.get(2).map(|s| s.to_string())).flatten()
    }).last()
}

fn root_device(cmdline: &str) -> Option<RootDevice> {
    let dev = root_dev(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)?;
    let dm = |f: &str| std::fs::read_to_string(format!("/sys/dev/block/{dev}/dm/{f}")).ok().map(|s| s.trim().to_string());
    Some(RootDevice { dm_name: dm("name"), dm_uuid: dm("uuid"), root_hash: crate::format::cmdline::value(cmdline, "roothash"), dev })
}

pub fn read_release(root: &Path) -> anyhow::Result<(Release, ExternalImages)> {
    let rel: Release = serde_json::from_slice(&std::fs::read(root.join(RELEASE_PATH)).map_err(|e| anyhow::anyhow!("{}: {e}", root.join(RELEASE_PATH).display()))?)?;
    let ext: ExternalImages = match std::fs::read(root.join(EXTERNAL_PATH)) {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(_) => ExternalImages { format: 1, build_id: rel.build_id.clone(), images: vec![] },
    };
    Ok((rel, ext))
}

pub fn slot_states(esp: &Path) -> Vec<SlotState> {
    let entries = crate::format::entries::list(&crate::format::entries::DirView(esp.to_path_buf()));
    ["a", "b"]
        .into_iter()
        .map(|slot| {
            // A slot's entry of either kind; the newest install if (after a cut) there are two.
            let e = entries.iter().filter(|e| e.slot.as_deref() == Some(slot)).max_by_key(|e| e.install_number());
            let (boot, left, done) = match e {
                None => (BootState::None, None, None),
                Some(e) => match (e.tries_left, e.tries_done) {
                    (None, _) => (BootState::Good, None, None),
                    (Some(0), d) => (BootState::Bad, Some(0), d),
                    (Some(l), d) => (BootState::Trying, Some(l), d),
                },
            };
            SlotState { slot: slot.into(), entry: e.map(|e| e.file.clone()), boot, tries_left: left, tries_done: done }
        })
        .collect()
}


fn blob(images: &Path, d: &str) -> std::path::PathBuf {
    images.join("blobs/sha256").join(d.trim_start_matches("sha256:"))
}

/// Check one external image of `build_id` in the partition at `images`, every blob hashed.
pub fn check_image(images: &Path, build_id: &str, img: &ExternalImage) -> ImageState {
    let mut st = ImageState { name: img.name.clone(), digest: img.digest.clone(), state: ImageStatus::Missing, detail: None, bad_blobs: vec![], bytes: 0, sealed: None };
    let listed = (|| -> Option<()> {
        let top: Idx = serde_json::from_slice(&crate::oci::read_json_file(&images.join("index.json")).ok()?).ok()?;
        let b = top.manifests.iter().find(|m| m.annotations.get(REF_NAME).map(String::as_str) == Some(build_id))?;
        let nested: Idx = serde_json::from_slice(&crate::oci::read_json_file(&blob(images, &b.digest)).ok()?).ok()?;
        nested.manifests.iter().find(|m| m.digest == img.digest)?;
        match &img.sealed {
            Some(sl) => nested.manifests.iter().find(|m| m.digest == sl.artifact).map(|_| ()),
            None => Some(()),
        }
    })();
    if listed.is_none() {
        st.detail = Some(format!("not in build {build_id}'s set in the images partition"));
        return st;
    }
    // The manifest: present and matching its digest, else nothing it names can be trusted.
    let mbytes = match std::fs::read(blob(images, &img.digest)) {
        Ok(b) => b,
        Err(_) => {
            st.detail = Some(format!("manifest {} is missing", img.digest));
            return st;
        }
    };
    if Digest::of_bytes(&mbytes).as_str() != img.digest {
        st.state = ImageStatus::Corrupt;
        st.bad_blobs.push(img.digest.clone());
        st.detail = Some(format!("manifest {} does not match its digest", img.digest));
        return st;
    }
    let blobs = match crate::format::images::required_blobs(img, &mbytes) {
        Ok(b) => b,
        Err(e) => {
            st.state = ImageStatus::Corrupt;
            st.detail = Some(format!("manifest is not an image manifest: {e:#}"));
            return st;
        }
    };
    let sealed_blob = img.sealed.as_ref().map(|s| s.digest.as_str());
    let mut missing = Vec::new();
    for (d, size) in blobs.iter().skip(1) {
        let path = blob(images, d.as_str());
        if Some(d.as_str()) == sealed_blob {
            // The sealed filesystem is checked by dm-verity on every read, under the root hash
            // the verified rootfs pins: here only that it is there, whole.
            match std::fs::metadata(&path) {
                Ok(m) if m.len() == *size => st.bytes += size,
                Ok(_) => st.bad_blobs.push(d.to_string()),
                Err(_) => missing.push(d.to_string()),
            }
            continue;
        }
        match std::fs::File::open(&path).map_err(anyhow::Error::from).and_then(|f| Ok(digest_reader(f)?)) {
            Ok((got, n)) if got == *d && n == *size => st.bytes += n,
            Ok(_) => st.bad_blobs.push(d.to_string()),
            Err(_) => missing.push(d.to_string()),
        }
    }
    st.bytes += mbytes.len() as u64;
    if !st.bad_blobs.is_empty() {
        st.state = ImageStatus::Corrupt;
        st.detail = Some(format!("{} blob(s) do not match their digests", st.bad_blobs.len()));
    } else if !missing.is_empty() {
        st.detail = Some(format!("{} blob(s) missing", missing.len()));
    } else {
        st.state = ImageStatus::Verified;
    }
    st
}

/// The whole status of the device (every external image checked now).
pub fn status(cfg: &AgentConfig) -> anyhow::Result<Status> {
    let (_, ext) = read_release(&cfg.root)?;
    let images: Vec<ImageState> = ext
        .images
        .iter()
        .map(|i| {
            let mut st = check_image(&cfg.images, &ext.build_id, i);
            if let Some(s) = &i.sealed {
                let live = super::sealed::state(cfg, i, s);
                if st.state == ImageStatus::Missing && live.mounted.is_some() && super::lazy::active(cfg, i).is_some() {
                    st.state = ImageStatus::Lazy;
                    st.detail = Some("served from its registry while it is filled in".into());
                }
                if live.verity.as_deref() == Some("corrupted") || super::sealed::marked_corrupt(cfg, i) {
                    st.state = ImageStatus::Corrupt;
                    st.detail = Some("dm-verity found a block that does not match the pinned root hash".into());
                }
                st.sealed = Some(live);
            }
            st
        })
        .collect();
    status_with(cfg, images)
}

/// The status with image states already known (the boot sequence's, which include what
/// happened after the check: a failed pull or a failed prepare). `ok` only if all are verified
/// (or lazily served).
pub fn status_with(cfg: &AgentConfig, images: Vec<ImageState>) -> anyhow::Result<Status> {
    let (rel, _) = read_release(&cfg.root)?;
    let cmdline = std::fs::read_to_string(&cfg.cmdline).unwrap_or_default();
    let state = if images.iter().all(|i| i.state.ready()) { StatusState::Ok } else { StatusState::Degraded };
    Ok(Status {
        slot: crate::format::cmdline::value(&cmdline, "slotforge.slot"),
        version: rel.version,
        build_id: rel.build_id,
        state: state.into(),
        slots: slot_states(&cfg.esp),
        images,
        root_device: if cfg.root == Path::new("/") { root_device(&cmdline) } else { None },
        secure_boot: if cfg.root == Path::new("/") { secure_boot() } else { None },
    })
}

/// Whether the partition's metadata says this agent may write to it.
pub fn writable(images: &Path) -> anyhow::Result<()> {
    if let Ok(b) = std::fs::read(images.join(METADATA_FILE)) {
        let m: crate::format::images::Metadata = serde_json::from_slice(&b)?;
        if m.format > crate::format::images::FORMAT_VERSION || !m.incompatible.is_empty() || !m.ro_compatible.is_empty() {
            anyhow::bail!("images partition format {} (features {:?}/{:?}) is newer than this agent", m.format, m.incompatible, m.ro_compatible);
        }
    }
    Ok(())
}
