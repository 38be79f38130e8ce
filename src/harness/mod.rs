//! Upgrade-compatibility testing in QEMU (`slotforge test`): the VM runner (`vm`: OVMF +
//! systemd-boot, TCG unless KVM answers), the guest's JSON events (`events`), the matrix file
//! (`matrix`) and its driver and reports (`run`). The project's own QEMU tests use the same
//! runner through the `slotforge-qemu-tests` crate. `logwrites` reads and replays dm-log-writes
//! logs (QEMU's `blklogwrites`); `crash` rebuilds and checks every state a power cut can leave.

pub mod crash;
pub mod faults;
pub mod matrix;
pub mod run;
pub mod vm;
