use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::virtio::test_utils::{
    guest_memory, interrupt, irq_count, r, w, Desc, Recycler, TempFile, TestQueue,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use std::time::Duration;

const MEM_SIZE: usize = 0x40_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

struct Setup {
    block: Block,
    tq: TestQueue,
    mem: GuestMemoryMmap,
    irq: Arc<VirtioInterrupt>,
    _file: TempFile,
}

/// A disk of `sectors` sectors whose byte `i` is `i % 251`, behind an activated device.
fn setup_with(sectors: u64, read_only: bool, id: &str, event_idx: bool) -> Setup {
    let contents: Vec<u8> = (0..sectors * SECTOR_SIZE)
        .map(|i| (i % 251) as u8)
        .collect();
    let file = TempFile::with_contents(&contents);
    let mut block = Block::new(file.path(), read_only, id).unwrap();
    let mem = guest_memory(MEM_SIZE);
    let tq = TestQueue::new(&mem, 0, QUEUE_SIZE);
    let mut q = tq.queue();
    q.set_event_idx(event_idx);
    let irq = interrupt();
    let features = block.avail_features()
        & !(if event_idx {
            0
        } else {
            feature(VIRTIO_RING_F_EVENT_IDX)
        });
    block
        .activate(mem.clone(), features, vec![q], irq.clone())
        .unwrap();
    Setup {
        block,
        tq,
        mem,
        irq,
        _file: file,
    }
}

/// A limited disk of `sectors` sectors on a backend event loop, with its queue.
fn limited_setup(
    sectors: u64,
    config: crate::rate_limiter::RateLimiterConfig,
) -> (
    crate::virtio::test_utils::BackendLoop<Block>,
    TestQueue,
    GuestMemoryMmap,
    TempFile,
) {
    let contents: Vec<u8> = (0..sectors * SECTOR_SIZE)
        .map(|i| (i % 251) as u8)
        .collect();
    let file = TempFile::with_contents(&contents);
    let limiter = RateLimiter::new(&config).unwrap();
    let mut block = Block::new(file.path(), false, "")
        .unwrap()
        .with_rate_limiter(limiter);
    let mem = guest_memory(MEM_SIZE);
    let tq = TestQueue::new(&mem, 0, QUEUE_SIZE);
    let features = block.avail_features() & !feature(VIRTIO_RING_F_EVENT_IDX);
    block
        .activate(mem.clone(), features, vec![tq.queue()], interrupt())
        .unwrap();
    let lp = crate::virtio::test_utils::BackendLoop::new(block);
    (lp, tq, mem, file)
}

fn read_chain(mem: &GuestMemoryMmap, sector: u64, len: u32) -> Vec<Desc> {
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    vec![r(HDR, 16), w(DATA, len), w(STATUS, 1)]
}

fn setup(sectors: u64) -> Setup {
    setup_with(sectors, false, "", false)
}

impl Setup {
    fn header(&self, t: u32, sector: u64) {
        self.mem.write_obj(t, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Submit a chain and process it; returns (status byte, used length).
    fn run(&mut self, descs: &[Desc]) -> (u8, u32) {
        let before = self.tq.used_idx();
        let head = self.tq.add_chain(descs);
        self.block.process_queue(0);
        assert_eq!(self.tq.used_idx(), before.wrapping_add(1), "chain consumed");
        let (id, len) = self.tq.used_elem(before);
        assert_eq!(id, u32::from(head));
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    fn request(&mut self, t: u32, sector: u64, data: &[Desc]) -> (u8, u32) {
        self.header(t, sector);
        let mut descs = vec![r(HDR, 16)];
        descs.extend_from_slice(data);
        descs.push(w(STATUS, 1));
        self.run(&descs)
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(self.block.path()).unwrap()
    }

    fn metric(&self, f: impl Fn(&BlockMetrics) -> &AtomicU64) -> u64 {
        f(&self.block.metrics()).load(Ordering::Relaxed)
    }
}

fn pattern(start: u64, len: usize) -> Vec<u8> {
    (start..start + len as u64)
        .map(|i| (i % 251) as u8)
        .collect()
}

#[test]
fn rate_limited_disk_serves_its_budget_then_waits_for_the_timer() {
    use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    let config = RateLimiterConfig {
        // 8 KiB at once, refilled in 100 ms.
        bandwidth: Some(TokenBucketConfig {
            size: 8192,
            one_time_burst: 0,
            refill_time_ms: 100,
        }),
        ops: None,
    };
    let (mut lp, mut tq, mem, _file) = limited_setup(64, config);
    let m = lp.dev().metrics();
    // Two 4 KiB reads fit; the third does not.
    for i in 0..3 {
        tq.add_chain(&read_chain(&mem, i * 8, 4096));
    }
    let start = std::time::Instant::now();
    lp.dev().process_queue(0);
    assert_eq!(tq.used_idx(), 2, "8 KiB served, then throttled");
    assert_eq!(m.bytes_read.load(Ordering::Relaxed), 8192);
    assert_eq!(m.rate_limiter_throttled.load(Ordering::Relaxed), 1);
    assert!(lp.dev().rate_limiter().unwrap().is_blocked());
    // A kick while throttled serves nothing.
    lp.dev().process_queue(0);
    assert_eq!(tq.used_idx(), 2);
    assert_eq!(m.rate_limiter_throttled.load(Ordering::Relaxed), 1);
    // The timer restarts the queue once half the bucket has refilled (~50 ms).
    assert!(lp.run_until(Duration::from_secs(5), |_| tq.used_idx() == 3));
    assert!(start.elapsed() >= Duration::from_millis(40));
    assert_eq!(tq.used_elem(2).1, 4097);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(m.bytes_read.load(Ordering::Relaxed), 3 * 4096);
    assert!(!lp.dev().rate_limiter().unwrap().is_blocked());
}

#[test]
fn rate_limited_ops_and_requests_larger_than_the_bucket() {
    use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    let config = RateLimiterConfig {
        // 2 KiB per 50 ms: every 4 KiB read is larger than the bucket.
        bandwidth: Some(TokenBucketConfig {
            size: 2048,
            one_time_burst: 0,
            refill_time_ms: 50,
        }),
        // One request at a time plus a burst of one.
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: 1,
            refill_time_ms: 50,
        }),
    };
    let (mut lp, mut tq, mem, _file) = limited_setup(64, config);
    let m = lp.dev().metrics();
    // A malformed chain (no status) is not limited.
    tq.add_chain(&[r(HDR, 16)]);
    for i in 0..3 {
        tq.add_chain(&read_chain(&mem, i * 8, 4096));
    }
    lp.dev().process_queue(0);
    // The malformed chain and the first big read (full buckets) pass; the second read
    // would take the burst op but the bandwidth bucket is empty.
    assert_eq!(tq.used_idx(), 2);
    assert_eq!(m.invalid_chains.load(Ordering::Relaxed), 1);
    assert_eq!(m.reads.load(Ordering::Relaxed), 1);
    assert!(lp.run_until(Duration::from_secs(5), |_| tq.used_idx() == 4));
    assert_eq!(m.reads.load(Ordering::Relaxed), 3);
    assert!(m.rate_limiter_throttled.load(Ordering::Relaxed) >= 2);
}

#[test]
fn reset_clears_a_pending_throttle() {
    use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    let config = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: 3_600_000,
        }),
    };
    let (lp, mut tq, mem, _file) = limited_setup(8, config);
    tq.add_chain(&read_chain(&mem, 0, 512));
    tq.add_chain(&read_chain(&mem, 0, 512));
    lp.dev().process_queue(0);
    assert_eq!(tq.used_idx(), 1);
    assert!(lp.dev().rate_limiter().unwrap().is_blocked());
    lp.dev().reset();
    assert!(!lp.dev().rate_limiter().unwrap().is_blocked());
}

