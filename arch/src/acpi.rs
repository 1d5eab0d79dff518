//! ACPI tables: the guest's CPUs and interrupt controllers (MADT), and the devices only ACPI
//! can describe (DSDT): the VM generation ID and the Generic Event Device that tells the guest
//! it changed.
//!
//! Layout, all in `ACPI_START..ACPI_END` (never reported as RAM, see
//! [`crate::boot::memory_map`]): the RSDP at `ACPI_START`, where a guest that scans the BIOS
//! area finds it, then the DSDT, FADT, MADT and XSDT, each 16-byte aligned. The FADT marks the
//! platform as hardware-reduced (no PM timer, SCI or GPE blocks), and says an 8042 keyboard
//! controller is present (flint's i8042; without the flag Linux does not probe it).
//!
//! The MADT describes the same machine as the MP table ([`crate::mptable`]): one enabled local
//! APIC per vCPU (APIC ID = processor UID = vCPU index), the I/O APIC with ID `num_cpus + 1`
//! at its default address serving GSIs 0-23, identity-mapped ISA interrupts (no overrides),
//! LINT1 of every local APIC as NMI, and dual 8259 PICs present.
//!
//! The DSDT holds these devices under `\_SB`:
//! - `COM1` (`PNP0501`) and `PS2K` (`PNP0303`): the serial port at 0x3f8 on IRQ 4 and the
//!   i8042 at 0x60/0x64 on IRQ 1. A hardware-reduced platform has no legacy PIC, so Linux
//!   connects no ISA interrupt by default: only those of devices ACPI describes.
//! - `V000`, `V001`, ...: the virtio-mmio devices (`LNRO0005`), in slot order, each with its
//!   register window and its edge-triggered interrupt. With ACPI, this is how the guest
//!   finds them: Linux connects an interrupt line of the I/O APIC above 15 only for a device
//!   that ACPI describes, so `virtio_mmio.device=` parameters would not work for them.
//! - `VGEN`, a "VM_GEN_COUNTER": its `ADDR` is the guest-physical address of the 16-byte
//!   generation ID at [`VMGENID_START`].
//! - `GED_`, a Generic Event Device (`ACPI0013`) with one edge-triggered, active-high
//!   interrupt, the GSI given to [`setup_acpi`]; its `_EVT` method notifies `VGEN` (0x80), on
//!   which the guest kernel reads the new ID and reseeds its random number generator.

use crate::GuestMemoryMmap;
use acpi_tables::{aml, fadt, madt, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{ACPI_END, ACPI_START, VMGENID_START};
use crate::Error;

/// OEM fields of every table.
const OEM_ID: [u8; 6] = *b"FLINT ";
const OEM_TABLE_ID: [u8; 8] = *b"FLINTVM ";
const OEM_REVISION: u32 = 1;
/// Local APIC and I/O APIC addresses, as in the MP table.
const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure type and length of a local APIC NMI entry.
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_APIC_NMI_LEN: u8 = 6;
/// Processor UID meaning "every processor" in a local APIC NMI entry.
const ALL_PROCESSORS: u8 = 0xff;
/// FADT IA-PC boot architecture flag: an 8042 keyboard controller is present.
const FADT_BOOT_ARCH_8042: u16 = 1 << 1;
/// Largest vCPU count (APIC IDs 0..=253, the I/O APIC takes `num_cpus + 1`), as the MP table.
const MAX_CPUS: u8 = 254;
/// The only GSIs the I/O APIC has.
const IO_APIC_PINS: u32 = 24;
/// ACPI notification value for a VM generation ID change.
const VMGENID_NOTIFY: u8 = 0x80;

/// Most virtio-mmio devices the DSDT names (`V000` to `VFFF`).
const MAX_VIRTIO_DEVICES: usize = 0x1000;

/// One virtio-mmio device, as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical address of its register window (below 4 GiB).
    pub base: u32,
    /// Size of the register window.
    pub size: u32,
    /// Its interrupt: an I/O APIC pin.
    pub gsi: u32,
}

/// Where each table went, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiTables {
    pub rsdp: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub madt: u64,
    pub dsdt: u64,
}

