//! seccomp-bpf filters: every flint thread allows only the system calls it needs, and for the
//! calls that multiplex many operations only the arguments it uses. A thread that makes any
//! other call gets SIGSYS; flint logs which call it was and exits with status 159
//! (128 + SIGSYS).
//!
//! Filters are built with `seccompiler` and installed by each thread on itself, before it does
//! its work: vCPU threads before their first `KVM_RUN`, so no guest code ever runs unfiltered.
//! Threads inherit their creator's filter too, so the VMM thread installs its own only after it
//! has started the others.
//!
//! # What every thread may do
//!
//! - `read`, `write`, `close`; memory: `munmap`, `mremap`, `madvise`, `brk`, and `mmap` and
//!   `mprotect` **without `PROT_EXEC`** (heap, thread stacks and guard pages never need it:
//!   no thread can make new machine code executable);
//! - `futex` **only for plain waits and wakes** (`FUTEX_WAIT`, `FUTEX_WAKE`,
//!   `FUTEX_WAIT_BITSET`, `FUTEX_WAKE_BITSET`, private or shared, with either clock): Rust's
//!   locks and glibc's `pthread_join` use nothing else; the priority-inheritance and requeue
//!   operations, the kernel's most troubled futex code, are refused;
//! - `fcntl` **only `F_GETFD`, `F_SETFD`, `F_GETFL`, `F_SETFL` and `F_DUPFD_CLOEXEC`**
//!   (descriptor flags and `try_clone`; no locks, leases, owners or pipe sizes);
//! - signals: `rt_sigreturn`, `rt_sigprocmask`, `sigaltstack`; time: `clock_gettime`,
//!   `clock_nanosleep`, `nanosleep`; `sched_yield`, `sched_getaffinity`, `gettid`, `getpid`,
//!   `restart_syscall`, `exit`, `exit_group`.
//!
//! # Per thread
//!
//! - **vcpu**: `ioctl` only `KVM_RUN`, the register, MSR, LAPIC, MP-state, event, debug-register,
//!   XSAVE and XCR reads (a guest fault's message, a snapshot) and `TUNSETOFFLOAD` (a NIC's
//!   activation by the guest driver runs on the vCPU thread that wrote `DRIVER_OK`);
//!   `timerfd_settime`/`timerfd_gettime` (a device reset disarms its rate limiters). No
//!   sockets; `openat` fails with `EACCES` (see below).
//! - **event-loop** (virtio queues, disks, TAP, vsock): `epoll_*`, reads and writes at offsets
//!   and vectored, `lseek`, `fsync`, `fdatasync`, `fstat`/`newfstatat`/`statx` on its open
//!   disks and TAPs; `socket` **only `AF_UNIX`, `SOCK_STREAM`** (the vsock device connecting to
//!   a host program's socket), `connect`, `accept4` and the other calls on connected sockets;
//!   `ioctl` only `TUNSETOFFLOAD` and `FIONBIO`; `eventfd2`, `getrandom`, the timerfd calls.
//!   `openat` fails with `EACCES`: every disk, TAP and socket it serves was opened before it
//!   started.
//! - **api** (the HTTP API server): `accept4` and calls on accepted connections, `epoll_*`,
//!   `ioctl` only `FIONBIO`, `unlink`/`unlinkat`. **No `socket` or `connect`**: its listening
//!   socket was bound before it started. `openat` fails with `EACCES`.
//! - **console-in**: only the common calls (it reads the terminal and feeds the UART);
//!   `openat` fails with `EACCES`.
//! - **agent-client** (`flint run`): `socket` **only `AF_UNIX`, `SOCK_STREAM`** and `connect`
//!   (the vsock device's Unix socket), calls on that connection, `poll`; `ioctl` only
//!   `FIONBIO` and `TCGETS`; `getrandom` (entropy for a restored guest); thread creation for
//!   its stdin forwarder (`clone3`, `clone`, `set_robust_list`, `rseq`, and `prctl` **only
//!   `PR_SET_NAME`**, which names it); file reads
//!   for `--copy-in`: `openat` **read-only** (no `O_CREAT`, no `O_TRUNC`, access mode
//!   `O_RDONLY`). Only when the run has `--copy-out` may it create files: `openat` with any
//!   flags, `mkdir`, `rename`, `unlink`, `fchmod`, `chmod`, `ftruncate`.
//! - **vmm** (the main thread once the VM runs: waits for the end, API requests, pause,
//!   snapshots, disk media changes, metrics and log files, removing `flint run`'s temporary
//!   directory): files including `openat` with any flags (it creates snapshot, metrics and
//!   log files), `getdents64`, `rmdir`, `unlink`, `rename`, `ftruncate`; `poll`, `epoll_*`;
//!   `sendto` and `shutdown` (telling a `flint run` agent to kill the command); `getrandom`;
//!   `tgkill` **only to threads of this process, with the vCPU kick signal or `SIGABRT`**
//!   (an abort); `rt_sigaction` **only for `SIGABRT`** (glibc's `abort` resets its handler);
//!   `ioctl` only `TCGETS`/`TCSETS` (the terminal) and the VM-state reads of a snapshot. No
//!   `socket`, no `connect`.
//!
//! The threads that open no files (vcpu, event-loop, api, console-in) have a second filter that
//! makes `openat` fail with `EACCES` rather than stop flint: glibc's malloc opens
//! `/proc/sys/vm/overcommit_memory` (read-only, once per process) on whichever thread first
//! shrinks a secondary arena, and that must not stop flint. They still open nothing.
//!
//! `FLINT_SECCOMP_SELF_TEST=<thread>` or `<thread>:<probe>` makes that thread issue a call its
//! filter refuses right after installing it (see [`PROBES`]); the tests use it to show that
//! every thread's filter, argument rules included, stops flint. A probe the filter lets
//! through (or fails with an error, as `openat` on the threads that open no files) ends flint
//! with status 1 and a line saying what the call returned.

