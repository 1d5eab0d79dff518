//! The virtio side of virtio-vsock: the receive, transmit and event queues, activation, and
//! the guest's notifications. What the packets mean for host sockets is the muxer's
//! ([`super::muxer`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arch::GuestMemoryMmap;
use event_manager::{EventOps, Events};
use log::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::{Muxer, Timeouts};
use super::packet::{Header, HDR_LEN, MAX_PAYLOAD};
use super::{inc, Key, VsockError, VsockMetrics, WAKE_EVENT};
use crate::guest_warn;
use crate::virtio::chain::{
    pop_chain, segments, segments_into, write_segments, ChainError, Direction, Segment,
    SegmentWriter,
};
use crate::virtio::{
    feature, take_queues, ActivateError, QueuePosition, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_ID_VSOCK,
};

/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indexes.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// The only vsock event (`struct virtio_vsock_event`'s id): the host dropped every connection.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Transmit chains taken per pass. When a pass ends with more waiting, the device carries on
/// from its own event-loop wakeup (not a guest notification), so other devices get their
/// turn in between and a vCPU that keeps refilling the queue cannot hold the loop.
pub const MAX_TX_CHAINS_PER_PASS: u16 = 64;
/// Receive chains filled per pass (continued the same way).
pub const MAX_RX_CHAINS_PER_PASS: u16 = 64;

/// What is wrong with a transmit chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxChainError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("the chain holds {0} bytes, less than a packet header")]
    ShortHeader(u64),
    #[error("the packet claims {0} payload bytes, more than {MAX_PAYLOAD}")]
    TooLong(u32),
    #[error("the packet claims {len} payload bytes but the chain holds {have}")]
    ShortPayload { len: u32, have: u64 },
}

/// Read a transmit chain: the header and `len` payload bytes from device-readable descriptors.
pub fn parse_tx_chain(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
) -> Result<(Header, Vec<u8>), TxChainError> {
    let (segs, total) = segments(mem, chain, Direction::DeviceReads, u64::MAX)?;
    if total < HDR_LEN as u64 {
        return Err(TxChainError::ShortHeader(total));
    }
    let mut hdr_bytes = [0u8; HDR_LEN];
    let mut hdr_at = 0;
    let mut payload = Vec::new();
    let mut want_payload = None;
    for s in segs {
        let mut addr = s.addr;
        let mut len = s.len as usize;
        if hdr_at < HDR_LEN {
            let n = len.min(HDR_LEN - hdr_at);
            mem.read_slice(&mut hdr_bytes[hdr_at..hdr_at + n], addr)
                .map_err(|_| ChainError::OutsideMemory)?;
            hdr_at += n;
            len -= n;
            addr = GuestAddress(addr.0 + n as u64);
            if hdr_at < HDR_LEN {
                continue;
            }
            let hdr = Header::from_bytes(&hdr_bytes);
            if hdr.len > MAX_PAYLOAD {
                return Err(TxChainError::TooLong(hdr.len));
            }
            if total - (HDR_LEN as u64) < u64::from(hdr.len) {
                return Err(TxChainError::ShortPayload {
                    len: hdr.len,
                    have: total - HDR_LEN as u64,
                });
            }
            want_payload = Some(hdr.len as usize);
            payload.reserve(hdr.len as usize);
        }
        let Some(want) = want_payload else { continue };
        let n = len.min(want - payload.len());
        if n > 0 {
            let start = payload.len();
            payload.resize(start + n, 0);
            mem.read_slice(&mut payload[start..], addr)
                .map_err(|_| ChainError::OutsideMemory)?;
        }
    }
    Ok((Header::from_bytes(&hdr_bytes), payload))
}

