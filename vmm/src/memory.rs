//! Guest RAM: allocated with `vm-memory` around the MMIO hole and registered with KVM.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::error::{Error, Result};

/// The unit of sparseness in a snapshot memory file: all-zero pages are holes.
const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
/// How much guest memory a snapshot copies out at a time.
const CHUNK: usize = 1 << 20;

/// Allocate `mem_size` bytes of guest RAM laid out as `arch` says.
pub fn create(mem_size: u64) -> Result<GuestMemoryMmap> {
    let mib = mem_size >> 20;
    let regions = arch::memory::ram_regions(mem_size).map_err(|e| Error::GuestMemory {
        mib,
        reason: e.to_string(),
    })?;
    GuestMemoryMmap::from_ranges(&regions).map_err(|e| Error::GuestMemory {
        mib,
        reason: e.to_string(),
    })
}

/// Give every region of `mem` to the VM as one KVM memory slot.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let kvm_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which the
        // caller keeps alive for as long as the VM (and so KVM) may touch it; slots don't overlap
        // because `arch::memory::ram_regions` returns disjoint ranges.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| Error::Kvm {
            what: "register guest memory",
            source,
        })?;
    }
    Ok(())
}

/// Write guest RAM to `path` (mode 0600): the regions back to back in address order, with
/// all-zero pages left as holes. The caller keeps the guest and its devices from writing
/// memory meanwhile.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<()> {
    crate::snapshot::write_atomically(path, "snapshot memory", |file| {
        let mut buf = vec![0u8; CHUNK];
        let mut file_offset = 0u64;
        for region in mem.iter() {
            let len = region.len();
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                let chunk = &mut buf[..n];
                mem.read_slice(chunk, GuestAddress(region.start_addr().0 + done))
                    .map_err(std::io::Error::other)?;
                write_nonzero_pages(file, chunk, file_offset + done)?;
                done += n as u64;
            }
            file_offset += len;
        }
        file.set_len(file_offset)
    })
}

/// Write the runs of pages of `data` that are not all zero at `offset` in `file`.
fn write_nonzero_pages(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    let mut run_start = None;
    let pages = data.chunks(PAGE).enumerate();
    for (i, page) in pages {
        // A slice comparison is a memcmp: fast even in debug builds.
        let zero = page == &ZERO_PAGE[..page.len()];
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(start)) => {
                file.write_all_at(
                    &data[start * PAGE..i * PAGE],
                    offset + (start * PAGE) as u64,
                )?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start * PAGE..], offset + (start * PAGE) as u64)?;
    }
    Ok(())
}

/// Guest RAM of `mem_size` bytes mapped copy-on-write from the snapshot memory file `path`
/// (as [`save`] wrote it): pages load lazily and guest writes never reach the file.
pub fn restore(path: &Path, mem_size: u64) -> Result<GuestMemoryMmap> {
    let map_err = |reason: String| Error::SnapshotMemoryMap {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|source| Error::ReadFile {
        what: "the snapshot memory file",
        path: path.to_path_buf(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| Error::ReadFile {
            what: "the snapshot memory file",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size != mem_size {
        return Err(Error::SnapshotMemorySize {
            path: path.to_path_buf(),
            size,
            expected: mem_size,
        });
    }
    let ranges = arch::memory::ram_regions(mem_size).map_err(|e| map_err(e.to_string()))?;
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for (addr, len) in ranges {
        let file = file.try_clone().map_err(|e| map_err(e.to_string()))?;
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or_else(|| map_err(format!("region at {:#x} overflows", addr.0)))?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_memory_is_split_around_the_mmio_hole() {
        let mem = create(4 << 30).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].0, 0);
        assert_eq!(regions[0].0 + regions[0].1, arch::layout::MMIO_GAP_START);
        assert_eq!(regions[1].0, arch::layout::MMIO_GAP_END);
        assert_eq!(regions[0].1 + regions[1].1, 4 << 30);
    }

    #[test]
    fn small_memory_is_one_region() {
        let mem = create(128 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr().0, (128 << 20) - 1);
    }

    fn temp_file(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("flint-mem-{name}-{}", std::process::id()))
    }

    #[test]
    fn sparse_memory_file_round_trip() {
        let size = 128u64 << 20;
        let mem = create(size).unwrap();
        let writes: [(u64, &[u8]); 4] = [
            (0, b"first page"),
            (0x1ff8, b"straddles two pages"),
            (0x400_0000, b"middle"),
            (size - 4, b"end!"),
        ];
        for (addr, data) in writes {
            mem.write_slice(data, GuestAddress(addr)).unwrap();
        }
        let path = temp_file("sparse");
        save(&mem, &path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), size);
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        // Four data pages plus one (the straddling write spans two): the rest are holes.
        let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        assert!(allocated <= 64 * 4096, "{allocated} bytes allocated");

        let restored = restore(&path, size).unwrap();
        assert_eq!(restored.num_regions(), mem.num_regions());
        for (addr, data) in writes {
            let mut back = vec![0u8; data.len()];
            restored.read_slice(&mut back, GuestAddress(addr)).unwrap();
            assert_eq!(back, data);
        }
        let mut zero = [0xffu8; 16];
        restored
            .read_slice(&mut zero, GuestAddress(0x40_0000))
            .unwrap();
        assert_eq!(zero, [0; 16]);

        // Guest writes stay private: the file is never modified.
        let before = std::fs::read(&path).unwrap();
        restored
            .write_slice(b"scribble", GuestAddress(0x10))
            .unwrap();
        restored
            .write_slice(b"scribble", GuestAddress(0x30_0000))
            .unwrap();
        drop(restored);
        assert!(std::fs::read(&path).unwrap() == before);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn wrong_size_memory_files_are_refused() {
        let path = temp_file("short");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let msg = restore(&path, 128 << 20).err().unwrap().to_string();
        assert_eq!(
            msg,
            format!(
                "the snapshot memory file {} holds 4096 bytes but the snapshot's VM has {} bytes of memory",
                path.display(),
                128u64 << 20
            )
        );
        std::fs::remove_file(&path).unwrap();
        let msg = restore(&path, 128 << 20).err().unwrap().to_string();
        assert!(
            msg.starts_with("cannot read the snapshot memory file"),
            "{msg}"
        );
    }
}
