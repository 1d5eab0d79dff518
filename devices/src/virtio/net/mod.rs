//! virtio-net (virtio 1.2 section 5.1) backed by a Linux TAP interface.
//!
//! Every frame crosses the device with the 12-byte `virtio_net_hdr_v1` in front of it. The TAP
//! is opened with `IFF_VNET_HDR` and the same header size, so the header the guest writes on
//! transmit goes to the kernel as is (checksum and segmentation offload requests included), and
//! the header the kernel writes on receive goes to the guest with `num_buffers` filled in.
//!
//! The TAP is registered edge-triggered for reading and writing with the VMM's event loop:
//! - Receive: frames are read from the TAP only while the guest has receive buffers. When it
//!   has none, the device stops reading (frames wait in the kernel's queue) and resumes when
//!   the driver refills the receive queue. With mergeable receive buffers, once the guest's
//!   buffers can hold a frame of any size, each frame is read with one `readv(2)` straight
//!   into them (no copy in the VMM); otherwise through a bounce buffer.
//! - Transmit: chains go to the TAP with `writev(2)` straight from guest memory. When the TAP
//!   is full, the chain stays in the queue and transmission resumes when the TAP becomes
//!   writable again.

pub mod tap;

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arch::GuestMemoryMmap;
use event_manager::{EventOps, Events};
use log::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;

use super::chain::{
    add_used_together, pop_chain, read_segments, segments, write_segments, ChainError, Direction,
    Segment, SegmentWriter,
};
use super::{
    feature, take_queues, ActivateError, QueuePosition, VirtioDevice, VirtioInterrupt,
    BACKEND_EVENT_BASE, MAX_CHAINS_PER_PASS, VIRTIO_F_VERSION_1, VIRTIO_ID_NET,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::mmds::endpoint::MmdsEndpoint;
use crate::rate_limiter::RateLimiter;
use tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};

/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Longest frame (without the virtio-net header) in either direction: a 64 KiB GSO packet
/// plus an Ethernet header with a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65536 + 18;
/// Shortest frame the device transmits: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Most pieces of guest memory one `readv` of the TAP is given (the kernel's `UIO_MAXIOV`).
/// Receive buffers in more pieces than this go through the bounce buffer.
const MAX_RX_IOVECS: usize = 1024;

pub use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};

/// `status` in the configuration space (le16): the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;

/// Configuration space: mac[6], status (le16), max_virtqueue_pairs (le16), mtu (le16).
const CONFIG_LEN: usize = 12;
/// Offset of `mtu` in the configuration space.
const CONFIG_MTU_OFFSET: usize = 10;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The event-loop data value of the TAP.
const TAP_EVENT: u32 = BACKEND_EVENT_BASE;
/// The event-loop data value of the receive rate limiter's timer.
const RX_LIMITER_EVENT: u32 = BACKEND_EVENT_BASE + 1;
/// The event-loop data value of the transmit rate limiter's timer.
const TX_LIMITER_EVENT: u32 = BACKEND_EVENT_BASE + 2;

/// Whether `limiter` (if any) lets a `bytes`-byte frame through; a new refusal is counted.
fn admit(limiter: &mut Option<RateLimiter>, bytes: usize, throttled: &AtomicU64) -> bool {
    let Some(l) = limiter.as_mut() else {
        return true;
    };
    let was_blocked = l.is_blocked();
    if l.consume(bytes as u64) {
        return true;
    }
    if !was_blocked {
        inc(throttled, 1);
    }
    false
}

/// Why a network device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot set up the network device on TAP {name}: {source}")]
    Tap { name: String, source: TapError },
    #[error("the MAC address {mac} for TAP {name} is a multicast or all-zero address")]
    BadMac { name: String, mac: String },
}

/// Why a MAC address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("{0:?} is not a MAC address of the form aa:bb:cc:dd:ee:ff")]
    Syntax(String),
    #[error("{0:?} is a multicast MAC address; a NIC needs a unicast one")]
    Multicast(String),
    #[error("{0:?} is the all-zero MAC address")]
    Zero(String),
}

/// Parse `aa:bb:cc:dd:ee:ff` (hex, either case) into a unicast, non-zero MAC address.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let syntax = || MacError::Syntax(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(syntax)?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(syntax());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| syntax())?;
    }
    if parts.next().is_some() {
        return Err(syntax());
    }
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast(s.to_string()));
    }
    if mac == [0; 6] {
        return Err(MacError::Zero(s.to_string()));
    }
    Ok(mac)
}

/// Format a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC address of a network device on the TAP `tap_name` when none is given: locally
/// administered unicast `06:46:4c:xx:xx:xx` ("FL" and three bytes of a hash of the TAP name).
/// It is the same every time the TAP is used, and VMs on different TAPs of one bridge get
/// different addresses (TAP names are unique on a host).
pub fn default_mac(tap_name: &str) -> [u8; 6] {
    // 32-bit FNV-1a.
    let hash = tap_name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let [_, a, b, c] = hash.to_be_bytes();
    [0x06, 0x46, 0x4c, a, b, c]
}

