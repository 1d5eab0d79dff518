//! virtio-vsock (virtio 1.2 section 5.10) with the guest's streams mapped to Unix sockets on
//! the host:
//!
//! - Host to guest: a host program connects to the device's socket (`uds_path`) and sends
//!   `CONNECT <port>\n`; the device opens a stream to guest port `<port>` from a host port it
//!   allocates (counting up from [`FIRST_HOST_PORT`]). When the guest accepts, the program
//!   reads `OK <host port>\n` and the socket carries the stream; when the guest refuses, the
//!   socket is closed.
//! - Guest to host: a guest connecting to CID 2 port `P` makes the device connect to the Unix
//!   socket `<uds_path>_P`.
//!
//! Every stream has its own credit in both directions: the device never sends the guest more
//! than it has room for, and buffers at most what it advertised for data on its way to a slow
//! host socket. Host sockets are non-blocking and watched edge-triggered on the VMM's event
//! loop; socket registrations made while serving a queue notification (which has no access
//! to the event loop) are handed to the loop through an internal eventfd.
//!
//! Everything the guest sends is hostile input, and what it can make the host hold or do is
//! bounded:
//! - at most [`MAX_CONNECTIONS`] (128) connections, each buffering at most
//!   [`conn::CONN_BUF_ALLOC`] (256 KiB) towards the host and [`conn::FROM_HOST_MAX`] (64 KiB)
//!   towards the guest: [`MAX_BUFFERED_BYTES`] (40 MiB) per device;
//! - at most [`MAX_CONTROL_PACKETS`] (1024) resets waiting for receive buffers (more are
//!   dropped and counted);
//! - at most [`MAX_TX_CHAINS_PER_PASS`] / [`MAX_RX_CHAINS_PER_PASS`] (64) chains per pass over
//!   a queue, one packet (at most 64 KiB of payload) held at a time; a pass that stops with
//!   work left is continued from the internal eventfd, so the loop serves other devices in
//!   between and the work is finished without another guest notification;
//! - [`Timeouts`] (10 s each) for a host connection the guest does not answer, a connection
//!   whose last bytes do not move once neither side sends, and a host connection held back
//!   after a restore until the guest handles the transport reset.

pub mod conn;
pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::guest_warn;
use event_manager::{EventOps, Events};
use log::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::chain::{pop_chain, segments, write_segments, ChainError, Direction, Segment};
use super::{
    feature, take_queues, ActivateError, QueuePosition, VirtioDevice, VirtioInterrupt,
    BACKEND_EVENT_BASE, VIRTIO_F_VERSION_1, VIRTIO_ID_VSOCK,
};
use conn::{ConnError, Connection, State};
use packet::{
    check_guest_header, parse_connect_line, rst_for, Header, Op, HDR_LEN, MAX_PAYLOAD, OP_RST,
};

/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indexes.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// The only vsock event (`struct virtio_vsock_event`'s id): the host dropped every connection.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// The first host port handed out for host-initiated connections.
pub const FIRST_HOST_PORT: u32 = 1024;
/// Longest `CONNECT <port>\n` line accepted from a host program.
pub const MAX_CONNECT_LINE: usize = 64;
/// Most host programs that connected and have not had their connection opened yet (no
/// `CONNECT` line yet, or held back until the guest handled a transport reset).
pub const MAX_PENDING_HOST: usize = 256;
/// Most connections at once, in both directions together. A guest connection beyond it is
/// reset, a host program beyond it closed.
pub const MAX_CONNECTIONS: usize = 128;
/// The most the device ever buffers for its connections: each holds at most
/// [`conn::CONN_BUF_ALLOC`] bytes on their way to the host (the credit it advertises to the
/// guest) and [`conn::FROM_HOST_MAX`] bytes on their way to the guest. 40 MiB.
pub const MAX_BUFFERED_BYTES: usize =
    MAX_CONNECTIONS * (conn::CONN_BUF_ALLOC as usize + conn::FROM_HOST_MAX);
