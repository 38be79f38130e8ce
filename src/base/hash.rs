//! sha256 digests as OCI writes them (`sha256:<hex>`), and a reader that checks a blob's
//! size and digest while it streams, so no blob is used unverified and none is held in memory.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::io::{self, Read};

/// A `sha256:<64 hex>` content digest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("digest {s:?} is not sha256:<hex> (only sha256 is supported)"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!("digest {s:?} does not have 64 lowercase hex digits"));
        }
        Ok(Self(s.to_string()))
    }
    pub fn of_bytes(data: &[u8]) -> Self {
        Self(format!("sha256:{}", hex(&Sha256::digest(data))))
    }
    pub fn from_hasher(h: Sha256) -> Self {
        Self(format!("sha256:{}", hex(&h.finalize())))
    }
    /// The 64 hex digits, as used in `blobs/sha256/<hex>`.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}
impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}
impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The bytes of a hex string (either case); `None` if it is not whole bytes of hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Lowercase hex of bytes (sha2 0.11's output has no `{:x}`).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Streams `inner`, failing with `InvalidData` as soon as more than `size` bytes arrive, and at
/// EOF unless exactly `size` bytes with digest `expected` were read. A consumer that stops early
/// must call [`VerifyingReader::finish`] to drain and check the rest.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    size: u64,
    expected: Digest,
    what: String,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, expected: Digest, size: u64, what: impl Into<String>) -> Self {
        Self { inner, hasher: Sha256::new(), read: 0, size, expected, what: what.into() }
    }
    /// Read whatever is left and check size and digest.
    pub fn finish(mut self) -> io::Result<()> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(())
    }
    fn check_end(&self) -> io::Result<()> {
        if self.read != self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: truncated blob {}: {} of {} bytes", self.what, self.expected, self.read, self.size),
            ));
        }
        let got = Digest::from_hasher(self.hasher.clone());
        if got != self.expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: corrupt blob: expected {}, content hashes to {}", self.what, self.expected, got),
            ));
        }
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.check_end()?;
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if self.read > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: blob {} is longer than its descriptor's {} bytes", self.what, self.expected, self.size),
            ));
        }
        Ok(n)
    }
}

/// sha256 of everything `r` yields, and its length.
pub fn digest_reader(mut r: impl Read) -> io::Result<(Digest, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((Digest::from_hasher(h), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhex_takes_back_hex_and_only_hex() {
        assert_eq!(unhex(&hex(&[0, 1, 0xab, 0xff])), Some(vec![0, 1, 0xab, 0xff]));
        assert_eq!(unhex("ABcd"), Some(vec![0xab, 0xcd]));
        for bad in ["abc", "+f", "zz", "0g"] {
            assert_eq!(unhex(bad), None, "{bad}");
        }
    }

    #[test]
    fn verifying_reader_accepts_exact_and_rejects_tampered() {
        let data = b"hello world".to_vec();
        let d = Digest::of_bytes(&data);
        let mut out = Vec::new();
        VerifyingReader::new(&data[..], d.clone(), 11, "t").read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        let err = VerifyingReader::new(&b"hello worle"[..], d.clone(), 11, "t").finish().unwrap_err();
        assert!(err.to_string().contains("corrupt blob"), "{err}");
        let err = VerifyingReader::new(&b"hello"[..], d.clone(), 11, "t").finish().unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let err = VerifyingReader::new(&b"hello world!"[..], d, 11, "t").finish().unwrap_err();
        assert!(err.to_string().contains("longer"), "{err}");
    }

    #[test]
    fn digest_parse_rejects_bad_forms() {
        assert!(Digest::parse("sha512:00").is_err());
        assert!(Digest::parse("sha256:ABC").is_err());
        let d = Digest::of_bytes(b"");
        assert_eq!(d.hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
