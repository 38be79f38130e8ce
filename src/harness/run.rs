//! Driving an upgrade matrix: build each (variant, layout) once, then for every path install,
//! boot under QEMU, and run its steps — bundles supplied on a second disk and applied by the
//! guest's agent, faults injected — reading the guest's JSON events after each step and
//! comparing them with the step's expectations. Paths are independent VMs (`--jobs`).

use super::matrix::{Expect, Fault, Loaded, Step};
use super::vm::{self, Boot, Outcome, VmOptions};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use crate::format::agent::{ApplyStep, Event, Kind};

mod by_tag;
mod crash_step;

pub use super::report::{junit, Report, StepOutcome, StepResult};

pub struct Options {
    /// `PATH` or `PATH/STEP` globs (`*` matches any run of characters); empty: everything.
    pub only: Vec<String>,
    /// Keep disks and serial logs here (else a temporary directory).
    pub keep: Option<PathBuf>,
    pub jobs: usize,
    /// The blob cache `slotforge build`/`bundle` use.
    pub cache: Option<PathBuf>,
    /// `crash-states`: states to boot, overriding each step's budget.
    pub crash_boots: Option<usize>,
    /// `crash-states`: every prefix and torn write, 8 subsets per interval.
    pub crash_full: bool,
    /// Run only this shard's paths (`--shard K/N`; `harness::shard`).
    pub shard: Option<super::shard::Shard>,
    /// Called with one line per finished step (progress on the terminal).
    pub on_step: Box<dyn Fn(&StepResult) + Sync>,
}

/// `*` glob.
pub fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let mut rest = s;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(p) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            let Some(at) = rest.find(p) else { return false };
            rest = &rest[at + p.len()..];
        }
    }
    true
}

fn step_label(s: &Step) -> String {
    let base = match &s.upgrade {
        Some(v) => format!("upgrade {}", v.value),
        None => "boot".to_string(),
    };
    match &s.fault {
        Some(f) => format!("{base} ({})", f.value),
        None => base,
    }
}

/// Why a build of the matrix did not give an artefact.
#[derive(Debug, Clone, thiserror::Error)]
enum BuildError {
    /// The builder refused the inputs for a stated reason (`slotforge` exit 3: over a cap).
    #[error("{0}")]
    Refused(String),
    /// Anything else: an error of the run.
    #[error("{0}")]
    Failed(String),
}

impl BuildError {
    fn io(e: std::io::Error) -> Self {
        BuildError::Failed(e.to_string())
    }
}

/// What the builds of the matrix share: the work directory, built disks and bundles by key.
struct Shared<'a> {
    m: &'a Loaded,
    work: PathBuf,
    bin: PathBuf,
    cache: PathBuf,
    built: Mutex<BTreeMap<String, Result<(PathBuf, String), BuildError>>>,
    locks: Mutex<BTreeMap<String, std::sync::Arc<Mutex<()>>>>,
}

