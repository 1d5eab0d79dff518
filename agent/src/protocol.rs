//! The wire protocol between a host program and the guest agent.
//!
//! One byte stream per connection (vsock port [`AGENT_PORT`] in the guest, reached from the
//! host through flint's vsock Unix socket) carries frames
//!
//! ```text
//! [kind: u8][len: u32 little-endian][payload: len bytes]
//! ```
//!
//! with `len` at most [`MAX_PAYLOAD`]; a reader checks the length before it allocates anything.
//! Host-to-agent kinds are `0x01..`, agent-to-host kinds `0x81..`, so a frame sent the wrong
//! way is an unknown kind. Inside payloads integers are little-endian, a string is a `u32`
//! byte length followed by that many bytes of UTF-8 (never containing NUL), and a list is a
//! `u32` count followed by its elements. A payload must be consumed exactly: trailing bytes
//! are an error.
//!
//! # A connection
//!
//! A connection carries operations one after the other:
//!
//! - **exec**: `Exec` → `Started` (or `Error` when the command could not be started: the
//!   operation ends there), then any number of `Stdout`/`Stderr` in the order the command
//!   wrote them, while the host sends `Stdin`, one `StdinEof` and `Signal`s; it ends with
//!   `Exited` or `Killed`, after every byte of output. `Stdin`/`StdinEof`/`Signal` sent when no
//!   command runs are ignored. If the connection drops while a command runs, the agent kills
//!   the command's process group.
//! - **copy-in**: `CopyIn { path, mode, root }`, `FileData`..., `FileEnd` → `Ok` or `Error`.
//! - **copy-out**: `CopyOut { path, root }` → `FileData`..., `FileEnd { mode }`, or `Error`.
//! - **shutdown**: `Shutdown` → `Ok`; the agent then waits (at most
//!   [`SHUTDOWN_GRACE`]) for the host to close the connection, syncs and reboots the guest,
//!   which ends flint (with `reboot=k`) with status 0.
//! - **mount a container**: `MountContainer { id, disk, size }` → `Ok` or `Error` (see
//!   *Containers of a pod* below).
//! - **unmount a container**: `UnmountContainer { id }` → `Ok` or `Error`.
//! - **resize**: `Resize { rows, cols }` (no reply) sets the window size of the terminal of
//!   the command that runs on the connection (see *Terminals* below); ignored when none runs
//!   or it has no terminal.
//! - **container cgroup**: `ContainerCgroup { id, image_root, memory_max, pids_max }` → `Ok`
//!   or `Error` (see *Cgroups of containers* below).
//! - **container stats**: `ContainerStats { id }` → `ContainerStats(stats)` or `Error`.
//! - **refresh**: `Refresh { unix_time_ns, entropy }` → `Ok` or `Error`. Payload
//!   `[unix_time_ns: u64][entropy_len: u32][entropy: entropy_len bytes]`, with `unix_time_ns`
//!   at least [`REFRESH_MIN_TIME_NS`] and `entropy_len` within
//!   [`REFRESH_ENTROPY_MIN`]`..=`[`REFRESH_ENTROPY_MAX`]. The agent sets the guest's wall
//!   clock (`CLOCK_REALTIME`) to that time, mixes the bytes into the kernel's entropy pool
//!   (crediting 8 bits a byte) and forces the kernel's random number generator to reseed.
//!   Meant for guests restored from a snapshot, which all wake up with the snapshot's time
//!   and the same random state: the host sends it before it runs anything else. `Error` says
//!   which step failed; the agent attempts the reseed even when setting the clock failed.
//!
//! A malformed frame from the host gets an `Error` reply and the connection is closed.
//!
//! # Payloads of the requests
//!
//! ```text
//! Exec     [argv: list of string][env: list of (string, string)][workdir: option of string]
//!          [root: option of string][user: option of (uid: u32, gid: u32, groups: list of u32)]
//!          then, only when either is present:
//!          [container: option of (id: string, new_namespaces: flag)]
//!          [terminal: option of (rows: u16, cols: u16)]
//! MountContainer   [id: string][disk: string][size: u64]
//! Resize   [rows: u16][cols: u16]
//! UnmountContainer [id: string]
//! ContainerCgroup  [id: string][image_root: flag][memory_max: option of u64]
//!                  [pids_max: option of u64]
//! ContainerStats   [id: string]
//! CopyIn   [mode: u32][path: string][root: option of string]
//! CopyOut  [path: string][root: option of string]
//! ```
//!
//! where an option is a flag byte, 0 (absent) or 1 (present, the value follows).
//!
//! # Commands and files in another root
//!
//! `root` (absolute, without `..`) names a guest directory that becomes the command's root
//! directory (the sandbox of a container image mounts the image there: [`IMAGE_ROOT`]); the
//! working directory is then a path inside it, created when missing (as `docker run -w`
//! does). The paths of a copy-in or copy-out with a `root` are inside that root too and are
//! resolved as the command would see them (`..` and absolute symbolic links stay inside it),
//! so a symbolic link planted by a command cannot make the agent read or write a file
//! outside the root. `user` gives the command's numeric user, group and supplementary groups
//! (at most [`MAX_GROUPS`]; none of them `u32::MAX`); without it the command runs as root.
//!
//! # Containers of a pod
//!
//! Several containers share one guest (the containerd shim's pods), each in a root file
//! system and PID and mount namespaces of its own. `MountContainer` mounts the read-only ext4
//! disk `disk` (`/dev/vd` and one or two letters; the host has just swapped it in, so the
//! agent first waits, at most [`DISK_WAIT`], until the guest sees it `size` bytes long) under
//! an overlay whose writes stay in guest memory, at `CONTAINERS_DIR/ID/root`, with `/sys`,
//! `/dev`, `/dev/pts` and `/dev/shm` inside. An `Exec` with a `container` runs there
//! (its `root` must be absent): with `new_namespaces` it starts the container's init, as pid
//! 1 of a new PID namespace with a new mount namespace in which `/proc` is that PID
//! namespace's (there must be no live init of that container); without, it joins the
//! namespaces of the container's live init. `UnmountContainer` detaches the container's
//! mounts and removes its directory. A container id is 1 to [`MAX_CONTAINER_ID`] characters
//! of `A-Z a-z 0-9 _ . -`, not `.` or `..` (containerd's identifiers are such).
//!
//! # Terminals
//!
//! An `Exec` with a `terminal` runs the command on a new pseudo-terminal of that window size
//! (rows and columns each at most [`MAX_TERMINAL_SIZE`]; 0 means unknown, as a new terminal
//! has it): the pseudo-terminal is allocated from the `devpts` the command sees (its root's
//! or container's `/dev/pts`, else the guest's), the command is the leader of a new session
//! whose controlling terminal it is, with stdin, stdout and stderr on it. Everything it
//! writes arrives as `Stdout` (no `Stderr`), as a terminal shows it (the terminal's own
//! echo of the input and `\r\n` line ends included); `Stdin` is what is typed. `StdinEof`
//! types the terminal's end-of-file character (Ctrl-D, after a line end when the typed
//! input does not end a line) when the terminal is in canonical mode, so that a program
//! reading lines sees the end of its input; a program that put the terminal in raw mode
//! reads bytes and gets nothing. `Resize` changes the window size, and the kernel sends
//! `SIGWINCH` to the terminal's foreground process group.
//! # Cgroups of containers
//!
//! The guest agent mounts cgroup v2 at `/sys/fs/cgroup` (when the guest kernel has it) and
//! enables the `memory` and `pids` controllers for its children. `ContainerCgroup` makes (or
//! updates) container `id`'s cgroup, `container-ID`, and sets `memory.max` and `pids.max` to
//! the limits given (absent: no limit, `max`); a limit the guest cannot apply (no such
//! controller) is an `Error`. From then on every command of that container joins the
//! cgroup before it runs: an `Exec` with that `container`, or, with `image_root`, every
//! `Exec` whose `root` is [`IMAGE_ROOT`] (the container of a VM of its own). Only the
//! command's process joins (not the agent's intermediate process). `UnmountContainer`
//! removes the cgroup too.
//!
//! `ContainerStats` answers the cgroup's numbers ([`CgroupStats`]: `cpu.stat`'s usage,
//! `memory.current`, `memory.max`, fields of `memory.stat` and `memory.events`,
//! `pids.current`, `pids.max`). While a command of a container with a cgroup runs, the
//! agent watches the cgroup's `memory.events`: whenever its `oom_kill` count rises, the exec
//! stream carries `OomKills { count }` (the cgroup's total), always before the command's
//! `Exited` or `Killed`, so a host learns of an OOM kill before the exit it caused.

use std::io::{self, Read, Write};
use std::time::Duration;

pub use crate::stats::{CgroupStats, MemoryStats, PidsStats, MEMORY_EVENTS, MEMORY_STAT};

