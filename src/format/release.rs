//! What a rootfs says about itself: `/etc/slotforge/release.json` (version, build id) and
//! `/etc/slotforge/external-images.json` (every external image the build pins: reference,
//! manifest digest, platform, size, sealing). Written by the build, read by the device's agent,
//! `inspect`/`verify` and the upgrade; the rootfs is verified, so these are the trust anchor.
//! Format: docs/formats.md#rootfs.

use serde::Serialize;

pub const RELEASE_PATH: &str = "etc/slotforge/release.json";
pub const EXTERNAL_PATH: &str = "etc/slotforge/external-images.json";
/// Version of the rootfs metadata files' schema.
pub const METADATA_FORMAT: u32 = 1;

/// One external image as recorded in the rootfs.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ExternalImage {
    pub name: String,
    pub section: String,
    pub reference: String,
    pub digest: String,
    pub media_type: String,
    pub platform: String,
    /// Bytes of manifest + config + layers.
    pub size: u64,
    /// The container's directory (`containers/services/NAME`), where the device mounts it
    /// (`rootfs/` when read-only, `lower/` under an overlay when writable).
    #[serde(default)]
    pub bundle: String,
    #[serde(default)]
    pub readonly: bool,
    /// Stored as a dm-verity-sealed filesystem (docs/formats.md#sealed-images); `None`: as OCI
    /// layers, unpacked at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<crate::format::sealed::Sealed>,
    /// For a sealed image: its layers are stored in the images partition too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_layers: bool,
}

/// `/etc/slotforge/external-images.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ExternalImages {
    pub format: u32,
    pub build_id: String,
    pub images: Vec<ExternalImage>,
}

/// `/etc/slotforge/release.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Release {
    pub format: u32,
    pub version: String,
    pub build_id: String,
    pub source_date_epoch: u64,
    pub builder: String,
}