impl Shared<'_> {
    fn slotforge(&self, args: &[&str]) -> Result<String, BuildError> {
        let o = Command::new(&self.bin).args(args).output().map_err(|e| BuildError::Failed(format!("running {}: {e}", self.bin.display())))?;
        let said = || format!("slotforge {}: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&o.stderr).trim());
        match o.status.code() {
            Some(0) => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
            Some(c) if c == i32::from(crate::base::exit::REFUSED) => Err(BuildError::Refused(said())),
            _ => Err(BuildError::Failed(said())),
        }
    }

    /// Build (once) what `key` names with `make`; concurrent paths wait for the first.
    fn once(&self, key: &str, make: impl FnOnce() -> Result<(PathBuf, String), BuildError>) -> Result<(PathBuf, String), BuildError> {
        let lock = self.locks.lock().unwrap().entry(key.to_string()).or_default().clone();
        let _g = lock.lock().unwrap();
        if let Some(r) = self.built.lock().unwrap().get(key) {
            return r.clone();
        }
        let r = make();
        self.built.lock().unwrap().insert(key.to_string(), r.clone());
        r
    }

    fn manifest(&self, variant: &str) -> PathBuf {
        self.m.file(&self.m.matrix.variants[variant].manifest.value)
    }
    fn layout(&self, name: &str) -> PathBuf {
        self.m.file(&self.m.matrix.layouts[name].value)
    }

    /// The disk of `variant` built for `layout`: (path, build id).
    fn disk(&self, variant: &str, layout: &str) -> Result<(PathBuf, String), BuildError> {
        self.once(&format!("disk {variant} {layout}"), || {
            let out = self.work.join("builds").join(format!("{variant}-{layout}.img"));
            std::fs::create_dir_all(out.parent().unwrap()).map_err(BuildError::io)?;
            let j = self.slotforge(&["build", &self.manifest(variant).to_string_lossy(), "--layout", &self.layout(layout).to_string_lossy(), "-o", &out.to_string_lossy(), "--json", "--cache", &self.cache.to_string_lossy()])?;
            let v: Value = serde_json::from_str(&j).map_err(|e| BuildError::Failed(format!("build summary: {e}")))?;
            Ok((out, v["build_id"].as_str().unwrap_or_default().to_string()))
        })
    }

    /// The USB installer of `variant` for `layout`: (path, target disk size).
    fn installer(&self, variant: &str, layout: &str) -> Result<(PathBuf, String), BuildError> {
        self.once(&format!("installer {variant} {layout}"), || {
            let out = self.work.join("builds").join(format!("{variant}-{layout}.usb.img"));
            std::fs::create_dir_all(out.parent().unwrap()).map_err(BuildError::io)?;
            let j = self.slotforge(&["installer", &self.manifest(variant).to_string_lossy(), "--layout", &self.layout(layout).to_string_lossy(), "-o", &out.to_string_lossy(), "--json", "--cache", &self.cache.to_string_lossy()])?;
            let v: Value = serde_json::from_str(&j).map_err(|e| BuildError::Failed(format!("installer summary: {e}")))?;
            Ok((out, format!("{} {}", v["build_id"].as_str().unwrap_or_default(), v["target_image_size"].as_u64().unwrap_or(0))))
        })
    }

    /// A rogue signing key no device trusts.
    fn rogue_key(&self) -> Result<PathBuf, BuildError> {
        self.once("rogue key", || {
            let dir = self.work.join("keys");
            let key = dir.join("rogue.key");
            if !key.exists() {
                self.slotforge(&["key", "generate", "rogue", "-o", &dir.to_string_lossy()])?;
            }
            Ok((key, String::new()))
        })
        .map(|(k, _)| k)
    }

    /// An update bundle of `variant` for `layout` (+ compat), signed as asked.
    /// `delta`: a delta bundle against the disk at this path, as it is now (the builds the path
    /// installed), named by the given unique tag — never shared between steps.
    #[allow(clippy::too_many_arguments)]
    fn bundle(&self, variant: &str, layout: &str, compat: &[String], rogue: bool, thin: bool, delta: Option<(&Path, &str)>) -> Result<(PathBuf, String), BuildError> {
        let key = if rogue { Some(self.rogue_key()?) } else { self.m.matrix.variants[variant].key.as_ref().map(|k| self.m.file(&k.value)) };
        let dtag = delta.map(|(_, t)| format!("-delta-{t}")).unwrap_or_default();
        let tag = format!("{variant}-{layout}{}{}{}{dtag}", compat.iter().map(|c| format!("+{c}")).collect::<String>(), if rogue { "-rogue" } else { "" }, if thin { "-thin" } else { "" });
        self.once(&format!("bundle {tag}"), || {
            let out = self.work.join("builds").join(format!("{tag}.oci.tar"));
            let m = self.manifest(variant).to_string_lossy().into_owned();
            let l = self.layout(layout).to_string_lossy().into_owned();
            let (o, c) = (out.to_string_lossy().into_owned(), self.cache.to_string_lossy().into_owned());
            let mut args: Vec<String> = ["bundle", &m, "--layout", &l, "-o", &o, "--json", "--cache", &c].iter().map(|s| s.to_string()).collect();
            for cl in compat {
                args.push("--compat".into());
                args.push(self.layout(cl).to_string_lossy().into_owned());
            }
            if thin {
                args.push("--without-images".into());
            }
            if let Some((disk, _)) = delta {
                args.push("--delta-from".into());
                args.push(disk.to_string_lossy().into_owned());
            }
            if let Some(k) = &key {
                args.push("--sign".into());
                args.push(k.to_string_lossy().into_owned());
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let j = self.slotforge(&a)?;
            let v: Value = serde_json::from_str(&j).map_err(|e| BuildError::Failed(format!("bundle summary: {e}")))?;
            Ok((out, v["build_id"].as_str().unwrap_or_default().to_string()))
        })
    }
}

/// One path's device: its disk and VM settings.
struct Device<'a> {
    sh: &'a Shared<'a>,
    dir: PathBuf,
    disk: PathBuf,
    /// Build id of each variant seen so far (to name what is running).
    builds: BTreeMap<String, String>,
    /// The host port the guest's 10.0.2.100:5000 reaches, while the network is up.
    network: Option<u16>,
    /// Steps run so far (names what a step builds or publishes for this path alone).
    steps: usize,
    /// What the step found besides the guest's events (merged into its `observed`).
    extra: serde_json::Map<String, Value>,
    /// The variant the device last reported running (`observed.variant` of the last step).
    running: Option<String>,
}

