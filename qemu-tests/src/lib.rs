//! Test infrastructure that runs the real parts: QEMU boots of slotforge disks under OVMF +
//! systemd-boot (TCG by default, KVM when it answers), guest fixtures built from Debian
//! packages, the guest's JSON event lines, and a local registry. Used by slotforge's tests.

pub mod fixtures;
pub mod registry;
pub mod world;

/// The VM runner and the event parser live in slotforge itself (`slotforge test` drives them).
pub use slotforge::format::agent::events;
pub use slotforge::harness::vm;