/// Most control packets (resets) waiting for a guest receive buffer. Resets beyond it are
/// dropped and counted (`control_dropped`): a guest that reads nothing cannot make the device
/// hold more. A dropped reset answered a packet for a connection that does not exist; the
/// guest's next packet on it is answered again.
pub const MAX_CONTROL_PACKETS: usize = 1024;
/// Transmit chains taken per pass. When a pass ends with more waiting, the device carries on
/// from its own event-loop wakeup (not a guest notification), so other devices get their
/// turn in between and a vCPU that keeps refilling the queue cannot hold the loop.
pub const MAX_TX_CHAINS_PER_PASS: u16 = 64;
/// Receive chains filled per pass (continued the same way).
pub const MAX_RX_CHAINS_PER_PASS: u16 = 64;
/// Host programs accepted per listener event (the listener is level-triggered: the rest are
/// accepted on the next round of the loop).
const MAX_ACCEPTS_PER_EVENT: usize = 64;

/// How long a connection may sit in a state only the other side can end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A host program's connection waiting for its `CONNECT` line, or for the guest's answer
    /// to the request (from the moment the line arrived). Then the host socket is closed (and
    /// the guest sent a reset).
    pub connect: Duration,
    /// A connection neither side sends on any more whose last bytes the host program does not
    /// read: reset after this long without progress.
    pub shutdown: Duration,
    /// A host program's connection held back after a snapshot restore until the guest has
    /// handled the transport reset: closed if the guest has not done so in this time.
    pub deferred: Duration,
}

impl Default for Timeouts {
    /// 10 s each.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            shutdown: Duration::from_secs(10),
            deferred: Duration::from_secs(10),
        }
    }
}

const LISTENER_EVENT: u32 = BACKEND_EVENT_BASE;
const WAKE_EVENT: u32 = BACKEND_EVENT_BASE + 1;
const TIMER_EVENT: u32 = BACKEND_EVENT_BASE + 2;
const FIRST_SOCKET_EVENT: u32 = BACKEND_EVENT_BASE + 3;

/// Why a vsock device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("the guest CID {0} is reserved; use a CID from 3 to 4294967294")]
    InvalidCid(u64),
    #[error("the vsock socket path {} is in use by another program", .0.display())]
    InUse(PathBuf),
    #[error("the vsock socket path {} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot listen on the vsock socket {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot create the vsock device's wakeup eventfd: {0}")]
    EventFd(io::Error),
    #[error("cannot create the vsock device's timer: {0}")]
    Timer(io::Error),
    #[error("cannot look at the vsock socket {} after binding it: {source}", path.display())]
    Stat { path: PathBuf, source: io::Error },
}

/// Counters, shared with whoever reports metrics.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets put in the guest's receive queue.
    pub rx_packets: AtomicU64,
    /// Payload bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Packets taken from the guest's transmit queue.
    pub tx_packets: AtomicU64,
    /// Payload bytes from the guest accepted for host sockets.
    pub tx_bytes: AtomicU64,
    /// Malformed transmit chains or packets, dropped (and reset when they name a connection).
    pub malformed: AtomicU64,
    /// Unusable receive chains, returned empty.
    pub rx_errors: AtomicU64,
    /// Resets sent to the guest.
    pub resets_sent: AtomicU64,
    /// Connections established (either direction).
    pub connections_opened: AtomicU64,
    /// Connections removed.
    pub connections_closed: AtomicU64,
    /// Guest connections to `<uds_path>_<port>` that failed.
    pub connect_failures: AtomicU64,
    /// Host programs that sent no valid `CONNECT <port>` line.
    pub bad_connect_lines: AtomicU64,
    /// Guests that sent more than their credit.
    pub credit_violations: AtomicU64,
    /// Host socket errors that reset a connection.
    pub host_errors: AtomicU64,
    /// Resets for the guest dropped because [`MAX_CONTROL_PACKETS`] were already waiting.
    pub control_dropped: AtomicU64,
    /// Connections refused because [`MAX_CONNECTIONS`] were open (or, for host programs,
    /// [`MAX_PENDING_HOST`] waited).
    pub connections_refused: AtomicU64,
    /// Connections ended by one of the [`Timeouts`].
    pub timeouts: AtomicU64,
}