impl Device<'_> {
    fn boot(&self, extra: &[PathBuf], pause: Option<ApplyStep>) -> anyhow::Result<Boot> {
        self.boot_disk(&self.disk, "dev", extra, pause)
    }

    /// The VM settings of this path's boots of `disk`.
    fn vm_options(&self, disk: &Path, name: &str, extra: &[PathBuf]) -> VmOptions {
        let mut o = VmOptions::new(disk, &self.dir.join("vm"), name);
        o.registry_port = self.network;
        o.memory_mb = self.sh.m.matrix.memory.unwrap_or(768);
        o.timeout = Duration::from_secs(self.sh.m.matrix.boot_timeout.unwrap_or(300));
        o.extra_disks.extend(extra.iter().cloned());
        o
    }

    fn boot_disk(&self, disk: &Path, name: &str, extra: &[PathBuf], pause: Option<ApplyStep>) -> anyhow::Result<Boot> {
        let mut o = self.vm_options(disk, name, extra);
        if let Some(p) = pause {
            let f = self.dir.join("pause.disk");
            let mut data = p.name().as_bytes().to_vec();
            data.resize(4096, 0);
            std::fs::write(&f, data)?;
            o.extra_disks.push(f);
        }
        vm::boot(&o, &move |ev| pause.is_some_and(|s| ev.iter().any(|e| e.event == Some(Event::Paused { step: s }))))
    }

    /// Boot until a boot reaches the agent's `status` (a broken slot's boots fail in the
    /// initramfs and count down its tries); at most 6 boots.
    fn boot_until_status(&self, boots: &mut Vec<Boot>) -> anyhow::Result<()> {
        for _ in 0..6 {
            let b = self.boot(&[], None)?;
            let done = b.status().is_some() || b.outcome != Outcome::Exited;
            boots.push(b);
            if done {
                return Ok(());
            }
        }
        Ok(())
    }

    /// What the step's boots showed: the last status, rollbacks, refusals.
    fn observe(&self, boots: &[Boot], refused: Option<String>) -> Value {
        // The last status of the last boot that reported one (the runner reports again after
        // repairing a sealed image dm-verity found corrupt).
        let status = boots.iter().rev().find_map(|b| b.status());
        let rolled_back = boots.iter().any(|b| b.has(Kind::RolledBack));
        // A failed apply a later boot of the step completed (a pull cut off, then resumed) is
        // not a refusal.
        let last_apply = boots.iter().rev().find(|b| b.apply_failed().is_some() || b.applied().is_some());
        let apply_failed = last_apply.and_then(|b| b.apply_failed()).map(str::to_string);
        let pulled = boots.iter().rev().find_map(|b| b.applied().and_then(|a| a.pulled.clone()));
        let lazy = boots.iter().flat_map(lazy_starts).collect::<Vec<_>>();
        let refusal = refused.or(apply_failed);
        let build = status.map(|s| s.build_id.as_str()).unwrap_or("");
        let variant = self.builds.iter().find(|(_, b)| b.as_str() == build).map(|(v, _)| v.clone());
        json!({
            "slot": status.and_then(|s| s.slot.clone()),
            "build_id": build,
            "variant": variant,
            "version": status.map(|s| s.version.clone()),
            "state": status.map(|s| s.state),
            "images": status.map(|s| s.images.clone()),
            "rolled_back": rolled_back,
            "refused": refusal.is_some(),
            "refusal": refusal,
            "boots": boots.len(),
            "outcomes": boots.iter().map(|b| format!("{:?}", b.outcome)).collect::<Vec<_>>(),
            "pulled": pulled,
            "lazy": lazy.iter().any(|l| l["service_before_filled"] == true),
            "lazy_images": lazy,
        })
    }
}

