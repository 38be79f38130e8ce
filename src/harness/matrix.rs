//! The upgrade matrix file (`slotforge test upgrades.yaml`): the user's variants (manifests),
//! layout generations, and paths — an install followed by steps (boots and upgrades, each with
//! an optional fault) and what must be true after each. Pure: parsed and checked here, driven by
//! `run.rs`. Reference: docs/testing.md.

use crate::base::yaml::{self, InputError};
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use crate::format::agent::ApplyStep;
use strum::VariantArray;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matrix {
    pub variants: BTreeMap<String, Variant>,
    pub layouts: BTreeMap<String, Spanned<String>>,
    pub paths: Vec<PathSpec>,
    /// Seconds a single boot may take before it counts as hung (default 300).
    pub boot_timeout: Option<u64>,
    /// Guest memory in MiB (default 768).
    pub memory: Option<u32>,
    /// The registry (`HOST:PORT` on this machine) the guest reaches as 10.0.2.100:5000, for
    /// `supply: registry` steps and pull-on-miss. The appliance points its agent there
    /// (`agent.json` `mirror`, or registries.conf).
    pub registry: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// The manifest, relative to the matrix file.
    pub manifest: Spanned<String>,
    /// A minisign secret key bundles of this variant are signed with.
    pub key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSpec {
    pub name: Spanned<String>,
    pub install: Install,
    #[serde(default)]
    pub steps: Vec<Spanned<Step>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Install {
    pub variant: Spanned<String>,
    pub layout: Spanned<String>,
    /// `disk` (default: the built disk image is the device's disk) or `installer` (the USB
    /// installer is booted with an empty target disk, which it writes; then the target boots).
    pub via: Option<Spanned<String>>,
    /// Bytes of the installer's target disk (default: the layout's disk size).
    pub target_size: Option<u64>,
    /// What the first boot must show (default: the variant running on slot a, images verified).
    pub expect: Option<Expect>,
}

/// One step: `boot` (no update), or `upgrade: VARIANT` (a bundle for the device's layout
/// generation, supplied on a second disk, applied by the agent, then the next boot checked).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub upgrade: Option<Spanned<String>>,
    #[serde(default)]
    pub boot: bool,
    /// `--compat` layout generations the bundle must also fit.
    #[serde(default)]
    pub compat: Vec<Spanned<String>>,
    /// How the update arrives: `disk` (default: the whole bundle on a second disk), `delta` (a
    /// delta bundle `--delta-from` the device's disk as the path left it, on a second disk) or
    /// `registry` (a thin bundle on a second disk; the new slot pulls its external images from
    /// the matrix's `registry`).
    pub supply: Option<Spanned<String>>,
    pub fault: Option<Spanned<String>>,
    pub expect: Option<Expect>,
}

/// What must hold after a step, read from the guest's events of the step's last boot.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The slot that booted (`a`/`b`).
    pub slot: Option<String>,
    /// The variant whose build is running (its build id).
    pub variant: Option<String>,
    /// `ok` (every external image verified) or `degraded`.
    pub state: Option<String>,
    /// A `rolled-back` event was seen.
    pub rolled_back: Option<bool>,
    /// The update was refused (by `slotforge bundle`, or by the device: `apply-failed`), and
    /// the device kept running what it ran.
    pub refused: Option<bool>,
    /// A sealed image missing at boot was started lazily from its registry, and its service ran
    /// before the image was complete on the device (`image-lazy`, then `service-started` before
    /// `image-filled`). With `supply: registry`, the harness first publishes the variant's
    /// sealed images next to their images (`slotforge push --next-to-images`).
    pub lazy: Option<bool>,
}

/// Faults a step can inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Cut the power when the apply reaches this step (`slotforge agent apply --pause-at`).
    PowerCut(ApplyStep),
    /// The new slot's rootfs is corrupted after the apply: it must fail to boot and roll back.
    BadRootfs,
    /// The bundle is signed with a key the device does not trust.
    WrongKey,
    /// One blob of an external image in the images partition is corrupted before the boot.
    CorruptImage,
    /// The guest's network is cut for the step's boots (pull-on-miss cannot reach the registry).
    NetworkDown,
    /// `supply: registry-bundle` only: the guest's connection to the registry drops half-way
    /// through the release's download and stays down for that boot; the next boot, with the
    /// network back, must go on from the chunks the first one kept.
    NetworkCut,
    /// Record the apply and the first boot of the new slot (boot counting, mark-good, GC) with
    /// every write logged; check every crash state a power cut could leave offline, and boot
    /// this many of them (default 2) in QEMU — an apply's states then re-run the apply.
    CrashStates(Option<usize>),
}

