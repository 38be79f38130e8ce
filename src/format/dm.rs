//! The device-mapper control interface (`/dev/mapper/control`, `<linux/dm-ioctl.h>`) for the
//! one job the agent gives it: a read-only dm-verity device over a sealed image under the
//! parameters the verified rootfs pins, and its verdict back (`V` verified, `C` corrupted).
//! Encodes the 312-byte `struct dm_ioctl` requests (create, load a table, resume, remove,
//! status), the verity target's table line (the kernel's dm-verity documentation, version 1),
//! and reads the replies. `veritysetup` does the same through libcryptsetup; under TCG its
//! process start costs 0.1–0.4 s per image on every boot, on the way to the first service.
//! Pure; the ioctls are the agent's (device::agent::dmverity).

/// `sizeof(struct dm_ioctl)`.
pub const HEADER_LEN: usize = 312;
/// `sizeof(struct dm_target_spec)`.
const SPEC_LEN: usize = 40;
/// The interface version a request states (4.0.0: every kernel with dm-verity has it).
const VERSION: [u32; 3] = [4, 0, 0];
/// `DM_READONLY_FLAG`: a table dm-verity accepts (it refuses a writable one).
pub const READONLY: u32 = 1;
/// `DM_BUFFER_FULL_FLAG`: the reply did not fit.
const BUFFER_FULL: u32 = 1 << 8;
/// Bytes the agent hands the kernel for a reply (one target and its short status line).
pub const REPLY_LEN: usize = 4096;

/// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
const fn iowr(cmd: u64) -> u64 {
    (3 << 30) | ((HEADER_LEN as u64) << 16) | (0xfd << 8) | cmd
}
pub const DM_DEV_CREATE: u64 = iowr(3);
pub const DM_DEV_REMOVE: u64 = iowr(4);
/// Without `DM_SUSPEND_FLAG`: resume, which makes a loaded table live.
pub const DM_DEV_SUSPEND: u64 = iowr(6);
pub const DM_TABLE_LOAD: u64 = iowr(9);
pub const DM_TABLE_STATUS: u64 = iowr(12);

/// A request about the device named `name` with `flags`, in a buffer of `len` bytes (the kernel
/// writes its reply into the same buffer). `None` if the name does not fit (127 bytes).
pub fn request(name: &str, flags: u32, len: usize) -> Option<Vec<u8>> {
    if name.is_empty() || name.len() > 127 || name.contains('\0') || name.contains('/') || len < HEADER_LEN {
        return None;
    }
    let mut b = vec![0u8; len];
    for (i, v) in VERSION.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b[12..16].copy_from_slice(&(len as u32).to_ne_bytes()); // data_size
    b[16..20].copy_from_slice(&(HEADER_LEN as u32).to_ne_bytes()); // data_start
    b[28..32].copy_from_slice(&flags.to_ne_bytes());
    b[48..48 + name.len()].copy_from_slice(name.as_bytes()); // name[128] after dev (u64 at 40)
    Some(b)
}

/// A `DM_TABLE_STATUS` request (the live table's status lines).
pub fn status_request(name: &str, len: usize) -> Option<Vec<u8>> {
    request(name, 0, len)
}

/// The dm-verity table line (format version 1, hash type 1 as `veritysetup format` makes it):
/// data and hash on block devices `major:minor`, the hash tree one hash block after the
/// superblock at `hash_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTable {
    pub data_dev: (u32, u32),
    pub hash_dev: (u32, u32),
    pub data_block_size: u64,
    pub hash_block_size: u64,
    pub data_blocks: u64,
    pub hash_offset: u64,
    pub root_hash: String,
    pub salt: String,
}

impl VerityTable {
    /// Sectors of 512 bytes the device exposes (the data blocks).
    pub fn sectors(&self) -> u64 {
        self.data_blocks * self.data_block_size / 512
    }

