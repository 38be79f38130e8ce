//! `fault: network-cut`: a TCP relay between the guest's forward and the registry that drops
//! every open connection once a given number of response bytes has passed through it, and
//! closes every connection after that at once — the network going away half-way through a
//! download, for the rest of the boot.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A running relay on 127.0.0.1; stopped when dropped.
pub struct Cut {
    port: u16,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    /// Response bytes relayed so far (all connections).
    relayed: AtomicU64,
    cut: AtomicBool,
    stop: AtomicBool,
    /// Every connection's two sockets, to cut them all at once.
    open: Mutex<Vec<TcpStream>>,
}

impl State {
    /// End every open connection: what was relayed is let through first (an end of stream),
    /// then each is reset — a reset at once would drop bytes the peer has not read yet.
    fn cut_all(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let open: Vec<TcpStream> = self.open.lock().unwrap().drain(..).collect();
        for s in &open {
            let _ = s.shutdown(Shutdown::Write);
        }
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            for s in &open {
                abort(s);
            }
        });
    }
}

/// Make the socket's close a reset (SO_LINGER 0) and shut it down: the relay's threads end, and
/// when the last of them drops it the peer sees a reset — which `nc` (QEMU's guestfwd command)
/// passes on by exiting, while a plain end of stream it would not pass to the guest at all.
fn abort(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket descriptor and a `linger` of the size given.
    unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&l as *const libc::linger).cast(), std::mem::size_of::<libc::linger>() as libc::socklen_t) };
    let _ = s.shutdown(Shutdown::Both);
}

/// How many of `n` bytes just read may still pass when `relayed` had passed before them and
/// the cut falls at `after` (pure; the relay's whole decision).
pub fn allowed(relayed: u64, n: u64, after: u64) -> u64 {
    after.saturating_sub(relayed).min(n)
}

impl Cut {
    /// Relay 127.0.0.1:(new port) → 127.0.0.1:`upstream`, cutting after `after` response bytes.
    pub fn start(upstream: u16, after: u64) -> std::io::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = c else { continue };
                if st.cut.load(Ordering::SeqCst) {
                    // The network is gone: the connection is reset without an answer.
                    abort(&client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone(), client.try_clone(), server.try_clone()) else { continue };
                st.open.lock().unwrap().extend([c3, s3]);
                // Requests pass as they are.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (c2, s2);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
                // Responses are counted, and the last one allowed is cut short.
                let st = st.clone();
                std::thread::spawn(move || {
                    let (mut from, mut to) = (server, client);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n as u64,
                        };
                        let before = st.relayed.fetch_add(n, Ordering::SeqCst);
                        let pass = allowed(before, n, after);
                        if to.write_all(&buf[..pass as usize]).is_err() {
                            break;
                        }
                        if pass < n {
                            let _ = to.flush();
                            st.cut_all();
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        });
        Ok(Self { port, state })
    }

    /// The port the guest's forward should reach.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the cut happened.
    pub fn was_cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// Response bytes read from the registry (once cut: at least the cut's position).
    pub fn relayed(&self) -> u64 {
        self.state.relayed.load(Ordering::SeqCst)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.cut_all();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cut_falls_at_the_byte_asked_for() {
        assert_eq!(allowed(0, 100, 1000), 100);
        assert_eq!(allowed(950, 100, 1000), 50);
        assert_eq!(allowed(1000, 100, 1000), 0);
        assert_eq!(allowed(5000, 100, 1000), 0);
    }

    /// An upstream on 127.0.0.1 that answers every connection with `bytes` bytes, then closes it
    /// (or, with `hold`, keeps it open a while, as a registry keeps a connection alive).
    fn upstream(bytes: usize, hold: bool) -> u16 {
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = up.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in up.incoming() {
                let Ok(mut c) = c else { continue };
                std::thread::spawn(move || {
                    let _ = c.write_all(&vec![7u8; bytes]);
                    if hold {
                        std::thread::sleep(std::time::Duration::from_secs(30));
                    }
                });
            }
        });
        port
    }

    #[test]
    fn a_relay_passes_bytes_until_the_cut_then_refuses_every_connection() {
        let up_port = upstream(10_000, false);
        let cut = Cut::start(up_port, 15_000).unwrap();
        // Bytes read until the end of the stream or a reset.
        let read_all = || {
            let mut s = TcpStream::connect(("127.0.0.1", cut.port())).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 4096];
            let mut n = 0;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return n,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return n,
                    Err(e) => panic!("after {n} bytes: {e}"),
                }
            }
        };
        assert_eq!(read_all(), 10_000, "the first answer passes whole");
        assert!(!cut.was_cut());
        assert_eq!(read_all(), 5_000, "the second is cut at byte 15 000 of the relay");
        assert!(cut.was_cut());
        assert_eq!(read_all(), 0, "after the cut, nothing gets through");
        assert!(cut.relayed() >= 15_000);
    }

    #[test]
    fn a_cut_reaches_the_guest_through_nc_as_the_end_of_its_connection() {
        // QEMU's guestfwd runs `nc 127.0.0.1 PORT` per guest connection, its stdin and stdout
        // one socket to the guest. A relay's cut must end that socket (nc exits), or the guest
        // waits on a connection that is gone.
        let up_port = upstream(100_000, true);
        let cut = Cut::start(up_port, 40_000).unwrap();
        let (mut guest, nc_side) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd: std::os::fd::OwnedFd = nc_side.into();
        let mut nc = std::process::Command::new("nc").args(["127.0.0.1", &cut.port().to_string()]).stdin(fd.try_clone().unwrap()).stdout(fd).spawn().expect("nc (netcat-openbsd)");
        guest.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let r = guest.read_to_end(&mut got);
        assert!(r.is_ok(), "the guest's side ended ({r:?}) rather than waiting");
        assert_eq!(got.len(), 40_000);
        assert!(nc.wait().is_ok());
    }
}
