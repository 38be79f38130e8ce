//! LinuxKit fidelity on a booted appliance: a LinuxKit yml whose images carry
//! `org.mobyproject.config` labels, resolved through a containers-registries.conf mirror
//! (`docker.io` blocked, served by the local registry), built, booted under QEMU, and every
//! container run by real runc. Each container runs a probe that reports what it sees; the test
//! checks those reports against what LinuxKit's documented semantics say it must see.

use serde_json::Value;
use slotforge_qemu_tests::fixtures::{self, Fixtures};
use slotforge_qemu_tests::registry::TestRegistry;
use slotforge_qemu_tests::vm::{self, Outcome, VmOptions};
use std::path::Path;
use std::process::Command;
use slotforge::format::agent::Kind;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_slotforge")
}

const LABEL: &str = r#"{"capabilities": ["CAP_NET_ADMIN"], "binds": ["/run:/hostrun"], "uts": "new", "hostname": "from-label"}"#;

fn manifest(f: &Fixtures) -> String {
    format!(
        r#"kernel:
  image: oci:{kernel}:1
  cmdline: console=ttyS0 panic=1
init:
  - oci:{base}:1
onboot:
  - name: first
    image: linuxkit/probe:1
    capabilities.add: [CAP_SYS_TIME]
    oomScoreAdj: -300
    readonly: true
    binds.add: ["shared:/vol-rw", "tools:/vol-ro:ro", "layout:/vol-oci:ro"]
    command: [/bin/sh, /probe.sh, first]
  - name: first
    image: linuxkit/probe:1
    binds: ["/run:/hostrun:ro"]
    net: new
    hostname: entry-wins
    sysctl:
      net.ipv4.ip_forward: "1"
    uid: sleeper
    runtime:
      mkdir: [/run/made-by-runtime]
    command: [/bin/sh, /probe.sh, again]
onshutdown:
  - name: bye
    image: linuxkit/probe:1
    command: [/bin/sh, /probe.sh, bye]
services:
  - name: sleeper
    image: linuxkit/probe:1
    cgroupsPath: /probes/sleeper
    command: [/bin/sleep, "600"]
  - name: svc
    image: linuxkit/probe:1
    ondisk: false
    capabilities: [all]
    pid: host
    rlimits: ["nofile,123,456"]
    binds.add: ["shared:/vol-rw"]
    mounts:
      - {{type: bind, source: tools, destination: /vol-ro, options: [rbind, ro]}}
    devices:
      - {{path: /dev/probe-null, type: c, major: 1, minor: 3, mode: "0666"}}
    command: [/bin/sh, /probe.sh, svc]
volumes:
  - name: shared
  - name: tools
    image: linuxkit/probe:1
    readonly: true
  - name: layout
    image: linuxkit/probe:1
    format: oci
    readonly: true
files:
  - path: etc/issue
    contents: "probe appliance\n"
    mode: "0644"
"#,
        kernel = f.kernel.display(),
        base = f.base.display(),
    )
}

fn report(e: &slotforge::format::agent::Received) -> Value {
    let out = e["stdout"].as_str().unwrap_or_default();
    serde_json::from_str(out.trim()).unwrap_or_else(|err| panic!("probe output is not JSON ({err}): {e}"))
}

