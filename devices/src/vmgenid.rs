//! The VM generation ID: 16 bytes in guest memory that change whenever the VM may have been
//! duplicated (every snapshot restore), and the interrupt that tells the guest they did.
//!
//! The guest finds the ID through ACPI (`arch::acpi`: a "VM_GEN_COUNTER" device whose `ADDR`
//! is the ID's address, and a Generic Event Device whose interrupt notifies it). Linux's
//! vmgenid driver then reads the new ID, mixes it into its entropy pool and reseeds its random
//! number generator at once, so restored clones stop sharing random state without any help
//! from inside the guest.
//!
//! The guest only reads: the device has no registers and takes no input from it.

use arch::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::IrqLine;

/// Size of the generation ID.
pub const VMGENID_SIZE: usize = 16;

/// Errors of the generation ID device.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("cannot get random bytes for the VM generation ID: {0}")]
    Random(std::io::Error),
    #[error("cannot write the VM generation ID to guest memory at {0:#x}")]
    GuestWrite(u64),
    #[error("cannot raise the VM generation ID interrupt: {0}")]
    Interrupt(std::io::Error),
}

/// The generation ID at a fixed guest address, and the interrupt (the Generic Event Device's)
/// that announces a new one.
#[derive(Debug)]
pub struct VmGenId {
    addr: GuestAddress,
    irq: IrqLine,
}

impl VmGenId {
    /// The ID lives at `addr`; `irq` is the Generic Event Device's interrupt.
    pub fn new(addr: GuestAddress, irq: IrqLine) -> Self {
        VmGenId { addr, irq }
    }

    /// Where the ID is in guest memory.
    pub fn addr(&self) -> GuestAddress {
        self.addr
    }

    /// Write a new random ID into `mem` without telling the guest: for a VM that has not run
    /// yet. Returns the ID.
    pub fn write_new(&self, mem: &GuestMemoryMmap) -> Result<[u8; VMGENID_SIZE], VmGenIdError> {
        let mut id = [0u8; VMGENID_SIZE];
        crate::virtio::rng::fill_random(&mut id).map_err(VmGenIdError::Random)?;
        mem.write_slice(&id, self.addr)
            .map_err(|_| VmGenIdError::GuestWrite(self.addr.0))?;
        Ok(id)
    }

    /// Write a new random ID into `mem` and raise the interrupt, so that the guest reseeds: for
    /// a VM restored from a snapshot, before it runs again. Returns the ID.
    pub fn renew(&self, mem: &GuestMemoryMmap) -> Result<[u8; VMGENID_SIZE], VmGenIdError> {
        let id = self.write_new(mem)?;
        self.irq.trigger().map_err(VmGenIdError::Interrupt)?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    const ADDR: u64 = 0xf_0000;

    fn setup() -> (GuestMemoryMmap, VmGenId) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (mem, VmGenId::new(GuestAddress(ADDR), IrqLine::new(evt)))
    }

    fn read_id(mem: &GuestMemoryMmap) -> [u8; VMGENID_SIZE] {
        let mut id = [0u8; VMGENID_SIZE];
        mem.read_slice(&mut id, GuestAddress(ADDR)).unwrap();
        id
    }

    #[test]
    fn each_restore_gets_a_new_id_and_an_interrupt() {
        let (mem, genid) = setup();
        let first = genid.write_new(&mem).unwrap();
        assert_eq!(read_id(&mem), first);
        assert_ne!(first, [0; VMGENID_SIZE]);
        // Booting does not interrupt the guest.
        assert!(genid.irq.eventfd().read().is_err());
        let second = genid.renew(&mem).unwrap();
        let third = genid.renew(&mem).unwrap();
        assert_eq!(read_id(&mem), third);
        assert_ne!(first, second);
        assert_ne!(second, third);
        // Two restores, two interrupts.
        assert_eq!(genid.irq.eventfd().read().unwrap(), 2);
        // Only the 16 bytes of the ID are written.
        let mut around = [0u8; 32];
        mem.read_slice(&mut around[..16], GuestAddress(ADDR - 16))
            .unwrap();
        mem.read_slice(&mut around[16..], GuestAddress(ADDR + 16))
            .unwrap();
        assert_eq!(around, [0; 32]);
    }

    #[test]
    fn an_id_outside_guest_memory_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let genid = VmGenId::new(GuestAddress(ADDR), IrqLine::new(evt));
        assert!(matches!(
            genid.renew(&mem),
            Err(VmGenIdError::GuestWrite(ADDR))
        ));
        // No interrupt for an ID the guest cannot read.
        assert!(genid.irq.eventfd().read().is_err());
    }
}
