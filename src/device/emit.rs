//! The device's side of the event protocol: each event one line on the console
//! (`format::agent::events` defines them; docs/agent.md#events).

use crate::format::agent::events::{line, Event};
use std::io::Write;

/// Print one event line on stdout (the console): `@slotforge {"event": NAME, ...}`.
pub fn emit(e: Event) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line(&e).as_bytes());
    let _ = out.flush();
}
