//! The API server: one thread that serves HTTP/1.1 on a Unix socket with epoll and non-blocking
//! connections, each with its own buffers, so that a slow or stalled client never holds up
//! another. Each request is routed, sent to the VMM thread with a reply channel, and answered
//! when the VMM thread replies.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http::{self, Framing, MAX_BODY, MAX_HEAD};
use super::routes::{Reply, Routed};
use super::{routes, ApiRequest};

/// Where the API sends requests, each with the channel for the VMM thread's answer (already
/// in HTTP terms, see [`routes::reply_for`]).
pub type VmmSender = Sender<(ApiRequest, Sender<Reply>)>;

/// Most connections served at once; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 64;
/// A connection with a partial request or an unsent answer that makes no progress for this
/// long is closed.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Stop reading from a connection while this much input is buffered (one largest request).
/// What a connection buffers at most for a body limit of `max_body`: one request and a byte.
fn read_limit(max_body: usize) -> usize {
    MAX_HEAD + max_body + 1
}
/// Stop answering a connection's pipelined requests while this much output is unsent.
const WRITE_LIMIT: usize = 64 * 1024;
/// How often a request waiting for the VMM thread checks whether the server is stopping.
const STOP_POLL: Duration = Duration::from_millis(100);

const TOKEN_LISTENER: u64 = 0;
const TOKEN_STOP: u64 = 1;
const FIRST_CONNECTION: u64 = 2;

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the API socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("the API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot create the API socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot start the API server: {0}")]
    Setup(io::Error),
}

/// The running API server; dropping it stops it too.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket file we created, to remove only that file.
    socket_id: (u64, u64),
    stopping: Arc<AtomicBool>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Make `path` free for a new socket: remove a stale socket file, refuse a live one or a file
/// that is not a socket.
fn free_path(path: &Path) -> Result<(), ApiError> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Bind {
                path: path.into(),
                source,
            })
        }
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.into()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse(path.into())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::debug!("removing the stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ApiError::Bind {
                path: path.into(),
                source,
            })
        }
        Err(source) => Err(ApiError::Bind {
            path: path.into(),
            source,
        }),
    }
}

impl ApiServer {
    /// Bind `path` and serve on a new thread named "api". Each routed request is sent on
    /// `requests` with a reply channel; `wake` is written after each send so that the VMM
    /// thread's epoll wakes up.
    pub fn start(path: &Path, requests: VmmSender, wake: EventFd) -> Result<ApiServer, ApiError> {
        ApiServer::start_with_max_body(path, requests, wake, MAX_BODY)
    }

    /// [`ApiServer::start`], accepting request bodies of up to `max_body` bytes.
    pub fn start_with_max_body(
        path: &Path,
        requests: VmmSender,
        wake: EventFd,
        max_body: usize,
    ) -> Result<ApiServer, ApiError> {
        free_path(path)?;
        let bind_err = |source| ApiError::Bind {
            path: path.into(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let socket_id = std::fs::metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(bind_err)?;
        let server = ApiServer {
            path: path.into(),
            socket_id,
            stopping: Arc::new(AtomicBool::new(false)),
            stop: EventFd::new(EFD_NONBLOCK).map_err(ApiError::Setup)?,
            thread: None,
        };
        // From here on, dropping `server` removes the socket file.
        let mut server = server;
        listener.set_nonblocking(true).map_err(ApiError::Setup)?;
        let epoll = Epoll::new().map_err(ApiError::Setup)?;
        for (fd, token) in [
            (listener.as_raw_fd(), TOKEN_LISTENER),
            (server.stop.as_raw_fd(), TOKEN_STOP),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(ApiError::Setup)?;
        }
        let worker = Worker {
            max_body,
            epoll,
            listener,
            conns: HashMap::new(),
            next_token: FIRST_CONNECTION,
            vmm: Vmm {
                requests,
                wake,
                stopping: server.stopping.clone(),
            },
        };
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::api().install() {
                    log::error!("{e}; the API is not served");
                    return;
                }
                worker.run()
            })
            .map_err(ApiError::Setup)?;
        server.thread = Some(thread);
        Ok(server)
    }

