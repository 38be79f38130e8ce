//! Unified Kernel Images (UAPI Boot Loader Specification, Type #2): systemd's EFI stub
//! (`linuxx64.efi.stub`, Debian's systemd-boot-efi) with the kernel, initrd, command line and an
//! os-release added as PE sections `.linux`, `.initrd`, `.cmdline`, `.osrel` — assembled with
//! `objcopy --add-section` the way ukify does (not in bookworm) — and signed with `sbsign` for
//! Secure Boot. Under Secure Boot the stub ignores any command line the loader passes, so the
//! root hash in `.cmdline` is covered by the signature. The PE reading here is a pure parser over
//! bytes with every offset checked; assembling and signing are the edge (external tools).
//! Format and trust chain: docs/formats.md#uki, docs/boot.md.

use anyhow::{bail, Context};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

/// Where Debian's systemd-boot-efi puts the stub.
pub const DEFAULT_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
/// PE headers we read are within this many bytes of the start (DOS header, PE header, 96
/// section headers): a bound for hostile files.
const MAX_HEADERS: u64 = 64 * 1024;
const PE32_PLUS: u16 = 0x20b;
/// Offsets inside the PE image (from the PE signature): COFF TimeDateStamp and the optional
/// header's CheckSum.
const OFF_TIMESTAMP: usize = 8;
const OFF_CHECKSUM: usize = 24 + 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    /// Virtual address (image base + RVA), what `objcopy --change-section-vma` takes.
    pub vma: u64,
    pub virtual_size: u64,
    pub file_offset: u64,
    pub file_size: u64,
}

#[derive(Debug, Clone)]
pub struct PeInfo {
    pub image_base: u64,
    pub section_alignment: u64,
    /// Offset of the PE signature (`e_lfanew`).
    pub pe_offset: usize,
    pub sections: Vec<Section>,
}

/// Parse the headers of a PE32+ image from its first bytes (at least up to the section table).
pub fn parse_headers(b: &[u8]) -> anyhow::Result<PeInfo> {
    let u16at = |o: usize| -> anyhow::Result<u16> { Ok(u16::from_le_bytes(b.get(o..o + 2).context("PE header truncated")?.try_into().unwrap())) };
    let u32at = |o: usize| -> anyhow::Result<u32> { Ok(u32::from_le_bytes(b.get(o..o + 4).context("PE header truncated")?.try_into().unwrap())) };
    let u64at = |o: usize| -> anyhow::Result<u64> { Ok(u64::from_le_bytes(b.get(o..o + 8).context("PE header truncated")?.try_into().unwrap())) };
    if b.get(0..2) != Some(b"MZ") {
        bail!("not a PE image (no MZ header)");
    }
    let pe = u32at(0x3c)? as usize;
    if b.get(pe..pe + 4) != Some(b"PE\0\0") {
        bail!("not a PE image (no PE signature at {pe})");
    }
    let nsec = u16at(pe + 6)? as usize;
    let opt_size = u16at(pe + 20)? as usize;
    let opt = pe + 24;
    if u16at(opt)? != PE32_PLUS {
        bail!("not a PE32+ image");
    }
    let image_base = u64at(opt + 24)?;
    let section_alignment = u32at(opt + 32)? as u64;
    let table = opt + opt_size;
    let mut sections = Vec::with_capacity(nsec.min(96));
    for i in 0..nsec {
        let s = table + 40 * i;
        let raw = b.get(s..s + 8).context("PE section table truncated")?;
        let name = String::from_utf8_lossy(raw).trim_end_matches('\0').to_string();
        sections.push(Section {
            name,
            virtual_size: u32at(s + 8)? as u64,
            vma: image_base.checked_add(u32at(s + 12)? as u64).context("PE section address overflows")?,
            file_size: u32at(s + 16)? as u64,
            file_offset: u32at(s + 20)? as u64,
        });
    }
    Ok(PeInfo { image_base, section_alignment: section_alignment.max(1), pe_offset: pe, sections })
}

