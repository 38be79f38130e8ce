//! The rootfs of one build: init images flattened at `/`, on-disk containers in LinuxKit's
//! `/containers/{onboot,services}/NAME/{rootfs,config.json}`, external containers as metadata
//! only, `files:` entries, and slotforge's own metadata (`/etc/slotforge/release.json`,
//! `/etc/slotforge/external-images.json`). Also the size-cap check and its report.
//! Formats: docs/formats.md.

use crate::format::layout::{Layout, Slot};
use crate::builder::manifest::{parse_mode, Section};
use crate::oci::ResolvedImage;
use crate::format::tree::{components, Content, Kind, Meta, Node, Tree};
use serde::Serialize;
use std::sync::Arc;
use crate::format::release::ExternalImage;
use crate::base::text::mib;

/// Something that put bytes into the rootfs, for the oversize report.
#[derive(Debug, Clone, Serialize)]
pub struct Contributor {
    /// `init`, `onboot`, `services`, `onshutdown`, `kernel-modules`, `files`, `slotforge`.
    pub kind: String,
    pub name: String,
    pub reference: Option<String>,
    /// Uncompressed file bytes it put in the rootfs.
    pub bytes: u64,
    /// An on-disk service/onboot container that `ondisk: false` could move out.
    pub movable: bool,
}


fn file_node(data: Vec<u8>, mode: u16, epoch: u64, origin: u32) -> Node {
    let size = data.len() as u64;
    Node { meta: Meta::new(mode, epoch), kind: Kind::File { content: Content::Inline(Arc::new(data)), size, link: None }, layer: u32::MAX, origin }
}

/// Put a file whose bytes are elsewhere (spilled, or on the host) at `path` (relative).
pub fn put_content(t: &mut Tree, path: &str, content: Content, size: u64, mode: u16, epoch: u64, origin: u32) -> anyhow::Result<()> {
    let comps = components(path.as_bytes(), true).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    let node = Node { meta: Meta::new(mode, epoch), kind: Kind::File { content, size, link: None }, layer: u32::MAX, origin };
    t.insert(&comps, node).map_err(|e| anyhow::anyhow!("{path}: {e}"))
}

/// Put a generated file at `path` (relative), creating parents.
pub fn put_file(t: &mut Tree, path: &str, data: Vec<u8>, mode: u16, epoch: u64, origin: u32) -> anyhow::Result<()> {
    let comps = components(path.as_bytes(), true).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    t.insert(&comps, file_node(data, mode, epoch, origin)).map_err(|e| anyhow::anyhow!("{path}: {e}"))
}


/// What LinuxKit takes from an image's config: entrypoint + cmd, env, working dir, and the
/// `org.mobyproject.config` label.
pub fn image_defaults(img: &ResolvedImage) -> crate::linuxkit::oci::ImageDefaults {
    let cfg = img.config.config().clone().unwrap_or_default();
    crate::linuxkit::oci::ImageDefaults {
        entrypoint: cfg.entrypoint().clone().unwrap_or_default(),
        cmd: cfg.cmd().clone().unwrap_or_default(),
        env: cfg.env().clone(),
        working_dir: cfg.working_dir().clone().unwrap_or_default(),
        label: cfg.labels().as_ref().and_then(|l| l.get(crate::linuxkit::spec::LABEL)).filter(|t| !t.is_empty()).cloned(),
    }
}

/// The manifest as a `files: metadata:` entry holds it: LinuxKit's sections, as YAML or JSON.
pub fn metadata(m: &crate::builder::manifest::LoadedManifest, kind: &str) -> anyhow::Result<Vec<u8>> {
    let mf = &m.manifest;
    #[derive(Serialize)]
    struct Moby<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        kernel: Option<&'a crate::builder::manifest::Kernel>,
        init: Vec<&'a str>,
        onboot: Vec<&'a crate::builder::manifest::Service>,
        onshutdown: Vec<&'a crate::builder::manifest::Service>,
        services: Vec<&'a crate::builder::manifest::Service>,
        files: &'a [crate::builder::manifest::FileEntry],
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        volumes: &'a [crate::builder::manifest::Volume],
    }
    // Image references as LinuxKit writes them (its `UpdateImages`): canonical, `docker.io/...`.
    use crate::linuxkit::spec::reference_expand;
    let kernel = mf.kernel.clone().map(|mut k| {
        k.image.value = reference_expand(&k.image.value);
        k
    });
    let init: Vec<String> = mf.init.iter().map(|i| reference_expand(&i.value)).collect();
    let expand = |list: &[serde_saphyr::Spanned<crate::builder::manifest::Service>]| -> Vec<crate::builder::manifest::Service> {
        list.iter()
            .map(|s| {
                let mut s = s.value.clone();
                if let Some(i) = s.image.as_mut() {
                    i.value = reference_expand(&i.value);
                }
                s
            })
            .collect()
    };
    let (onboot, onshutdown, services) = (expand(&mf.onboot), expand(&mf.onshutdown), expand(&mf.services));
    let v = Moby {
        kernel: kernel.as_ref(),
        init: init.iter().map(String::as_str).collect(),
        onboot: onboot.iter().collect(),
        onshutdown: onshutdown.iter().collect(),
        services: services.iter().collect(),
        files: &mf.files,
        volumes: &mf.volumes,
    };
    Ok(match kind {
        "json" => crate::linuxkit::oci::to_json(&v),
        "yaml" => serde_saphyr::to_string(&v).map_err(|e| anyhow::anyhow!("metadata: {e}"))?.into_bytes(),
        other => anyhow::bail!("unsupported metadata type: {other}"),
    })
}

