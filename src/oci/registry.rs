//! A registry client for the OCI distribution API, over ureq (blocking, streaming): manifests by
//! tag or digest, blobs streamed straight into the verified cache. Auth as the container tools do
//! it: anonymous first, then the server's challenge — Basic with the auth-file credentials, or a
//! Bearer token from the realm it names. Plain http only for loopback hosts or hosts listed as
//! insecure. 5xx, 429 and dropped connections are retried with backoff.

use super::auth::{self, Challenge, Credentials};
use super::image::{MT_OCI_INDEX, MT_OCI_MANIFEST};
use super::BlobSource;
use crate::base::cache::Cache;
use crate::base::hash::Digest;
use anyhow::{anyhow, bail};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use ureq::http::StatusCode;

const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// Attempts for one request (first try + retries).
const ATTEMPTS: u32 = 4;
const BACKOFF: Duration = Duration::from_millis(250);

pub struct Registry {
    /// The host as written in references (`127.0.0.1:5000`, `docker.io`).
    pub host: String,
    base: String,
    agent: ureq::Agent,
    creds: Option<Credentials>,
    /// The Authorization header that worked last (Basic or Bearer), reused for later requests.
    auth: Mutex<Option<String>>,
    requests: std::sync::atomic::AtomicUsize,
}

fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map(|(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host }).unwrap_or(host);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h == "::1" || h.starts_with("127.")
}

/// A request body: bytes at hand, or a file streamed.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Bytes(&'a [u8]),
    File(&'a std::path::Path, u64),
}

