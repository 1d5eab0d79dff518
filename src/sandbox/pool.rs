//! `flint pool` and `flint run --pool`: sandboxes kept warm for the next command.
//!
//! `flint pool --socket PATH` keeps `--size` *members* ready: each is a child flint (this
//! binary, the hidden `pool-member` command) that has done what `flint run` does before the
//! command: its VM restored from the sandbox template (or booted), started, and its guest agent
//! connected. A member then tells the pool it is ready (one byte on the socket pair the pool
//! gave it as fd 3) and waits.
//!
//! `flint run --pool PATH -- COMMAND` connects to PATH and sends its job (a length-prefixed
//! JSON [`Job`]: argv, environment, working directory, timeout) together with its stdin,
//! stdout and stderr (`SCM_RIGHTS`). The pool checks that the client is its own user and passes
//! the connection itself to a ready member (`SCM_RIGHTS` again), then starts a replacement; no
//! data goes through the pool. The member reads the job, puts the client's descriptors in place
//! of its own 0, 1 and 2, refreshes a restored guest's clock and random number generator (it
//! sat idle), runs the command as `flint run` does, and answers with the exit status (a byte,
//! then an optional one-line message) before it stops its VM and exits.
//!
//! A member runs one job only. It stops the command and the VM when its client hangs up
//! (the connection becomes readable), when the pool ends (`PR_SET_PDEATHSIG`, and the pool's
//! end of the socket pair closing), or on SIGTERM, SIGINT or SIGHUP, which the pool sends its
//! members when it gets one itself. Members block those signals from their start (inherited
//! from the pool) until the VM's handlers are in place, so that a signal never ends one before
//! it can remove its work directory.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flint_agent::poll::wait_readable;
use log::debug;
use serde::{Deserialize, Serialize};
use vmm::Ending;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::agent::{exec_spec, AgentThread};
use super::supervise::{conclude, supervise, Outcome};
use super::{
    machine, no_transparent_huge_pages, sandbox_failed, CommandOptions, RunOptions, Sandbox,
    SetupError, STATUS_SANDBOX_FAILED,
};

/// The most members a pool may keep.
pub const POOL_SIZE_MAX: usize = 32;
/// The most bytes a job (its JSON) may have.
pub const JOB_MAX: usize = 1 << 20;
/// How long a member waits for the job after the pool handed it a connection.
const JOB_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How many clients may wait for a member at once; more are turned away.
const PENDING_MAX: usize = 64;
/// How long a client waits for a member before the pool closes its connection.
const PENDING_TIMEOUT: Duration = Duration::from_secs(120);
/// How long members get to stop after the pool's SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Members that end before they are ready, in a row, after which the pool gives up.
const FAILED_STARTS_MAX: u32 = 3;
/// The descriptor a member finds its end of the socket pair to the pool at.
const MEMBER_FD: RawFd = 3;
/// The longest message a member sends back with the status.
const REPLY_MESSAGE_MAX: usize = 4096;
/// What a member sends the pool when it is ready for a job.
const READY: u8 = b'R';
/// What the pool sends a member with a client's connection.
const TAKE: u8 = b'J';

/// `flint pool` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolOptions {
    pub socket: PathBuf,
    pub size: usize,
    /// The members' VM: kernel, initramfs, vCPUs and memory; the rest as `flint run`'s
    /// defaults.
    pub vm: RunOptions,
}

/// `flint run --pool` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRunOptions {
    pub socket: PathBuf,
    pub command: CommandOptions,
    pub timeout: Option<Duration>,
}

/// What a client asks a member to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Job {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    timeout_secs: Option<u64>,
}

/// Why `flint pool` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("a flint pool already listens on {}", .0.display())]
    AlreadyListening(PathBuf),
    #[error("{} exists and is not a socket; remove it or choose another --socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot listen on {}: {source}", path.display())]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot catch signals: {0}")]
    Signals(io::Error),
    #[error("cannot start a pool member: {0}")]
    Spawn(io::Error),
    #[error("the pool's sandboxes failed to start {0} times in a row (see the messages above)")]
    FailingMembers(u32),
    /// The members' VM cannot be made (a missing kernel or image): said before any starts.
    #[error("{0}")]
    Sandbox(String),
}