/// Apply `files:` entry `n` as LinuxKit does: files default to mode 0600 and directories to
/// 0700; every parent directory not already made by an earlier entry is (re)set to the entry's
/// mode plus search bits and to its owner; `uid`/`gid` may name a container; `optional`
/// skips an unreadable `source`; `metadata` writes the manifest itself.
pub fn apply_file_entry(t: &mut Tree, m: &crate::builder::manifest::LoadedManifest, n: usize, ids: &crate::linuxkit::oci::IdMap, added: &mut std::collections::BTreeSet<String>, epoch: u64, origin: u32) -> anyhow::Result<()> {
    let f = &m.manifest.files[n];
    let rel = f.path.value.trim_start_matches('/').to_string();
    let mode = match &f.mode {
        Some(s) => parse_mode(s).map_err(|e| anyhow::anyhow!(e))?,
        None if f.directory => 0o700,
        None => 0o600,
    };
    let mut dir_mode = mode;
    for (any, x) in [(0o700, 0o100), (0o070, 0o010), (0o007, 0o001)] {
        if dir_mode & any != 0 {
            dir_mode |= x;
        }
    }
    let uid = crate::linuxkit::oci::id_numeric(f.uid.as_ref(), ids).map_err(|e| anyhow::anyhow!(e))?;
    let gid = crate::linuxkit::oci::id_numeric(f.gid.as_ref(), ids).map_err(|e| anyhow::anyhow!(e))?;
    let kind = if f.directory {
        Kind::Dir(Default::default())
    } else if let Some(target) = &f.symlink {
        Kind::Symlink(target.clone().into_bytes())
    } else if let Some(c) = &f.contents {
        Kind::File { content: Content::Inline(Arc::new(c.clone().into_bytes())), size: c.len() as u64, link: None }
    } else if let Some(src) = &f.source {
        let p = m.source_path(src);
        let md = match std::fs::metadata(&p) {
            Ok(md) => md,
            Err(_) if f.optional => return Ok(()),
            Err(e) => anyhow::bail!("source {}: {e}", p.display()),
        };
        if !md.is_file() {
            anyhow::bail!("source {} is not a regular file", p.display());
        }
        Kind::File { content: Content::Path(p), size: md.len(), link: None }
    } else {
        let data = metadata(m, f.metadata.as_deref().expect("checked: source or metadata"))?;
        Kind::File { size: data.len() as u64, content: Content::Inline(Arc::new(data)), link: None }
    };
    let comps = components(rel.as_bytes(), true).map_err(|e| anyhow::anyhow!(e))?;
    let meta = |mode: u16| Meta { uid, gid, ..Meta::new(mode, epoch) };
    for i in 1..comps.len() {
        let parent = crate::format::tree::display(&comps[..i]);
        if added.insert(parent.trim_start_matches('/').to_string()) {
            t.insert(&comps[..i], Node::dir(meta(dir_mode), u32::MAX, origin)).map_err(|e| anyhow::anyhow!(e))?;
        }
    }
    added.insert(rel);
    t.insert(&comps, Node { meta: meta(mode), kind, layer: u32::MAX, origin }).map_err(|e| anyhow::anyhow!(e))
}

/// The slack of a rootfs against one layout's slots.
#[derive(Debug, Clone, Serialize)]
pub struct CapCheck {
    pub layout: String,
    pub generation: u32,
    pub partition: String,
    pub cap: u64,
    /// Everything the slot holds: the squashfs and its dm-verity hash area.
    pub rootfs_bytes: u64,
    /// The dm-verity hash area's share of `rootfs_bytes` (0 without verity).
    pub verity_bytes: u64,
    /// `cap - rootfs_bytes`; negative when it does not fit.
    pub slack: i64,
}

/// Check `size` against the smaller of each layout's two slot caps.
/// The record of an external image as its build pins it.
pub fn external_image_of(name: &str, section: Section, img: &ResolvedImage) -> ExternalImage {
    ExternalImage {
        name: name.to_string(),
        section: section.dir().to_string(),
        reference: img.reference.clone(),
        digest: img.manifest_digest.to_string(),
        media_type: img.manifest_media_type.clone(),
        platform: img.platform.to_string(),
        size: img.stored_size(),
        bundle: String::new(),
        readonly: false,
        sealed: None,
        keep_layers: false,
    }
}

