//! `slotforge-vm`: the harness's reference parts for users.
//!
//! - `slotforge-vm images OUT_DIR [--agent BIN]`: the reference kernel image (Debian's kernel with
//!   the reference initramfs: busybox, the modules a virtio/verity boot needs, veritysetup) and
//!   the reference appliance base image (busybox, the slotforge agent, runc, the reference init),
//!   as OCI layouts `OUT_DIR/kernel:1` and `OUT_DIR/base:1` — the same images the tests boot.
//! - `slotforge-vm boot DISK [--bundle FILE] [--registry-port N] [--timeout S] [--work DIR] [--log-writes LOG]`:
//!   boot a disk under QEMU + OVMF (TCG unless KVM answers) and print the agent's events as they
//!   come; exit 0 when the guest powered off by itself. `--log-writes LOG` records every write
//!   and flush to DISK in LOG (dm-log-writes format, QEMU's `blklogwrites`).

use anyhow::{bail, Context};
use slotforge_qemu_tests::{fixtures, vm};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::Duration;
use slotforge::format::agent::{Event, Received};

fn usage() -> ! {
    eprintln!("usage: slotforge-vm images OUT_DIR [--agent BIN]\n       slotforge-vm boot DISK [--bundle FILE] [--registry-port N] [--timeout SECONDS] [--work DIR] [--log-writes LOG]");
    std::process::exit(64)
}

fn flag(args: &mut Vec<String>, name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    if i + 1 >= args.len() {
        usage();
    }
    let v = args.remove(i + 1);
    args.remove(i);
    Some(v)
}

fn copy_dir(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dst);
    let st = std::process::Command::new("cp").arg("-a").arg(src).arg(dst).status()?;
    if !st.success() {
        bail!("cp -a {} {}", src.display(), dst.display());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("images") => {
            let agent = flag(&mut args, "--agent").map(PathBuf::from).unwrap_or_else(|| {
                let me = std::env::current_exe().expect("own path");
                me.with_file_name("slotforge")
            });
            let [_, out] = &args[..] else { usage() };
            if !agent.is_file() {
                bail!("{}: the agent binary is missing (cargo build --release, or --agent PATH)", agent.display());
            }
            let f = fixtures::build(&agent).context("building the reference images")?;
            let out = Path::new(out);
            std::fs::create_dir_all(out)?;
            copy_dir(&f.kernel, &out.join("kernel"))?;
            copy_dir(&f.base, &out.join("base"))?;
            println!("{}/kernel:1  Debian's kernel + the reference initramfs", out.display());
            println!("{}/base:1    busybox, slotforge agent, runc, the reference init", out.display());
            Ok(())
        }
        Some("boot") => {
            let bundle = flag(&mut args, "--bundle");
            let port = flag(&mut args, "--registry-port").map(|p| p.parse::<u16>()).transpose()?;
            let timeout = flag(&mut args, "--timeout").map(|t| t.parse::<u64>()).transpose()?.unwrap_or(300);
            let work = flag(&mut args, "--work");
            let log = flag(&mut args, "--log-writes");
            let [_, disk] = &args[..] else { usage() };
            let disk = PathBuf::from(disk);
            let work = work.map(PathBuf::from).unwrap_or_else(|| disk.with_extension("vm"));
            let mut o = vm::VmOptions::new(&disk, &work, "boot");
            o.timeout = Duration::from_secs(timeout);
            o.registry_port = port;
            o.extra_disks.extend(bundle.map(PathBuf::from));
            o.log_writes = log.map(PathBuf::from);
            eprintln!("booting {} under QEMU ({}), serial log in {}", disk.display(), vm::accel(), work.display());
            let shown = Cell::new(0usize);
            let print = |events: &[Received]| {
                for e in &events[shown.get()..] {
                    println!("{e}");
                }
                shown.set(events.len());
                false
            };
            let b = vm::boot(&o, &print)?;
            print(&b.events);
            eprintln!("{:?} after {:.1} s; serial log: {}", b.outcome, b.seconds, b.serial_path.display());
            summary(&b.events);
            if b.outcome != vm::Outcome::Exited {
                std::process::exit(1);
            }
            Ok(())
        }
        _ => usage(),
    }
}

/// A few lines a person reads: the booted slot and build, each external image, each container.
fn summary(events: &[Received]) {
    for r in events {
        let Some(e) = &r.event else { continue };
        match e {
            Event::Status(st) => {
                eprintln!("agent status: {} — slot {}, version {}, build {}", r["state"].as_str().unwrap_or("?"), st.slot.as_deref().unwrap_or("?"), st.version, st.build_id);
                for i in &st.images {
                    eprintln!("  external image {}: {} ({} bytes)", i.name, serde_json::to_value(i.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(), i.bytes);
                }
            }
            Event::OnbootExited { name, status, stdout, .. } | Event::ServiceExited { name, status, stdout, .. } | Event::OnshutdownExited { name, status, stdout, .. } => {
                eprintln!("  {} {name} exited {}: {}", r.name().trim_end_matches("-exited"), status.map(|c| c.to_string()).unwrap_or_else(|| "(no status)".into()), stdout.trim());
            }
            Event::ServiceRunning { name, pid, .. } => eprintln!("  service {name} still running (pid {pid})"),
            Event::MarkedGood { .. } | Event::RolledBack { .. } | Event::Degraded { .. } | Event::Applied(_) | Event::ApplyFailed { .. } => eprintln!("  {r}"),
            _ => {}
        }
    }
}
