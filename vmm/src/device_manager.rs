//! virtio-mmio devices: building them from the configuration, placing each in its MMIO slot
//! with its interrupt, wiring queue notifications to ioeventfds, and describing them to the
//! guest on the kernel command line.

use std::sync::{Arc, Mutex};

use arch::GuestMemoryMmap;
use devices::bus::Bus;
use devices::rate_limiter::RateLimiter;
use devices::virtio::balloon::Balloon;
use devices::virtio::block::Block;
use devices::virtio::mmio::{
    InterruptRegisters, MmioTransport, MMIO_REGION_SIZE, QUEUE_NOTIFY_OFFSET,
};
use devices::virtio::net::{default_mac, Net};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::{VirtioDevice, VirtioInterrupt};
use devices::IrqLine;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{CacheType, RateLimiterConfig, VmConfig};
use crate::error::{Error, Result};
use crate::metrics::DeviceMetrics;

/// First virtio-mmio slot: the start of the MMIO hole.
pub const MMIO_SLOTS_START: u64 = arch::layout::MMIO_GAP_START;
/// Interrupt lines for virtio devices: IOAPIC pins 5-23 (0-4 are the PIT, keyboard, cascade
/// and serial ports).
const FIRST_IRQ: u32 = 5;
const LAST_IRQ: u32 = 23;
/// End (exclusive) of the last slot there is an interrupt line for.
pub const MMIO_SLOTS_END: u64 =
    MMIO_SLOTS_START + (LAST_IRQ - FIRST_IRQ + 1) as u64 * MMIO_REGION_SIZE;

/// Where one virtio-mmio device lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub irq: u32,
}

impl MmioSlot {
    /// The `n`th slot, if there is an interrupt line left for it.
    pub fn nth(n: usize) -> Option<MmioSlot> {
        let irq = FIRST_IRQ.checked_add(u32::try_from(n).ok()?)?;
        (irq <= LAST_IRQ).then(|| MmioSlot {
            base: MMIO_SLOTS_START + n as u64 * MMIO_REGION_SIZE,
            irq,
        })
    }

    /// How the guest kernel learns about this device without ACPI
    /// (`VIRTIO_MMIO_CMDLINE_DEVICES`).
    pub fn cmdline_param(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_REGION_SIZE >> 10,
            self.base,
            self.irq
        )
    }
}

/// The virtio devices of a VM, in slot order.
pub struct VirtioDevices {
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub slots: Vec<MmioSlot>,
    /// Each device's counters.
    pub metrics: Vec<DeviceMetrics>,
    /// Kernel command line additions: the devices (when the guest has no ACPI), and the root
    /// disk when there is one.
    pub cmdline: String,
}

impl VirtioDevices {
    /// The devices as the ACPI tables describe them.
    pub fn acpi_devices(&self) -> Vec<arch::acpi::VirtioMmioDevice> {
        self.slots
            .iter()
            .map(|slot| arch::acpi::VirtioMmioDevice {
                // Slots are in the MMIO hole below 4 GiB.
                base: slot.base as u32,
                size: MMIO_REGION_SIZE as u32,
                gsi: slot.irq,
            })
            .collect()
    }
}

/// A rate limiter (and its timerfd, created here on the VMM thread) for `config`: without
/// one, a limiter with no buckets, which lets everything through until the API sets limits.
fn limiter(config: &Option<RateLimiterConfig>, device: &str) -> Result<RateLimiter> {
    RateLimiter::new(&config.unwrap_or_default()).map_err(|source| Error::RateLimiterTimer {
        device: device.to_string(),
        source,
    })
}

