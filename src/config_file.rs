//! The configuration file: one JSON document with the API's bodies under Firecracker's keys
//! (`boot-source`, `machine-config`, `drives`, ...), turned into the same requests the API
//! makes ([`ApiRequest`]), carried out the same way; and the same schema written back for
//! `GET /vm/config`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use vmm::controller::{ConfigView, Request};

use crate::api::schema::{self, BodyError};
use crate::api::ApiRequest;
use crate::logger::LoggerConfig;

/// The keys of a config file, in the order their requests are made.
pub const KEYS: &[&str] = &[
    "logger",
    "metrics",
    "machine-config",
    "boot-source",
    "drives",
    "network-interfaces",
    "mmds-config",
    "vsock",
    "entropy",
    "balloon",
];

/// Firecracker's config-file keys for features flint does not have: accepted when null (as
/// Firecracker's own example files write them), refused with the reason otherwise.
pub const UNSUPPORTED_KEYS: &[(&str, &str)] = &[
    (
        "cpu-config",
        "flint does not take custom CPU templates; it presents the host's CPU as KVM reports it",
    ),
    ("pmem", "flint has no virtio-pmem devices"),
    ("memory-hotplug", "flint cannot hot-plug guest memory"),
    (
        "serial",
        "flint always connects the serial console to its standard input and output",
    ),
];

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {path} is not valid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("the config file {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Read the config file at `path` into the requests that configure the VM (not `Start`).
pub fn load(path: &Path) -> Result<Vec<ApiRequest>, ConfigFileError> {
    let text = std::fs::read(path).map_err(|source| ConfigFileError::Read {
        path: path.into(),
        source,
    })?;
    let value: Value = serde_json::from_slice(&text).map_err(|e| ConfigFileError::Json {
        path: path.into(),
        message: e.to_string(),
    })?;
    from_json(&value).map_err(|e| ConfigFileError::Invalid {
        path: path.into(),
        message: e.0,
    })
}

/// The list under `key`: absent or null is empty.
fn list<'a>(doc: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], BodyError> {
    match doc.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(BodyError(format!(
            "{key} must be a list, not {}",
            match other {
                Value::Object(_) => "an object",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                _ => "true or false",
            }
        ))),
    }
}

/// Refuse a second item with an id already seen.
fn unique(seen: &mut HashSet<String>, ctx: &str, field: &str, id: &str) -> Result<(), BodyError> {
    if seen.insert(id.to_string()) {
        Ok(())
    } else {
        Err(BodyError(format!(
            "{ctx}: {field} '{}' is used twice",
            schema::quote_str(id)
        )))
    }
}

