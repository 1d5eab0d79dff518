//! Pulls an image from a registry (the OCI distribution API, as Docker Hub, GHCR and
//! Debian's `docker-registry` serve it) into the [`Store`].
//!
//! HTTPS by default (the web PKI's roots, from `webpki-roots`); plain HTTP only for the
//! registries named in [`PullOptions::insecure`]. Authentication as registries ask for it: an
//! anonymous or credentialed bearer token from the realm a `401` names, or basic auth, with the
//! credentials `docker login` or `podman login` left in `$DOCKER_CONFIG/config.json`
//! (default `~/.docker/config.json`; see [`credentials`]).
//!
//! Everything the registry sends is bounded: manifests and indexes ([`MAX_MANIFEST`]),
//! configurations ([`MAX_CONFIG`]), token answers and error bodies, the number of layers
//! ([`MAX_LAYERS`]), the image's total size ([`MAX_TOTAL`]), and time ([`CONNECT_TIMEOUT`] to
//! connect, [`IDLE_TIMEOUT`] without a byte). Every blob is verified against its digest before
//! it enters the store; a layer is downloaded into a partial file that the next pull resumes
//! with an HTTP range request when this one is cut short.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use oci_spec::image::ImageIndex;
use serde::Deserialize;
use ureq::http;

use crate::digest::Digest;
use crate::reference::{Reference, DEFAULT_REGISTRY};
use crate::source::{is_index, is_linux_amd64, is_manifest, Image, Layer, SourceError};
use crate::store::{PartialBlob, Store, StoreError};

/// The largest manifest or index accepted (4 MiB).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// The largest image configuration accepted (4 MiB).
pub const MAX_CONFIG: u64 = 4 << 20;
/// The most layers an image may have.
pub const MAX_LAYERS: usize = 256;
/// The most bytes (compressed, as stored) all layers of an image together may have (64 GiB).
pub const MAX_TOTAL: u64 = 64 << 30;
/// How long connecting to a registry may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a registry may send nothing while an answer is awaited or read.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How many times one pull tries a layer whose download is cut short (each try resumes).
const DOWNLOAD_TRIES: u32 = 3;
/// The largest token answer or error body read.
const MAX_SMALL_BODY: u64 = 1 << 20;
/// The largest Docker configuration file read.
const MAX_DOCKER_CONFIG: u64 = 4 << 20;
/// Where Docker Hub's registry API is.
const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`HOST[:PORT]`, as in references) that may be reached over plain HTTP.
    pub insecure: Vec<String>,
    /// The directory of Docker's `config.json`; `None`: `$DOCKER_CONFIG`, else `~/.docker`.
    pub docker_config: Option<PathBuf>,
}

