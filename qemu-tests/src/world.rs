//! The upgrade scenarios' world: the fixtures, a local registry holding the external images of
//! the variants in `qemu-tests/variants/`, and helpers that build disks and bundles of a variant
//! with the slotforge binary under test and boot them (with a bundle disk attached, a power cut
//! at an apply step, with or without network).

use crate::fixtures::{self, Fixtures};
use crate::registry::TestRegistry;
use crate::vm::{self, Boot, VmOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct World {
    pub dir: tempfile::TempDir,
    pub reg: TestRegistry,
    pub bin: PathBuf,
    fx: &'static Fixtures,
    images: PathBuf,
}

/// Service images of the variants: (name, tag, payload bytes, seed, external?).
pub const IMAGES: &[(&str, &str, usize, u64, bool)] = &[
    ("svc-a", "1", 1_000_000, 1, true),
    ("svc-a", "2", 1_000_000, 11, true),
    ("big", "1", 50_000_000, 2, true),
    ("svc-c", "1", 5_000_000, 3, true),
    ("svc-c", "2", 5_000_000, 4, true),
    ("fat", "1", 42_000_000, 5, false),
    ("huge", "1", 70_000_000, 6, false),
];

/// The 500 MB external image of the `bulk` variant: made only by a world that asks for it
/// ([`World::with_bulk`]).
pub const BULK: (&str, &str, usize, u64) = ("bulk", "1", 500_000_000, 7);

pub fn variants_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("variants")
}

impl World {
    pub fn new(bin: &Path, fx: &'static Fixtures) -> Self {
        let mut dir = tempfile::Builder::new().prefix("slotforge-world-").tempdir().unwrap();
        if std::env::var_os("SLOTFORGE_KEEP_WORLD").is_some() {
            dir.disable_cleanup(true);
        }
        let reg = TestRegistry::start(None);
        let images = dir.path().join("images");
        for (name, tag, size, seed, external) in IMAGES {
            let layout = images.join(name);
            fixtures::service_image(&layout, tag, *size, *seed).unwrap();
            if *external {
                reg.push(&layout, tag, &format!("{name}:{tag}"));
            }
        }
        // Update keys: `release` is the one the signed variants trust, `rogue` is any other.
        let keys = dir.path().join("keys");
        for k in ["release", "rogue"] {
            let o = Command::new(bin).args(["key", "generate", k, "-o", keys.to_str().unwrap()]).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        // Secure Boot: Debian's snakeoil db key, unlocked for sbsign.
        let o = Command::new("openssl").args(["rsa", "-passin", "pass:snakeoil", "-in", "/usr/share/ovmf/PkKek-1-snakeoil.key", "-out"]).arg(keys.join("db.key")).output().unwrap();
        assert!(o.status.success(), "openssl: {}", String::from_utf8_lossy(&o.stderr));
        World { dir, reg, bin: bin.into(), fx, images }
    }

    /// Make and push the `bulk` variant's 500 MB external image.
    pub fn with_bulk(self) -> Self {
        let (name, tag, size, seed) = BULK;
        let layout = self.images.join(name);
        fixtures::service_image(&layout, tag, size, seed).unwrap();
        self.reg.push(&layout, tag, &format!("{name}:{tag}"));
        self
    }

    /// A secret key made for this world (`release` or `rogue`).
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join("keys").join(format!("{name}.key"))
    }

    /// `qemu-tests/variants/<variant>.yml` with this world's paths and registry filled in.
    pub fn manifest(&self, variant: &str) -> PathBuf {
        let t = std::fs::read_to_string(variants_dir().join(format!("{variant}.yml"))).unwrap();
        let m = t
            .replace("{kernel}", &self.fx.kernel.display().to_string())
            .replace("{base}", &self.fx.base.display().to_string())
            .replace("{loader}", &self.fx.loader.display().to_string())
            .replace("{images}", &self.images.display().to_string())
            .replace("{host}", &self.reg.host())
            .replace("{mirror}", vm::GUEST_REGISTRY)
            .replace("{keys}", &self.dir.path().join("keys").display().to_string());
        let p = self.dir.path().join(format!("{variant}.yml"));
        std::fs::write(&p, m).unwrap();
        p
    }

