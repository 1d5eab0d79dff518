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
    add_used_together, pop_chain, segments, write_segments, Direction, VIRTQ_DESC_F_INDIRECT,
};
use devices::virtio::MAX_CHAINS_PER_PASS;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_SIZE: usize = 0x10000;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const LIMIT: u64 = 0x4000;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let size = 1u16 << (flags & 7).min(4);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = image.len().min(MEM_SIZE);
    mem.write_slice(&image[..n], GuestAddress(0)).unwrap();
    if flags & 8 != 0 {
        for i in 0..u64::from(size) {
            let at = GuestAddress(DESC_TABLE + 16 * i);
            let addr: u64 = mem.read_obj(at).unwrap();
            mem.write_obj(addr % MEM_SIZE as u64, at).unwrap();
        }
    }
    let mut queue = Queue::new(16).unwrap();
    queue.set_size(size);
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    queue.set_ready(true);
    let start: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
    queue.set_next_avail(start);
    queue.set_next_used(start);

    let payload: Vec<u8> = image.iter().rev().take(256).copied().collect();
    let mut used = Vec::new();
    // The writes below may move the available index: a device's budget ends the pass.
    for _ in 0..MAX_CHAINS_PER_PASS {
        let Some(chain) = pop_chain(&mut queue, &mem) else {
            break;
        };
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
    }
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
