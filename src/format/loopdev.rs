//! The loop driver's attach request (`<linux/loop.h>`): `LOOP_CTL_GET_FREE` on
//! `/dev/loop-control` finds a free `/dev/loopN`, and one `LOOP_CONFIGURE` (Linux 5.8) attaches a
//! file to it read-only and cleared when its last user closes it — what `veritysetup open` does for
//! a file before device-mapper can use it. Pure: the 304-byte `struct loop_config`; the ioctls
//! are the agent's (device::agent::dmverity).

/// `LOOP_CTL_GET_FREE` (on `/dev/loop-control`; returns the number N of a free `/dev/loopN`).
pub const LOOP_CTL_GET_FREE: u64 = 0x4C82;
/// `LOOP_CONFIGURE` (on `/dev/loopN`, with a `struct loop_config`).
pub const LOOP_CONFIGURE: u64 = 0x4C0A;
/// `LO_FLAGS_READ_ONLY`.
pub const READ_ONLY: u32 = 1;
/// `LO_FLAGS_AUTOCLEAR`: detached when the last opener (device-mapper, here) closes it.
pub const AUTOCLEAR: u32 = 4;
/// `sizeof(struct loop_config)`: fd, block_size, `struct loop_info64` (232), 8 reserved u64.
pub const CONFIG_LEN: usize = 304;

/// A `struct loop_config` attaching the open file `fd` with `flags` (block size: the driver's
/// default, 512).
pub fn config(fd: u32, flags: u32) -> [u8; CONFIG_LEN] {
    let mut b = [0u8; CONFIG_LEN];
    b[0..4].copy_from_slice(&fd.to_ne_bytes());
    // loop_info64 starts at 8: five u64 (device, inode, rdevice, offset, sizelimit), then
    // lo_number, lo_encrypt_type, lo_encrypt_key_size and lo_flags (u32 each).
    b[8 + 52..8 + 56].copy_from_slice(&flags.to_ne_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_carries_the_file_and_the_flags_where_the_kernel_reads_them() {
        let b = config(7, READ_ONLY | AUTOCLEAR);
        assert_eq!(&b[0..4], &7u32.to_ne_bytes());
        assert_eq!(&b[60..64], &5u32.to_ne_bytes());
        assert!(b[4..60].iter().chain(&b[64..]).all(|&x| x == 0));
    }
}
