//! Initial vCPU register state for the two boot protocols, and the boot MSRs.

use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::gdt::{gdt_entry, segment_from_gdt};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, CMDLINE_START, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use crate::Error;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, identity-mapped paging, `rsi` = zero page.
    Linux64,
    /// PVH: 32-bit protected mode without paging, `rbx` = `hvm_start_info`.
    Pvh,
}

/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;

/// CR0 protection enable.
const X86_CR0_PE: u64 = 0x1;
/// CR0 paging.
const X86_CR0_PG: u64 = 0x8000_0000;
/// CR4 physical address extension.
const X86_CR4_PAE: u64 = 0x20;
/// EFER long mode enable.
const EFER_LME: u64 = 0x100;
/// EFER long mode active.
const EFER_LMA: u64 = 0x400;

/// Page table entry flags.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
/// Page directory entry maps a (2 MiB) page rather than pointing to a page table.
const PTE_PAGE_SIZE: u64 = 1 << 7;
/// Number of page directories (each maps 1 GiB) in the identity map: 4 GiB.
const IDENTITY_MAP_PDS: u64 = 4;
/// Size of a page-table page, and entries in it.
const PAGE_TABLE_SIZE: u64 = 0x1000;
const PAGE_TABLE_ENTRIES: u64 = 512;
/// A large page mapped by a page-directory entry.
const LARGE_PAGE_SIZE: u64 = 2 << 20;

// The page directories must end before the next fixed item of the layout, the command line.
const _: () = assert!(PDE_START + IDENTITY_MAP_PDS * PAGE_TABLE_SIZE <= CMDLINE_START);

/// The boot GDT for each protocol: null, code, data, TSS (selectors 0x0, 0x8, 0x10, 0x18).
fn boot_gdt(protocol: BootProtocol) -> [u64; 4] {
    match protocol {
        // 64-bit code, flat 4 GiB data, 64-bit busy TSS.
        BootProtocol::Linux64 => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
        // PVH spec: flat 32-bit code and data, a 32-bit busy TSS with base 0 and limit 0x67.
        BootProtocol::Pvh => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
    }
}

/// General-purpose registers for the boot vCPU entering at `entry`.
///
/// `rflags` has only its reserved bit set (interrupts off). For `Linux64`, `rsp` and `rbp` point
/// at `BOOT_STACK_POINTER` and `rsi` at the zero page; for `Pvh`, `rbx` holds the address of
/// `hvm_start_info` and the stack is left to the kernel.
pub fn boot_regs(entry: GuestAddress, protocol: BootProtocol) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// Write `value` at `addr`, naming `what` in the error.
fn write_u64(
    mem: &GuestMemoryMmap,
    value: u64,
    addr: u64,
    what: &'static str,
) -> crate::Result<()> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|_| Error::GuestWrite { what, addr })
}

/// Write one whole page-table page whose entries are `entry(i)` for i in 0..512.
fn write_table_page(
    mem: &GuestMemoryMmap,
    addr: u64,
    what: &'static str,
    entry: impl Fn(u64) -> u64,
) -> crate::Result<()> {
    let page: Vec<u8> = (0..PAGE_TABLE_ENTRIES)
        .flat_map(|i| entry(i).to_le_bytes())
        .collect();
    mem.write_slice(&page, GuestAddress(addr))
        .map_err(|_| Error::GuestWrite { what, addr })
}

/// Write page tables identity-mapping the first 4 GiB with 2 MiB pages: the PML4 at
/// `PML4_START` (entry 0 only), the PDPT at `PDPTE_START` (entries 0-3) and four page
/// directories at `PDE_START..PDE_START + 0x4000`. Unused entries are written as zero.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> crate::Result<()> {
    let table_flags = PTE_PRESENT | PTE_WRITABLE;
    write_table_page(mem, PML4_START, "PML4", |i| {
        if i == 0 {
            PDPTE_START | table_flags
        } else {
            0
        }
    })?;
    write_table_page(mem, PDPTE_START, "PDPT", |i| {
        if i < IDENTITY_MAP_PDS {
            (PDE_START + i * PAGE_TABLE_SIZE) | table_flags
        } else {
            0
        }
    })?;
    for pd in 0..IDENTITY_MAP_PDS {
        write_table_page(
            mem,
            PDE_START + pd * PAGE_TABLE_SIZE,
            "page directory",
            |i| ((pd * PAGE_TABLE_ENTRIES + i) * LARGE_PAGE_SIZE) | table_flags | PTE_PAGE_SIZE,
        )?;
    }
    Ok(())
}

