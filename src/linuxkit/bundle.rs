//! Where LinuxKit puts a container in the root filesystem and what it changes in an image's
//! files: `/containers/onboot/NNN-NAME/`, `/containers/onshutdown/NNN-NAME/` and
//! `/containers/services/NAME/`, each with `config.json`, `runtime.json` and the image at
//! `rootfs/` (read-only) or `lower/` + `tmp/` + `rootfs/` (writable, an overlay at run time);
//! and the fix-ups LinuxKit applies to every image it unpacks (docs/formats.md).

use super::oci::{runtime_json, to_json, Spec};
use super::spec::Runtime;
use super::spec::Section;
use crate::format::tree::{components, Content, Kind, Meta, Node, Tree};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where LinuxKit's init images point `/etc/resolv.conf` (a writable place).
pub const INIT_RESOLV_CONF: &str = "/run/resolvconf/resolv.conf";

const HOSTS: &str = "127.0.0.1       localhost\n::1     localhost ip6-localhost ip6-loopback\nfe00::0 ip6-localnet\nff00::0 ip6-mcastprefix\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n";
const NO_RESOLV_CONF: &str = "\n# no resolv.conf configured\n";

/// A container's directory, relative to `/`: onboot and onshutdown entries carry their
/// position (`000-`, `001-`…) so they run in manifest order.
pub fn bundle_dir(section: Section, index: usize, name: &str) -> String {
    match section {
        Section::Services => format!("containers/services/{name}"),
        s => format!("containers/{}/{index:03}-{name}", s.dir()),
    }
}

/// What the build writes for one container.
#[derive(Debug)]
pub struct Bundle {
    /// Relative to `/`, e.g. `containers/onboot/000-sysctl`.
    pub dir: String,
    pub readonly: bool,
    /// Where the image's files go (`DIR/rootfs` or `DIR/lower`), or `None` when an identical
    /// reference was already unpacked elsewhere (runtime.json binds that one).
    pub unpack_at: Option<String>,
    /// Empty directories to create (mount points).
    pub mount_points: Vec<String>,
    pub config_json: Vec<u8>,
    pub runtime_json: Vec<u8>,
}

/// Lay out one container. `unpacked` maps an image reference to where it was first unpacked
/// in this build; external images (`shareable == false`) are neither shared nor recorded.
pub fn plan(dir: String, spec: &Spec, runtime: &Runtime, reference: &str, shareable: bool, unpacked: &mut BTreeMap<String, String>) -> Bundle {
    let readonly = spec.root.readonly;
    let own = format!("{dir}/{}", if readonly { "rootfs" } else { "lower" });
    let shared = if shareable { unpacked.get(reference).cloned() } else { None };
    let mut mount_points = Vec::new();
    if !readonly {
        mount_points.push(format!("{dir}/tmp"));
        mount_points.push(format!("{dir}/rootfs"));
    } else if shared.is_some() || !shareable {
        mount_points.push(format!("{dir}/rootfs"));
    }
    if !shareable {
        // External: the device mounts the image at `own`; the directory is its mount point.
        mount_points.push(own.clone());
    }
    let unpack_at = match (&shared, shareable) {
        (None, true) => {
            unpacked.insert(reference.to_string(), own.clone());
            Some(own)
        }
        _ => None,
    };
    mount_points.sort();
    mount_points.dedup();
    let rt = runtime_json(runtime, &dir, readonly, shared.as_deref());
    Bundle { dir, readonly, unpack_at, mount_points, config_json: to_json(spec), runtime_json: to_json(&rt) }
}

fn path(p: &str) -> Vec<Vec<u8>> {
    components(p.as_bytes(), true).expect("fixed relative path")
}

fn file(data: &str, epoch: u64) -> Node {
    Node { meta: Meta::new(0o644, epoch), kind: Kind::File { content: Content::Inline(Arc::new(data.as_bytes().to_vec())), size: data.len() as u64, link: None }, layer: u32::MAX, origin: 0 }
}

