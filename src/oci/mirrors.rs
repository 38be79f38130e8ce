//! containers-registries.conf(5) (version 2): where an image reference is actually fetched
//! from. An air-gapped factory points `docker.io` (or any prefix) at a local mirror; `build`,
//! `lock`, `pull` and the agent then try the mirrors in order, then the original location
//! unless it is blocked. The file is `$CONTAINERS_REGISTRIES_CONF`, else
//! `/etc/containers/registries.conf` (as podman, skopeo and buildah read it). Reference:
//! docs/manifest.md. Drop-in directories (`registries.conf.d`) and short-name aliases are not read.

use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/containers/registries.conf";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct File {
    #[serde(default)]
    registry: Vec<RegistryEntry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RegistryEntry {
    prefix: Option<String>,
    location: Option<String>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    blocked: bool,
    #[serde(default)]
    mirror_by_digest_only: bool,
    #[serde(default)]
    mirror: Vec<Mirror>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Mirror {
    location: String,
    #[serde(default)]
    insecure: bool,
    /// `all` (default), `digest-only` or `tag-only`.
    pull_from_mirror: Option<String>,
}

/// One place to try: a registry host, the repository there, and whether it is plain http.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub repo: String,
    pub insecure: bool,
    /// A mirror (not the reference's own location).
    pub mirror: bool,
}

/// A loaded registries.conf (empty when the file does not exist).
#[derive(Debug, Default, Clone)]
pub struct Mirrors {
    entries: Vec<RegistryEntry>,
    pub source: Option<PathBuf>,
}

impl Mirrors {
    /// The file the environment names, or the system one; absent means "no rewriting".
    pub fn load() -> anyhow::Result<Self> {
        match std::env::var_os("CONTAINERS_REGISTRIES_CONF") {
            Some(p) => Self::load_from(Path::new(&p), true),
            None => Self::load_from(Path::new(DEFAULT_PATH), false),
        }
    }

