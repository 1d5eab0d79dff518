//! Test helpers: a driver's view of a split virtqueue laid out in real guest memory.

use std::sync::Arc;

use arch::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VirtioInterrupt;
use crate::IrqLine;

/// Descriptor flags, in the u16 a descriptor carries.
pub const VIRTQ_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
pub const VIRTQ_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

/// Guest memory of `size` bytes at address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// An interrupt on a fresh eventfd.
pub fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(IrqLine::new(
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )))
}

/// How many times `interrupt` fired since the last call.
pub fn irq_count(interrupt: &VirtioInterrupt) -> u64 {
    interrupt.irq().eventfd().read().unwrap_or(0)
}

/// One descriptor of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Device-readable descriptor.
pub fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

/// Device-writable descriptor.
pub fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// The driver side of a split queue at fixed addresses.
#[derive(Clone)]
pub struct TestQueue {
    pub mem: GuestMemoryMmap,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    /// A queue of `size` entries whose rings start at `base` (4 KiB-aligned is plenty).
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = GuestAddress(base);
        let avail = desc.unchecked_add(16 * u64::from(size));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size) + 3) & !3);
        let q = TestQueue {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        };
        q.mem.write_obj(0u16, avail).unwrap();
        q.mem.write_obj(0u16, avail.unchecked_add(2)).unwrap();
        q.mem.write_obj(0u16, used).unwrap();
        q.mem.write_obj(0u16, used.unchecked_add(2)).unwrap();
        q
    }

    /// A device-side queue configured like a driver would.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(self.desc).unwrap();
        q.try_set_avail_ring_address(self.avail).unwrap();
        q.try_set_used_ring_address(self.used).unwrap();
        q.set_ready(true);
        q
    }

    /// Write descriptor `index` verbatim.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc.unchecked_add(16 * u64::from(index));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Put descriptor `head` in the available ring.
    pub fn publish(&mut self, head: u16) {
        let slot = self
            .avail
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % self.size));
        self.mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// Lay out `descs` as a chain in free descriptor slots and make it available. Returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let flags = if d.write { VIRTQ_DESC_F_WRITE } else { 0 }
                | if last { 0 } else { VIRTQ_DESC_F_NEXT };
            self.set_desc(index, d.addr, d.len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// The descriptor slot the next [`TestQueue::add_chain`] starts at.
    pub fn next_desc(&self) -> u16 {
        self.next_desc
    }

    /// The used ring's `idx`.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// Used ring entry `i`: (descriptor head, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
        (
            self.mem.read_obj(at).unwrap(),
            self.mem.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }
}

/// A hostile driver on another thread: it keeps one chain available in every free slot of a
/// queue's available ring, republishing it as fast as the device uses entries, as a vCPU that
/// keeps moving `avail.idx` would. Stops when dropped or after `limit`.
pub struct Recycler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recycler {
    /// Fill `tq`'s available ring with `head`, then keep it full on another thread.
    pub fn start(mut tq: TestQueue, head: u16, limit: std::time::Duration) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let refill = move |tq: &mut TestQueue| {
            let used = tq.used_idx();
            while tq.avail_idx.wrapping_sub(used) < tq.size {
                tq.publish(head);
            }
        };
        refill(&mut tq);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let running = Arc::new(AtomicBool::new(false));
        let started = running.clone();
        let end = std::time::Instant::now() + limit;
        let thread = std::thread::spawn(move || {
            started.store(true, Ordering::Release);
            while !stopped.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                refill(&mut tq);
                std::hint::spin_loop();
            }
        });
        // The device starts once the driver is busy.
        while !running.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        Recycler {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Recycler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A file in the temp directory, removed on drop.
pub struct TempFile(std::path::PathBuf);

impl TempFile {
    /// A new file holding `contents`.
    pub fn with_contents(contents: &[u8]) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "flint-devices-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs a device's backend on a real `event-manager` loop, like the VMM's event loop does.
pub struct BackendLoop<D: super::VirtioDevice + 'static> {
    pub device: Arc<std::sync::Mutex<D>>,
    manager: event_manager::EventManager<BackendSubscriber<D>>,
}

/// Forwards a device's backend events from the event loop.
pub struct BackendSubscriber<D: super::VirtioDevice>(Arc<std::sync::Mutex<D>>);

impl<D: super::VirtioDevice> event_manager::MutEventSubscriber for BackendSubscriber<D> {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        self.0.lock().unwrap().init_backend(ops);
    }

    fn process(&mut self, events: event_manager::Events, ops: &mut event_manager::EventOps) {
        assert!(events.data() >= super::BACKEND_EVENT_BASE);
        self.0.lock().unwrap().process_backend(events, ops);
    }
}

impl<D: super::VirtioDevice + 'static> BackendLoop<D> {
    /// Register `device`'s backend with a fresh event manager.
    pub fn new(device: D) -> Self {
        use event_manager::SubscriberOps;
        let device = Arc::new(std::sync::Mutex::new(device));
        let mut manager = event_manager::EventManager::new().unwrap();
        manager.add_subscriber(BackendSubscriber(device.clone()));
        BackendLoop { device, manager }
    }

    /// Dispatch whatever is ready within `timeout_ms`; returns the number of events.
    pub fn run_once(&mut self, timeout_ms: i32) -> usize {
        self.manager.run_with_timeout(timeout_ms).unwrap()
    }

    /// Run the loop until `done` holds (checked after each round) or `timeout` passes.
    pub fn run_until(
        &mut self,
        timeout: std::time::Duration,
        mut done: impl FnMut(&mut D) -> bool,
    ) -> bool {
        let end = std::time::Instant::now() + timeout;
        loop {
            if done(&mut self.device.lock().unwrap()) {
                return true;
            }
            if std::time::Instant::now() >= end {
                return false;
            }
            self.run_once(10);
        }
    }

    /// The device, locked.
    pub fn dev(&self) -> std::sync::MutexGuard<'_, D> {
        self.device.lock().unwrap()
    }
}

/// Warnings and errors logged by each test thread, captured by a process-wide logger.
pub mod logs {
    use std::sync::{Mutex, OnceLock};

    /// One captured record: logging thread, target, message.
    type Line = (Option<String>, String, String);

    struct Capture(Mutex<Vec<Line>>);

    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::Level::Warn
        }

        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                let thread = std::thread::current().name().map(str::to_string);
                let line = (
                    thread,
                    record.target().to_string(),
                    record.args().to_string(),
                );
                self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        }

        fn flush(&self) {}
    }

    fn capture() -> &'static Capture {
        static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
        CAPTURE.get_or_init(|| {
            let c: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
            log::set_logger(c).expect("no other logger in the test binary");
            log::set_max_level(log::LevelFilter::Warn);
            c
        })
    }

    /// Start capturing (if not yet); returns a mark for [`since`].
    pub fn start() -> usize {
        capture().0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// `(target, message)` of every warning and error the calling thread logged since `mark`.
    pub fn since(mark: usize) -> Vec<(String, String)> {
        let me = std::thread::current().name().map(str::to_string);
        let lines = capture().0.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .skip(mark)
            .filter(|(thread, _, _)| *thread == me)
            .map(|(_, target, msg)| (target.clone(), msg.clone()))
            .collect()
    }
}
