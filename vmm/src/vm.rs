//! One running microVM: KVM setup, devices, vCPU threads, and waiting for the VM to end.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use arch::GuestMemoryMmap;
use devices::bus::{lock, Bus};
use devices::legacy::{BootTimer, SerialConsole, I8042};
use devices::virtio::balloon::{Balloon, GuestStats};
use devices::virtio::block::Block;
use devices::virtio::net::Net;
use devices::vmgenid::VmGenId;
use devices::IrqLine;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::config::{RateLimiterConfig, VmConfig, MAX_CMDLINE_LEN};
use crate::error::{Error, Result};
use crate::event_loop::EventLoop;
use crate::exit::{Ending, Endings};
use crate::metrics::DeviceMetrics;
use crate::seccomp::Filter;
use crate::vcpu::{PauseGate, UnhandledAccesses, Vcpu, VcpuShared};
use crate::{device_manager, loader, memory, signals};

const SERIAL_PORT: u64 = 0x3f8;
const SERIAL_IRQ: u32 = 4;
const I8042_PORT: u64 = 0x60;
const I8042_IRQ: u32 = 1;
const BOOT_TIMER_PORT: u64 = 0x3f0;
/// Where Firecracker's `--boot-timer` puts its boot timer (its first MMIO slot), for guests
/// whose init writes there; above flint's virtio-mmio slots.
const BOOT_TIMER_MMIO: u64 = 0xd000_0000;
const BOOT_TIMER_MMIO_SIZE: u64 = 0x1000;
const _: () = assert!(
    device_manager::MMIO_SLOTS_END <= BOOT_TIMER_MMIO
        && BOOT_TIMER_MMIO + BOOT_TIMER_MMIO_SIZE <= arch::layout::MMIO_GAP_END
);
/// The ACPI Generic Event Device's interrupt, which announces a new VM generation ID: COM2's
/// ISA line. flint has no second serial port and virtio devices take 5-23.
const GED_GSI: u32 = 3;
const TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_API_VERSION: i32 = 12;

/// Where the guest's serial console goes.
pub struct ConsoleIo {
    /// Guest output.
    pub output: Box<dyn Write + Send>,
    /// Host input forwarded to the guest, if any.
    pub input: Option<Box<dyn Read + Send>>,
    /// Whether Ctrl-A x in the input stops the VM (Ctrl-A Ctrl-A sends one Ctrl-A). For a
    /// terminal in raw mode, where Ctrl-C goes to the guest.
    pub escape: bool,
}

/// How a VM run ended, with what was counted along the way.
#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    /// Port accesses no device claimed.
    pub unhandled_pio: u64,
    /// MMIO accesses no device claimed.
    pub unhandled_mmio: u64,
    /// Host memory use when the VM ended (measured only when debug logging is on).
    pub memory: Option<crate::usage::MemoryUsage>,
    /// The vCPU exits by kind, summed over all vCPUs (see [`crate::metrics::ExitCounters`]).
    pub exits: String,
}

/// Open `/dev/kvm` and check what flint relies on.
fn open_kvm() -> Result<Kvm> {
    let kvm =
        Kvm::new().map_err(|e| Error::KvmOpen(std::io::Error::from_raw_os_error(e.errno())))?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(Error::KvmApiVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel interrupt controller"),
        (Cap::Pit2, "an in-kernel PIT"),
        (Cap::Irqfd, "irqfd"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::ImmediateExit, "immediate exit"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCapability(name));
        }
    }
    Ok(kvm)
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn host_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}

/// Boot the VM `config` describes and run it until it ends, on the calling thread restricted
/// to `vmm_thread` (see [`Vm::start`]). `start` is when the VMM process started: the
/// boot-timer device measures from it.
pub fn run(
    config: &VmConfig,
    console: ConsoleIo,
    start: Instant,
    vmm_thread: &Filter,
) -> Result<Outcome> {
    let mut vm = Vm::build(config, console, start)?;
    vm.start(vmm_thread)?;
    let ending = vm.wait_for_ending();
    Ok(vm.shutdown(ending))
}

/// What a snapshot holds of guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SnapshotType {
    /// All of it.
    #[default]
    Full,
    /// Only the pages changed since the previous snapshot the VM wrote or was loaded from
    /// (needs [`VmConfig::track_dirty_pages`]).
    Diff,
}

/// Where a snapshot load gets guest memory from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemBackend {
    /// The snapshot memory file, mapped copy-on-write (pages load on first touch).
    File(std::path::PathBuf),
    /// A page-fault handler listening on this Unix socket, which fills each page on first
    /// touch (see [`crate::uffd`]).
    Uffd(std::path::PathBuf),
}

/// What a diff snapshot of a VM is relative to.
struct Lineage {
    /// The memory id of the snapshot the VM's memory last equalled: the last one it wrote, or
    /// the one it was restored from. `None` until then.
    base: Option<u64>,
    /// The pages changed since then, when the VM tracks them.
    dirty: Option<memory::DirtyPages>,
}