    /// The target's parameters: `1 DATA HASH DBS HBS NBLOCKS HASH_START sha256 ROOT SALT`.
    pub fn params(&self) -> String {
        let d = |(a, b): (u32, u32)| format!("{a}:{b}");
        let hash_start = self.hash_offset.div_ceil(self.hash_block_size) + 1;
        format!("1 {} {} {} {} {} {hash_start} sha256 {} {}", d(self.data_dev), d(self.hash_dev), self.data_block_size, self.hash_block_size, self.data_blocks, self.root_hash, self.salt)
    }
}

/// A read-only `DM_TABLE_LOAD` request for `name`: one `verity` target over the whole device.
pub fn table_load(name: &str, t: &VerityTable) -> Option<Vec<u8>> {
    let params = t.params();
    let len = (HEADER_LEN + SPEC_LEN + params.len() + 1).next_multiple_of(8);
    let mut b = request(name, READONLY, len)?;
    b[20..24].copy_from_slice(&1u32.to_ne_bytes()); // target_count
    let at = HEADER_LEN;
    b[at + 8..at + 16].copy_from_slice(&t.sectors().to_ne_bytes()); // length; sector_start 0
    b[at + 24..at + 30].copy_from_slice(b"verity");
    b[at + SPEC_LEN..at + SPEC_LEN + params.len()].copy_from_slice(params.as_bytes());
    Some(b)
}

/// The device number (major, minor) a `DM_DEV_CREATE` reply gives (the kernel's encoding of
/// `dev_t`, `huge_encode_dev`).
pub fn reply_dev(b: &[u8]) -> Option<(u32, u32)> {
    let dev = u64::from_ne_bytes(b.get(40..48)?.try_into().ok()?);
    Some((((dev & 0xfff00) >> 8) as u32, ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32))
}

/// One target of a device's live table: its type (`verity`) and its status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    pub target: String,
    pub status: String,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Read the kernel's reply to a [`status_request`]: the targets in table order. Every offset is
/// checked against the buffer; a reply that did not fit is an error, not a short answer.
pub fn parse_status(b: &[u8]) -> Result<Vec<TargetStatus>, String> {
    let bad = |what: &str| format!("device-mapper status reply: {what}");
    if b.len() < HEADER_LEN {
        return Err(bad("shorter than its header"));
    }
    let flags = u32_at(b, 28).unwrap();
    if flags & BUFFER_FULL != 0 {
        return Err(bad("did not fit its buffer"));
    }
    let (data_size, data_start) = (u32_at(b, 12).unwrap() as usize, u32_at(b, 16).unwrap() as usize);
    let count = u32_at(b, 20).unwrap() as usize;
    let end = data_size.min(b.len());
    let mut out = Vec::new();
    let mut at = data_start;
    for i in 0..count {
        let spec = b.get(at..at + SPEC_LEN).filter(|_| at + SPEC_LEN <= end).ok_or_else(|| bad("a target spec past its end"))?;
        let next = u32::from_ne_bytes(spec[20..24].try_into().unwrap()) as usize;
        let ty = &spec[24..40];
        let target = String::from_utf8_lossy(&ty[..ty.iter().position(|&c| c == 0).unwrap_or(16)]).into_owned();
        let text = &b[at + SPEC_LEN..end];
        let status = String::from_utf8_lossy(&text[..text.iter().position(|&c| c == 0).ok_or_else(|| bad("a status line without its end"))?]).into_owned();
        out.push(TargetStatus { target, status });
        if i + 1 < count {
            // `next` is the offset of the next spec from the start of the data.
            if next == 0 || data_start + next <= at {
                return Err(bad("target specs out of order"));
            }
            at = data_start + next;
        }
    }
    Ok(out)
}

