//! LinuxKit's named volumes: where a volume lives in the rootfs (`/containers/volumes/NAME/`,
//! `lower` its contents, `merged` what containers see, `tmp` only for a writable one) and how a
//! container's `binds`, `binds.add` and `mounts` name one (a source that does not start with
//! `/`). Pure: the build lays the directories out and rewrites the binds; the agent mounts
//! `merged` at boot (docs/manifest.md#volumes, docs/agent.md).

use super::spec::Container;
use std::collections::BTreeMap;

/// Where every volume lives, relative to the rootfs.
pub const VOLUMES_DIR: &str = "containers/volumes";

/// A volume's directory, relative to the rootfs.
pub fn base_dir(name: &str) -> String {
    format!("{VOLUMES_DIR}/{name}")
}

/// What containers bind: the volume's contents as the agent mounts them at boot.
pub fn merged_dir(name: &str) -> String {
    format!("/{VOLUMES_DIR}/{name}/merged")
}

/// The directories a volume needs in the rootfs, relative: `lower` (the contents), `merged`
/// (the mount point) and, for a writable volume, `tmp` (where its tmpfs upper layer goes; its
/// presence is what tells the agent the volume is writable, as LinuxKit's init reads it).
pub fn dirs(name: &str, readonly: bool) -> Vec<String> {
    let b = base_dir(name);
    let mut v = vec![b.clone(), format!("{b}/lower"), format!("{b}/merged")];
    if !readonly {
        v.push(format!("{b}/tmp"));
    }
    v
}

/// LinuxKit's rule for a volume name: lower-case letters, digits, `_` and `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-') {
        Ok(())
    } else {
        Err(format!("invalid volume name: {name} (lower-case letters, digits, '_' and '-')"))
    }
}

/// Rewrite one `binds`-style list: an entry whose source does not start with `/` names a
/// volume and is bound from its merged directory; a read-only volume must be bound with `ro`
/// as the third field exactly (LinuxKit's check).
fn rewrite_binds(list: &[String], volumes: &BTreeMap<String, bool>, what: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(list.len());
    for (i, b) in list.iter().enumerate() {
        let mut parts: Vec<String> = b.split(':').map(str::to_string).collect();
        if parts[0].starts_with('/') {
            out.push(b.clone());
            continue;
        }
        let Some(&readonly) = volumes.get(&parts[0]) else {
            return Err(format!("volume {} not found ({what} {i}: {b})", parts[0]));
        };
        if readonly && parts.get(2).map(String::as_str) != Some("ro") {
            return Err(format!("volume {} is read-only, but {what} {i} ({b}) binds it read-write; add :ro", parts[0]));
        }
        parts[0] = merged_dir(&parts[0]);
        out.push(parts.join(":"));
    }
    Ok(out)
}

/// A yml entry with every volume it names replaced by the volume's merged directory, checked
/// as LinuxKit checks it: the volume must exist, and a read-only one must be bound `ro`. Only
/// the entry's own `binds`, `binds.add` and `mounts` (of type `bind`) are read, as LinuxKit
/// reads them; an image label's binds are not.
pub fn resolve(entry: &Container, volumes: &BTreeMap<String, bool>) -> Result<Container, String> {
    let mut e = entry.clone();
    if let Some(b) = &entry.binds {
        e.binds = Some(rewrite_binds(b, volumes, "binds")?);
    }
    if let Some(b) = &entry.binds_add {
        e.binds_add = Some(rewrite_binds(b, volumes, "binds.add")?);
    }
    if let Some(mounts) = e.mounts.as_mut() {
        for (i, mt) in mounts.iter_mut().enumerate() {
            if mt.kind != "bind" || mt.source.starts_with('/') {
                continue;
            }
            let Some(&readonly) = volumes.get(&mt.source) else {
                return Err(format!("volume {} not found (mounts {i})", mt.source));
            };
            // The first of `rw`/`ro` among the options decides; neither is read-write.
            let ro = mt.options.iter().flatten().find(|o| *o == "rw" || *o == "ro").is_some_and(|o| o == "ro");
            if readonly && !ro {
                return Err(format!("volume {} is read-only, but mounts {i} mounts it read-write; add the ro option", mt.source));
            }
            // LinuxKit (volume.go at b953d17) checks these but, through a copy, leaves the
            // source as the bare name, which then resolves nowhere; slotforge binds the
            // volume, as its check intends (docs/manifest.md#deliberate-differences).
            mt.source = merged_dir(&mt.source);
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linuxkit::spec::Mount;

    fn vols() -> BTreeMap<String, bool> {
        [("shared".to_string(), false), ("tools".to_string(), true)].into_iter().collect()
    }

    #[test]
    fn binds_naming_a_volume_are_bound_from_its_merged_directory() {
        let e = Container { binds: Some(vec!["shared:/data".into(), "/run:/run".into()]), binds_add: Some(vec!["tools:/opt/tools:ro".into()]), ..Default::default() };
        let r = resolve(&e, &vols()).unwrap();
        assert_eq!(r.binds.unwrap(), ["/containers/volumes/shared/merged:/data", "/run:/run"]);
        assert_eq!(r.binds_add.unwrap(), ["/containers/volumes/tools/merged:/opt/tools:ro"]);
    }

    #[test]
    fn a_read_only_volume_bound_read_write_or_an_unknown_one_is_refused() {
        for (b, want) in [("tools:/t", "read-only"), ("tools:/t:rw", "read-only"), ("tools:/t:ro,rshared", "read-only"), ("nope:/n", "not found")] {
            let e = Container { binds: Some(vec![b.into()]), ..Default::default() };
            let err = resolve(&e, &vols()).unwrap_err();
            assert!(err.contains(want), "{b}: {err}");
        }
    }

    #[test]
    fn bind_mounts_follow_the_first_of_rw_and_ro() {
        let mt = |opts: &[&str]| Mount { destination: "/t".into(), kind: "bind".into(), source: "tools".into(), options: Some(opts.iter().map(|s| s.to_string()).collect()), ..Default::default() };
        let ok = Container { mounts: Some(vec![mt(&["rbind", "ro", "rw"])]), ..Default::default() };
        assert_eq!(resolve(&ok, &vols()).unwrap().mounts.unwrap()[0].source, "/containers/volumes/tools/merged");
        let bad = Container { mounts: Some(vec![mt(&["rw", "ro"])]), ..Default::default() };
        assert!(resolve(&bad, &vols()).unwrap_err().contains("read-only"));
        let tmpfs = Container { mounts: Some(vec![Mount { kind: "tmpfs".into(), source: "tools".into(), ..mt(&[]) }]), ..Default::default() };
        assert_eq!(resolve(&tmpfs, &vols()).unwrap().mounts.unwrap()[0].source, "tools", "only bind mounts name volumes");
    }

    #[test]
    fn names_and_directories_are_linuxkits() {
        assert!(check_name("vol_a-1").is_ok());
        assert!(check_name("Vol").is_err() && check_name("a/b").is_err() && check_name("a.b").is_err());
        assert_eq!(dirs("v", true), ["containers/volumes/v", "containers/volumes/v/lower", "containers/volumes/v/merged"]);
        assert_eq!(dirs("v", false).last().unwrap(), "containers/volumes/v/tmp");
    }
}
