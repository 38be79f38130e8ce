//! The command line: argument parsing and output only; the work is in the library.

use crate::builder::{build, BuildOptions, ComposeOptions, SourceOptions};
use crate::format::inspect::{inspect, verify};
use crate::oci::Platform;
use crate::base::progress::Progress;
use crate::base::text::mib;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "slotforge", version, about = "Build and check A/B disk images for immutable Linux appliances")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a complete disk image from a system manifest and a layout.
    Build {
        /// The system manifest (LinuxKit yml superset).
        manifest: PathBuf,
        /// The layout (layouts/*.yaml).
        #[arg(long)]
        layout: PathBuf,
        /// Output disk image (written to a temporary file and renamed when complete).
        #[arg(short, long)]
        output: PathBuf,
        /// Another layout generation the rootfs must also fit (repeatable).
        #[arg(long)]
        compat: Vec<PathBuf>,
        /// Leave this external image out of the images partition; the device pulls it (repeatable).
        #[arg(long = "no-prefill")]
        no_prefill: Vec<String>,
        /// Put a boot counter on slot A's entry (slot-a+N.conf): the first boot must be marked good.
        #[arg(long)]
        boot_tries: Option<u32>,
        /// Also write OUTPUT.bmap for `bmaptool copy` (mapped ranges with sha256).
        #[arg(long)]
        bmap: bool,
        /// Also write a qcow2 copy (OUTPUT with the extension .qcow2; needs qemu-img).
        #[arg(long)]
        qcow2: bool,
        #[command(flatten)]
        src: SourceArgs,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
        /// No progress bars.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Check a manifest without fetching anything: every key known, values well-formed,
    /// names as LinuxKit allows them. Lists its containers and where they go in the rootfs.
    Check {
        manifest: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Upgrade-compatibility testing in QEMU: build the matrix's variants, install, boot,
    /// upgrade, inject faults, and check what each step must show (docs/testing.md).
    Test {
        matrix: PathBuf,
        /// Run only paths or steps matching these globs (`field-*`, `field-v1/upgrade*`).
        #[arg(long)]
        only: Vec<String>,
        /// Write a JUnit XML report here.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Print the report as JSON on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Keep disks, bundles and serial logs in this directory.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Paths run in parallel (each is one VM).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Blob cache for the builds (default: the user cache).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// `crash-states` faults: boot this many states in QEMU (overrides each step's budget).
        #[arg(long)]
        crash_boots: Option<usize>,
        /// `crash-states` faults: check every prefix and torn write between flushes offline,
        /// and 8 random subsets per interval (default: a sample of 2 and 2).
        #[arg(long)]
        crash_full: bool,
    },
    /// Replay a recorded write log (dm-log-writes, e.g. from `slotforge test --keep` or
    /// `slotforge-vm boot --log-writes`) onto the disk as it was before, and check every crash
    /// state offline: GPT, fsck.vfat, e2fsck, which slot systemd-boot would start and whether it
    /// verifies. Exit 0 only if every state boots a good slot.
    CrashStates {
        /// The disk image as it was before the log began.
        before: PathBuf,
        /// The log.
        log: PathBuf,
        /// Every prefix and torn write, 8 subsets per interval (default: a sample).
        #[arg(long)]
        full: bool,
        /// Seed for the sampled states.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The medium's atomic write unit in bytes: writes tear only at multiples of it (4096:
        /// flash, 4Kn and 512e disks; 512: a disk that persists single 512-byte sectors).
        #[arg(long, default_value_t = 4096)]
        atomic_write: u64,
        /// Scratch directory (default: a temporary one).
        #[arg(long)]
        scratch: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve every image reference to a digest and write <manifest>.lock.
    Lock {
        manifest: PathBuf,
        #[command(flatten)]
        src: SourceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Fill the cache with every blob the manifest needs, for a later --offline build.
    Pull {
        manifest: PathBuf,
        #[command(flatten)]
        src: SourceArgs,
        #[arg(long)]
        json: bool,
        #[arg(short, long)]
        quiet: bool,
    },
    /// The on-device agent (runs on the appliance).
    Agent {
        #[command(subcommand)]
        cmd: AgentCmd,
        #[command(flatten)]
        paths: AgentPaths,
    },
    /// Build an update bundle (OCI layout; a .tar output is a tar of it).
    Bundle {
        manifest: PathBuf,
        #[arg(long)]
        layout: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        compat: Vec<PathBuf>,
        /// Leave the external images out: the device pulls them at first boot.
        #[arg(long)]
        without_images: bool,
        /// Sign the bundle with this minisign secret key (repeatable; an encrypted key takes its
        /// password from $SLOTFORGE_KEY_PASSWORD).
        #[arg(long)]
        sign: Vec<PathBuf>,
        #[command(flatten)]
        src: SourceArgs,
        #[arg(long)]
        json: bool,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Build a bootable offline USB installer that writes the target system to another disk.
    Installer {
        manifest: PathBuf,
        #[arg(long)]
        layout: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        src: SourceArgs,
        #[arg(long)]
        json: bool,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Apply a bundle to the inactive slot of a disk image file (offline).
    Upgrade {
        image: PathBuf,
        bundle: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show everything read back from a disk image.
    Inspect {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check a disk image; exit 0 only if every check passes.
    Verify {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Signing keys for update bundles (minisign format).
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Write DIR/NAME.key (secret) and DIR/NAME.pub (public). With $SLOTFORGE_KEY_PASSWORD set the
    /// secret key is encrypted with it (as `minisign -G`), else stored unencrypted (`minisign -G -W`).
    Generate {
        name: String,
        #[arg(short, long, default_value = ".")]
        output: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check a bundle's signatures against public keys, as a device trusting them would decide
    /// (exit 0 if it would apply it, 2 if it would refuse). Nothing is changed.
    Verify {
        bundle: PathBuf,
        /// minisign public key files (repeatable).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// The build's devices will take any bundle: say so where a person will see it.
fn warn_unsigned(keys: &[String]) {
    if keys.is_empty() {
        eprintln!("warning: the manifest has no `update-keys:`; devices running this build will accept UNSIGNED update bundles");
    }
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Booted slot, build, boot counters and every external image's state, as JSON.
    Status,
    /// Check, pull, prepare external images; mark the boot good if all verified.
    Boot,
    /// Drop the booted slot's boot counter.
    MarkGood,
    /// Run the LinuxKit containers with runc: onboot in order, each to completion, then every
    /// service (external ones only from verified, prepared images).
    Run {
        /// Seconds to wait for services that finish, to report their output; the others keep running.
        #[arg(long, default_value_t = 10)]
        settle: u64,
        /// After the settle window, read every sealed image end to end through dm-verity (a
        /// scrub), so corruption is found now rather than when a service reads it.
        #[arg(long)]
        scrub: bool,
    },
    /// Read every open sealed image end to end through dm-verity, repair what is corrupt.
    Scrub,
    /// Run the onshutdown containers in order.
    Shutdown,
    /// Apply an update bundle (a directory, a tar file, or a block device holding the tar) to
    /// the inactive slot.
    Apply {
        bundle: PathBuf,
        /// Test hook: stop (sleep) at this step so a test can cut the power there.
        #[arg(long, hide = true)]
        pause_at: Option<String>,
    },
    /// Drop image sets no slot's build needs.
    Gc,
    /// (Booted from an installer) write the payload to the first other disk.
    Install,
}

#[derive(clap::Args)]
struct AgentPaths {
    /// The booted rootfs.
    #[arg(long, global = true, default_value = "/")]
    root: PathBuf,
    #[arg(long, global = true)]
    esp: Option<PathBuf>,
    #[arg(long, global = true)]
    images: Option<PathBuf>,
    #[arg(long, global = true)]
    run_dir: Option<PathBuf>,
    #[arg(long, global = true)]
    cmdline: Option<PathBuf>,
    /// Pull external images from this registry host instead of the one in their reference.
    #[arg(long, global = true)]
    mirror: Option<String>,
    #[arg(long = "insecure-registry", global = true)]
    insecure: Vec<String>,
    /// Never use the network.
    #[arg(long, global = true)]
    offline: bool,
}

impl AgentPaths {
    fn config(self) -> anyhow::Result<crate::device::AgentConfig> {
        let mut c = crate::device::AgentConfig::load(&self.root)?;
        if let Some(v) = self.esp { c.esp = v; }
        if let Some(v) = self.images { c.images = v; }
        if let Some(v) = self.run_dir { c.run_dir = v; }
        if let Some(v) = self.cmdline { c.cmdline = v; }
        if self.mirror.is_some() { c.mirror = self.mirror; }
        c.insecure.extend(self.insecure);
        c.offline |= self.offline;
        Ok(c)
    }
}

#[derive(clap::Args)]
struct SourceArgs {
    /// Platform to pick from multi-platform images.
    #[arg(long, default_value = "linux/amd64")]
    platform: Platform,
    /// Blob cache directory (default: $XDG_CACHE_HOME/slotforge or ~/.cache/slotforge).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Use only the cache; list everything missing instead of fetching it.
    #[arg(long)]
    offline: bool,
    /// Build exactly what <manifest>.lock pins; refuse if manifest and lock disagree.
    #[arg(long)]
    locked: bool,
    /// A registry host to reach over plain http (loopback hosts always are). Repeatable.
    #[arg(long = "insecure-registry")]
    insecure: Vec<String>,
}

impl SourceArgs {
    fn options(self) -> anyhow::Result<SourceOptions> {
        Ok(SourceOptions {
            platform: self.platform,
            cache_dir: self.cache.unwrap_or_else(crate::base::cache::Cache::default_dir),
            offline: self.offline,
            insecure: self.insecure,
            locked: self.locked,
            mirrors: crate::oci::mirrors::Mirrors::load()?,
        })
    }
}

pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn json_out(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::CrashStates { before, log, full, seed, atomic_write, scratch, json } => {
            if atomic_write < 512 || !atomic_write.is_power_of_two() {
                anyhow::bail!("--atomic-write {atomic_write}: a power of two from 512");
            }
            let tmp = tempfile::Builder::new().prefix("slotforge-crash-").tempdir()?;
            let scratch = scratch.unwrap_or_else(|| tmp.path().to_path_buf());
            let rec = crate::harness::crash::Recording { operation: "replay".into(), before, log };
            let mut sampling = if full { crate::harness::crash::plan::Sampling::full(seed) } else { crate::harness::crash::plan::Sampling::sample(seed) };
            sampling.atomic = atomic_write / 512;
            let pb = Progress::new(json).bar("states", 0, false);
            let r = crate::harness::crash::replay(&rec, &sampling, &scratch, &|n, total| {
                pb.set_length(total as u64);
                pb.set_position(n as u64);
            })?;
            pb.finish_and_clear();
            if json {
                json_out(&r)?;
            } else {
                print!("{}", crate::harness::crash::summary(&r));
            }
            Ok(if r.failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Cmd::Test { matrix, only, junit, json, keep, jobs, cache, crash_boots, crash_full } => {
            let m = crate::harness::matrix::load(&matrix)?;
            let total: usize = m.matrix.paths.iter().map(|p| p.steps.len() + 1).sum();
            let pb = Progress::new(json).bar("test", total as u64, false);
            let pb2 = pb.clone();
            let opts = crate::harness::run::Options {
                only,
                keep,
                jobs,
                cache,
                crash_boots,
                crash_full,
                on_step: Box::new(move |r| {
                    pb2.inc(1);
                    let line = format!("{:<7} {}/{} ({:.0} s)", r.result, r.path, r.label, r.seconds);
                    if pb2.is_hidden() {
                        eprintln!("{line}");
                    } else {
                        pb2.println(line);
                    }
                }),
            };
            let report = crate::harness::run::run(&m, &opts)?;
            pb.finish_and_clear();
            if let Some(j) = &junit {
                std::fs::write(j, crate::harness::run::junit(&report)).map_err(|e| anyhow::anyhow!("writing {}: {e}", j.display()))?;
            }
            if json {
                eprint!("{}", crate::harness::run::table(&report));
                json_out(&report)?;
            } else {
                print!("{}", crate::harness::run::table(&report));
            }
            Ok(if report.failed == 0 && report.steps.iter().any(|s| s.result == "pass") { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Cmd::Check { manifest, json } => {
            let m = crate::builder::manifest::load(&manifest)?;
            let ids = m.ids();
            let mut rows = Vec::new();
            for section in [crate::builder::manifest::Section::Onboot, crate::builder::manifest::Section::Onshutdown, crate::builder::manifest::Section::Services] {
                for (i, s) in m.section(section).iter().enumerate() {
                    let s = &s.value;
                    rows.push(serde_json::json!({
                        "section": section.dir(), "name": s.name(), "image": s.image.as_ref().map(|i| i.value.clone()),
                        "external": s.is_external(), "dir": crate::linuxkit::bundle::bundle_dir(section, i, s.name()), "id": ids.get(s.name()),
                    }));
                }
            }
            if json {
                json_out(&serde_json::json!({"manifest": manifest, "ok": true, "boot_loader": m.boot().loader.value, "containers": rows}))?;
            } else {
                for r in &rows {
                    println!("{:<10} {:<20} {}{}", r["section"].as_str().unwrap_or(""), r["name"].as_str().unwrap_or(""), r["dir"].as_str().unwrap_or(""), if r["external"] == true { "  (external)" } else { "" });
                }
                println!("{}: ok", manifest.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Lock { manifest, src, json } => {
            let (path, l) = crate::builder::lock(&manifest, &src.options()?, Progress::new(json))?;
            if json {
                json_out(&l)?;
            } else {
                for i in &l.images {
                    println!("{} -> {}", i.reference, i.digest);
                }
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pull { manifest, src, json, quiet } => {
            let s = crate::builder::pull(&manifest, &src.options()?, Progress::new(quiet || json))?;
            if json {
                json_out(&s)?;
            } else {
                println!("{} blobs: {} fetched ({}), {} already cached ({})", s.blobs, s.fetched, mib(s.fetched_bytes), s.blobs - s.fetched, mib(s.cached_bytes));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Build { manifest, layout, output, compat, no_prefill, boot_tries, bmap, qcow2, src, json, quiet } => {
            let compose = ComposeOptions { manifest, layout, compat, sources: src.options()?, progress: Progress::new(quiet || json) };
            let opts = BuildOptions { compose, output, no_prefill, boot_tries, bmap, qcow2, extra_cmdline: None };
            let s = build(&opts)?;
            warn_unsigned(&s.update_keys);
            if json {
                json_out(&s)?;
            } else {
                println!("built {} ({} {}, layout {} generation {})", s.output.display(), s.version, s.build_id, s.layout, s.generation);
                for c in &s.caps {
                    println!("  rootfs {} of {} cap on {} gen {} ({}): slack {}", mib(s.rootfs_bytes), mib(c.cap), c.layout, c.generation, c.partition, mib(c.slack.max(0) as u64));
                }
                for e in &s.external_images {
                    println!("  external {} {} ({})", e.name, e.digest, mib(e.size));
                }
                if let Some(v) = &s.verity {
                    println!("  dm-verity root hash {} (tree {}, {:.2}% of the slot image)", v.root_hash, mib(v.tree_bytes), v.tree_bytes as f64 * 100.0 / s.rootfs_bytes.max(1) as f64);
                }
                println!("  disk {} with {} written", mib(s.disk_size), mib(s.bytes_written));
                if let Some((p, b)) = &s.bmap {
                    println!("  bmap {}: {} of {} blocks mapped ({})", p.display(), b.mapped_blocks, b.blocks, mib(b.mapped_bytes));
                }
                if let Some(q) = &s.qcow2 {
                    println!("  qcow2 {}", q.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Agent { cmd, paths } => {
            let cfg = paths.config()?;
            match cmd {
                AgentCmd::Status => json_out(&crate::device::agent::status::status(&cfg)?)?,
                AgentCmd::Boot => {
                    let st = crate::device::agent::boot::boot(&cfg)?;
                    if st.state != "ok" {
                        return Ok(ExitCode::from(3));
                    }
                }
                AgentCmd::MarkGood => {
                    let e = crate::device::agent::boot::mark_good(&cfg)?;
                    crate::device::emit("marked-good", serde_json::json!({"entry": e}));
                }
                AgentCmd::Run { settle, scrub } => crate::device::agent::runner::run(&cfg, std::time::Duration::from_secs(settle), scrub)?,
                AgentCmd::Scrub => crate::device::agent::runner::scrub(&cfg)?,
                AgentCmd::Shutdown => crate::device::agent::runner::shutdown(&cfg)?,
                AgentCmd::Apply { bundle, pause_at } => {
                    let b = crate::format::bundle::Bundle::open(&bundle, Some(&cfg.images.join(".partial")))?;
                    crate::device::emit("apply-start", serde_json::json!({"build_id": b.config.build_id, "version": b.config.version}));
                    let mut t = crate::device::upgrade::device::DeviceTarget { cfg: cfg.clone() };
                    let step = |s: &str| {
                        crate::device::emit("apply-step", serde_json::json!({"step": s}));
                        if pause_at.as_deref() == Some(s) {
                            crate::device::emit("paused", serde_json::json!({"step": s}));
                            std::thread::sleep(std::time::Duration::from_secs(600));
                        }
                    };
                    match crate::device::upgrade::apply_with(&mut t, &b, &step) {
                        Ok(r) => crate::device::emit("applied", serde_json::to_value(&r)?),
                        Err(e) => {
                            crate::device::emit("apply-failed", serde_json::json!({"error": format!("{e:#}")}));
                            return Err(e);
                        }
                    }
                }
                AgentCmd::Install => crate::device::install::install_to_other_disk(&cfg)?,
                AgentCmd::Gc => {
                    let (rel, _) = crate::device::agent::status::read_release(&cfg.root)?;
                    let keep = crate::device::upgrade::gc::builds_in_use(&cfg.esp, &rel.build_id);
                    crate::device::emit("gc", serde_json::to_value(crate::device::upgrade::gc::gc(&cfg.images, &keep)?)?);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bundle { manifest, layout, output, compat, without_images, sign, src, json, quiet } => {
            let compose = ComposeOptions { manifest, layout, compat, sources: src.options()?, progress: Progress::new(quiet || json) };
            let s = crate::builder::bundle::bundle(&crate::builder::bundle::BundleOptions { compose, output, without_images, sign })?;
            if s.signed_by.is_empty() {
                eprintln!("warning: the bundle is unsigned; devices whose rootfs trusts an update key will refuse it (sign with --sign KEY)");
            }
            if json {
                json_out(&s)?;
            } else {
                println!("bundle {} ({} {}), rootfs {}, {} in all{}", s.output.display(), s.version, s.build_id, mib(s.rootfs_bytes), mib(s.bundle_bytes), if s.signed_by.is_empty() { String::new() } else { format!(", signed by {}", s.signed_by.join(", ")) });
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Installer { manifest, layout, output, src, json, quiet } => {
            let compose = ComposeOptions { manifest, layout, compat: vec![], sources: src.options()?, progress: Progress::new(quiet || json) };
            let s = crate::builder::installer::installer(&crate::builder::installer::InstallerOptions { compose, output })?;
            if json {
                json_out(&s)?;
            } else {
                println!("installer {} ({}): {} payload for a {} target layout; the installer image is {}", s.output.display(), s.build_id, mib(s.payload_bytes), mib(s.target_image_size), mib(s.installer_size));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Upgrade { image, bundle, json } => {
            let b = crate::format::bundle::Bundle::open(&bundle, None)?;
            let mut t = crate::device::upgrade::file::FileTarget::open(&image)?;
            let r = crate::device::upgrade::apply(&mut t, &b)?;
            if json {
                json_out(&r)?;
            } else {
                println!("slot {} now holds {} ({}), entry {} (install {}); {} image blobs written ({}), {} already present", r.slot, r.version, r.build_id, r.entry, r.install_number, r.blobs_written, mib(r.image_bytes_written), r.blobs_present);
                match &r.signature {
                    crate::format::signature::Decision::Signed { key_id } => println!("signature: good, key {key_id}"),
                    crate::format::signature::Decision::Unchecked => eprintln!("warning: the slot that would boot trusts no update key; the bundle was applied without a signature check"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Key { cmd: KeyCmd::Generate { name, output, json } } => {
            let (key, public, id) = crate::format::signature::write_key_pair(&name, &output)?;
            if json {
                json_out(&serde_json::json!({"key_id": id, "secret_key": key, "public_key": public}))?;
            } else {
                println!("key {id}: secret {} (keep it off the devices), public {} (list it under update-keys:)", key.display(), public.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Key { cmd: KeyCmd::Verify { bundle, keys, json } } => {
            let b = crate::format::bundle::Bundle::open(&bundle, None)?;
            let files: Vec<(String, Vec<u8>)> = keys
                .iter()
                .map(|k| Ok((format!("{}.pub", k.display()), std::fs::read(k).map_err(|e| anyhow::anyhow!("{}: {e}", k.display()))?)))
                .collect::<anyhow::Result<_>>()?;
            let trusted = crate::format::signature::trusted_keys(&files)?;
            let d = crate::format::signature::decide(&b.config_bytes, &b.signatures, &trusted);
            if json {
                json_out(&match &d {
                    Ok(d) => serde_json::json!({"ok": true, "build_id": b.config.build_id, "decision": d}),
                    Err(e) => serde_json::json!({"ok": false, "build_id": b.config.build_id, "error": format!("{e:#}")}),
                })?;
            } else {
                match &d {
                    Ok(crate::format::signature::Decision::Signed { key_id }) => println!("bundle {}: good signature by key {key_id}", b.config.build_id),
                    Ok(crate::format::signature::Decision::Unchecked) => println!("bundle {}: no key given", b.config.build_id),
                    Err(e) => println!("bundle {}: would be refused: {e:#}", b.config.build_id),
                }
            }
            Ok(if d.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Cmd::Inspect { image, json } => {
            let r = inspect(&image)?;
            if json {
                json_out(&r)?;
            } else {
                println!("disk {} ({}), GUID {}", image.display(), mib(r.gpt.disk_size), r.gpt.disk_guid);
                if let Some(l) = &r.layout {
                    println!("layout {} generation {}", l.name, l.generation);
                }
                for p in &r.gpt.partitions {
                    println!("  {:>2} {:<16} {:>12} at {:>12}  type {}", p.number, p.name, mib(p.size), p.start, p.type_guid);
                }
                for s in &r.slots {
                    match &s.release {
                        Some(rel) => println!("slot {}: {} build {}, rootfs {} of cap {}, slack {}", s.slot, rel.version, rel.build_id, mib(s.rootfs_bytes.unwrap_or(0)), s.cap.map(mib).unwrap_or("?".into()), s.slack.map(|x| format!("{x} bytes")).unwrap_or("?".into())),
                        None => println!("slot {}: {}{}", s.slot, s.state, s.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()),
                    }
                    if let Some(v) = &s.verity {
                        println!("  dm-verity: tree {} at byte {}, root hash {}", mib(v.tree_bytes), v.hash_offset, v.root_hash.as_deref().unwrap_or("(no entry names it)"));
                    }
                }
                if let Some(e) = &r.esp {
                    for en in &e.entries {
                        println!("boot entry {}: {} version {} tries {}", en.file, en.title.clone().unwrap_or_default(), en.version.clone().unwrap_or_default(), en.tries_left.map(|t| t.to_string()).unwrap_or("-".into()));
                    }
                }
                if let Some(i) = &r.images {
                    for b in &i.builds {
                        println!("images for build {} ({}):", b.build_id, mib(b.bytes));
                        for im in &b.images {
                            println!("  {} {} {}", im.name, im.digest, mib(im.bytes));
                        }
                    }
                }
                for e in &r.errors {
                    println!("error: {e}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify { image, json } => {
            let r = verify(&image)?;
            if json {
                json_out(&r)?;
            } else {
                for c in &r.checks {
                    println!("{} {:<28} {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
                }
                println!("{}", if r.ok { "verify: all checks passed" } else { "verify: FAILED" });
            }
            Ok(if r.ok { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
    }
}
