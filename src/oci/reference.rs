//! Image references in skopeo's transport syntax (containers-transports(5)):
//! `oci:PATH[:TAG]`, `oci-archive:PATH[:TAG]`, `docker-archive:PATH`, `docker://HOST/REPO:TAG|@DIGEST`
//! and a bare `HOST/REPO[:TAG|@DIGEST]` meaning `docker://`.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An OCI image layout directory; the tag selects an `org.opencontainers.image.ref.name`.
    OciDir { path: PathBuf, tag: Option<String> },
    /// A tar of an OCI image layout.
    OciArchive { path: PathBuf, tag: Option<String> },
    /// `docker save` output; the optional tag picks one of its `RepoTags` (`name:tag`).
    DockerArchive { path: PathBuf, tag: Option<String> },
    /// A registry image.
    Registry { host: String, repo: String, tag: Option<String>, digest: Option<String> },
}

impl ImageRef {
    /// Parse `s`; relative local paths are taken relative to `base`.
    pub fn parse(s: &str, base: &Path) -> Result<Self, String> {
        let local = |rest: &str| -> Result<(PathBuf, Option<String>), String> {
            // skopeo splits at the first ':' — paths cannot contain one.
            let (p, tag) = match rest.split_once(':') {
                Some((p, t)) => (p, Some(t.to_string())),
                None => (rest, None),
            };
            if p.is_empty() {
                return Err(format!("image reference {s:?} has no path"));
            }
            if let Some(t) = &tag {
                if t.is_empty() || t.contains('/') && t.starts_with('/') {
                    return Err(format!("image reference {s:?} has an empty or invalid tag"));
                }
            }
            Ok((base.join(p), tag))
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (path, tag) = local(rest)?;
            return Ok(ImageRef::OciDir { path, tag });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (path, tag) = local(rest)?;
            return Ok(ImageRef::OciArchive { path, tag });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (path, tag) = local(rest)?;
            return Ok(ImageRef::DockerArchive { path, tag });
        }
        let rest = s.strip_prefix("docker://").unwrap_or(s);
        if rest.contains("://") || rest.is_empty() {
            return Err(format!("image reference {s:?}: unknown transport (use oci:, oci-archive:, docker-archive: or docker://)"));
        }
        parse_registry(rest).ok_or_else(|| format!("image reference {s:?} is not HOST/REPO[:TAG][@sha256:DIGEST]"))
    }

    pub fn tag(&self) -> Option<&str> {
        match self {
            ImageRef::OciDir { tag, .. } | ImageRef::OciArchive { tag, .. } | ImageRef::Registry { tag, .. } | ImageRef::DockerArchive { tag, .. } => tag.as_deref(),
        }
    }
}

fn parse_registry(s: &str) -> Option<ImageRef> {
    let (name, digest) = match s.split_once('@') {
        Some((n, d)) => (n, Some(d.to_string())),
        None => (s, None),
    };
    // A tag is after the last ':' that follows the last '/' (host:port has a ':' before a '/').
    let last_slash = name.rfind('/');
    let (name, tag) = match name.rfind(':') {
        Some(i) if last_slash.is_none_or(|j| i > j) => (&name[..i], Some(name[i + 1..].to_string())),
        _ => (name, None),
    };
    let (host, repo) = match name.split_once('/') {
        Some((h, r)) if h.contains('.') || h.contains(':') || h == "localhost" => (h.to_string(), r.to_string()),
        _ => ("docker.io".to_string(), if name.contains('/') { name.to_string() } else { format!("library/{name}") }),
    };
    if repo.is_empty() || tag.as_deref() == Some("") {
        return None;
    }
    Some(ImageRef::Registry { host, repo, tag, digest })
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::OciDir { path, tag } => write!(f, "oci:{}{}", path.display(), tag.as_ref().map(|t| format!(":{t}")).unwrap_or_default()),
            ImageRef::OciArchive { path, tag } => write!(f, "oci-archive:{}{}", path.display(), tag.as_ref().map(|t| format!(":{t}")).unwrap_or_default()),
            ImageRef::DockerArchive { path, tag } => write!(f, "docker-archive:{}{}", path.display(), tag.as_ref().map(|t| format!(":{t}")).unwrap_or_default()),
            ImageRef::Registry { host, repo, tag, digest } => {
                write!(f, "docker://{host}/{repo}")?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                if let Some(d) = digest {
                    write!(f, "@{d}")?;
                }
                Ok(())
            }
        }
    }
}

/// `os/arch[/variant]`, default `linux/amd64`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self { os: "linux".into(), architecture: "amd64".into(), variant: None }
    }
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self { os: os.to_string(), architecture: arch.to_string(), variant: None }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => {
                Ok(Self { os: os.to_string(), architecture: arch.to_string(), variant: Some(v.to_string()) })
            }
            _ => Err(format!("platform {s:?} is not OS/ARCH[/VARIANT], e.g. linux/amd64")),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports() {
        let b = Path::new("/m");
        assert_eq!(ImageRef::parse("oci:fixtures/kernel:6.1", b).unwrap(), ImageRef::OciDir { path: "/m/fixtures/kernel".into(), tag: Some("6.1".into()) });
        assert_eq!(ImageRef::parse("oci:/abs/x", b).unwrap(), ImageRef::OciDir { path: "/abs/x".into(), tag: None });
        assert_eq!(ImageRef::parse("oci-archive:a.tar:v1", b).unwrap(), ImageRef::OciArchive { path: "/m/a.tar".into(), tag: Some("v1".into()) });
        assert_eq!(
            ImageRef::parse("registry.example/edgeview:1.2", b).unwrap(),
            ImageRef::Registry { host: "registry.example".into(), repo: "edgeview".into(), tag: Some("1.2".into()), digest: None }
        );
        assert_eq!(
            ImageRef::parse("docker://127.0.0.1:5000/a/b@sha256:00", b).unwrap(),
            ImageRef::Registry { host: "127.0.0.1:5000".into(), repo: "a/b".into(), tag: None, digest: Some("sha256:00".into()) }
        );
        assert_eq!(
            ImageRef::parse("linuxkit/init:v1", b).unwrap(),
            ImageRef::Registry { host: "docker.io".into(), repo: "linuxkit/init".into(), tag: Some("v1".into()), digest: None }
        );
        assert!(ImageRef::parse("oci:", b).is_err());
        assert!(ImageRef::parse("ftp://x", b).is_err());
    }

    #[test]
    fn platforms() {
        assert_eq!("linux/arm64/v8".parse::<Platform>().unwrap().variant.as_deref(), Some("v8"));
        assert!("linux".parse::<Platform>().is_err());
        assert_eq!(Platform::default().to_string(), "linux/amd64");
    }
}
