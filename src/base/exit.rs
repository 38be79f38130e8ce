//! Exit statuses of the `slotforge` command: set by the CLI, read by the harness (which runs the
//! command for its builds) and by scripts. Documented in the guide.

/// Ran, and the answer is no (`verify`, `key verify`, `test`, `crash-states`).
pub const NO: u8 = 2;
/// The builder refused its inputs for a stated reason (a rootfs over a cap): `build`, `bundle`,
/// `installer`.
pub const REFUSED: u8 = 3;
/// `agent boot`: the boot is degraded (an external image is not verified).
pub const DEGRADED: u8 = 3;