/// The images a boot started lazily, in event order: when each was exposed, whether its service
/// started before the image was complete (`image-filled` not yet seen), and the fill's outcome.
pub fn lazy_starts(b: &Boot) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut checked: BTreeMap<String, Value> = BTreeMap::new();
    for r in &b.events {
        let Some(e) = &r.event else { continue };
        let at = r.json.get("uptime").cloned().unwrap_or(Value::Null);
        match e {
            Event::ImageCheck { name, .. } => {
                checked.insert(name.clone(), at);
            }
            Event::ImageLazy { name, seconds, from, .. } => out.push(json!({"name": name, "from": from, "seconds": seconds, "found_missing_at": checked.get(name), "exposed_at": at, "service_started_at": null, "service_before_filled": false, "filled": null})),
            Event::ServiceStarted { name, .. } => {
                for l in out.iter_mut().filter(|l| l["name"] == json!(name) && l["filled"].is_null()) {
                    l["service_before_filled"] = json!(true);
                    l["service_started_at"] = at.clone();
                }
            }
            Event::ImageFilled { name, seconds, bytes_fetched } => {
                for l in out.iter_mut().filter(|l| l["name"] == json!(name)) {
                    l["filled"] = json!({"seconds": seconds, "bytes_fetched": bytes_fetched});
                }
            }
            _ => {}
        }
    }
    out
}

/// Unmet expectations, one per line.
pub fn compare(expect: &Expect, observed: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    let mut want = |key: &str, v: Value| {
        if observed[key] != v {
            bad.push(format!("expected {key} = {v}, observed {}", observed[key]));
        }
    };
    if let Some(s) = &expect.slot {
        want("slot", json!(s));
    }
    if let Some(v) = &expect.variant {
        want("variant", json!(v));
    }
    if let Some(s) = &expect.state {
        want("state", json!(s));
    }
    if let Some(r) = expect.rolled_back {
        want("rolled_back", json!(r));
    }
    if let Some(r) = expect.refused {
        want("refused", json!(r));
    }
    if let Some(l) = expect.lazy {
        want("lazy", json!(l));
    }
    // A refusal the step did not expect is named, so its reason is in the report, not only its
    // effect (the device staying on its build).
    if !bad.is_empty() && expect.refused != Some(true) {
        if let Some(why) = observed["refusal"].as_str() {
            bad.push(format!("refused: {why}"));
        }
    }
    if observed["slot"].is_null() {
        bad.push("the guest never reported its status (no `status` event)".into());
    }
    bad
}

