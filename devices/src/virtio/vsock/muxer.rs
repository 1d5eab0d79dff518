//! The host side of virtio-vsock: which guest stream is which host socket, host programs
//! waiting to be connected, resets waiting for the guest, and the limits and timeouts that
//! bound what a guest can make the host hold (listed in the `vsock` module documentation).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events};
use log::{debug, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{self, ConnError, Connection, PacketWriter, State};
use super::packet::{check_guest_header, parse_connect_line, rst_for, Header, Op, OP_RST};
use super::{inc, Key, VsockError, VsockMetrics, FIRST_SOCKET_EVENT, LISTENER_EVENT, TIMER_EVENT};
use crate::guest_warn;

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
pub(super) struct Deferred {
    id: u32,
    stream: UnixStream,
    port: u32,
    /// Bytes after the line.
    early: Vec<u8>,
    since: Instant,
}

/// The host side of a vsock device: the connection table, the host programs waiting to be
/// connected, the control packets (resets) waiting for the guest, and the limits and timeouts
/// on all of them. It knows nothing of queues: the device ([`super::Vsock`]) hands it the
/// guest's packets and asks it for packets for the guest.
pub(super) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// The socket file's (device, inode) as bound: removed on drop only if still the same.
    socket_file: (u64, u64),
    pub(super) conns: HashMap<Key, (u32, Connection<UnixStream>)>,
    /// Event-loop data value -> connection.
    by_event: HashMap<u32, Key>,
    pending: HashMap<u32, PendingHost>,
    /// Resets for connections that do not exist (anymore).
    pub(super) ctrl: VecDeque<Header>,
    next_event: u32,
    next_host_port: u32,
    /// Sockets to add to the event loop, and sockets to remove from it (kept open until then).
    to_register: Vec<(u32, RawFd)>,
    to_unregister: Vec<UnixStream>,
    /// Host programs' connections are held back in `deferred` (see
    /// [`Muxer::hold_host_connections`]).
    hold: bool,
    /// Host programs whose `CONNECT` arrived while `hold`.
    pub(super) deferred: Vec<Deferred>,
    /// Ticks while anything could time out.
    timer: TimerFd,
    timer_armed: bool,
    timeouts: Timeouts,
    metrics: Arc<VsockMetrics>,
}

/// One pass over the guest's receive buffers.
pub(super) struct RxPass {
    /// Connections that may have a packet, in turn.
    ready: VecDeque<Key>,
    /// Connections whose last packet went out: removed when the pass ends.
    finished: Vec<Key>,
}