/// The vsock port the guest agent listens on (any CID).
pub const AGENT_PORT: u32 = 52;
/// Largest payload of one frame; bigger frames are rejected, never allocated.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Size of the frame header (kind + length).
pub const HEADER_LEN: usize = 5;
/// Size of the data chunks (output, stdin, file contents) the agent and the client send.
pub const DATA_CHUNK: usize = 64 * 1024;
/// How long the agent waits after answering `Shutdown` for the host to hang up before it
/// reboots the guest anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Fewest bytes of entropy a `Refresh` request carries (256 bits: a full reseed).
pub const REFRESH_ENTROPY_MIN: usize = 32;
/// Most bytes of entropy a `Refresh` request carries.
pub const REFRESH_ENTROPY_MAX: usize = 512;
/// Where the sandbox of a container image mounts the image (read-only, under a writable
/// overlay, with `/proc`, `/sys`, `/dev`, `/dev/pts` and `/dev/shm` inside); the host runs
/// the image's commands and copies its files with this as their `root`. The sandbox's
/// `/init` sets it up when the kernel command line names the image's disk
/// ([`crate::IMAGE_PARAM`]).
pub const IMAGE_ROOT: &str = "/run/flint/root";
/// The guest directory under which `MountContainer` mounts each container's root
/// (`CONTAINERS_DIR/ID/root`).
pub const CONTAINERS_DIR: &str = "/run/flint/containers";
/// Longest container id (containerd's limit for identifiers).
pub const MAX_CONTAINER_ID: usize = 76;
/// How long `MountContainer` waits for the guest to see the disk's new medium.
pub const DISK_WAIT: Duration = Duration::from_secs(10);
/// Most supplementary groups a command's [`UserSpec`] may carry.
pub const MAX_GROUPS: usize = 1024;
/// The earliest wall-clock time a `Refresh` request may set, 2000-01-01T00:00:00Z, in
/// nanoseconds since the Unix epoch: anything earlier is a broken host clock, not a time.
pub const REFRESH_MIN_TIME_NS: u64 = 946_684_800 * 1_000_000_000;
/// Most rows, and most columns, of a terminal's window size.
pub const MAX_TERMINAL_SIZE: u16 = 10_000;
/// The most `pids.max` a `ContainerCgroup` may set (the kernel's `PID_MAX_LIMIT`).
pub const MAX_PIDS: u64 = 4 * 1024 * 1024;

/// Frame kinds, host to agent.
pub mod kind {
    pub const EXEC: u8 = 0x01;
    pub const STDIN: u8 = 0x02;
    pub const STDIN_EOF: u8 = 0x03;
    pub const SIGNAL: u8 = 0x04;
    pub const COPY_IN: u8 = 0x05;
    pub const FILE_DATA_IN: u8 = 0x06;
    pub const FILE_END_IN: u8 = 0x07;
    pub const COPY_OUT: u8 = 0x08;
    pub const SHUTDOWN: u8 = 0x09;
    pub const REFRESH: u8 = 0x0a;
    pub const MOUNT_CONTAINER: u8 = 0x0b;
    pub const UNMOUNT_CONTAINER: u8 = 0x0c;
    pub const RESIZE: u8 = 0x0d;
    // Containers' cgroups (0x10..: apart from the kinds other additions take).
    pub const CONTAINER_CGROUP: u8 = 0x10;
    pub const CONTAINER_STATS: u8 = 0x11;
    // Agent to host.
    pub const STARTED: u8 = 0x81;
    pub const STDOUT: u8 = 0x82;
    pub const STDERR: u8 = 0x83;
    pub const EXITED: u8 = 0x84;
    pub const KILLED: u8 = 0x85;
    pub const ERROR: u8 = 0x86;
    pub const FILE_DATA_OUT: u8 = 0x87;
    pub const FILE_END_OUT: u8 = 0x88;
    pub const OK: u8 = 0x89;
    pub const CONTAINER_STATS_REPLY: u8 = 0x90;
    pub const OOM_KILLS: u8 = 0x91;
}

/// Why a frame is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("the frame is truncated")]
    Truncated,
    #[error("the frame's payload of {len} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    TooLarge { len: usize },
    #[error("the frame kind {0:#04x} is unknown in this direction")]
    UnknownKind(u8),
    #[error("the {0} field is not valid UTF-8")]
    BadUtf8(&'static str),
    #[error("the frame has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("the frame is invalid: {0}")]
    Invalid(&'static str),
}

/// Why reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
}

/// What to run: the host's `Exec` request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecSpec {
    /// Program and arguments; the program is looked up in the command's `PATH`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing those of) the default environment:
    /// `PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`, `HOME=/root`.
    pub env: Vec<(String, String)>,
    /// Working directory (absolute); `/` when `None`. Inside `root` when that is set.
    pub workdir: Option<String>,
    /// The guest directory that becomes the command's root directory (absolute, no `..`);
    /// the guest's own root when `None`.
    pub root: Option<String>,
    /// The command's credentials; root (uid 0, gid 0) when `None`.
    pub user: Option<UserSpec>,
    /// The container (of a pod) the command runs in, mounted by `MountContainer`; `root`
    /// is then `None`.
    pub container: Option<InContainer>,
    /// Run the command on a new terminal of this window size (see the module docs).
    pub terminal: Option<WindowSize>,
}

/// A terminal's window size, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

impl WindowSize {
    /// Each at most [`MAX_TERMINAL_SIZE`].
    fn validate(&self) -> Result<(), ProtocolError> {
        if self.rows > MAX_TERMINAL_SIZE || self.cols > MAX_TERMINAL_SIZE {
            return Err(ProtocolError::Invalid(
                "a terminal's window size exceeds 10000 rows or columns",
            ));
        }
        Ok(())
    }
}

/// Where a command of a pod's container runs (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InContainer {
    /// The container's id (see [`check_container_id`]).
    pub id: String,
    /// Start the container's init in new PID and mount namespaces; otherwise join those of
    /// its live init.
    pub new_namespaces: bool,
}

/// Numeric credentials of a command (names are resolved by the host).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserSpec {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (at most [`MAX_GROUPS`]); an empty list clears them.
    pub groups: Vec<u32>,
}

impl UserSpec {
    fn validate(&self) -> Result<(), ProtocolError> {
        // -1 means "unchanged" to the set*id system calls: never a real id.
        if self.uid == u32::MAX || self.gid == u32::MAX || self.groups.contains(&u32::MAX) {
            return Err(ProtocolError::Invalid("a user or group id is 4294967295"));
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(ProtocolError::Invalid(
                "a command has more than 1024 supplementary groups",
            ));
        }
        Ok(())
    }
}

impl ExecSpec {
    /// A spec running `argv` with the default environment in `/`.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> ExecSpec {
        ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecSpec::default()
        }
    }

    /// Add an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> ExecSpec {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Set the working directory.
    pub fn workdir(mut self, dir: impl Into<String>) -> ExecSpec {
        self.workdir = Some(dir.into());
        self
    }

    /// Run the command with its root directory changed to the guest directory `dir`.
    pub fn root(mut self, dir: impl Into<String>) -> ExecSpec {
        self.root = Some(dir.into());
        self
    }

    /// Run the command as user `uid`, group `gid` with these supplementary groups.
    pub fn user(mut self, uid: u32, gid: u32, groups: impl Into<Vec<u32>>) -> ExecSpec {
        self.user = Some(UserSpec {
            uid,
            gid,
            groups: groups.into(),
        });
        self
    }

    /// Run the command in the pod's container `id`: its init (`new_namespaces`) or a
    /// process joining the init's namespaces.
    pub fn container(mut self, id: impl Into<String>, new_namespaces: bool) -> ExecSpec {
        self.container = Some(InContainer {
            id: id.into(),
            new_namespaces,
        });
        self
    }

    /// Run the command on a new terminal of `rows` by `cols` characters.
    pub fn terminal(mut self, rows: u16, cols: u16) -> ExecSpec {
        self.terminal = Some(WindowSize { rows, cols });
        self
    }

    fn validate(&self) -> Result<(), ProtocolError> {
        if let Some(size) = &self.terminal {
            size.validate()?;
        }
        if self.argv.is_empty() {
            return Err(ProtocolError::Invalid("the command line is empty"));
        }
        if self.argv[0].is_empty() {
            return Err(ProtocolError::Invalid("the program name is empty"));
        }
        let no_nul = |s: &String| !s.contains('\0');
        if !self.argv.iter().all(no_nul) {
            return Err(ProtocolError::Invalid("an argument contains a NUL byte"));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(ProtocolError::Invalid(
                    "an environment variable name is empty or contains '=' or NUL",
                ));
            }
        }
        if let Some(dir) = &self.workdir {
            check_path(dir)?;
        }
        check_root(self.root.as_deref())?;
        if let Some(user) = &self.user {
            user.validate()?;
        }
        if let Some(container) = &self.container {
            check_container_id(&container.id)?;
            if self.root.is_some() {
                return Err(ProtocolError::Invalid(
                    "a command names both a root directory and a container",
                ));
            }
        }
        Ok(())
    }
}

/// A container id: 1 to [`MAX_CONTAINER_ID`] characters of `A-Z a-z 0-9 _ . -`, not `.` or
/// `..` (so it names exactly one directory under [`CONTAINERS_DIR`]).
pub fn check_container_id(id: &str) -> Result<(), ProtocolError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if id.is_empty()
        || id.len() > MAX_CONTAINER_ID
        || !id.chars().all(allowed)
        || id == "."
        || id == ".."
    {
        return Err(ProtocolError::Invalid(
            "a container id is not 1 to 76 characters of A-Z a-z 0-9 _ . - (or is . or ..)",
        ));
    }
    Ok(())
}

