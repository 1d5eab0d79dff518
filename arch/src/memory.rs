//! Guest RAM regions around the MMIO hole, and where the initrd goes.

use vm_memory::GuestAddress;

/// Guest RAM as every flint crate sees it: `vm-memory` regions that record, page by page, what
/// the VMM itself (devices, loaders) writes into them, so that a diff snapshot can include those
/// pages along with the ones KVM saw the guest dirty.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

use crate::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE, MMIO_GAP_END, MMIO_GAP_START};
use crate::Error;

/// Size of a guest page: memory sizes and the initrd address are aligned to it.
const PAGE_SIZE: u64 = 0x1000;

/// Convert a region size to `usize`, failing (rather than truncating) on hosts where it does not
/// fit.
fn region_len(len: u64, mem_size: u64) -> crate::Result<usize> {
    usize::try_from(len).map_err(|_| Error::MemorySize(mem_size))
}

/// The guest RAM regions for `mem_size` bytes of memory: one region below the MMIO hole, and,
/// when memory does not fit below it, a second one starting at 4 GiB.
/// Fails for sizes outside `MIN_MEM_SIZE..=MAX_MEM_SIZE` or not a multiple of 4 KiB.
///
/// With `mem_size <= MMIO_GAP_START` the result is `[(0, mem_size)]`; otherwise it is
/// `[(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]`, so the total is always
/// exactly `mem_size` and no region overlaps `MMIO_GAP_START..MMIO_GAP_END`.
pub fn ram_regions(mem_size: u64) -> crate::Result<Vec<(GuestAddress, usize)>> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem_size) || mem_size % PAGE_SIZE != 0 {
        return Err(Error::MemorySize(mem_size));
    }
    if mem_size <= MMIO_GAP_START {
        return Ok(vec![(GuestAddress(0), region_len(mem_size, mem_size)?)]);
    }
    Ok(vec![
        (GuestAddress(0), region_len(MMIO_GAP_START, mem_size)?),
        (
            GuestAddress(MMIO_GAP_END),
            region_len(mem_size - MMIO_GAP_START, mem_size)?,
        ),
    ])
}

