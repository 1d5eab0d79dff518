//! The VMM thread's side of a control interface: typed requests that configure, start and
//! drive one VM, and their typed answers. Front ends (the HTTP API, a config file) turn user
//! input into [`Request`]s carrying the VM's own configuration types ([`VmConfig`]'s parts);
//! the VMM thread executes them in order with [`Controller::handle`] and owns all VM state.
//! Every change is checked by validating the whole configuration it would give
//! ([`VmConfig::validate`], the one place flint validates a VM), and refused errors say which
//! [`Field`] is wrong so that each front end names it in its own terms. Nothing here knows
//! about HTTP, JSON or how a front end spells its fields.

use std::path::PathBuf;
use std::time::Instant;

use crate::config::{
    BalloonConfig, ConfigError, DriveConfig, Field, NetConfig, RateLimiterConfig, VmConfig,
    VsockConfig,
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

/// A partial update of the vCPUs and memory; what is `None` stays as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineUpdate {
    pub vcpus: Option<u32>,
    pub mem_mib: Option<u64>,
    pub smt: Option<bool>,
    pub huge_pages: Option<crate::HugePages>,
    pub track_dirty_pages: Option<bool>,
}

/// Lifecycle state.
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

/// Who this VMM is and what state its VM is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    pub state: VmState,
    pub vmm_version: String,
}

/// Everything configured so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigView {
    /// The kernel, once set (the kernel, initrd and command line in `vm` are placeholders
    /// until then).
    pub boot_source: Option<BootSource>,
    /// vCPUs, memory and devices. Interfaces and drives carry the ids the front end gave.
    pub vm: VmConfig,
    /// Where metrics lines go, if anywhere, and what they carry besides the counters.
    pub metrics: Option<MetricsConfig>,
}

/// `PUT /metrics`: the file (or named pipe) metrics lines are appended to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsConfig {
    pub path: PathBuf,
    /// Each line starts with `"id"`, the instance id (`--id`).
    pub emit_id: bool,
    /// Each line carries these pairs as its `"properties"` object (when there are any).
    pub properties: std::collections::BTreeMap<String, String>,
}

impl MetricsConfig {
    /// Metrics to `path`, with nothing extra on each line.
    pub fn to_path(path: impl Into<PathBuf>) -> MetricsConfig {
        MetricsConfig {
            path: path.into(),
            ..Default::default()
        }
    }
}

/// A request to the VMM thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Who and in what state (`GET /`).
    Describe,
    /// vCPUs and memory (`GET /machine-config`).
    GetMachineConfig,
    /// Everything configured (`GET /vm/config`).
    GetFullConfig,
    /// Before start.
    SetBootSource(BootSource),
    /// Before start: every value.
    SetMachineConfig {
        vcpus: u32,
        mem_mib: u64,
        /// Two threads per core (see [`VmConfig::smt`]).
        smt: bool,
        huge_pages: crate::HugePages,
        track_dirty_pages: bool,
    },
    /// Before start: some values.
    UpdateMachineConfig(MachineUpdate),
    /// Before start; the drive must have an id, and replaces the drive with the same id.
    SetDrive(DriveConfig),
    /// A new backing file and/or rate limiter for a drive: before start simply what the VM
    /// will use; after start the guest sees the new medium and size, and the new limits apply
    /// to its next request.
    UpdateDrive {
        id: String,
        path: Option<PathBuf>,
        rate_limiter: Option<RateLimiterConfig>,
    },
    /// Before start; the interface must have an id, and replaces the one with the same id.
    SetNetworkInterface(NetConfig),
    /// New rate limiters for an interface, before or after start (`None`: unchanged).
    UpdateNetworkInterface {
        id: String,
        rx_rate_limiter: Option<RateLimiterConfig>,
        tx_rate_limiter: Option<RateLimiterConfig>,
    },
    /// Before start.
    SetVsock(VsockConfig),
    /// Before start: give the guest an entropy device, with these limits if any.
    SetEntropy(Option<RateLimiterConfig>),
    /// Before start: give the guest a memory balloon (replacing one set before).
    SetBalloon(BalloonConfig),
    /// A new balloon target, before or after start.
    UpdateBalloon {
        amount_mib: u32,
    },
    /// The balloon's configuration (with the target last set).
    GetBalloon,
    /// The balloon's target and actual size and the guest's latest memory statistics.
    GetBalloonStats,
    /// A new statistics polling interval: before start any; after start only another
    /// non-zero one (statistics cannot be turned on or off then).
    UpdateBalloonStats {
        stats_polling_interval_s: u16,
    },
    /// Append metrics lines to this file (see [`open_output`]).
    SetMetrics(MetricsConfig),
    /// Build and boot the VM.
    Start,
    SendCtrlAltDel,
    /// Write a metrics line now.
    FlushMetrics,
    Pause,
    Resume,
    /// Before start: which NICs serve the MMDS, at which address, in which version.
    SetMmdsConfig {
        version: devices::mmds::MmdsVersion,
        ipv4_address: std::net::Ipv4Addr,
        network_interfaces: Vec<String>,
        imds_compat: bool,
    },
    /// Replace the MMDS data (any time).
    PutMmds(serde_json::Value),
    /// Merge into the MMDS data (JSON Merge Patch; any time).
    PatchMmds(serde_json::Value),
    /// The MMDS data.
    GetMmds,
    /// Paused VM only: the VM's state and its memory (all of it, or a diff), in two files.
    CreateSnapshot {
        snapshot_path: PathBuf,
        mem_file_path: PathBuf,
        snapshot_type: crate::SnapshotType,
    },
    /// Instead of configuring and starting: the VM continues from a snapshot, paused unless
    /// `resume`.
    LoadSnapshot {
        snapshot_path: PathBuf,
        /// The memory file, or the page-fault handler that serves it.
        mem_backend: crate::MemBackend,
        resume: bool,
        overrides: LoadOverrides,
    },
}