/// Frame and error counters, shared with whoever reports metrics.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frame bytes (without the virtio-net header) delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames read from the TAP and dropped: larger than the guest's receive buffers, or
    /// shorter than a header.
    pub rx_dropped: AtomicU64,
    /// TAP read failures and unusable receive chains (returned to the guest empty).
    pub rx_errors: AtomicU64,
    /// Frames written to the TAP.
    pub tx_frames: AtomicU64,
    /// Frame bytes (without the virtio-net header) written to the TAP.
    pub tx_bytes: AtomicU64,
    /// Malformed transmit chains, dropped.
    pub tx_malformed: AtomicU64,
    /// Frames the TAP refused (other than being full), dropped.
    pub tx_errors: AtomicU64,
    /// Times the TAP was full and transmission paused until it became writable.
    pub tx_blocked: AtomicU64,
    /// Times a received frame did not fit the receive rate limiter and reception paused.
    pub rx_rate_limiter_throttled: AtomicU64,
    /// Times a transmit frame did not fit the transmit rate limiter and transmission paused.
    pub tx_rate_limiter_throttled: AtomicU64,
}

fn inc(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// What is wrong with a transmit chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("the chain holds {0} bytes, less than a virtio-net header and an Ethernet header")]
    TooShort(u64),
}

/// What is wrong with a receive chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RxChainError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("the chain cannot hold a virtio-net header")]
    TooShort,
}

/// Check a transmit chain: device-readable descriptors inside guest memory holding a
/// virtio-net header and a frame of sane size. Returns the non-empty segments in order.
pub fn parse_tx_chain(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
) -> Result<Vec<Segment>, TxError> {
    let limit = (VNET_HDR_LEN + MAX_FRAME_LEN) as u64;
    let (segs, total) = segments(mem, chain, Direction::DeviceReads, limit)?;
    if total < (VNET_HDR_LEN + MIN_FRAME_LEN) as u64 {
        return Err(TxError::TooShort(total));
    }
    Ok(segs)
}

/// A receive chain taken from the queue but not used yet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RxChain {
    head: u16,
    segs: Vec<Segment>,
    capacity: usize,
}

/// Check a receive chain: device-writable descriptors inside guest memory with room for at
/// least a virtio-net header.
fn parse_rx_chain(
    mem: &GuestMemoryMmap,
    head: u16,
    chain: impl IntoIterator<Item = Descriptor>,
) -> Result<RxChain, RxChainError> {
    let (segs, capacity) = segments(mem, chain, Direction::DeviceWrites, u64::MAX)?;
    if capacity < VNET_HDR_LEN as u64 {
        return Err(RxChainError::TooShort);
    }
    Ok(RxChain {
        head,
        segs,
        // Guest memory is addressable, so its size fits in `usize`.
        capacity: capacity as usize,
    })
}

/// Outcome of trying to hand one frame to the guest.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    Delivered,
    /// Not enough receive buffers yet; keep the frame.
    NoBuffers,
    /// The frame can never fit the guest's buffers.
    TooBig,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<VirtioInterrupt>,
    mrg_rxbuf: bool,
    /// Receive chains popped from the queue and not used yet, in order.
    rx_chains: VecDeque<RxChain>,
    /// What `rx_chains` hold together (saturating), kept so that a frame's check for room
    /// does not walk them all.
    rx_stash_bytes: usize,
    /// Used entries added since the last interrupt decision.
    rx_used: bool,
    tx_used: bool,
    /// The used index of each queue when the device last decided whether to interrupt: the
    /// entries after it are the new ones `used_event` is compared with.
    rx_signalled: u16,
    tx_signalled: u16,
    /// What is left of the current receive pass's budget: each frame and each receive chain
    /// taken costs one.
    rx_budget: usize,
}

/// Whether the driver wants an interrupt for the used entries `since..queue.next_used()`:
/// with `VIRTIO_RING_F_EVENT_IDX`, when its `used_event` lies among them (virtio 1.2, 2.7.10);
/// without, unless it set `VRING_AVAIL_F_NO_INTERRUPT`. Unreadable rings mean yes.
fn wants_interrupt(queue: &Queue, mem: &GuestMemoryMmap, since: u16) -> bool {
    // The used entries must be visible before the driver's suppression field is read (the
    // driver writes that field and then reads the used index).
    std::sync::atomic::fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        // `used_event` follows the flags, the index and `size` ring entries.
        let Some(addr) = avail.checked_add(4 + 2 * u64::from(queue.size())) else {
            return true;
        };
        let Ok(used_event) = mem.read_obj::<u16>(addr).map(u16::from_le) else {
            return true;
        };
        let new = queue.next_used();
        new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(since)
    } else {
        mem.read_obj::<u16>(avail)
            .map(|flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
            .unwrap_or(true)
    }
}

/// `flags` bit of the available ring: the driver does not want interrupts.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