/// How long `pause` waits for every vCPU to stop executing guest code.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One microVM: built (memory, devices, vCPUs configured), then started, paused and resumed,
/// and finally shut down. Owned by the VMM thread.
pub struct Vm {
    // Field order matters for drop: threads and devices go before the VM fd and memory.
    threads: Vec<JoinHandle<()>>,
    event_loop: Option<EventLoop>,
    /// The page-fault handler's watch, when a handler fills guest memory: stopped (closing
    /// flint's userfaultfd and the connection) once no thread runs in the VM.
    _uffd: Option<crate::uffd::Watch>,
    unstarted: Vec<Vcpu>,
    console_input: Option<(Box<dyn Read + Send>, bool)>,
    shared: Arc<VcpuShared>,
    serial: Arc<Mutex<SerialConsole>>,
    i8042: Arc<Mutex<I8042>>,
    virtio: device_manager::VirtioDevices,
    /// The VM generation ID, when the guest has ACPI.
    vmgenid: Option<VmGenId>,
    endings: Arc<Endings>,
    config: VmConfig,
    lineage: Mutex<Lineage>,
    mem: GuestMemoryMmap,
    vm: VmFd,
    _kvm: Kvm,
}

/// What `build` and `restore` create before the vCPUs.
struct Base {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    virtio: device_manager::VirtioDevices,
    /// Set by `build` and `restore` once guest memory holds the ID.
    vmgenid: Option<VmGenId>,
    mmio: Bus,
    endings: Arc<Endings>,
    /// Set by `restore`: the memory id of the snapshot the memory came from.
    memory_id: Option<u64>,
    uffd: Option<crate::uffd::Watch>,
}

/// Guest memory, and the watch of the page-fault handler filling it if one does.
type MadeMemory = (GuestMemoryMmap, Option<crate::uffd::Watch>);

/// Open KVM and create a VM with its interrupt controllers, PIT and `mem` (from `make_mem`,
/// given where the VM's endings are reported), restoring `vm_state` if given, then the virtio
/// devices the configuration asks for.
fn create_base(
    config: &VmConfig,
    make_mem: impl FnOnce(&Arc<Endings>) -> Result<MadeMemory>,
    vm_state: Option<(&crate::snapshot::VmState, ClockRestore)>,
) -> Result<Base> {
    config.validate()?;
    let kvm = open_kvm()?;
    let max_vcpus = kvm.get_max_vcpus() as u32;
    if config.vcpus > max_vcpus {
        return Err(Error::HostVcpuLimit {
            requested: config.vcpus,
            max: max_vcpus,
        });
    }

    // Open disk images before creating the VM so that their errors come first.
    let virtio_devices = device_manager::build_devices(config)?;
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the interrupt controller"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
    // Before any device can raise an interrupt: restored controllers must see it.
    if let Some((state, clock)) = vm_state {
        restore_vm_state(&vm, state, clock)?;
    }

    let endings = Arc::new(Endings::new().map_err(host_err("create an eventfd"))?);
    let (mem, uffd) = make_mem(&endings)?;
    memory::register(&vm, &mem, config.track_dirty_pages)?;
    let mut mmio = Bus::new();
    let virtio = device_manager::attach(&vm, &mem, &mut mmio, config, virtio_devices)?;
    Ok(Base {
        kvm,
        vm,
        mem,
        virtio,
        vmgenid: None,
        mmio,
        endings,
        memory_id: None,
        uffd,
    })
}

/// The interrupt controllers, PIT and clock of `vm`.
fn save_vm_state(vm: &VmFd) -> Result<crate::snapshot::VmState> {
    let chip = |id: u32| -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(kvm_err("read the interrupt controller"))?;
        Ok(chip)
    };
    Ok(crate::snapshot::VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("read the PIT"))?,
        clock: vm.get_clock().map_err(kvm_err("read the guest clock"))?,
    })
}

/// How a restored guest's clock continues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClockRestore {
    /// From the value it had when the snapshot was taken.
    #[default]
    AsSaved,
    /// Advanced by the wall-clock time since the snapshot was taken (`KVM_CLOCK_REALTIME`;
    /// needs a snapshot whose clock KVM read with the host's real time).
    Realtime,
}

impl ClockRestore {
    /// The `kvm_clock_data` flags that restore the saved `clock` this way, or why it cannot
    /// be.
    pub fn flags_for(self, clock: &kvm_clock_data) -> Result<u32> {
        match self {
            ClockRestore::AsSaved => Ok(0),
            ClockRestore::Realtime if clock.flags & KVM_CLOCK_REALTIME != 0 => {
                Ok(KVM_CLOCK_REALTIME)
            }
            ClockRestore::Realtime => Err(Error::ClockWithoutRealtime),
        }
    }
}