/// What a snapshot load changes of the snapshot's configuration: backends only, never the
/// devices the guest sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOverrides {
    /// A new TAP device for the network interface with this id: `(iface_id, tap)`.
    pub taps: Vec<(String, String)>,
    /// A new host socket path for the vsock device.
    pub vsock_uds_path: Option<PathBuf>,
    /// How the guest clock continues.
    pub clock: crate::ClockRestore,
    /// What backs guest memory, if not what the snapshot's VM had.
    pub huge_pages: Option<crate::HugePages>,
    /// Whether the restored VM tracks dirty pages, if not as the snapshot's VM did.
    pub track_dirty_pages: Option<bool>,
}

impl LoadOverrides {
    /// Check the overrides against the snapshot's configuration `saved`.
    fn check(&self, saved: &VmConfig) -> Result<(), RequestError> {
        for (id, _) in &self.taps {
            if !saved.nets.iter().any(|n| n.id.as_deref() == Some(id)) {
                return Err(refuse_field(
                    Field::NetId,
                    format!("the snapshot has no network interface with the id {id:?}"),
                ));
            }
        }
        if self.vsock_uds_path.is_some() && saved.vsock.is_none() {
            return Err(refuse(
                "the snapshot has no vsock device to give a new socket path",
            ));
        }
        if self
            .huge_pages
            .is_some_and(|h| h == crate::HugePages::Size2M)
            && saved.balloon.is_some()
        {
            return Err(ConfigError::BalloonHugePages.into());
        }
        Ok(())
    }

    /// Apply the overrides to `config` (checked with [`LoadOverrides::check`]).
    fn apply(&self, config: &mut VmConfig) {
        for (id, tap) in &self.taps {
            for net in config
                .nets
                .iter_mut()
                .filter(|n| n.id.as_deref() == Some(id))
            {
                net.tap = tap.clone();
            }
        }
        if let (Some(path), Some(vsock)) = (&self.vsock_uds_path, config.vsock.as_mut()) {
            vsock.uds_path = path.clone();
        }
        if let Some(huge_pages) = self.huge_pages {
            config.huge_pages = huge_pages;
        }
        if let Some(track) = self.track_dirty_pages {
            config.track_dirty_pages = track;
        }
    }
}

impl Request {
    /// A short name for the request, as counted in metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Describe => "describe",
            Request::GetMachineConfig => "get_machine_config",
            Request::GetFullConfig => "get_vm_config",
            Request::SetBootSource(_) => "put_boot_source",
            Request::SetMachineConfig { .. } => "put_machine_config",
            Request::UpdateMachineConfig(_) => "patch_machine_config",
            Request::SetDrive(_) => "put_drive",
            Request::UpdateDrive { .. } => "patch_drive",
            Request::SetNetworkInterface(_) => "put_network_interface",
            Request::UpdateNetworkInterface { .. } => "patch_network_interface",
            Request::SetVsock(_) => "put_vsock",
            Request::SetEntropy(_) => "put_entropy",
            Request::SetMetrics(_) => "put_metrics",
            Request::SetBalloon(_) => "put_balloon",
            Request::UpdateBalloon { .. } => "patch_balloon",
            Request::GetBalloon => "get_balloon",
            Request::GetBalloonStats => "get_balloon_stats",
            Request::UpdateBalloonStats { .. } => "patch_balloon_stats",
            Request::Start => "instance_start",
            Request::SendCtrlAltDel => "send_ctrl_alt_del",
            Request::FlushMetrics => "flush_metrics",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::CreateSnapshot { .. } => "create_snapshot",
            Request::SetMmdsConfig { .. } => "put_mmds_config",
            Request::PutMmds(_) => "put_mmds",
            Request::PatchMmds(_) => "patch_mmds",
            Request::GetMmds => "get_mmds",
            Request::LoadSnapshot { .. } => "load_snapshot",
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Done, nothing to say.
    Done,
    Info(InstanceInfo),
    Config(Box<ConfigView>),
    /// The MMDS data.
    Mmds(serde_json::Value),
    Balloon(BalloonConfig),
    BalloonStats(Box<BalloonStats>),
}

/// The balloon's size and the guest's memory statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonStats {
    /// The target in 4 KiB pages.
    pub target_pages: u32,
    /// The pages the guest says the balloon holds.
    pub actual_pages: u32,
    /// The statistics the guest reported (none before it did).
    pub guest: devices::virtio::balloon::GuestStats,
}

/// A request that cannot be carried out: one sentence, and the field it is about (which a
/// front end names in its own terms before the sentence).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub field: Option<Field>,
    pub message: String,
}

impl From<ConfigError> for RequestError {
    fn from(e: ConfigError) -> RequestError {
        RequestError {
            field: Some(e.field()),
            message: e.to_string(),
        }
    }
}

fn refuse(message: impl Into<String>) -> RequestError {
    RequestError {
        field: None,
        message: message.into(),
    }
}

fn refuse_field(field: Field, message: impl Into<String>) -> RequestError {
    RequestError {
        field: Some(field),
        message: message.into(),
    }
}

fn no_balloon() -> RequestError {
    refuse_field(Field::Balloon, crate::Error::NoBalloon.to_string())
}

/// Executes [`Request`]s on the VMM thread: holds the configuration until start, then the
/// running [`Vm`].
pub struct Controller {
    id: String,
    metrics_file: Option<std::fs::File>,
    /// Requests handled, by kind, for the metrics.
    requests: crate::metrics::RequestCounts,
    /// Requests refused, by kind.
    refused: crate::metrics::RequestCounts,
    config: ConfigView,
    vm: Option<Vm>,
    paused: bool,
    console: Option<ConsoleIo>,
    start: Instant,
    /// The filter `InstanceStart` and `LoadSnapshot` install on the VMM thread.
    vmm_thread: Filter,
    /// The MMDS data store: the API's, and the NICs' once the VM serves it.
    mmds: crate::config::MmdsStore,
}

