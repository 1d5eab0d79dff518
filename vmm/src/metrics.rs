//! Metrics: counters from the vCPUs, devices and API, written as one JSON object per line to the
//! file `PUT /metrics` names, periodically and on `FlushMetrics`.
//!
//! The line has Firecracker's layout where flint counts the same thing, so that tools that read
//! Firecracker's metrics read flint's: `vcpu.exit_*`; `block`, `net`, `vsock`, `entropy`
//! (all devices of the kind together) and `block_<drive id>`, `net_<iface id>` (one device)
//! with Firecracker's field names (`read_bytes`, `rx_bytes_count`, ...); the API's
//! `get_api_requests`, `put_api_requests` and `patch_api_requests` (`*_count`, `*_fails`).
//! flint's own counters sit beside them in the same objects, and in `api_requests` (every
//! request kind), `guest_warnings` and `vcpu.unhandled_*`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::virtio::balloon::BalloonMetrics;
use devices::virtio::block::BlockMetrics;
use devices::virtio::net::NetMetrics;
use devices::virtio::rng::RngMetrics;
use devices::virtio::vsock::VsockMetrics;

/// vCPU exits by kind, summed over all vCPUs.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    /// Interrupted `KVM_RUN` (kicks, signals).
    pub interrupted: AtomicU64,
    /// Exits that ended the VM or were unexpected.
    pub other: AtomicU64,
}

impl ExitCounters {
    /// The counts as they are now, as one line of text (for logs).
    pub fn summary(&self) -> String {
        format!(
            "port in {}, port out {}, MMIO read {}, MMIO write {}, interrupted {}, other {}",
            get(&self.io_in),
            get(&self.io_out),
            get(&self.mmio_read),
            get(&self.mmio_write),
            get(&self.interrupted),
            get(&self.other)
        )
    }
}

