//! The Intel MultiProcessor table, so that the guest finds and brings up every vCPU.
//!
//! Layout (Intel MultiProcessor Specification 1.4, chapter 4): a 16-byte MP floating pointer
//! structure at `EBDA_START`, immediately followed by the MP configuration table: its 44-byte
//! header and the base table entries (processors, bus, I/O APIC, I/O interrupt assignments,
//! local interrupt assignments, in that order). There is no extended table.
//!
//! With many vCPUs the table is larger than the 1 KiB EBDA and extends upward past 0xa0000;
//! that is fine because [`crate::boot::memory_map`] never reports `EBDA_START..HIMEM_START` as
//! RAM. For 254 vCPUs it ends at about `EBDA_START + 0x14f4`.

use crate::GuestMemoryMmap;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::layout::EBDA_START;
use crate::Error;

/// MP specification revision 1.4.
const MP_SPEC_REV: u8 = 4;
/// Where the local APICs and the I/O APIC are.
const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Version of the local APIC (integrated xAPIC) and of the I/O APIC.
const APIC_VERSION: u8 = 0x14;
const IO_APIC_VERSION: u8 = 0x11;
/// Number of I/O APIC pins, each identity-mapped to the IRQ of the same number.
const IO_APIC_PINS: u8 = 24;
/// Processor entry: family 6, model 0, stepping 0; features FPU (bit 0) and APIC (bit 9).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;
/// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTPROCESSOR: u8 = 1 << 1;
/// I/O APIC entry flag.
const IO_APIC_USABLE: u8 = 1;
/// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Interrupt types of I/O and local interrupt entries.
const MP_INT_INT: u8 = 0;
const MP_INT_NMI: u8 = 1;
const MP_INT_EXTINT: u8 = 3;
/// Destination local APIC ID meaning "all local APICs".
const ALL_LOCAL_APICS: u8 = 0xff;
/// Largest vCPU count: APIC IDs 0..=253, the I/O APIC takes `num_cpus + 1` <= 255.
const MAX_CPUS: u8 = 254;

/// MP floating pointer structure.
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
struct MpFloatingPointer {
    signature: [u8; 4],
    physptr: u32,
    /// Length in 16-byte units: 1.
    length: u8,
    spec_rev: u8,
    checksum: u8,
    /// Feature byte 1: 0 = a configuration table is present.
    feature1: u8,
    feature2: u8,
    feature3: [u8; 3],
}

/// MP configuration table header.
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
struct MpConfigHeader {
    signature: [u8; 4],
    base_table_length: u16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table_pointer: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_addr: u32,
    ext_table_length: u16,
    ext_table_checksum: u8,
    reserved: u8,
}

/// Processor entry (type 0).
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
struct MpProcessor {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    cpu_flags: u8,
    cpu_signature: u32,
    feature_flags: u32,
    reserved: [u32; 2],
}