impl Muxer {
    /// A muxer for a guest with CID `guest_cid`, listening for host programs at `uds_path`,
    /// counting in `metrics`. A stale socket file there is replaced; the file is removed on
    /// drop.
    pub(super) fn new(
        guest_cid: u64,
        uds_path: &Path,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Muxer, VsockError> {
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
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            socket_file,
            listener,
            conns: HashMap::new(),
            by_event: HashMap::new(),
            pending: HashMap::new(),
            ctrl: VecDeque::new(),
            next_event: FIRST_SOCKET_EVENT,
            next_host_port: FIRST_HOST_PORT,
            hold: false,
            deferred: Vec::new(),
            timer,
            timer_armed: false,
            timeouts: Timeouts::default(),
            to_register: Vec::new(),
            to_unregister: Vec::new(),
            metrics,
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

    /// Whether sockets wait to be added to or removed from the event loop.
    pub(super) fn has_registration_changes(&self) -> bool {
        !(self.to_register.is_empty() && self.to_unregister.is_empty())
    }

    /// Apply pending registration changes to the event loop.
    pub(super) fn sync_registrations(&mut self, ops: &mut EventOps) {
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

    /// The timer ticks while anything could time out, at a quarter of the shortest timeout.
    pub(super) fn update_timer(&mut self) {
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

    /// End whatever has waited longer than its timeout at `now`.
    pub(super) fn expire_at(&mut self, now: Instant) {
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
    }

    /// Forget connection `key`; with `rst`, tell the guest (unless it already forgot it).
    fn remove_conn(&mut self, key: Key, rst: bool) {
        let Some((id, conn)) = self.conns.remove(&key) else {
            return;
        };
        self.by_event.remove(&id);
        if rst && !conn.guest_gone() {
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
                            Some(port) if self.hold => {
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

    /// A host socket of connection `key` reported `set`: note what it can do now.
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
    }

    /// Move data between host sockets and connection buffers (for one connection or all).
    pub(super) fn service(&mut self, only: Option<Key>) {
        let keys: Vec<Key> = match only {
            Some(k) => vec![k],
            None => self.conns.keys().copied().collect(),
        };
        for key in keys {
            self.service_conn(key);
        }
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
            result = c.fill_from_host();
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
    pub(super) fn handle_guest_packet(&mut self, hdr: Header, payload: &[u8]) {
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
            if self.conns.get(&key).is_some_and(|(_, c)| c.guest_gone()) {
                // The guest reused the ports of a connection it reset while the device still
                // wrote its last bytes to the host: the new connection wins.
                debug!("virtio-vsock: a new connection {key:?} ends an old one's last writes");
                self.remove_conn(key, false);
            } else if self.conns.contains_key(&key) {
                debug!("virtio-vsock: request for existing connection {key:?}");
                inc(&m.malformed, 1);
                self.remove_conn(key, true);
                return;
            }
            self.open_guest_initiated(&hdr);
            return;
        }
        let Some((_, c)) = self.conns.get_mut(&key).filter(|(_, c)| !c.guest_gone()) else {
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
                // See `Connection::on_guest_reset`: data sent before the guest's shutdown
                // still goes to the host.
                if c.on_guest_reset() {
                    debug!("virtio-vsock: connection {key:?} reset after its shutdown; flushing");
                    self.service_conn(key);
                } else {
                    self.remove_conn(key, false);
                }
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

    /// Start a pass over the guest's receive buffers: the connections with something to send.
    pub(super) fn rx_pass(&self) -> RxPass {
        RxPass {
            ready: self
                .conns
                .iter()
                .filter(|(_, (_, c))| c.has_packet())
                .map(|(k, _)| *k)
                .collect(),
            finished: Vec::new(),
        }
    }

    /// Whether the pass may still have a packet for the guest.
    pub(super) fn has_for_guest(&self, pass: &RxPass) -> bool {
        !self.ctrl.is_empty() || !pass.ready.is_empty()
    }

    /// The next packet for the guest, with at most `max_payload` payload bytes: a waiting
    /// control packet first, then the connections of the pass in turn. The packet is handed
    /// to `write` (its header, and its payload as two slices) and returned.
    pub(super) fn next_for_guest(
        &mut self,
        pass: &mut RxPass,
        max_payload: usize,
        write: &mut PacketWriter<'_>,
    ) -> Option<Header> {
        if let Some(hdr) = self.ctrl.pop_front() {
            if hdr.op == OP_RST {
                inc(&self.metrics.resets_sent, 1);
            }
            write(&hdr, &[], &[]);
            return Some(hdr);
        }
        while let Some(key) = pass.ready.pop_front() {
            let Some((_, c)) = self.conns.get_mut(&key) else {
                continue;
            };
            let Some(o) = c.next_packet(max_payload, write) else {
                continue;
            };
            if o.last {
                pass.finished.push(key);
            } else {
                // Keep the host data coming while the guest has room (a read once half the
                // buffer is free).
                if c.fill_from_host().is_err() {
                    c.host_hup = true;
                }
                if c.has_packet() {
                    pass.ready.push_back(key);
                }
            }
            return Some(o.hdr);
        }
        None
    }

    /// End a pass: forget the connections whose last packet it delivered.
    pub(super) fn end_rx_pass(&mut self, pass: RxPass) {
        for key in pass.finished {
            self.remove_conn(key, false);
        }
    }

    /// Hold host programs' new connections back (in `deferred`) until [`Muxer::release_held`]:
    /// the guest was sent, or is about to be sent, a transport reset and could otherwise
    /// accept a connection and then reset it with the stale ones.
    pub(super) fn hold_host_connections(&mut self) {
        self.hold = true;
    }

    /// The guest handled the transport reset: open the host connections that waited.
    pub(super) fn release_held(&mut self) {
        self.hold = false;
        for d in std::mem::take(&mut self.deferred) {
            if self.conns.len() < MAX_CONNECTIONS {
                self.open_host_initiated(d.id, d.stream, d.port, &d.early);
            } else {
                inc(&self.metrics.connections_refused, 1);
                self.unwatch(d.id, d.stream);
            }
        }
    }

    /// Drop every connection, and every host connection held back.
    pub(super) fn drop_all(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key, false);
        }
        for d in std::mem::take(&mut self.deferred) {
            self.unwatch(d.id, d.stream);
        }
        self.hold = false;
        self.ctrl.clear();
    }

    /// Register the listener and the timer with the event loop.
    pub(super) fn init_backend(&mut self, ops: &mut EventOps) {
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
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER_EVENT, EventSet::IN)) {
            warn!("virtio-vsock: cannot watch the connection timer: {e:?}");
        }
    }

    /// One of the muxer's event sources (the listener, the timer, a host socket; event-loop
    /// data `id`) reported `set`. Returns whether the guest may now have packets to receive.
    pub(super) fn process_event(&mut self, id: u32, set: EventSet) -> bool {
        match id {
            LISTENER_EVENT => {
                self.accept_all();
                false
            }
            TIMER_EVENT => {
                let _ = self.timer.wait();
                self.expire_at(Instant::now());
                true
            }
            id => {
                if self.pending.contains_key(&id) {
                    self.serve_pending(id);
                    // The CONNECT line may have opened a connection.
                    match self.by_event.get(&id) {
                        Some(&key) => {
                            self.service(Some(key));
                            true
                        }
                        None => false,
                    }
                } else if let Some(&key) = self.by_event.get(&id) {
                    self.socket_event(key, set);
                    self.service(Some(key));
                    true
                } else {
                    false
                }
            }
        }
    }
}

impl Drop for Muxer {
    /// Remove the socket file, unless another program has put its own file there since.
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.uds_path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.socket_file);
        if ours {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}
