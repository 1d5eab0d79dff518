//! Guest RAM: allocated with `vm-memory` around the MMIO hole and registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Result};

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
}