fn restore_vm_state(
    vm: &VmFd,
    state: &crate::snapshot::VmState,
    clock: ClockRestore,
) -> Result<()> {
    let chips = [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ];
    for (chip, id) in chips {
        // The id says which union member KVM reads: it must be the one it was saved as.
        let chip = kvm_irqchip {
            chip_id: id,
            ..*chip
        };
        vm.set_irqchip(&chip)
            .map_err(kvm_err("restore the interrupt controller"))?;
    }
    vm.set_pit2(&state.pit)
        .map_err(kvm_err("restore the PIT"))?;
    // The guest's clock continues from the snapshot's value. Flags describe how KVM read the
    // clock (e.g. a host-realtime pair); only the realtime pair applies to setting it, and only
    // when asked: KVM then adds the wall-clock time elapsed since it was read.
    let clock = kvm_clock_data {
        flags: clock.flags_for(&state.clock)?,
        ..state.clock
    };
    vm.set_clock(&clock)
        .map_err(kvm_err("restore the guest clock"))?;
    Ok(())
}

/// Whether `adjusted` builds the same devices, vCPUs and memory as `saved` (only backends,
/// such as files, TAP names and socket paths, may differ).
fn same_layout(saved: &VmConfig, adjusted: &VmConfig) -> bool {
    saved.vcpus == adjusted.vcpus
        && saved.mem_mib == adjusted.mem_mib
        && saved.entropy == adjusted.entropy
        && saved.drives.len() == adjusted.drives.len()
        && saved.nets.len() == adjusted.nets.len()
        && saved.vsock.is_some() == adjusted.vsock.is_some()
        && saved
            .drives_in_guest_order()
            .iter()
            .zip(adjusted.drives_in_guest_order())
            .all(|(a, b)| a.read_only == b.read_only && a.id == b.id)
}