fn tail(b: Option<&Boot>) -> String {
    let Some(b) = b else { return String::new() };
    let log = b.log();
    let lines: Vec<&str> = log.lines().rev().take(15).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn run_path(sh: &Shared, index: usize, opts: &Options, out: &Mutex<Vec<StepResult>>) {
    let p = &sh.m.matrix.paths[index];
    let name = p.name.value.clone();
    let mut labels = vec!["install".to_string()];
    labels.extend(p.steps.iter().map(|s| step_label(&s.value)));
    // `--only PATH-GLOB` selects every step of a path, `--only PATH/STEP-GLOB` single steps: the
    // path runs up to its last selected step (the steps before it are how the device gets there)
    // and only the selected steps are reported.
    let selected = select(&name, &labels, &opts.only);
    let Some(last) = selected.iter().rposition(|s| *s) else { return };
    let report = |i: usize, r: StepResult| {
        if selected[i] {
            (opts.on_step)(&r);
            out.lock().unwrap().push(r);
        }
    };
    let dir = sh.work.join("paths").join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    let port = sh.m.matrix.registry.as_ref().and_then(|r| super::matrix::registry_port(&r.value).ok());
    let mut dev = Device { sh, dir: dir.clone(), disk: dir.join("disk.img"), builds: BTreeMap::new(), network: port, steps: 0, extra: Default::default(), running: None };
    let mut failed: Option<String> = None;
    for (i, label) in labels.iter().enumerate().take(last + 1) {
        let step = if i == 0 { None } else { Some(&p.steps[i - 1].value) };
        let expect = match step {
            None => p.install.expect.clone().unwrap_or(Expect { slot: Some("a".into()), variant: Some(p.install.variant.value.clone()), state: Some("ok".into()), ..Default::default() }),
            Some(s) => s.expect.clone().unwrap_or_default(),
        };
        let base = StepResult { path: name.clone(), order: index, index: i, label: label.clone(), result: StepOutcome::Skipped, seconds: 0.0, boots: 0, expect: expect.clone(), observed: Value::Null, message: String::new(), serial: None };
        if let Some(f) = &failed {
            report(i, StepResult { message: format!("an earlier step of this path failed: {f}"), ..base });
            continue;
        }
        let t = Instant::now();
        let mut boots: Vec<Boot> = Vec::new();
        let mut crash: Option<crash_step::CrashStep> = None;
        let r = dev.run_step(p, step, opts, &mut boots, &mut crash);
        let (result, observed, message, serial) = dev.judge(r, &expect, &boots, crash.as_ref());
        if let Some(v) = observed["variant"].as_str() {
            dev.running = Some(v.to_string());
        }
        if result == StepOutcome::Fail {
            failed = Some(if selected[i] { label.clone() } else { format!("{label} (run to reach the selected steps): {}", message.lines().next().unwrap_or("")) });
        }
        report(i, StepResult { result, seconds: t.elapsed().as_secs_f64(), boots: boots.len(), observed, message, serial, ..base });
    }
}

impl Device<'_> {
    /// Run one step of `p` (`None`: the install) on this device. `Ok(Some(reason))`: the update
    /// was refused (by the builder, for a stated reason).
    fn run_step(&mut self, p: &super::matrix::PathSpec, step: Option<&Step>, opts: &Options, boots: &mut Vec<Boot>, crash: &mut Option<crash_step::CrashStep>) -> anyhow::Result<Option<String>> {
        self.extra.clear();
        let layout = p.install.layout.value.clone();
        let port = self.sh.m.matrix.registry.as_ref().and_then(|r| super::matrix::registry_port(&r.value).ok());
        let Some(step) = step else {
            let v = &p.install.variant.value;
            if p.install.via.as_ref().is_some_and(|v| v.value == "installer") {
                let (usb, info) = self.sh.installer(v, &layout)?;
                let (id, size) = info.split_once(' ').unwrap_or((&info, "0"));
                self.builds.insert(v.clone(), id.to_string());
                let size = p.install.target_size.unwrap_or(size.parse().unwrap_or(0));
                std::fs::File::create(&self.disk)?.set_len(size)?;
                let b = self.boot_disk(&usb, "usb", std::slice::from_ref(&self.disk), None)?;
                let installed = b.has(Kind::Installed);
                boots.push(b);
                if !installed {
                    return Ok(Some("the installer did not install (no `installed` event)".into()));
                }
            } else {
                let (disk, id) = self.sh.disk(v, &layout)?;
                self.builds.insert(v.clone(), id);
                let st = Command::new("cp").arg("--sparse=always").arg(&disk).arg(&self.disk).status()?;
                if !st.success() {
                    bail!("copying {}", disk.display());
                }
            }
            boots.push(self.boot(&[], None)?);
            return Ok(None);
        };
        let fault = step.fault.as_ref().map(|f| Fault::parse(&f.value)).transpose().map_err(anyhow::Error::msg)?;
        if fault == Some(Fault::CorruptImage) {
            super::faults::corrupt_largest_blob(&self.disk, &self.dir)?;
        }
        self.network = if fault == Some(Fault::NetworkDown) { None } else { port };
        let Some(v) = &step.upgrade else {
            boots.push(self.boot(&[], None)?);
            return Ok(None);
        };
        let compat: Vec<String> = step.compat.iter().map(|c| c.value.clone()).collect();
        let thin = step.supply.as_ref().is_some_and(|s| s.value == "registry");
        let by_tag = step.supply.as_ref().is_some_and(|s| s.value == "registry-bundle");
        self.steps += 1;
        let delta_tag = format!("{}-{}", self.dir.file_name().unwrap_or_default().to_string_lossy(), self.steps);
        let delta = step.supply.as_ref().is_some_and(|s| s.value == "delta").then_some((self.disk.as_path(), delta_tag.as_str()));
        let bundle = match self.sh.bundle(&v.value, &layout, &compat, fault == Some(Fault::WrongKey), thin, delta) {
            Ok((b, id)) => {
                // The variant's build id: what the device reports once it runs it.
                self.builds.insert(v.value.clone(), id);
                let own = self.dir.join("bundle.disk");
                if by_tag {
                    // Pushed to the path's registry, after the release the device runs (as a
                    // fleet's registry holds it); the second disk names the step's tag.
                    let base = match self.running.clone().filter(|r| r != &v.value) {
                        Some(r) => Some(self.sh.bundle(&r, &layout, &compat, false, false, None).map_err(|e| anyhow::anyhow!("building the running variant's release {r}: {e:?}"))?.0),
                        None => None,
                    };
                    self.publish(&b, &own, base.as_deref())?
                } else {
                    // Each VM gets its own copy: QEMU locks a disk image for writing, and paths
                    // running in parallel may attach the same bundle.
                    std::fs::copy(&b, &own).with_context(|| format!("copying {}", b.display()))?;
                    own
                }
            }
            Err(BuildError::Refused(e)) => {
                // Refused by the builder for a stated reason (over a slot's cap): the
                // device keeps running.
                boots.push(self.boot(&[], None)?);
                return Ok(Some(e));
            }
            // Any other build error is an error of the run, not a refusal.
            Err(e) => return Err(anyhow::Error::new(e).context(format!("building the bundle of {}", v.value))),
        };
        if thin && step.expect.as_ref().and_then(|e| e.lazy) == Some(true) {
            // Lazy start needs the sealed images next to their images in the registry.
            let (full, _) = self.sh.bundle(&v.value, &layout, &compat, false, false, None).map_err(anyhow::Error::new)?;
            self.publish_sealed(&full)?;
        }
        match &fault {
            Some(Fault::CrashStates(budget)) => {
                *crash = Some(self.crash_states(&bundle, *budget, opts, boots)?);
            }
            Some(Fault::PowerCut(at)) => {
                let b = self.boot(&[bundle], Some(*at))?;
                let cut = power_cut_at(&b, *at);
                boots.push(b);
                cut.map_err(anyhow::Error::msg)?;
                self.boot_until_status(boots)?;
            }
            Some(Fault::NetworkCut) => self.network_cut(&bundle, boots)?,
            Some(Fault::BadRootfs) => {
                let b = self.boot(&[bundle], None)?;
                let applied = b.applied().map(|a| a.slot.clone());
                boots.push(b);
                let Some(slot) = applied else { return Ok(None) };
                let (start, _) = super::faults::partition(&self.disk, &format!("rootfs_{slot}"))?;
                super::faults::flip_byte(&self.disk, start + 2000)?;
                self.boot_until_status(boots)?;
            }
            _ => {
                let b = self.boot(&[bundle], None)?;
                let applied = b.applied().is_some();
                boots.push(b);
                if applied {
                    self.boot_until_status(boots)?;
                }
            }
        }
        Ok(None)
    }

    /// A step's verdict from what its boots showed: (result, observed, message, serial log).
    fn judge(&self, r: anyhow::Result<Option<String>>, expect: &Expect, boots: &[Boot], crash: Option<&crash_step::CrashStep>) -> (StepOutcome, Value, String, Option<PathBuf>) {
        let serial = boots.last().map(|b| b.serial_path.clone());
        let (result, observed, message) = match r {
            Err(e) => (StepOutcome::Fail, Value::Null, format!("{e:#}")),
            Ok(refused) => {
                let mut obs = self.observe(boots, refused);
                for (k, v) in &self.extra {
                    obs[k] = v.clone();
                }
                let mut bad = compare(expect, &obs);
                if let Some(c) = crash {
                    bad.extend(c.problems.iter().cloned());
                    obs["crash_states"] = serde_json::to_value(c).unwrap_or_default();
                }
                if bad.is_empty() {
                    (StepOutcome::Pass, obs, String::new())
                } else {
                    let said: Vec<String> = boots.last().map(|b| b.events.iter().filter(|e| [Kind::ApplyFailed, Kind::Degraded, Kind::RolledBack, Kind::InitramfsFailed, Kind::ImageCheck, Kind::Status].iter().any(|k| e.is(*k))).map(|e| e.to_string()).collect()).unwrap_or_default();
                    let msg = format!("{}\nguest said:\n  {}\nlast serial lines ({}):\n{}", bad.join("\n"), said.join("\n  "), serial.as_ref().map(|s| s.display().to_string()).unwrap_or_default(), tail(boots.last()));
                    (StepOutcome::Fail, obs, msg)
                }
            }
        };
        (result, observed, message, serial)
    }
}