/// How far a pull is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub layers_done: usize,
    pub layers_total: usize,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {registry} has no {what} (no such repository, tag or digest)")]
    NotFound { registry: String, what: String },
    #[error("registry {registry} refused access to {repository} {how}")]
    Denied {
        registry: String,
        repository: String,
        how: String,
    },
    #[error("cannot reach registry {registry}: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("registry {registry} does not answer over HTTPS ({reason}); if it serves plain HTTP, allow that with --insecure-registry {registry}")]
    NotHttps { registry: String, reason: String },
    #[error("registry {registry} answered the request for {what} with HTTP status {status}")]
    Status {
        registry: String,
        what: String,
        status: u16,
    },
    #[error("{what} from registry {registry} is larger than {limit} bytes")]
    TooLarge {
        registry: String,
        what: String,
        limit: u64,
    },
    #[error("{what} from registry {registry} does not match its digest {expected} (it hashes to {actual})")]
    DocumentMismatch {
        registry: String,
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("layer {digest} from registry {registry} does not match its digest (it hashes to {actual}), so it was not cached")]
    LayerMismatch {
        registry: String,
        digest: Digest,
        actual: Digest,
    },
    #[error("the download of {what} from registry {registry} was cut short after {got} of {expected} bytes ({reason}); pulling again resumes it")]
    Truncated {
        registry: String,
        what: String,
        got: u64,
        expected: u64,
        reason: String,
    },
    #[error("layer {digest} from registry {registry} is longer than the {expected} bytes its manifest gives, so it was not cached")]
    TooLong {
        registry: String,
        digest: Digest,
        expected: u64,
    },
    #[error("{what} from registry {registry} is not valid: {reason}")]
    Invalid {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("image {0} has no linux/amd64 image")]
    NoPlatform(String),
    #[error("image {reference} has {count} layers; flint pulls images of at most {MAX_LAYERS}")]
    TooManyLayers { reference: String, count: usize },
    #[error("image {reference} has {bytes} bytes of layers; flint pulls images of at most {MAX_TOTAL} bytes")]
    TooBig { reference: String, bytes: u64 },
    #[error("cannot read the registry credentials in {}: {reason}", path.display())]
    Credentials { path: PathBuf, reason: String },
    #[error("the credentials for {registry} are kept by docker-credential-{helper} (see {}), which could not give them: {reason}", path.display())]
    Helper {
        registry: String,
        helper: String,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// Pulls the image `reference` names into `store`, verifying every blob, and records it under
/// the reference's name; `progress` is told how far the layers are.
pub fn pull(
    reference: &Reference,
    store: &Store,
    options: &PullOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Image, RegistryError> {
    let credentials = credentials(&reference.registry, options.docker_config.as_deref())?;
    let mut client = Client::new(reference, options, credentials);
    let image = client.image(reference)?;
    if image.layers.len() > MAX_LAYERS {
        return Err(RegistryError::TooManyLayers {
            reference: reference.to_string(),
            count: image.layers.len(),
        });
    }
    let total = image
        .layers
        .iter()
        .try_fold(0u64, |sum, l| sum.checked_add(l.size))
        .filter(|t| *t <= MAX_TOTAL)
        .ok_or_else(|| RegistryError::TooBig {
            reference: reference.to_string(),
            bytes: image
                .layers
                .iter()
                .fold(0u64, |s, l| s.saturating_add(l.size)),
        })?;
    let _lock = store.import_lock()?;
    let mut done = Progress {
        bytes_total: total,
        layers_total: image.layers.len(),
        ..Progress::default()
    };
    progress(&done);
    for layer in &image.layers {
        client.layer(store, layer, &mut done, progress)?;
        done.layers_done += 1;
        progress(&done);
    }
    store.put_blob(
        &image.config_digest,
        Some(image.config_bytes.len() as u64),
        &image.config_bytes[..],
    )?;
    store.put_blob(
        &image.manifest_digest,
        Some(image.manifest_bytes.len() as u64),
        &image.manifest_bytes[..],
    )?;
    store.record_pulled(&image, &reference.to_string())?;
    Ok(image)
}

/// A user name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <password>)", self.username)
    }
}

/// The credentials for `registry` in Docker's `config.json` (in `dir`, else `$DOCKER_CONFIG`,
/// else `~/.docker`), as Docker and Podman read them: `auths.<registry>.auth` (base64 of
/// `user:password`) or its `username` and `password`, the key being the registry's host (with
/// or without a scheme and path; Docker Hub's is `https://index.docker.io/v1/`); or what the
/// credential helper `credHelpers.<registry>` (else `credsStore`) gives, run as
/// `docker-credential-NAME get`. `None` without any: the pull is anonymous.
pub fn credentials(
    registry: &str,
    dir: Option<&Path>,
) -> Result<Option<Credentials>, RegistryError> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => match std::env::var_os("DOCKER_CONFIG") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => match std::env::var_os("HOME") {
                Some(h) => Path::new(&h).join(".docker"),
                None => return Ok(None),
            },
        },
    };
    let path = dir.join("config.json");
    let bad = |reason: String| RegistryError::Credentials {
        path: path.clone(),
        reason,
    };
    let mut bytes = Vec::new();
    match std::fs::File::open(&path) {
        Ok(f) => f
            .take(MAX_DOCKER_CONFIG + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(e.to_string()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    if bytes.len() as u64 > MAX_DOCKER_CONFIG {
        return Err(bad(format!("it is larger than {MAX_DOCKER_CONFIG} bytes")));
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct DockerConfig {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
        #[serde(default)]
        cred_helpers: std::collections::BTreeMap<String, String>,
        creds_store: Option<String>,
    }
    let config: DockerConfig = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let wanted = auth_key(registry);
    if let Some(helper) = config
        .cred_helpers
        .iter()
        .find(|(k, _)| auth_key(k) == wanted)
        .map(|(_, v)| v)
    {
        return helper_credentials(registry, helper, &path);
    }
    let entry = config.auths.iter().find(|(k, _)| auth_key(k) == wanted);
    match entry {
        Some((_, Entry { auth: Some(a), .. })) if !a.is_empty() => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|e| bad(format!("the auth of {registry} is not base64: {e}")))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| bad(format!("the auth of {registry} is not UTF-8")))?;
            let (username, password) = text
                .split_once(':')
                .ok_or_else(|| bad(format!("the auth of {registry} is not user:password")))?;
            Ok(Some(Credentials {
                username: username.to_string(),
                password: password.to_string(),
            }))
        }
        Some((
            _,
            Entry {
                username: Some(u),
                password: Some(p),
                ..
            },
        )) => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        })),
        _ => match &config.creds_store {
            Some(helper) if !helper.is_empty() => helper_credentials(registry, helper, &path),
            _ => Ok(None),
        },
    }
}

