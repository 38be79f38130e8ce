//! A real registry for tests: Debian's docker-registry (distribution 2.8) on 127.0.0.1 with a
//! config of our own, storage in a temp dir, optional htpasswd Basic auth; images pushed with
//! skopeo. A TCP proxy that cuts connections mid-response, for interrupted downloads, and a
//! Bearer-token gate in front of the registry.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct TestRegistry {
    pub port: u16,
    pub storage: PathBuf,
    pub creds: Option<(String, String)>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl TestRegistry {
    pub fn start(creds: Option<(&str, &str)>) -> Self {
        let dir = tempfile::Builder::new().prefix("slotforge-registry-").tempdir().unwrap();
        let storage = dir.path().join("storage");
        let port = free_port();
        let mut auth = String::new();
        if let Some((u, p)) = creds {
            let out = Command::new("htpasswd").args(["-Bbn", u, p]).output().expect("htpasswd (apache2-utils) is needed");
            assert!(out.status.success());
            std::fs::write(dir.path().join("htpasswd"), out.stdout).unwrap();
            auth = format!("auth:\n  htpasswd:\n    realm: slotforge-test\n    path: {}\n", dir.path().join("htpasswd").display());
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            storage.display()
        );
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is needed (apt-get install docker-registry)");
        let r = TestRegistry { port, storage, creds: creds.map(|(u, p)| (u.into(), p.into())), child: Some(child), _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not start on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Push an OCI layout's image with skopeo.
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str) {
        self.push_with(layout, tag, repo_tag, &[]);
    }

    /// Push with extra skopeo flags (`--format v2s2`, `--all`).
    pub fn push_with(&self, layout: &Path, tag: &str, repo_tag: &str, flags: &[&str]) {
        let src = format!("oci:{}:{tag}", layout.display());
        let dst = format!("docker://{}/{repo_tag}", self.host());
        let mut args = vec!["copy".to_string(), "-q".into(), "--dest-tls-verify=false".into()];
        args.extend(flags.iter().map(|f| f.to_string()));
        if let Some((u, p)) = &self.creds {
            args.push(format!("--dest-creds={u}:{p}"));
        }
        args.push(src);
        args.push(dst);
        let o = Command::new("skopeo").args(&args).output().unwrap();
        assert!(o.status.success(), "skopeo copy failed: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// The manifest digest skopeo sees for `repo:tag`.
    pub fn digest(&self, repo_tag: &str) -> String {
        let mut args = vec!["inspect".to_string(), "--tls-verify=false".into(), "--raw".into()];
        if let Some((u, p)) = &self.creds {
            args.push(format!("--creds={u}:{p}"));
        }
        args.push(format!("docker://{}/{repo_tag}", self.host()));
        let o = Command::new("skopeo").args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        use sha2::Digest as _;
        let h = sha2::Sha256::digest(&o.stdout);
        format!("sha256:{}", h.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }

    /// The file holding a blob in the registry's storage.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Forwards 127.0.0.1:port to `upstream`; the first `cut` connections are closed after
/// `budget` bytes of response, the rest pass through.
pub struct CuttingProxy {
    pub port: u16,
    pub connections: Arc<AtomicUsize>,
}

impl CuttingProxy {
    pub fn start(upstream: u16, cut: usize, budget: usize) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { break };
                let n = count.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let limit = if n < cut { budget } else { usize::MAX };
                let (mut c_r, mut u_w) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_r, &mut u_w);
                });
                let (mut u_r, mut c_w) = (up, client);
                std::thread::spawn(move || {
                    let mut sent = 0usize;
                    let mut buf = [0u8; 8192];
                    loop {
                        let Ok(k) = u_r.read(&mut buf) else { break };
                        if k == 0 {
                            break;
                        }
                        let k = k.min(limit - sent);
                        if c_w.write_all(&buf[..k]).is_err() {
                            break;
                        }
                        sent += k;
                        if sent >= limit {
                            break;
                        }
                    }
                    let _ = c_w.shutdown(std::net::Shutdown::Both);
                    let _ = u_r.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy { port, connections }
    }
}

/// A Bearer-token front for a real registry, as Docker Hub and most hosted registries work:
/// requests without `Authorization: Bearer <token>` get a 401 challenge naming a token realm
/// served here; the realm hands out the token only to Basic credentials `user:pass`; authorised
/// requests are forwarded to the registry behind. Every response closes its connection.
pub struct BearerGate {
    pub port: u16,
    pub token_requests: Arc<AtomicUsize>,
}

fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        head.push(b[0]);
        if head.len() > 65536 {
            return None;
        }
    }
    String::from_utf8(head).ok()
}

impl BearerGate {
    pub fn start(upstream: u16, user: &str, pass: &str) -> Self {
        use base64::Engine;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")));
        let token_requests = Arc::new(AtomicUsize::new(0));
        let tr = token_requests.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { break };
                let basic = basic.clone();
                let tr = tr.clone();
                std::thread::spawn(move || {
                    let Some(head) = read_head(&mut c) else { return };
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let auth = head.lines().find_map(|l| l.strip_prefix("Authorization: ").or_else(|| l.strip_prefix("authorization: "))).map(str::to_string);
                    let reply = |c: &mut TcpStream, status: &str, extra: &str, body: &str| {
                        let _ = write!(c, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/json\r\nConnection: close\r\n{extra}\r\n{body}", body.len());
                    };
                    if path.starts_with("/token") {
                        tr.fetch_add(1, Ordering::SeqCst);
                        if auth.as_deref() == Some(basic.as_str()) && path.contains("scope=repository%3A") {
                            reply(&mut c, "200 OK", "", r#"{"token":"tok-123"}"#);
                        } else {
                            reply(&mut c, "401 Unauthorized", "", r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
                        }
                        return;
                    }
                    if auth.as_deref() != Some("Bearer tok-123") {
                        let ch = format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"gate\"\r\n");
                        reply(&mut c, "401 Unauthorized", &ch, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
                        return;
                    }
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
                    let fixed: String = head
                        .lines()
                        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:") && !l.to_ascii_lowercase().starts_with("authorization:") && !l.is_empty())
                        .map(|l| format!("{l}\r\n"))
                        .collect();
                    let _ = write!(up, "{fixed}Connection: close\r\n\r\n");
                    let _ = std::io::copy(&mut up, &mut c);
                });
            }
        });
        BearerGate { port, token_requests }
    }
}

/// Forwards 127.0.0.1:port to `upstream` one request per connection (bodiless requests: a
/// pull), recording each request line (`GET /v2/…`), so a test can count what a client asked.
pub struct RequestLog {
    pub port: u16,
    pub lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RequestLog {
    pub fn start(upstream: u16) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = lines.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { break };
                let log = log.clone();
                std::thread::spawn(move || {
                    let Some(head) = read_head(&mut c) else { return };
                    log.lock().unwrap().push(head.lines().next().unwrap_or("").to_string());
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
                    let fixed: String = head.lines().filter(|l| !l.to_ascii_lowercase().starts_with("connection:") && !l.is_empty()).map(|l| format!("{l}\r\n")).collect();
                    let _ = write!(up, "{fixed}Connection: close\r\n\r\n");
                    let _ = std::io::copy(&mut up, &mut c);
                });
            }
        });
        RequestLog { port, lines }
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lines.lock().unwrap())
    }
}
