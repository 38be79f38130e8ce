//! A bounded view of a file (one partition inside a disk image), and the sparse copy that puts a
//! finished filesystem image into a fresh disk image without allocating its zero blocks.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

/// Bytes `start..start+len` of `inner`, as a file of its own.
pub struct Window<F> {
    inner: F,
    start: u64,
    len: u64,
    pos: u64,
}

impl<F: Seek> Window<F> {
    pub fn new(inner: F, start: u64, len: u64) -> Self {
        Self { inner, start, len, pos: 0 }
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<F: Read + Seek> Read for Window<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<F: Write + Seek> Write for Window<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        if left == 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "write past the end of the partition"));
        }
        let n = (buf.len() as u64).min(left) as usize;
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let put = self.inner.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Where a seek `to` lands in a window of `len` bytes now at `pos` (past the end is allowed, as
/// for a file; before the start is an error).
fn seek_to(pos: u64, len: u64, to: SeekFrom) -> io::Result<u64> {
    let new = match to {
        SeekFrom::Start(o) => o as i128,
        SeekFrom::End(o) => len as i128 + o as i128,
        SeekFrom::Current(o) => pos as i128 + o as i128,
    };
    if new < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the partition"));
    }
    Ok(new as u64)
}

impl<F: Seek> Seek for Window<F> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_to(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

impl ext4_view::Ext4Read for Window<File> {
    fn read(&mut self, start_byte: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.seek(SeekFrom::Start(start_byte))?;
        self.read_exact(dst)?;
        Ok(())
    }
}

/// A [`Window`] onto a file for a FAT driver: positioned reads and writes (no seek per call) and
/// the 4 KiB blocks it reads kept, written through. The FAT driver reads and writes its tables a
/// few bytes at a time — a slot's kernel written into an ESP image cost some 400 000 system
/// calls — so the blocks it reads again are served from here. Writes reach the file at once and
/// in order (a cut leaves what the plain window would), and update the blocks kept. Only for a
/// file nothing else writes in the window while this is open.
pub struct CachedWindow {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
    blocks: std::collections::HashMap<u64, Box<[u8]>>,
}

impl CachedWindow {
    const BLOCK: u64 = 4096;
    /// Reads this large go to the file (file data, read once), not through the blocks.
    const DIRECT: usize = 64 << 10;
    /// The blocks kept (4 MiB: an ESP's tables and directories); past that they are dropped
    /// and read again as needed.
    const MAX_BLOCKS: usize = 1024;

    pub fn new(file: File, start: u64, len: u64) -> Self {
        Self { file, start, len, pos: 0, blocks: Default::default() }
    }

    fn block(&mut self, b: u64) -> io::Result<&[u8]> {
        use std::os::unix::fs::FileExt;
        if !self.blocks.contains_key(&b) {
            if self.blocks.len() >= Self::MAX_BLOCKS {
                self.blocks.clear();
            }
            let n = Self::BLOCK.min(self.len - b * Self::BLOCK) as usize;
            let mut buf = vec![0u8; n].into_boxed_slice();
            self.file.read_exact_at(&mut buf, self.start + b * Self::BLOCK)?;
            self.blocks.insert(b, buf);
        }
        Ok(&self.blocks[&b])
    }
}

impl Read for CachedWindow {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n >= Self::DIRECT {
            // Written through, so the file holds what the blocks would say.
            self.file.read_exact_at(&mut buf[..n], self.start + self.pos)?;
        } else {
            let mut done = 0;
            while done < n {
                let at = self.pos + done as u64;
                let (b, off) = (at / Self::BLOCK, (at % Self::BLOCK) as usize);
                let block = self.block(b)?;
                let k = (block.len() - off).min(n - done);
                buf[done..done + k].copy_from_slice(&block[off..off + k]);
                done += k;
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for CachedWindow {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let left = self.len.saturating_sub(self.pos);
        if left == 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "write past the end of the partition"));
        }
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file.write_all_at(&buf[..n], self.start + self.pos)?;
        // The blocks kept that the write overlaps take its bytes.
        let (first, last) = (self.pos / Self::BLOCK, (self.pos + n as u64 - 1) / Self::BLOCK);
        for b in first..=last {
            if let Some(block) = self.blocks.get_mut(&b) {
                let bs = b * Self::BLOCK;
                let (from, to) = (self.pos.max(bs), (self.pos + n as u64).min(bs + block.len() as u64));
                block[(from - bs) as usize..(to - bs) as usize].copy_from_slice(&buf[(from - self.pos) as usize..(to - self.pos) as usize]);
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for CachedWindow {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_to(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

/// Copy granularity: zero runs shorter than this are written, longer ones stay holes.
const CHUNK: usize = 64 << 10;

/// The data extents of `f` within `[from, to)` as byte ranges `[start, end)`, from
/// `SEEK_DATA`/`SEEK_HOLE`. Fails with `EINVAL` where the file system cannot tell holes.
pub fn data_extents(f: &File, from: u64, to: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        // SAFETY: lseek on an open descriptor we own; errors are checked.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        if data as u64 >= to {
            break;
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { to } else { (hole as u64).min(to) };
        out.push((data as u64, end));
        pos = end;
    }
    Ok(out)
}

/// sha256 (hex) of `len` bytes of `f` from `start`.
pub fn sha256_range(f: &mut File, start: u64, len: u64) -> io::Result<String> {
    f.seek(SeekFrom::Start(start))?;
    let (d, n) = crate::base::hash::digest_reader(Read::by_ref(f).take(len))?;
    if n != len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{n} of {len} bytes at {start}")));
    }
    Ok(d.hex().to_string())
}

/// Copy a whole file into `dst` at `offset`, visiting only its data extents, and within them
/// skipping all-zero chunks. A 4 GiB ext4 image made by mke2fs is mostly holes; this reads only
/// what it holds. Returns (source length, bytes written).
pub fn copy_file_sparse(src: &mut File, dst: &mut File, offset: u64) -> io::Result<(u64, u64)> {
    let len = src.metadata()?.len();
    let extents = match data_extents(src, 0, len) {
        Ok(e) => e,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => vec![(0, len)], // cannot tell: copy all
        Err(e) => return Err(e),
    };
    let mut written = 0u64;
    for (start, end) in extents {
        src.seek(SeekFrom::Start(start))?;
        let (_, w) = copy_sparse(&mut Read::by_ref(src).take(end - start), dst, offset + start)?;
        written += w;
    }
    Ok((len, written))
}

/// Copy all of `src` into `dst` at `offset`, skipping all-zero chunks so they stay holes in a
/// freshly created (all-hole) destination. Returns (bytes copied, bytes actually written).
pub fn copy_sparse(src: &mut impl Read, dst: &mut File, offset: u64) -> io::Result<(u64, u64)> {
    let mut buf = vec![0u8; CHUNK];
    let (mut total, mut written) = (0u64, 0u64);
    loop {
        let mut filled = 0;
        while filled < CHUNK {
            let n = src.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().any(|b| *b != 0) {
            dst.seek(SeekFrom::Start(offset + total))?;
            dst.write_all(&buf[..filled])?;
            written += filled as u64;
        }
        total += filled as u64;
        if filled < CHUNK {
            break;
        }
    }
    Ok((total, written))
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_cached_window_reads_and_writes_as_the_plain_one_does() {
        // The same sequence of small and large reads and writes, at odd offsets, through both.
        let mk = || {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&(0..300_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>()).unwrap();
            f
        };
        let (a, b) = (mk(), mk());
        let mut plain = Window::new(a.try_clone().unwrap(), 1000, 250_000);
        let mut cached = CachedWindow::new(b.try_clone().unwrap(), 1000, 250_000);
        let mut x = 12345u64;
        for step in 0..2000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = (x >> 33) % 250_000;
            let len = if step % 50 == 0 { 70_000 } else { ((x >> 20) % 9000) as usize };
            plain.seek(SeekFrom::Start(at)).unwrap();
            cached.seek(SeekFrom::Start(at)).unwrap();
            if x % 3 == 0 {
                let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ x) as u8).collect();
                assert_eq!(plain.write(&data).unwrap(), cached.write(&data).unwrap());
            } else {
                let (mut p, mut c) = (vec![0u8; len], vec![0u8; len]);
                let np = { let mut got = 0; while got < len { let k = plain.read(&mut p[got..]).unwrap(); if k == 0 { break } got += k; } got };
                let nc = cached.read(&mut c).unwrap();
                assert_eq!((np, &p[..np]), (nc, &c[..nc]), "read of {len} at {at}");
            }
        }
        let (mut fa, mut fb) = (Vec::new(), Vec::new());
        (&a).seek(SeekFrom::Start(0)).unwrap();
        (&b).seek(SeekFrom::Start(0)).unwrap();
        (&a).read_to_end(&mut fa).unwrap();
        (&b).read_to_end(&mut fb).unwrap();
        assert!(fa == fb, "the files differ");
        cached.seek(SeekFrom::Start(0)).unwrap();
        assert_eq!(cached.write(b"x").unwrap(), 1);
        cached.seek(SeekFrom::Start(250_000)).unwrap();
        assert!(cached.write(b"x").is_err());
    }
    use super::*;

    #[test]
    fn window_bounds_reads_and_writes() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 100]).unwrap();
        let mut w = Window::new(f.try_clone().unwrap(), 10, 20);
        w.write_all(&[1u8; 20]).unwrap();
        assert!(w.write(&[1]).is_err());
        w.seek(SeekFrom::Start(0)).unwrap();
        let mut all = Vec::new();
        w.read_to_end(&mut all).unwrap();
        assert_eq!(all, vec![1u8; 20]);
        let mut whole = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut whole).unwrap();
        assert_eq!(&whole[..10], &[7u8; 10]);
        assert_eq!(&whole[30..], &[7u8; 70]);
    }

    #[test]
    fn sparse_copy_leaves_holes() {
        use std::os::unix::fs::MetadataExt;
        let mut src = vec![0u8; 4 << 20];
        src[5] = 1;
        src[(3 << 20) + 7] = 2;
        let mut dst = tempfile::tempfile().unwrap();
        dst.set_len(8 << 20).unwrap();
        let (total, written) = copy_sparse(&mut &src[..], &mut dst, 1 << 20).unwrap();
        assert_eq!(total, 4 << 20);
        assert_eq!(written, 2 * CHUNK as u64);
        assert!(dst.metadata().unwrap().blocks() * 512 <= 4 * CHUNK as u64, "zero chunks were allocated");
        let mut back = vec![0u8; 4 << 20];
        dst.seek(SeekFrom::Start(1 << 20)).unwrap();
        dst.read_exact(&mut back).unwrap();
        assert_eq!(back, src);
    }

    #[test]
    fn file_copy_visits_only_data_extents() {
        let mut src = tempfile::tempfile().unwrap();
        src.set_len(64 << 20).unwrap();
        src.seek(SeekFrom::Start(10 << 20)).unwrap();
        src.write_all(b"data in the middle").unwrap();
        src.seek(SeekFrom::Start((64 << 20) - 3)).unwrap();
        src.write_all(b"end").unwrap();
        let mut dst = tempfile::tempfile().unwrap();
        dst.set_len(80 << 20).unwrap();
        let (len, written) = copy_file_sparse(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(len, 64 << 20);
        assert!(written <= 2 * CHUNK as u64, "{written}");
        let mut b = [0u8; 18];
        dst.seek(SeekFrom::Start(11 << 20)).unwrap();
        dst.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"data in the middle");
        dst.seek(SeekFrom::Start((65 << 20) - 3)).unwrap();
        dst.read_exact(&mut b[..3]).unwrap();
        assert_eq!(&b[..3], b"end");
    }
}
