//! The foundation every wing stands on: digests, durable writes, windows onto partitions inside
//! a disk image, YAML with positions, the blob cache, progress bars, dates and output helpers.
//! Imports nothing of the crate.

pub mod cache;
pub mod durable;
pub mod exit;
pub mod hash;
pub mod progress;
pub mod text;
pub mod time;
pub mod window;
pub mod yaml;
