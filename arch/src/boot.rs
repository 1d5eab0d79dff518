//! Boot parameters for the Linux 64-bit boot protocol (zero page with E820 map) and for PVH
//! (`hvm_start_info` with its memory map).

use crate::GuestMemoryMmap;
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_SIZE, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_START, ZERO_PAGE_START,
};
use crate::Error;

/// E820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// `boot_flag` of a valid setup header (boot protocol: "0xAA55 magic number").
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` of a valid setup header: "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned ID.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Default `kernel_alignment` (16 MiB) when there is no kernel-provided header.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// `hvm_start_info.magic` (PVH spec).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `hvm_start_info.version` written by flint (version 1 adds the memory map).
const PVH_START_INFO_VERSION: u32 = 1;

/// One entry of the guest's physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map the guest is told about for `mem_size` bytes of RAM: RAM below the EBDA,
/// RAM from `HIMEM_START` to the MMIO hole (or the end of memory), RAM above 4 GiB when present,
/// plus a reserved entry for the MMIO hole. Entries are sorted and never overlap.
///
/// `EBDA_START..HIMEM_START` is deliberately left out: the MP table (which may grow past the
/// classic 1 KiB EBDA for many vCPUs), the VGA hole and the BIOS area are not RAM.
pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let mut map = Vec::with_capacity(4);
    let ram = |addr, size| MemoryMapEntry {
        addr,
        size,
        kind: E820_RAM,
    };
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > 0 {
        map.push(ram(0, low_end.min(EBDA_START)));
    }
    if low_end > HIMEM_START {
        map.push(ram(HIMEM_START, low_end - HIMEM_START));
    }
    map.push(MemoryMapEntry {
        addr: MMIO_GAP_START,
        size: MMIO_GAP_SIZE,
        kind: E820_RESERVED,
    });
    if mem_size > MMIO_GAP_START {
        map.push(ram(MMIO_GAP_END, mem_size - MMIO_GAP_START));
    }
    map
}

/// What the boot parameters describe.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Total guest RAM in bytes.
    pub mem_size: u64,
    /// Command line address and length in bytes including the terminating NUL.
    pub cmdline_addr: GuestAddress,
    pub cmdline_size: usize,
    /// The initrd's address and size, if any.
    pub initrd: Option<(GuestAddress, u64)>,
}

/// Split a 64-bit value into the low 32 bits (the classic field) and the high 32 bits (the
/// `ext_*` field of `boot_params`).
fn split_u64(value: u64) -> (u32, u32) {
    (value as u32, (value >> 32) as u32)
}

/// Write the Linux zero page at `ZERO_PAGE_START`: the bzImage's own setup header when there is
/// one (`header`), else a fresh header with the boot signature, plus loader type, command line,
/// initrd, and the E820 map from [`memory_map`].
///
/// Everything else in the zero page is zero. Addresses and sizes above 4 GiB go to the
/// `ext_*` fields.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    info: &BootInfo,
    header: Option<setup_header>,
) -> crate::Result<()> {
    let mut hdr = header.unwrap_or_else(|| setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
        ..Default::default()
    });
    hdr.type_of_loader = KERNEL_LOADER_OTHER;

    let (cmdline_lo, cmdline_hi) = split_u64(info.cmdline_addr.0);
    hdr.cmd_line_ptr = cmdline_lo;
    hdr.cmdline_size = u32::try_from(info.cmdline_size).map_err(|_| {
        Error::BootConfigure(format!(
            "command line of {} bytes is too long",
            info.cmdline_size
        ))
    })?;

    let (initrd_addr, initrd_size) = info.initrd.map_or((0, 0), |(addr, size)| (addr.0, size));
    let (image_lo, image_hi) = split_u64(initrd_addr);
    let (size_lo, size_hi) = split_u64(initrd_size);
    hdr.ramdisk_image = image_lo;
    hdr.ramdisk_size = size_lo;

    let map = memory_map(info.mem_size);
    let mut e820_table = [boot_e820_entry::default(); E820_MAX_ENTRIES_ZEROPAGE];
    if map.len() > e820_table.len() {
        return Err(Error::BootConfigure(format!(
            "{} memory map entries do not fit in the zero page",
            map.len()
        )));
    }
    for (slot, entry) in e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }

    let params = boot_params {
        hdr,
        ext_cmd_line_ptr: cmdline_hi,
        ext_ramdisk_image: image_hi,
        ext_ramdisk_size: size_hi,
        // Cannot truncate: checked against the table length (128) above.
        e820_entries: map.len() as u8,
        e820_table,
        ..Default::default()
    };

    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| Error::GuestWrite {
            what: "zero page",
            addr: ZERO_PAGE_START,
        })
}

/// Round `value` up to a multiple of 8.
fn align8(value: u64) -> u64 {
    (value + 7) & !7
}

/// Write the PVH `hvm_start_info` at `PVH_INFO_START` and its memory map at `PVH_MEMMAP_START`,
/// with the command line and initrd (as a module) described.
///
/// The memory map is [`memory_map`] with the E820 type numbers (1 = RAM, 2 = reserved). When
/// there is an initrd, its single `hvm_modlist_entry` is written right after the memory map
/// entries, 8-byte aligned, and `nr_modules` is 1.
pub fn write_pvh_start_info(mem: &GuestMemoryMmap, info: &BootInfo) -> crate::Result<()> {
    let map = memory_map(info.mem_size);
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    let mut addr = PVH_MEMMAP_START;
    for entry in &map {
        let entry = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(addr))
            .map_err(|_| Error::GuestWrite {
                what: "PVH memory map",
                addr,
            })?;
        addr += entry_size;
    }

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: PVH_START_INFO_VERSION,
        cmdline_paddr: info.cmdline_addr.0,
        memmap_paddr: PVH_MEMMAP_START,
        // At most four entries: cannot truncate.
        memmap_entries: map.len() as u32,
        ..Default::default()
    };

    if let Some((initrd_addr, initrd_size)) = info.initrd {
        let modlist_addr = align8(addr);
        let module = hvm_modlist_entry {
            paddr: initrd_addr.0,
            size: initrd_size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist_addr))
            .map_err(|_| Error::GuestWrite {
                what: "PVH module list",
                addr: modlist_addr,
            })?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist_addr;
    }

    mem.write_obj(start_info, GuestAddress(PVH_INFO_START))
        .map_err(|_| Error::GuestWrite {
            what: "PVH start info",
            addr: PVH_INFO_START,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{CMDLINE_START, MAX_MEM_SIZE, MIN_MEM_SIZE};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)]).unwrap()
    }

    fn ram(addr: u64, size: u64) -> MemoryMapEntry {
        MemoryMapEntry {
            addr,
            size,
            kind: E820_RAM,
        }
    }

    const HOLE: MemoryMapEntry = MemoryMapEntry {
        addr: MMIO_GAP_START,
        size: MMIO_GAP_SIZE,
        kind: E820_RESERVED,
    };

    fn assert_sorted_disjoint(map: &[MemoryMapEntry]) {
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{map:x?}");
        }
    }

    fn ram_total(map: &[MemoryMapEntry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn memory_map_small() {
        let map = memory_map(64 * MIB);
        assert_eq!(
            map,
            vec![
                ram(0, EBDA_START),
                ram(HIMEM_START, 64 * MIB - HIMEM_START),
                HOLE
            ]
        );
    }

    #[test]
    fn memory_map_exactly_3_gib() {
        let map = memory_map(3 * GIB);
        assert_eq!(
            map,
            vec![
                ram(0, EBDA_START),
                ram(HIMEM_START, MMIO_GAP_START - HIMEM_START),
                HOLE
            ]
        );
    }

    #[test]
    fn memory_map_4_and_8_gib() {
        assert_eq!(
            memory_map(4 * GIB),
            vec![
                ram(0, EBDA_START),
                ram(HIMEM_START, MMIO_GAP_START - HIMEM_START),
                HOLE,
                ram(MMIO_GAP_END, GIB),
            ]
        );
        assert_eq!(memory_map(8 * GIB)[3], ram(MMIO_GAP_END, 5 * GIB));
    }

    #[test]
    fn memory_map_is_sorted_and_leaves_ebda_to_himem_out() {
        for size in [
            MIN_MEM_SIZE,
            3 * GIB,
            3 * GIB + 0x1000,
            4 * GIB,
            MAX_MEM_SIZE,
        ] {
            let map = memory_map(size);
            assert_sorted_disjoint(&map);
            for e in &map {
                assert!(
                    e.addr + e.size <= EBDA_START || e.addr >= HIMEM_START,
                    "{e:x?} overlaps the EBDA..HIMEM range"
                );
            }
            // All RAM but the EBDA..HIMEM window is described.
            assert_eq!(ram_total(&map), size - (HIMEM_START - EBDA_START));
        }
    }

    #[test]
    fn memory_map_tiny_sizes_do_not_panic() {
        assert_eq!(memory_map(0), vec![HOLE]);
        assert_eq!(memory_map(0x1000), vec![ram(0, 0x1000), HOLE]);
        assert_eq!(memory_map(HIMEM_START), vec![ram(0, EBDA_START), HOLE]);
    }

    fn read_params(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
    }

    fn check_e820(params: &boot_params, mem_size: u64) {
        let map = memory_map(mem_size);
        let entries = params.e820_entries;
        assert_eq!(usize::from(entries), map.len());
        let table = params.e820_table;
        for (got, want) in table.iter().zip(&map) {
            let (addr, size, kind) = (got.addr, got.size, got.r#type);
            assert_eq!((addr, size, kind), (want.addr, want.size, want.kind));
        }
        for unused in &table[map.len()..] {
            let (addr, size, kind) = (unused.addr, unused.size, unused.r#type);
            assert_eq!((addr, size, kind), (0, 0, 0));
        }
    }

    #[test]
    fn zero_page_with_default_header() {
        let mem = guest_mem();
        let info = BootInfo {
            mem_size: 8 * GIB,
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 42,
            initrd: Some((GuestAddress(0x3000_0000), 0x12_3456)),
        };
        write_zero_page(&mem, &info, None).unwrap();
        let params = read_params(&mem);
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.kernel_alignment }, 0x0100_0000);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.ext_cmd_line_ptr }, 0);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12_3456);
        assert_eq!({ params.ext_ramdisk_image }, 0);
        assert_eq!({ params.ext_ramdisk_size }, 0);
        check_e820(&params, 8 * GIB);
    }

    #[test]
    fn zero_page_keeps_bzimage_header() {
        let mem = guest_mem();
        let header = setup_header {
            setup_sects: 0x1f,
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            version: 0x020f,
            type_of_loader: 0,
            loadflags: 0x01,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: 0x7f,
            cmdline_size: 2047,
            init_size: 0x123_4000,
            ..Default::default()
        };
        let info = BootInfo {
            mem_size: 64 * MIB,
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 7,
            initrd: None,
        };
        write_zero_page(&mem, &info, Some(header)).unwrap();
        let params = read_params(&mem);
        let hdr = params.hdr;
        assert_eq!({ hdr.setup_sects }, 0x1f);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.loadflags }, 0x01);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ hdr.initrd_addr_max }, 0x7fff_ffff);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ hdr.relocatable_kernel }, 1);
        assert_eq!({ hdr.xloadflags }, 0x7f);
        assert_eq!({ hdr.init_size }, 0x123_4000);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 7);
        assert_eq!({ hdr.ramdisk_image }, 0);
        assert_eq!({ hdr.ramdisk_size }, 0);
        check_e820(&params, 64 * MIB);
    }

    #[test]
    fn zero_page_overwrites_stale_contents() {
        let mem = guest_mem();
        mem.write_slice(&[0xaa; 4096], GuestAddress(ZERO_PAGE_START))
            .unwrap();
        let info = BootInfo {
            mem_size: 64 * MIB,
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 1,
            initrd: None,
        };
        write_zero_page(&mem, &info, None).unwrap();
        let params = read_params(&mem);
        assert_eq!({ params.hdr.ramdisk_image }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, 0);
        check_e820(&params, 64 * MIB);
    }

    #[test]
    fn zero_page_write_error() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x7000)]).unwrap();
        let info = BootInfo {
            mem_size: 64 * MIB,
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 1,
            initrd: None,
        };
        assert!(matches!(
            write_zero_page(&mem, &info, None),
            Err(Error::GuestWrite {
                addr: ZERO_PAGE_START,
                ..
            })
        ));
    }

    fn read_start_info(mem: &GuestMemoryMmap) -> hvm_start_info {
        mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap()
    }

    fn check_pvh_memmap(mem: &GuestMemoryMmap, start_info: &hvm_start_info, mem_size: u64) {
        let map = memory_map(mem_size);
        assert_eq!(start_info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(start_info.memmap_entries as usize, map.len());
        for (i, want) in map.iter().enumerate() {
            let addr = PVH_MEMMAP_START + 24 * i as u64;
            let got: hvm_memmap_table_entry = mem.read_obj(GuestAddress(addr)).unwrap();
            assert_eq!(got.addr, want.addr);
            assert_eq!(got.size, want.size);
            assert_eq!(got.type_, want.kind);
            assert_eq!(got.reserved, 0);
        }
    }

    #[test]
    fn pvh_start_info_without_initrd() {
        let mem = guest_mem();
        let info = BootInfo {
            mem_size: 64 * MIB,
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 20,
            initrd: None,
        };
        write_pvh_start_info(&mem, &info).unwrap();
        let si = read_start_info(&mem);
        assert_eq!(si.magic, 0x336e_c578);
        assert_eq!(si.version, 1);
        assert_eq!(si.flags, 0);
        assert_eq!(si.nr_modules, 0);
        assert_eq!(si.modlist_paddr, 0);
        assert_eq!(si.cmdline_paddr, CMDLINE_START);
        assert_eq!(si.rsdp_paddr, 0);
        assert_eq!(si.reserved, 0);
        check_pvh_memmap(&mem, &si, 64 * MIB);
        // Type numbers as in the PVH spec.
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_START)).unwrap();
        assert_eq!(first.type_, 1);
        let hole: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(PVH_MEMMAP_START + 48)).unwrap();
        assert_eq!(hole.type_, 2);
    }

    #[test]
    fn pvh_start_info_with_initrd() {
        let mem = guest_mem();
        let info = BootInfo {
            mem_size: 8 * GIB,
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 20,
            initrd: Some((GuestAddress(0xbf00_0000), 0x80_0000)),
        };
        write_pvh_start_info(&mem, &info).unwrap();
        let si = read_start_info(&mem);
        assert_eq!(si.magic, 0x336e_c578);
        assert_eq!(si.version, 1);
        assert_eq!(si.cmdline_paddr, CMDLINE_START);
        check_pvh_memmap(&mem, &si, 8 * GIB);
        assert_eq!(si.nr_modules, 1);
        let entries = u64::from(si.memmap_entries);
        assert_eq!(si.modlist_paddr, PVH_MEMMAP_START + 24 * entries);
        assert_eq!(si.modlist_paddr % 8, 0);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!(module.paddr, 0xbf00_0000);
        assert_eq!(module.size, 0x80_0000);
        assert_eq!(module.cmdline_paddr, 0);
        assert_eq!(module.reserved, 0);
        // The module list stays clear of the zero page.
        assert!(si.modlist_paddr + 32 <= ZERO_PAGE_START);
    }

    #[test]
    fn pvh_start_info_write_error() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x6000)]).unwrap();
        let info = BootInfo {
            mem_size: 64 * MIB,
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 1,
            initrd: None,
        };
        assert!(matches!(
            write_pvh_start_info(&mem, &info),
            Err(Error::GuestWrite { .. })
        ));
    }
}
