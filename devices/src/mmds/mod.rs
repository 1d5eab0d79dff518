//! The microVM metadata service (MMDS), as Firecracker defines it: a JSON data store the host
//! fills through the API and the guest reads over HTTP at a link-local address on the NICs
//! given to it, answered inside flint (no host network stack is involved).
//!
//! - [`Mmds`]: the data store, its size limit, the version (V1: plain GETs; V2: GETs need a
//!   session token from `PUT /latest/api/token`) and the output formats (JSON, or IMDS: a
//!   string's value, an object's keys one per line, objects with a trailing `/`).
//! - [`guest_http`]: one guest HTTP request in, one response out.
//! - [`endpoint`]: the guest-facing IPv4/TCP endpoint (a smoltcp interface) that the NICs hand
//!   the guest's frames for the MMDS address to.
//!
//! Everything the guest sends is hostile input: requests, tokens and frames are bounded, and
//! nothing the guest does reaches the host beyond the store it may read.

pub mod endpoint;
pub mod guest_http;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where the guest finds the MMDS unless configured otherwise (Firecracker's default).
pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The data store's default size limit in bytes of serialized JSON (Firecracker's default,
/// its API payload limit).
pub const DEFAULT_SIZE_LIMIT: usize = 51_200;
/// Longest session token lifetime a guest may ask for (six hours, as Firecracker).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(21_600);
/// Most session tokens held at once; the oldest goes when a new one would exceed it.
pub const MAX_TOKENS: usize = 1024;

/// The MMDS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MmdsVersion {
    /// GETs without a token.
    #[default]
    V1,
    /// GETs need a session token.
    V2,
}

/// Why the store refused new data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmdsError {
    #[error("the metadata is {size} bytes of JSON, more than the MMDS limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

/// How a GET's answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Imds,
}

/// Why a lookup has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    NotFound,
    /// IMDS format has no way to write numbers, booleans, null or arrays.
    UnsupportedType,
}

/// The MMDS data store and its session tokens.
#[derive(Debug)]
pub struct Mmds {
    data: Value,
    limit: usize,
    version: MmdsVersion,
    /// Always answer in IMDS format, whatever the guest's Accept header says.
    imds_compat: bool,
    tokens: HashMap<String, Instant>,
}

/// A store shared by the API (the VMM thread) and the NICs (the event loop).
pub type SharedMmds = Arc<Mutex<Mmds>>;

impl Default for Mmds {
    fn default() -> Self {
        Mmds::new(DEFAULT_SIZE_LIMIT)
    }
}

impl Mmds {
    /// An empty store (`{}`) that holds at most `limit` bytes of serialized JSON.
    pub fn new(limit: usize) -> Mmds {
        Mmds {
            data: Value::Object(Default::default()),
            limit,
            version: MmdsVersion::V1,
            imds_compat: false,
            tokens: HashMap::new(),
        }
    }

    /// A new store, shared.
    pub fn shared(limit: usize) -> SharedMmds {
        Arc::new(Mutex::new(Mmds::new(limit)))
    }

    /// Set the protocol version and the IMDS-only output.
    pub fn configure(&mut self, version: MmdsVersion, imds_compat: bool) {
        self.version = version;
        self.imds_compat = imds_compat;
        if version == MmdsVersion::V1 {
            self.tokens.clear();
        }
    }

    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    /// The whole store.
    pub fn data(&self) -> &Value {
        &self.data
    }

