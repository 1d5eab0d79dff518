//! vCPUs: their boot state, and the thread that runs each one and dispatches its exits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use arch::GuestMemoryMmap;
use devices::bus::{lock, Bus};
use kvm_bindings::{
    kvm_msr_entry, kvm_xcrs, CpuId, Msrs, KVM_EXIT_IO_OUT, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::error::{Error, Result};
use crate::exit::{Ending, Endings};
use crate::loader::KernelEntry;
use crate::snapshot::VcpuState;

/// Guest accesses that no device claimed. They are answered (reads see all ones) and counted,
/// never fatal.
#[derive(Debug, Default)]
pub struct UnhandledAccesses {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
}

/// What every vCPU thread shares.
pub struct VcpuShared {
    pub pio: Bus,
    pub mmio: Bus,
    pub unhandled: UnhandledAccesses,
    pub endings: Arc<Endings>,
    /// Set when the VM is stopping: vCPU threads leave their run loop at the next exit.
    pub stop: AtomicBool,
    /// vCPU exits by kind.
    pub exits: crate::metrics::ExitCounters,
    /// Closed while the VM is paused: vCPU threads wait at it instead of running the guest.
    pub pause: PauseGate,
    /// The MSRs a snapshot saves: KVM's MSR index list.
    pub msr_list: Vec<u32>,
    /// When the VMM process started (vCPU 0 logs when it first enters the guest).
    pub process_start: std::time::Instant,
}

/// Where vCPU threads wait while the VM is paused. While they wait they also answer requests
/// for their state (for a snapshot): the vCPU fds live on their threads.
#[derive(Debug, Default)]
pub struct PauseGate {
    closed: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    parked: usize,
    /// Bumped for every state request; each parked vCPU answers each request once.
    save_generation: u64,
    saved: Vec<(u32, std::result::Result<VcpuState, String>)>,
}

/// How often a parked vCPU looks at the gate even without a wake-up.
const GATE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

impl PauseGate {
    /// Make vCPUs stop at the gate (once kicked out of `KVM_RUN`).
    pub fn close(&self) {
        let _guard = lock(&self.state);
        self.closed.store(true, Ordering::Release);
    }

    /// Let waiting vCPUs go.
    pub fn open(&self) {
        let _guard = lock(&self.state);
        self.closed.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// How many vCPU threads are waiting at the gate.
    pub fn parked(&self) -> usize {
        lock(&self.state).parked
    }

    /// Whether the gate is closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// With the gate closed, wait up to `timeout` for `count` vCPUs to park, then have each
    /// save its state. Returns the states in vCPU id order, or why not.
    pub fn collect_states(
        &self,
        count: usize,
        timeout: std::time::Duration,
    ) -> std::result::Result<Vec<VcpuState>, String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = lock(&self.state);
        if !self.is_closed() {
            return Err("the VM is not paused".into());
        }
        while st.parked < count {
            if std::time::Instant::now() > deadline {
                return Err(format!("only {} of {count} vCPUs stopped", st.parked));
            }
            st = self.wait_a_while(st);
        }
        st.save_generation += 1;
        st.saved.clear();
        self.changed.notify_all();
        while st.saved.len() < count {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "only {} of {count} vCPUs saved their state in time",
                    st.saved.len()
                ));
            }
            st = self.wait_a_while(st);
        }
        let mut saved = std::mem::take(&mut st.saved);
        saved.sort_by_key(|(id, _)| *id);
        saved
            .into_iter()
            .map(|(id, r)| r.map_err(|e| format!("vCPU {id}: {e}")))
            .collect()
    }

    fn wait_a_while<'a>(
        &self,
        guard: std::sync::MutexGuard<'a, GateState>,
    ) -> std::sync::MutexGuard<'a, GateState> {
        self.changed
            .wait_timeout(guard, std::time::Duration::from_millis(5))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0)
    }

    /// Wait while the gate is closed and `stop` is not set, answering state requests with
    /// `save` (for vCPU `id`).
    fn wait(
        &self,
        stop: &AtomicBool,
        id: u32,
        save: &mut dyn FnMut() -> std::result::Result<VcpuState, String>,
    ) {
        let mut st = lock(&self.state);
        st.parked += 1;
        let mut seen = st.save_generation;
        loop {
            if st.save_generation != seen {
                seen = st.save_generation;
                let state = save();
                st.saved.push((id, state));
                self.changed.notify_all();
            }
            if !self.closed.load(Ordering::Acquire) || stop.load(Ordering::Acquire) {
                break;
            }
            st = self
                .changed
                .wait_timeout(st, GATE_POLL)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        st.parked -= 1;
    }
}