use std::collections::BTreeMap;
use std::convert::TryInto;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit status after a forbidden system call.
pub const STATUS_SECCOMP_VIOLATION: i32 = 128 + libc::SIGSYS;

static ENABLED: AtomicBool = AtomicBool::new(true);

thread_local! {
    /// The filter this thread installed, for the violation message.
    static THREAD_KIND: std::cell::Cell<&'static str> = const { std::cell::Cell::new("main") };
}

/// Turn filtering off (`--no-seccomp`, for debugging only).
pub fn disable() {
    ENABLED.store(false, Ordering::Relaxed);
}

/// Whether threads install filters.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The kinds of flint thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The VMM thread once the VM runs: waits for endings and API requests, pauses vCPUs.
    Vmm,
    /// A vCPU thread: `KVM_RUN` and device register accesses.
    Vcpu,
    /// The device event loop: virtio queues, disk files, TAP, sockets.
    EventLoop,
    /// The HTTP API server.
    Api,
    /// Forwards terminal input to the serial console.
    ConsoleIn,
    /// `flint run`: talks to the guest agent over the vsock Unix socket, copies files in and
    /// out, and writes the command's output. Only with `copies_out` may it create files.
    AgentClient { copies_out: bool },
}

impl ThreadKind {
    /// The name used in messages and by `FLINT_SECCOMP_SELF_TEST`.
    pub fn name(&self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Api => "api",
            ThreadKind::ConsoleIn => "console-in",
            ThreadKind::AgentClient { .. } => "agent-client",
        }
    }
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the seccomp filter of the {thread} thread: {reason}")]
pub struct SeccompError {
    thread: &'static str,
    reason: String,
}

