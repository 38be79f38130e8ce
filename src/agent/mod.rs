//! The on-device agent: the same library, run on the appliance. At boot it checks the booted
//! build's external images against the digests in the immutable rootfs
//! (`/etc/slotforge/external-images.json`), pulls what is missing or corrupt from the registry
//! (or a mirror), makes verified images ready for the runtime (a sealed image opened with
//! dm-verity and mounted in place, an unsealed one unpacked), marks the boot good, and reports
//! every state change as one JSON line (`@slotforge {...}`) on the console. Schema: docs/agent.md.

pub mod boot;
pub mod runner;
pub mod sealed;
pub mod status;

use serde::Deserialize;
use std::io::Write;
use std::path::PathBuf;

/// Where things are on the device. Defaults match the reference init (docs/boot.md);
/// `/etc/slotforge/agent.json` and then command-line flags override them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The booted rootfs (`/`).
    pub root: PathBuf,
    /// The mounted ESP.
    pub esp: PathBuf,
    /// The mounted external-images partition.
    pub images: PathBuf,
    /// Where verified external images are made ready for the runtime (a tmpfs): sealed ones
    /// mounted, unsealed ones unpacked.
    pub run_dir: PathBuf,
    /// The kernel command line (`/proc/cmdline`).
    pub cmdline: PathBuf,
    /// Fetch external images from this registry host instead of the one in their reference.
    pub mirror: Option<String>,
    /// Registry hosts reached over plain http.
    pub insecure: Vec<String>,
    /// Never use the network.
    pub offline: bool,
    /// A directory whose entries are the partitions by GPT name (tests); default: sysfs lookup.
    pub devices: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            root: "/".into(),
            esp: "/boot/efi".into(),
            images: "/var/lib/slotforge/images".into(),
            run_dir: "/run/slotforge".into(),
            cmdline: "/proc/cmdline".into(),
            mirror: None,
            insecure: vec![],
            offline: false,
            devices: None,
        }
    }
}

pub const CONFIG_PATH: &str = "etc/slotforge/agent.json";

impl AgentConfig {
    /// Defaults, then `<root>/etc/slotforge/agent.json` if present.
    pub fn load(root: &std::path::Path) -> anyhow::Result<Self> {
        let p = root.join(CONFIG_PATH);
        let mut c: AgentConfig = match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            Err(_) => AgentConfig::default(),
        };
        c.root = root.to_path_buf();
        Ok(c)
    }
}

/// Print one event line on stdout (the console): `@slotforge {"event": NAME, ...}`.
pub fn emit(event: &str, fields: serde_json::Value) {
    let mut m = serde_json::Map::new();
    m.insert("event".into(), event.into());
    if let serde_json::Value::Object(f) = fields {
        m.extend(f);
    }
    let line = format!("@slotforge {}\n", serde_json::Value::Object(m));
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}
