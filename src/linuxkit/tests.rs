//! Golden tests: the expected config.json/runtime.json values are written by hand from
//! LinuxKit's documented behaviour (docs/yaml.md and its ConfigToOCI), not produced by our code.

use super::oci::*;
use super::spec::*;
use serde_json::{json, Value};

fn entry(yml: &str) -> Container {
    crate::base::yaml::parse(std::path::Path::new("t.yml"), yml).unwrap()
}

fn image() -> ImageDefaults {
    ImageDefaults { entrypoint: vec!["/bin/sh".into()], cmd: vec!["-c".into(), "x".into()], env: Some(vec!["PATH=/bin".into()]), working_dir: String::new(), label: None }
}

fn oci(e: &Container, label: &Container, img: &ImageDefaults) -> (Value, Runtime) {
    let ids = allocate_ids(["first", "other"].into_iter());
    let (spec, rt) = config_to_oci(e, label, img, &ids).unwrap();
    (serde_json::to_value(&spec).unwrap(), rt)
}

fn default_mounts(ro: bool) -> Value {
    let mut dev = vec!["nosuid", "strictatime", "mode=755", "size=65536k"];
    let mut sys = vec!["nosuid", "noexec", "nodev"];
    if ro {
        dev.push("ro");
        sys.push("ro");
    }
    json!([
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": dev},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "nodev", "noexec", "relatime"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
    ])
}

#[test]
fn defaults_take_command_env_from_the_image_and_no_capabilities() {
    let (v, _) = oci(&entry("name: a\nimage: x\n"), &Container::default(), &image());
    assert_eq!(
        v,
        json!({
            "ociVersion": "1.1.0",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["/bin/sh", "-c", "x"], "env": ["PATH=/bin"], "cwd": "/", "capabilities": {}},
            "root": {"path": "rootfs"},
            "mounts": default_mounts(false),
            "linux": {"resources": {}, "namespaces": [{"type": "pid"}, {"type": "mount"}]}
        })
    );
}