// ioctl requests some threads may make.
const KVM_RUN: u64 = 0xae80;
/// `_IOR(KVMIO, nr, T)` for a `T` of `size` bytes.
const fn kvm_ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
/// Read when a guest fault ends the VM, for the error message.
const KVM_GET_REGS: u64 = kvm_ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
const KVM_GET_SREGS: u64 = kvm_ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());
/// `_IOWR(KVMIO, nr, T)` for a `T` of `size` bytes.
const fn kvm_iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
// What a snapshot reads: on the vCPU threads (each its own vCPU)...
const KVM_GET_MSRS: u64 = kvm_iowr(0x88, std::mem::size_of::<kvm_bindings::kvm_msrs>());
const KVM_GET_LAPIC: u64 = kvm_ior(0x8e, std::mem::size_of::<kvm_bindings::kvm_lapic_state>());
const KVM_GET_MP_STATE: u64 = kvm_ior(0x98, std::mem::size_of::<kvm_bindings::kvm_mp_state>());
const KVM_GET_VCPU_EVENTS: u64 =
    kvm_ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_vcpu_events>());
const KVM_GET_DEBUGREGS: u64 = kvm_ior(0xa1, std::mem::size_of::<kvm_bindings::kvm_debugregs>());
const KVM_GET_XSAVE: u64 = kvm_ior(0xa4, std::mem::size_of::<kvm_bindings::kvm_xsave>());
const KVM_GET_XCRS: u64 = kvm_ior(0xa6, std::mem::size_of::<kvm_bindings::kvm_xcrs>());
// ... and on the VMM thread (the VM's).
const KVM_GET_IRQCHIP: u64 = kvm_iowr(0x62, std::mem::size_of::<kvm_bindings::kvm_irqchip>());
const KVM_GET_CLOCK: u64 = kvm_ior(0x7c, std::mem::size_of::<kvm_bindings::kvm_clock_data>());
const KVM_GET_PIT2: u64 = kvm_ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_pit_state2>());
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const FIONBIO: u64 = 0x5421;

/// Arming and reading the rate limiters' timerfds (never creating them).
const TIMERS: &[i64] = &[libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime];

/// What every thread needs with any arguments: memory, signals, time, leaving. (`mmap`,
/// `mprotect`, `futex` and `fcntl`, also needed by all, have argument rules: see [`rules`].)
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Calls on sockets that are already open (accepted or connected), for the event loop, the
/// API server and the agent client. Making sockets (`socket`, `connect`) is separate.
const CONNECTED_SOCKETS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_readv,
    libc::SYS_writev,
];

/// I/O on files that are already open (disks, snapshot and log files), for the event loop,
/// the agent client and the VMM thread. Opening files (`openat`) is separate.
const OPEN_FILES: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
];

/// Creating, renaming and removing files (the agent client's `--copy-out`).
const FILE_CHANGES: &[i64] = &[
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_chmod,
    libc::SYS_ftruncate,
];

/// The futex operations Rust's locks, channels and thread parking and glibc's `pthread_join`
/// and malloc locks use (`FUTEX_PRIVATE_FLAG` and `FUTEX_CLOCK_REALTIME` are masked off, as
/// the kernel does to find the command).
const FUTEX_OPS: &[u64] = &[
    libc::FUTEX_WAIT as u64,
    libc::FUTEX_WAKE as u64,
    libc::FUTEX_WAIT_BITSET as u64,
    libc::FUTEX_WAKE_BITSET as u64,
];
const FUTEX_CMD_MASK: u64 = !((libc::FUTEX_PRIVATE_FLAG | libc::FUTEX_CLOCK_REALTIME) as u64);

/// The `fcntl` commands in use: descriptor flags (`FD_CLOEXEC`), status flags
/// (`O_NONBLOCK`), and duplication by `try_clone`.
const FCNTL_CMDS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
];

/// Linux's `SOCK_TYPE_MASK`: the bits of `socket`'s type that are the type, not flags.
const SOCK_TYPE_MASK: u64 = 0xf;

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| e.to_string())
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conditions).map_err(|e| e.to_string())
}

/// One rule per value: argument `arg` (an `int`), masked with `mask`, is one of `values`.
fn masked_one_of(arg: u8, mask: u64, values: &[u64]) -> Result<Vec<SeccompRule>, String> {
    values
        .iter()
        .map(|&v| rule(vec![condition(arg, SeccompCmpOp::MaskedEq(mask), v)?]))
        .collect()
}

