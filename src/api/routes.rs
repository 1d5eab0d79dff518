//! Routing: an HTTP method, path and body become a controller [`Request`] (or an answer given
//! without the VMM), and the VMM's answer becomes an HTTP status and JSON body.

use serde_json::Value;
use vmm::controller::{Request, RequestError, Response};

use super::schema::{self, BodyError};
use super::ApiRequest;
use crate::logger::LoggerConfig;

/// An answer to send: status, optional JSON body, and for 405 the allowed methods.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
    pub allow: Option<&'static str>,
}

impl Reply {
    pub fn no_content() -> Reply {
        Reply {
            status: 204,
            body: None,
            allow: None,
        }
    }

    pub fn ok(body: Value) -> Reply {
        Reply {
            status: 200,
            body: Some(body),
            allow: None,
        }
    }

    /// An error answer with Firecracker's body, `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: impl Into<String>) -> Reply {
        Reply {
            status,
            body: Some(serde_json::json!({ "fault_message": message.into() })),
            allow: None,
        }
    }
}

/// What to do with one request.
#[derive(Debug, PartialEq)]
pub enum Routed {
    /// Ask the VMM thread.
    Forward(ApiRequest),
    /// Answer directly (bad request, unknown path, `GET /version`).
    Reply(Reply),
}

impl From<BodyError> for Routed {
    fn from(e: BodyError) -> Routed {
        Routed::Reply(Reply::fault(400, e.0))
    }
}

/// Decode percent-escapes in one path segment.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The routes: path pattern (`{}` is one non-empty segment) and its methods.
const ROUTES: &[(&str, &str)] = &[
    ("/", "GET"),
    ("/version", "GET"),
    ("/actions", "PUT"),
    ("/boot-source", "PUT"),
    ("/machine-config", "GET, PUT, PATCH"),
    ("/drives/{}", "PUT, PATCH"),
    ("/network-interfaces/{}", "PUT, PATCH"),
    ("/vsock", "PUT"),
    ("/entropy", "PUT"),
    ("/vm", "PATCH"),
    ("/vm/config", "GET"),
    ("/logger", "PUT"),
    ("/metrics", "PUT"),
    ("/snapshot/create", "PUT"),
    ("/snapshot/load", "PUT"),
    ("/mmds", "GET, PUT, PATCH"),
    ("/mmds/config", "PUT"),
    ("/balloon", "GET, PUT, PATCH"),
    ("/balloon/statistics", "GET, PATCH"),
];

/// Match `path` (without query) against the routes: the pattern, its methods and the decoded
/// `{}` segment, if any.
fn find_route(path: &str) -> Result<Option<(&'static str, &'static str, String)>, Reply> {
    for (pattern, methods) in ROUTES {
        match pattern.strip_suffix("{}") {
            None if path == *pattern => return Ok(Some((pattern, methods, String::new()))),
            None => {}
            Some(prefix) => {
                if let Some(id) = path.strip_prefix(prefix) {
                    if !id.is_empty() && !id.contains('/') {
                        let id = percent_decode(id).ok_or_else(|| {
                            Reply::fault(400, format!("the path {path} has a bad percent-escape"))
                        })?;
                        return Ok(Some((pattern, methods, id)));
                    }
                }
            }
        }
    }
    Ok(None)
}

/// Firecracker's paths for features flint does not have, with the reason: a client gets a
/// 400 that says so, not a 404 that looks like a typo.
const MISSING_FEATURES: &[(&str, &str)] = &[
    (
        "/balloon/hinting",
        "flint has no free page hinting; the balloon's free_page_reporting gives the guest's \
         free memory back to the host instead",
    ),
    (
        "/cpu-config",
        "flint takes no custom CPU templates; the guest sees the host's CPU as KVM reports it",
    ),
    ("/hotplug", "flint cannot hot-plug devices or memory"),
    ("/pmem", "flint has no virtio-pmem devices"),
    (
        "/serial",
        "flint always connects the serial console to its standard input and output",
    ),
];