/// How a registry is named among `auths` keys: its host and port, without a scheme or a
/// path; Docker Hub's names all become `docker.io`.
fn auth_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DEFAULT_REGISTRY.to_string()
        }
        _ => host,
    }
}

/// `docker-credential-HELPER get`, given the registry on its standard input.
fn helper_credentials(
    registry: &str,
    helper: &str,
    config: &Path,
) -> Result<Option<Credentials>, RegistryError> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let fail = |reason: String| RegistryError::Helper {
        registry: registry.to_string(),
        helper: helper.to_string(),
        path: config.to_path_buf(),
        reason,
    };
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(fail("its name is not a program name".into()));
    }
    let server = if registry == DEFAULT_REGISTRY {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(MAX_SMALL_BODY).read_to_end(&mut out);
    }
    let status = child.wait().map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&out);
    if !status.success() {
        if text.contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!("it ended with {status}: {}", text.trim())));
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Answer {
        username: String,
        secret: String,
    }
    let a: Answer = serde_json::from_slice(&out).map_err(|e| fail(e.to_string()))?;
    Ok(Some(Credentials {
        username: a.username,
        password: a.secret,
    }))
}

/// A registry's API for one repository.
struct Client {
    agent: ureq::Agent,
    /// As in the reference (`docker.io`, `127.0.0.1:5000`).
    registry: String,
    /// `scheme://host[:port]`.
    base: String,
    insecure: bool,
    repository: String,
    credentials: Option<Credentials>,
    /// The `Authorization` header to send, once a challenge asked for one.
    authorization: Option<String>,
}

/// What a GET brought back: its status, headers and body.
type Response = http::Response<ureq::Body>;

impl Client {
    fn new(
        reference: &Reference,
        options: &PullOptions,
        credentials: Option<Credentials>,
    ) -> Client {
        let insecure = options.insecure.iter().any(|r| r == &reference.registry);
        let host = if reference.registry == DEFAULT_REGISTRY {
            DOCKER_HUB_HOST
        } else {
            &reference.registry
        };
        let scheme = if insecure { "http" } else { "https" };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(Some(IDLE_TIMEOUT))
            .timeout_per_read(Some(IDLE_TIMEOUT))
            .max_redirects(5)
            .user_agent(concat!("flint/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Client {
            agent,
            registry: reference.registry.clone(),
            base: format!("{scheme}://{host}"),
            insecure,
            repository: reference.repository.clone(),
            credentials,
            authorization: None,
        }
    }

    /// The manifest (through an index, for linux/amd64) and configuration `reference` names.
    fn image(&mut self, reference: &Reference) -> Result<Image, RegistryError> {
        let name = reference.to_string();
        let first = match (&reference.digest, &reference.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => crate::reference::DEFAULT_TAG.to_string(),
        };
        let (mut bytes, mut digest, mut media_type) =
            self.manifest(&first, reference.digest.as_ref())?;
        if is_index(&media_type) {
            let index: ImageIndex =
                serde_json::from_slice(&bytes).map_err(|e| self.invalid("the index", e))?;
            let chosen = index
                .manifests()
                .iter()
                .find(|d| is_linux_amd64(d))
                .ok_or_else(|| RegistryError::NoPlatform(name.clone()))?;
            let d = Digest::try_from(chosen.digest()).map_err(|e| self.invalid("the index", e))?;
            (bytes, digest, media_type) = self.manifest(&d.to_string(), Some(&d))?;
            if is_index(&media_type) {
                return Err(self.invalid("the index", "it names another index for linux/amd64"));
            }
        }
        if !is_manifest(&media_type) {
            return Err(self.invalid(
                "the manifest",
                format!("its media type {media_type} is not an image manifest's"),
            ));
        }
        let manifest: oci_spec::image::ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| self.invalid("the manifest", e))?;
        let config_digest = Digest::try_from(manifest.config().digest())
            .map_err(|e| self.invalid("the manifest", e))?;
        let what = format!("configuration {config_digest}");
        if manifest.config().size() > MAX_CONFIG {
            return Err(RegistryError::TooLarge {
                registry: self.registry.clone(),
                what,
                limit: MAX_CONFIG,
            });
        }
        let mut response = self.get(&format!("blobs/{config_digest}"), None, None, &what)?;
        let config = self.read_small(&mut response, MAX_CONFIG, &what)?;
        self.check(&what, &config_digest, &config)?;
        let path = PathBuf::from(&name);
        Ok(Image::from_parts(&path, digest, bytes, config)?)
    }

