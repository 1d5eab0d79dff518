//! Fuzz the virtio-vsock transmit packet parser: the input becomes guest memory holding a split
//! queue, and every chain the available ring names is read as a packet (header and payload from
//! device-readable descriptors) and its header checked as the device checks it. It must never
//! panic, hang, allocate more than the packet's bounded payload or read outside guest memory.
//!
//! Input: one flags byte (bit 0: fold descriptor addresses into guest memory), then the guest
//! memory image: descriptor table at 0 (16 entries), available ring at 0x100, used ring at
//! 0x200, packet bytes anywhere after that.

#![no_main]

use devices::virtio::vsock::packet::{
    check_guest_header, parse_connect_line, rst_for, Header, HDR_LEN, MAX_PAYLOAD, OP_RST,
};
use devices::virtio::vsock::parse_tx_chain;
use flint_fuzz::{fold_descriptor_addresses, guest_memory, image_queue, QUEUE_SIZE};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

/// Guest memory: smaller than the other queue images', so that packets land in it more often.
const MEM_SIZE: usize = 0x4000;
const GUEST_CID: u64 = 3;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    // The host side's line parser sees arbitrary bytes too.
    let line = image.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let _ = parse_connect_line(&line[..line.len().min(80)]);

    let mem = guest_memory(image, MEM_SIZE);
    if flags & 1 != 0 {
        fold_descriptor_addresses(&mem, QUEUE_SIZE);
    }
    let mut queue = image_queue();

    // At most one ring's worth: the available index may claim anything.
    for _ in 0..QUEUE_SIZE {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let Ok((hdr, payload)) = parse_tx_chain(&mem, chain) else {
            continue;
        };
        assert!(hdr.len <= MAX_PAYLOAD);
        assert_eq!(
            payload.len(),
            hdr.len as usize,
            "payload as long as the header says"
        );
        assert_eq!(Header::from_bytes(&hdr.to_bytes()), hdr);
        match check_guest_header(&hdr, GUEST_CID) {
            Ok(_) => assert_eq!(hdr.src_cid, GUEST_CID),
            Err(e) => {
                if e.wants_rst(&hdr) {
                    let rst = rst_for(&hdr, GUEST_CID);
                    assert_eq!((rst.op, rst.dst_cid, rst.len), (OP_RST, GUEST_CID, 0));
                    assert_eq!(rst.to_bytes().len(), HDR_LEN);
                }
            }
        }
    }
});