/// The device models the configuration asks for, in the order the guest sees them, with
/// handles on their counters.
pub fn build_devices(config: &VmConfig) -> Result<Vec<(Box<dyn VirtioDevice>, DeviceMetrics)>> {
    let mut devices: Vec<(Box<dyn VirtioDevice>, DeviceMetrics)> = Vec::new();
    for (n, drive) in config.drives_in_guest_order().into_iter().enumerate() {
        let id = drive.id.as_deref().unwrap_or("");
        let mut block = Block::new(&drive.path, drive.read_only, id)?;
        block = block.with_rate_limiter(limiter(
            &drive.rate_limiter,
            &drive.path.display().to_string(),
        )?);
        if drive.cache == CacheType::Unsafe {
            block = block.without_flush();
        }
        let name = drive
            .id
            .clone()
            .unwrap_or_else(|| format!("vd{}", disk_letter(n)));
        let metrics = DeviceMetrics::Block {
            name,
            metrics: block.metrics(),
        };
        devices.push((Box::new(block), metrics));
    }
    for (n, net) in config.nets.iter().enumerate() {
        let mac = net.mac.unwrap_or_else(|| default_mac(&net.tap));
        let mut dev = Net::new(&net.tap, mac)?.with_rate_limiters(
            Some(limiter(&net.rx_rate_limiter, &net.tap)?),
            Some(limiter(&net.tx_rate_limiter, &net.tap)?),
        );
        if let Some(mtu) = net.mtu {
            dev = dev.with_mtu(mtu);
        }
        if let Some(mmds) = config.mmds.as_ref().filter(|m| {
            net.id
                .as_ref()
                .is_some_and(|id| m.network_interfaces.contains(id))
        }) {
            dev = dev.with_mmds(devices::mmds::endpoint::MmdsEndpoint::new(
                mmds.ipv4_address,
                mmds.store.0.clone(),
            ));
        }
        // Named by the interface's id (Firecracker's `net_<iface_id>`), else as the guest
        // names it.
        let metrics = DeviceMetrics::Net {
            name: net.id.clone().unwrap_or_else(|| format!("eth{n}")),
            metrics: dev.metrics(),
        };
        devices.push((Box::new(dev), metrics));
    }
    if let Some(vsock) = &config.vsock {
        let dev = Vsock::new(vsock.guest_cid, &vsock.uds_path)?;
        let metrics = DeviceMetrics::Vsock(dev.metrics());
        devices.push((Box::new(dev), metrics));
    }
    if config.entropy {
        let rng = Rng::new()
            .with_rate_limiter(limiter(&config.entropy_rate_limiter, "the entropy device")?);
        let metrics = DeviceMetrics::Rng(rng.metrics());
        devices.push((Box::new(rng), metrics));
    }
    if let Some(balloon) = &config.balloon {
        let dev = Balloon::new(balloon.target_pages(), balloon.features()).map_err(|source| {
            Error::Host {
                what: "create the balloon's statistics timer",
                source,
            }
        })?;
        let metrics = DeviceMetrics::Balloon(dev.metrics());
        devices.push((Box::new(dev), metrics));
    }
    Ok(devices)
}