    /// A manifest or index by tag or digest, checked against `expected`: its bytes, digest and
    /// media type.
    fn manifest(
        &mut self,
        tag_or_digest: &str,
        expected: Option<&Digest>,
    ) -> Result<(Vec<u8>, Digest, String), RegistryError> {
        let sep = if tag_or_digest.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        let what = format!("image {}{sep}{tag_or_digest}", self.repository);
        let mut response = self.get(
            &format!("manifests/{tag_or_digest}"),
            Some(MANIFEST_TYPES),
            None,
            &what,
        )?;
        let header_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let bytes = self.read_small(&mut response, MAX_MANIFEST, &what)?;
        let digest = Digest::of(&bytes);
        if let Some(e) = expected {
            self.check(&what, e, &bytes)?;
        }
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(&bytes).map_err(|e| self.invalid(&what, e))?;
        let media_type = match (probe.media_type, header_type) {
            (Some(mt), _) => mt,
            (None, Some(mt)) if is_index(&mt) || is_manifest(&mt) => mt,
            (None, _) if probe.manifests.is_some() => {
                "application/vnd.oci.image.index.v1+json".to_string()
            }
            (None, _) => "application/vnd.oci.image.manifest.v1+json".to_string(),
        };
        Ok((bytes, digest, media_type))
    }

    /// Downloads a layer into the store unless it is there, resuming a partial download.
    fn layer(
        &mut self,
        store: &Store,
        layer: &Layer,
        done: &mut Progress,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), RegistryError> {
        if store.has_blob(&layer.digest) {
            done.bytes_done += layer.size;
            return Ok(());
        }
        let mut partial = store.partial_blob(&layer.digest)?;
        if store.has_blob(&layer.digest) {
            // Another pull finished it while this one waited.
            done.bytes_done += layer.size;
            return Ok(());
        }
        if partial.len() > layer.size {
            partial.restart()?;
        }
        let base = done.bytes_done;
        let mut tries = 0;
        while partial.len() < layer.size {
            tries += 1;
            match self.download(&mut partial, layer, base, done, progress) {
                Err(RegistryError::Truncated { reason, got, .. }) if tries < DOWNLOAD_TRIES => {
                    log::debug!(
                        "registry: layer {} cut short after {got} bytes ({reason}); resuming",
                        layer.digest
                    );
                }
                other => other?,
            }
        }
        match partial.finish(layer.size) {
            Ok(_) => {}
            Err(StoreError::DigestMismatch { digest, actual }) => {
                return Err(RegistryError::LayerMismatch {
                    registry: self.registry.clone(),
                    digest,
                    actual,
                })
            }
            Err(e) => return Err(e.into()),
        }
        done.bytes_done = base + layer.size;
        Ok(())
    }

