//! Device models for flint guests.
//!
//! Each device is a state machine driven by register accesses from a vCPU (through a [`bus::Bus`])
//! and, for devices with a host backend, by the VMM's event loop. Devices know nothing about KVM,
//! vCPU threads or how the VM was configured.

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod mmds;
pub mod rate_limiter;
pub mod virtio;
pub mod vmgenid;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line a device raises: an `EventFd` registered with KVM as an irqfd.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// Wrap an eventfd that the VMM registered for a guest interrupt.
    pub fn new(evt: EventFd) -> Self {
        IrqLine(evt)
    }

    /// The eventfd, for registering with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    /// Raise the interrupt once.
    pub fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}