    pub fn layout(gen: u32) -> PathBuf {
        variants_dir().join(format!("field-v{gen}.yaml"))
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let cache = self.dir.path().join("cache");
        let o = Command::new(&self.bin).args(args).args(["--cache", cache.to_str().unwrap()]).output().unwrap();
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    /// Build `variant` for layout generation `gen` into `<name>.img`.
    pub fn build(&self, variant: &str, gen: u32, name: &str) -> PathBuf {
        let out = self.dir.path().join(format!("{name}.img"));
        let m = self.manifest(variant);
        self.run(&["build", m.to_str().unwrap(), "--layout", Self::layout(gen).to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]).unwrap();
        out
    }

    /// Bundle `variant` for generation `gen` (plus `--compat` generations and extra flags).
    pub fn bundle(&self, variant: &str, gen: u32, compat: &[u32], extra: &[&str]) -> Result<PathBuf, String> {
        let tag: String = extra.iter().map(|e| e.rsplit('/').next().unwrap_or(e)).collect();
        let out = self.dir.path().join(format!("{variant}-g{gen}{tag}.oci.tar"));
        let m = self.manifest(variant);
        let l = Self::layout(gen);
        let mut args = vec!["bundle".to_string(), m.display().to_string(), "--layout".into(), l.display().to_string(), "-o".into(), out.display().to_string(), "-q".into()];
        for c in compat {
            args.push("--compat".into());
            args.push(Self::layout(*c).display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        self.run(&a).map(|_| out)
    }

    /// Boot `disk`; with `bundle` attached as /dev/vdb the guest applies it and reboots; with
    /// `pause` (an apply step) the apply stops there and QEMU is killed — a power cut.
    pub fn boot(&self, disk: &Path, bundle: Option<&Path>, pause: Option<&str>, network: bool) -> Boot {
        self.boot_with(disk, bundle, pause, network, |_| {})
    }

    /// [`World::boot`] with the VM options adjusted by `tune` (Secure Boot, stop strings).
    pub fn boot_with(&self, disk: &Path, bundle: Option<&Path>, pause: Option<&str>, network: bool, tune: impl FnOnce(&mut VmOptions)) -> Boot {
        let mut o = VmOptions::new(disk, &self.dir.path().join("vm"), "dev");
        tune(&mut o);
        o.memory_mb = 768;
        if let Some(b) = bundle {
            o.extra_disks.push(b.to_path_buf());
        }
        if let Some(p) = pause {
            let f = self.dir.path().join("pause");
            let mut data = p.as_bytes().to_vec();
            data.resize(4096, 0);
            std::fs::write(&f, data).unwrap();
            o.extra_disks.push(f);
        }
        if network {
            o.registry_port = Some(self.reg.port);
        }
        let step = pause.map(str::to_string);
        vm::boot(&o, &move |ev| step.as_ref().is_some_and(|s| ev.iter().any(|e| e["event"] == "paused" && e["step"] == s.as_str()))).unwrap()
    }

    /// Bytes of an image's blobs (manifest, config, layers) in its OCI layout.
    pub fn image_bytes(&self, name: &str, tag: &str) -> u64 {
        let dir = self.images.join(name);
        let blob = |d: &str| dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
        let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        let m = idx["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag).unwrap();
        let man: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(m["digest"].as_str().unwrap())).unwrap()).unwrap();
        m["size"].as_u64().unwrap() + man["config"]["size"].as_u64().unwrap() + man["layers"].as_array().unwrap().iter().map(|l| l["size"].as_u64().unwrap()).sum::<u64>()
    }

    /// What `slotforge inspect --json` reads from `disk`.
    pub fn inspect(&self, disk: &Path) -> serde_json::Value {
        let o = Command::new(&self.bin).args(["inspect", disk.to_str().unwrap(), "--json"]).output().unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    }

    pub fn entries(&self, disk: &Path) -> Vec<String> {
        self.inspect(disk)["esp"]["entries"].as_array().unwrap().iter().map(|e| e["file"].as_str().unwrap().to_string()).collect()
    }
}