#[test]
fn features_and_config() {
    let s = setup(8);
    let f = s.block.avail_features();
    assert_ne!(f & feature(VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & feature(VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(f & feature(VIRTIO_BLK_F_SEG_MAX), 0);
    assert_eq!(f & feature(VIRTIO_BLK_F_RO), 0);
    let mut cap = [0u8; 8];
    s.block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    let mut seg = [0u8; 4];
    s.block.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), 254);
    let mut past = [0xffu8; 8];
    s.block.read_config(12, &mut past);
    assert_eq!(past, [254, 0, 0, 0, 0, 0, 0, 0]);
    let mut past = [0xffu8; 4];
    s.block.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    assert_eq!(s.block.device_type(), VIRTIO_ID_BLOCK);
    assert_eq!(s.block.queue_max_sizes(), &[256]);
}

#[test]
fn read_request() {
    let mut s = setup(16);
    let (st, len) = s.request(VIRTIO_BLK_T_IN, 2, &[w(DATA, 1024)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1025));
    assert_eq!(s.guest(DATA, 1024), pattern(1024, 1024));
    assert_eq!(s.metric(|m| &m.reads), 1);
    assert_eq!(s.metric(|m| &m.bytes_read), 1024);
    assert_eq!(irq_count(&s.irq), 1);
    assert_ne!(s.irq.status() & crate::virtio::VIRTIO_MMIO_INT_VRING, 0);
}

#[test]
fn write_request() {
    let mut s = setup(16);
    let data: Vec<u8> = (0..1536).map(|i| (i * 7) as u8).collect();
    s.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (st, len) = s.request(VIRTIO_BLK_T_OUT, 3, &[r(DATA, 1536)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1));
    let disk = s.disk();
    assert_eq!(&disk[1536..3072], &data[..]);
    assert_eq!(&disk[..1536], &pattern(0, 1536)[..]);
    assert_eq!(&disk[3072..], &pattern(3072, 16 * 512 - 3072)[..]);
    assert_eq!(s.metric(|m| &m.writes), 1);
    assert_eq!(s.metric(|m| &m.bytes_written), 1536);
}

#[test]
fn requests_spanning_many_descriptors() {
    let mut s = setup(256);
    // 200 data descriptors of 512 bytes each, scattered in memory, plus header/status.
    let segs: Vec<Desc> = (0..200).map(|i| w(DATA + 1000 * i, 512)).collect();
    let (st, len) = s.request(VIRTIO_BLK_T_IN, 10, &segs);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 200 * 512 + 1));
    for i in 0..200u64 {
        assert_eq!(s.guest(DATA + 1000 * i, 512), pattern((10 + i) * 512, 512));
    }
    // Writes too, with descriptors split across sector boundaries.
    let data: Vec<u8> = (0..2048).map(|i| (i * 13 % 256) as u8).collect();
    s.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let segs = [r(DATA, 100), r(DATA + 100, 1000), r(DATA + 1100, 948)];
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, 1, &segs), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(&s.disk()[512..2560], &data[..]);
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    let mut s = setup(16);
    // Header followed by OUT data in one descriptor.
    let data = vec![0x5au8; 512];
    s.header(VIRTIO_BLK_T_OUT, 4);
    s.mem.write_slice(&data, GuestAddress(HDR + 16)).unwrap();
    assert_eq!(
        s.run(&[r(HDR, 16 + 512), w(STATUS, 1)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(&s.disk()[2048..2560], &data[..]);
    // IN data and status in one descriptor; header split in two.
    s.header(VIRTIO_BLK_T_IN, 0);
    let (_, len) = s.run(&[r(HDR, 8), r(HDR + 8, 8), w(STATUS - 512, 513)]);
    assert_eq!(len, 513);
    assert_eq!(s.guest(STATUS - 512, 512), pattern(0, 512));
    assert_eq!(s.guest(STATUS, 1), [VIRTIO_BLK_S_OK]);
}

#[test]
fn flush_syncs_the_file() {
    let mut s = setup(4);
    assert_eq!(s.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(s.metric(|m| &m.flushes), 1);
}

#[test]
fn a_disk_without_flush_does_not_offer_it_and_never_syncs() {
    let file = TempFile::with_contents(&[0u8; 512]);
    let block = Block::new(file.path(), false, "").unwrap();
    assert_ne!(block.avail_features() & feature(VIRTIO_BLK_F_FLUSH), 0);
    let block = block.without_flush();
    assert_eq!(block.avail_features() & feature(VIRTIO_BLK_F_FLUSH), 0);
    // A driver that flushes anyway is told it worked; nothing was synced.
    let mut s = setup(4);
    s.block.disk.sync_on_flush = false;
    assert_eq!(s.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(s.metric(|m| &m.flushes), 0);
}

#[test]
fn get_id_default_and_explicit() {
    let mut s = setup_with(4, false, "my-disk", false);
    assert_eq!(s.request(VIRTIO_BLK_T_GET_ID, 0, &[w(DATA, 20)]), (0, 21));
    let mut want = [0u8; 20];
    want[..7].copy_from_slice(b"my-disk");
    assert_eq!(s.guest(DATA, 20), want);
    // A shorter buffer gets a truncated id.
    s.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_GET_ID, 0, &[w(DATA, 4)]), (0, 5));
    assert_eq!(s.guest(DATA, 5), b"my-d\xee");

    let mut s = setup(4);
    let meta = std::fs::metadata(s.block.path()).unwrap();
    let expected = format!("{:x}-{:x}", meta.dev(), meta.ino());
    assert_eq!(s.request(VIRTIO_BLK_T_GET_ID, 0, &[w(DATA, 20)]), (0, 21));
    let got = s.guest(DATA, 20);
    let n = expected.len().min(20);
    assert_eq!(&got[..n], &expected.as_bytes()[..n]);
    assert!(got[n..].iter().all(|&b| b == 0));
    assert_eq!(s.block.id()[..n], expected.as_bytes()[..n]);

    let twenty = "abcdefghijklmnopqrst";
    let s = setup_with(4, false, twenty, false);
    assert_eq!(s.block.id(), twenty.as_bytes());
}

#[test]
fn unsupported_types() {
    let mut s = setup(4);
    for t in [2, 11, 13, 0x8000_0000] {
        assert_eq!(s.request(t, 0, &[]), (VIRTIO_BLK_S_UNSUPP, 1));
    }
    assert_eq!(s.metric(|m| &m.unsupported), 4);
}

#[test]
fn read_only_disk() {
    let mut s = setup_with(4, true, "", false);
    assert_ne!(s.block.avail_features() & feature(VIRTIO_BLK_F_RO), 0);
    assert!(s.block.read_only());
    s.mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        s.request(VIRTIO_BLK_T_OUT, 0, &[r(DATA, 512)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(s.disk(), pattern(0, 2048));
    assert_eq!(s.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(
        s.request(VIRTIO_BLK_T_IN, 1, &[w(DATA, 512)]),
        (VIRTIO_BLK_S_OK, 513)
    );
    assert_eq!(s.guest(DATA, 512), pattern(512, 512));
}

#[test]
fn requests_past_the_end() {
    let mut s = setup(4);
    let ioerr = (VIRTIO_BLK_S_IOERR, 1);
    assert_eq!(s.request(VIRTIO_BLK_T_IN, 4, &[w(DATA, 512)]), ioerr);
    assert_eq!(s.request(VIRTIO_BLK_T_IN, 3, &[w(DATA, 1024)]), ioerr);
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, 3, &[r(DATA, 1024)]), ioerr);
    assert_eq!(s.request(VIRTIO_BLK_T_IN, u64::MAX, &[w(DATA, 512)]), ioerr);
    assert_eq!(
        s.request(VIRTIO_BLK_T_IN, u64::MAX / 512, &[w(DATA, 512)]),
        ioerr
    );
    assert_eq!(s.request(VIRTIO_BLK_T_IN, 3, &[w(DATA, 512)]).0, 0);
    assert_eq!(s.disk(), pattern(0, 2048));
    assert_eq!(s.metric(|m| &m.io_errors), 5);
}

#[test]
fn lengths_must_be_sector_multiples() {
    let mut s = setup(4);
    let ioerr = (VIRTIO_BLK_S_IOERR, 1);
    assert_eq!(s.request(VIRTIO_BLK_T_IN, 0, &[w(DATA, 511)]), ioerr);
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, 0, &[r(DATA, 100)]), ioerr);
    assert_eq!(s.metric(|m| &m.invalid_chains), 2);
    assert_eq!(s.disk(), pattern(0, 2048));
}

#[test]
fn wrong_directions() {
    let mut s = setup(4);
    let ioerr = (VIRTIO_BLK_S_IOERR, 1);
    // IN with device-readable data.
    assert_eq!(s.request(VIRTIO_BLK_T_IN, 0, &[r(DATA, 512)]), ioerr);
    // OUT with device-writable data.
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, 0, &[w(DATA, 512)]), ioerr);
    // Header device-writable: no readable header at all.
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(s.run(&[w(HDR, 16), w(DATA, 512), w(STATUS, 1)]), ioerr);
    // Readable after writable.
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        s.run(&[r(HDR, 16), w(DATA, 512), r(DATA, 1), w(STATUS, 1)]),
        ioerr
    );
    // Status device-readable: nowhere to report, consumed with length 0.
    s.header(VIRTIO_BLK_T_IN, 0);
    let (st, len) = s.run(&[r(HDR, 16), w(DATA, 512), r(STATUS, 1)]);
    assert_eq!((st, len), (0xff, 0));
    assert_eq!(s.guest(DATA, 512), vec![0; 512], "nothing read");
}

