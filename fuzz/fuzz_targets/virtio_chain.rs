//! Fuzz the descriptor-chain path every device uses: the input becomes guest memory holding a
//! split queue, and `chain::pop_chain` takes chains from it while `chain::segments`,
//! `chain::write_segments` and `chain::add_used_together` work on them. Chains must stay inside
//! the table and guest memory, never follow an indirect descriptor, and a pass must end even
//! when the device's own writes move the available index.
//!
//! Input: one flags byte (bits 0-2: queue size 2^n, at most 16; bit 3: fold descriptor
//! addresses into guest memory), then the guest memory image: descriptor table at 0, available
//! ring at 0x100, used ring at 0x200 (its index is where the device starts), buffers after.

#![no_main]

use devices::virtio::chain::{
    add_used_together, segments, write_segments, Direction, VIRTQ_DESC_F_INDIRECT,
};
use devices::virtio::MAX_CHAINS_PER_PASS;
use flint_fuzz::{
    fold_descriptor_addresses, guest_memory, image_queue, take_chains, MEM_SIZE, USED_RING,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const LIMIT: u64 = 0x4000;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let size = 1u16 << (flags & 7).min(4);
    let mem = guest_memory(image, MEM_SIZE);
    if flags & 8 != 0 {
        fold_descriptor_addresses(&mem, size);
    }
    // A queue of at most 16 entries, set to `size`.
    let mut queue = image_queue();
    queue.set_size(size);
    let start: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
    queue.set_next_avail(start);
    queue.set_next_used(start);

    let payload: Vec<u8> = image.iter().rev().take(256).copied().collect();
    let mut used = Vec::new();
    // The writes below may move the available index: a device's budget ends the pass.
    take_chains(&mut queue, &mem, MAX_CHAINS_PER_PASS, |_, chain| {
        let head = chain.head_index();
        assert!(head < size);
        let mut count = 0;
        for d in chain.clone() {
            count += 1;
            assert!(count <= usize::from(size), "a chain longer than the table");
            assert_eq!(
                d.flags() & VIRTQ_DESC_F_INDIRECT,
                0,
                "an indirect descriptor"
            );
        }
        for direction in [Direction::DeviceReads, Direction::DeviceWrites] {
            if let Ok((segs, total)) = segments(&mem, chain.clone(), direction, LIMIT) {
                assert!(total <= LIMIT);
                assert_eq!(total, segs.iter().map(|s| u64::from(s.len)).sum::<u64>());
                for s in &segs {
                    assert!(s.len > 0 && mem.check_range(s.addr, s.len as usize));
                }
                if direction == Direction::DeviceWrites {
                    let _ = write_segments(&mem, &segs, &payload);
                }
            }
        }
        used.push((head, count as u32));
    });
    // Returned in groups smaller than the queue, as receive does with mergeable buffers.
    for group in used.chunks(usize::from(size).max(2) - 1) {
        let before = queue.next_used();
        if add_used_together(&mut queue, &mem, group).is_ok() {
            assert_eq!(queue.next_used(), before.wrapping_add(group.len() as u16));
        } else {
            assert_eq!(queue.next_used(), before);
        }
    }
});
