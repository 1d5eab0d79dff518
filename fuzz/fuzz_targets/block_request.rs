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
use flint_fuzz::{image_queue, interrupt, queue_image, scratch_dir};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

const DISK_SECTORS: u64 = 64;

struct Fixture {
    block: Block,
    interrupt: Arc<VirtioInterrupt>,
}

fn fixture() -> &'static Mutex<Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = scratch_dir().join(format!("flint-fuzz-disk-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; (DISK_SECTORS * 512) as usize]).unwrap();
        let block = Block::new(&path, false, "fuzz").unwrap();
        // The open file keeps the disk alive; the name is not needed any more.
        let _ = std::fs::remove_file(&path);
        Mutex::new(Fixture {
            block,
            interrupt: interrupt(),
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    // Folded descriptor addresses get more chains past the address checks and to the disk.
    let (mem, mut queue) = queue_image(image, flags & 2 != 0);
    queue.set_event_idx(flags & 1 != 0);

    // The pure parser on its own, over every chain the available ring names.
    let mut probe = image_queue();
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
