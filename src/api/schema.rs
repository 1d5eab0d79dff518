//! The JSON bodies of the API and the config file, shared by both: each body is read from a
//! `serde_json::Value` into the VM's own configuration types (`vmm::VmConfig`'s parts) and
//! the controller's requests, with one-sentence errors that name the field, and each is
//! written back in the same schema. Fields Firecracker has and flint cannot honour are
//! refused here, with the reason; values are validated by the VMM (`VmConfig::validate`),
//! whose errors [`field_name`] names in this schema's terms.
//!
//! Bodies are read by hand rather than with `#[derive(Deserialize)]` so that every error
//! names its field and says what was expected in plain words.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};
use vmm::controller::{
    BootSource, InstanceInfo, LoadOverrides, MachineUpdate, MetricsConfig, Request, RequestError,
};
use vmm::{
    CacheType, DriveConfig, Field, NetConfig, RateLimiterConfig, TokenBucketConfig, VmConfig,
    VsockConfig,
};

use crate::logger::LoggerConfig;

/// The name of the field `field` in this schema, if it has one.
pub fn field_name(field: Field) -> Option<&'static str> {
    Some(match field {
        Field::Vcpus => "vcpu_count",
        Field::Memory => "mem_size_mib",
        Field::Cmdline => "boot_args",
        Field::DriveRoot => "is_root_device",
        Field::DriveId => "drive_id",
        Field::DrivePartuuid => "partuuid",
        Field::DrivePath => "path_on_host",
        Field::NetTap => "host_dev_name",
        Field::NetId => "iface_id",
        Field::NetMac => "guest_mac",
        Field::NetMtu => "mtu",
        // The sentence says it is about the MMDS.
        Field::Mmds => return None,
        Field::VsockCid => "guest_cid",
        Field::MetricsPath => "metrics_path",
        // The sentence says it is about the balloon.
        Field::Balloon => return None,
        // The sentence names the device and the limiter's field itself.
        Field::RateLimiter => return None,
        Field::Devices => return None,
    })
}

/// A refused request as one sentence, prefixed with the field it is about.
pub fn request_error_message(e: &RequestError) -> String {
    match e.field.and_then(field_name) {
        Some(name) => format!("{name}: {}", e.message),
        None => e.message.clone(),
    }
}

/// A body that cannot be accepted: one sentence naming the field and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

/// Log levels as Firecracker spells them; accepted in any case.
pub const LOG_LEVELS: &[&str] = &["Error", "Warning", "Info", "Debug", "Trace", "Off"];

/// Longest JSON value quoted back in an error message.
const MAX_QUOTED: usize = 40;

/// A JSON value as quoted in an error message, shortened if long.
fn quote(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() <= MAX_QUOTED {
        s
    } else {
        let cut: String = s.chars().take(MAX_QUOTED).collect();
        format!("{cut}...")
    }
}