/// The device-writable descriptors of a receive chain (into `segs`), if they have room for a
/// header: their total length, at most what the largest packet needs (the rest of a longer
/// chain is left unused).
fn rx_segments(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
    segs: &mut Vec<Segment>,
) -> Option<usize> {
    match segments_into(mem, chain, Direction::DeviceWrites, u64::MAX, segs) {
        Ok(total) if total >= HDR_LEN as u64 => {
            Some(total.min(HDR_LEN as u64 + u64::from(MAX_PAYLOAD)) as usize)
        }
        _ => None,
    }
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    /// Events for the driver: only a transport reset, after a snapshot restore.
    event: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio socket device.
pub struct Vsock {
    config: [u8; 8],
    active: Option<Active>,
    /// The host side: connections, host programs, resets for the guest.
    pub(super) muxer: Muxer,
    wake: EventFd,
    backend_started: bool,
    /// A transport-reset event waits for a buffer on the event queue.
    event_pending: bool,
    /// The transport-reset event was sent and the driver has not yet handed the event queue
    /// a new buffer, which Linux does only once it has reset its connections. Until then the
    /// muxer holds host programs' connections back: opened earlier, the guest could accept
    /// one and then reset it with the stale ones.
    reset_unacked: bool,
    /// The event queue's available index when the reset was sent.
    reset_sent_avail: u16,
    /// A transmit or receive pass stopped at its budget with work left: carry on from the
    /// wakeup eventfd.
    tx_more: bool,
    rx_more: bool,
    /// The segments of the receive chain being filled (kept to reuse its allocation).
    rx_segs: Vec<Segment>,
    pub(super) metrics: Arc<VsockMetrics>,
}

impl Vsock {
    /// A vsock device for a guest with CID `guest_cid`, listening for host programs at
    /// `uds_path`. A stale socket file there is replaced; the file is removed on drop.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if !(3..=u64::from(u32::MAX - 1)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let wake = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(guest_cid, uds_path, metrics.clone())?;
        Ok(Vsock {
            config: guest_cid.to_le_bytes(),
            active: None,
            muxer,
            wake,
            backend_started: false,
            event_pending: false,
            reset_unacked: false,
            reset_sent_avail: 0,
            tx_more: false,
            rx_more: false,
            rx_segs: Vec::new(),
            metrics,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.muxer.guest_cid()
    }

    /// Where host programs connect.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// The counters; the handle stays valid for the device's lifetime.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Use `timeouts` instead of [`Timeouts::default`] (for connections made from now on, and
    /// for the timer's next arming).
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.muxer.set_timeouts(timeouts);
    }

    /// End whatever has waited longer than its timeout at `now`. The timer calls this with the
    /// current time; tests and fuzzing pass a later one.
    #[doc(hidden)]
    pub fn expire_at(&mut self, now: Instant) {
        self.muxer.expire_at(now);
        self.fill_rx();
    }

    /// Ask the event loop to apply registration changes made outside it, or to carry on with
    /// a transmit or receive pass that stopped at its budget. Also (dis)arm the timer.
    fn wake_loop(&mut self) {
        let registrations = self.muxer.has_registration_changes();
        if self.backend_started && (registrations || self.tx_more || self.rx_more) {
            let _ = self.wake.write(1);
        }
        self.muxer.update_timer();
    }

    /// Move data between host sockets and connection buffers (for one connection or all),
    /// then fill the guest's receive queue.
    fn service(&mut self, only: Option<Key>) {
        self.muxer.service(only);
        self.fill_rx();
    }

    /// Take up to [`MAX_TX_CHAINS_PER_PASS`] packets from the guest's transmit queue, each
    /// handled as it is taken.
    fn process_tx(&mut self) {
        self.tx_more = false;
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
            return;
        };
        let mut used = false;
        let mut taken = 0;
        while let Some(active) = self.active.as_mut() {
            if taken == MAX_TX_CHAINS_PER_PASS {
                self.tx_more = true;
                break;
            }
            let Some(chain) = pop_chain(&mut active.tx, &mem) else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let packet = parse_tx_chain(&mem, chain);
            let returned = active.tx.add_used(&mem, head, 0);
            used |= returned.is_ok();
            match packet {
                Ok((hdr, payload)) => {
                    inc(&self.metrics.tx_packets, 1);
                    self.muxer.handle_guest_packet(hdr, &payload);
                }
                Err(e) => {
                    debug!("virtio-vsock: malformed transmit chain: {e}");
                    inc(&self.metrics.malformed, 1);
                }
            }
            if let Err(e) = returned {
                guest_warn!("virtio-vsock: cannot return a transmit buffer: {e}");
                break;
            }
        }
        if let Some(active) = self.active.as_mut() {
            if used && active.tx.needs_notification(&mem).unwrap_or(true) {
                active.interrupt.signal_used_queue();
            }
        }
    }

    /// Put waiting packets in the guest's receive buffers.
    fn fill_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let m = &*self.metrics;
        let mem = active.mem.clone();
        let mut pass = self.muxer.rx_pass();
        let mut used = false;
        let mut taken = 0;
        self.rx_more = false;
        while self.muxer.has_for_guest(&pass) {
            if taken == MAX_RX_CHAINS_PER_PASS {
                self.rx_more = true;
                break;
            }
            taken += 1;
            let Some(chain) = pop_chain(&mut active.rx, &mem) else {
                break;
            };
            let head = chain.head_index();
            let segs = &mut self.rx_segs;
            let capacity = match rx_segments(&mem, chain, segs) {
                Some(capacity) => capacity,
                None => {
                    inc(&m.rx_errors, 1);
                    if let Err(e) = active.rx.add_used(&mem, head, 0) {
                        guest_warn!("virtio-vsock: cannot return a receive buffer: {e}");
                        break;
                    }
                    used = true;
                    continue;
                }
            };
            // The header and the payload go straight from the connection's buffer into the
            // chain's descriptors, which `capacity` (and the writer) bound.
            let mut out = SegmentWriter::new(&mem, segs);
            let mut written = true;
            let sent = self.muxer.next_for_guest(
                &mut pass,
                capacity - HDR_LEN,
                &mut |hdr, front, back| {
                    written = out.write(&hdr.to_bytes()) && out.write(front) && out.write(back);
                },
            );
            let Some(hdr) = sent else {
                // Nothing to send after all: give the buffer back to the ring.
                let next = active.rx.next_avail().wrapping_sub(1);
                active.rx.set_next_avail(next);
                break;
            };
            if !written {
                inc(&m.rx_errors, 1);
            }
            inc(&m.rx_packets, 1);
            inc(&m.rx_bytes, u64::from(hdr.len));
            // At most HDR_LEN + MAX_PAYLOAD.
            let len = HDR_LEN as u32 + hdr.len;
            if let Err(e) = active.rx.add_used(&mem, head, len) {
                guest_warn!("virtio-vsock: cannot return a receive buffer: {e}");
                break;
            }
            used = true;
        }
        if used && active.rx.needs_notification(&mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        self.muxer.end_rx_pass(pass);
    }

    /// Send a pending transport-reset event, if the driver gave the event queue a buffer.
    fn send_events(&mut self) {
        if !self.event_pending {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let Some(chain) = pop_chain(&mut active.event, &mem) else {
            return;
        };
        let head = chain.head_index();
        let len = match segments(&mem, chain, Direction::DeviceWrites, 4096) {
            Ok((segs, capacity)) if capacity >= 4 => {
                let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
                if write_segments(&mem, &segs, &event) {
                    self.event_pending = false;
                    self.reset_unacked = true;
                    self.reset_sent_avail = active
                        .event
                        .avail_idx(&mem, std::sync::atomic::Ordering::Acquire)
                        .map_or(0, |idx| idx.0);
                    4
                } else {
                    0
                }
            }
            _ => {
                guest_warn!("virtio-vsock: unusable event buffer");
                0
            }
        };
        if let Err(e) = active.event.add_used(&mem, head, len) {
            guest_warn!("virtio-vsock: cannot return an event buffer: {e}");
        }
        // The driver's next buffer acknowledges the reset: be told when it comes.
        if let Err(e) = active.event.enable_notification(&mem) {
            guest_warn!("virtio-vsock: cannot ask for event queue notifications: {e}");
        }
        if active.event.needs_notification(&mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
    }

    /// After a transport reset was sent: once the driver gave the event queue another buffer
    /// (Linux re-posts the event's buffer only after it has reset its connections), open the
    /// host connections that waited.
    fn ack_reset(&mut self) {
        if !self.reset_unacked {
            return;
        }
        let Some(active) = self.active.as_ref() else {
            return;
        };
        // The driver may have had several buffers on the queue: only one added after the
        // reset was sent says it was handled.
        let given = active
            .event
            .avail_idx(&active.mem, std::sync::atomic::Ordering::Acquire)
            .map(|idx| idx.0 != self.reset_sent_avail)
            .unwrap_or(false);
        if !given {
            return;
        }
        self.reset_unacked = false;
        self.muxer.release_held();
        self.service(None);
    }

    /// Drop every connection (the driver reset the device).
    fn drop_all(&mut self) {
        self.muxer.drop_all();
        self.reset_unacked = false;
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1)
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let [rx, tx, event] = take_queues(queues)?;
        self.active = Some(Active {
            mem,
            rx,
            tx,
            event,
            interrupt,
        });
        self.service(None);
        self.wake_loop();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.fill_rx(),
            TX_QUEUE => {
                self.process_tx();
                self.fill_rx();
            }
            EVENT_QUEUE => {
                self.ack_reset();
                self.send_events();
            }
            _ => {}
        }
        self.wake_loop();
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.active
            .iter()
            .flat_map(|a| [&a.rx, &a.tx, &a.event].map(QueuePosition::of))
            .collect()
    }

    fn restored(&mut self) {
        self.drop_all();
        self.event_pending = true;
        self.muxer.hold_host_connections();
        self.send_events();
        self.wake_loop();
    }

    fn reset(&mut self) {
        self.drop_all();
        self.active = None;
        self.event_pending = false;
        self.wake_loop();
    }

    fn init_backend(&mut self, ops: &mut EventOps) {
        self.muxer.init_backend(ops);
        if let Err(e) = ops.add(Events::with_data(&self.wake, WAKE_EVENT, EventSet::IN)) {
            warn!("virtio-vsock: cannot watch the wakeup eventfd: {e:?}");
        }
        self.backend_started = true;
        self.muxer.sync_registrations(ops);
    }

    fn process_backend(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            WAKE_EVENT => {
                let _ = self.wake.read();
                // A pass that stopped at its budget carries on here.
                if self.tx_more {
                    self.process_tx();
                    self.fill_rx();
                } else if self.rx_more {
                    self.fill_rx();
                }
            }
            id => {
                if self.muxer.process_event(id, events.event_set()) {
                    self.fill_rx();
                }
            }
        }
        self.muxer.sync_registrations(ops);
        self.wake_loop();
    }
}