/// Bus entry (type 1).
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
struct MpBus {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

/// I/O APIC entry (type 2).
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
struct MpIoApic {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    apic_addr: u32,
}

/// I/O interrupt assignment (type 3) and local interrupt assignment (type 4) entries share
/// this layout; for type 4 the destination is a local APIC and its LINTIN pin.
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
struct MpInterrupt {
    entry_type: u8,
    irq_type: u8,
    irq_flags: u16,
    src_bus_id: u8,
    src_bus_irq: u8,
    dst_apic_id: u8,
    dst_apic_pin: u8,
}

// SAFETY: the structures above are `repr(C, packed)` and contain only integers and integer
// arrays, so they have no padding and every bit pattern is a valid value: plain old data.
unsafe impl ByteValued for MpFloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for MpConfigHeader {}
// SAFETY: as above.
unsafe impl ByteValued for MpProcessor {}
// SAFETY: as above.
unsafe impl ByteValued for MpBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpIoApic {}
// SAFETY: as above.
unsafe impl ByteValued for MpInterrupt {}

/// The byte that makes `bytes` sum to zero modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The entries of the base configuration table, serialized, and how many there are.
fn table_entries(num_cpus: u8) -> (Vec<u8>, u16) {
    let mut bytes = Vec::new();
    let mut count = 0u16;
    let mut push = |entry: &[u8]| {
        bytes.extend_from_slice(entry);
        count += 1;
    };

    for cpu in 0..num_cpus {
        let bsp = if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        let processor = MpProcessor {
            entry_type: MP_PROCESSOR,
            apic_id: cpu,
            apic_version: APIC_VERSION,
            cpu_flags: CPU_ENABLED | bsp,
            cpu_signature: CPU_SIGNATURE,
            feature_flags: CPU_FEATURES,
            reserved: [0; 2],
        };
        push(processor.as_slice());
    }

    let bus = MpBus {
        entry_type: MP_BUS,
        bus_id: 0,
        bus_type: *b"ISA   ",
    };
    push(bus.as_slice());

    let ioapic_id = num_cpus + 1;
    let ioapic = MpIoApic {
        entry_type: MP_IOAPIC,
        apic_id: ioapic_id,
        apic_version: IO_APIC_VERSION,
        flags: IO_APIC_USABLE,
        apic_addr: IO_APIC_DEFAULT_PHYS_BASE,
    };
    push(ioapic.as_slice());

    for irq in 0..IO_APIC_PINS {
        let intsrc = MpInterrupt {
            entry_type: MP_INTSRC,
            irq_type: MP_INT_INT,
            // Polarity and trigger mode conform to the bus (ISA: edge, active high).
            irq_flags: 0,
            src_bus_id: 0,
            src_bus_irq: irq,
            dst_apic_id: ioapic_id,
            dst_apic_pin: irq,
        };
        push(intsrc.as_slice());
    }

    for (irq_type, lint) in [(MP_INT_EXTINT, 0), (MP_INT_NMI, 1)] {
        let lintsrc = MpInterrupt {
            entry_type: MP_LINTSRC,
            irq_type,
            irq_flags: 0,
            src_bus_id: 0,
            src_bus_irq: 0,
            dst_apic_id: ALL_LOCAL_APICS,
            dst_apic_pin: lint,
        };
        push(lintsrc.as_slice());
    }

    (bytes, count)
}

/// Write an MP floating pointer and configuration table for `num_cpus` vCPUs at `EBDA_START`:
/// one processor entry per vCPU (APIC ID = index, the first is the BSP), a bus entry (ISA), an
/// I/O APIC entry, an interrupt entry per legacy IRQ 0-15 (and up to 23), and the local
/// interrupt entries (ExtINT on LINT0, NMI on LINT1). Checksums correct.
///
/// The I/O APIC has ID `num_cpus + 1` and IRQ `n` is wired to its pin `n`. Fails with
/// `TooManyCpus` for 0 or more than 254 vCPUs.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> crate::Result<()> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(num_cpus));
    }

    let fp_size = std::mem::size_of::<MpFloatingPointer>();
    let header_size = std::mem::size_of::<MpConfigHeader>();
    let table_addr = EBDA_START + fp_size as u64;

    let (entries, entry_count) = table_entries(num_cpus);
    // 5348 bytes for 254 vCPUs: fits in u16.
    let base_table_length = (header_size + entries.len()) as u16;

    let mut header = MpConfigHeader {
        signature: *b"PCMP",
        base_table_length,
        spec_rev: MP_SPEC_REV,
        oem_id: *b"FLINT   ",
        product_id: *b"FLINT VM    ",
        entry_count,
        lapic_addr: APIC_DEFAULT_PHYS_BASE,
        ..Default::default()
    };
    let mut table = Vec::with_capacity(usize::from(base_table_length));
    table.extend_from_slice(header.as_slice());
    table.extend_from_slice(&entries);
    header.checksum = checksum(&table);
    table[..header_size].copy_from_slice(header.as_slice());

    let mut fp = MpFloatingPointer {
        signature: *b"_MP_",
        // Below 1 MiB: cannot truncate.
        physptr: table_addr as u32,
        length: 1,
        spec_rev: MP_SPEC_REV,
        ..Default::default()
    };
    fp.checksum = checksum(fp.as_slice());

    mem.write_obj(fp, GuestAddress(EBDA_START))
        .map_err(|_| Error::GuestWrite {
            what: "MP floating pointer",
            addr: EBDA_START,
        })?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(|_| Error::GuestWrite {
            what: "MP configuration table",
            addr: table_addr,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::HIMEM_START;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn structure_sizes() {
        assert_eq!(std::mem::size_of::<MpFloatingPointer>(), 16);
        assert_eq!(std::mem::size_of::<MpConfigHeader>(), 44);
        assert_eq!(std::mem::size_of::<MpProcessor>(), 20);
        assert_eq!(std::mem::size_of::<MpBus>(), 8);
        assert_eq!(std::mem::size_of::<MpIoApic>(), 8);
        assert_eq!(std::mem::size_of::<MpInterrupt>(), 8);
    }

    /// Parse and check the table written for `num_cpus`, the way a guest would.
    fn check_table(mem: &GuestMemoryMmap, num_cpus: u8) {
        // Floating pointer.
        let mut fp_bytes = [0u8; 16];
        mem.read_slice(&mut fp_bytes, GuestAddress(EBDA_START))
            .unwrap();
        assert_eq!(sum(&fp_bytes), 0);
        let fp: MpFloatingPointer = mem.read_obj(GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&fp.signature, b"_MP_");
        assert_eq!({ fp.physptr }, (EBDA_START + 16) as u32);
        assert_eq!(fp.length, 1);
        assert_eq!(fp.spec_rev, 4);
        assert_eq!(fp.feature1, 0);
        assert_eq!(fp.feature2, 0);

        // Header.
        let table_addr = u64::from(fp.physptr);
        let header: MpConfigHeader = mem.read_obj(GuestAddress(table_addr)).unwrap();
        assert_eq!(&header.signature, b"PCMP");
        assert_eq!(header.spec_rev, 4);
        assert_eq!(&header.oem_id, b"FLINT   ");
        assert_eq!(&header.product_id, b"FLINT VM    ");
        assert_eq!({ header.lapic_addr }, 0xfee0_0000);
        assert_eq!({ header.oem_table_pointer }, 0);
        assert_eq!({ header.ext_table_length }, 0);
        let n = usize::from(num_cpus);
        let expected_entries = n + 1 + 1 + 24 + 2;
        assert_eq!(usize::from(header.entry_count), expected_entries);
        let length = usize::from(header.base_table_length);
        assert_eq!(length, 44 + 20 * n + 8 * (expected_entries - n));
        assert!(table_addr + length as u64 <= HIMEM_START);

        let mut table = vec![0u8; length];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0);

        // Entries.
        let mut offset = 44;
        let mut processors = 0;
        let mut intsrcs = Vec::new();
        let mut lintsrcs = Vec::new();
        let mut ioapic_id = None;
        let mut buses = 0;
        let mut last_type = 0;
        for _ in 0..header.entry_count {
            let entry_type = table[offset];
            // Entries sorted by type, as the spec requires.
            assert!(entry_type >= last_type);
            last_type = entry_type;
            let addr = GuestAddress(table_addr + offset as u64);
            match entry_type {
                MP_PROCESSOR => {
                    let p: MpProcessor = mem.read_obj(addr).unwrap();
                    assert_eq!(p.apic_id, processors);
                    assert_eq!(p.apic_version, 0x14);
                    let bsp = if processors == 0 { 2 } else { 0 };
                    assert_eq!(p.cpu_flags, 1 | bsp);
                    assert_eq!({ p.cpu_signature }, 0x600);
                    assert_eq!({ p.feature_flags }, 0x201);
                    processors += 1;
                    offset += 20;
                }
                MP_BUS => {
                    let b: MpBus = mem.read_obj(addr).unwrap();
                    assert_eq!(b.bus_id, 0);
                    assert_eq!(&b.bus_type, b"ISA   ");
                    buses += 1;
                    offset += 8;
                }
                MP_IOAPIC => {
                    let io: MpIoApic = mem.read_obj(addr).unwrap();
                    assert_eq!(io.apic_id, num_cpus + 1);
                    assert_eq!(io.apic_version, 0x11);
                    assert_eq!(io.flags, 1);
                    assert_eq!({ io.apic_addr }, 0xfec0_0000);
                    ioapic_id = Some(io.apic_id);
                    offset += 8;
                }
                MP_INTSRC => {
                    intsrcs.push(mem.read_obj::<MpInterrupt>(addr).unwrap());
                    offset += 8;
                }
                MP_LINTSRC => {
                    lintsrcs.push(mem.read_obj::<MpInterrupt>(addr).unwrap());
                    offset += 8;
                }
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(offset, length);
        assert_eq!(processors, num_cpus);
        assert_eq!(buses, 1);

        assert_eq!(intsrcs.len(), 24);
        for (i, e) in intsrcs.iter().enumerate() {
            assert_eq!(e.irq_type, MP_INT_INT);
            assert_eq!({ e.irq_flags }, 0);
            assert_eq!(e.src_bus_id, 0);
            assert_eq!(usize::from(e.src_bus_irq), i);
            assert_eq!(Some(e.dst_apic_id), ioapic_id);
            assert_eq!(usize::from(e.dst_apic_pin), i);
        }

        assert_eq!(lintsrcs.len(), 2);
        assert_eq!(lintsrcs[0].irq_type, MP_INT_EXTINT);
        assert_eq!(lintsrcs[0].dst_apic_pin, 0);
        assert_eq!(lintsrcs[1].irq_type, MP_INT_NMI);
        assert_eq!(lintsrcs[1].dst_apic_pin, 1);
        for l in &lintsrcs {
            assert_eq!(l.dst_apic_id, 0xff);
            assert_eq!(l.src_bus_id, 0);
            assert_eq!(l.src_bus_irq, 0);
            assert_eq!({ l.irq_flags }, 0);
        }
    }

    #[test]
    fn one_cpu() {
        let mem = guest_mem();
        setup_mptable(&mem, 1).unwrap();
        check_table(&mem, 1);
    }

    #[test]
    fn four_cpus() {
        let mem = guest_mem();
        setup_mptable(&mem, 4).unwrap();
        check_table(&mem, 4);
    }

    #[test]
    fn max_cpus() {
        let mem = guest_mem();
        setup_mptable(&mem, 254).unwrap();
        check_table(&mem, 254);
    }

    #[test]
    fn rewrites_over_a_larger_table() {
        let mem = guest_mem();
        setup_mptable(&mem, 254).unwrap();
        setup_mptable(&mem, 2).unwrap();
        check_table(&mem, 2);
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        let mem = guest_mem();
        assert!(matches!(setup_mptable(&mem, 0), Err(Error::TooManyCpus(0))));
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(Error::TooManyCpus(255))
        ));
        // Nothing written.
        let signature: [u8; 4] = mem.read_obj(GuestAddress(EBDA_START)).unwrap();
        assert_eq!(signature, [0; 4]);
    }

    #[test]
    fn write_error() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9_f000)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(Error::GuestWrite {
                addr: EBDA_START,
                ..
            })
        ));
        // The table runs past the end of a 640 KiB memory with many vCPUs.
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xa_0000)]).unwrap();
        assert!(setup_mptable(&mem, 1).is_ok());
        assert!(matches!(
            setup_mptable(&mem, 254),
            Err(Error::GuestWrite { .. })
        ));
    }

    #[test]
    fn checksum_helper() {
        assert_eq!(checksum(&[]), 0);
        assert_eq!(checksum(&[1]), 0xff);
        assert_eq!(checksum(&[0x80, 0x80]), 0);
        let bytes = [0x12, 0x34, 0xfe];
        assert_eq!(sum(&bytes).wrapping_add(checksum(&bytes)), 0);
    }
}
