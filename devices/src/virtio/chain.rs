//! Descriptor chains for all devices: taking them from a queue's available ring and walking
//! them ([`pop_chain`], [`DescChain`]), checked views of their data segments, copying into them,
//! and returning several chains to the guest at once.
//!
//! Devices take chains through [`pop_chain`] rather than virtio-queue's own iterators: it checks
//! the driver's available index without the library's unlimited error log, skips heads outside
//! the descriptor table, and refuses indirect descriptors (no flint device offers
//! `VIRTIO_F_INDIRECT_DESC`).

use std::sync::atomic::Ordering;

use arch::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// `VRING_DESC_F_INDIRECT` in the u16 a descriptor carries: the descriptor points at a table
/// of descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// Bytes per descriptor in the descriptor table.
const DESC_SIZE: u64 = 16;

/// A descriptor chain the driver made available, walked directly in the descriptor table.
///
/// It yields at most one descriptor per table entry (so a loop ends) and stops early, leaving
/// the last descriptor it yielded with `VIRTQ_DESC_F_NEXT` set (or yielding nothing), when the
/// chain links outside the table, a descriptor cannot be read, or a descriptor is indirect.
/// Consumers treat such a chain as broken ([`segments`] returns [`ChainError::BrokenChain`]).
#[derive(Debug, Clone)]
pub struct DescChain<'a> {
    mem: &'a GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
    next: u16,
    /// Descriptors it may still yield; 0 once the chain ended.
    ttl: u16,
}

impl<'a> DescChain<'a> {
    /// The chain starting at descriptor `head` of the `size`-entry table at `table`.
    pub fn new(mem: &'a GuestMemoryMmap, table: GuestAddress, size: u16, head: u16) -> Self {
        DescChain {
            mem,
            table,
            size,
            head,
            next: head,
            ttl: size,
        }
    }

    /// The index of the chain's first descriptor, which identifies it in the used ring.
    pub fn head_index(&self) -> u16 {
        self.head
    }
}

impl Iterator for DescChain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let addr = self.table.checked_add(u64::from(self.next) * DESC_SIZE)?;
        let d: Descriptor = self.mem.read_obj(addr).ok()?;
        if d.flags() & VIRTQ_DESC_F_INDIRECT != 0 {
            // Not offered, so never followed: the chain is broken here.
            self.ttl = 0;
            return None;
        }
        if d.has_next() {
            self.next = d.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(d)
    }
}

/// Take the next chain the driver made available in `queue`, if any.
///
/// `None` when the ring is empty, and also when the driver's available index is more than the
/// queue size ahead of the device (a driver bug or a hostile guest; logged with
/// [`crate::guest_warn!`] and left for the driver to fix, the queue stays where it is). An
/// available-ring entry naming a descriptor outside the table cannot be returned to the driver:
/// it is skipped (and logged the same way).
pub fn pop_chain<'a>(queue: &mut Queue, mem: &'a GuestMemoryMmap) -> Option<DescChain<'a>> {
    let size = queue.size();
    if !queue.ready() || size == 0 {
        return None;
    }
    let avail = queue.avail_idx(mem, Ordering::Acquire).ok()?.0;
    let mut next = queue.next_avail();
    let pending = avail.wrapping_sub(next);
    if pending > size {
        crate::guest_warn!(
            "virtio: the driver made {pending} buffers available in a queue of {size}; \
             ignoring them until it resets the device or fixes its index"
        );
        return None;
    }
    // Each entry is looked at once, so this ends even if the driver keeps adding entries.
    for _ in 0..pending {
        let slot = GuestAddress(queue.avail_ring()).checked_add(4 + 2 * u64::from(next % size))?;
        let head = u16::from_le(mem.read_obj::<u16>(slot).ok()?);
        next = next.wrapping_add(1);
        queue.set_next_avail(next);
        if head < size {
            return Some(DescChain::new(
                mem,
                GuestAddress(queue.desc_table()),
                size,
                head,
            ));
        }
        crate::guest_warn!(
            "virtio: the driver made descriptor {head} available in a queue of {size}; skipped"
        );
    }
    None
}

/// A checked guest memory range: inside guest memory and non-empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Which way the data of a chain flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device reads (driver-to-device buffers).
    DeviceReads,
    /// The device writes (device-to-driver buffers).
    DeviceWrites,
}

/// What is wrong with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the descriptor chain is empty or broken (bad index, loop or unreadable descriptor)")]
    BrokenChain,
    #[error("a descriptor points the wrong way for this queue")]
    WrongDirection,
    #[error("a descriptor is not inside guest memory")]
    OutsideMemory,
    #[error("the chain holds more than {0} bytes")]
    TooLong(u64),
}

