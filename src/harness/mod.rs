//! Upgrade-compatibility testing in QEMU (`slotforge test`): the VM runner (`vm`: OVMF +
//! systemd-boot, TCG unless KVM answers), the matrix file (`matrix`), its driver (`run`), the
//! report (`report`: JSON, JUnit), the split over several machines and the merge of their reports (`shard`), faults
//! (`faults`, and `netcut`: a registry connection dropped half-way). The guest is read only through the agent's typed events (`format::agent`). The
//! project's own QEMU tests use the same runner through the `slotforge-qemu-tests` crate. `crash`
//! rebuilds and checks every state a power cut can leave from a dm-log-writes recording.

pub mod crash;
pub mod faults;
pub mod matrix;
pub mod netcut;
pub mod report;
pub mod run;
pub mod shard;
pub mod vm;
