//! The shim's configuration: a JSON file, `/etc/flint/containerd-shim.json` unless the
//! `FLINT_SHIM_CONFIG` environment variable names another (containerd passes its own
//! environment to the shims it starts). A missing default file means the defaults.
//!
//! ```json
//! { "kernel": "/var/lib/flint/vmlinux", "initramfs": "/var/lib/flint/initramfs.cpio.gz",
//!   "vcpus": 1, "memory_mib": 256, "memory_overhead_mib": 64,
//!   "work_dir": "/var/lib/flint/containerd", "pod_containers": 8 }
//! ```

use std::path::{Path, PathBuf};

use flint::pod::PodSettings;
use serde::Deserialize;

/// The configuration file read when `FLINT_SHIM_CONFIG` is not set.
pub const DEFAULT_CONFIG: &str = "/etc/flint/containerd-shim.json";
/// The environment variable naming another configuration file.
pub const CONFIG_ENV: &str = "FLINT_SHIM_CONFIG";
/// Where each container's root disk, sockets and console log go (in `NAMESPACE/ID/`) unless
/// the configuration says otherwise.
pub const DEFAULT_WORK_DIR: &str = "/var/lib/flint/containerd";
/// The largest configuration file read.
const MAX_CONFIG: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the flint shim's configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the flint shim's configuration file {} is larger than 64 KiB", path.display())]
    TooLarge { path: PathBuf },
    #[error("the flint shim's configuration file {} is not valid: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the flint shim's configuration file {} asks for {what} 0", path.display())]
    Zero { path: PathBuf, what: &'static str },
    #[error("the flint shim's configuration file {} asks for pod_containers {asked}, more than {}", path.display(), flint::pod::MAX_SLOTS)]
    TooManySlots { path: PathBuf, asked: usize },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    memory_overhead_mib: Option<u64>,
    work_dir: Option<PathBuf>,
    pod_containers: Option<usize>,
}

/// What the shim runs containers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimConfig {
    /// The VM of a container without limits.
    pub pod: PodSettings,
    /// What a container with a memory limit gets on top of it (the guest kernel, the agent,
    /// the writes it keeps in memory).
    pub memory_overhead_mib: u64,
    pub work_dir: PathBuf,
    /// How many containers a pod's VM holds at most (its container slots).
    pub pod_containers: usize,
}

/// [`ShimConfig::pod_containers`] unless the file says otherwise.
pub const DEFAULT_POD_CONTAINERS: usize = 8;

/// [`ShimConfig::memory_overhead_mib`] unless the file says otherwise.
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u64 = 64;

impl ShimConfig {
    /// The VM of a container with `resources`: as many vCPUs as its CPU limit (quota over
    /// period, rounded up), its memory limit plus the overhead; the configured ones for
    /// what it does not limit.
    pub fn pod_for(&self, resources: &crate::spec::Resources) -> PodSettings {
        PodSettings {
            vcpus: resources.vcpus().unwrap_or(self.pod.vcpus),
            mem_mib: resources.memory_mib().map_or(self.pod.mem_mib, |m| {
                m.saturating_add(self.memory_overhead_mib)
            }),
            ..self.pod.clone()
        }
    }
}