/// Write the GDT, IDT and (for `Linux64`) identity page tables covering the first 4 GiB into guest
/// memory, and return `sregs` (as read from the vCPU) updated with segments, control registers
/// and EFER for the protocol.
///
/// The GDT is `[null, code, data, TSS]` at `BOOT_GDT_START`; the IDT is a single zero entry at
/// `BOOT_IDT_START` (the kernel installs its own before enabling interrupts). `cs` uses the code
/// descriptor, `ds`/`es`/`fs`/`gs`/`ss` the data descriptor, and `tr` the TSS.
///
/// - `Linux64`: `cr3` = `PML4_START`, `cr4` gains PAE, `cr0` gains PE and PG, EFER gains LME
///   and LMA; other bits of the input are kept.
/// - `Pvh`: `cr0` = PE only, `cr3` = `cr4` = 0 and EFER = 0 (32-bit protected mode, no paging).
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    protocol: BootProtocol,
    sregs: &kvm_sregs,
) -> crate::Result<kvm_sregs> {
    let gdt = boot_gdt(protocol);
    for (i, entry) in gdt.iter().enumerate() {
        write_u64(mem, *entry, BOOT_GDT_START + 8 * i as u64, "GDT")?;
    }
    write_u64(mem, 0, BOOT_IDT_START, "IDT")?;

    let mut sregs = *sregs;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match protocol {
        BootProtocol::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// Initial FPU state (FCW 0x37f, MXCSR 0x1f80).
///
/// These are the x87 and SSE power-on defaults: all exceptions masked, round to nearest,
/// extended precision. Everything else is zero.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR indices set at boot.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled (bit 11), default memory type write-back (6).
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// MSRs every vCPU starts with: SYSENTER/STAR/LSTAR/CSTAR/SYSCALL_MASK/KERNEL_GS_BASE zero,
/// TSC zero, MISC_ENABLE with fast strings, MTRR default type write-back enabled.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Offsets of the local vector table LINT0 and LINT1 registers in the APIC page.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// Delivery mode field (bits 8-10) of an LVT entry, and the modes used.
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Read the 32-bit APIC register at `offset` of `regs` (little endian).
fn get_apic_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    u32::from_le_bytes(bytes)
}

/// Write the 32-bit APIC register at `offset` of `regs` (little endian).
fn set_apic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, value: u32) {
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// Set the delivery mode of the LVT register at `offset`, keeping its other bits.
fn set_delivery_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let value = get_apic_reg(regs, offset);
    set_apic_reg(
        regs,
        offset,
        (value & !APIC_DELIVERY_MODE_MASK) | (mode << 8),
    );
}

