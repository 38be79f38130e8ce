//! The Network Block Device protocol's transmission phase (the kernel's NBD client talks it over
//! a socket the agent hands it with `NBD_SET_SOCK`; no handshake then): the 28-byte request, the
//! 16-byte simple reply, and the ioctl numbers of `<linux/nbd.h>`. Pure; the agent's lazy image
//! server (device::agent::lazy) does the I/O. Reference: the NBD protocol document
//! (github.com/NetworkBlockDevice/nbd, doc/proto.md), "Transmission phase".

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REPLY_MAGIC: u32 = 0x6744_6698;
pub const REQUEST_LEN: usize = 28;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

/// Transmission flags: the export has flags, and is read-only.
pub const FLAG_HAS_FLAGS: u64 = 1;
pub const FLAG_READ_ONLY: u64 = 1 << 1;

/// errno values a reply carries.
pub const EIO: u32 = 5;
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;

/// `_IO(0xab, n)`: the ioctls of `/dev/nbdN`.
const fn io(n: u64) -> u64 {
    (0xab << 8) | n
}
pub const NBD_SET_SOCK: u64 = io(0);
pub const NBD_SET_BLKSIZE: u64 = io(1);
pub const NBD_SET_SIZE: u64 = io(2);
pub const NBD_DO_IT: u64 = io(3);
pub const NBD_CLEAR_SOCK: u64 = io(4);
pub const NBD_DISCONNECT: u64 = io(8);
pub const NBD_SET_TIMEOUT: u64 = io(9);
pub const NBD_SET_FLAGS: u64 = io(10);

/// A request from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: [u8; 8],
    pub offset: u64,
    pub length: u32,
}

/// Parse a request; `Err` names what is wrong (the connection is then dropped).
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, String> {
    let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Err(format!("NBD request magic {magic:#x}"));
    }
    Ok(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
        command: u16::from_be_bytes(b[6..8].try_into().unwrap()),
        handle: b[8..16].try_into().unwrap(),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    })
}

/// A simple reply's header (a read's data follows it when `error` is 0).
pub fn reply(handle: [u8; 8], error: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..4].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..16].copy_from_slice(&handle);
    r
}

/// The blocks of `block` bytes a read of `length` bytes at `offset` touches, within `size`;
/// `None` if it reaches past the end.
pub fn blocks(offset: u64, length: u64, block: u64, size: u64) -> Option<std::ops::Range<u64>> {
    let end = offset.checked_add(length)?;
    if end > size || block == 0 {
        return None;
    }
    if length == 0 {
        return Some(0..0);
    }
    Some(offset / block..end.div_ceil(block))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_replies_encode_as_the_protocol_says() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
        b[8..16].copy_from_slice(b"handle01");
        b[16..24].copy_from_slice(&8192u64.to_be_bytes());
        b[24..28].copy_from_slice(&4096u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!(r, Request { flags: 0, command: CMD_READ, handle: *b"handle01", offset: 8192, length: 4096 });
        b[0] = 0;
        assert!(parse_request(&b).is_err());
        let h = reply(*b"handle01", EIO);
        assert_eq!(&h[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 5);
        assert_eq!(&h[8..], b"handle01");
        assert_eq!(NBD_SET_SOCK, 0xab00);
        assert_eq!(NBD_SET_FLAGS, 0xab0a);
    }

    #[test]
    fn a_read_touches_the_blocks_it_overlaps_and_never_past_the_end() {
        assert_eq!(blocks(0, 4096, 65536, 1 << 20), Some(0..1));
        assert_eq!(blocks(65536 - 4096, 8192, 65536, 1 << 20), Some(0..2));
        assert_eq!(blocks((1 << 20) - 4096, 4096, 65536, 1 << 20), Some(15..16));
        assert_eq!(blocks((1 << 20) - 4096, 8192, 65536, 1 << 20), None);
        assert_eq!(blocks(u64::MAX, 2, 65536, 1 << 20), None);
    }
}