/// Where to place an initrd of `initrd_size` bytes: page aligned, as high as possible in RAM
/// below both the MMIO hole and `max_addr` (the kernel's `initrd_addr_max`, inclusive), and above
/// `kernel_end`. Errors with `InitrdTooLarge` when it does not fit.
///
/// The result `addr` is the highest multiple of 4 KiB such that `[addr, addr + initrd_size)` lies
/// below `min(mem_size, MMIO_GAP_START)`, `addr + initrd_size - 1 <= max_addr`, and
/// `addr >= kernel_end`. The `limit` reported in the error is the exclusive upper bound the initrd
/// had to fit under.
pub fn initrd_load_addr(
    mem_size: u64,
    kernel_end: u64,
    initrd_size: u64,
    max_addr: u64,
) -> crate::Result<GuestAddress> {
    // Exclusive end of the window the initrd must lie in.
    let limit = mem_size.min(MMIO_GAP_START).min(max_addr.saturating_add(1));
    let too_large = Error::InitrdTooLarge {
        size: initrd_size,
        limit,
    };
    let highest_start = limit.checked_sub(initrd_size).ok_or(too_large)?;
    let addr = highest_start & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(Error::InitrdTooLarge {
            size: initrd_size,
            limit,
        });
    }
    Ok(GuestAddress(addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MMIO_GAP_SIZE;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn total(regions: &[(GuestAddress, usize)]) -> u64 {
        regions.iter().map(|&(_, len)| len as u64).sum()
    }

    #[test]
    fn ram_regions_64_mib() {
        let regions = ram_regions(64 * MIB).unwrap();
        assert_eq!(regions, vec![(GuestAddress(0), (64 * MIB) as usize)]);
    }

    #[test]
    fn ram_regions_exactly_up_to_the_hole() {
        let regions = ram_regions(3 * GIB).unwrap();
        assert_eq!(MMIO_GAP_START, 3 * GIB);
        assert_eq!(regions, vec![(GuestAddress(0), (3 * GIB) as usize)]);
    }

    #[test]
    fn ram_regions_one_page_past_the_hole() {
        let regions = ram_regions(3 * GIB + 0x1000).unwrap();
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), MMIO_GAP_START as usize),
                (GuestAddress(MMIO_GAP_END), 0x1000),
            ]
        );
    }

    #[test]
    fn ram_regions_4_gib() {
        let regions = ram_regions(4 * GIB).unwrap();
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), MMIO_GAP_START as usize),
                (GuestAddress(MMIO_GAP_END), GIB as usize),
            ]
        );
        assert_eq!(total(&regions), 4 * GIB);
    }

    #[test]
    fn ram_regions_8_gib() {
        let regions = ram_regions(8 * GIB).unwrap();
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), MMIO_GAP_START as usize),
                (GuestAddress(MMIO_GAP_END), (5 * GIB) as usize),
            ]
        );
        assert_eq!(total(&regions), 8 * GIB);
        // The high region ends MMIO_GAP_SIZE above the RAM size.
        assert_eq!(MMIO_GAP_END + 5 * GIB, 8 * GIB + MMIO_GAP_SIZE);
    }

    #[test]
    fn ram_regions_limits() {
        assert!(ram_regions(MIN_MEM_SIZE).is_ok());
        assert!(ram_regions(MAX_MEM_SIZE).is_ok());
        assert_eq!(total(&ram_regions(MAX_MEM_SIZE).unwrap()), MAX_MEM_SIZE);
    }

    #[test]
    fn ram_regions_rejects_bad_sizes() {
        for size in [
            0,
            0x1000,
            MIN_MEM_SIZE - 0x1000,
            MAX_MEM_SIZE + 0x1000,
            u64::MAX,
            64 * MIB + 1,
            64 * MIB + 0x800,
            4 * GIB - 1,
        ] {
            match ram_regions(size) {
                Err(Error::MemorySize(s)) => assert_eq!(s, size),
                other => panic!("size {size:#x}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn ram_regions_usable_as_guest_memory() {
        let regions = ram_regions(64 * MIB).unwrap();
        let mem: vm_memory::GuestMemoryMmap = vm_memory::GuestMemoryMmap::from_ranges(&regions)
            .expect("regions must be valid for vm-memory");
        assert_eq!(vm_memory::GuestMemoryBackend::num_regions(&mem), 1);
    }

    #[test]
    fn initrd_at_top_of_small_memory() {
        let addr = initrd_load_addr(64 * MIB, 2 * MIB, 0x1000, u64::MAX).unwrap();
        assert_eq!(addr, GuestAddress(64 * MIB - 0x1000));
        // Not a page multiple: rounded down so that the end still fits.
        let addr = initrd_load_addr(64 * MIB, 2 * MIB, 0x1234, u64::MAX).unwrap();
        assert_eq!(addr, GuestAddress(64 * MIB - 0x2000));
        assert!(addr.0 + 0x1234 <= 64 * MIB);
    }

    #[test]
    fn initrd_below_mmio_hole() {
        for mem in [3 * GIB, 4 * GIB, 8 * GIB] {
            let addr = initrd_load_addr(mem, 16 * MIB, 10 * MIB, u64::MAX).unwrap();
            assert_eq!(addr, GuestAddress(MMIO_GAP_START - 10 * MIB));
        }
    }

    #[test]
    fn initrd_respects_max_addr() {
        // Linux's default initrd_addr_max is 0x37ffffff (inclusive).
        let max = 0x37ff_ffff;
        let addr = initrd_load_addr(4 * GIB, 16 * MIB, 0x10_0000, max).unwrap();
        assert_eq!(addr, GuestAddress(0x3800_0000 - 0x10_0000));
        assert!(addr.0 + 0x10_0000 - 1 <= max);
        let addr = initrd_load_addr(4 * GIB, 16 * MIB, 0x10_0001, max).unwrap();
        assert_eq!(addr.0 % 0x1000, 0);
        assert!(addr.0 + 0x10_0001 - 1 <= max);
        assert_eq!(addr, GuestAddress(0x3800_0000 - 0x10_1000));
        // max_addr below the end of memory on a small guest too.
        let addr = initrd_load_addr(64 * MIB, 2 * MIB, 0x2000, 32 * MIB - 1).unwrap();
        assert_eq!(addr, GuestAddress(32 * MIB - 0x2000));
    }

    #[test]
    fn initrd_exactly_fills_space_above_kernel() {
        let addr = initrd_load_addr(64 * MIB, 4 * MIB, 60 * MIB, u64::MAX).unwrap();
        assert_eq!(addr, GuestAddress(4 * MIB));
    }

    #[test]
    fn initrd_too_large() {
        // Overlaps the kernel.
        match initrd_load_addr(64 * MIB, 4 * MIB, 60 * MIB + 1, u64::MAX) {
            Err(Error::InitrdTooLarge { size, limit }) => {
                assert_eq!(size, 60 * MIB + 1);
                assert_eq!(limit, 64 * MIB);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Bigger than all of memory.
        assert!(matches!(
            initrd_load_addr(64 * MIB, 0, 65 * MIB, u64::MAX),
            Err(Error::InitrdTooLarge { .. })
        ));
        // Bigger than low memory, even though the guest has more above 4 GiB.
        match initrd_load_addr(8 * GIB, 16 * MIB, 3 * GIB, u64::MAX) {
            Err(Error::InitrdTooLarge { limit, .. }) => assert_eq!(limit, MMIO_GAP_START),
            other => panic!("unexpected {other:?}"),
        }
        // max_addr too low.
        match initrd_load_addr(4 * GIB, 16 * MIB, 0x1000, 16 * MIB) {
            Err(Error::InitrdTooLarge { limit, .. }) => assert_eq!(limit, 16 * MIB + 1),
            other => panic!("unexpected {other:?}"),
        }
        // Huge size does not overflow.
        assert!(matches!(
            initrd_load_addr(4 * GIB, 0, u64::MAX, u64::MAX),
            Err(Error::InitrdTooLarge { .. })
        ));
    }
}