impl Active {
    fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<VirtioInterrupt>,
        mrg_rxbuf: bool,
    ) -> Self {
        let (rx_signalled, tx_signalled) = (rx.next_used(), tx.next_used());
        Active {
            mem,
            rx,
            tx,
            interrupt,
            mrg_rxbuf,
            rx_chains: VecDeque::new(),
            rx_stash_bytes: 0,
            rx_used: false,
            tx_used: false,
            rx_signalled,
            tx_signalled,
            rx_budget: 0,
        }
    }

    /// Pop receive chains until `want` bytes fit (or one chain, without mergeable buffers).
    /// Returns whether the stash holds enough.
    fn stash_rx(&mut self, want: usize, metrics: &NetMetrics) -> bool {
        let mut rearmed = false;
        loop {
            let have: usize = if self.mrg_rxbuf {
                self.rx_stash_bytes
            } else {
                self.rx_chains.front().map_or(0, |c| c.capacity)
            };
            if have >= want || (!self.mrg_rxbuf && !self.rx_chains.is_empty()) {
                return have >= want;
            }
            if self.rx_budget == 0 {
                return false;
            }
            self.rx_budget -= 1;
            let Some(chain) = pop_chain(&mut self.rx, &self.mem) else {
                // Out of buffers: ask the driver to notify when it adds some, and look once
                // more in case it did meanwhile. Only once per call: a bogus available index
                // must not keep the device spinning.
                if rearmed {
                    return false;
                }
                rearmed = true;
                match self.rx.enable_notification(&self.mem) {
                    Ok(true) => continue,
                    _ => return false,
                }
            };
            let head = chain.head_index();
            match parse_rx_chain(&self.mem, head, chain) {
                Ok(c) => {
                    self.rx_stash_bytes = self.rx_stash_bytes.saturating_add(c.capacity);
                    self.rx_chains.push_back(c);
                }
                Err(e) => {
                    debug!("virtio-net: unusable receive chain: {e}");
                    inc(&metrics.rx_errors, 1);
                    self.add_used_rx(head, 0);
                }
            }
        }
    }

    /// The oldest stashed receive chain.
    fn pop_stashed(&mut self) -> Option<RxChain> {
        let c = self.rx_chains.pop_front()?;
        self.rx_stash_bytes = self.rx_stash_bytes.saturating_sub(c.capacity);
        Some(c)
    }

    fn add_used_rx(&mut self, head: u16, len: u32) {
        if let Err(e) = self.rx.add_used(&self.mem, head, len) {
            crate::guest_warn!("virtio-net: cannot return a receive buffer: {e}");
        }
        self.rx_used = true;
    }

    /// Whether the guest offers a receive buffer (stashed or in the ring).
    fn has_rx_buffer(&mut self, metrics: &NetMetrics) -> bool {
        self.stash_rx(1, metrics)
    }

    /// Hand `frame` (virtio-net header included) to the guest.
    fn deliver(&mut self, frame: &mut [u8], metrics: &NetMetrics) -> Delivery {
        if !self.stash_rx(frame.len(), metrics) {
            if !self.mrg_rxbuf && !self.rx_chains.is_empty() {
                return Delivery::TooBig;
            }
            // The whole ring is ours and still too small: it will never fit.
            if self.rx_chains.len() >= usize::from(self.rx.size()) {
                return Delivery::TooBig;
            }
            return Delivery::NoBuffers;
        }
        let mut chains = Vec::new();
        let mut covered = 0usize;
        while covered < frame.len() {
            let Some(c) = self.pop_stashed() else {
                break;
            };
            covered += c.capacity;
            chains.push(c);
        }
        // At most the queue size, which fits in 16 bits.
        let num_buffers = chains.len() as u16;
        frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
        let mut rest: &[u8] = frame;
        let mut ok = true;
        let mut used = Vec::with_capacity(chains.len());
        for c in chains {
            let n = rest.len().min(c.capacity);
            ok &= write_segments(&self.mem, &c.segs, &rest[..n]);
            rest = &rest[n..];
            // `n` is at most the frame length.
            used.push((c.head, n as u32));
        }
        if !ok {
            inc(&metrics.rx_errors, 1);
        }
        // The driver reads `num_buffers` and then expects every buffer of the frame in the used
        // ring at once; publishing them one by one makes it drop the frame as truncated.
        if let Err(e) = add_used_together(&mut self.rx, &self.mem, &used) {
            crate::guest_warn!("virtio-net: cannot return receive buffers: {e}");
        }
        self.rx_used = true;
        Delivery::Delivered
    }

    /// Read one frame from the TAP straight into the stashed receive chains (which hold at
    /// least [`VNET_HDR_LEN`] + [`MAX_FRAME_LEN`] bytes) and hand the guest the chains it
    /// filled; the others stay stashed for the next frame. `None` when the chains cannot be
    /// given to one `readv` (more than [`MAX_RX_IOVECS`] pieces, or memory refuses a range):
    /// then nothing was read. Otherwise what the read returned; a frame shorter than a
    /// virtio-net header is dropped.
    fn receive_direct(&mut self, tap: &Tap, metrics: &NetMetrics) -> Option<io::Result<usize>> {
        let n = match read_frame_into(tap, &self.mem, &self.rx_chains) {
            None => return None,
            Some(Err(e)) => return Some(Err(e)),
            Some(Ok(n)) => n,
        };
        if n < VNET_HDR_LEN {
            inc(&metrics.rx_dropped, 1);
            return Some(Ok(n));
        }
        // The chains the frame filled, in order, and what each holds.
        let mut lens = Vec::new();
        let mut left = n;
        for c in &self.rx_chains {
            if left == 0 {
                break;
            }
            let k = left.min(c.capacity);
            // At most the frame length.
            lens.push(k as u32);
            left -= k;
        }
        // At most the queue size, which fits in 16 bits.
        let num_buffers = lens.len() as u16;
        let Some(first) = self.rx_chains.front() else {
            return Some(Ok(n));
        };
        let mut out = SegmentWriter::new(&self.mem, &first.segs);
        if !(out.skip(NUM_BUFFERS_OFFSET) && out.write(&num_buffers.to_le_bytes())) {
            inc(&metrics.rx_errors, 1);
        }
        let used: Vec<(u16, u32)> = lens
            .iter()
            .filter_map(|&len| self.pop_stashed().map(|c| (c.head, len)))
            .collect();
        // All at once, as `deliver` does.
        if let Err(e) = add_used_together(&mut self.rx, &self.mem, &used) {
            crate::guest_warn!("virtio-net: cannot return receive buffers: {e}");
        }
        self.rx_used = true;
        inc(&metrics.rx_frames, 1);
        inc(&metrics.rx_bytes, (n - VNET_HDR_LEN) as u64);
        Some(Ok(n))
    }

    /// Interrupt the driver once for everything used since the last call, if it wants one.
    fn signal(&mut self) {
        let mut notify = false;
        if std::mem::take(&mut self.rx_used) {
            notify |= wants_interrupt(&self.rx, &self.mem, self.rx_signalled);
            self.rx_signalled = self.rx.next_used();
        }
        if std::mem::take(&mut self.tx_used) {
            notify |= wants_interrupt(&self.tx, &self.mem, self.tx_signalled);
            self.tx_signalled = self.tx.next_used();
        }
        if notify {
            self.interrupt.signal_used_queue();
        }
    }
}

