//! Image references in the syntax of containers-transports(5): `docker://NAME` (the default
//! when no transport is given), `oci:PATH[:TAG]`, `oci-archive:PATH[:TAG]` and
//! `docker-archive:PATH[:NAME]`, with Docker's normalisation of registry names.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::Error;

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// A registry (`docker://`).
    Docker(DockerRef),
    /// An OCI image layout directory; `tag` picks an index.json entry.
    OciLayout { path: PathBuf, tag: Option<String> },
    /// A tarball of an OCI image layout.
    OciArchive { path: PathBuf, tag: Option<String> },
    /// A `docker save` tarball; `name` picks one of its images by RepoTags.
    DockerArchive {
        path: PathBuf,
        name: Option<DockerRef>,
    },
}

/// A normalised registry reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// Parses a reference; the error names the part that is wrong.
    pub fn parse(input: &str) -> Result<ImageRef, Error> {
        let bad = |part: &str, reason: String| Error::InvalidReference {
            input: input.to_owned(),
            part: part.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(bad("reference", "is empty".into()));
        }
        if let Some(rest) = input.strip_prefix("docker://") {
            return DockerRef::parse_within(input, rest).map(ImageRef::Docker);
        }
        for (prefix, kind) in [("oci:", 0), ("oci-archive:", 1), ("docker-archive:", 2)] {
            let Some(rest) = input.strip_prefix(prefix) else {
                continue;
            };
            // The path ends at the first ':' (as containers/image splits it).
            let (path, suffix) = match rest.split_once(':') {
                Some((p, s)) => (p, Some(s)),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(bad(
                    "path",
                    format!("{prefix} needs a path: {prefix}PATH[:...]"),
                ));
            }
            let path = absolute(Path::new(path))
                .map_err(|e| bad("path", format!("cannot make {path:?} absolute: {e}")))?;
            let suffix = suffix.filter(|s| !s.is_empty());
            return Ok(match kind {
                0 | 1 => {
                    let tag = suffix.map(|t| check_layout_tag(input, t)).transpose()?;
                    if kind == 0 {
                        ImageRef::OciLayout { path, tag }
                    } else {
                        ImageRef::OciArchive { path, tag }
                    }
                }
                _ => {
                    let name = suffix
                        .map(|n| DockerRef::parse_within(input, n))
                        .transpose()?;
                    ImageRef::DockerArchive { path, name }
                }
            });
        }
        if let Some((transport, _)) = input.split_once(':') {
            if input[transport.len()..].starts_with("://") {
                return Err(bad(
                    "transport",
                    format!(
                        "{transport}:// is not a transport kiln reads; accepted: docker://, oci:, \
                         oci-archive:, docker-archive: (no prefix means docker://)"
                    ),
                ));
            }
        }
        DockerRef::parse_within(input, input).map(ImageRef::Docker)
    }

    /// The canonical text form, used as the key of the image in the store.
    pub fn canonical(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |t: &Option<String>| t.as_ref().map(|t| format!(":{t}")).unwrap_or_default();
        match self {
            ImageRef::Docker(r) => write!(f, "docker://{r}"),
            ImageRef::OciLayout { path, tag } => write!(f, "oci:{}{}", path.display(), opt(tag)),
            ImageRef::OciArchive { path, tag } => {
                write!(f, "oci-archive:{}{}", path.display(), opt(tag))
            }
            ImageRef::DockerArchive { path, name } => {
                write!(f, "docker-archive:{}", path.display())?;
                match name {
                    Some(n) => write!(f, ":{n}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl DockerRef {
    /// Parses a Docker reference (no transport prefix).
    pub fn parse(text: &str) -> Result<DockerRef, Error> {
        Self::parse_within(text, text)
    }

    /// Parses `text`, a part of `input`, naming `input` in errors.
    fn parse_within(input: &str, text: &str) -> Result<DockerRef, Error> {
        let bad = |part: &str, reason: String| Error::InvalidReference {
            input: input.to_owned(),
            part: part.to_owned(),
            reason,
        };
        let (name_tag, digest) = match text.split_once('@') {
            Some((n, d)) => {
                let digest = Digest::parse(d).map_err(|e| bad("digest", e.to_string()))?;
                (n, Some(digest))
            }
            None => (text, None),
        };
        // A tag follows the last ':' after the last '/' (a ':' before it is a port).
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(&name_tag[last_slash + i + 1..]),
            ),
            None => (name_tag, None),
        };
        if let Some(tag) = tag {
            check_tag(tag).map_err(|reason| bad("tag", reason))?;
        }
        if name.is_empty() {
            return Err(bad("name", "is empty".into()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(bad(
                "name",
                format!("is longer than {MAX_NAME_LEN} characters"),
            ));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':']) || first == "localhost" || first.starts_with('[') =>
            {
                check_registry(first).map_err(|reason| bad("registry", reason))?;
                (first.to_owned(), rest)
            }
            _ => (DOCKER_HUB.to_owned(), name),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            registry
        };
        for component in path.split('/') {
            check_path_component(component)
                .map_err(|reason| bad("repository", format!("{component:?} {reason}")))?;
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_owned()),
        };
        Ok(DockerRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The registry's host without the port (brackets kept off IPv6 literals).
    pub fn host(&self) -> &str {
        let r = self.registry.as_str();
        if let Some(rest) = r.strip_prefix('[') {
            return rest.split(']').next().unwrap_or(rest);
        }
        r.split(':').next().unwrap_or(r)
    }

    /// Whether the registry is on this machine (localhost, 127.0.0.0/8, ::1): those are
    /// reached over plain HTTP without a flag, as Docker does.
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// `repository:tag` as `docker save` writes RepoTags, Docker Hub names shortened.
    pub fn familiar(&self) -> String {
        let name = if self.registry == DOCKER_HUB {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
                .to_owned()
        } else {
            format!("{}/{}", self.registry, self.repository)
        };
        match &self.tag {
            Some(t) => format!("{name}:{t}"),
            None => name,
        }
    }
}

impl fmt::Display for DockerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    std::path::absolute(path)
}

fn check_layout_tag(input: &str, tag: &str) -> Result<String, Error> {
    // OCI layouts allow more than Docker tags, but never control characters.
    if tag.chars().any(char::is_control) || tag.len() > MAX_NAME_LEN {
        return Err(Error::InvalidReference {
            input: input.to_owned(),
            part: "tag".into(),
            reason: format!("{tag:?} has control characters or is too long"),
        });
    }
    Ok(tag.to_owned())
}

fn check_tag(tag: &str) -> Result<(), String> {
    let mut bytes = tag.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !first_ok
        || tag.len() > MAX_TAG_LEN
        || !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(format!(
            "{tag:?} is not a tag: 1-{MAX_TAG_LEN} of [A-Za-z0-9_.-], not starting with . or -"
        ));
    }
    Ok(())
}

fn check_registry(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{registry:?}: IPv6 literal without ']'"))?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{registry:?}: {ip:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            a => Some(
                a.strip_prefix(':')
                    .ok_or_else(|| format!("{registry:?}: unexpected {a:?} after the address"))?,
            ),
        };
        (None, port)
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let ok = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !ok {
            return Err(format!("{registry:?} is not a host name"));
        }
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("{registry:?}: port {port:?} is not 1-65535"));
        }
    }
    Ok(())
}