/// LinuxKit's changes to an image's files: Docker leftovers (`.dockerenv`, `Dockerfile`,
/// `dev/console`, `etc/hostname`) removed; `etc/hosts` set to localhost entries;
/// `etc/resolv.conf` emptied (or, for init images, a symlink to `resolv_symlink`); `dev`,
/// `dev/pts`, `dev/shm`, `etc`, `proc`, `sys` and `etc/mtab -> /proc/mounts` made to exist.
pub fn fixups(t: &mut Tree, resolv_symlink: Option<&str>, epoch: u64, origin: u32) -> Result<(), String> {
    for p in [".dockerenv", "Dockerfile", "dev/console", "etc/hostname"] {
        let c = path(p);
        if t.get(&c).is_some_and(|n| !n.is_dir()) {
            t.remove(&c);
        }
    }
    for d in ["dev", "dev/pts", "dev/shm", "etc", "proc", "sys"] {
        if t.get(&path(d)).is_none() {
            t.insert(&path(d), Node::dir(Meta::new(0o755, epoch), u32::MAX, origin))?;
        }
    }
    if t.get(&path("etc/mtab")).is_none() {
        t.insert(&path("etc/mtab"), Node { meta: Meta::new(0o755, epoch), kind: Kind::Symlink(b"/proc/mounts".to_vec()), layer: u32::MAX, origin })?;
    }
    // The two replaced files keep an image's own metadata when it has them (LinuxKit rewrites
    // only the contents and the time).
    let keep = |t: &Tree, p: &str| t.get(&path(p)).map(|n| n.meta.clone());
    let mut hosts = file(HOSTS, epoch);
    hosts.origin = origin;
    if let Some(m) = keep(t, "etc/hosts") {
        hosts.meta = Meta { mtime: epoch, ..m };
    }
    t.insert(&path("etc/hosts"), hosts)?;
    let mut resolv = match resolv_symlink {
        Some(target) => Node { meta: Meta::new(0o644, epoch), kind: Kind::Symlink(target.as_bytes().to_vec()), layer: u32::MAX, origin },
        None => file(NO_RESOLV_CONF, epoch),
    };
    resolv.origin = origin;
    if let Some(m) = keep(t, "etc/resolv.conf") {
        resolv.meta = Meta { mtime: epoch, ..m };
    }
    t.insert(&path("etc/resolv.conf"), resolv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_carry_the_order_prefix() {
        assert_eq!(bundle_dir(Section::Onboot, 3, "dhcpcd"), "containers/onboot/003-dhcpcd");
        assert_eq!(bundle_dir(Section::Onshutdown, 0, "x"), "containers/onshutdown/000-x");
        assert_eq!(bundle_dir(Section::Services, 7, "getty"), "containers/services/getty");
    }

    #[test]
    fn fixups_match_linuxkit() {
        let mut t = Tree::new(5);
        t.insert(&path("etc/hostname"), file("box\n", 1)).unwrap();
        t.insert(&path(".dockerenv"), file("", 1)).unwrap();
        let mut hosts = file("1.2.3.4 x\n", 1);
        hosts.meta.mode = 0o600;
        t.insert(&path("etc/hosts"), hosts).unwrap();
        fixups(&mut t, None, 9, 0).unwrap();
        assert!(t.get(&path("etc/hostname")).is_none() && t.get(&path(".dockerenv")).is_none());
        for d in ["dev/pts", "dev/shm", "proc", "sys"] {
            assert!(t.get(&path(d)).unwrap().is_dir(), "{d}");
        }
        let h = t.get(&path("etc/hosts")).unwrap();
        assert_eq!(h.meta.mode, 0o600, "the image's own mode is kept");
        assert!(matches!(&h.kind, Kind::File { size, .. } if *size == HOSTS.len() as u64));
        assert!(matches!(&t.get(&path("etc/mtab")).unwrap().kind, Kind::Symlink(l) if l == b"/proc/mounts"));
        assert!(matches!(&t.get(&path("etc/resolv.conf")).unwrap().kind, Kind::File { size, .. } if *size == NO_RESOLV_CONF.len() as u64));
        let mut t = Tree::new(5);
        fixups(&mut t, Some(INIT_RESOLV_CONF), 9, 0).unwrap();
        assert!(matches!(&t.get(&path("etc/resolv.conf")).unwrap().kind, Kind::Symlink(l) if l == INIT_RESOLV_CONF.as_bytes()));
    }
}
