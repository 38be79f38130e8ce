//! The system manifest: a superset of LinuxKit's yml. Keys slotforge does not use are accepted and
//! ignored, so a LinuxKit file parses unchanged; added are `version`, `boot` and `ondisk: false`
//! on an `onboot`/`services` entry (an *external* image: kept out of the rootfs, pre-filled into
//! the external-images partition, pinned by digest in the rootfs). Reference: docs/manifest.md.

use crate::base::yaml::{self, InputError};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Release version, recorded in the rootfs (`/etc/slotforge/release.json`) and boot entry title.
    pub version: Option<Spanned<String>>,
    pub kernel: Option<Kernel>,
    /// Images flattened in order at `/` of the rootfs.
    #[serde(default)]
    pub init: Vec<Spanned<String>>,
    #[serde(default)]
    pub onboot: Vec<Spanned<Service>>,
    #[serde(default)]
    pub onshutdown: Vec<Spanned<Service>>,
    #[serde(default)]
    pub services: Vec<Spanned<Service>>,
    #[serde(default)]
    pub files: Vec<FileEntry>,
    /// LinuxKit's named volumes, under `/containers/volumes/NAME/` (docs/manifest.md#volumes).
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// LinuxKit's old content-trust section: accepted and ignored, as current LinuxKit does.
    pub trust: Option<Trust>,
    /// Optional: by default the build host's systemd-boot (Debian's `systemd-boot-efi`).
    pub boot: Option<Boot>,
    /// dm-verity on the rootfs slots (default on): the hash tree follows the squashfs in the
    /// slot and the boot entry carries the root hash. `false` opts out.
    pub verity: Option<bool>,
    /// minisign public keys (files, relative to the manifest) installed in the rootfs at
    /// `/etc/slotforge/update-keys/`: the device then applies only bundles signed by one of them.
    #[serde(default, rename = "update-keys")]
    pub update_keys: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    pub image: Spanned<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// Path of the kernel inside the image; default: the first of `kernel`, `boot/vmlinuz`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// LinuxKit's modules tarball inside the image, unpacked at `/` of the rootfs when present;
    /// `none` or `""` turns it off. Default `kernel.tar`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tar: Option<String>,
    /// A CPU microcode cpio inside the image, prepended to the initrd (LinuxKit `ucode`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ucode: Option<String>,
    /// slotforge: path of an initrd inside the image; default: `initrd.img` or
    /// `boot/initrd.img` if present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
}

impl Kernel {
    /// The modules tarball to unpack, if any (`none` and `""` mean none).
    pub fn tar_name(&self) -> Option<&str> {
        match self.tar.as_deref() {
            None => Some("kernel.tar"),
            Some("") | Some("none") => None,
            Some(t) => Some(t),
        }
    }
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: Spanned<String>,
    /// The image whose contents fill the volume; none (or `""`): an empty volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<Spanned<String>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
    /// `filesystem` (default: the image's files) or `oci` (the image as an OCI layout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<Spanned<String>>,
    /// `format: oci` only: the platforms to include (slotforge: the build's platform only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platforms: Option<Spanned<Vec<String>>>,
}

