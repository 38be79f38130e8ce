//! LinuxKit's container semantics as a pure function: a yml entry, the image's
//! `org.mobyproject.config` label and the image config → the `config.json` (OCI runtime spec)
//! and `runtime.json` LinuxKit writes for it. Precedence per key: the entry over the label over
//! the image; `capabilities.add`/`binds.add` extend the label's list. Defaults, mounts,
//! namespaces and capability sets as LinuxKit's `ConfigToOCI` makes them (docs/manifest.md).

pub use super::spec::LABEL;
use super::spec::{Container, Device, DeviceCgroup, Id, IdMapping, Interface, Mount, Namespaces, Resources, Runtime};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// The OCI runtime spec version written (LinuxKit writes its vendored runtime-spec's version).
pub const OCI_VERSION: &str = "1.1.0";

/// Every capability the kernel knows (0..=40), as LinuxKit's `all` expands to, in number order.
pub const ALL_CAPS: [&str; 41] = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
    "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD",
    "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
];

const RLIMITS: [&str; 16] = [
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS", "RLIMIT_NPROC", "RLIMIT_NOFILE",
    "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS", "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME",
];

/// What LinuxKit reads from the image config (`docker inspect`'s Config).
#[derive(Debug, Clone, Default)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Option<Vec<String>>,
    pub working_dir: String,
    pub label: Option<String>,
}

/// Ids LinuxKit gives each container name (100, 101, … in onboot, onshutdown, services order),
/// usable as `uid`/`gid` in entries and `files:`.
pub type IdMap = BTreeMap<String, u32>;

pub fn allocate_ids<'a>(names: impl Iterator<Item = &'a str>) -> IdMap {
    let mut m = IdMap::new();
    for (i, n) in names.enumerate() {
        // A repeated onboot name keeps the last id, as LinuxKit's map assignment does.
        m.insert(n.to_string(), 100 + i as u32);
    }
    m
}

/// A `uid`/`gid` as a number: absent, `""` and `root` are 0; a container name its allocated id.
pub fn id_numeric(v: Option<&Id>, ids: &IdMap) -> Result<u32, String> {
    match v {
        None => Ok(0),
        Some(Id::Num(n)) => u32::try_from(*n).map_err(|_| format!("id {n} is out of range")),
        Some(Id::Name(s)) if s.is_empty() || s == "root" => Ok(0),
        Some(Id::Name(s)) => ids.get(s).copied().ok_or_else(|| format!("cannot find id: {s} (names are `root` or a container name)")),
    }
}

// ---- config.json, in the OCI runtime spec's field order and omission rules ----