/// A name or id from a request as quoted in an error message: control characters escaped
/// (so that the message stays one line), shortened if long.
pub fn quote_str(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX_QUOTED {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The fields of one JSON object, checked against the ones a body accepts.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    /// Prefix of error messages, e.g. `drives[1]: ` (empty for API bodies).
    ctx: String,
}

impl<'a> Fields<'a> {
    /// Check that `v` is an object whose keys are all in `allowed` (a key in `refused` with a
    /// non-null value gets that key's reason instead of "unknown field").
    fn new(
        v: &'a Value,
        ctx: &str,
        allowed: &[&str],
        refused: &[(&str, &str)],
    ) -> Result<Fields<'a>, BodyError> {
        let ctx = if ctx.is_empty() {
            String::new()
        } else {
            format!("{ctx}: ")
        };
        let Value::Object(map) = v else {
            return Err(BodyError(format!(
                "{ctx}expected a JSON object, not {}",
                quote(v)
            )));
        };
        for (key, value) in map {
            if allowed.contains(&key.as_str()) {
                continue;
            }
            if let Some((_, why)) = refused.iter().find(|(k, _)| k == key) {
                if value.is_null() {
                    continue;
                }
                return Err(BodyError(format!("{ctx}{key} {why}")));
            }
            let expected = if allowed.is_empty() {
                "no fields are accepted here".to_string()
            } else {
                format!("expected {}", allowed.join(", "))
            };
            return Err(BodyError(format!(
                "{ctx}unknown field '{}' ({expected})",
                quote_str(key)
            )));
        }
        Ok(Fields { map, ctx })
    }

    fn err(&self, msg: String) -> BodyError {
        BodyError(format!("{}{msg}", self.ctx))
    }

    /// The value of `name`, `None` when absent or null.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn required(&self, name: &str) -> Result<&'a Value, BodyError> {
        match self.map.get(name) {
            None => Err(self.err(format!("missing required field '{name}'"))),
            Some(v) => Ok(v),
        }
    }

    fn as_str(&self, name: &str, v: &'a Value) -> Result<&'a str, BodyError> {
        v.as_str()
            .ok_or_else(|| self.err(format!("{name} must be a string, not {}", quote(v))))
    }

    fn req_str(&self, name: &str) -> Result<String, BodyError> {
        let v = self.required(name)?;
        self.as_str(name, v).map(str::to_string)
    }

    fn opt_str(&self, name: &str) -> Result<Option<String>, BodyError> {
        self.get(name)
            .map(|v| self.as_str(name, v).map(str::to_string))
            .transpose()
    }

    fn as_bool(&self, name: &str, v: &Value) -> Result<bool, BodyError> {
        v.as_bool()
            .ok_or_else(|| self.err(format!("{name} must be true or false, not {}", quote(v))))
    }

    fn req_bool(&self, name: &str) -> Result<bool, BodyError> {
        let v = self.required(name)?;
        self.as_bool(name, v)
    }

    fn opt_bool(&self, name: &str) -> Result<Option<bool>, BodyError> {
        self.get(name).map(|v| self.as_bool(name, v)).transpose()
    }

    fn as_uint(&self, name: &str, v: &Value, max: u64) -> Result<u64, BodyError> {
        v.as_u64().filter(|n| *n <= max).ok_or_else(|| {
            self.err(format!(
                "{name} must be a whole number from 0 to {max}, not {}",
                quote(v)
            ))
        })
    }

    fn req_uint(&self, name: &str, max: u64) -> Result<u64, BodyError> {
        let v = self.required(name)?;
        self.as_uint(name, v, max)
    }

    fn opt_uint(&self, name: &str, max: u64) -> Result<Option<u64>, BodyError> {
        self.get(name)
            .map(|v| self.as_uint(name, v, max))
            .transpose()
    }

    /// A string that must be one of `choices` (exact spelling).
    fn as_choice(
        &self,
        name: &str,
        v: &Value,
        choices: &[&'static str],
    ) -> Result<&'static str, BodyError> {
        v.as_str()
            .and_then(|s| choices.iter().find(|c| **c == s).copied())
            .ok_or_else(|| {
                let list: Vec<String> = choices.iter().map(|c| format!("\"{c}\"")).collect();
                self.err(format!(
                    "{name} must be one of {}, not {}",
                    list.join(", "),
                    quote(v)
                ))
            })
    }

    fn req_choice(&self, name: &str, choices: &[&'static str]) -> Result<&'static str, BodyError> {
        let v = self.required(name)?;
        self.as_choice(name, v, choices)
    }

    fn opt_choice(
        &self,
        name: &str,
        choices: &[&'static str],
    ) -> Result<Option<&'static str>, BodyError> {
        self.get(name)
            .map(|v| self.as_choice(name, v, choices))
            .transpose()
    }
}

/// `PUT /boot-source`, config file `boot-source`.
pub fn boot_source(v: &Value, ctx: &str) -> Result<BootSource, BodyError> {
    let f = Fields::new(
        v,
        ctx,
        &["kernel_image_path", "initrd_path", "boot_args"],
        &[],
    )?;
    Ok(BootSource {
        kernel: f.req_str("kernel_image_path")?.into(),
        initrd: f.opt_str("initrd_path")?.map(PathBuf::from),
        cmdline: f.opt_str("boot_args")?,
    })
}

const MACHINE_FIELDS: &[&str] = &[
    "vcpu_count",
    "mem_size_mib",
    "smt",
    "track_dirty_pages",
    "huge_pages",
    "cpu_template",
];
/// What backs guest memory: ordinary pages, 2 MiB huge pages, or ordinary pages the host may
/// back with transparent huge pages.
const HUGE_PAGES: &[&str] = &["None", "2M", "Transparent"];

fn huge_pages(name: &str) -> vmm::HugePages {
    match name {
        "2M" => vmm::HugePages::Size2M,
        "Transparent" => vmm::HugePages::Transparent,
        _ => vmm::HugePages::None,
    }
}

/// The machine fields flint accepts only with the value that means "off", with the reason.
fn refuse_unsupported_machine_fields(f: &Fields) -> Result<(), BodyError> {
    if let Some(template) = f.get("cpu_template") {
        if template.as_str() != Some("None") {
            return Err(f.err(format!(
                "cpu_template: flint has no CPU templates and presents the host's CPU as KVM \
                 reports it; only \"None\" is accepted, not {}",
                quote(template)
            )));
        }
    }
    Ok(())
}

/// `PUT /machine-config`, config file `machine-config`: vCPUs, memory and its backing,
/// dirty-page tracking (`cpu_template` only as "None").
pub fn machine_config(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(v, ctx, MACHINE_FIELDS, &[])?;
    refuse_unsupported_machine_fields(&f)?;
    Ok(Request::SetMachineConfig {
        vcpus: f.req_uint("vcpu_count", u32::MAX.into())? as u32,
        mem_mib: f.req_uint("mem_size_mib", u64::MAX)?,
        smt: f.opt_bool("smt")?.unwrap_or(false),
        huge_pages: huge_pages(f.opt_choice("huge_pages", HUGE_PAGES)?.unwrap_or("None")),
        track_dirty_pages: f.opt_bool("track_dirty_pages")?.unwrap_or(false),
    })
}

/// `PATCH /machine-config`: every field optional.
pub fn machine_config_update(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(v, ctx, MACHINE_FIELDS, &[])?;
    refuse_unsupported_machine_fields(&f)?;
    Ok(Request::UpdateMachineConfig(MachineUpdate {
        vcpus: f.opt_uint("vcpu_count", u32::MAX.into())?.map(|n| n as u32),
        mem_mib: f.opt_uint("mem_size_mib", u64::MAX)?,
        smt: f.opt_bool("smt")?,
        huge_pages: f.opt_choice("huge_pages", HUGE_PAGES)?.map(huge_pages),
        track_dirty_pages: f.opt_bool("track_dirty_pages")?,
    }))
}

const CACHE_TYPES: &[&str] = &["Unsafe", "Writeback"];
/// Firecracker's engines. flint serves every drive with its own engine (synchronous reads and
/// writes on the event loop, see devices::virtio::block): "Async" (Firecracker's io_uring engine) is a
/// host-side choice the guest cannot see, so it is accepted and served the same way.
const IO_ENGINES: &[&str] = &["Sync", "Async"];

/// `PUT /drives/{drive_id}`, config file `drives[]`. `cache_type` defaults to "Unsafe", as
/// in Firecracker.
pub fn drive(v: &Value, ctx: &str) -> Result<DriveConfig, BodyError> {
    let f = Fields::new(
        v,
        ctx,
        &[
            "drive_id",
            "path_on_host",
            "is_root_device",
            "is_read_only",
            "partuuid",
            "cache_type",
            "io_engine",
            "rate_limiter",
        ],
        &[("socket", "is not supported: flint has no vhost-user drives")],
    )?;
    let cache = match f.opt_choice("cache_type", CACHE_TYPES)? {
        Some("Writeback") => CacheType::Writeback,
        _ => CacheType::Unsafe,
    };
    f.opt_choice("io_engine", IO_ENGINES)?;
    Ok(DriveConfig {
        id: Some(f.req_str("drive_id")?),
        path: f.req_str("path_on_host")?.into(),
        root: f.req_bool("is_root_device")?,
        read_only: f.opt_bool("is_read_only")?.unwrap_or(false),
        partuuid: f.opt_str("partuuid")?,
        cache,
        rate_limiter: rate_limiter(&f, "rate_limiter")?,
    })
}

/// The object at `name` (not null), whose keys must all be in `allowed`.
fn nested<'a>(
    f: &Fields<'a>,
    name: &str,
    v: &'a Value,
    allowed: &[&str],
) -> Result<&'a Map<String, Value>, BodyError> {
    let Value::Object(map) = v else {
        return Err(f.err(format!("{name} must be a JSON object, not {}", quote(v))));
    };
    if let Some(key) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(f.err(format!(
            "unknown field '{name}.{}' (expected {})",
            quote_str(key),
            allowed.join(", ")
        )));
    }
    Ok(map)
}

/// A whole number in `min..=max` at `name` (already known to be present).
fn bounded(f: &Fields, name: &str, v: &Value, min: u64, max: u64) -> Result<u64, BodyError> {
    v.as_u64()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            f.err(format!(
                "{name} must be a whole number from {min} to {max}, not {}",
                quote(v)
            ))
        })
}

/// A Firecracker token bucket: `{"size": N, "one_time_burst": N?, "refill_time": MS}`. A size
/// or refill time of 0 is no bucket (no limit), as in Firecracker.
fn token_bucket(f: &Fields, name: &str, v: &Value) -> Result<Option<TokenBucketConfig>, BodyError> {
    let map = nested(f, name, v, &["size", "one_time_burst", "refill_time"])?;
    let field = |key: &str| map.get(key).filter(|v| !v.is_null());
    let required = |key: &str| {
        field(key).ok_or_else(|| f.err(format!("missing required field '{name}.{key}'")))
    };
    let bucket = TokenBucketConfig {
        size: bounded(f, &format!("{name}.size"), required("size")?, 0, u64::MAX)?,
        one_time_burst: field("one_time_burst")
            .map(|v| bounded(f, &format!("{name}.one_time_burst"), v, 0, u64::MAX))
            .transpose()?
            .unwrap_or(0),
        refill_time_ms: bounded(
            f,
            &format!("{name}.refill_time"),
            required("refill_time")?,
            0,
            u64::MAX,
        )?,
    };
    Ok((bucket.size != 0 && bucket.refill_time_ms != 0).then_some(bucket))
}

