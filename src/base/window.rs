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

impl<F: Seek> Seek for Window<F> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(o) => o as i128,
            SeekFrom::End(o) => self.len as i128 + o as i128,
            SeekFrom::Current(o) => self.pos as i128 + o as i128,
        };
        if new < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the partition"));
        }
        self.pos = new as u64;
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
