//! The VMM thread's side of an API: typed requests that configure, start and drive one VM,
//! and their typed answers. Front ends (the HTTP API, a config file) turn user input into
//! [`Request`]s; the VMM thread executes them in order with [`Controller::handle`] and owns all
//! VM state. Nothing here knows about HTTP or JSON.

use std::path::PathBuf;
use std::time::Instant;

use crate::config::{
    ConfigError, DriveConfig, NetConfig, RateLimiterConfig, VmConfig, VsockConfig,
};
use crate::seccomp::Filter;
use crate::vm::{ConsoleIo, Vm};

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
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// A network interface backed by a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInterface {
    pub id: String,
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    pub tx_rate_limiter: Option<RateLimiterConfig>,
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
    /// `PUT /snapshot/create` (paused VM): the VM's state and its memory, in two files.
    CreateSnapshot {
        snapshot_path: PathBuf,
        mem_file_path: PathBuf,
    },
    /// `PUT /snapshot/load` (instead of configuring and starting): the VM continues from a
    /// snapshot, paused unless `resume`.
    LoadSnapshot {
        snapshot_path: PathBuf,
        mem_file_path: PathBuf,
        resume: bool,
    },
}

impl Request {
    /// A short name for the request, as counted in metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Describe => "describe",
            Request::GetMachineConfig => "get_machine_config",
            Request::GetFullConfig => "get_vm_config",
            Request::SetBootSource(_) => "put_boot_source",
            Request::SetMachineConfig(_) => "put_machine_config",
            Request::UpdateMachineConfig(_) => "patch_machine_config",
            Request::SetDrive(_) => "put_drive",
            Request::UpdateDrivePath { .. } => "patch_drive",
            Request::SetNetworkInterface(_) => "put_network_interface",
            Request::SetVsock(_) => "put_vsock",
            Request::SetEntropy => "put_entropy",
            Request::SetLogger(_) => "put_logger",
            Request::SetMetrics(_) => "put_metrics",
            Request::Start => "instance_start",
            Request::SendCtrlAltDel => "send_ctrl_alt_del",
            Request::FlushMetrics => "flush_metrics",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::CreateSnapshot { .. } => "create_snapshot",
            Request::LoadSnapshot { .. } => "load_snapshot",
        }
    }
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
            rate_limiter: d.rate_limiter,
        }
    }
}

/// Executes [`Request`]s on the VMM thread: holds the configuration until `InstanceStart`,
/// then the running [`Vm`].
pub struct Controller {
    id: String,
    metrics_file: Option<std::fs::File>,
    /// Requests handled, by kind, for the metrics.
    requests: std::collections::BTreeMap<&'static str, u64>,
    config: FullConfig,
    vm: Option<Vm>,
    paused: bool,
    console: Option<ConsoleIo>,
    start: Instant,
    /// The filter `InstanceStart` and `LoadSnapshot` install on the VMM thread.
    vmm_thread: Filter,
}

fn refuse(message: impl Into<String>) -> RequestError {
    RequestError(message.into())
}

impl Controller {
    /// A controller for a VM not yet configured. `console` is what the guest's serial console
    /// will be connected to; `start` is when the VMM process started; `vmm_thread` is the
    /// filter starting the VM installs on the calling (VMM) thread (see [`Vm::start`]).
    pub fn new(
        id: impl Into<String>,
        console: ConsoleIo,
        start: Instant,
        vmm_thread: Filter,
    ) -> Controller {
        Controller {
            id: id.into(),
            metrics_file: None,
            requests: Default::default(),
            config: FullConfig {
                boot_source: None,
                machine: MachineConfig::default(),
                drives: Vec::new(),
                network_interfaces: Vec::new(),
                vsock: None,
                entropy: false,
                logger: None,
                metrics: None,
            },
            vm: None,
            paused: false,
            console: Some(console),
            start,
            vmm_thread,
        }
    }

    /// The running VM, once started.
    pub fn vm(&self) -> Option<&Vm> {
        self.vm.as_ref()
    }

    /// Take the VM out to shut it down.
    pub fn take_vm(&mut self) -> Option<Vm> {
        self.vm.take()
    }