/// A Firecracker rate limiter at `name`: `{"bandwidth": BUCKET?, "ops": BUCKET?}`; absent or
/// null is no limiter.
fn rate_limiter(f: &Fields, name: &str) -> Result<Option<RateLimiterConfig>, BodyError> {
    let Some(v) = f.get(name) else {
        return Ok(None);
    };
    let map = nested(f, name, v, &["bandwidth", "ops"])?;
    let bucket = |key: &str| {
        map.get(key)
            .filter(|v| !v.is_null())
            .map(|v| token_bucket(f, &format!("{name}.{key}"), v))
            .transpose()
            .map(Option::flatten)
    };
    Ok(Some(RateLimiterConfig {
        bandwidth: bucket("bandwidth")?,
        ops: bucket("ops")?,
    }))
}

#[derive(Serialize)]
struct TokenBucketOut {
    size: u64,
    one_time_burst: u64,
    refill_time: u64,
}

#[derive(Serialize)]
struct RateLimiterOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    bandwidth: Option<TokenBucketOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ops: Option<TokenBucketOut>,
}

fn rate_limiter_out(r: &Option<RateLimiterConfig>) -> Option<RateLimiterOut> {
    let bucket = |b: &TokenBucketConfig| TokenBucketOut {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time: b.refill_time_ms,
    };
    r.as_ref().map(|r| RateLimiterOut {
        bandwidth: r.bandwidth.as_ref().map(bucket),
        ops: r.ops.as_ref().map(bucket),
    })
}

/// `PATCH /drives/{drive_id}`: the drive's id, and its new backing file and/or rate limiter.
pub fn partial_drive(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(v, ctx, &["drive_id", "path_on_host", "rate_limiter"], &[])?;
    Ok(Request::UpdateDrive {
        id: f.req_str("drive_id")?,
        path: f.opt_str("path_on_host")?.map(PathBuf::from),
        rate_limiter: rate_limiter(&f, "rate_limiter")?,
    })
}

/// `PATCH /network-interfaces/{iface_id}`: the interface's id and its new rate limiters.
pub fn partial_network_interface(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(
        v,
        ctx,
        &["iface_id", "rx_rate_limiter", "tx_rate_limiter"],
        &[],
    )?;
    Ok(Request::UpdateNetworkInterface {
        id: f.req_str("iface_id")?,
        rx_rate_limiter: rate_limiter(&f, "rx_rate_limiter")?,
        tx_rate_limiter: rate_limiter(&f, "tx_rate_limiter")?,
    })
}

/// Parse `aa:bb:cc:dd:ee:ff` (hex digits in either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub use vmm::config::format_mac;

/// `PUT /network-interfaces/{iface_id}`, config file `network-interfaces[]`.
pub fn network_interface(v: &Value, ctx: &str) -> Result<NetConfig, BodyError> {
    let f = Fields::new(
        v,
        ctx,
        &[
            "iface_id",
            "host_dev_name",
            "guest_mac",
            "rx_rate_limiter",
            "tx_rate_limiter",
            "mtu",
        ],
        &[],
    )?;
    let mac = match f.opt_str("guest_mac")? {
        None => None,
        Some(s) => Some(parse_mac(&s).ok_or_else(|| {
            f.err(format!(
                "guest_mac must be a MAC address such as \"06:00:ac:10:00:02\", not \"{s}\""
            ))
        })?),
    };
    Ok(NetConfig {
        id: Some(f.req_str("iface_id")?),
        tap: f.req_str("host_dev_name")?,
        mac,
        rx_rate_limiter: rate_limiter(&f, "rx_rate_limiter")?,
        tx_rate_limiter: rate_limiter(&f, "tx_rate_limiter")?,
        mtu: f.opt_uint("mtu", u16::MAX.into())?.map(|m| m as u16),
    })
}

/// `PUT /vsock`, config file `vsock`. `vsock_id` (deprecated in Firecracker) is accepted and
/// ignored.
pub fn vsock(v: &Value, ctx: &str) -> Result<VsockConfig, BodyError> {
    let f = Fields::new(v, ctx, &["guest_cid", "uds_path", "vsock_id"], &[])?;
    f.opt_str("vsock_id")?;
    Ok(VsockConfig {
        guest_cid: f.req_uint("guest_cid", u32::MAX.into())?,
        uds_path: f.req_str("uds_path")?.into(),
    })
}

/// `PUT /entropy`, config file `entropy`: `{}` or `{"rate_limiter": ...}`.
pub fn entropy(v: &Value, ctx: &str) -> Result<Option<RateLimiterConfig>, BodyError> {
    let f = Fields::new(v, ctx, &["rate_limiter"], &[])?;
    rate_limiter(&f, "rate_limiter")
}

/// The entropy device's configuration in the API's schema.
pub fn entropy_json(rate_limiter: &Option<RateLimiterConfig>) -> Value {
    match rate_limiter_out(rate_limiter) {
        Some(r) => serde_json::json!({ "rate_limiter": to_value(r) }),
        None => serde_json::json!({}),
    }
}

const BALLOON_FIELDS: &[&str] = &[
    "amount_mib",
    "deflate_on_oom",
    "stats_polling_interval_s",
    "free_page_reporting",
    "free_page_hinting",
];

/// `PUT /balloon`, config file `balloon`: `amount_mib` and `deflate_on_oom` required,
/// `stats_polling_interval_s` (0, no statistics, by default) and `free_page_reporting`
/// optional; `free_page_hinting` only as false.
pub fn balloon(v: &Value, ctx: &str) -> Result<vmm::BalloonConfig, BodyError> {
    let f = Fields::new(v, ctx, BALLOON_FIELDS, &[])?;
    if f.opt_bool("free_page_hinting")? == Some(true) {
        return Err(f.err(
            "free_page_hinting: flint has no free page hinting; the balloon's \
             free_page_reporting gives the guest's free memory back to the host instead"
                .into(),
        ));
    }
    Ok(vmm::BalloonConfig {
        amount_mib: f.req_uint("amount_mib", u32::MAX.into())? as u32,
        deflate_on_oom: f.req_bool("deflate_on_oom")?,
        stats_polling_interval_s: f
            .opt_uint("stats_polling_interval_s", u16::MAX.into())?
            .unwrap_or(0) as u16,
        free_page_reporting: f.opt_bool("free_page_reporting")?.unwrap_or(false),
    })
}

/// `PATCH /balloon`: `{"amount_mib": N}`.
pub fn balloon_update(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(v, ctx, &["amount_mib"], &[])?;
    Ok(Request::UpdateBalloon {
        amount_mib: f.req_uint("amount_mib", u32::MAX.into())? as u32,
    })
}

/// `PATCH /balloon/statistics`: `{"stats_polling_interval_s": N}`.
pub fn balloon_stats_update(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(v, ctx, &["stats_polling_interval_s"], &[])?;
    Ok(Request::UpdateBalloonStats {
        stats_polling_interval_s: f.req_uint("stats_polling_interval_s", u16::MAX.into())? as u16,
    })
}

/// The balloon's configuration in the API's schema.
pub fn balloon_json(b: &vmm::BalloonConfig) -> Value {
    serde_json::json!({
        "amount_mib": b.amount_mib,
        "deflate_on_oom": b.deflate_on_oom,
        "stats_polling_interval_s": b.stats_polling_interval_s,
        "free_page_reporting": b.free_page_reporting,
        "free_page_hinting": false,
    })
}

/// `GET /balloon/statistics`: the balloon's size, then each statistic the guest reported.
pub fn balloon_stats_json(s: &vmm::controller::BalloonStats) -> Value {
    let mut map = Map::new();
    map.insert("target_pages".into(), s.target_pages.into());
    map.insert("actual_pages".into(), s.actual_pages.into());
    map.insert("target_mib".into(), (s.target_pages / 256).into());
    map.insert("actual_mib".into(), (s.actual_pages / 256).into());
    for (name, value) in s.guest.reported() {
        map.insert(name.into(), value.into());
    }
    Value::Object(map)
}

