//! The external-images design proven on booted systems: disks built by `slotforge build` from
//! fixtures made of Debian packages, booted with OVMF + systemd-boot under QEMU (TCG unless KVM
//! answers), checked through the guest agent's JSON events and by inspecting the disk afterwards.

use slotforge_qemu_tests::fixtures::{self, Fixtures};
use slotforge_qemu_tests::registry::TestRegistry;
use slotforge_qemu_tests::vm::{self, Boot, Outcome, VmOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use slotforge::format::agent::Kind;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_slotforge")
}

/// One set of fixtures per test binary. Tests (and their VMs) run side by side, one per core;
/// bench/boot.sh runs them one at a time for its timings.
fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| fixtures::build(Path::new(bin())).expect("building QEMU fixtures"))
}

struct Scenario {
    dir: tempfile::TempDir,
    reg: TestRegistry,
}

/// `SLOTFORGE_QEMU_VERITY=false` builds the scenarios without dm-verity (bench/verity.sh).
fn verity() -> bool {
    std::env::var("SLOTFORGE_QEMU_VERITY").as_deref() != Ok("false")
}

/// The external image's payload; `SLOTFORGE_QEMU_PAYLOAD` (bytes) changes it for bench/boot.sh.
fn payload_size() -> usize {
    std::env::var("SLOTFORGE_QEMU_PAYLOAD").ok().and_then(|v| v.parse().ok()).unwrap_or(3_000_000)
}

/// bench/sealed-boot.sh: `SLOTFORGE_QEMU_SEALED=false` stores hello unsealed (the previous
/// way), `SLOTFORGE_QEMU_LAYOUT` builds on another layout (room for a large image),
/// `SLOTFORGE_QEMU_MEMORY` (MB) and `SLOTFORGE_QEMU_TIMEOUT` (s) size the VM.
fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

