//! Faults injected into a disk image between boots: one flipped byte (in a rootfs slot, where
//! dm-verity must catch it, or in an external image's blob, where the agent must).

use anyhow::Context;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

/// Byte offset and size of the GPT partition `name`.
pub fn partition(disk: &Path, name: &str) -> anyhow::Result<(u64, u64)> {
    let mut f = std::fs::File::open(disk)?;
    let g = crate::format::disk::read_gpt(&mut f)?;
    let p = g.partitions.iter().find(|p| p.name == name).with_context(|| format!("no partition {name}"))?;
    Ok((p.start, p.size))
}

/// XOR one byte of `disk` at `at` with 0x5a.
pub fn flip_byte(disk: &Path, at: u64) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(disk)?;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut b)?;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&[b[0] ^ 0x5a])?;
    Ok(())
}

/// Flip one byte inside the largest blob of the images partition (located with debugfs on a
/// copy of the partition in `scratch`).
pub fn corrupt_largest_blob(disk: &Path, scratch: &Path) -> anyhow::Result<()> {
    let (start, size) = partition(disk, "images")?;
    let part = scratch.join("images.ext4");
    {
        let mut f = std::fs::File::open(disk)?;
        f.seek(SeekFrom::Start(start))?;
        std::io::copy(&mut f.take(size), &mut std::fs::File::create(&part)?)?;
    }
    let ls = Command::new("debugfs").args(["-R", "ls -p /blobs/sha256"]).arg(&part).output().context("debugfs (e2fsprogs)")?;
    let (name, _) = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('/').collect();
            (f.len() > 6 && f[5].len() == 64).then(|| (f[5].to_string(), f[6].parse::<u64>().unwrap_or(0)))
        })
        .max_by_key(|x| x.1)
        .context("no blobs in the images partition")?;
    let bmap = Command::new("debugfs").args(["-R", &format!("bmap /blobs/sha256/{name} 10")]).arg(&part).output()?;
    let block: u64 = String::from_utf8_lossy(&bmap.stdout).trim().parse().context("debugfs bmap")?;
    let _ = std::fs::remove_file(&part);
    flip_byte(disk, start + block * 4096 + 17)
}
