//! The device's side of the event protocol: each event one line on the console.

use std::io::Write;

/// Print one event line on stdout (the console): `@slotforge {"event": NAME, ...}`.
pub fn emit(event: &str, fields: serde_json::Value) {
    let mut m = serde_json::Map::new();
    m.insert("event".into(), event.into());
    if let serde_json::Value::Object(f) = fields {
        m.extend(f);
    }
    let line = format!("@slotforge {}\n", serde_json::Value::Object(m));
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}
