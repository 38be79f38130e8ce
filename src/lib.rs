//! slotforge: build complete A/B disk images for immutable Linux appliances.
//!
//! The data path reads top to bottom through these modules (see `docs/architecture.md`):
//! manifest + layout -> oci (resolve, verified blobs) -> flatten (layers -> tree) -> rootfs
//! (tree -> squashfs, size cap; external images -> sealed, dm-verity) -> images (external-images partition) -> esp (FAT + boot
//! entries) -> disk (GPT + sparse image) -> inspect/verify (read it all back).

pub mod agent;
pub mod bmap;
pub mod build;
pub mod bundle;
pub mod cache;
pub mod cli;
pub mod cmdline;
pub mod disk;
pub mod durable;
pub mod entries;
pub mod esp;
pub mod fat;
pub mod flatten;
pub mod harness;
pub mod hash;
pub mod images;
pub mod inspect;
pub mod installer;
pub mod layout;
pub mod linuxkit;
pub mod lock;
pub mod manifest;
pub mod oci;
pub mod progress;
pub mod pull;
pub mod rootfs;
pub mod sealed;
pub mod signature;
pub mod squashfs;
pub mod tree;
pub mod uki;
pub mod upgrade;
pub mod verity;
pub mod window;
pub mod yaml;

/// Default `SOURCE_DATE_EPOCH` when the environment gives none: 2024-01-01T00:00:00Z.
/// Any fixed value keeps builds reproducible; this one is after 1980 so FAT can store it.
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_704_067_200;

/// The timestamp every artefact carries: `SOURCE_DATE_EPOCH` if set, else the fixed default.
pub fn source_date_epoch() -> anyhow::Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("SOURCE_DATE_EPOCH={v:?} is not a whole number of seconds")),
        Err(_) => Ok(DEFAULT_SOURCE_DATE_EPOCH),
    }
}
