//! Device-level virtio-blk benchmark (no KVM): `cargo bench -p devices --bench block`.
//!
//! Plays the guest driver against the real [`Block`] device: a split virtqueue laid out in
//! real guest memory (`vm-memory`), requests of 4 KiB and 128 KiB at random sector-aligned
//! offsets of a temporary disk image, made available in batches as a Linux driver does, then
//! served by `process_queue` as the VMM's event loop would after a notification. Prints
//! requests/s and MiB/s. The image is read once beforehand, so the numbers are for the page
//! cache: they measure the device model (descriptor parsing, guest memory access, syscalls),
//! not the host's disk.
//!
//! Options (after `--`): `--requests N` (per size, default 200000 for 4 KiB and 20000 for
//! 128 KiB), `--disk-mib N` (default 256), `--batch N` (chains per notification, default 64).

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use arch::GuestMemoryMmap;
use devices::virtio::block::{Block, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use devices::virtio::{feature, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use devices::IrqLine;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QUEUE_SIZE: u16 = 256;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// Guest memory layout: rings at 0, request headers and status bytes at 1 MiB, data buffers
/// from 2 MiB (one per chain in a batch).
const RINGS: u64 = 0;
const HEADERS: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;

struct Options {
    requests_4k: u64,
    requests_128k: u64,
    disk_mib: u64,
    batch: u16,
}

fn parse_options() -> Options {
    let mut o = Options {
        requests_4k: 200_000,
        requests_128k: 20_000,
        disk_mib: 256,
        batch: 64,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--requests" => {
                let n = value("--requests");
                o.requests_4k = n;
                o.requests_128k = n;
            }
            "--disk-mib" => o.disk_mib = value("--disk-mib"),
            "--batch" => o.batch = value("--batch") as u16,
            // cargo bench passes --bench; ignore anything else it adds.
            _ => {}
        }
    }
    // Three descriptors per chain.
    assert!(
        o.batch >= 1 && u32::from(o.batch) * 3 <= u32::from(QUEUE_SIZE),
        "--batch must be 1..=85"
    );
    o
}

/// The driver's side of the queue.
struct Driver {
    mem: GuestMemoryMmap,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    avail_idx: u16,
    used_idx: u16,
}

impl Driver {
    fn new(mem: &GuestMemoryMmap) -> Driver {
        let desc = GuestAddress(RINGS);
        let avail = desc.unchecked_add(16 * u64::from(QUEUE_SIZE));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(QUEUE_SIZE) + 3) & !3);
        for at in [avail, used] {
            mem.write_obj(0u32, at).unwrap();
        }
        Driver {
            mem: mem.clone(),
            desc,
            avail,
            used,
            avail_idx: 0,
            used_idx: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_size(QUEUE_SIZE).unwrap();
        q.try_set_desc_table_address(self.desc).unwrap();
        q.try_set_avail_ring_address(self.avail).unwrap();
        q.try_set_used_ring_address(self.used).unwrap();
        q.set_ready(true);
        q
    }

    fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc.unchecked_add(16 * u64::from(index));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Lay out chain `slot` of a batch: header, data buffer (device-writable), status.
    fn prepare(&self, slot: u16, len: u32) {
        let head = slot * 3;
        let header = HEADERS + 32 * u64::from(slot);
        let data = DATA + u64::from(slot) * u64::from(len);
        self.mem
            .write_obj(VIRTIO_BLK_T_IN, GuestAddress(header))
            .unwrap();
        self.set_desc(head, header, 16, DESC_F_NEXT, head + 1);
        self.set_desc(head + 1, data, len, DESC_F_NEXT | DESC_F_WRITE, head + 2);
        self.set_desc(head + 2, header + 16, 1, DESC_F_WRITE, 0);
    }

    /// Point chain `slot` at `sector` and make it available.
    fn submit(&mut self, slot: u16, sector: u64) {
        let header = HEADERS + 32 * u64::from(slot);
        self.mem
            .write_obj(sector, GuestAddress(header + 8))
            .unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(header + 16))
            .unwrap();
        let ring_slot = self
            .avail
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE));
        self.mem.write_obj(slot * 3, ring_slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// Collect the completions; panics unless every request came back OK with `len + 1` bytes.
    fn reap(&mut self, expected: u16, len: u32) {
        let used_idx: u16 = self.mem.read_obj(self.used.unchecked_add(2)).unwrap();
        assert_eq!(
            used_idx.wrapping_sub(self.used_idx),
            expected,
            "the device did not complete every request"
        );
        while self.used_idx != used_idx {
            let at = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.used_idx % QUEUE_SIZE));
            let head: u32 = self.mem.read_obj(at).unwrap();
            let used_len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            assert_eq!(used_len, len + 1, "short completion");
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(HEADERS + 32 * u64::from(head as u16 / 3) + 16))
                .unwrap();
            assert_eq!(status, VIRTIO_BLK_S_OK, "request failed");
            self.used_idx = self.used_idx.wrapping_add(1);
        }
    }
}

