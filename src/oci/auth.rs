//! Registry credentials the way the container tools find them: `$REGISTRY_AUTH_FILE`, then
//! containers' `auth.json` (`$XDG_RUNTIME_DIR/containers/auth.json`,
//! `~/.config/containers/auth.json`), then `~/.docker/config.json`. Each maps a registry host to
//! `{"auth": base64("user:password")}`; the first file that names the host wins.

use base64::Engine as _;
use std::path::PathBuf;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// Which file they came from, for error messages.
    pub source: PathBuf,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({} from {})", self.username, self.source.display())
    }
}

/// The auth files to consult, in order.
pub fn auth_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|p| !p.is_empty()) {
        v.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        v.push(PathBuf::from(p).join("containers/auth.json"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        let h = PathBuf::from(h);
        v.push(h.join(".config/containers/auth.json"));
        v.push(h.join(".docker/config.json"));
    }
    v
}

/// Credentials for `host` from the first auth file that has them.
pub fn lookup(host: &str) -> anyhow::Result<Option<Credentials>> {
    for f in auth_files() {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("auth file {}: {e}", f.display()))?;
        let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else { continue };
        // Keys may be "host", "https://host" or "host/v1/" (docker's legacy form).
        let entry = auths.iter().find(|(k, _)| {
            let k = k.trim_start_matches("https://").trim_start_matches("http://");
            k == host || k.split('/').next() == Some(host)
        });
        let Some((_, e)) = entry else { continue };
        let Some(b64) = e.get("auth").and_then(|a| a.as_str()) else { continue };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| anyhow::anyhow!("auth file {}: entry for {host} is not base64: {e}", f.display()))?;
        let s = String::from_utf8(raw).map_err(|_| anyhow::anyhow!("auth file {}: entry for {host} is not UTF-8", f.display()))?;
        let (u, p) = s.split_once(':').ok_or_else(|| anyhow::anyhow!("auth file {}: entry for {host} is not user:password", f.display()))?;
        return Ok(Some(Credentials { username: u.into(), password: p.into(), source: f }));
    }
    Ok(None)
}

pub fn basic_header(c: &Credentials) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password)))
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            let mut realm = None;
            let mut service = None;
            let mut scope = None;
            // key="value" pairs; values may contain commas (scopes), so split on quotes.
            let mut s = rest;
            while let Some(eq) = s.find('=') {
                let key = s[..eq].trim().trim_start_matches(',').trim().to_ascii_lowercase();
                let after = &s[eq + 1..];
                let (val, tail) = if let Some(stripped) = after.strip_prefix('"') {
                    let end = stripped.find('"')?;
                    (&stripped[..end], &stripped[end + 1..])
                } else {
                    let end = after.find(',').unwrap_or(after.len());
                    (&after[..end], &after[end..])
                };
                match key.as_str() {
                    "realm" => realm = Some(val.to_string()),
                    "service" => service = Some(val.to_string()),
                    "scope" => scope = Some(val.to_string()),
                    _ => {}
                }
                s = tail;
            }
            Some(Challenge::Bearer { realm: realm?, service, scope })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(parse_challenge("Basic realm=\"Registry Realm\""), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#),
            Some(Challenge::Bearer { realm: "https://auth.example/token".into(), service: Some("registry.example".into()), scope: Some("repository:a/b:pull,push".into()) })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }
}