impl Scenario {
    /// A registry holding `hello:1` (busybox + a 3 MB payload) and a manifest whose `hello`
    /// service is external, pulled through the guest's mirror 10.0.2.100:5000.
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("slotforge-qemu-").tempdir().unwrap();
        let reg = TestRegistry::start(None);
        let hello = dir.path().join("hello");
        fixtures::service_image(&hello, "1", payload_size(), 42).unwrap();
        reg.push(&hello, "1", "hello:1");
        let ondisk = dir.path().join("ondisk");
        fixtures::service_image(&ondisk, "1", 1000, 7).unwrap();
        let f = fixtures();
        let manifest = format!(
            "version: 1.0.0
kernel:
  image: oci:{kernel}:1
  cmdline: console=ttyS0 panic=1
init:
  - oci:{base}:1
services:
  - name: hello
    image: {host}/hello:1
    command: [/bin/busybox, sh, -c, '{read}/bin/busybox echo hello from the external image']
    ondisk: false
{unsealed}  - name: ondisk
    image: oci:{ondisk}:1
    command: [/bin/busybox, echo, hello from the rootfs]
files:
  - path: etc/slotforge/agent.json
    contents: '{{\"mirror\": \"{mirror}\", \"insecure\": [\"{mirror}\"]}}'
boot:
  loader: file:{loader}
",
            kernel = f.kernel.display(),
            base = f.base.display(),
            host = reg.host(),
            ondisk = ondisk.display(),
            mirror = vm::GUEST_REGISTRY,
            loader = f.loader.display(),
            unsealed = if env_or("SLOTFORGE_QEMU_SEALED", true) { "" } else { "    sealed: false\n" },
            // The service reads its whole payload (a corrupt block fails it), unless
            // bench/sealed-boot.sh made it large: reading 500 MB under TCG outlasts the settle window.
            read = if payload_size() <= 8_000_000 { "/bin/busybox sha256sum /data/payload > /dev/null && " } else { "" },
        );
        // bench/verity.sh compares boots without verity (the previous way).
        let manifest = if verity() { manifest } else { format!("{manifest}verity: false\n") };
        std::fs::write(dir.path().join("system.yml"), manifest).unwrap();
        Scenario { dir, reg }
    }

    fn build(&self, extra: &[&str]) -> PathBuf {
        let out = self.dir.path().join("disk.img");
        let layout = std::env::var_os("SLOTFORGE_QEMU_LAYOUT").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("layouts/demo.yaml"));
        let cache = self.dir.path().join("cache");
        let o = Command::new(bin())
            .args(["build", self.dir.path().join("system.yml").to_str().unwrap(), "--layout", layout.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"])
            .args(["--cache", cache.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    }

    fn boot(&self, disk: &Path, network: bool) -> Boot {
        let mut o = VmOptions::new(disk, &self.dir.path().join("vm"), "dev");
        o.memory_mb = env_or("SLOTFORGE_QEMU_MEMORY", o.memory_mb);
        o.timeout = std::time::Duration::from_secs(env_or("SLOTFORGE_QEMU_TIMEOUT", o.timeout.as_secs()));
        if network {
            o.registry_port = Some(self.reg.port);
        }
        let b = vm::boot_to_end(&o).unwrap();
        report(&b, disk);
        assert_eq!(b.outcome, Outcome::Exited, "guest did not power off; serial log {}:\n{}", b.serial_path.display(), tail(&b.log()));
        assert!(!b.named(Kind::Poweroff).is_empty(), "no clean power-off; serial:\n{}", tail(&b.log()));
        b
    }
}

fn tail(s: &str) -> String {
    s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Append this boot's timings to `$SLOTFORGE_BOOT_REPORT` (bench/boot.sh reads it).
fn report(b: &Boot, disk: &Path) {
    let Ok(p) = std::env::var("SLOTFORGE_BOOT_REPORT") else { return };
    let log = b.log();
    // The kernel's own clock at the first agent event: time since the kernel started.
    let kernel_at_agent = log
        .lines()
        .take_while(|l| !l.contains("\"agent-start\""))
        .filter_map(|l| l.trim_start_matches('\r').strip_prefix('[').and_then(|r| r.split(']').next()).and_then(|t| t.trim().parse::<f64>().ok()))
        .last();
    let check: f64 = b.named(Kind::ImageCheck).iter().filter_map(|e| e["seconds"].as_f64()).sum();
    let bytes: u64 = b.named(Kind::ImageCheck).iter().filter_map(|e| e["bytes"].as_u64()).sum();
    let ready: f64 = b.named(Kind::ImageReady).iter().filter_map(|e| e["seconds"].as_f64()).sum();
    let images_ready = b.named(Kind::ImagesReady).first().and_then(|e| e["seconds"].as_f64());
    let mem = b.named(Kind::Memory).first().map(|e| e.json.clone());
    let insp: serde_json::Value = serde_json::from_slice(&Command::new(bin()).args(["inspect", disk.to_str().unwrap(), "--json"]).output().unwrap().stdout).unwrap_or_default();
    let line = serde_json::json!({"test": std::thread::current().name(), "accel": b.accel, "total_s": b.seconds, "kernel_to_agent_s": kernel_at_agent, "check_s": check, "checked_bytes": bytes,
        "ready_s": ready, "images_ready_s": images_ready, "memory": mem, "sealed": env_or("SLOTFORGE_QEMU_SEALED", true), "payload": payload_size(),
        "images_partition_bytes": insp["images"]["unique_bytes"]});
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
    writeln!(f, "{line}").unwrap();
}

fn image<'a>(b: &'a Boot, event: Kind, name: &str) -> Option<&'a slotforge::format::agent::Received> {
    b.named(event).into_iter().find(|e| e["name"] == name)
}

fn entries(disk: &Path) -> Vec<String> {
    let o = Command::new(bin()).args(["inspect", disk.to_str().unwrap(), "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["esp"]["entries"].as_array().unwrap().iter().map(|e| e["file"].as_str().unwrap().to_string()).collect()
}

#[test]
fn a_fresh_disk_boots_verifies_runs_the_external_service_and_marks_good() {
    let s = Scenario::new();
    let disk = s.build(&["--boot-tries", "3"]);
    assert_eq!(entries(&disk), ["slot-a+3.conf"]);
    let b = s.boot(&disk, false);
    assert_eq!(b.named(Kind::Initramfs)[0]["root"], "rootfs_a");
    // The slot was opened with dm-verity under the root hash on its entry, and / is that device.
    let insp: serde_json::Value = serde_json::from_slice(&Command::new(bin()).args(["inspect", disk.to_str().unwrap(), "--json"]).output().unwrap().stdout).unwrap();
    if verity() {
        let root_hash = insp["slots"][0]["verity"]["root_hash"].as_str().unwrap();
        assert_eq!((b.named(Kind::Verity)[0]["root_hash"].as_str(), b.named(Kind::Verity)[0]["status"].as_str()), (Some(root_hash), Some("verified")));
        let rd = &b.named(Kind::Status)[0]["root_device"];
        assert_eq!((rd["dm_name"].as_str(), rd["root_hash"].as_str()), (Some("root"), Some(root_hash)), "{rd}");
    }
    assert_eq!(image(&b, Kind::ImageCheck, "hello").unwrap()["state"], "verified");
    // The sealed image: opened with dm-verity under the root hash the rootfs pins, mounted
    // read-only, not unpacked — tmpfs under /run holds far less than the 3 MB payload.
    let pinned = insp["slots"][0]["external_images"]["images"].as_array().and_then(|a| a.iter().find(|i| i["name"] == "hello").cloned()).expect("inspect lists hello");
    let ready = image(&b, Kind::ImageReady, "hello").expect("hello ready");
    let mem = b.named(Kind::Memory)[0];
    if env_or("SLOTFORGE_QEMU_SEALED", true) {
        assert_eq!(ready["sealed"]["verity"], "verified", "{ready}");
        assert_eq!(ready["sealed"]["device"], "/dev/mapper/slotforge-hello", "{ready}");
        assert_eq!(ready["sealed"]["root_hash"], pinned["sealed"]["root_hash"], "{ready} vs {pinned}");
        assert!(pinned["sealed"]["root_hash"].is_string(), "{pinned}");
        assert_eq!(mem["sealed_mounts"], 1, "{mem}");
        assert!(mem["run_kb"].as_u64().unwrap() * 1024 < payload_size() as u64 / 4, "image contents copied to tmpfs: {mem}");
        let scrub = image(&b, Kind::ImageScrubbed, "hello").expect("scrubbed");
        assert_eq!(scrub["ok"], true, "{scrub}");
    } else {
        // bench/sealed-boot.sh's baseline: unpacked into tmpfs.
        assert!(ready["sealed"].is_null() && mem["sealed_mounts"] == 0, "{ready} {mem}");
        assert!(mem["run_kb"].as_u64().unwrap() * 1024 >= payload_size() as u64, "{mem}");
    }
    // systemd-boot counted the try (slot-a+2-1.conf); the agent dropped the counter.
    assert_eq!(b.named(Kind::MarkedGood)[0]["entry"], "slot-a.conf");
    let st = b.named(Kind::Status)[0];
    assert_eq!((st["state"].as_str(), st["slot"].as_str()), (Some("ok"), Some("a")));
    let hello = image(&b, Kind::ServiceExited, "hello").expect("the external service ran");
    assert_eq!((hello["external"].as_bool(), hello["status"].as_i64()), (Some(true), Some(0)));
    assert_eq!(hello["stdout"], "hello from the external image\n");
    assert_eq!(image(&b, Kind::ServiceExited, "ondisk").unwrap()["stdout"], "hello from the rootfs\n");
    // The rename persisted on the ESP.
    assert_eq!(entries(&disk), ["slot-a.conf"]);
    let v = Command::new(bin()).args(["verify", disk.to_str().unwrap()]).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn a_missing_image_is_pulled_from_the_host_registry_and_present_on_the_next_offline_boot() {
    let s = Scenario::new();
    let disk = s.build(&["--no-prefill", "hello"]);
    let b = s.boot(&disk, true);
    assert_eq!(image(&b, Kind::ImageCheck, "hello").unwrap()["state"], "missing");
    let pulled = image(&b, Kind::ImagePulled, "hello").unwrap_or_else(|| panic!("not pulled:\n{}", tail(&b.log())));
    assert_eq!(pulled["state"], "verified");
    assert!(pulled["bytes"].as_u64().unwrap() >= payload_size() as u64);
    // Sealed in the guest from the pulled layers by the build's code: the pinned root hash.
    let insp: serde_json::Value = serde_json::from_slice(&Command::new(bin()).args(["inspect", disk.to_str().unwrap(), "--json"]).output().unwrap().stdout).unwrap();
    let pinned = insp["slots"][0]["external_images"]["images"][0]["sealed"]["root_hash"].clone();
    assert!(pinned.is_string() && pulled["sealed"] == pinned, "{pulled} vs {pinned}");
    assert_eq!(image(&b, Kind::ImageReady, "hello").unwrap()["sealed"]["verity"], "verified");
    assert_eq!(image(&b, Kind::ServiceExited, "hello").unwrap()["status"], 0);
    // Next boot, no network: present, verified, used.
    let b = s.boot(&disk, false);
    assert_eq!(image(&b, Kind::ImageCheck, "hello").unwrap()["state"], "verified");
    assert!(image(&b, Kind::ImagePulled, "hello").is_none());
    assert_eq!(image(&b, Kind::ServiceExited, "hello").unwrap()["stdout"], "hello from the external image\n");
    // The host reads the same: the build's set in the images partition now lists hello.
    let v = Command::new(bin()).args(["verify", disk.to_str().unwrap()]).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

/// Flip a byte inside the largest blob of the images partition, found with debugfs.
fn corrupt_largest_blob(disk: &Path, work: &Path) {
    slotforge::harness::faults::corrupt_largest_blob(disk, work).unwrap();
}

#[test]
fn a_corrupted_sealed_image_is_caught_on_read_degraded_offline_and_repaired_online() {
    let s = Scenario::new();
    let disk = s.build(&[]);
    corrupt_largest_blob(&disk, s.dir.path());
    let last = |b: &Boot, event: Kind| b.named(event).last().map(|e| e.json.clone());
    let b = s.boot(&disk, false);
    // The check at boot is constant-time (the sealed blob is there, whole); dm-verity refuses
    // the flipped block when it is read: by the service, and by the scrub after it.
    assert_eq!(image(&b, Kind::ImageCheck, "hello").unwrap()["state"], "verified");
    assert_ne!(image(&b, Kind::ServiceExited, "hello").unwrap()["status"], 0, "the service read a corrupted block and went on:\n{}", tail(&b.log()));
    assert_eq!(image(&b, Kind::ImageScrubbed, "hello").unwrap()["ok"], false);
    assert!(image(&b, Kind::ImageCorrupt, "hello").is_some(), "{}", tail(&b.log()));
    assert_eq!(last(&b, Kind::Degraded).unwrap()["unavailable"], serde_json::json!(["hello"]));
    let st = last(&b, Kind::Status).unwrap();
    assert_eq!(st["state"], "degraded", "{st}");
    assert_eq!(st["images"][0]["state"], "corrupt", "{st}");
    // Online: rebuilt from the image pulled by digest, bit-identical (same root hash), reopened,
    // the service restarted and reading every byte.
    let b = s.boot(&disk, true);
    assert!(image(&b, Kind::ImageCorrupt, "hello").is_some(), "{}", tail(&b.log()));
    assert_eq!(image(&b, Kind::ImagePulled, "hello").unwrap()["state"], "verified", "{}", tail(&b.log()));
    assert!(image(&b, Kind::ImageRepaired, "hello").is_some());
    let runs: Vec<_> = b.named(Kind::ServiceExited).into_iter().filter(|e| e["name"] == "hello").collect();
    assert_eq!(runs.last().unwrap()["status"], 0, "{runs:?}");
    assert_eq!(runs.last().unwrap()["stdout"], "hello from the external image\n");
    assert_eq!(last(&b, Kind::Status).unwrap()["state"], "ok");
    // Next boot, offline: the repaired image is used as is.
    let b = s.boot(&disk, false);
    assert!(image(&b, Kind::ImageCorrupt, "hello").is_none());
    assert_eq!(image(&b, Kind::ImageScrubbed, "hello").unwrap()["ok"], true);
    let v = Command::new(bin()).args(["verify", disk.to_str().unwrap()]).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}