    /// Downloads the rest of `layer` into `partial`, with a range request when some of it is
    /// there already; `done` counts from `base`.
    fn download(
        &mut self,
        partial: &mut PartialBlob,
        layer: &Layer,
        base: u64,
        done: &mut Progress,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), RegistryError> {
        let what = format!("layer {}", layer.digest);
        let offset = partial.len();
        let mut response = self.get(
            &format!("blobs/{}", layer.digest),
            None,
            (offset > 0).then_some(offset),
            &what,
        )?;
        if response.status() == http::StatusCode::PARTIAL_CONTENT {
            let range = response
                .headers()
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if offset == 0 || !range.starts_with(&format!("bytes {offset}-")) {
                return Err(self.invalid(
                    &what,
                    format!("it answered a request from byte {offset} with the range {range:?}"),
                ));
            }
        } else if offset > 0 {
            // The registry sends the whole blob again.
            partial.restart()?;
        }
        done.bytes_done = base + partial.len();
        progress(done);
        let mut reader = response.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut last = std::time::Instant::now();
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(RegistryError::Truncated {
                        registry: self.registry.clone(),
                        what,
                        got: partial.len(),
                        expected: layer.size,
                        reason: e.to_string(),
                    })
                }
            };
            if partial.len() + n as u64 > layer.size {
                partial.restart()?;
                return Err(RegistryError::TooLong {
                    registry: self.registry.clone(),
                    digest: layer.digest.clone(),
                    expected: layer.size,
                });
            }
            partial.append(&buf[..n])?;
            done.bytes_done = base + partial.len();
            if last.elapsed() >= Duration::from_millis(100) {
                progress(done);
                last = std::time::Instant::now();
            }
        }
        if partial.len() < layer.size {
            return Err(RegistryError::Truncated {
                registry: self.registry.clone(),
                what,
                got: partial.len(),
                expected: layer.size,
                reason: "the connection ended".into(),
            });
        }
        Ok(())
    }

    fn invalid(&self, what: &str, reason: impl std::fmt::Display) -> RegistryError {
        RegistryError::Invalid {
            registry: self.registry.clone(),
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }

    fn check(&self, what: &str, expected: &Digest, bytes: &[u8]) -> Result<(), RegistryError> {
        let actual = Digest::of(bytes);
        if &actual != expected {
            return Err(RegistryError::DocumentMismatch {
                registry: self.registry.clone(),
                what: what.to_string(),
                expected: expected.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// A whole body of at most `limit` bytes.
    fn read_small(
        &self,
        response: &mut Response,
        limit: u64,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut bytes = Vec::new();
        let read = response
            .body_mut()
            .as_reader()
            .take(limit + 1)
            .read_to_end(&mut bytes);
        if let Err(e) = read {
            return Err(RegistryError::Truncated {
                registry: self.registry.clone(),
                what: what.to_string(),
                got: bytes.len() as u64,
                expected: response.body().content_length().unwrap_or(0),
                reason: e.to_string(),
            });
        }
        if bytes.len() as u64 > limit {
            return Err(RegistryError::TooLarge {
                registry: self.registry.clone(),
                what: what.to_string(),
                limit,
            });
        }
        Ok(bytes)
    }

    /// GET `/v2/REPOSITORY/PATH`, authenticating once if the registry asks; a successful
    /// answer, or the error its status means.
    fn get(
        &mut self,
        path: &str,
        accept: Option<&str>,
        from: Option<u64>,
        what: &str,
    ) -> Result<Response, RegistryError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repository);
        let mut authenticated = false;
        loop {
            let mut request = self.agent.get(&url);
            if let Some(a) = accept {
                request = request.header("Accept", a);
            }
            if let Some(a) = &self.authorization {
                request = request.header("Authorization", a);
            }
            if let Some(offset) = from {
                request = request.header("Range", format!("bytes={offset}-"));
            }
            let response = request.call().map_err(|e| self.transport(e))?;
            let status = response.status().as_u16();
            match status {
                200..=299 => return Ok(response),
                401 if !authenticated => {
                    let challenge = response
                        .headers()
                        .get(http::header::WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    match challenge {
                        Some(c) => self.authenticate(&c)?,
                        None => return Err(self.denied()),
                    }
                    authenticated = true;
                }
                401 | 403 => return Err(self.denied()),
                404 => {
                    return Err(RegistryError::NotFound {
                        registry: self.registry.clone(),
                        what: what.to_string(),
                    })
                }
                _ => {
                    return Err(RegistryError::Status {
                        registry: self.registry.clone(),
                        what: what.to_string(),
                        status,
                    })
                }
            }
        }
    }

    fn denied(&self) -> RegistryError {
        RegistryError::Denied {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            how: match &self.credentials {
                Some(c) => format!("with the credentials of {:?} from the Docker configuration (check them with docker login)", c.username),
                None => "without credentials (log in with docker login or podman login, or set DOCKER_CONFIG)".into(),
            },
        }
    }

    /// Answers a `WWW-Authenticate` challenge: basic auth with the credentials, or a bearer
    /// token from the realm it names.
    fn authenticate(&mut self, challenge: &str) -> Result<(), RegistryError> {
        let (scheme, params) = parse_challenge(challenge);
        let basic = self.credentials.as_ref().map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password))
            )
        });
        if scheme.eq_ignore_ascii_case("basic") {
            self.authorization = Some(basic.ok_or_else(|| self.denied())?);
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(self.invalid(
                "the authentication challenge",
                format!("its scheme {scheme:?} is neither Basic nor Bearer"),
            ));
        }
        let param = |k: &str| {
            params
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        let realm = param("realm")
            .ok_or_else(|| self.invalid("the authentication challenge", "it names no realm"))?;
        let plain_ok = self.insecure && realm.starts_with("http://");
        if !realm.starts_with("https://") && !plain_ok {
            return Err(self.invalid(
                "the authentication challenge",
                format!("its realm {realm:?} is not an HTTPS address"),
            ));
        }
        let mut url = realm.to_string();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        if let Some(service) = param("service") {
            url.push_str(&format!("{sep}service={}", query_escape(service)));
            sep = '&';
        }
        let scope = format!("repository:{}:pull", self.repository);
        url.push_str(&format!("{sep}scope={}", query_escape(&scope)));
        let mut request = self.agent.get(&url);
        if let Some(b) = &basic {
            request = request.header("Authorization", b);
        }
        let mut response = request.call().map_err(|e| self.transport(e))?;
        match response.status().as_u16() {
            200 => {}
            401 | 403 => return Err(self.denied()),
            status => {
                return Err(RegistryError::Status {
                    registry: self.registry.clone(),
                    what: "a token".into(),
                    status,
                })
            }
        }
        let body = self.read_small(&mut response, MAX_SMALL_BODY, "the token")?;
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| self.invalid("the token", e))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| self.invalid("the token", "it holds no usable token"))?;
        self.authorization = Some(format!("Bearer {token}"));
        Ok(())
    }

    /// The error a failed connection or exchange means.
    fn transport(&self, e: ureq::Error) -> RegistryError {
        let registry = self.registry.clone();
        let reason = e.to_string();
        let tls = matches!(e, ureq::Error::Tls(_) | ureq::Error::Rustls(_))
            || reason.to_ascii_lowercase().contains("tls")
            || reason.contains("corrupt message");
        if tls && !self.insecure && !reason.contains("certificate") {
            return RegistryError::NotHttps { registry, reason };
        }
        RegistryError::Unreachable { registry, reason }
    }
}