/// One device's counters, by kind.
#[derive(Clone)]
pub enum DeviceMetrics {
    Block {
        name: String,
        metrics: Arc<BlockMetrics>,
    },
    Rng(Arc<RngMetrics>),
    Net {
        name: String,
        metrics: Arc<NetMetrics>,
    },
    Vsock(Arc<VsockMetrics>),
    Balloon(Arc<BalloonMetrics>),
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// A block device's counters: Firecracker's names first, then flint's own.
fn block_fields(m: &BlockMetrics) -> Vec<(&'static str, u64)> {
    vec![
        ("read_count", get(&m.reads)),
        ("write_count", get(&m.writes)),
        ("flush_count", get(&m.flushes)),
        ("read_bytes", get(&m.bytes_read)),
        ("write_bytes", get(&m.bytes_written)),
        (
            "invalid_reqs_count",
            get(&m.unsupported) + get(&m.invalid_chains),
        ),
        ("execute_fails", get(&m.io_errors)),
        (
            "rate_limiter_throttled_events",
            get(&m.rate_limiter_throttled),
        ),
        ("get_id_count", get(&m.get_ids)),
        ("io_errors", get(&m.io_errors)),
        ("unsupported", get(&m.unsupported)),
        ("invalid_chains", get(&m.invalid_chains)),
        ("rate_limiter_throttled", get(&m.rate_limiter_throttled)),
    ]
}

/// A network device's counters: Firecracker's names first, then flint's own.
fn net_fields(m: &NetMetrics) -> Vec<(&'static str, u64)> {
    vec![
        ("rx_bytes_count", get(&m.rx_bytes)),
        ("rx_packets_count", get(&m.rx_frames)),
        ("rx_fails", get(&m.rx_errors)),
        ("tx_bytes_count", get(&m.tx_bytes)),
        ("tx_packets_count", get(&m.tx_frames)),
        ("tx_malformed_frames", get(&m.tx_malformed)),
        ("tx_fails", get(&m.tx_errors)),
        (
            "rx_rate_limiter_throttled",
            get(&m.rx_rate_limiter_throttled),
        ),
        (
            "tx_rate_limiter_throttled",
            get(&m.tx_rate_limiter_throttled),
        ),
        ("rx_frames", get(&m.rx_frames)),
        ("rx_bytes", get(&m.rx_bytes)),
        ("rx_dropped", get(&m.rx_dropped)),
        ("rx_errors", get(&m.rx_errors)),
        ("tx_frames", get(&m.tx_frames)),
        ("tx_bytes", get(&m.tx_bytes)),
        ("tx_malformed", get(&m.tx_malformed)),
        ("tx_errors", get(&m.tx_errors)),
        ("tx_blocked", get(&m.tx_blocked)),
    ]
}

/// Field-by-field sums of `objects` (all with the same fields), in their order.
fn sum_fields(objects: &[Vec<(&'static str, u64)>]) -> Option<Vec<(&'static str, u64)>> {
    let mut total = objects.first()?.clone();
    for object in &objects[1..] {
        for ((_, t), (_, v)) in total.iter_mut().zip(object) {
            *t = t.saturating_add(*v);
        }
    }
    Some(total)
}

/// A Firecracker metrics field and the flint request kinds it counts.
type ApiField = (&'static str, &'static [&'static str]);

/// Firecracker's API request groups from flint's request kinds: `(group, [(field, kinds)])`.
const API_GROUPS: &[(&str, &[ApiField])] = &[
    (
        "get_api_requests",
        &[
            ("instance_info", &["describe"]),
            ("machine_cfg", &["get_machine_config"]),
        ],
    ),
    (
        "put_api_requests",
        &[
            (
                "actions",
                &["instance_start", "send_ctrl_alt_del", "flush_metrics"],
            ),
            ("boot_source", &["put_boot_source"]),
            ("drive", &["put_drive"]),
            ("logger", &["put_logger"]),
            ("machine_cfg", &["put_machine_config"]),
            ("metrics", &["put_metrics"]),
            ("network", &["put_network_interface"]),
            ("vsock", &["put_vsock"]),
        ],
    ),
    (
        "patch_api_requests",
        &[
            ("drive", &["patch_drive"]),
            ("network", &["patch_network_interface"]),
            ("machine_cfg", &["patch_machine_config"]),
        ],
    ),
];

/// Requests by kind (`Request::kind`, and the front end's own such as `put_logger`).
pub type RequestCounts = std::collections::BTreeMap<&'static str, u64>;

/// The API's request counts: every kind in `api_requests`, and Firecracker's groups with
/// `<field>_count` and `<field>_fails` from the `requests` and the `refused` among them.
pub fn api_sections(
    requests: &RequestCounts,
    refused: &RequestCounts,
) -> Vec<(String, Vec<(String, u64)>)> {
    let mut sections = vec![(
        "api_requests".to_string(),
        requests.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    )];
    let sum = |counts: &RequestCounts, kinds: &[&str]| -> u64 {
        kinds.iter().filter_map(|k| counts.get(k)).sum()
    };
    for (group, fields) in API_GROUPS {
        let mut pairs = Vec::new();
        for (field, kinds) in *fields {
            pairs.push((format!("{field}_count"), sum(requests, kinds)));
            pairs.push((format!("{field}_fails"), sum(refused, kinds)));
        }
        sections.push((group.to_string(), pairs));
    }
    sections
}

/// A flat JSON object `{"k": v, ...}` of unsigned counters.
fn object<K: AsRef<str>>(pairs: &[(K, u64)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "\"{}\":{v}", k.as_ref());
    }
    s.push('}');
    s
}

/// `line` (a JSON object) with `"id"` first when `id` is given and a `"properties"` object
/// when there are any, as Firecracker's `emit_id` and `properties` add them.
pub fn with_id_and_properties(
    line: &str,
    id: Option<&str>,
    properties: &std::collections::BTreeMap<String, String>,
) -> String {
    let Some(rest) = line.strip_prefix('{') else {
        return line.to_string();
    };
    let mut out = String::from("{");
    if let Some(id) = id {
        let _ = write!(out, "\"id\":{},", serde_json::Value::from(id));
    }
    if !properties.is_empty() {
        let _ = write!(out, "\"properties\":{},", serde_json::json!(properties));
    }
    out.push_str(rest);
    out
}

/// Everything counted so far as one JSON line (without the newline). `sections` are extra
/// top-level objects, such as the API's request counts ([`api_sections`]).
pub fn json_line(
    timestamp_ms: u128,
    exits: &ExitCounters,
    unhandled: (u64, u64),
    devices: &[DeviceMetrics],
    sections: &[(String, Vec<(String, u64)>)],
) -> String {
    let mut line = format!("{{\"utc_timestamp_ms\":{timestamp_ms}");
    let vcpu = object(&[
        ("exit_io_in", get(&exits.io_in)),
        ("exit_io_out", get(&exits.io_out)),
        ("exit_mmio_read", get(&exits.mmio_read)),
        ("exit_mmio_write", get(&exits.mmio_write)),
        ("exit_interrupted", get(&exits.interrupted)),
        ("exit_other", get(&exits.other)),
        ("unhandled_pio", unhandled.0),
        ("unhandled_mmio", unhandled.1),
    ]);
    let _ = write!(line, ",\"vcpu\":{vcpu}");
    let (logged, suppressed) = devices::guest_log::counts();
    let guest_warnings = object(&[("logged", logged), ("suppressed", suppressed)]);
    let _ = write!(line, ",\"guest_warnings\":{guest_warnings}");
    // Firecracker's sums over the devices of a kind.
    let blocks: Vec<_> = devices
        .iter()
        .filter_map(|d| match d {
            DeviceMetrics::Block { metrics, .. } => Some(block_fields(metrics)),
            _ => None,
        })
        .collect();
    let nets: Vec<_> = devices
        .iter()
        .filter_map(|d| match d {
            DeviceMetrics::Net { metrics, .. } => Some(net_fields(metrics)),
            _ => None,
        })
        .collect();
    for (kind, objects) in [("block", blocks), ("net", nets)] {
        if let Some(total) = sum_fields(&objects) {
            let _ = write!(line, ",\"{kind}\":{}", object(&total));
        }
    }
    for device in devices {
        match device {
            DeviceMetrics::Block { name, metrics: m } => {
                let _ = write!(line, ",\"block_{name}\":{}", object(&block_fields(m)));
            }
            DeviceMetrics::Rng(m) => {
                let obj = object(&[
                    ("entropy_bytes", get(&m.bytes)),
                    (
                        "entropy_rate_limiter_throttled",
                        get(&m.rate_limiter_throttled),
                    ),
                    ("requests", get(&m.requests)),
                    ("bytes", get(&m.bytes)),
                    ("invalid_chains", get(&m.invalid_chains)),
                    ("rate_limiter_throttled", get(&m.rate_limiter_throttled)),
                ]);
                let _ = write!(line, ",\"entropy\":{obj}");
            }
            DeviceMetrics::Net { name, metrics: m } => {
                let _ = write!(line, ",\"net_{name}\":{}", object(&net_fields(m)));
            }
            DeviceMetrics::Vsock(m) => {
                let obj = object(&[
                    ("rx_packets_count", get(&m.rx_packets)),
                    ("rx_bytes_count", get(&m.rx_bytes)),
                    ("tx_packets_count", get(&m.tx_packets)),
                    ("tx_bytes_count", get(&m.tx_bytes)),
                    ("conns_added", get(&m.connections_opened)),
                    ("conns_removed", get(&m.connections_closed)),
                    ("rx_packets", get(&m.rx_packets)),
                    ("rx_bytes", get(&m.rx_bytes)),
                    ("tx_packets", get(&m.tx_packets)),
                    ("tx_bytes", get(&m.tx_bytes)),
                    ("malformed", get(&m.malformed)),
                    ("rx_errors", get(&m.rx_errors)),
                    ("resets_sent", get(&m.resets_sent)),
                    ("connections_opened", get(&m.connections_opened)),
                    ("connections_closed", get(&m.connections_closed)),
                    ("connect_failures", get(&m.connect_failures)),
                    ("credit_violations", get(&m.credit_violations)),
                    ("host_errors", get(&m.host_errors)),
                    ("control_dropped", get(&m.control_dropped)),
                    ("connections_refused", get(&m.connections_refused)),
                    ("timeouts", get(&m.timeouts)),
                ]);
                let _ = write!(line, ",\"vsock\":{obj}");
            }
            DeviceMetrics::Balloon(m) => {
                let obj = object(&[
                    ("stats_updates_count", get(&m.stats_updates)),
                    ("inflated_pages", get(&m.inflated_pages)),
                    ("deflated_pages", get(&m.deflated_pages)),
                    ("reported_bytes", get(&m.reported_bytes)),
                    ("invalid_pages", get(&m.invalid_pages)),
                    ("invalid_chains", get(&m.invalid_chains)),
                    ("discard_failures", get(&m.discard_failures)),
                ]);
                let _ = write!(line, ",\"balloon\":{obj}");
            }
        }
    }
    for (name, pairs) in sections {
        let _ = write!(line, ",\"{name}\":{}", object(pairs));
    }
    line.push('}');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_id_and_properties_lead_the_line_and_are_quoted() {
        let line = r#"{"utc_timestamp_ms":5,"vcpu":{}}"#;
        let none = Default::default();
        assert_eq!(with_id_and_properties(line, None, &none), line);
        let props = [("zone".to_string(), "a\"b".to_string())].into();
        let out = with_id_and_properties(line, Some("vm\n1"), &props);
        assert_eq!(
            out,
            r#"{"id":"vm\n1","properties":{"zone":"a\"b"},"utc_timestamp_ms":5,"vcpu":{}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["id"], "vm\n1");
        assert_eq!(v["properties"]["zone"], "a\"b");
    }

    #[test]
    fn line_is_one_json_object_in_firecrackers_layout_with_flints_counters() {
        let exits = ExitCounters::default();
        exits.io_out.store(7, Ordering::Relaxed);
        let (a, b) = (
            Arc::new(BlockMetrics::default()),
            Arc::new(BlockMetrics::default()),
        );
        a.bytes_read.store(4096, Ordering::Relaxed);
        b.bytes_read.store(512, Ordering::Relaxed);
        b.unsupported.store(1, Ordering::Relaxed);
        let net = Arc::new(NetMetrics::default());
        net.rx_bytes.store(60, Ordering::Relaxed);
        let devices = vec![
            DeviceMetrics::Block {
                name: "rootfs".into(),
                metrics: a,
            },
            DeviceMetrics::Block {
                name: "data".into(),
                metrics: b,
            },
            DeviceMetrics::Net {
                name: "eth0".into(),
                metrics: net,
            },
            DeviceMetrics::Rng(Arc::new(RngMetrics::default())),
        ];
        let mut requests = RequestCounts::new();
        requests.insert("instance_start", 1);
        requests.insert("flush_metrics", 2);
        requests.insert("put_drive", 3);
        let mut refused = RequestCounts::new();
        refused.insert("put_drive", 1);
        let line = json_line(
            5,
            &exits,
            (1, 2),
            &devices,
            &api_sections(&requests, &refused),
        );
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(v["utc_timestamp_ms"], 5);
        assert_eq!(v["vcpu"]["exit_io_out"], 7);
        assert_eq!(v["vcpu"]["unhandled_mmio"], 2);
        // Firecracker's sums and per-device objects, with its names.
        assert_eq!(v["block"]["read_bytes"], 4608);
        assert_eq!(v["block"]["invalid_reqs_count"], 1);
        assert_eq!(v["block_rootfs"]["read_bytes"], 4096);
        assert_eq!(v["block_data"]["read_bytes"], 512);
        assert_eq!(v["net"]["rx_bytes_count"], 60);
        assert_eq!(v["net_eth0"]["rx_bytes_count"], 60);
        assert_eq!(v["entropy"]["entropy_bytes"], 0);
        assert_eq!(v["put_api_requests"]["actions_count"], 3);
        assert_eq!(v["put_api_requests"]["drive_count"], 3);
        assert_eq!(v["put_api_requests"]["drive_fails"], 1);
        assert_eq!(v["patch_api_requests"]["drive_count"], 0);
        assert_eq!(v["api_requests"]["flush_metrics"], 2);
        assert!(v["guest_warnings"]["logged"].is_u64());
    }
}