/// One rule per value: argument `arg` (an `int`) is one of `values`.
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, String> {
    values
        .iter()
        .map(|&v| rule(vec![condition(arg, SeccompCmpOp::Eq, v)?]))
        .collect()
}

/// `mmap` or `mprotect` (protection in argument 2) without `PROT_EXEC`.
fn not_executable() -> Result<Vec<SeccompRule>, String> {
    masked_one_of(2, libc::PROT_EXEC as u64, &[0])
}

/// `socket(AF_UNIX, SOCK_STREAM [| SOCK_NONBLOCK | SOCK_CLOEXEC], 0)`.
fn unix_stream_sockets() -> Result<Vec<SeccompRule>, String> {
    Ok(vec![rule(vec![
        condition(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?,
        condition(
            1,
            SeccompCmpOp::MaskedEq(SOCK_TYPE_MASK),
            libc::SOCK_STREAM as u64,
        )?,
        condition(2, SeccompCmpOp::Eq, 0)?,
    ])?])
}

/// `openat` that only reads: access mode `O_RDONLY`, no `O_CREAT`, no `O_TRUNC` (which Linux
/// honours even on a read-only open), and so no `O_TMPFILE` either (it needs write access).
fn read_only_opens() -> Result<Vec<SeccompRule>, String> {
    let mask = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
    masked_one_of(2, mask, &[libc::O_RDONLY as u64])
}

fn ioctl_rules(requests: &[u64]) -> Result<Vec<SeccompRule>, String> {
    one_of(1, requests)
}

/// The allowed system calls of `kind`: number → argument rules (empty: any arguments; several:
/// any one of them).
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |calls: &[i64]| {
        for &c in calls {
            map.insert(c, Vec::new());
        }
    };
    allow(COMMON);
    let ioctls: &[u64] = match kind {
        // Device register writes run on vCPU threads, and a virtio driver's DRIVER_OK
        // activates the device there: a NIC then sets its TAP's offloads.
        // A device reset disarms its rate limiters' timers (created at device construction).
        // A fatal guest fault reads the registers for its message.
        // A snapshot has each paused vCPU thread read its vCPU's state.
        ThreadKind::Vcpu => {
            allow(TIMERS);
            &[
                KVM_RUN,
                KVM_GET_REGS,
                KVM_GET_SREGS,
                TUNSETOFFLOAD,
                KVM_GET_MSRS,
                KVM_GET_LAPIC,
                KVM_GET_MP_STATE,
                KVM_GET_VCPU_EVENTS,
                KVM_GET_DEBUGREGS,
                KVM_GET_XSAVE,
                KVM_GET_XCRS,
            ]
        }
        ThreadKind::EventLoop => {
            allow(TIMERS);
            allow(CONNECTED_SOCKETS);
            allow(OPEN_FILES);
            allow(&[libc::SYS_connect, libc::SYS_getrandom, libc::SYS_eventfd2]);
            &[TUNSETOFFLOAD, FIONBIO]
        }
        ThreadKind::Api => {
            allow(CONNECTED_SOCKETS);
            allow(&[libc::SYS_unlink, libc::SYS_unlinkat]);
            &[FIONBIO]
        }
        ThreadKind::ConsoleIn => &[],
        ThreadKind::AgentClient { copies_out } => {
            allow(CONNECTED_SOCKETS);
            allow(OPEN_FILES);
            allow(&[
                libc::SYS_connect,
                libc::SYS_clone3,
                libc::SYS_clone,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_copy_file_range,
                libc::SYS_sendfile,
                libc::SYS_poll,
                libc::SYS_ppoll,
                // Entropy for a restored guest's random number generator.
                libc::SYS_getrandom,
            ]);
            if copies_out {
                allow(FILE_CHANGES);
                allow(&[libc::SYS_openat]);
            }
            &[FIONBIO, TCGETS]
        }
        ThreadKind::Vmm => {
            allow(OPEN_FILES);
            allow(&[
                libc::SYS_openat,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_shutdown,
                // Telling the guest agent to kill the command when a signal stops `flint
                // run` (std writes to a Unix stream socket with send).
                libc::SYS_sendto,
                libc::SYS_getrandom,
                // Removing a sandbox's temporary directory at the end.
                libc::SYS_getdents64,
                libc::SYS_rmdir,
                // A snapshot's files: written whole, then renamed into place; and publishing a
                // finished snapshot of a booted sandbox (`flint run`).
                libc::SYS_ftruncate,
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_renameat2,
            ]);
            &[TCGETS, TCSETS, KVM_GET_IRQCHIP, KVM_GET_CLOCK, KVM_GET_PIT2]
        }
    };
    if !ioctls.is_empty() {
        map.insert(libc::SYS_ioctl, ioctl_rules(ioctls)?);
    }
    map.insert(libc::SYS_mmap, not_executable()?);
    map.insert(libc::SYS_mprotect, not_executable()?);
    map.insert(
        libc::SYS_futex,
        masked_one_of(1, FUTEX_CMD_MASK, FUTEX_OPS)?,
    );
    map.insert(libc::SYS_fcntl, one_of(1, FCNTL_CMDS)?);
    match kind {
        ThreadKind::EventLoop | ThreadKind::AgentClient { .. } => {
            map.insert(libc::SYS_socket, unix_stream_sockets()?);
        }
        _ => {}
    }
    if let ThreadKind::AgentClient { copies_out } = kind {
        if !copies_out {
            map.insert(libc::SYS_openat, read_only_opens()?);
        }
        // Naming its stdin forwarder thread ("agent-stdin"), which glibc does with prctl.
        map.insert(libc::SYS_prctl, one_of(0, &[libc::PR_SET_NAME as u64])?);
    }
    if opens_no_files(kind) {
        // Refused with EACCES by the second filter.
        map.insert(libc::SYS_openat, Vec::new());
    }
    if kind == ThreadKind::Vmm {
        // Kicking vCPU threads out of KVM_RUN (and an abort), only within this process.
        // SAFETY: getpid has no arguments and cannot fail.
        let pid = unsafe { libc::getpid() } as u64;
        let tgkill = [crate::signals::kick_signal(), libc::SIGABRT]
            .iter()
            .map(|&sig| {
                rule(vec![
                    condition(0, SeccompCmpOp::Eq, pid)?,
                    condition(2, SeccompCmpOp::Eq, sig as u64)?,
                ])
            })
            .collect::<Result<Vec<_>, String>>()?;
        map.insert(libc::SYS_tgkill, tgkill);
        map.insert(libc::SYS_rt_sigaction, one_of(0, &[libc::SIGABRT as u64])?);
    }
    Ok(map)
}