/// `PUT /mmds/config`, config file `mmds-config`: the NICs that serve the MMDS (by
/// `iface_id`), its `version` ("V1" default, "V2"), `ipv4_address` (default 169.254.169.254)
/// and `imds_compat`.
pub fn mmds_config(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(
        v,
        ctx,
        &[
            "version",
            "network_interfaces",
            "ipv4_address",
            "imds_compat",
        ],
        &[],
    )?;
    let version = match f.opt_choice("version", &["V1", "V2"])? {
        Some("V2") => devices::mmds::MmdsVersion::V2,
        _ => devices::mmds::MmdsVersion::V1,
    };
    let network_interfaces = match f.get("network_interfaces") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    f.err(format!(
                        "network_interfaces must be a list of interface ids, not a list with {}",
                        quote(i)
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(f.err(format!(
                "network_interfaces must be a list of interface ids, not {}",
                quote(other)
            )))
        }
        None => return Err(f.err("missing required field 'network_interfaces'".into())),
    };
    let ipv4_address = match f.opt_str("ipv4_address")? {
        None => devices::mmds::DEFAULT_IPV4,
        Some(a) => a.parse().map_err(|_| {
            f.err(format!(
                "ipv4_address must be an IPv4 address such as \"169.254.169.254\", not {}",
                quote(&Value::String(a.clone()))
            ))
        })?,
    };
    Ok(Request::SetMmdsConfig {
        version,
        ipv4_address,
        network_interfaces,
        imds_compat: f.opt_bool("imds_compat")?.unwrap_or(false),
    })
}

/// `PUT`/`PATCH /mmds`: the data, a JSON object.
pub fn mmds_data(v: &Value) -> Result<Value, BodyError> {
    match v {
        Value::Object(_) => Ok(v.clone()),
        other => Err(BodyError(format!(
            "the MMDS data must be a JSON object, not {}",
            quote(other)
        ))),
    }
}

/// The MMDS configuration in the API's schema.
pub fn mmds_config_json(m: &vmm::MmdsConfig) -> Value {
    serde_json::json!({
        "version": match m.version {
            devices::mmds::MmdsVersion::V1 => "V1",
            devices::mmds::MmdsVersion::V2 => "V2",
        },
        "network_interfaces": m.network_interfaces,
        "ipv4_address": m.ipv4_address.to_string(),
        "imds_compat": m.imds_compat,
    })
}

/// `PUT /actions`.
pub fn action(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(v, ctx, &["action_type"], &[])?;
    Ok(
        match f.req_choice(
            "action_type",
            &["InstanceStart", "SendCtrlAltDel", "FlushMetrics"],
        )? {
            "InstanceStart" => Request::Start,
            "SendCtrlAltDel" => Request::SendCtrlAltDel,
            _ => Request::FlushMetrics,
        },
    )
}

/// `PATCH /vm`.
pub fn vm_state(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(v, ctx, &["state"], &[])?;
    Ok(match f.req_choice("state", &["Paused", "Resumed"])? {
        "Paused" => Request::Pause,
        _ => Request::Resume,
    })
}

/// `PUT /snapshot/create`: a full snapshot, or a diff of a VM that tracks dirty pages.
pub fn snapshot_create(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(
        v,
        ctx,
        &["snapshot_path", "mem_file_path", "snapshot_type"],
        &[(
            "version",
            "is not supported: flint writes its own snapshot format",
        )],
    )?;
    let snapshot_type = match f.opt_choice("snapshot_type", &["Full", "Diff"])? {
        Some("Diff") => vmm::SnapshotType::Diff,
        _ => vmm::SnapshotType::Full,
    };
    Ok(Request::CreateSnapshot {
        snapshot_path: f.req_str("snapshot_path")?.into(),
        mem_file_path: f.req_str("mem_file_path")?.into(),
        snapshot_type,
    })
}

/// `PUT /snapshot/load`: the memory file comes as `mem_backend` (of type `File`) or, as in
/// older Firecracker versions, `mem_file_path`; or a page-fault handler serves it
/// (`mem_backend` of type `Uffd`, whose path is the handler's socket).
pub fn snapshot_load(v: &Value, ctx: &str) -> Result<Request, BodyError> {
    let f = Fields::new(
        v,
        ctx,
        &[
            "snapshot_path",
            "mem_file_path",
            "mem_backend",
            "resume_vm",
            "enable_diff_snapshots",
            "track_dirty_pages",
            "network_overrides",
            "vsock_override",
            "clock_realtime",
            "huge_pages",
        ],
        &[],
    )?;
    // "Snapshot" (and no value): as the snapshot's VM had it.
    let huge_pages = match f.opt_choice("huge_pages", &["Snapshot", "None", "Transparent", "2M"])? {
        Some("2M") => Some(vmm::HugePages::Size2M),
        Some("None") => Some(vmm::HugePages::None),
        Some("Transparent") => Some(vmm::HugePages::Transparent),
        _ => None,
    };
    // `enable_diff_snapshots` is Firecracker's older name of `track_dirty_pages`.
    let track_dirty_pages = match (
        f.opt_bool("track_dirty_pages")?,
        f.opt_bool("enable_diff_snapshots")?,
    ) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(false) || b.unwrap_or(false)),
    };
    let mem_backend = match (f.opt_str("mem_file_path")?, f.get("mem_backend")) {
        (Some(path), None) => vmm::MemBackend::File(path.into()),
        (None, Some(backend)) => {
            let ctx = format!("{}mem_backend", f.ctx);
            let b = Fields::new(backend, &ctx, &["backend_type", "backend_path"], &[])?;
            let uffd = b.req_choice("backend_type", &["File", "Uffd"])? == "Uffd";
            let path = PathBuf::from(b.req_str("backend_path")?);
            if uffd {
                vmm::MemBackend::Uffd(path)
            } else {
                vmm::MemBackend::File(path)
            }
        }
        (Some(_), Some(_)) => {
            return Err(f.err("give either mem_backend or mem_file_path, not both".into()))
        }
        (None, None) => {
            return Err(f.err("missing required field 'mem_backend' (or 'mem_file_path')".into()))
        }
    };
    let mut taps = Vec::new();
    if let Some(list) = f.get("network_overrides") {
        let Value::Array(items) = list else {
            return Err(f.err(format!(
                "network_overrides must be a list, not {}",
                quote(list)
            )));
        };
        for (i, item) in items.iter().enumerate() {
            let ctx = format!("{}network_overrides[{i}]", f.ctx);
            let o = Fields::new(item, &ctx, &["iface_id", "host_dev_name"], &[])?;
            taps.push((o.req_str("iface_id")?, o.req_str("host_dev_name")?));
        }
    }
    let vsock_uds_path = match f.get("vsock_override") {
        None => None,
        Some(v) => {
            let ctx = format!("{}vsock_override", f.ctx);
            let o = Fields::new(v, &ctx, &["uds_path"], &[])?;
            Some(PathBuf::from(o.req_str("uds_path")?))
        }
    };
    let clock = if f.opt_bool("clock_realtime")?.unwrap_or(false) {
        vmm::ClockRestore::Realtime
    } else {
        vmm::ClockRestore::AsSaved
    };
    Ok(Request::LoadSnapshot {
        snapshot_path: f.req_str("snapshot_path")?.into(),
        mem_backend,
        resume: f.opt_bool("resume_vm")?.unwrap_or(false),
        overrides: LoadOverrides {
            taps,
            vsock_uds_path,
            clock,
            huge_pages,
            track_dirty_pages,
        },
    })
}

