//! Where things are on the device (the booted rootfs, the ESP, the images partition, ...):
//! defaults that match the reference init, then `/etc/slotforge/agent.json`, then flags.

use serde::Deserialize;
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
    /// A sealed image missing at boot whose sealed artifact its registry has is started at once
    /// from the registry (network block device, dm-verity) and filled in the background
    /// (default); `false`: fetched whole before its service starts.
    pub lazy: bool,
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
            lazy: true,
            devices: None,
        }
    }
}

pub const CONFIG_PATH: &str = "etc/slotforge/agent.json";

impl AgentConfig {
    /// Where the agent fetches `host/repo` from, in order: agent.json's `mirror` if set, else the
    /// rootfs's (or the environment's) containers-registries.conf, else the reference's own
    /// registry. Images and releases alike.
    pub fn endpoints(&self, host: &str, repo: &str, by_digest: bool) -> anyhow::Result<Vec<crate::oci::mirrors::Endpoint>> {
        Ok(match &self.mirror {
            Some(m) => vec![crate::oci::mirrors::Endpoint { host: m.clone(), repo: repo.to_string(), insecure: false, mirror: true }],
            None => {
                let conf = match std::env::var_os("CONTAINERS_REGISTRIES_CONF") {
                    Some(p) => crate::oci::mirrors::Mirrors::load_from(std::path::Path::new(&p), true)?,
                    None => crate::oci::mirrors::Mirrors::load_from(&self.root.join(crate::oci::mirrors::DEFAULT_PATH.trim_start_matches('/')), false)?,
                };
                conf.endpoints(host, repo, by_digest).map_err(|e| anyhow::anyhow!(e))?
            }
        })
    }

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