    /// The lifecycle state.
    pub fn state(&self) -> VmState {
        match (&self.vm, self.paused) {
            (None, _) => VmState::NotStarted,
            (Some(_), false) => VmState::Running,
            (Some(_), true) => VmState::Paused,
        }
    }

    fn before_start(&self, what: &str) -> Result<(), RequestError> {
        match self.vm {
            None => Ok(()),
            Some(_) => Err(refuse(format!(
                "{what} can only be changed before the VM starts (InstanceStart)"
            ))),
        }
    }

    fn running(&self, what: &str) -> Result<&Vm, RequestError> {
        self.vm
            .as_ref()
            .ok_or_else(|| refuse(format!("cannot {what}: the VM has not been started")))
    }

    /// Carry out one request.
    pub fn handle(&mut self, request: Request) -> Result<Response, RequestError> {
        *self.requests.entry(request.kind()).or_default() += 1;
        match request {
            Request::Describe => Ok(Response::Info(InstanceInfo {
                id: self.id.clone(),
                state: self.state(),
                vmm_version: env!("CARGO_PKG_VERSION").to_string(),
                app_name: "flint".to_string(),
            })),
            Request::GetMachineConfig => Ok(Response::MachineConfig(self.config.machine)),
            Request::GetFullConfig => Ok(Response::FullConfig(self.config.clone())),
            Request::SetBootSource(boot) => {
                self.before_start("the boot source")?;
                self.config.boot_source = Some(boot);
                Ok(Response::Done)
            }
            Request::SetMachineConfig(machine) => {
                self.before_start("the machine configuration")?;
                check_machine(&machine)?;
                self.config.machine = machine;
                Ok(Response::Done)
            }
            Request::UpdateMachineConfig(update) => {
                self.before_start("the machine configuration")?;
                let mut machine = self.config.machine;
                machine.vcpus = update.vcpus.unwrap_or(machine.vcpus);
                machine.mem_mib = update.mem_mib.unwrap_or(machine.mem_mib);
                machine.smt = update.smt.unwrap_or(machine.smt);
                machine.track_dirty_pages = update
                    .track_dirty_pages
                    .unwrap_or(machine.track_dirty_pages);
                machine.huge_pages = update.huge_pages.unwrap_or(machine.huge_pages);
                check_machine(&machine)?;
                self.config.machine = machine;
                Ok(Response::Done)
            }
            Request::SetDrive(drive) => {
                self.before_start("drives")?;
                if drive.root
                    && self
                        .config
                        .drives
                        .iter()
                        .any(|d| d.root && d.id != drive.id)
                {
                    return Err(refuse(format!(
                        "drive {:?} cannot be the root device: another drive already is",
                        drive.id
                    )));
                }
                match self.config.drives.iter_mut().find(|d| d.id == drive.id) {
                    Some(existing) => *existing = drive,
                    None => self.config.drives.push(drive),
                }
                Ok(Response::Done)
            }
            Request::UpdateDrivePath { id, path } => {
                let Some(drive) = self.config.drives.iter_mut().find(|d| d.id == id) else {
                    return Err(refuse(format!("there is no drive with drive_id {id:?}")));
                };
                match &self.vm {
                    // Before start the new path is simply what the VM will use.
                    None => drive.path = path,
                    Some(vm) => {
                        vm.replace_disk(&id, &path)
                            .map_err(|e| refuse(format!("path_on_host: {e}")))?;
                        drive.path = path;
                    }
                }
                Ok(Response::Done)
            }
            Request::SetNetworkInterface(iface) => {
                self.before_start("network interfaces")?;
                if let Some(other) = self
                    .config
                    .network_interfaces
                    .iter()
                    .find(|n| n.tap == iface.tap && n.id != iface.id)
                {
                    return Err(refuse(format!(
                        "host_dev_name: {} is already used by interface {}",
                        iface.tap, other.id
                    )));
                }
                match self
                    .config
                    .network_interfaces
                    .iter_mut()
                    .find(|n| n.id == iface.id)
                {
                    Some(existing) => *existing = iface,
                    None => self.config.network_interfaces.push(iface),
                }
                Ok(Response::Done)
            }
            Request::SetVsock(vsock) => {
                self.before_start("the vsock device")?;
                if vsock.guest_cid < 3 || vsock.guest_cid > u64::from(u32::MAX - 1) {
                    return Err(refuse(format!(
                        "guest_cid: {} is invalid: it must be from 3 to 4294967294",
                        vsock.guest_cid
                    )));
                }
                self.config.vsock = Some(vsock);
                Ok(Response::Done)
            }
            Request::SetEntropy => {
                self.before_start("the entropy device")?;
                self.config.entropy = true;
                Ok(Response::Done)
            }
            Request::SetLogger(logger) => {
                self.config.logger = Some(logger);
                Ok(Response::Done)
            }
            Request::SetMetrics(metrics) => {
                let file =
                    open_output(&metrics.path).map_err(|e| refuse(format!("metrics_path: {e}")))?;
                self.metrics_file = Some(file);
                self.config.metrics = Some(metrics);
                Ok(Response::Done)
            }
            Request::FlushMetrics => {
                if self.metrics_file.is_none() {
                    return Err(refuse(
                        "cannot flush metrics: no metrics file (PUT /metrics first)",
                    ));
                }
                self.flush_metrics()?;
                Ok(Response::Done)
            }
            Request::Start => {
                self.before_start("the VM")
                    .map_err(|_| refuse("the VM is already started"))?;
                let config = self.vm_config()?;
                let console = self.console.take().ok_or_else(|| {
                    refuse("cannot start the VM: an earlier start failed; start a new flint")
                })?;
                let mut vm = match Vm::build(&config, console, self.start) {
                    Ok(vm) => vm,
                    Err(e) => return Err(refuse(format!("cannot start the VM: {e}"))),
                };
                vm.start(&self.vmm_thread)
                    .map_err(|e| refuse(format!("cannot start the VM: {e}")))?;
                self.vm = Some(vm);
                Ok(Response::Done)
            }
            Request::Pause => {
                let vm = self.running("pause")?;
                if !self.paused {
                    vm.pause().map_err(|e| refuse(e.to_string()))?;
                    self.paused = true;
                }
                Ok(Response::Done)
            }
            Request::Resume => {
                let vm = self.running("resume")?;
                vm.resume();
                self.paused = false;
                Ok(Response::Done)
            }
            Request::CreateSnapshot {
                snapshot_path,
                mem_file_path,
            } => {
                let vm = self.running("create a snapshot")?;
                if !self.paused {
                    return Err(refuse(
                        "cannot create a snapshot: the VM is running; pause it first \
                         (PATCH /vm with {\"state\": \"Paused\"})",
                    ));
                }
                vm.snapshot(&snapshot_path, &mem_file_path)
                    .map_err(|e| refuse(format!("cannot create the snapshot: {e}")))?;
                Ok(Response::Done)
            }
            Request::LoadSnapshot {
                snapshot_path,
                mem_file_path,
                resume,
            } => self.load_snapshot(&snapshot_path, &mem_file_path, resume),
            Request::SendCtrlAltDel => {
                let vm = self.running("send Ctrl-Alt-Del")?;
                if self.paused {
                    return Err(refuse("cannot send Ctrl-Alt-Del: the VM is paused"));
                }
                vm.send_ctrl_alt_del();
                Ok(Response::Done)
            }
        }
    }