/// The headers of the PE image in `r`.
pub fn read_headers(r: &mut (impl Read + Seek)) -> anyhow::Result<PeInfo> {
    r.seek(SeekFrom::Start(0))?;
    let mut b = Vec::new();
    r.take(MAX_HEADERS).read_to_end(&mut b)?;
    parse_headers(&b)
}

/// The contents of section `name` (its virtual size, at most `limit` bytes), if present.
pub fn read_section(r: &mut (impl Read + Seek), name: &str, limit: u64) -> anyhow::Result<Option<Vec<u8>>> {
    let info = read_headers(r)?;
    let Some(s) = info.sections.iter().find(|s| s.name == name) else { return Ok(None) };
    let len = s.virtual_size.min(s.file_size);
    if len > limit {
        bail!("PE section {name} is {len} bytes, more than the {limit} allowed");
    }
    r.seek(SeekFrom::Start(s.file_offset))?;
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v).with_context(|| format!("reading PE section {name}"))?;
    Ok(Some(v))
}

/// The PE checksum (as the Windows loader and objcopy compute it): 16-bit one's-complement-style
/// sum of the file with the checksum field taken as zero, plus the file length.
pub fn pe_checksum(b: &[u8], checksum_at: usize) -> u32 {
    let mut sum: u64 = 0;
    let mut i = 0;
    while i < b.len() {
        let w = if i + 1 < b.len() { u16::from_le_bytes([b[i], b[i + 1]]) } else { b[i] as u16 } as u64;
        let w = if i >= checksum_at && i < checksum_at + 4 { 0 } else { w };
        sum += w;
        sum = (sum & 0xffff) + (sum >> 16);
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(b.len() as u32)
}

/// What goes into a UKI.
pub struct Parts<'a> {
    pub stub: &'a Path,
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub os_release: &'a str,
}

