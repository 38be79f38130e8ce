//! The guest's JSON event lines: `@slotforge {...}` on the serial console, among firmware
//! output (ANSI escapes, `\r`) and kernel messages. Parsed as JSON, never grepped as prose.

use serde_json::Value;

pub const MARKER: &str = "@slotforge ";

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// Every event in `serial`, in order. Lines a kernel message broke are skipped.
pub fn parse(serial: &str) -> Vec<Value> {
    let clean = strip_ansi(serial);
    clean
        .lines()
        .filter_map(|l| l.find(MARKER).map(|i| &l[i + MARKER.len()..]))
        .filter_map(|j| serde_json::from_str::<Value>(j.trim()).ok())
        .filter(|v| v.get("event").is_some())
        .collect()
}

/// Events named `name`.
pub fn named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_among_firmware_noise() {
        let s = "\u{1b}[2J\u{1b}[01;01HBdsDxe: loading\r\n[    2.1] EXT4-fs mounted\r\n@slotforge {\"event\":\"a\",\"x\":1}\r\nnoise @slotforge {\"event\":\"b\"}\r\n@slotforge {\"event\":\"broken\"[  3.0] oops\r\n";
        let e = parse(s);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0]["x"], 1);
        assert_eq!(named(&e, "b").len(), 1);
    }
}