    /// Append one metrics line to the metrics file, if one is configured.
    pub fn flush_metrics(&mut self) -> Result<(), RequestError> {
        use std::io::Write;
        let Some(file) = self.metrics_file.as_mut() else {
            return Ok(());
        };
        let timestamp_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let api: Vec<(&str, u64)> = self.requests.iter().map(|(k, v)| (*k, *v)).collect();
        let sections = [("api_server", api)];
        let line = match &self.vm {
            Some(vm) => vm.metrics_line(timestamp_ms, &sections),
            None => {
                crate::metrics::json_line(timestamp_ms, &Default::default(), (0, 0), &[], &sections)
            }
        };
        writeln!(file, "{line}").map_err(|e| refuse(format!("cannot write metrics: {e}")))
    }

    /// Build the VM from a snapshot and start it, paused unless `resume`.
    fn load_snapshot(
        &mut self,
        snapshot_path: &std::path::Path,
        mem_file_path: &std::path::Path,
        resume: bool,
    ) -> Result<Response, RequestError> {
        if self.vm.is_some() {
            return Err(refuse(
                "a snapshot can only be loaded before the VM starts; start a new flint",
            ));
        }
        let c = &self.config;
        if c.boot_source.is_some()
            || c.machine != MachineConfig::default()
            || !c.drives.is_empty()
            || !c.network_interfaces.is_empty()
            || c.vsock.is_some()
            || c.entropy
        {
            return Err(refuse(
                "a snapshot can only be loaded into a flint with no VM resources configured: \
                 the snapshot brings its own configuration",
            ));
        }
        // Checked before the console is handed over, so that a wrong path can be corrected.
        crate::snapshot::read_state(snapshot_path)
            .map_err(|e| refuse(format!("cannot load the snapshot: {e}")))?;
        if let Err(e) = std::fs::metadata(mem_file_path) {
            return Err(refuse(format!(
                "cannot load the snapshot: cannot open the memory file {}: {e}",
                mem_file_path.display()
            )));
        }
        let console = self.console.take().ok_or_else(|| {
            refuse("cannot load the snapshot: an earlier start failed; start a new flint")
        })?;
        let (mut vm, config) = Vm::restore(
            snapshot_path,
            mem_file_path,
            &mut |_| {},
            console,
            self.start,
        )
        .map_err(|e| refuse(format!("cannot load the snapshot: {e}")))?;
        let started = if resume {
            vm.start(&self.vmm_thread)
        } else {
            vm.start_paused(&self.vmm_thread)
        };
        started.map_err(|e| refuse(format!("cannot start the VM from the snapshot: {e}")))?;
        self.paused = !resume;
        self.config = FullConfig {
            logger: self.config.logger.take(),
            metrics: self.config.metrics.take(),
            ..full_config(&config)
        };
        self.vm = Some(vm);
        Ok(Response::Done)
    }

