//! Guest RAM: allocated with `vm-memory` around the MMIO hole (from ordinary or 2 MiB huge
//! pages) and registered with KVM; saved to and restored from snapshot memory files, whole or
//! as the pages changed since the previous snapshot (a diff).

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    ReadVolatile,
};

use crate::config::HugePages;
use crate::error::{Error, Result};
use arch::{GuestMemoryMmap, GuestRegionMmap};

/// The unit of sparseness in a snapshot memory file (all-zero pages of a full snapshot and
/// unchanged pages of a diff are holes), and of dirty-page tracking: KVM's and `vm-memory`'s
/// bitmaps have one bit per page of this size.
pub(crate) const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
/// How much guest memory a snapshot copies out at a time.
const CHUNK: usize = 1 << 20;
/// The size of a huge page.
const HUGE_PAGE: u64 = 2 << 20;
/// Where the host counts its 2 MiB huge pages.
const HUGE_PAGES_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// A bitmap for a region of `len` bytes: one bit per [`PAGE`].
fn bitmap(len: usize) -> AtomicBitmap {
    AtomicBitmap::new(len, const { NonZeroUsize::new(PAGE).unwrap() })
}

/// An anonymous private mapping of `len` bytes, from huge pages if `huge` says so. Huge pages
/// are reserved by the mapping itself (no `MAP_NORESERVE`): a host without enough of them
/// refuses it here, instead of the guest getting SIGBUS on a later fault.
fn anonymous_region(
    len: usize,
    huge: HugePages,
) -> std::result::Result<MmapRegion<AtomicBitmap>, String> {
    let builder = MmapRegionBuilder::new_with_bitmap(len, bitmap(len))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
    let builder = match huge {
        HugePages::None | HugePages::Transparent => {
            builder.with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
        }
        HugePages::Size2M => builder
            .with_mmap_flags(
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
            )
            .with_hugetlbfs(true),
    };
    builder.build().map_err(|e| e.to_string())
}

/// How many 2 MiB huge pages the host has free and not yet promised to a mapping, if it has
/// a pool of them at all.
fn available_huge_pages() -> Option<u64> {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{HUGE_PAGES_SYSFS}/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?))
}