/// The reason flint lacks what `path` (one of Firecracker's) is about, if it is one.
fn missing_feature(path: &str) -> Option<&'static str> {
    MISSING_FEATURES.iter().find_map(|(prefix, reason)| {
        let rest = path.strip_prefix(prefix)?;
        (rest.is_empty() || rest.starts_with('/')).then_some(*reason)
    })
}

/// Parse a request body as one JSON value.
fn json_body(body: &[u8]) -> Result<Value, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Reply::fault(400, "the request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| Reply::fault(400, format!("the body is not valid JSON: {e}")))
}

/// The id in the path and the one in the body must agree.
fn same_id(field: &str, in_path: &str, in_body: &str) -> Result<(), BodyError> {
    if in_path == in_body {
        Ok(())
    } else {
        Err(BodyError(format!(
            "{field} '{}' in the body does not match '{}' in the path",
            schema::quote_str(in_body),
            schema::quote_str(in_path)
        )))
    }
}

/// Route one request. `path` may carry a query string, which is ignored.
pub fn route(method: &str, path: &str, body: &[u8]) -> Routed {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let (pattern, methods, id) = match find_route(path) {
        Err(reply) => return Routed::Reply(reply),
        Ok(None) => {
            return Routed::Reply(match missing_feature(path) {
                Some(reason) => Reply::fault(400, format!("{path}: {reason}")),
                None => Reply::fault(404, format!("no such path: {path}")),
            })
        }
        Ok(Some(found)) => found,
    };
    if !methods.split(", ").any(|m| m == method) {
        return Routed::Reply(Reply {
            allow: Some(methods),
            ..Reply::fault(405, format!("{path} accepts {methods}, not {method}"))
        });
    }
    match (method, pattern) {
        ("GET", "/") => return Routed::Forward(Request::Describe.into()),
        ("GET", "/version") => return Routed::Reply(Reply::ok(schema::version_json())),
        ("GET", "/machine-config") => return Routed::Forward(Request::GetMachineConfig.into()),
        ("GET", "/vm/config") => return Routed::Forward(Request::GetFullConfig.into()),
        ("GET", "/mmds") => return Routed::Forward(Request::GetMmds.into()),
        ("GET", "/balloon") => return Routed::Forward(Request::GetBalloon.into()),
        ("GET", "/balloon/statistics") => return Routed::Forward(Request::GetBalloonStats.into()),
        _ => {}
    }
    let v = match json_body(body) {
        Ok(v) => v,
        Err(reply) => return Routed::Reply(reply),
    };
    match with_body(method, pattern, &id, &v) {
        Ok(request) => Routed::Forward(request),
        Err(e) => e.into(),
    }
}