    pub fn load_from(path: &Path, must_exist: bool) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => return Ok(Self::default()),
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        let mut m = Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        m.source = Some(path.to_path_buf());
        Ok(m)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        for r in &f.registry {
            if r.prefix.is_none() && r.location.is_none() {
                return Err("a [[registry]] needs a prefix or a location".into());
            }
            for m in &r.mirror {
                if !matches!(m.pull_from_mirror.as_deref(), None | Some("all") | Some("digest-only") | Some("tag-only")) {
                    return Err(format!("mirror {}: pull-from-mirror must be all, digest-only or tag-only", m.location));
                }
            }
        }
        Ok(Self { entries: f.registry, source: None })
    }

    /// The entry whose prefix matches `host/repo` longest (a `*.domain` prefix matches hosts).
    fn entry(&self, host: &str, repo: &str) -> Option<(&RegistryEntry, String)> {
        let full = format!("{host}/{repo}");
        self.entries
            .iter()
            .filter_map(|e| {
                let prefix = e.prefix.clone().or_else(|| e.location.clone())?;
                let matched = if let Some(dom) = prefix.strip_prefix("*.") {
                    host.ends_with(&format!(".{dom}"))
                } else {
                    full == prefix || full.starts_with(&format!("{prefix}/")) || full.starts_with(&format!("{prefix}:"))
                };
                matched.then_some((e, prefix))
            })
            .max_by_key(|(_, p)| p.len())
    }

    /// Where to fetch `host/repo`, in order: matching mirrors, then the (possibly rewritten)
    /// location unless blocked. `by_digest` says whether the pull names a digest.
    pub fn endpoints(&self, host: &str, repo: &str, by_digest: bool) -> Result<Vec<Endpoint>, String> {
        let Some((e, prefix)) = self.entry(host, repo) else {
            return Ok(vec![Endpoint { host: host.into(), repo: repo.into(), insecure: false, mirror: false }]);
        };
        let full = format!("{host}/{repo}");
        // The part after the matched prefix stays; a wildcard prefix matches the host.
        let matched = if prefix.starts_with("*.") { host } else { prefix.as_str() };
        let rest = &full[matched.len()..];
        let at = |loc: &str| -> (String, String) {
            let whole = format!("{loc}{rest}");
            let (h, r) = whole.split_once('/').unwrap_or((whole.as_str(), ""));
            (h.to_string(), r.to_string())
        };
        let mut v = Vec::new();
        for m in &e.mirror {
            let allowed = match m.pull_from_mirror.as_deref() {
                Some("digest-only") => by_digest,
                Some("tag-only") => !by_digest,
                _ => !e.mirror_by_digest_only || by_digest,
            };
            if allowed {
                let (h, r) = at(&m.location);
                v.push(Endpoint { host: h, repo: r, insecure: m.insecure, mirror: true });
            }
        }
        if e.blocked {
            if v.is_empty() {
                return Err(format!("{full}: blocked by registries.conf and no mirror may serve this pull"));
            }
        } else {
            let (h, r) = at(e.location.as_deref().unwrap_or(matched));
            v.push(Endpoint { host: h, repo: r, insecure: e.insecure, mirror: false });
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "docker.io"
location = "docker.io"
blocked = true

[[registry.mirror]]
location = "127.0.0.1:5000/hub"
insecure = true

[[registry]]
prefix = "docker.io/linuxkit/kernel"
location = "kernels.example.com/lk"
mirror-by-digest-only = true

[[registry.mirror]]
location = "10.0.0.1:5000/kernels"

[[registry]]
location = "quay.io"
insecure = true

[[registry]]
prefix = "*.corp.example"
[[registry.mirror]]
location = "mirror.corp.example"
pull-from-mirror = "tag-only"
"#;

    fn ep(host: &str, repo: &str, insecure: bool, mirror: bool) -> Endpoint {
        Endpoint { host: host.into(), repo: repo.into(), insecure, mirror }
    }

    #[test]
    fn mirrors_then_location_by_longest_prefix() {
        let m = Mirrors::parse(CONF).unwrap();
        assert_eq!(m.endpoints("docker.io", "linuxkit/init", false).unwrap(), vec![ep("127.0.0.1:5000", "hub/linuxkit/init", true, true)], "blocked: only the mirror");
        assert_eq!(
            m.endpoints("docker.io", "linuxkit/kernel", true).unwrap(),
            vec![ep("10.0.0.1:5000", "kernels", false, true), ep("kernels.example.com", "lk", false, false)],
            "the longer prefix wins and the location is rewritten"
        );
        assert_eq!(m.endpoints("docker.io", "linuxkit/kernel", false).unwrap(), vec![ep("kernels.example.com", "lk", false, false)], "mirror-by-digest-only");
        assert_eq!(m.endpoints("quay.io", "a/b", false).unwrap(), vec![ep("quay.io", "a/b", true, false)]);
        assert_eq!(m.endpoints("ghcr.io", "a/b", false).unwrap(), vec![ep("ghcr.io", "a/b", false, false)], "no entry: unchanged");
        assert_eq!(m.endpoints("reg.corp.example", "x", false).unwrap(), vec![ep("mirror.corp.example", "x", false, true), ep("reg.corp.example", "x", false, false)]);
        assert_eq!(m.endpoints("reg.corp.example", "x", true).unwrap(), vec![ep("reg.corp.example", "x", false, false)], "tag-only mirror skipped for digests");
        assert!(m.endpoints("docker.io", "linuxkitx/init", false).unwrap()[0].mirror, "docker.io prefix matches every docker.io repo");
    }

    #[test]
    fn a_prefix_matches_only_at_a_path_boundary() {
        let m = Mirrors::parse("[[registry]]\nprefix = \"example.com/foo\"\nlocation = \"m.example/foo\"\n").unwrap();
        assert_eq!(m.endpoints("example.com", "foobar", false).unwrap()[0].host, "example.com");
        assert_eq!(m.endpoints("example.com", "foo/bar", false).unwrap()[0], ep("m.example", "foo/bar", false, false));
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(Mirrors::parse("[[registry]]\ninsecure = true\n").is_err());
        assert!(Mirrors::parse("[[registry]]\nlocation = \"a\"\n[[registry.mirror]]\nlocation = \"b\"\npull-from-mirror = \"sometimes\"\n").is_err());
        assert!(Mirrors::parse("[[registry]\n").is_err());
        let e = Mirrors::load_from(Path::new("/nonexistent/registries.conf"), true).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/registries.conf"));
        assert!(Mirrors::load_from(Path::new("/nonexistent/registries.conf"), false).unwrap().source.is_none());
    }
}