/// Which of a path's steps (`labels`, the install first) `--only` selects: a glob on the path
/// name selects all of them, `PATH/STEP` globs single steps; no `--only`, everything.
pub fn select(path: &str, labels: &[String], only: &[String]) -> Vec<bool> {
    labels.iter().map(|l| only.is_empty() || only.iter().any(|o| glob(o, path) || glob(o, &format!("{path}/{l}")))).collect()
}

/// A `power-cut:STEP` boot must show the cut really happened at STEP: the apply paused there
/// (`paused` with that step) and QEMU was killed — not an apply that failed or finished before
/// it, nor a guest that exited by itself.
pub fn power_cut_at(b: &Boot, at: ApplyStep) -> Result<(), String> {
    let paused = b.events.iter().any(|e| e.event == Some(Event::Paused { step: at }));
    if paused && b.outcome == Outcome::Killed {
        return Ok(());
    }
    let reached: Vec<String> = b.events.iter().filter_map(|e| match &e.event {
        Some(Event::ApplyStep { step }) => Some(step.to_string()),
        _ => None,
    }).collect();
    Err(format!(
        "power-cut:{at}: no power was cut at {at}: the apply {} (steps reached: {}), and the VM {}",
        if paused { "paused there" } else { "never paused there" },
        if reached.is_empty() { "none".into() } else { reached.join(", ") },
        match b.outcome { Outcome::Killed => "was killed", Outcome::Exited => "exited by itself", Outcome::TimedOut => "timed out" }
    ))
}

