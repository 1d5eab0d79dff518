//! Loading the guest kernel, initrd and command line into guest memory, and writing the boot
//! parameters for the protocol the kernel is entered with.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use arch::boot::BootInfo;
use arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use arch::regs::BootProtocol;
use arch::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::config::VmConfig;
use crate::error::{Error, Result};

/// Where and how the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    pub entry: GuestAddress,
    pub protocol: BootProtocol,
}

/// The kernel image formats flint boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_HDRS_OFFSET: u64 = 0x202;
const BZIMAGE_HDRS_MAGIC: &[u8; 4] = b"HdrS";
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Tell an ELF `vmlinux` from a `bzImage` by their magic numbers.
pub fn detect_format(file: &mut File) -> std::io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    if file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC {
        return Ok(Some(KernelFormat::Elf));
    }
    file.seek(SeekFrom::Start(BZIMAGE_HDRS_OFFSET))?;
    if file.read_exact(&mut magic).is_ok() && &magic == BZIMAGE_HDRS_MAGIC {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

fn open(what: &'static str, path: &Path) -> Result<File> {
    let file = File::open(path).map_err(|source| Error::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| Error::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(Error::ReadFile {
            what,
            path: path.to_path_buf(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    Ok(file)
}

/// Load the kernel, initrd and `cmdline` (the configured one plus what flint adds), and write
/// the boot parameters.
pub fn load(config: &VmConfig, cmdline_text: &str, mem: &GuestMemoryMmap) -> Result<KernelEntry> {
    let mut kernel = open("the kernel", &config.kernel)?;
    let format = detect_format(&mut kernel)
        .map_err(|source| Error::ReadFile {
            what: "the kernel",
            path: config.kernel.clone(),
            source,
        })?
        .ok_or_else(|| Error::KernelFormat(config.kernel.clone()))?;

    let load_err = |e: linux_loader::loader::Error| Error::KernelLoad {
        path: config.kernel.clone(),
        mib: config.mem_mib,
        reason: loader_reason(&e),
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let (result, entry): (KernelLoaderResult, KernelEntry) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut kernel, himem).map_err(load_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => KernelEntry {
                    entry: addr,
                    protocol: BootProtocol::Pvh,
                },
                _ => KernelEntry {
                    entry: r.kernel_load,
                    protocol: BootProtocol::Linux64,
                },
            };
            (r, entry)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kernel, himem).map_err(load_err)?;
            let entry = KernelEntry {
                entry: r
                    .kernel_load
                    .checked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
                    .ok_or_else(|| Error::KernelFormat(config.kernel.clone()))?,
                protocol: BootProtocol::Linux64,
            };
            (r, entry)
        }
    };

    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(config, path, mem, &result)?),
        None => None,
    };

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    if !cmdline_text.is_empty() {
        cmdline
            .insert_str(cmdline_text)
            .map_err(|e| Error::Cmdline(e.to_string()))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;

    let info = BootInfo {
        mem_size: config.mem_bytes(),
        cmdline_addr: GuestAddress(CMDLINE_START),
        cmdline_size: cmdline_text.len() + 1,
        initrd,
    };
    match entry.protocol {
        BootProtocol::Pvh => arch::boot::write_pvh_start_info(mem, &info)?,
        BootProtocol::Linux64 => arch::boot::write_zero_page(mem, &info, result.setup_header)?,
    }
    Ok(entry)
}

fn load_initrd(
    config: &VmConfig,
    path: &Path,
    mem: &GuestMemoryMmap,
    kernel: &KernelLoaderResult,
) -> Result<(GuestAddress, u64)> {
    let read_err = |source| Error::ReadFile {
        what: "the initrd",
        path: path.to_path_buf(),
        source,
    };
    let mut file = open("the initrd", path)?;
    let size = file.metadata().map_err(read_err)?.len();
    // A bzImage tells how high the initrd may go; a vmlinux gets the conventional 32-bit limit.
    let max_addr = kernel
        .setup_header
        .map(|h| h.initrd_addr_max as u64)
        .filter(|&m| m != 0)
        .unwrap_or(0x7fff_ffff);
    let too_large = || Error::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        mib: config.mem_mib,
    };
    let addr =
        arch::memory::initrd_load_addr(config.mem_bytes(), kernel.kernel_end, size, max_addr)
            .map_err(|_| too_large())?;
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

fn loader_reason(e: &linux_loader::loader::Error) -> String {
    // linux-loader prefixes its messages with "Kernel Loader: "; keep just the reason.
    let s = e.to_string();
    s.strip_prefix("Kernel Loader: ").unwrap_or(&s).to_string()
}