/// A virtio network device on a TAP interface.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    /// Receive bounce buffer: one frame with its header.
    rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` waiting for receive buffers or the receive limiter.
    rx_pending: Option<usize>,
    /// The pending frame was already charged to the receive limiter.
    rx_pending_charged: bool,
    /// Limits frames from the TAP to the guest.
    rx_limiter: Option<RateLimiter>,
    /// The MMDS as this NIC's guest reaches it, if the NIC serves it.
    mmds: Option<MmdsEndpoint>,
    /// Limits frames from the guest to the TAP.
    tx_limiter: Option<RateLimiter>,
    /// The TAP may have frames queued (edge-triggered: cleared only on `EAGAIN`).
    tap_readable: bool,
    /// The TAP was full; waiting for it to become writable.
    tx_blocked: bool,
    /// Queues whose last pass used its budget (bit per queue index).
    unfinished: u64,
    metrics: Arc<NetMetrics>,
}

impl Net {
    /// A network device on the TAP `tap_name` (attached to if it exists, created otherwise)
    /// with the MAC address `mac`.
    pub fn new(tap_name: &str, mac: [u8; 6]) -> Result<Net, NetError> {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::BadMac {
                name: tap_name.to_string(),
                mac: format_mac(&mac),
            });
        }
        let tap = Tap::open_or_create(tap_name).map_err(|source| NetError::Tap {
            name: tap_name.to_string(),
            source,
        })?;
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        // One queue pair (only read with VIRTIO_NET_F_MQ, which is not offered).
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Ok(Net {
            tap,
            mac,
            avail_features: feature(VIRTIO_F_VERSION_1)
                | feature(VIRTIO_NET_F_MAC)
                | feature(VIRTIO_NET_F_STATUS)
                | feature(VIRTIO_NET_F_CSUM)
                | feature(VIRTIO_NET_F_GUEST_CSUM)
                | feature(VIRTIO_NET_F_GUEST_TSO4)
                | feature(VIRTIO_NET_F_GUEST_TSO6)
                | feature(VIRTIO_NET_F_HOST_TSO4)
                | feature(VIRTIO_NET_F_HOST_TSO6)
                | feature(VIRTIO_NET_F_MRG_RXBUF)
                | feature(VIRTIO_RING_F_EVENT_IDX),
            acked_features: 0,
            config,
            active: None,
            rx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            rx_pending: None,
            rx_pending_charged: false,
            rx_limiter: None,
            tx_limiter: None,
            mmds: None,
            tap_readable: true,
            tx_blocked: false,
            unfinished: 0,
            metrics: Arc::new(NetMetrics::default()),
        })
    }

    /// Limit received (TAP to guest) and transmitted (guest to TAP) frames. Each frame takes
    /// its length without the virtio-net header from the bandwidth bucket and one operation
    /// from the ops bucket. A received frame that does not fit waits in the device (further
    /// frames wait in the TAP's queue); a transmit chain that does not fit stays in the queue.
    pub fn with_rate_limiters(mut self, rx: Option<RateLimiter>, tx: Option<RateLimiter>) -> Self {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    /// Serve the MMDS to this NIC's guest: its frames for the MMDS address go to `mmds`
    /// instead of the TAP, and `mmds`'s answers come in with the TAP's frames.
    pub fn with_mmds(mut self, mmds: MmdsEndpoint) -> Self {
        self.mmds = Some(mmds);
        self
    }

    /// Offer the guest `mtu` as its interface's MTU (`VIRTIO_NET_F_MTU`).
    pub fn with_mtu(mut self, mtu: u16) -> Self {
        self.avail_features |= feature(VIRTIO_NET_F_MTU);
        self.config[CONFIG_MTU_OFFSET..CONFIG_MTU_OFFSET + 2].copy_from_slice(&mtu.to_le_bytes());
        self
    }

    /// Apply new configurations to the receive and/or transmit limiters from the next frame
    /// on (`None`: unchanged). Returns false when one to change was not built (see
    /// [`Net::with_rate_limiters`]); nothing changes then.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&crate::rate_limiter::RateLimiterConfig>,
        tx: Option<&crate::rate_limiter::RateLimiterConfig>,
    ) -> bool {
        if (rx.is_some() && self.rx_limiter.is_none())
            || (tx.is_some() && self.tx_limiter.is_none())
        {
            return false;
        }
        if let (Some(config), Some(limiter)) = (rx, self.rx_limiter.as_mut()) {
            limiter.update(config);
        }
        if let (Some(config), Some(limiter)) = (tx, self.tx_limiter.as_mut()) {
            limiter.update(config);
        }
        true
    }

    /// The receive rate limiter, if any.
    pub fn rx_rate_limiter(&self) -> Option<&RateLimiter> {
        self.rx_limiter.as_ref()
    }

    /// The transmit rate limiter, if any.
    pub fn tx_rate_limiter(&self) -> Option<&RateLimiter> {
        self.tx_limiter.as_ref()
    }

    /// The TAP interface.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The counters; the handle stays valid for the device's lifetime.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The features the driver accepted at the last activation.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The TAP reported `set`.
    fn tap_event(&mut self, set: EventSet) {
        if set.contains(EventSet::ERROR) || set.contains(EventSet::HANG_UP) {
            debug!("virtio-net {}: TAP reported {set:?}", self.tap.name());
        }
        if set.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
            self.tap_readable = true;
        }
        if set.contains(EventSet::OUT) && self.tx_blocked {
            self.tx_blocked = false;
            self.process_tx();
        }
        self.process_rx();
    }

    /// Move frames from the TAP to the guest while it has buffers.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let m = &*self.metrics;
        // The driver need not kick while the device has its buffers; `stash_rx` re-arms
        // notifications when it runs out (a no-op with EVENT_IDX: see `stash_rx`).
        let _ = active.rx.disable_notification(&active.mem);
        active.rx_budget = MAX_CHAINS_PER_PASS;
        while active.rx_budget > 0 {
            active.rx_budget -= 1;
            let (len, charged) = match self.rx_pending.take() {
                Some(len) => (len, self.rx_pending_charged),
                // The MMDS's answers: not from the TAP, so not limited.
                None if self.mmds.as_ref().is_some_and(MmdsEndpoint::has_frames)
                    && active.has_rx_buffer(m) =>
                {
                    let frame = self
                        .mmds
                        .as_mut()
                        .and_then(MmdsEndpoint::next_frame)
                        .unwrap_or_default();
                    let n = VNET_HDR_LEN + frame.len();
                    if n > self.rx_buf.len() {
                        continue;
                    }
                    self.rx_buf[..VNET_HDR_LEN].fill(0);
                    self.rx_buf[VNET_HDR_LEN..n].copy_from_slice(&frame);
                    (n, true)
                }
                None => {
                    let limited = self
                        .rx_limiter
                        .as_ref()
                        .is_some_and(RateLimiter::is_blocked);
                    if !self.tap_readable || limited || !active.has_rx_buffer(m) {
                        break;
                    }
                    // With mergeable buffers that can take a frame of any size, and no receive
                    // limit (a limiter needs a frame's length before the guest gets it; the
                    // VMM always has one, unlimited unless configured), the frame goes straight
                    // into the guest's buffers. Otherwise, or when they come in too many
                    // pieces, through the bounce buffer.
                    let unlimited = self
                        .rx_limiter
                        .as_ref()
                        .is_none_or(|l| l.bandwidth().is_none() && l.ops().is_none());
                    let direct = active.mrg_rxbuf
                        && unlimited
                        && active.stash_rx(VNET_HDR_LEN + MAX_FRAME_LEN, m);
                    let read = match direct.then(|| active.receive_direct(&self.tap, m)) {
                        // Delivered (or a runt dropped) in place.
                        Some(Some(result)) => result.map(|_| None),
                        _ => self.tap.read_frame(&mut self.rx_buf).map(Some),
                    };
                    match read {
                        Ok(None) => continue,
                        Ok(Some(n)) => (n, false),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.tap_readable = false;
                            break;
                        }
                        Err(e) => {
                            debug!("virtio-net {}: TAP read failed: {e}", self.tap.name());
                            inc(&m.rx_errors, 1);
                            // Wait for the next edge rather than spin on a failing TAP.
                            self.tap_readable = false;
                            break;
                        }
                    }
                }
            };
            if len < VNET_HDR_LEN {
                inc(&m.rx_dropped, 1);
                continue;
            }
            let frame_len = len - VNET_HDR_LEN;
            if !charged
                && !admit(
                    &mut self.rx_limiter,
                    frame_len,
                    &m.rx_rate_limiter_throttled,
                )
            {
                // Keep the frame until the limiter's timer fires.
                self.rx_pending = Some(len);
                self.rx_pending_charged = false;
                break;
            }
            match active.deliver(&mut self.rx_buf[..len], m) {
                Delivery::Delivered => {
                    inc(&m.rx_frames, 1);
                    inc(&m.rx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Delivery::TooBig => {
                    debug!(
                        "virtio-net {}: dropped a {len}-byte frame larger than the receive buffers",
                        self.tap.name()
                    );
                    inc(&m.rx_dropped, 1);
                }
                Delivery::NoBuffers => {
                    self.rx_pending = Some(len);
                    self.rx_pending_charged = true;
                    break;
                }
            }
        }
        if active.rx_budget == 0 {
            // Frames or buffers may be left: the transport brings us back.
            self.unfinished |= 1 << RX_QUEUE;
        }
        active.signal();
    }

    /// Move frames from the guest's transmit queue to the TAP.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let m = &*self.metrics;
        let mem = active.mem.clone();
        if self
            .tx_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked)
        {
            // The limiter's timer restarts transmission.
            return;
        }
        let mut budget = MAX_CHAINS_PER_PASS;
        // Rounds that found nothing to send; bounds the re-checks below.
        let mut idle_rounds = 0;
        'serve: loop {
            // No kicks while the queue is being drained (a no-op with EVENT_IDX, where the driver
            // kicks only when it passes the `avail_event` set when re-arming below).
            let _ = active.tx.disable_notification(&mem);
            let mut popped = false;
            while budget > 0 {
                let Some(chain) = pop_chain(&mut active.tx, &mem) else {
                    break;
                };
                budget -= 1;
                popped = true;
                let head = chain.head_index();
                match parse_tx_chain(&mem, chain) {
                    Err(e) => {
                        debug!(
                            "virtio-net {}: malformed transmit chain: {e}",
                            self.tap.name()
                        );
                        inc(&m.tx_malformed, 1);
                    }
                    Ok(segs)
                        if !admit(
                            &mut self.tx_limiter,
                            segs.iter()
                                .map(|s| s.len as usize)
                                .sum::<usize>()
                                .saturating_sub(VNET_HDR_LEN),
                            &m.tx_rate_limiter_throttled,
                        ) =>
                    {
                        // Leave the chain in the queue until the limiter's timer fires.
                        let next = active.tx.next_avail().wrapping_sub(1);
                        active.tx.set_next_avail(next);
                        break 'serve;
                    }
                    Ok(segs) if self.mmds.as_ref().is_some_and(|e| for_mmds(e, &mem, &segs)) => {
                        if let (Some(frame), Some(mmds)) =
                            (read_frame(&mem, &segs), self.mmds.as_mut())
                        {
                            mmds.receive(&frame[VNET_HDR_LEN..]);
                            inc(&m.tx_frames, 1);
                            inc(&m.tx_bytes, (frame.len() - VNET_HDR_LEN) as u64);
                        }
                    }
                    Ok(segs) => match write_frame(&self.tap, &mem, &segs) {
                        Ok(n) => {
                            inc(&m.tx_frames, 1);
                            inc(&m.tx_bytes, n.saturating_sub(VNET_HDR_LEN) as u64);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // Leave the chain in the queue; retry when the TAP is writable.
                            let next = active.tx.next_avail().wrapping_sub(1);
                            active.tx.set_next_avail(next);
                            self.tx_blocked = true;
                            inc(&m.tx_blocked, 1);
                            break 'serve;
                        }
                        Err(e) => {
                            debug!("virtio-net {}: TAP write failed: {e}", self.tap.name());
                            inc(&m.tx_errors, 1);
                        }
                    },
                }
                if let Err(e) = active.tx.add_used(&mem, head, 0) {
                    crate::guest_warn!(
                        "virtio-net {}: cannot return a transmit buffer: {e}",
                        self.tap.name()
                    );
                    break 'serve;
                }
                active.tx_used = true;
            }
            if budget == 0 {
                // Chains may be left (notifications stay off): the transport brings us back.
                self.unfinished |= 1 << TX_QUEUE;
                break;
            }
            if !popped {
                idle_rounds += 1;
            }
            // Re-arm notifications; if the driver added chains meanwhile, go again (but not
            // forever on an available index that yields nothing, e.g. a bogus one).
            match active.tx.enable_notification(&mem) {
                Ok(true) if idle_rounds < 2 => {}
                _ => break,
            }
        }
        active.signal();
        if self.mmds.as_ref().is_some_and(|e| e.has_frames()) {
            self.process_rx();
        }
    }
}

/// Bytes at the start of a frame that say whether it is for the MMDS: the virtio-net header,
/// the Ethernet header and an ARP packet up to its target address.
const MMDS_PEEK: usize = VNET_HDR_LEN + 14 + 28;

/// Whether the frame in `segs` is for `mmds`, from its first bytes.
fn for_mmds(mmds: &MmdsEndpoint, mem: &GuestMemoryMmap, segs: &[Segment]) -> bool {
    let mut peek = [0u8; MMDS_PEEK];
    let mut at = 0;
    for s in segs {
        if at == MMDS_PEEK {
            break;
        }
        let n = (s.len as usize).min(MMDS_PEEK - at);
        if mem.read_slice(&mut peek[at..at + n], s.addr).is_err() {
            return false;
        }
        at += n;
    }
    at > VNET_HDR_LEN && mmds.wants(&peek[VNET_HDR_LEN..at])
}

/// The whole frame in `segs` (virtio-net header included), if it is no larger than the MMDS
/// takes.
fn read_frame(mem: &GuestMemoryMmap, segs: &[Segment]) -> Option<Vec<u8>> {
    let total: usize = segs.iter().map(|s| s.len as usize).sum();
    if !(VNET_HDR_LEN..=VNET_HDR_LEN + crate::mmds::endpoint::MAX_FRAME).contains(&total) {
        return None;
    }
    let mut frame = Vec::new();
    read_segments(mem, segs, &mut frame).then_some(frame)
}

/// `readv` one frame from the TAP into `chains` (checked to lie in `mem`), in order, at most
/// [`VNET_HDR_LEN`] + [`MAX_FRAME_LEN`] bytes. `None`, with nothing read, when the chains hold
/// less than that, come in more than [`MAX_RX_IOVECS`] pieces, or memory refuses a range.
fn read_frame_into(
    tap: &Tap,
    mem: &GuestMemoryMmap,
    chains: &VecDeque<RxChain>,
) -> Option<io::Result<usize>> {
    let mut slices = Vec::new();
    let mut left = VNET_HDR_LEN + MAX_FRAME_LEN;
    'chains: for c in chains {
        for s in &c.segs {
            if left == 0 {
                break 'chains;
            }
            let n = left.min(s.len as usize);
            for slice in GuestMemoryBackend::get_slices(mem, s.addr, n) {
                slices.push(slice.ok()?);
                if slices.len() > MAX_RX_IOVECS {
                    return None;
                }
            }
            left -= n;
        }
    }
    if left > 0 {
        return None;
    }
    let guards: Vec<_> = slices
        .iter()
        .map(|s| (s.ptr_guard_mut(), s.len()))
        .collect();
    let iovs: Vec<libc::iovec> = guards
        .iter()
        .map(|(g, len)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: *len,
        })
        .collect();
    // SAFETY: each iovec points into a mapped guest memory region (`get_slices` checked the
    // range), kept alive by `mem` and the pointer guards for the duration of the call; the
    // kernel writes only there.
    let result = unsafe { tap.readv(&iovs) };
    drop(guards);
    if let Ok(n) = result {
        // The kernel's writes bypass the dirty-page bitmap: mark what the frame filled.
        let mut left = n;
        for s in &slices {
            if left == 0 {
                break;
            }
            let k = left.min(s.len());
            s.bitmap().mark_dirty(0, k);
            left -= k;
        }
    }
    Some(result)
}

/// `writev` the frame in `segs` (checked to lie in `mem`) to the TAP.
fn write_frame(tap: &Tap, mem: &GuestMemoryMmap, segs: &[Segment]) -> io::Result<usize> {
    let mut slices = Vec::with_capacity(segs.len());
    for s in segs {
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            slices.push(slice.map_err(|e| io::Error::other(e.to_string()))?);
        }
    }
    let guards: Vec<_> = slices.iter().map(|s| (s.ptr_guard(), s.len())).collect();
    let iovs: Vec<libc::iovec> = guards
        .iter()
        .map(|(g, len)| libc::iovec {
            iov_base: g.as_ptr() as *mut libc::c_void,
            iov_len: *len,
        })
        .collect();
    // SAFETY: each iovec points into a mapped guest memory region (`get_slices` checked the
    // range), kept alive by `mem` and the pointer guards for the duration of the call.
    unsafe { tap.writev(&iovs) }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let [rx, tx] = take_queues(queues)?;
        let mut offload = 0;
        if acked_features & feature(VIRTIO_NET_F_GUEST_CSUM) != 0 {
            offload |= TUN_F_CSUM;
            if acked_features & feature(VIRTIO_NET_F_GUEST_TSO4) != 0 {
                offload |= TUN_F_TSO4;
            }
            if acked_features & feature(VIRTIO_NET_F_GUEST_TSO6) != 0 {
                offload |= TUN_F_TSO6;
            }
        }
        self.tap
            .set_offload(offload)
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        self.acked_features = acked_features;
        let mrg_rxbuf = acked_features & feature(VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.active = Some(Active::new(mem, rx, tx, interrupt, mrg_rxbuf));
        self.tx_blocked = false;
        // Frames may have queued up while the device was not running.
        self.tap_readable = true;
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => {
                self.process_tx();
                // Frames to the guest may be waiting too; cheap when none are.
                self.process_rx();
            }
            _ => {}
        }
    }

    fn take_unfinished(&mut self) -> u64 {
        std::mem::take(&mut self.unfinished)
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        let Some(a) = &self.active else {
            return Vec::new();
        };
        // Receive chains taken but not used yet are the last ones taken: give them back.
        let mut rx = QueuePosition::of(&a.rx);
        rx.next_avail = rx.next_avail.wrapping_sub(a.rx_chains.len() as u16);
        vec![rx, QueuePosition::of(&a.tx)]
    }

    fn reset(&mut self) {
        self.active = None;
        self.unfinished = 0;
        self.acked_features = 0;
        if self.rx_pending.take().is_some() {
            inc(&self.metrics.rx_dropped, 1);
        }
        self.rx_pending_charged = false;
        for limiter in [&mut self.rx_limiter, &mut self.tx_limiter]
            .into_iter()
            .flatten()
        {
            limiter.unblock();
        }
        self.tx_blocked = false;
        // No offloads for whatever reads the TAP's frames next.
        if let Err(e) = self.tap.set_offload(0) {
            // The driver resets the device as often as it likes.
            crate::guest_warn!("virtio-net: {e}");
        }
    }

    fn init_backend(&mut self, ops: &mut EventOps) {
        let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
        if let Err(e) = ops.add(Events::with_data_raw(self.tap.as_raw_fd(), TAP_EVENT, set)) {
            warn!(
                "virtio-net {}: cannot watch the TAP: {e:?}",
                self.tap.name()
            );
        }
        let name = format!("virtio-net {}", self.tap.name());
        crate::rate_limiter::watch_timer(&self.rx_limiter, ops, RX_LIMITER_EVENT, &name);
        crate::rate_limiter::watch_timer(&self.tx_limiter, ops, TX_LIMITER_EVENT, &name);
    }

    fn process_backend(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TAP_EVENT => self.tap_event(events.event_set()),
            RX_LIMITER_EVENT => {
                if let Some(l) = self.rx_limiter.as_mut() {
                    l.timer_fired();
                }
                self.process_rx();
            }
            TX_LIMITER_EVENT => {
                if let Some(l) = self.tx_limiter.as_mut() {
                    l.timer_fired();
                }
                self.process_tx();
            }
            _ => {}
        }
    }
}

/// The receive side's buffer accounting and frame delivery without a TAP, for the fuzz
/// targets: the same code the device runs for each frame it reads.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// What became of a frame handed to [`Receiver::deliver`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Outcome {
        Delivered,
        NoBuffers,
        TooBig,
    }

    /// An activated device's receive queue.
    pub struct Receiver {
        active: Active,
        metrics: NetMetrics,
    }

    impl Receiver {
        /// Receive into `rx` (configured and ready) in `mem`.
        pub fn new(
            mem: GuestMemoryMmap,
            rx: Queue,
            mrg_rxbuf: bool,
            interrupt: Arc<VirtioInterrupt>,
        ) -> Self {
            let tx = Queue::new(QUEUE_SIZE).expect("a valid queue size");
            Receiver {
                active: Active::new(mem, rx, tx, interrupt, mrg_rxbuf),
                metrics: NetMetrics::default(),
            }
        }

        /// Hand `frame` (virtio-net header first) to the guest as one receive pass does,
        /// then signal the used ring as the device does at the end of a pass.
        pub fn deliver(&mut self, frame: &mut [u8]) -> Outcome {
            self.active.rx_budget = MAX_CHAINS_PER_PASS;
            let outcome = match self.active.deliver(frame, &self.metrics) {
                Delivery::Delivered => Outcome::Delivered,
                Delivery::NoBuffers => Outcome::NoBuffers,
                Delivery::TooBig => Outcome::TooBig,
            };
            self.active.signal();
            outcome
        }

        /// Receive chains taken from the ring and not used yet.
        pub fn stashed(&self) -> usize {
            self.active.rx_chains.len()
        }

        /// The receive queue.
        pub fn queue(&self) -> &Queue {
            &self.active.rx
        }
    }
}

#[cfg(test)]
mod tests;