impl Volume {
    /// The image that fills it, if any.
    pub fn image(&self) -> Option<&Spanned<String>> {
        self.image.as_ref().filter(|i| !i.value.is_empty())
    }
    /// Whether it holds the image as an OCI layout (`format: oci`).
    pub fn oci_layout(&self) -> bool {
        self.format.as_ref().is_some_and(|f| f.value == "oci")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trust {
    #[serde(default)]
    pub image: Vec<String>,
    #[serde(default)]
    pub org: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// The UEFI boot loader (systemd-boot): `file:PATH` (relative to the manifest) or an image
    /// reference whose image holds it at `loader_path`.
    pub loader: Spanned<String>,
    pub loader_path: Option<String>,
    /// Boot each slot through a Unified Kernel Image (`EFI/Linux/`) instead of a BLS entry.
    #[serde(default)]
    pub uki: bool,
    /// The EFI stub UKIs are made from (default: Debian's systemd-boot-efi stub).
    pub stub: Option<String>,
    /// Sign systemd-boot and the UKIs for UEFI Secure Boot (needs `uki: true`).
    #[serde(rename = "secure-boot")]
    pub secure_boot: Option<SecureBoot>,
}

/// A db key and certificate (PEM, relative to the manifest), as `sbsign --key --cert` take them.
/// The key must not be encrypted (Debian's snakeoil key: `openssl rsa -passin pass:snakeoil`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureBoot {
    pub key: Spanned<String>,
    pub cert: Spanned<String>,
}

/// Where systemd-boot's x86-64 binary sits in Debian's `systemd-boot-efi` package.
pub const DEFAULT_LOADER_PATH: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// An `onboot`/`onshutdown`/`services` entry: LinuxKit's container keys plus `ondisk`.
pub type Service = crate::linuxkit::spec::Container;

/// A `files:` entry, LinuxKit's keys.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: Spanned<String>,
    #[serde(default)]
    pub directory: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contents: Option<String>,
    /// A host file, relative to the manifest's directory (`~/` is the user's home).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `yaml` or `json`: the file holds the manifest itself, as LinuxKit writes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    /// With `source`: skip the entry when the source cannot be read.
    #[serde(default)]
    pub optional: bool,
    /// Octal, as a string (`"0644"`). Default 0600 for files, 0700 for directories (LinuxKit's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// A number, `root`, or a container name (LinuxKit's allocated id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<crate::linuxkit::spec::Id>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<crate::linuxkit::spec::Id>,
}

pub use crate::linuxkit::spec::Section;

/// A parsed, checked manifest and where it came from (relative `file:`/`source:` paths and
/// `oci:` paths are resolved against its directory).
#[derive(Debug)]
pub struct LoadedManifest {
    pub path: PathBuf,
    pub manifest: Manifest,
    default_boot: Boot,
}

/// Where Debian's `systemd-boot-efi` installs systemd-boot: the loader when `boot:` is absent.
pub const HOST_LOADER: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

impl LoadedManifest {
    pub fn dir(&self) -> &Path {
        self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    }
    /// Where a `files:` entry's `source` is read from: `~/REST` is under the home directory
    /// (`$HOME`), as LinuxKit expands it (only with something after the slash); any other path
    /// is relative to the manifest's directory.
    pub fn source_path(&self, src: &str) -> PathBuf {
        match src.strip_prefix("~/") {
            Some(rest) if !rest.is_empty() => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(rest),
            _ => self.dir().join(src),
        }
    }
    pub fn verity(&self) -> bool {
        self.manifest.verity != Some(false)
    }
    pub fn version(&self) -> &str {
        self.manifest.version.as_ref().map(|v| v.value.as_str()).unwrap_or("0.0.0")
    }
    /// Every container entry with its section, in manifest order.
    pub fn containers(&self) -> impl Iterator<Item = (Section, &Service)> {
        let m = &self.manifest;
        m.onboot
            .iter()
            .map(|s| (Section::Onboot, &s.value))
            .chain(m.onshutdown.iter().map(|s| (Section::Onshutdown, &s.value)))
            .chain(m.services.iter().map(|s| (Section::Services, &s.value)))
    }
    /// The entries of one section, in manifest order.
    pub fn section(&self, section: Section) -> &[Spanned<Service>] {
        let m = &self.manifest;
        match section {
            Section::Onboot => &m.onboot,
            Section::Onshutdown => &m.onshutdown,
            Section::Services => &m.services,
        }
    }
    /// The `boot:` section, or the default: the build host's systemd-boot.
    pub fn boot(&self) -> &Boot {
        self.manifest.boot.as_ref().unwrap_or(&self.default_boot)
    }
    /// Every volume by name, and whether it is read-only (what a bind naming one is checked against).
    pub fn volumes(&self) -> std::collections::BTreeMap<String, bool> {
        self.manifest.volumes.iter().map(|v| (v.name.value.clone(), v.readonly)).collect()
    }
    /// The ids LinuxKit allocates to container names (for `uid`/`gid` by name).
    pub fn ids(&self) -> crate::linuxkit::oci::IdMap {
        crate::linuxkit::oci::allocate_ids(self.containers().map(|(_, s)| s.name()))
    }
}

