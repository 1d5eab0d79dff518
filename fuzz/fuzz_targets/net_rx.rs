//! Fuzz virtio-net receive: the input becomes guest memory holding the receive queue, and
//! frames of the lengths the input names are delivered as the device delivers frames it reads
//! from the TAP (receive-buffer stash, mergeable buffers, `num_buffers`, used-ring updates).
//! Nothing may panic or write outside guest memory, the stash never exceeds the queue, and a
//! delivered frame's buffers all appear in the used ring at once.
//!
//! Input: one flags byte (bit 0: mergeable receive buffers, bit 1: fold descriptor addresses
//! into guest memory), four little-endian u32 frame lengths (taken modulo the largest frame),
//! then the guest memory image: descriptor table at 0 (16 entries), available ring at 0x100,
//! used ring at 0x200, anything else after that.

#![no_main]

use devices::virtio::net::fuzzing::{Outcome, Receiver};
use devices::virtio::net::tap::VNET_HDR_LEN;
use devices::virtio::net::MAX_FRAME_LEN;
use flint_fuzz::{interrupt, queue_image, QUEUE_SIZE, USED_RING};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let flags = data[0];
    let lens: Vec<usize> = data[1..17]
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize % (MAX_FRAME_LEN + 1))
        .collect();
    let image = &data[17..];
    let (mem, queue) = queue_image(image, flags & 2 != 0);

    let mut rx = Receiver::new(mem.clone(), queue, flags & 1 != 0, interrupt());
    for len in lens {
        let mut frame = vec![0xa5u8; VNET_HDR_LEN + len];
        let before = rx.queue().next_used();
        let outcome = rx.deliver(&mut frame);
        assert!(rx.stashed() <= usize::from(QUEUE_SIZE));
        let added = rx.queue().next_used().wrapping_sub(before);
        if outcome == Outcome::Delivered {
            let buffers = u16::from_le_bytes([frame[10], frame[11]]);
            assert!(buffers >= 1);
            // All of the frame's buffers are published (after any unusable chains the stash
            // returned on the way).
            assert!(added >= buffers, "{added} of {buffers} buffers");
            let idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
            assert_eq!(idx, rx.queue().next_used());
        }
    }
});
