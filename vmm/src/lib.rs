//! One flint microVM: the KVM VM, guest memory, vCPU threads, devices on their buses, kernel
//! loading and the VM's lifecycle. Front ends build a [`VmConfig`] and call [`run`].

pub mod config;
pub mod controller;
mod device_manager;
mod error;
mod event_loop;
mod exit;
mod loader;
mod memory;
mod signals;
mod usage;
mod vcpu;
mod vm;

pub use config::{ConfigError, DriveConfig, VmConfig};
pub use error::{Error, Result};
pub use exit::Ending;
pub use loader::KernelFormat;
pub use usage::MemoryUsage;
pub use vm::{run, ConsoleIo, Outcome};

/// Whether this host's `/dev/kvm` is PVM (the `kvm_pvm` module): a software nested KVM that
/// cannot boot an ordinary Linux guest kernel.
pub fn host_kvm_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}