fn inc(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A connection's key: (host-side port, guest port).
pub type Key = (u32, u32);

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

/// Connect to the Unix socket at `path` without blocking (a full backlog fails at once).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: all-zero is a valid `sockaddr_un`.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised `sockaddr_un` of the length passed, alive for the call.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// A host program that connected and has not sent its `CONNECT` line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// A host program whose `CONNECT` arrived while the guest may still reset its connections.
struct Deferred {
    id: u32,
    stream: UnixStream,
    port: u32,
    /// Bytes after the line.
    early: Vec<u8>,
    since: Instant,
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
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// The socket file's (device, inode) as bound: removed on drop only if still the same.
    socket_file: (u64, u64),
    config: [u8; 8],
    active: Option<Active>,
    conns: HashMap<Key, (u32, Connection<UnixStream>)>,
    /// Event-loop data value -> connection.
    by_event: HashMap<u32, Key>,
    pending: HashMap<u32, PendingHost>,
    /// Resets for connections that do not exist (anymore).
    ctrl: VecDeque<Header>,
    next_event: u32,
    next_host_port: u32,
    /// Sockets to add to the event loop, and sockets to remove from it (kept open until then).
    to_register: Vec<(u32, RawFd)>,
    to_unregister: Vec<UnixStream>,
    wake: EventFd,
    backend_started: bool,
    /// A transport-reset event waits for a buffer on the event queue.
    event_pending: bool,
    /// The transport-reset event was sent and the driver has not yet handed the event queue
    /// a new buffer, which Linux does only once it has reset its connections. Until then host
    /// programs' connections wait in `deferred`: opened earlier, the guest could accept one
    /// and then reset it with the stale ones.
    reset_unacked: bool,
    /// The event queue's available index when the reset was sent.
    reset_sent_avail: u16,
    /// Host programs whose `CONNECT` arrived while `reset_unacked`.
    deferred: Vec<Deferred>,
    /// A transmit or receive pass stopped at its budget with work left: carry on from the
    /// wakeup eventfd.
    tx_more: bool,
    rx_more: bool,
    /// Ticks while anything could time out.
    timer: TimerFd,
    timer_armed: bool,
    timeouts: Timeouts,
    scratch: Vec<u8>,
    metrics: Arc<VsockMetrics>,
}

impl Vsock {
    /// A vsock device for a guest with CID `guest_cid`, listening for host programs at
    /// `uds_path`. A stale socket file there is replaced; the file is removed on drop.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if !(3..=u64::from(u32::MAX - 1)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotASocket(uds_path.to_path_buf()));
            }
            if UnixStream::connect(uds_path).is_ok() {
                return Err(VsockError::InUse(uds_path.to_path_buf()));
            }
            // Nobody listens: a leftover from an earlier run.
            let _ = std::fs::remove_file(uds_path);
        }
        let bind_err = |source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let wake = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        // SAFETY: fcntl on a descriptor the timer owns; only its status flags change.
        let ret = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if ret < 0 {
            return Err(VsockError::Timer(io::Error::last_os_error()));
        }
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        let ready = listener
            .set_nonblocking(true)
            .map_err(bind_err)
            .and_then(|()| {
                std::fs::symlink_metadata(uds_path)
                    .map(|m| (m.dev(), m.ino()))
                    .map_err(|source| VsockError::Stat {
                        path: uds_path.to_path_buf(),
                        source,
                    })
            });
        let socket_file = match ready {
            Ok(file) => file,
            Err(e) => {
                let _ = std::fs::remove_file(uds_path);
                return Err(e);
            }
        };
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            socket_file,
            listener,
            config: guest_cid.to_le_bytes(),
            active: None,
            conns: HashMap::new(),
            by_event: HashMap::new(),
            pending: HashMap::new(),
            ctrl: VecDeque::new(),
            next_event: FIRST_SOCKET_EVENT,
            next_host_port: FIRST_HOST_PORT,
            event_pending: false,
            reset_unacked: false,
            reset_sent_avail: 0,
            deferred: Vec::new(),
            tx_more: false,
            rx_more: false,
            timer,
            timer_armed: false,
            timeouts: Timeouts::default(),
            to_register: Vec::new(),
            to_unregister: Vec::new(),
            wake,
            backend_started: false,
            scratch: vec![0; 16 * 1024],
            metrics: Arc::new(VsockMetrics::default()),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Where host programs connect.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The counters; the handle stays valid for the device's lifetime.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Use `timeouts` instead of [`Timeouts::default`] (for connections made from now on, and
    /// for the timer's next arming).
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
        // Re-arm with the new tick.
        if self.timer_armed {
            self.timer_armed = false;
            let _ = self.timer.clear();
        }
        self.update_timer();
    }

    fn alloc_event(&mut self) -> u32 {
        loop {
            let id = self.next_event;
            self.next_event = self.next_event.checked_add(1).unwrap_or(FIRST_SOCKET_EVENT);
            if !self.by_event.contains_key(&id) && !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    fn alloc_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .filter(|&p| p != u32::MAX)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&(port, guest_port)) {
                return port;
            }
        }
    }

    /// Watch `stream` (already non-blocking) under `id`.
    fn watch(&mut self, id: u32, stream: &UnixStream) {
        self.to_register.push((id, stream.as_raw_fd()));
    }

    /// Stop watching `stream` (registered under `id`) and close it once the loop let go.
    fn unwatch(&mut self, id: u32, stream: UnixStream) {
        if let Some(i) = self.to_register.iter().position(|&(e, _)| e == id) {
            // Never registered: just close it.
            self.to_register.swap_remove(i);
        } else {
            self.to_unregister.push(stream);
        }
    }

    /// Apply pending registration changes to the event loop.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for (id, fd) in self.to_register.drain(..) {
            let set =
                EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(fd, id, set)) {
                warn!("virtio-vsock: cannot watch a host socket: {e:?}");
            }
        }
        for stream in self.to_unregister.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&stream)) {
                debug!("virtio-vsock: cannot unwatch a host socket: {e:?}");
            }
        }
    }

    /// Ask the event loop to apply registration changes made outside it, or to carry on with
    /// a transmit or receive pass that stopped at its budget. Also (dis)arm the timer.
    fn wake_loop(&mut self) {
        let registrations = !(self.to_register.is_empty() && self.to_unregister.is_empty());
        if self.backend_started && (registrations || self.tx_more || self.rx_more) {
            let _ = self.wake.write(1);
        }
        self.update_timer();
    }

    /// The timer ticks while anything could time out, at a quarter of the shortest timeout.
    fn update_timer(&mut self) {
        let want = !(self.conns.is_empty() && self.pending.is_empty() && self.deferred.is_empty());
        if want == self.timer_armed {
            return;
        }
        let result = if want {
            let t = &self.timeouts;
            let tick =
                (t.connect.min(t.shutdown).min(t.deferred) / 4).max(Duration::from_millis(1));
            self.timer.reset(tick, Some(tick))
        } else {
            self.timer.clear()
        };
        match result {
            Ok(()) => self.timer_armed = want,
            Err(e) => warn!("virtio-vsock: cannot set the connection timer: {e}"),
        }
    }

    /// End whatever has waited longer than its timeout at `now`. The timer calls this with the
    /// current time; tests and fuzzing pass a later one.
    #[doc(hidden)]
    pub fn expire_at(&mut self, now: Instant) {
        let t = self.timeouts;
        let m = self.metrics.clone();
        let stale: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= t.connect)
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            if let Some(p) = self.pending.remove(&id) {
                debug!("virtio-vsock: a host program sent no CONNECT line in time");
                inc(&m.timeouts, 1);
                self.unwatch(id, p.stream);
            }
        }
        let (expired, kept): (Vec<Deferred>, Vec<Deferred>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|d| now.saturating_duration_since(d.since) >= t.deferred);
        self.deferred = kept;
        for d in expired {
            guest_warn!(
                "virtio-vsock: the guest did not handle the transport reset in {:?}; closing a \
                 host connection to port {}",
                t.deferred,
                d.port
            );
            inc(&m.timeouts, 1);
            self.unwatch(d.id, d.stream);
        }
        let keys: Vec<Key> = self
            .conns
            .iter_mut()
            .filter_map(|(&k, (_, c))| c.expired(now, t.connect, t.shutdown).then_some(k))
            .collect();
        for key in keys {
            debug!("virtio-vsock: connection {key:?} timed out");
            inc(&m.timeouts, 1);
            self.remove_conn(key, true);
        }
        self.fill_rx();
    }

    /// Forget connection `key`; with `rst`, tell the guest.
    fn remove_conn(&mut self, key: Key, rst: bool) {
        let Some((id, conn)) = self.conns.remove(&key) else {
            return;
        };
        self.by_event.remove(&id);
        if rst {
            self.queue_rst(key);
        }
        inc(&self.metrics.connections_closed, 1);
        self.unwatch(id, conn.stream);
    }

    fn queue_rst(&mut self, (local, peer): Key) {
        self.push_ctrl(Header::to_guest(self.guest_cid, local, peer, OP_RST));
    }

    /// Queue a control packet for the guest, unless [`MAX_CONTROL_PACKETS`] already wait.
    fn push_ctrl(&mut self, hdr: Header) {
        if self.ctrl.len() >= MAX_CONTROL_PACKETS {
            inc(&self.metrics.control_dropped, 1);
            guest_warn!(
                "virtio-vsock: {MAX_CONTROL_PACKETS} resets wait for guest receive buffers; \
                 dropping another"
            );
            return;
        }
        self.ctrl.push_back(hdr);
    }

    /// Accept every waiting host program.
    fn accept_all(&mut self) {
        for _ in 0..MAX_ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() + self.deferred.len() >= MAX_PENDING_HOST
                        || self.conns.len() >= MAX_CONNECTIONS
                    {
                        debug!("virtio-vsock: refusing a host connection (too many)");
                        inc(&self.metrics.connections_refused, 1);
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let id = self.alloc_event();
                    self.watch(id, &stream);
                    self.pending.insert(
                        id,
                        PendingHost {
                            stream,
                            line: Vec::new(),
                            since: Instant::now(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!(
                        "virtio-vsock: accept on {} failed: {e}",
                        self.uds_path.display()
                    );
                    break;
                }
            }
        }
    }

    /// Read a pending host program's `CONNECT` line; open the connection when it is complete.
    fn serve_pending(&mut self, id: u32) {
        let Some(mut p) = self.pending.remove(&id) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        loop {
            match p.stream.read(&mut buf) {
                Ok(0) => {
                    debug!("virtio-vsock: host program left before CONNECT");
                    self.unwatch(id, p.stream);
                    return;
                }
                Ok(n) => {
                    p.line.extend_from_slice(&buf[..n]);
                    if let Some(nl) = p.line.iter().position(|&b| b == b'\n') {
                        let port = parse_connect_line(&p.line[..nl]);
                        match port {
                            Some(port) if self.event_pending || self.reset_unacked => {
                                self.deferred.push(Deferred {
                                    id,
                                    stream: p.stream,
                                    port,
                                    early: p.line[nl + 1..].to_vec(),
                                    since: Instant::now(),
                                });
                            }
                            Some(port) if self.conns.len() < MAX_CONNECTIONS => {
                                let early = p.line[nl + 1..].to_vec();
                                self.open_host_initiated(id, p.stream, port, &early);
                            }
                            Some(_) => {
                                debug!("virtio-vsock: refusing a host connection (too many)");
                                inc(&self.metrics.connections_refused, 1);
                                self.unwatch(id, p.stream);
                            }
                            None => {
                                inc(&self.metrics.bad_connect_lines, 1);
                                self.unwatch(id, p.stream);
                            }
                        }
                        return;
                    }
                    if p.line.len() > MAX_CONNECT_LINE {
                        inc(&self.metrics.bad_connect_lines, 1);
                        self.unwatch(id, p.stream);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.unwatch(id, p.stream);
                    return;
                }
            }
        }
        self.pending.insert(id, p);
    }

    fn open_host_initiated(&mut self, id: u32, stream: UnixStream, port: u32, early: &[u8]) {
        let local = self.alloc_host_port(port);
        let conn = Connection::host_initiated(stream, self.guest_cid, local, port, early);
        self.conns.insert((local, port), (id, conn));
        self.by_event.insert(id, (local, port));
    }

    /// A host socket of connection `key` reported `set`.
    fn socket_event(&mut self, key: Key, set: EventSet) {
        if let Some((_, c)) = self.conns.get_mut(&key) {
            if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                c.host_readable = true;
            }
            if set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                c.host_writable = true;
            }
            if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                c.host_hup = true;
                c.host_readable = true;
            }
        }
        self.service(Some(key));
    }

    /// Move data between host sockets and connection buffers (for one connection or all),
    /// then fill the guest's receive queue.
    fn service(&mut self, only: Option<Key>) {
        let keys: Vec<Key> = match only {
            Some(k) => vec![k],
            None => self.conns.keys().copied().collect(),
        };
        for key in keys {
            self.service_conn(key);
        }
        self.fill_rx();
    }

    fn service_conn(&mut self, key: Key) {
        let Some((_, c)) = self.conns.get_mut(&key) else {
            return;
        };
        let mut result = c.flush_to_host();
        if result.is_ok() && c.take_host_write_shutdown() {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if result.is_ok() && c.state == State::Established {
            result = c.fill_from_host(&mut self.scratch);
        }
        let finished = c.finished();
        match result {
            Err(e) => {
                debug!("virtio-vsock: connection {key:?}: {e}");
                inc(&self.metrics.host_errors, 1);
                self.remove_conn(key, true);
            }
            Ok(()) if finished => {
                // The guest closed and its data reached the host: acknowledge with a reset.
                self.remove_conn(key, true);
            }
            Ok(()) => {}
        }
    }

    /// Handle one packet from the guest.
    fn handle_guest_packet(&mut self, hdr: Header, payload: &[u8]) {
        let m = self.metrics.clone();
        let op = match check_guest_header(&hdr, self.guest_cid) {
            Ok(op) => op,
            Err(e) => {
                debug!("virtio-vsock: malformed packet: {e}");
                inc(&m.malformed, 1);
                if e.wants_rst(&hdr) {
                    self.push_ctrl(rst_for(&hdr, self.guest_cid));
                }
                return;
            }
        };
        let key = (hdr.dst_port, hdr.src_port);
        if op == Op::Request {
            if self.conns.contains_key(&key) {
                debug!("virtio-vsock: request for existing connection {key:?}");
                inc(&m.malformed, 1);
                self.remove_conn(key, true);
                return;
            }
            self.open_guest_initiated(&hdr);
            return;
        }
        let Some((_, c)) = self.conns.get_mut(&key) else {
            if op != Op::Rst {
                debug!("virtio-vsock: {op:?} for unknown connection {key:?}");
                inc(&m.malformed, 1);
                self.push_ctrl(rst_for(&hdr, self.guest_cid));
            }
            return;
        };
        c.update_peer_credit(&hdr);
        let result = match op {
            Op::Rst => {
                self.remove_conn(key, false);
                return;
            }
            Op::Response if c.state == State::Connecting => {
                c.on_response(&hdr);
                inc(&m.connections_opened, 1);
                Ok(())
            }
            Op::Response | Op::Request => Err(ConnError::NotEstablished),
            Op::Rw => c.on_guest_data(payload).inspect(|()| {
                inc(&m.tx_bytes, payload.len() as u64);
            }),
            Op::Shutdown { rcv, send } => {
                c.on_guest_shutdown(rcv, send);
                Ok(())
            }
            Op::CreditUpdate => Ok(()),
            Op::CreditRequest => {
                c.on_credit_request();
                Ok(())
            }
        };
        match result {
            Ok(()) => self.service_conn(key),
            Err(e) => {
                debug!("virtio-vsock: resetting connection {key:?}: {e}");
                if matches!(e, ConnError::CreditExceeded { .. }) {
                    inc(&m.credit_violations, 1);
                } else {
                    inc(&m.malformed, 1);
                }
                self.remove_conn(key, true);
            }
        }
    }

    fn open_guest_initiated(&mut self, hdr: &Header) {
        let m = self.metrics.clone();
        let key = (hdr.dst_port, hdr.src_port);
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        if self.conns.len() >= MAX_CONNECTIONS {
            guest_warn!(
                "virtio-vsock: the guest has {MAX_CONNECTIONS} connections; resetting another"
            );
            inc(&m.connections_refused, 1);
            self.queue_rst(key);
            return;
        }
        let stream = connect_nonblocking(Path::new(&path));
        match stream {
            Ok(stream) => {
                let id = self.alloc_event();
                self.watch(id, &stream);
                let conn = Connection::guest_initiated(stream, self.guest_cid, hdr);
                self.conns.insert(key, (id, conn));
                self.by_event.insert(id, key);
                inc(&m.connections_opened, 1);
            }
            Err(e) => {
                debug!(
                    "virtio-vsock: guest connection to {} failed: {e}",
                    Path::new(&path).display()
                );
                inc(&m.connect_failures, 1);
                self.queue_rst(key);
            }
        }
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
                    self.handle_guest_packet(hdr, &payload);
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
        let mut ready: VecDeque<Key> = self
            .conns
            .iter()
            .filter(|(_, (_, c))| c.has_packet())
            .map(|(k, _)| *k)
            .collect();
        let mut used = false;
        let mut finished = Vec::new();
        let mut taken = 0;
        self.rx_more = false;
        while !self.ctrl.is_empty() || !ready.is_empty() {
            if taken == MAX_RX_CHAINS_PER_PASS {
                self.rx_more = true;
                break;
            }
            taken += 1;
            let Some(chain) = pop_chain(&mut active.rx, &mem) else {
                break;
            };
            let head = chain.head_index();
            let (segs, capacity) = match rx_segments(&mem, chain) {
                Some(found) => found,
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
            let packet = if let Some(hdr) = self.ctrl.pop_front() {
                if hdr.op == OP_RST {
                    inc(&m.resets_sent, 1);
                }
                Some((hdr, Vec::new()))
            } else {
                let mut out = None;
                while let Some(key) = ready.pop_front() {
                    let Some((_, c)) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    let Some(o) = c.next_packet(capacity - HDR_LEN) else {
                        continue;
                    };
                    if o.last {
                        finished.push(key);
                    } else {
                        // Keep the host data coming while the guest has room.
                        if c.fill_from_host(&mut self.scratch).is_err() {
                            c.host_hup = true;
                        }
                        if c.has_packet() {
                            ready.push_back(key);
                        }
                    }
                    out = Some((o.hdr, o.payload));
                    break;
                }
                out
            };
            let Some((hdr, payload)) = packet else {
                // Nothing to send after all: give the buffer back to the ring.
                let next = active.rx.next_avail().wrapping_sub(1);
                active.rx.set_next_avail(next);
                break;
            };
            let mut bytes = Vec::with_capacity(HDR_LEN + payload.len());
            bytes.extend_from_slice(&hdr.to_bytes());
            bytes.extend_from_slice(&payload);
            if !write_segments(&mem, &segs, &bytes) {
                inc(&m.rx_errors, 1);
            }
            inc(&m.rx_packets, 1);
            inc(&m.rx_bytes, payload.len() as u64);
            // At most HDR_LEN + MAX_PAYLOAD.
            if let Err(e) = active.rx.add_used(&mem, head, bytes.len() as u32) {
                guest_warn!("virtio-vsock: cannot return a receive buffer: {e}");
                break;
            }
            used = true;
        }
        if used && active.rx.needs_notification(&mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        for key in finished {
            self.remove_conn(key, false);
        }
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
        for d in std::mem::take(&mut self.deferred) {
            if self.conns.len() < MAX_CONNECTIONS {
                self.open_host_initiated(d.id, d.stream, d.port, &d.early);
            } else {
                inc(&self.metrics.connections_refused, 1);
                self.unwatch(d.id, d.stream);
            }
        }
        self.service(None);
    }

    /// Drop every connection (the driver reset the device).
    fn drop_all(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key, false);
        }
        for d in std::mem::take(&mut self.deferred) {
            self.unwatch(d.id, d.stream);
        }
        self.reset_unacked = false;
        self.ctrl.clear();
    }
}