/// A container's disk: `/dev/vd` and one or two lowercase letters, `size` a positive
/// multiple of 512.
fn check_disk(disk: &str, size: u64) -> Result<(), ProtocolError> {
    let letters = disk.strip_prefix("/dev/vd").unwrap_or("");
    if !(1..=2).contains(&letters.len()) || !letters.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(ProtocolError::Invalid(
            "a container's disk is not /dev/vd and one or two letters",
        ));
    }
    if size == 0 || size % 512 != 0 {
        return Err(ProtocolError::Invalid(
            "a container's disk size is not a positive multiple of 512",
        ));
    }
    Ok(())
}

const ROOT_FLAG: &str = "the root-directory flag is not 0 or 1";

/// A root directory is an absolute guest path without `..` components.
fn check_root(root: Option<&str>) -> Result<(), ProtocolError> {
    let Some(root) = root else { return Ok(()) };
    check_path(root)?;
    if root.split('/').any(|c| c == "..") {
        return Err(ProtocolError::Invalid("a root directory contains `..`"));
    }
    Ok(())
}

/// The guest paths of copy-in, copy-out and the working directory must be absolute.
fn check_path(path: &str) -> Result<(), ProtocolError> {
    if !path.starts_with('/') {
        return Err(ProtocolError::Invalid("a guest path is not absolute"));
    }
    if path.contains('\0') {
        return Err(ProtocolError::Invalid("a guest path contains a NUL byte"));
    }
    Ok(())
}

fn check_signal(signal: i32) -> Result<(), ProtocolError> {
    if (1..=64).contains(&signal) {
        Ok(())
    } else {
        Err(ProtocolError::Invalid("a signal number is outside 1-64"))
    }
}

fn check_refresh(unix_time_ns: u64, entropy: &[u8]) -> Result<(), ProtocolError> {
    if unix_time_ns < REFRESH_MIN_TIME_NS {
        return Err(ProtocolError::Invalid(
            "a refresh time is before 2000-01-01 (the host clock is wrong)",
        ));
    }
    if !(REFRESH_ENTROPY_MIN..=REFRESH_ENTROPY_MAX).contains(&entropy.len()) {
        return Err(ProtocolError::Invalid(
            "a refresh carries fewer than 32 or more than 512 bytes of entropy",
        ));
    }
    Ok(())
}

/// A container's limits: a memory limit of at least one byte, a pids limit of 1 to
/// [`MAX_PIDS`].
fn check_limits(memory_max: Option<u64>, pids_max: Option<u64>) -> Result<(), ProtocolError> {
    if memory_max == Some(0) {
        return Err(ProtocolError::Invalid("a container's memory limit is 0"));
    }
    if pids_max.is_some_and(|p| p == 0 || p > MAX_PIDS) {
        return Err(ProtocolError::Invalid(
            "a container's pids limit is not 1 to 4194304",
        ));
    }
    Ok(())
}

fn check_mode(mode: u32) -> Result<(), ProtocolError> {
    if mode <= 0o7777 {
        Ok(())
    } else {
        Err(ProtocolError::Invalid("a file mode has bits beyond 0o7777"))
    }
}

/// Host to agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToAgent {
    /// Run a command.
    Exec(ExecSpec),
    /// Bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// Close the command's stdin.
    StdinEof,
    /// Send this signal to the command's process group.
    Signal(i32),
    /// Start writing the guest file `path` (absolute; parent directories are created) with
    /// permission bits `mode`; its contents follow as `FileData` frames and a `FileEnd`.
    /// With a `root`, `path` is inside that guest directory (see the module docs).
    CopyIn {
        path: String,
        mode: u32,
        root: Option<String>,
    },
    /// A chunk of the file being copied in.
    FileData(Vec<u8>),
    /// The end of the file being copied in.
    FileEnd,
    /// Send the guest file `path` (absolute, a regular file); with a `root`, `path` is
    /// inside that guest directory (see the module docs).
    CopyOut { path: String, root: Option<String> },
    /// Sync and reboot the guest (ends the VM).
    Shutdown,
    /// Set the guest's wall clock to `unix_time_ns` (nanoseconds since the Unix epoch, at
    /// least [`REFRESH_MIN_TIME_NS`]) and reseed the guest kernel's random number generator
    /// with `entropy` ([`REFRESH_ENTROPY_MIN`] to [`REFRESH_ENTROPY_MAX`] bytes); for a guest
    /// restored from a snapshot.
    Refresh { unix_time_ns: u64, entropy: Vec<u8> },
    /// Mount the pod container `id`'s disk `disk` (`size` bytes) as its root (see the
    /// module docs).
    MountContainer { id: String, disk: String, size: u64 },
    /// Unmount the pod container `id`'s root and remove its directory.
    UnmountContainer { id: String },
    /// Set the window size of the running command's terminal (see the module docs).
    Resize(WindowSize),
    /// Make (or update) container `id`'s cgroup with these limits (bytes, processes); with
    /// `image_root`, commands run in [`IMAGE_ROOT`] join it (see the module docs).
    ContainerCgroup {
        id: String,
        image_root: bool,
        memory_max: Option<u64>,
        pids_max: Option<u64>,
    },
    /// Answer container `id`'s cgroup's numbers.
    ContainerStats { id: String },
}

/// Agent to host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromAgent {
    /// The command runs, as process `pid` (also its process group).
    Started { pid: u32 },
    /// Bytes the command wrote to stdout.
    Stdout(Vec<u8>),
    /// Bytes the command wrote to stderr.
    Stderr(Vec<u8>),
    /// The command exited with this status (0-255).
    Exited { code: i32 },
    /// The command was terminated by this signal.
    Killed { signal: i32 },
    /// The request failed; one sentence. Before `Started` it means the command could not
    /// be started.
    Error(String),
    /// A chunk of the file being copied out.
    FileData(Vec<u8>),
    /// The end of the file being copied out, with its permission bits.
    FileEnd { mode: u32 },
    /// Copy-in, shutdown or refresh done.
    Ok,
    /// The numbers of a container's cgroup.
    ContainerStats(Box<CgroupStats>),
    /// The cgroup of the running command's container has seen this many OOM kills in all
    /// (sent when the count rises).
    OomKills { count: u64 },
}

/// A frame type of one direction.
pub trait Message: Sized {
    /// The frame kind byte.
    fn kind(&self) -> u8;
    /// Append the payload (without header) to `out`.
    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError>;
    /// Parse a payload of frame kind `kind`.
    fn decode(kind: u8, payload: &[u8]) -> Result<Self, ProtocolError>;

    /// The whole frame: header and payload.
    fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut out = vec![self.kind(), 0, 0, 0, 0];
        self.encode_payload(&mut out)?;
        let len = out.len() - HEADER_LEN;
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge { len });
        }
        out[1..HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(out)
    }
}

