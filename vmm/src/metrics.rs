//! Metrics: counters from the vCPUs, devices and API, written as one JSON object per line to the
//! file `PUT /metrics` names, periodically and on `FlushMetrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// A flat JSON object `{"k": v, ...}` of unsigned counters.
fn object(pairs: &[(&str, u64)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "\"{k}\":{v}");
    }
    s.push('}');
    s
}

/// Everything counted so far as one JSON line (without the newline). `sections` are extra
/// top-level objects, such as the API's request counts.
pub fn json_line(
    timestamp_ms: u128,
    exits: &ExitCounters,
    unhandled: (u64, u64),
    devices: &[DeviceMetrics],
    sections: &[(&str, Vec<(&str, u64)>)],
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
    for device in devices {
        match device {
            DeviceMetrics::Block { name, metrics: m } => {
                let obj = object(&[
                    ("read_count", get(&m.reads)),
                    ("write_count", get(&m.writes)),
                    ("flush_count", get(&m.flushes)),
                    ("get_id_count", get(&m.get_ids)),
                    ("read_bytes", get(&m.bytes_read)),
                    ("write_bytes", get(&m.bytes_written)),
                    ("io_errors", get(&m.io_errors)),
                    ("unsupported", get(&m.unsupported)),
                    ("invalid_chains", get(&m.invalid_chains)),
                    ("rate_limiter_throttled", get(&m.rate_limiter_throttled)),
                ]);
                let _ = write!(line, ",\"block_{name}\":{obj}");
            }
            DeviceMetrics::Rng(m) => {
                let obj = object(&[
                    ("requests", get(&m.requests)),
                    ("bytes", get(&m.bytes)),
                    ("invalid_chains", get(&m.invalid_chains)),
                    ("rate_limiter_throttled", get(&m.rate_limiter_throttled)),
                ]);
                let _ = write!(line, ",\"entropy\":{obj}");
            }
            DeviceMetrics::Net { name, metrics: m } => {
                let obj = object(&[
                    ("rx_frames", get(&m.rx_frames)),
                    ("rx_bytes", get(&m.rx_bytes)),
                    ("rx_dropped", get(&m.rx_dropped)),
                    ("rx_errors", get(&m.rx_errors)),
                    ("tx_frames", get(&m.tx_frames)),
                    ("tx_bytes", get(&m.tx_bytes)),
                    ("tx_malformed", get(&m.tx_malformed)),
                    ("tx_errors", get(&m.tx_errors)),
                    ("tx_blocked", get(&m.tx_blocked)),
                    (
                        "rx_rate_limiter_throttled",
                        get(&m.rx_rate_limiter_throttled),
                    ),
                    (
                        "tx_rate_limiter_throttled",
                        get(&m.tx_rate_limiter_throttled),
                    ),
                ]);
                let _ = write!(line, ",\"net_{name}\":{obj}");
            }
            DeviceMetrics::Vsock(m) => {
                let obj = object(&[
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
    fn line_is_one_json_object_with_every_section() {
        let exits = ExitCounters::default();
        exits.io_out.store(7, Ordering::Relaxed);
        let block = Arc::new(BlockMetrics::default());
        block.bytes_read.store(4096, Ordering::Relaxed);
        let devices = vec![
            DeviceMetrics::Block {
                name: "rootfs".into(),
                metrics: block,
            },
            DeviceMetrics::Rng(Arc::new(RngMetrics::default())),
        ];
        let line = json_line(
            5,
            &exits,
            (1, 2),
            &devices,
            &[("api_server", vec![("requests", 3)])],
        );
        assert!(!line.contains('\n'));
        assert!(line
            .starts_with("{\"utc_timestamp_ms\":5,\"vcpu\":{\"exit_io_in\":0,\"exit_io_out\":7"));
        assert!(line.contains("\"unhandled_pio\":1,\"unhandled_mmio\":2}"));
        assert!(line.contains(",\"guest_warnings\":{\"logged\":"));
        assert!(line.contains("\"block_rootfs\":{\"read_count\":0"));
        assert!(line.contains("\"read_bytes\":4096"));
        assert!(line.contains("\"entropy\":{\"requests\":0"));
        assert!(line.ends_with(",\"api_server\":{\"requests\":3}}"));
        // Balanced braces: one object.
        assert_eq!(line.matches('{').count(), line.matches('}').count());
    }
}