#[derive(Debug, Serialize, PartialEq)]
pub struct Spec {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub process: Process,
    pub root: Root,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub linux: Linux,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Process {
    pub user: User,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    pub cwd: String,
    pub capabilities: Capabilities,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<Rlimit>,
    #[serde(rename = "noNewPrivileges", skip_serializing_if = "std::ops::Not::not")]
    pub no_new_privileges: bool,
    #[serde(rename = "oomScoreAdj", skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i64>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    #[serde(rename = "additionalGids", skip_serializing_if = "Vec::is_empty")]
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Capabilities {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bounding: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effective: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inheritable: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub permitted: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ambient: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub hard: u64,
    pub soft: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Root {
    pub path: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Linux {
    #[serde(rename = "uidMappings", skip_serializing_if = "Vec::is_empty")]
    pub uid_mappings: Vec<IdMapping>,
    #[serde(rename = "gidMappings", skip_serializing_if = "Vec::is_empty")]
    pub gid_mappings: Vec<IdMapping>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctl: BTreeMap<String, String>,
    pub resources: Resources,
    #[serde(rename = "cgroupsPath", skip_serializing_if = "String::is_empty")]
    pub cgroups_path: String,
    pub namespaces: Vec<Namespace>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<LinuxDevice>,
    #[serde(rename = "rootfsPropagation", skip_serializing_if = "String::is_empty")]
    pub rootfs_propagation: String,
    #[serde(rename = "maskedPaths", skip_serializing_if = "Vec::is_empty")]
    pub masked_paths: Vec<String>,
    #[serde(rename = "readonlyPaths", skip_serializing_if = "Vec::is_empty")]
    pub readonly_paths: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct LinuxDevice {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub major: i64,
    pub minor: i64,
    #[serde(rename = "fileMode")]
    pub file_mode: u32,
}

/// `runtime.json`: every key present (empty when unset), as LinuxKit writes it.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct RuntimeJson {
    pub cgroups: Vec<String>,
    pub mounts: Vec<Mount>,
    pub mkdir: Vec<String>,
    pub interfaces: Vec<Interface>,
    #[serde(rename = "bindNS")]
    pub bind_ns: BindNs,
    pub namespace: String,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct BindNs {
    pub cgroup: String,
    pub ipc: String,
    pub mnt: String,
    pub net: String,
    pub pid: String,
    pub user: String,
    pub uts: String,
}

/// Entry over label (Go's "pointer set" precedence).
fn pick<'a, T>(label: &'a Option<T>, entry: &'a Option<T>) -> Option<&'a T> {
    entry.as_ref().or(label.as_ref())
}

/// Entry over label, where an empty string means "not set".
fn pick_str(label: &Option<String>, entry: &Option<String>) -> String {
    [entry, label].into_iter().flatten().find(|s| !s.is_empty()).cloned().unwrap_or_default()
}

/// `label ++ add` (LinuxKit keeps duplicates), the label alone, or the addition alone.
fn merged(label: &Option<Vec<String>>, add: &Option<Vec<String>>) -> Option<Vec<String>> {
    match (label, add) {
        (None, None) => None,
        (Some(l), None) => Some(l.clone()),
        (None, Some(a)) => Some(a.clone()),
        (Some(l), Some(a)) => Some(l.iter().chain(a).cloned().collect()),
    }
}

/// `all`/`none` (any case, as the only element) → every capability / none.
fn expand_caps(list: Vec<String>) -> Vec<String> {
    if list.len() == 1 {
        match list[0].to_lowercase().as_str() {
            "none" => return vec![],
            "all" => return ALL_CAPS.iter().map(|s| s.to_string()).collect(),
            _ => {}
        }
    }
    list
}

fn mount_default_destination(kind: &str) -> &'static str {
    match kind {
        "proc" => "/proc",
        "devpts" => "/dev/pts",
        "sysfs" => "/sys",
        "cgroup" => "/sys/fs/cgroup",
        "mqueue" => "/dev/mqueue",
        _ => "",
    }
}

fn m(dest: &str, kind: &str, src: &str, opts: &[&str]) -> Mount {
    Mount { destination: dest.into(), kind: kind.into(), source: src.into(), options: Some(opts.iter().map(|s| s.to_string()).collect()), ..Default::default() }
}

fn parse_rlimit(s: &str) -> Result<Rlimit, String> {
    let parts: Vec<&str> = s.splitn(3, ',').collect();
    if parts.len() != 3 {
        return Err(format!("cannot parse rlimit {s:?}: expected NAME,SOFT,HARD"));
    }
    let mut kind = parts[0].trim().to_uppercase();
    if !kind.starts_with("RLIMIT_") {
        kind = format!("RLIMIT_{kind}");
    }
    let num = |v: &str| -> Result<u64, String> {
        let v = v.trim();
        if v.eq_ignore_ascii_case("unlimited") {
            Ok(u64::MAX)
        } else {
            v.parse().map_err(|e| format!("cannot parse {v:?} as uint64: {e}"))
        }
    };
    let (soft, hard) = (num(parts[1])?, num(parts[2])?);
    if !RLIMITS.contains(&kind.as_str()) {
        return Err(format!("unknown limit: {}", parts[0].trim()));
    }
    Ok(Rlimit { kind, hard, soft })
}

/// The config.json and runtime.json (without the rootfs mounts, which depend on where the
/// bundle is) LinuxKit derives for `entry` on an image with `image` defaults and `label`.
pub fn config_to_oci(entry: &Container, label: &Container, image: &ImageDefaults, ids: &IdMap) -> Result<(Spec, Runtime), String> {
    let args = match pick(&label.command, &entry.command) {
        Some(c) => c.clone(),
        None => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    };
    let env = pick(&label.env, &entry.env).cloned().or_else(|| image.env.clone()).unwrap_or_default();
    let cwd = [entry.cwd.as_deref(), label.cwd.as_deref(), Some(image.working_dir.as_str())].into_iter().flatten().find(|s| !s.is_empty()).unwrap_or("/").to_string();
    let readonly = pick(&label.readonly, &entry.readonly).copied().unwrap_or(false);

    let mut dev_opts = vec!["nosuid", "strictatime", "mode=755", "size=65536k"];
    let mut sys_opts = vec!["nosuid", "noexec", "nodev"];
    if readonly {
        dev_opts.push("ro");
        sys_opts.push("ro");
    }
    let mut mounts: BTreeMap<String, Mount> = BTreeMap::new();
    for mt in [
        m("/proc", "proc", "proc", &["nosuid", "nodev", "noexec", "relatime"]),
        m("/dev", "tmpfs", "tmpfs", &dev_opts),
        m("/dev/pts", "devpts", "devpts", &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]),
        m("/sys", "sysfs", "sysfs", &sys_opts),
        m("/sys/fs/cgroup", "cgroup", "cgroup", &["nosuid", "noexec", "nodev", "relatime", "ro"]),
    ] {
        mounts.insert(mt.destination.clone(), mt);
    }
    for t in pick(&label.tmpfs, &entry.tmpfs).cloned().unwrap_or_default() {
        let parts: Vec<&str> = t.split(':').collect();
        if parts.len() > 2 {
            return Err(format!("cannot parse tmpfs, too many ':': {t}"));
        }
        let options = parts.get(1).map(|o| o.split(',').map(str::to_string).collect());
        mounts.insert(parts[0].into(), Mount { destination: parts[0].into(), kind: "tmpfs".into(), source: "tmpfs".into(), options, ..Default::default() });
    }
    let binds = entry.binds.clone().or_else(|| merged(&label.binds, &entry.binds_add)).unwrap_or_default();
    for b in binds {
        let parts: Vec<&str> = b.split(':').collect();
        if parts.len() < 2 {
            return Err(format!("cannot parse bind, missing ':': {b}"));
        }
        if parts.len() > 3 {
            return Err(format!("cannot parse bind, too many ':': {b}"));
        }
        let options: Vec<String> = match parts.get(2) {
            None => vec!["rw".into(), "rbind".into(), "rshared".into()],
            Some(o) => o.split(',').map(str::to_string).chain(std::iter::once("rbind".into())).collect(),
        };
        mounts.insert(parts[1].into(), Mount { destination: parts[1].into(), kind: "bind".into(), source: parts[0].into(), options: Some(options), ..Default::default() });
    }
    for mt in pick(&label.mounts, &entry.mounts).cloned().unwrap_or_default() {
        let mut kind = mt.kind.clone();
        if kind.is_empty() && ["mqueue", "devpts", "proc", "sysfs", "cgroup"].contains(&mt.source.as_str()) {
            kind = mt.source.clone();
        }
        if kind.is_empty() && mt.destination == "/dev" {
            kind = "tmpfs".into();
        }
        if kind.is_empty() {
            return Err(format!("mount for destination {} is missing type", mt.destination));
        }
        let source = if mt.source.is_empty() { kind.clone() } else { mt.source.clone() };
        let destination = if mt.destination.is_empty() { mount_default_destination(&kind).to_string() } else { mt.destination.clone() };
        if destination.is_empty() {
            return Err(format!("mount type {kind} is missing destination"));
        }
        mounts.insert(destination.clone(), Mount { destination, kind, source, options: mt.options.clone(), ..Default::default() });
    }

    // Namespaces: net/ipc/uts/user default to the host's, pid to a new one; mount is always
    // new. No cgroup namespace: LinuxKit's ConfigToOCI makes none (its "TODO cgroup namespaces"),
    // so a container sees the host's cgroup tree. `new` (and `none` for net) mean a new one; any
    // other value is a path.
    let mut namespaces = Vec::new();
    let mut ns = |kind: &'static str, v: String, default_host: bool, none_is_new: bool| {
        let v = if v.is_empty() && default_host { "root".to_string() } else { v };
        if v == "host" || v == "root" {
            return;
        }
        let path = if v == "new" || (none_is_new && v == "none") { String::new() } else { v };
        namespaces.push(Namespace { kind, path });
    };
    ns("network", pick_str(&label.net, &entry.net), true, true);
    ns("ipc", pick_str(&label.ipc, &entry.ipc), true, false);
    ns("uts", pick_str(&label.uts, &entry.uts), true, false);
    ns("pid", pick_str(&label.pid, &entry.pid), false, false);
    ns("user", pick_str(&label.userns, &entry.userns), true, false);
    namespaces.push(Namespace { kind: "mount", path: String::new() });

    let caps = expand_caps(entry.capabilities.clone().or_else(|| merged(&label.capabilities, &entry.capabilities_add)).unwrap_or_default());
    let ambient = expand_caps(pick(&label.ambient, &entry.ambient).cloned().unwrap_or_default());
    let mut bounding = BTreeSet::new();
    for c in caps.iter().chain(&ambient) {
        if !ALL_CAPS.contains(&c.as_str()) {
            return Err(format!("unknown capability: {c}"));
        }
        bounding.insert(c.clone());
    }
    let bounding: Vec<String> = bounding.into_iter().collect();

    let rlimits = pick(&label.rlimits, &entry.rlimits).cloned().unwrap_or_default().iter().map(|s| parse_rlimit(s)).collect::<Result<Vec<_>, _>>()?;

    let uid = id_numeric(pick(&label.uid, &entry.uid), ids)?;
    let gid = id_numeric(pick(&label.gid, &entry.gid), ids)?;
    let additional_gids = pick(&label.additional_gids, &entry.additional_gids).cloned().unwrap_or_default().iter().map(|g| id_numeric(Some(g), ids)).collect::<Result<Vec<_>, _>>()?;

    let mut resources = pick(&label.resources, &entry.resources).cloned().unwrap_or_default();
    let mut devices = Vec::new();
    for d in pick(&label.devices, &entry.devices).cloned().unwrap_or_default() {
        let Device { path, kind, major, minor, mode } = d;
        let cg = resources.devices.get_or_insert_with(Vec::new);
        if path == "all" {
            cg.push(DeviceCgroup { allow: true, kind: Some(kind).filter(|k| !k.is_empty()), major: None, minor: None, access: Some("rwm".into()) });
            continue;
        }
        let file_mode = u32::from_str_radix(&mode, 8).map_err(|e| format!("cannot parse device mode {mode:?} of {path} as octal value: {e}"))?;
        cg.push(DeviceCgroup { allow: true, kind: Some(kind.clone()).filter(|k| !k.is_empty()), major: Some(major), minor: Some(minor), access: Some("rwm".into()) });
        devices.push(LinuxDevice { path, kind, major, minor, file_mode });
    }

    let spec = Spec {
        oci_version: OCI_VERSION.into(),
        process: Process {
            user: User { uid, gid, additional_gids },
            args,
            env,
            cwd,
            capabilities: Capabilities { bounding: bounding.clone(), effective: caps, inheritable: bounding.clone(), permitted: bounding, ambient },
            rlimits,
            no_new_privileges: pick(&label.no_new_privileges, &entry.no_new_privileges).copied().unwrap_or(false),
            oom_score_adj: pick(&label.oom_score_adj, &entry.oom_score_adj).copied(),
        },
        root: Root { path: "rootfs".into(), readonly },
        hostname: pick_str(&label.hostname, &entry.hostname),
        mounts: mounts.into_values().collect(),
        annotations: pick(&label.annotations, &entry.annotations).cloned().unwrap_or_default(),
        linux: Linux {
            uid_mappings: pick(&label.uid_mappings, &entry.uid_mappings).cloned().unwrap_or_default(),
            gid_mappings: pick(&label.gid_mappings, &entry.gid_mappings).cloned().unwrap_or_default(),
            sysctl: pick(&label.sysctl, &entry.sysctl).cloned().unwrap_or_default(),
            resources,
            cgroups_path: pick(&label.cgroups_path, &entry.cgroups_path).cloned().unwrap_or_default(),
            namespaces,
            devices,
            rootfs_propagation: pick(&label.rootfs_propagation, &entry.rootfs_propagation).cloned().unwrap_or_default(),
            masked_paths: pick(&label.masked_paths, &entry.masked_paths).cloned().unwrap_or_default(),
            readonly_paths: pick(&label.readonly_paths, &entry.readonly_paths).cloned().unwrap_or_default(),
        },
    };
    Ok((spec, merge_runtime(label.runtime.as_ref(), entry.runtime.as_ref())))
}

/// `runtime:` entry over label, key by key (bindNS per namespace).
fn merge_runtime(label: Option<&Runtime>, entry: Option<&Runtime>) -> Runtime {
    let (l, e) = (label.cloned().unwrap_or_default(), entry.cloned().unwrap_or_default());
    let ns = |a: &Option<String>, b: &Option<String>| b.clone().or_else(|| a.clone());
    Runtime {
        cgroups: e.cgroups.or(l.cgroups),
        mounts: e.mounts.or(l.mounts),
        mkdir: e.mkdir.or(l.mkdir),
        interfaces: e.interfaces.or(l.interfaces),
        bind_ns: Namespaces {
            cgroup: ns(&l.bind_ns.cgroup, &e.bind_ns.cgroup),
            ipc: ns(&l.bind_ns.ipc, &e.bind_ns.ipc),
            mnt: ns(&l.bind_ns.mnt, &e.bind_ns.mnt),
            net: ns(&l.bind_ns.net, &e.bind_ns.net),
            pid: ns(&l.bind_ns.pid, &e.bind_ns.pid),
            user: ns(&l.bind_ns.user, &e.bind_ns.user),
            uts: ns(&l.bind_ns.uts, &e.bind_ns.uts),
        },
        namespace: e.namespace.or(l.namespace),
    }
}

/// Where a container's root filesystem goes inside its bundle directory `dir` (relative to `/`):
/// read-only containers at `rootfs/`; writable ones at `lower/`, with `tmp/` for the tmpfs
/// that holds the overlay's upper and work dirs and `rootfs/` as the overlay mount point.
/// `shared_root` is where an identical image was already unpacked (LinuxKit unpacks an image
/// once per build and binds it to every later bundle that uses it).
pub fn runtime_json(rt: &Runtime, dir: &str, readonly: bool, shared_root: Option<&str>) -> RuntimeJson {
    let own = format!("{dir}/{}", if readonly { "rootfs" } else { "lower" });
    let root = shared_root.unwrap_or(&own);
    let mut mounts = if readonly {
        vec![Mount { destination: format!("/{dir}/rootfs"), source: format!("/{root}"), options: Some(vec!["bind".into()]), ..Default::default() }]
    } else {
        vec![
            Mount { destination: format!("/{dir}/tmp"), kind: "tmpfs".into(), source: "tmpfs".into(), ..Default::default() },
            Mount { destination: format!("/{dir}/tmp"), options: Some(vec!["remount".into(), "private".into()]), ..Default::default() },
            Mount {
                destination: format!("/{dir}/rootfs"),
                kind: "overlay".into(),
                source: "overlay".into(),
                options: Some(vec![format!("lowerdir=/{root}"), format!("upperdir=/{dir}/tmp/upper"), format!("workdir=/{dir}/tmp/work")]),
                ..Default::default()
            },
        ]
    };
    mounts.extend(rt.mounts.clone().unwrap_or_default());
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    RuntimeJson {
        cgroups: rt.cgroups.clone().unwrap_or_default(),
        mounts,
        mkdir: rt.mkdir.clone().unwrap_or_default(),
        interfaces: rt.interfaces.clone().unwrap_or_default(),
        bind_ns: BindNs {
            cgroup: s(&rt.bind_ns.cgroup),
            ipc: s(&rt.bind_ns.ipc),
            mnt: s(&rt.bind_ns.mnt),
            net: s(&rt.bind_ns.net),
            pid: s(&rt.bind_ns.pid),
            user: s(&rt.bind_ns.user),
            uts: s(&rt.bind_ns.uts),
        },
        namespace: rt.namespace.clone().unwrap_or_default(),
    }
}

/// JSON as LinuxKit writes these files (Go's `MarshalIndent` with four spaces).
pub fn to_json(v: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser).expect("serialisable");
    out
}