pub fn load(path: &Path) -> anyhow::Result<LoadedManifest> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading manifest {}: {e}", path.display()))?;
    Ok(parse(path, &text)?)
}

pub fn parse(path: &Path, text: &str) -> Result<LoadedManifest, InputError> {
    let manifest: Manifest = yaml::parse(path, text)?;
    check(path, &manifest)?;
    let default_boot = Boot { loader: Spanned::new(format!("file:{HOST_LOADER}"), serde_saphyr::Location::UNKNOWN, serde_saphyr::Location::UNKNOWN), loader_path: None, uki: false, stub: None, secure_boot: None };
    Ok(LoadedManifest { path: path.to_path_buf(), manifest, default_boot })
}

/// Checks serde cannot express; each error points at the offending value.
fn check(file: &Path, m: &Manifest) -> Result<(), InputError> {
    if let Some(v) = &m.version {
        if v.value.is_empty() || !v.value.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)) {
            return Err(InputError::spanned(file, v, format!("version {:?} may hold only letters, digits and . _ - +", v.value)));
        }
    }
    // LinuxKit: service names are unique (they run side by side); onboot and onshutdown names
    // may repeat (their directories carry an order prefix). slotforge adds: external images are
    // stored by name, so those are unique too.
    let mut services = BTreeSet::new();
    let mut external = BTreeSet::new();
    for (section, list) in [("onboot", &m.onboot), ("onshutdown", &m.onshutdown), ("services", &m.services)] {
        for entry in list {
            let s = &entry.value;
            let (Some(name), Some(image)) = (&s.name, &s.image) else {
                let missing = if s.name.is_none() { "name" } else { "image" };
                return Err(InputError::spanned(file, entry, format!("a {section} entry needs `{missing}:`")));
            };
            check_name(file, name)?;
            if image.value.is_empty() {
                return Err(InputError::spanned(file, image, "image must not be empty"));
            }
            if section == "services" && !services.insert(name.value.clone()) {
                return Err(InputError::spanned(file, name, format!("duplicate service name {:?} (services run side by side)", name.value)));
            }
            if s.is_external() && !external.insert(name.value.clone()) {
                return Err(InputError::spanned(file, name, format!("external (`ondisk: false`) container name {:?} is used twice; external images are stored by name", name.value)));
            }
            if let (Some(k), false) = (&s.sealed, s.is_external()) {
                return Err(InputError::spanned(file, k, "`sealed` applies to external images (`ondisk: false`) only"));
            }
            if let (Some(k), false) = (&s.keep_layers, s.is_sealed()) {
                let why = if s.is_external() { "this image is not sealed (`sealed: false` stores its layers anyway)" } else { "it applies to external images (`ondisk: false`) only" };
                return Err(InputError::spanned(file, k, format!("`keep-layers`: {why}")));
            }
            if s.is_external() && section == "onshutdown" {
                return Err(InputError::spanned(file, name, "onshutdown containers must be on disk (`ondisk: false` is for onboot and services)"));
            }
        }
    }
    check_volumes(file, m)?;
    // Binds naming volumes, checked as LinuxKit checks them (the build rewrites them the same way).
    let volumes: std::collections::BTreeMap<String, bool> = m.volumes.iter().map(|v| (v.name.value.clone(), v.readonly)).collect();
    for (section, list) in [("onboot", &m.onboot), ("onshutdown", &m.onshutdown), ("services", &m.services)] {
        for entry in list.iter() {
            crate::linuxkit::volume::resolve(&entry.value, &volumes).map_err(|e| InputError::spanned(file, entry, format!("{section} {}: {e}", entry.value.name())))?;
        }
    }
    if let Some(b) = &m.boot {
        if let (Some(sb), false) = (&b.secure_boot, b.uki) {
            return Err(InputError::spanned(file, &sb.key, "boot.secure-boot needs boot.uki: true (the command line, with its root hash, must be inside a signed image)"));
        }
    }
    for f in &m.files {
        check_rel_path(file, &f.path)?;
        check_file_kind(f).map_err(|e| InputError::spanned(file, &f.path, e))?;
        if let Some(mode) = &f.mode {
            parse_mode(mode).map_err(|e| InputError::spanned(file, &f.path, e))?;
        }
    }
    Ok(())
}