/// Whether `kind` is a thread that opens no files: its `openat` fails with `EACCES` instead of
/// stopping flint (see [`no_opens_program`]).
fn opens_no_files(kind: ThreadKind) -> bool {
    matches!(
        kind,
        ThreadKind::Vcpu | ThreadKind::EventLoop | ThreadKind::Api | ThreadKind::ConsoleIn
    )
}

/// The second filter of the threads that open no files: `openat` fails with `EACCES`, all else
/// is left to the first filter (the kernel applies the stricter answer of the two: `EACCES`
/// over the first filter's allowing `openat`, a trap over this one's allowing the rest).
///
/// Such a thread still calls `openat` once in a while, through glibc: when a malloc arena other
/// than the main one shrinks, glibc reads `/proc/sys/vm/overcommit_memory` (once per process,
/// on whichever thread gets there first; seen on the event loop during the vsock stream test).
/// A failed open is fine for glibc (it then keeps the memory mapped); a trap would stop flint.
fn no_opens_program() -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_openat, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// Build the BPF program of `kind`.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        rules(kind)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

static SIGSYS_HANDLER: std::sync::Once = std::sync::Once::new();

/// Format `n` in decimal into `buf`, returning the digits (no allocation: used in a signal
/// handler).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Format `n` as 0x-prefixed hexadecimal into `buf` (no allocation).
fn hexadecimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(n % 16) as usize];
        n /= 16;
        if n == 0 {
            break;
        }
    }
    i -= 2;
    buf[i] = b'0';
    buf[i + 1] = b'x';
    &buf[i..]
}