/// Allocate `mem_size` bytes of guest RAM laid out as `arch` says, backed as `huge` says.
pub fn create(mem_size: u64, huge: HugePages) -> Result<GuestMemoryMmap> {
    let mib = mem_size >> 20;
    let guest_memory = |reason: String| Error::GuestMemory { mib, reason };
    let ranges = arch::memory::ram_regions(mem_size).map_err(|e| guest_memory(e.to_string()))?;
    let mut regions = Vec::with_capacity(ranges.len());
    for (addr, len) in ranges {
        let mapping = match anonymous_region(len, huge) {
            Ok(mapping) => mapping,
            Err(reason) => {
                // What this VM reserved so far goes back before the pool is counted.
                drop(regions);
                return Err(
                    huge_pages_error(huge, mem_size).unwrap_or_else(|| guest_memory(reason))
                );
            }
        };
        if huge == HugePages::Transparent {
            advise_huge_pages(&mapping).map_err(|_| Error::NoTransparentHugePages)?;
        }
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or_else(|| guest_memory(format!("region at {:#x} overflows", addr.0)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| guest_memory(e.to_string()))
}

/// Ask the host kernel to back `mapping` with transparent huge pages where it can.
fn advise_huge_pages(mapping: &MmapRegion<AtomicBitmap>) -> std::io::Result<()> {
    // SAFETY: the range is exactly the mapping `mapping` owns; MADV_HUGEPAGE only changes how
    // the kernel may back it, never its contents or validity.
    let rc = unsafe {
        libc::madvise(
            mapping.as_ptr().cast::<libc::c_void>(),
            mapping.size(),
            libc::MADV_HUGEPAGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Why `mem_size` bytes of huge pages could not be mapped, when the host's pool explains it.
fn huge_pages_error(huge: HugePages, mem_size: u64) -> Option<Error> {
    if huge != HugePages::Size2M {
        return None;
    }
    let needed = mem_size / HUGE_PAGE;
    match available_huge_pages() {
        None => Some(Error::NoHugePages),
        Some(available) if available < needed => Some(Error::HugePagesShort {
            mib: mem_size >> 20,
            needed,
            available,
        }),
        Some(_) => None,
    }
}

/// Give every region of `mem` to the VM as one KVM memory slot, with KVM logging the pages
/// the guest writes if `track_dirty`.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let kvm_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if track_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
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

/// The pages of guest memory changed since the last snapshot, region by region (one bit per
/// [`PAGE`], bit `i % 64` of word `i / 64` for page `i`, as KVM and `vm-memory` lay out
/// theirs). Both sources clear their bits when read, so what was read is kept here until a
/// snapshot that holds those pages has been written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    regions: Vec<Vec<u64>>,
}

impl DirtyPages {
    /// Nothing dirty, for memory laid out as `mem`.
    pub fn new(mem: &GuestMemoryMmap) -> Self {
        DirtyPages {
            regions: mem
                .iter()
                .map(|r| vec![0; (r.len() as usize).div_ceil(PAGE).div_ceil(64)])
                .collect(),
        }
    }

    /// Add the pages set in `bits` to region `index`'s.
    fn add(&mut self, index: usize, bits: &[u64]) {
        if let Some(words) = self.regions.get_mut(index) {
            for (word, new) in words.iter_mut().zip(bits) {
                *word |= new;
            }
        }
    }

    /// Read (and so clear) what KVM logged of the guest's writes and what `vm-memory` marked
    /// of the VMM's own (devices, the VM generation ID) since the last read.
    pub fn collect(&mut self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
        for (slot, region) in mem.iter().enumerate() {
            let logged = vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| Error::Kvm {
                    what: "read the dirty-page log",
                    source,
                })?;
            self.add(slot, &logged);
        }
        self.collect_vmm_writes(mem);
        Ok(())
    }

    /// Read (and so clear) what `vm-memory` marked of the VMM's own writes.
    fn collect_vmm_writes(&mut self, mem: &GuestMemoryMmap) {
        for (index, region) in mem.iter().enumerate() {
            self.add(index, &(**region).bitmap().get_and_reset());
        }
    }

    /// Forget every page (a snapshot now holds them).
    pub fn clear(&mut self) {
        for words in &mut self.regions {
            words.fill(0);
        }
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The dirty pages of region `index` (of `pages` pages) as runs `(first page, pages)`,
    /// each widened to whole blocks of `block` pages (but not past `pages`).
    fn runs(&self, index: usize, block: u64, pages: u64) -> Vec<(u64, u64)> {
        let block = block.max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let Some(words) = self.regions.get(index) else {
            return runs;
        };
        for (w, &word) in words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if page >= pages {
                    break;
                }
                let start = page / block * block;
                let end = (start + block).min(pages);
                match runs.last_mut() {
                    Some((first, n)) if *first + *n >= start => *n = (*n).max(end - *first),
                    _ => runs.push((start, end - start)),
                }
            }
        }
        runs
    }
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

/// Write the pages of `mem` that `dirty` holds to `path` (mode 0600): a file as long as a
/// full snapshot's, with those pages where a full snapshot has them and holes everywhere
/// else, so that writing its data over a copy of the previous snapshot's memory file (see
/// [`merge`]) gives this snapshot's memory. Runs of pages are widened to whole blocks of the
/// file's filesystem: a block is either a hole or all data. The caller keeps the guest and its
/// devices from writing memory meanwhile.
pub fn save_diff(mem: &GuestMemoryMmap, path: &Path, dirty: &DirtyPages) -> Result<()> {
    crate::snapshot::write_atomically(path, "snapshot memory", |file| {
        let block = (file.metadata()?.blksize() / PAGE as u64).max(1);
        let mut buf = vec![0u8; CHUNK];
        let mut file_offset = 0u64;
        let mut written = 0u64;
        for (index, region) in mem.iter().enumerate() {
            let pages = region.len() / PAGE as u64;
            for (first, n) in dirty.runs(index, block, pages) {
                let (mut at, end) = (first * PAGE as u64, (first + n) * PAGE as u64);
                while at < end {
                    let len = (end - at).min(CHUNK as u64) as usize;
                    mem.read_slice(&mut buf[..len], GuestAddress(region.start_addr().0 + at))
                        .map_err(std::io::Error::other)?;
                    file.write_all_at(&buf[..len], file_offset + at)?;
                    at += len as u64;
                }
                written += n * PAGE as u64;
            }
            file_offset += region.len();
        }
        file.set_len(file_offset)?;
        // A filesystem that reports no holes would have the unchanged pages read back as
        // zeros: refuse it now rather than corrupt a merge later.
        if written < file_offset && next_hole(file, 0)? >= file_offset {
            return Err(std::io::Error::other(
                "its filesystem does not keep holes in files, which a diff snapshot needs",
            ));
        }
        Ok(())
    })
}

/// `lseek(SEEK_HOLE)`: where the first hole at or after `offset` starts (the file's end if
/// none does).
fn next_hole(file: &File, offset: u64) -> std::io::Result<u64> {
    // SAFETY: lseek on a descriptor `file` owns; it touches no memory.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_HOLE) };
    if at < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(at as u64)
}

/// The ranges `[start, end)` of `file` (of `size` bytes) that hold data rather than holes,
/// from `SEEK_DATA`/`SEEK_HOLE`.
fn data_ranges(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        // SAFETY: lseek on a descriptor `file` owns; it touches no memory.
        let data = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // No data from `offset` to the end.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        let start = data as u64;
        if start >= size {
            break;
        }
        let end = next_hole(file, start)?.min(size);
        ranges.push((start, end));
        offset = end;
    }
    Ok(ranges)
}

/// Copy the data ranges of `from` (of `size` bytes) to the same offsets of `to`.
fn copy_data(from: &File, to: &File, size: u64, buf: &mut [u8]) -> std::io::Result<()> {
    for (start, end) in data_ranges(from, size)? {
        let mut at = start;
        while at < end {
            let len = (end - at).min(buf.len() as u64) as usize;
            from.read_exact_at(&mut buf[..len], at)?;
            // All of it: zero pages of a diff overwrite the base's.
            to.write_all_at(&buf[..len], at)?;
            at += len as u64;
        }
    }
    Ok(())
}

/// Write to `out` (created or replaced, mode 0600) the snapshot memory file `base` with the
/// pages of the diff memory file `diff` written over it: the memory of the snapshot `diff`
/// belongs to. Both must be `size` bytes long. `out` may be `base` itself: the result is
/// written to a new file renamed over it, so VMs mapping the old file keep it.
pub fn merge(base: &Path, diff: &Path, out: &Path, size: u64) -> Result<()> {
    let open = |path: &Path| -> Result<File> {
        let read_err = |source| Error::ReadFile {
            what: "the snapshot memory file",
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        if len != size {
            return Err(Error::SnapshotMemorySize {
                path: path.to_path_buf(),
                size: len,
                expected: size,
            });
        }
        Ok(file)
    };
    let (base_file, diff_file) = (open(base)?, open(diff)?);
    crate::snapshot::write_atomically(out, "snapshot memory", |file| {
        let mut buf = vec![0u8; CHUNK];
        copy_data(&base_file, file, size, &mut buf)?;
        copy_data(&diff_file, file, size, &mut buf)?;
        file.set_len(size)
    })
}

/// Guest RAM of `mem_size` bytes holding the snapshot memory file `path` (as [`save`] wrote
/// it). With ordinary pages it is mapped copy-on-write: pages load lazily and guest writes
/// never reach the file. With huge pages (which cannot map an ordinary file) it is allocated
/// as [`create`] does and the file's data is read into it. Either way the file is never
/// modified, and no page counts as dirty yet.
pub fn restore(path: &Path, mem_size: u64, huge: HugePages) -> Result<GuestMemoryMmap> {
    let map_err = |reason: String| Error::SnapshotMemoryMap {
        path: path.to_path_buf(),
        reason,
    };
    let read_err = |source| Error::ReadFile {
        what: "the snapshot memory file",
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size != mem_size {
        return Err(Error::SnapshotMemorySize {
            path: path.to_path_buf(),
            size,
            expected: mem_size,
        });
    }
    if huge == HugePages::Size2M {
        let mem = create(mem_size, huge)?;
        read_into(&file, &mem).map_err(read_err)?;
        for region in mem.iter() {
            (**region).bitmap().reset();
        }
        return Ok(mem);
    }
    let ranges = arch::memory::ram_regions(mem_size).map_err(|e| map_err(e.to_string()))?;
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for (addr, len) in ranges {
        let file = file.try_clone().map_err(|e| map_err(e.to_string()))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap(len))
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        if huge == HugePages::Transparent {
            advise_huge_pages(&mapping).map_err(|_| Error::NoTransparentHugePages)?;
        }
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or_else(|| map_err(format!("region at {:#x} overflows", addr.0)))?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

/// Read the data of the snapshot memory file `file` into `mem` (its holes stay zero).
fn read_into(file: &File, mem: &GuestMemoryMmap) -> std::io::Result<()> {
    let size = mem.iter().map(|r| r.len()).sum();
    let mut reader = file.try_clone()?;
    for (start, end) in data_ranges(file, size)? {
        let mut file_offset = 0u64;
        for region in mem.iter() {
            let (from, to) = (start.max(file_offset), end.min(file_offset + region.len()));
            if from < to {
                let mut slice = region
                    .get_slice(
                        MemoryRegionAddress(from - file_offset),
                        (to - from) as usize,
                    )
                    .map_err(std::io::Error::other)?;
                std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(from))?;
                reader
                    .read_exact_volatile(&mut slice)
                    .map_err(std::io::Error::other)?;
            }
            file_offset += region.len();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_memory_is_split_around_the_mmio_hole() {
        let mem = create(4 << 30, HugePages::None).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].0, 0);
        assert_eq!(regions[0].0 + regions[0].1, arch::layout::MMIO_GAP_START);
        assert_eq!(regions[1].0, arch::layout::MMIO_GAP_END);
        assert_eq!(regions[0].1 + regions[1].1, 4 << 30);
    }

    #[test]
    fn small_memory_is_one_region() {
        let mem = create(128 << 20, HugePages::None).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr().0, (128 << 20) - 1);
    }

    fn temp_file(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("flint-mem-{name}-{}", std::process::id()))
    }

    #[test]
    fn sparse_memory_file_round_trip() {
        let size = 128u64 << 20;
        let mem = create(size, HugePages::None).unwrap();
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

        let restored = restore(&path, size, HugePages::None).unwrap();
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
        let msg = restore(&path, 128 << 20, HugePages::None)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            msg,
            format!(
                "the snapshot memory file {} holds 4096 bytes but the snapshot's VM has {} bytes of memory",
                path.display(),
                128u64 << 20
            )
        );
        std::fs::remove_file(&path).unwrap();
        let msg = restore(&path, 128 << 20, HugePages::None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.starts_with("cannot read the snapshot memory file"),
            "{msg}"
        );
    }

    #[test]
    fn dirty_pages_form_runs_widened_to_whole_blocks() {
        let mem = create(128 << 20, HugePages::None).unwrap();
        let pages = (128 << 20) / PAGE as u64;
        let mut dirty = DirtyPages::new(&mem);
        assert_eq!(dirty.count(), 0);
        assert!(dirty.runs(0, 1, pages).is_empty());
        // Pages 1, 2, 3, 63, 64, 200 and the last one.
        let mut bits = vec![0u64; (pages / 64) as usize];
        bits[0] = 0b1110 | 1 << 63;
        bits[1] = 1;
        bits[3] = 1 << 8;
        *bits.last_mut().unwrap() = 1 << 63;
        dirty.add(0, &bits);
        // Adding the same pages again (KVM and vm-memory both saw them) changes nothing.
        dirty.add(0, &bits[..2]);
        assert_eq!(dirty.count(), 7);
        assert_eq!(
            dirty.runs(0, 1, pages),
            [(1, 3), (63, 2), (200, 1), (pages - 1, 1)]
        );
        // Blocks of 4 pages: 0-3, 60-67, 200-203, and the last block.
        assert_eq!(
            dirty.runs(0, 4, pages),
            [(0, 4), (60, 8), (200, 4), (pages - 4, 4)]
        );
        // A block larger than the region ends with it.
        assert_eq!(dirty.runs(0, 2 * pages, pages), [(0, pages)]);
        // Regions the memory does not have have no runs; clearing forgets everything.
        assert!(dirty.runs(1, 1, pages).is_empty());
        dirty.clear();
        assert_eq!(dirty.count(), 0);
        assert!(dirty.runs(0, 1, pages).is_empty());
    }

    #[test]
    fn the_vmm_s_own_writes_are_tracked_until_collected() {
        let mem = create(4 << 30, HugePages::None).unwrap();
        let mut dirty = DirtyPages::new(&mem);
        dirty.collect_vmm_writes(&mem);
        assert_eq!(dirty.count(), 0, "fresh memory has no dirty page");
        // Straddling two pages of the low region; one in the high region.
        mem.write_slice(&[1; 8], GuestAddress(0x1ffc)).unwrap();
        mem.write_obj(7u64, GuestAddress(arch::layout::MMIO_GAP_END + 0x3000))
            .unwrap();
        // Reads mark nothing.
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        dirty.collect_vmm_writes(&mem);
        assert_eq!(dirty.count(), 3);
        let low = mem.iter().next().unwrap().len() / PAGE as u64;
        assert_eq!(dirty.runs(0, 1, low), [(1, 2)]);
        assert_eq!(dirty.runs(1, 1, u64::MAX), [(3, 1)]);
        // Collecting cleared vm-memory's bits; what was collected stays until cleared.
        dirty.collect_vmm_writes(&mem);
        assert_eq!(dirty.count(), 3);
        dirty.clear();
        dirty.collect_vmm_writes(&mem);
        assert_eq!(dirty.count(), 0);
    }

    /// The ranges of `path` that hold data.
    fn data_of(path: &Path) -> Vec<(u64, u64)> {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        data_ranges(&file, len).unwrap()
    }

    #[test]
    fn a_diff_holds_the_changed_pages_and_merges_over_its_base() {
        let size = 128u64 << 20;
        let mem = create(size, HugePages::None).unwrap();
        mem.write_slice(&[0xaa; 3 * PAGE], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(b"kept", GuestAddress(0x20_0000)).unwrap();
        let (base, diff, merged) = (temp_file("base"), temp_file("diff"), temp_file("merged"));
        save(&mem, &base).unwrap();
        let mut dirty = DirtyPages::new(&mem);
        dirty.collect_vmm_writes(&mem);
        dirty.clear();

        // Changed since the base: one page rewritten, one zeroed, one new far away.
        mem.write_slice(b"changed", GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&[0; PAGE], GuestAddress(0x10_2000))
            .unwrap();
        mem.write_slice(b"new", GuestAddress(0x600_0000)).unwrap();
        dirty.collect_vmm_writes(&mem);
        save_diff(&mem, &diff, &dirty).unwrap();
        let meta = std::fs::metadata(&diff).unwrap();
        assert_eq!(meta.len(), size);
        // Only the three pages are data (in blocks of the filesystem's size).
        let block = (meta.blksize()).max(PAGE as u64);
        let ranges = data_of(&diff);
        assert!(!ranges.is_empty() && ranges.len() <= 3, "{ranges:?}");
        for page in [0x10_0000u64, 0x10_2000, 0x600_0000] {
            assert!(
                ranges
                    .iter()
                    .any(|(s, e)| *s <= page && page + PAGE as u64 <= *e),
                "page {page:#x} missing from {ranges:?}"
            );
        }
        let data: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        assert!(data <= 3 * block, "{data} bytes of data in {ranges:?}");
        assert!(meta.blocks() * 512 <= 3 * block, "{} blocks", meta.blocks());

        merge(&base, &diff, &merged, size).unwrap();
        let restored = restore(&merged, size, HugePages::None).unwrap();
        let read = |addr: u64, len: usize| {
            let mut buf = vec![0u8; len];
            restored.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        };
        assert_eq!(&read(0x10_0000, 7), b"changed");
        assert_eq!(read(0x10_0007, 8), [0xaa; 8], "the rest of a changed page");
        assert_eq!(read(0x10_1000, PAGE), [0xaa; PAGE], "an unchanged page");
        assert_eq!(
            read(0x10_2000, PAGE),
            [0; PAGE],
            "a page zeroed since the base"
        );
        assert_eq!(&read(0x20_0000, 4), b"kept");
        assert_eq!(&read(0x600_0000, 3), b"new");
        // The merge kept the base's holes.
        let merged_meta = std::fs::metadata(&merged).unwrap();
        assert!(merged_meta.blocks() * 512 <= 1 << 20);
        // The merged file may replace the base itself.
        merge(&base, &diff, &base, size).unwrap();
        assert!(std::fs::read(&base).unwrap() == std::fs::read(&merged).unwrap());

        let short = temp_file("short");
        std::fs::write(&short, [0u8; PAGE]).unwrap();
        let msg = merge(&base, &short, &merged, size).unwrap_err().to_string();
        assert!(msg.contains("holds 4096 bytes"), "{msg}");
        for p in [base, diff, merged, short] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn huge_pages_are_reserved_up_front_or_refused_in_one_sentence() {
        let size = 64u64 << 20;
        let needed = size / HUGE_PAGE;
        match (available_huge_pages(), create(size, HugePages::Size2M)) {
            (None, Err(e)) => assert_eq!(
                e.to_string(),
                "this host has no pool of 2 MiB huge pages \
                 (/sys/kernel/mm/hugepages/hugepages-2048kB), so huge_pages \"2M\" cannot be used"
            ),
            (Some(available), Err(e)) => {
                assert!(available < needed, "{available} free, yet: {e}");
                assert_eq!(
                    e.to_string(),
                    format!(
                        "cannot back 64 MiB of guest memory with 2 MiB huge pages: it needs \
                         32 of them and the host has {available} free (raise vm.nr_hugepages, \
                         /proc/sys/vm/nr_hugepages)"
                    )
                );
            }
            (Some(available), Ok(mem)) => {
                assert!(available >= needed);
                // Reserved as mapped: the pool has that many fewer to promise.
                let now = available_huge_pages().unwrap();
                assert!(now + needed <= available, "{available} -> {now}");
                assert!(mem.iter().all(|r| r.is_hugetlbfs() == Some(true)));
            }
            (None, Ok(_)) => panic!("huge pages mapped without a pool"),
        }
    }

    /// The `VmFlags` of the mapping starting at `addr` in this process's smaps.
    fn vm_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        assert!(lines.next().is_some(), "no mapping at {addr:#x}");
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap()
            .to_string()
    }

    #[test]
    fn transparent_huge_pages_are_asked_for_on_created_and_restored_memory() {
        let size = 64u64 << 20;
        let mem = create(size, HugePages::Transparent).unwrap();
        let flags = |mem: &GuestMemoryMmap| -> Vec<String> {
            mem.iter().map(|r| vm_flags(r.as_ptr() as u64)).collect()
        };
        assert!(
            flags(&mem).iter().all(|f| f.contains(" hg")),
            "{:?}",
            flags(&mem)
        );
        let plain = create(size, HugePages::None).unwrap();
        assert!(
            flags(&plain).iter().all(|f| !f.contains(" hg")),
            "{:?}",
            flags(&plain)
        );

        let path = std::env::temp_dir().join(format!("flint-thp-{}", std::process::id()));
        save(&mem, &path).unwrap();
        let restored = restore(&path, size, HugePages::Transparent).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(
            flags(&restored).iter().all(|f| f.contains(" hg")),
            "{:?}",
            flags(&restored)
        );
    }
}