impl Message for ToAgent {
    fn kind(&self) -> u8 {
        match self {
            ToAgent::Exec(_) => kind::EXEC,
            ToAgent::Stdin(_) => kind::STDIN,
            ToAgent::StdinEof => kind::STDIN_EOF,
            ToAgent::Signal(_) => kind::SIGNAL,
            ToAgent::CopyIn { .. } => kind::COPY_IN,
            ToAgent::FileData(_) => kind::FILE_DATA_IN,
            ToAgent::FileEnd => kind::FILE_END_IN,
            ToAgent::CopyOut { .. } => kind::COPY_OUT,
            ToAgent::Shutdown => kind::SHUTDOWN,
            ToAgent::Refresh { .. } => kind::REFRESH,
            ToAgent::MountContainer { .. } => kind::MOUNT_CONTAINER,
            ToAgent::UnmountContainer { .. } => kind::UNMOUNT_CONTAINER,
            ToAgent::Resize(_) => kind::RESIZE,
            ToAgent::ContainerCgroup { .. } => kind::CONTAINER_CGROUP,
            ToAgent::ContainerStats { .. } => kind::CONTAINER_STATS,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        match self {
            ToAgent::Exec(spec) => {
                spec.validate()?;
                put_u32(out, spec.argv.len())?;
                for a in &spec.argv {
                    put_str(out, a)?;
                }
                put_u32(out, spec.env.len())?;
                for (k, v) in &spec.env {
                    put_str(out, k)?;
                    put_str(out, v)?;
                }
                put_opt_str(out, spec.workdir.as_deref())?;
                put_opt_str(out, spec.root.as_deref())?;
                match &spec.user {
                    None => out.push(0),
                    Some(user) => {
                        out.push(1);
                        out.extend_from_slice(&user.uid.to_le_bytes());
                        out.extend_from_slice(&user.gid.to_le_bytes());
                        put_u32(out, user.groups.len())?;
                        for g in &user.groups {
                            out.extend_from_slice(&g.to_le_bytes());
                        }
                    }
                }
                // Both absent, nothing: the request is then what hosts and agents without
                // containers and terminals send and read.
                if spec.container.is_some() || spec.terminal.is_some() {
                    match &spec.container {
                        None => out.push(0),
                        Some(container) => {
                            out.push(1);
                            put_str(out, &container.id)?;
                            out.push(u8::from(container.new_namespaces));
                        }
                    }
                    match &spec.terminal {
                        None => out.push(0),
                        Some(size) => {
                            out.push(1);
                            put_size(out, size);
                        }
                    }
                }
            }
            ToAgent::Stdin(data) | ToAgent::FileData(data) => put_data(out, data)?,
            ToAgent::StdinEof | ToAgent::FileEnd | ToAgent::Shutdown => {}
            ToAgent::Signal(signal) => {
                check_signal(*signal)?;
                out.extend_from_slice(&signal.to_le_bytes());
            }
            ToAgent::CopyIn { path, mode, root } => {
                check_mode(*mode)?;
                check_path(path)?;
                check_root(root.as_deref())?;
                out.extend_from_slice(&mode.to_le_bytes());
                put_str(out, path)?;
                put_opt_str(out, root.as_deref())?;
            }
            ToAgent::CopyOut { path, root } => {
                check_path(path)?;
                check_root(root.as_deref())?;
                put_str(out, path)?;
                put_opt_str(out, root.as_deref())?;
            }
            ToAgent::Refresh {
                unix_time_ns,
                entropy,
            } => {
                check_refresh(*unix_time_ns, entropy)?;
                out.extend_from_slice(&unix_time_ns.to_le_bytes());
                put_u32(out, entropy.len())?;
                put_data(out, entropy)?;
            }
            ToAgent::MountContainer { id, disk, size } => {
                check_container_id(id)?;
                check_disk(disk, *size)?;
                put_str(out, id)?;
                put_str(out, disk)?;
                out.extend_from_slice(&size.to_le_bytes());
            }
            ToAgent::UnmountContainer { id } | ToAgent::ContainerStats { id } => {
                check_container_id(id)?;
                put_str(out, id)?;
            }
            ToAgent::Resize(size) => {
                size.validate()?;
                put_size(out, size);
            }
            ToAgent::ContainerCgroup {
                id,
                image_root,
                memory_max,
                pids_max,
            } => {
                check_container_id(id)?;
                check_limits(*memory_max, *pids_max)?;
                put_str(out, id)?;
                out.push(u8::from(*image_root));
                put_opt_u64(out, *memory_max);
                put_opt_u64(out, *pids_max);
            }
        }
        Ok(())
    }

    fn decode(kind: u8, payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut d = Decoder::new(payload)?;
        let msg = match kind {
            kind::EXEC => {
                let mut spec = ExecSpec::default();
                // Every element takes at least 4 bytes, so the loops end with the payload.
                for _ in 0..d.u32()? {
                    spec.argv.push(d.string("argument")?);
                }
                for _ in 0..d.u32()? {
                    let k = d.string("environment name")?;
                    let v = d.string("environment value")?;
                    spec.env.push((k, v));
                }
                spec.workdir = d.opt_string(
                    "working directory",
                    "the working-directory flag is not 0 or 1",
                )?;
                spec.root = d.opt_string("root directory", ROOT_FLAG)?;
                spec.user = match d.flag("the user flag is not 0 or 1")? {
                    false => None,
                    true => {
                        let uid = d.u32()?;
                        let gid = d.u32()?;
                        let count = d.u32()? as usize;
                        if count > MAX_GROUPS {
                            return Err(ProtocolError::Invalid(
                                "a command has more than 1024 supplementary groups",
                            ));
                        }
                        let groups = (0..count).map(|_| d.u32()).collect::<Result<_, _>>()?;
                        Some(UserSpec { uid, gid, groups })
                    }
                };
                if !d.is_empty() {
                    spec.container = match d.flag("the container flag is not 0 or 1")? {
                        false => None,
                        true => Some(InContainer {
                            id: d.string("container id")?,
                            new_namespaces: d.flag("the new-namespaces flag is not 0 or 1")?,
                        }),
                    };
                    spec.terminal = match d.flag("the terminal flag is not 0 or 1")? {
                        false => None,
                        true => Some(d.size()?),
                    };
                }
                spec.validate()?;
                ToAgent::Exec(spec)
            }
            kind::STDIN => ToAgent::Stdin(d.rest()),
            kind::STDIN_EOF => ToAgent::StdinEof,
            kind::SIGNAL => {
                let signal = d.i32()?;
                check_signal(signal)?;
                ToAgent::Signal(signal)
            }
            kind::COPY_IN => {
                let mode = d.u32()?;
                check_mode(mode)?;
                let path = d.string("path")?;
                check_path(&path)?;
                let root = d.opt_string("root directory", ROOT_FLAG)?;
                check_root(root.as_deref())?;
                ToAgent::CopyIn { path, mode, root }
            }
            kind::FILE_DATA_IN => ToAgent::FileData(d.rest()),
            kind::FILE_END_IN => ToAgent::FileEnd,
            kind::COPY_OUT => {
                let path = d.string("path")?;
                check_path(&path)?;
                let root = d.opt_string("root directory", ROOT_FLAG)?;
                check_root(root.as_deref())?;
                ToAgent::CopyOut { path, root }
            }
            kind::SHUTDOWN => ToAgent::Shutdown,
            kind::REFRESH => {
                let unix_time_ns = d.u64()?;
                let len = d.u32()? as usize;
                let entropy = d.take(len)?.to_vec();
                check_refresh(unix_time_ns, &entropy)?;
                ToAgent::Refresh {
                    unix_time_ns,
                    entropy,
                }
            }
            kind::MOUNT_CONTAINER => {
                let id = d.string("container id")?;
                check_container_id(&id)?;
                let disk = d.string("disk")?;
                let size = d.u64()?;
                check_disk(&disk, size)?;
                ToAgent::MountContainer { id, disk, size }
            }
            kind::UNMOUNT_CONTAINER => {
                let id = d.string("container id")?;
                check_container_id(&id)?;
                ToAgent::UnmountContainer { id }
            }
            kind::RESIZE => ToAgent::Resize(d.size()?),
            kind::CONTAINER_CGROUP => {
                let id = d.string("container id")?;
                check_container_id(&id)?;
                let image_root = d.flag("the image-root flag is not 0 or 1")?;
                let memory_max = d.opt_u64("the memory-limit flag is not 0 or 1")?;
                let pids_max = d.opt_u64("the pids-limit flag is not 0 or 1")?;
                check_limits(memory_max, pids_max)?;
                ToAgent::ContainerCgroup {
                    id,
                    image_root,
                    memory_max,
                    pids_max,
                }
            }
            kind::CONTAINER_STATS => {
                let id = d.string("container id")?;
                check_container_id(&id)?;
                ToAgent::ContainerStats { id }
            }
            other => return Err(ProtocolError::UnknownKind(other)),
        };
        d.finish()?;
        Ok(msg)
    }
}

impl Message for FromAgent {
    fn kind(&self) -> u8 {
        match self {
            FromAgent::Started { .. } => kind::STARTED,
            FromAgent::Stdout(_) => kind::STDOUT,
            FromAgent::Stderr(_) => kind::STDERR,
            FromAgent::Exited { .. } => kind::EXITED,
            FromAgent::Killed { .. } => kind::KILLED,
            FromAgent::Error(_) => kind::ERROR,
            FromAgent::FileData(_) => kind::FILE_DATA_OUT,
            FromAgent::FileEnd { .. } => kind::FILE_END_OUT,
            FromAgent::Ok => kind::OK,
            FromAgent::ContainerStats(_) => kind::CONTAINER_STATS_REPLY,
            FromAgent::OomKills { .. } => kind::OOM_KILLS,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        match self {
            FromAgent::Started { pid } => out.extend_from_slice(&pid.to_le_bytes()),
            FromAgent::Stdout(data) | FromAgent::Stderr(data) | FromAgent::FileData(data) => {
                put_data(out, data)?
            }
            FromAgent::Exited { code } => out.extend_from_slice(&code.to_le_bytes()),
            FromAgent::Killed { signal } => {
                check_signal(*signal)?;
                out.extend_from_slice(&signal.to_le_bytes());
            }
            FromAgent::Error(message) => put_str(out, message)?,
            FromAgent::FileEnd { mode } => {
                check_mode(*mode)?;
                out.extend_from_slice(&mode.to_le_bytes());
            }
            FromAgent::Ok => {}
            FromAgent::ContainerStats(stats) => {
                stats.validate()?;
                stats.encode(out);
            }
            FromAgent::OomKills { count } => out.extend_from_slice(&count.to_le_bytes()),
        }
        Ok(())
    }

    fn decode(kind: u8, payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut d = Decoder::new(payload)?;
        let msg = match kind {
            kind::STARTED => FromAgent::Started { pid: d.u32()? },
            kind::STDOUT => FromAgent::Stdout(d.rest()),
            kind::STDERR => FromAgent::Stderr(d.rest()),
            kind::EXITED => {
                let code = d.i32()?;
                if !(0..=255).contains(&code) {
                    return Err(ProtocolError::Invalid("an exit status is outside 0-255"));
                }
                FromAgent::Exited { code }
            }
            kind::KILLED => {
                let signal = d.i32()?;
                check_signal(signal)?;
                FromAgent::Killed { signal }
            }
            kind::ERROR => FromAgent::Error(d.string("error message")?),
            kind::FILE_DATA_OUT => FromAgent::FileData(d.rest()),
            kind::FILE_END_OUT => {
                let mode = d.u32()?;
                check_mode(mode)?;
                FromAgent::FileEnd { mode }
            }
            kind::OK => FromAgent::Ok,
            kind::CONTAINER_STATS_REPLY => {
                let stats = CgroupStats::decode(&mut d)?;
                stats.validate()?;
                FromAgent::ContainerStats(Box::new(stats))
            }
            kind::OOM_KILLS => FromAgent::OomKills { count: d.u64()? },
            other => return Err(ProtocolError::UnknownKind(other)),
        };
        d.finish()?;
        Ok(msg)
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) -> Result<(), ProtocolError> {
    if n > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge { len: n });
    }
    out.extend_from_slice(&(n as u32).to_le_bytes());
    Ok(())
}

fn put_size(out: &mut Vec<u8>, size: &WindowSize) {
    out.extend_from_slice(&size.rows.to_le_bytes());
    out.extend_from_slice(&size.cols.to_le_bytes());
}

/// An optional number: a flag byte, then the number when present.
fn put_opt_u64(out: &mut Vec<u8>, n: Option<u64>) {
    match n {
        None => out.push(0),
        Some(n) => {
            out.push(1);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), ProtocolError> {
    put_u32(out, s.len())?;
    put_data(out, s.as_bytes())
}

/// An option: a flag byte, then the string when present.
fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) -> Result<(), ProtocolError> {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s)?;
        }
    }
    Ok(())
}