impl Registry {
    pub fn new(host: &str, insecure: &[String]) -> anyhow::Result<Self> {
        let api_host = if host == "docker.io" { "registry-1.docker.io" } else { host };
        let scheme = if is_loopback(host) || insecure.iter().any(|i| i == host) { "http" } else { "https" };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_recv_body(Some(Duration::from_secs(600)))
            .user_agent(concat!("slotforge/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self { host: host.to_string(), base: format!("{scheme}://{api_host}/v2"), agent, creds: auth::lookup(host)?, auth: Mutex::new(None), requests: Default::default() })
    }

    /// GET `url`, answering auth challenges and retrying transient failures.
    fn get(&self, url: &str, accept: Option<&str>, repo: &str) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let h: Vec<(&str, String)> = accept.map(|a| ("Accept", a.to_string())).into_iter().collect();
        self.send("GET", url, &h, None, repo)
    }

    /// `method` `url` with `headers` and `body`, answering auth challenges and retrying transient
    /// failures (a body is sent again on a retry).
    fn send(&self, method: &str, url: &str, headers: &[(&str, String)], body: Option<Payload>, repo: &str) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let mut authed_after_challenge = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let auth = self.auth.lock().unwrap().clone();
            macro_rules! with_headers {
                ($req:expr) => {{
                    let mut r = $req;
                    for (k, v) in headers {
                        r = r.header(*k, v.as_str());
                    }
                    if let Some(h) = &auth {
                        r = r.header("Authorization", h.as_str());
                    }
                    r
                }};
            }
            let result = match method {
                "GET" => with_headers!(self.agent.get(url)).call(),
                "HEAD" => with_headers!(self.agent.head(url)).call(),
                "POST" | "PUT" => {
                    let r = if method == "POST" { self.agent.post(url) } else { self.agent.put(url) };
                    match body {
                        None => with_headers!(r).send(&[][..]),
                        Some(Payload::Bytes(b)) => with_headers!(r).send(b),
                        // Streamed from the file (opened again for a retry), its length known.
                        Some(Payload::File(p, len)) => with_headers!(r).header("Content-Length", len.to_string()).send(std::fs::File::open(p)?),
                    }
                }
                m => bail!("unsupported method {m}"),
            };
            match result {
                Err(e) => {
                    if attempt < ATTEMPTS {
                        std::thread::sleep(BACKOFF * 2u32.pow(attempt - 1));
                        continue;
                    }
                    bail!("cannot reach registry {} ({method} {url}): {e}", self.host);
                }
                Ok(resp) => {
                    let st = resp.status();
                    if st == StatusCode::UNAUTHORIZED {
                        if authed_after_challenge {
                            bail!("{}", self.denied(repo));
                        }
                        let ch = resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                        self.answer_challenge(&ch, repo)?;
                        authed_after_challenge = true;
                        continue;
                    }
                    if (st.is_server_error() || st == StatusCode::TOO_MANY_REQUESTS) && attempt < ATTEMPTS {
                        std::thread::sleep(BACKOFF * 2u32.pow(attempt - 1));
                        continue;
                    }
                    return Ok(resp);
                }
            }
        }
    }

    /// Whether the repository has the blob (HEAD).
    pub fn has_blob(&self, repo: &str, d: &Digest) -> anyhow::Result<bool> {
        let resp = self.send("HEAD", &format!("{}/{repo}/blobs/{d}", self.base), &[], None, repo)?;
        Ok(resp.status().is_success())
    }

    /// Upload a blob unless the repository has it (monolithic: POST, then PUT with the digest);
    /// true if it was uploaded.
    pub fn push_blob(&self, repo: &str, d: &Digest, bytes: &[u8]) -> anyhow::Result<bool> {
        self.upload(repo, d, Payload::Bytes(bytes))
    }

    /// [`push_blob`](Self::push_blob) streamed from a file of `len` bytes (a sealed image).
    pub fn push_blob_file(&self, repo: &str, d: &Digest, path: &std::path::Path, len: u64) -> anyhow::Result<bool> {
        self.upload(repo, d, Payload::File(path, len))
    }

    fn upload(&self, repo: &str, d: &Digest, body: Payload) -> anyhow::Result<bool> {
        if self.has_blob(repo, d)? {
            return Ok(false);
        }
        let what = format!("{}/{repo}: uploading blob {d}", self.host);
        let mut resp = self.send("POST", &format!("{}/{repo}/blobs/uploads/", self.base), &[], None, repo)?;
        self.check(&mut resp, &what)?;
        let loc = resp.headers().get("location").and_then(|v| v.to_str().ok()).ok_or_else(|| anyhow!("{what}: no upload location"))?.to_string();
        let loc = if loc.starts_with('/') { format!("{}{loc}", self.base.trim_end_matches("/v2")) } else { loc };
        let url = format!("{loc}{}digest={}", if loc.contains('?') { '&' } else { '?' }, encode(d.as_str()));
        let mut resp = self.send("PUT", &url, &[("Content-Type", "application/octet-stream".into())], Some(body), repo)?;
        self.check(&mut resp, &what)?;
        Ok(true)
    }

    /// Put a manifest (or index) under `reference` (a tag or its digest). Returns whether the
    /// registry said it indexed the manifest's `subject` (the `OCI-Subject` header of OCI 1.1:
    /// it serves the referrers API, so no referrers tag is needed).
    pub fn put_manifest(&self, repo: &str, reference: &str, bytes: &[u8], media_type: &str) -> anyhow::Result<bool> {
        let what = format!("{}/{repo}:{reference}: putting manifest", self.host);
        let mut resp = self.send("PUT", &format!("{}/{repo}/manifests/{reference}", self.base), &[("Content-Type", media_type.into())], Some(Payload::Bytes(bytes)), repo)?;
        self.check(&mut resp, &what)?;
        Ok(resp.headers().get("oci-subject").is_some())
    }

    /// The referrers of `d` through the OCI 1.1 referrers API, or `None` where the registry does
    /// not serve it (404): then the referrers tag `sha256-<hex>` is the place to look.
    pub fn referrers(&self, repo: &str, d: &Digest) -> anyhow::Result<Option<Vec<u8>>> {
        let url = format!("{}/{repo}/referrers/{d}", self.base);
        let mut resp = self.get(&url, Some(MT_OCI_INDEX), repo)?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.check(&mut resp, &format!("{}/{repo}: referrers of {d}", self.host))?;
        Ok(Some(resp.body_mut().with_config().limit(8 << 20).read_to_vec()?))
    }

    /// Bytes `start..end` of a blob (an HTTP range request), as a stream; a registry that
    /// ignores the range sends the whole blob, which is skipped to `start`.
    pub fn blob_range(&self, repo: &str, d: &Digest, start: u64, end: u64) -> anyhow::Result<Box<dyn Read + Send>> {
        let what = format!("{}/{repo}@{d} bytes {start}..{end}", self.host);
        let mut resp = self.send("GET", &format!("{}/{repo}/blobs/{d}", self.base), &[("Range", format!("bytes={start}-{}", end.saturating_sub(1)))], None, repo)?;
        self.check(&mut resp, &what)?;
        let whole = resp.status() == StatusCode::OK;
        let mut r = resp.into_body().into_reader();
        if whole {
            std::io::copy(&mut (&mut r).take(start), &mut std::io::sink())?;
        }
        Ok(Box::new(r.take(end - start)))
    }

    /// The repository's tags (the tag list API, followed through its `Link` pages; a repository
    /// the registry does not know has none), at most `limit`.
    pub fn tags(&self, repo: &str, limit: usize) -> anyhow::Result<Vec<String>> {
        let what = format!("{}/{repo}: listing tags", self.host);
        let mut url = format!("{}/{repo}/tags/list?n=1000", self.base);
        let mut out = Vec::new();
        loop {
            let mut resp = self.get(&url, None, repo)?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(out);
            }
            self.check(&mut resp, &what)?;
            let next = resp.headers().get("link").and_then(|v| v.to_str().ok()).and_then(|l| l.split(';').next()).map(|u| u.trim().trim_start_matches('<').trim_end_matches('>').to_string());
            let v: serde_json::Value = serde_json::from_slice(&resp.body_mut().with_config().limit(8 << 20).read_to_vec()?).map_err(|e| anyhow!("{what}: {e}"))?;
            out.extend(v["tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(str::to_string)));
            match next {
                Some(n) if out.len() < limit => url = if n.starts_with('/') { format!("{}{n}", self.base.trim_end_matches("/v2")) } else { n },
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Requests sent so far (retries and auth round trips included).
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn denied(&self, repo: &str) -> String {
        match &self.creds {
            Some(c) => format!("registry {} refused the credentials for user {:?} (from {}) for {repo}: authentication failed", self.host, c.username, c.source.display()),
            None => format!("registry {} needs credentials for {repo}: none found in {}", self.host, auth::auth_files().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")),
        }
    }

    fn answer_challenge(&self, header: &str, repo: &str) -> anyhow::Result<()> {
        match auth::parse_challenge(header) {
            Some(Challenge::Basic) => {
                let c = self.creds.as_ref().ok_or_else(|| anyhow!("{}", self.denied(repo)))?;
                *self.auth.lock().unwrap() = Some(auth::basic_header(c));
                Ok(())
            }
            Some(Challenge::Bearer { realm, service, scope }) => {
                let scope = scope.unwrap_or_else(|| format!("repository:{repo}:pull"));
                let mut url = format!("{realm}?scope={}", encode(&scope));
                if let Some(s) = service {
                    url += &format!("&service={}", encode(&s));
                }
                let mut req = self.agent.get(&url);
                if let Some(c) = &self.creds {
                    req = req.header("Authorization", auth::basic_header(c));
                }
                let mut resp = req.call().map_err(|e| anyhow!("token service {realm} for {}: {e}", self.host))?;
                if !resp.status().is_success() {
                    bail!("{} (token service answered {})", self.denied(repo), resp.status());
                }
                let v: serde_json::Value = serde_json::from_slice(&resp.body_mut().with_config().limit(1 << 20).read_to_vec()?)?;
                let token = v.get("token").or_else(|| v.get("access_token")).and_then(|t| t.as_str()).ok_or_else(|| anyhow!("token service {realm} returned no token"))?;
                *self.auth.lock().unwrap() = Some(format!("Bearer {token}"));
                Ok(())
            }
            None => bail!("registry {} answered 401 with an unsupported challenge {header:?}", self.host),
        }
    }

    fn check(&self, resp: &mut ureq::http::Response<ureq::Body>, what: &str) -> anyhow::Result<()> {
        let st = resp.status();
        if st.is_success() {
            return Ok(());
        }
        let body = resp.body_mut().with_config().limit(4096).read_to_string().unwrap_or_default();
        if st == StatusCode::NOT_FOUND {
            bail!("{what}: not found on registry {}", self.host);
        }
        bail!("{what}: registry {} answered {st}: {}", self.host, body.trim());
    }

    /// A manifest (or index) by tag or digest: its bytes and media type.
    pub fn manifest(&self, repo: &str, reference: &str) -> anyhow::Result<(Vec<u8>, String)> {
        self.try_manifest(repo, reference)?.ok_or_else(|| anyhow!("{}/{repo}:{reference}: not found on registry {}", self.host, self.host))
    }

    /// [`Registry::manifest`], `None` if the registry has no such tag or digest.
    pub fn try_manifest(&self, repo: &str, reference: &str) -> anyhow::Result<Option<(Vec<u8>, String)>> {
        let url = format!("{}/{repo}/manifests/{reference}", self.base);
        let what = format!("{}/{repo}:{reference}", self.host);
        let mut resp = self.get(&url, Some(ACCEPT_MANIFESTS), repo)?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.check(&mut resp, &what)?;
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").split(';').next().unwrap_or("").trim().to_string();
        let bytes = resp.body_mut().with_config().limit(8 << 20).read_to_vec().map_err(|e| anyhow!("{what}: reading manifest: {e}"))?;
        let mt = media_type_of(&bytes).unwrap_or(ct);
        Ok(Some((bytes, mt)))
    }

    /// Stream a blob into the cache, verified; retried from scratch if the connection drops.
    pub fn fetch_blob(&self, repo: &str, d: &Digest, size: u64, cache: &Cache, on_bytes: &dyn Fn(u64)) -> anyhow::Result<()> {
        let url = format!("{}/{repo}/blobs/{d}", self.base);
        let what = format!("{}/{repo}@{d}", self.host);
        let mut last = None;
        for attempt in 1..=ATTEMPTS {
            let mut resp = self.get(&url, None, repo)?;
            self.check(&mut resp, &what)?;
            let body = resp.into_body().into_reader();
            let counted = Counting { inner: body, on_bytes };
            match cache.put(counted, d, size, &what) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    if attempt < ATTEMPTS {
                        std::thread::sleep(BACKOFF * 2u32.pow(attempt - 1));
                    }
                }
            }
        }
        Err(last.unwrap())
    }
}

struct Counting<'a, R> {
    inner: R,
    on_bytes: &'a dyn Fn(u64),
}
impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(b)?;
        (self.on_bytes)(n as u64);
        Ok(n)
    }
}

