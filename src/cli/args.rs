//! Argument structs: one per verb, sharing what verbs share (the manifest, layout and output of
//! the three build verbs, where images come from, `--json`/`--quiet`, the agent's paths).

use crate::builder::SourceOptions;
use crate::oci::Platform;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// A manifest built onto a layout into an output file (`build`, `bundle`, `installer`).
#[derive(Args)]
pub struct Target {
    /// The system manifest (LinuxKit yml superset).
    pub manifest: PathBuf,
    /// The layout (layouts/*.yaml).
    #[arg(long)]
    pub layout: PathBuf,
    /// Output (written to a temporary file and renamed when complete).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// `--json` and `--quiet`.
#[derive(Args)]
pub struct Output {
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(short, long)]
    pub quiet: bool,
}

impl Output {
    /// Progress bars unless quiet or JSON.
    pub fn progress(&self) -> crate::base::progress::Progress {
        crate::base::progress::Progress::new(self.quiet || self.json)
    }
}

#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub target: Target,
    /// Another layout generation the rootfs must also fit (repeatable).
    #[arg(long)]
    pub compat: Vec<PathBuf>,
    /// Leave this external image out of the images partition; the device pulls it (repeatable).
    #[arg(long = "no-prefill")]
    pub no_prefill: Vec<String>,
    /// Put a boot counter on slot A's entry (slot-a+N.conf): the first boot must be marked good.
    #[arg(long)]
    pub boot_tries: Option<u32>,
    /// Also write OUTPUT.bmap for `bmaptool copy` (mapped ranges with sha256).
    #[arg(long)]
    pub bmap: bool,
    /// Also write a qcow2 copy (OUTPUT with the extension .qcow2; needs qemu-img).
    #[arg(long)]
    pub qcow2: bool,
    #[command(flatten)]
    pub src: SourceArgs,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Args)]
pub struct BundleArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub compat: Vec<PathBuf>,
    /// Leave the external images out: the device pulls them at first boot.
    #[arg(long)]
    pub without_images: bool,
    /// Sign the bundle with this minisign secret key (repeatable; an encrypted key takes its
    /// password from $SLOTFORGE_KEY_PASSWORD).
    #[arg(long)]
    pub sign: Vec<PathBuf>,
    /// Write a delta bundle against this build in the field — its bundle (directory or .tar) or
    /// its disk image (repeatable): the rootfs goes as casync chunks, leaving out every chunk a
    /// base holds; a device holding none of the bases refuses it.
    #[arg(long, value_name = "BASE")]
    pub delta_from: Vec<PathBuf>,
    /// Then publish the bundle to a registry as `slotforge push` does (`[docker://]HOST/REPO:TAG`).
    #[arg(long, value_name = "REF", conflicts_with = "delta_from")]
    pub push: Option<String>,
    #[command(flatten)]
    pub src: SourceArgs,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Args)]
pub struct InstallerArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub src: SourceArgs,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Args)]
pub struct TestArgs {
    pub matrix: PathBuf,
    /// Run only paths or steps matching these globs (`field-*`, `field-v1/upgrade*`).
    #[arg(long)]
    pub only: Vec<String>,
    /// Write a JUnit XML report here.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Keep disks, bundles and serial logs in this directory.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Paths run in parallel (each is one VM).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Blob cache for the builds (default: the user cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// `crash-states` faults: boot this many states in QEMU (overrides each step's budget).
    #[arg(long)]
    pub crash_boots: Option<usize>,
    /// `crash-states` faults: check every prefix and torn write between flushes offline,
    /// and 8 random subsets per interval (default: a sample of 2 and 2).
    #[arg(long)]
    pub crash_full: bool,
    /// Run only the K-th of N shards of the paths (1-based; balanced by expected boots, the same
    /// split on every machine). Merge the shards' `--json` reports with `slotforge merge-reports`.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<crate::harness::shard::Shard>,
}

#[derive(Args)]
pub struct MergeArgs {
    /// The `slotforge test --json` reports of the shards.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// Write a JUnit XML report of the whole run here.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Print the merged report as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CrashStatesArgs {
    /// The disk image as it was before the log began.
    pub before: PathBuf,
    /// The log.
    pub log: PathBuf,
    /// Every prefix and torn write, 8 subsets per interval (default: a sample).
    #[arg(long)]
    pub full: bool,
    /// Seed for the sampled states.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The medium's atomic write unit in bytes: writes tear only at multiples of it (4096:
    /// flash, 4Kn and 512e disks; 512: a disk that persists single 512-byte sectors).
    #[arg(long, default_value_t = 4096)]
    pub atomic_write: u64,
    /// Scratch directory (default: a temporary one).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum CacheCmd {
    /// What the cache holds: pulled blobs and build-cache entries (sealed images).
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Drop least recently used build-cache entries until they take at most --max-bytes
    /// (0: all of them). Pulled blobs are kept.
    Prune {
        #[arg(long, default_value_t = 0)]
        max_bytes: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AgentCmd {
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
        pause_at: Option<crate::format::agent::ApplyStep>,
    },
    /// Pull a release from a registry by tag (`[docker://]HOST/REPO:TAG`) and apply it: signatures
    /// decided before any content is fetched, then only the chunks the running slot lacks.
    Update {
        reference: String,
        /// Only say what the tag names and whether this device would take it (JSON); fetch nothing.
        #[arg(long)]
        check: bool,
        #[arg(long, hide = true)]
        pause_at: Option<crate::format::agent::ApplyStep>,
    },
    /// Drop image sets no slot's build needs.
    Gc,
    /// (Booted from an installer) write the payload to the first other disk.
    Install,
    /// Serve a lazily started sealed image to the kernel's NBD client (started by `agent boot`).
    #[command(hide = true)]
    LazyServe { job: PathBuf },
}

#[derive(Subcommand)]
pub enum KeyCmd {
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

#[derive(clap::Args)]
pub struct AgentPaths {
    /// The booted rootfs.
    #[arg(long, global = true, default_value = "/")]
    pub root: PathBuf,
    #[arg(long, global = true)]
    pub esp: Option<PathBuf>,
    #[arg(long, global = true)]
    pub images: Option<PathBuf>,
    #[arg(long, global = true)]
    pub run_dir: Option<PathBuf>,
    #[arg(long, global = true)]
    pub cmdline: Option<PathBuf>,
    /// Pull external images from this registry host instead of the one in their reference.
    #[arg(long, global = true)]
    pub mirror: Option<String>,
    #[arg(long = "insecure-registry", global = true)]
    pub insecure: Vec<String>,
    /// Never use the network.
    #[arg(long, global = true)]
    pub offline: bool,
}

impl AgentPaths {
    pub fn config(self) -> anyhow::Result<crate::device::AgentConfig> {
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
pub struct SourceArgs {
    /// Platform to pick from multi-platform images.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: Platform,
    /// Blob cache directory (default: $XDG_CACHE_HOME/slotforge or ~/.cache/slotforge).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Use only the cache; list everything missing instead of fetching it.
    #[arg(long)]
    pub offline: bool,
    /// Build exactly what <manifest>.lock pins; refuse if manifest and lock disagree.
    #[arg(long)]
    pub locked: bool,
    /// A registry host to reach over plain http (loopback hosts always are). Repeatable.
    #[arg(long = "insecure-registry")]
    pub insecure: Vec<String>,
}

impl SourceArgs {
    pub fn options(self) -> anyhow::Result<SourceOptions> {
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

