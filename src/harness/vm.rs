//! Booting a disk image in QEMU the way a device boots: OVMF (a fresh copy of its variable store
//! per VM), systemd-boot from the ESP, virtio disks, a serial console captured to a file. TCG by
//! default — KVM hangs on these machines — and KVM only when it answers a probe. The only
//! network a guest gets is one forward, 10.0.2.100:5000 → a port on host 127.0.0.1.

use crate::format::agent::events::{self, Event, Kind, Received};
use crate::format::agent::{ApplyReport, Status};
use anyhow::{bail, Context};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Debian's Secure Boot firmware whose variable store enrols the snakeoil key (PK, KEK, db):
/// it runs only EFI binaries signed with /usr/share/ovmf/PkKek-1-snakeoil.key.
pub const OVMF_CODE_SNAKEOIL: &str = "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd";
pub const OVMF_VARS_SNAKEOIL: &str = "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd";
/// The guest reaches the host's registry here.
pub const GUEST_REGISTRY: &str = "10.0.2.100:5000";

pub struct VmOptions {
    pub disk: PathBuf,
    /// More disks (`/dev/vdb`, …), e.g. update bundles.
    pub extra_disks: Vec<PathBuf>,
    /// Host port (on 127.0.0.1) the guest's 10.0.2.100:5000 forwards to; `None`: no network.
    pub registry_port: Option<u16>,
    pub timeout: Duration,
    pub memory_mb: u32,
    /// Where the firmware vars and the serial log go.
    pub work_dir: PathBuf,
    pub name: String,
    /// Boot with Secure Boot enforced (snakeoil firmware, SMM).
    pub secure_boot: bool,
    /// Kill the VM (like a reset) as soon as the serial log contains one of these, e.g. the
    /// loader's "Access Denied" for an image whose signature does not verify.
    pub stop_on_serial: Vec<String>,
    /// Record every write and flush the guest sends to `disk` in this dm-log-writes log (QEMU's
    /// `blklogwrites` driver between the virtio disk and the file): crash-state replay.
    pub log_writes: Option<PathBuf>,
}

impl VmOptions {
    pub fn new(disk: &Path, work_dir: &Path, name: &str) -> Self {
        Self { disk: disk.into(), extra_disks: vec![], registry_port: None, timeout: Duration::from_secs(180), memory_mb: 512, work_dir: work_dir.into(), name: name.into(), secure_boot: false, stop_on_serial: vec![], log_writes: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off (or rebooted: `-no-reboot` turns that into an exit).
    Exited,
    /// The stop condition held and QEMU was killed (a power cut).
    Killed,
    TimedOut,
}

pub struct Boot {
    pub outcome: Outcome,
    pub events: Vec<Received>,
    pub serial_path: PathBuf,
    pub seconds: f64,
    pub accel: &'static str,
}

impl Boot {
    /// The events of kind `k`, in order.
    pub fn named(&self, k: Kind) -> Vec<&Received> {
        events::named(&self.events, k)
    }
    /// Whether the guest emitted an event of kind `k`.
    pub fn has(&self, k: Kind) -> bool {
        self.events.iter().any(|e| e.is(k))
    }
    /// The last `status` the agent reported in this boot.
    pub fn status(&self) -> Option<&Status> {
        events::known(&self.events).filter_map(|e| if let Event::Status(s) = e { Some(s) } else { None }).last()
    }
    /// What the first apply of this boot reported, if one completed.
    pub fn applied(&self) -> Option<&ApplyReport> {
        events::known(&self.events).find_map(|e| if let Event::Applied(r) = e { Some(r) } else { None })
    }
    /// The error of the first failed apply of this boot.
    pub fn apply_failed(&self) -> Option<&str> {
        events::known(&self.events).find_map(|e| if let Event::ApplyFailed { error } = e { Some(error.as_str()) } else { None })
    }
    /// The serial log, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.serial_path).unwrap_or_default()
    }
}

/// `tcg` or `kvm`: `SLOTFORGE_QEMU_ACCEL` if set, else KVM only if a probe boot of OVMF under
/// KVM prints anything within 15 s (here it hangs silently), else TCG.
pub fn accel() -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| match std::env::var("SLOTFORGE_QEMU_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        Ok("tcg") => "tcg",
        _ => {
            if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
                return "tcg";
            }
            if probe_kvm().unwrap_or(false) {
                "kvm"
            } else {
                "tcg"
            }
        }
    })
}