/// The letter Linux gives the `n`th virtio disk (a, b, ..., z, then aa, ab, ...).
fn disk_letter(n: usize) -> String {
    let mut n = n;
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// Root-disk parameters for the kernel command line.
fn root_cmdline(config: &VmConfig) -> Option<String> {
    let root = config.drives.iter().find(|d| d.root)?;
    let device = match &root.partuuid {
        Some(uuid) => format!("PARTUUID={uuid}"),
        None => "/dev/vda".to_string(),
    };
    Some(format!(
        "root={device} {}",
        if root.read_only { "ro" } else { "rw" }
    ))
}

/// Place `devices` in MMIO slots on `mmio`, connect their interrupts and queue notifications.
pub fn attach(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    config: &VmConfig,
    devices: Vec<(Box<dyn VirtioDevice>, DeviceMetrics)>,
) -> Result<VirtioDevices> {
    let host = |what: &'static str| move |source| Error::Host { what, source };
    let kvm = |what: &'static str| move |source| Error::Kvm { what, source };
    let mut out = VirtioDevices {
        transports: Vec::new(),
        slots: Vec::new(),
        metrics: Vec::new(),
        cmdline: String::new(),
    };
    for (n, (device, metrics)) in devices.into_iter().enumerate() {
        out.metrics.push(metrics);
        let slot = MmioSlot::nth(n).ok_or(Error::NoInterruptLine(n + 1))?;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(host("create an eventfd"))?;
        vm.register_irqfd(&irq_evt, slot.irq)
            .map_err(kvm("connect a virtio interrupt"))?;
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(irq_evt)));
        let transport = MmioTransport::new(device, mem.clone(), interrupt)
            .map_err(host("create virtio queue events"))?;
        for (index, evt) in transport.queue_events().iter().enumerate() {
            let addr = IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET);
            vm.register_ioevent(evt, &addr, index as u32)
                .map_err(kvm("connect a virtio queue notification"))?;
        }
        let interrupt_registers = Arc::new(InterruptRegisters(transport.interrupt().clone()));
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert_with(
            transport.clone(),
            Some(interrupt_registers),
            slot.base,
            MMIO_REGION_SIZE,
        )
        .map_err(|source| Error::MmioBus {
            number: n + 1,
            source,
        })?;
        // With ACPI the guest finds the device in the DSDT instead (`arch::acpi`).
        if !config.acpi() {
            if !out.cmdline.is_empty() {
                out.cmdline.push(' ');
            }
            out.cmdline.push_str(&slot.cmdline_param());
        }
        out.transports.push(transport);
        out.slots.push(slot);
    }
    if let Some(root) = root_cmdline(config) {
        if !out.cmdline.is_empty() {
            out.cmdline.push(' ');
        }
        out.cmdline.push_str(&root);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DriveConfig;

    #[test]
    fn slots_are_page_sized_with_distinct_irqs_and_run_out() {
        let first = MmioSlot::nth(0).unwrap();
        assert_eq!(
            first,
            MmioSlot {
                base: 0xc000_0000,
                irq: 5
            }
        );
        assert_eq!(first.cmdline_param(), "virtio_mmio.device=4K@0xc0000000:5");
        let last = MmioSlot::nth(18).unwrap();
        assert_eq!(
            last,
            MmioSlot {
                base: 0xc001_2000,
                irq: 23
            }
        );
        assert_eq!(MmioSlot::nth(19), None);
        assert_eq!(MmioSlot::nth(usize::MAX), None);
    }

    #[test]
    fn disk_letters_follow_linux() {
        let names: Vec<_> = [0, 1, 25, 26, 27, 51, 52]
            .iter()
            .map(|&n| disk_letter(n))
            .collect();
        assert_eq!(names, ["a", "b", "z", "aa", "ab", "az", "ba"]);
    }

    #[test]
    fn root_disk_goes_on_the_command_line() {
        let mut c = VmConfig::new("/k");
        assert_eq!(root_cmdline(&c), None);
        c.drives.push(DriveConfig {
            root: true,
            ..DriveConfig::new("/r")
        });
        assert_eq!(root_cmdline(&c).as_deref(), Some("root=/dev/vda rw"));
        c.drives[0].read_only = true;
        assert_eq!(root_cmdline(&c).as_deref(), Some("root=/dev/vda ro"));
        c.drives[0].partuuid = Some("4cbb6a2a-01".into());
        assert_eq!(
            root_cmdline(&c).as_deref(),
            Some("root=PARTUUID=4cbb6a2a-01 ro")
        );
    }

    #[test]
    fn drives_get_their_rate_limiters() {
        use devices::virtio::block::Block;
        let path =
            std::env::temp_dir().join(format!("flint-dm-limited-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let mut c = VmConfig::new("/k");
        c.entropy = false;
        c.drives.push(DriveConfig {
            rate_limiter: Some(RateLimiterConfig {
                bandwidth: None,
                ops: Some(crate::config::TokenBucketConfig::per_second(10)),
            }),
            ..DriveConfig::new(&path)
        });
        c.drives.push(DriveConfig {
            // No bucket: no limit (yet).
            rate_limiter: Some(RateLimiterConfig::default()),
            ..DriveConfig::new(&path)
        });
        c.drives.push(DriveConfig::new(&path));
        let mut devices = build_devices(&c).unwrap();
        std::fs::remove_file(&path).unwrap();
        let limited: Vec<(bool, bool)> = devices
            .iter_mut()
            .map(|(d, _)| {
                let block = d.as_any_mut().unwrap().downcast_mut::<Block>().unwrap();
                // Every disk has a limiter, so that the API can set limits after start.
                let limiter = block.rate_limiter().unwrap();
                (limiter.ops().is_some(), limiter.bandwidth().is_some())
            })
            .collect();
        assert_eq!(limited, [(true, false), (false, false), (false, false)]);
    }

    #[test]
    fn unusable_disks_are_refused_with_the_path() {
        let mut c = VmConfig::new("/k");
        c.drives.push(DriveConfig::new("/nonexistent/disk.img"));
        let err = build_devices(&c).err().unwrap().to_string();
        assert!(err.contains("/nonexistent/disk.img"), "{err}");
    }
}
