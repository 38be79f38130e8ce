//! Small output helpers shared by every wing: stable pretty JSON and human-readable sizes.

use serde::Serialize;

/// Pretty JSON with a trailing newline; struct field order is fixed, so output is stable.
pub fn to_json(v: &impl Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("serialisable");
    out.push(b'\n');
    out
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}