impl Fault {
    pub fn parse(s: &str) -> Result<Fault, String> {
        Ok(match s {
            "bad-rootfs" => Fault::BadRootfs,
            "wrong-key" => Fault::WrongKey,
            "corrupt-image" => Fault::CorruptImage,
            "network-down" => Fault::NetworkDown,
            "network-cut" => Fault::NetworkCut,
            "crash-states" => Fault::CrashStates(None),
            _ if s.starts_with("crash-states:") => match s["crash-states:".len()..].parse() {
                Ok(n) => Fault::CrashStates(Some(n)),
                Err(_) => return Err(format!("{s:?}: crash-states:N, N the number of states to boot")),
            },
            _ => match s.strip_prefix("power-cut:") {
                Some(step) => match step.parse::<ApplyStep>() {
                    Ok(st) => Fault::PowerCut(st),
                    Err(_) => return Err(format!("power-cut at unknown apply step {step:?} (one of {})", ApplyStep::VARIANTS.iter().map(|v| v.name()).collect::<Vec<_>>().join(", "))),
                },
                None => return Err(format!("unknown fault {s:?} (power-cut:STEP, bad-rootfs, wrong-key, corrupt-image, network-down, network-cut, crash-states[:N])")),
            },
        })
    }
    pub fn name(&self) -> String {
        match self {
            Fault::PowerCut(s) => format!("power-cut:{s}"),
            Fault::BadRootfs => "bad-rootfs".into(),
            Fault::WrongKey => "wrong-key".into(),
            Fault::CorruptImage => "corrupt-image".into(),
            Fault::NetworkDown => "network-down".into(),
            Fault::NetworkCut => "network-cut".into(),
            Fault::CrashStates(None) => "crash-states".into(),
            Fault::CrashStates(Some(n)) => format!("crash-states:{n}"),
        }
    }
}

/// A loaded, checked matrix and the directory its relative paths start from.
#[derive(Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub matrix: Matrix,
}

impl Loaded {
    pub fn dir(&self) -> &Path {
        self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    }
    pub fn file(&self, rel: &str) -> PathBuf {
        self.dir().join(rel)
    }
}

pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading matrix {}: {e}", path.display()))?;
    Ok(parse(path, &text)?)
}

pub fn parse(path: &Path, text: &str) -> Result<Loaded, InputError> {
    let matrix: Matrix = yaml::parse(path, text)?;
    check(path, &matrix)?;
    Ok(Loaded { path: path.to_path_buf(), matrix })
}

fn check(file: &Path, m: &Matrix) -> Result<(), InputError> {
    let err = |s: &Spanned<String>, msg: String| InputError::spanned(file, s, msg);
    let variant = |s: &Spanned<String>| if m.variants.contains_key(&s.value) { Ok(()) } else { Err(err(s, format!("unknown variant {:?} (variants: {})", s.value, m.variants.keys().cloned().collect::<Vec<_>>().join(", ")))) };
    let layout = |s: &Spanned<String>| if m.layouts.contains_key(&s.value) { Ok(()) } else { Err(err(s, format!("unknown layout {:?} (layouts: {})", s.value, m.layouts.keys().cloned().collect::<Vec<_>>().join(", ")))) };
    if let Some(r) = &m.registry {
        registry_port(&r.value).map_err(|e| err(r, e))?;
    }
    let mut names = std::collections::BTreeSet::new();
    for p in &m.paths {
        if p.name.value.is_empty() || !p.name.value.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(err(&p.name, format!("path name {:?} may hold only letters, digits and . _ -", p.name.value)));
        }
        if !names.insert(p.name.value.clone()) {
            return Err(err(&p.name, format!("path name {:?} is used twice", p.name.value)));
        }
        variant(&p.install.variant)?;
        layout(&p.install.layout)?;
        if let Some(v) = &p.install.via {
            if v.value != "disk" && v.value != "installer" {
                return Err(err(v, format!("install via {:?}: `disk` or `installer`", v.value)));
            }
        }
        for s in &p.steps {
            let st = &s.value;
            match (&st.upgrade, st.boot) {
                (Some(u), false) => variant(u)?,
                (None, true) => {}
                _ => return Err(InputError::spanned(file, s, "a step is either `upgrade: VARIANT` or `boot: true`")),
            }
            for c in &st.compat {
                layout(c)?;
            }
            if let Some(sp) = &st.supply {
                match sp.value.as_str() {
                    "disk" | "delta" => {}
                    "registry" | "registry-bundle" if m.registry.is_some() => {}
                    "registry" | "registry-bundle" => return Err(err(sp, format!("supply: {} needs the matrix's `registry: HOST:PORT`", sp.value))),
                    other => return Err(err(sp, format!("supply {other:?}: `disk`, `delta`, `registry` or `registry-bundle`"))),
                }
            }
            if let Some(f) = &st.fault {
                let fault = Fault::parse(&f.value).map_err(|e| err(f, e))?;
                if st.boot && !matches!(fault, Fault::CorruptImage | Fault::NetworkDown) {
                    return Err(err(f, format!("fault {} needs an upgrade step", f.value)));
                }
                let by_tag = st.supply.as_ref().is_some_and(|s| s.value == "registry-bundle");
                if fault == Fault::NetworkCut && !by_tag {
                    return Err(err(f, "fault network-cut cuts the download of a release: it needs `supply: registry-bundle`".into()));
                }
                if by_tag && matches!(fault, Fault::CrashStates(_)) {
                    return Err(err(f, format!("fault {} is not available with `supply: registry-bundle` yet", f.value)));
                }
            }
        }
    }
    Ok(())
}

