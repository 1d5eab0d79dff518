//! Image references `[REGISTRY/]NAME[:TAG|@DIGEST]` with Docker Hub's defaults, told apart from
//! file paths to images.
//!
//! A REF that starts with `/` or `.` is a path (no reference can start with either); so is one
//! that names an existing directory holding an `oci-layout` file or an existing file ending in
//! `.tar`, `.tar.gz` or `.tgz` (names a registry reference could also have, but hardly ever
//! means), and one that is not a valid reference but names an existing file or directory.
//! Anything else is a registry reference. A path to a directory is
//! an OCI image layout; a path to a file is an archive (an OCI archive or a `docker save` tarball,
//! told apart by their contents in [`crate::source`]).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::digest::Digest;

/// The registry that references without one name (Docker Hub).
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag of a reference that names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";

/// Why a string is not an image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("the image reference is empty")]
    Empty,
    #[error("image reference {0:?} has an invalid registry host (expected HOST[:PORT])")]
    Registry(String),
    #[error("image reference {0:?} has an invalid repository name (lowercase letters, digits and separators . _ __ - between / parts)")]
    Name(String),
    #[error("image reference {0:?} has an invalid tag (up to 128 letters, digits, _ . - not starting with . or -)")]
    Tag(String),
    #[error("image reference {0:?} has an invalid digest (expected sha256: and 64 lowercase hexadecimal digits)")]
    Digest(String),
    #[error("image reference {0:?} is longer than 255 characters")]
    TooLong(String),
}

/// A parsed registry reference, with Docker Hub's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host and optional port, e.g. `docker.io` or `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/python`.
    pub repository: String,
    /// Tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// Digest, which takes precedence over the tag when pulling.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses `[REGISTRY/]NAME[:TAG|@DIGEST]` (a tag and a digest together are allowed, as Docker
    /// allows them; the digest wins).
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.len() > 255 {
            return Err(ReferenceError::TooLong(s.to_string()));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (
                rest,
                Some(
                    d.parse::<Digest>()
                        .map_err(|_| ReferenceError::Digest(s.to_string()))?,
                ),
            ),
            None => (s, None),
        };
        // A tag is what follows the last ':' after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(ReferenceError::Tag(s.to_string()));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !valid_registry(first) {
                    return Err(ReferenceError::Registry(s.to_string()));
                }
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        if path.is_empty() || !path.split('/').all(valid_component) {
            return Err(ReferenceError::Name(s.to_string()));
        }
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_registry(host: &str) -> bool {
    let (h, port) = match host.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (host, None),
    };
    let host_ok = !h.is_empty()
        && h.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()));
    host_ok && port_ok
}

/// A path component: `[a-z0-9]+` runs joined by `.`, `_`, `__` or one or more `-`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|s| s == b'-')) {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// What `flint run --image REF` names: an image in a registry or an image in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An image in a registry.
    Registry(Reference),
    /// An OCI image layout directory.
    Layout(PathBuf),
    /// An OCI archive or a `docker save` tarball.
    Archive(PathBuf),
}

impl ImageRef {
    /// Tells a path from a reference (see the module documentation) and parses it.
    pub fn parse(s: &str) -> Result<ImageRef, ReferenceError> {
        let p = Path::new(s);
        let looks_like_image_file = (p.is_dir() && p.join("oci-layout").is_file())
            || (p.is_file()
                && [".tar", ".tar.gz", ".tgz"]
                    .iter()
                    .any(|ext| s.ends_with(ext)));
        if s.starts_with('/') || s.starts_with('.') || looks_like_image_file {
            return Ok(Self::path(p));
        }
        match Reference::parse(s) {
            Ok(r) => Ok(ImageRef::Registry(r)),
            Err(e) => {
                if p.symlink_metadata().is_ok() {
                    Ok(Self::path(p))
                } else {
                    Err(e)
                }
            }
        }
    }

