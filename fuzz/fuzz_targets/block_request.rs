//! Fuzz the virtio-blk request path: the input becomes guest memory holding a split queue
//! (descriptor table, available ring, buffers), and the block device serves whatever chains it
//! finds there against a small scratch disk. It must never panic, hang or touch memory outside
//! the guest's.
//!
//! Input: one flags byte (bit 0: EVENT_IDX, bit 1: fold descriptor addresses into guest
//! memory), then the guest memory image: descriptor table at 0 (16 entries), available ring at
//! 0x100, used ring at 0x200, anything else after that.

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::block::{parse_request, Block};
use devices::virtio::chain::pop_chain;
use devices::virtio::{VirtioDevice, VirtioInterrupt};
use devices::IrqLine;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x10000;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const DISK_SECTORS: u64 = 64;

struct Fixture {
    block: Block,
    interrupt: Arc<VirtioInterrupt>,
}

fn fixture() -> &'static Mutex<Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("flint-fuzz-disk-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; (DISK_SECTORS * 512) as usize]).unwrap();
        let block = Block::new(&path, false, "fuzz").unwrap();
        // The open file keeps the disk alive; the name is not needed any more.
        let _ = std::fs::remove_file(&path);
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )));
        Mutex::new(Fixture { block, interrupt })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = image.len().min(MEM_SIZE);
    mem.write_slice(&image[..n], GuestAddress(0)).unwrap();
    if flags & 2 != 0 {
        // Fold descriptor addresses into guest memory so that more chains get past the
        // address checks and reach the disk.
        for i in 0..u64::from(QUEUE_SIZE) {
            let at = GuestAddress(DESC_TABLE + 16 * i);
            let addr: u64 = mem.read_obj(at).unwrap();
            mem.write_obj(addr % MEM_SIZE as u64, at).unwrap();
        }
    }

    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    queue.set_event_idx(flags & 1 != 0);
    queue.set_ready(true);

    // The pure parser on its own, over every chain the available ring names.
    let mut probe = Queue::new(QUEUE_SIZE).unwrap();
    probe
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    probe
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .unwrap();
    probe
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    probe.set_ready(true);
    while let Some(chain) = pop_chain(&mut probe, &mem) {
        let _ = parse_request(&mem, chain);
    }

    // The whole device: parse, execute against the disk, complete in the used ring.
    let mut fx = fixture().lock().unwrap_or_else(|e| e.into_inner());
    let interrupt = fx.interrupt.clone();
    let features = fx.block.avail_features();
    fx.block
        .activate(mem.clone(), features, vec![queue], interrupt)
        .unwrap();
    fx.block.process_queue(0);
    // Second kick: nothing new, or whatever the used-ring writes made look available.
    fx.block.process_queue(0);
    fx.block.reset();
    let _ = fx.interrupt.irq().eventfd().read();
});