/// The configuration of a controller nothing has been asked of: no devices, not even the
/// entropy device (unlike [`VmConfig::new`]), as in Firecracker.
fn unconfigured() -> VmConfig {
    VmConfig {
        entropy: false,
        ..VmConfig::new("")
    }
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
            refused: Default::default(),
            config: ConfigView {
                boot_source: None,
                vm: unconfigured(),
                metrics: None,
            },
            vm: None,
            paused: false,
            console: Some(console),
            start,
            vmm_thread,
            mmds: Default::default(),
        }
    }

    /// Hold at most `limit` bytes of MMDS data (`--mmds-size-limit`); before any MMDS request.
    pub fn set_mmds_size_limit(&mut self, limit: usize) {
        self.mmds = crate::config::MmdsStore(devices::mmds::Mmds::shared(limit));
    }

    fn mmds_store(&self) -> std::sync::MutexGuard<'_, devices::mmds::Mmds> {
        self.mmds.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Give the VM Firecracker's boot-timer MMIO device (`--boot-timer`); see
    /// [`VmConfig::boot_timer`].
    pub fn enable_boot_timer(&mut self) {
        self.config.vm.boot_timer = true;
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

    /// Count a request the front end handled itself (its logger, say) in the metrics.
    pub fn count_request(&mut self, kind: &'static str) {
        *self.requests.entry(kind).or_default() += 1;
    }

    /// Count a request of `kind` that was refused, in the metrics.
    pub fn count_refusal(&mut self, kind: &'static str) {
        *self.refused.entry(kind).or_default() += 1;
    }

    fn before_start(&self, what: &str) -> Result<(), RequestError> {
        match self.vm {
            None => Ok(()),
            Some(_) => Err(refuse(format!(
                "{what} can only be changed before the VM starts"
            ))),
        }
    }

    fn running(&self, what: &str) -> Result<&Vm, RequestError> {
        self.vm
            .as_ref()
            .ok_or_else(|| refuse(format!("cannot {what}: the VM has not been started")))
    }

    /// Keep `change` applied to the configuration if the result is valid.
    fn change(&mut self, change: impl FnOnce(&mut VmConfig)) -> Result<Response, RequestError> {
        let mut candidate = self.config.vm.clone();
        change(&mut candidate);
        candidate.validate()?;
        self.config.vm = candidate;
        Ok(Response::Done)
    }

    /// Carry out one request.
    pub fn handle(&mut self, request: Request) -> Result<Response, RequestError> {
        let kind = request.kind();
        self.count_request(kind);
        let result = self.carry_out(request);
        if result.is_err() {
            self.count_refusal(kind);
        }
        result
    }

    fn carry_out(&mut self, request: Request) -> Result<Response, RequestError> {
        match request {
            Request::Describe => Ok(Response::Info(InstanceInfo {
                id: self.id.clone(),
                state: self.state(),
                vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            })),
            Request::GetMachineConfig | Request::GetFullConfig => {
                Ok(Response::Config(Box::new(self.config.clone())))
            }
            Request::SetBootSource(boot) => {
                self.before_start("the boot source")?;
                let cmdline = boot
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| crate::config::DEFAULT_CMDLINE.to_string());
                self.change(|c| c.cmdline = cmdline)?;
                self.config.boot_source = Some(boot);
                Ok(Response::Done)
            }
            Request::SetMachineConfig {
                vcpus,
                mem_mib,
                smt,
                huge_pages,
                track_dirty_pages,
            } => {
                self.before_start("the machine configuration")?;
                self.change(|c| {
                    c.vcpus = vcpus;
                    c.mem_mib = mem_mib;
                    c.smt = smt;
                    c.huge_pages = huge_pages;
                    c.track_dirty_pages = track_dirty_pages;
                })
            }
            Request::UpdateMachineConfig(update) => {
                self.before_start("the machine configuration")?;
                self.change(|c| {
                    c.vcpus = update.vcpus.unwrap_or(c.vcpus);
                    c.mem_mib = update.mem_mib.unwrap_or(c.mem_mib);
                    c.smt = update.smt.unwrap_or(c.smt);
                    c.huge_pages = update.huge_pages.unwrap_or(c.huge_pages);
                    c.track_dirty_pages = update.track_dirty_pages.unwrap_or(c.track_dirty_pages);
                })
            }
            Request::SetDrive(drive) => {
                self.before_start("drives")?;
                if drive.id.is_none() {
                    return Err(refuse_field(Field::DriveId, "a drive needs an id"));
                }
                self.change(|c| match c.drives.iter_mut().find(|d| d.id == drive.id) {
                    Some(existing) => *existing = drive,
                    None => c.drives.push(drive),
                })
            }
            Request::UpdateDrive {
                id,
                path,
                rate_limiter,
            } => {
                let known = self
                    .config
                    .vm
                    .drives
                    .iter()
                    .position(|d| d.id.as_ref() == Some(&id));
                let Some(index) = known else {
                    return Err(refuse_field(
                        Field::DriveId,
                        format!("there is no drive with the id {id:?}"),
                    ));
                };
                // Validated as the whole configuration would be, before anything changes.
                let mut candidate = self.config.vm.clone();
                if let Some(limiter) = rate_limiter {
                    candidate.drives[index].rate_limiter = Some(limiter);
                }
                candidate.validate()?;
                if let Some(vm) = &self.vm {
                    if let Some(path) = &path {
                        vm.replace_disk(&id, path)
                            .map_err(|e| refuse_field(Field::DrivePath, e.to_string()))?;
                    }
                    if let Some(limiter) = &rate_limiter {
                        vm.update_drive_rate_limiter(&id, limiter)
                            .map_err(|e| refuse_field(Field::RateLimiter, e.to_string()))?;
                    }
                }
                if let Some(path) = path {
                    candidate.drives[index].path = path;
                }
                self.config.vm = candidate;
                Ok(Response::Done)
            }
            Request::UpdateNetworkInterface {
                id,
                rx_rate_limiter,
                tx_rate_limiter,
            } => {
                let known = self
                    .config
                    .vm
                    .nets
                    .iter()
                    .position(|n| n.id.as_ref() == Some(&id));
                let Some(index) = known else {
                    return Err(refuse_field(
                        Field::NetId,
                        format!("there is no network interface with the id {id:?}"),
                    ));
                };
                let mut candidate = self.config.vm.clone();
                let net = &mut candidate.nets[index];
                if let Some(limiter) = rx_rate_limiter {
                    net.rx_rate_limiter = Some(limiter);
                }
                if let Some(limiter) = tx_rate_limiter {
                    net.tx_rate_limiter = Some(limiter);
                }
                candidate.validate()?;
                if let Some(vm) = &self.vm {
                    vm.update_net_rate_limiters(
                        index,
                        rx_rate_limiter.as_ref(),
                        tx_rate_limiter.as_ref(),
                    )
                    .map_err(|e| refuse_field(Field::RateLimiter, e.to_string()))?;
                }
                self.config.vm = candidate;
                Ok(Response::Done)
            }
            Request::SetNetworkInterface(iface) => {
                self.before_start("network interfaces")?;
                if iface.id.is_none() {
                    return Err(refuse_field(Field::NetId, "an interface needs an id"));
                }
                self.change(|c| match c.nets.iter_mut().find(|n| n.id == iface.id) {
                    Some(existing) => *existing = iface,
                    None => c.nets.push(iface),
                })
            }
            Request::SetVsock(vsock) => {
                self.before_start("the vsock device")?;
                self.change(|c| c.vsock = Some(vsock))
            }
            Request::SetEntropy(rate_limiter) => {
                self.before_start("the entropy device")?;
                self.change(|c| {
                    c.entropy = true;
                    c.entropy_rate_limiter = rate_limiter;
                })
            }
            Request::SetBalloon(balloon) => {
                self.before_start("the balloon device")?;
                self.change(|c| c.balloon = Some(balloon))
            }
            Request::UpdateBalloon { amount_mib } => {
                let mut candidate = self.config.vm.clone();
                let Some(balloon) = candidate.balloon.as_mut() else {
                    return Err(no_balloon());
                };
                balloon.amount_mib = amount_mib;
                let pages = balloon.target_pages();
                candidate.validate()?;
                if let Some(vm) = &self.vm {
                    vm.set_balloon_target(pages)
                        .map_err(|e| refuse_field(Field::Balloon, e.to_string()))?;
                }
                self.config.vm = candidate;
                Ok(Response::Done)
            }
            Request::GetBalloon => match self.config.vm.balloon {
                Some(b) => Ok(Response::Balloon(b)),
                None => Err(no_balloon()),
            },
            Request::GetBalloonStats => {
                let Some(balloon) = self.config.vm.balloon else {
                    return Err(no_balloon());
                };
                if balloon.stats_polling_interval_s == 0 {
                    return Err(refuse_field(
                        Field::Balloon,
                        crate::Error::BalloonStatsDisabled.to_string(),
                    ));
                }
                let stats = match &self.vm {
                    Some(vm) => {
                        let (target_pages, actual_pages, guest) = vm
                            .balloon_stats()
                            .map_err(|e| refuse_field(Field::Balloon, e.to_string()))?;
                        BalloonStats {
                            target_pages,
                            actual_pages,
                            guest,
                        }
                    }
                    None => BalloonStats {
                        target_pages: balloon.target_pages(),
                        actual_pages: 0,
                        guest: Default::default(),
                    },
                };
                Ok(Response::BalloonStats(Box::new(stats)))
            }
            Request::UpdateBalloonStats {
                stats_polling_interval_s,
            } => {
                let Some(balloon) = self.config.vm.balloon else {
                    return Err(no_balloon());
                };
                if let Some(vm) = &self.vm {
                    let was = balloon.stats_polling_interval_s;
                    if (was == 0) != (stats_polling_interval_s == 0) {
                        return Err(refuse_field(
                            Field::Balloon,
                            "the balloon's statistics cannot be turned on or off once the VM \
                             runs, only their interval changed",
                        ));
                    }
                    vm.set_balloon_stats_interval(stats_polling_interval_s)
                        .map_err(|e| refuse_field(Field::Balloon, e.to_string()))?;
                }
                self.change(|c| {
                    if let Some(b) = c.balloon.as_mut() {
                        b.stats_polling_interval_s = stats_polling_interval_s;
                    }
                })
            }
            Request::SetMmdsConfig {
                version,
                ipv4_address,
                network_interfaces,
                imds_compat,
            } => {
                self.before_start("the MMDS configuration")?;
                let store = self.mmds.clone();
                self.change(|c| {
                    c.mmds = Some(crate::config::MmdsConfig {
                        version,
                        ipv4_address,
                        network_interfaces,
                        imds_compat,
                        store,
                    })
                })?;
                self.mmds_store().configure(version, imds_compat);
                Ok(Response::Done)
            }
            Request::PutMmds(data) => {
                self.mmds_store()
                    .put(data)
                    .map_err(|e| refuse_field(Field::Mmds, e.to_string()))?;
                Ok(Response::Done)
            }
            Request::PatchMmds(patch) => {
                self.mmds_store()
                    .patch(&patch)
                    .map_err(|e| refuse_field(Field::Mmds, e.to_string()))?;
                Ok(Response::Done)
            }
            Request::GetMmds => Ok(Response::Mmds(self.mmds_store().data().clone())),
            Request::SetMetrics(metrics) => {
                let file = open_output(&metrics.path)
                    .map_err(|e| refuse_field(Field::MetricsPath, e.to_string()))?;
                self.metrics_file = Some(file);
                self.config.metrics = Some(metrics);
                Ok(Response::Done)
            }
            Request::FlushMetrics => {
                if self.metrics_file.is_none() {
                    return Err(refuse(
                        "cannot flush metrics: no metrics file is configured",
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
                snapshot_type,
            } => {
                let vm = self.running("create a snapshot")?;
                if !self.paused {
                    return Err(refuse(
                        "cannot create a snapshot: the VM is running; pause it first",
                    ));
                }
                vm.snapshot(&snapshot_path, &mem_file_path, snapshot_type)
                    .map_err(|e| refuse(format!("cannot create the snapshot: {e}")))?;
                Ok(Response::Done)
            }
            Request::LoadSnapshot {
                snapshot_path,
                mem_backend,
                resume,
                overrides,
            } => self.load_snapshot(&snapshot_path, &mem_backend, resume, &overrides),
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
        let sections = crate::metrics::api_sections(&self.requests, &self.refused);
        let mut line = match &self.vm {
            Some(vm) => vm.metrics_line(timestamp_ms, &sections),
            None => {
                crate::metrics::json_line(timestamp_ms, &Default::default(), (0, 0), &[], &sections)
            }
        };
        if let Some(config) = &self.config.metrics {
            let id = config.emit_id.then_some(self.id.as_str());
            line = crate::metrics::with_id_and_properties(&line, id, &config.properties);
        }
        writeln!(file, "{line}").map_err(|e| refuse(format!("cannot write metrics: {e}")))
    }

    /// Build the VM from a snapshot and start it, paused unless `resume`.
    fn load_snapshot(
        &mut self,
        snapshot_path: &std::path::Path,
        mem_backend: &crate::MemBackend,
        resume: bool,
        overrides: &LoadOverrides,
    ) -> Result<Response, RequestError> {
        if self.vm.is_some() {
            return Err(refuse(
                "a snapshot can only be loaded before the VM starts; start a new flint",
            ));
        }
        // (The command line's boot timer is no VM resource.)
        let nothing = VmConfig {
            boot_timer: self.config.vm.boot_timer,
            ..unconfigured()
        };
        if self.config.boot_source.is_some() || self.config.vm != nothing {
            return Err(refuse(
                "a snapshot can only be loaded into a flint with no VM resources configured: \
                 the snapshot brings its own configuration",
            ));
        }
        // Checked before the console is handed over, so that a wrong path can be corrected.
        let saved = crate::snapshot::read_state(snapshot_path)
            .map_err(|e| refuse(format!("cannot load the snapshot: {e}")))?;
        if saved.diff_base.is_some() {
            let e = crate::Error::DiffSnapshotLoad(snapshot_path.to_path_buf());
            return Err(refuse(format!("cannot load the snapshot: {e}")));
        }
        overrides.check(&saved.config)?;
        // Before the console is handed over, so that the client can try again without it.
        overrides
            .clock
            .flags_for(&saved.vm.clock)
            .map_err(|e| refuse(format!("cannot load the snapshot: {e}")))?;
        match mem_backend {
            crate::MemBackend::File(mem_file_path) => {
                if let Err(e) = std::fs::metadata(mem_file_path) {
                    return Err(refuse(format!(
                        "cannot load the snapshot: cannot open the memory file {}: {e}",
                        mem_file_path.display()
                    )));
                }
            }
            crate::MemBackend::Uffd(socket) => {
                if let Err(e) = std::fs::metadata(socket) {
                    let e = crate::uffd::UffdError::Connect {
                        path: socket.clone(),
                        source: e,
                    };
                    return Err(refuse(format!("cannot load the snapshot: {e}")));
                }
            }
        }
        let console = self.console.take().ok_or_else(|| {
            refuse("cannot load the snapshot: an earlier start failed; start a new flint")
        })?;
        let store = self.mmds.clone();
        let (mut vm, config) = Vm::restore_with_clock(
            snapshot_path,
            mem_backend,
            &mut |config| {
                overrides.apply(config);
                // The restored NICs serve this controller's store, which the API reads.
                if let Some(mmds) = config.mmds.as_mut() {
                    mmds.store = store.clone();
                }
            },
            console,
            self.start,
            overrides.clock,
        )
        .map_err(|e| refuse(format!("cannot load the snapshot: {e}")))?;
        // A page-fault handler that went away while the VM was restored (or refused it).
        if let Some(crate::Ending::PageFaultHandlerGone(path)) = vm.ending() {
            let e = crate::Error::PageFaultHandlerGone(path);
            return Err(refuse(format!("cannot load the snapshot: {e}")));
        }
        let started = if resume {
            vm.start(&self.vmm_thread)
        } else {
            vm.start_paused(&self.vmm_thread)
        };
        started.map_err(|e| refuse(format!("cannot start the VM from the snapshot: {e}")))?;
        self.paused = !resume;
        self.config.boot_source = Some(BootSource {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: Some(config.cmdline.clone()),
        });
        self.config.vm = config;
        self.vm = Some(vm);
        Ok(Response::Done)
    }

    /// The VM configuration built so far, with its kernel.
    fn vm_config(&self) -> Result<VmConfig, RequestError> {
        let boot =
            self.config.boot_source.as_ref().ok_or_else(|| {
                refuse("cannot start the VM: no boot source (kernel) is configured")
            })?;
        let mut config = self.config.vm.clone();
        config.kernel = boot.kernel.clone();
        config.initrd = boot.initrd.clone();
        config.validate()?;
        Ok(config)
    }
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

    fn drive(id: &str, root: bool) -> DriveConfig {
        DriveConfig {
            id: Some(id.into()),
            root,
            ..DriveConfig::new(format!("/{id}.img"))
        }
    }

    fn view(c: &mut Controller) -> ConfigView {
        match c.handle(Request::GetFullConfig).unwrap() {
            Response::Config(view) => *view,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_balloon_is_configured_validated_and_reported_before_start() {
        let mut c = controller();
        let refused = |c: &mut Controller, r: Request| c.handle(r).unwrap_err();
        for r in [
            Request::GetBalloon,
            Request::GetBalloonStats,
            Request::UpdateBalloon { amount_mib: 1 },
            Request::UpdateBalloonStats {
                stats_polling_interval_s: 1,
            },
        ] {
            let e = refused(&mut c, r);
            assert_eq!(e.message, "the VM has no balloon device");
            assert_eq!(e.field, Some(Field::Balloon));
        }
        let balloon = BalloonConfig {
            amount_mib: 16,
            deflate_on_oom: true,
            stats_polling_interval_s: 0,
            free_page_reporting: true,
        };
        c.handle(Request::SetBalloon(balloon)).unwrap();
        assert_eq!(
            c.handle(Request::GetBalloon),
            Ok(Response::Balloon(balloon))
        );
        // Larger than guest memory (128 MiB by default): refused, nothing changes.
        let e = refused(&mut c, Request::UpdateBalloon { amount_mib: 129 });
        assert_eq!(
            e.message,
            "a balloon of 129 MiB is larger than the guest's 128 MiB of memory"
        );
        c.handle(Request::UpdateBalloon { amount_mib: 100 })
            .unwrap();
        let e = refused(&mut c, Request::GetBalloonStats);
        assert!(e.message.contains("statistics are not enabled"), "{e}");
        // Before start, statistics can be turned on.
        c.handle(Request::UpdateBalloonStats {
            stats_polling_interval_s: 2,
        })
        .unwrap();
        assert_eq!(
            c.handle(Request::GetBalloonStats),
            Ok(Response::BalloonStats(Box::new(BalloonStats {
                target_pages: 100 * 256,
                actual_pages: 0,
                guest: Default::default(),
            })))
        );
        assert_eq!(view(&mut c).vm.balloon.unwrap().amount_mib, 100);
        let e = refused(
            &mut c,
            Request::UpdateMachineConfig(MachineUpdate {
                huge_pages: Some(crate::HugePages::Size2M),
                ..Default::default()
            }),
        );
        assert_eq!(
            e.message,
            "the balloon cannot be used with 2 MiB huge pages: it gives memory back in 4 KiB pages"
        );
    }

    #[test]
    fn describe_reports_not_started() {
        let mut c = controller();
        match c.handle(Request::Describe).unwrap() {
            Response::Info(info) => {
                assert_eq!(info.id, "test-vm");
                assert_eq!(info.state.as_str(), "Not started");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn machine_config_is_validated_with_the_field_named() {
        let mut c = controller();
        let m = |vcpus, mem_mib| Request::SetMachineConfig {
            vcpus,
            mem_mib,
            smt: false,
            huge_pages: crate::HugePages::None,
            track_dirty_pages: false,
        };
        assert_eq!(c.handle(m(2, 256)), Ok(Response::Done));
        let v = view(&mut c);
        assert_eq!((v.vm.vcpus, v.vm.mem_mib), (2, 256));
        let err = c.handle(m(0, 256)).unwrap_err();
        assert_eq!(err.field, Some(Field::Vcpus), "{err}");
        let err = c.handle(m(1, 1 << 30)).unwrap_err();
        assert_eq!(err.field, Some(Field::Memory), "{err}");
        let update = MachineUpdate {
            mem_mib: Some(512),
            ..Default::default()
        };
        assert_eq!(
            c.handle(Request::UpdateMachineConfig(update)),
            Ok(Response::Done)
        );
        let v = view(&mut c);
        assert_eq!((v.vm.vcpus, v.vm.mem_mib), (2, 512));
        // A refused change leaves the configuration as it was.
        let update = MachineUpdate {
            vcpus: Some(0),
            mem_mib: Some(1024),
            ..Default::default()
        };
        assert!(c.handle(Request::UpdateMachineConfig(update)).is_err());
        let v = view(&mut c);
        assert_eq!((v.vm.vcpus, v.vm.mem_mib), (2, 512));
        // Huge pages need memory in whole huge pages: the memory field is named.
        let update = MachineUpdate {
            mem_mib: Some(513),
            huge_pages: Some(crate::HugePages::Size2M),
            ..Default::default()
        };
        let err = c.handle(Request::UpdateMachineConfig(update)).unwrap_err();
        assert_eq!(err.field, Some(Field::Memory), "{err}");
        assert!(err.message.contains("multiple of 2 MiB"), "{err}");
        let update = MachineUpdate {
            huge_pages: Some(crate::HugePages::Size2M),
            track_dirty_pages: Some(true),
            ..Default::default()
        };
        assert_eq!(
            c.handle(Request::UpdateMachineConfig(update)),
            Ok(Response::Done)
        );
        let v = view(&mut c);
        assert_eq!(v.vm.huge_pages, crate::HugePages::Size2M);
        assert!(v.vm.track_dirty_pages);
    }

    #[test]
    fn every_change_is_validated_in_the_vm_configuration_with_its_field() {
        let mut c = controller();
        let boot = |cmdline: &str| {
            Request::SetBootSource(BootSource {
                kernel: "/k".into(),
                initrd: None,
                cmdline: Some(cmdline.into()),
            })
        };
        let err = c.handle(boot("console=ttyS0\ninit=/bin/sh")).unwrap_err();
        assert_eq!(err.field, Some(Field::Cmdline), "{err}");
        assert_eq!(view(&mut c).boot_source, None);
        c.handle(boot("console=ttyS0")).unwrap();
        let err = c
            .handle(Request::SetVsock(VsockConfig {
                guest_cid: 2,
                uds_path: "/v.sock".into(),
            }))
            .unwrap_err();
        assert_eq!(err.field, Some(Field::VsockCid), "{err}");
        let net = |id: &str, tap: &str, mac: Option<[u8; 6]>| {
            Request::SetNetworkInterface(NetConfig {
                id: Some(id.into()),
                mac,
                ..NetConfig::new(tap)
            })
        };
        c.handle(net("eth0", "tap0", None)).unwrap();
        let err = c.handle(net("eth1", "tap0", None)).unwrap_err();
        assert_eq!(err.field, Some(Field::NetTap), "{err}");
        let err = c
            .handle(net("eth1", "tap1", Some([1, 0, 0, 0, 0, 1])))
            .unwrap_err();
        assert_eq!(err.field, Some(Field::NetMac), "{err}");
        // The same id replaces the interface, even with the same TAP.
        c.handle(net("eth0", "tap0", Some([2, 0, 0, 0, 0, 1])))
            .unwrap();
        assert_eq!(view(&mut c).vm.nets.len(), 1);
        let mut d = drive("data", false);
        d.partuuid = Some("0a-01".into());
        let err = c.handle(Request::SetDrive(d)).unwrap_err();
        assert_eq!(err.field, Some(Field::DrivePartuuid), "{err}");
        let mut anonymous = drive("x", false);
        anonymous.id = None;
        let err = c.handle(Request::SetDrive(anonymous)).unwrap_err();
        assert_eq!(err.field, Some(Field::DriveId), "{err}");
        assert!(view(&mut c).vm.drives.is_empty());
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
        assert_eq!(err.field, Some(Field::DriveRoot), "{err}");
        assert_eq!(view(&mut c).vm.drives, vec![drive("rootfs", true), changed]);
    }

    #[test]
    fn rate_limiters_are_updated_by_id_and_validated_before_start() {
        let mut c = controller();
        c.handle(Request::SetDrive(DriveConfig {
            id: Some("d".into()),
            ..DriveConfig::new("/d.img")
        }))
        .unwrap();
        c.handle(Request::SetNetworkInterface(NetConfig {
            id: Some("eth0".into()),
            ..NetConfig::new("tap0")
        }))
        .unwrap();
        let limit = RateLimiterConfig {
            bandwidth: Some(crate::config::TokenBucketConfig::per_second(1 << 20)),
            ops: None,
        };
        c.handle(Request::UpdateDrive {
            id: "d".into(),
            path: None,
            rate_limiter: Some(limit),
        })
        .unwrap();
        c.handle(Request::UpdateNetworkInterface {
            id: "eth0".into(),
            rx_rate_limiter: None,
            tx_rate_limiter: Some(limit),
        })
        .unwrap();
        let v = view(&mut c);
        assert_eq!(v.vm.drives[0].rate_limiter, Some(limit));
        assert_eq!(v.vm.drives[0].path, std::path::PathBuf::from("/d.img"));
        assert_eq!(
            (v.vm.nets[0].rx_rate_limiter, v.vm.nets[0].tx_rate_limiter),
            (None, Some(limit))
        );
        let bad = RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::config::TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 0,
            }),
        };
        let e = c
            .handle(Request::UpdateNetworkInterface {
                id: "eth0".into(),
                rx_rate_limiter: Some(bad),
                tx_rate_limiter: None,
            })
            .unwrap_err();
        assert_eq!(e.field, Some(Field::RateLimiter), "{e}");
        assert_eq!(view(&mut c).vm.nets[0].rx_rate_limiter, None);
        let e = c
            .handle(Request::UpdateNetworkInterface {
                id: "eth9".into(),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .unwrap_err();
        assert_eq!(e.field, Some(Field::NetId), "{e}");
    }

    #[test]
    fn ids_a_client_sent_are_quoted_in_one_line() {
        let mut c = controller();
        let err = c
            .handle(Request::UpdateDrive {
                id: "x\nflint: error: forged".into(),
                path: Some("/n".into()),
                rate_limiter: None,
            })
            .unwrap_err();
        assert!(!err.message.contains('\n'), "{err}");
        assert!(
            err.message.contains(r#""x\nflint: error: forged""#),
            "{err}"
        );
    }

    #[test]
    fn lifecycle_requests_need_a_started_vm() {
        let mut c = controller();
        for req in [Request::Pause, Request::Resume, Request::SendCtrlAltDel] {
            let err = c.handle(req).unwrap_err();
            assert!(err.message.contains("has not been started"), "{err}");
        }
        let err = c.handle(Request::Start).unwrap_err();
        assert!(err.message.contains("no boot source"), "{err}");
    }

    #[test]
    fn load_overrides_change_only_backends_the_snapshot_has() {
        let mut saved = VmConfig::new("/k");
        saved.nets.push(NetConfig {
            id: Some("eth0".into()),
            ..NetConfig::new("tap0")
        });
        let o = LoadOverrides {
            taps: vec![("eth0".into(), "tap7".into())],
            vsock_uds_path: None,
            clock: crate::ClockRestore::AsSaved,
            huge_pages: None,
            track_dirty_pages: None,
        };
        o.check(&saved).unwrap();
        let mut c = saved.clone();
        o.apply(&mut c);
        assert_eq!(c.nets[0].tap, "tap7");
        assert_eq!(
            (c.huge_pages, c.track_dirty_pages),
            (saved.huge_pages, saved.track_dirty_pages)
        );
        let memory = LoadOverrides {
            huge_pages: Some(crate::HugePages::Size2M),
            track_dirty_pages: Some(true),
            ..Default::default()
        };
        let mut c = saved.clone();
        memory.apply(&mut c);
        assert_eq!(c.huge_pages, crate::HugePages::Size2M);
        assert!(c.track_dirty_pages);
        // A balloon gives back 4 KiB pages: not a guest restored into huge pages.
        let mut ballooned = saved.clone();
        ballooned.balloon = Some(Default::default());
        let e = memory.check(&ballooned).unwrap_err();
        assert_eq!(e.field, Some(Field::Balloon));
        let unknown = LoadOverrides {
            taps: vec![("eth1".into(), "tap7".into())],
            ..o.clone()
        };
        let e = unknown.check(&saved).unwrap_err();
        assert_eq!(e.field, Some(Field::NetId));
        assert!(e.message.contains("\"eth1\""), "{e}");
        let vsock = LoadOverrides {
            vsock_uds_path: Some("/v".into()),
            ..Default::default()
        };
        assert!(vsock
            .check(&saved)
            .unwrap_err()
            .message
            .contains("no vsock device"));
        saved.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/old".into(),
        });
        vsock.check(&saved).unwrap();
        let mut c = saved.clone();
        vsock.apply(&mut c);
        assert_eq!(c.vsock.unwrap().uds_path, std::path::PathBuf::from("/v"));
    }

    #[test]
    fn snapshots_need_a_paused_vm_or_an_unconfigured_flint() {
        let mut c = controller();
        let create = Request::CreateSnapshot {
            snapshot_type: crate::SnapshotType::Full,
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
        };
        let err = c.handle(create).unwrap_err();
        assert!(err.message.contains("has not been started"), "{err}");
        c.handle(Request::SetEntropy(None)).unwrap();
        let load = Request::LoadSnapshot {
            snapshot_path: "/nonexistent/s".into(),
            mem_backend: crate::MemBackend::File("/nonexistent/m".into()),
            resume: true,
            overrides: LoadOverrides::default(),
        };
        let err = c.handle(load.clone()).unwrap_err();
        assert!(err.message.contains("no VM resources configured"), "{err}");
        let mut c = controller();
        // The command line's boot timer does not count as configuration.
        c.enable_boot_timer();
        let err = c.handle(load).unwrap_err();
        assert!(
            err.message.starts_with("cannot load the snapshot:"),
            "{err}"
        );
        assert!(err.message.contains("/nonexistent/s"), "{err}");
        assert_eq!(c.state(), VmState::NotStarted);
        // The console is still there: the VM can be started after a mistyped path.
        assert!(c.console.is_some());
        let mut c = controller();
        c.handle(Request::SetMachineConfig {
            vcpus: 2,
            mem_mib: 128,
            smt: false,
            huge_pages: crate::HugePages::None,
            track_dirty_pages: false,
        })
        .unwrap();
        let err = c
            .handle(Request::LoadSnapshot {
                snapshot_path: "/s".into(),
                mem_backend: crate::MemBackend::File("/m".into()),
                resume: false,
                overrides: LoadOverrides::default(),
            })
            .unwrap_err();
        assert!(err.message.contains("no VM resources configured"), "{err}");
    }

    #[test]
    fn metrics_lines_count_requests() {
        let mut c = controller();
        let err = c.handle(Request::FlushMetrics).unwrap_err();
        assert!(err.message.contains("no metrics file"), "{err}");
        let dir = std::env::temp_dir().join(format!("flint-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.json");
        c.handle(Request::SetMetrics(MetricsConfig::to_path(path.clone())))
            .unwrap();
        c.handle(Request::Describe).unwrap();
        c.handle(Request::FlushMetrics).unwrap();
        // emit_id and properties: the same file, one more line that leads with them.
        c.handle(Request::SetMetrics(MetricsConfig {
            emit_id: true,
            properties: [("host".to_string(), "h1".to_string())].into(),
            ..MetricsConfig::to_path(&path)
        }))
        .unwrap();
        c.handle(Request::FlushMetrics).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["properties"]["host"], "h1");
        assert!(lines[1].starts_with(r#"{"id":"test-vm","#), "{}", lines[1]);
        assert!(!lines[0].contains(r#""id""#), "{}", lines[0]);
        assert!(
            lines[0].contains(
                "\"api_requests\":{\"describe\":1,\"flush_metrics\":2,\"put_metrics\":1}"
            ),
            "{}",
            lines[0]
        );
        // Firecracker's groups: the first flush was refused (no metrics file yet).
        assert!(
            lines[0].contains("\"actions_count\":2,\"actions_fails\":1"),
            "{}",
            lines[0]
        );
        let err = c
            .handle(Request::SetMetrics(MetricsConfig::to_path(
                "/nonexistent/dir/m.json",
            )))
            .unwrap_err();
        assert_eq!(err.field, Some(Field::MetricsPath));
        assert!(err.message.starts_with("cannot open"), "{err}");
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
            c.handle(Request::SetMetrics(MetricsConfig::to_path(path)))
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
            .handle(Request::SetMetrics(MetricsConfig::to_path(link.clone())))
            .unwrap_err();
        assert!(
            err.message.starts_with("cannot open") && err.message.contains("symbolic link"),
            "{err}"
        );
        assert!(!target.exists(), "the symlink was followed");
        std::fs::write(&target, "old\n").unwrap();
        assert!(c
            .handle(Request::SetMetrics(MetricsConfig::to_path(link)))
            .is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "old\n");
        // A new file is private; an existing one is appended to.
        let new = dir.join("new");
        c.handle(Request::SetMetrics(MetricsConfig::to_path(new.clone())))
            .unwrap();
        let mode = std::fs::metadata(&new).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        c.handle(Request::SetMetrics(MetricsConfig::to_path(target.clone())))
            .unwrap();
        c.handle(Request::FlushMetrics).unwrap();
        let text = std::fs::read_to_string(&target).unwrap();
        assert!(text.starts_with("old\n{"), "{text}");
        // Directories are refused with a reason.
        let err = c
            .handle(Request::SetMetrics(MetricsConfig::to_path(dir.clone())))
            .unwrap_err();
        assert!(err.message.starts_with("cannot open"), "{err}");
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
        assert!(err.message.starts_with("cannot start the VM:"), "{err}");
        assert_eq!(c.state(), VmState::NotStarted);
    }
}