/// Why `flint run --pool` got no status.
#[derive(Debug, thiserror::Error)]
pub enum PoolClientError {
    #[error("no flint pool listens on {} ({source}); start one with 'flint pool --socket {}'", path.display(), path.display())]
    NoPool { path: PathBuf, source: io::Error },
    #[error(
        "the command and its environment take {0} bytes, more than a pool job may ({JOB_MAX})"
    )]
    TooLarge(usize),
    #[error("cannot send the job to the pool at {}: {source}", path.display())]
    Send { path: PathBuf, source: io::Error },
    #[error("the pool at {} closed the connection before a sandbox reported the command's status", .0.display())]
    NoStatus(PathBuf),
    #[error("cannot read the command's status from the pool: {0}")]
    Read(io::Error),
}

/// Why a member could not take its job.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("the job did not arrive within {} s", JOB_READ_TIMEOUT.as_secs())]
    Timeout,
    #[error("the job is larger than {JOB_MAX} bytes")]
    TooLarge,
    #[error("the job came with {0} file descriptors instead of 3 (stdin, stdout and stderr)")]
    Descriptors(usize),
    #[error("the job is malformed: {0}")]
    Malformed(String),
    #[error("the job has no command")]
    NoCommand,
    #[error("cannot read the job: {0}")]
    Io(io::Error),
}

