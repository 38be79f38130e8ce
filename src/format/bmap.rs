//! Factory-flashing side files: a bmaptool map (format 2.0: the image's mapped block ranges, each
//! with its sha256) derived from what was actually written — the data extents of the sparse
//! image — so `bmaptool copy` writes only content and checks it; and a qcow2 copy for VMs.

use crate::base::hash::hex;
use anyhow::{bail, Context};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::path::Path;

/// bmaptool's block size.
pub const BLOCK: u64 = 4096;
const CHECKSUM_PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Serialize)]
pub struct BmapSummary {
    pub image_size: u64,
    pub blocks: u64,
    pub mapped_blocks: u64,
    pub mapped_bytes: u64,
    pub ranges: usize,
}

/// Render a bmap 2.0 document for `ranges` (inclusive block ranges with their sha256 hex).
pub fn render(image_size: u64, ranges: &[(u64, u64, String)]) -> String {
    let blocks = image_size.div_ceil(BLOCK);
    let mapped: u64 = ranges.iter().map(|(a, b, _)| b - a + 1).sum();
    let mut s = String::new();
    s += "<?xml version=\"1.0\" ?>\n<!-- Written by slotforge. Flash with: bmaptool copy IMAGE DEVICE -->\n<bmap version=\"2.0\">\n";
    s += &format!("    <ImageSize> {image_size} </ImageSize>\n    <BlockSize> {BLOCK} </BlockSize>\n    <BlocksCount> {blocks} </BlocksCount>\n");
    s += &format!("    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n    <ChecksumType> sha256 </ChecksumType>\n");
    s += &format!("    <BmapFileChecksum> {CHECKSUM_PLACEHOLDER} </BmapFileChecksum>\n    <BlockMap>\n");
    for (a, b, sum) in ranges {
        let r = if a == b { a.to_string() } else { format!("{a}-{b}") };
        s += &format!("        <Range chksum=\"{sum}\"> {r} </Range>\n");
    }
    s += "    </BlockMap>\n</bmap>\n";
    // The file checksum is over the file with the checksum field zeroed, then filled in.
    let sum = hex(&Sha256::digest(s.as_bytes()));
    s.replacen(CHECKSUM_PLACEHOLDER, &sum, 1)
}

/// The data extents of `f` as inclusive, merged block ranges.
fn block_ranges(f: &File, len: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in crate::base::window::data_extents(f, 0, len).context("SEEK_DATA")? {
        let (a, b) = (start / BLOCK, end.div_ceil(BLOCK) - 1);
        match out.last_mut() {
            Some(last) if last.1 + 1 >= a => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    Ok(out)
}

/// Write `<image>.bmap` beside a finished image.
pub fn write_bmap(image: &Path, out: &Path) -> anyhow::Result<BmapSummary> {
    let mut f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let len = f.metadata()?.len();
    let mut ranges = Vec::new();
    for (a, b) in block_ranges(&f, len)? {
        let start = a * BLOCK;
        let end = ((b + 1) * BLOCK).min(len);
        ranges.push((a, b, crate::base::window::sha256_range(&mut f, start, end - start)?));
    }
    let doc = render(len, &ranges);
    std::fs::write(out, doc)?;
    let mapped: u64 = ranges.iter().map(|(a, b, _)| b - a + 1).sum();
    Ok(BmapSummary { image_size: len, blocks: len.div_ceil(BLOCK), mapped_blocks: mapped, mapped_bytes: mapped * BLOCK, ranges: ranges.len() })
}

/// `qemu-img convert -O qcow2`; a clear error if qemu-img is not installed.
pub fn write_qcow2(image: &Path, out: &Path) -> anyhow::Result<()> {
    let o = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(image)
        .arg(out)
        .output()
        .map_err(|e| anyhow::anyhow!("--qcow2 needs qemu-img (apt-get install qemu-utils): {e}"))?;
    if !o.status.success() {
        bail!("qemu-img convert: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bmap_checksum_covers_the_file_with_the_field_zeroed() {
        let doc = render(8192 * 3, &[(0, 1, "ab".repeat(32)), (2, 2, "cd".repeat(32))]);
        assert!(doc.contains("<Range chksum=\"") && doc.contains("> 0-1 </Range>") && doc.contains("> 2 </Range>"));
        assert!(doc.contains("<MappedBlocksCount> 3 </MappedBlocksCount>"));
        let sum = doc.split("<BmapFileChecksum> ").nth(1).unwrap().split(' ').next().unwrap().to_string();
        let zeroed = doc.replacen(&sum, CHECKSUM_PLACEHOLDER, 1);
        assert_eq!(hex(&Sha256::digest(zeroed.as_bytes())), sum);
    }
}
