//! Fuzz the REST API's routes and JSON schema: a method, a path and a body become a request
//! for the VMM or an answer, never a panic. Bodies are also read as a config file (the same
//! schema), and every request the schema accepts must survive the trip back to JSON and be
//! read again unchanged.
//!
//! Input: a method byte, a route byte (picks a path prefix), the rest of the path up to the
//! first newline, then the body.

#![no_main]

use flint::api::routes::{self, Routed};
use flint::api::{schema, ApiRequest};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vmm::controller::Request;

const METHODS: &[&str] = &["GET", "PUT", "PATCH", "POST", "DELETE", "get", ""];
const PREFIXES: &[&str] = &[
    "/",
    "/version",
    "/actions",
    "/boot-source",
    "/machine-config",
    "/drives/",
    "/network-interfaces/",
    "/vsock",
    "/entropy",
    "/vm",
    "/vm/config",
    "/logger",
    "/metrics",
    "/snapshot/create",
    "/snapshot/load",
    "/balloon",
    "/balloon/statistics",
    "",
];

/// A request the schema accepted, written back as JSON and read again, is the same request.
fn round_trip(request: &ApiRequest) {
    let request = match request {
        ApiRequest::SetLogger(l) => {
            let v = schema::logger_json(l);
            assert_eq!(&schema::logger(&v, "").unwrap(), l, "{v}");
            return;
        }
        ApiRequest::Vmm(request) => request,
    };
    match request {
        Request::SetBootSource(b) => {
            let v = schema::boot_source_json(b);
            assert_eq!(&schema::boot_source(&v, "").unwrap(), b, "{v}");
        }
        Request::SetMachineConfig {
            vcpus,
            mem_mib,
            smt,
            huge_pages,
            track_dirty_pages,
        } => {
            let vm = vmm::VmConfig {
                vcpus: *vcpus,
                mem_mib: *mem_mib,
                smt: *smt,
                huge_pages: *huge_pages,
                track_dirty_pages: *track_dirty_pages,
                ..vmm::VmConfig::new("")
            };
            let v = schema::machine_config_json(&vm);
            assert_eq!(&schema::machine_config(&v, "").unwrap(), request, "{v}");
        }
        Request::SetDrive(d) => {
            let v = schema::drive_json(0, d);
            assert_eq!(&schema::drive(&v, "").unwrap(), d, "{v}");
        }
        Request::SetNetworkInterface(n) => {
            let v = schema::network_interface_json(0, n);
            assert_eq!(&schema::network_interface(&v, "").unwrap(), n, "{v}");
        }
        Request::SetVsock(s) => {
            let v = schema::vsock_json(s);
            assert_eq!(&schema::vsock(&v, "").unwrap(), s, "{v}");
        }
        Request::SetMetrics(m) => {
            let v = schema::metrics_json(m);
            assert_eq!(&schema::metrics(&v, "").unwrap(), m, "{v}");
        }
        Request::SetBalloon(b) => {
            let v = schema::balloon_json(b);
            assert_eq!(&schema::balloon(&v, "").unwrap(), b, "{v}");
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let [m, r, rest @ ..] = data else {
        return;
    };
    let method = METHODS[usize::from(*m) % METHODS.len()];
    let prefix = PREFIXES[usize::from(*r) % PREFIXES.len()];
    let (tail, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let path = format!("{prefix}{}", String::from_utf8_lossy(tail));

    match routes::route(method, &path, body) {
        Routed::Forward(request) => round_trip(&request),
        Routed::Reply(reply) => {
            assert!(reply.status == 200 || (400..500).contains(&reply.status));
            if reply.status != 200 {
                let message = reply.body.as_ref().unwrap()["fault_message"]
                    .as_str()
                    .unwrap()
                    .to_string();
                assert!(!message.contains('\n'), "{message}");
            }
        }
    }
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Ok(requests) = flint::config_file::from_json(&v) {
            requests.iter().for_each(round_trip);
        }
    }
});
