//! Fuzz the virtio-net transmit path up to the TAP: the input becomes guest memory holding a
//! split queue, chains are taken as the device takes them (`chain::pop_chain`) and checked by
//! `parse_tx_chain`, whose segments the device hands to `writev`. Accepted frames must lie in
//! guest memory and be of a sane size. (Writing them needs a TAP, which a fuzzer does not have.)
//!
//! Input: one flags byte (bit 1: fold descriptor addresses into guest memory), then the guest
//! memory image: descriptor table at 0 (16 entries), available ring at 0x100, used ring at
//! 0x200, anything else after that.

#![no_main]

use devices::virtio::net::tap::VNET_HDR_LEN;
use devices::virtio::net::{parse_tx_chain, MAX_FRAME_LEN, MIN_FRAME_LEN};
use devices::virtio::MAX_CHAINS_PER_PASS;
use flint_fuzz::{queue_image, take_chains};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryBackend;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let (mem, mut queue) = queue_image(image, flags & 2 != 0);

    take_chains(&mut queue, &mem, MAX_CHAINS_PER_PASS, |queue, chain| {
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
    });
});
