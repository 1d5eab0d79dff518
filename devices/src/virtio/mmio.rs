//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2): the register block a guest
//! driver uses to discover a device, negotiate features, set up queues and drive the device
//! status state machine.
//!
//! Registers below [`CONFIG_OFFSET`] are 32 bits wide and only 32-bit aligned accesses reach
//! them; anything else reads as zero and writes are ignored. The device-specific configuration
//! space from [`CONFIG_OFFSET`] on takes accesses of any width.

use std::sync::Arc;

use arch::GuestMemoryMmap;
use log::debug;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    feature, VirtioDevice, VirtioInterrupt, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::BusDevice;

/// Size of one virtio-mmio device's register window.
pub const MMIO_REGION_SIZE: u64 = 0x1000;
/// Offset of `QueueNotify`: the VMM registers each queue's ioeventfd here (datamatch = index).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// The vendor ID flint devices report: "FLNT" as a big-endian ASCII word.
pub const VENDOR_ID: u32 = 0x464c_4e54;

// Register offsets (virtio 1.2 section 4.2.2).
const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_LEN_HIGH: u64 = 0x0b4;
const CONFIG_GENERATION: u64 = 0x0fc;

/// What the driver wrote into one queue's registers. Turned into a [`Queue`] (and validated)
/// only on `DRIVER_OK`, so that the order of register writes does not matter.
#[derive(Clone, Copy, Debug, Default)]
struct QueueConfig {
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// One queue's registers and, for an activated device, where the device is in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// A transport's registers and its device's queue positions, as saved in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    pub status: u32,
    pub activated: bool,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueState>,
}

/// Why a saved transport state cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportRestoreError {
    #[error("the snapshot has a device of type {saved} where the configuration has type {built}")]
    DeviceType { saved: u32, built: u32 },
    #[error(
        "the snapshot has {saved} queues for a device of type {device_type}, which has {built}"
    )]
    QueueCount {
        device_type: u32,
        saved: usize,
        built: usize,
    },
    #[error(
        "the snapshot's device of type {device_type} acked features {acked:#x} it does not offer"
    )]
    Features { device_type: u32, acked: u64 },
    #[error("the snapshot's device of type {0} is active without DRIVER_OK")]
    Status(u32),
    #[error("the snapshot's device of type {device_type} cannot be re-activated: {reason}")]
    Activate { device_type: u32, reason: String },
}

/// Why the driver's queue setup was refused on `DRIVER_OK`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum QueueSetupError {
    #[error("queue {0} has size {1}, which is not a power of two no larger than {2}")]
    Size(usize, u16, u16),
    #[error("queue {0} has misaligned ring addresses")]
    Alignment(usize),
    #[error("queue {0} has rings outside guest memory")]
    Memory(usize),
    #[error("queue {0} is ready but queue {1} before it is not")]
    Gap(usize, usize),
}

