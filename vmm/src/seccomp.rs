//! seccomp-bpf filters: every thread allows only the system calls it needs, and for the calls
//! that multiplex many operations only the arguments it uses. A thread that makes any other
//! call gets SIGSYS; the process logs which call it was and exits with status 159
//! (128 + SIGSYS).
//!
//! A [`Filter`] is a thread's allowlist. This crate has the filters of the threads it starts
//! ([`Filter::vcpu`], [`Filter::event_loop`], [`Filter::console_input`]) and what a started
//! [`Vm`](crate::Vm) needs on the thread that owns it ([`Filter::vmm_thread`]); a front end
//! composes its own threads' filters from [`Filter::new`], the call groups of this module
//! ([`CONNECTED_SOCKETS`], [`OPEN_FILES`], [`FILE_CHANGES`], [`THREAD_CREATION`]) and the
//! argument rules of [`Filter`]'s methods, adds what it does itself on the VM's thread to
//! [`Filter::vmm_thread`], and hands that to [`Vm::start`](crate::Vm::start).
//!
//! Filters are built with `seccompiler` and installed by each thread on itself
//! ([`Filter::install`]), before it does its work: vCPU threads before their first `KVM_RUN`,
//! so no guest code ever runs unfiltered. Threads inherit their creator's filter too, so
//! [`Vm::start`](crate::Vm::start) installs the filter of the thread that owns the VM only
//! after it has started the others.
//!
//! # What every thread may do ([`Filter::new`])
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
//! # This crate's threads
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
//! - **console-in**: only the common calls (it reads the terminal and feeds the UART);
//!   `openat` fails with `EACCES`.
//! - **uffd-watch** (a VM loaded with the `Uffd` memory backend: waits for the page-fault
//!   handler's connection to end): `poll`/`ppoll` and `recvfrom` besides the common calls; `openat` fails
//!   with `EACCES`. Creating and registering the userfaultfd, connecting to the handler and
//!   sending it (`userfaultfd`, its `ioctl`s, `socket`, `connect`, `sendmsg`) happen on the
//!   VMM thread while it loads the snapshot, before it restricts itself.
//! - **vmm** (the thread that owns a started VM: waits for its end, pauses it, snapshots it,
//!   executes the [`controller`](crate::controller)'s requests: disk media changes, metrics
//!   files): files including `openat` with any flags (snapshot and metrics files), `unlink`,
//!   `rename` and `ftruncate` (a snapshot's files are written whole, then renamed into place);
//!   `getrandom`; the timerfd calls (a rate limiter changed by the API); `tgkill` **only to threads of this process, with the vCPU kick signal or
//!   `SIGABRT`** (an abort); `rt_sigaction` **only for `SIGABRT`** (glibc's `abort` resets its
//!   handler); `ioctl` only the VM-state reads of a snapshot (with the dirty-page log). No `socket`, no `connect`. A
//!   front end adds what it does itself on that thread.
//!
//! The threads that open no files ([`Filter::refuse_opens`]) have a second filter that makes
//! `openat` fail with `EACCES` rather than stop the process: glibc's malloc opens
//! `/proc/sys/vm/overcommit_memory` (read-only, once per process) on whichever thread first
//! shrinks a secondary arena, and that must not stop it. They still open nothing.
//!
//! `FLINT_SECCOMP_SELF_TEST=<thread>` or `<thread>:<probe>` makes the thread whose filter has
//! that name issue a call its filter refuses right after installing it (see [`PROBES`]); the
//! tests use it to show that every thread's filter, argument rules included, stops the
//! process. A probe the filter lets through (or fails with an error, as `openat` on the
//! threads that open no files) ends the process with status 1 and a line saying what the call
//! returned.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::convert::TryInto;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// The exit status after a forbidden system call.
pub const STATUS_SECCOMP_VIOLATION: i32 = 128 + libc::SIGSYS;

static ENABLED: AtomicBool = AtomicBool::new(true);

thread_local! {
    /// The name of the filter this thread installed, for the violation message.
    static THREAD_NAME: std::cell::Cell<&'static str> = const { std::cell::Cell::new("main") };
}

/// Turn filtering off (`--no-seccomp`, for debugging only): [`Filter::install`] then installs
/// nothing.
pub fn disable() {
    ENABLED.store(false, Ordering::Relaxed);
}