/// Names of the calls a violation most likely is (those with argument rules, and the
/// self-test's `getppid`), for the message.
const CALL_NAMES: &[(i64, &str)] = &[
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_getppid, "getppid"),
];

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; for a seccomp trap the syscall
    // number follows si_errno/si_code in the union (arch-specific layout: si_call_addr (ptr),
    // si_syscall (int), si_arch (uint)), read here by offset without allocating.
    let nr = unsafe {
        let base = info as *const u8;
        let call_addr_offset = 16usize;
        let syscall = base.add(call_addr_offset + std::mem::size_of::<usize>()) as *const i32;
        syscall.read_unaligned()
    };
    // SAFETY: for a signal installed with SA_SIGINFO the third argument is the interrupted
    // context; the call's first three arguments (rdi, rsi, rdx: e.g. an ioctl request, the
    // protection of an mmap) are read from it.
    let args = unsafe {
        let gregs = &(*(context as *const libc::ucontext_t)).uc_mcontext.gregs;
        [
            gregs[libc::REG_RDI as usize] as u64,
            gregs[libc::REG_RSI as usize] as u64,
            gregs[libc::REG_RDX as usize] as u64,
        ]
    };
    // A const-initialised thread local without destructor: a plain TLS read.
    let thread = THREAD_KIND.with(|k| k.get());
    let name = CALL_NAMES
        .iter()
        .find(|(n, _)| *n == i64::from(nr))
        .map_or(&b"?"[..], |(_, name)| name.as_bytes());
    let mut digits = [0u8; 20];
    let mut hex = [[0u8; 20]; 3];
    let [h0, h1, h2] = &mut hex;
    let mut msg = [0u8; 256];
    let mut len = 0;
    for part in [
        &b"flint: error: seccomp: the "[..],
        thread.as_bytes(),
        &b" thread made the forbidden system call "[..],
        decimal(nr.max(0) as u64, &mut digits),
        &b" ("[..],
        name,
        &b") with arguments "[..],
        hexadecimal(args[0], h0),
        &b", "[..],
        hexadecimal(args[1], h1),
        &b", "[..],
        hexadecimal(args[2], h2),
        &b"; stopping\n"[..],
    ] {
        msg[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `msg[..len]` is initialised.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(STATUS_SECCOMP_VIOLATION);
    }
}

/// Install the calling thread's filter (no-op when filtering is disabled).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let err = |reason: String| SeccompError {
        thread: kind.name(),
        reason,
    };
    let mut handler_result = Ok(());
    SIGSYS_HANDLER.call_once(|| {
        handler_result = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(|e| e.to_string());
    });
    handler_result.map_err(err)?;
    let bpf = program(kind).map_err(err)?;
    let no_opens = if opens_no_files(kind) {
        Some(no_opens_program().map_err(err)?)
    } else {
        None
    };
    THREAD_KIND.with(|k| k.set(kind.name()));
    // First: installing a filter takes prctl and seccomp, which the main filter forbids.
    if let Some(no_opens) = no_opens {
        seccompiler::apply_filter(&no_opens).map_err(|e| err(e.to_string()))?;
    }
    seccompiler::apply_filter(&bpf).map_err(|e| err(e.to_string()))?;
    self_test(kind);
    Ok(())
}

/// The calls `FLINT_SECCOMP_SELF_TEST=<thread>:<probe>` can make. Apart from
/// `forbidden-call` (`getppid`, which no thread may make), each is a call that some threads
/// make in normal operation, with arguments their rules refuse; each is harmless if allowed.
pub const PROBES: &[&str] = &[
    "forbidden-call",
    "mmap-exec",
    "mprotect-exec",
    "futex-pi",
    "fcntl-getown",
    "socket-inet",
    "socket-dgram",
    "openat-read",
    "openat-creat",
    "tgkill-other-process",
    "sigaction-sigint",
    "prctl-dumpable",
];

