//! The parts of an OCI runtime bundle's `config.json` the shim uses: the process (arguments,
//! environment, working directory, user, terminal) and the root directory.

use std::path::{Path, PathBuf};

use flint_agent::{ExecSpec, WindowSize, IMAGE_ROOT, MAX_TERMINAL_SIZE};
use serde::Deserialize;

/// The largest `config.json` (or exec process) read.
const MAX_SPEC: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read the bundle's config.json {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the bundle's config.json {} is larger than 4 MiB", path.display())]
    TooLarge { path: PathBuf },
    #[error("the container's OCI specification is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the container's OCI specification has no process to run")]
    NoProcess,
    #[error("the container's process has no arguments")]
    NoArgs,
}

#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default, rename = "additionalGids")]
    pub additional_gids: Vec<u32>,
}

/// An OCI `process.consoleSize`: the initial window size of its terminal.
#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct ConsoleSize {
    #[serde(default)]
    pub height: u32,
    #[serde(default)]
    pub width: u32,
}

/// A window size of `height` rows and `width` columns from containerd (a `consoleSize` or a
/// resize request), each cut to the agent's limit.
pub fn window_size(height: u32, width: u32) -> WindowSize {
    let cut = |n: u32| u16::try_from(n).unwrap_or(u16::MAX).min(MAX_TERMINAL_SIZE);
    WindowSize {
        rows: cut(height),
        cols: cut(width),
    }
}

/// An OCI `process`.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
pub struct Process {
    #[serde(default)]
    pub terminal: bool,
    #[serde(default, rename = "consoleSize")]
    pub console_size: Option<ConsoleSize>,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
}

#[derive(Debug, Default, Deserialize)]
struct Root {
    #[serde(default)]
    path: String,
}

/// `linux.resources.memory` (only what sizes the VM).
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
pub struct Memory {
    pub limit: Option<i64>,
}

/// `linux.resources.cpu` (only what sizes the VM).
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
pub struct Cpu {
    pub quota: Option<i64>,
    pub period: Option<u64>,
}

/// `linux.resources.pids`.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
pub struct Pids {
    pub limit: Option<i64>,
}

/// `linux.resources`: what `ctr run --memory-limit` and `--cpus` (or a pod spec's limits)
/// set, and the pids limit.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
pub struct Resources {
    pub memory: Option<Memory>,
    pub cpu: Option<Cpu>,
    pub pids: Option<Pids>,
}

/// A `linux.namespaces` entry.
#[derive(Debug, Default, Deserialize)]
struct Namespace {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Debug, Default, Deserialize)]
struct Linux {
    resources: Option<Resources>,
    #[serde(default)]
    namespaces: Vec<Namespace>,
}

/// A `mounts` entry (only where it goes and what it is).
#[derive(Debug, Default, Deserialize)]
struct Mount {
    #[serde(default)]
    destination: String,
    #[serde(default)]
    source: String,
}