/// LinuxKit's rules for `volumes:`: valid, unique names; a known format; platforms only for an
/// OCI layout. Whether the containers' binds name existing volumes is checked with the build.
fn check_volumes(file: &Path, m: &Manifest) -> Result<(), InputError> {
    let mut names = BTreeSet::new();
    for v in &m.volumes {
        crate::linuxkit::volume::check_name(&v.name.value).map_err(|e| InputError::spanned(file, &v.name, e))?;
        if !names.insert(v.name.value.clone()) {
            return Err(InputError::spanned(file, &v.name, format!("duplicate volume name: {}", v.name.value)));
        }
        if let Some(f) = &v.format {
            if !["", "filesystem", "oci"].contains(&f.value.as_str()) {
                return Err(InputError::spanned(file, f, format!("volume {}: unknown format {:?} (filesystem or oci)", v.name.value, f.value)));
            }
        }
        if let (Some(p), false) = (&v.platforms, v.oci_layout()) {
            return Err(InputError::spanned(file, p, format!("volume {}: platforms apply to format: oci only", v.name.value)));
        }
        if let (None, Some(f)) = (v.image(), v.format.as_ref().filter(|_| v.oci_layout())) {
            return Err(InputError::spanned(file, f, format!("volume {}: format: oci needs an image", v.name.value)));
        }
    }
    Ok(())
}

/// LinuxKit's rules for what a `files:` entry holds: a directory, a symlink, `contents`, or
/// (without those) exactly one of `source` and `metadata`.
fn check_file_kind(f: &FileEntry) -> Result<(), String> {
    let p = &f.path.value;
    if f.directory && f.contents.is_some() {
        return Err(format!("file {p:?}: a directory cannot have contents"));
    }
    if !f.directory && f.symlink.is_none() && f.contents.is_none() {
        match (&f.source, &f.metadata) {
            (None, None) => return Err(format!("contents of file {p:?} not specified (contents, source, metadata, symlink or directory)")),
            (Some(_), Some(_)) => return Err(format!("file {p:?}: source and metadata are exclusive")),
            (None, Some(md)) if md != "yaml" && md != "json" => return Err(format!("file {p:?}: unsupported metadata type {md:?} (yaml or json)")),
            _ => {}
        }
    } else if f.metadata.is_some() {
        return Err(format!("file {p:?}: metadata cannot be combined with contents, symlink or directory"));
    } else if f.source.is_some() {
        return Err(format!("file {p:?}: source cannot be combined with contents, symlink or directory"));
    }
    Ok(())
}

fn check_name(file: &Path, name: &Spanned<String>) -> Result<(), InputError> {
    let n = &name.value;
    let ok = !n.is_empty()
        && n.len() <= 128
        && !n.starts_with('.')
        && n.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(InputError::spanned(file, name, format!("container name {n:?} must be 1-128 of [A-Za-z0-9._-], not starting with '.'")))
    }
}

fn check_rel_path(file: &Path, p: &Spanned<String>) -> Result<(), InputError> {
    let v = p.value.trim_start_matches('/');
    if v.is_empty() || v.split('/').any(|c| c == ".." || c == ".") {
        return Err(InputError::spanned(file, p, format!("file path {:?} must name a file inside the rootfs, without . or .. components", p.value)));
    }
    Ok(())
}