/// Make the call `probe` names; `None` for an unknown probe, else what the call returned
/// (reached only if the filter allowed it).
fn probe_call(probe: &str) -> Option<i64> {
    let anonymous = |prot: libc::c_int| {
        // SAFETY: a fresh anonymous private mapping; it touches no existing memory.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        }
    };
    // Each call below is made with valid arguments (pointers to live locals or constant
    // strings, or null where the call takes an optional pointer) and is harmless if allowed:
    // it queries, fails, or creates an object that dies with the process.
    let result = match probe {
        // SAFETY: getppid(2) takes no arguments and only queries.
        "forbidden-call" => (unsafe { libc::getppid() }) as i64,
        "mmap-exec" => anonymous(libc::PROT_READ | libc::PROT_EXEC) as i64,
        "mprotect-exec" => {
            let page = anonymous(libc::PROT_READ | libc::PROT_WRITE);
            // SAFETY: `page` is this probe's own fresh mapping (or MAP_FAILED: the call fails).
            (unsafe { libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC) }) as i64
        }
        "futex-pi" => {
            let word = std::sync::atomic::AtomicU32::new(0);
            // SAFETY: `word` is a live local; unlocking a futex this thread does not own fails.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    word.as_ptr(),
                    libc::FUTEX_UNLOCK_PI | libc::FUTEX_PRIVATE_FLAG,
                    0,
                    std::ptr::null::<libc::timespec>(),
                    std::ptr::null::<u32>(),
                    0,
                )
            }
        }
        // SAFETY: F_GETOWN only queries; an invalid descriptor makes it fail.
        "fcntl-getown" => (unsafe { libc::fcntl(2, libc::F_GETOWN) }) as i64,
        "socket-inet" => {
            // SAFETY: no pointers; the socket, if made, dies with the process.
            (unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })
                as i64
        }
        "socket-dgram" => {
            // SAFETY: no pointers; the socket, if made, dies with the process.
            (unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })
                as i64
        }
        "openat-read" => {
            // SAFETY: the path is a NUL-terminated constant.
            (unsafe { libc::openat(libc::AT_FDCWD, c"/dev/null".as_ptr(), libc::O_RDONLY) }) as i64
        }
        // /proc refuses new files: even if allowed, nothing is created.
        "openat-creat" => {
            // SAFETY: the path is a NUL-terminated constant.
            (unsafe {
                libc::openat(
                    libc::AT_FDCWD,
                    c"/proc/flint-seccomp-probe".as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o600,
                )
            }) as i64
        }
        // SAFETY: signal 0 only checks that init exists.
        "tgkill-other-process" => unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) },
        // SAFETY: no new action (null); the old one is written to a live local of the
        // kernel's sigaction size.
        "sigaction-sigint" => unsafe {
            let mut old: [u64; 4] = [0; 4];
            libc::syscall(
                libc::SYS_rt_sigaction,
                libc::SIGINT,
                std::ptr::null::<u8>(),
                old.as_mut_ptr(),
                8,
            )
        },
        // SAFETY: PR_GET_DUMPABLE only queries.
        "prctl-dumpable" => (unsafe { libc::prctl(libc::PR_GET_DUMPABLE) }) as i64,
        _ => return None,
    };
    Some(result)
}