impl ShimConfig {
    /// The configuration from `FLINT_SHIM_CONFIG` or [`DEFAULT_CONFIG`].
    pub fn load() -> Result<ShimConfig, ConfigError> {
        match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            Some(path) => ShimConfig::from_file(Path::new(&path), true),
            None => ShimConfig::from_file(Path::new(DEFAULT_CONFIG), false),
        }
    }

    /// The configuration in `path`; the defaults if it does not exist and is not `required`.
    pub fn from_file(path: &Path, required: bool) -> Result<ShimConfig, ConfigError> {
        use std::io::Read;
        let read_error = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(file) => {
                let mut text = String::new();
                file.take(MAX_CONFIG + 1)
                    .read_to_string(&mut text)
                    .map_err(read_error)?;
                if text.len() as u64 > MAX_CONFIG {
                    return Err(ConfigError::TooLarge {
                        path: path.to_path_buf(),
                    });
                }
                serde_json::from_str::<File>(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_path_buf(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => File::default(),
            Err(e) => return Err(read_error(e)),
        };
        let defaults = PodSettings::default();
        let zero = |what| ConfigError::Zero {
            path: path.to_path_buf(),
            what,
        };
        if file.vcpus == Some(0) {
            return Err(zero("vcpus"));
        }
        if file.memory_mib == Some(0) {
            return Err(zero("memory_mib"));
        }
        if file.pod_containers == Some(0) {
            return Err(zero("pod_containers"));
        }
        if let Some(asked) = file.pod_containers.filter(|n| *n > flint::pod::MAX_SLOTS) {
            return Err(ConfigError::TooManySlots {
                path: path.to_path_buf(),
                asked,
            });
        }
        Ok(ShimConfig {
            pod: PodSettings {
                kernel: file.kernel,
                initramfs: file.initramfs,
                vcpus: file.vcpus.unwrap_or(defaults.vcpus),
                mem_mib: file.memory_mib.unwrap_or(defaults.mem_mib),
                network: None,
            },
            memory_overhead_mib: file
                .memory_overhead_mib
                .unwrap_or(DEFAULT_MEMORY_OVERHEAD_MIB),
            work_dir: file
                .work_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_WORK_DIR)),
            pod_containers: file.pod_containers.unwrap_or(DEFAULT_POD_CONTAINERS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("flint-shim-config-{name}-{}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_configuration_file_sets_the_vm_and_the_work_directory() {
        let path = write(
            "full",
            r#"{"kernel": "/k", "initramfs": "/i", "vcpus": 2, "memory_mib": 512, "work_dir": "/w"}"#,
        );
        let config = ShimConfig::from_file(&path, true).unwrap();
        assert_eq!(config.pod.kernel, Some(PathBuf::from("/k")));
        assert_eq!(config.pod.initramfs, Some(PathBuf::from("/i")));
        assert_eq!((config.pod.vcpus, config.pod.mem_mib), (2, 512));
        assert_eq!(config.work_dir, PathBuf::from("/w"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_missing_default_file_means_the_defaults_and_a_named_one_an_error() {
        let missing = Path::new("/nonexistent/flint-shim.json");
        let config = ShimConfig::from_file(missing, false).unwrap();
        assert_eq!(config.pod, PodSettings::default());
        assert_eq!(config.work_dir, PathBuf::from(DEFAULT_WORK_DIR));
        let e = ShimConfig::from_file(missing, true).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "cannot read the flint shim's configuration file /nonexistent/flint-shim.json: "
            ),
            "{e}"
        );
    }

    #[test]
    fn limits_size_the_vm_and_the_configuration_the_rest() {
        use crate::spec::{Cpu, Memory, Resources};
        let config = ShimConfig {
            pod: PodSettings {
                vcpus: 1,
                mem_mib: 128,
                ..PodSettings::default()
            },
            memory_overhead_mib: 64,
            work_dir: PathBuf::from("/w"),
            pod_containers: 8,
        };
        let pod = config.pod_for(&Resources::default());
        assert_eq!((pod.vcpus, pod.mem_mib), (1, 128));
        let limited = Resources {
            memory: Some(Memory {
                limit: Some(256 << 20),
            }),
            cpu: Some(Cpu {
                quota: Some(200000),
                period: Some(100000),
            }),
            pids: None,
        };
        let pod = config.pod_for(&limited);
        assert_eq!((pod.vcpus, pod.mem_mib), (2, 256 + 64));
    }

    #[test]
    fn unknown_keys_and_zero_sizes_are_refused() {
        let path = write("typo", r#"{"kernal": "/k"}"#);
        let e = ShimConfig::from_file(&path, true).unwrap_err();
        assert!(e.to_string().contains("unknown field `kernal`"), "{e}");
        std::fs::write(&path, r#"{"vcpus": 0}"#).unwrap();
        let e = ShimConfig::from_file(&path, true).unwrap_err();
        assert!(e.to_string().ends_with("asks for vcpus 0"), "{e}");
        std::fs::write(&path, r#"{"pod_containers": 25}"#).unwrap();
        let e = ShimConfig::from_file(&path, true).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("asks for pod_containers 25, more than 24"),
            "{e}"
        );
        std::fs::write(&path, r#"{"pod_containers": 2}"#).unwrap();
        assert_eq!(
            ShimConfig::from_file(&path, true).unwrap().pod_containers,
            2
        );
        std::fs::remove_file(path).unwrap();
    }
}