/// `PUT /logger`, config file `logger`. The level is accepted in any case and passed on in
/// Firecracker's spelling ("Warning", ...).
pub fn logger(v: &Value, ctx: &str) -> Result<LoggerConfig, BodyError> {
    let f = Fields::new(
        v,
        ctx,
        &[
            "log_path",
            "level",
            "show_level",
            "show_log_origin",
            "module",
        ],
        &[],
    )?;
    let level = match f.get("level") {
        None => None,
        Some(l) => Some(
            l.as_str()
                .and_then(|s| LOG_LEVELS.iter().find(|c| c.eq_ignore_ascii_case(s)))
                .map(|c| c.to_string())
                .ok_or_else(|| {
                    f.err(format!(
                        "level must be one of {} (in any case), not {}",
                        LOG_LEVELS.join(", "),
                        quote(l)
                    ))
                })?,
        ),
    };
    Ok(LoggerConfig {
        path: f.opt_str("log_path")?.map(PathBuf::from),
        level,
        show_level: f.opt_bool("show_level")?.unwrap_or(false),
        show_log_origin: f.opt_bool("show_log_origin")?.unwrap_or(false),
        module: f.opt_str("module")?,
    })
}

/// `PUT /metrics`, config file `metrics`.
pub fn metrics(v: &Value, ctx: &str) -> Result<MetricsConfig, BodyError> {
    let f = Fields::new(v, ctx, &["metrics_path", "emit_id", "properties"], &[])?;
    let mut properties = std::collections::BTreeMap::new();
    if let Some(map) = f.get("properties") {
        let Value::Object(map) = map else {
            return Err(f.err(format!(
                "properties must be a JSON object, not {}",
                quote(map)
            )));
        };
        for (key, value) in map {
            let value = value.as_str().ok_or_else(|| {
                f.err(format!(
                    "properties.{} must be a string, not {}",
                    quote_str(key),
                    quote(value)
                ))
            })?;
            properties.insert(key.clone(), value.to_string());
        }
    }
    Ok(MetricsConfig {
        path: f.req_str("metrics_path")?.into(),
        emit_id: f.opt_bool("emit_id")?.unwrap_or(false),
        properties,
    })
}

// ---- Answers and GET /vm/config, in the same schema. ----

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[derive(Serialize)]
struct InstanceInfoOut<'a> {
    id: &'a str,
    state: &'static str,
    vmm_version: &'a str,
    app_name: &'a str,
}

/// `GET /` answer.
pub fn instance_info_json(i: &InstanceInfo) -> Value {
    to_value(InstanceInfoOut {
        id: &i.id,
        state: i.state.as_str(),
        vmm_version: &i.vmm_version,
        app_name: "flint",
    })
}

/// `GET /version` answer: Firecracker's key and flint's own, both with flint's version.
pub fn version_json() -> Value {
    let version = env!("CARGO_PKG_VERSION");
    serde_json::json!({ "firecracker_version": version, "vmm_version": version })
}

#[derive(Serialize)]
struct MachineConfigOut {
    vcpu_count: u32,
    mem_size_mib: u64,
    smt: bool,
    track_dirty_pages: bool,
    huge_pages: &'static str,
}

/// `GET /machine-config` answer.
pub fn machine_config_json(vm: &VmConfig) -> Value {
    to_value(MachineConfigOut {
        vcpu_count: vm.vcpus,
        mem_size_mib: vm.mem_mib,
        smt: vm.smt,
        track_dirty_pages: vm.track_dirty_pages,
        huge_pages: vm.huge_pages.as_str(),
    })
}

#[derive(Serialize)]
struct BootSourceOut {
    kernel_image_path: String,
    initrd_path: Option<String>,
    boot_args: Option<String>,
}

pub fn boot_source_json(b: &BootSource) -> Value {
    to_value(BootSourceOut {
        kernel_image_path: path_string(&b.kernel),
        initrd_path: b.initrd.as_deref().map(path_string),
        boot_args: b.cmdline.clone(),
    })
}

#[derive(Serialize)]
struct DriveOut<'a> {
    drive_id: &'a str,
    path_on_host: String,
    is_root_device: bool,
    is_read_only: bool,
    partuuid: Option<&'a str>,
    cache_type: &'static str,
    io_engine: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limiter: Option<RateLimiterOut>,
}

/// One drive; `n` is its place, which names a drive without an id (one from a snapshot of
/// a VM the CLI started).
pub fn drive_json(n: usize, d: &DriveConfig) -> Value {
    let fallback = format!("drive{n}");
    to_value(DriveOut {
        drive_id: d.id.as_deref().unwrap_or(&fallback),
        path_on_host: path_string(&d.path),
        is_root_device: d.root,
        is_read_only: d.read_only,
        partuuid: d.partuuid.as_deref(),
        cache_type: match d.cache {
            CacheType::Unsafe => "Unsafe",
            CacheType::Writeback => "Writeback",
        },
        io_engine: "Sync",
        rate_limiter: rate_limiter_out(&d.rate_limiter),
    })
}

#[derive(Serialize)]
struct NetworkInterfaceOut<'a> {
    iface_id: &'a str,
    host_dev_name: &'a str,
    guest_mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rx_rate_limiter: Option<RateLimiterOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tx_rate_limiter: Option<RateLimiterOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mtu: Option<u16>,
}

/// One interface; `index` names one without an id (`eth<index>`).
pub fn network_interface_json(index: usize, n: &NetConfig) -> Value {
    let fallback = format!("eth{index}");
    to_value(NetworkInterfaceOut {
        iface_id: n.id.as_deref().unwrap_or(&fallback),
        host_dev_name: &n.tap,
        guest_mac: n.mac.as_ref().map(format_mac),
        rx_rate_limiter: rate_limiter_out(&n.rx_rate_limiter),
        tx_rate_limiter: rate_limiter_out(&n.tx_rate_limiter),
        mtu: n.mtu,
    })
}

#[derive(Serialize)]
struct VsockOut {
    guest_cid: u64,
    uds_path: String,
}

pub fn vsock_json(v: &VsockConfig) -> Value {
    to_value(VsockOut {
        guest_cid: v.guest_cid,
        uds_path: path_string(&v.uds_path),
    })
}

#[derive(Serialize)]
struct LoggerOut<'a> {
    log_path: Option<String>,
    level: Option<&'a str>,
    show_level: bool,
    show_log_origin: bool,
    module: Option<&'a str>,
}

pub fn logger_json(l: &LoggerConfig) -> Value {
    to_value(LoggerOut {
        log_path: l.path.as_deref().map(path_string),
        level: l.level.as_deref(),
        show_level: l.show_level,
        show_log_origin: l.show_log_origin,
        module: l.module.as_deref(),
    })
}

pub fn metrics_json(metrics: &MetricsConfig) -> Value {
    let mut v = serde_json::json!({ "metrics_path": path_string(&metrics.path) });
    if metrics.emit_id {
        v["emit_id"] = true.into();
    }
    if !metrics.properties.is_empty() {
        v["properties"] = serde_json::json!(metrics.properties);
    }
    v
}

