//! `flint-agent`: the guest side of flint's sandbox mode.
//!
//! Listens on vsock port [`AGENT_PORT`] (any CID) and serves each connection on a thread of
//! its own (see [`flint_agent::protocol`] for what a connection carries). Commands run in
//! their own process group with the default environment plus the requested variables, their
//! stdout and stderr are streamed back as they are produced, and they are killed (the whole
//! process group) if the host connection drops while they run. Diagnostics go to the kernel
//! log (`/dev/kmsg`), or to stderr when that cannot be opened.
//!
//! A command, copy-in or copy-out may name another root directory (a container image's,
//! mounted by `/init`): the command runs with its root directory changed to it, and the
//! copies resolve their paths inside it without leaving it (see [`in_root`]). A command may
//! also name its numeric user, group and supplementary groups.
//!
//! A command may run on a pseudo-terminal of its own (see [`terminal`]): its output is the
//! terminal's, its stdin is typed on it, and the host may resize its window.
//!
//! A `Refresh` request sets the guest's wall clock and reseeds the kernel's random number
//! generator with entropy from the host (for guests restored from a snapshot).
//!
//! Started by the sandbox image's `/init` (resources/build-sandbox-image.sh), which restarts
//! it should it ever exit.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use flint_agent::part_file::PartFile;
use flint_agent::poll::wait_readable;
use flint_agent::protocol::CONTAINERS_DIR;
use flint_agent::protocol::{
    read_message, ExecSpec, FrameError, FromAgent, Message, ToAgent, WindowSize, DATA_CHUNK,
    HEADER_LEN, SHUTDOWN_GRACE,
};
use flint_agent::{AGENT_PORT, DEFAULT_ENV};
use in_root::Root;

mod cgroup;
mod container;
mod in_root;
mod terminal;

/// After the command exits, how long its output pipes may stay idle (held open by processes
/// it left behind) before the exit is reported anyway.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// Stdin chunks queued for a command that does not read them before the connection stops
/// reading (backpressure to the host).
const STDIN_QUEUE: usize = 64;

const NS_PER_SEC: u64 = 1_000_000_000;
/// `RNDADDENTROPY` of `<linux/random.h>`: `_IOW('R', 0x03, int[2])`. Takes a
/// `struct rand_pool_info`; needs `CAP_SYS_ADMIN`.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `RNDRESEEDCRNG` of `<linux/random.h>`: `_IO('R', 0x07)`. No argument; needs
/// `CAP_SYS_ADMIN`.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