/// xorshift64: reproducible offsets without extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A temp disk image of `mib` MiB of non-zero data, removed on drop.
struct Image(std::path::PathBuf);

impl Image {
    fn new(mib: u64) -> Image {
        let path =
            std::env::temp_dir().join(format!("flint-bench-block-{}.img", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let chunk: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        for _ in 0..mib {
            file.write_all(&chunk).unwrap();
        }
        file.sync_all().unwrap();
        Image(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The data buffers of a completed batch hold what the image holds at those sectors.
fn check_data(mem: &GuestMemoryMmap, image: &Image, sectors: &[u64], len: u32) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(&image.0).unwrap();
    let mut want = vec![0u8; len as usize];
    let mut got = vec![0u8; len as usize];
    for (slot, &sector) in sectors.iter().enumerate() {
        file.read_exact_at(&mut want, sector * 512).unwrap();
        let data = DATA + slot as u64 * u64::from(len);
        mem.read_slice(&mut got, GuestAddress(data)).unwrap();
        assert!(got == want, "request {slot} read the wrong data");
    }
}

/// Run `requests` reads of `len` bytes; returns (requests/s, MiB/s).
fn run(image: &Image, disk_bytes: u64, len: u32, requests: u64, batch: u16) -> (f64, f64) {
    let mem_size = DATA as usize + usize::from(batch) * len as usize;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
    let mut driver = Driver::new(&mem);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(irq.try_clone().unwrap())));
    let mut block = Block::new(&image.0, true, "bench").unwrap();
    block
        .activate(
            mem.clone(),
            feature(VIRTIO_F_VERSION_1),
            vec![driver.queue()],
            interrupt,
        )
        .unwrap();
    for slot in 0..batch {
        driver.prepare(slot, len);
    }
    let sectors_per_req = u64::from(len) / 512;
    let slots = disk_bytes / u64::from(len);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);

    let mut sectors = vec![0u64; usize::from(batch)];
    let start = Instant::now();
    let mut done = 0;
    while done < requests {
        let n = (requests - done).min(u64::from(batch)) as u16;
        for slot in 0..n {
            sectors[usize::from(slot)] = (rng.next() % slots) * sectors_per_req;
            driver.submit(slot, sectors[usize::from(slot)]);
        }
        block.process_queue(0);
        driver.reap(n, len);
        if done == 0 {
            check_data(&mem, image, &sectors[..usize::from(n)], len);
        }
        let _ = irq.read();
        done += u64::from(n);
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = requests as f64 / secs;
    (rate, rate * f64::from(len) / f64::from(1 << 20))
}

fn main() {
    let o = parse_options();
    let disk_bytes = o.disk_mib << 20;
    let image = Image::new(o.disk_mib);
    // Warm the page cache so every size sees the same (cached) backend.
    let _ = std::fs::read(&image.0).unwrap();
    println!(
        "virtio-blk device benchmark: {} MiB image in {} (page cache), random reads, {} chains per \
         notification, one thread",
        o.disk_mib,
        std::env::temp_dir().display(),
        o.batch
    );
    for (len, requests) in [(4096u32, o.requests_4k), (128 << 10, o.requests_128k)] {
        // A short warm-up run, then the measured one.
        run(&image, disk_bytes, len, requests / 10 + 1, o.batch);
        let (rate, mib) = run(&image, disk_bytes, len, requests, o.batch);
        println!(
            "  {:>3} KiB reads: {requests:>7} requests  {rate:>10.0} requests/s  {mib:>8.1} MiB/s",
            len >> 10
        );
    }
}