/// Requests that carry a JSON body.
fn with_body(method: &str, pattern: &str, id: &str, v: &Value) -> Result<ApiRequest, BodyError> {
    let request = match (method, pattern) {
        ("PUT", "/logger") => return Ok(ApiRequest::SetLogger(schema::logger(v, "")?)),
        ("PUT", "/actions") => schema::action(v, "")?,
        ("PUT", "/boot-source") => Request::SetBootSource(schema::boot_source(v, "")?),
        ("PUT", "/machine-config") => schema::machine_config(v, "")?,
        ("PATCH", "/machine-config") => schema::machine_config_update(v, "")?,
        ("PUT", "/drives/{}") => {
            let drive = schema::drive(v, "")?;
            same_id("drive_id", id, drive.id.as_deref().unwrap_or_default())?;
            Request::SetDrive(drive)
        }
        ("PATCH", "/drives/{}") => {
            let update = schema::partial_drive(v, "")?;
            if let Request::UpdateDrive { id: drive_id, .. } = &update {
                same_id("drive_id", id, drive_id)?;
            }
            update
        }
        ("PUT", "/network-interfaces/{}") => {
            let iface = schema::network_interface(v, "")?;
            same_id("iface_id", id, iface.id.as_deref().unwrap_or_default())?;
            Request::SetNetworkInterface(iface)
        }
        ("PATCH", "/network-interfaces/{}") => {
            let update = schema::partial_network_interface(v, "")?;
            if let Request::UpdateNetworkInterface { id: iface_id, .. } = &update {
                same_id("iface_id", id, iface_id)?;
            }
            update
        }
        ("PUT", "/vsock") => Request::SetVsock(schema::vsock(v, "")?),
        ("PUT", "/entropy") => Request::SetEntropy(schema::entropy(v, "")?),
        ("PATCH", "/vm") => schema::vm_state(v, "")?,
        ("PUT", "/metrics") => Request::SetMetrics(schema::metrics(v, "")?),
        ("PUT", "/snapshot/create") => schema::snapshot_create(v, "")?,
        ("PUT", "/snapshot/load") => schema::snapshot_load(v, "")?,
        ("PUT", "/mmds") => Request::PutMmds(schema::mmds_data(v)?),
        ("PATCH", "/mmds") => Request::PatchMmds(schema::mmds_data(v)?),
        ("PUT", "/mmds/config") => schema::mmds_config(v, "")?,
        ("PUT", "/balloon") => Request::SetBalloon(schema::balloon(v, "")?),
        ("PATCH", "/balloon") => schema::balloon_update(v, "")?,
        ("PATCH", "/balloon/statistics") => schema::balloon_stats_update(v, "")?,
        // Every (method, pattern) pair of ROUTES is handled above or in `route`.
        _ => return Err(BodyError(format!("{method} {pattern} is not implemented"))),
    };
    Ok(ApiRequest::Vmm(request))
}