#[test]
fn descriptors_outside_memory() {
    let mut s = setup(4);
    let ioerr = (VIRTIO_BLK_S_IOERR, 1);
    let end = MEM_SIZE as u64;
    assert_eq!(s.request(VIRTIO_BLK_T_IN, 0, &[w(end - 256, 512)]), ioerr);
    assert_eq!(
        s.request(VIRTIO_BLK_T_IN, 0, &[w(u64::MAX - 100, 512)]),
        ioerr
    );
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, 0, &[r(end, 512)]), ioerr);
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        s.run(&[r(end + 4096, 16), w(DATA, 512), w(STATUS, 1)]),
        ioerr
    );
    // Status outside memory: consumed with length 0.
    s.header(VIRTIO_BLK_T_IN, 0);
    let (_, len) = s.run(&[r(HDR, 16), w(DATA, 512), w(end, 1)]);
    assert_eq!(len, 0);
    let (_, len) = s.run(&[r(HDR, 16), w(DATA, 512), w(u64::MAX, 1)]);
    assert_eq!(len, 0);
}

#[test]
fn zero_length_and_missing_status() {
    let mut s = setup(4);
    assert_eq!(
        s.request(VIRTIO_BLK_T_IN, 0, &[w(DATA, 0), w(DATA, 512)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(s.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 0)]).1, 0);
    s.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(s.run(&[r(HDR, 16)]), (0xff, 0));
    // Short header.
    s.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(s.run(&[r(HDR, 15), w(STATUS, 1)]), (VIRTIO_BLK_S_IOERR, 1));
}