/// The `mediaType` a manifest or index declares, or what its shape says.
pub fn media_type_of(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if let Some(mt) = v.get("mediaType").and_then(|m| m.as_str()) {
        return Some(mt.to_string());
    }
    Some(if v.get("manifests").is_some() { MT_OCI_INDEX } else { MT_OCI_MANIFEST }.to_string())
}

/// Percent-encode a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Blobs of one repository: from the cache, or fetched into it first (never in offline mode).
pub struct RegistrySource {
    pub registry: Arc<Registry>,
    pub repo: String,
    pub cache: Arc<Cache>,
    pub offline: bool,
    pub name: String,
}

impl BlobSource for RegistrySource {
    fn open_blob(&self, d: &Digest, size: u64) -> std::io::Result<Box<dyn Read + Send>> {
        if !self.cache.has(d) {
            self.prefetch(d, size, &|_| {}).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        }
        Ok(Box::new(self.cache.open_blob(d)?))
    }
    fn open_manifest(&self, d: &Digest, size: u64) -> std::io::Result<Box<dyn Read + Send>> {
        if !self.cache.has(d) {
            if self.offline {
                return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("manifest {d} is not in the cache {} (offline)", self.cache.root().display())));
            }
            let (bytes, _) = self.registry.manifest(&self.repo, d.as_str()).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            self.cache.put(&bytes[..], d, size, "manifest").map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        }
        Ok(Box::new(self.cache.open_blob(d)?))
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
    fn is_cached(&self, d: &Digest) -> bool {
        self.cache.has(d)
    }
    fn prefetch(&self, d: &Digest, size: u64, on_bytes: &dyn Fn(u64)) -> anyhow::Result<()> {
        if self.cache.has(d) {
            return Ok(());
        }
        if self.offline {
            bail!("blob {d} is not in the cache {} (offline)", self.cache.root().display());
        }
        self.registry.fetch_blob(&self.repo, d, size, &self.cache, on_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }

    #[test]
    fn query_encoding() {
        assert_eq!(encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }
}
