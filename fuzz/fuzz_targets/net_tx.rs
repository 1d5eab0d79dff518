//! Fuzz the virtio-net transmit path up to the TAP: the input becomes guest memory holding a
//! split queue, chains are taken as the device takes them (`chain::pop_chain`) and checked by
//! `parse_tx_chain`, whose segments the device hands to `writev`. Accepted frames must lie in
//! guest memory and be of a sane size. (Writing them needs a TAP, which a fuzzer does not have.)
//!
//! Input: one flags byte (bit 1: fold descriptor addresses into guest memory), then the guest
//! memory image: descriptor table at 0 (16 entries), available ring at 0x100, used ring at
//! 0x200, anything else after that.

#![no_main]

use devices::virtio::chain::pop_chain;
use devices::virtio::net::tap::VNET_HDR_LEN;
use devices::virtio::net::{parse_tx_chain, MAX_FRAME_LEN, MIN_FRAME_LEN};
use devices::virtio::MAX_CHAINS_PER_PASS;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
    queue.set_ready(true);

    for _ in 0..MAX_CHAINS_PER_PASS {
        let Some(chain) = pop_chain(&mut queue, &mem) else {
            break;
        };
        let head = chain.head_index();
        if let Ok(segs) = parse_tx_chain(&mem, chain) {
            let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
            assert!(total >= (VNET_HDR_LEN + MIN_FRAME_LEN) as u64);
            assert!(total <= (VNET_HDR_LEN + MAX_FRAME_LEN) as u64);
            for s in &segs {
                assert!(s.len > 0 && mem.check_range(s.addr, s.len as usize));
            }
        }
        // The device returns every transmit chain with length 0.
        queue.add_used(&mem, head, 0).unwrap();
    }
});