/// Docker's path component: lowercase alphanumerics separated by `.`, `_`, `__` or `-`s.
fn check_path_component(component: &str) -> Result<(), String> {
    if component.is_empty() {
        return Err("is empty (a '//' or a trailing '/')".into());
    }
    if component.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("has uppercase letters; repository names must be lowercase".into());
    }
    let bytes = component.as_bytes();
    let is_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !is_alnum(bytes[0]) || !is_alnum(bytes[bytes.len() - 1]) {
        return Err("must start and end with [a-z0-9]".into());
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-')) {
            return Err(format!(
                "has separator {sep:?}; allowed: [a-z0-9] separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docker(input: &str) -> DockerRef {
        match ImageRef::parse(input).unwrap() {
            ImageRef::Docker(r) => r,
            other => panic!("{input}: {other:?}"),
        }
    }

    #[test]
    fn docker_normalisation() {
        assert_eq!(
            docker("busybox").to_string(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            docker("docker://busybox:1.36").to_string(),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(
            docker("index.docker.io/foo/bar").to_string(),
            "docker.io/foo/bar:latest"
        );
        assert_eq!(docker("quay.io/a/b/c:v1").to_string(), "quay.io/a/b/c:v1");
        let r = docker("localhost:5000/demo");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost:5000", "demo")
        );
        assert!(r.is_loopback());
        let r = docker("127.0.0.1:5000/kiln/demo:latest");
        assert!(r.is_loopback());
        assert_eq!(r.host(), "127.0.0.1");
        let r = docker("[::1]:5000/x");
        assert!(r.is_loopback());
        assert!(!docker("example.com/x").is_loopback());
        assert!(!docker("10.0.0.1:5000/x").is_loopback());
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = docker(&format!("alpine@sha256:{hex}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.unwrap().hex(), hex);
        let r = docker(&format!("alpine:3@sha256:{hex}"));
        assert_eq!(r.tag.as_deref(), Some("3"));
        assert_eq!(docker("a__b/c-d--e.f_g").repository, "a__b/c-d--e.f_g");
    }

    #[test]
    fn errors_name_the_bad_part() {
        for (input, part) in [
            ("Busybox", "repository"),
            ("busybox:", "tag"),
            ("busybox:-x", "tag"),
            ("busybox@sha256:abc", "digest"),
            ("busybox@md5:abc", "digest"),
            ("example.com:99999/x", "registry"),
            ("exa_mple.com/x", "registry"),
            ("a//b", "repository"),
            ("a/b/", "repository"),
            ("a..b", "repository"),
            ("http://x/y", "transport"),
            ("oci:", "path"),
            ("", "reference"),
            ("docker-archive:/x.tar:Bad", "repository"),
        ] {
            match ImageRef::parse(input) {
                Err(Error::InvalidReference { part: p, .. }) => assert_eq!(p, part, "{input}"),
                other => panic!("{input}: {other:?}"),
            }
        }
    }

    #[test]
    fn transports() {
        assert_eq!(
            ImageRef::parse("oci:/x/y:v1").unwrap(),
            ImageRef::OciLayout {
                path: "/x/y".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci-archive:/a.tar").unwrap(),
            ImageRef::OciArchive {
                path: "/a.tar".into(),
                tag: None
            }
        );
        let r = ImageRef::parse("docker-archive:/a.tar:demo:latest").unwrap();
        let ImageRef::DockerArchive {
            path,
            name: Some(name),
        } = &r
        else {
            panic!("{r:?}")
        };
        assert_eq!(path, Path::new("/a.tar"));
        assert_eq!(name.familiar(), "demo:latest");
        assert_eq!(
            r.to_string(),
            "docker-archive:/a.tar:docker.io/library/demo:latest"
        );
        // Relative paths become absolute, so the store key does not depend on the cwd.
        let ImageRef::OciLayout { path, .. } = ImageRef::parse("oci:rel").unwrap() else {
            panic!()
        };
        assert!(path.is_absolute());
    }
}