fn aml_bytes(item: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    item.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT device for virtio-mmio device number `n`.
fn virtio_device(n: usize, device: &VirtioMmioDevice) -> Vec<u8> {
    let name = format!("V{n:03X}");
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid_value = n as u32;
    let uid = aml::Name::new("_UID".into(), &uid_value);
    let window = aml::Memory32Fixed::new(true, device.base, device.size);
    // Consumer, edge-triggered (KVM's irqfd), active high, exclusive.
    let irq = aml::Interrupt::new(true, true, false, false, device.gsi);
    let resources = aml::ResourceTemplate::new(vec![&window, &irq]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    aml_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![&hid, &uid, &crs],
    ))
}

/// The legacy devices flint emulates on port I/O (see `vmm::vm`): the serial console and the
/// i8042 keyboard controller, each with its interrupt (ISA-style: edge, active high).
fn legacy_devices() -> Vec<u8> {
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, 4);
    let com1_res = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_res);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let kbd_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303"));
    let kbd_data = aml::IO::new(0x60, 0x60, 1, 1);
    let kbd_cmd = aml::IO::new(0x64, 0x64, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, 1);
    let kbd_res = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_crs = aml::Name::new("_CRS".into(), &kbd_res);
    let kbd = aml::Device::new("PS2K".into(), vec![&kbd_hid, &kbd_crs]);

    let mut bytes = aml_bytes(&com1);
    bytes.extend(aml_bytes(&kbd));
    bytes
}

/// Already-encoded AML, to put among other objects.
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// The DSDT: the virtio devices, the VM generation ID device and the Generic Event Device on
/// `ged_gsi`.
fn dsdt(virtio: &[VirtioMmioDevice], ged_gsi: u32) -> Vec<u8> {
    let virtio: Vec<Encoded> = virtio
        .iter()
        .enumerate()
        .map(|(n, d)| Encoded(virtio_device(n, d)))
        .collect();
    // Below 4 GiB by construction: the high half of ADDR is 0.
    let addr_low = VMGENID_START as u32;
    let addr_high = 0u32;
    let addr = aml::Package::new(vec![&addr_low, &addr_high]);
    let hid_vgen = aml::Name::new("_HID".into(), &"FLNT0001");
    let cid_vgen = aml::Name::new("_CID".into(), &"VM_GEN_COUNTER");
    let ddn_vgen = aml::Name::new("_DDN".into(), &"VM_GEN_COUNTER");
    let addr_vgen = aml::Name::new("ADDR".into(), &addr);
    let vgen = aml::Device::new(
        "VGEN".into(),
        vec![&hid_vgen, &cid_vgen, &ddn_vgen, &addr_vgen],
    );

    // Consumer, edge-triggered, active high, exclusive.
    let irq = aml::Interrupt::new(true, true, false, false, ged_gsi);
    let resources = aml::ResourceTemplate::new(vec![&irq]);
    let hid_ged = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid_ged = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs_ged = aml::Name::new("_CRS".into(), &resources);
    let vgen_path = aml::Path::new("\\_SB_.VGEN");
    let notify = aml::Notify::new(&vgen_path, &VMGENID_NOTIFY);
    // _EVT(gsi): there is one interrupt and one event, so the argument needs no check.
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&notify]);
    let ged = aml::Device::new("GED_".into(), vec![&hid_ged, &uid_ged, &crs_ged, &evt]);

    let legacy = Encoded(legacy_devices());
    let mut devices: Vec<&dyn Aml> = vec![&legacy];
    devices.extend(virtio.iter().map(|d| d as &dyn Aml));
    devices.push(&vgen);
    devices.push(&ged);
    let sb = aml::Scope::new("\\_SB_".into(), devices);
    // Revision 2 and above: integers are 64 bits.
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&aml_bytes(&sb));
    table.as_slice().to_vec()
}

/// The FADT of a hardware-reduced platform whose DSDT is at `dsdt_addr`.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(fadt::Flags::HwReducedAcpi);
    builder.iapc_boot_arch = FADT_BOOT_ARCH_8042.into();
    aml_bytes(&builder.finalize())
}

