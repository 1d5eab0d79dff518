//! Fuzz the virtio-mmio transport: a sequence of register reads and writes of any offset, width
//! and value (plus the event loop's queue processing and a snapshot/restore) against a real
//! transport in front of a real entropy device, over guest memory the input fills. Feature
//! negotiation, queue setup, DRIVER_OK, notifications and reset must never panic or hang.
//!
//! Input: a little-endian u16 image length, that many bytes of guest memory image (at 0), then
//! 8-byte operations: kind, offset (le16), width selector, value (le32). Kind % 4: 0 read,
//! 1 write, 2 the event loop processes queue `value % 2`, 3 snapshot and restore into a fresh
//! transport. Width selector % 4 picks 1, 2, 4 or 8 bytes.

#![no_main]

use arch::GuestMemoryMmap;
use devices::bus::BusDevice;
use devices::virtio::rng::Rng;
use devices::virtio::{mmio::MmioTransport, VIRTIO_CONFIG_S_DRIVER_OK};
use flint_fuzz::{guest_memory, interrupt, MEM_SIZE};
use libfuzzer_sys::fuzz_target;

/// Most operations run per input.
const MAX_OPS: usize = 4096;

fn transport(mem: &GuestMemoryMmap) -> MmioTransport {
    MmioTransport::new(Box::new(Rng::new()), mem.clone(), interrupt()).unwrap()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let image_len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let rest = &data[2..];
    let image_len = image_len.min(rest.len());
    let (image, ops) = rest.split_at(image_len);
    // At most 0xffff bytes: the image always fits.
    let mem = guest_memory(image, MEM_SIZE);
    let mut t = transport(&mem);
    for op in ops.chunks_exact(8).take(MAX_OPS) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let width = 1usize << (op[3] % 4);
        let value = u64::from(u32::from_le_bytes([op[4], op[5], op[6], op[7]]));
        match op[0] % 4 {
            0 => {
                let mut buf = [0u8; 8];
                t.read(offset, &mut buf[..width]);
            }
            1 => {
                let bytes = value.to_le_bytes();
                t.write(offset, &bytes[..width]);
            }
            2 => {
                // What the event loop does when a queue's eventfd fires.
                let index = (value % 2) as usize;
                let _ = t.queue_events()[0].read();
                t.process_queue(index);
            }
            _ => {
                let state = t.state();
                let mut fresh = transport(&mem);
                if fresh.restore(&state).is_ok() {
                    assert_eq!(fresh.state().activated, state.activated);
                    t = fresh;
                }
            }
        }
        if t.is_activated() {
            assert_ne!(t.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        }
    }
});