/// Whether threads install filters.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {thread} thread: {source}")]
    Build {
        thread: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("cannot install the seccomp filter of the {thread} thread: {source}")]
    Install {
        thread: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the handler that reports forbidden system calls: {0}")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

// ioctl requests this crate's threads may make.
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
/// ... and, for a VM that tracks dirty pages, the pages the guest changed.
const KVM_GET_DIRTY_LOG: u64 = (1 << 30)
    | ((std::mem::size_of::<kvm_bindings::kvm_dirty_log>() as u64) << 16)
    | (0xae << 8)
    | 0x42;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const FIONBIO: u64 = 0x5421;

/// Arming and reading the rate limiters' timerfds (never creating them).
const TIMERS: &[i64] = &[libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime];

/// What every thread needs with any arguments: memory, signals, time, leaving. (`mmap`,
/// `mprotect`, `futex` and `fcntl`, also needed by all, have argument rules: see
/// [`Filter::new`].)
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

/// Calls on sockets that are already open (accepted or connected), and waiting for them with
/// epoll. Making sockets (`socket`, `connect`) is separate.
pub const CONNECTED_SOCKETS: &[i64] = &[
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

/// I/O on files that are already open (disks, snapshot and log files). Opening files
/// (`openat`) is separate.
pub const OPEN_FILES: &[i64] = &[
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

/// Creating, renaming and removing files and directories, and changing their modes and sizes.
pub const FILE_CHANGES: &[i64] = &[
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

/// Starting threads (`std::thread::spawn`). Naming them takes `prctl(PR_SET_NAME)`, allowed
/// separately with [`Filter::allow_when`].
pub const THREAD_CREATION: &[i64] = &[
    libc::SYS_clone3,
    libc::SYS_clone,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
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

/// How an argument is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compare {
    /// `arg == value`.
    Eq,
    /// `arg & mask == value`.
    MaskedEq(u64),
}

/// A test of one argument, an `int` (its low 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Condition {
    arg: u8,
    compare: Compare,
    value: u64,
}

/// Conditions that must all hold.
type Rule = Vec<Condition>;

fn eq(arg: u8, value: u64) -> Condition {
    Condition {
        arg,
        compare: Compare::Eq,
        value,
    }
}

fn masked_eq(arg: u8, mask: u64, value: u64) -> Condition {
    Condition {
        arg,
        compare: Compare::MaskedEq(mask),
        value,
    }
}

/// The allowlist of one kind of thread, named for messages and `FLINT_SECCOMP_SELF_TEST`.
/// Calls are added with the `allow` methods; any other call stops the process.
#[derive(Debug, Clone)]
pub struct Filter {
    thread: &'static str,
    /// Allowed calls: number → rules, any one of which admits the call (none: any arguments).
    calls: BTreeMap<i64, Vec<Rule>>,
    refuses_opens: bool,
}

impl Filter {
    /// The calls every thread needs (see the module documentation), for the thread named
    /// `thread`.
    pub fn new(thread: &'static str) -> Filter {
        let not_executable = [masked_eq(2, libc::PROT_EXEC as u64, 0)];
        Filter {
            thread,
            calls: BTreeMap::new(),
            refuses_opens: false,
        }
        .allow(COMMON)
        .allow_rules(libc::SYS_mmap, [not_executable.to_vec()])
        .allow_rules(libc::SYS_mprotect, [not_executable.to_vec()])
        .allow_rules(
            libc::SYS_futex,
            FUTEX_OPS
                .iter()
                .map(|&op| vec![masked_eq(1, FUTEX_CMD_MASK, op)]),
        )
        .allow_when(libc::SYS_fcntl, 1, FCNTL_CMDS)
    }

    /// A vCPU thread: `KVM_RUN`, its vCPU's state reads and device register accesses.
    pub fn vcpu() -> Filter {
        // Device register writes run on vCPU threads, and a virtio driver's DRIVER_OK
        // activates the device there: a NIC then sets its TAP's offloads.
        // A device reset disarms its rate limiters' timers (created at device construction).
        // A fatal guest fault reads the registers for its message.
        // A snapshot has each paused vCPU thread read its vCPU's state.
        Filter::new("vcpu")
            .allow(TIMERS)
            .allow_ioctls(&[
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
            ])
            .refuse_opens()
    }

    /// The device event loop: virtio queues, disk files, TAP, vsock sockets.
    pub fn event_loop() -> Filter {
        Filter::new("event-loop")
            .allow(TIMERS)
            .allow(CONNECTED_SOCKETS)
            .allow(OPEN_FILES)
            .allow(&[libc::SYS_connect, libc::SYS_getrandom, libc::SYS_eventfd2])
            .allow_unix_stream_sockets()
            .allow_ioctls(&[TUNSETOFFLOAD, FIONBIO])
            .refuse_opens()
    }

    /// The thread that forwards input to the serial console.
    pub fn console_input() -> Filter {
        Filter::new("console-in").refuse_opens()
    }

    /// The thread that watches a page-fault handler's connection (see [`crate::uffd`]): it
    /// waits with `poll` and reads with `recvfrom`; the rest are the common calls.
    pub fn uffd_watch() -> Filter {
        Filter::new("uffd-watch")
            .allow(&[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_recvfrom])
            .refuse_opens()
    }

    /// What a started VM needs on the thread that owns it: waiting for its end, pausing and
    /// resuming it, snapshots, the [`controller`](crate::controller)'s requests. A front end
    /// adds what it does on that thread itself and passes the result to
    /// [`Vm::start`](crate::Vm::start).
    pub fn vmm_thread() -> Filter {
        // SAFETY: getpid has no arguments and cannot fail.
        let pid = unsafe { libc::getpid() } as u64;
        Filter::new("vmm")
            .allow(OPEN_FILES)
            // A rate limiter the API changes re-arms its timer.
            .allow(TIMERS)
            .allow(&[
                // Snapshot, memory and metrics files; a disk's new medium.
                libc::SYS_openat,
                // A snapshot's files: written whole, then renamed into place (a partial one
                // removed).
                libc::SYS_ftruncate,
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_renameat2,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                // Seeding std's hash maps.
                libc::SYS_getrandom,
            ])
            .allow_ioctls(&[
                KVM_GET_IRQCHIP,
                KVM_GET_CLOCK,
                KVM_GET_PIT2,
                KVM_GET_DIRTY_LOG,
            ])
            // Kicking vCPU threads out of KVM_RUN (and an abort), only within this process.
            .allow_rules(
                libc::SYS_tgkill,
                [crate::signals::kick_signal(), libc::SIGABRT]
                    .map(|sig| vec![eq(0, pid), eq(2, sig as u64)]),
            )
            .allow_when(libc::SYS_rt_sigaction, 0, &[libc::SIGABRT as u64])
    }

    /// The name of the thread this filter is for.
    pub fn thread(&self) -> &'static str {
        self.thread
    }

    /// Allow `calls` with any arguments.
    pub fn allow(mut self, calls: &[i64]) -> Filter {
        for &call in calls {
            self.calls.insert(call, Vec::new());
        }
        self
    }

    /// Allow `call` only when its argument number `arg` (an `int`) is one of `values` (as well
    /// as with whatever arguments it was allowed before).
    pub fn allow_when(self, call: i64, arg: u8, values: &[u64]) -> Filter {
        self.allow_rules(call, values.iter().map(|&v| vec![eq(arg, v)]))
    }

    /// Allow `ioctl` with the requests `requests`.
    pub fn allow_ioctls(self, requests: &[u64]) -> Filter {
        self.allow_when(libc::SYS_ioctl, 1, requests)
    }

    /// Allow `socket(AF_UNIX, SOCK_STREAM [| SOCK_NONBLOCK | SOCK_CLOEXEC], 0)`, no other
    /// family or type.
    pub fn allow_unix_stream_sockets(self) -> Filter {
        self.allow_rules(
            libc::SYS_socket,
            [vec![
                eq(0, libc::AF_UNIX as u64),
                masked_eq(1, SOCK_TYPE_MASK, libc::SOCK_STREAM as u64),
                eq(2, 0),
            ]],
        )
    }

    /// Allow `openat` that only reads: access mode `O_RDONLY`, no `O_CREAT`, no `O_TRUNC`
    /// (which Linux honours even on a read-only open), and so no `O_TMPFILE` either (it needs
    /// write access).
    pub fn allow_read_only_opens(self) -> Filter {
        let mask = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
        self.allow_rules(
            libc::SYS_openat,
            [vec![masked_eq(2, mask, libc::O_RDONLY as u64)]],
        )
    }

    /// Make `openat` fail with `EACCES` instead of stopping the process, whatever else allows
    /// it: for threads that open no files (see the module documentation).
    pub fn refuse_opens(mut self) -> Filter {
        self.refuses_opens = true;
        self
    }

    /// Allow `call` when any one of `rules` holds (an empty `rules` adds nothing). A call
    /// already allowed with any arguments stays so.
    fn allow_rules(mut self, call: i64, rules: impl IntoIterator<Item = Rule>) -> Filter {
        let mut rules = rules.into_iter().peekable();
        if rules.peek().is_none() {
            return self;
        }
        match self.calls.entry(call) {
            Entry::Vacant(entry) => {
                entry.insert(rules.collect());
            }
            Entry::Occupied(entry) => {
                let existing = entry.into_mut();
                if !existing.is_empty() {
                    for rule in rules {
                        if !existing.contains(&rule) {
                            existing.push(rule);
                        }
                    }
                }
            }
        }
        self
    }

    /// Whether `call` is allowed, with any arguments or some.
    pub fn allows(&self, call: i64) -> bool {
        self.calls.contains_key(&call)
    }

    /// Whether `call` is allowed with any arguments.
    pub fn allows_any_arguments(&self, call: i64) -> bool {
        self.calls.get(&call).is_some_and(Vec::is_empty)
    }

    /// Whether this thread's `openat` fails with `EACCES` ([`Filter::refuse_opens`]).
    pub fn refuses_opens(&self) -> bool {
        self.refuses_opens
    }

    /// The allowed calls in `seccompiler`'s terms.
    fn rules(&self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
        let condition = |c: &Condition| {
            let op = match c.compare {
                Compare::Eq => SeccompCmpOp::Eq,
                Compare::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
            };
            SeccompCondition::new(c.arg, SeccompCmpArgLen::Dword, op, c.value)
        };
        let mut map = BTreeMap::new();
        for (&call, rules) in &self.calls {
            let rules = rules
                .iter()
                .map(|rule| SeccompRule::new(rule.iter().map(condition).collect::<Result<_, _>>()?))
                .collect::<Result<_, _>>()?;
            map.insert(call, rules);
        }
        if self.refuses_opens {
            // Refused with EACCES by the second filter.
            map.insert(libc::SYS_openat, Vec::new());
        }
        Ok(map)
    }

    /// The BPF program: the allowed calls, a trap for any other.
    pub fn program(&self) -> Result<BpfProgram, SeccompError> {
        let err = |source| SeccompError::Build {
            thread: self.thread,
            source,
        };
        let filter = SeccompFilter::new(
            self.rules().map_err(err)?,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(err)?;
        filter.try_into().map_err(err)
    }

    /// Install this filter on the calling thread (nothing when filtering is disabled), then
    /// run the self-test if `FLINT_SECCOMP_SELF_TEST` names this thread.
    pub fn install(&self) -> Result<(), SeccompError> {
        if !enabled() {
            return Ok(());
        }
        let mut handler_result = Ok(());
        SIGSYS_HANDLER.call_once(|| {
            handler_result = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys);
        });
        handler_result.map_err(SeccompError::Handler)?;
        let bpf = self.program()?;
        let no_opens = if self.refuses_opens {
            Some(no_opens_program().map_err(|source| SeccompError::Build {
                thread: self.thread,
                source,
            })?)
        } else {
            None
        };
        let err = |source| SeccompError::Install {
            thread: self.thread,
            source,
        };
        THREAD_NAME.with(|k| k.set(self.thread));
        // First: installing a filter takes prctl and seccomp, which the main filter forbids.
        if let Some(no_opens) = no_opens {
            seccompiler::apply_filter(&no_opens).map_err(err)?;
        }
        seccompiler::apply_filter(&bpf).map_err(err)?;
        self_test(self.thread);
        Ok(())
    }
}

/// The second filter of the threads that open no files: `openat` fails with `EACCES`, all else
/// is left to the first filter (the kernel applies the stricter answer of the two: `EACCES`
/// over the first filter's allowing `openat`, a trap over this one's allowing the rest).
///
/// Such a thread still calls `openat` once in a while, through glibc: when a malloc arena other
/// than the main one shrinks, glibc reads `/proc/sys/vm/overcommit_memory` (once per process,
/// on whichever thread gets there first; seen on the event loop during the vsock stream test).
/// A failed open is fine for glibc (it then keeps the memory mapped); a trap would stop the
/// process.
fn no_opens_program() -> Result<BpfProgram, BackendError> {
    SeccompFilter::new(
        BTreeMap::from([(libc::SYS_openat, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )?
    .try_into()
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
    let thread = THREAD_NAME.with(|k| k.get());
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
fn self_test(name: &str) {
    let Ok(value) = std::env::var("FLINT_SECCOMP_SELF_TEST") else {
        return;
    };
    let (thread, probe) = value.split_once(':').unwrap_or((&value, "forbidden-call"));
    if thread != name {
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
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(FIONBIO, libc::FIONBIO);
    }

    #[test]
    fn every_filter_compiles() {
        for filter in [
            Filter::vmm_thread(),
            Filter::vcpu(),
            Filter::event_loop(),
            Filter::console_input(),
            Filter::uffd_watch(),
        ] {
            let bpf = filter.program().unwrap();
            assert!(bpf.len() > 10, "{}", filter.thread());
        }
        assert!(no_opens_program().unwrap().len() > 3);
    }

    #[test]
    fn vcpus_may_only_run_and_write() {
        let vcpu = Filter::vcpu();
        assert!(vcpu.allows(libc::SYS_ioctl) && !vcpu.allows_any_arguments(libc::SYS_ioctl));
        assert!(vcpu.refuses_opens());
        assert!(!vcpu.allows(libc::SYS_socket));
        assert!(!vcpu.allows(libc::SYS_execve));
    }

    #[test]
    fn only_the_event_loop_makes_sockets_and_no_thread_here_creates_files_but_the_vmm() {
        let event_loop = Filter::event_loop();
        assert!(event_loop.allows(libc::SYS_socket));
        assert!(!event_loop.allows_any_arguments(libc::SYS_socket));
        assert!(event_loop.refuses_opens());
        assert!(Filter::console_input().refuses_opens());
        // The page-fault handler's watch only waits and reads on a connection it was given.
        let watch = Filter::uffd_watch();
        assert!(watch.refuses_opens() && watch.allows(libc::SYS_poll));
        assert!(!watch.allows(libc::SYS_socket) && !watch.allows(libc::SYS_connect));
        assert!(!watch.allows(libc::SYS_ioctl));
        let vmm = Filter::vmm_thread();
        assert!(!vmm.refuses_opens() && vmm.allows_any_arguments(libc::SYS_openat));
        assert!(!vmm.allows(libc::SYS_socket) && !vmm.allows(libc::SYS_connect));
        // Signals only within this process, the abort's handler only.
        assert!(!vmm.allows_any_arguments(libc::SYS_tgkill));
        assert!(!vmm.allows_any_arguments(libc::SYS_rt_sigaction));
    }

    #[test]
    fn composing_keeps_argument_rules_unless_a_call_is_allowed_outright() {
        let filter = Filter::new("test")
            .allow_ioctls(&[1, 2])
            .allow_ioctls(&[2, 3])
            .allow_read_only_opens();
        assert_eq!(filter.calls[&libc::SYS_ioctl].len(), 3);
        assert_eq!(filter.calls[&libc::SYS_openat].len(), 1);
        // Any arguments win over rules, before or after them.
        let filter = filter.allow(&[libc::SYS_openat]).allow_read_only_opens();
        assert!(filter.allows_any_arguments(libc::SYS_openat));
        // No values: nothing allowed.
        assert!(!Filter::new("test")
            .allow_ioctls(&[])
            .allows(libc::SYS_ioctl));
        // Every thread: executable memory never, futex and fcntl only some commands.
        for call in [
            libc::SYS_mmap,
            libc::SYS_mprotect,
            libc::SYS_futex,
            libc::SYS_fcntl,
        ] {
            assert!(filter.allows(call) && !filter.allows_any_arguments(call));
        }
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