    fn path(p: &Path) -> ImageRef {
        if p.is_dir() {
            ImageRef::Layout(p.to_path_buf())
        } else {
            ImageRef::Archive(p.to_path_buf())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn docker_hub_defaults_apply() {
        assert_eq!(r("python"), "docker.io/library/python:latest");
        assert_eq!(r("python:3.12-slim"), "docker.io/library/python:3.12-slim");
        assert_eq!(r("bitnami/redis"), "docker.io/bitnami/redis:latest");
        assert_eq!(
            r("index.docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            r("docker.io/library/busybox:1.36"),
            "docker.io/library/busybox:1.36"
        );
    }

    #[test]
    fn registries_ports_and_digests_are_kept() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let p = Reference::parse(&format!("127.0.0.1:5000/team/app@{d}")).unwrap();
        assert_eq!(p.registry, "127.0.0.1:5000");
        assert_eq!(p.repository, "team/app");
        assert_eq!(p.tag, None);
        assert_eq!(p.digest.unwrap().to_string(), d);
        let p = Reference::parse("localhost/app:v1").unwrap();
        assert_eq!(
            (p.registry.as_str(), p.repository.as_str(), p.tag.as_deref()),
            ("localhost", "app", Some("v1"))
        );
        let p = Reference::parse("ghcr.io/a/b/c:1.0").unwrap();
        assert_eq!(
            (p.registry.as_str(), p.repository.as_str()),
            ("ghcr.io", "a/b/c")
        );
        // A port is not a tag.
        let p = Reference::parse("registry.local:5000/app").unwrap();
        assert_eq!(
            (p.registry.as_str(), p.tag.as_deref()),
            ("registry.local:5000", Some("latest"))
        );
    }

    #[test]
    fn invalid_references_say_what_is_wrong() {
        assert_eq!(Reference::parse(""), Err(ReferenceError::Empty));
        assert!(matches!(
            Reference::parse("Python"),
            Err(ReferenceError::Name(_))
        ));
        assert!(matches!(
            Reference::parse("python:-x"),
            Err(ReferenceError::Tag(_))
        ));
        assert!(matches!(
            Reference::parse("python@sha256:zz"),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            Reference::parse("a//b"),
            Err(ReferenceError::Name(_))
        ));
        assert!(matches!(
            Reference::parse("bad_host.-x/app"),
            Err(ReferenceError::Registry(_))
        ));
        let msg = Reference::parse("python:-x").unwrap_err().to_string();
        assert!(
            msg.contains("\"python:-x\"") && msg.contains("invalid tag"),
            "{msg}"
        );
    }

    #[test]
    fn paths_are_told_from_references() {
        let dir = crate::testutil::tempdir();
        let file = dir.path().join("img.tar");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(
            ImageRef::parse(dir.path().to_str().unwrap()).unwrap(),
            ImageRef::Layout(dir.path().to_path_buf())
        );
        assert_eq!(
            ImageRef::parse(file.to_str().unwrap()).unwrap(),
            ImageRef::Archive(file.clone())
        );
        assert_eq!(
            ImageRef::parse("./missing.tar").unwrap(),
            ImageRef::Archive(PathBuf::from("./missing.tar"))
        );
        assert!(matches!(
            ImageRef::parse("busybox").unwrap(),
            ImageRef::Registry(_)
        ));
        assert!(ImageRef::parse("No_Such_Image").is_err());
        // Relative paths without ./ are paths when they name an image file or layout.
        let cwd = std::env::current_dir().unwrap();
        let rel = |p: &Path| p.strip_prefix(&cwd).map(Path::to_path_buf).ok();
        let here = tempfile::Builder::new()
            .prefix(&format!("flint-image-refs-{}", std::process::id()))
            .rand_bytes(0)
            .tempdir_in(&cwd)
            .unwrap();
        let tar = here.path().join("app.tar");
        std::fs::write(&tar, b"").unwrap();
        let layout = here.path().join("layout");
        std::fs::create_dir(&layout).unwrap();
        std::fs::write(layout.join("oci-layout"), b"{}").unwrap();
        let plain_dir = here.path().join("notimage");
        std::fs::create_dir(&plain_dir).unwrap();
        let (tar, layout, plain_dir) = (
            rel(&tar).unwrap(),
            rel(&layout).unwrap(),
            rel(&plain_dir).unwrap(),
        );
        assert_eq!(
            ImageRef::parse(tar.to_str().unwrap()).unwrap(),
            ImageRef::Archive(tar.clone())
        );
        assert_eq!(
            ImageRef::parse(layout.to_str().unwrap()).unwrap(),
            ImageRef::Layout(layout.clone())
        );
        assert!(matches!(
            ImageRef::parse(plain_dir.to_str().unwrap()).unwrap(),
            ImageRef::Registry(_)
        ));
    }
}