/// The requests that a config document makes, in the order of [`KEYS`].
pub fn from_json(v: &Value) -> Result<Vec<ApiRequest>, BodyError> {
    let Value::Object(doc) = v else {
        return Err(BodyError(
            "the document must be a JSON object with keys such as \"boot-source\"".into(),
        ));
    };
    for (key, value) in doc {
        if KEYS.contains(&key.as_str()) {
            continue;
        }
        match UNSUPPORTED_KEYS.iter().find(|(k, _)| k == key) {
            Some(_) if value.is_null() => {}
            Some((_, reason)) => return Err(BodyError(format!("{key}: {reason}"))),
            None => {
                return Err(BodyError(format!(
                    "unknown key '{}' (expected {})",
                    schema::quote_str(key),
                    KEYS.join(", ")
                )))
            }
        }
    }
    let section = |key: &str| doc.get(key).filter(|v| !v.is_null());
    let mut requests: Vec<ApiRequest> = Vec::new();
    if let Some(v) = section("logger") {
        requests.push(ApiRequest::SetLogger(schema::logger(v, "logger")?));
    }
    let mut requests_to_vmm = Vec::new();
    if let Some(v) = section("metrics") {
        requests_to_vmm.push(Request::SetMetrics(schema::metrics(v, "metrics")?));
    }
    if let Some(v) = section("machine-config") {
        requests_to_vmm.push(schema::machine_config(v, "machine-config")?);
    }
    if let Some(v) = section("boot-source") {
        requests_to_vmm.push(Request::SetBootSource(schema::boot_source(
            v,
            "boot-source",
        )?));
    }
    let mut ids = HashSet::new();
    for (i, v) in list(doc, "drives")?.iter().enumerate() {
        let ctx = format!("drives[{i}]");
        let drive = schema::drive(v, &ctx)?;
        unique(
            &mut ids,
            &ctx,
            "drive_id",
            drive.id.as_deref().unwrap_or_default(),
        )?;
        requests_to_vmm.push(Request::SetDrive(drive));
    }
    let mut ids = HashSet::new();
    for (i, v) in list(doc, "network-interfaces")?.iter().enumerate() {
        let ctx = format!("network-interfaces[{i}]");
        let iface = schema::network_interface(v, &ctx)?;
        unique(
            &mut ids,
            &ctx,
            "iface_id",
            iface.id.as_deref().unwrap_or_default(),
        )?;
        requests_to_vmm.push(Request::SetNetworkInterface(iface));
    }
    if let Some(v) = section("mmds-config") {
        requests_to_vmm.push(schema::mmds_config(v, "mmds-config")?);
    }
    if let Some(v) = section("vsock") {
        requests_to_vmm.push(Request::SetVsock(schema::vsock(v, "vsock")?));
    }
    if let Some(v) = section("entropy") {
        requests_to_vmm.push(Request::SetEntropy(schema::entropy(v, "entropy")?));
    }
    if let Some(v) = section("balloon") {
        requests_to_vmm.push(Request::SetBalloon(schema::balloon(v, "balloon")?));
    }
    requests.extend(requests_to_vmm.into_iter().map(ApiRequest::Vmm));
    Ok(requests)
}

