//! Loading the YAML inputs (manifest, layouts) with errors that point at file, line and column.
//! serde-saphyr reports positions and rejects duplicate keys; `Spanned` fields keep positions
//! for the semantic checks that run after parsing.

use serde::de::DeserializeOwned;
use serde_saphyr::{Location, Spanned};
use std::fmt;
use std::path::{Path, PathBuf};

/// An input error at a place in a file: printed as `file:line:column: message`.
#[derive(Debug, Clone)]
pub struct InputError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
    }
}
impl std::error::Error for InputError {}

impl InputError {
    pub fn at(file: &Path, loc: &Location, message: impl Into<String>) -> Self {
        Self { file: file.to_path_buf(), line: loc.line(), column: loc.column(), message: message.into() }
    }
    /// An error about a spanned value, located where that value was written.
    pub fn spanned<T>(file: &Path, v: &Spanned<T>, message: impl Into<String>) -> Self {
        Self::at(file, &v.referenced, message)
    }
}

/// Parse `text` (read from `file`) into `T`; any syntax or type error becomes an [`InputError`].
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, InputError> {
    serde_saphyr::from_str::<T>(text).map_err(|e| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
        // The crate's Display carries a snippet; the first line is the message itself.
        let full = e.to_string();
        let message = first_message_line(&full);
        InputError { file: file.to_path_buf(), line, column, message }
    })
}

fn first_message_line(full: &str) -> String {
    let mut line = full.lines().find(|l| !l.trim().is_empty()).unwrap_or(full).trim();
    // Drop a leading "error: line X column Y: " the crate may add: we print our own position.
    if let Some(rest) = line.strip_prefix("error: line ") {
        if let Some((_, msg)) = rest.split_once(": ") {
            line = msg;
        }
    }
    // Drop a trailing " at line X, column Y" the crate may add: we print our own position.
    match line.find(" at line ") {
        Some(i) => line[..i].to_string(),
        None => line.to_string(),
    }
}

/// Read and parse a YAML file.
pub fn load<T: DeserializeOwned>(file: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    Ok(parse(file, &text)?)
}

/// Parse a size such as `512MiB`, `4GiB`, `300MB`, `1048576` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("size {s:?} does not start with a whole number"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        "TB" => 1000 * 1000 * 1000 * 1000,
        other => return Err(format!("size {s:?} has an unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("290MB").unwrap(), 290_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("MiB").is_err());
    }
}