#[test]
fn entry_over_label_over_image_and_add_keys_extend() {
    let label = parse_label("x", r#"{"capabilities": ["CAP_NET_ADMIN"], "binds": ["/a:/a"], "readonly": true, "hostname": "lbl", "command": ["/lbl"], "cwd": "/l", "env": ["L=1"]}"#).unwrap();
    let e = entry(
        r#"
name: a
image: x
capabilities.add: [CAP_SYS_ADMIN]
binds.add: ["/b:/b:ro"]
net: new
pid: host
oomScoreAdj: -500
cgroupsPath: /svc/a
sysctl: {net.ipv4.ip_forward: "1"}
rlimits: ["nofile,1024,unlimited"]
uid: other
gid: 7
additionalGids: [first, root]
devices:
  - {path: /dev/null, type: c, major: 1, minor: 3, mode: "0666"}
  - {path: all, type: b}
noNewPrivileges: true
rootfsPropagation: shared
annotations: {k: v}
"#,
    );
    let (v, _) = oci(&e, &label, &image());
    let p = &v["process"];
    assert_eq!(p["args"], json!(["/lbl"]), "label command beats the image's");
    assert_eq!(p["env"], json!(["L=1"]));
    assert_eq!(p["cwd"], json!("/l"));
    assert_eq!(p["user"], json!({"uid": 101, "gid": 7, "additionalGids": [100, 0]}));
    assert_eq!(p["capabilities"], json!({"bounding": ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"], "effective": ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"], "inheritable": ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"], "permitted": ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]}));
    assert_eq!(p["rlimits"], json!([{"type": "RLIMIT_NOFILE", "hard": u64::MAX, "soft": 1024}]));
    assert_eq!(p["noNewPrivileges"], json!(true));
    assert_eq!(p["oomScoreAdj"], json!(-500));
    assert_eq!(v["root"], json!({"path": "rootfs", "readonly": true}));
    assert_eq!(v["hostname"], json!("lbl"));
    assert_eq!(v["annotations"], json!({"k": "v"}));
    let mut mounts = vec![json!({"destination": "/a", "type": "bind", "source": "/a", "options": ["rw", "rbind", "rshared"]}), json!({"destination": "/b", "type": "bind", "source": "/b", "options": ["ro", "rbind"]})];
    mounts.extend(default_mounts(true).as_array().unwrap().iter().cloned());
    assert_eq!(v["mounts"], Value::Array(mounts));
    let l = &v["linux"];
    assert_eq!(l["namespaces"], json!([{"type": "network"}, {"type": "mount"}]), "net new, pid host");
    assert_eq!(l["sysctl"], json!({"net.ipv4.ip_forward": "1"}));
    assert_eq!(l["cgroupsPath"], json!("/svc/a"));
    assert_eq!(l["rootfsPropagation"], json!("shared"));
    assert_eq!(l["devices"], json!([{"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666}]));
    assert_eq!(l["resources"], json!({"devices": [{"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}, {"allow": true, "type": "b", "access": "rwm"}]}));
}

#[test]
fn entry_lists_replace_the_label_and_all_expands() {
    let label = parse_label("x", "capabilities: [CAP_NET_ADMIN]\nbinds: [\"/a:/a\"]\n").unwrap();
    let e = entry("name: a\nimage: x\ncapabilities: [all]\nbinds: [\"/c:/d\"]\nbinds.add: [\"/e:/e\"]\nambient: [CAP_CHOWN]\n");
    let (v, _) = oci(&e, &label, &image());
    let caps = &v["process"]["capabilities"];
    assert_eq!(caps["effective"].as_array().unwrap().len(), 41);
    assert_eq!(caps["effective"][0], json!("CAP_CHOWN"), "all is in capability-number order");
    assert_eq!(caps["bounding"][0], json!("CAP_AUDIT_CONTROL"), "the bounding set is sorted");
    assert_eq!(caps["ambient"], json!(["CAP_CHOWN"]));
    let dests: Vec<&str> = v["mounts"].as_array().unwrap().iter().map(|m| m["destination"].as_str().unwrap()).collect();
    assert_eq!(dests, ["/d", "/dev", "/dev/pts", "/proc", "/sys", "/sys/fs/cgroup"], "binds: replaces the label's and ignores binds.add");
    let e = entry("name: a\nimage: x\ncapabilities: [NONE]\n");
    let (v, _) = oci(&e, &label, &image());
    assert_eq!(v["process"]["capabilities"], json!({}));
}

#[test]
fn mounts_tmpfs_and_namespace_paths() {
    let e = entry(
        "name: a\nimage: x\ntmpfs: [\"/run:size=1m,mode=755\", /tmp]\nmounts:\n  - {type: cgroup, options: [rw]}\n  - {source: mqueue}\n  - {destination: /dev}\nnet: /run/netns/x\nipc: new\nuts: new\nuserns: new\n",
    );
    let (v, _) = oci(&e, &Container::default(), &ImageDefaults::default());
    let ms = v["mounts"].as_array().unwrap();
    let find = |d: &str| ms.iter().find(|m| m["destination"] == d).cloned().unwrap();
    assert_eq!(find("/run"), json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m", "mode=755"]}));
    assert_eq!(find("/tmp"), json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}));
    assert_eq!(find("/sys/fs/cgroup"), json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["rw"]}));
    assert_eq!(find("/dev/mqueue"), json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"}));
    assert_eq!(find("/dev"), json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}));
    assert_eq!(
        v["linux"]["namespaces"],
        json!([{"type": "network", "path": "/run/netns/x"}, {"type": "ipc"}, {"type": "uts"}, {"type": "pid"}, {"type": "user"}, {"type": "mount"}])
    );
    assert_eq!(v["process"]["cwd"], json!("/"));
    assert!(v["process"].get("args").is_none() && v["process"].get("env").is_none(), "an image without cmd/env gives none: {v}");
}

#[test]
fn errors_name_the_offending_value() {
    let ids = IdMap::new();
    let bad = |yml: &str| config_to_oci(&entry(&format!("name: a\nimage: x\n{yml}")), &Container::default(), &image(), &ids).unwrap_err();
    assert!(bad("capabilities: [CAP_FLY]").contains("unknown capability: CAP_FLY"));
    assert!(bad("capabilities: [cap_chown]").contains("unknown capability"), "names are case-sensitive");
    assert!(bad("binds: [/a]").contains("missing ':'"));
    assert!(bad("binds: [\"/a:/b:ro:x\"]").contains("too many ':'"));
    assert!(bad("tmpfs: [\"/a:b:c\"]").contains("too many ':'"));
    assert!(bad("rlimits: [\"nofile,1\"]").contains("cannot parse rlimit"));
    assert!(bad("rlimits: [\"fly,1,2\"]").contains("unknown limit"));
    assert!(bad("uid: nobody").contains("cannot find id: nobody"));
    assert!(bad("devices: [{path: /dev/x, type: c, major: 1, minor: 1}]").contains("octal"));
    assert!(bad("mounts: [{destination: /x}]").contains("missing type"));
    assert!(bad("mounts: [{type: tmpfs}]").contains("missing destination"));
}

#[test]
fn unknown_keys_and_label_identity_are_refused() {
    let e = crate::base::yaml::parse::<Container>(std::path::Path::new("t.yml"), "name: a\nimage: x\ncapabilites: [all]\n").unwrap_err();
    assert_eq!((e.line, e.column), (3, 1), "{e}");
    assert!(e.message.contains("capabilites"), "{e}");
    assert!(crate::base::yaml::parse::<Container>(std::path::Path::new("t.yml"), "name: a\nimage: x\nruntime: {mkdirs: [/x]}\n").is_err());
    assert!(crate::base::yaml::parse::<Container>(std::path::Path::new("t.yml"), "name: a\nimage: x\nresources: {memory: {limt: 1}}\n").is_err());
    assert!(parse_label("x", "{\"name\": \"n\"}").unwrap_err().contains("name cannot be set"));
    assert!(parse_label("x", "{\"capabilities\": \"all\"}").is_err());
}

#[test]
fn runtime_merges_per_key_and_prepends_the_rootfs_mounts() {
    let label = parse_label("x", "runtime: {mkdir: [/var/l], bindNS: {net: /run/netns/l, ipc: /run/ipc}, cgroups: [l]}\n").unwrap();
    let e = entry("name: a\nimage: x\nruntime:\n  bindNS: {net: /run/netns/e}\n  interfaces: [{name: eth1, add: veth, peer: veth1}]\n  mounts: [{type: bind, source: /a, destination: /b}]\n");
    let (_, rt) = oci(&e, &label, &image());
    let ro = serde_json::to_value(runtime_json(&rt, "containers/onboot/001-a", true, None)).unwrap();
    assert_eq!(
        ro,
        json!({
            "cgroups": ["l"],
            "mounts": [
                {"destination": "/containers/onboot/001-a/rootfs", "source": "/containers/onboot/001-a/rootfs", "options": ["bind"]},
                {"destination": "/b", "type": "bind", "source": "/a"}
            ],
            "mkdir": ["/var/l"],
            "interfaces": [{"name": "eth1", "add": "veth", "peer": "veth1", "createInRoot": false}],
            "bindNS": {"cgroup": "", "ipc": "/run/ipc", "mnt": "", "net": "/run/netns/e", "pid": "", "user": "", "uts": ""},
            "namespace": ""
        })
    );
    let rw = serde_json::to_value(runtime_json(&Runtime::default(), "containers/services/s", false, None)).unwrap();
    assert_eq!(
        rw["mounts"],
        json!([
            {"destination": "/containers/services/s/tmp", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/containers/services/s/tmp", "options": ["remount", "private"]},
            {"destination": "/containers/services/s/rootfs", "type": "overlay", "source": "overlay", "options": ["lowerdir=/containers/services/s/lower", "upperdir=/containers/services/s/tmp/upper", "workdir=/containers/services/s/tmp/work"]}
        ])
    );
    let shared = serde_json::to_value(runtime_json(&Runtime::default(), "containers/services/t", true, Some("containers/onboot/000-a/rootfs"))).unwrap();
    assert_eq!(shared["mounts"][0]["source"], json!("/containers/onboot/000-a/rootfs"));
}

#[test]
fn ids_follow_linuxkit_allocation() {
    let ids = allocate_ids(["a", "b", "a", "c"].into_iter());
    assert_eq!(ids["a"], 102, "a repeated onboot name keeps its last id");
    assert_eq!(ids["c"], 103);
    assert_eq!(id_numeric(Some(&Id::Name("root".into())), &ids), Ok(0));
    assert_eq!(id_numeric(Some(&Id::Num(5)), &ids), Ok(5));
    assert_eq!(id_numeric(None, &ids), Ok(0));
}

#[test]
fn json_is_indented_like_linuxkit() {
    let out = String::from_utf8(to_json(&serde_json::json!({"a": [1]}))).unwrap();
    assert_eq!(out, "{\n    \"a\": [\n        1\n    ]\n}");
}