#[test]
fn broken_and_looping_chains() {
    let mut s = setup(4);
    s.header(VIRTIO_BLK_T_IN, 0);
    // A loop: 0 -> 1 -> 0.
    s.tq.set_desc(0, HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    s.tq.set_desc(1, DATA, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0);
    s.tq.publish(0);
    // Next index outside the table.
    s.tq.set_desc(2, HDR, 16, VIRTQ_DESC_F_NEXT, 999);
    s.tq.publish(2);
    s.block.process_queue(0);
    assert_eq!(s.tq.used_idx(), 2);
    assert_eq!(s.tq.used_elem(0), (0, 0));
    assert_eq!(s.tq.used_elem(1), (2, 0));
    assert_eq!(s.metric(|m| &m.invalid_chains), 2);
}

#[test]
fn indirect_tables_are_refused() {
    let mut s = setup(600);
    // An indirect table (not offered) of 300 entries, which is also too long.
    let table = 0x38_0000u64;
    let n = 300u16;
    let put = |i: u16, addr: u64, len: u32, flags: u16| {
        let at = GuestAddress(table + 16 * u64::from(i));
        s.mem.write_obj(addr, at).unwrap();
        s.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        s.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        s.mem.write_obj(i + 1, at.unchecked_add(14)).unwrap();
    };
    put(0, HDR, 16, VIRTQ_DESC_F_NEXT);
    for i in 1..n - 1 {
        put(
            i,
            DATA + 512 * u64::from(i),
            512,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        );
    }
    put(n - 1, STATUS, 1, VIRTQ_DESC_F_WRITE);
    s.header(VIRTIO_BLK_T_IN, 0);
    s.tq.set_desc(0, table, 16 * u32::from(n), 4, 0);
    s.tq.publish(0);
    // A small, well-formed indirect table after a direct header descriptor.
    s.tq.set_desc(1, HDR, 16, VIRTQ_DESC_F_NEXT, 2);
    s.tq.set_desc(2, table + 16 * 3, 16 * 2, 4, 0);
    put(3, DATA, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE);
    put(4, STATUS, 1, VIRTQ_DESC_F_WRITE);
    s.tq.publish(1);
    s.block.process_queue(0);
    // Both are malformed chains: returned unused, the status byte untouched.
    assert_eq!(s.tq.used_idx(), 2);
    assert_eq!(s.tq.used_elem(0), (0, 0));
    assert_eq!(s.tq.used_elem(1), (1, 0));
    assert_eq!(s.guest(STATUS, 1), [0xff]);
    assert_eq!(s.metric(|m| &m.invalid_chains), 2);
    assert_eq!(s.metric(|m| &m.reads), 0);
}

#[test]
fn a_driver_that_keeps_adding_requests_cannot_hold_a_pass() {
    let mut s = setup(128);
    // Large reads: the driver has time to add more while the device works.
    let head = s.tq.add_chain(&read_chain(&s.mem, 0, 0x1_0000));
    let view = s.tq.clone();
    let driver = Recycler::start(view.clone(), head, Duration::from_secs(3));
    s.block.process_queue(0);
    let used = view.used_idx();
    drop(driver);
    assert_eq!(usize::from(used), MAX_CHAINS_PER_PASS);
    assert_eq!(s.metric(|m| &m.reads), MAX_CHAINS_PER_PASS as u64);
    assert_eq!(
        s.block.take_unfinished(),
        1,
        "the queue is left for another pass"
    );
}

#[test]
fn too_much_data() {
    let mem = guest_memory(MEM_SIZE);
    let descs = [
        Descriptor::new(HDR, 16, VIRTQ_DESC_F_NEXT, 1),
        Descriptor::new(0, 0x10_0000, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
        Descriptor::new(0, MAX_DATA_LEN, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 3),
        Descriptor::new(STATUS, 1, VIRTQ_DESC_F_WRITE, 0),
    ];
    // Memory is smaller than the cap: build a bigger one.
    let big = guest_memory(MAX_DATA_LEN as usize + 0x40_0000);
    let err = parse_request(&big, descs).unwrap_err();
    assert_eq!(
        err,
        BadRequest {
            error: RequestError::TooLarge(u64::from(MAX_DATA_LEN) + 0x10_0000),
            status: Some(GuestAddress(STATUS)),
        }
    );
    let err = parse_request(&mem, descs).unwrap_err();
    assert_eq!(err.error, RequestError::OutsideMemory);
}

#[test]
fn parser_returns_typed_requests() {
    let mem = guest_memory(MEM_SIZE);
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
    mem.write_obj(77u64, GuestAddress(HDR + 8)).unwrap();
    let req = parse_request(
        &mem,
        [
            Descriptor::new(HDR, 16, VIRTQ_DESC_F_NEXT, 1),
            Descriptor::new(DATA, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
            Descriptor::new(STATUS, 1, VIRTQ_DESC_F_WRITE, 0),
        ],
    )
    .unwrap();
    assert_eq!(
        req,
        Request {
            request_type: RequestType::In,
            sector: 77,
            data: vec![Segment {
                addr: GuestAddress(DATA),
                len: 4096
            }],
            data_len: 4096,
            status: GuestAddress(STATUS),
        }
    );
    assert_eq!(
        parse_request(&mem, []).unwrap_err(),
        BadRequest {
            error: RequestError::BrokenChain,
            status: None
        }
    );
}

#[test]
fn keeps_serving_after_bad_requests_and_batches() {
    let mut s = setup(8);
    s.header(VIRTIO_BLK_T_IN, 0);
    // Three chains in one kick: bad, bad without status, good.
    s.tq.add_chain(&[r(HDR, 16), w(DATA, 100), w(STATUS, 1)]);
    s.tq.add_chain(&[r(HDR, 16), w(DATA, 512), r(STATUS, 1)]);
    s.tq.add_chain(&[r(HDR, 16), w(DATA, 512), w(STATUS + 1, 1)]);
    s.block.process_queue(0);
    assert_eq!(s.tq.used_idx(), 3);
    assert_eq!(s.tq.used_elem(0).1, 1);
    assert_eq!(s.tq.used_elem(1).1, 0);
    assert_eq!(s.tq.used_elem(2).1, 513);
    assert_eq!(s.guest(STATUS + 1, 1), [VIRTIO_BLK_S_OK]);
    assert_eq!(irq_count(&s.irq), 1, "one interrupt per batch");
    // Other queue indices and an empty queue do nothing.
    s.block.process_queue(1);
    s.block.process_queue(0);
    assert_eq!(irq_count(&s.irq), 0);
    assert_eq!(s.request(VIRTIO_BLK_T_IN, 7, &[w(DATA, 512)]).0, 0);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut s = setup_with(8, false, "", true);
    // used_event (after the avail ring) = 1: interrupt only once the second buffer is used.
    let used_event = s.tq.avail.unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
    s.mem.write_obj(1u16, used_event).unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, 0);
    assert_eq!(irq_count(&s.irq), 0);
    assert_eq!(s.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, 0);
    assert_eq!(irq_count(&s.irq), 1);
    // avail_event (after the used ring) tells the driver where we are.
    let avail_event = s.tq.used.unchecked_add(4 + 8 * u64::from(QUEUE_SIZE));
    assert_eq!(s.mem.read_obj::<u16>(avail_event).unwrap(), 2);
}

#[test]
fn reset_stops_serving_and_activate_checks_queue_count() {
    let mut s = setup(4);
    s.block.reset();
    s.header(VIRTIO_BLK_T_FLUSH, 0);
    s.tq.add_chain(&[r(HDR, 16), w(STATUS, 1)]);
    s.block.process_queue(0);
    assert_eq!(s.tq.used_idx(), 0);
    assert_eq!(
        s.block.activate(s.mem.clone(), 0, vec![], s.irq.clone()),
        Err(ActivateError::QueueCount { want: 1, got: 0 })
    );
}

#[test]
fn creation_errors() {
    let file = TempFile::with_contents(&[0u8; 1000]);
    let err = Block::new(file.path(), false, "").err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "the disk image {} is 1000 bytes, which is not a multiple of 512",
            file.path().display()
        )
    );
    let missing = Path::new("/nonexistent/flint-disk.img");
    let err = Block::new(missing, true, "").err().unwrap();
    assert!(err
        .to_string()
        .starts_with("cannot open the disk image /nonexistent/flint-disk.img: "));
    let file = TempFile::with_contents(&[0u8; 512]);
    let err = Block::new(file.path(), false, "abcdefghijklmnopqrstu")
        .err()
        .unwrap();
    assert!(matches!(err, BlockError::IdTooLong { len: 21, .. }));
    assert!(err.to_string().contains(&file.path().display().to_string()));
    let err = Block::new(Path::new("/tmp"), true, "").err().unwrap();
    assert!(matches!(err, BlockError::Open { .. }));
    // Empty images are fine (capacity 0).
    let file = TempFile::with_contents(&[]);
    assert_eq!(Block::new(file.path(), true, "").unwrap().size(), 0);
}