fn main() {
    let mut port = AGENT_PORT;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => match args.next().and_then(|p| p.parse().ok()) {
                Some(p) => port = p,
                None => usage_error("--port needs a port number"),
            },
            "--version" => {
                println!("flint-agent {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            "--help" | "-h" => {
                println!("usage: flint-agent [--port N]   (default port {AGENT_PORT})");
                return;
            }
            other => usage_error(&format!("unknown argument {other:?}")),
        }
    }
    let listener = match vsock_listen(port) {
        Ok(l) => l,
        Err(e) => {
            log(3, &format!("cannot listen on vsock port {port}: {e}"));
            std::process::exit(1);
        }
    };
    log(6, &format!("listening on vsock port {port}"));
    let agent = Arc::new(Agent {
        on_shutdown: Box::new(reboot_guest),
        system: Arc::new(GuestSystem),
        containers: Arc::new(Containers {
            dir: PathBuf::from(CONTAINERS_DIR),
            inits: container::Inits::default(),
            cgroups: cgroup::Cgroups::new(cgroup::mount_guest()),
        }),
    });
    loop {
        match vsock_accept(&listener) {
            Ok(fd) => {
                let agent = Arc::clone(&agent);
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || serve(File::from(fd), &agent));
                if let Err(e) = spawned {
                    log(3, &format!("cannot start a connection thread: {e}"));
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED) => {}
                _ => {
                    // Out of descriptors or memory: wait for connections to end.
                    log(3, &format!("accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
            },
        }
    }
}

fn usage_error(msg: &str) -> ! {
    eprintln!("flint-agent: {msg}");
    std::process::exit(2);
}

/// Write one line to the kernel log at `level` (3 = error, 6 = info).
fn log(level: u8, msg: &str) {
    static KMSG: OnceLock<Option<Mutex<File>>> = OnceLock::new();
    let kmsg = KMSG.get_or_init(|| {
        OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .ok()
            .map(Mutex::new)
    });
    match kmsg {
        Some(f) => {
            let line = format!("<{level}>flint-agent: {msg}\n");
            let _ = f
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_all(line.as_bytes());
        }
        None => eprintln!("flint-agent: {msg}"),
    }
}

/// `sync`, then reboot: with flint's `reboot=k` the guest resets and flint exits 0.
fn reboot_guest() {
    log(6, "shutdown requested: syncing and rebooting");
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot takes a command constant and no pointers; it only returns on failure.
    let rc = unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    if rc != 0 {
        log(3, &format!("reboot failed: {}", io::Error::last_os_error()));
    }
}

/// Set the guest's `CLOCK_REALTIME` to `unix_time_ns` (nanoseconds since the Unix epoch).
fn set_realtime(unix_time_ns: u64) -> Result<(), String> {
    if cfg!(test) {
        panic!("a test tried to set the test machine's clock");
    }
    let ts = libc::timespec {
        // At most 1.8e10 s, far inside time_t.
        tv_sec: (unix_time_ns / NS_PER_SEC) as libc::time_t,
        tv_nsec: (unix_time_ns % NS_PER_SEC) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec that outlives the call; clock_settime only reads it.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        let e = io::Error::last_os_error();
        return Err(format!("cannot set the guest clock: {}", describe(&e)));
    }
    Ok(())
}

/// Mix `entropy` into the kernel's entropy pool (crediting 8 bits a byte) and make the
/// kernel's random number generator reseed from it at once.
fn reseed_rng(entropy: &[u8]) -> Result<(), String> {
    if cfg!(test) {
        panic!("a test tried to reseed the test machine's random number generator");
    }
    let info = rand_pool_info(entropy)?;
    let urandom = File::open("/dev/urandom")
        .map_err(|e| format!("cannot open /dev/urandom: {}", describe(&e)))?;
    // SAFETY: `info` is a struct rand_pool_info (entropy_count and buf_size, ints, then
    // buf_size bytes) in a buffer aligned for its ints that outlives the call; the kernel
    // only reads it. The descriptor is open.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(format!(
            "cannot add entropy to the guest kernel's pool (RNDADDENTROPY): {}",
            describe(&e)
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument and no pointers; the descriptor is open.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(format!(
            "cannot reseed the guest kernel's random number generator (RNDRESEEDCRNG): {}",
            describe(&e)
        ));
    }
    Ok(())
}

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }` for `entropy`,
/// crediting 8 bits a byte, as 32-bit words (the struct's alignment): the bytes follow the
/// two counts, the last word padded with zeros (the kernel reads `buf_size` bytes).
fn rand_pool_info(entropy: &[u8]) -> Result<Vec<u32>, String> {
    let (Ok(bytes), Ok(bits)) = (
        libc::c_int::try_from(entropy.len()),
        libc::c_int::try_from(entropy.len() * 8),
    ) else {
        return Err(format!(
            "cannot add {} bytes of entropy at once",
            entropy.len()
        ));
    };
    let mut words = Vec::with_capacity(2 + entropy.len().div_ceil(4));
    words.push(bits as u32);
    words.push(bytes as u32);
    words.extend(entropy.chunks(4).map(|chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        u32::from_ne_bytes(word)
    }));
    Ok(words)
}

fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is plain old data for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm that outlives the call and its exact size is
    // passed; `fd` is an open socket.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own; no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn vsock_accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed (the peer address is not wanted); the
    // listener is a valid socket for the duration of the call.
    let raw = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// What the connections share.
struct Agent {
    /// Called after a `Shutdown` request was answered.
    on_shutdown: Box<dyn Fn() + Send + Sync>,
    /// The guest-wide operations of a `Refresh`.
    system: Arc<dyn System>,
    /// The pod's containers (shared by all connections).
    containers: Arc<Containers>,
}

/// The containers of a pod: where their roots are mounted ([`CONTAINERS_DIR`] in the guest)
/// and their inits; and the containers' cgroups (a pod's, or the one container of a VM of
/// its own).
struct Containers {
    dir: PathBuf,
    inits: container::Inits,
    cgroups: cgroup::Cgroups,
}

impl Agent {
    /// Set the clock and reseed the random number generator; `Err` is the message for the
    /// host. The reseed is attempted even when the clock cannot be set: restored guests that
    /// share their random state are the worse problem.
    fn refresh(&self, unix_time_ns: u64, entropy: &[u8]) -> Result<(), String> {
        let clock = self.system.set_clock(unix_time_ns);
        let rng = self.system.reseed_rng(entropy);
        match (clock, rng) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(clock), Ok(())) => Err(format!(
                "{clock} (the random number generator was reseeded)"
            )),
            (Ok(()), Err(rng)) => Err(format!("{rng} (the clock was set)")),
            (Err(clock), Err(rng)) => Err(format!("{clock}; {rng}")),
        }
    }
}

/// The operations of a `Refresh` that change the whole guest. Tests, which run the agent on
/// the test machine, use a stand-in: they must never set its clock or feed its random
/// number generator (the real functions panic in test builds).
trait System: Send + Sync {
    /// Set `CLOCK_REALTIME` to this many nanoseconds since the Unix epoch; `Err` is a
    /// phrase such as "cannot set the guest clock: Operation not permitted".
    fn set_clock(&self, unix_time_ns: u64) -> Result<(), String>;
    /// Add these bytes to the kernel's entropy pool and reseed its random number generator;
    /// `Err` as above.
    fn reseed_rng(&self, entropy: &[u8]) -> Result<(), String>;
}

/// The guest's own clock and random number generator.
struct GuestSystem;

impl System for GuestSystem {
    fn set_clock(&self, unix_time_ns: u64) -> Result<(), String> {
        set_realtime(unix_time_ns)
    }

    fn reseed_rng(&self, entropy: &[u8]) -> Result<(), String> {
        reseed_rng(entropy)
    }
}

/// The sending half of a connection: frames are written whole under the lock, so output
/// threads and the connection thread can share it.
#[derive(Clone)]
struct Out(Arc<Mutex<File>>);

impl Out {
    fn lock(&self) -> MutexGuard<'_, File> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, msg: &FromAgent) -> io::Result<()> {
        let frame = msg
            .encode()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.lock().write_all(&frame)
    }

    /// Send `buf[HEADER_LEN..HEADER_LEN + n]` as a frame of `kind`, using the start of
    /// `buf` for the header (no copy of the data).
    fn send_data(&self, kind: u8, buf: &mut [u8], n: usize) -> io::Result<()> {
        buf[0] = kind;
        buf[1..HEADER_LEN].copy_from_slice(&(n as u32).to_le_bytes());
        self.lock().write_all(&buf[..HEADER_LEN + n])
    }

    fn error(&self, msg: impl Into<String>) -> io::Result<()> {
        self.send(&FromAgent::Error(msg.into()))
    }
}

/// The connection must end (host gone or misbehaving).
struct Hangup;

/// Serve one host connection until it ends.
fn serve(stream: File, agent: &Agent) {
    let out = match stream.try_clone() {
        Ok(w) => Out(Arc::new(Mutex::new(w))),
        Err(e) => {
            log(3, &format!("cannot duplicate a connection: {e}"));
            return;
        }
    };
    let mut conn = Conn {
        reader: BufReader::with_capacity(256 * 1024, stream),
        out,
        session: None,
    };
    let _ = conn.run(agent);
    // Dropping a session that still runs kills its process group and reaps it.
    conn.session = None;
}

struct Conn {
    reader: BufReader<File>,
    out: Out,
    session: Option<Session>,
}

impl Conn {
    fn recv(&mut self) -> Result<ToAgent, Hangup> {
        match read_message::<ToAgent, _>(&mut self.reader) {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) | Err(FrameError::Io(_)) => Err(Hangup),
            Err(FrameError::Protocol(e)) => {
                let _ = self
                    .out
                    .error(format!("the host sent a malformed frame: {e}"));
                Err(Hangup)
            }
        }
    }

    fn reply(&self, msg: &FromAgent) -> Result<(), Hangup> {
        self.out.send(msg).map_err(|_| Hangup)
    }

    fn run(&mut self, agent: &Agent) -> Result<(), Hangup> {
        loop {
            let msg = self.recv()?;
            if self.session.as_ref().is_some_and(Session::is_done) {
                self.session = None;
            }
            match msg {
                ToAgent::Exec(spec) => {
                    if self.session.is_some() {
                        self.reply(&FromAgent::Error(
                            "a command is already running on this connection".into(),
                        ))?;
                        continue;
                    }
                    match Session::start(&spec, &self.out, &agent.containers) {
                        Ok(s) => self.session = Some(s),
                        Err(message) => self.reply(&FromAgent::Error(message))?,
                    }
                }
                // Stdin and signals for a command that has finished are dropped.
                ToAgent::Stdin(data) => {
                    if let Some(s) = &mut self.session {
                        s.stdin(data);
                    }
                }
                ToAgent::StdinEof => {
                    if let Some(s) = &mut self.session {
                        s.close_stdin();
                    }
                }
                ToAgent::Signal(signal) => {
                    if let Some(s) = &self.session {
                        s.signal(signal);
                    }
                }
                ToAgent::Resize(size) => {
                    if let Some(s) = &self.session {
                        s.resize(size);
                    }
                }
                ToAgent::CopyIn { path, mode, root } => {
                    self.copy_in(&path, mode, root.as_deref())?
                }
                ToAgent::CopyOut { path, root } => self.copy_out(&path, root.as_deref())?,
                ToAgent::FileData(_) | ToAgent::FileEnd => {
                    let _ = self
                        .out
                        .error("the host sent file data outside of a copy-in");
                    return Err(Hangup);
                }
                ToAgent::Shutdown => {
                    let _ = self.reply(&FromAgent::Ok);
                    // Give the host the chance to read the answer and hang up.
                    wait_readable(&[self.reader.get_ref()], Some(SHUTDOWN_GRACE));
                    (agent.on_shutdown)();
                    return Ok(());
                }
                ToAgent::Refresh {
                    unix_time_ns,
                    entropy,
                } => match agent.refresh(unix_time_ns, &entropy) {
                    Ok(()) => self.reply(&FromAgent::Ok)?,
                    Err(message) => {
                        log(3, &format!("refresh failed: {message}"));
                        self.reply(&FromAgent::Error(message))?;
                    }
                },
                ToAgent::MountContainer { id, disk, size } => {
                    let containers = &agent.containers;
                    match container::mount(&containers.dir, &id, &disk, size) {
                        Ok(()) => self.reply(&FromAgent::Ok)?,
                        Err(message) => self.reply(&FromAgent::Error(message))?,
                    }
                }
                ToAgent::UnmountContainer { id } => {
                    let containers = &agent.containers;
                    containers.inits.forget(&id);
                    let unmounted = container::unmount(&containers.dir, &id);
                    containers.cgroups.remove(&id);
                    match unmounted {
                        Ok(()) => self.reply(&FromAgent::Ok)?,
                        Err(message) => self.reply(&FromAgent::Error(message))?,
                    }
                }
                ToAgent::ContainerCgroup {
                    id,
                    image_root,
                    memory_max,
                    pids_max,
                } => {
                    let cgroups = &agent.containers.cgroups;
                    match cgroups.setup(&id, image_root, memory_max, pids_max) {
                        Ok(()) => self.reply(&FromAgent::Ok)?,
                        Err(message) => self.reply(&FromAgent::Error(message))?,
                    }
                }
                ToAgent::ContainerStats { id } => {
                    let reply = match agent.containers.cgroups.stats(&id) {
                        Ok(stats) => FromAgent::ContainerStats(Box::new(stats)),
                        Err(message) => FromAgent::Error(message),
                    };
                    if reply.encode().is_ok() {
                        self.reply(&reply)?;
                    } else {
                        self.reply(&FromAgent::Error(format!(
                            "the container {id}'s cgroup numbers are inconsistent"
                        )))?;
                    }
                }
            }
        }
    }

    fn copy_in(&mut self, path: &str, mode: u32, root: Option<&str>) -> Result<(), Hangup> {
        let mut part = create_part_file(path, root)
            .map_err(|e| format!("cannot create {path}: {}", describe(&e)));
        loop {
            match self.recv()? {
                ToAgent::FileData(data) => {
                    if let Ok(p) = &mut part {
                        if let Err(e) = p.write_all(&data) {
                            part = Err(format!("cannot write {path}: {}", describe(&e)));
                        }
                    }
                }
                ToAgent::FileEnd => break,
                _ => {
                    let _ = self
                        .out
                        .error("the host sent another request in the middle of a copy-in");
                    return Err(Hangup);
                }
            }
        }
        let result = part.and_then(|p| {
            p.commit(mode)
                .map_err(|e| format!("cannot write {path}: {}", describe(&e)))
        });
        match result {
            Ok(()) => self.reply(&FromAgent::Ok),
            Err(message) => self.reply(&FromAgent::Error(message)),
        }
    }

    fn copy_out(&mut self, path: &str, root: Option<&str>) -> Result<(), Hangup> {
        let opened = open_for_copy_out(path, root).and_then(|f| {
            let meta = f.metadata()?;
            if meta.is_file() {
                Ok((f, meta.permissions().mode() & 0o7777))
            } else {
                Err(io::Error::other("not a regular file"))
            }
        });
        let (mut file, mode) = match opened {
            Ok(x) => x,
            Err(e) => {
                return self.reply(&FromAgent::Error(format!(
                    "cannot copy {path} out: {}",
                    describe(&e)
                )))
            }
        };
        let mut buf = vec![0u8; HEADER_LEN + DATA_CHUNK];
        loop {
            match file.read(&mut buf[HEADER_LEN..]) {
                Ok(0) => break,
                Ok(n) => {
                    let kind = FromAgent::FileData(Vec::new()).kind();
                    self.out.send_data(kind, &mut buf, n).map_err(|_| Hangup)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return self.reply(&FromAgent::Error(format!(
                        "cannot read {path}: {}",
                        describe(&e)
                    )))
                }
            }
        }
        self.reply(&FromAgent::FileEnd { mode })
    }
}

/// The hidden file a copy-in writes, for `path` inside `root` or the guest's own root.
fn create_part_file(path: &str, root: Option<&str>) -> io::Result<PartFile> {
    let Some(root) = root else {
        return PartFile::create(Path::new(path));
    };
    let path = Path::new(path);
    let no_file = || io::Error::new(io::ErrorKind::InvalidInput, "the path names no file");
    let name = path.file_name().ok_or_else(no_file)?;
    let parent = path.parent().ok_or_else(no_file)?;
    let dir = Root::open(root)?.create_dir_all(parent)?;
    PartFile::create_in(dir, name)
}

/// Open the file a copy-out sends, `path` inside `root` or the guest's own root.
fn open_for_copy_out(path: &str, root: Option<&str>) -> io::Result<File> {
    let Some(root) = root else {
        return File::open(path);
    };
    // Not blocking: a FIFO planted in the root must not hold up the connection (it is then
    // refused as not a regular file).
    let flags = libc::O_RDONLY | libc::O_NOCTTY | libc::O_NONBLOCK;
    Ok(File::from(
        Root::open(root)?.open_at(Path::new(path), flags)?,
    ))
}

/// An io::Error as a phrase, without std's "(os error N)" suffix.
fn describe(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length
    // for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether the command has been reaped (its pid, and so its process group id, may then be
/// reused: no more signals).
#[derive(Default)]
struct ProcState {
    reaped: bool,
}

/// The command a connection runs.
struct Session {
    pgid: i32,
    state: Arc<Mutex<ProcState>>,
    /// Set (under the connection's send lock) just before the final `Exited`/`Killed`.
    done: Arc<AtomicBool>,
    /// Chunks for the command's stdin; with a terminal, an empty chunk types the end of
    /// input.
    stdin: Option<SyncSender<Vec<u8>>>,
    output: Option<JoinHandle<()>>,
    /// The master of the command's terminal, if it has one.
    terminal: Option<OwnedFd>,
}

impl Session {
    /// Spawn the command and the threads that serve it; `Err` is the message for the host.
    fn start(spec: &ExecSpec, out: &Out, containers: &Containers) -> Result<Session, String> {
        let argv0 = &spec.argv[0];
        let workdir = spec.workdir.as_deref().unwrap_or("/");
        // A pod's container: its namespaces and root, entered by an intermediate process.
        let in_container = match &spec.container {
            None => None,
            Some(c) => Some(container::prepare(
                &containers.inits,
                &containers.dir,
                &c.id,
                c.new_namespaces,
                workdir,
                spec.user.as_ref(),
            )?),
        };
        let bad_workdir = |e: &io::Error| {
            format!(
                "cannot use {workdir} as the working directory: {}",
                describe(e)
            )
        };
        // With another root: that root and the working directory inside it (created when
        // missing, as `docker run -w` does), open for the child to change into.
        let root_dirs = match spec.root.as_deref() {
            None if in_container.is_some() => None,
            None => {
                match fs::metadata(workdir) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(format!(
                            "cannot use {workdir} as the working directory: not a directory"
                        ))
                    }
                    Err(e) => return Err(bad_workdir(&e)),
                }
                None
            }
            Some(root_path) => {
                let root = Root::open(root_path).map_err(|e| {
                    format!(
                        "cannot use {root_path} as the root directory: {}",
                        describe(&e)
                    )
                })?;
                let cwd = root
                    .create_dir_all(Path::new(workdir))
                    .map_err(|e| bad_workdir(&e))?;
                Some((root, cwd))
            }
        };
        // A terminal, from the devpts of the root the command will have.
        let pty = match spec.terminal {
            None => None,
            Some(size) => {
                let container_root = spec.container.as_ref().and_then(|c| {
                    Root::open(&container::root_of(&containers.dir, &c.id).to_string_lossy()).ok()
                });
                let root = container_root
                    .as_ref()
                    .or(root_dirs.as_ref().map(|(root, _)| root));
                let uid = spec.user.as_ref().map(|u| u.uid);
                Some(terminal::allocate(root, size, uid)?)
            }
        };
        let tty = pty.is_some();
        // The container's cgroup, which the command joins before it runs.
        let mut member = containers.cgroups.for_command(spec)?;
        let mut cmd = Command::new(argv0);
        cmd.args(&spec.argv[1..])
            .env_clear()
            .envs(DEFAULT_ENV)
            .envs(spec.env.iter().map(|(k, v)| (k, v)));
        match &pty {
            None => {
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .process_group(0);
            }
            // A session of its own instead of a process group (`take_terminal`): its id is
            // the command's pid all the same.
            Some(pty) => {
                let slave = || {
                    pty.slave
                        .try_clone()
                        .map(Stdio::from)
                        .map_err(|e| format!("cannot use the terminal: {}", describe(&e)))
                };
                cmd.stdin(slave()?).stdout(slave()?).stderr(slave()?);
            }
        }
        stop_ignoring_signals();
        if root_dirs.is_none() && in_container.is_none() {
            cmd.current_dir(workdir);
        }
        if let Some(mut prepared) = in_container {
            // The process joins (not the intermediate, which stays in the agent's cgroup).
            prepared.cgroup = member.as_ref().map(cgroup::Member::procs_fd);
            // SAFETY: the closure runs in the child between fork and exec and only makes
            // system calls on data prepared before the fork (see `terminal::take_terminal`
            // and `container::enter`); the descriptors it uses stay open in the parent until
            // the spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if tty {
                        terminal::take_terminal()?;
                    }
                    container::enter(&prepared)
                });
            }
        } else {
            if let Some(procs) = member.as_ref().map(cgroup::Member::procs_fd) {
                // SAFETY: the closure runs in the child between fork and exec and makes one
                // system call on a descriptor that `member` keeps open until the spawn
                // returns.
                unsafe {
                    cmd.pre_exec(move || cgroup::join(procs));
                }
            }
            if root_dirs.is_some() || spec.user.is_some() || tty {
                let fds = root_dirs
                    .as_ref()
                    .map(|(root, cwd)| (root.raw_fd(), cwd.as_raw_fd()));
                let user = spec.user.clone();
                // SAFETY: the closure runs in the child between fork and exec and only
                // makes system calls on data prepared before the fork (see
                // `terminal::take_terminal` and `in_root::enter`). The descriptors stay open
                // in the parent (`root_dirs`) until the spawn returns.
                unsafe {
                    cmd.pre_exec(move || {
                        if tty {
                            terminal::take_terminal()?;
                        }
                        in_root::enter(fds, user.as_ref())
                    });
                }
            }
        }
        // Its OOM kills from now on.
        let oom = member.as_mut().and_then(cgroup::Member::oom_watch);
        let spawned = cmd.spawn();
        // The command's copies of the slave: only the command may hold it, so that its
        // master reads end once the command and what it left behind have closed it.
        drop(cmd);
        let master = pty.map(|pty| pty.master);
        drop(root_dirs);
        drop(member);
        let mut child = spawned.map_err(|e| format!("cannot run `{argv0}`: {}", describe(&e)))?;
        let pid = child.id();
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("cannot watch `{argv0}`: {}", describe(&e)));
            }
        };
        // Where stdin goes and where output comes from: the pipes, or the terminal's master
        // (a descriptor each for the stdin thread, the output thread and resizes).
        let streams = match &master {
            None => match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
                (Some(stdin), Some(stdout), Some(stderr)) => Ok((
                    File::from(OwnedFd::from(stdin)),
                    [Some(OwnedFd::from(stdout)), Some(OwnedFd::from(stderr))],
                )),
                _ => unreachable!("all three streams are piped"),
            },
            Some(master) => master
                .try_clone()
                .and_then(|writer| Ok((File::from(writer), [Some(master.try_clone()?), None]))),
        };
        let (stdin, pipes) = match streams {
            Ok(streams) => streams,
            Err(e) => {
                kill_group(pid as i32, libc::SIGKILL);
                let _ = child.wait();
                return Err(format!("cannot use the terminal: {}", describe(&e)));
            }
        };
        if let Some(c) = &spec.container {
            if c.new_namespaces {
                match pidfd.try_clone() {
                    Ok(fd) => containers.inits.register(&c.id, pid, fd),
                    Err(e) => {
                        kill_group(pid as i32, libc::SIGKILL);
                        let _ = child.wait();
                        return Err(format!("cannot watch `{argv0}`: {}", describe(&e)));
                    }
                }
            }
        }
        // A failure here means the host is gone: the output thread notices and kills it.
        let _ = out.send(&FromAgent::Started { pid });

        let (tx, rx) = sync_channel::<Vec<u8>>(STDIN_QUEUE);
        // Not joined: it may block on a pipe that a left-behind process holds and never
        // reads; it ends when that process goes or the channel closes.
        let _ = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let mut pipe = Some(stdin);
                let mut last = None;
                for data in rx {
                    if let Some(p) = &mut pipe {
                        if data.is_empty() {
                            // Only sent for a terminal: the end of the input.
                            terminal::type_eof(p, last);
                            continue;
                        }
                        if p.write_all(&data).is_err() {
                            // The command closed its stdin: drop the rest.
                            pipe = None;
                        }
                        last = data.last().copied();
                    }
                }
            });

        let state = Arc::new(Mutex::new(ProcState::default()));
        let done = Arc::new(AtomicBool::new(false));
        let output = {
            let (state, done, out) = (Arc::clone(&state), Arc::clone(&done), out.clone());
            std::thread::Builder::new()
                .name("output".into())
                .spawn(move || forward_output(child, pidfd, pipes, oom, &out, &state, &done))
        };
        let output = match output {
            Ok(h) => h,
            Err(e) => {
                kill_group(pid as i32, libc::SIGKILL);
                return Err(format!("cannot start a thread: {}", describe(&e)));
            }
        };
        Ok(Session {
            pgid: pid as i32,
            state,
            done,
            stdin: Some(tx),
            output: Some(output),
            terminal: master,
        })
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    fn stdin(&mut self, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        if let Some(tx) = &self.stdin {
            if tx.send(data).is_err() {
                self.stdin = None;
            }
        }
    }

    /// Close the command's stdin; with a terminal, type the end of input (see the
    /// protocol's *Terminals*).
    fn close_stdin(&mut self) {
        if let (Some(tx), Some(_)) = (&self.stdin, &self.terminal) {
            let _ = tx.send(Vec::new());
        }
        self.stdin = None;
    }

    /// Set the window size of the command's terminal, if it has one and runs.
    fn resize(&self, size: WindowSize) {
        if let (Some(master), false) = (&self.terminal, self.is_done()) {
            if let Err(e) = terminal::set_size(master.as_raw_fd(), size) {
                log(3, &format!("cannot resize a terminal: {e}"));
            }
        }
    }

    /// Signal the command's process group, unless the command has been reaped.
    fn signal(&self, signal: i32) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.reaped {
            kill_group(self.pgid, signal);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.is_done() {
            self.signal(libc::SIGKILL);
        }
        self.stdin = None;
        if let Some(h) = self.output.take() {
            let _ = h.join();
        }
    }
}

/// Give back the default action of every signal the agent's process ignores (SIGPIPE apart,
/// which Rust's runtime ignores and `Command` resets in the child). An ignored signal stays
/// ignored across exec, so a parent that ignored SIGINT (a shell's background job does) would
/// make every command ignore Ctrl-C and `flint run`'s forwarded signals. Handlers need nothing:
/// exec resets them, and `Command` clears the signal mask.
fn stop_ignoring_signals() {
    for signal in 1..=31 {
        if matches!(signal, libc::SIGKILL | libc::SIGSTOP | libc::SIGPIPE) {
            continue;
        }
        // SAFETY: `old` is a valid sigaction on this stack for the kernel to fill; the new
        // action is not given (null), so nothing changes by this call.
        let ignored = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(signal, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
        };
        if ignored {
            // SAFETY: setting a default disposition passes no pointers.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
}

fn kill_group(pgid: i32, signal: i32) {
    // SAFETY: kill takes no pointers; a negative pid addresses the process group.
    unsafe { libc::kill(-pgid, signal) };
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointers; the result is checked.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh (close-on-exec) descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// The output thread of a command: forwards stdout and stderr (with a terminal: its master,
/// as stdout, whose reads fail with EIO once no process holds the slave) until both end
/// (or, once the command has exited, until they stay idle for [`OUTPUT_GRACE`]), reaps the command and
/// reports how it ended. If the host goes away, the command's process group is killed.
/// With `oom`, the OOM kills in the command's cgroup are reported as they happen, and once
/// more before the end.
#[allow(clippy::too_many_arguments)]
fn forward_output(
    mut child: Child,
    pidfd: OwnedFd,
    pipes: [Option<OwnedFd>; 2],
    mut oom: Option<cgroup::OomWatch>,
    out: &Out,
    state: &Mutex<ProcState>,
    done: &AtomicBool,
) {
    let pgid = child.id() as i32;
    let kinds = [
        FromAgent::Stdout(Vec::new()).kind(),
        FromAgent::Stderr(Vec::new()).kind(),
    ];
    let mut pipes = pipes;
    let mut exited = false;
    let mut host_ok = true;
    let mut buf = vec![0u8; HEADER_LEN + DATA_CHUNK];
    loop {
        if pipes.iter().all(Option::is_none) && exited {
            break;
        }
        // Once the command has exited, what it wrote is already in the pipes: stop when
        // they stay idle (processes it left behind may hold them open).
        let timeout_ms = if exited {
            OUTPUT_GRACE.as_millis() as i32
        } else {
            -1
        };
        let mut fds = Vec::with_capacity(3);
        let mut which = Vec::with_capacity(3);
        for (i, p) in pipes.iter().enumerate() {
            if let Some(fd) = p {
                fds.push(pollfd(fd.as_raw_fd()));
                which.push(i);
            }
        }
        if !exited {
            fds.push(pollfd(pidfd.as_raw_fd()));
            which.push(2);
        }
        if let Some(watch) = &oom {
            fds.push(libc::pollfd {
                fd: watch.fd(),
                events: libc::POLLPRI,
                revents: 0,
            });
            which.push(3);
        }
        match poll(&mut fds, timeout_ms) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log(3, &format!("poll failed: {e}"));
                break;
            }
        }
        for (pfd, &i) in fds.iter().zip(&which) {
            if pfd.revents == 0 {
                continue;
            }
            if i == 2 {
                exited = true;
                continue;
            }
            if i == 3 {
                report_oom_kills(&mut oom, out, host_ok);
                continue;
            }
            let Some(fd) = &pipes[i] else { continue };
            // SAFETY: `fd` is an open pipe we own and `buf[HEADER_LEN..]` is a writable
            // buffer of the length passed.
            let n = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    buf[HEADER_LEN..].as_mut_ptr().cast(),
                    DATA_CHUNK,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    pipes[i] = None;
                }
                continue;
            }
            if n == 0 {
                pipes[i] = None;
                continue;
            }
            if host_ok && out.send_data(kinds[i], &mut buf, n as usize).is_err() {
                // The host is gone: nobody wants the command any more.
                host_ok = false;
                let st = state.lock().unwrap_or_else(|e| e.into_inner());
                if !st.reaped {
                    kill_group(pgid, libc::SIGKILL);
                }
            }
        }
    }
    // Close our ends: processes left behind that still write get SIGPIPE.
    drop(pipes);
    let status = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        let status = child.wait();
        st.reaped = true;
        status
    };
    let msg = match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => FromAgent::Exited { code },
            (None, Some(signal)) => FromAgent::Killed { signal },
            (None, None) => FromAgent::Error("the command ended in an unknown way".into()),
        },
        Err(e) => FromAgent::Error(format!(
            "cannot collect the command's status: {}",
            describe(&e)
        )),
    };
    // An OOM kill that ended the command is told before the end.
    report_oom_kills(&mut oom, out, host_ok);
    // `done` is set under the send lock, before the host can see the end of the command.
    let mut w = out.lock();
    done.store(true, Ordering::SeqCst);
    if host_ok {
        if let Ok(frame) = msg.encode() {
            let _ = w.write_all(&frame);
        }
    }
}

/// Tell the host of the OOM kills of the command's cgroup if their count rose.
fn report_oom_kills(oom: &mut Option<cgroup::OomWatch>, out: &Out, host_ok: bool) {
    if let Some(count) = oom.as_mut().and_then(cgroup::OomWatch::check) {
        if host_ok {
            let _ = out.send(&FromAgent::OomKills { count });
        }
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

#[cfg(test)]
mod tests;
