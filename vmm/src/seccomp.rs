//! seccomp-bpf filters: every flint thread allows only the system calls it needs. A thread that
//! makes any other call gets SIGSYS; flint logs which call it was and exits with status 159
//! (128 + SIGSYS).
//!
//! Filters are built with `seccompiler` and installed by each thread on itself, before it does
//! its work: vCPU threads before their first `KVM_RUN`, so no guest code ever runs unfiltered.
//! Threads inherit their creator's filter too, so the VMM thread installs its own only after it
//! has started the others.

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
    /// `flint run`/`exec`: talks to the guest agent over the vsock Unix socket, copies files
    /// in and out, and writes the command's output.
    AgentClient,
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
            ThreadKind::AgentClient => "agent-client",
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

/// What every thread needs: memory, locks, signals, time, leaving.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
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
    libc::SYS_fcntl,
];

/// Sockets, for the event loop (vsock host side) and the API server.
const SOCKETS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_socket,
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

/// Files, for the event loop (disks) and the VMM thread (logs, metrics, new disk media).
const FILES: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
];

fn ioctl_rules(requests: &[u64]) -> Result<Vec<SeccompRule>, String> {
    requests
        .iter()
        .map(|&request| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                .map_err(|e| e.to_string())?;
            SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
        })
        .collect()
}

/// The allowed system calls of `kind`: number → argument rules (empty: any arguments).
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
            allow(SOCKETS);
            allow(FILES);
            allow(&[libc::SYS_getrandom, libc::SYS_eventfd2]);
            &[TUNSETOFFLOAD, FIONBIO]
        }
        ThreadKind::Api => {
            allow(SOCKETS);
            allow(&[libc::SYS_unlink, libc::SYS_unlinkat]);
            &[FIONBIO]
        }
        ThreadKind::ConsoleIn => &[],
        ThreadKind::AgentClient => {
            allow(SOCKETS);
            allow(FILES);
            allow(&[
                libc::SYS_clone3,
                libc::SYS_clone,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_prctl,
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
                libc::SYS_copy_file_range,
                libc::SYS_sendfile,
                libc::SYS_poll,
                libc::SYS_ppoll,
                // Entropy for a restored guest's random number generator.
                libc::SYS_getrandom,
            ]);
            &[FIONBIO, TCGETS]
        }
        ThreadKind::Vmm => {
            allow(FILES);
            allow(&[
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_tgkill,
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
                libc::SYS_rt_sigaction,
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
    Ok(map)
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
    // context; the first argument register of the call (rsi holds the second one, e.g. an
    // ioctl request) is read from it.
    let arg1 = unsafe {
        let uc = context as *const libc::ucontext_t;
        (*uc).uc_mcontext.gregs[libc::REG_RSI as usize] as u64
    };
    // A const-initialised thread local without destructor: a plain TLS read.
    let thread = THREAD_KIND.with(|k| k.get());
    let mut digits = [0u8; 20];
    let mut hex = [0u8; 20];
    let mut msg = [0u8; 192];
    let mut len = 0;
    for part in [
        &b"flint: error: seccomp: the "[..],
        thread.as_bytes(),
        &b" thread made the forbidden system call "[..],
        decimal(nr.max(0) as u64, &mut digits),
        &b" (second argument "[..],
        hexadecimal(arg1, &mut hex),
        &b"); stopping\n"[..],
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
    THREAD_KIND.with(|k| k.set(kind.name()));
    seccompiler::apply_filter(&bpf).map_err(|e| err(e.to_string()))?;
    self_test(kind);
    Ok(())
}

/// With `FLINT_SECCOMP_SELF_TEST=<thread kind name>`, that thread makes a forbidden call right
/// after installing its filter, to show that violations stop flint (used by the tests).
fn self_test(kind: ThreadKind) {
    if std::env::var("FLINT_SECCOMP_SELF_TEST").as_deref() == Ok(kind.name()) {
        // SAFETY: getppid has no arguments and no side effects; here it is forbidden.
        unsafe { libc::getppid() };
    }
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
            ThreadKind::AgentClient,
        ] {
            let bpf = program(kind).unwrap();
            assert!(bpf.len() > 10, "{kind:?}");
        }
    }

    #[test]
    fn vcpus_may_only_run_and_write() {
        let rules = rules(ThreadKind::Vcpu).unwrap();
        assert!(rules.contains_key(&libc::SYS_ioctl));
        assert!(!rules.contains_key(&libc::SYS_openat));
        assert!(!rules.contains_key(&libc::SYS_socket));
        assert!(!rules.contains_key(&libc::SYS_execve));
        let api = rules_keys(ThreadKind::Api);
        assert!(api.contains(&libc::SYS_accept4));
        assert!(!api.contains(&libc::SYS_openat));
    }

    #[test]
    fn the_vmm_thread_may_signal_the_guest_agent() {
        // A signal that stops `flint run` makes the VMM thread tell the agent to kill the
        // command: std writes to the agent's Unix socket with sendto.
        assert!(rules_keys(ThreadKind::Vmm).contains(&libc::SYS_sendto));
        assert!(!rules_keys(ThreadKind::Vmm).contains(&libc::SYS_socket));
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
