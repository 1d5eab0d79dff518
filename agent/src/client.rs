//! The host side: connect to the guest agent through flint's vsock Unix socket and run
//! commands, copy files, or refresh a guest restored from a snapshot.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::part_file::PartFile;
use crate::protocol::{
    read_message, ExecSpec, FrameError, FromAgent, Message, ProtocolError, ToAgent, WindowSize,
    DATA_CHUNK,
};
use crate::stats::CgroupStats;

/// Why a client operation failed. Every message is one sentence.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the vsock socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("the guest agent did not answer on vsock port {port} within {} s ({last})", timeout.as_secs_f64())]
    Timeout {
        port: u32,
        timeout: Duration,
        last: String,
    },
    #[error("the vsock socket answered {0:?} to CONNECT instead of `OK <port>`")]
    Handshake(String),
    #[error("the connection to the guest agent failed: {0}")]
    Io(#[source] io::Error),
    #[error("the guest agent sent a malformed frame: {0}")]
    Protocol(#[source] ProtocolError),
    #[error("the request cannot be sent: {0}")]
    BadRequest(#[source] ProtocolError),
    #[error("the guest agent closed the connection unexpectedly")]
    Closed,
    #[error("the guest agent sent an unexpected {0} frame")]
    Unexpected(&'static str),
    /// The command never ran (not found, not executable, bad working directory...); the
    /// message is the agent's.
    #[error("{0}")]
    NotStarted(String),
    /// The agent reported a failure (of a copy or a refresh, or while a command ran); its
    /// message.
    #[error("{0}")]
    Remote(String),
    #[error("cannot read {}: {source}", path.display())]
    HostRead { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    HostWrite { path: PathBuf, source: io::Error },
    #[error("the path {} is not valid UTF-8", path.display())]
    NonUtf8Path { path: PathBuf },
    #[error("cannot write the command's output: {0}")]
    Output(#[source] io::Error),
    #[error("the connection to the guest agent is unusable after an earlier error")]
    Broken,
    #[error("cannot get random bytes from the host kernel: {0}")]
    HostRandom(#[source] io::Error),
    #[error("the guest agent did not answer the refresh within {} s", .0.as_secs_f64())]
    RefreshTimeout(Duration),
    /// The guest sent more than what was left of the copy-out byte budget; the host file
    /// was not written.
    #[error("copying {} out of the guest exceeds the copy-out limit of {limit} bytes, so {} was not written", guest.display(), host.display())]
    CopyOutTooLarge {
        guest: PathBuf,
        host: PathBuf,
        limit: u64,
    },
    /// The copy-outs did not finish by their deadline; the host file was not written.
    #[error("copying {} out of the guest did not finish within the copy-out deadline of {} s, so {} was not written", guest.display(), timeout.as_secs(), host.display())]
    CopyOutTimeout {
        guest: PathBuf,
        host: PathBuf,
        timeout: Duration,
    },
}

impl From<FrameError> for AgentError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => AgentError::Io(e),
            FrameError::Protocol(e) => AgentError::Protocol(e),
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStatus {
    /// It exited with this status.
    Exited(i32),
    /// A signal terminated it.
    Killed(i32),
}

impl CommandStatus {
    /// The status a shell would report: the exit status, or 128 + the signal number.
    pub fn code(&self) -> i32 {
        match *self {
            CommandStatus::Exited(code) => code,
            CommandStatus::Killed(signal) => 128 + signal,
        }
    }

    /// Exited with status 0.
    pub fn success(&self) -> bool {
        *self == CommandStatus::Exited(0)
    }
}

/// The writing half of a connection, shared by the client, its stdin forwarder and
/// [`Signaller`]s. Frames are written whole under the lock.
#[derive(Debug)]
struct Writer {
    stream: UnixStream,
    /// A command runs: stdin and signals may be sent.
    active: bool,
    /// Counts commands, so that the stdin forwarder of an earlier one never writes again.
    generation: u64,
}

type Shared = Arc<Mutex<Writer>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Writer> {
    // A panic while holding the lock leaves a consistent Writer: keep using it.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

fn send_on(writer: &mut Writer, msg: &ToAgent) -> Result<(), AgentError> {
    let frame = msg.encode().map_err(AgentError::BadRequest)?;
    writer.stream.write_all(&frame).map_err(AgentError::Io)
}

/// Sends signals to the command that a client runs, from any thread (e.g. a Ctrl-C handler).
#[derive(Debug, Clone)]
pub struct Signaller {
    shared: Shared,
}

impl Signaller {
    /// Send `signal` (1-64) to the running command's process group. Returns whether a
    /// command was running (when none is, nothing is sent).
    pub fn signal(&self, signal: i32) -> Result<bool, AgentError> {
        signal_on(&mut lock(&self.shared), signal)
    }

    /// Set the window size of the running command's terminal (the kernel sends it
    /// `SIGWINCH`). Returns whether a command was running (when none is, nothing is sent);
    /// a command without a terminal ignores it.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<bool, AgentError> {
        let mut w = lock(&self.shared);
        if !w.active {
            return Ok(false);
        }
        send_on(&mut w, &ToAgent::Resize(WindowSize { rows, cols }))?;
        Ok(true)
    }

    /// [`signal`](Self::signal), unless another thread is writing on the connection right
    /// now (a write the guest may never take): then nothing is sent and the result is
    /// `Ok(false)`. For callers that are about to tear the VM down anyway.
    pub fn try_signal(&self, signal: i32) -> Result<bool, AgentError> {
        let mut w = match self.shared.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
        };
        signal_on(&mut w, signal)
    }
}

/// Send `signal` if a command runs on the connection; whether one did.
fn signal_on(writer: &mut Writer, signal: i32) -> Result<bool, AgentError> {
    if !writer.active {
        return Ok(false);
    }
    send_on(writer, &ToAgent::Signal(signal))?;
    Ok(true)
}

/// What [`AgentClient::on_oom_kills`] calls.
pub type OomKillsHandler = Box<dyn FnMut(u64) + Send>;

/// A connection to the guest agent. Operations run one at a time; after a failure other
/// than [`AgentError::NotStarted`] or [`AgentError::Remote`] the connection is closed (which
/// kills a command still running) and later calls return [`AgentError::Broken`].
pub struct AgentClient {
    reader: BufReader<UnixStream>,
    shared: Shared,
    broken: bool,
    /// The guest directory the paths of copy-ins and copy-outs are inside of.
    root: Option<String>,
    /// Told of the OOM kills of a running command's container.
    on_oom_kills: Option<OomKillsHandler>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("reader", &self.reader)
            .field("broken", &self.broken)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// How many bytes of the host's entropy [`AgentClient::refresh`] sends.
pub const REFRESH_ENTROPY: usize = 64;

/// How long [`AgentClient::refresh`] waits for the agent's answer.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);

/// The default byte limit of a [`CopyOutBudget`]: 1 GiB.
pub const COPY_OUT_LIMIT: u64 = 1 << 30;

/// The default deadline of a [`CopyOutBudget`]: 10 minutes from its creation, time enough
/// for [`COPY_OUT_LIMIT`] at less than 2 MB/s.
pub const COPY_OUT_TIMEOUT: Duration = Duration::from_secs(600);

/// What copy-outs may still bring to the host: a number of bytes and a deadline, shared by
/// all the copy-outs given the same budget (those of one sandbox run). A guest is not
/// trusted to send files of sane sizes, or to send them at all.
#[derive(Debug, Clone)]
pub struct CopyOutBudget {
    limit: u64,
    bytes_left: u64,
    timeout: Duration,
    deadline: Instant,
}

impl CopyOutBudget {
    /// At most `limit` bytes in all, all within `timeout` from now.
    pub fn new(limit: u64, timeout: Duration) -> CopyOutBudget {
        CopyOutBudget {
            limit,
            bytes_left: limit,
            timeout,
            deadline: Instant::now() + timeout,
        }
    }

    /// How many bytes are left.
    pub fn bytes_left(&self) -> u64 {
        self.bytes_left
    }
}

impl Default for CopyOutBudget {
    /// [`COPY_OUT_LIMIT`] bytes within [`COPY_OUT_TIMEOUT`].
    fn default() -> Self {
        CopyOutBudget::new(COPY_OUT_LIMIT, COPY_OUT_TIMEOUT)
    }
}

/// The permission bits a file copied out of the guest gets on the host: `0o755` when the
/// guest file is executable by its owner, `0o644` otherwise, less the process's umask. The
/// guest's own mode is not applied: a guest must not hand the host set-id, sticky, group- or
/// world-writable files.
pub fn host_file_mode(guest_mode: u32) -> u32 {
    let base = if guest_mode & 0o100 != 0 {
        0o755
    } else {
        0o644
    };
    base & !process_umask()
}

/// The process's umask, from `/proc/self/status` (reading it with `umask(2)` would change
/// it for every thread meanwhile); `0o022` when that cannot be read.
fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let value = line.strip_prefix("Umask:")?.trim();
                u32::from_str_radix(value, 8).ok()
            })
        })
        .map_or(0o022, |mask| mask & 0o777)
}

/// Whether `c` prints as itself: not a control character, nor one of the invisible
/// formatting characters that reorder or hide text (bidirectional overrides, zero-width).
fn shown(c: char) -> bool {
    !c.is_control()
        && !matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Most characters of an agent's error message that are shown.
pub const AGENT_TEXT_MAX: usize = 512;

/// An error message from the guest agent made fit to print: at most [`AGENT_TEXT_MAX`]
/// characters, control characters (escape sequences, line breaks) replaced by `?`. The agent
/// is the guest's: it must not rewrite the user's terminal or forge lines of flint's.
pub fn agent_text(message: &str) -> String {
    let mut out: String = message
        .chars()
        .take(AGENT_TEXT_MAX)
        .map(|c| if shown(c) { c } else { '?' })
        .collect();
    if message.chars().nth(AGENT_TEXT_MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// How often [`AgentClient::connect`] retries while the guest boots and starts its agent.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// One connection attempt's failure: worth retrying or not.
pub(crate) enum Attempt {
    Retry(String),
    Fatal(AgentError),
}

impl AgentClient {
    /// Connect to the agent listening on vsock `port` of the VM whose vsock device has the
    /// Unix socket `uds_path` (`--vsock cid=N,uds=PATH`): send `CONNECT <port>` and wait for
    /// `OK`. Until `timeout` passes, a missing socket (flint still starting), a refused
    /// connection and a guest that closes the stream (no agent listening yet, the guest is
    /// booting) are retried every [`RETRY_INTERVAL`].
    pub fn connect(
        uds_path: &Path,
        port: u32,
        timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        Self::connect_retrying(port, timeout, |deadline| {
            Self::try_connect(uds_path, port, deadline)
        })
    }

    /// Make connection attempts (each given the overall deadline) until one succeeds, one
    /// fails for good, or `timeout` passes; [`RETRY_INTERVAL`] apart.
    pub(crate) fn connect_retrying(
        port: u32,
        timeout: Duration,
        mut attempt: impl FnMut(Instant) -> Result<UnixStream, Attempt>,
    ) -> Result<AgentClient, AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match attempt(deadline) {
                Ok(stream) => return AgentClient::from_stream(stream),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(why)) => why,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(AgentError::Timeout {
                    port,
                    timeout,
                    last,
                });
            }
            std::thread::sleep((deadline - now).min(RETRY_INTERVAL));
        }
    }

    fn try_connect(uds_path: &Path, port: u32, deadline: Instant) -> Result<UnixStream, Attempt> {
        let mut stream = match UnixStream::connect(uds_path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(Attempt::Retry(format!("last attempt: {e}")));
            }
            Err(source) => {
                return Err(Attempt::Fatal(AgentError::Connect {
                    path: uds_path.to_path_buf(),
                    source,
                }))
            }
        };
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let io_err = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                Attempt::Retry("the guest did not accept the connection in time".into())
            }
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                Attempt::Retry("the guest refused the connection; is the agent running?".into())
            }
            _ => Attempt::Fatal(AgentError::Io(e)),
        };
        let set = stream
            .set_read_timeout(Some(remaining))
            .and_then(|()| stream.set_write_timeout(Some(remaining)));
        set.map_err(io_err)?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(io_err)?;
        // Byte by byte: whatever follows the line belongs to the agent's stream.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match stream.read(&mut byte) {
                Ok(0) => {
                    return Err(Attempt::Retry(
                        "the guest refused the connection; is the agent running?".into(),
                    ))
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() < 64 => line.push(byte[0]),
                Ok(_) => {
                    return Err(Attempt::Fatal(AgentError::Handshake(
                        String::from_utf8_lossy(&line).into_owned(),
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        let ok = text
            .strip_prefix("OK ")
            .is_some_and(|p| p.trim().parse::<u32>().is_ok());
        if !ok {
            return Err(Attempt::Fatal(AgentError::Handshake(text)));
        }
        let clear = stream
            .set_read_timeout(None)
            .and_then(|()| stream.set_write_timeout(None));
        clear.map_err(|e| Attempt::Fatal(AgentError::Io(e)))?;
        Ok(stream)
    }

    /// A client on a stream already connected to the agent (after any handshake).
    pub fn from_stream(stream: UnixStream) -> Result<AgentClient, AgentError> {
        let write_half = stream.try_clone().map_err(AgentError::Io)?;
        Ok(AgentClient {
            reader: BufReader::with_capacity(256 * 1024, stream),
            shared: Arc::new(Mutex::new(Writer {
                stream: write_half,
                active: false,
                generation: 0,
            })),
            broken: false,
            root: None,
            on_oom_kills: None,
        })
    }

    /// Make the guest paths of later [`copy_in`](Self::copy_in) and
    /// [`copy_out`](Self::copy_out) calls paths inside the guest directory `root` (absolute,
    /// without `..`), resolved as a command run with [`ExecSpec::root`] sees them; `None`
    /// (the default) for the guest's own root. For a container image's sandbox the root is
    /// [`crate::protocol::IMAGE_ROOT`].
    pub fn set_root(&mut self, root: Option<&str>) {
        self.root = root.map(str::to_string);
    }

    /// Call `handler` with the cgroup's total of OOM kills whenever the agent reports that it
    /// rose while a command runs (a command of a container with a cgroup: see the protocol's
    /// *Cgroups of containers*); called on the thread that runs the command, before the
    /// command's end is returned. Without a handler the reports are dropped.
    pub fn on_oom_kills(&mut self, handler: OomKillsHandler) {
        self.on_oom_kills = Some(handler);
    }

    /// A handle that sends signals to the command [`run`](Self::run) is running.
    pub fn signaller(&self) -> Signaller {
        Signaller {
            shared: Arc::clone(&self.shared),
        }
    }

    fn send(&mut self, msg: &ToAgent) -> Result<(), AgentError> {
        send_on(&mut lock(&self.shared), msg)
    }

    fn recv(&mut self) -> Result<FromAgent, AgentError> {
        match read_message::<FromAgent, _>(&mut self.reader)? {
            Some(msg) => Ok(msg),
            None => Err(AgentError::Closed),
        }
    }

    /// Close the connection for good (both halves, whoever else holds a handle on it).
    fn poison(&mut self) {
        self.broken = true;
        let mut w = lock(&self.shared);
        w.active = false;
        let _ = w.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Run an operation; poison the connection if it failed in a way that leaves the stream
    /// in an unknown state.
    fn guarded<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        if self.broken {
            return Err(AgentError::Broken);
        }
        let result = op(self);
        match &result {
            Ok(_)
            | Err(
                AgentError::NotStarted(_)
                | AgentError::Remote(_)
                | AgentError::BadRequest(_)
                | AgentError::NonUtf8Path { .. },
            ) => {}
            Err(_) => self.poison(),
        }
        result
    }

    /// Run a command in the guest: its stdout and stderr are written to `stdout` and
    /// `stderr` as they arrive (each flushed after every chunk; the two stay separate and in
    /// order), `stdin` (if any) is forwarded until its end, then the command's stdin is
    /// closed (immediately when `stdin` is `None`). Returns how the command ended.
    ///
    /// With a terminal ([`ExecSpec::terminal`]), everything the command writes (and the
    /// terminal's echo of its input) arrives on `stdout`, nothing on `stderr`, and the end
    /// of `stdin` types the terminal's end of file (see the protocol's *Terminals*);
    /// [`Signaller::resize`] changes its window size.
    ///
    /// `stdin` is read on a thread of its own that is not joined: it ends at the next read
    /// that returns after the command has finished (that chunk is dropped) or when the
    /// connection closes. Output is never buffered beyond one chunk, so any amount flows.
    pub fn run<I>(
        &mut self,
        spec: &ExecSpec,
        stdin: Option<I>,
        stdout: impl Write,
        stderr: impl Write,
    ) -> Result<CommandStatus, AgentError>
    where
        I: Read + Send + 'static,
    {
        self.guarded(|c| c.run_inner(spec, stdin, stdout, stderr, &mut |_| {}))
    }

    /// [`run`](Self::run), calling `started` with the command's process id in the guest once
    /// it runs (before any of its output is written).
    pub fn run_and_tell<I>(
        &mut self,
        spec: &ExecSpec,
        stdin: Option<I>,
        stdout: impl Write,
        stderr: impl Write,
        started: &mut dyn FnMut(u32),
    ) -> Result<CommandStatus, AgentError>
    where
        I: Read + Send + 'static,
    {
        self.guarded(|c| c.run_inner(spec, stdin, stdout, stderr, started))
    }

    fn run_inner<I>(
        &mut self,
        spec: &ExecSpec,
        stdin: Option<I>,
        mut stdout: impl Write,
        mut stderr: impl Write,
        started: &mut dyn FnMut(u32),
    ) -> Result<CommandStatus, AgentError>
    where
        I: Read + Send + 'static,
    {
        let exec = ToAgent::Exec(spec.clone());
        exec.encode().map_err(AgentError::BadRequest)?;
        self.send(&exec)?;
        let pid = match self.recv()? {
            FromAgent::Started { pid } => pid,
            FromAgent::Error(message) => return Err(AgentError::NotStarted(agent_text(&message))),
            other => return Err(unexpected(&other)),
        };
        let generation = {
            let mut w = lock(&self.shared);
            w.active = true;
            w.generation += 1;
            w.generation
        };
        // Signals sent from now on reach the command.
        started(pid);
        match stdin {
            None => self.send(&ToAgent::StdinEof)?,
            Some(input) => {
                let shared = Arc::clone(&self.shared);
                std::thread::Builder::new()
                    .name("agent-stdin".into())
                    .spawn(move || forward_stdin(input, &shared, generation))
                    .map_err(AgentError::Io)?;
            }
        }
        let status = loop {
            match self.recv()? {
                FromAgent::Stdout(data) => stdout
                    .write_all(&data)
                    .and_then(|()| stdout.flush())
                    .map_err(AgentError::Output)?,
                FromAgent::Stderr(data) => stderr
                    .write_all(&data)
                    .and_then(|()| stderr.flush())
                    .map_err(AgentError::Output)?,
                FromAgent::Exited { code } => break CommandStatus::Exited(code),
                FromAgent::Killed { signal } => break CommandStatus::Killed(signal),
                FromAgent::OomKills { count } => {
                    if let Some(handler) = &mut self.on_oom_kills {
                        handler(count);
                    }
                }
                FromAgent::Error(message) => return Err(AgentError::Remote(agent_text(&message))),
                other => return Err(unexpected(&other)),
            }
        };
        lock(&self.shared).active = false;
        Ok(status)
    }

    /// Copy the host file `host_path` to `guest_path` (absolute; parent directories are
    /// created, an existing file is replaced), with the same permission bits.
    pub fn copy_in(&mut self, host_path: &Path, guest_path: &Path) -> Result<(), AgentError> {
        let guest = utf8(guest_path)?;
        let host_read = |source| AgentError::HostRead {
            path: host_path.to_path_buf(),
            source,
        };
        let mut file = File::open(host_path).map_err(host_read)?;
        let meta = file.metadata().map_err(host_read)?;
        if meta.is_dir() {
            return Err(host_read(io::Error::from(io::ErrorKind::IsADirectory)));
        }
        let header = ToAgent::CopyIn {
            path: guest.to_string(),
            mode: meta.permissions().mode() & 0o7777,
            root: self.root.clone(),
        };
        header.encode().map_err(AgentError::BadRequest)?;
        self.guarded(|c| {
            c.send(&header)?;
            let mut buf = vec![0u8; DATA_CHUNK];
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // The agent cannot be told to abandon the file: closing the connection
                    // (guarded) makes it discard the partial copy.
                    Err(e) => return Err(host_read(e)),
                };
                c.send(&ToAgent::FileData(buf[..n].to_vec()))?;
            }
            c.send(&ToAgent::FileEnd)?;
            match c.recv()? {
                FromAgent::Ok => Ok(()),
                FromAgent::Error(message) => Err(AgentError::Remote(agent_text(&message))),
                other => Err(unexpected(&other)),
            }
        })
    }

    /// Copy the guest file `guest_path` (absolute, a regular file) to `host_path` (parent
    /// directories are created, an existing file is replaced) within the default
    /// [`CopyOutBudget`]; see [`copy_out_within`](Self::copy_out_within).
    pub fn copy_out(&mut self, guest_path: &Path, host_path: &Path) -> Result<(), AgentError> {
        self.copy_out_within(guest_path, host_path, &mut CopyOutBudget::default())
    }

    /// Copy the guest file `guest_path` (absolute, a regular file) to `host_path` (parent
    /// directories are created, an existing file is replaced). The host file appears
    /// complete or not at all.
    ///
    /// The guest is not trusted with the host file: its mode is chosen by
    /// [`host_file_mode`] (never set-id, sticky, group- or world-writable), and the bytes
    /// count against `budget`, whose byte limit and deadline are shared by all the
    /// copy-outs given the same budget. Going over either fails the copy
    /// ([`AgentError::CopyOutTooLarge`], [`AgentError::CopyOutTimeout`]), removes the partial
    /// file and closes the connection.
    pub fn copy_out_within(
        &mut self,
        guest_path: &Path,
        host_path: &Path,
        budget: &mut CopyOutBudget,
    ) -> Result<(), AgentError> {
        let request = ToAgent::CopyOut {
            path: utf8(guest_path)?.to_string(),
            root: self.root.clone(),
        };
        request.encode().map_err(AgentError::BadRequest)?;
        let result = self.guarded(|c| c.copy_out_inner(&request, guest_path, host_path, budget));
        let stream = self.reader.get_ref();
        let _ = stream.set_read_timeout(None);
        let _ = stream.set_write_timeout(None);
        result
    }

    fn copy_out_inner(
        &mut self,
        request: &ToAgent,
        guest_path: &Path,
        host_path: &Path,
        budget: &mut CopyOutBudget,
    ) -> Result<(), AgentError> {
        let timed_out = || AgentError::CopyOutTimeout {
            guest: guest_path.to_path_buf(),
            host: host_path.to_path_buf(),
            timeout: budget.timeout,
        };
        // Every read and write on the connection waits at most until the deadline.
        let arm = |c: &Self| -> Result<(), AgentError> {
            let left = budget.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            let stream = c.reader.get_ref();
            stream
                .set_read_timeout(Some(left))
                .and_then(|()| stream.set_write_timeout(Some(left)))
                .map_err(AgentError::Io)
        };
        let is_timeout = |e: &AgentError| {
            matches!(e, AgentError::Io(e) if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ))
        };
        arm(self)?;
        self.send(request)
            .map_err(|e| if is_timeout(&e) { timed_out() } else { e })?;
        let mut part: Option<PartFile> = None;
        let mut failed: Option<io::Error> = None;
        loop {
            arm(self)?;
            let msg = self
                .recv()
                .map_err(|e| if is_timeout(&e) { timed_out() } else { e })?;
            if let FromAgent::FileData(data) = &msg {
                let len = data.len() as u64;
                if len > budget.bytes_left {
                    // Dropping `part` removes the partial file.
                    return Err(AgentError::CopyOutTooLarge {
                        guest: guest_path.to_path_buf(),
                        host: host_path.to_path_buf(),
                        limit: budget.limit,
                    });
                }
                budget.bytes_left -= len;
            }
            if matches!(msg, FromAgent::FileData(_) | FromAgent::FileEnd { .. })
                && part.is_none()
                && failed.is_none()
            {
                match PartFile::create(host_path) {
                    Ok(p) => part = Some(p),
                    Err(e) => failed = Some(e),
                }
            }
            match msg {
                FromAgent::FileData(data) => {
                    if let (Some(p), None) = (&mut part, &failed) {
                        if let Err(e) = p.write_all(&data) {
                            // Keep reading to the end of the file, so that the
                            // connection stays usable, then report this.
                            failed = Some(e);
                        }
                    }
                }
                FromAgent::FileEnd { mode } => {
                    let result = match (part.take(), failed) {
                        (Some(p), None) => p.commit(host_file_mode(mode)),
                        (_, Some(e)) => Err(e),
                        (None, None) => unreachable!("the part file is created first"),
                    };
                    return result.map_err(|source| AgentError::HostWrite {
                        path: host_path.to_path_buf(),
                        source,
                    });
                }
                FromAgent::Error(message) => return Err(AgentError::Remote(agent_text(&message))),
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// Set the guest's wall clock (`CLOCK_REALTIME`) to the host's current time and reseed
    /// the guest kernel's random number generator with [`REFRESH_ENTROPY`] bytes from the
    /// host's `getrandom(2)`. Every guest restored from a snapshot wakes up with the
    /// snapshot's time and the same random state as its siblings: call this first, before
    /// anything runs in it. Returns once the agent has done both; a failure in the guest is
    /// [`AgentError::Remote`] (the connection stays usable, but the guest should not be
    /// trusted with untrusted code).
    pub fn refresh(&mut self) -> Result<(), AgentError> {
        self.refresh_within(REFRESH_TIMEOUT)
    }

    /// [`refresh`](Self::refresh), giving the agent `timeout` to answer: a guest that froze
    /// must not keep the host waiting forever.
    pub fn refresh_within(&mut self, timeout: Duration) -> Result<(), AgentError> {
        let stream = self.reader.get_ref();
        stream
            .set_read_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        let result = self.refresh_now();
        let _ = self.reader.get_ref().set_read_timeout(None);
        match result {
            Err(AgentError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(AgentError::RefreshTimeout(timeout))
            }
            other => other,
        }
    }

    fn refresh_now(&mut self) -> Result<(), AgentError> {
        let mut entropy = vec![0u8; REFRESH_ENTROPY];
        host_random(&mut entropy).map_err(AgentError::HostRandom)?;
        // A clock before the epoch becomes 0, which the encoder refuses as a broken clock.
        let unix_time_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let request = ToAgent::Refresh {
            unix_time_ns,
            entropy,
        };
        request.encode().map_err(AgentError::BadRequest)?;
        self.guarded(|c| {
            c.send(&request)?;
            match c.recv()? {
                FromAgent::Ok => Ok(()),
                FromAgent::Error(message) => Err(AgentError::Remote(agent_text(&message))),
                other => Err(unexpected(&other)),
            }
        })
    }

    /// Mount the pod container `id`'s root from the guest disk `disk` (`size` bytes, just
    /// swapped in by the host); see the protocol's *Containers of a pod*.
    pub fn mount_container(&mut self, id: &str, disk: &str, size: u64) -> Result<(), AgentError> {
        self.request_ok(
            &ToAgent::MountContainer {
                id: id.to_string(),
                disk: disk.to_string(),
                size,
            },
            crate::protocol::DISK_WAIT + CONTAINER_REQUEST_MARGIN,
        )
    }

    /// Unmount the pod container `id`'s root (its processes should have ended).
    pub fn unmount_container(&mut self, id: &str) -> Result<(), AgentError> {
        self.request_ok(
            &ToAgent::UnmountContainer { id: id.to_string() },
            CONTAINER_REQUEST_MARGIN,
        )
    }

    /// Make (or update) container `id`'s cgroup in the guest with these limits (bytes,
    /// processes; `None`: no limit); with `image_root`, the commands run in the image's root
    /// join it. See the protocol's *Cgroups of containers*.
    pub fn container_cgroup(
        &mut self,
        id: &str,
        image_root: bool,
        memory_max: Option<u64>,
        pids_max: Option<u64>,
    ) -> Result<(), AgentError> {
        self.request_ok(
            &ToAgent::ContainerCgroup {
                id: id.to_string(),
                image_root,
                memory_max,
                pids_max,
            },
            CONTAINER_REQUEST_MARGIN,
        )
    }

    /// The numbers of container `id`'s cgroup in the guest, answered within `timeout`
    /// (checked as [`CgroupStats`] are when decoded: see the protocol).
    pub fn container_stats(
        &mut self,
        id: &str,
        timeout: Duration,
    ) -> Result<CgroupStats, AgentError> {
        let request = ToAgent::ContainerStats { id: id.to_string() };
        request.encode().map_err(AgentError::BadRequest)?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        let result = self.guarded(|c| {
            c.send(&request)?;
            match c.recv()? {
                FromAgent::ContainerStats(stats) => Ok(*stats),
                FromAgent::Error(message) => Err(AgentError::Remote(agent_text(&message))),
                other => Err(unexpected(&other)),
            }
        });
        let _ = self.reader.get_ref().set_read_timeout(None);
        result
    }

    /// Send `request`, which the agent answers `Ok` or `Error`, within `timeout`.
    fn request_ok(&mut self, request: &ToAgent, timeout: Duration) -> Result<(), AgentError> {
        request.encode().map_err(AgentError::BadRequest)?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        let result = self.guarded(|c| {
            c.send(request)?;
            match c.recv()? {
                FromAgent::Ok => Ok(()),
                FromAgent::Error(message) => Err(AgentError::Remote(agent_text(&message))),
                other => Err(unexpected(&other)),
            }
        });
        let _ = self.reader.get_ref().set_read_timeout(None);
        result
    }

    /// Ask the agent to sync and reboot the guest, which ends the VM (flint exits 0 with the
    /// default `reboot=k`). Returns once the agent has acknowledged (or the connection went
    /// away with the guest); wait for the flint process itself to know the VM is gone.
    pub fn shutdown(mut self) -> Result<(), AgentError> {
        self.guarded(|c| {
            c.send(&ToAgent::Shutdown)?;
            match c.recv() {
                Ok(FromAgent::Ok) | Err(AgentError::Closed) => Ok(()),
                Err(AgentError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
                Ok(FromAgent::Error(message)) => Err(AgentError::Remote(agent_text(&message))),
                Ok(other) => Err(unexpected(&other)),
                Err(e) => Err(e),
            }
        })
    }
}

/// How long the agent gets for a container's mount or unmount (beyond the wait for the
/// disk).
const CONTAINER_REQUEST_MARGIN: Duration = Duration::from_secs(20);

/// Fill `buf` from the host kernel's random number generator (`getrandom(2)`, blocking
/// until it is initialised).
fn host_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, exclusively borrowed buffer of the length passed for
        // the duration of the call; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        // A stdin forwarder may still hold the write half: make sure the agent sees the
        // connection end now (it kills a command still running).
        let _ = lock(&self.shared).stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The stdin forwarder thread of command `generation`.
fn forward_stdin(mut input: impl Read, shared: &Shared, generation: u64) {
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // An unreadable input ends like an empty one.
            Err(_) => 0,
        };
        let mut w = lock(shared);
        if !w.active || w.generation != generation {
            return;
        }
        let msg = if n == 0 {
            ToAgent::StdinEof
        } else {
            ToAgent::Stdin(buf[..n].to_vec())
        };
        if send_on(&mut w, &msg).is_err() || n == 0 {
            return;
        }
    }
}

fn unexpected(msg: &FromAgent) -> AgentError {
    AgentError::Unexpected(match msg {
        FromAgent::Started { .. } => "Started",
        FromAgent::Stdout(_) => "Stdout",
        FromAgent::Stderr(_) => "Stderr",
        FromAgent::Exited { .. } => "Exited",
        FromAgent::Killed { .. } => "Killed",
        FromAgent::Error(_) => "Error",
        FromAgent::FileData(_) => "FileData",
        FromAgent::FileEnd { .. } => "FileEnd",
        FromAgent::Ok => "Ok",
        FromAgent::ContainerStats(_) => "ContainerStats",
        FromAgent::OomKills { .. } => "OomKills",
    })
}

fn utf8(path: &Path) -> Result<&str, AgentError> {
    path.to_str().ok_or_else(|| AgentError::NonUtf8Path {
        path: path.to_path_buf(),
    })
}
