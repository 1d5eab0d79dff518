//! Signals: SIGINT/SIGTERM/SIGHUP stop the VM; a real-time signal kicks vCPUs out of KVM_RUN.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The signal that interrupts a vCPU thread's `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RECEIVED.store(num, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer and `fd` is the
        // VMM's wake-up eventfd, which stays open for the life of the process once installed.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivering the signal is what makes KVM_RUN return EINTR.
}

/// Route stop signals to `wake` and set up the vCPU kick signal.
pub fn install(wake: &EventFd) -> std::io::Result<()> {
    // Keep a duplicate open forever so the handler never writes to a closed or reused fd.
    let dup = wake.try_clone()?;
    WAKE_FD.store(dup.as_raw_fd(), Ordering::SeqCst);
    std::mem::forget(dup);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        register_signal_handler(sig, on_stop_signal).map_err(std::io::Error::from)?;
    }
    register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::from)?;
    Ok(())
}

/// The stop signal received, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}