    /// The VM configuration the API has built so far.
    fn vm_config(&self) -> Result<VmConfig, RequestError> {
        let boot = self.config.boot_source.as_ref().ok_or_else(|| {
            refuse("cannot start the VM: no boot source (PUT /boot-source first)")
        })?;
        let mut config = VmConfig::new(&boot.kernel);
        config.initrd = boot.initrd.clone();
        if let Some(cmdline) = &boot.cmdline {
            config.cmdline = cmdline.clone();
        }
        config.vcpus = self.config.machine.vcpus;
        config.mem_mib = self.config.machine.mem_mib;
        config.drives = self.config.drives.iter().map(DriveConfig::from).collect();
        config.entropy = self.config.entropy;
        config.nets = self
            .config
            .network_interfaces
            .iter()
            .map(|n| NetConfig {
                tap: n.tap.clone(),
                mac: n.mac,
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
            })
            .collect();
        config.vsock = self.config.vsock.as_ref().map(|v| VsockConfig {
            guest_cid: v.guest_cid,
            uds_path: v.uds_path.clone(),
        });
        config
            .validate()
            .map_err(|e| refuse(format!("cannot start the VM: {e}")))?;
        Ok(config)
    }
}

/// How the API describes a VM built from `config` (a loaded snapshot's).
fn full_config(config: &VmConfig) -> FullConfig {
    FullConfig {
        boot_source: Some(BootSource {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: Some(config.cmdline.clone()),
        }),
        machine: MachineConfig {
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            ..MachineConfig::default()
        },
        drives: config
            .drives
            .iter()
            .enumerate()
            .map(|(n, d)| ApiDrive {
                id: d.id.clone().unwrap_or_else(|| format!("drive{n}")),
                path: d.path.clone(),
                root: d.root,
                read_only: d.read_only,
                partuuid: None,
                cache_type: CacheType::Unsafe,
                rate_limiter: d.rate_limiter,
            })
            .collect(),
        network_interfaces: config
            .nets
            .iter()
            .enumerate()
            .map(|(n, net)| NetworkInterface {
                id: format!("eth{n}"),
                tap: net.tap.clone(),
                mac: net.mac,
                rx_rate_limiter: net.rx_rate_limiter,
                tx_rate_limiter: net.tx_rate_limiter,
            })
            .collect(),
        vsock: config.vsock.as_ref().map(|v| Vsock {
            guest_cid: v.guest_cid,
            uds_path: v.uds_path.clone(),
        }),
        entropy: config.entropy,
        logger: None,
        metrics: None,
    }
}