/// `"0644"` → 0o644.
pub fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("mode {s:?} is not an octal permission such as \"0644\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINUXKIT: &str = r#"
kernel:
  image: linuxkit/kernel:6.6.13
  cmdline: "console=tty0 console=ttyS0"
init:
  - linuxkit/init:v1.0.0
  - linuxkit/runc:v1.0.0
onboot:
  - name: sysctl
    image: linuxkit/sysctl:v1.0.0
  - name: dhcpcd
    image: linuxkit/dhcpcd:v1.0.0
    command: ["/sbin/dhcpcd", "--nobackground", "-f", "/dhcpcd.conf", "-1"]
services:
  - name: getty
    image: linuxkit/getty:v1.0.0
    env:
     - INSECURE=true
    binds:
     - /etc/resolv.conf:/etc/resolv.conf
    capabilities:
     - all
  - name: rngd
    image: linuxkit/rngd:v1.0.0
files:
  - path: etc/linuxkit-config
    metadata: yaml
  - path: etc/hostname
    contents: "appliance"
    mode: "0644"
trust:
  org:
    - linuxkit
"#;

    #[test]
    fn a_linuxkit_yml_parses_unchanged() {
        let m = parse(Path::new("lk.yml"), LINUXKIT).unwrap();
        let mf = &m.manifest;
        assert_eq!(mf.init.len(), 2);
        assert_eq!(mf.services[0].value.name(), "getty");
        assert_eq!(mf.services[0].value.capabilities.as_deref(), Some(&["all".to_string()][..]));
        assert!(!mf.services[0].value.is_external());
        assert_eq!(mf.kernel.as_ref().unwrap().cmdline, "console=tty0 console=ttyS0");
        assert_eq!(mf.files[0].metadata.as_deref(), Some("yaml"));
        assert_eq!(m.boot().loader.value, format!("file:{HOST_LOADER}"), "no boot: means the host's systemd-boot");
        assert_eq!(m.ids()["getty"], 102);
    }

    #[test]
    fn ondisk_false_marks_external() {
        let m = parse(Path::new("m.yml"), "services:\n  - name: big\n    image: oci:x\n    ondisk: false\n").unwrap();
        assert!(m.manifest.services[0].value.is_external());
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let e = parse(Path::new("sys.yml"), "version: 1.0\nservices:\n  - name: a\n    image: [oops\n").unwrap_err();
        assert_eq!(e.file, Path::new("sys.yml"));
        assert!(e.line >= 4, "{e}");
        let e = parse(Path::new("sys.yml"), "services:\n  - name: a\n    image: x\n  - name: a\n    image: y\n").unwrap_err();
        assert_eq!((e.line, e.column), (4, 11), "{e}");
        assert!(e.to_string().starts_with("sys.yml:4:11: duplicate service name \"a\""), "{e}");
        let e = parse(Path::new("s.yml"), "files:\n  - path: ../etc/passwd\n    contents: x\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = parse(Path::new("s.yml"), "services: 3\n").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        let e = parse(Path::new("s.yml"), "services:\n  - name: a\n    imag: x\n").unwrap_err();
        assert_eq!((e.line, e.column), (3, 5), "misspelt key: {e}");
        let e = parse(Path::new("s.yml"), "kernel:\n  image: k\n  cmdlin: x\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = parse(Path::new("s.yml"), "onboot:\n  - name: a\n").unwrap_err();
        assert!(e.message.contains("needs `image:`"), "{e}");
        parse(Path::new("s.yml"), "volumes:\n  - name: v\n  - {name: w, image: x, readonly: true, format: oci}\n").unwrap();
        for (text, at, want) in [
            ("volumes:\n  - name: V\n", (2, 11), "invalid volume name"),
            ("volumes:\n  - name: v\n  - name: v\n", (3, 11), "duplicate volume name"),
            ("volumes:\n  - {name: v, image: x, format: tar}\n", (2, 33), "unknown format"),
            ("volumes:\n  - {name: v, image: x, platforms: [linux/arm64]}\n", (2, 36), "format: oci only"),
            ("volumes:\n  - {name: v, format: oci}\n", (2, 23), "needs an image"),
            ("volumes:\n  - {name: v, size: 1}\n", (2, 15), "unknown field"),
        ] {
            let e = parse(Path::new("s.yml"), text).unwrap_err();
            assert!(e.message.contains(want), "{text}: {e}");
            assert_eq!((e.line, e.column), at, "{text}: {e}");
        }
    }

    #[test]
    fn onboot_names_may_repeat_but_external_ones_may_not() {
        parse(Path::new("s.yml"), "onboot:\n  - {name: a, image: x}\n  - {name: a, image: y}\nservices:\n  - {name: a, image: z}\n").unwrap();
        let e = parse(Path::new("s.yml"), "onboot:\n  - {name: a, image: x, ondisk: false}\nservices:\n  - {name: a, image: z, ondisk: false}\n").unwrap_err();
        assert!(e.message.contains("external"), "{e}");
    }

    #[test]
    fn file_entries_follow_linuxkit_rules() {
        let ok = |y: &str| parse(Path::new("f.yml"), &format!("files:\n  - path: etc/x\n{y}")).map(|_| ()).map_err(|e| e.message);
        assert!(ok("    metadata: json\n").is_ok());
        assert!(ok("    contents: \"\"\n").is_ok(), "empty contents are contents");
        assert!(ok("    source: a\n    optional: true\n    uid: getty\n    gid: 5\n").is_ok());
        assert!(ok("    directory: true\n    mode: \"0750\"\n").is_ok());
        assert!(ok("    mode: \"0644\"\n").unwrap_err().contains("not specified"));
        assert!(ok("    source: a\n    metadata: yaml\n").unwrap_err().contains("exclusive"));
        assert!(ok("    metadata: toml\n").unwrap_err().contains("unsupported metadata"));
        assert!(ok("    directory: true\n    contents: x\n").unwrap_err().contains("directory"));
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let e = parse(Path::new("d.yml"), "version: 1\nversion: 2\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("4755").unwrap(), 0o4755);
        assert!(parse_mode("0999").is_err());
    }
}

/// One container of a checked manifest and where it goes in the rootfs.
#[derive(Debug, Clone, Serialize)]
pub struct CheckedContainer {
    pub section: &'static str,
    pub name: String,
    pub image: Option<String>,
    pub external: bool,
    pub dir: String,
    pub id: Option<u32>,
}

/// `slotforge check`: the manifest loaded (every key known, values well-formed, names as
/// LinuxKit allows them) without fetching anything.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub manifest: PathBuf,
    pub ok: bool,
    pub boot_loader: String,
    pub containers: Vec<CheckedContainer>,
    /// LinuxKit volumes: (name, directory in the rootfs, read-only).
    pub volumes: Vec<(String, String, bool)>,
}

pub fn check_file(path: &Path) -> anyhow::Result<CheckReport> {
    let m = load(path)?;
    let ids = m.ids();
    let mut containers = Vec::new();
    for section in [Section::Onboot, Section::Onshutdown, Section::Services] {
        for (i, s) in m.section(section).iter().enumerate() {
            let s = &s.value;
            containers.push(CheckedContainer {
                section: section.dir(),
                name: s.name().to_string(),
                image: s.image.as_ref().map(|i| i.value.clone()),
                external: s.is_external(),
                dir: crate::linuxkit::bundle::bundle_dir(section, i, s.name()),
                id: ids.get(s.name()).copied(),
            });
        }
    }
    let volumes = m.manifest.volumes.iter().map(|v| (v.name.value.clone(), crate::linuxkit::volume::base_dir(&v.name.value), v.readonly)).collect();
    Ok(CheckReport { manifest: path.to_path_buf(), ok: true, boot_loader: m.boot().loader.value.clone(), containers, volumes })
}

pub fn service(m: &LoadedManifest, section: Section, i: usize) -> &Service {
    &m.section(section)[i].value
}

/// The manifest's `update-keys:`, read and checked: (key id, public key file text), sorted by id.
pub fn update_keys(m: &LoadedManifest) -> anyhow::Result<Vec<(String, String)>> {
    let mut keys = Vec::new();
    for k in &m.manifest.update_keys {
        let p = m.dir().join(&k.value);
        let text = std::fs::read_to_string(&p).map_err(|e| crate::base::yaml::InputError::spanned(&m.path, k, format!("update key {}: {e}", p.display())))?;
        let key = crate::format::signature::parse_public(&text).map_err(|e| crate::base::yaml::InputError::spanned(&m.path, k, format!("update key {}: {e:#}", p.display())))?;
        keys.push((key.id.clone(), crate::format::signature::public_text(&key)?));
    }
    keys.sort();
    keys.dedup_by(|a, b| a.0 == b.0);
    Ok(keys)
}
