//! Fuzz the virtio-rng request path: the input becomes guest memory holding a split queue, and
//! a real entropy device serves whatever chains it finds there. It must never panic, hang or
//! write outside guest memory, and hand out at most its per-request cap.
//!
//! Input: one flags byte (bit 0: EVENT_IDX, bit 1: fold descriptor addresses into guest
//! memory), then the guest memory image: descriptor table at 0 (16 entries), available ring at
//! 0x100, used ring at 0x200, anything else after that.

#![no_main]

use std::sync::Arc;

use devices::virtio::rng::{Rng, MAX_BYTES_PER_REQUEST};
use devices::virtio::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
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

fuzz_target!(|data: &[u8]| {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = image.len().min(MEM_SIZE);
    mem.write_slice(&image[..n], GuestAddress(0)).unwrap();
    if flags & 2 != 0 {
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

    let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )));
    let mut rng = Rng::new();
    rng.activate(mem.clone(), VIRTIO_F_VERSION_1, vec![queue], interrupt)
        .unwrap();
    let metrics = rng.metrics();
    // A first pass, then as many more as the device asks for (each bounded), and one more
    // kick as a guest might send.
    rng.process_queue(0);
    for _ in 0..4 {
        if rng.take_unfinished() == 0 {
            break;
        }
        rng.process_queue(0);
    }
    rng.process_queue(0);
    let requests = metrics.requests.load(std::sync::atomic::Ordering::Relaxed);
    let bytes = metrics.bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(bytes <= requests * MAX_BYTES_PER_REQUEST as u64);
    rng.reset();
});