/// The device-writable descriptors of a receive chain, with room for a header.
fn rx_segments(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
) -> Option<(Vec<Segment>, usize)> {
    match segments(mem, chain, Direction::DeviceWrites, u64::MAX) {
        // Guest memory is addressable, so its size fits in `usize`.
        Ok((segs, total)) if total >= HDR_LEN as u64 => Some((segs, total as usize)),
        _ => None,
    }
}

impl Drop for Vsock {
    /// Remove the socket file, unless another program has put its own file there since.
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.uds_path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.socket_file);
        if ours {
            let _ = std::fs::remove_file(&self.uds_path);
        }
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
        if let Err(e) = ops.add(Events::with_data(
            &self.listener,
            LISTENER_EVENT,
            EventSet::IN,
        )) {
            warn!(
                "virtio-vsock: cannot watch {}: {e:?}",
                self.uds_path.display()
            );
        }
        if let Err(e) = ops.add(Events::with_data(&self.wake, WAKE_EVENT, EventSet::IN)) {
            warn!("virtio-vsock: cannot watch the wakeup eventfd: {e:?}");
        }
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER_EVENT, EventSet::IN)) {
            warn!("virtio-vsock: cannot watch the connection timer: {e:?}");
        }
        self.backend_started = true;
        self.sync_registrations(ops);
    }

    fn process_backend(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            LISTENER_EVENT => self.accept_all(),
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
            TIMER_EVENT => {
                let _ = self.timer.wait();
                self.expire_at(Instant::now());
            }
            id => {
                if self.pending.contains_key(&id) {
                    self.serve_pending(id);
                    // The CONNECT line may have opened a connection.
                    if let Some(&key) = self.by_event.get(&id) {
                        self.service(Some(key));
                    }
                } else if let Some(&key) = self.by_event.get(&id) {
                    self.socket_event(key, events.event_set());
                }
            }
        }
        self.sync_registrations(ops);
        self.wake_loop();
    }
}

#[cfg(test)]
mod tests;