/// dm-verity's verdict in its status line, as `veritysetup status` words it: `verified` (`V`),
/// `corrupted` (`C`); `None` for anything else.
pub fn verity_verdict(targets: &[TargetStatus]) -> Option<&'static str> {
    let t = targets.iter().find(|t| t.target == "verity")?;
    match t.status.split_whitespace().next()? {
        "V" => Some("verified"),
        "C" => Some("corrupted"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply as the kernel writes it (one target).
    fn reply(target: &str, status: &str, flags: u32) -> Vec<u8> {
        let mut b = status_request("slotforge-hello", REPLY_LEN).unwrap();
        b[20..24].copy_from_slice(&1u32.to_ne_bytes());
        b[28..32].copy_from_slice(&flags.to_ne_bytes());
        let at = HEADER_LEN;
        b[at + 8..at + 16].copy_from_slice(&1024u64.to_ne_bytes());
        b[at + 24..at + 24 + target.len()].copy_from_slice(target.as_bytes());
        b[at + SPEC_LEN..at + SPEC_LEN + status.len()].copy_from_slice(status.as_bytes());
        b
    }

    #[test]
    fn a_request_names_its_device_and_states_the_interface_version() {
        let b = status_request("slotforge-hello", REPLY_LEN).unwrap();
        assert_eq!(b.len(), REPLY_LEN);
        assert_eq!(u32_at(&b, 0), Some(4));
        assert_eq!(u32_at(&b, 12), Some(REPLY_LEN as u32));
        assert_eq!(u32_at(&b, 16), Some(312));
        assert_eq!(&b[48..63], b"slotforge-hello");
        assert_eq!(b[63], 0);
        assert_eq!(DM_TABLE_STATUS, 0xc138_fd0c);
        assert_eq!(DM_DEV_CREATE, 0xc138_fd03);
        assert!(status_request(&"x".repeat(128), REPLY_LEN).is_none());
        assert!(status_request("a/b", REPLY_LEN).is_none());
        assert!(status_request("a", 100).is_none());
    }

    #[test]
    fn a_verity_table_names_the_pinned_parameters_and_is_read_only() {
        let t = VerityTable { data_dev: (7, 3), hash_dev: (7, 3), data_block_size: 4096, hash_block_size: 4096, data_blocks: 256, hash_offset: 1 << 20, root_hash: "ab".repeat(32), salt: "cd".repeat(32) };
        // The tree starts one hash block after the superblock at hash_offset (block 256).
        assert_eq!(t.params(), format!("1 7:3 7:3 4096 4096 256 257 sha256 {} {}", "ab".repeat(32), "cd".repeat(32)));
        assert_eq!(t.sectors(), 2048);
        let b = table_load("slotforge-hello", &t).unwrap();
        assert_eq!(b.len() % 8, 0);
        assert_eq!(u32_at(&b, 28), Some(READONLY));
        assert_eq!(u32_at(&b, 20), Some(1));
        assert_eq!(u32_at(&b, 12), Some(b.len() as u32));
        assert_eq!(&b[HEADER_LEN + 24..HEADER_LEN + 31], b"verity\0");
        let p = &b[HEADER_LEN + SPEC_LEN..];
        assert_eq!(&p[..p.iter().position(|&c| c == 0).unwrap()], t.params().as_bytes());
    }

    #[test]
    fn a_created_devices_number_is_decoded_as_the_kernel_encodes_it() {
        let mut b = request("x", 0, HEADER_LEN).unwrap();
        // major 253, minor 300: (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)
        let dev: u64 = (300 & 0xff) | (253 << 8) | ((300 & !0xff) << 12);
        b[40..48].copy_from_slice(&dev.to_ne_bytes());
        assert_eq!(reply_dev(&b), Some((253, 300)));
    }

    #[test]
    fn the_verdict_is_read_from_the_verity_targets_status_line() {
        assert_eq!(verity_verdict(&parse_status(&reply("verity", "V", 0)).unwrap()), Some("verified"));
        assert_eq!(verity_verdict(&parse_status(&reply("verity", "C 1", 0)).unwrap()), Some("corrupted"));
        assert_eq!(verity_verdict(&parse_status(&reply("linear", "", 0)).unwrap()), None);
        assert!(parse_status(&reply("verity", "V", BUFFER_FULL)).is_err());
        let mut b = reply("verity", "V", 0);
        b[20..24].copy_from_slice(&2u32.to_ne_bytes()); // a second target with no `next`
        assert!(parse_status(&b).is_err());
        assert!(parse_status(&b[..100]).is_err());
        let mut b = reply("verity", "V", 0);
        b[HEADER_LEN + SPEC_LEN..].fill(b'V'); // no end to the status line
        assert!(parse_status(&b).is_err());
    }
}