/// The whole configuration in the config file's schema (`GET /vm/config`). Sections not
/// configured are null, as in Firecracker.
pub fn to_json(config: &ConfigView, logger: Option<&LoggerConfig>) -> Value {
    let or_null = |v: Option<Value>| v.unwrap_or(Value::Null);
    let vm = &config.vm;
    serde_json::json!({
        "boot-source": or_null(config.boot_source.as_ref().map(schema::boot_source_json)),
        "machine-config": schema::machine_config_json(vm),
        "drives": vm
            .drives
            .iter()
            .enumerate()
            .map(|(n, d)| schema::drive_json(n, d))
            .collect::<Vec<_>>(),
        "network-interfaces": vm
            .nets
            .iter()
            .enumerate()
            .map(|(n, net)| schema::network_interface_json(n, net))
            .collect::<Vec<_>>(),
        "vsock": or_null(vm.vsock.as_ref().map(schema::vsock_json)),
        "mmds-config": or_null(vm.mmds.as_ref().map(schema::mmds_config_json)),
        "entropy": if vm.entropy {
            schema::entropy_json(&vm.entropy_rate_limiter)
        } else {
            Value::Null
        },
        "balloon": or_null(vm.balloon.as_ref().map(schema::balloon_json)),
        "logger": or_null(logger.map(schema::logger_json)),
        "metrics": or_null(config.metrics.as_ref().map(schema::metrics_json)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vmm::controller::BootSource;
    use vmm::{CacheType, DriveConfig, NetConfig, VmConfig, VsockConfig};

    fn logger() -> LoggerConfig {
        LoggerConfig {
            path: Some("/l".into()),
            module: None,
            level: Some("Info".into()),
            show_level: true,
            show_log_origin: false,
        }
    }

    fn full() -> ConfigView {
        ConfigView {
            boot_source: Some(BootSource {
                kernel: "/k".into(),
                initrd: Some("/i".into()),
                cmdline: Some("console=ttyS0".into()),
            }),
            vm: VmConfig {
                vcpus: 2,
                mem_mib: 256,
                drives: vec![
                    DriveConfig {
                        id: Some("rootfs".into()),
                        root: true,
                        partuuid: Some("4cbb6a2a-01".into()),
                        cache: CacheType::Unsafe,
                        ..DriveConfig::new("/r")
                    },
                    DriveConfig {
                        id: Some("data".into()),
                        read_only: true,
                        cache: CacheType::Writeback,
                        ..DriveConfig::new("/d")
                    },
                ],
                nets: vec![NetConfig {
                    id: Some("eth0".into()),
                    mac: Some([6, 0, 0xac, 0x10, 0, 2]),
                    ..NetConfig::new("tap0")
                }],
                vsock: Some(VsockConfig {
                    guest_cid: 3,
                    uds_path: "/v.sock".into(),
                }),
                entropy: true,
                huge_pages: vmm::HugePages::Size2M,
                track_dirty_pages: true,
                balloon: Some(vmm::BalloonConfig {
                    amount_mib: 16,
                    deflate_on_oom: true,
                    stats_polling_interval_s: 1,
                    free_page_reporting: true,
                }),
                ..VmConfig::new("")
            },
            metrics: Some(vmm::controller::MetricsConfig::to_path("/m")),
        }
    }

    #[test]
    fn keys_and_ids_quoted_in_errors_stay_one_line() {
        let err = from_json(&json!({"drives\n": []})).unwrap_err().0;
        assert!(err.starts_with("unknown key 'drives\\n' ("), "{err}");
        let drive = json!({"drive_id": "a\nb", "path_on_host": "/r", "is_root_device": false});
        let err = from_json(&json!({ "drives": [drive.clone(), drive] }))
            .unwrap_err()
            .0;
        assert_eq!(err, "drives[1]: drive_id 'a\\nb' is used twice");
    }

    #[test]
    fn firecracker_keys_flint_does_not_use_are_accepted_when_null() {
        let mut doc = json!({"boot-source": {"kernel_image_path": "/k"}});
        for (key, _) in UNSUPPORTED_KEYS {
            doc[*key] = Value::Null;
        }
        let requests = from_json(&doc).unwrap();
        assert_eq!(requests.len(), 1, "{requests:?}");
    }

    #[test]
    fn a_full_document_makes_every_request_in_order() {
        let c = full();
        let requests = from_json(&to_json(&c, Some(&logger()))).unwrap();
        let vmm = |r: Request| ApiRequest::Vmm(r);
        // Every field survives the round trip (partuuid and cache_type included).
        assert_eq!(
            requests,
            vec![
                ApiRequest::SetLogger(logger()),
                vmm(Request::SetMetrics(
                    vmm::controller::MetricsConfig::to_path("/m")
                )),
                vmm(Request::SetMachineConfig {
                    vcpus: 2,
                    mem_mib: 256,
                    smt: false,
                    huge_pages: vmm::HugePages::Size2M,
                    track_dirty_pages: true,
                }),
                vmm(Request::SetBootSource(c.boot_source.clone().unwrap())),
                vmm(Request::SetDrive(c.vm.drives[0].clone())),
                vmm(Request::SetDrive(c.vm.drives[1].clone())),
                vmm(Request::SetNetworkInterface(c.vm.nets[0].clone())),
                vmm(Request::SetVsock(c.vm.vsock.clone().unwrap())),
                vmm(Request::SetEntropy(None)),
                vmm(Request::SetBalloon(c.vm.balloon.unwrap())),
            ]
        );
    }

    #[test]
    fn an_empty_configuration_is_written_with_nulls_and_reads_back() {
        let c = ConfigView {
            boot_source: None,
            vm: VmConfig {
                entropy: false,
                ..VmConfig::new("")
            },
            metrics: None,
        };
        let v = to_json(&c, None);
        assert_eq!(v["boot-source"], Value::Null);
        assert_eq!(v["entropy"], Value::Null);
        assert_eq!(v["balloon"], Value::Null);
        assert_eq!(v["logger"], Value::Null);
        assert_eq!(v["drives"], json!([]));
        assert_eq!(
            from_json(&v).unwrap(),
            vec![ApiRequest::Vmm(Request::SetMachineConfig {
                vcpus: 1,
                mem_mib: 128,
                smt: false,
                huge_pages: vmm::HugePages::None,
                track_dirty_pages: false,
            })]
        );
        assert_eq!(from_json(&json!({})).unwrap(), vec![]);
    }

    #[test]
    fn the_firecracker_getting_started_document_loads() {
        let doc = json!({
            "boot-source": {
                "kernel_image_path": "vmlinux",
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
                "initrd_path": null
            },
            "drives": [{
                "drive_id": "rootfs",
                "partuuid": null,
                "is_root_device": true,
                "cache_type": "Unsafe",
                "is_read_only": false,
                "path_on_host": "rootfs.ext4",
                "io_engine": "Sync",
                "rate_limiter": null,
                "socket": null
            }],
            "machine-config": {
                "vcpu_count": 2,
                "mem_size_mib": 1024,
                "smt": false,
                "track_dirty_pages": false,
                "huge_pages": "None"
            },
            "network-interfaces": [],
            "vsock": null,
            "logger": null,
            "metrics": null,
            "entropy": null
        });
        assert_eq!(from_json(&doc).unwrap().len(), 3);
    }

    #[test]
    fn bad_documents_are_refused_with_the_place() {
        let cases = [
            (json!([]), "the document must be a JSON object with keys such as \"boot-source\""),
            (
                json!({"ballon": {}}),
                "unknown key 'ballon' (expected logger, metrics, machine-config, boot-source, \
                 drives, network-interfaces, mmds-config, vsock, entropy, balloon)",
            ),
            (
                json!({"balloon": {"amount_mib": 10}}),
                "balloon: missing required field 'deflate_on_oom'",
            ),
            (
                json!({"mmds-config": {"version": "V2"}, "balloon": null}),
                "mmds-config: missing required field 'network_interfaces'",
            ),
            (json!({"drives": {}}), "drives must be a list, not an object"),
            (
                json!({"drives": [{"drive_id": "a", "path_on_host": "/a", "is_root_device": 1}]}),
                "drives[0]: is_root_device must be true or false, not 1",
            ),
            (
                json!({"drives": [
                    {"drive_id": "a", "path_on_host": "/a", "is_root_device": true},
                    {"drive_id": "a", "path_on_host": "/b", "is_root_device": false}]}),
                "drives[1]: drive_id 'a' is used twice",
            ),
            (
                json!({"network-interfaces": [
                    {"iface_id": "e", "host_dev_name": "t0"},
                    {"iface_id": "e", "host_dev_name": "t1"}]}),
                "network-interfaces[1]: iface_id 'e' is used twice",
            ),
            (
                json!({"machine-config": {"vcpu_count": 1}}),
                "machine-config: missing required field 'mem_size_mib'",
            ),
            (
                json!({"boot-source": {"kernel_image_path": "/k", "x": 1}}),
                "boot-source: unknown field 'x' (expected kernel_image_path, initrd_path, boot_args)",
            ),
            (
                json!({"entropy": {"rate_limiter": {"ops": {"size": 1}}}}),
                "entropy: missing required field 'rate_limiter.ops.refill_time'",
            ),
            (json!({"vsock": 3}), "vsock: expected a JSON object, not 3"),
        ];
        for (doc, want) in cases {
            assert_eq!(from_json(&doc).unwrap_err().0, want, "{doc}");
        }
    }

    #[test]
    fn load_reads_files_and_names_them_in_errors() {
        let dir = std::env::temp_dir().join(format!("flint-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(&good, to_json(&full(), Some(&logger())).to_string()).unwrap();
        assert_eq!(load(&good).unwrap().len(), 10);

        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{\"drives\": [}").unwrap();
        let e = load(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "the config file {} is not valid JSON: ",
                bad.display()
            )),
            "{e}"
        );
        std::fs::write(&bad, "{\"boot\": {}}").unwrap();
        let e = load(&bad).unwrap_err().to_string();
        assert!(e.contains("is invalid: unknown key 'boot'"), "{e}");
        let missing = dir.join("missing.json");
        let e = load(&missing).unwrap_err().to_string();
        assert!(e.starts_with("cannot read the config file "), "{e}");
        assert!(!e.contains('\n'));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