#[test]
fn end_to_end_through_the_mmio_transport() {
    use crate::bus::BusDevice;
    use crate::virtio::{mmio::MmioTransport, VIRTIO_CONFIG_S_DRIVER_OK};

    let contents = pattern(0, 8 * 512);
    let file = TempFile::with_contents(&contents);
    let block = Block::new(file.path(), false, "e2e").unwrap();
    let metrics = block.metrics();
    let mem = guest_memory(MEM_SIZE);
    let irq = interrupt();
    let mut t = MmioTransport::new(Box::new(block), mem.clone(), irq.clone()).unwrap();
    let rd = |t: &mut MmioTransport, off: u64| {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    };
    let wr = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());

    assert_eq!(rd(&mut t, 0x8), VIRTIO_ID_BLOCK);
    wr(&mut t, 0x70, 0);
    wr(&mut t, 0x70, 1);
    wr(&mut t, 0x70, 3);
    wr(&mut t, 0x14, 1);
    let hi = rd(&mut t, 0x10);
    wr(&mut t, 0x14, 0);
    let lo = rd(&mut t, 0x10);
    let offered = (u64::from(hi) << 32) | u64::from(lo);
    assert_eq!(offered, t.device().avail_features());
    wr(&mut t, 0x24, 0);
    wr(&mut t, 0x20, lo);
    wr(&mut t, 0x24, 1);
    wr(&mut t, 0x20, hi);
    wr(&mut t, 0x70, 0xb);
    assert_eq!(rd(&mut t, 0x70), 0xb);
    // Capacity through the config window, as two 32-bit reads.
    assert_eq!(rd(&mut t, 0x100), 8);
    assert_eq!(rd(&mut t, 0x104), 0);
    assert_eq!(rd(&mut t, 0x10c), SEG_MAX);

    let mut tq = TestQueue::new(&mem, 0, 128);
    wr(&mut t, 0x30, 0);
    assert_eq!(rd(&mut t, 0x34), 256);
    wr(&mut t, 0x38, 128);
    wr(&mut t, 0x80, tq.desc.0 as u32);
    wr(&mut t, 0x90, tq.avail.0 as u32);
    wr(&mut t, 0xa0, tq.used.0 as u32);
    wr(&mut t, 0x44, 1);
    wr(&mut t, 0x70, 0xb | VIRTIO_CONFIG_S_DRIVER_OK);
    assert!(t.is_activated());

    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
    mem.write_obj(5u64, GuestAddress(HDR + 8)).unwrap();
    tq.add_chain(&[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]);
    wr(&mut t, 0x50, 0);
    assert_eq!(tq.used_idx(), 1);
    assert_eq!(tq.used_elem(0), (0, 1025));
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, &contents[2560..3584]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(rd(&mut t, 0x60), 1);
    assert_eq!(irq_count(&irq), 1);
    wr(&mut t, 0x64, 1);
    assert_eq!(rd(&mut t, 0x60), 0);
    assert_eq!(metrics.reads.load(Ordering::Relaxed), 1);

    // A reset stops the device.
    wr(&mut t, 0x70, 0);
    assert!(!t.is_activated());
}

#[test]
fn replacing_the_disk_changes_size_and_keeps_the_id() {
    let first = TempFile::with_contents(&[1u8; 1024]);
    let second = TempFile::with_contents(&[2u8; 4096]);
    let odd = TempFile::with_contents(&[3u8; 1000]);
    let mut block = Block::new(first.path(), false, "swap").unwrap();
    assert_eq!(block.replace_disk(second.path()).unwrap(), 4096);
    assert_eq!(block.size(), 4096);
    assert_eq!(block.path(), second.path());
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 8);
    assert_eq!(&block.id()[..4], b"swap");
    let err = block.replace_disk(odd.path()).unwrap_err().to_string();
    assert!(err.contains("not a multiple of 512"), "{err}");
    assert_eq!(
        block.size(),
        4096,
        "a refused medium leaves the old one in place"
    );
}