/// Device accesses a snapshot serves at most to complete a vCPU's last instruction (a
/// string I/O instruction or an MMIO access split across pages can take more than one).
const MAX_COMPLETION_EXITS: usize = 64;

/// MSRs per KVM_GET_MSRS / KVM_SET_MSRS call.
const MSR_CHUNK: usize = 64;

/// One configured vCPU, ready to run.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    /// The CPUID the vCPU was given (a snapshot saves it as it is).
    cpuid: CpuId,
    /// Bytes of the `kvm_run` area KVM maps for the vCPU (the port I/O data lives in it).
    run_size: usize,
}

impl Vcpu {
    /// Create vCPU `id` of `count` (with `threads_per_core` threads on each core) and give it
    /// its boot state.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        (id, count, threads_per_core): (u32, u32, u8),
        entry: KernelEntry,
    ) -> Result<Vcpu> {
        let setup = |what: &'static str| move |source| Error::VcpuSetup { id, what, source };
        let fd = vm.create_vcpu(u64::from(id)).map_err(setup("create it"))?;

        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("read the supported CPUID"))?;
        // Both fit in u8: the configuration allows at most 254 vCPUs.
        arch::cpuid::normalize(
            cpuid.as_mut_slice(),
            id as u8,
            count as u8,
            threads_per_core,
        );
        if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            arch::cpuid::enable_tsc_deadline(cpuid.as_mut_slice());
        }
        if let Some(brand) = arch::cpuid::host_brand_string() {
            arch::cpuid::fill_brand_string(cpuid.as_mut_slice(), &brand);
        }
        fd.set_cpuid2(&cpuid).map_err(setup("set CPUID"))?;
        if let Some(xcr0) = arch::cpuid::supported_xcr0(cpuid.as_slice()) {
            let mut xcrs = kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            xcrs.xcrs[0].value = xcr0;
            fd.set_xcrs(&xcrs).map_err(setup("set XCR0"))?;
        }

        let entries = arch::regs::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::VcpuSetup {
            id,
            what: "build the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let set = fd.set_msrs(&msrs).map_err(setup("set MSRs"))?;
        if set != entries.len() {
            return Err(Error::VcpuSetup {
                id,
                what: "set MSRs",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }

        fd.set_fpu(&arch::regs::boot_fpu())
            .map_err(setup("set the FPU state"))?;
        let sregs = fd.get_sregs().map_err(setup("read segment registers"))?;
        let sregs = arch::regs::boot_sregs(mem, entry.protocol, &sregs)?;
        fd.set_sregs(&sregs)
            .map_err(setup("set segment registers"))?;
        fd.set_regs(&arch::regs::boot_regs(entry.entry, entry.protocol))
            .map_err(setup("set registers"))?;

        let mut lapic = fd.get_lapic().map_err(setup("read the local APIC"))?;
        arch::regs::set_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(setup("set the local APIC"))?;
        Ok(Vcpu {
            id,
            fd,
            cpuid,
            run_size: vm.run_size(),
        })
    }

    /// Create vCPU `state.id` and give it the state a snapshot saved, in the order KVM needs:
    /// CPUID, MP state, registers, segment registers, XSAVE, XCRs, debug registers, local
    /// APIC, MSRs, then pending events.
    pub fn restore(vm: &VmFd, state: &VcpuState) -> Result<Vcpu> {
        let id = state.id;
        let setup = |what: &'static str| move |source| Error::VcpuSetup { id, what, source };
        let einval = |what: &'static str| Error::VcpuSetup {
            id,
            what,
            source: kvm_ioctls::Error::new(libc::EINVAL),
        };
        let fd = vm.create_vcpu(u64::from(id)).map_err(setup("create it"))?;
        let cpuid = CpuId::from_entries(&state.cpuid)
            .map_err(|_| einval("rebuild CPUID (too many entries)"))?;
        fd.set_cpuid2(&cpuid).map_err(setup("set CPUID"))?;
        fd.set_mp_state(state.mp_state)
            .map_err(setup("set the MP state"))?;
        fd.set_regs(&state.regs).map_err(setup("set registers"))?;
        fd.set_sregs(&state.sregs)
            .map_err(setup("set segment registers"))?;
        // SAFETY: KVM_SET_XSAVE reads more than the 4 KiB `kvm_xsave` only for a VM granted
        // dynamically enabled XSTATE features (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM, e.g. AMX),
        // which flint never requests; so the kernel reads only `state.xsave`.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(setup("set the XSAVE state"))?;
        if state.xcrs.nr_xcrs as usize > state.xcrs.xcrs.len() {
            return Err(einval("set XCRs (bad count)"));
        }
        fd.set_xcrs(&state.xcrs).map_err(setup("set XCRs"))?;
        fd.set_debug_regs(&state.debugregs)
            .map_err(setup("set debug registers"))?;
        fd.set_lapic(&state.lapic)
            .map_err(setup("set the local APIC"))?;
        for chunk in state.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| einval("build the MSR list"))?;
            let set = fd.set_msrs(&msrs).map_err(setup("set MSRs"))?;
            if set != chunk.len() {
                return Err(Error::SnapshotMsr {
                    id,
                    index: chunk[set].index,
                });
            }
        }
        fd.set_vcpu_events(&state.vcpu_events)
            .map_err(setup("set pending events"))?;
        Ok(Vcpu {
            id,
            fd,
            cpuid,
            run_size: vm.run_size(),
        })
    }

    /// Everything KVM holds about this vCPU, for a snapshot. First completes a pending I/O
    /// exit (KVM finishes the instruction only on the next `KVM_RUN`), without running guest
    /// code.
    pub fn save_state(&mut self, shared: &VcpuShared) -> std::result::Result<VcpuState, String> {
        let fail =
            |what: &'static str| move |e: kvm_ioctls::Error| format!("cannot read {what}: {e}");
        let completed = self.complete_pending_exit(shared);
        self.fd.set_kvm_immediate_exit(0);
        completed?;
        let msr_list = &shared.msr_list;
        Ok(VcpuState {
            id: self.id,
            cpuid: self.cpuid.as_slice().to_vec(),
            mp_state: self.fd.get_mp_state().map_err(fail("the MP state"))?,
            regs: self.fd.get_regs().map_err(fail("registers"))?,
            sregs: self.fd.get_sregs().map_err(fail("segment registers"))?,
            xsave: self.fd.get_xsave().map_err(fail("the XSAVE state"))?,
            xcrs: self.fd.get_xcrs().map_err(fail("XCRs"))?,
            debugregs: self.fd.get_debug_regs().map_err(fail("debug registers"))?,
            lapic: self.fd.get_lapic().map_err(fail("the local APIC"))?,
            msrs: self.read_msrs(msr_list)?,
            vcpu_events: self.fd.get_vcpu_events().map_err(fail("pending events"))?,
        })
    }

    /// Enter KVM with `immediate_exit` set: KVM completes the instruction of the last I/O exit
    /// and returns at once, without running guest code. A string instruction may need more
    /// device accesses first; they are served as usual.
    fn complete_pending_exit(&mut self, shared: &VcpuShared) -> std::result::Result<(), String> {
        self.fd.set_kvm_immediate_exit(1);
        for _ in 0..MAX_COMPLETION_EXITS {
            let result = self.fd.run();
            if is_port_io(&result) {
                self.serve_port_io(shared)?;
                continue;
            }
            match result.map(|exit| dispatch_mmio(shared, exit)) {
                Err(e) if e.errno() == libc::EINTR => return Ok(()),
                Err(e) => return Err(format!("cannot complete its last exit: {e}")),
                Ok(None) => continue,
                Ok(Some(exit)) => {
                    return Err(format!(
                        "completing its last exit gave exit {}",
                        exit_name(&exit)
                    ))
                }
            }
        }
        Err("completing its last exit took too many device accesses".into())
    }

    /// Every MSR of `list` that KVM lets us read; the others are skipped.
    fn read_msrs(&self, list: &[u32]) -> std::result::Result<Vec<kvm_msr_entry>, String> {
        let mut out = Vec::with_capacity(list.len());
        let mut rest = list;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(MSR_CHUNK)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| format!("cannot build the MSR list: {e:?}"))?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| format!("cannot read MSRs: {e}"))?;
            out.extend_from_slice(&msrs.as_slice()[..read.min(chunk.len())]);
            // KVM stops at the first MSR it cannot read: skip that one.
            let consumed = if read < chunk.len() {
                log::debug!("vCPU {}: MSR {:#x} is not readable", self.id, chunk[read]);
                read + 1
            } else {
                chunk.len()
            };
            rest = &rest[consumed..];
        }
        Ok(out)
    }

    /// This vCPU's index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Run the guest until the VM stops or this vCPU ends it.
    pub fn run(mut self, shared: &VcpuShared) {
        if let Err(e) = crate::seccomp::Filter::vcpu().install() {
            shared.endings.report(Ending::Fault {
                vcpu: self.id,
                reason: e.to_string(),
            });
            return;
        }
        if self.id == 0 {
            log::debug!(
                "vCPU 0 enters the guest {} ms after the process started",
                shared.process_start.elapsed().as_millis()
            );
        }
        // Once anything ended the VM (e.g. this vCPU's own keyboard-controller reset) run no
        // further guest code: what the guest would do next no longer matters.
        while !shared.stop.load(Ordering::Acquire) && !shared.endings.ended() {
            if shared.pause.is_closed() {
                let id = self.id;
                shared
                    .pause
                    .wait(&shared.stop, id, &mut || self.save_state(shared));
                continue;
            }
            if let Some(ending) = self.run_once(shared) {
                shared.endings.report(ending);
                return;
            }
        }
    }

    /// Run until one exit and handle it; `Some` when the exit ends the VM.
    fn run_once(&mut self, shared: &VcpuShared) -> Option<Ending> {
        let vcpu = self.id;
        let fault = |reason: String| Some(Ending::Fault { vcpu, reason });
        let exits = &shared.exits;
        let count = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        let result = self.fd.run();
        if is_port_io(&result) {
            return self
                .serve_port_io(shared)
                .err()
                .map(|reason| Ending::Fault { vcpu, reason });
        }
        match result.map(|exit| dispatch_mmio(shared, exit)) {
            Ok(None) => None,
            Ok(Some(VcpuExit::Intr)) => {
                count(&exits.interrupted);
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                count(&exits.interrupted);
                // Kicked by the VMM (stop, pause) or interrupted by a signal: the run loop
                // checks why.
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => {
                count(&exits.other);
                fault(format!("KVM_RUN failed: {e}"))
            }
            Ok(Some(VcpuExit::Shutdown)) => {
                count(&exits.other);
                fault(format!(
                    "the guest triple-faulted (shutdown exit; {})",
                    self.cpu_state()
                ))
            }
            Ok(Some(VcpuExit::InternalError)) => {
                count(&exits.other);
                let suberror = self.internal_suberror();
                fault(format!("KVM internal error (suberror {suberror})"))
            }
            Ok(Some(other)) => {
                count(&exits.other);
                ending_exit(self.id, other)
            }
        }
    }

    /// Where the vCPU was, for the message of a fatal exit.
    fn cpu_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            // AMD's KVM resets the vCPU before it reports a shutdown: its registers then say
            // nothing about where the guest was.
            (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cr0 & 1 == 0 && s.cs.selector == 0xf000 => {
                "KVM reset the vCPU's registers before reporting it".to_string()
            }
            (Ok(r), Ok(s)) => format!(
                "rip {:#x}, rsp {:#x}, cr0 {:#x}, cr2 {:#x}, cr3 {:#x}, cr4 {:#x}, efer {:#x}",
                r.rip, r.rsp, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
        }
    }

    /// Serve the port access of the `KVM_EXIT_IO` that `KVM_RUN` just returned. A string
    /// instruction (`rep outs`/`rep ins`) arrives as one exit holding `count` items of `size`
    /// bytes: each item is its own access, in order, as on real hardware. Fails only if KVM
    /// describes data outside the area it maps.
    fn serve_port_io(&mut self, shared: &VcpuShared) -> std::result::Result<(), String> {
        let run_size = self.run_size;
        let run = self.fd.get_kvm_run();
        // SAFETY: called only right after KVM_RUN returned KVM_EXIT_IO, so `io` is the member
        // of the union that KVM filled.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let offset = usize::try_from(io.data_offset).unwrap_or(usize::MAX);
        let len = size.checked_mul(io.count as usize);
        let within = len
            .and_then(|len| offset.checked_add(len))
            .is_some_and(|end| end <= run_size);
        if !(1..=8).contains(&size) || !within {
            return Err(format!(
                "KVM reported port I/O of {} items of {size} bytes at offset {offset:#x}, \
                 outside its {run_size:#x}-byte shared area",
                io.count
            ));
        }
        let len = size * io.count as usize;
        // SAFETY: KVM maps `run_size` bytes for the vCPU starting at `run`, and
        // `[offset, offset + len)` was checked to lie within them. The slice is derived from
        // `run`, which is not used again while the slice lives, and the slice is dropped
        // before the next KVM_RUN (no other thread touches this vCPU's area).
        let data = unsafe {
            std::slice::from_raw_parts_mut(std::ptr::from_mut(run).cast::<u8>().add(offset), len)
        };
        let port = u64::from(io.port);
        let exits = &shared.exits;
        if u32::from(io.direction) == KVM_EXIT_IO_OUT {
            exits.io_out.fetch_add(1, Ordering::Relaxed);
            for item in data.chunks_exact(size) {
                if !shared.pio.write(port, item) {
                    shared.unhandled.pio.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else {
            exits.io_in.fetch_add(1, Ordering::Relaxed);
            for item in data.chunks_exact_mut(size) {
                if !shared.pio.read(port, item) {
                    item.fill(0xff);
                    shared.unhandled.pio.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member of the union: this is called only right
        // after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }
}

/// Whether `KVM_RUN` returned a port access ([`Vcpu::serve_port_io`] serves it).
fn is_port_io(result: &std::result::Result<VcpuExit, kvm_ioctls::Error>) -> bool {
    matches!(result, Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)))
}

/// Hand an MMIO access to its bus (unclaimed reads see all ones); any other exit is given
/// back. Port accesses are served by [`Vcpu::serve_port_io`].
fn dispatch_mmio<'a>(shared: &VcpuShared, exit: VcpuExit<'a>) -> Option<VcpuExit<'a>> {
    let exits = &shared.exits;
    let count = |c: &AtomicU64| {
        c.fetch_add(1, Ordering::Relaxed);
    };
    match exit {
        VcpuExit::MmioRead(addr, data) => {
            count(&exits.mmio_read);
            if !shared.mmio.read(addr, data) {
                data.fill(0xff);
                count(&shared.unhandled.mmio);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            count(&exits.mmio_write);
            if !shared.mmio.write(addr, data) {
                count(&shared.unhandled.mmio);
            }
        }
        other => return Some(other),
    }
    None
}

/// Exits other than device accesses: they end the VM.
fn ending_exit(vcpu: u32, exit: VcpuExit) -> Option<Ending> {
    let fault = |reason: String| Some(Ending::Fault { vcpu, reason });
    match exit {
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_RESET | KVM_SYSTEM_EVENT_SHUTDOWN => Some(Ending::Reset),
            other => fault(format!("unexpected system event {other}")),
        },
        VcpuExit::FailEntry(reason, cpu) => fault(format!(
            "KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"
        )),
        VcpuExit::Hlt => fault("the vCPU halted with no way to wake up".into()),
        other => fault(format!("unexpected exit {}", exit_name(&other))),
    }
}

fn exit_name(exit: &VcpuExit) -> String {
    let debug = format!("{exit:?}");
    debug
        .split(['(', ' ', '{'])
        .next()
        .unwrap_or("unknown")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs /dev/kvm (any KVM, PVM included).
    #[test]
    fn unreadable_msrs_are_skipped() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        fd.set_cpuid2(&cpuid).unwrap();
        let vcpu = Vcpu {
            id: 0,
            fd,
            cpuid,
            run_size: vm.run_size(),
        };
        // IA32_TSC, two indexes no CPU has, SYSENTER_CS, SYSENTER_ESP; and a list longer
        // than one KVM_GET_MSRS call.
        let mut list = vec![0x10, 0xdead_beef, 0x174, 0x0bad_0000, 0x175];
        list.extend(std::iter::repeat_n(0x174, MSR_CHUNK));
        list.push(0xdead_beef);
        list.push(0x175);
        let read = vcpu.read_msrs(&list).unwrap();
        let indexes: Vec<u32> = read.iter().map(|m| m.index).collect();
        let mut want = vec![0x10, 0x174, 0x175];
        want.extend(std::iter::repeat_n(0x174, MSR_CHUNK));
        want.push(0x175);
        assert_eq!(indexes, want);
        assert!(vcpu.read_msrs(&[]).unwrap().is_empty());
    }
}
