//! The command line: arguments in, one library call per verb, output out (human text via
//! `print`, or JSON with `--json`). No logic lives here.

mod args;
mod print;

use crate::base::progress::Progress;
use crate::builder::{BuildOptions, ComposeOptions};
use args::*;
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
    Build(BuildArgs),
    /// Check a manifest without fetching anything: every key known, values well-formed,
    /// names as LinuxKit allows them. Lists its containers and where they go in the rootfs.
    Check {
        manifest: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Upgrade-compatibility testing in QEMU: build the matrix's variants, install, boot,
    /// upgrade, inject faults, and check what each step must show (docs/testing.md).
    Test(TestArgs),
    /// Merge the JSON reports of `slotforge test --shard K/N` runs into one report (table,
    /// `--json`, `--junit`) as one machine would have written it; exit 0 only if it passed.
    MergeReports(MergeArgs),
    /// Replay a recorded write log (dm-log-writes, e.g. from `slotforge test --keep` or
    /// `slotforge-vm boot --log-writes`) onto the disk as it was before, and check every crash
    /// state offline: GPT, fsck.vfat, e2fsck, which slot systemd-boot would start and whether it
    /// verifies. Exit 0 only if every state boots a good slot.
    CrashStates(CrashStatesArgs),
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
        #[command(flatten)]
        out: Output,
    },
    /// Chunk a file as casync does (buzhash, 16/64/256 KiB, SHA-512/256): write its blob index
    /// (.caibx) and the chunks a casync store (.castr) lacks — `casync extract --store STORE
    /// INDEX OUT` and desync read them.
    Chunk {
        file: PathBuf,
        /// The chunk store directory (casync's layout: xxxx/<id>.cacnk, zstd).
        #[arg(long)]
        store: PathBuf,
        /// The index to write (default: FILE.caibx).
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The blob and build cache (--cache, default $XDG_CACHE_HOME/slotforge): stats, prune.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
        /// Cache directory (default: $XDG_CACHE_HOME/slotforge or ~/.cache/slotforge).
        #[arg(long, global = true)]
        cache: Option<PathBuf>,
    },
    /// The on-device agent (runs on the appliance).
    Agent {
        #[command(subcommand)]
        cmd: AgentCmd,
        #[command(flatten)]
        paths: AgentPaths,
    },
    /// Build an update bundle (OCI layout; a .tar output is a tar of it).
    Bundle(BundleArgs),
    /// Build a bootable offline USB installer that writes the target system to another disk.
    Installer(InstallerArgs),
    /// Apply a bundle to the inactive slot of a disk image file (offline); BUNDLE may be a
    /// release in a registry, `docker://HOST/REPO:TAG` (pushed with `slotforge push`).
    Upgrade {
        image: PathBuf,
        bundle: String,
        /// Where a registry pull keeps what it fetched (a rerun after a cut goes on from there).
        #[arg(long)]
        scratch: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Publish a bundle as a release in an OCI registry: chunk packs (only those the registry
    /// lacks are uploaded), boot files, signatures as referrers.
    Push {
        bundle: PathBuf,
        /// `[docker://]HOST/REPO:TAG`
        reference: String,
        /// Also publish each sealed image next to its image — the sealed blob and its artifact,
        /// a referrer of the image's manifest, in the image's own repository — when that
        /// repository is on the registry pushed to: a device missing the image at boot then
        /// finds it there (and can start it before it has arrived).
        #[arg(long)]
        next_to_images: bool,
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

pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<crate::builder::Refused>().is_some() => {
            eprintln!("refused: {e:#}");
            ExitCode::from(crate::base::exit::REFUSED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Exit 0 when `ok`, else 2 ("ran, and the answer is no").
fn verdict(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::base::exit::NO)
    }
}

/// Pretty JSON on stdout when `json`, else the human form.
fn show<T: serde::Serialize>(json: bool, v: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        human(v);
    }
    Ok(())
}

fn compose(t: Target, compat: Vec<PathBuf>, src: SourceArgs, progress: Progress) -> anyhow::Result<(ComposeOptions, PathBuf)> {
    Ok((ComposeOptions { manifest: t.manifest, layout: t.layout, compat, sources: src.options()?, progress }, t.output))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Build(a) => build(a),
        Cmd::Check { manifest, json } => {
            show(json, &crate::builder::manifest::check_file(&manifest)?, print::check)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Test(a) => test(a),
        Cmd::MergeReports(a) => merge_reports(a),
        Cmd::CrashStates(a) => crash_states(a),
        Cmd::Lock { manifest, src, json } => {
            let (path, l) = crate::builder::lock(&manifest, &src.options()?, Progress::new(json))?;
            show(json, &l, |l| print::lock(l, &path))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pull { manifest, src, out } => {
            show(out.json, &crate::builder::pull(&manifest, &src.options()?, out.progress())?, print::pull)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Chunk { file, store, output, json } => {
            let index = output.unwrap_or_else(|| PathBuf::from(format!("{}.caibx", file.display())));
            show(json, &crate::format::casync::chunk_file(&file, &index, &store)?, |c| println!("{}: {} bytes in {} chunks ({} new, {} bytes) → {}", file.display(), c.bytes, c.chunks, c.new_chunks, c.new_chunk_bytes, c.index.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cache { cmd, cache } => {
            let c = crate::builder::buildcache::BuildCache::open(&cache.unwrap_or_else(crate::base::cache::Cache::default_dir))?;
            match cmd {
                CacheCmd::Stats { json } => show(json, &c.stats()?, print::cache_stats)?,
                CacheCmd::Prune { max_bytes, json } => {
                    let (entries, bytes) = c.prune(max_bytes)?;
                    show(json, &serde_json::json!({"dropped_entries": entries, "dropped_bytes": bytes}), |v| println!("dropped {} build-cache entries, {} bytes", v["dropped_entries"], v["dropped_bytes"]))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Agent { cmd, paths } => agent(cmd, paths.config()?),
        Cmd::Bundle(a) => bundle(a),
        Cmd::Installer(a) => {
            let (compose, output) = compose(a.target, vec![], a.src, a.out.progress())?;
            show(a.out.json, &crate::builder::installer::installer(&crate::builder::installer::InstallerOptions { compose, output })?, print::installer)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Upgrade { image, bundle, scratch, json } => {
            let r = match bundle.strip_prefix("docker://") {
                Some(_) => crate::device::upgrade::file::upgrade_from_registry(&image, &bundle, scratch.as_deref())?,
                None => crate::device::upgrade::file::upgrade_image(&image, std::path::Path::new(&bundle))?,
            };
            show(json, &r, print::upgrade)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Push { bundle, reference, next_to_images, json } => {
            let s = push_with_bar(&bundle, &reference, next_to_images, json)?;
            show(json, &s, print::push)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect { image, json } => {
            show(json, &crate::format::inspect::inspect(&image)?, |r| print::inspect(r, &image))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify { image, json } => {
            let r = crate::format::inspect::verify(&image)?;
            show(json, &r, print::verify)?;
            Ok(verdict(r.ok))
        }
        Cmd::Key { cmd: KeyCmd::Generate { name, output, json } } => {
            let (secret_key, public_key, key_id) = crate::format::signature::write_key_pair(&name, &output)?;
            show(json, &serde_json::json!({"key_id": key_id, "secret_key": secret_key, "public_key": public_key}), print::key)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Key { cmd: KeyCmd::Verify { bundle, keys, json } } => {
            let r = crate::format::bundle::check_keys(&bundle, &keys)?;
            show(json, &r, print::key_check)?;
            Ok(verdict(r.ok))
        }
    }
}

fn build(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let (compose, output) = compose(a.target, a.compat, a.src, a.out.progress())?;
    let s = crate::builder::build(&BuildOptions { compose, output, no_prefill: a.no_prefill, boot_tries: a.boot_tries, bmap: a.bmap, qcow2: a.qcow2, extra_cmdline: None })?;
    print::warn_unsigned(&s.update_keys);
    show(a.out.json, &s, print::build)?;
    Ok(ExitCode::SUCCESS)
}

fn bundle(a: BundleArgs) -> anyhow::Result<ExitCode> {
    let (compose, output) = compose(a.target, a.compat, a.src, a.out.progress())?;
    let s = crate::builder::bundle::bundle(&crate::builder::bundle::BundleOptions { compose, output, without_images: a.without_images, sign: a.sign, delta_from: a.delta_from })?;
    if s.signed_by.is_empty() {
        eprintln!("warning: the bundle is unsigned; devices whose rootfs trusts an update key will refuse it (sign with --sign KEY)");
    }
    match &a.push {
        None => show(a.out.json, &s, print::bundle)?,
        Some(r) => {
            let p = push_with_bar(&s.output, r, false, a.out.json)?;
            show(a.out.json, &serde_json::json!({"bundle": s, "push": p}), |_| {
                print::bundle(&s);
                print::push(&p);
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `push`, with a bar over the new chunks (drawn once their number is known).
fn push_with_bar(bundle: &std::path::Path, reference: &str, next_to_images: bool, quiet: bool) -> anyhow::Result<crate::builder::push::PushSummary> {
    let progress = Progress::new(quiet);
    let mut bar = None;
    let s = crate::builder::push::push(bundle, reference, &[], next_to_images, &mut |done, total| {
        bar.get_or_insert_with(|| progress.bar("push", total as u64, false)).set_position(done as u64);
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(s)
}

fn test(a: TestArgs) -> anyhow::Result<ExitCode> {
    let m = crate::harness::matrix::load(&a.matrix)?;
    let paths = &m.matrix.paths;
    let total: usize = (0..paths.len()).filter(|&i| crate::harness::shard::runs_here(paths, i, a.shard)).map(|i| paths[i].steps.len() + 1).sum();
    let pb = Progress::new(a.json).bar("test", total as u64, false);
    let on_step = print::step_line(pb.clone());
    let opts = crate::harness::run::Options { only: a.only, keep: a.keep, jobs: a.jobs, cache: a.cache, crash_boots: a.crash_boots, crash_full: a.crash_full, shard: a.shard, on_step };
    let report = crate::harness::run::run(&m, &opts)?;
    pb.finish_and_clear();
    test_report(&report, a.junit.as_deref(), a.json)
}

fn merge_reports(a: MergeArgs) -> anyhow::Result<ExitCode> {
    let reports = a.reports.iter().map(|p| -> anyhow::Result<_> { Ok(serde_json::from_slice(&std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?).map_err(|e| anyhow::anyhow!("{}: not a slotforge test --json report: {e}", p.display()))?) }).collect::<anyhow::Result<Vec<_>>>()?;
    let report = crate::harness::shard::merge(reports).map_err(anyhow::Error::msg)?;
    test_report(&report, a.junit.as_deref(), a.json)
}

/// A test report out: JUnit file, the table (stderr with `--json`), JSON; exit 0 only if it passed.
fn test_report(report: &crate::harness::run::Report, junit: Option<&std::path::Path>, json: bool) -> anyhow::Result<ExitCode> {
    if let Some(j) = junit {
        std::fs::write(j, crate::harness::run::junit(report)).map_err(|e| anyhow::anyhow!("writing {}: {e}", j.display()))?;
    }
    if json {
        eprint!("{}", crate::harness::run::table(report));
    }
    show(json, report, |r| print!("{}", crate::harness::run::table(r)))?;
    Ok(verdict(report.ok()))
}

fn crash_states(a: CrashStatesArgs) -> anyhow::Result<ExitCode> {
    let o = crate::harness::crash::ReplayOptions { full: a.full, seed: a.seed, atomic_write: a.atomic_write, scratch: a.scratch };
    let pb = Progress::new(a.json).bar("states", 0, false);
    let r = crate::harness::crash::replay_recording(&a.before, &a.log, &o, &|n, total| {
        pb.set_length(total as u64);
        pb.set_position(n as u64);
    })?;
    pb.finish_and_clear();
    show(a.json, &r, |r| print!("{}", crate::harness::crash::summary(r)))?;
    Ok(verdict(r.failed == 0))
}

/// The agent prints its own JSON events; its verbs print nothing else but `status`.
fn agent(cmd: AgentCmd, cfg: crate::device::AgentConfig) -> anyhow::Result<ExitCode> {
    use crate::device::agent;
    match cmd {
        AgentCmd::Status => show(true, &agent::status::status(&cfg)?, |_| ())?,
        AgentCmd::Boot => {
            if agent::boot::boot(&cfg)?.state != crate::format::agent::StatusState::Ok {
                return Ok(ExitCode::from(crate::base::exit::DEGRADED));
            }
        }
        AgentCmd::MarkGood => drop(agent::boot::mark_good_reported(&cfg)?),
        AgentCmd::Run { settle, scrub } => agent::runner::run(&cfg, std::time::Duration::from_secs(settle), scrub)?,
        AgentCmd::Scrub => agent::runner::scrub(&cfg)?,
        AgentCmd::Shutdown => agent::runner::shutdown(&cfg)?,
        AgentCmd::Apply { bundle, pause_at } => drop(agent::update::apply(&cfg, &bundle, pause_at)?),
        AgentCmd::Update { reference, check, pause_at } => agent::update::update(&cfg, &reference, check, pause_at)?,
        AgentCmd::Gc => drop(agent::update::gc(&cfg)?),
        AgentCmd::Install => crate::device::install::install_to_other_disk(&cfg)?,
        AgentCmd::LazyServe { job } => agent::lazy::serve(&job)?,
    }
    Ok(ExitCode::SUCCESS)
}
