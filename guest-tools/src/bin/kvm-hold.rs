//! `kvm-hold`: keeps one idle KVM VM (an in-kernel irqchip and one vCPU that never runs)
//! open until it is killed. The nested test host (`resources/nested-host/run.sh`) starts it
//! before the scenario.
//!
//! Why: the host kernel patches its own code (static keys) whenever the number of KVM VMs,
//! or of vCPUs whose local APIC the guest has not enabled yet, goes from zero to one or back
//! (`preempt_notifier_key`, used by the scheduler's `__schedule` on every CPU, and
//! `apic_sw_disabled`). Under QEMU's multi-threaded TCG a CPU can keep executing a stale
//! translation of code another CPU just patched: it loops on the patch's temporary `int3`
//! with interrupts off while the other CPU waits for it, and the whole host freezes. Every
//! `flint run` creates and destroys a VM, so without a VM that stays, each one patches the
//! scheduler twice. This VM keeps both counts above zero, so nothing is patched.
//!
//! Prints `kvm-hold: ready` once the VM exists, then sleeps.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// <linux/kvm.h>: _IO(KVMIO, n) with KVMIO = 0xAE.
const KVM_CREATE_VM: libc::c_ulong = 0xae01;
const KVM_CREATE_VCPU: libc::c_ulong = 0xae41;
const KVM_CREATE_IRQCHIP: libc::c_ulong = 0xae60;

fn ioctl(fd: libc::c_int, request: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<i32> {
    // SAFETY: the three requests used here take an integer argument (no pointer), so the
    // kernel reads no memory of ours.
    let r = unsafe { libc::ioctl(fd, request, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: i32) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful KVM ioctl and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn main() {
    let fail = |what: &str, e: std::io::Error| -> ! {
        eprintln!("kvm-hold: cannot {what}: {e}");
        std::process::exit(1);
    };
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .unwrap_or_else(|e| fail("open /dev/kvm", e));
    let vm =
        owned(ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0).unwrap_or_else(|e| fail("create a VM", e)));
    ioctl(vm.as_raw_fd(), KVM_CREATE_IRQCHIP, 0).unwrap_or_else(|e| fail("create the irqchip", e));
    let _vcpu = owned(
        ioctl(vm.as_raw_fd(), KVM_CREATE_VCPU, 0).unwrap_or_else(|e| fail("create a vCPU", e)),
    );
    println!("kvm-hold: ready");
    loop {
        // SAFETY: pause() only waits for a signal.
        unsafe { libc::pause() };
    }
}
