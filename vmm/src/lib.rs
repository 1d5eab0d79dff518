//! One flint microVM: the KVM VM, guest memory, vCPU threads, devices on their buses, kernel
//! loading and the VM's lifecycle.
//!
//! Every front end describes the VM with one type, [`VmConfig`] (and its parts: [`DriveConfig`],
//! [`NetConfig`], [`VsockConfig`]), checked in one place, [`VmConfig::validate`], whose errors
//! say which [`Field`] is wrong so that each front end names it in its own terms. The command
//! line builds a `VmConfig` and calls [`run`]; the API and config files send
//! [`controller::Request`]s carrying the same types to a [`controller::Controller`] on the VMM
//! thread. vmm installs the seccomp filters of the threads it starts (vCPUs, event loop,
//! console input) and exports the building blocks ([`seccomp::Filter`]) with which a front
//! end composes the filter of the VMM thread and of its own threads.

pub mod config;
pub mod controller;
mod device_manager;
mod error;
mod event_loop;
mod exit;
mod loader;
mod memory;
pub mod metrics;
pub mod seccomp;
mod signals;
pub mod snapshot;
pub mod uffd;
mod usage;
mod vcpu;
mod vm;

pub use config::{
    BalloonConfig, CacheType, ConfigError, DriveConfig, Field, HugePages, MmdsConfig, MmdsStore,
    NetConfig, RateLimiterConfig, TokenBucketConfig, VmConfig, VsockConfig, MAX_REFILL_TIME_MS,
};
pub use devices::virtio::net::{parse_mac, MacError};
pub use error::{Error, Result};
pub use exit::Ending;
pub use loader::KernelFormat;
pub use usage::MemoryUsage;
pub use vm::{run, ClockRestore, ConsoleIo, MemBackend, Outcome, SnapshotType, Vm};

/// Route SIGINT, SIGTERM and SIGHUP to `wake` (written once per signal); see
/// [`stop_signal_received`]. Starting a VM routes them to the VM's own wake-up event.
pub fn install_stop_signals(wake: &vmm_sys_util::eventfd::EventFd) -> std::io::Result<()> {
    signals::install(wake)
}

/// The stop signal flint received, if any.
pub fn stop_signal_received() -> Option<i32> {
    signals::received()
}

/// Whether this host's `/dev/kvm` is PVM (the `kvm_pvm` module): a software nested KVM that
/// cannot boot an ordinary Linux guest kernel.
pub fn host_kvm_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}