/// The non-empty segments of `chain`, all flowing `direction` and inside `mem`, with their total
/// length. Stops with [`ChainError::TooLong`] as soon as the total passes `limit`, so a guest
/// cannot make the device collect an unbounded list.
pub fn segments(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
    direction: Direction,
    limit: u64,
) -> Result<(Vec<Segment>, u64), ChainError> {
    let mut segs = Vec::new();
    let total = segments_into(mem, chain, direction, limit, &mut segs)?;
    Ok((segs, total))
}

/// [`segments`] into `segs` (cleared first; a device reuses it for every chain), returning
/// the total length. On error `segs` holds what was checked up to then.
pub fn segments_into(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
    direction: Direction,
    limit: u64,
    segs: &mut Vec<Segment>,
) -> Result<u64, ChainError> {
    segs.clear();
    let mut total = 0u64;
    let mut last = None;
    for d in chain {
        last = Some(d);
        if d.is_write_only() != (direction == Direction::DeviceWrites) {
            return Err(ChainError::WrongDirection);
        }
        if d.len() == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(ChainError::OutsideMemory);
        }
        total += u64::from(d.len());
        if total > limit {
            return Err(ChainError::TooLong(limit));
        }
        segs.push(Segment {
            addr: d.addr(),
            len: d.len(),
        });
    }
    // The iterator stops early, leaving `next` set, on loops and unreadable descriptors.
    if last.is_none_or(|d| d.has_next()) {
        return Err(ChainError::BrokenChain);
    }
    Ok(total)
}

/// Read the bytes of `segs` (checked to lie in `mem`, e.g. by [`segments`]) into `buf`,
/// replacing its contents. False when memory refuses a read.
pub fn read_segments(mem: &GuestMemoryMmap, segs: &[Segment], buf: &mut Vec<u8>) -> bool {
    let total = segs.iter().map(|s| s.len as usize).sum();
    buf.clear();
    buf.resize(total, 0);
    let mut at = 0;
    for s in segs {
        let n = s.len as usize;
        if mem.read_slice(&mut buf[at..at + n], s.addr).is_err() {
            return false;
        }
        at += n;
    }
    true
}

/// Copy `data` into `segs` from their start. False when it does not fit or memory refuses.
pub fn write_segments(mem: &GuestMemoryMmap, segs: &[Segment], data: &[u8]) -> bool {
    SegmentWriter::new(mem, segs).write(data)
}

/// Writes pieces of data one after the other into `segs` (checked to lie in `mem`, e.g. by
/// [`segments`]), each piece going on where the last one ended, across segment boundaries.
/// Never writes past the segments' lengths.
#[derive(Debug)]
pub struct SegmentWriter<'a> {
    mem: &'a GuestMemoryMmap,
    segs: &'a [Segment],
    /// The segment the next byte goes to, and the offset in it.
    seg: usize,
    at: u32,
    written: usize,
}

impl<'a> SegmentWriter<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, segs: &'a [Segment]) -> Self {
        SegmentWriter {
            mem,
            segs,
            seg: 0,
            at: 0,
            written: 0,
        }
    }

    /// Append `data`. False when it does not fit in what is left of the segments (then what
    /// fits is written) or memory refuses a write.
    pub fn write(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let Some(s) = self.segs.get(self.seg) else {
                return false;
            };
            let room = s.len - self.at;
            // `room` is a u32, so `n` fits one.
            let n = data.len().min(room as usize);
            let Some(addr) = s.addr.checked_add(u64::from(self.at)) else {
                return false;
            };
            if self.mem.write_slice(&data[..n], addr).is_err() {
                return false;
            }
            data = &data[n..];
            self.written += n;
            self.at += n as u32;
            if self.at == s.len {
                self.seg += 1;
                self.at = 0;
            }
        }
        true
    }

    /// Leave the next `n` bytes as they are. False when fewer are left.
    pub fn skip(&mut self, mut n: usize) -> bool {
        while n > 0 {
            let Some(s) = self.segs.get(self.seg) else {
                return false;
            };
            // At most `s.len - self.at`, a u32.
            let k = n.min((s.len - self.at) as usize);
            n -= k;
            self.written += k;
            self.at += k as u32;
            if self.at == s.len {
                self.seg += 1;
                self.at = 0;
            }
        }
        true
    }

    /// Bytes written (or skipped) so far.
    pub fn written(&self) -> usize {
        self.written
    }
}

