//! The agent's status document (`slotforge agent status`, and the `status` event) and the
//! states and reports inside the events: typed, so the device writes and the harness reads one
//! definition. Serialized names are the protocol's (docs/agent.md).

use crate::format::signature::Decision;
use serde::{Deserialize, Serialize};

/// One slot's boot-counting state, read from its entry on the ESP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootState {
    /// No counter: marked good (or installed without one).
    Good,
    /// A counter with tries left.
    Trying,
    /// A counter at 0: systemd-boot no longer picks it.
    Bad,
    /// No entry.
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotState {
    pub slot: String,
    pub entry: Option<String>,
    pub boot: BootState,
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
}

/// An external image of the booted build, checked blob by blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageStatus {
    Verified,
    Missing,
    Corrupt,
    /// A sealed image served from its registry while it is filled in (every block read is
    /// checked by dm-verity under the pinned root hash); ready for its service.
    Lazy,
}

impl ImageStatus {
    /// Whether the image's service can run on it.
    pub fn ready(&self) -> bool {
        matches!(self, ImageStatus::Verified | ImageStatus::Lazy)
    }
}

/// What the status reports about a sealed image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedState {
    pub root_hash: String,
    /// The device-mapper device (`/dev/mapper/slotforge-NAME`) when open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Where it is mounted (read-only) when mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounted: Option<String>,
    /// dm-verity's own verdict: `verified`, or `corrupted` once a read failed verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageState {
    pub name: String,
    pub digest: String,
    pub state: ImageStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Blobs that failed their digest check (removed before a re-pull).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad_blobs: Vec<String>,
    pub bytes: u64,
    /// A sealed image: root hash, device, mount point and dm-verity's verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedState>,
}

/// The device as a whole: `ok` when every external image of the booted build is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StatusState {
    Ok,
    Degraded,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub slot: Option<String>,
    pub version: String,
    pub build_id: String,
    pub state: StatusState,
    pub slots: Vec<SlotState>,
    pub images: Vec<ImageState>,
    /// What `/` is mounted from (on the device itself, not with `--root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_device: Option<RootDevice>,
    /// UEFI Secure Boot state (the `SecureBoot` variable), when efivarfs is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<bool>,
}

/// The block device behind `/`: with dm-verity, the device-mapper target veritysetup made
/// (`dm_uuid` `CRYPT-VERITY-<superblock uuid>-root`) and the root hash the boot entry gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootDevice {
    /// `major:minor`.
    pub dev: String,
    pub dm_name: Option<String>,
    pub dm_uuid: Option<String>,
    /// `roothash=` of the kernel command line.
    pub root_hash: Option<String>,
}

/// What a GC kept and dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    pub kept_builds: Vec<String>,
    pub removed_builds: Vec<String>,
    pub removed_blobs: usize,
    pub removed_bytes: u64,
}

/// The steps of applying a bundle, in order (docs/upgrade-protocol.md#apply). A test may cut
/// the power at any of them (`agent apply --pause-at STEP`, `power-cut:STEP` in a matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum ApplyStep {
    /// One external-image blob written into the images partition (repeated).
    BlobWritten,
    /// The new build's image set listed in the partition's index.
    ImagesListed,
    /// The inactive slot's old entry removed (nothing boots it any more).
    EntryRemoved,
    /// Half of the rootfs written to the slot (on a block device; a cut here leaves a torn slot
    /// that no entry names).
    SlotHalfWritten,
    /// The rootfs written to the inactive slot, synced and read back.
    SlotWritten,
    /// Its kernel and initrd (or UKI) written to the ESP.
    KernelWritten,
    /// Its boot entry written with a boot counter: the next boot tries it.
    EntryWritten,
}

impl ApplyStep {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

impl std::fmt::Display for ApplyStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub slot: String,
    pub build_id: String,
    pub version: String,
    pub install_number: u64,
    pub entry: String,
    /// Blobs of the new build's external images already on the device.
    pub blobs_present: usize,
    /// Blobs written (and their bytes).
    pub blobs_written: usize,
    pub image_bytes_written: u64,
    pub rootfs_bytes: u64,
    /// Images the bundle did not carry and the device must pull at first boot.
    pub images_to_pull: Vec<String>,
    /// What the running slot's keys said about the bundle's signatures.
    pub signature: Decision,
    /// The new slot's dm-verity root hash, when it has one.
    pub root_hash: Option<String>,
    /// A delta bundle: where the new rootfs's chunks came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<crate::format::casync::Assembled>,
    /// A release pulled from a registry: what was fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulled: Option<PullReport>,
}

/// What a pull of a release from a registry found and fetched (docs/upgrade-protocol.md#releases-in-a-registry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullReport {
    pub reference: String,
    /// `HOST/REPO` the release was read from: the reference's own, or a mirror (agent.json's
    /// `mirror`, registries.conf).
    #[serde(default)]
    pub served_by: String,
    pub manifest_digest: String,
    pub build_id: String,
    pub version: String,
    pub signature: Decision,
    pub chunks: usize,
    /// Chunks the running slot holds, or an earlier interrupted pull kept.
    pub chunks_local: usize,
    pub chunks_fetched: usize,
    /// Bytes of chunks and boot files fetched (the inline metadata not counted).
    pub bytes_fetched: u64,
    /// HTTP requests sent to the registry (auth round trips and retries included).
    pub requests: usize,
    /// Of those, before the signature was decided (manifest, referrers).
    pub requests_before_decision: usize,
    /// Sealed external images the release carried that the device lacked (their bytes are in
    /// `bytes_fetched` too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<PulledImage>,
}

/// One sealed image of a pulled release: its chunks, found on the device (its earlier sealed
/// images of the service, an interrupted pull) or fetched by range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PulledImage {
    pub name: String,
    pub chunks: usize,
    pub chunks_local: usize,
    pub chunks_fetched: usize,
    pub bytes_fetched: u64,
}