/// A member could not become one.
#[derive(Debug, thiserror::Error)]
enum MemberError {
    #[error("a pool member needs its socket to the pool as descriptor {MEMBER_FD}; it is started by 'flint pool' only")]
    NoPool,
    #[error("cannot open /dev/null: {0}")]
    DevNull(io::Error),
    #[error(transparent)]
    Setup(#[from] SetupError),
}

// ---------------------------------------------------------------------------------------------
// The client: `flint run --pool`.

/// `flint run --pool`: the command's exit status, or 125 with one sentence on stderr.
pub fn run_in_pool(options: &PoolRunOptions) -> ExitCode {
    match client(options) {
        Ok(status) => ExitCode::from(status),
        Err(e) => sandbox_failed(&e),
    }
}

fn client(options: &PoolRunOptions) -> Result<u8, PoolClientError> {
    let path = &options.socket;
    let job = Job {
        argv: options.command.argv.clone(),
        env: options.command.env.clone(),
        workdir: options.command.workdir.clone(),
        timeout_secs: options.timeout.map(|t| t.as_secs()),
    };
    let json = serde_json::to_vec(&job).expect("a job is plain data");
    if json.len() > JOB_MAX {
        return Err(PoolClientError::TooLarge(json.len()));
    }
    let stream = UnixStream::connect(path).map_err(|source| PoolClientError::NoPool {
        path: path.clone(),
        source,
    })?;
    let send_failed = |source| PoolClientError::Send {
        path: path.clone(),
        source,
    };
    let mut frame = (json.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&json);
    // A closed standard descriptor is /dev/null for the command.
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(send_failed)?;
    let fds = [0, 1, 2].map(|fd| if is_open(fd) { fd } else { null.as_raw_fd() });
    let sent = stream
        .send_with_fds(&[&frame[..]], &fds)
        .map_err(|e| send_failed(io::Error::from_raw_os_error(e.errno())))?;
    (&stream).write_all(&frame[sent..]).map_err(send_failed)?;
    drop(null);
    let mut reply = Vec::new();
    (&stream)
        .take(1 + REPLY_MESSAGE_MAX as u64)
        .read_to_end(&mut reply)
        .map_err(PoolClientError::Read)?;
    let (&status, message) = reply
        .split_first()
        .ok_or_else(|| PoolClientError::NoStatus(path.clone()))?;
    if !message.is_empty() {
        let text = String::from_utf8_lossy(message);
        eprintln!("flint: error: {}", flint_agent::agent_text(&text));
    }
    Ok(status)
}

/// Whether `fd` is an open descriptor.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

// ---------------------------------------------------------------------------------------------
// A member: the hidden `flint pool-member`.

/// The hidden `flint pool-member`: one warm sandbox for one job of a pool.
pub fn member(options: &RunOptions, start: Instant) -> ExitCode {
    // A warm sandbox idles like a `flint run` one. Its socket to the pool (MEMBER_FD, not
    // closed on exec) and its parent-death signal stay across the restart.
    crate::lean::restart_without_malloc_cache();
    no_transparent_huge_pages();
    crate::lean::prepare();
    match member_run(options, start) {
        Ok(code) => ExitCode::from(code),
        Err(e) => sandbox_failed(&e),
    }
}

/// The socket pair to the pool, at [`MEMBER_FD`].
fn pool_socket() -> Result<UnixStream, MemberError> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a stat struct into `stat`, which has room for one.
    let rc = unsafe { libc::fstat(MEMBER_FD, stat.as_mut_ptr()) };
    // SAFETY: fstat succeeded, so it filled `stat`.
    if rc != 0 || unsafe { stat.assume_init() }.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(MemberError::NoPool);
    }
    // SAFETY: MEMBER_FD is open (fstat succeeded), a socket, and nothing else in this process
    // owns it: the pool put it there for this process alone.
    let pool = unsafe { UnixStream::from_raw_fd(MEMBER_FD) };
    // SAFETY: F_SETFD on a descriptor this process owns changes only its close-on-exec flag.
    unsafe { libc::fcntl(MEMBER_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(pool)
}

fn member_run(options: &RunOptions, start: Instant) -> Result<u8, MemberError> {
    let pool = pool_socket()?;
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(MemberError::DevNull)?;
    let sandbox = Sandbox::prepare(options, start)?;
    let first = sandbox.first_step();
    let uds = machine::agent_socket(&sandbox.config);
    let client = AgentThread::spawn(uds, options, None, first, start)?;
    let machine::SandboxVm {
        mut vm,
        restored,
        staging,
    } = sandbox.vm;
    vm.start(&crate::seccomp::pool_member())
        .map_err(SetupError::from)?;
    // As in `flint run`: the deep setup is over, and a warm sandbox may wait long.
    crate::lean::release_setup_memory();
    // The VM's handlers are in place: a stop signal now stops it cleanly.
    set_stop_signals_blocked(false);
    let log = &sandbox.console_log;
    let finish = |outcome: Outcome, vm: vmm::Vm, timeout: Option<Duration>| {
        conclude(outcome, vm, &client, restored.as_ref(), log, timeout, start)
    };
    match supervise(&vm, &client, staging, None, None, start) {
        Outcome::Connected => {}
        // The pool stopping it: nothing to say.
        Outcome::Ended(Ending::Signal(_)) => return Ok(finish(Outcome::Abandoned, vm, None)),
        other => return Ok(finish(other, vm, None)),
    }
    debug!("pool member: ready at {} ms", start.elapsed().as_millis());
    if (&pool).write_all(&[READY]).is_err() {
        return Ok(finish(Outcome::Abandoned, vm, None));
    }
    // Nothing reports while the agent client waits for the job: the pool speaking (a
    // connection, or its end) is what this waits for, or the VM's end.
    match supervise(&vm, &client, None, None, Some(&pool as &dyn AsRawFd), start) {
        Outcome::Abandoned => {}
        Outcome::Ended(Ending::Signal(_)) => return Ok(finish(Outcome::Abandoned, vm, None)),
        other => return Ok(finish(other, vm, None)),
    }
    let Some(conn) = take_connection(&pool) else {
        debug!("pool member: the pool is gone");
        return Ok(finish(Outcome::Abandoned, vm, None));
    };
    debug!("pool member: job at {} ms", start.elapsed().as_millis());
    let (job, stdio) = match read_job(&conn) {
        Ok(job) => job,
        Err(e) => {
            reply(&conn, STATUS_SANDBOX_FAILED, &e.to_string());
            return Ok(finish(Outcome::Abandoned, vm, None));
        }
    };
    // The command's streams (and this member's messages from now on) are the client's.
    for (fd, file) in stdio.iter().enumerate() {
        set_fd(file.as_raw_fd(), fd as RawFd);
    }
    drop(stdio);
    // Bounded: a deadline past what a clock can hold would overflow.
    let timeout = job
        .timeout_secs
        .map(|secs| Duration::from_secs(secs.min(u64::from(u32::MAX))));
    let spec = exec_spec(&CommandOptions {
        argv: job.argv,
        env: job.env,
        workdir: job.workdir,
    });
    if client.job.send(spec).is_err() {
        return Ok(finish(Outcome::Abandoned, vm, timeout));
    }
    let outcome = supervise(
        &vm,
        &client,
        None,
        timeout,
        Some(&conn as &dyn AsRawFd),
        start,
    );
    if let Outcome::Abandoned = outcome {
        debug!("pool member: the client hung up");
        return Ok(finish(outcome, vm, timeout));
    }
    let code = match &outcome {
        // The answer first, the VM's end after it: the client need not wait for that.
        Outcome::Finished(status) => {
            let code = status.code().clamp(0, 255) as u8;
            let _ = io::stdout().flush();
            release_stdio(&null);
            reply(&conn, code, "");
            finish(outcome, vm, timeout);
            code
        }
        _ => {
            let code = finish(outcome, vm, timeout);
            release_stdio(&null);
            reply(&conn, code, "");
            code
        }
    };
    debug!("pool member: done at {} ms", start.elapsed().as_millis());
    Ok(code)
}

/// Put `from` at descriptor `to` (closing what was there).
fn set_fd(from: RawFd, to: RawFd) {
    if from != to {
        // SAFETY: dup3 on two descriptor numbers: `from` is open (owned by the caller), `to`
        // is one of this process's standard descriptors, which nothing holds as an owned
        // object that would close it.
        unsafe { libc::dup3(from, to, 0) };
    }
}

/// Give the client's streams back: the member's 0, 1 and 2 become /dev/null, so that the
/// client's pipes end when the client expects them to.
fn release_stdio(null: &File) {
    for fd in 0..3 {
        set_fd(null.as_raw_fd(), fd);
    }
}

/// The status byte and a message, then the end of the connection.
fn reply(conn: &UnixStream, status: u8, message: &str) {
    let mut answer = vec![status];
    let message = message.as_bytes();
    answer.extend_from_slice(&message[..message.len().min(REPLY_MESSAGE_MAX)]);
    let _ = (&*conn).write_all(&answer);
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

/// The client connection the pool hands over, or `None` when the pool is gone.
fn take_connection(pool: &UnixStream) -> Option<UnixStream> {
    let mut byte = [0u8; 1];
    let (n, file) = pool.recv_with_fd(&mut byte).ok()?;
    match (n, file) {
        (1, Some(file)) if byte[0] == TAKE => Some(UnixStream::from(OwnedFd::from(file))),
        _ => None,
    }
}

/// Read the job: its length, the descriptors that come with its first bytes, the rest within
/// [`JOB_READ_TIMEOUT`].
fn read_job(conn: &UnixStream) -> Result<(Job, Vec<File>), JobError> {
    let deadline = Instant::now() + JOB_READ_TIMEOUT;
    let wait = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(JobError::Timeout);
        }
        wait_readable(&[conn], Some(left));
        Ok(())
    };
    wait()?;
    let mut head = [0u8; 4096];
    let (n, files) = recv_with_descriptors(conn, &mut head).map_err(JobError::Io)?;
    let count = files.len();
    if count != 3 {
        return Err(JobError::Descriptors(count));
    }
    let mut data = head[..n].to_vec();
    while data.len() < 4 {
        data.extend(read_some(conn, &wait)?);
    }
    let len = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
    if len > JOB_MAX || data.len() > 4 + len {
        return Err(JobError::TooLarge);
    }
    while data.len() < 4 + len {
        data.extend(read_some(conn, &wait)?);
        if data.len() > 4 + len {
            return Err(JobError::TooLarge);
        }
    }
    let job: Job =
        serde_json::from_slice(&data[4..]).map_err(|e| JobError::Malformed(e.to_string()))?;
    if job.argv.is_empty() {
        return Err(JobError::NoCommand);
    }
    Ok((job, files))
}