/// Run every selected path; results in matrix order.
pub fn run(m: &Loaded, opts: &Options) -> anyhow::Result<Report> {
    let t = Instant::now();
    let tmp;
    let work = match &opts.keep {
        Some(k) => {
            std::fs::create_dir_all(k)?;
            std::fs::canonicalize(k)?
        }
        None => {
            tmp = tempfile::Builder::new().prefix("slotforge-test-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let sh = Shared {
        m,
        work: work.clone(),
        bin: std::env::current_exe()?,
        cache: opts.cache.clone().unwrap_or_else(crate::base::cache::Cache::default_dir),
        built: Mutex::new(BTreeMap::new()),
        locks: Mutex::new(BTreeMap::new()),
    };
    let _ = vm::accel();
    let out = Mutex::new(Vec::new());
    let next = Mutex::new(0usize);
    let n = m.matrix.paths.len();
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1).min(n.max(1)) {
            s.spawn(|| loop {
                let i = {
                    let mut g = next.lock().unwrap();
                    let i = *g;
                    *g += 1;
                    i
                };
                if i >= n {
                    break;
                }
                if super::shard::runs_here(&m.matrix.paths, i, opts.shard) {
                    run_path(&sh, i, opts, &out);
                }
            });
        }
    });
    let mut steps = out.into_inner().unwrap();
    let order: BTreeMap<String, usize> = m.matrix.paths.iter().enumerate().map(|(i, p)| (p.name.value.clone(), i)).collect();
    steps.sort_by_key(|r| (order[&r.path], r.index));
    let count = |k: StepOutcome| steps.iter().filter(|r| r.result == k).count();
    Ok(Report { matrix: m.path.clone(), accel: vm::accel().to_string(), jobs: opts.jobs, seconds: t.elapsed().as_secs_f64(), passed: count(StepOutcome::Pass), failed: count(StepOutcome::Fail), skipped: count(StepOutcome::Skipped), shard: opts.shard.map(|s| s.to_string()), steps })
}