#[derive(Debug, Deserialize)]
struct Spec {
    process: Option<Process>,
    #[serde(default)]
    root: Root,
    linux: Option<Linux>,
    #[serde(default)]
    mounts: Vec<Mount>,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

/// The OCI annotation containerd's CRI plugin sets to `sandbox` (a pod's pause container)
/// or `container` (the pod's other containers).
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The OCI annotation naming the pod (its sandbox container's id).
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// A container of a pod, as its annotations say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMember {
    /// The pod's sandbox id: its containers share one shim and one VM.
    pub sandbox_id: String,
    /// The pod's sandbox (pause) container.
    pub sandbox: bool,
}

/// Pod membership from a spec's annotations: `None` for a container of its own.
fn pod_member(
    annotations: &std::collections::HashMap<String, String>,
    id: Option<&str>,
) -> Option<PodMember> {
    let sandbox = match annotations.get(CONTAINER_TYPE)?.as_str() {
        "sandbox" => true,
        "container" => false,
        _ => return None,
    };
    let sandbox_id = match annotations.get(SANDBOX_ID).filter(|s| !s.is_empty()) {
        Some(s) => s.clone(),
        // A sandbox is its own pod.
        None if sandbox => id?.to_string(),
        None => return None,
    };
    Some(PodMember {
        sandbox_id,
        sandbox,
    })
}

/// The id of the shim that serves container `id` of the bundle `bundle`: the pod's sandbox
/// id for a container of a pod (so a pod's containers reach one shim), else `id`.
pub fn grouping(bundle: &Path, id: &str) -> String {
    match Bundle::read(bundle).ok().and_then(|b| b.pod) {
        Some(member) if !member.sandbox => member.sandbox_id,
        _ => id.to_string(),
    }
}

/// What the shim takes from a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub process: Process,
    /// The root directory (the bundle's `rootfs` unless the spec names another).
    pub rootfs: PathBuf,
    pub resources: Resources,
    /// The pod the container belongs to, if its annotations say so.
    pub pod: Option<PodMember>,
    /// The network namespace the spec names (`linux.namespaces`, type `network`, with a
    /// path): CNI's for a pod's sandbox, `ctr run --with-ns network:PATH`'s.
    pub netns: Option<PathBuf>,
    /// The host file mounted on the container's `/etc/resolv.conf` (CRI mounts one).
    pub resolv_conf: Option<PathBuf>,
}

impl Bundle {
    /// Read `bundle/config.json`.
    pub fn read(bundle: &Path) -> Result<Bundle, SpecError> {
        use std::io::Read;
        let path = bundle.join("config.json");
        let mut text = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_SPEC + 1).read_to_end(&mut text))
            .map_err(|source| SpecError::Read {
                path: path.clone(),
                source,
            })?;
        if text.len() as u64 > MAX_SPEC {
            return Err(SpecError::TooLarge { path });
        }
        let spec: Spec = serde_json::from_slice(&text)?;
        let process = spec.process.ok_or(SpecError::NoProcess)?;
        let root = if spec.root.path.is_empty() {
            "rootfs"
        } else {
            &spec.root.path
        };
        let linux = spec.linux.unwrap_or_default();
        let netns = linux
            .namespaces
            .iter()
            .find(|n| n.kind == "network" && !n.path.is_empty())
            .map(|n| PathBuf::from(&n.path));
        let resolv_conf = spec
            .mounts
            .iter()
            .find(|m| m.destination == "/etc/resolv.conf" && m.source.starts_with('/'))
            .map(|m| PathBuf::from(&m.source));
        Ok(Bundle {
            process,
            rootfs: bundle.join(root),
            resources: linux.resources.unwrap_or_default(),
            netns,
            resolv_conf,
            pod: pod_member(
                &spec.annotations,
                bundle.file_name().and_then(|n| n.to_str()),
            ),
        })
    }
}

/// A process of an exec request (the JSON of an OCI `process`).
pub fn exec_process(json: &[u8]) -> Result<Process, SpecError> {
    if json.len() as u64 > MAX_SPEC {
        return Err(SpecError::Parse(serde::de::Error::custom(
            "the process is larger than 4 MiB",
        )));
    }
    Ok(serde_json::from_slice(json)?)
}

impl Resources {
    /// The vCPUs the CPU limit asks for (quota / period, rounded up), if it sets one.
    pub fn vcpus(&self) -> Option<u32> {
        let cpu = self.cpu.as_ref()?;
        let quota = u64::try_from(cpu.quota?).ok().filter(|q| *q > 0)?;
        let period = cpu.period.filter(|p| *p > 0)?;
        Some(u32::try_from(quota.div_ceil(period)).unwrap_or(u32::MAX))
    }

    /// The memory limit in MiB (rounded up), if it sets one.
    pub fn memory_mib(&self) -> Option<u64> {
        Some(self.memory_bytes()?.div_ceil(1 << 20))
    }

