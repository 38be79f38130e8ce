//! Composition shared by the build and the device: OCI image layers flattened into one tree,
//! and an external image sealed into its reproducible squashfs + dm-verity file. Both sides
//! need it — the build makes every tree and sealed image, the device rebuilds a sealed image it
//! lost or found corrupt, bit-identically — so it lives below both wings.

pub mod flatten;
pub mod seal;