fn put_data(out: &mut Vec<u8>, data: &[u8]) -> Result<(), ProtocolError> {
    // Checked before copying so that a huge buffer is refused, not duplicated.
    let len = out.len() - HEADER_LEN + data.len();
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge { len });
    }
    out.extend_from_slice(data);
    Ok(())
}

/// A cursor over a payload.
pub(crate) struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    fn new(buf: &'a [u8]) -> Result<Self, ProtocolError> {
        if buf.len() > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge { len: buf.len() });
        }
        Ok(Decoder { buf })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if n > self.buf.len() {
            return Err(ProtocolError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// A window size, checked.
    fn size(&mut self) -> Result<WindowSize, ProtocolError> {
        let size = WindowSize {
            rows: self.u16()?,
            cols: self.u16()?,
        };
        size.validate()?;
        Ok(size)
    }

    fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(self.u32()? as i32)
    }

    fn string(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::BadUtf8(field))
    }

    /// The flag byte of an option: 0 or 1; anything else is `Invalid(bad)`.
    pub(crate) fn flag(&mut self, bad: &'static str) -> Result<bool, ProtocolError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtocolError::Invalid(bad)),
        }
    }

    /// An optional string: its flag (see [`flag`](Self::flag)), then the string.
    fn opt_string(
        &mut self,
        field: &'static str,
        bad: &'static str,
    ) -> Result<Option<String>, ProtocolError> {
        match self.flag(bad)? {
            false => Ok(None),
            true => self.string(field).map(Some),
        }
    }

    /// An optional number: its flag (see [`flag`](Self::flag)), then the number.
    fn opt_u64(&mut self, bad: &'static str) -> Result<Option<u64>, ProtocolError> {
        match self.flag(bad)? {
            false => Ok(None),
            true => self.u64().map(Some),
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).to_vec()
    }

    fn finish(&self) -> Result<(), ProtocolError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(ProtocolError::TrailingBytes(n)),
        }
    }
}

/// Parse a frame header: the kind and the payload length (checked against [`MAX_PAYLOAD`]).
pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(u8, usize), ProtocolError> {
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge { len });
    }
    Ok((header[0], len))
}

/// Decode one frame from the start of `buf`: `Ok(None)` when `buf` holds only part of a
/// frame so far, otherwise the message and how many bytes it took.
pub fn decode_frame<M: Message>(buf: &[u8]) -> Result<Option<(M, usize)>, ProtocolError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let (kind, len) = parse_header(header)?;
    let Some(payload) = buf[HEADER_LEN..].get(..len) else {
        return Ok(None);
    };
    Ok(Some((M::decode(kind, payload)?, HEADER_LEN + len)))
}

/// Read one frame from a stream: `Ok(None)` on a clean end of stream (before a frame
/// starts); an end of stream inside a frame is [`ProtocolError::Truncated`].
pub fn read_message<M: Message, R: Read + ?Sized>(r: &mut R) -> Result<Option<M>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, len) = parse_header(&header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Protocol(ProtocolError::Truncated),
        _ => FrameError::Io(e),
    })?;
    Ok(Some(M::decode(kind, &payload)?))
}