/// With `FLINT_SECCOMP_SELF_TEST=<thread>` or `<thread>:<probe>` (one of [`PROBES`];
/// `forbidden-call` if none), that thread makes the probe's call right after installing its
/// filter, to show that violations stop flint (used by the tests). Should the filter allow
/// it, flint says so and exits with status 1.
fn self_test(kind: ThreadKind) {
    let Ok(value) = std::env::var("FLINT_SECCOMP_SELF_TEST") else {
        return;
    };
    let (thread, probe) = value.split_once(':').unwrap_or((&value, "forbidden-call"));
    if thread != kind.name() {
        return;
    }
    match probe_call(probe) {
        Some(result) => {
            let errno = std::io::Error::last_os_error();
            let failure = if result == -1 {
                format!(" ({errno})")
            } else {
                String::new()
            };
            eprintln!(
                "flint: error: seccomp self-test: {probe} on the {thread} thread was not \
                 stopped: it returned {result}{failure}"
            )
        }
        None => eprintln!(
            "flint: error: seccomp self-test: unknown probe {probe:?} (one of {})",
            PROBES.join(", ")
        ),
    }
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_ioctl_numbers_match_kvm_ioctls() {
        // The values from <linux/kvm.h> on x86_64.
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(KVM_GET_DEBUGREGS, 0x8080_aea1);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_GET_XCRS, 0x8188_aea6);
        assert_eq!(KVM_GET_IRQCHIP, 0xc208_ae62);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
        assert_eq!(KVM_GET_PIT2, 0x8070_ae9f);
    }

    #[test]
    fn every_filter_compiles() {
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::Api,
            ThreadKind::ConsoleIn,
            ThreadKind::AgentClient { copies_out: false },
            ThreadKind::AgentClient { copies_out: true },
        ] {
            let bpf = program(kind).unwrap();
            assert!(bpf.len() > 10, "{kind:?}");
        }
    }

    #[test]
    fn vcpus_may_only_run_and_write() {
        let rules = rules(ThreadKind::Vcpu).unwrap();
        assert!(rules.contains_key(&libc::SYS_ioctl));
        assert!(opens_no_files(ThreadKind::Vcpu));
        assert!(!rules.contains_key(&libc::SYS_socket));
        assert!(!rules.contains_key(&libc::SYS_execve));
        let api = rules_keys(ThreadKind::Api);
        assert!(api.contains(&libc::SYS_accept4));
        assert!(opens_no_files(ThreadKind::Api));
    }

    #[test]
    fn the_vmm_thread_may_signal_the_guest_agent() {
        // A signal that stops `flint run` makes the VMM thread tell the agent to kill the
        // command: std writes to the agent's Unix socket with sendto.
        assert!(rules_keys(ThreadKind::Vmm).contains(&libc::SYS_sendto));
        assert!(!rules_keys(ThreadKind::Vmm).contains(&libc::SYS_socket));
    }

    #[test]
    fn only_the_threads_that_need_them_make_sockets_or_create_files() {
        let api = rules_keys(ThreadKind::Api);
        assert!(!api.contains(&libc::SYS_socket) && !api.contains(&libc::SYS_connect));
        assert!(opens_no_files(ThreadKind::EventLoop));
        assert!(no_opens_program().unwrap().len() > 3);
        assert!(!opens_no_files(ThreadKind::AgentClient {
            copies_out: false
        }));
        assert!(!opens_no_files(ThreadKind::Vmm));
        let reader = rules_keys(ThreadKind::AgentClient { copies_out: false });
        let writer = rules_keys(ThreadKind::AgentClient { copies_out: true });
        for call in FILE_CHANGES {
            assert!(!reader.contains(call) && writer.contains(call), "{call}");
        }
        // Read-only opens for --copy-in: one rule with conditions, not "any arguments".
        let rules = rules(ThreadKind::AgentClient { copies_out: false }).unwrap();
        assert_eq!(rules[&libc::SYS_openat].len(), 1);
    }

    fn rules_keys(kind: ThreadKind) -> Vec<i64> {
        rules(kind).unwrap().into_keys().collect()
    }

    #[test]
    fn hexadecimal_formats_without_allocating() {
        let mut buf = [0u8; 20];
        assert_eq!(hexadecimal(0, &mut buf), b"0x0");
        assert_eq!(hexadecimal(0xae80, &mut buf), b"0xae80");
        assert_eq!(hexadecimal(u64::MAX, &mut buf), b"0xffffffffffffffff");
    }

    #[test]
    fn decimal_formats_without_allocating() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(110, &mut buf), b"110");
        assert_eq!(decimal(u64::MAX, &mut buf), b"18446744073709551615");
    }
}