/// Program a local APIC state (as read with `KVM_GET_LAPIC`): LINT0 as ExtINT, LINT1 as NMI.
///
/// Only the delivery mode (bits 8-10) of the LVT LINT0 (offset 0x350) and LINT1 (offset 0x360)
/// registers changes; the vector, mask and trigger bits are kept.
pub fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    set_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// The sregs KVM reports for a vCPU at reset (the interesting parts).
    fn reset_sregs() -> kvm_sregs {
        kvm_sregs {
            cr0: 0x6000_0010,
            apic_base: 0xfee0_0900,
            ..Default::default()
        }
    }

    #[test]
    fn regs_linux64() {
        let regs = boot_regs(GuestAddress(0x100_0000), BootProtocol::Linux64);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rflags, 0x2);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        assert_eq!(regs.rbp, BOOT_STACK_POINTER);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rbx, 0);
    }

    #[test]
    fn regs_pvh() {
        let regs = boot_regs(GuestAddress(0x100_0abc), BootProtocol::Pvh);
        assert_eq!(regs.rip, 0x100_0abc);
        assert_eq!(regs.rflags, 0x2);
        assert_eq!(regs.rbx, PVH_INFO_START);
        assert_eq!(regs.rsi, 0);
    }

    fn check_gdt(mem: &GuestMemoryMmap, expected: [u64; 4]) {
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(
                read_u64(mem, BOOT_GDT_START + 8 * i as u64),
                *want,
                "GDT[{i}]"
            );
        }
        assert_eq!(read_u64(mem, BOOT_IDT_START), 0);
    }

    fn check_tables(sregs: &kvm_sregs) {
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.idt.base, BOOT_IDT_START);
        assert_eq!(sregs.idt.limit, 7);
        assert_eq!(sregs.cs.selector, 0x8);
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, 0x10);
            assert_eq!(seg.type_, 0x3);
            assert_eq!(seg.present, 1);
            assert_eq!(seg.s, 1);
            assert_eq!(seg.db, 1);
            assert_eq!(seg.g, 1);
            assert_eq!(seg.base, 0);
            assert_eq!(seg.limit, 0xffff_ffff);
        }
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!(sregs.tr.type_, 0xb);
        assert_eq!(sregs.tr.s, 0);
        assert_eq!(sregs.tr.present, 1);
        assert_eq!(sregs.tr.unusable, 0);
    }

    #[test]
    fn sregs_linux64() {
        let mem = guest_mem();
        let sregs = boot_sregs(&mem, BootProtocol::Linux64, &reset_sregs()).unwrap();
        check_gdt(
            &mem,
            [
                0,
                0x00af_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0x008f_8b00_0000_ffff,
            ],
        );
        check_tables(&sregs);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.db, 0);
        assert_eq!(sregs.cs.type_, 0xb);
        assert_eq!(sregs.cs.present, 1);
        assert_eq!(sregs.tr.limit, 0xffff_ffff);

        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cr4 & 0x20, 0x20);
        assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001);
        // Bits already set by the vCPU are kept.
        assert_eq!(sregs.cr0, 0xe000_0011);
        assert_eq!(sregs.efer, 0x500);
        assert_eq!(sregs.apic_base, 0xfee0_0900);
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = guest_mem();
        // Stale data must not survive in the unused entries.
        mem.write_slice(&[0xff; 0x6000], GuestAddress(PML4_START))
            .unwrap();
        boot_sregs(&mem, BootProtocol::Linux64, &reset_sregs()).unwrap();

        assert_eq!(read_u64(&mem, PML4_START), PDPTE_START | 0x3);
        for i in 1..512 {
            assert_eq!(read_u64(&mem, PML4_START + 8 * i), 0);
        }
        for i in 0..4 {
            assert_eq!(
                read_u64(&mem, PDPTE_START + 8 * i),
                (PDE_START + 0x1000 * i) | 0x3
            );
        }
        for i in 4..512 {
            assert_eq!(read_u64(&mem, PDPTE_START + 8 * i), 0);
        }
        for pd in 0..4u64 {
            for i in 0..512u64 {
                let entry = read_u64(&mem, PDE_START + pd * 0x1000 + 8 * i);
                assert_eq!(entry, ((pd << 30) + (i << 21)) | 0x83);
            }
        }
        // Walk a few addresses through the tables.
        for vaddr in [0u64, 0x1234_5678, 0xbfff_ffff, 0xfee0_0000, 0xffff_ffff] {
            let pml4e = read_u64(&mem, PML4_START + 8 * ((vaddr >> 39) & 0x1ff));
            let pdpte = read_u64(&mem, (pml4e & !0xfff) + 8 * ((vaddr >> 30) & 0x1ff));
            let pde = read_u64(&mem, (pdpte & !0xfff) + 8 * ((vaddr >> 21) & 0x1ff));
            assert_eq!(pde & 0x83, 0x83);
            let paddr = (pde & !0x1f_ffff & !0x83) | (vaddr & 0x1f_ffff);
            assert_eq!(paddr, vaddr);
        }
    }

    #[test]
    fn sregs_pvh() {
        let mem = guest_mem();
        let mut input = reset_sregs();
        input.cr4 = 0x20;
        input.efer = 0x500;
        input.cr3 = 0x0123_4000;
        let sregs = boot_sregs(&mem, BootProtocol::Pvh, &input).unwrap();
        check_gdt(
            &mem,
            [
                0,
                0x00cf_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0x0000_8b00_0000_0067,
            ],
        );
        check_tables(&sregs);
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.type_, 0xb);
        assert_eq!(sregs.cs.base, 0);
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
        assert_eq!(sregs.tr.base, 0);
        assert_eq!(sregs.tr.limit, 0x67);
        assert_eq!(sregs.tr.g, 0);
        assert_eq!(sregs.cr0, 0x1);
        assert_eq!(sregs.cr3, 0);
        assert_eq!(sregs.cr4, 0);
        assert_eq!(sregs.efer, 0);
        assert_eq!(sregs.apic_base, 0xfee0_0900);
        // No page tables for PVH.
        assert_eq!(read_u64(&mem, PML4_START), 0);
    }

    #[test]
    fn sregs_write_error() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(boot_sregs(&mem, BootProtocol::Pvh, &reset_sregs()).is_ok());
        match boot_sregs(&mem, BootProtocol::Linux64, &reset_sregs()) {
            Err(Error::GuestWrite { addr, .. }) => assert_eq!(addr, PML4_START),
            other => panic!("unexpected {other:?}"),
        }
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x1000)]).unwrap();
        assert!(matches!(
            boot_sregs(&mem, BootProtocol::Pvh, &reset_sregs()),
            Err(Error::GuestWrite {
                addr: BOOT_GDT_START,
                ..
            })
        ));
    }

    #[test]
    fn fpu() {
        let fpu = boot_fpu();
        assert_eq!(fpu.fcw, 0x37f);
        assert_eq!(fpu.mxcsr, 0x1f80);
        assert_eq!(fpu.fsw, 0);
        assert_eq!(fpu.ftwx, 0);
    }

    #[test]
    fn msrs() {
        let msrs = boot_msrs();
        let expected = [
            (0x174, 0),
            (0x175, 0),
            (0x176, 0),
            (0xc000_0081, 0),
            (0xc000_0082, 0),
            (0xc000_0083, 0),
            (0xc000_0084, 0),
            (0xc000_0102, 0),
            (0x10, 0),
            (0x1a0, 1),
            (0x2ff, (1 << 11) | 6),
        ];
        assert_eq!(msrs.len(), expected.len());
        for (index, data) in expected {
            let entry = msrs
                .iter()
                .find(|e| e.index == index)
                .unwrap_or_else(|| panic!("MSR {index:#x} missing"));
            assert_eq!(entry.data, data, "MSR {index:#x}");
            assert_eq!(entry.reserved, 0);
        }
    }

    fn lapic_with(lint0: u32, lint1: u32) -> kvm_bindings::kvm_lapic_state {
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        set_apic_reg(&mut lapic.regs, APIC_LVT0, lint0);
        set_apic_reg(&mut lapic.regs, APIC_LVT1, lint1);
        lapic
    }

    #[test]
    fn lint_from_reset_state() {
        // At reset both LVT entries are masked (bit 16) with fixed delivery.
        let mut lapic = lapic_with(0x1_0000, 0x1_0000);
        set_lint(&mut lapic);
        assert_eq!(get_apic_reg(&lapic.regs, 0x350), 0x1_0700);
        assert_eq!(get_apic_reg(&lapic.regs, 0x360), 0x1_0400);
        // Little endian in the page.
        assert_eq!(lapic.regs[0x351] as u8, 0x07);
        assert_eq!(lapic.regs[0x352] as u8, 0x01);
        assert_eq!(lapic.regs[0x361] as u8, 0x04);
    }

    #[test]
    fn lint_keeps_other_bits() {
        let mut lapic = lapic_with(0xffff_ffff, 0x0001_a5ff);
        // Neighbouring registers are untouched.
        set_apic_reg(&mut lapic.regs, 0x340, 0xdead_beef);
        set_apic_reg(&mut lapic.regs, 0x370, 0x1234_5678);
        set_lint(&mut lapic);
        assert_eq!(get_apic_reg(&lapic.regs, 0x350), 0xffff_ffff);
        assert_eq!(get_apic_reg(&lapic.regs, 0x360), 0x0001_a4ff);
        assert_eq!(get_apic_reg(&lapic.regs, 0x340), 0xdead_beef);
        assert_eq!(get_apic_reg(&lapic.regs, 0x370), 0x1234_5678);
        // Idempotent.
        let before = lapic.regs;
        set_lint(&mut lapic);
        assert_eq!(lapic.regs, before);
    }
}
