//! The offline installer's payload: a length-prefixed JSON header (the target layout's text, the
//! target image's size and build id, its data extents each with a sha256), padded to 4 KiB, then
//! the extents' bytes. Written by the build (`build::installer`), read by the device
//! (`device::install`). Guide: docs/guide.md#usb-install.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

pub const PAYLOAD_LABEL: &str = "payload";
pub const FORMAT: u32 = 1;
/// The header is preceded by its length (8 bytes, little-endian) and padded to this.
pub const HEADER_ALIGN: u64 = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PayloadHeader {
    pub format: u32,
    /// The layout file's text: the device re-plans it for the target disk's size.
    pub layout_yaml: String,
    pub layout_name: String,
    pub image_size: u64,
    pub build_id: String,
    /// Data extents of the target image inside its partitions (not the GPT areas).
    pub extents: Vec<Extent>,
}

/// Read the payload header from the payload partition device.
pub fn read_header(dev: &mut File) -> anyhow::Result<(PayloadHeader, u64)> {
    let mut len = [0u8; 8];
    dev.seek(SeekFrom::Start(0))?;
    dev.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n == 0 || n > 64 << 20 {
        bail!("no installer payload here");
    }
    let mut h = vec![0u8; n as usize];
    dev.read_exact(&mut h)?;
    let header: PayloadHeader = serde_json::from_slice(&h).context("installer payload header")?;
    if header.format != FORMAT {
        bail!("installer payload format {} is not supported", header.format);
    }
    Ok((header, (8 + n).div_ceil(HEADER_ALIGN) * HEADER_ALIGN))
}