/// The most descriptors [`recv_with_descriptors`] takes from one message (more are closed by
/// the kernel, which then truncates the message's control data).
const DESCRIPTORS_MAX: usize = 8;

/// Receive bytes into `buf` and the descriptors that come with them, every one of them owned
/// by the result (so that none is left open in this process when the caller refuses them).
fn recv_with_descriptors(conn: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<File>)> {
    // u64s: aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((DESCRIPTORS_MAX * 4) as u32) } as usize;
    assert!(space <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points to `iov` (over `buf`) and `control` (of `space` bytes), all
    // borrowed for the call; recvmsg writes only within them.
    let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut files = Vec::new();
    // SAFETY: the CMSG_* macros walk the control data recvmsg wrote, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    // Each one is a new descriptor the kernel installed for us.
                    files.push(File::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // The ones taken close with `files`; the kernel closed the rest.
        drop(files);
        return Err(io::Error::other(format!(
            "more than {DESCRIPTORS_MAX} file descriptors came with the job"
        )));
    }
    Ok((n as usize, files))
}

/// Bytes the connection has, after `wait`; the end of the connection is an error.
fn read_some(
    conn: &UnixStream,
    wait: &dyn Fn() -> Result<(), JobError>,
) -> Result<Vec<u8>, JobError> {
    wait()?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match (&*conn).read(&mut buf) {
            Ok(0) => return Err(JobError::Malformed("it ends early".into())),
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(JobError::Io(e)),
        }
    }
}

