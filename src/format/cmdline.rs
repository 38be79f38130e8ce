//! The kernel command line of a slot's boot entry: which partition is the root, its dm-verity
//! parameters in systemd's standard form (systemd-veritysetup-generator(8): `roothash=`,
//! `systemd.verity_root_data=`, `systemd.verity_root_hash=`, `systemd.verity_root_options=`, the
//! form a systemd-based initrd reads; the reference initramfs reads it too), and slotforge's own keys
//! (`slotforge.slot=`, `slotforge.build=`). Built in one place for `build` and `upgrade`, parsed
//! back for `inspect`/`verify`. Pure: strings in, strings out.

use crate::format::layout::Slot;
use crate::format::verity::VerityInfo;
use anyhow::bail;

/// The device name systemd-veritysetup gives the verified root (`/dev/mapper/root`).
pub const VERITY_ROOT: &str = "/dev/mapper/root";

/// The `options` line of a slot's entry. `extra` is the manifest's cmdline (plus anything the
/// caller adds); it must be one line of printable text, or a BLS entry could be extended with
/// lines of an attacker's choosing.
pub fn entry_options(partition: &str, slot: Slot, build_id: &str, verity: Option<&VerityInfo>, extra: &str) -> anyhow::Result<String> {
    for (what, v) in [("partition name", partition), ("build id", build_id), ("kernel command line", extra)] {
        if let Some(c) = v.chars().find(|c| c.is_control()) {
            bail!("{what} {v:?} contains the control character {c:?}; a boot entry option must be one line of printable text");
        }
    }
    if partition.contains(' ') || build_id.contains(' ') {
        bail!("partition name {partition:?} and build id {build_id:?} must not contain spaces (they are kernel parameters)");
    }
    let root = match verity {
        Some(v) => {
            if !v.root_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("root hash {:?} is not hex", v.root_hash);
            }
            format!(
                "root={VERITY_ROOT} roothash={} systemd.verity_root_data=PARTLABEL={partition} systemd.verity_root_hash=PARTLABEL={partition} systemd.verity_root_options=hash-offset={}",
                v.root_hash, v.hash_offset
            )
        }
        None => format!("root=PARTLABEL={partition}"),
    };
    Ok(format!("{root} ro slotforge.slot={} slotforge.build={build_id} {}", slot.name(), extra.trim()).trim_end().to_string())
}

/// The value of `key=` on a command line (the last one wins, as in the kernel).
pub fn value(cmdline: &str, key: &str) -> Option<String> {
    cmdline.split_whitespace().filter_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('='))).last().map(str::to_string)
}

/// The dm-verity parameters an entry's options name: (root hash, hash offset).
pub fn verity_of(options: &str) -> Option<(String, u64)> {
    let root = value(options, "roothash")?;
    let opts = value(options, "systemd.verity_root_options").unwrap_or_default();
    let off = opts.split(',').find_map(|o| o.strip_prefix("hash-offset=")).and_then(|v| v.parse().ok()).unwrap_or(0);
    Some((root, off))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> VerityInfo {
        VerityInfo {
            root_hash: "ab".repeat(32),
            salt: "00".repeat(32),
            hash_offset: 8192,
            data_blocks: 2,
            data_block_size: 4096,
            hash_block_size: 4096,
            tree_bytes: 8192,
            uuid: String::new(),
            algorithm: "sha256".into(),
        }
    }

    #[test]
    fn verity_options_are_systemds() {
        let o = entry_options("rootfs_b", Slot::B, "1.0-abc", Some(&info()), "console=ttyS0 ").unwrap();
        assert_eq!(
            o,
            format!("root=/dev/mapper/root roothash={} systemd.verity_root_data=PARTLABEL=rootfs_b systemd.verity_root_hash=PARTLABEL=rootfs_b systemd.verity_root_options=hash-offset=8192 ro slotforge.slot=b slotforge.build=1.0-abc console=ttyS0", "ab".repeat(32))
        );
        assert_eq!(verity_of(&o), Some(("ab".repeat(32), 8192)));
        let plain = entry_options("rootfs_a", Slot::A, "1.0-abc", None, "").unwrap();
        assert_eq!(plain, "root=PARTLABEL=rootfs_a ro slotforge.slot=a slotforge.build=1.0-abc");
        assert_eq!(verity_of(&plain), None);
    }

    #[test]
    fn line_breaks_are_refused() {
        let e = entry_options("rootfs_a", Slot::A, "1", None, "quiet\nlinux /evil.efi").unwrap_err().to_string();
        assert!(e.contains("control character"), "{e}");
        assert!(entry_options("rootfs_a", Slot::A, "1\r", None, "").is_err());
    }
}