/// The virtio-mmio register interface in front of one [`VirtioDevice`].
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, whose queues live in `mem` and whose interrupt is `interrupt`.
    /// Creates one non-blocking eventfd per queue for the VMM to register as ioeventfds.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let num_queues = device.queue_max_sizes().len();
        let queue_evts = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut transport = MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            queues: Vec::new(),
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
        };
        transport.reset_queues();
        Ok(transport)
    }

    /// One eventfd per queue, in queue index order.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Tell the driver that the device's configuration space changed.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    /// Let the device register its backend event sources with the event loop.
    pub fn init_backend(&mut self, ops: &mut event_manager::EventOps) {
        self.device.init_backend(ops);
    }

    /// A backend event source of the device is ready.
    pub fn process_backend(
        &mut self,
        events: event_manager::Events,
        ops: &mut event_manager::EventOps,
    ) {
        self.device.process_backend(events, ops);
        self.resignal_unfinished();
    }

    /// The guest notified queue `index`: let the device process it if it is running.
    pub fn process_queue(&mut self, index: usize) {
        if self.activated && index < self.queues.len() {
            self.device.process_queue(index);
            self.resignal_unfinished();
        }
    }

    /// Make the queues the device left unfinished (it used its per-pass budget) look
    /// notified again: the event loop comes back to them after the other ready events.
    fn resignal_unfinished(&mut self) {
        let unfinished = self.device.take_unfinished();
        for (index, evt) in self.queue_evts.iter().enumerate().take(64) {
            if unfinished & (1 << index) != 0 {
                // A full counter (EAGAIN) means the queue is already signalled.
                let _ = evt.write(1);
            }
        }
    }

    /// The device behind this transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind this transport, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The `Status` register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated (the driver set `DRIVER_OK` and the queues were good).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The interrupt the transport and its device raise.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The transport's state, with the device's queue positions: for a snapshot, taken while
    /// no vCPU runs and the device is not processing (the caller holds the transport).
    pub fn state(&self) -> MmioTransportState {
        let positions = if self.activated {
            self.device.queue_positions()
        } else {
            Vec::new()
        };
        // The device holds only the ready queues, which come first.
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let pos = positions.get(i).copied().unwrap_or_default();
                QueueState {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    next_avail: pos.next_avail,
                    next_used: pos.next_used,
                }
            })
            .collect();
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            activated: self.activated,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Continue from `state` on this new transport (its device fresh from its configuration):
    /// registers as saved and, if the device was active, the device re-activated with queues
    /// at their saved positions. Everything in `state` is checked as the guest's writes would
    /// be; nothing in it can make this panic.
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<(), TransportRestoreError> {
        let device_type = self.device.device_type();
        if state.device_type != device_type {
            return Err(TransportRestoreError::DeviceType {
                saved: state.device_type,
                built: device_type,
            });
        }
        let built = self.device.queue_max_sizes().len();
        if state.queues.len() != built {
            return Err(TransportRestoreError::QueueCount {
                device_type,
                saved: state.queues.len(),
                built,
            });
        }
        if state.acked_features & !self.device.avail_features() != 0 {
            return Err(TransportRestoreError::Features {
                device_type,
                acked: state.acked_features,
            });
        }
        if state.activated && state.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            return Err(TransportRestoreError::Status(device_type));
        }
        self.queues = state
            .queues
            .iter()
            .map(|q| QueueConfig {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
            })
            .collect();
        self.status = state.status;
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.config_generation = state.config_generation;
        self.interrupt
            .set_status(state.interrupt_status & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG));
        self.activated = false;
        if state.activated {
            let count = self.start_device(&state.queues).map_err(|reason| {
                TransportRestoreError::Activate {
                    device_type,
                    reason,
                }
            })?;
            self.activated = true;
            self.device.restored();
            // Notifications the device had not seen when the snapshot was taken are gone:
            // look at every queue once.
            for index in 0..count {
                self.device.process_queue(index);
            }
            self.resignal_unfinished();
        }
        if self.interrupt.status() != 0 {
            // The guest had not acknowledged it yet; a spurious interrupt is harmless, a lost
            // one would stall the driver.
            self.interrupt.retrigger();
        }
        Ok(())
    }

    fn reset_queues(&mut self) {
        self.queues = self
            .device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueConfig {
                size: max,
                ..QueueConfig::default()
            })
            .collect();
    }

    fn reset(&mut self) {
        if self.activated {
            debug!("virtio-mmio: driver reset an active device");
        }
        self.device.reset();
        self.activated = false;
        self.reset_queues();
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt
            .ack(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    fn selected_max_size(&self) -> u16 {
        self.device
            .queue_max_sizes()
            .get(self.queue_sel as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Apply `f` to the selected queue while the driver may still change queue registers.
    fn update_queue(&mut self, f: impl FnOnce(&mut QueueConfig)) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            crate::guest_warn!("virtio-mmio: queue register write after DRIVER_OK ignored");
            return;
        }
        if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
            f(q);
        }
    }

    fn device_features_page(&self) -> u32 {
        match self.device_features_sel {
            0 => self.device.avail_features() as u32,
            1 => (self.device.avail_features() >> 32) as u32,
            _ => 0,
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are negotiated between DRIVER and FEATURES_OK only.
        if self.status & (VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
            != VIRTIO_CONFIG_S_DRIVER
        {
            crate::guest_warn!("virtio-mmio: driver features written outside negotiation ignored");
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.acked_features =
            (self.acked_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        self.acked_features & feature(VIRTIO_F_VERSION_1) != 0
            && self.acked_features & !offered == 0
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (other than by resetting); record FAILED as it comes.
        let new = value & !self.status;
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
        }
        if new & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0 {
            self.status |= VIRTIO_CONFIG_S_ACKNOWLEDGE;
        }
        if new & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0 {
            self.status |= VIRTIO_CONFIG_S_DRIVER;
        }
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_DRIVER != 0 {
            if self.features_acceptable() {
                self.status |= VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                crate::guest_warn!(
                    "virtio-mmio: refusing features {:#x} (offered {:#x})",
                    self.acked_features,
                    self.device.avail_features()
                );
            }
        }
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            self.status |= VIRTIO_CONFIG_S_DRIVER_OK;
            self.activate();
        }
    }

    /// Build the queues the driver configured, in index order: the ready ones, which must come
    /// first.
    fn build_queues(&self) -> Result<Vec<Queue>, QueueSetupError> {
        let event_idx = self.acked_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let max_sizes = self.device.queue_max_sizes();
        let mut queues = Vec::new();
        let mut first_unready = None;
        for (i, (cfg, &max)) in self.queues.iter().zip(max_sizes).enumerate() {
            if !cfg.ready {
                first_unready.get_or_insert(i);
                continue;
            }
            if let Some(gap) = first_unready {
                return Err(QueueSetupError::Gap(i, gap));
            }
            // Checked here first so that virtio-queue, which logs every refusal, never sees
            // a bad configuration.
            if cfg.size == 0 || cfg.size > max || !cfg.size.is_power_of_two() {
                return Err(QueueSetupError::Size(i, cfg.size, max));
            }
            if cfg.desc % 16 != 0 || cfg.driver % 2 != 0 || cfg.device % 4 != 0 {
                return Err(QueueSetupError::Alignment(i));
            }
            let size = u64::from(cfg.size);
            let rings = [
                (cfg.desc, 16 * size),
                (cfg.driver, 6 + 2 * size),
                (cfg.device, 6 + 8 * size),
            ];
            if !rings.iter().all(|&(addr, len)| {
                GuestMemoryBackend::check_range(&self.mem, GuestAddress(addr), len as usize)
            }) {
                return Err(QueueSetupError::Memory(i));
            }
            let mut q = Queue::new(max).map_err(|_| QueueSetupError::Size(i, cfg.size, max))?;
            q.try_set_size(cfg.size)
                .map_err(|_| QueueSetupError::Size(i, cfg.size, max))?;
            q.try_set_desc_table_address(GuestAddress(cfg.desc))
                .and_then(|_| q.try_set_avail_ring_address(GuestAddress(cfg.driver)))
                .and_then(|_| q.try_set_used_ring_address(GuestAddress(cfg.device)))
                .map_err(|_| QueueSetupError::Alignment(i))?;
            q.set_event_idx(event_idx);
            q.set_ready(true);
            if !q.is_valid(&self.mem) {
                return Err(QueueSetupError::Memory(i));
            }
            queues.push(q);
        }
        Ok(queues)
    }

    /// Build the driver's queues, put each at the position `saved` gives it (a restore; none
    /// on a first activation) and hand them to the device. Returns how many queues it got.
    fn start_device(&mut self, saved: &[QueueState]) -> Result<usize, String> {
        let mut queues = self.build_queues().map_err(|e| e.to_string())?;
        for (q, saved) in queues.iter_mut().zip(saved) {
            q.set_next_avail(saved.next_avail);
            q.set_next_used(saved.next_used);
        }
        let count = queues.len();
        self.device
            .activate(
                self.mem.clone(),
                self.acked_features,
                queues,
                self.interrupt.clone(),
            )
            .map_err(|e| e.to_string())?;
        Ok(count)
    }

    fn activate(&mut self) {
        match self.start_device(&[]) {
            Ok(_) => self.activated = true,
            Err(e) => {
                crate::guest_warn!(
                    "virtio-mmio: cannot activate device type {}: {e}",
                    self.device.device_type()
                );
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => self.device_features_page(),
            QUEUE_NUM_MAX => u32::from(self.selected_max_size()),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            // No shared memory regions: a length of all ones says "absent".
            SHM_LEN_LOW | SHM_LEN_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            QUEUE_SEL => self.queue_sel = value,
            // A size that does not fit 16 bits is recorded as 0 and refused on DRIVER_OK.
            QUEUE_NUM => self.update_queue(|q| q.size = u16::try_from(value).unwrap_or(0)),
            QUEUE_READY => self.update_queue(|q| q.ready = value & 1 != 0),
            QUEUE_NOTIFY => self.process_queue(value as usize),
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            QUEUE_DESC_LOW => self.update_queue(|q| q.desc = lo(q.desc)),
            QUEUE_DESC_HIGH => self.update_queue(|q| q.desc = hi(q.desc)),
            QUEUE_DRIVER_LOW => self.update_queue(|q| q.driver = lo(q.driver)),
            QUEUE_DRIVER_HIGH => self.update_queue(|q| q.driver = hi(q.driver)),
            QUEUE_DEVICE_LOW => self.update_queue(|q| q.device = lo(q.device)),
            QUEUE_DEVICE_HIGH => self.update_queue(|q| q.device = hi(q.device)),
            _ => debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }
}

/// The transport's interrupt registers, `InterruptStatus` and `InterruptACK`, served from the
/// interrupt's atomic status without the transport's lock: the guest's interrupt handler
/// reads and acknowledges them on every interrupt, and must not wait while the event loop
/// holds the transport for a pass over the device's queues.
pub struct InterruptRegisters(pub Arc<VirtioInterrupt>);

impl crate::bus::LockFreeRegisters for InterruptRegisters {
    fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        if offset != INTERRUPT_STATUS || data.len() != 4 {
            return false;
        }
        data.copy_from_slice(&self.0.status().to_le_bytes());
        true
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        let (INTERRUPT_ACK, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) else {
            return false;
        };
        self.0.ack(u32::from_le_bytes(bytes));
        true
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{guest_memory, interrupt, irq_count, w, TestQueue};
    use crate::virtio::ActivateError;
    use std::sync::Mutex;

    /// A queue as activated: size, desc, driver, device, event idx.
    type QueueSeen = (u16, u64, u64, u64, bool);

    /// What the fake device saw, shared with the test.
    #[derive(Default)]
    struct Log {
        activations: Vec<(u64, Vec<QueueSeen>)>,
        processed: Vec<usize>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct FakeDevice {
        max_sizes: Vec<u16>,
        features: u64,
        fail: bool,
        log: Arc<Mutex<Log>>,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn avail_features(&self) -> u64 {
            self.features
        }
        fn config_space(&self) -> &[u8] {
            &[0, 1, 2, 3, 4, 5, 6, 7]
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            acked_features: u64,
            queues: Vec<Queue>,
            _interrupt: Arc<VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            if self.fail {
                return Err(ActivateError::Backend("test".into()));
            }
            if queues.len() != self.max_sizes.len() {
                return Err(ActivateError::QueueCount {
                    want: self.max_sizes.len(),
                    got: queues.len(),
                });
            }
            let qs = queues
                .iter()
                .map(|q| {
                    (
                        q.size(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring(),
                        q.event_idx_enabled(),
                    )
                })
                .collect();
            self.log
                .lock()
                .unwrap()
                .activations
                .push((acked_features, qs));
            Ok(())
        }
        fn process_queue(&mut self, index: usize) {
            self.log.lock().unwrap().processed.push(index);
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
        }
        fn queue_positions(&self) -> Vec<crate::virtio::QueuePosition> {
            vec![Default::default(); self.max_sizes.len()]
        }
    }

    const FEATURES: u64 = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX) | 1;

    struct Harness {
        t: MmioTransport,
        log: Arc<Mutex<Log>>,
        mem: GuestMemoryMmap,
    }

    fn harness(max_sizes: &[u16], fail: bool) -> Harness {
        let log = Arc::new(Mutex::new(Log::default()));
        let mem = guest_memory(0x10_0000);
        let dev = FakeDevice {
            max_sizes: max_sizes.to_vec(),
            features: FEATURES,
            fail,
            log: log.clone(),
        };
        let t = MmioTransport::new(Box::new(dev), mem.clone(), interrupt()).unwrap();
        Harness { t, log, mem }
    }

    impl Harness {
        fn rd(&mut self, offset: u64) -> u32 {
            let mut d = [0u8; 4];
            self.t.read(offset, &mut d);
            u32::from_le_bytes(d)
        }
        fn wr(&mut self, offset: u64, v: u32) {
            self.t.write(offset, &v.to_le_bytes());
        }
        fn negotiate(&mut self, features: u64) -> bool {
            self.wr(STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.wr(STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
            self.wr(DRIVER_FEATURES_SEL, 0);
            self.wr(DRIVER_FEATURES, features as u32);
            self.wr(DRIVER_FEATURES_SEL, 1);
            self.wr(DRIVER_FEATURES, (features >> 32) as u32);
            self.wr(
                STATUS,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
            );
            self.rd(STATUS) & VIRTIO_CONFIG_S_FEATURES_OK != 0
        }
        fn setup_queue(&mut self, index: u32, size: u16, base: u64) {
            let tq = TestQueue::new(&self.mem, base, size);
            self.wr(QUEUE_SEL, index);
            self.wr(QUEUE_NUM, u32::from(size));
            self.wr(QUEUE_DESC_LOW, tq.desc.0 as u32);
            self.wr(QUEUE_DESC_HIGH, (tq.desc.0 >> 32) as u32);
            self.wr(QUEUE_DRIVER_LOW, tq.avail.0 as u32);
            self.wr(QUEUE_DRIVER_HIGH, 0);
            self.wr(QUEUE_DEVICE_LOW, tq.used.0 as u32);
            self.wr(QUEUE_DEVICE_HIGH, 0);
            self.wr(QUEUE_READY, 1);
        }
        fn driver_ok(&mut self) {
            let s = self.rd(STATUS);
            self.wr(STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        }
    }

    #[test]
    fn identification_registers() {
        let mut h = harness(&[256, 64], false);
        assert_eq!(h.rd(MAGIC_VALUE), 0x7472_6976);
        assert_eq!(h.rd(VERSION), 2);
        assert_eq!(h.rd(DEVICE_ID), 42);
        assert_eq!(h.rd(VENDOR), VENDOR_ID);
        assert_eq!(h.rd(DEVICE_FEATURES), 1 | (1 << 29));
        h.wr(DEVICE_FEATURES_SEL, 1);
        assert_eq!(h.rd(DEVICE_FEATURES), 1);
        h.wr(DEVICE_FEATURES_SEL, 2);
        assert_eq!(h.rd(DEVICE_FEATURES), 0);
        assert_eq!(h.rd(QUEUE_NUM_MAX), 256);
        h.wr(QUEUE_SEL, 1);
        assert_eq!(h.rd(QUEUE_NUM_MAX), 64);
        h.wr(QUEUE_SEL, 2);
        assert_eq!(h.rd(QUEUE_NUM_MAX), 0);
        assert_eq!(h.rd(QUEUE_READY), 0);
        assert_eq!(h.rd(SHM_LEN_LOW), u32::MAX);
        assert_eq!(h.rd(CONFIG_GENERATION), 0);
        assert_eq!(h.t.queue_events().len(), 2);
    }

    #[test]
    fn happy_path_activates_with_configured_queues() {
        let mut h = harness(&[256, 64], false);
        assert!(h.negotiate(FEATURES));
        h.setup_queue(0, 128, 0x1000);
        h.setup_queue(1, 64, 0x8000);
        assert_eq!(h.rd(QUEUE_READY), 1);
        h.driver_ok();
        assert!(h.t.is_activated());
        assert_eq!(
            h.rd(STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK
        );
        let log = h.log.lock().unwrap();
        assert_eq!(log.activations.len(), 1);
        let (acked, qs) = &log.activations[0];
        assert_eq!(*acked, FEATURES);
        let q0 = TestQueue::new(&h.mem, 0x1000, 128);
        assert_eq!(
            qs[0],
            (128, q0.desc.0, q0.avail.0, q0.used.0, true),
            "event idx enabled on queues when negotiated"
        );
        assert_eq!(qs[1].0, 64);
    }

    #[test]
    fn features_without_version_1_or_unoffered_are_refused() {
        let mut h = harness(&[16], false);
        assert!(!h.negotiate(1));
        h.driver_ok();
        assert!(!h.t.is_activated());
        assert_eq!(
            h.rd(STATUS) & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK),
            0
        );

        h.wr(STATUS, 0);
        assert!(
            !h.negotiate(feature(VIRTIO_F_VERSION_1) | 1 << 5),
            "not offered"
        );
        h.wr(STATUS, 0);
        assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
        assert_eq!(h.t.acked_features(), feature(VIRTIO_F_VERSION_1));
    }

    #[test]
    fn status_bits_need_their_predecessors() {
        let mut h = harness(&[16], false);
        h.wr(STATUS, VIRTIO_CONFIG_S_DRIVER);
        assert_eq!(h.rd(STATUS), 0);
        h.wr(
            STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(h.rd(STATUS), VIRTIO_CONFIG_S_ACKNOWLEDGE);
        // Features written before DRIVER are ignored.
        h.wr(DRIVER_FEATURES_SEL, 1);
        h.wr(DRIVER_FEATURES, 1);
        assert_eq!(h.t.acked_features(), 0);
        h.wr(STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(
            h.rd(STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FAILED
        );
    }

    #[test]
    fn reset_and_renegotiate_activates_again() {
        let mut h = harness(&[32], false);
        assert!(h.negotiate(FEATURES));
        h.setup_queue(0, 32, 0x1000);
        h.driver_ok();
        assert!(h.t.is_activated());
        h.t.interrupt().signal_used_queue();
        h.wr(STATUS, 0);
        assert!(!h.t.is_activated());
        assert_eq!(h.rd(STATUS), 0);
        assert_eq!(h.rd(INTERRUPT_STATUS), 0);
        assert_eq!(h.rd(QUEUE_READY), 0);
        assert_eq!(h.t.acked_features(), 0);
        assert_eq!(h.log.lock().unwrap().resets, 1);
        // Queue notifications are not forwarded while reset.
        h.wr(QUEUE_NOTIFY, 0);
        assert!(h.log.lock().unwrap().processed.is_empty());

        assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
        h.setup_queue(0, 16, 0x4000);
        h.driver_ok();
        assert!(h.t.is_activated());
        let log = h.log.lock().unwrap();
        assert_eq!(log.activations.len(), 2);
        assert_eq!(log.activations[1].0, feature(VIRTIO_F_VERSION_1));
        assert_eq!(log.activations[1].1[0].0, 16);
        assert!(!log.activations[1].1[0].4, "no event idx this time");
    }

    fn assert_needs_reset(h: &mut Harness) {
        assert!(!h.t.is_activated());
        assert_ne!(h.rd(STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_ne!(h.rd(INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
        assert!(irq_count(h.t.interrupt()) > 0);
        assert!(h.log.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn bad_queue_sizes_are_refused() {
        for size in [0u32, 3, 48, 512, 0x1_0000 + 16] {
            let mut h = harness(&[256], false);
            assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
            h.setup_queue(0, 16, 0x1000);
            h.wr(QUEUE_NUM, size);
            h.driver_ok();
            assert_needs_reset(&mut h);
        }
    }

    #[test]
    fn queues_outside_memory_or_misaligned_are_refused() {
        let mut h = harness(&[256], false);
        assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
        h.setup_queue(0, 16, 0x1000);
        h.wr(QUEUE_DEVICE_HIGH, 1);
        h.driver_ok();
        assert_needs_reset(&mut h);

        let mut h = harness(&[256], false);
        assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
        h.setup_queue(0, 16, 0x1000);
        h.wr(QUEUE_DESC_LOW, 0x1008);
        h.driver_ok();
        assert_needs_reset(&mut h);
    }

    #[test]
    fn missing_queue_and_gaps_are_refused() {
        let mut h = harness(&[16, 16], false);
        assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
        h.setup_queue(1, 16, 0x1000);
        h.driver_ok();
        assert_needs_reset(&mut h);

        let mut h = harness(&[16, 16], false);
        assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
        h.setup_queue(0, 16, 0x1000);
        h.driver_ok();
        assert_needs_reset(&mut h);
    }

    #[test]
    fn activation_failure_sets_needs_reset() {
        let mut h = harness(&[16], true);
        assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
        h.setup_queue(0, 16, 0x1000);
        h.driver_ok();
        assert_needs_reset(&mut h);
        h.wr(STATUS, 0);
        assert_eq!(h.rd(STATUS), 0);
    }

    #[test]
    fn queue_registers_are_frozen_after_driver_ok() {
        let mut h = harness(&[256], false);
        assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
        h.setup_queue(0, 16, 0x1000);
        h.driver_ok();
        h.wr(QUEUE_READY, 0);
        h.wr(QUEUE_NUM, 32);
        assert_eq!(h.rd(QUEUE_READY), 1);
        assert_eq!(h.t.queues[0].size, 16);
        // Features too.
        h.wr(DRIVER_FEATURES_SEL, 0);
        h.wr(DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(h.t.acked_features(), feature(VIRTIO_F_VERSION_1));
    }

    #[test]
    fn odd_accesses_below_config_are_ignored() {
        let mut h = harness(&[256], false);
        let mut two = [0xffu8; 2];
        h.t.read(MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut eight = [0xffu8; 8];
        h.t.read(MAGIC_VALUE, &mut eight);
        assert_eq!(eight, [0; 8]);
        let mut four = [0xffu8; 4];
        h.t.read(MAGIC_VALUE + 1, &mut four);
        assert_eq!(four, [0; 4]);
        // Writes that are not aligned 32-bit stores do nothing.
        h.t.write(STATUS, &[1]);
        h.t.write(STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        h.t.write(STATUS + 2, &[1, 0, 0, 0]);
        assert_eq!(h.rd(STATUS), 0);
        // Unknown registers read as zero and ignore writes.
        h.wr(0x0f0, 5);
        assert_eq!(h.rd(0x0f0), 0);
        assert_eq!(h.rd(QUEUE_NOTIFY), 0);
        // Offsets far past the window are fine too.
        let mut d = [0xffu8; 4];
        h.t.read(u64::MAX - 3, &mut d);
        assert_eq!(d, [0; 4]);
        h.t.write(u64::MAX - 3, &[1, 2, 3, 4]);
    }

    #[test]
    fn config_space_any_width() {
        let mut h = harness(&[256], false);
        let mut b = [0u8; 1];
        h.t.read(CONFIG_OFFSET + 3, &mut b);
        assert_eq!(b, [3]);
        let mut w = [0u8; 2];
        h.t.read(CONFIG_OFFSET + 5, &mut w);
        assert_eq!(w, [5, 6]);
        let mut q = [0xffu8; 8];
        h.t.read(CONFIG_OFFSET + 4, &mut q);
        assert_eq!(q, [4, 5, 6, 7, 0, 0, 0, 0], "past the end reads zero");
        h.t.write(CONFIG_OFFSET + 1, &[9, 8]);
        assert_eq!(h.log.lock().unwrap().config_writes, vec![(1, vec![9, 8])]);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut h = harness(&[256], false);
        h.t.interrupt().signal_used_queue();
        h.t.interrupt().signal_config_change();
        assert_eq!(
            h.rd(INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(irq_count(h.t.interrupt()), 2);
        h.wr(INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(h.rd(INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        h.wr(INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(h.rd(INTERRUPT_STATUS), 0);
    }

    #[test]
    fn interrupt_registers_without_the_lock_match_the_transport() {
        use crate::bus::LockFreeRegisters;
        let mut h = harness(&[256], false);
        let regs = InterruptRegisters(h.t.interrupt().clone());
        h.t.interrupt().signal_used_queue();
        h.t.interrupt().signal_config_change();
        let mut d = [0u8; 4];
        assert!(regs.read(INTERRUPT_STATUS, &mut d));
        assert_eq!(
            u32::from_le_bytes(d),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        assert!(regs.write(INTERRUPT_ACK, &VIRTIO_MMIO_INT_VRING.to_le_bytes()));
        assert_eq!(h.rd(INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        // Anything else (other registers, other widths) is left to the transport.
        let mut two = [0u8; 2];
        assert!(!regs.read(INTERRUPT_STATUS, &mut two));
        assert!(!regs.read(STATUS, &mut d));
        assert!(!regs.write(INTERRUPT_ACK, &[1, 0]));
        assert!(!regs.write(INTERRUPT_STATUS, &[3, 0, 0, 0]));
        assert!(!regs.write(STATUS, &[1, 0, 0, 0]));
        assert_eq!(h.rd(INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(h.rd(STATUS), 0);
    }

    #[test]
    fn queue_notify_writes_are_forwarded_when_active() {
        let mut h = harness(&[16, 16], false);
        h.wr(QUEUE_NOTIFY, 0);
        h.t.process_queue(0);
        assert!(h.log.lock().unwrap().processed.is_empty());
        assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
        h.setup_queue(0, 16, 0x1000);
        h.setup_queue(1, 16, 0x4000);
        h.driver_ok();
        h.wr(QUEUE_NOTIFY, 1);
        h.wr(QUEUE_NOTIFY, 0);
        h.wr(QUEUE_NOTIFY, 2);
        h.wr(QUEUE_NOTIFY, u32::MAX);
        h.t.process_queue(1);
        h.t.process_queue(7);
        assert_eq!(h.log.lock().unwrap().processed, vec![1, 0, 1]);
    }

    /// A transport in front of a real entropy device, activated with one queue at 0x1000.
    fn rng_harness(mem: &GuestMemoryMmap) -> (Harness, TestQueue) {
        rng_harness_sized(mem, 16)
    }

    /// [`rng_harness`] with a queue of `size` entries.
    fn rng_harness_sized(mem: &GuestMemoryMmap, size: u16) -> (Harness, TestQueue) {
        let dev = crate::virtio::rng::Rng::new();
        let t = MmioTransport::new(Box::new(dev), mem.clone(), interrupt()).unwrap();
        let mut h = Harness {
            t,
            log: Arc::default(),
            mem: mem.clone(),
        };
        assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
        h.setup_queue(0, size, 0x1000);
        h.driver_ok();
        assert!(h.t.is_activated());
        (h, TestQueue::new(mem, 0x1000, size))
    }

    #[test]
    fn a_guest_repeating_bad_accesses_gets_a_bounded_number_of_log_lines() {
        use crate::guest_log::BURST;
        use crate::virtio::test_utils::logs;
        use vm_memory::{Address, Bytes};
        const N: usize = 100_000;
        let mark = logs::start();
        let mem = guest_memory(0x10_0000);
        let (mut h, tq) = rng_harness(&mem);
        for _ in 0..N {
            h.wr(QUEUE_NUM, 8);
            h.wr(DRIVER_FEATURES, 1);
        }
        // An available index far ahead of the device, notified again and again.
        mem.write_obj(0x8000u16, tq.avail.unchecked_add(2)).unwrap();
        for _ in 0..N {
            h.wr(QUEUE_NOTIFY, 0);
        }
        // A queue the library would refuse (and log), set up again and again.
        for _ in 0..N {
            h.wr(STATUS, 0);
            assert!(h.negotiate(feature(VIRTIO_F_VERSION_1)));
            h.setup_queue(0, 16, 0x1000);
            h.wr(QUEUE_NUM, 3);
            h.driver_ok();
        }
        let lines = logs::since(mark);
        let from = |text: &str| lines.iter().filter(|(_, m)| m.contains(text)).count();
        for text in [
            "after DRIVER_OK",
            "outside negotiation",
            "buffers available in a queue of 16",
            "cannot activate",
        ] {
            // Each site writes its burst and at most one line per interval after it.
            let n = from(text);
            assert!(n >= 1 && n as u64 <= BURST + 2, "{n} lines with {text:?}");
        }
        assert!(
            lines
                .iter()
                .all(|(target, _)| !target.starts_with("virtio_queue")),
            "virtio-queue logged: {:?}",
            lines.iter().find(|(t, _)| t.starts_with("virtio_queue"))
        );
        assert!(
            lines.len() as u64 <= 4 * (BURST + 2),
            "{} lines",
            lines.len()
        );
    }

    #[test]
    fn a_queue_left_at_the_budget_is_signalled_again() {
        let mem = guest_memory(0x10_0000);
        let (mut h, mut tq) = rng_harness_sized(&mem, 256);
        let head = tq.add_chain(&[w(0x8_0000, 16)]);
        for _ in 1..crate::virtio::MAX_CHAINS_PER_PASS {
            tq.publish(head);
        }
        h.wr(QUEUE_NOTIFY, 0);
        assert_eq!(
            usize::from(tq.used_idx()),
            crate::virtio::MAX_CHAINS_PER_PASS
        );
        // The event loop watches this eventfd: it comes back to the queue.
        assert_eq!(h.t.queue_events()[0].read().unwrap(), 1);
        // What the driver adds meanwhile is served then, without a new notification.
        for _ in 0..10 {
            tq.publish(head);
        }
        h.t.process_queue(0);
        assert_eq!(
            usize::from(tq.used_idx()),
            crate::virtio::MAX_CHAINS_PER_PASS + 10
        );
        assert!(
            h.t.queue_events()[0].read().is_err(),
            "finished: not signalled"
        );
    }

    fn fresh_rng_transport(mem: &GuestMemoryMmap) -> MmioTransport {
        let dev = crate::virtio::rng::Rng::new();
        MmioTransport::new(Box::new(dev), mem.clone(), interrupt()).unwrap()
    }

    #[test]
    fn restored_transport_continues_the_queue() {
        let mem = guest_memory(0x10_0000);
        let (mut h, mut tq) = rng_harness(&mem);
        for i in 0..3 {
            tq.add_chain(&[w(0x8000 + i * 0x100, 16)]);
        }
        h.wr(QUEUE_NOTIFY, 0);
        assert_eq!(tq.used_idx(), 3);
        h.t.interrupt().signal_config_change();
        h.wr(QUEUE_SEL, 0);
        let state = h.t.state();
        assert_eq!(state.queues[0].next_avail, 3);
        assert_eq!(state.queues[0].next_used, 3);
        assert!(state.activated);
        // Through the state file format and back.
        let json = serde_json::to_string(&state).unwrap();
        let state: MmioTransportState = serde_json::from_str(&json).unwrap();

        let mut t = fresh_rng_transport(&mem);
        t.restore(&state).unwrap();
        assert!(t.is_activated());
        assert_eq!(t.state(), state);
        assert_eq!(
            t.interrupt().status() & VIRTIO_MMIO_INT_CONFIG,
            VIRTIO_MMIO_INT_CONFIG
        );
        let mut h = Harness { t, ..h };
        assert_eq!(
            h.rd(STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK
        );
        assert_eq!(h.rd(QUEUE_READY), 1);
        // The driver goes on where it was: two more buffers, used after the first three.
        let a = tq.add_chain(&[w(0x9000, 32)]);
        let b = tq.add_chain(&[w(0x9100, 8)]);
        h.wr(QUEUE_NOTIFY, 0);
        assert_eq!(tq.used_idx(), 5);
        assert_eq!(tq.used_elem(3), (u32::from(a), 32));
        assert_eq!(tq.used_elem(4), (u32::from(b), 8));
    }

    #[test]
    fn restore_picks_up_buffers_made_available_before_the_snapshot() {
        let mem = guest_memory(0x10_0000);
        let (h, mut tq) = rng_harness(&mem);
        // Made available, but the notification never reached the device.
        tq.add_chain(&[w(0x8000, 16)]);
        let state = h.t.state();
        assert_eq!(state.queues[0].next_avail, 0);
        let mut t = fresh_rng_transport(&mem);
        t.restore(&state).unwrap();
        assert_eq!(tq.used_idx(), 1);
    }

    #[test]
    fn inactive_transport_state_round_trips() {
        let mut h = harness(&[16, 8], false);
        assert!(h.negotiate(FEATURES));
        h.setup_queue(1, 8, 0x4000);
        let state = h.t.state();
        assert!(!state.activated);
        let mut fresh = harness(&[16, 8], false);
        fresh.t.restore(&state).unwrap();
        assert_eq!(fresh.t.state(), state);
        assert!(fresh.log.lock().unwrap().activations.is_empty());
        // The driver finishes its setup after the restore.
        fresh.setup_queue(0, 16, 0x1000);
        fresh.driver_ok();
        assert!(fresh.t.is_activated());
    }

    #[test]
    fn corrupt_transport_states_are_refused() {
        let mem = guest_memory(0x10_0000);
        let (h, _tq) = rng_harness(&mem);
        let good = h.t.state();
        let mut bad = vec![
            MmioTransportState {
                device_type: 2,
                ..good.clone()
            },
            MmioTransportState {
                queues: vec![],
                ..good.clone()
            },
            MmioTransportState {
                acked_features: u64::MAX,
                ..good.clone()
            },
            MmioTransportState {
                status: 0,
                ..good.clone()
            },
        ];
        let mut q = good.clone();
        q.queues[0].desc = u64::MAX - 8;
        bad.push(q);
        let mut q = good.clone();
        q.queues[0].size = 3;
        bad.push(q);
        let mut q = good.clone();
        q.queues[0].desc = 0x1001;
        bad.push(q);
        for state in bad {
            let mut t = fresh_rng_transport(&mem);
            let err = t.restore(&state).unwrap_err().to_string();
            assert!(!err.contains('\n') && err.contains("snapshot"), "{err}");
        }
        // Odd but harmless positions are the guest's business.
        let mut q = good.clone();
        q.queues[0].next_avail = 0xfff0;
        fresh_rng_transport(&mem).restore(&q).unwrap();
    }
}