impl Vm {
    /// Create the VM, load the kernel and configure every vCPU, without running anything.
    pub fn build(config: &VmConfig, console: ConsoleIo, start: Instant) -> Result<Vm> {
        let mem_size = config.mem_bytes();
        let mut base = create_base(
            config,
            |_| Ok((memory::create(mem_size, config.huge_pages)?, None)),
            None,
        )?;
        let cmdline = full_cmdline(&config.cmdline, &base.virtio.cmdline)?;
        let entry = loader::load(config, &cmdline, &base.mem)?;
        // Both: the MP table serves a guest booted with acpi=off.
        arch::mptable::setup_mptable(&base.mem, config.vcpus as u8)?;
        base.vmgenid = if config.acpi() {
            arch::acpi::setup_acpi(
                &base.mem,
                config.vcpus as u8,
                &base.virtio.acpi_devices(),
                GED_GSI,
            )?;
            let vmgenid = VmGenId::new(
                GuestAddress(arch::layout::VMGENID_START),
                irq_line(&base.vm, GED_GSI)?,
            );
            vmgenid.write_new(&base.mem)?;
            Some(vmgenid)
        } else {
            None
        };

        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            vcpus.push(Vcpu::new(
                &base.kvm,
                &base.vm,
                &base.mem,
                (id, config.vcpus, if config.smt { 2 } else { 1 }),
                entry,
            )?);
        }
        let serial = SerialConsole::new(irq_line(&base.vm, SERIAL_IRQ)?, console.output);
        Vm::assemble(
            config,
            base,
            vcpus,
            serial,
            None,
            console.input.map(|i| (i, console.escape)),
            start,
        )
    }

    /// Build a VM from the snapshot in `state_path` and `mem_path` (see [`Vm::snapshot`]). Its
    /// configuration comes from the state file; `adjust` may change it (e.g. a new vsock
    /// socket path) before devices open their backends, but not the devices, vCPUs or memory
    /// it describes (its memory backing and dirty-page tracking may change). Returns the VM
    /// (built, not started) and the configuration it was built with. Guest memory is mapped
    /// copy-on-write from `mem_path` (or read from it, with huge pages), which is never
    /// modified. A diff snapshot is refused: it must be merged into its base first.
    pub fn restore(
        state_path: &Path,
        mem_path: &Path,
        adjust: &mut dyn FnMut(&mut VmConfig),
        console: ConsoleIo,
        start: Instant,
    ) -> Result<(Vm, VmConfig)> {
        Vm::restore_with_clock(
            state_path,
            &MemBackend::File(mem_path.to_path_buf()),
            adjust,
            console,
            start,
            ClockRestore::AsSaved,
        )
    }

    /// [`Vm::restore`], with guest memory from `backend` (the memory file, or a page-fault
    /// handler: then the handler has been sent guest memory's regions before this returns,
    /// and anything touching a page waits for it to fill the page) and the guest clock
    /// continuing as `clock` says.
    pub fn restore_with_clock(
        state_path: &Path,
        backend: &MemBackend,
        adjust: &mut dyn FnMut(&mut VmConfig),
        console: ConsoleIo,
        start: Instant,
        clock: ClockRestore,
    ) -> Result<(Vm, VmConfig)> {
        let state = crate::snapshot::read_state(state_path)?;
        if state.diff_base.is_some() {
            return Err(Error::DiffSnapshotLoad(state_path.to_path_buf()));
        }
        let mut config = state.config.clone();
        adjust(&mut config);
        // The data store the adjusted configuration serves (a fresh one, or the caller's)
        // gets the snapshot's contents.
        if let (Some(mmds), Some(saved)) = (&config.mmds, &state.mmds) {
            mmds.store
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(saved.clone());
        }
        let invalid = |reason: String| Error::SnapshotInvalid {
            path: state_path.to_path_buf(),
            reason,
        };
        if !same_layout(&state.config, &config) {
            return Err(invalid(
                "the adjusted configuration changes the VM's devices, vCPUs or memory".into(),
            ));
        }
        let mem_size = config.mem_bytes();
        let make_mem = |endings: &Arc<Endings>| -> Result<MadeMemory> {
            match backend {
                MemBackend::File(path) => {
                    Ok((memory::restore(path, mem_size, config.huge_pages)?, None))
                }
                MemBackend::Uffd(socket) => {
                    if config.huge_pages == crate::HugePages::Size2M {
                        return Err(Error::UffdHugePages);
                    }
                    let mem = memory::create(mem_size, config.huge_pages)?;
                    let handler = crate::uffd::hand_over(&mem, memory::PAGE as u64, socket)?;
                    let watch = crate::uffd::Watch::start(handler, endings.clone())
                        .map_err(host_err("start the page-fault handler's watch thread"))?;
                    Ok((mem, Some(watch)))
                }
            }
        };
        let mut base = create_base(&config, make_mem, Some((&state.vm, clock)))?;
        if base.virtio.transports.len() != state.virtio.len() {
            return Err(invalid(format!(
                "it holds {} virtio devices but its configuration has {}",
                state.virtio.len(),
                base.virtio.transports.len()
            )));
        }
        // vCPUs (with their local APICs) first: an interrupt a restored device raises needs a
        // destination, or the IOAPIC would hold it forever.
        let vcpus = state
            .vcpus
            .iter()
            .map(|v| Vcpu::restore(&base.vm, v))
            .collect::<Result<Vec<_>>>()?;
        for (transport, saved) in base.virtio.transports.iter().zip(&state.virtio) {
            lock(transport)
                .restore(saved)
                .map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(saved) = &state.balloon {
            let mut found = false;
            for transport in &base.virtio.transports {
                let mut t = lock(transport);
                if let Some(b) = balloon_of_mut(&mut t) {
                    b.restore_state(saved);
                    found = true;
                }
            }
            if !found {
                return Err(invalid(
                    "it holds a balloon but its configuration has none".into(),
                ));
            }
            // What the API reports now: the target and interval the VM had.
            if let Some(c) = config.balloon.as_mut() {
                c.amount_mib = saved.target_pages / 256;
                if saved.stats_interval_s > 0 && c.stats_polling_interval_s > 0 {
                    c.stats_polling_interval_s = saved.stats_interval_s;
                }
            }
        }
        // This guest may be one of many clones of the snapshot: a new generation ID, and the
        // interrupt that has its kernel reseed its random number generator as it resumes.
        base.memory_id = state.memory_id;
        base.vmgenid = match &state.vmgenid {
            Some(saved) => {
                let vmgenid = VmGenId::new(GuestAddress(saved.addr), irq_line(&base.vm, GED_GSI)?);
                vmgenid.renew(&base.mem)?;
                Some(vmgenid)
            }
            None => {
                log::warn!(
                    "the snapshot's guest has no VM generation ID (it was booted with acpi=off): \
                     restored copies share its random number generator state until it reseeds"
                );
                None
            }
        };
        let serial = SerialConsole::from_state(
            &state.serial,
            irq_line(&base.vm, SERIAL_IRQ)?,
            console.output,
        )
        .map_err(invalid)?;
        let vm = Vm::assemble(
            &config,
            base,
            vcpus,
            serial,
            Some(&state.i8042),
            console.input.map(|i| (i, console.escape)),
            start,
        )?;
        Ok((vm, config))
    }

    /// The legacy devices, buses and vCPU thread state around `base` and `vcpus`.
    fn assemble(
        config: &VmConfig,
        base: Base,
        vcpus: Vec<Vcpu>,
        serial: SerialConsole,
        i8042_state: Option<&devices::legacy::I8042State>,
        console_input: Option<(Box<dyn Read + Send>, bool)>,
        start: Instant,
    ) -> Result<Vm> {
        let Base {
            kvm,
            vm,
            mem,
            virtio,
            vmgenid,
            mut mmio,
            endings,
            memory_id,
            uffd,
        } = base;
        // Recorded on the vCPU thread that wrote the reset command, before it runs on.
        let reset_endings = endings.clone();
        let on_reset = move || reset_endings.report(Ending::Reset);

        let serial = Arc::new(Mutex::new(serial));
        let mut i8042 = I8042::new(on_reset, irq_line(&vm, I8042_IRQ)?);
        if let Some(state) = i8042_state {
            i8042.restore_state(state);
        }
        let i8042 = Arc::new(Mutex::new(i8042));
        let log_boot_time = |elapsed: Duration| {
            log::info!("guest boot time: {} ms", elapsed.as_millis());
        };
        let boot_timer = BootTimer::new(start, log_boot_time);
        if config.boot_timer {
            let timer = Arc::new(Mutex::new(BootTimer::new(start, log_boot_time)));
            mmio.insert(timer, BOOT_TIMER_MMIO, BOOT_TIMER_MMIO_SIZE)
                .map_err(|e| Error::Host {
                    what: "map the boot timer",
                    source: std::io::Error::other(e.to_string()),
                })?;
        }
        let mut pio = Bus::new();
        let bus_err = |e: devices::bus::BusError| Error::Host {
            what: "map a device",
            source: std::io::Error::other(e.to_string()),
        };
        pio.insert(serial.clone(), SERIAL_PORT, 8)
            .map_err(bus_err)?;
        pio.insert(i8042.clone(), I8042_PORT, 5).map_err(bus_err)?;
        pio.insert(Arc::new(Mutex::new(boot_timer)), BOOT_TIMER_PORT, 1)
            .map_err(bus_err)?;

        // MSRs a snapshot saves. A KVM without the list gets snapshots without MSRs.
        let msr_list = match kvm.get_msr_index_list() {
            Ok(list) => list.as_slice().to_vec(),
            Err(e) => {
                log::warn!("KVM does not list its MSRs ({e}); snapshots will not save them");
                Vec::new()
            }
        };
        let shared = Arc::new(VcpuShared {
            pio,
            mmio,
            unhandled: UnhandledAccesses::default(),
            endings: endings.clone(),
            stop: Default::default(),
            exits: Default::default(),
            pause: PauseGate::default(),
            msr_list,
            process_start: start,
        });
        let lineage = Lineage {
            base: memory_id,
            dirty: config
                .track_dirty_pages
                .then(|| memory::DirtyPages::new(&mem)),
        };
        Ok(Vm {
            threads: Vec::new(),
            event_loop: None,
            _uffd: uffd,
            unstarted: vcpus,
            console_input,
            shared,
            serial,
            i8042,
            virtio,
            vmgenid,
            endings,
            config: config.clone(),
            lineage: Mutex::new(lineage),
            mem,
            vm,
            _kvm: kvm,
        })
    }

    /// The configuration the VM was built (or restored) with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Like [`Vm::start`], but the vCPUs wait at the pause gate until [`Vm::resume`].
    pub fn start_paused(&mut self, vmm_thread: &Filter) -> Result<()> {
        self.shared.pause.close();
        self.start(vmm_thread)
    }

    /// Write the paused VM's complete state to `state_path` and its guest memory to
    /// `mem_path` (both created or replaced, mode 0600): all of it, or as a diff only the pages
    /// changed since the previous snapshot (see [`crate::snapshot`]). Fails if the VM is not
    /// paused, and for a diff if it does not track dirty pages or has no previous snapshot.
    pub fn snapshot(&self, state_path: &Path, mem_path: &Path, kind: SnapshotType) -> Result<()> {
        if !self.shared.pause.is_closed() || self.threads.is_empty() {
            return Err(Error::NotPaused);
        }
        let mut lineage = self.lineage.lock().unwrap_or_else(|e| e.into_inner());
        if kind == SnapshotType::Diff {
            if lineage.dirty.is_none() {
                return Err(Error::DiffWithoutTracking);
            }
            if lineage.base.is_none() {
                return Err(Error::DiffWithoutBase);
            }
        }
        let vcpus = self
            .shared
            .pause
            .collect_states(self.threads.len(), PAUSE_TIMEOUT)
            .map_err(Error::SnapshotVcpus)?;
        let vm = save_vm_state(&self.vm)?;
        // Devices keep running on the event loop: holding every transport keeps them from
        // touching guest memory or their queues until memory is saved too.
        let mut transports: Vec<_> = self.virtio.transports.iter().map(|t| lock(t)).collect();
        let virtio = transports.iter().map(|t| t.state()).collect();
        let lineage = &mut *lineage;
        if let Some(dirty) = lineage.dirty.as_mut() {
            dirty.collect(&self.vm, &self.mem)?;
        }
        let memory_id = crate::snapshot::new_memory_id();
        let state = crate::snapshot::SnapshotState {
            magic: crate::snapshot::MAGIC.to_string(),
            version: crate::snapshot::VERSION,
            config: self.config.clone(),
            vcpus,
            vm,
            serial: lock(&self.serial).state(),
            i8042: lock(&self.i8042).state(),
            virtio,
            vmgenid: self
                .vmgenid
                .as_ref()
                .map(|v| crate::snapshot::VmGenIdState { addr: v.addr().0 }),
            mmds: self
                .config
                .mmds
                .as_ref()
                .map(|m| m.store.0.lock().unwrap_or_else(|e| e.into_inner()).state()),
            balloon: transports
                .iter_mut()
                .find_map(|t| balloon_of_mut(t).map(|b| b.state())),
            memory_id: Some(memory_id),
            diff_base: match kind {
                SnapshotType::Full => None,
                SnapshotType::Diff => lineage.base,
            },
        };
        if let (SnapshotType::Diff, Some(dirty)) = (kind, &lineage.dirty) {
            log::debug!("diff snapshot: {} changed pages", dirty.count());
        }
        match (kind, &lineage.dirty) {
            (SnapshotType::Diff, Some(dirty)) => memory::save_diff(&self.mem, mem_path, dirty)?,
            _ => memory::save(&self.mem, mem_path)?,
        }
        drop(transports);
        crate::snapshot::write_state(state_path, &state)?;
        // Only now: a snapshot that failed leaves the pages for the next one to hold.
        lineage.base = Some(memory_id);
        if let Some(dirty) = lineage.dirty.as_mut() {
            dirty.clear();
        }
        Ok(())
    }

    /// Start the device event loop, the vCPU threads and console input, then restrict the
    /// calling thread, which owns the VM from now on, to `vmm_thread`: at least
    /// [`Filter::vmm_thread`], plus what the caller does on this thread itself.
    pub fn start(&mut self, vmm_thread: &Filter) -> Result<()> {
        if crate::host_kvm_is_pvm() {
            log::warn!(
                "/dev/kvm on this host is PVM (kvm_pvm), whose instruction emulator cannot boot \
                 a normal Linux guest kernel"
            );
        }
        signals::install(self.endings.eventfd()).map_err(host_err("install signal handlers"))?;
        self.event_loop = Some(
            EventLoop::start(&self.virtio.transports)
                .map_err(host_err("start the device event loop"))?,
        );
        for vcpu in self.unstarted.drain(..) {
            let vcpu_shared = self.shared.clone();
            let handle = thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id()))
                .spawn(move || vcpu.run(&vcpu_shared))
                .map_err(host_err("start a vCPU thread"))?;
            self.threads.push(handle);
        }
        if let Some((input, escape)) = self.console_input.take() {
            spawn_console_input(input, escape, self.serial.clone(), self.endings.clone());
        }
        // The event loop thread set itself up while the vCPU threads started.
        if let Some(event_loop) = self.event_loop.as_mut() {
            event_loop
                .wait_ready()
                .map_err(host_err("start the device event loop"))?;
        }
        // Last: threads started from here on would inherit this filter too.
        vmm_thread.install()?;
        Ok(())
    }

    /// The eventfd that becomes readable when something may have ended the VM; then call
    /// [`Vm::ending`].
    pub fn ending_event(&self) -> &EventFd {
        self.endings.eventfd()
    }

    /// Why the VM ended, if it did: a vCPU, the keyboard controller or a signal.
    pub fn ending(&self) -> Option<Ending> {
        if let Some(ending) = self.endings.first() {
            return Some(ending);
        }
        if lock(&self.i8042).resets() > 0 {
            return Some(Ending::Reset);
        }
        signals::received().map(Ending::Signal)
    }

    /// Block until the VM ends.
    pub fn wait_for_ending(&self) -> Ending {
        loop {
            // EINTR (a signal arrived) is fine: `ending` tells what happened.
            let _ = self.endings.eventfd().read();
            if let Some(ending) = self.ending() {
                return ending;
            }
        }
    }

    /// Stop every vCPU from executing guest code until [`Vm::resume`].
    pub fn pause(&self) -> Result<()> {
        self.shared.pause.close();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while self.shared.pause.parked() < self.threads.len() {
            if Instant::now() > deadline {
                self.shared.pause.open();
                return Err(Error::Host {
                    what: "pause the vCPUs",
                    source: std::io::Error::other("they did not stop within 5 s"),
                });
            }
            for handle in &self.threads {
                if !handle.is_finished() {
                    let _ = handle.kill(signals::kick_signal());
                }
            }
            thread::sleep(Duration::from_micros(500));
        }
        Ok(())
    }

    /// Let paused vCPUs run again.
    pub fn resume(&self) {
        self.shared.pause.open();
    }

    /// Every counter as one JSON line, with `sections` (e.g. API request counts) added.
    pub fn metrics_line(
        &self,
        timestamp_ms: u128,
        sections: &[(String, Vec<(String, u64)>)],
    ) -> String {
        crate::metrics::json_line(
            timestamp_ms,
            &self.shared.exits,
            (
                self.shared.unhandled.pio.load(Ordering::Relaxed),
                self.shared.unhandled.mmio.load(Ordering::Relaxed),
            ),
            &self.virtio.metrics,
            sections,
        )
    }

    /// Run `f` on the disk named `id` (with its transport, locked).
    fn with_disk<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Block) -> Result<T>,
    ) -> Result<(
        T,
        std::sync::MutexGuard<'_, devices::virtio::mmio::MmioTransport>,
    )> {
        let index = self
            .virtio
            .metrics
            .iter()
            .position(|m| matches!(m, DeviceMetrics::Block { name, .. } if name == id))
            .ok_or_else(|| Error::NoSuchDrive(id.to_string()))?;
        let mut transport = lock(&self.virtio.transports[index]);
        let block = transport
            .device_mut()
            .as_any_mut()
            .and_then(|any| any.downcast_mut::<Block>())
            .ok_or_else(|| Error::NotADisk(id.to_string()))?;
        Ok((f(block)?, transport))
    }

    /// Give the disk named `id` a new backing file; the guest sees the new medium and size.
    pub fn replace_disk(&self, id: &str, path: &std::path::Path) -> Result<u64> {
        let (size, mut transport) = self.with_disk(id, |block| Ok(block.replace_disk(path)?))?;
        transport.notify_config_change();
        Ok(size)
    }

    /// New limits for the disk `id`, from its next request on.
    pub fn update_drive_rate_limiter(&self, id: &str, config: &RateLimiterConfig) -> Result<()> {
        self.with_disk(id, |block| match block.update_rate_limiter(config) {
            true => Ok(()),
            false => Err(Error::NoRateLimiter(id.to_string())),
        })
        .map(|_| ())
    }

    /// New receive and/or transmit limits for network interface number `n` (eth`n`), from
    /// its next frame on.
    pub fn update_net_rate_limiters(
        &self,
        n: usize,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<()> {
        let mut nets = self.virtio.transports.iter().filter(|t| {
            lock(t)
                .device_mut()
                .as_any_mut()
                .is_some_and(|any| any.is::<Net>())
        });
        let transport = nets.nth(n).ok_or(Error::NoSuchNet(n))?;
        let mut transport = lock(transport);
        let net = transport
            .device_mut()
            .as_any_mut()
            .and_then(|any| any.downcast_mut::<Net>())
            .ok_or(Error::NoSuchNet(n))?;
        if !net.update_rate_limiters(rx, tx) {
            return Err(Error::NoRateLimiter(format!("eth{n}")));
        }
        Ok(())
    }

    /// Run `f` on the balloon device and its transport (locked).
    fn with_balloon<T>(
        &self,
        f: impl FnOnce(&mut Balloon) -> T,
    ) -> Result<(
        T,
        std::sync::MutexGuard<'_, devices::virtio::mmio::MmioTransport>,
    )> {
        for transport in &self.virtio.transports {
            let mut t = lock(transport);
            if let Some(b) = balloon_of_mut(&mut t) {
                return Ok((f(b), t));
            }
        }
        Err(Error::NoBalloon)
    }

    /// Ask the guest for a balloon of `pages` 4 KiB pages.
    pub fn set_balloon_target(&self, pages: u32) -> Result<()> {
        let ((), mut transport) = self.with_balloon(|b| b.set_target_pages(pages))?;
        transport.notify_config_change();
        Ok(())
    }

    /// The balloon's target and actual size in pages, and the guest's latest statistics.
    pub fn balloon_stats(&self) -> Result<(u32, u32, GuestStats)> {
        let (stats, transport) =
            self.with_balloon(|b| (b.target_pages(), b.actual_pages(), b.stats()))?;
        drop(transport);
        Ok(stats)
    }

    /// Poll the guest's statistics every `seconds` (more than 0), asking for them now.
    pub fn set_balloon_stats_interval(&self, seconds: u16) -> Result<()> {
        let (done, transport) = self.with_balloon(|b| b.set_stats_interval(seconds))?;
        drop(transport);
        if !done {
            return Err(Error::BalloonStatsDisabled);
        }
        Ok(())
    }

    /// Press Ctrl-Alt-Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) {
        lock(&self.i8042).press_ctrl_alt_del();
    }

    /// Stop everything and report how the run went.
    pub fn shutdown(mut self, ending: Ending) -> Outcome {
        self.shared.pause.open();
        stop_vcpus(&self.shared, std::mem::take(&mut self.threads));
        if let Some(event_loop) = self.event_loop.take() {
            event_loop.stop();
        }
        // Walking the page tables of all guest RAM costs milliseconds: only when it is logged.
        let memory = log::log_enabled!(log::Level::Debug)
            .then(|| crate::usage::measure(&self.mem))
            .flatten();
        Outcome {
            ending,
            memory,
            unhandled_pio: self.shared.unhandled.pio.load(Ordering::Relaxed),
            unhandled_mmio: self.shared.unhandled.mmio.load(Ordering::Relaxed),
            exits: self.shared.exits.summary(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Guest memory must outlive every vCPU thread: stop them before it is unmapped.
        self.shared.pause.open();
        stop_vcpus(&self.shared, std::mem::take(&mut self.threads));
    }
}

/// The balloon behind `transport`, if it is one.
fn balloon_of_mut(transport: &mut devices::virtio::mmio::MmioTransport) -> Option<&mut Balloon> {
    transport
        .device_mut()
        .as_any_mut()
        .and_then(|any| any.downcast_mut::<Balloon>())
}

/// The configured command line followed by flint's additions, checked against the limit.
fn full_cmdline(configured: &str, additions: &str) -> Result<String> {
    let cmdline = match (configured.is_empty(), additions.is_empty()) {
        (_, true) => configured.to_string(),
        (true, false) => additions.to_string(),
        (false, false) => format!("{configured} {additions}"),
    };
    if cmdline.len() > MAX_CMDLINE_LEN {
        return Err(Error::CmdlineWithDevicesTooLong {
            len: cmdline.len(),
            max: MAX_CMDLINE_LEN,
        });
    }
    Ok(cmdline)
}

fn irq_line(vm: &VmFd, gsi: u32) -> Result<IrqLine> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("create an eventfd"))?;
    vm.register_irqfd(&evt, gsi)
        .map_err(kvm_err("connect a device interrupt"))?;
    Ok(IrqLine::new(evt))
}

