//! x86_64 boot state for flint guests, as plain data and pure functions.
//!
//! Everything here either computes a KVM structure (registers, CPUID, MSRs) or writes a boot
//! structure (GDT, page tables, boot parameters, PVH start info, MP table, ACPI tables) into guest memory.
//! Nothing here talks to KVM: the `vmm` crate applies the results to vCPU file descriptors.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod regs;

pub use memory::{GuestMemoryMmap, GuestRegionMmap};

/// Errors from building x86_64 boot state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A boot structure could not be written to guest memory.
    #[error("cannot write the {what} to guest memory at {addr:#x}")]
    GuestWrite { what: &'static str, addr: u64 },
    /// The guest memory size is outside what flint supports.
    #[error("guest memory of {0} bytes is outside the supported range")]
    MemorySize(u64),
    /// The initrd does not fit in guest memory below the kernel's limit.
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    /// Too many vCPUs for the MP table.
    #[error("{0} vCPUs is more than the MP table can describe")]
    TooManyCpus(u8),
    /// The interrupt asked for an ACPI device is not an I/O APIC pin.
    #[error("GSI {0} is not an I/O APIC pin (0-23)")]
    AcpiGsi(u32),
    /// More devices than the DSDT can name.
    #[error("{0} virtio devices are more than the ACPI tables can describe")]
    AcpiDevices(usize),
    /// The boot parameters could not be configured.
    #[error("cannot configure the boot parameters: {0}")]
    BootConfigure(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
