//! The on-device agent: the same library, run on the appliance. At boot it checks the booted
//! build's external images against the digests in the immutable rootfs
//! (`/etc/slotforge/external-images.json`), pulls what is missing or corrupt from the registry
//! (or a mirror), makes verified images ready for the runtime (a sealed image opened with
//! dm-verity and mounted in place, an unsealed one unpacked; a missing sealed one started at once
//! from its registry and filled in the background: `lazy`), marks the boot good, and reports
//! every state change as one JSON line (`@slotforge {...}`) on the console. Schema: docs/agent.md.

pub mod boot;
pub mod dmverity;
pub mod fetch;
pub mod lazy;
pub mod mount;
pub mod runner;
pub mod sealed;
pub mod status;
pub mod update;
pub mod volumes;