    /// The memory limit in bytes, if it sets one.
    pub fn memory_bytes(&self) -> Option<u64> {
        u64::try_from(self.memory.as_ref()?.limit?)
            .ok()
            .filter(|l| *l > 0)
    }

    /// The most processes the container may have, if it sets a limit (0 or less: none, as
    /// runc reads it; more than the guest kernel's limit: that limit).
    pub fn pids_limit(&self) -> Option<u64> {
        u64::try_from(self.pids.as_ref()?.limit?)
            .ok()
            .filter(|l| *l > 0)
            .map(|l| l.min(flint_agent::protocol::MAX_PIDS))
    }
}

impl Process {
    /// The agent's request for this process, run in the container's root file system (on
    /// a terminal of its `consoleSize`, or of unknown size until resized, when it asks for
    /// one).
    pub fn exec_spec(&self) -> Result<ExecSpec, SpecError> {
        if self.args.is_empty() {
            return Err(SpecError::NoArgs);
        }
        let mut spec = ExecSpec::new(self.args.iter().cloned())
            .root(IMAGE_ROOT)
            .user(
                self.user.uid,
                self.user.gid,
                self.user.additional_gids.clone(),
            );
        spec.env = self
            .env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((name, value)) => (name.to_string(), value.to_string()),
                None => (e.clone(), String::new()),
            })
            .collect();
        spec.workdir = Some(if self.cwd.is_empty() {
            "/".to_string()
        } else {
            self.cwd.clone()
        });
        if self.terminal {
            let size = self.console_size.unwrap_or_default();
            spec.terminal = Some(window_size(size.height, size.width));
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_gives_the_process_and_its_root() {
        let dir = std::env::temp_dir().join(format!("flint-shim-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion": "1.0.2", "process": {"terminal": false, "user": {"uid": 1000,
              "gid": 100, "additionalGids": [10]}, "args": ["sh", "-c", "echo hi"],
              "env": ["PATH=/bin", "EMPTY"], "cwd": "/tmp", "capabilities": {}},
              "root": {"path": "rootfs", "readonly": false}, "linux": {}}"#,
        )
        .unwrap();
        let bundle = Bundle::read(&dir).unwrap();
        assert_eq!(bundle.rootfs, dir.join("rootfs"));
        let spec = bundle.process.exec_spec().unwrap();
        assert_eq!(spec.argv, ["sh", "-c", "echo hi"]);
        assert_eq!(
            spec.env,
            [
                ("PATH".to_string(), "/bin".to_string()),
                ("EMPTY".to_string(), String::new())
            ]
        );
        assert_eq!(spec.workdir.as_deref(), Some("/tmp"));
        assert_eq!(spec.root.as_deref(), Some(IMAGE_ROOT));
        let user = spec.user.unwrap();
        assert_eq!((user.uid, user.gid, user.groups), (1000, 100, vec![10]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_network_namespace_and_resolv_conf_are_read_from_the_spec() {
        let dir = std::env::temp_dir().join(format!("flint-shim-netns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"process": {"args": ["true"]}, "mounts": [
              {"destination": "/proc", "type": "proc", "source": "proc"},
              {"destination": "/etc/resolv.conf", "type": "bind",
               "source": "/var/lib/containerd/sandboxes/p/resolv.conf", "options": ["rbind"]}],
              "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc", "path": "/proc/1/ns/ipc"},
              {"type": "network", "path": "/var/run/netns/cni-1234"}, {"type": "mount"}]}}"#,
        )
        .unwrap();
        let bundle = Bundle::read(&dir).unwrap();
        assert_eq!(
            bundle.netns.as_deref(),
            Some(Path::new("/var/run/netns/cni-1234"))
        );
        assert_eq!(
            bundle.resolv_conf.as_deref(),
            Some(Path::new("/var/lib/containerd/sandboxes/p/resolv.conf"))
        );
        // A new namespace (no path), or none at all: no network to join.
        std::fs::write(
            dir.join("config.json"),
            r#"{"process": {"args": ["true"]}, "linux": {"namespaces": [{"type": "network"}]}}"#,
        )
        .unwrap();
        let bundle = Bundle::read(&dir).unwrap();
        assert_eq!((bundle.netns, bundle.resolv_conf), (None, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cri_annotations_group_a_pods_containers() {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(pod_member(&map(&[]), Some("c")), None);
        assert_eq!(
            pod_member(
                &map(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "p")]),
                Some("p")
            ),
            Some(PodMember {
                sandbox_id: "p".into(),
                sandbox: true
            })
        );
        assert_eq!(
            pod_member(&map(&[(CONTAINER_TYPE, "sandbox")]), Some("p")),
            Some(PodMember {
                sandbox_id: "p".into(),
                sandbox: true
            })
        );
        assert_eq!(
            pod_member(
                &map(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "p")]),
                Some("c")
            ),
            Some(PodMember {
                sandbox_id: "p".into(),
                sandbox: false
            })
        );
        // A container that names no pod, or an unknown type: a container of its own.
        assert_eq!(
            pod_member(&map(&[(CONTAINER_TYPE, "container")]), Some("c")),
            None
        );
        assert_eq!(
            pod_member(
                &map(&[(CONTAINER_TYPE, "vm"), (SANDBOX_ID, "p")]),
                Some("c")
            ),
            None
        );
    }

    #[test]
    fn cpu_and_memory_limits_are_read_rounded_up() {
        let spec: Spec = serde_json::from_str(
            r#"{"process": {"args": ["true"]}, "linux": {"resources": {
                "memory": {"limit": 314572801}, "cpu": {"quota": 150000, "period": 100000},
                "pids": {"limit": 20}}}}"#,
        )
        .unwrap();
        let resources = spec.linux.unwrap().resources.unwrap();
        assert_eq!(resources.vcpus(), Some(2));
        assert_eq!(resources.memory_mib(), Some(301));
        assert_eq!(resources.memory_bytes(), Some(314572801));
        assert_eq!(resources.pids_limit(), Some(20));
        // No limits, or "unlimited" ones (-1, 0).
        assert_eq!(Resources::default().vcpus(), None);
        let unlimited = Resources {
            memory: Some(Memory { limit: Some(-1) }),
            cpu: Some(Cpu {
                quota: Some(-1),
                period: Some(100000),
            }),
            pids: Some(Pids { limit: Some(0) }),
        };
        assert_eq!(unlimited.vcpus(), None);
        assert_eq!(unlimited.memory_mib(), None);
        assert_eq!(unlimited.memory_bytes(), None);
        assert_eq!(unlimited.pids_limit(), None);
    }

    #[test]
    fn terminals_get_their_console_size_and_empty_commands_are_refused() {
        let tty = exec_process(br#"{"terminal": true, "args": ["sh"]}"#).unwrap();
        assert_eq!(
            tty.exec_spec().unwrap().terminal,
            Some(WindowSize { rows: 0, cols: 0 })
        );
        let sized = exec_process(
            br#"{"terminal": true, "consoleSize": {"height": 40, "width": 120}, "args": ["sh"]}"#,
        )
        .unwrap();
        assert_eq!(
            sized.exec_spec().unwrap().terminal,
            Some(WindowSize {
                rows: 40,
                cols: 120
            })
        );
        // A size from containerd beyond the agent's limit is cut to it.
        assert_eq!(
            window_size(70_000, 10_001),
            WindowSize {
                rows: MAX_TERMINAL_SIZE,
                cols: MAX_TERMINAL_SIZE
            }
        );
        let plain = exec_process(br#"{"args": ["sh"]}"#).unwrap();
        assert_eq!(plain.exec_spec().unwrap().terminal, None);
        let none = exec_process(br#"{"args": []}"#).unwrap();
        assert!(matches!(none.exec_spec(), Err(SpecError::NoArgs)));
    }
}