/// The table printed at the end: path × step, result, seconds.
pub fn table(r: &Report) -> String {
    let w = r.steps.iter().map(|s| s.path.len()).max().unwrap_or(4).max(4);
    let l = r.steps.iter().map(|s| s.label.len()).max().unwrap_or(4).max(4);
    let mut out = format!("{:<w$}  {:<l$}  {:<7}  {:>8}  {}\n", "path", "step", "result", "seconds", "boots");
    for s in &r.steps {
        out += &format!("{:<w$}  {:<l$}  {:<7}  {:>8.1}  {}\n", s.path, s.label, s.result.name(), s.seconds, s.boots);
    }
    for s in r.steps.iter().filter(|s| !s.observed["crash_states"].is_null()) {
        out += &crash_step::table_lines(&s.path, &s.label, &s.observed["crash_states"]);
    }
    out += &format!("{} passed, {} failed, {} skipped in {:.0} s ({}, {} job{})\n", r.passed, r.failed, r.skipped, r.seconds, r.accel, r.jobs, if r.jobs == 1 { "" } else { "s" });
    for s in r.steps.iter().filter(|s| s.result == StepOutcome::Fail) {
        out += &format!("\nFAILED {}/{}:\n{}\n", s.path, s.label, s.message);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("field-*", "field-v1"));
        assert!(glob("field-v1/*", "field-v1/upgrade v2"));
        assert!(glob("*power-cut*", "p/upgrade v2 (power-cut:slot-written)"));
        assert!(!glob("field-*", "lab-v1"));
        assert!(glob("exact", "exact") && !glob("exact", "exactly"));
    }

    #[test]
    fn expectations_name_what_differs() {
        let e = Expect { slot: Some("b".into()), variant: Some("v2".into()), rolled_back: Some(false), ..Default::default() };
        let obs = json!({"slot": "a", "variant": "v1", "rolled_back": false});
        let bad = compare(&e, &obs);
        assert_eq!(bad, vec!["expected slot = \"b\", observed \"a\"".to_string(), "expected variant = \"v2\", observed \"v1\"".to_string()]);
        assert!(compare(&Expect::default(), &json!({"slot": null}))[0].contains("never reported"));
        // An unexpected refusal is named with its reason; an expected one is not a problem.
        let obs = json!({"slot": "a", "variant": "v1", "rolled_back": false, "refused": true, "refusal": "rootfs 1 byte over the cap"});
        assert_eq!(compare(&e, &obs).last().unwrap(), "refused: rootfs 1 byte over the cap");
        assert!(compare(&Expect { refused: Some(true), ..Default::default() }, &obs).is_empty());
    }

    #[test]
    fn junit_escapes_and_counts() {
        let s = |result: StepOutcome, msg: &str| StepResult { path: "p<1>".into(), order: 0, index: 0, label: "install".into(), result, seconds: 1.0, boots: 1, expect: Expect::default(), observed: Value::Null, message: msg.into(), serial: None };
        let r = Report { matrix: "m".into(), accel: "tcg".into(), jobs: 1, seconds: 2.0, passed: 1, failed: 1, skipped: 0, shard: None, steps: vec![s(StepOutcome::Pass, ""), s(StepOutcome::Fail, "expected slot = \"b\"\nmore")] };
        let x = junit(&r);
        assert!(x.contains("name=\"p&lt;1&gt;\" tests=\"2\" failures=\"1\""), "{x}");
        assert!(x.contains("<failure message=\"expected slot = &quot;b&quot;\">"), "{x}");
    }

    #[test]
    fn only_selects_whole_paths_or_single_steps() {
        let labels: Vec<String> = ["install", "upgrade v2", "upgrade v3 (power-cut:slot-written)", "boot"].iter().map(|s| s.to_string()).collect();
        assert_eq!(select("field", &labels, &[]), [true; 4]);
        assert_eq!(select("field", &labels, &["fie*".into()]), [true; 4], "a path glob selects every step");
        assert_eq!(select("field", &labels, &["lab*".into()]), [false; 4]);
        let s = select("field", &labels, &["field/upgrade v3*".into()]);
        assert_eq!(s, [false, false, true, false], "only the power-cut step is reported");
        assert_eq!(s.iter().rposition(|x| *x), Some(2), "the path runs up to it (install and upgrade v2 first), not past it");
    }

    fn boot_with(serial: &str, outcome: Outcome) -> Boot {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        std::fs::write(&p, serial).unwrap();
        Boot { outcome, events: crate::format::agent::events::parse(serial), serial_path: p, seconds: 1.0, accel: "tcg" }
    }

    #[test]
    fn a_power_cut_step_needs_the_apply_paused_at_its_step_and_qemu_killed() {
        let at = ApplyStep::SlotWritten;
        let paused = "@slotforge {\"event\":\"apply-step\",\"step\":\"entry-removed\"}\n@slotforge {\"event\":\"apply-step\",\"step\":\"slot-written\"}\n@slotforge {\"event\":\"paused\",\"step\":\"slot-written\"}\n";
        assert_eq!(power_cut_at(&boot_with(paused, Outcome::Killed), at), Ok(()));
        let e = power_cut_at(&boot_with(paused, Outcome::TimedOut), at).unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        // The apply failed before the step (a refused bundle): no cut happened, the step fails.
        let failed = "@slotforge {\"event\":\"apply-start\",\"build_id\":\"x\",\"version\":\"2\"}\n@slotforge {\"event\":\"apply-failed\",\"error\":\"refused\"}\n";
        let e = power_cut_at(&boot_with(failed, Outcome::Exited), at).unwrap_err();
        assert!(e.contains("never paused there") && e.contains("steps reached: none") && e.contains("exited by itself"), "{e}");
        // Paused at another step: not this cut.
        let other = paused.replace("\"paused\",\"step\":\"slot-written\"", "\"paused\",\"step\":\"entry-removed\"");
        assert!(power_cut_at(&boot_with(&other, Outcome::Killed), at).is_err());
    }

    #[test]
    fn only_a_builder_refusal_counts_as_refused_any_other_build_error_fails_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let m = crate::harness::matrix::parse(&dir.path().join("m.yaml"), "variants:\n  v1: {manifest: a.yml}\nlayouts:\n  l: l.yaml\npaths:\n  - name: p\n    install: {variant: v1, layout: l}\n").unwrap();
        let fake = |code: i32| {
            let bin = dir.path().join(format!("sf{code}"));
            std::fs::write(&bin, format!("#!/bin/sh\necho 'why {code}' >&2\nexit {code}\n")).unwrap();
            std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            Shared { m: &m, work: dir.path().into(), bin, cache: dir.path().into(), built: Default::default(), locks: Default::default() }
        };
        let refused = fake(i32::from(crate::base::exit::REFUSED)).slotforge(&["bundle"]).unwrap_err();
        assert!(matches!(&refused, BuildError::Refused(m) if m.contains("why 3")), "{refused:?}");
        let broken = fake(1).slotforge(&["bundle"]).unwrap_err();
        assert!(matches!(&broken, BuildError::Failed(m) if m.contains("why 1")), "{broken:?}");
    }
}
