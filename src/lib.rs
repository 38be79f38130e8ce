//! slotforge: build complete A/B disk images for immutable Linux appliances, run them on the
//! device, and prove in QEMU that they upgrade safely.
//!
//! The crate is a house of four wings over two libraries (docs/architecture.md):
//! - `base`: digests, durable writes, disk windows, YAML with positions, the blob cache.
//! - `format`: every on-disk and on-wire format, reader and writer, no policy.
//! - `oci`, `linuxkit`: image resolution and LinuxKit's container semantics.
//! - `compose`: layers → trees, images → sealed images; shared by the build and the device.
//! - `build`: manifest + layout → resolve → rootfs → images partition → ESP → disk (and bundles,
//!   installers). `device`: the agent, applying bundles, GC, installing. `harness`: QEMU,
//!   upgrade matrices, crash states. `cli`: arguments in, one library call, output.
//! The device never imports the build; formats import no wing; nothing imports upward.

pub mod base;
pub mod builder;
pub mod cli;
pub mod compose;
pub mod device;
pub mod format;
pub mod harness;
pub mod linuxkit;
pub mod oci;

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