/// Block (or unblock) SIGINT, SIGTERM and SIGHUP for this thread (and the threads and
/// programs it starts later).
fn set_stop_signals_blocked(blocked: bool) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset write into a sigset_t we own; pthread_sigmask changes
    // only this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let how = if blocked {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
        set
    }
}

// ---------------------------------------------------------------------------------------------
// The pool: `flint pool`.

/// `flint pool`: serve until SIGINT, SIGTERM or SIGHUP.
pub fn pool(options: &PoolOptions) -> ExitCode {
    match serve(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::fail(&e),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Preparing its sandbox.
    Starting,
    /// Waiting for a job.
    Ready,
    /// Running a job (no longer one of the pool's warm ones).
    Busy,
}

struct Member {
    pid: libc::pid_t,
    socket: UnixStream,
    state: State,
}

/// The listening socket, removed when dropped (if it is still this one).
struct Listener {
    socket: UnixListener,
    path: PathBuf,
    id: (u64, u64),
}

impl Listener {
    /// Listen on `path`, owner-only; refuse when a pool already listens there, replace a
    /// socket nobody listens on.
    fn bind(path: &Path) -> Result<Listener, PoolError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(PoolError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => {
                if UnixStream::connect(path).is_ok() {
                    return Err(PoolError::AlreadyListening(path.to_path_buf()));
                }
                // A pool that was killed left it.
                let _ = std::fs::remove_file(path);
            }
            Err(_) => {}
        }
        let listen_failed = |source| PoolError::Listen {
            path: path.to_path_buf(),
            source,
        };
        // Owner-only from the start. This thread is the only one yet: the umask is ours.
        // SAFETY: umask only swaps the process's file creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let socket = bound.map_err(listen_failed)?;
        let meta = std::fs::symlink_metadata(path).map_err(listen_failed)?;
        socket.set_nonblocking(true).map_err(listen_failed)?;
        Ok(Listener {
            socket,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The stop signals, readable when one arrived (they are blocked: only this reports them).
struct StopSignals(OwnedFd);

impl StopSignals {
    fn catch() -> Result<StopSignals, PoolError> {
        let set = set_stop_signals_blocked(true);
        // SAFETY: signalfd with -1 makes a new descriptor for the signals in `set`.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(PoolError::Signals(io::Error::last_os_error()));
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        Ok(StopSignals(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The signal that arrived, if one did.
    fn received(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` has room for `size` bytes.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

fn serve(options: &PoolOptions) -> Result<(), PoolError> {
    machine::images(&options.vm, &super::cache_dir())
        .map_err(|e| PoolError::Sandbox(e.to_string()))?;
    let signals = StopSignals::catch()?;
    let listener = Listener::bind(&options.socket)?;
    let mut pool = Pool {
        options,
        members: Vec::new(),
        pending: VecDeque::new(),
        failed_starts: 0,
    };
    let result = pool.serve(&signals, &listener);
    // Nothing reaches the members any more, then they go.
    drop(listener);
    pool.pending.clear();
    pool.stop_members();
    result
}

struct Pool<'a> {
    options: &'a PoolOptions,
    members: Vec<Member>,
    /// Clients waiting for a member, since when.
    pending: VecDeque<(UnixStream, Instant)>,
    failed_starts: u32,
}

impl Pool<'_> {
    fn serve(&mut self, signals: &StopSignals, listener: &Listener) -> Result<(), PoolError> {
        eprintln!(
            "flint: pool of {} on {}",
            self.options.size,
            self.options.socket.display()
        );
        loop {
            // Waiting clients first; then replacements for the members that took them.
            self.dispatch();
            for _ in self.warm()..self.wanted_warm() {
                let member = spawn_member(&self.options.vm).map_err(PoolError::Spawn)?;
                debug!("pool: started member {}", member.pid);
                self.members.push(member);
            }
            let mut fds: Vec<&dyn AsRawFd> = vec![&signals.0, &listener.socket];
            fds.extend(self.members.iter().map(|m| &m.socket as &dyn AsRawFd));
            let timeout = (!self.pending.is_empty()).then_some(Duration::from_secs(1));
            wait_readable(&fds, timeout);
            if let Some(sig) = signals.received() {
                eprintln!("flint: pool stopping on signal {sig}");
                return Ok(());
            }
            self.accept(listener);
            self.hear_members()?;
            while self
                .pending
                .front()
                .is_some_and(|(_, since)| since.elapsed() > PENDING_TIMEOUT)
            {
                self.pending.pop_front();
            }
        }
    }

    /// Members starting or ready.
    fn warm(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.state != State::Busy)
            .count()
    }

    /// How many members to keep starting or ready: `--size` less the ones running a job, but
    /// at least one. So restoring replacements does not take the CPU from running commands
    /// (a replacement starts when a job's sandbox ends), and the pool holds at most `--size`
    /// VMs unless more jobs than that run at once.
    fn wanted_warm(&self) -> usize {
        let busy = self.members.len() - self.warm();
        self.options.size.saturating_sub(busy).max(1)
    }

    /// Take the clients that connected: this user's only, as many as may wait.
    fn accept(&mut self, listener: &Listener) {
        while let Ok((conn, _)) = listener.socket.accept() {
            if !same_user(&conn) {
                log::warn!("pool: refused a client of another user");
                continue;
            }
            if self.pending.len() >= PENDING_MAX {
                log::warn!("pool: {PENDING_MAX} clients wait already; refused one");
                continue;
            }
            let _ = conn.set_nonblocking(false);
            self.pending.push_back((conn, Instant::now()));
        }
    }

    /// Hand waiting clients to ready members.
    fn dispatch(&mut self) {
        while !self.pending.is_empty() {
            let Some(member) = self.members.iter_mut().find(|m| m.state == State::Ready) else {
                return;
            };
            let (conn, _) = self.pending.pop_front().expect("not empty");
            match member.socket.send_with_fd(&[TAKE][..], conn.as_raw_fd()) {
                Ok(_) => {
                    debug!("pool: member {} took a job", member.pid);
                    member.state = State::Busy;
                }
                Err(_) => {
                    // It is going away; the next round reaps it. The client waits on.
                    member.state = State::Busy;
                    self.pending.push_front((conn, Instant::now()));
                }
            }
        }
    }

    /// Read what members said: ready, or gone (their socket's end).
    fn hear_members(&mut self) -> Result<(), PoolError> {
        let mut i = 0;
        while i < self.members.len() {
            let member = &mut self.members[i];
            let mut byte = [0u8; 1];
            let heard = (&member.socket).read(&mut byte);
            match heard {
                Ok(1) if byte[0] == READY && member.state == State::Starting => {
                    debug!("pool: member {} is ready", member.pid);
                    member.state = State::Ready;
                    self.failed_starts = 0;
                    i += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => i += 1,
                // Gone (or talking nonsense: then it goes).
                _ => {
                    let member = self.members.remove(i);
                    let started = member.state != State::Starting;
                    reap(member);
                    if !started {
                        self.failed_starts += 1;
                        if self.failed_starts >= FAILED_STARTS_MAX {
                            return Err(PoolError::FailingMembers(self.failed_starts));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// SIGTERM every member, wait for them to stop (killing those that do not in time).
    fn stop_members(&mut self) {
        for member in &self.members {
            // SAFETY: kill sends a signal to our own child, not yet reaped.
            unsafe { libc::kill(member.pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_GRACE;
        for member in self.members.drain(..) {
            let pid = member.pid;
            drop(member.socket);
            loop {
                let mut status = 0;
                // SAFETY: waitpid on our own child; `status` is a valid int.
                let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if rc != 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    // SAFETY: as above.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, &mut status, 0);
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Wait for a member whose socket closed: it is exiting.
fn reap(member: Member) {
    drop(member.socket);
    let mut status = 0;
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        // SAFETY: waitpid on our own child; `status` is a valid int.
        let rc = unsafe { libc::waitpid(member.pid, &mut status, libc::WNOHANG) };
        if rc != 0 {
            debug!("pool: member {} ended ({status:#x})", member.pid);
            return;
        }
        if Instant::now() >= deadline {
            // SAFETY: as above; it closed its socket long ago and did not exit.
            unsafe {
                libc::kill(member.pid, libc::SIGKILL);
                libc::waitpid(member.pid, &mut status, 0);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the peer of `conn` is this process's user.
fn same_user(conn: &UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    rc == 0 && cred.uid == unsafe { libc::geteuid() }
}

/// The command line of a member for `vm`.
fn member_args(vm: &RunOptions) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "pool-member".into(),
        "--vcpus".into(),
        vm.vcpus.to_string().into(),
        "--memory".into(),
        vm.mem_mib.to_string().into(),
    ];
    if let Some(kernel) = &vm.kernel {
        args.extend(["--kernel".into(), kernel.into()]);
    }
    if let Some(initramfs) = &vm.initramfs {
        args.extend(["--initramfs".into(), initramfs.into()]);
    }
    if !vmm::seccomp::enabled() {
        args.push("--no-seccomp".into());
    }
    args
}

/// Start a member: this program again, its end of a socket pair at [`MEMBER_FD`], ended
/// with SIGTERM when the pool ends.
fn spawn_member(vm: &RunOptions) -> io::Result<Member> {
    let (ours, theirs) = UnixStream::pair()?;
    // SAFETY: getpid has no preconditions.
    let pool_pid = unsafe { libc::getpid() };
    let fd = theirs.as_raw_fd();
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .args(member_args(vm))
        .stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls (fcntl,
    // dup2, prctl, getppid) and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let rc = if fd == MEMBER_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, MEMBER_FD)
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The pool may have ended before the death signal was set.
            if libc::getppid() != pool_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
    let child = command.spawn()?;
    drop(theirs);
    ours.set_nonblocking(true)?;
    Ok(Member {
        pid: child.id() as libc::pid_t,
        socket: ours,
        state: State::Starting,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_frame(job: &Job) -> Vec<u8> {
        let json = serde_json::to_vec(job).unwrap();
        let mut frame = (json.len() as u32).to_le_bytes().to_vec();
        frame.extend(json);
        frame
    }

    fn job() -> Job {
        Job {
            argv: vec!["echo".into(), "hi".into()],
            env: vec![("A".into(), "b".into())],
            workdir: Some("/tmp".into()),
            timeout_secs: Some(5),
        }
    }

    #[test]
    fn a_job_arrives_with_its_three_descriptors() {
        let (client, member) = UnixStream::pair().unwrap();
        let frame = job_frame(&job());
        let files: Vec<File> = (0..3).map(|_| File::open("/dev/null").unwrap()).collect();
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let sent = client.send_with_fds(&[&frame[..10]], &fds).unwrap();
        assert_eq!(sent, 10);
        (&client).write_all(&frame[10..]).unwrap();
        let (got, stdio) = read_job(&member).unwrap();
        assert_eq!(got, job());
        assert_eq!(stdio.len(), 3);
    }

    #[test]
    fn a_job_without_its_descriptors_or_oversized_or_silent_is_refused() {
        let (client, member) = UnixStream::pair().unwrap();
        let frame = job_frame(&job());
        let one = File::open("/dev/null").unwrap();
        client
            .send_with_fds(&[&frame[..]], &[one.as_raw_fd()])
            .unwrap();
        assert!(matches!(read_job(&member), Err(JobError::Descriptors(1))));

        let (client, member) = UnixStream::pair().unwrap();
        let files: Vec<File> = (0..4).map(|_| File::open("/dev/null").unwrap()).collect();
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        client.send_with_fds(&[&frame[..]], &fds).unwrap();
        assert!(matches!(read_job(&member), Err(JobError::Descriptors(_))));

        let (client, member) = UnixStream::pair().unwrap();
        let files: Vec<File> = (0..3).map(|_| File::open("/dev/null").unwrap()).collect();
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let huge = ((JOB_MAX + 1) as u32).to_le_bytes();
        client.send_with_fds(&[&huge[..]], &fds).unwrap();
        assert!(matches!(read_job(&member), Err(JobError::TooLarge)));

        let (client, member) = UnixStream::pair().unwrap();
        let mut empty = job();
        empty.argv.clear();
        client
            .send_with_fds(&[&job_frame(&empty)[..]], &fds)
            .unwrap();
        assert!(matches!(read_job(&member), Err(JobError::NoCommand)));

        // A frame cut short by a client that then hangs up.
        let (client, member) = UnixStream::pair().unwrap();
        client.send_with_fds(&[&frame[..8]], &fds).unwrap();
        drop(client);
        assert!(matches!(read_job(&member), Err(JobError::Malformed(_))));
    }

    #[test]
    fn the_listening_socket_is_owner_only_refuses_a_second_pool_and_goes_away() {
        let dir = std::env::temp_dir().join(format!("flint-pool-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pool.sock");
        let listener = Listener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(matches!(
            Listener::bind(&path),
            Err(PoolError::AlreadyListening(_))
        ));
        drop(listener);
        assert!(!path.exists());
        // A socket nobody listens on (a killed pool's) is replaced.
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        let listener = Listener::bind(&path).unwrap();
        drop(listener);
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            Listener::bind(&path),
            Err(PoolError::NotASocket(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