/// The MADT for `num_cpus` vCPUs.
fn madt(num_cpus: u8) -> Vec<u8> {
    let mut table = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.write_u32(36, APIC_DEFAULT_PHYS_BASE);
    table.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        let lapic = madt::ProcessorLocalApic::new(cpu, cpu, madt::EnabledStatus::Enabled);
        table.append_slice(&aml_bytes(&lapic));
    }
    let ioapic = madt::IoApic::new(num_cpus + 1, IO_APIC_DEFAULT_PHYS_BASE, 0);
    table.append_slice(&aml_bytes(&ioapic));
    // LINT1 of every local APIC is the NMI; flags 0: polarity and trigger conform to the bus.
    table.append_slice(&[
        MADT_LOCAL_APIC_NMI,
        MADT_LOCAL_APIC_NMI_LEN,
        ALL_PROCESSORS,
        0,
        0,
        1,
    ]);
    table.as_slice().to_vec()
}

fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// Write the ACPI tables for `num_cpus` vCPUs and the `virtio` devices, with the Generic
/// Event Device on `ged_gsi`, into `mem` at `ACPI_START`.
pub fn setup_acpi(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    virtio: &[VirtioMmioDevice],
    ged_gsi: u32,
) -> crate::Result<AcpiTables> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(num_cpus));
    }
    if virtio.len() > MAX_VIRTIO_DEVICES {
        return Err(Error::AcpiDevices(virtio.len()));
    }
    if let Some(gsi) = virtio
        .iter()
        .map(|d| d.gsi)
        .chain([ged_gsi])
        .find(|&gsi| gsi >= IO_APIC_PINS)
    {
        return Err(Error::AcpiGsi(gsi));
    }
    let mut next = align16(ACPI_START + Rsdp::len() as u64);
    let mut place = |what: &'static str, bytes: &[u8]| -> crate::Result<u64> {
        let addr = next;
        let end = addr + bytes.len() as u64;
        if end > ACPI_END {
            return Err(Error::GuestWrite { what, addr });
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|_| Error::GuestWrite { what, addr })?;
        next = align16(end);
        Ok(addr)
    };
    let dsdt = place("ACPI DSDT", &dsdt(virtio, ged_gsi))?;
    let fadt = place("ACPI FADT", &fadt(dsdt))?;
    let madt = place("ACPI MADT", &madt(num_cpus))?;
    let mut xsdt_table = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt_table.add_entry(fadt);
    xsdt_table.add_entry(madt);
    let xsdt = place("ACPI XSDT", &aml_bytes(&xsdt_table))?;
    let rsdp = ACPI_START;
    mem.write_slice(&aml_bytes(&Rsdp::new(OEM_ID, xsdt)), GuestAddress(rsdp))
        .map_err(|_| Error::GuestWrite {
            what: "ACPI RSDP",
            addr: rsdp,
        })?;
    Ok(AcpiTables {
        rsdp,
        xsdt,
        fadt,
        madt,
        dsdt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// Read the table at `addr` the way a guest does: header, then its length; check the
    /// signature and the checksum.
    fn read_table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        assert_eq!(&header[..4], signature);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36);
        assert!(
            addr + len as u64 <= ACPI_END,
            "{signature:?} runs past ACPI_END"
        );
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&table), 0, "{signature:?} checksum");
        assert_eq!(&table[10..16], b"FLINT ");
        table
    }

    /// Find every table from the RSDP, check them, and return (FADT, MADT, DSDT).
    fn walk(mem: &GuestMemoryMmap) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(ACPI_START)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        // ACPI 1.0 checksum over the first 20 bytes, extended checksum over all 36.
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(rsdp[15], 2, "revision 2: the XSDT is used");
        assert_eq!(u32_at(&rsdp, 20), 36);
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_table(mem, xsdt_addr, b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let fadt = read_table(mem, u64_at(&xsdt, 36), b"FACP");
        let madt = read_table(mem, u64_at(&xsdt, 44), b"APIC");
        // X_DSDT, at offset 140 of the FADT.
        let dsdt = read_table(mem, u64_at(&fadt, 140), b"DSDT");
        (fadt, madt, dsdt)
    }

    #[test]
    fn tables_are_found_from_the_rsdp_and_checksummed() {
        for cpus in [1, 2, 4, 254] {
            let mem = guest_mem();
            let placed = setup_acpi(&mem, cpus, &[], 23).unwrap();
            assert_eq!(placed.rsdp, ACPI_START);
            walk(&mem);
        }
    }

    #[test]
    fn tables_stay_outside_guest_ram() {
        // EBDA_START..HIMEM_START is never RAM (a compile-time check in `layout` keeps the
        // whole area and the generation ID in it); each table is inside the area.
        let mem = guest_mem();
        let placed = setup_acpi(&mem, 254, &[], 23).unwrap();
        for addr in [placed.xsdt, placed.fadt, placed.madt, placed.dsdt] {
            assert!(addr > ACPI_START && addr < ACPI_END && addr % 16 == 0);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_an_8042() {
        let mem = guest_mem();
        setup_acpi(&mem, 1, &[], 23).unwrap();
        let (fadt, _, _) = walk(&mem);
        assert_eq!(fadt.len(), 276);
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(boot_arch, 1 << 1, "8042 present, nothing else claimed");
        // No legacy fixed hardware: SCI, PM1 and GPE blocks all zero.
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 0);
        assert_eq!(u32_at(&fadt, 56), 0);
        assert_eq!(u32_at(&fadt, 80), 0);
    }

    #[test]
    fn madt_matches_the_mp_table() {
        for cpus in [1u8, 2, 4, 254] {
            let mem = guest_mem();
            setup_acpi(&mem, cpus, &[], 23).unwrap();
            let (_, madt, _) = walk(&mem);
            assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
            assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
            let mut offset = 44;
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut nmis = Vec::new();
            while offset < madt.len() {
                let (kind, len) = (madt[offset], usize::from(madt[offset + 1]));
                let entry = &madt[offset..offset + len];
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        // UID, APIC ID, enabled.
                        lapics.push((entry[2], entry[3], u32_at(entry, 4)));
                    }
                    1 => {
                        assert_eq!(len, 12);
                        ioapics.push((entry[2], u32_at(entry, 4), u32_at(entry, 8)));
                    }
                    4 => {
                        assert_eq!(len, 6);
                        nmis.push((entry[2], u16::from_le_bytes([entry[3], entry[4]]), entry[5]));
                    }
                    other => panic!("unexpected MADT entry type {other}"),
                }
                offset += len;
            }
            assert_eq!(offset, madt.len());
            let expected: Vec<_> = (0..cpus).map(|c| (c, c, 1)).collect();
            assert_eq!(lapics, expected);
            assert_eq!(ioapics, [(cpus + 1, 0xfec0_0000, 0)]);
            assert_eq!(nmis, [(0xff, 0, 1)]);
        }
    }

    /// Where `needle` is in `haystack`.
    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn dsdt_describes_the_generation_id_and_its_event_device() {
        let mem = guest_mem();
        setup_acpi(&mem, 2, &[], 23).unwrap();
        let (_, _, dsdt) = walk(&mem);
        assert!(dsdt[8] >= 2, "64-bit integers");
        let aml = &dsdt[36..];
        for name in [
            &b"VGEN"[..],
            b"VM_GEN_COUNTER\0",
            b"ADDR",
            b"GED_",
            b"ACPI0013\0",
            b"_EVT",
        ] {
            assert!(
                find(aml, name).is_some(),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
        // ADDR = Package(2) { DWord VMGENID_START, Zero }: PackageOp, length, 2 elements,
        // DWordPrefix + address, then the high half.
        let addr = find(aml, b"ADDR").unwrap() + 4;
        assert_eq!(aml[addr], 0x12, "PackageOp");
        assert_eq!(aml[addr + 2], 2);
        assert_eq!(aml[addr + 3], 0x0c, "DWordPrefix");
        assert_eq!(u32_at(aml, addr + 4), VMGENID_START as u32);
        // The GED's interrupt: an extended interrupt descriptor, consumer, edge, active high,
        // exclusive, one GSI: 23.
        let ged = find(aml, b"GED_").unwrap();
        let irq = find(&aml[ged..], &[0x89, 6, 0, 0b0011, 1]).expect("extended IRQ descriptor");
        assert_eq!(u32_at(aml, ged + irq + 5), 23);
        // _EVT notifies \_SB_.VGEN with 0x80: NotifyOp, the path, BytePrefix 0x80.
        let notify = find(aml, &[0x86, b'\\', 0x2e]).expect("Notify(\\_SB_.VGEN, ...)");
        assert_eq!(&aml[notify + 3..notify + 11], b"_SB_VGEN");
        assert_eq!(&aml[notify + 11..notify + 13], &[0x0a, 0x80]);
    }

    /// Slots as flint uses them: 4 KiB apart from 0xc000_0000, GSIs 5 up.
    fn slots(n: usize) -> Vec<VirtioMmioDevice> {
        (0..n)
            .map(|i| VirtioMmioDevice {
                base: 0xc000_0000 + 0x1000 * i as u32,
                size: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect()
    }

    #[test]
    fn dsdt_describes_every_virtio_device_in_slot_order() {
        let mem = guest_mem();
        // The most of everything: it still fits.
        setup_acpi(&mem, 254, &slots(19), 3).unwrap();
        let (_, _, dsdt) = walk(&mem);
        let aml = &dsdt[36..];
        let mut last = 0;
        for (n, slot) in slots(19).iter().enumerate() {
            let name = format!("V{n:03X}");
            let at = find(aml, name.as_bytes()).unwrap_or_else(|| panic!("{name} missing"));
            assert!(at > last, "{name} out of order");
            last = at;
            let device = &aml[at..];
            let hid = find(device, b"LNRO0005\0").unwrap();
            // Memory32Fixed, read-write: base and a 4 KiB window.
            let mut window = vec![0x86, 9, 0, 1];
            window.extend_from_slice(&slot.base.to_le_bytes());
            window.extend_from_slice(&0x1000u32.to_le_bytes());
            let win = find(device, &window).unwrap_or_else(|| panic!("{name} window"));
            // Then its interrupt: consumer, edge, active high, exclusive.
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend_from_slice(&slot.gsi.to_le_bytes());
            let int = find(device, &irq).unwrap_or_else(|| panic!("{name} interrupt"));
            assert!(hid < win && win < int);
            // Before the next device.
            if let Some(next) = find(&device[hid + 1..], b"LNRO0005\0") {
                assert!(int < hid + 1 + next);
            }
        }
        assert!(find(aml, b"V013").is_none());
        // The event device's own interrupt.
        let mut ged_irq = vec![0x89, 6, 0, 0b0011, 1];
        ged_irq.extend_from_slice(&3u32.to_le_bytes());
        assert!(find(aml, &ged_irq).unwrap() > last);
    }

    #[test]
    fn dsdt_connects_the_legacy_devices_interrupts() {
        let mem = guest_mem();
        setup_acpi(&mem, 1, &[], 3).unwrap();
        let (_, _, dsdt) = walk(&mem);
        let aml = &dsdt[36..];
        // COM1: PNP0501 (EISA id 0x0105d041), I/O 0x3f8-0x3ff, interrupt 4.
        let com1 = find(aml, b"COM1").unwrap();
        let com1_aml = &aml[com1..];
        assert!(find(com1_aml, &[0x0c, 0x41, 0xd0, 0x05, 0x01]).is_some());
        assert!(find(com1_aml, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]).is_some());
        assert!(find(com1_aml, &[0x89, 6, 0, 0b0011, 1, 4, 0, 0, 0]).is_some());
        // The keyboard controller: PNP0303, ports 0x60 and 0x64, interrupt 1.
        let kbd = find(aml, b"PS2K").unwrap();
        let kbd_aml = &aml[kbd..];
        assert!(find(kbd_aml, &[0x0c, 0x41, 0xd0, 0x03, 0x03]).is_some());
        assert!(find(kbd_aml, &[0x47, 1, 0x60, 0, 0x60, 0, 1, 1]).is_some());
        assert!(find(kbd_aml, &[0x47, 1, 0x64, 0, 0x64, 0, 1, 1]).is_some());
        assert!(find(kbd_aml, &[0x89, 6, 0, 0b0011, 1, 1, 0, 0, 0]).is_some());
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mem = guest_mem();
        assert!(matches!(
            setup_acpi(&mem, 0, &[], 23),
            Err(Error::TooManyCpus(0))
        ));
        assert!(matches!(
            setup_acpi(&mem, 255, &[], 23),
            Err(Error::TooManyCpus(255))
        ));
        assert!(matches!(
            setup_acpi(&mem, 1, &[], 24),
            Err(Error::AcpiGsi(24))
        ));
        let mut bad = slots(2);
        bad[1].gsi = 99;
        assert!(matches!(
            setup_acpi(&mem, 1, &bad, 3),
            Err(Error::AcpiGsi(99))
        ));
        // Memory that ends before the ACPI area.
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            setup_acpi(&small, 1, &[], 23),
            Err(Error::GuestWrite { .. })
        ));
    }
}