/// Put every `(head, len)` of `used` in the used ring and then publish them with a single index
/// update, so the driver sees all of them or none (a mergeable receive packet spread over
/// several buffers must appear at once: virtio 1.2, 5.1.6.4.2).
///
/// Only for queues without `VIRTIO_RING_F_EVENT_IDX`: the queue's own count of entries added
/// since the last notification check grows by one per call, not per entry.
pub fn add_used_together(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    used: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last_head, last_len), earlier)) = used.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    let base = queue.next_used();
    for (i, &(head, len)) in earlier.iter().enumerate() {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        // `earlier` holds fewer entries than the queue size, so `i` fits in 16 bits.
        let slot = base.wrapping_add(i as u16) % size;
        // 4 bytes of flags and index, then 8-byte elements.
        let addr = GuestAddress(queue.used_ring())
            .checked_add(4 + u64::from(slot) * 8)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    // The last entry goes through the queue, whose release store of the index also publishes
    // the entries written above.
    queue.set_next_used(base.wrapping_add(earlier.len() as u16));
    if let Err(e) = queue.add_used(mem, last_head, last_len) {
        queue.set_next_used(base);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{
        guest_memory, r, w, Desc, TestQueue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
    };

    const MEM: usize = 0x10_0000;

    /// `descs` as a chain popped from a fresh queue.
    fn chain_of(mem: &GuestMemoryMmap, descs: &[Desc]) -> Vec<Descriptor> {
        let mut tq = TestQueue::new(mem, 0x8_0000, 16);
        tq.add_chain(descs);
        let mut q = tq.queue();
        pop_chain(&mut q, mem).unwrap().collect()
    }

    #[test]
    fn chains_come_out_in_order_and_then_none() {
        let mem = guest_memory(MEM);
        let mut tq = TestQueue::new(&mem, 0x8_0000, 16);
        let a = tq.add_chain(&[r(0x1000, 8), w(0x2000, 8)]);
        let b = tq.add_chain(&[w(0x3000, 4)]);
        let mut q = tq.queue();
        let first = pop_chain(&mut q, &mem).unwrap();
        assert_eq!(first.head_index(), a);
        assert_eq!(first.map(|d| d.len()).collect::<Vec<_>>(), [8, 8]);
        assert_eq!(pop_chain(&mut q, &mem).unwrap().head_index(), b);
        assert!(pop_chain(&mut q, &mem).is_none());
        assert_eq!(q.next_avail(), 2);
    }

    #[test]
    fn indirect_descriptors_break_the_chain() {
        let mem = guest_memory(MEM);
        // A valid indirect table of one writable descriptor at 0x4000.
        let table = GuestAddress(0x4000);
        mem.write_obj(0x1000u64, table).unwrap();
        mem.write_obj(64u32, table.unchecked_add(8)).unwrap();
        mem.write_obj(VIRTQ_DESC_F_WRITE, table.unchecked_add(12))
            .unwrap();
        let mut tq = TestQueue::new(&mem, 0x8_0000, 16);
        // The head is indirect.
        tq.set_desc(0, table.0, 16, VIRTQ_DESC_F_INDIRECT, 0);
        tq.publish(0);
        // A direct descriptor followed by an indirect one.
        tq.set_desc(1, 0x2000, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
        tq.set_desc(2, table.0, 16, VIRTQ_DESC_F_INDIRECT, 0);
        tq.publish(1);
        let mut q = tq.queue();
        for _ in 0..2 {
            let chain = pop_chain(&mut q, &mem).unwrap();
            assert_eq!(
                segments(&mem, chain, Direction::DeviceWrites, 1 << 20),
                Err(ChainError::BrokenChain)
            );
        }
    }

    #[test]
    fn a_bogus_available_index_gives_no_chains() {
        let mem = guest_memory(MEM);
        let mut tq = TestQueue::new(&mem, 0x8_0000, 16);
        tq.add_chain(&[w(0x1000, 8)]);
        let mut q = tq.queue();
        // The driver claims 17 new buffers in a 16-entry queue.
        mem.write_obj(17u16, tq.avail.unchecked_add(2)).unwrap();
        assert!(pop_chain(&mut q, &mem).is_none());
        assert_eq!(q.next_avail(), 0, "nothing consumed");
        // Fixed by the driver: served again.
        mem.write_obj(1u16, tq.avail.unchecked_add(2)).unwrap();
        assert!(pop_chain(&mut q, &mem).is_some());
    }

    #[test]
    fn heads_outside_the_table_are_skipped() {
        let mem = guest_memory(MEM);
        let mut tq = TestQueue::new(&mem, 0x8_0000, 16);
        tq.publish(16);
        tq.publish(0xffff);
        let good = tq.add_chain(&[w(0x1000, 8)]);
        let mut q = tq.queue();
        assert_eq!(pop_chain(&mut q, &mem).unwrap().head_index(), good);
        assert_eq!(q.next_avail(), 3);
        tq.publish(40);
        assert!(pop_chain(&mut q, &mem).is_none());
        assert_eq!(q.next_avail(), 4);
    }

    #[test]
    fn writable_chain_gives_its_non_empty_segments() {
        let mem = guest_memory(MEM);
        let chain = chain_of(&mem, &[w(0x1000, 16), w(0x2000, 0), w(0x3000, 32)]);
        let (segs, total) = segments(&mem, chain, Direction::DeviceWrites, 1 << 20).unwrap();
        assert_eq!(total, 48);
        let seg = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
        };
        assert_eq!(segs, vec![seg(0x1000, 16), seg(0x3000, 32)]);
    }

    #[test]
    fn chain_errors_are_named() {
        let mem = guest_memory(MEM);
        let mixed = chain_of(&mem, &[r(0x1000, 16), w(0x2000, 16)]);
        assert_eq!(
            segments(&mem, mixed, Direction::DeviceReads, 1 << 20),
            Err(ChainError::WrongDirection)
        );
        let outside = chain_of(&mem, &[r(MEM as u64 - 0x10, 0x20)]);
        assert_eq!(
            segments(&mem, outside, Direction::DeviceReads, 1 << 20),
            Err(ChainError::OutsideMemory)
        );
        let long = chain_of(&mem, &[r(0x1000, 64), r(0x2000, 64)]);
        assert_eq!(
            segments(&mem, long, Direction::DeviceReads, 100),
            Err(ChainError::TooLong(100))
        );
        assert_eq!(
            segments(&mem, Vec::new(), Direction::DeviceReads, 100),
            Err(ChainError::BrokenChain)
        );
    }

    #[test]
    fn write_segments_spreads_data_and_refuses_overflow() {
        let mem = guest_memory(MEM);
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 4,
            },
        ];
        assert!(write_segments(&mem, &segs, b"abcdefg"));
        let mut a = [0u8; 3];
        let mut b = [0u8; 4];
        mem.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!((&a, &b), (b"abc", b"defg"));
        assert!(!write_segments(&mem, &segs, b"abcdefgh"));
    }

    #[test]
    fn a_segment_writer_goes_on_where_it_stopped_and_never_past_the_end() {
        let mem = guest_memory(MEM);
        let seg = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
        };
        mem.write_slice(&[0xee; 16], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xee; 16], GuestAddress(0x2000)).unwrap();
        // A header of 5 split 2 + 3, then a payload given as two pieces.
        let segs = [seg(0x1000, 2), seg(0x2000, 6), seg(0x3000, 4)];
        let mut wr = SegmentWriter::new(&mem, &segs);
        assert!(wr.write(b"HHHHH"));
        assert!(wr.write(b"ab"));
        assert!(wr.write(b""));
        assert!(wr.write(b"cdef"));
        assert_eq!(wr.written(), 11);
        let mut a = [0u8; 3];
        let mut b = [0u8; 7];
        let mut c = [0u8; 4];
        mem.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        mem.read_slice(&mut c, GuestAddress(0x3000)).unwrap();
        assert_eq!(&a, b"HH\xee");
        assert_eq!(&b, b"HHHabc\xee");
        assert_eq!(&c[..3], b"def");
        // One byte left: a longer piece fills it and is refused; nothing goes further.
        assert!(!wr.write(b"xy"));
        assert_eq!(wr.written(), 12);
        assert!(!wr.write(b"z"));
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(b[6], 0xee, "past a segment's end is untouched");
    }

    #[test]
    fn several_used_entries_appear_with_one_index_update() {
        let mem = guest_memory(MEM);
        let tq = TestQueue::new(&mem, 0x8_0000, 4);
        let mut queue = tq.queue();
        // Start near the end of the ring to check the slot arithmetic.
        queue.set_next_used(3);
        add_used_together(&mut queue, &mem, &[(1, 10), (2, 20), (3, 30)]).unwrap();
        assert_eq!(queue.next_used(), 6);
        assert_eq!(tq.used_idx(), 6);
        assert_eq!(tq.used_elem(3), (1, 10));
        assert_eq!(tq.used_elem(4), (2, 20));
        assert_eq!(tq.used_elem(5), (3, 30));
        // A bad head index publishes nothing.
        assert!(add_used_together(&mut queue, &mem, &[(9, 1), (1, 1)]).is_err());
        assert!(add_used_together(&mut queue, &mem, &[(1, 1), (9, 1)]).is_err());
        assert_eq!(queue.next_used(), 6);
        assert_eq!(tq.used_idx(), 6);
    }
}