fn probe_kvm() -> anyhow::Result<bool> {
    let dir = tempfile::tempdir()?;
    let vars = dir.path().join("vars.fd");
    std::fs::copy(OVMF_VARS, &vars)?;
    let serial = dir.path().join("serial.log");
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "kvm", "-m", "256", "-nographic", "-monitor", "none", "-display", "none", "-net", "none"])
        .args(["-drive", &format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}")])
        .args(["-drive", &format!("if=pflash,format=raw,file={}", vars.display())])
        .args(["-serial", &format!("file:{}", serial.display())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut alive = false;
    while Instant::now() < deadline {
        if std::fs::metadata(&serial).map(|m| m.len() > 0).unwrap_or(false) {
            alive = true;
            break;
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(alive)
}

fn spawn(o: &VmOptions, vars: &Path, serial: &Path) -> anyhow::Result<Child> {
    let mut c = Command::new("qemu-system-x86_64");
    let (machine, code) = if o.secure_boot { ("q35,smm=on", OVMF_CODE_SNAKEOIL) } else { ("q35", OVMF_CODE) };
    c.args(["-machine", machine, "-accel", accel(), "-m", &o.memory_mb.to_string(), "-smp", "1"])
        .args(["-nographic", "-monitor", "none", "-display", "none", "-no-reboot"]);
    if o.secure_boot {
        c.args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
    }
    c.args(["-drive", &format!("if=pflash,format=raw,readonly=on,file={code}")])
        .args(["-drive", &format!("if=pflash,format=raw,file={}", vars.display())])
        .args(["-serial", &format!("file:{}", serial.display())]);
    for (i, d) in std::iter::once(&o.disk).chain(&o.extra_disks).enumerate() {
        match (&o.log_writes, i) {
            (Some(log), 0) => {
                // blklogwrites: its super block (entry count) is rewritten every 4096 entries
                // and when QEMU closes the log, so a recording is whole only if the VM exits.
                let spec = json!({"driver": "blklogwrites", "node-name": "d0",
                    "file": {"driver": "file", "filename": d}, "log": {"driver": "file", "filename": log}});
                c.args(["-blockdev", &spec.to_string()]);
            }
            _ => {
                c.args(["-drive", &format!("file={},if=none,id=d{i},format=raw", d.display())]);
            }
        }
        c.args(["-device", &format!("virtio-blk-pci,drive=d{i}")]);
    }
    match o.registry_port {
        Some(p) => {
            c.args(["-netdev", &format!("user,id=n0,restrict=on,guestfwd=tcp:{GUEST_REGISTRY}-cmd:nc 127.0.0.1 {p}")]).args(["-device", "virtio-net-pci,netdev=n0"]);
        }
        None => {
            c.args(["-net", "none"]);
        }
    }
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    c.spawn().context("starting qemu-system-x86_64 (apt-get install qemu-system-x86 ovmf)")
}

/// Boot until the guest exits, `stop` returns true on the events so far (then QEMU is killed:
/// a power cut), or the timeout passes. The firmware vars live in `work_dir` and persist across
/// boots of the same `name`, like a device's NVRAM.
pub fn boot(o: &VmOptions, stop: &dyn Fn(&[Received]) -> bool) -> anyhow::Result<Boot> {
    std::fs::create_dir_all(&o.work_dir)?;
    let vars = o.work_dir.join(format!("{}{}.vars.fd", o.name, if o.secure_boot { ".sb" } else { "" }));
    if !vars.exists() {
        let src = if o.secure_boot { OVMF_VARS_SNAKEOIL } else { OVMF_VARS };
        std::fs::copy(src, &vars).with_context(|| format!("copying {src} (apt-get install ovmf)"))?;
    }
    let mut n = 0;
    let serial = loop {
        let p = o.work_dir.join(format!("{}.boot{n}.serial.log", o.name));
        if !p.exists() {
            break p;
        }
        n += 1;
    };
    let _ = accel(); // decide (and probe) before the clock starts
    let start = Instant::now();
    if let Some(log) = &o.log_writes {
        // QEMU opens the log; it must exist (an empty file: blklogwrites writes a new super block).
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    }
    let mut child = spawn(o, &vars, &serial)?;
    let outcome = loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("qemu exited with {st}: {err}");
            }
            break Outcome::Exited;
        }
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        let events = events::parse(&text);
        if stop(&events) || o.stop_on_serial.iter().any(|s| text.contains(s.as_str())) {
            let _ = child.kill();
            let _ = child.wait();
            break Outcome::Killed;
        }
        if start.elapsed() > o.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break Outcome::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let events = events::parse(&std::fs::read_to_string(&serial).unwrap_or_default());
    Ok(Boot { outcome, events, serial_path: serial, seconds: start.elapsed().as_secs_f64(), accel: accel() })
}

/// Boot until the guest exits by itself.
pub fn boot_to_end(o: &VmOptions) -> anyhow::Result<Boot> {
    boot(o, &|_| false)
}
