//! The device wing: what runs on the appliance (or on a disk image standing in for one). The
//! agent's boot sequence and container runner, applying update bundles to the inactive slot
//! (a block device or an image file), garbage collection of image sets, installing from the
//! offline USB installer. Imports `base`, `format`, `oci`, `linuxkit` and `compose` — never
//! the build wing: a device holds only what its verified rootfs and the bundles it applies say.

pub mod agent;
pub mod config;
pub mod emit;
pub mod images;
pub mod install;
pub mod upgrade;

pub use config::AgentConfig;
pub use emit::emit;