fn check_machine(machine: &MachineConfig) -> Result<(), RequestError> {
    if machine.smt {
        return Err(refuse(
            "smt: flint presents one thread per core; simultaneous multithreading cannot be enabled",
        ));
    }
    if machine.huge_pages {
        return Err(refuse(
            "huge_pages: huge pages are not supported yet by flint",
        ));
    }
    let mut probe = VmConfig::new("/");
    probe.vcpus = machine.vcpus;
    probe.mem_mib = machine.mem_mib;
    probe.validate().map_err(|e| {
        let field = match e {
            ConfigError::NoVcpus | ConfigError::TooManyVcpus { .. } => "vcpu_count",
            _ => "mem_size_mib",
        };
        refuse(format!("{field}: {e}"))
    })
}

/// Why [`open_output`] refused a path.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot open {}: it is a symbolic link, which flint does not follow", .0.display())]
    Symlink(PathBuf),
    #[error("cannot open {}: it is neither a regular file nor a named pipe nor a character device", .0.display())]
    Kind(PathBuf),
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Open the file a log or metrics lines are appended to (`PUT /logger`, `PUT /metrics`): an
/// existing file is appended to, a missing one is created with mode 0600 (its directory must
/// exist). A symbolic link is refused (`O_NOFOLLOW`), and the file is not inherited by child
/// processes (`O_CLOEXEC`). A named pipe is opened without blocking, whether or not a process
/// reads it yet (flint then holds a read end itself, so opening never fails for want of a
/// reader), and stays non-blocking: lines written while the pipe is full are dropped rather
/// than stalling flint.
pub fn open_output(path: &std::path::Path) -> Result<std::fs::File, OutputError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let flags = libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let open_error = |source: std::io::Error| match source.raw_os_error() {
        Some(libc::ELOOP) => OutputError::Symlink(path.to_path_buf()),
        _ => OutputError::Open {
            path: path.to_path_buf(),
            source,
        },
    };
    let file = match std::fs::File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(flags)
        .open(path)
    {
        Ok(file) => file,
        // A named pipe with no reader: open it for reading too, which never blocks.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => std::fs::File::options()
            .read(true)
            .append(true)
            .custom_flags(flags)
            .open(path)
            .map_err(open_error)?,
        Err(e) => return Err(open_error(e)),
    };
    let kind = file
        .metadata()
        .map_err(|source| OutputError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .file_type();
    if !(kind.is_file() || kind.is_fifo() || kind.is_char_device()) {
        return Err(OutputError::Kind(path.to_path_buf()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> Controller {
        let console = ConsoleIo {
            output: Box::new(std::io::sink()),
            input: None,
            escape: false,
        };
        Controller::new("test-vm", console, Instant::now(), Filter::vmm_thread())
    }

    fn drive(id: &str, root: bool) -> ApiDrive {
        ApiDrive {
            id: id.into(),
            path: PathBuf::from(format!("/{id}.img")),
            root,
            read_only: false,
            partuuid: None,
            cache_type: CacheType::Unsafe,
            rate_limiter: None,
        }
    }

    #[test]
    fn describe_reports_not_started() {
        let mut c = controller();
        match c.handle(Request::Describe).unwrap() {
            Response::Info(info) => {
                assert_eq!(info.id, "test-vm");
                assert_eq!(info.state.as_str(), "Not started");
                assert_eq!(info.app_name, "flint");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn machine_config_is_validated_with_the_field_named() {
        let mut c = controller();
        let m = |vcpus, mem_mib| MachineConfig {
            vcpus,
            mem_mib,
            ..MachineConfig::default()
        };
        assert_eq!(
            c.handle(Request::SetMachineConfig(m(2, 256))),
            Ok(Response::Done)
        );
        assert_eq!(
            c.handle(Request::GetMachineConfig),
            Ok(Response::MachineConfig(m(2, 256)))
        );
        let err = c.handle(Request::SetMachineConfig(m(0, 256))).unwrap_err();
        assert!(err.0.starts_with("vcpu_count:"), "{err}");
        let err = c
            .handle(Request::SetMachineConfig(m(1, 1 << 30)))
            .unwrap_err();
        assert!(err.0.starts_with("mem_size_mib:"), "{err}");
        let update = MachineConfigUpdate {
            mem_mib: Some(512),
            ..Default::default()
        };
        assert_eq!(
            c.handle(Request::UpdateMachineConfig(update)),
            Ok(Response::Done)
        );
        assert_eq!(
            c.handle(Request::GetMachineConfig),
            Ok(Response::MachineConfig(m(2, 512)))
        );
        let smt = MachineConfigUpdate {
            smt: Some(true),
            ..Default::default()
        };
        assert!(c.handle(Request::UpdateMachineConfig(smt)).is_err());
    }

    #[test]
    fn drives_are_replaced_by_id_and_only_one_is_root() {
        let mut c = controller();
        c.handle(Request::SetDrive(drive("rootfs", true))).unwrap();
        c.handle(Request::SetDrive(drive("data", false))).unwrap();
        let mut changed = drive("data", false);
        changed.read_only = true;
        c.handle(Request::SetDrive(changed.clone())).unwrap();
        let err = c
            .handle(Request::SetDrive(drive("other", true)))
            .unwrap_err();
        assert!(err.0.contains("another drive already is"), "{err}");
        match c.handle(Request::GetFullConfig).unwrap() {
            Response::FullConfig(full) => {
                assert_eq!(full.drives, vec![drive("rootfs", true), changed]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_a_client_sent_are_quoted_in_one_line() {
        let mut c = controller();
        let err = c
            .handle(Request::UpdateDrivePath {
                id: "x\nflint: error: forged".into(),
                path: "/n".into(),
            })
            .unwrap_err();
        assert!(!err.0.contains('\n'), "{err}");
        assert!(err.0.contains(r#""x\nflint: error: forged""#), "{err}");
    }

    #[test]
    fn lifecycle_requests_need_a_started_vm() {
        let mut c = controller();
        for req in [Request::Pause, Request::Resume, Request::SendCtrlAltDel] {
            let err = c.handle(req).unwrap_err();
            assert!(err.0.contains("has not been started"), "{err}");
        }
        let err = c.handle(Request::Start).unwrap_err();
        assert!(err.0.contains("no boot source"), "{err}");
    }

    #[test]
    fn snapshots_need_a_paused_vm_or_an_unconfigured_flint() {
        let mut c = controller();
        let create = Request::CreateSnapshot {
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
        };
        let err = c.handle(create).unwrap_err();
        assert!(err.0.contains("has not been started"), "{err}");
        c.handle(Request::SetEntropy).unwrap();
        let load = Request::LoadSnapshot {
            snapshot_path: "/nonexistent/s".into(),
            mem_file_path: "/nonexistent/m".into(),
            resume: true,
        };
        let err = c.handle(load.clone()).unwrap_err();
        assert!(err.0.contains("no VM resources configured"), "{err}");
        let mut c = controller();
        let err = c.handle(load).unwrap_err();
        assert!(err.0.starts_with("cannot load the snapshot:"), "{err}");
        assert!(err.0.contains("/nonexistent/s"), "{err}");
        assert_eq!(c.state(), VmState::NotStarted);
        // The console is still there: the VM can be started after a mistyped path.
        assert!(c.console.is_some());
        let mut c = controller();
        c.handle(Request::SetMachineConfig(MachineConfig {
            vcpus: 2,
            ..MachineConfig::default()
        }))
        .unwrap();
        let err = c
            .handle(Request::LoadSnapshot {
                snapshot_path: "/s".into(),
                mem_file_path: "/m".into(),
                resume: false,
            })
            .unwrap_err();
        assert!(err.0.contains("no VM resources configured"), "{err}");
    }

    #[test]
    fn metrics_lines_count_requests() {
        let mut c = controller();
        let err = c.handle(Request::FlushMetrics).unwrap_err();
        assert!(err.0.contains("PUT /metrics first"), "{err}");
        let dir = std::env::temp_dir().join(format!("flint-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.json");
        c.handle(Request::SetMetrics(MetricsConfig { path: path.clone() }))
            .unwrap();
        c.handle(Request::Describe).unwrap();
        c.handle(Request::FlushMetrics).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0]
                .contains("\"api_server\":{\"describe\":1,\"flush_metrics\":2,\"put_metrics\":1}"),
            "{}",
            lines[0]
        );
        let err = c
            .handle(Request::SetMetrics(MetricsConfig {
                path: PathBuf::from("/nonexistent/dir/m.json"),
            }))
            .unwrap_err();
        assert!(err.0.starts_with("metrics_path: cannot open"), "{err}");
    }

    fn output_scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flint-output-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mkfifo(path: &std::path::Path) {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    }

    /// Run `f` on a thread; fail (rather than hang the test run) if it takes over 10 s.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("it blocked")
    }

    #[test]
    fn metrics_to_a_named_pipe_nobody_reads_never_block() {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = output_scratch("fifo");
        let fifo = dir.join("metrics.fifo");
        mkfifo(&fifo);
        let path = fifo.clone();
        let mut c = within_10s(move || {
            let mut c = controller();
            c.handle(Request::SetMetrics(MetricsConfig { path }))
                .unwrap();
            // Far more than a pipe holds: the lines that do not fit are dropped.
            for _ in 0..2000 {
                let _ = c.flush_metrics();
            }
            c
        });
        // A reader that comes later gets whole lines from the start.
        let mut reader = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = reader.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("{\"utc_timestamp_ms\""), "{text}");
        c.handle(Request::Describe).unwrap();
        drop(c);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_files_refuse_symlinks_and_are_private_and_appended_to() {
        use std::os::unix::fs::PermissionsExt;
        let dir = output_scratch("symlink");
        let target = dir.join("target");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let mut c = controller();
        let err = c
            .handle(Request::SetMetrics(MetricsConfig { path: link.clone() }))
            .unwrap_err();
        assert!(
            err.0.starts_with("metrics_path: cannot open") && err.0.contains("symbolic link"),
            "{err}"
        );
        assert!(!target.exists(), "the symlink was followed");
        std::fs::write(&target, "old\n").unwrap();
        assert!(c
            .handle(Request::SetMetrics(MetricsConfig { path: link }))
            .is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "old\n");
        // A new file is private; an existing one is appended to.
        let new = dir.join("new");
        c.handle(Request::SetMetrics(MetricsConfig { path: new.clone() }))
            .unwrap();
        let mode = std::fs::metadata(&new).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        c.handle(Request::SetMetrics(MetricsConfig {
            path: target.clone(),
        }))
        .unwrap();
        c.handle(Request::FlushMetrics).unwrap();
        let text = std::fs::read_to_string(&target).unwrap();
        assert!(text.starts_with("old\n{"), "{text}");
        // Directories are refused with a reason.
        let err = c
            .handle(Request::SetMetrics(MetricsConfig { path: dir.clone() }))
            .unwrap_err();
        assert!(err.0.starts_with("metrics_path: cannot open"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn start_failures_are_reported_and_leave_the_vm_unstarted() {
        let mut c = controller();
        c.handle(Request::SetBootSource(BootSource {
            kernel: PathBuf::from("/nonexistent/vmlinux"),
            initrd: None,
            cmdline: None,
        }))
        .unwrap();
        let err = c.handle(Request::Start).unwrap_err();
        assert!(err.0.starts_with("cannot start the VM:"), "{err}");
        assert_eq!(c.state(), VmState::NotStarted);
    }
}
