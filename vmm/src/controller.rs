//! The VMM thread's side of an API: typed requests that configure, start and drive one VM,
//! and their typed answers. Front ends (the HTTP API, a config file) turn user input into
//! [`Request`]s; the VMM thread executes them in order with [`Controller::handle`] and owns all
//! VM state. Nothing here knows about HTTP or JSON.

use std::path::PathBuf;

use crate::config::DriveConfig;

/// The kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSource {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// `None`: flint's default command line.
    pub cmdline: Option<String>,
}

/// vCPUs and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineConfig {
    pub vcpus: u32,
    pub mem_mib: u64,
    /// Simultaneous multithreading: accepted for compatibility; flint presents one thread per
    /// core, so `true` is refused.
    pub smt: bool,
    /// Dirty-page tracking (for snapshots): accepted and reported; not used yet.
    pub track_dirty_pages: bool,
    /// Back guest memory with 2 MiB huge pages.
    pub huge_pages: bool,
}

/// A partial update of [`MachineConfig`] (`PATCH /machine-config`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineConfigUpdate {
    pub vcpus: Option<u32>,
    pub mem_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<bool>,
}

/// How a drive caches writes (Firecracker's `cache_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheType {
    /// Guest flushes are acknowledged without reaching stable storage.
    #[default]
    Unsafe,
    /// Guest flushes reach stable storage (`fdatasync`).
    Writeback,
}

/// One drive as the API describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiDrive {
    /// `drive_id`: how the API names the drive; also the serial the guest reads.
    pub id: String,
    pub path: PathBuf,
    pub root: bool,
    pub read_only: bool,
    /// Root partition UUID: with it the guest mounts `root=PARTUUID=...` instead of
    /// `/dev/vda`.
    pub partuuid: Option<String>,
    pub cache_type: CacheType,
}

/// A network interface backed by a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInterface {
    pub id: String,
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

/// The vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vsock {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// Where flint logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggerConfig {
    pub path: PathBuf,
    /// "Error", "Warning", "Info", "Debug" (or "Trace", "Off").
    pub level: Option<String>,
    pub show_level: bool,
    pub show_log_origin: bool,
}

/// Where flint writes metrics (JSON lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub path: PathBuf,
}

/// Lifecycle state as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    NotStarted,
    Running,
    Paused,
}

impl VmState {
    /// The API's spelling: "Not started", "Running", "Paused".
    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
        }
    }
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    pub state: VmState,
    pub vmm_version: String,
    pub app_name: String,
}

/// Everything configured, as `GET /vm/config` and a config file describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullConfig {
    pub boot_source: Option<BootSource>,
    pub machine: MachineConfig,
    pub drives: Vec<ApiDrive>,
    pub network_interfaces: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub entropy: bool,
    pub logger: Option<LoggerConfig>,
    pub metrics: Option<MetricsConfig>,
}

/// A request to the VMM thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET /`
    Describe,
    /// `GET /machine-config`
    GetMachineConfig,
    /// `GET /vm/config`
    GetFullConfig,
    /// `PUT /boot-source` (before start)
    SetBootSource(BootSource),
    /// `PUT /machine-config` (before start)
    SetMachineConfig(MachineConfig),
    /// `PATCH /machine-config` (before start)
    UpdateMachineConfig(MachineConfigUpdate),
    /// `PUT /drives/{id}` (before start; replaces a drive with the same id)
    SetDrive(ApiDrive),
    /// `PATCH /drives/{id}` with a new `path_on_host` (after start: the guest sees the new
    /// medium and size)
    UpdateDrivePath { id: String, path: PathBuf },
    /// `PUT /network-interfaces/{id}` (before start)
    SetNetworkInterface(NetworkInterface),
    /// `PUT /vsock` (before start)
    SetVsock(Vsock),
    /// `PUT /entropy` (before start)
    SetEntropy,
    /// `PUT /logger`
    SetLogger(LoggerConfig),
    /// `PUT /metrics`
    SetMetrics(MetricsConfig),
    /// `PUT /actions` `InstanceStart`
    Start,
    /// `PUT /actions` `SendCtrlAltDel`
    SendCtrlAltDel,
    /// `PUT /actions` `FlushMetrics`
    FlushMetrics,
    /// `PATCH /vm` `{"state": "Paused"}`
    Pause,
    /// `PATCH /vm` `{"state": "Resumed"}`
    Resume,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// 204: done, nothing to say.
    Done,
    Info(InstanceInfo),
    MachineConfig(MachineConfig),
    FullConfig(FullConfig),
}

/// A request that cannot be carried out: the API answers 400 with this sentence as
/// `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: crate::config::DEFAULT_VCPUS,
            mem_mib: crate::config::DEFAULT_MEM_MIB,
            smt: false,
            track_dirty_pages: false,
            huge_pages: false,
        }
    }
}

/// Conversion of an API drive to the VM's drive configuration.
impl From<&ApiDrive> for DriveConfig {
    fn from(d: &ApiDrive) -> DriveConfig {
        DriveConfig {
            path: d.path.clone(),
            read_only: d.read_only,
            root: d.root,
            id: Some(d.id.clone()),
        }
    }
}
