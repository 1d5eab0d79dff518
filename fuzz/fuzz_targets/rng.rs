//! Fuzz the virtio-rng request path: the input becomes guest memory holding a split queue, and
//! a real entropy device serves whatever chains it finds there. It must never panic, hang or
//! write outside guest memory, and hand out at most its per-request cap.
//!
//! Input: one flags byte (bit 0: EVENT_IDX, bit 1: fold descriptor addresses into guest
//! memory), then the guest memory image: descriptor table at 0 (16 entries), available ring at
//! 0x100, used ring at 0x200, anything else after that.

#![no_main]

use devices::virtio::rng::{Rng, MAX_BYTES_PER_REQUEST};
use devices::virtio::{feature, VirtioDevice, VIRTIO_F_VERSION_1};
use flint_fuzz::{interrupt, queue_image};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let (mem, mut queue) = queue_image(image, flags & 2 != 0);
    queue.set_event_idx(flags & 1 != 0);

    let mut rng = Rng::new();
    rng.activate(
        mem.clone(),
        feature(VIRTIO_F_VERSION_1),
        vec![queue],
        interrupt(),
    )
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
