//! What the fuzz targets share: guest memory images holding a split virtqueue, the queue and
//! interrupt a device is activated with, taking chains as devices do, the port-access input of
//! the legacy-device targets, and a scratch directory. Each target's own header says how it
//! reads its input; the helpers here only keep the common byte layouts in one place.

use std::path::PathBuf;
use std::sync::Arc;

use arch::GuestMemoryMmap;
use devices::bus::Bus;
use devices::virtio::chain::{pop_chain, DescChain};
use devices::virtio::VirtioInterrupt;
use devices::IrqLine;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory of a queue image, in bytes (longer images are cut).
pub const MEM_SIZE: usize = 0x10000;
/// Entries of an image's queue (its maximum size).
pub const QUEUE_SIZE: u16 = 16;
/// Where an image's descriptor table starts (16 bytes an entry).
pub const DESC_TABLE: u64 = 0;
/// Where an image's available ring starts.
pub const AVAIL_RING: u64 = 0x100;
/// Where an image's used ring starts (its index at `USED_RING + 2`).
pub const USED_RING: u64 = 0x200;

/// Guest memory of `size` bytes at address 0, starting with `image` (cut to fit), zero after.
pub fn guest_memory(image: &[u8], size: usize) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    let n = image.len().min(size);
    mem.write_slice(&image[..n], GuestAddress(0)).unwrap();
    mem
}

/// Fold the addresses of the first `entries` descriptors at [`DESC_TABLE`] into guest memory
/// (each modulo the memory size), so that more chains get past the address checks.
pub fn fold_descriptor_addresses(mem: &GuestMemoryMmap, entries: u16) {
    let size = mem.last_addr().raw_value() + 1;
    for i in 0..u64::from(entries) {
        let at = GuestAddress(DESC_TABLE + 16 * i);
        let addr: u64 = mem.read_obj(at).unwrap();
        mem.write_obj(addr % size, at).unwrap();
    }
}

/// A ready split queue of `size` entries with its descriptor table, available ring and used
/// ring at the given guest addresses (no EVENT_IDX, indexes at 0).
pub fn split_queue(size: u16, desc_table: u64, avail_ring: u64, used_ring: u64) -> Queue {
    let mut queue = Queue::new(size).unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(desc_table))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(avail_ring))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(used_ring))
        .unwrap();
    queue.set_ready(true);
    queue
}

/// The ready queue of an image: [`QUEUE_SIZE`] entries at [`DESC_TABLE`], [`AVAIL_RING`] and
/// [`USED_RING`].
pub fn image_queue() -> Queue {
    split_queue(QUEUE_SIZE, DESC_TABLE, AVAIL_RING, USED_RING)
}

/// The usual queue image: [`MEM_SIZE`] bytes of guest memory holding `image` (descriptor
/// addresses folded into it if `fold`), and its ready queue ([`image_queue`]).
pub fn queue_image(image: &[u8], fold: bool) -> (GuestMemoryMmap, Queue) {
    let mem = guest_memory(image, MEM_SIZE);
    if fold {
        fold_descriptor_addresses(&mem, QUEUE_SIZE);
    }
    (mem, image_queue())
}

/// A device interrupt on a fresh non-blocking eventfd (nothing waits on it).
pub fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(IrqLine::new(
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )))
}

/// Take at most `max` chains from `queue` as the devices do ([`pop_chain`]), handing each to
/// `f` with the queue (to return it to the used ring, say); stops at the first `None`.
pub fn take_chains<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
    max: usize,
    mut f: impl FnMut(&mut Queue, DescChain<'a>),
) {
    for _ in 0..max {
        let Some(chain) = pop_chain(queue, mem) else {
            break;
        };
        f(queue, chain);
    }
}

/// A directory for scratch files: `/dev/shm` where there is one, else the temporary directory.
pub fn scratch_dir() -> PathBuf {
    if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

/// One port access of the legacy-device targets, decoded from its control byte.
#[derive(Debug, Clone, Copy)]
pub struct PortOp {
    /// Bits 0-3: the port, as an offset from the target's base.
    pub offset: u8,
    /// Bits 4-5: the access size, 1, 2, 4 or 8 bytes.
    pub size: usize,
    /// Bits 6-7: what to do (0 is a read and 1 a write in every target; the rest are theirs).
    pub kind: u8,
}

/// The input of the legacy-device targets: control bytes ([`PortOp`]), each followed by its
/// operands.
pub struct PortOps<'a>(pub &'a [u8]);

impl<'a> PortOps<'a> {
    /// The next operation, or `None` at the end of the input.
    pub fn next_op(&mut self) -> Option<PortOp> {
        let (&op, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(PortOp {
            offset: op & 0x0f,
            size: 1usize << ((op >> 4) & 3),
            kind: op >> 6,
        })
    }

    /// The next `n` operand bytes, fewer (down to none) where the input ends.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

/// A guest read of `size` bytes (at most 8) at `port` on `bus`, into a buffer that does not
/// start out zero.
pub fn port_read(bus: &Bus, port: u64, size: usize) {
    let mut buf = [0xa5u8; 8];
    bus.read(port, &mut buf[..size]);
}