#[test]
fn a_linuxkit_yml_runs_under_runc_as_linuxkit_would_run_it() {
    let f = fixtures::build(Path::new(bin())).expect("building QEMU fixtures");
    let dir = tempfile::Builder::new().prefix("slotforge-qemu-lk-").tempdir().unwrap();
    let d = dir.path();
    let reg = TestRegistry::start(None);
    let probe = d.join("probe");
    fixtures::probe_image(&probe, "1", LABEL).unwrap();
    reg.push(&probe, "1", "hub/linuxkit/probe:1");
    let conf = d.join("registries.conf");
    std::fs::write(&conf, format!("[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\nblocked = true\n\n[[registry.mirror]]\nlocation = \"{}/hub\"\ninsecure = true\n", reg.host())).unwrap();
    std::fs::write(d.join("system.yml"), manifest(&f)).unwrap();
    let disk = d.join("disk.img");
    let layout = Path::new(env!("CARGO_MANIFEST_DIR")).join("layouts/demo.yaml");
    let o = Command::new(bin())
        .args(["build", d.join("system.yml").to_str().unwrap(), "--layout", layout.to_str().unwrap(), "-o", disk.to_str().unwrap(), "-q", "--cache", d.join("cache").to_str().unwrap()])
        .env("CONTAINERS_REGISTRIES_CONF", &conf)
        .output()
        .unwrap();
    assert!(o.status.success(), "build through the registries.conf mirror: {}", String::from_utf8_lossy(&o.stderr));

    let b = vm::boot_to_end(&VmOptions::new(&disk, &d.join("vm"), "linuxkit")).unwrap();
    let tail: String = b.log().lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    assert_eq!(b.outcome, Outcome::Exited, "guest did not power off:\n{tail}");
    let host = b.named(Kind::HostNs).first().cloned().cloned().unwrap_or_else(|| panic!("no host-ns event:\n{tail}"));

    // onboot: both entries named `first` ran, in manifest order, each to completion.
    let onboot = b.named(Kind::OnbootExited);
    let names: Vec<&str> = onboot.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["000-first", "001-first"], "onboot order; failures: {:?}\n{tail}", b.named(Kind::OnbootFailed));
    let first = report(onboot[0]);
    assert_eq!(first["caps"], "0000000002001000", "label CAP_NET_ADMIN + entry capabilities.add CAP_SYS_TIME: {first}");
    assert_eq!(first["oom"], -300);
    assert_eq!(first["host"], "from-label", "hostname from the label, in the new uts namespace the label asks for");
    assert_eq!(first["hostrun"], "true", "the label's bind is read-write");
    assert_eq!(first["root_writable"], false, "readonly: true");
    assert_eq!(first["net"], host["net"], "net defaults to the host's namespace");
    assert_ne!(first["pidns"], host["pid"], "pid defaults to a new namespace");
    assert_eq!(first["pid"], 1);
    assert_eq!(first["uid"], 0);
    assert!(first["resolv"].as_str().unwrap().contains("no resolv.conf configured"), "LinuxKit's resolv.conf fix-up: {first}");

    // volumes: a writable empty one shared between containers (an overlay on a tmpfs), an
    // image-backed read-only one, and one holding the image as an OCI layout.
    let vols: Vec<(&str, bool)> = b.named(Kind::VolumeMounted).iter().map(|e| (e["name"].as_str().unwrap(), e["readonly"].as_bool().unwrap())).collect();
    assert_eq!(vols, [("layout", true), ("shared", false), ("tools", true)], "failures: {:?}", b.named(Kind::VolumeFailed));
    assert_eq!(first["vol_rw"], "true", "a writable volume bound by name: {first}");
    assert_eq!(first["vol_ro"], "false", "a read-only volume cannot be written");
    assert_eq!(first["vol_ro_probe"], true, "format: filesystem holds the image's files");
    assert_eq!(first["vol_oci"], true, "format: oci holds the image as an OCI layout");

    let again = report(onboot[1]);
    // (The directory itself may be there: both entries share one unpacked image, and the first
    // one's mount points are made in it.)
    assert_eq!(again["vol_seen"], "", "binds: replaces; the volume is not bound here: {again}");
    assert_eq!(again["hostrun"], "false", "binds: in the entry replaces the label's; :ro makes it read-only");
    assert_ne!(again["net"], host["net"], "net: new");
    assert_eq!(again["host"], "entry-wins");
    assert_eq!(again["ip_forward"], 1, "sysctl applied in the container's network namespace");
    assert_eq!(again["uid"], 103, "uid by container name: LinuxKit's ids are 100, 101… in onboot, onshutdown, services order");
    assert_eq!(again["made"], true, "runtime.mkdir ran before the container");
    assert_eq!(again["root_writable"], false, "uid 103 cannot write the root-owned /, overlay or not");

    // services: the long-running one does not block the next.
    let started: Vec<&str> = b.named(Kind::ServiceStarted).iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(started, ["sleeper", "svc"], "failures: {:?}\n{tail}", b.named(Kind::ServiceFailed));
    let running: Vec<&str> = b.named(Kind::ServiceRunning).iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(running, ["sleeper"]);
    let svc_e = b.named(Kind::ServiceExited).into_iter().find(|e| e["name"] == "svc").unwrap_or_else(|| panic!("svc did not finish:\n{tail}"));
    assert_eq!(svc_e["external"], true);
    let svc = report(svc_e);
    assert_eq!(svc["caps"], "000001ffffffffff", "capabilities: [all] is every capability the kernel knows: {svc}");
    assert_eq!(svc["pidns"], host["pid"], "pid: host");
    assert_eq!(svc["cgroupns"], host["cgroup"], "no cgroup namespace, as LinuxKit: the container shares the host's");
    assert_eq!(first["cgroupns"], host["cgroup"], "no cgroup namespace for onboot either");
    assert_ne!(svc["pid"], 1);
    assert_eq!(svc["nofile"], "123", "rlimits");
    assert_eq!(svc["dev"], true, "devices: the node exists and the device cgroup lets it be written");
    assert_eq!(svc["root_writable"], true, "an external image gets a writable overlay root too");
    assert!(svc["sleeper_cgroup"].as_str().unwrap().contains("probes/sleeper"), "cgroupsPath: {svc}");
    assert_eq!(svc["host"], "from-label");
    assert!(svc["vol_seen"].as_str().unwrap().contains("from-first"), "what an onboot container wrote into a volume, a service sees: {svc}");
    assert_eq!(svc["vol_ro"], "false", "a volume named by a bind mount, read-only");
    assert_eq!(svc["vol_ro_probe"], true);

    // onshutdown runs at shutdown.
    let bye = b.named(Kind::OnshutdownExited);
    assert_eq!(bye.len(), 1, "{tail}");
    assert_eq!(bye[0]["name"], "000-bye");
    let bye = report(bye[0]);
    assert_eq!(bye["uid"], 0);
    assert_eq!(bye["root_writable"], true, "the default root is writable (an overlay on a tmpfs)");
}