/// The `.osrel` of a slot's UKI. No `ID`/`IMAGE_ID` on purpose: systemd-boot then orders Type #2
/// entries by file name, which carries the install number chosen on the device (a signed
/// version inside the image could not put a downgrade first). `PRETTY_NAME` makes it listed.
pub fn os_release(version: &str, build_id: &str, slot: &str) -> String {
    format!("PRETTY_NAME=\"{version} (slot {slot})\"\nVERSION=\"{version}\"\nBUILD_ID=\"{build_id}\"\n")
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Assemble a UKI at `out` with objcopy; its PE timestamp is set to `epoch` (and the checksum
/// recomputed) so the same inputs give the same bytes.
pub fn assemble(p: &Parts, out: &Path, epoch: u64, work: &Path) -> anyhow::Result<()> {
    for (what, v) in [("command line", p.cmdline), ("os-release", p.os_release)] {
        if v.chars().any(|c| c.is_control() && c != '\n') {
            bail!("UKI {what} holds a control character");
        }
    }
    let stub = read_headers(&mut std::fs::File::open(p.stub).with_context(|| format!("opening the EFI stub {} (apt-get install systemd-boot-efi)", p.stub.display()))?)?;
    let end = stub.sections.iter().map(|s| s.vma + s.virtual_size).max().context("the stub has no sections")?;
    let osrel = work.join("osrel");
    let cmd = work.join("cmdline");
    std::fs::write(&osrel, p.os_release)?;
    std::fs::write(&cmd, p.cmdline)?;
    let mut files: Vec<(&str, &Path)> = vec![(".osrel", &osrel), (".cmdline", &cmd), (".linux", p.kernel)];
    if let Some(i) = p.initrd {
        files.push((".initrd", i));
    }
    let mut c = Command::new("objcopy");
    let mut at = align(end, stub.section_alignment.max(4096));
    for (name, f) in &files {
        let len = std::fs::metadata(f).with_context(|| format!("{}", f.display()))?.len();
        c.arg("--add-section").arg(format!("{name}={}", f.display()));
        c.arg("--change-section-vma").arg(format!("{name}=0x{at:x}"));
        at = align(at + len.max(1), stub.section_alignment.max(4096));
    }
    let o = c.arg(p.stub).arg(out).output().context("running objcopy (apt-get install binutils)")?;
    if !o.status.success() {
        bail!("objcopy: {}", String::from_utf8_lossy(&o.stderr));
    }
    stamp(out, epoch)
}

/// Set the COFF timestamp to `epoch` and recompute the PE checksum.
fn stamp(path: &Path, epoch: u64) -> anyhow::Result<()> {
    let mut b = std::fs::read(path)?;
    let info = parse_headers(&b)?;
    let ts = info.pe_offset + OFF_TIMESTAMP;
    b[ts..ts + 4].copy_from_slice(&(epoch as u32).to_le_bytes());
    let ck = info.pe_offset + OFF_CHECKSUM;
    let sum = pe_checksum(&b, ck);
    b[ck..ck + 4].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(path, b)?;
    Ok(())
}

/// Sign an EFI binary in place with `sbsign` (Authenticode). With Debian's `faketime` present,
/// the signing time is `epoch`, so the signature — and the disk — is reproducible; without it
/// the signature carries the current time (reported in the build summary).
pub fn sign(path: &Path, key: &Path, cert: &Path, epoch: u64) -> anyhow::Result<bool> {
    let out = path.with_extension("signed");
    let faketime = which("faketime");
    let mut c = if faketime {
        let mut c = Command::new("faketime");
        c.arg("-f").arg(format!("@{}", crate::base::time::civil_time(epoch))).arg("sbsign");
        c
    } else {
        Command::new("sbsign")
    };
    let o = c.arg("--key").arg(key).arg("--cert").arg(cert).arg("--output").arg(&out).arg(path).output().context("running sbsign (apt-get install sbsigntool)")?;
    if !o.status.success() {
        bail!("sbsign {}: {}", path.display(), String::from_utf8_lossy(&o.stderr).trim());
    }
    std::fs::rename(&out, path)?;
    Ok(faketime)
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE32+ header with two sections, built by hand.
    fn tiny_pe() -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[0..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        b[0x86..0x88].copy_from_slice(&2u16.to_le_bytes());
        b[0x94..0x96].copy_from_slice(&240u16.to_le_bytes());
        let opt = 0x98;
        b[opt..opt + 2].copy_from_slice(&PE32_PLUS.to_le_bytes());
        b[opt + 32..opt + 36].copy_from_slice(&0x1000u32.to_le_bytes());
        let t = opt + 240;
        for (i, (n, rva, off, len)) in [(".text", 0x1000u32, 0x200u32, 16u32), (".cmdline", 0x2000, 0x300, 5)].iter().enumerate() {
            let s = t + 40 * i;
            b[s..s + n.len()].copy_from_slice(n.as_bytes());
            b[s + 8..s + 12].copy_from_slice(&len.to_le_bytes());
            b[s + 12..s + 16].copy_from_slice(&rva.to_le_bytes());
            b[s + 16..s + 20].copy_from_slice(&len.to_le_bytes());
            b[s + 20..s + 24].copy_from_slice(&off.to_le_bytes());
        }
        b[0x300..0x305].copy_from_slice(b"quiet");
        b
    }

    #[test]
    fn reads_sections_and_refuses_garbage() {
        let b = tiny_pe();
        let info = parse_headers(&b).unwrap();
        assert_eq!(info.sections.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), [".text", ".cmdline"]);
        let got = read_section(&mut std::io::Cursor::new(b.clone()), ".cmdline", 100).unwrap();
        assert_eq!(got.as_deref(), Some(&b"quiet"[..]));
        assert!(read_section(&mut std::io::Cursor::new(b.clone()), ".cmdline", 2).is_err());
        assert_eq!(read_section(&mut std::io::Cursor::new(b.clone()), ".osrel", 100).unwrap(), None);
        assert!(parse_headers(b"MZ").is_err());
        assert!(parse_headers(&b[..0x100]).is_err());
        let mut bad = b.clone();
        bad[0x3c..0x40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_headers(&bad).is_err());
    }
}