    fn check_size(&self, v: &Value) -> Result<(), MmdsError> {
        let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
        if size > self.limit {
            return Err(MmdsError::TooLarge {
                size,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Replace the store with `data` (`PUT /mmds`).
    pub fn put(&mut self, data: Value) -> Result<(), MmdsError> {
        self.check_size(&data)?;
        self.data = data;
        Ok(())
    }

    /// Merge `patch` into the store as JSON Merge Patch (RFC 7396) does (`PATCH /mmds`): nulls
    /// remove keys, objects merge, anything else replaces.
    pub fn patch(&mut self, patch: &Value) -> Result<(), MmdsError> {
        let mut merged = self.data.clone();
        merge_patch(&mut merged, patch);
        self.check_size(&merged)?;
        self.data = merged;
        Ok(())
    }

    /// The value at `path` (`/a/b/c`; empty segments ignored) written in `format` (or IMDS
    /// when configured so).
    pub fn lookup(&self, path: &str, format: Format) -> Result<String, LookupError> {
        let mut value = &self.data;
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            value = match value {
                Value::Object(map) => map.get(segment).ok_or(LookupError::NotFound)?,
                _ => return Err(LookupError::NotFound),
            };
        }
        let format = if self.imds_compat {
            Format::Imds
        } else {
            format
        };
        match (format, value) {
            (Format::Json, v) => Ok(v.to_string()),
            (Format::Imds, Value::String(s)) => Ok(s.clone()),
            (Format::Imds, Value::Object(map)) => Ok(map
                .iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/")
                    } else {
                        k.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")),
            (Format::Imds, _) => Err(LookupError::UnsupportedType),
        }
    }

    /// A new session token valid for `ttl` from `now` (V2's `PUT /latest/api/token`).
    pub fn new_token(&mut self, ttl: Duration, now: Instant) -> String {
        self.tokens.retain(|_, expiry| *expiry > now);
        if self.tokens.len() >= MAX_TOKENS {
            if let Some(oldest) = self
                .tokens
                .iter()
                .min_by_key(|(_, expiry)| **expiry)
                .map(|(t, _)| t.clone())
            {
                self.tokens.remove(&oldest);
            }
        }
        let mut bytes = [0u8; 32];
        if crate::virtio::rng::fill_random(&mut bytes).is_err() {
            // Without randomness no token can be trusted: hand out one nobody can use.
            return String::new();
        }
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens
            .insert(token.clone(), now + ttl.min(MAX_TOKEN_TTL));
        token
    }

    /// Whether `token` is a session token that has not expired at `now`.
    pub fn token_valid(&self, token: &str, now: Instant) -> bool {
        !token.is_empty() && self.tokens.get(token).is_some_and(|expiry| *expiry > now)
    }

    /// What a snapshot keeps: the data, the version and the output setting (tokens do not
    /// survive: a restored guest asks for new ones).
    pub fn state(&self) -> MmdsState {
        MmdsState {
            data: self.data.clone(),
            version: self.version,
            imds_compat: self.imds_compat,
        }
    }

    /// Take over what a snapshot kept.
    pub fn restore(&mut self, state: MmdsState) {
        self.data = state.data;
        self.configure(state.version, state.imds_compat);
    }
}

/// The MMDS as a snapshot keeps it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MmdsState {
    pub data: Value,
    pub version: MmdsVersion,
    pub imds_compat: bool,
}

/// RFC 7396 merge of `patch` into `target`.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(map) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> Mmds {
        let mut m = Mmds::new(1000);
        m.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "count": 3, "net": {"a": "b"}}}}))
            .unwrap();
        m
    }

    #[test]
    fn lookups_in_json_and_imds_formats() {
        let m = store();
        assert_eq!(
            m.lookup("/latest/meta-data/ami-id", Format::Json).unwrap(),
            "\"ami-1\""
        );
        assert_eq!(
            m.lookup("/latest/meta-data/ami-id", Format::Imds).unwrap(),
            "ami-1"
        );
        assert_eq!(
            m.lookup("/latest/meta-data", Format::Imds).unwrap(),
            "ami-id\ncount\nnet/"
        );
        assert_eq!(
            m.lookup("latest//meta-data/count", Format::Json).unwrap(),
            "3"
        );
        assert_eq!(
            m.lookup("/latest/meta-data/count", Format::Imds),
            Err(LookupError::UnsupportedType)
        );
        assert_eq!(
            m.lookup("/latest/nothing", Format::Json),
            Err(LookupError::NotFound)
        );
        assert_eq!(
            m.lookup("/latest/meta-data/ami-id/deeper", Format::Json),
            Err(LookupError::NotFound)
        );
    }

    #[test]
    fn imds_compat_always_answers_in_imds_format() {
        let mut m = store();
        m.configure(MmdsVersion::V1, true);
        assert_eq!(
            m.lookup("/latest/meta-data/ami-id", Format::Json).unwrap(),
            "ami-1"
        );
    }

    #[test]
    fn patches_merge_and_the_limit_holds() {
        let mut m = store();
        m.patch(&json!({"latest": {"meta-data": {"count": null, "new": "x"}}}))
            .unwrap();
        assert_eq!(
            m.data()["latest"]["meta-data"],
            json!({"ami-id": "ami-1", "net": {"a": "b"}, "new": "x"})
        );
        let big = "x".repeat(2000);
        let e = m.patch(&json!({ "big": big })).unwrap_err();
        assert!(matches!(e, MmdsError::TooLarge { limit: 1000, .. }), "{e}");
        assert!(
            m.data().get("big").is_none(),
            "a refused patch changed the store"
        );
        assert!(m.put(json!({ "big": big })).is_err());
        m.put(json!("just a string")).unwrap();
        m.patch(&json!({"a": 1})).unwrap();
        assert_eq!(m.data(), &json!({"a": 1}));
    }

    #[test]
    fn tokens_expire_and_are_bounded() {
        let mut m = store();
        m.configure(MmdsVersion::V2, false);
        let now = Instant::now();
        let t = m.new_token(Duration::from_secs(10), now);
        assert_eq!(t.len(), 64);
        assert!(m.token_valid(&t, now));
        assert!(!m.token_valid(&t, now + Duration::from_secs(11)));
        assert!(!m.token_valid("made-up", now));
        assert!(!m.token_valid("", now));
        for _ in 0..MAX_TOKENS + 10 {
            m.new_token(Duration::from_secs(100), now);
        }
        assert!(m.tokens.len() <= MAX_TOKENS);
        // Back to V1: tokens are forgotten.
        let t = m.new_token(Duration::from_secs(100), now);
        m.configure(MmdsVersion::V1, false);
        assert!(!m.token_valid(&t, now));
    }

    #[test]
    fn state_round_trips_without_tokens() {
        let mut m = store();
        m.configure(MmdsVersion::V2, true);
        let t = m.new_token(Duration::from_secs(100), Instant::now());
        let mut other = Mmds::new(1000);
        other.restore(m.state());
        assert_eq!(other.data(), m.data());
        assert_eq!(other.version(), MmdsVersion::V2);
        assert!(!other.token_valid(&t, Instant::now()));
    }
}
