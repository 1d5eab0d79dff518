//! The guest physical memory layout flint uses on x86_64.

/// Where the GDT is written.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) IDT is written.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries follow the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted, including the terminating NUL (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: low RAM ends here; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the RSDP at the start (where a guest scanning the BIOS area for it looks), the
/// other tables after it. Like the MP table this is in `EBDA_START..HIMEM_START`, which the
/// memory map never reports as RAM, so the guest keeps its hands off.
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the space for ACPI tables.
pub const ACPI_END: u64 = 0xf_0000;
/// The 16-byte VM generation ID the guest's vmgenid driver reads (its ACPI `ADDR`), alone in
/// its page, also outside guest RAM.
pub const VMGENID_START: u64 = 0xf_0000;
/// Size of the VM generation ID.
pub const VMGENID_SIZE: usize = 16;
/// First address of high memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// The MMIO hole below 4 GiB: guest RAM never overlaps it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// Smallest and largest guest memory sizes flint accepts. The smallest holds the boot
/// structures below 1 MiB and 1 MiB of high memory; whether the kernel and initrd fit is
/// checked when they are loaded.
pub const MIN_MEM_SIZE: u64 = 2 << 20;
pub const MAX_MEM_SIZE: u64 = 1 << 40;

// The ACPI tables and the generation ID are outside guest RAM, in the area below 1 MiB that
// the memory map leaves out.
const _: () = assert!(
    EBDA_START <= ACPI_START
        && ACPI_END <= VMGENID_START
        && VMGENID_START + VMGENID_SIZE as u64 <= HIMEM_START
);