/// Encode `msg` and write the whole frame with one `write_all`.
pub fn write_message<M: Message, W: Write + ?Sized>(w: &mut W, msg: &M) -> Result<(), FrameError> {
    let frame = msg.encode()?;
    w.write_all(&frame)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn all_to_agent() -> Vec<ToAgent> {
        vec![
            ToAgent::Exec(ExecSpec::new(["sh", "-c", "echo hi"])),
            ToAgent::Exec(
                ExecSpec::new(["/bin/true"])
                    .env("A", "1")
                    .env("EMPTY", "")
                    .env("UNICODE", "é✓")
                    .workdir("/tmp/x y"),
            ),
            ToAgent::Stdin(vec![]),
            ToAgent::Stdin(vec![0, 1, 2, 255]),
            ToAgent::StdinEof,
            ToAgent::Signal(2),
            ToAgent::Signal(64),
            ToAgent::Exec(
                ExecSpec::new(["python3"])
                    .root(IMAGE_ROOT)
                    .workdir("/app")
                    .user(1000, 100, [27, 100, 0]),
            ),
            ToAgent::Exec(ExecSpec::new(["id"]).user(0, 0, [])),
            ToAgent::Exec(ExecSpec::new(["id"]).user(
                u32::MAX - 1,
                u32::MAX - 1,
                (0..MAX_GROUPS as u32).collect::<Vec<_>>(),
            )),
            ToAgent::Exec(ExecSpec::new(["ls"]).root("/")),
            ToAgent::Exec(ExecSpec::new(["sh"]).container("c-1.x_Y", true)),
            ToAgent::Exec(ExecSpec::new(["ps"]).container("a".repeat(MAX_CONTAINER_ID), false)),
            ToAgent::MountContainer {
                id: "0123abcd".into(),
                disk: "/dev/vdb".into(),
                size: 4096,
            },
            ToAgent::MountContainer {
                id: "x".into(),
                disk: "/dev/vdaa".into(),
                size: 1 << 40,
            },
            ToAgent::UnmountContainer { id: "x".into() },
            ToAgent::Exec(ExecSpec::new(["sh"]).terminal(0, 0)),
            ToAgent::Exec(ExecSpec::new(["sh"]).container("c", true).terminal(24, 80)),
            ToAgent::Resize(WindowSize {
                rows: 1,
                cols: 10_000,
            }),
            ToAgent::ContainerCgroup {
                id: "c1".into(),
                image_root: true,
                memory_max: Some(64 << 20),
                pids_max: Some(MAX_PIDS),
            },
            ToAgent::ContainerCgroup {
                id: "c1".into(),
                image_root: false,
                memory_max: None,
                pids_max: None,
            },
            ToAgent::ContainerStats { id: "c1".into() },
            ToAgent::CopyIn {
                path: "/a/b".into(),
                mode: 0o4755,
                root: None,
            },
            ToAgent::CopyIn {
                path: "/a/../b".into(),
                mode: 0o600,
                root: Some(IMAGE_ROOT.into()),
            },
            ToAgent::FileData(vec![7; DATA_CHUNK]),
            ToAgent::FileEnd,
            ToAgent::CopyOut {
                path: "/etc/passwd".into(),
                root: None,
            },
            ToAgent::CopyOut {
                path: "/etc/passwd".into(),
                root: Some("/run/x y/é".into()),
            },
            ToAgent::Shutdown,
            ToAgent::Refresh {
                unix_time_ns: REFRESH_MIN_TIME_NS,
                entropy: vec![0xa5; REFRESH_ENTROPY_MIN],
            },
            ToAgent::Refresh {
                unix_time_ns: u64::MAX,
                entropy: (0..REFRESH_ENTROPY_MAX).map(|i| i as u8).collect(),
            },
        ]
    }

    fn all_from_agent() -> Vec<FromAgent> {
        vec![
            FromAgent::Started { pid: 4242 },
            FromAgent::Stdout(b"out\n".to_vec()),
            FromAgent::Stderr(vec![]),
            FromAgent::Exited { code: 0 },
            FromAgent::Exited { code: 255 },
            FromAgent::Killed { signal: 9 },
            FromAgent::Error("cannot run `x`: No such file or directory".into()),
            FromAgent::FileData(vec![1; 1000]),
            FromAgent::FileEnd { mode: 0o644 },
            FromAgent::Ok,
            FromAgent::ContainerStats(Box::new(CgroupStats {
                cpu_usage_usec: 10,
                cpu_user_usec: 6,
                cpu_system_usec: 4,
                memory: Some(MemoryStats {
                    current: 1 << 20,
                    max: None,
                    ..MemoryStats::default()
                }),
                pids: Some(PidsStats {
                    current: 1,
                    max: Some(10),
                }),
            })),
            FromAgent::ContainerStats(Box::default()),
            FromAgent::OomKills { count: 0 },
            FromAgent::OomKills { count: u64::MAX },
        ]
    }

    #[test]
    fn round_trips() {
        for msg in all_to_agent() {
            let bytes = msg.encode().unwrap();
            assert_eq!(bytes[0], msg.kind());
            let (back, used) = decode_frame::<ToAgent>(&bytes).unwrap().unwrap();
            assert_eq!(back, msg);
            assert_eq!(used, bytes.len());
            let mut r = &bytes[..];
            assert_eq!(read_message::<ToAgent, _>(&mut r).unwrap().unwrap(), msg);
            assert!(read_message::<ToAgent, _>(&mut r).unwrap().is_none());
        }
        for msg in all_from_agent() {
            let bytes = msg.encode().unwrap();
            let (back, used) = decode_frame::<FromAgent>(&bytes).unwrap().unwrap();
            assert_eq!(back, msg);
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn stream_of_frames() {
        let mut stream = Vec::new();
        for msg in all_from_agent() {
            write_message(&mut stream, &msg).unwrap();
        }
        let mut r = &stream[..];
        let mut got = Vec::new();
        while let Some(m) = read_message::<FromAgent, _>(&mut r).unwrap() {
            got.push(m);
        }
        assert_eq!(got, all_from_agent());
    }

    #[test]
    fn short_frames_wait_or_fail() {
        let bytes = ToAgent::Exec(ExecSpec::new(["ls", "-l"])).encode().unwrap();
        for cut in 0..bytes.len() {
            // Incrementally: not yet a frame.
            assert!(decode_frame::<ToAgent>(&bytes[..cut]).unwrap().is_none());
            // From a stream that ends there: truncated (or a clean end at 0).
            let mut r = &bytes[..cut];
            match read_message::<ToAgent, _>(&mut r) {
                Ok(None) => assert_eq!(cut, 0),
                Err(FrameError::Protocol(ProtocolError::Truncated)) => assert!(cut > 0),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn payloads_shorter_than_their_fields() {
        let cases: &[(u8, &[u8])] = &[
            (kind::SIGNAL, &[2, 0]),
            (kind::EXEC, &[]),
            (kind::EXEC, &[1, 0, 0, 0]), // one argument, missing
            (kind::EXEC, &[1, 0, 0, 0, 5, 0, 0, 0, b'a']), // string shorter than its length
            (kind::EXEC, &[1, 0, 0, 0, 1, 0, 0, 0, b'a', 0, 0, 0, 0]), // no workdir flag
            (kind::COPY_IN, &[0xa4, 1, 0]),
            (kind::COPY_OUT, &[9, 0, 0, 0, b'/']),
            (kind::REFRESH, &[]),
            (kind::REFRESH, &[0, 0, 0, 0, 0, 0, 0]), // a 7-byte time
            (kind::REFRESH, &[0, 0, 0, 0, 0, 0, 0, 0x40, 32, 0]), // a 2-byte length
            (
                kind::REFRESH,
                &[0, 0, 0, 0, 0, 0, 0, 0x40, 32, 0, 0, 0, 1, 2],
            ), // 2 of 32 bytes
        ];
        for (k, p) in cases {
            assert_eq!(
                ToAgent::decode(*k, p),
                Err(ProtocolError::Truncated),
                "kind {k:#x} payload {p:?}"
            );
        }
        for (k, p) in [
            (kind::STARTED, &[1u8][..]),
            (kind::EXITED, &[]),
            (kind::KILLED, &[9, 0, 0]),
            (kind::FILE_END_OUT, &[0]),
            (kind::ERROR, &[4, 0, 0, 0, b'x']),
        ] {
            assert_eq!(FromAgent::decode(k, p), Err(ProtocolError::Truncated));
        }
    }

    #[test]
    fn refresh_layout() {
        let time: u64 = 1_700_000_000_123_456_789;
        let entropy: Vec<u8> = (1..=32).collect();
        let bytes = ToAgent::Refresh {
            unix_time_ns: time,
            entropy: entropy.clone(),
        }
        .encode()
        .unwrap();
        let mut want = frame(kind::REFRESH, &[]);
        want[1..HEADER_LEN].copy_from_slice(&(8u32 + 4 + 32).to_le_bytes());
        want.extend_from_slice(&time.to_le_bytes());
        want.extend_from_slice(&32u32.to_le_bytes());
        want.extend_from_slice(&entropy);
        assert_eq!(bytes, want);
        assert_eq!(kind::REFRESH, 0x0a);
    }

    #[test]
    fn refresh_values_are_checked_both_ways() {
        let payload = |time: u64, entropy: &[u8]| {
            let mut p = time.to_le_bytes().to_vec();
            p.extend_from_slice(&(entropy.len() as u32).to_le_bytes());
            p.extend_from_slice(entropy);
            p
        };
        let ok_time = REFRESH_MIN_TIME_NS;
        for (time, len) in [
            (0, 64),                       // the epoch: a host clock that was never set
            (REFRESH_MIN_TIME_NS - 1, 64), // just before 2000
            (ok_time, 0),
            (ok_time, REFRESH_ENTROPY_MIN - 1),
            (ok_time, REFRESH_ENTROPY_MAX + 1),
            (ok_time, 4096),
        ] {
            let entropy = vec![1; len];
            assert!(
                matches!(
                    ToAgent::decode(kind::REFRESH, &payload(time, &entropy)),
                    Err(ProtocolError::Invalid(_))
                ),
                "time {time} entropy {len}"
            );
            assert!(
                matches!(
                    ToAgent::Refresh {
                        unix_time_ns: time,
                        entropy
                    }
                    .encode(),
                    Err(ProtocolError::Invalid(_))
                ),
                "time {time} entropy {len}"
            );
        }
        for len in [REFRESH_ENTROPY_MIN, 64, REFRESH_ENTROPY_MAX] {
            let entropy = vec![7; len];
            assert_eq!(
                ToAgent::decode(kind::REFRESH, &payload(ok_time, &entropy)),
                Ok(ToAgent::Refresh {
                    unix_time_ns: ok_time,
                    entropy
                })
            );
        }
        // A length that claims more than the payload holds is truncation, not an allocation.
        let mut p = payload(ok_time, &[1; 32]);
        p[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            ToAgent::decode(kind::REFRESH, &p),
            Err(ProtocolError::Truncated)
        );
        // Entropy bytes past the stated length are trailing bytes.
        let mut p = payload(ok_time, &[1; 32]);
        p.push(0);
        assert_eq!(
            ToAgent::decode(kind::REFRESH, &p),
            Err(ProtocolError::TrailingBytes(1))
        );
        // The messages name the problem in one sentence.
        for e in [
            ToAgent::decode(kind::REFRESH, &payload(0, &[1; 32])).unwrap_err(),
            ToAgent::decode(kind::REFRESH, &payload(ok_time, &[1; 8])).unwrap_err(),
        ] {
            let s = e.to_string();
            assert!(s.contains("refresh") && !s.contains('\n'), "{s}");
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut header = [kind::STDIN, 0, 0, 0, 0];
        header[1..].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert_eq!(
            parse_header(&header),
            Err(ProtocolError::TooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
        // A reader that claims 4 GiB: refused from the header alone.
        header[1..].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = &header[..];
        assert!(matches!(
            read_message::<ToAgent, _>(&mut r),
            Err(FrameError::Protocol(ProtocolError::TooLarge { .. }))
        ));
        assert!(matches!(
            decode_frame::<FromAgent>(&header),
            Err(ProtocolError::TooLarge { .. })
        ));
        // Exactly the limit is fine.
        let max = ToAgent::Stdin(vec![0; MAX_PAYLOAD]).encode().unwrap();
        assert_eq!(max.len(), HEADER_LEN + MAX_PAYLOAD);
        let mut r = &max[..];
        assert!(read_message::<ToAgent, _>(&mut r).unwrap().is_some());
        // Encoding refuses what decoding would.
        assert_eq!(
            ToAgent::Stdin(vec![0; MAX_PAYLOAD + 1]).encode(),
            Err(ProtocolError::TooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
        let huge_argv = ExecSpec::new(vec!["x".repeat(1000); 1100]);
        assert!(matches!(
            ToAgent::Exec(huge_argv).encode(),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_kinds_and_wrong_direction() {
        for k in [0u8, 0x0e, 0x7f, 0x80, 0x8a, 0xff] {
            assert_eq!(ToAgent::decode(k, &[]), Err(ProtocolError::UnknownKind(k)));
            assert_eq!(
                FromAgent::decode(k, &[]),
                Err(ProtocolError::UnknownKind(k))
            );
        }
        // Host kinds are unknown to the host reader and the other way round.
        assert_eq!(
            FromAgent::decode(kind::SHUTDOWN, &[]),
            Err(ProtocolError::UnknownKind(kind::SHUTDOWN))
        );
        assert_eq!(
            ToAgent::decode(kind::OK, &[]),
            Err(ProtocolError::UnknownKind(kind::OK))
        );
        assert_eq!(
            FromAgent::decode(kind::REFRESH, &[]),
            Err(ProtocolError::UnknownKind(kind::REFRESH))
        );
        let mut r = &frame(0x42, b"abc")[..];
        assert!(matches!(
            read_message::<ToAgent, _>(&mut r),
            Err(FrameError::Protocol(ProtocolError::UnknownKind(0x42)))
        ));
    }

    #[test]
    fn bad_utf8_in_strings() {
        let bad = [2, 0, 0, 0, 0xc3, 0x28];
        let mut exec = vec![1, 0, 0, 0];
        exec.extend_from_slice(&bad);
        exec.extend_from_slice(&[0, 0, 0, 0, 0]);
        assert_eq!(
            ToAgent::decode(kind::EXEC, &exec),
            Err(ProtocolError::BadUtf8("argument"))
        );
        let mut env = vec![1, 0, 0, 0, 1, 0, 0, 0, b'x', 1, 0, 0, 0];
        env.extend_from_slice(&[1, 0, 0, 0, b'K']);
        env.extend_from_slice(&bad);
        env.push(0);
        assert_eq!(
            ToAgent::decode(kind::EXEC, &env),
            Err(ProtocolError::BadUtf8("environment value"))
        );
        let mut workdir = vec![1, 0, 0, 0, 1, 0, 0, 0, b'x', 0, 0, 0, 0, 1];
        workdir.extend_from_slice(&bad);
        assert_eq!(
            ToAgent::decode(kind::EXEC, &workdir),
            Err(ProtocolError::BadUtf8("working directory"))
        );
        let mut copy_in = vec![0xa4, 1, 0, 0];
        copy_in.extend_from_slice(&bad);
        assert_eq!(
            ToAgent::decode(kind::COPY_IN, &copy_in),
            Err(ProtocolError::BadUtf8("path"))
        );
        assert_eq!(
            ToAgent::decode(kind::COPY_OUT, &bad),
            Err(ProtocolError::BadUtf8("path"))
        );
        assert_eq!(
            FromAgent::decode(kind::ERROR, &bad),
            Err(ProtocolError::BadUtf8("error message"))
        );
    }

    #[test]
    fn trailing_bytes_and_invalid_values() {
        assert_eq!(
            ToAgent::decode(kind::STDIN_EOF, &[0]),
            Err(ProtocolError::TrailingBytes(1))
        );
        assert_eq!(
            ToAgent::decode(kind::SIGNAL, &[2, 0, 0, 0, 9]),
            Err(ProtocolError::TrailingBytes(1))
        );
        assert_eq!(
            FromAgent::decode(kind::OK, &[1, 2]),
            Err(ProtocolError::TrailingBytes(2))
        );
        let invalid = |r: Result<ToAgent, ProtocolError>| {
            assert!(matches!(r, Err(ProtocolError::Invalid(_))), "{r:?}")
        };
        invalid(ToAgent::decode(kind::SIGNAL, &0i32.to_le_bytes()));
        invalid(ToAgent::decode(kind::SIGNAL, &65i32.to_le_bytes()));
        invalid(ToAgent::decode(
            kind::EXEC,
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        )); // no argv
        invalid(ToAgent::decode(
            kind::EXEC,
            &[1, 0, 0, 0, 1, 0, 0, 0, b'x', 0, 0, 0, 0, 2], // workdir flag 2
        ));
        invalid(ToAgent::decode(
            kind::EXEC,
            &[
                1, 0, 0, 0, 1, 0, 0, 0, b'x', 0, 0, 0, 0, 1, 1, 0, 0, 0, b'r', 0, 0,
            ], // relative
        ));
        invalid(ToAgent::decode(
            kind::COPY_OUT,
            &[3, 0, 0, 0, b'a', b'/', b'b'],
        ));
        invalid(ToAgent::decode(
            kind::COPY_IN,
            &[0, 0x10, 0, 0, 2, 0, 0, 0, b'/', b'a'],
        ));
        assert!(matches!(
            FromAgent::decode(kind::EXITED, &256i32.to_le_bytes()),
            Err(ProtocolError::Invalid(_))
        ));
        assert!(matches!(
            FromAgent::decode(kind::KILLED, &0i32.to_le_bytes()),
            Err(ProtocolError::Invalid(_))
        ));
        // The encoder refuses the same things.
        for bad in [
            ToAgent::Exec(ExecSpec::default()),
            ToAgent::Exec(ExecSpec::new(["a\0b"])),
            ToAgent::Exec(ExecSpec::new(["x"]).env("A=B", "c")),
            ToAgent::Exec(ExecSpec::new(["x"]).env("", "c")),
            ToAgent::Exec(ExecSpec::new(["x"]).workdir("tmp")),
            ToAgent::Signal(0),
            ToAgent::CopyIn {
                path: "/x".into(),
                mode: 0o10000,
                root: None,
            },
            ToAgent::CopyOut {
                path: "x".into(),
                root: None,
            },
            ToAgent::Exec(ExecSpec::new(["x"]).container("", true)),
            ToAgent::Exec(ExecSpec::new(["x"]).container("..", true)),
            ToAgent::Exec(ExecSpec::new(["x"]).container("a/b", false)),
            ToAgent::Exec(ExecSpec::new(["x"]).container("a".repeat(77), false)),
            ToAgent::Exec(ExecSpec::new(["x"]).root("/r").container("c", false)),
            ToAgent::MountContainer {
                id: "c".into(),
                disk: "/dev/sda".into(),
                size: 512,
            },
            ToAgent::MountContainer {
                id: "c".into(),
                disk: "/dev/vd../x".into(),
                size: 512,
            },
            ToAgent::MountContainer {
                id: "c".into(),
                disk: "/dev/vdb".into(),
                size: 511,
            },
            ToAgent::UnmountContainer { id: "../x".into() },
            ToAgent::ContainerStats { id: "".into() },
            ToAgent::ContainerCgroup {
                id: "c".into(),
                image_root: false,
                memory_max: Some(0),
                pids_max: None,
            },
            ToAgent::ContainerCgroup {
                id: "c".into(),
                image_root: false,
                memory_max: None,
                pids_max: Some(0),
            },
            ToAgent::ContainerCgroup {
                id: "c".into(),
                image_root: false,
                memory_max: None,
                pids_max: Some(MAX_PIDS + 1),
            },
            ToAgent::ContainerCgroup {
                id: "a/b".into(),
                image_root: true,
                memory_max: None,
                pids_max: None,
            },
        ] {
            assert!(
                matches!(bad.encode(), Err(ProtocolError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    /// The payload of `Exec(["x"])` up to the workdir flag, then `rest`.
    fn exec_payload(rest: &[u8]) -> Vec<u8> {
        let mut p = vec![1, 0, 0, 0, 1, 0, 0, 0, b'x', 0, 0, 0, 0, 0];
        p.extend_from_slice(rest);
        p
    }

    #[test]
    fn exec_root_and_user_layout() {
        let spec = ExecSpec::new(["x"]).root("/r").user(7, 8, [9, 10]);
        let bytes = ToAgent::Exec(spec.clone()).encode().unwrap();
        let mut want = exec_payload(&[1, 2, 0, 0, 0, b'/', b'r', 1]);
        for n in [7u32, 8, 2, 9, 10] {
            want.extend_from_slice(&n.to_le_bytes());
        }
        assert_eq!(bytes, frame(kind::EXEC, &want));
        assert_eq!(ToAgent::decode(kind::EXEC, &want), Ok(ToAgent::Exec(spec)));
        // Without them: two zero flags.
        let bytes = ToAgent::Exec(ExecSpec::new(["x"])).encode().unwrap();
        assert_eq!(bytes, frame(kind::EXEC, &exec_payload(&[0, 0])));
        // A container and a terminal: two options last (both absent: nothing, as hosts and
        // agents without them have it).
        let spec = ExecSpec::new(["x"]).container("c1", true);
        let want = exec_payload(&[0, 0, 1, 2, 0, 0, 0, b'c', b'1', 1, 0]);
        assert_eq!(
            ToAgent::Exec(spec.clone()).encode().unwrap(),
            frame(kind::EXEC, &want)
        );
        assert_eq!(ToAgent::decode(kind::EXEC, &want), Ok(ToAgent::Exec(spec)));
        let spec = ExecSpec::new(["x"]).terminal(24, 80);
        let want = exec_payload(&[0, 0, 0, 1, 24, 0, 80, 0]);
        assert_eq!(
            ToAgent::Exec(spec.clone()).encode().unwrap(),
            frame(kind::EXEC, &want)
        );
        assert_eq!(ToAgent::decode(kind::EXEC, &want), Ok(ToAgent::Exec(spec)));
        let spec = ExecSpec::new(["x"])
            .container("c1", false)
            .terminal(0x102, 0x304);
        let want = exec_payload(&[0, 0, 1, 2, 0, 0, 0, b'c', b'1', 0, 1, 2, 1, 4, 3]);
        assert_eq!(
            ToAgent::Exec(spec.clone()).encode().unwrap(),
            frame(kind::EXEC, &want)
        );
        assert_eq!(ToAgent::decode(kind::EXEC, &want), Ok(ToAgent::Exec(spec)));
        for bad in [
            &[0, 0, 1, 2, 0, 0, 0, b'c', b'1', 2, 0][..], // new-namespaces flag 2
            &[0, 0, 2, 2, 0, 0, 0, b'c', b'1', 1, 0],     // container flag 2
            &[0, 0, 0, 2],                                // terminal flag 2
            &[0, 0, 0, 1, 0x11, 0x27, 80, 0],             // 10001 rows
            &[0, 0, 0, 1, 24, 0, 0x11, 0x27],             // 10001 columns
        ] {
            let r = ToAgent::decode(kind::EXEC, &exec_payload(bad));
            assert!(
                matches!(r, Err(ProtocolError::Invalid(_))),
                "{bad:?}: {r:?}"
            );
        }
        for short in [&[0, 0, 0][..], &[0, 0, 0, 1, 24, 0, 80]] {
            let r = ToAgent::decode(kind::EXEC, &exec_payload(short));
            assert_eq!(r, Err(ProtocolError::Truncated), "{short:?}");
        }
        // A resize: rows, then columns; the same limits.
        let resize = ToAgent::Resize(WindowSize {
            rows: 50,
            cols: 200,
        });
        assert_eq!(
            resize.encode().unwrap(),
            frame(kind::RESIZE, &[50, 0, 200, 0])
        );
        assert_eq!(ToAgent::decode(kind::RESIZE, &[50, 0, 200, 0]), Ok(resize));
        assert_eq!(
            ToAgent::decode(kind::RESIZE, &[0x10, 0x27, 0x10, 0x27]),
            Ok(ToAgent::Resize(WindowSize {
                rows: MAX_TERMINAL_SIZE,
                cols: MAX_TERMINAL_SIZE
            }))
        );
        for bad in [[0x11, 0x27, 1, 0], [1, 0, 0xff, 0xff]] {
            let r = ToAgent::decode(kind::RESIZE, &bad);
            assert!(
                matches!(r, Err(ProtocolError::Invalid(_))),
                "{bad:?}: {r:?}"
            );
        }
        assert_eq!(
            ToAgent::decode(kind::RESIZE, &[1, 0, 1]),
            Err(ProtocolError::Truncated)
        );
        assert_eq!(
            ToAgent::decode(kind::RESIZE, &[1, 0, 1, 0, 0]),
            Err(ProtocolError::TrailingBytes(1))
        );
        for bad in [
            ToAgent::Resize(WindowSize {
                rows: 10_001,
                cols: 1,
            }),
            ToAgent::Exec(ExecSpec::new(["x"]).terminal(1, 10_001)),
        ] {
            assert!(
                matches!(bad.encode(), Err(ProtocolError::Invalid(_))),
                "{bad:?}"
            );
        }
        // Copies: the root after the path.
        let copy_out = ToAgent::CopyOut {
            path: "/f".into(),
            root: Some("/r".into()),
        };
        assert_eq!(
            copy_out.encode().unwrap(),
            frame(
                kind::COPY_OUT,
                &[2, 0, 0, 0, b'/', b'f', 1, 2, 0, 0, 0, b'/', b'r']
            )
        );
        let copy_in = ToAgent::CopyIn {
            path: "/f".into(),
            mode: 0o644,
            root: None,
        };
        assert_eq!(
            copy_in.encode().unwrap(),
            frame(kind::COPY_IN, &[0xa4, 1, 0, 0, 2, 0, 0, 0, b'/', b'f', 0])
        );
        assert_eq!(IMAGE_ROOT, "/run/flint/root");
    }

    #[test]
    fn exec_root_and_user_are_checked_both_ways() {
        let user = |uid: u32, gid: u32, groups: &[u32]| {
            let mut p = vec![1];
            p.extend_from_slice(&uid.to_le_bytes());
            p.extend_from_slice(&gid.to_le_bytes());
            p.extend_from_slice(&(groups.len() as u32).to_le_bytes());
            for g in groups {
                p.extend_from_slice(&g.to_le_bytes());
            }
            p
        };
        let with_user = |u: Vec<u8>| {
            let mut rest = vec![0];
            rest.extend(u);
            exec_payload(&rest)
        };
        let invalid = |payload: &[u8], what: &str| {
            let r = ToAgent::decode(kind::EXEC, payload);
            assert!(matches!(r, Err(ProtocolError::Invalid(_))), "{what}: {r:?}");
        };
        invalid(&exec_payload(&[2, 0]), "root flag 2");
        invalid(&exec_payload(&[0, 2]), "user flag 2");
        invalid(&exec_payload(&[1, 1, 0, 0, 0, b'r', 0]), "relative root");
        invalid(
            &exec_payload(&[1, 6, 0, 0, 0, b'/', b'a', b'/', b'.', b'.', b'/', 0]),
            "root with ..",
        );
        invalid(&with_user(user(u32::MAX, 0, &[])), "uid -1");
        invalid(&with_user(user(0, u32::MAX, &[])), "gid -1");
        invalid(&with_user(user(0, 0, &[5, u32::MAX])), "group -1");
        let too_many: Vec<u32> = (0..=MAX_GROUPS as u32).collect();
        invalid(&with_user(user(1, 1, &too_many)), "too many groups");
        // A group count that claims far more than the payload holds is refused before
        // anything is read or allocated for it.
        let mut huge = with_user(user(1, 1, &[]));
        let at = huge.len() - 4;
        huge[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        invalid(&huge, "4 billion groups");
        // Short user fields are truncation.
        for cut in 1..user(1, 2, &[3]).len() {
            let p = with_user(user(1, 2, &[3])[..cut].to_vec());
            assert_eq!(
                ToAgent::decode(kind::EXEC, &p),
                Err(ProtocolError::Truncated),
                "cut {cut}"
            );
        }
        assert_eq!(
            ToAgent::decode(kind::EXEC, &exec_payload(&[0])),
            Err(ProtocolError::Truncated)
        );
        let mut extra = with_user(user(1, 2, &[3]));
        extra.extend([1, 2, 0, 0, 0, b'c', b'1', 0, 0, 9]);
        assert_eq!(
            ToAgent::decode(kind::EXEC, &extra),
            Err(ProtocolError::TrailingBytes(1))
        );
        // Bad UTF-8 in the root is named.
        assert_eq!(
            ToAgent::decode(kind::EXEC, &exec_payload(&[1, 2, 0, 0, 0, 0xc3, 0x28, 0])),
            Err(ProtocolError::BadUtf8("root directory"))
        );
        // Copies refuse the same roots and flags.
        for payload in [
            &[2, 0, 0, 0, b'/', b'f', 2][..],
            &[2, 0, 0, 0, b'/', b'f', 1, 1, 0, 0, 0, b'r'],
            &[2, 0, 0, 0, b'/', b'f', 1, 3, 0, 0, 0, b'/', b'.', b'.'],
        ] {
            let r = ToAgent::decode(kind::COPY_OUT, payload);
            assert!(matches!(r, Err(ProtocolError::Invalid(_))), "{r:?}");
            let mut copy_in = vec![0xa4, 1, 0, 0];
            copy_in.extend_from_slice(payload);
            let r = ToAgent::decode(kind::COPY_IN, &copy_in);
            assert!(matches!(r, Err(ProtocolError::Invalid(_))), "{r:?}");
        }
        assert_eq!(
            ToAgent::decode(kind::COPY_OUT, &[2, 0, 0, 0, b'/', b'f']),
            Err(ProtocolError::Truncated)
        );
        // The encoder refuses what the decoder refuses.
        for bad in [
            ToAgent::Exec(ExecSpec::new(["x"]).root("r")),
            ToAgent::Exec(ExecSpec::new(["x"]).root("/a/..")),
            ToAgent::Exec(ExecSpec::new(["x"]).root("/a\0b")),
            ToAgent::Exec(ExecSpec::new(["x"]).user(u32::MAX, 0, [])),
            ToAgent::Exec(ExecSpec::new(["x"]).user(0, 0, too_many.clone())),
            ToAgent::CopyIn {
                path: "/x".into(),
                mode: 0o644,
                root: Some("/../etc".into()),
            },
            ToAgent::CopyOut {
                path: "/x".into(),
                root: Some("".into()),
            },
        ] {
            assert!(
                matches!(bad.encode(), Err(ProtocolError::Invalid(_))),
                "{bad:?}"
            );
        }
        for e in [
            ToAgent::decode(kind::EXEC, &with_user(user(0, 0, &too_many))).unwrap_err(),
            ToAgent::decode(kind::EXEC, &exec_payload(&[1, 1, 0, 0, 0, b'r', 0])).unwrap_err(),
        ] {
            let s = e.to_string();
            assert!(!s.contains('\n'), "{s}");
        }
    }

    #[test]
    fn errors_are_one_sentence() {
        let errors = [
            ProtocolError::Truncated,
            ProtocolError::TooLarge { len: 5 },
            ProtocolError::UnknownKind(3),
            ProtocolError::BadUtf8("path"),
            ProtocolError::TrailingBytes(2),
            ProtocolError::Invalid("x"),
        ];
        for e in errors {
            let s = e.to_string();
            assert!(!s.is_empty() && !s.contains('\n'), "{s:?}");
        }
    }
}