/// The HTTP answer for the VMM thread's answer to `request` (`logger`: where flint logs, for
/// `GET /vm/config`).
pub fn reply_for(
    request: &ApiRequest,
    result: Result<Response, RequestError>,
    logger: Option<&LoggerConfig>,
) -> Reply {
    match result {
        Ok(Response::Done) => Reply::no_content(),
        Ok(Response::Info(info)) => Reply::ok(schema::instance_info_json(&info)),
        Ok(Response::Mmds(data)) => Reply::ok(data),
        Ok(Response::Balloon(b)) => Reply::ok(schema::balloon_json(&b)),
        Ok(Response::BalloonStats(s)) => Reply::ok(schema::balloon_stats_json(&s)),
        Ok(Response::Config(view)) => match request {
            ApiRequest::Vmm(Request::GetMachineConfig) => {
                Reply::ok(schema::machine_config_json(&view.vm))
            }
            _ => Reply::ok(crate::config_file::to_json(&view, logger)),
        },
        Err(e) => Reply::fault(400, schema::request_error_message(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::controller::{BootSource, ConfigView, InstanceInfo, MachineUpdate, VmState};
    use vmm::{CacheType, DriveConfig, Field, NetConfig, VmConfig, VsockConfig};

    fn fwd(method: &str, path: &str, body: &str) -> Request {
        match route(method, path, body.as_bytes()) {
            Routed::Forward(ApiRequest::Vmm(r)) => r,
            Routed::Forward(other) => panic!("{method} {path}: {other:?}"),
            Routed::Reply(r) => panic!("{method} {path}: {r:?}"),
        }
    }

    fn refused(method: &str, path: &str, body: &str) -> (u16, String) {
        match route(method, path, body.as_bytes()) {
            Routed::Forward(r) => panic!("{method} {path} was forwarded as {r:?}"),
            Routed::Reply(r) => {
                let msg = r.body.as_ref().unwrap()["fault_message"]
                    .as_str()
                    .unwrap()
                    .to_string();
                assert!(!msg.contains('\n'));
                (r.status, msg)
            }
        }
    }

    #[test]
    fn every_route_reaches_its_request() {
        assert_eq!(fwd("GET", "/", ""), Request::Describe);
        assert_eq!(fwd("GET", "/?x=1", ""), Request::Describe);
        assert_eq!(fwd("GET", "/machine-config", ""), Request::GetMachineConfig);
        assert_eq!(fwd("GET", "/vm/config", ""), Request::GetFullConfig);
        assert_eq!(
            fwd(
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/k", "boot_args": "quiet"}"#
            ),
            Request::SetBootSource(BootSource {
                kernel: "/k".into(),
                initrd: None,
                cmdline: Some("quiet".into())
            })
        );
        assert_eq!(
            fwd(
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256}"#
            ),
            Request::SetMachineConfig {
                vcpus: 2,
                mem_mib: 256,
                smt: false,
                huge_pages: vmm::HugePages::None,
                track_dirty_pages: false,
            }
        );
        assert_eq!(
            fwd("PATCH", "/machine-config", r#"{"vcpu_count": 4}"#),
            Request::UpdateMachineConfig(MachineUpdate {
                vcpus: Some(4),
                ..Default::default()
            })
        );
        assert_eq!(
            fwd(
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}"#
            ),
            Request::SetDrive(DriveConfig {
                id: Some("rootfs".into()),
                root: true,
                cache: CacheType::Unsafe,
                ..DriveConfig::new("/r")
            })
        );
        assert_eq!(
            fwd(
                "PATCH",
                "/drives/data",
                r#"{"drive_id": "data", "path_on_host": "/new"}"#
            ),
            Request::UpdateDrive {
                id: "data".into(),
                path: Some("/new".into()),
                rate_limiter: None,
            }
        );
        assert_eq!(
            fwd(
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#
            ),
            Request::SetNetworkInterface(NetConfig {
                id: Some("eth0".into()),
                ..NetConfig::new("tap0")
            })
        );
        assert_eq!(
            fwd("PUT", "/vsock", r#"{"guest_cid": 3, "uds_path": "/v"}"#),
            Request::SetVsock(VsockConfig {
                guest_cid: 3,
                uds_path: "/v".into()
            })
        );
        assert_eq!(fwd("PUT", "/entropy", "{}"), Request::SetEntropy(None));
        assert_eq!(
            fwd(
                "PUT",
                "/entropy",
                r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#
            ),
            Request::SetEntropy(Some(vmm::RateLimiterConfig {
                bandwidth: Some(vmm::TokenBucketConfig {
                    size: 1000,
                    one_time_burst: 0,
                    refill_time_ms: 100
                }),
                ops: None,
            }))
        );
        assert_eq!(
            fwd("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
            Request::Start
        );
        assert_eq!(
            fwd("PATCH", "/vm", r#"{"state": "Paused"}"#),
            Request::Pause
        );
        assert_eq!(
            route("PUT", "/logger", br#"{"log_path": "/l", "level": "Debug"}"#),
            Routed::Forward(ApiRequest::SetLogger(LoggerConfig {
                path: Some("/l".into()),
                module: None,
                level: Some("Debug".into()),
                show_level: false,
                show_log_origin: false
            }))
        );
        assert_eq!(
            fwd("PUT", "/metrics", r#"{"metrics_path": "/m"}"#),
            Request::SetMetrics(vmm::controller::MetricsConfig::to_path("/m"))
        );
    }

    #[test]
    fn snapshot_bodies() {
        let create = Request::CreateSnapshot {
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
            snapshot_type: vmm::SnapshotType::Full,
        };
        assert_eq!(
            fwd(
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#
            ),
            create
        );
        assert_eq!(
            fwd(
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/m"}"#
            ),
            create
        );
        assert_eq!(
            fwd(
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_type": "Diff", "snapshot_path": "/s", "mem_file_path": "/m"}"#
            ),
            Request::CreateSnapshot {
                snapshot_path: "/s".into(),
                mem_file_path: "/m".into(),
                snapshot_type: vmm::SnapshotType::Diff,
            }
        );
        let load = |resume| Request::LoadSnapshot {
            snapshot_path: "/s".into(),
            mem_backend: vmm::MemBackend::File("/m".into()),
            resume,
            overrides: Default::default(),
        };
        assert_eq!(
            fwd(
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": true}"#
            ),
            load(true)
        );
        assert_eq!(
            fwd(
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "huge_pages": "Snapshot"}"#
            ),
            load(false)
        );
        // A page-fault handler serves the memory (lazy restore).
        assert_eq!(
            fwd(
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u.sock"}}"#
            ),
            Request::LoadSnapshot {
                snapshot_path: "/s".into(),
                mem_backend: vmm::MemBackend::Uffd("/u.sock".into()),
                resume: false,
                overrides: Default::default(),
            }
        );
        // Memory backing and dirty-page tracking: as the snapshot had them unless given
        // (enable_diff_snapshots is Firecracker's older name of track_dirty_pages).
        let load_with = |huge_pages, track_dirty_pages| Request::LoadSnapshot {
            snapshot_path: "/s".into(),
            mem_backend: vmm::MemBackend::File("/m".into()),
            resume: false,
            overrides: vmm::controller::LoadOverrides {
                huge_pages,
                track_dirty_pages,
                ..Default::default()
            },
        };
        for (fields, huge, track) in [
            (r#""huge_pages": "2M""#, Some(vmm::HugePages::Size2M), None),
            (r#""huge_pages": "None""#, Some(vmm::HugePages::None), None),
            (
                r#""huge_pages": "Transparent""#,
                Some(vmm::HugePages::Transparent),
                None,
            ),
            (r#""track_dirty_pages": true"#, None, Some(true)),
            (r#""enable_diff_snapshots": true"#, None, Some(true)),
            (r#""enable_diff_snapshots": false"#, None, Some(false)),
            (
                r#""track_dirty_pages": false, "enable_diff_snapshots": true"#,
                None,
                Some(true),
            ),
        ] {
            let body = format!(r#"{{"snapshot_path": "/s", "mem_file_path": "/m", {fields}}}"#);
            assert_eq!(
                fwd("PUT", "/snapshot/load", &body),
                load_with(huge, track),
                "{body}"
            );
        }
        // E2B's and firecracker-go-sdk's overrides of the backends.
        assert_eq!(
            fwd(
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "resume_vm": true,
                    "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}],
                    "vsock_override": {"uds_path": "/v.sock"}, "clock_realtime": true,
                    "huge_pages": "Snapshot"}"#
            ),
            Request::LoadSnapshot {
                snapshot_path: "/s".into(),
                mem_backend: vmm::MemBackend::File("/m".into()),
                resume: true,
                overrides: vmm::controller::LoadOverrides {
                    taps: vec![("eth0".into(), "tap9".into())],
                    vsock_uds_path: Some("/v.sock".into()),
                    clock: vmm::ClockRestore::Realtime,
                    ..Default::default()
                },
            }
        );
        for (path, body, expected) in [
            (
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "network_overrides": [{"iface_id": "eth0"}]}"#,
                "network_overrides[0]: missing required field 'host_dev_name'",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "network_overrides": {}}"#,
                "network_overrides must be a list",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "huge_pages": "1G"}"#,
                "huge_pages must be one of",
            ),
            (
                "/snapshot/create",
                r#"{"snapshot_path": "/s"}"#,
                "missing required field 'mem_file_path'",
            ),
            (
                "/snapshot/create",
                r#"{"snapshot_type": "Incremental", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
                "snapshot_type must be one of \"Full\", \"Diff\"",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path": "/s"}"#,
                "missing required field 'mem_backend'",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
                "not both",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd"}}"#,
                "mem_backend: missing required field 'backend_path'",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_path": "/m"}}"#,
                "mem_backend: missing required field 'backend_type'",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "track_dirty_pages": "yes"}"#,
                "track_dirty_pages must be",
            ),
        ] {
            let (status, msg) = refused("PUT", path, body);
            assert_eq!(status, 400, "{body}");
            assert!(msg.contains(expected), "{body}: {msg}");
        }
    }

    #[test]
    fn version_is_answered_without_the_vmm() {
        match route("GET", "/version", b"") {
            Routed::Reply(r) => {
                assert_eq!(r.status, 200);
                assert_eq!(
                    r.body.unwrap()["firecracker_version"],
                    env!("CARGO_PKG_VERSION")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_in_the_path_are_percent_decoded_and_must_match_the_body() {
        assert_eq!(
            fwd(
                "PATCH",
                "/drives/my%20disk",
                r#"{"drive_id": "my disk", "path_on_host": "/n"}"#
            ),
            Request::UpdateDrive {
                id: "my disk".into(),
                path: Some("/n".into()),
                rate_limiter: None,
            }
        );
        assert_eq!(
            refused(
                "PUT",
                "/drives/a",
                r#"{"drive_id": "b", "path_on_host": "/r", "is_root_device": true}"#
            ),
            (
                400,
                "drive_id 'b' in the body does not match 'a' in the path".into()
            )
        );
        assert_eq!(
            refused(
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#
            ),
            (
                400,
                "iface_id 'eth1' in the body does not match 'eth0' in the path".into()
            )
        );
        assert_eq!(
            refused("PATCH", "/drives/a%zz", "{}"),
            (400, "the path /drives/a%zz has a bad percent-escape".into())
        );
        // Two hex digits exactly: no sign (which u8::from_str_radix would take).
        assert_eq!(
            refused("PATCH", "/drives/a%+1", "{}"),
            (400, "the path /drives/a%+1 has a bad percent-escape".into())
        );
    }

    /// Names and ids a client sends are quoted back escaped and shortened: an error message
    /// stays one line (it is logged) and short.
    #[test]
    fn names_quoted_in_errors_stay_one_short_line() {
        let (status, msg) = refused("PUT", "/entropy", "{\"a\\nb\": 1}");
        assert_eq!(status, 400);
        assert!(msg.starts_with("unknown field 'a\\nb' ("), "{msg}");
        let long = "k".repeat(1000);
        let (_, msg) = refused("PUT", "/entropy", &format!("{{\"{long}\": 1}}"));
        assert!(msg.len() < 200, "{msg}");
        let (_, msg) = refused(
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b\r\nc", "path_on_host": "/r", "is_root_device": true}"#,
        );
        assert_eq!(
            msg,
            "drive_id 'b\\r\\nc' in the body does not match 'a' in the path"
        );
        let (_, msg) = refused(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k", "boot_args": "", "x\u0000": 1}"#,
        );
        assert!(msg.starts_with("unknown field 'x\\u{0}' ("), "{msg}");
        let (_, msg) = refused(
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "path_on_host": "/r", "is_root_device": false,
                "rate_limiter": {"ops": {"size": 1, "refill_time": 1, "\n": 0}}}"#,
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn mmds_routes() {
        assert_eq!(fwd("GET", "/mmds", ""), Request::GetMmds);
        assert_eq!(
            fwd("PUT", "/mmds", r#"{"latest": {"id": "x"}}"#),
            Request::PutMmds(serde_json::json!({"latest": {"id": "x"}}))
        );
        assert_eq!(
            fwd("PATCH", "/mmds", r#"{"latest": null}"#),
            Request::PatchMmds(serde_json::json!({"latest": null}))
        );
        assert_eq!(
            fwd(
                "PUT",
                "/mmds/config",
                r#"{"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2", "imds_compat": true}"#
            ),
            Request::SetMmdsConfig {
                version: devices::mmds::MmdsVersion::V2,
                ipv4_address: "169.254.170.2".parse().unwrap(),
                network_interfaces: vec!["eth0".into()],
                imds_compat: true,
            }
        );
        assert_eq!(
            fwd("PUT", "/mmds/config", r#"{"network_interfaces": []}"#),
            Request::SetMmdsConfig {
                version: devices::mmds::MmdsVersion::V1,
                ipv4_address: devices::mmds::DEFAULT_IPV4,
                network_interfaces: vec![],
                imds_compat: false,
            }
        );
        for (body, expected) in [
            (
                r#"{"version": "V3", "network_interfaces": []}"#,
                "version must be one of",
            ),
            (
                r#"{"network_interfaces": "eth0"}"#,
                "network_interfaces must be a list",
            ),
            (
                r#"{"network_interfaces": [1]}"#,
                "network_interfaces must be a list",
            ),
            (
                r#"{"network_interfaces": [], "ipv4_address": "1.2.3"}"#,
                "ipv4_address must be an IPv4 address",
            ),
            (r#"{}"#, "missing required field 'network_interfaces'"),
        ] {
            let (status, msg) = refused("PUT", "/mmds/config", body);
            assert_eq!(status, 400, "{body}");
            assert!(msg.contains(expected), "{body}: {msg}");
        }
    }

    #[test]
    fn balloon_routes_reach_their_requests_and_bad_bodies_are_refused() {
        assert_eq!(
            fwd(
                "PUT",
                "/balloon",
                r#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 2,
                    "free_page_reporting": true, "free_page_hinting": false}"#
            ),
            Request::SetBalloon(vmm::BalloonConfig {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 2,
                free_page_reporting: true,
            })
        );
        assert_eq!(
            fwd(
                "PUT",
                "/balloon",
                r#"{"amount_mib": 0, "deflate_on_oom": false}"#
            ),
            Request::SetBalloon(vmm::BalloonConfig::default())
        );
        assert_eq!(
            fwd("PATCH", "/balloon", r#"{"amount_mib": 300}"#),
            Request::UpdateBalloon { amount_mib: 300 }
        );
        assert_eq!(fwd("GET", "/balloon", ""), Request::GetBalloon);
        assert_eq!(
            fwd("GET", "/balloon/statistics", ""),
            Request::GetBalloonStats
        );
        assert_eq!(
            fwd(
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 5}"#
            ),
            Request::UpdateBalloonStats {
                stats_polling_interval_s: 5
            }
        );
        for (method, path, body, expected) in [
            (
                "PUT",
                "/balloon",
                r#"{"amount_mib": 1}"#,
                "missing required field 'deflate_on_oom'",
            ),
            (
                "PUT",
                "/balloon",
                r#"{"amount_mib": 1, "deflate_on_oom": true, "free_page_hinting": true}"#,
                "free_page_hinting: flint has no free page hinting",
            ),
            (
                "PUT",
                "/balloon",
                r#"{"amount_mib": -1, "deflate_on_oom": true}"#,
                "amount_mib must be a whole number",
            ),
            (
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 70000}"#,
                "from 0 to 65535",
            ),
            (
                "PATCH",
                "/balloon",
                r#"{"deflate_on_oom": true}"#,
                "unknown field",
            ),
        ] {
            let (status, msg) = refused(method, path, body);
            assert_eq!(status, 400, "{body}");
            assert!(msg.contains(expected), "{body}: {msg}");
        }
        assert_eq!(refused("DELETE", "/balloon", "").0, 405);
    }

    #[test]
    fn firecrackers_paths_for_missing_features_say_why() {
        for (method, path, reason) in [
            ("PATCH", "/balloon/hinting/start", "free page hinting"),
            ("GET", "/balloon/hinting/status", "free page hinting"),
            ("PUT", "/cpu-config", "CPU templates"),
        ] {
            let (status, msg) = refused(method, path, "{}");
            assert_eq!(status, 400, "{method} {path}");
            assert!(msg.starts_with(&format!("{path}: flint ")), "{msg}");
            assert!(msg.contains(reason), "{msg}");
        }
        assert_eq!(refused("GET", "/mmdsx", "").0, 404);
    }

    #[test]
    fn unknown_paths_and_methods() {
        for path in [
            "/nope",
            "/drives",
            "/drives/",
            "/drives/a/b",
            "/machine-config/",
            "/vm/config/x",
            "",
        ] {
            assert_eq!(refused("GET", path, "").0, 404, "{path}");
        }
        let cases = [
            ("POST", "/"),
            ("PUT", "/"),
            ("DELETE", "/drives/a"),
            ("GET", "/drives/a"),
            ("GET", "/network-interfaces/e"),
            ("GET", "/actions"),
            ("PUT", "/vm"),
            ("PUT", "/vm/config"),
            ("HEAD", "/version"),
        ];
        for (method, path) in cases {
            match route(method, path, b"{}") {
                Routed::Reply(r) => {
                    assert_eq!(r.status, 405, "{method} {path}");
                    assert!(r.allow.is_some());
                }
                other => panic!("{method} {path}: {other:?}"),
            }
        }
        assert_eq!(
            refused("DELETE", "/machine-config", ""),
            (
                405,
                "/machine-config accepts GET, PUT, PATCH, not DELETE".into()
            )
        );
    }

    #[test]
    fn bad_bodies() {
        assert_eq!(
            refused("PUT", "/actions", ""),
            (400, "the request needs a JSON body".into())
        );
        let (status, msg) = refused("PUT", "/actions", "{");
        assert_eq!(status, 400);
        assert!(msg.starts_with("the body is not valid JSON: "), "{msg}");
        assert_eq!(
            refused(
                "PUT",
                "/actions",
                r#"{"action_type": "InstanceStart", "x": 1}"#
            ),
            (400, "unknown field 'x' (expected action_type)".into())
        );
        assert_eq!(
            refused("PATCH", "/vm", r#"{"state": "Running"}"#),
            (
                400,
                "state must be one of \"Paused\", \"Resumed\", not \"Running\"".into()
            )
        );
    }

    #[test]
    fn vmm_answers_become_http_answers() {
        let describe = ApiRequest::Vmm(Request::Describe);
        let reply_for = |r, result| reply_for(r, result, None);
        assert_eq!(
            reply_for(&describe, Ok(Response::Done)),
            Reply::no_content()
        );
        let r = reply_for(
            &describe,
            Err(RequestError {
                field: None,
                message: "the VM is already running".into(),
            }),
        );
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body.unwrap()["fault_message"],
            "the VM is already running"
        );
        // The VMM's field is named in the API's terms.
        let r = reply_for(
            &describe,
            Err(RequestError {
                field: Some(Field::Vcpus),
                message: "a VM needs at least 1 vCPU".into(),
            }),
        );
        assert_eq!(
            r.body.unwrap()["fault_message"],
            "vcpu_count: a VM needs at least 1 vCPU"
        );
        let r = reply_for(
            &describe,
            Ok(Response::Info(InstanceInfo {
                id: "vm1".into(),
                state: VmState::NotStarted,
                vmm_version: "0.1.0".into(),
            })),
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body.unwrap(),
            serde_json::json!({"id": "vm1", "state": "Not started", "vmm_version": "0.1.0",
                               "app_name": "flint"})
        );
        let view = || {
            Ok(Response::Config(Box::new(ConfigView {
                boot_source: None,
                vm: VmConfig::new(""),
                metrics: None,
            })))
        };
        let r = reply_for(&ApiRequest::Vmm(Request::GetMachineConfig), view());
        let body = r.body.unwrap();
        assert_eq!(body["huge_pages"], "None");
        assert_eq!(body["vcpu_count"], 1);
        let r = reply_for(&ApiRequest::Vmm(Request::GetFullConfig), view());
        assert_eq!(r.body.unwrap()["entropy"], serde_json::json!({}));
    }
}