fn to_value(v: impl Serialize) -> Value {
    // Serializing these plain structs (strings, numbers, booleans) cannot fail.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err<T: std::fmt::Debug>(r: Result<T, BodyError>) -> String {
        let msg = r.unwrap_err().0;
        assert!(!msg.contains('\n'), "{msg}");
        msg
    }

    #[test]
    fn boot_source_bodies() {
        let b = boot_source(
            &json!({"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "quiet"}),
            "",
        )
        .unwrap();
        assert_eq!(
            b,
            BootSource {
                kernel: "/k".into(),
                initrd: Some("/i".into()),
                cmdline: Some("quiet".into())
            }
        );
        let b = boot_source(&json!({"kernel_image_path": "/k", "initrd_path": null}), "").unwrap();
        assert_eq!((b.initrd, b.cmdline), (None, None));
        assert_eq!(
            err(boot_source(&json!({}), "")),
            "missing required field 'kernel_image_path'"
        );
        assert_eq!(
            err(boot_source(&json!({"kernel_image_path": 5}), "")),
            "kernel_image_path must be a string, not 5"
        );
        assert_eq!(
            err(boot_source(&json!({"kernel_image_path": null}), "")),
            "kernel_image_path must be a string, not null"
        );
        let e = err(boot_source(
            &json!({"kernel_image_path": "/k", "kernel": "/k"}),
            "",
        ));
        assert!(
            e.starts_with("unknown field 'kernel' (expected kernel_image_path"),
            "{e}"
        );
        assert_eq!(
            err(boot_source(&json!([1]), "")),
            "expected a JSON object, not [1]"
        );
    }

    #[test]
    fn machine_config_bodies() {
        let m = machine_config(&json!({"vcpu_count": 2, "mem_size_mib": 256}), "").unwrap();
        assert_eq!(
            m,
            Request::SetMachineConfig {
                vcpus: 2,
                mem_mib: 256,
                smt: false,
                huge_pages: vmm::HugePages::None,
                track_dirty_pages: false,
            }
        );
        // Off, as given explicitly.
        let m = machine_config(
            &json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "track_dirty_pages": false,
                    "huge_pages": "None", "cpu_template": "None"}),
            "",
        )
        .unwrap();
        assert_eq!(
            m,
            Request::SetMachineConfig {
                vcpus: 1,
                mem_mib: 128,
                smt: false,
                huge_pages: vmm::HugePages::None,
                track_dirty_pages: false,
            }
        );
        for (field, value, why) in [
            (
                "cpu_template",
                json!("T2"),
                "cpu_template: flint has no CPU templates",
            ),
            (
                "huge_pages",
                json!("1G"),
                "huge_pages must be one of \"None\", \"2M\", \"Transparent\", not \"1G\"",
            ),
        ] {
            let mut body = json!({"vcpu_count": 1, "mem_size_mib": 128});
            body[field] = value.clone();
            let msg = err(machine_config(&body, ""));
            assert!(msg.starts_with(why), "{body}: {msg}");
            let msg = err(machine_config_update(&json!({ field: value }), ""));
            assert!(msg.starts_with(why), "PATCH {field}: {msg}");
        }
        // Huge pages and dirty-page tracking are passed on (the VMM checks the memory size
        // against the huge page size), in PUT and PATCH.
        assert_eq!(
            machine_config(
                &json!({"vcpu_count": 1, "mem_size_mib": 256, "huge_pages": "2M",
                        "track_dirty_pages": true}),
                ""
            )
            .unwrap(),
            Request::SetMachineConfig {
                vcpus: 1,
                mem_mib: 256,
                smt: false,
                huge_pages: vmm::HugePages::Size2M,
                track_dirty_pages: true,
            }
        );
        assert_eq!(
            machine_config_update(&json!({"huge_pages": "2M", "track_dirty_pages": true}), "")
                .unwrap(),
            Request::UpdateMachineConfig(MachineUpdate {
                huge_pages: Some(vmm::HugePages::Size2M),
                track_dirty_pages: Some(true),
                ..Default::default()
            })
        );
        // SMT is passed on (the VMM checks the vCPU count), in PUT and PATCH.
        assert_eq!(
            machine_config(
                &json!({"vcpu_count": 2, "mem_size_mib": 128, "smt": true}),
                ""
            )
            .unwrap(),
            Request::SetMachineConfig {
                vcpus: 2,
                mem_mib: 128,
                smt: true,
                huge_pages: vmm::HugePages::None,
                track_dirty_pages: false,
            }
        );
        assert_eq!(
            machine_config_update(&json!({ "smt": true }), "").unwrap(),
            Request::UpdateMachineConfig(MachineUpdate {
                smt: Some(true),
                ..Default::default()
            })
        );
        // 0 vCPUs is for the VMM to refuse; the API passes it on.
        assert_eq!(
            machine_config(&json!({"vcpu_count": 0, "mem_size_mib": 128}), "").unwrap(),
            Request::SetMachineConfig {
                vcpus: 0,
                mem_mib: 128,
                smt: false,
                huge_pages: vmm::HugePages::None,
                track_dirty_pages: false,
            }
        );
        for (body, want) in [
            (
                json!({"mem_size_mib": 128}),
                "missing required field 'vcpu_count'",
            ),
            (
                json!({"vcpu_count": 1}),
                "missing required field 'mem_size_mib'",
            ),
            (
                json!({"vcpu_count": -1, "mem_size_mib": 128}),
                "vcpu_count must be a whole number from 0 to 4294967295, not -1",
            ),
            (
                json!({"vcpu_count": 1.5, "mem_size_mib": 128}),
                "vcpu_count must be a whole number from 0 to 4294967295, not 1.5",
            ),
            (
                json!({"vcpu_count": 4294967296u64, "mem_size_mib": 128}),
                "vcpu_count must be a whole number from 0 to 4294967295, not 4294967296",
            ),
            (
                json!({"vcpu_count": "2", "mem_size_mib": 128}),
                "vcpu_count must be a whole number from 0 to 4294967295, not \"2\"",
            ),
            (
                json!({"vcpu_count": 1, "mem_size_mib": 1e30}),
                "mem_size_mib must be a whole number from 0 to 18446744073709551615, not 1e+30",
            ),
            (
                json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": "yes"}),
                "smt must be true or false, not \"yes\"",
            ),
            (
                json!({"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "1G"}),
                "huge_pages must be one of \"None\", \"2M\", \"Transparent\", not \"1G\"",
            ),
            (
                json!({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": 7}),
                "cpu_template: flint has no CPU templates and presents the host's CPU as KVM \
                 reports it; only \"None\" is accepted, not 7",
            ),
        ] {
            assert_eq!(err(machine_config(&body, "")), want, "{body}");
        }
    }

    #[test]
    fn machine_config_updates() {
        assert_eq!(
            machine_config_update(&json!({}), "").unwrap(),
            Request::UpdateMachineConfig(MachineUpdate::default())
        );
        let u =
            machine_config_update(&json!({"mem_size_mib": 512, "huge_pages": "None"}), "").unwrap();
        assert_eq!(
            u,
            Request::UpdateMachineConfig(MachineUpdate {
                mem_mib: Some(512),
                huge_pages: Some(vmm::HugePages::None),
                ..Default::default()
            })
        );
        assert_eq!(
            err(machine_config_update(&json!({"vcpus": 2}), "")),
            "unknown field 'vcpus' (expected vcpu_count, mem_size_mib, smt, track_dirty_pages, \
             huge_pages, cpu_template)"
        );
    }

    #[test]
    fn drive_bodies() {
        let d = drive(
            &json!({"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true,
                    "is_read_only": true, "partuuid": "1234-01", "cache_type": "Writeback",
                    "io_engine": "Sync", "rate_limiter": null}),
            "",
        )
        .unwrap();
        assert_eq!(
            d,
            DriveConfig {
                id: Some("rootfs".into()),
                path: "/r.ext4".into(),
                root: true,
                read_only: true,
                partuuid: Some("1234-01".into()),
                cache: CacheType::Writeback,
                rate_limiter: None,
            }
        );
        let base = json!({"drive_id": "d", "path_on_host": "/d", "is_root_device": false});
        let d = drive(&base, "").unwrap();
        assert!(!d.read_only && d.cache == CacheType::Unsafe && d.partuuid.is_none());
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            b
        };
        assert_eq!(
            drive(&with("io_engine", json!("Async")), ""),
            drive(&base, "")
        );
        assert_eq!(
            err(drive(&with("io_engine", json!("Uring")), "")),
            "io_engine must be one of \"Sync\", \"Async\", not \"Uring\""
        );
        assert_eq!(
            err(drive(&with("rate_limiter", json!({"bandwidth": {}})), "")),
            "missing required field 'rate_limiter.bandwidth.size'"
        );
        assert_eq!(
            err(drive(&with("is_root_device", json!(1)), "")),
            "is_root_device must be true or false, not 1"
        );
        assert_eq!(
            err(drive(&with("cache_type", json!("unsafe")), "")),
            "cache_type must be one of \"Unsafe\", \"Writeback\", not \"unsafe\""
        );
        assert_eq!(
            err(drive(&json!({"drive_id": "d", "path_on_host": "/d"}), "")),
            "missing required field 'is_root_device'"
        );
        assert_eq!(
            partial_drive(&json!({"drive_id": "d", "path_on_host": "/n"}), "").unwrap(),
            Request::UpdateDrive {
                id: "d".into(),
                path: Some("/n".into()),
                rate_limiter: None,
            }
        );
        // Only a rate limiter, as Firecracker's clients send it after start.
        assert_eq!(
            partial_drive(
                &json!({"drive_id": "d", "rate_limiter": {"ops": {"size": 9, "refill_time": 1000}}}),
                ""
            )
            .unwrap(),
            Request::UpdateDrive {
                id: "d".into(),
                path: None,
                rate_limiter: Some(RateLimiterConfig {
                    bandwidth: None,
                    ops: Some(TokenBucketConfig::per_second(9)),
                }),
            }
        );
        assert_eq!(
            partial_network_interface(
                &json!({"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 1000}}}),
                ""
            )
            .unwrap(),
            Request::UpdateNetworkInterface {
                id: "eth0".into(),
                rx_rate_limiter: None,
                tx_rate_limiter: Some(RateLimiterConfig {
                    bandwidth: Some(TokenBucketConfig::per_second(1000)),
                    ops: None,
                }),
            }
        );
        assert_eq!(
            err(partial_network_interface(
                &json!({"iface_id": "eth0", "guest_mac": "x"}),
                ""
            )),
            "unknown field 'guest_mac' (expected iface_id, rx_rate_limiter, tx_rate_limiter)"
        );
    }

    #[test]
    fn rate_limiter_bodies() {
        let base = json!({"drive_id": "d", "path_on_host": "/d", "is_root_device": false});
        let with = |rl: Value| {
            let mut v = base.clone();
            v["rate_limiter"] = rl;
            drive(&v, "")
        };
        let d = with(json!({
            "bandwidth": {"size": 1048576, "one_time_burst": 4096, "refill_time": 100},
            "ops": {"size": 10, "refill_time": 1000}
        }))
        .unwrap();
        assert_eq!(
            d.rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig {
                    size: 1 << 20,
                    one_time_burst: 4096,
                    refill_time_ms: 100,
                }),
                ops: Some(TokenBucketConfig::per_second(10)),
            })
        );
        assert_eq!(with(Value::Null).unwrap().rate_limiter, None);
        assert_eq!(
            with(json!({"bandwidth": null, "ops": null}))
                .unwrap()
                .rate_limiter,
            Some(RateLimiterConfig::default())
        );
        // Round trip through the answer.
        assert_eq!(drive(&drive_json(0, &d), "").unwrap(), d);
        let cases = [
            (json!(5), "rate_limiter must be a JSON object, not 5"),
            (
                json!({"bw": {}}),
                "unknown field 'rate_limiter.bw' (expected bandwidth, ops)",
            ),
            (
                json!({"ops": {"size": 1, "refill_time": 1, "x": 1}}),
                "unknown field 'rate_limiter.ops.x' (expected size, one_time_burst, refill_time)",
            ),
            (
                json!({"ops": []}),
                "rate_limiter.ops must be a JSON object, not []",
            ),
            (
                json!({"bandwidth": {"size": 1.5, "refill_time": 100}}),
                "rate_limiter.bandwidth.size must be a whole number from 0 to \
                 18446744073709551615, not 1.5",
            ),
            (
                json!({"ops": {"size": 1}}),
                "missing required field 'rate_limiter.ops.refill_time'",
            ),
            (
                json!({"ops": {"size": 1, "refill_time": -1}}),
                "rate_limiter.ops.refill_time must be a whole number from 0 to \
                 18446744073709551615, not -1",
            ),
            (
                json!({"ops": {"size": 1, "refill_time": 1, "one_time_burst": "x"}}),
                "rate_limiter.ops.one_time_burst must be a whole number from 0 to \
                 18446744073709551615, not \"x\"",
            ),
        ];
        for (rl, want) in cases {
            assert_eq!(err(with(rl)), want);
        }
        // A size or refill time of 0 is no limit, as in Firecracker.
        for zero in [
            json!({"bandwidth": {"size": 0, "refill_time": 100}, "ops": {"size": 5, "refill_time": 0}}),
            json!({"bandwidth": null, "ops": {"size": 0, "refill_time": 0}}),
        ] {
            assert_eq!(
                with(zero.clone()).unwrap().rate_limiter,
                Some(RateLimiterConfig::default()),
                "{zero}"
            );
        }
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:ff"),
            Some([6, 0, 0xac, 0x10, 0, 0xff])
        );
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "06:00:ac:10:00:0g",
            "06-00-ac-10-00-02",
            "+6:00:ac:10:00:02",
            "06:00:ac:10:00:02\n",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        assert_eq!(
            format_mac(&[6, 0, 0xac, 0x10, 0, 0xff]),
            "06:00:ac:10:00:ff"
        );
    }

    #[test]
    fn network_interface_bodies() {
        let n = network_interface(
            &json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}),
            "",
        )
        .unwrap();
        assert_eq!(
            n,
            NetConfig {
                id: Some("eth0".into()),
                tap: "tap0".into(),
                mac: Some([6, 0, 0xac, 0x10, 0, 2]),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
                mtu: None,
            }
        );
        assert_eq!(
            err(network_interface(
                &json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00"}),
                ""
            )),
            "guest_mac must be a MAC address such as \"06:00:ac:10:00:02\", not \"06:00\""
        );
        let n = network_interface(
            &json!({"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {},
                    "tx_rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}),
            "",
        )
        .unwrap();
        assert_eq!(n.rx_rate_limiter, Some(RateLimiterConfig::default()));
        let mtu = |v: Value| {
            let mut body = json!({"iface_id": "eth0", "host_dev_name": "tap0"});
            body["mtu"] = v;
            network_interface(&body, "")
        };
        assert_eq!(mtu(json!(9000)).unwrap().mtu, Some(9000));
        assert_eq!(mtu(Value::Null).unwrap().mtu, None);
        assert_eq!(
            err(mtu(json!(65536))),
            "mtu must be a whole number from 0 to 65535, not 65536"
        );
        assert_eq!(
            n.tx_rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: None,
                ops: Some(TokenBucketConfig::per_second(100)),
            })
        );
        assert_eq!(
            err(network_interface(
                &json!({"iface_id": "eth0", "host_dev_name": "tap0",
                        "tx_rate_limiter": {"bandwidth": {"size": -1, "refill_time": 1}}}),
                "network-interfaces[0]"
            )),
            "network-interfaces[0]: tx_rate_limiter.bandwidth.size must be a whole number \
             from 0 to 18446744073709551615, not -1"
        );
        assert_eq!(
            err(network_interface(&json!({"iface_id": "eth0"}), "")),
            "missing required field 'host_dev_name'"
        );
    }

    #[test]
    fn small_bodies() {
        assert_eq!(
            vsock(
                &json!({"guest_cid": 3, "uds_path": "/v.sock", "vsock_id": "v"}),
                ""
            )
            .unwrap(),
            VsockConfig {
                guest_cid: 3,
                uds_path: "/v.sock".into()
            }
        );
        assert_eq!(
            err(vsock(&json!({"guest_cid": -3, "uds_path": "/v"}), "")),
            "guest_cid must be a whole number from 0 to 4294967295, not -3"
        );
        assert_eq!(entropy(&json!({}), "").unwrap(), None);
        assert_eq!(entropy(&json!({"rate_limiter": null}), "").unwrap(), None);
        let limited = json!({"rate_limiter": {"ops": {"size": 10, "refill_time": 1000}}});
        let got = entropy(&limited, "").unwrap();
        assert_eq!(
            got,
            Some(RateLimiterConfig {
                bandwidth: None,
                ops: Some(TokenBucketConfig::per_second(10)),
            })
        );
        assert_eq!(entropy(&entropy_json(&got), "").unwrap(), got);
        assert_eq!(
            err(entropy(&json!({"x": 1}), "")),
            "unknown field 'x' (expected rate_limiter)"
        );
        for (a, want) in [
            ("InstanceStart", Request::Start),
            ("SendCtrlAltDel", Request::SendCtrlAltDel),
            ("FlushMetrics", Request::FlushMetrics),
        ] {
            assert_eq!(action(&json!({ "action_type": a }), "").unwrap(), want);
        }
        assert_eq!(
            err(action(&json!({"action_type": "Reboot"}), "")),
            "action_type must be one of \"InstanceStart\", \"SendCtrlAltDel\", \"FlushMetrics\", \
             not \"Reboot\""
        );
        assert_eq!(
            vm_state(&json!({"state": "Paused"}), "").unwrap(),
            Request::Pause
        );
        assert_eq!(
            vm_state(&json!({"state": "Resumed"}), "").unwrap(),
            Request::Resume
        );
        assert_eq!(
            err(vm_state(&json!({}), "")),
            "missing required field 'state'"
        );
        assert_eq!(
            metrics(&json!({"metrics_path": "/m"}), "").unwrap(),
            MetricsConfig::to_path("/m")
        );
        let full = json!({"metrics_path": "/m", "emit_id": true, "properties": {"a": "b"}});
        let got = metrics(&full, "").unwrap();
        assert!(got.emit_id);
        assert_eq!(got.properties["a"], "b");
        assert_eq!(metrics_json(&got), full);
        assert_eq!(
            err(metrics(
                &json!({"metrics_path": "/m", "properties": {"a": 1}}),
                ""
            )),
            "properties.a must be a string, not 1"
        );
    }

    #[test]
    fn logger_bodies() {
        let l = logger(
            &json!({"log_path": "/l", "level": "warning", "show_level": true}),
            "",
        )
        .unwrap();
        assert_eq!(
            l,
            LoggerConfig {
                path: Some("/l".into()),
                level: Some("Warning".into()),
                show_level: true,
                show_log_origin: false,
                module: None,
            }
        );
        assert_eq!(
            err(logger(&json!({"log_path": "/l", "level": "loud"}), "")),
            "level must be one of Error, Warning, Info, Debug, Trace, Off (in any case), not \"loud\""
        );
        let l = logger(&json!({"module": "vmm", "level": "Debug"}), "").unwrap();
        assert_eq!((l.path, l.module.as_deref()), (None, Some("vmm")));
    }

    #[test]
    fn errors_carry_their_context_and_quote_briefly() {
        assert_eq!(
            err(drive(&json!({"drive_id": 1}), "drives[2]")),
            "drives[2]: drive_id must be a string, not 1"
        );
        let long = "x".repeat(100);
        let e = err(boot_source(&json!({ "kernel_image_path": [long] }), ""));
        assert!(e.ends_with("...") && e.len() < 120, "{e}");
    }

    #[test]
    fn answers_round_trip() {
        let d = DriveConfig {
            id: Some("d".into()),
            read_only: true,
            cache: CacheType::Writeback,
            ..DriveConfig::new("/d")
        };
        assert_eq!(drive(&drive_json(0, &d), "").unwrap(), d);
        // A drive without an id (from a snapshot of a CLI-started VM) is named by its place.
        let anonymous = DriveConfig { id: None, ..d };
        assert_eq!(drive_json(2, &anonymous)["drive_id"], "drive2");
        let n = NetConfig {
            id: Some("eth0".into()),
            tap: "tap0".into(),
            mac: Some([1, 2, 3, 4, 5, 6]),
            rx_rate_limiter: Some(RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig::per_second(1000)),
                ops: None,
            }),
            tx_rate_limiter: None,
            mtu: Some(9000),
        };
        assert_eq!(
            network_interface(&network_interface_json(0, &n), "").unwrap(),
            n
        );
        let m = VmConfig {
            vcpus: 4,
            mem_mib: 1024,
            huge_pages: vmm::HugePages::Size2M,
            track_dirty_pages: true,
            ..VmConfig::new("/k")
        };
        assert_eq!(
            machine_config(&machine_config_json(&m), "").unwrap(),
            Request::SetMachineConfig {
                vcpus: 4,
                mem_mib: 1024,
                smt: false,
                huge_pages: vmm::HugePages::Size2M,
                track_dirty_pages: true,
            }
        );
        let b = BootSource {
            kernel: "/k".into(),
            initrd: None,
            cmdline: Some("a=b".into()),
        };
        assert_eq!(boot_source(&boot_source_json(&b), "").unwrap(), b);
        let l = LoggerConfig {
            path: Some("/l".into()),
            module: None,
            level: None,
            show_level: false,
            show_log_origin: true,
        };
        assert_eq!(logger(&logger_json(&l), "").unwrap(), l);
        let v = VsockConfig {
            guest_cid: 7,
            uds_path: "/v".into(),
        };
        assert_eq!(vsock(&vsock_json(&v), "").unwrap(), v);
        let v = version_json();
        assert_eq!(v["firecracker_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["vmm_version"], env!("CARGO_PKG_VERSION"));
    }
}