pub fn cap_checks(size: u64, verity_bytes: u64, layouts: &[&Layout]) -> Vec<CapCheck> {
    layouts
        .iter()
        .map(|l| {
            let p = [l.rootfs(Slot::A), l.rootfs(Slot::B)].into_iter().min_by_key(|p| p.fs_cap).unwrap();
            CapCheck { layout: l.name.clone(), generation: l.generation, partition: p.name.clone(), cap: p.fs_cap, rootfs_bytes: size, verity_bytes, slack: p.fs_cap as i64 - size as i64 }
        })
        .collect()
}


/// The message for a rootfs over its cap: by how much, the largest contributors, and which
/// on-disk containers could become `ondisk: false` to make it fit.
pub fn oversize_message(check: &CapCheck, contributors: &[Contributor]) -> String {
    let over = (-check.slack) as u64;
    let total: u64 = contributors.iter().map(|c| c.bytes).sum::<u64>().max(1);
    // Each contributor's share of the compressed image, estimated by the overall ratio.
    let ratio = (check.rootfs_bytes - check.verity_bytes) as f64 / total as f64;
    let est = |b: u64| (b as f64 * ratio) as u64;
    let mut sorted: Vec<&Contributor> = contributors.iter().filter(|c| c.bytes > 0).collect();
    sorted.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    let mut msg = format!(
        "rootfs is {} bytes ({}{}), {} bytes ({}) over the {} byte ({}) cap of layout {} generation {} partition {}; nothing was written.\nLargest contributors (uncompressed, ~share of the squashfs):\n",
        check.rootfs_bytes, mib(check.rootfs_bytes), if check.verity_bytes > 0 { format!(", of which {} dm-verity tree", mib(check.verity_bytes)) } else { String::new() }, over, mib(over), check.cap, mib(check.cap), check.layout, check.generation, check.partition
    );
    for c in sorted.iter().take(8) {
        msg += &format!("  {:<11} {:<24} {:>12}  ~{}{}\n", c.kind, c.name, mib(c.bytes), mib(est(c.bytes)), c.reference.as_ref().map(|r| format!("  ({r})")).unwrap_or_default());
    }
    let mut movable: Vec<&&Contributor> = sorted.iter().filter(|c| c.movable).collect();
    movable.sort_by(|a, b| b.bytes.cmp(&a.bytes));
    let mut saved = 0u64;
    let mut pick = Vec::new();
    for c in &movable {
        if saved >= over {
            break;
        }
        saved += est(c.bytes);
        pick.push(c.name.clone());
    }
    if movable.is_empty() {
        msg += "No on-disk container is left to move out; shrink the init images or files.";
    } else if saved >= over {
        msg += &format!("Marking {} `ondisk: false` would move ~{} out of the rootfs, enough to fit.", pick.join(", "), mib(saved));
    } else {
        msg += &format!("Even with every on-disk container ({}) marked `ondisk: false` (~{}), it would not fit.", pick.join(", "), mib(saved));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_writes_image_references_as_linuxkit_does() {
        let text = "kernel:\n  image: linuxkit/kernel:6.6.13\n  cmdline: console=ttyS0\ninit:\n  - linuxkit/init:v1.0.0\n  - alpine:3.19\nonboot:\n  - name: dhcpcd\n    image: registry.example/net/dhcpcd:1\nservices:\n  - name: local\n    image: localhost/svc:2\n  - name: mine\n    image: oci:images/mine:1\n  - name: host\n    image: reg:5000/svc:3\n";
        let m = crate::builder::manifest::parse(std::path::Path::new("m.yml"), text).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&metadata(&m, "json").unwrap()).unwrap();
        assert_eq!(v["kernel"]["image"], "docker.io/linuxkit/kernel:6.6.13");
        assert_eq!(v["init"], serde_json::json!(["docker.io/linuxkit/init:v1.0.0", "docker.io/library/alpine:3.19"]));
        assert_eq!(v["onboot"][0]["image"], "registry.example/net/dhcpcd:1", "three parts: kept");
        let images: Vec<&str> = v["services"].as_array().unwrap().iter().map(|s| s["image"].as_str().unwrap()).collect();
        assert_eq!(images, ["localhost/svc:2", "oci:images/mine:1", "reg:5000/svc:3"], "a registry host or a transport is kept");
    }

    #[test]
    fn oversize_message_names_overshoot_and_candidates() {
        let check = CapCheck { layout: "edge".into(), generation: 1, partition: "rootfs_a".into(), cap: 100 << 20, rootfs_bytes: 130 << 20, verity_bytes: 1 << 20, slack: -(30 << 20) };
        let cs = vec![
            Contributor { kind: "init".into(), name: "base".into(), reference: None, bytes: 40 << 20, movable: false },
            Contributor { kind: "services".into(), name: "analytics".into(), reference: Some("oci:x".into()), bytes: 80 << 20, movable: true },
            Contributor { kind: "services".into(), name: "small".into(), reference: None, bytes: 10 << 20, movable: true },
        ];
        let m = oversize_message(&check, &cs);
        assert!(m.contains("31457280 bytes (30.0 MiB) over"), "{m}");
        assert!(m.contains("Marking analytics `ondisk: false`"), "{m}");
        let first = m.lines().nth(2).unwrap();
        assert!(first.contains("analytics"), "largest first: {m}");
    }
}