/// `Scheme k="v", k2=v2`: the scheme and the parameters.
fn parse_challenge(header: &str) -> (String, Vec<(String, String)>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        params.push((name.trim().to_string(), value.trim().to_string()));
    }
    (scheme.to_string(), params)
}

/// Percent-encodes all but unreserved characters and `:` and `/`.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_parsed_with_quotes_and_commas() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(scheme, "Bearer");
        assert_eq!(
            params,
            vec![
                ("realm".into(), "https://auth.docker.io/token".into()),
                ("service".into(), "registry.docker.io".into()),
                (
                    "scope".into(),
                    "repository:library/busybox:pull,push".into()
                ),
            ]
        );
        let (scheme, params) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(scheme, "Basic");
        assert_eq!(params, vec![("realm".into(), "Registry Realm".into())]);
        assert_eq!(parse_challenge("Basic").1, vec![]);
    }

    #[test]
    fn credentials_come_from_the_docker_configuration() {
        let dir = crate::testutil::tempdir();
        let write = |v: serde_json::Value| {
            std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap()
        };
        assert_eq!(credentials("ghcr.io", Some(dir.path())).unwrap(), None);
        let auth = base64::engine::general_purpose::STANDARD.encode("me:pa:ss");
        write(serde_json::json!({ "auths": {
            "https://index.docker.io/v1/": { "auth": auth },
            "127.0.0.1:5000": { "username": "u", "password": "p" },
        }}));
        let c = credentials("docker.io", Some(dir.path())).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("me", "pa:ss"));
        let c = credentials("127.0.0.1:5000", Some(dir.path()))
            .unwrap()
            .unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p"));
        assert_eq!(credentials("ghcr.io", Some(dir.path())).unwrap(), None);
        // The password never shows in a debug print.
        assert_eq!(format!("{c:?}"), "Credentials(\"u\", <password>)");
        write(serde_json::json!({ "auths": { "ghcr.io": { "auth": "%%%" } } }));
        let e = credentials("ghcr.io", Some(dir.path())).unwrap_err();
        assert!(e.to_string().contains("is not base64"), "{e}");
        write(serde_json::json!({ "credHelpers": { "ghcr.io": "flint-test-no-such-helper" } }));
        let e = credentials("ghcr.io", Some(dir.path())).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the credentials for ghcr.io are kept by docker-credential-flint-test-no-such-helper"),
            "{e}"
        );
    }

    #[test]
    fn auth_keys_name_hosts() {
        assert_eq!(auth_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(auth_key("registry-1.docker.io"), "docker.io");
        assert_eq!(auth_key("http://127.0.0.1:5000/v2/"), "127.0.0.1:5000");
        assert_eq!(auth_key("GHCR.io"), "ghcr.io");
    }

    /// A registry of canned answers on a loopback port (a hostile one: the real registry
    /// the integration tests use cannot be made to misbehave): answers each GET of a path with
    /// the body for it (404 otherwise), one request per connection; with a token, requests
    /// without it get a bearer challenge whose realm (`/token`) hands it out. Stops when
    /// dropped.
    struct Hostile {
        addr: String,
        /// The queries of the token requests.
        token_queries: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Hostile {
        fn start(answers: Vec<(String, Vec<u8>)>) -> Hostile {
            Hostile::with_token(answers, None)
        }

        fn with_token(answers: Vec<(String, Vec<u8>)>, token: Option<&'static str>) -> Hostile {
            use std::io::Write as _;
            use std::sync::atomic::Ordering;
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopped = stop.clone();
            let token_queries = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let queries = token_queries.clone();
            let realm = format!("http://{addr}/token");
            let thread = std::thread::spawn(move || {
                while !stopped.load(Ordering::SeqCst) {
                    let mut conn = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    conn.set_nonblocking(false).unwrap();
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                        match conn.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => break,
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let authorized = token.is_none_or(|t| {
                        head.to_ascii_lowercase()
                            .contains(&format!("authorization: bearer {t}"))
                    });
                    let reply: Vec<u8> = if let Some(query) = path.strip_prefix("/token?") {
                        queries.lock().unwrap().push(query.to_string());
                        let body = format!("{{\"token\":\"{}\"}}", token.unwrap_or(""));
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes()
                    } else if !authorized {
                        format!(
                            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"evil registry\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .into_bytes()
                    } else {
                        let answer = answers.iter().find(|(p, _)| *p == path);
                        match answer {
                        Some((_, body)) => [
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes(),
                            body.clone(),
                        ]
                        .concat(),
                        None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                        }
                    };
                    let _ = conn.write_all(&reply);
                }
            });
            Hostile {
                addr,
                token_queries,
                stop,
                thread: Some(thread),
            }
        }

        fn pull(&self, store: &Store) -> Result<Image, RegistryError> {
            let reference = Reference::parse(&format!("{}/evil:1", self.addr)).unwrap();
            let options = PullOptions {
                insecure: vec![self.addr.clone()],
                docker_config: Some(PathBuf::from("/nonexistent")),
            };
            pull(&reference, store, &options, &mut |_| {})
        }
    }

    impl Drop for Hostile {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// A manifest and configuration of `layers` (descriptor sizes and digests), as served.
    fn documents(layers: &[(u64, Digest)]) -> (Vec<u8>, Vec<u8>) {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|(_, d)| d.to_string()).collect::<Vec<_>>() },
        })
        .to_string()
        .into_bytes();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": Digest::of(&config).to_string(),
                "size": config.len(),
            },
            "layers": layers.iter().map(|(size, d)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": d.to_string(),
                "size": size,
            })).collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes();
        (manifest, config)
    }

    #[test]
    fn a_bearer_challenge_is_answered_with_an_anonymous_token() {
        let dir = crate::testutil::tempdir();
        let store = Store::open(dir.path()).unwrap();
        let mut layer = crate::testutil::Tar::new();
        layer.file("hello", 0o644, b"hi\n");
        let data = layer.bytes();
        let digest = Digest::of(&data);
        let (manifest, config) = documents(&[(data.len() as u64, digest.clone())]);
        let manifest_digest = Digest::of(&manifest);
        let server = Hostile::with_token(
            vec![
                ("/v2/evil/manifests/1".into(), manifest),
                (format!("/v2/evil/blobs/{}", Digest::of(&config)), config),
                (format!("/v2/evil/blobs/{digest}"), data),
            ],
            Some("s3cr3t-t0ken"),
        );
        let image = server.pull(&store).unwrap();
        assert_eq!(image.manifest_digest, manifest_digest);
        assert!(store.has_blob(&digest));
        assert_eq!(
            store.find_name(&format!("{}/evil:1", server.addr)).unwrap(),
            Some(manifest_digest)
        );
        // One token, asked for once with the service and the pull scope.
        assert_eq!(
            *server.token_queries.lock().unwrap(),
            ["service=evil%20registry&scope=repository:evil:pull"]
        );
    }

    #[test]
    fn what_a_hostile_registry_sends_is_bounded() {
        let dir = crate::testutil::tempdir();
        let store = Store::open(dir.path()).unwrap();
        let nothing_cached = |store: &Store| {
            assert!(store.images().unwrap().is_empty());
            let blobs = std::fs::read_dir(dir.path().join("blobs/sha256")).unwrap();
            assert_eq!(blobs.count(), 0);
        };

        // A manifest larger than MAX_MANIFEST.
        let huge = vec![b' '; MAX_MANIFEST as usize + 10];
        let server = Hostile::start(vec![("/v2/evil/manifests/1".into(), huge)]);
        let e = server.pull(&store).unwrap_err();
        assert!(
            matches!(
                e,
                RegistryError::TooLarge {
                    limit: MAX_MANIFEST,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("image evil:1 from registry"), "{e}");
        drop(server);
        nothing_cached(&store);

        // A layer longer than its descriptor says: refused, its partial download dropped.
        let data = b"twelve bytes".to_vec();
        let digest = Digest::of(&data);
        let (manifest, config) = documents(&[(5, digest.clone())]);
        let server = Hostile::start(vec![
            ("/v2/evil/manifests/1".into(), manifest),
            (format!("/v2/evil/blobs/{}", Digest::of(&config)), config),
            (format!("/v2/evil/blobs/{digest}"), data),
        ]);
        let e = server.pull(&store).unwrap_err();
        assert!(
            matches!(e, RegistryError::TooLong { expected: 5, .. }),
            "{e}"
        );
        drop(server);
        nothing_cached(&store);
        let partial = dir.path().join(format!("tmp/partial-{}", digest.hex()));
        assert_eq!(std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0), 0);

        // Too many layers, and too many bytes: refused before any download.
        let many: Vec<(u64, Digest)> = (0..=MAX_LAYERS as u32)
            .map(|i| (1, Digest::of(&i.to_le_bytes())))
            .collect();
        let (manifest, config) = documents(&many);
        let server = Hostile::start(vec![
            ("/v2/evil/manifests/1".into(), manifest),
            (format!("/v2/evil/blobs/{}", Digest::of(&config)), config),
        ]);
        let e = server.pull(&store).unwrap_err();
        assert!(
            matches!(e, RegistryError::TooManyLayers { count, .. } if count == MAX_LAYERS + 1),
            "{e}"
        );
        drop(server);
        let (manifest, config) = documents(&[(MAX_TOTAL, digest.clone()), (1, digest.clone())]);
        let server = Hostile::start(vec![
            ("/v2/evil/manifests/1".into(), manifest),
            (format!("/v2/evil/blobs/{}", Digest::of(&config)), config),
        ]);
        let e = server.pull(&store).unwrap_err();
        assert!(matches!(e, RegistryError::TooBig { .. }), "{e}");
        drop(server);
        nothing_cached(&store);
    }

    #[test]
    fn queries_are_escaped() {
        assert_eq!(
            query_escape("repository:a/b:pull x&y"),
            "repository:a/b:pull%20x%26y"
        );
    }
}
