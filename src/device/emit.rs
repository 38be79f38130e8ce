//! The device's side of the event protocol: each event one line on the console
//! (`format::agent::events` defines them; docs/agent.md#events).

use crate::format::agent::events::{line_at, Event};
use std::io::Write;

/// Seconds since the device booted (CLOCK_BOOTTIME).
pub fn uptime() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Print one event line on stdout (the console): `@slotforge {"event": NAME, ..., "uptime": S}`.
pub fn emit(e: Event) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line_at(&e, uptime()).as_bytes());
    let _ = out.flush();
}