/// The port of `registry:` (`127.0.0.1:PORT` or `localhost:PORT`: the guest's only network is a
/// forward to this machine's loopback).
pub fn registry_port(r: &str) -> Result<u16, String> {
    let (host, port) = r.rsplit_once(':').ok_or_else(|| format!("registry {r:?}: HOST:PORT"))?;
    if host != "127.0.0.1" && host != "localhost" {
        return Err(format!("registry {r:?}: the guest reaches only this machine's loopback (127.0.0.1:PORT)"));
    }
    port.parse().map_err(|_| format!("registry {r:?}: bad port"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = r#"
variants:
  v1: {manifest: v1.yml}
  v2: {manifest: v2.yml, key: keys/release.key}
layouts:
  gen1: layouts/gen1.yaml
paths:
  - name: field-v1
    install: {variant: v1, layout: gen1}
    steps:
      - upgrade: v2
        expect: {slot: b, variant: v2}
      - upgrade: v1
        fault: power-cut:slot-written
        expect: {slot: b, variant: v2}
      - boot: true
        fault: corrupt-image
"#;

    #[test]
    fn a_matrix_parses_and_faults_are_checked() {
        let l = parse(Path::new("m.yaml"), M).unwrap();
        assert_eq!(l.matrix.paths[0].steps.len(), 3);
        assert_eq!(Fault::parse("power-cut:slot-written").unwrap(), Fault::PowerCut(ApplyStep::SlotWritten));
        assert_eq!(Fault::parse("crash-states:3").unwrap(), Fault::CrashStates(Some(3)));
        assert_eq!(Fault::parse("crash-states").unwrap().name(), "crash-states");
        assert!(Fault::parse("crash-states:many").unwrap_err().contains("crash-states:N"));
        let bad = |from: &str, to: &str| parse(Path::new("m.yaml"), &M.replace(from, to)).unwrap_err();
        let e = bad("upgrade: v2", "upgrade: v3");
        assert_eq!((e.line, e.column), (11, 18), "{e}");
        assert!(e.message.contains("unknown variant \"v3\""), "{e}");
        let e = bad("power-cut:slot-written", "power-cut:halfway");
        assert!(e.message.contains("unknown apply step"), "{e}");
        let e = bad("expect: {slot: b, variant: v2}\n      - upgrade: v1", "expct: {slot: b}\n      - upgrade: v1");
        assert!(e.message.contains("expct"), "{e}");
        let e = bad("layout: gen1}", "layout: gen9}");
        assert!(e.message.contains("unknown layout"), "{e}");
        let e = bad("fault: power-cut:slot-written", "fault: network-cut");
        assert!(e.message.contains("needs `supply: registry-bundle`"), "{e}");
        let e = bad("fault: power-cut:slot-written", "supply: registry-bundle");
        assert!(e.message.contains("needs the matrix's `registry"), "{e}");
        let with_registry = format!("registry: 127.0.0.1:5000\n{M}");
        let l = parse(Path::new("m.yaml"), &with_registry.replace("fault: power-cut:slot-written", "supply: registry-bundle\n        fault: network-cut")).unwrap();
        assert_eq!(Fault::parse(&l.matrix.paths[0].steps[1].value.fault.as_ref().unwrap().value).unwrap(), Fault::NetworkCut);
        let e = parse(Path::new("m.yaml"), &with_registry.replace("fault: power-cut:slot-written", "supply: registry-bundle\n        fault: crash-states")).unwrap_err();
        assert!(e.message.contains("not available with `supply: registry-bundle`"), "{e}");
    }
}
