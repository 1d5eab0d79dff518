//! virtio devices on the virtio-mmio transport (virtio 1.x, "modern" only).
//!
//! - [`mmio::MmioTransport`] is the register interface the guest driver talks to (a
//!   [`crate::bus::BusDevice`] on the MMIO bus); it owns feature negotiation, device status,
//!   queue setup and reset, and hands the configured queues to its device on `DRIVER_OK`.
//! - A [`VirtioDevice`] (block, rng, ...) does the device-specific work over guest memory.
//! - The VMM registers one ioeventfd per queue ([`mmio::MmioTransport::queue_events`]) so a
//!   guest notification never exits to a vCPU thread, and its event loop calls
//!   [`mmio::MmioTransport::process_queue`] when one fires. Interrupts go out through an irqfd
//!   ([`VirtioInterrupt`]).

pub mod balloon;
pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
mod test_utils;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::{EventOps, Events};

use arch::GuestMemoryMmap;
use virtio_queue::Queue;

use crate::IrqLine;

// The virtio constants flint uses, from the kernel's headers (virtio-bindings); feature
// constants there are bit numbers, turned into masks with [`feature`].
pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
pub use virtio_bindings::virtio_ids::{
    VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VIRTIO_ID_RNG, VIRTIO_ID_VSOCK,
};
pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
pub use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// The mask of feature bit `bit` in a 64-bit feature set. Every flint device offers
/// `feature(VIRTIO_F_VERSION_1)` and requires the driver to accept it; the transport enables
/// `feature(VIRTIO_RING_F_EVENT_IDX)` (used/available event suppression) on every queue it
/// hands to a device when the driver accepted it.
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Event-loop data values at or above this belong to a device's backend (TAP, sockets);
/// values below it are queue indexes.
pub const BACKEND_EVENT_BASE: u32 = 1 << 16;

/// Most descriptor chains a device takes from one queue in one processing pass (and, for
/// network receive, most frames it moves). A guest that keeps making buffers available while
/// the device works cannot keep one pass going: the device stops at this budget, reports the
/// queue through [`VirtioDevice::take_unfinished`], and the transport signals the queue's
/// notification eventfd again, so the event loop first serves every other ready event and
/// then continues the queue without the guest notifying. As large as the largest queue, so a
/// driver that fills a queue once is served in one pass.
pub const MAX_CHAINS_PER_PASS: usize = 256;

/// A virtio device's interrupt: the status the guest reads and acknowledges, plus the irqfd.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: IrqLine,
}

impl VirtioInterrupt {
    /// An interrupt raised through `irq`.
    pub fn new(irq: IrqLine) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.signal(VIRTIO_MMIO_INT_VRING);
    }

    /// The device's configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        // A failed eventfd write means the counter is saturated: an interrupt is pending.
        let _ = self.irq.trigger();
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Set the `InterruptStatus` register (restoring a snapshot).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
    }

    /// Raise the interrupt line without changing the status (after restoring a snapshot).
    pub fn retrigger(&self) {
        let _ = self.irq.trigger();
    }

    /// The driver wrote `InterruptACK`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The irqfd, for registering with KVM.
    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }
}

/// Why a device could not start with what the driver set up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("the driver set up {got} queues; the device needs {want}")]
    QueueCount { want: usize, got: usize },
    #[error("the device cannot start: {0}")]
    Backend(String),
}

/// Where a running device is in one of its queues: the next available-ring entry it will
/// take and the next used-ring entry it will fill. Saved in snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
}

impl QueuePosition {
    /// Where `queue` is.
    pub fn of(queue: &Queue) -> Self {
        use virtio_queue::QueueT;
        QueuePosition {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }
}

/// Copy `data.len()` bytes of the configuration space `config` from `offset`; bytes past its
/// end (including offsets that overflow) read as zero.
pub fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// The `N` queues of a device that has `N`, in index order, or why activation fails.
pub fn take_queues<const N: usize>(queues: Vec<Queue>) -> Result<[Queue; N], ActivateError> {
    let got = queues.len();
    <[Queue; N]>::try_from(queues).map_err(|_| ActivateError::QueueCount { want: N, got })
}

/// A virtio device model behind a transport.
///
/// Everything the guest controls (descriptor addresses, lengths, chain shapes, config offsets)
/// is untrusted: a malformed request gets an error status or is dropped and counted, and never
/// panics or blocks the VMM.
pub trait VirtioDevice: Send {
    /// The virtio device type (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers, including [`VIRTIO_F_VERSION_1`].
    fn avail_features(&self) -> u64;
    /// The device-specific configuration space as the driver reads it (empty if the device
    /// has none).
    fn config_space(&self) -> &[u8] {
        &[]
    }
    /// Read `data.len()` bytes of the device-specific configuration space at `offset`; bytes
    /// past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config(self.config_space(), offset, data);
    }
    /// The driver writes the configuration space; most devices ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Start serving `queues` (as the driver configured them, in index order) over `mem`,
    /// having negotiated `acked_features`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// The guest notified queue `index`: process what it made available.
    fn process_queue(&mut self, index: usize);
    /// Queues on which a processing pass (from [`VirtioDevice::process_queue`] or
    /// [`VirtioDevice::process_backend`]) stopped at [`MAX_CHAINS_PER_PASS`], so work may be
    /// left, as a bit mask of queue indexes; the call clears it. The transport makes each of them
    /// look notified again, and the device continues on the next `process_queue` of that
    /// queue.
    fn take_unfinished(&mut self) -> u64 {
        0
    }
    /// Return to the state before activation (the driver reset the device). Pending requests
    /// are dropped; backends (files) stay open.
    fn reset(&mut self);
    /// The concrete device, for operations only some device kinds have (e.g. swapping a
    /// disk's medium).
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
    /// Register the device's host-side event sources (a TAP, sockets) with the VMM's event
    /// loop, with data values at or above [`BACKEND_EVENT_BASE`]. Called once when the loop
    /// starts, possibly before the driver activates the device.
    fn init_backend(&mut self, _ops: &mut EventOps) {}
    /// One of the device's backend event sources is ready. The device may add or remove
    /// sources through `ops` (e.g. a new connection's socket).
    fn process_backend(&mut self, _events: Events, _ops: &mut EventOps) {}
    /// While activated: where the device is in each of its queues, in index order, such that
    /// queues rebuilt at these positions continue the device's work (buffers it took but has
    /// not used yet are given back). Empty while not activated.
    fn queue_positions(&self) -> Vec<QueuePosition>;
    /// The transport re-activated this (new) device from a snapshot: anything the device must
    /// tell the driver about the host state it did not carry over (e.g. vsock connections).
    fn restored(&mut self) {}
}