/// How long a stop waits for the vCPU threads to leave `KVM_RUN`.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Make every vCPU thread leave `KVM_RUN` and wait for all of them, for at most
/// [`VCPU_STOP_TIMEOUT`]: a thread that does not stop by then (the host kernel did not let it
/// return) is left behind rather than keeping the VMM from exiting.
fn stop_vcpus(shared: &VcpuShared, threads: Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::Release);
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    // A kick that lands just before a thread enters KVM_RUN is lost, so kick until each
    // thread has finished.
    for (index, handle) in threads.into_iter().enumerate() {
        while !handle.is_finished() && Instant::now() < deadline {
            let _ = handle.kill(signals::kick_signal());
            thread::sleep(Duration::from_micros(500));
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            log::error!(
                "vCPU {index} did not stop within {} s; leaving it behind",
                VCPU_STOP_TIMEOUT.as_secs()
            );
        }
    }
}

/// Ctrl-A: the console escape key.
const ESCAPE: u8 = 0x01;

/// Strips the escape sequences out of console input.
#[derive(Debug, Default)]
struct EscapeFilter {
    after_escape: bool,
}

impl EscapeFilter {
    /// Filter `input` into `out`; true when the user typed Ctrl-A x.
    fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    b'x' | b'X' => return true,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

/// Forward host input to the serial console until the input ends. Input that does not fit in
/// the UART's FIFO waits until the guest has read some: nothing typed is lost.
fn spawn_console_input(
    mut input: Box<dyn Read + Send>,
    escape: bool,
    serial: Arc<Mutex<SerialConsole>>,
    endings: Arc<Endings>,
) {
    let _ = thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::Filter::console_input().install() {
                log::error!("{e}; console input is not forwarded");
                return;
            }
            let mut buf = [0u8; 64];
            let mut filter = EscapeFilter::default();
            let mut filtered = Vec::with_capacity(buf.len() * 2);
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                filtered.clear();
                let mut pending = if escape {
                    if filter.filter(&buf[..n], &mut filtered) {
                        endings.report(Ending::ConsoleQuit);
                        return;
                    }
                    &filtered[..]
                } else {
                    &buf[..n]
                };
                while !pending.is_empty() {
                    let taken = lock(&serial).enqueue_input(pending);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_advances_by_real_time_only_when_kvm_saved_it() {
        let saved = kvm_clock_data {
            clock: 5,
            flags: KVM_CLOCK_REALTIME | 2,
            ..Default::default()
        };
        assert_eq!(ClockRestore::AsSaved.flags_for(&saved).unwrap(), 0);
        assert_eq!(
            ClockRestore::Realtime.flags_for(&saved).unwrap(),
            KVM_CLOCK_REALTIME
        );
        let without = kvm_clock_data { flags: 2, ..saved };
        assert!(matches!(
            ClockRestore::Realtime.flags_for(&without),
            Err(Error::ClockWithoutRealtime)
        ));
    }

    #[test]
    fn device_parameters_follow_the_configured_cmdline() {
        assert_eq!(full_cmdline("a b", "c").unwrap(), "a b c");
        assert_eq!(full_cmdline("", "c").unwrap(), "c");
        assert_eq!(full_cmdline("a", "").unwrap(), "a");
        let long = "x".repeat(MAX_CMDLINE_LEN - 1);
        assert!(matches!(
            full_cmdline(&long, "yy"),
            Err(Error::CmdlineWithDevicesTooLong { len, .. }) if len == MAX_CMDLINE_LEN + 2
        ));
    }

    #[test]
    fn escape_filter_passes_text_and_catches_ctrl_a_x() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(!f.filter(b"ls\r", &mut out));
        assert_eq!(out, b"ls\r");
        out.clear();
        // Ctrl-A Ctrl-A is a literal Ctrl-A; Ctrl-A then another key passes both through,
        // also when the sequence is split across reads.
        assert!(!f.filter(&[ESCAPE, ESCAPE, ESCAPE], &mut out));
        assert!(!f.filter(b"c", &mut out));
        assert_eq!(out, [ESCAPE, ESCAPE, b'c']);
        out.clear();
        assert!(f.filter(&[b'a', ESCAPE, b'x', b'z'], &mut out));
        assert_eq!(out, b"a");
    }
}