    /// Stop serving and remove the socket file.
    pub fn stop(self) {
        drop(self)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                log::warn!("cannot stop the API server: {e}");
            } else if thread.join().is_err() {
                log::warn!("the API server thread panicked");
            }
        }
        // Remove the socket only if it is still the one we created.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.socket_id {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    log::warn!("cannot remove the API socket {}: {e}", self.path.display());
                }
            }
        }
    }
}

/// The way to the VMM thread.
struct Vmm {
    requests: VmmSender,
    wake: EventFd,
    stopping: Arc<AtomicBool>,
}

impl Vmm {
    /// Send `request` and wait for the answer; never hangs when the VMM thread is gone or the
    /// server is stopping.
    fn ask(&self, request: ApiRequest) -> Reply {
        let (tx, rx) = mpsc::channel();
        if self.requests.send((request, tx)).is_err() {
            return Reply::fault(503, "the VMM is not running");
        }
        if let Err(e) = self.wake.write(1) {
            log::warn!("cannot wake the VMM thread: {e}");
        }
        loop {
            match rx.recv_timeout(STOP_POLL) {
                Ok(reply) => return reply,
                Err(RecvTimeoutError::Disconnected) => {
                    return Reply::fault(503, "the VMM stopped before answering")
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        return Reply::fault(503, "flint is shutting down");
                    }
                }
            }
        }
    }

    fn handle(&self, req: &http::Parsed) -> Reply {
        let reply = match routes::route(&req.method, &req.path, &req.body) {
            Routed::Reply(reply) => reply,
            Routed::Forward(request) => self.ask(request),
        };
        log::debug!("api: {} {} -> {}", req.method, req.path, reply.status);
        reply
    }
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    /// The largest request body accepted.
    max_body: usize,
    input: Vec<u8>,
    output: Vec<u8>,
    /// The client will send nothing more.
    eof: bool,
    /// Close once `output` is sent (framing error or `Connection: close`).
    closing: bool,
    /// `100 Continue` was sent for the request being received.
    continued: bool,
    /// The connection failed; drop it.
    broken: bool,
    /// The answer is sent and our side shut down; what the client still sends is read and
    /// discarded until it closes, so that the answer is not lost to a reset.
    draining: bool,
    last_progress: Instant,
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, max_body: usize) -> Conn {
        Conn {
            stream,
            max_body,
            input: Vec::new(),
            output: Vec::new(),
            eof: false,
            closing: false,
            continued: false,
            broken: false,
            draining: false,
            last_progress: Instant::now(),
            interest: EventSet::IN | EventSet::READ_HANG_UP,
        }
    }

    /// Read what the client sent, up to [`read_limit`] buffered bytes.
    fn read(&mut self) {
        let mut chunk = [0u8; 8192];
        while !self.eof && self.input.len() < read_limit(self.max_body) {
            match self.stream.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    if !self.draining {
                        self.input.extend_from_slice(&chunk[..n]);
                    }
                    self.last_progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.broken = true;
                    break;
                }
            }
        }
    }

    /// Answer the complete requests in the input buffer, while the output is not backed up.
    fn process(&mut self, vmm: &Vmm) {
        while !self.closing && self.output.len() < WRITE_LIMIT {
            match http::frame_limited(&self.input, self.max_body) {
                Framing::Incomplete { expect_continue } => {
                    if expect_continue && !self.continued {
                        self.output.extend_from_slice(http::CONTINUE);
                        self.continued = true;
                    }
                    break;
                }
                Framing::Invalid(reply) => {
                    log::debug!("api: refused a request: {}", reply.status);
                    http::encode(&reply, true, &mut self.output);
                    self.closing = true;
                    self.input.clear();
                }
                Framing::Complete(req) => {
                    self.input.drain(..req.len);
                    self.continued = false;
                    let reply = vmm.handle(&req);
                    http::encode(&reply, !req.keep_alive, &mut self.output);
                    self.closing = !req.keep_alive;
                }
            }
        }
        if self.input.is_empty() && self.input.capacity() > read_limit(self.max_body) {
            self.input = Vec::new();
        }
    }

    /// Send what can be sent without blocking.
    fn flush(&mut self) {
        while !self.output.is_empty() {
            // SAFETY: sends from a live buffer of the given length on our own socket;
            // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    self.output.as_ptr().cast(),
                    self.output.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                self.output.drain(..n as usize);
                self.last_progress = Instant::now();
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => break,
                io::ErrorKind::Interrupted => {}
                _ => {
                    self.broken = true;
                    break;
                }
            }
        }
        if self.output.is_empty() && self.output.capacity() > WRITE_LIMIT {
            self.output = Vec::new();
        }
    }

    /// Once a closing connection's answer is sent, shut down our side and drain the client's
    /// unread bytes instead of closing at once: closing a socket with unread input resets it,
    /// and the client could lose the answer (e.g. a 413 for a body it is still sending).
    fn start_draining(&mut self) {
        if self.closing && self.output.is_empty() && !self.eof && !self.broken && !self.draining {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.draining = true;
            self.input.clear();
        }
    }

    /// Whether the connection is finished and should be dropped.
    fn done(&self) -> bool {
        self.broken || (self.output.is_empty() && (self.eof || (self.closing && !self.draining)))
    }

    /// Whether a partial request, an unsent answer or a draining client is waiting.
    fn pending(&self) -> bool {
        !self.input.is_empty() || !self.output.is_empty() || self.draining
    }

    fn wanted_events(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.draining {
            return EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !self.eof && !self.closing && self.input.len() < read_limit(self.max_body) {
            events |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !self.output.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }
}

/// The server thread's state.
struct Worker {
    /// The largest request body accepted.
    max_body: usize,
    epoll: Epoll,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    next_token: u64,
    vmm: Vmm,
}

impl Worker {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let timeout = if self.conns.values().any(Conn::pending) {
                1000
            } else {
                -1
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("the API server stopped: epoll failed: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return,
                    TOKEN_LISTENER => self.accept(),
                    token => self.serve(token),
                }
            }
            self.close_stalled();
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("api: cannot accept a connection: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let mut conn = Conn::new(stream, self.max_body);
            if self.conns.len() >= MAX_CONNECTIONS {
                let reply = Reply::fault(
                    503,
                    format!("too many connections (at most {MAX_CONNECTIONS})"),
                );
                http::encode(&reply, true, &mut conn.output);
                conn.flush();
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            let event = EpollEvent::new(conn.interest, token);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, conn.stream.as_raw_fd(), event)
            {
                log::warn!("api: cannot watch a connection: {e}");
                continue;
            }
            self.conns.insert(token, conn);
        }
    }

    /// Read, answer and write on one connection, then drop it or update what to wait for.
    fn serve(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.read();
        while !conn.draining {
            let before = conn.input.len();
            conn.process(&self.vmm);
            conn.flush();
            if conn.input.len() == before || !conn.output.is_empty() || conn.closing {
                break;
            }
        }
        conn.start_draining();
        if conn.done() {
            self.conns.remove(&token);
            return;
        }
        let wanted = conn.wanted_events();
        if wanted != conn.interest {
            conn.interest = wanted;
            let event = EpollEvent::new(wanted, token);
            if self
                .epoll
                .ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), event)
                .is_err()
            {
                self.conns.remove(&token);
            }
        }
    }

    /// Drop connections whose client stopped halfway through a request or stopped reading.
    fn close_stalled(&mut self) {
        self.conns.retain(|_, c| {
            let stalled = c.pending() && c.last_progress.elapsed() > STALL_TIMEOUT;
            if stalled {
                log::debug!("api: closing a stalled connection");
            }
            !stalled
        });
    }
}
