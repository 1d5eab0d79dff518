//! virtio-rng / entropy device (virtio 1.2 section 5.4): fills the driver's device-writable
//! buffers with bytes from the host kernel's CSPRNG (`getrandom(2)`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arch::GuestMemoryMmap;
use event_manager::{EventOps, Events};
use log::debug;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::chain::pop_chain;
use super::{
    feature, take_queues, ActivateError, QueuePosition, VirtioDevice, VirtioInterrupt,
    BACKEND_EVENT_BASE, MAX_CHAINS_PER_PASS, VIRTIO_F_VERSION_1, VIRTIO_ID_RNG,
};
use crate::rate_limiter::RateLimiter;

/// The size of the device's only queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most random bytes handed out for one request; the rest of its buffers stay untouched.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Request counters.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Chains completed with random bytes.
    pub requests: AtomicU64,
    /// Random bytes handed to the guest.
    pub bytes: AtomicU64,
    /// Chains returned empty: broken chains, buffers outside guest memory, or a failed
    /// `getrandom`.
    pub invalid_chains: AtomicU64,
    /// Times a request did not fit the rate limiter and the queue paused until its timer.
    pub rate_limiter_throttled: AtomicU64,
}

/// Fill `buf` from the kernel's CSPRNG.
pub(crate) fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, exclusively borrowed buffer of `rest.len()` bytes, which
        // is all the kernel writes to; it keeps no reference after returning.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio entropy device.
pub struct Rng {
    active: Option<Active>,
    buf: Vec<u8>,
    metrics: Arc<RngMetrics>,
    /// The last pass used its budget with chains left.
    unfinished: bool,
    /// Bytes (bandwidth) and requests (ops) handed out.
    limiter: Option<RateLimiter>,
}

/// The event-loop data value of the rate limiter's timer.
const RATE_LIMITER_EVENT: u32 = BACKEND_EVENT_BASE;

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

impl Rng {
    /// An entropy device.
    pub fn new() -> Self {
        Rng {
            active: None,
            buf: Vec::new(),
            metrics: Arc::new(RngMetrics::default()),
            unfinished: false,
            limiter: None,
        }
    }

    /// Limit what the device hands out with `limiter`: each request takes the bytes it asks
    /// for (at most [`MAX_BYTES_PER_REQUEST`]) from the bandwidth bucket and one operation.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Apply `config` to the device's rate limiter from its next request on. Returns false
    /// when the device was built without one.
    pub fn update_rate_limiter(&mut self, config: &crate::rate_limiter::RateLimiterConfig) -> bool {
        crate::rate_limiter::update_limiter(&mut self.limiter, config)
    }

    /// The request counters; the handle stays valid for the device's lifetime.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }
}

/// The bytes a request asks for: its device-writable lengths, at most
/// [`MAX_BYTES_PER_REQUEST`] (what [`fill_chain`] would write).
fn wanted_bytes(chain: impl IntoIterator<Item = Descriptor>) -> u64 {
    chain
        .into_iter()
        .filter(|d| d.is_write_only())
        .fold(0u64, |n, d| n.saturating_add(u64::from(d.len())))
        .min(MAX_BYTES_PER_REQUEST as u64)
}

/// Fill the device-writable buffers of `chain` (up to [`MAX_BYTES_PER_REQUEST`] bytes).
/// Returns the used length, or `None` when the chain is unusable.
fn fill_chain(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
    buf: &mut Vec<u8>,
) -> Option<u32> {
    let mut targets = Vec::new();
    let mut want = 0usize;
    let mut last = None;
    for d in chain {
        last = Some(d);
        if !d.is_write_only() || want >= MAX_BYTES_PER_REQUEST {
            continue;
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return None;
        }
        let n = (d.len() as usize).min(MAX_BYTES_PER_REQUEST - want);
        targets.push((d.addr(), n));
        want += n;
    }
    // The iterator stops early (leaving `next` set) on loops and unreadable descriptors.
    if last.is_none_or(|d| d.has_next()) {
        return None;
    }
    buf.resize(want, 0);
    fill_random(buf)
        .map_err(|e| crate::guest_warn!("virtio-rng: getrandom failed: {e}"))
        .ok()?;
    let mut at = 0;
    for (addr, n) in targets {
        mem.write_slice(&buf[at..at + n], addr).ok()?;
        at += n;
    }
    // `want` is at most MAX_BYTES_PER_REQUEST.
    Some(want as u32)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1)
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let [queue] = take_queues(queues)?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let (Some(active), 0) = (self.active.as_mut(), index) else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        if self.limiter.as_ref().is_some_and(RateLimiter::is_blocked) {
            // The limiter's timer restarts the queue.
            return;
        }
        let mut budget = MAX_CHAINS_PER_PASS;
        while budget > 0 {
            let Some(chain) = pop_chain(&mut active.queue, mem) else {
                break;
            };
            budget -= 1;
            if let Some(limiter) = self.limiter.as_mut() {
                if !limiter.consume(wanted_bytes(chain.clone())) {
                    // Left in the queue until the limiter's timer fires.
                    active.queue.go_to_previous_position();
                    self.metrics
                        .rate_limiter_throttled
                        .fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            let head = chain.head_index();
            let len = match fill_chain(mem, chain, &mut self.buf) {
                Some(len) => {
                    self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .bytes
                        .fetch_add(u64::from(len), Ordering::Relaxed);
                    len
                }
                None => {
                    debug!("virtio-rng: unusable descriptor chain");
                    self.metrics.invalid_chains.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            if let Err(e) = active.queue.add_used(mem, head, len) {
                crate::guest_warn!("virtio-rng: cannot return a buffer: {e}");
                break;
            }
            used_any = true;
        }
        if used_any && active.queue.needs_notification(mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        // Possibly nothing is left; the extra pass then finds the ring empty.
        self.unfinished = budget == 0;
    }

    fn take_unfinished(&mut self) -> u64 {
        u64::from(std::mem::take(&mut self.unfinished))
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.active
            .iter()
            .map(|a| QueuePosition::of(&a.queue))
            .collect()
    }

    fn reset(&mut self) {
        self.active = None;
        self.unfinished = false;
        if let Some(limiter) = self.limiter.as_mut() {
            limiter.unblock();
        }
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn init_backend(&mut self, ops: &mut EventOps) {
        crate::rate_limiter::watch_timer(&self.limiter, ops, RATE_LIMITER_EVENT, &"virtio-rng");
    }

    fn process_backend(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() != RATE_LIMITER_EVENT {
            return;
        }
        if let Some(limiter) = self.limiter.as_mut() {
            limiter.timer_fired();
            self.process_queue(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{
        guest_memory, interrupt, irq_count, r, w, Recycler, TestQueue,
    };
    use std::time::Duration;
    use vm_memory::GuestAddress;

    const BUF: u64 = 0x10_0000;

    fn setup() -> (Rng, TestQueue, Arc<VirtioInterrupt>) {
        let mem = guest_memory(0x40_0000);
        let tq = TestQueue::new(&mem, 0, QUEUE_SIZE);
        let irq = interrupt();
        let mut rng = Rng::new();
        rng.activate(
            mem,
            feature(VIRTIO_F_VERSION_1),
            vec![tq.queue()],
            irq.clone(),
        )
        .unwrap();
        (rng, tq, irq)
    }

    fn read(tq: &TestQueue, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        tq.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn device_basics() {
        let rng = Rng::default();
        assert_eq!(rng.device_type(), VIRTIO_ID_RNG);
        assert_eq!(rng.queue_max_sizes(), &[256]);
        assert_eq!(rng.avail_features(), feature(VIRTIO_F_VERSION_1));
        let mut d = [0xffu8; 4];
        rng.read_config(0, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn the_rate_limiter_holds_requests_until_it_allows_them() {
        use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
        let (rng, mut tq, _irq) = setup();
        // 100 bytes an hour: the first request of 64 passes, the second waits.
        let slow = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 100,
                one_time_burst: 0,
                refill_time_ms: 3_600_000,
            }),
            ops: None,
        };
        let mut rng = rng.with_rate_limiter(RateLimiter::new(&slow).unwrap());
        tq.add_chain(&[w(BUF, 64)]);
        tq.add_chain(&[w(BUF + 0x1000, 64)]);
        rng.process_queue(0);
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(
            rng.metrics().rate_limiter_throttled.load(Ordering::Relaxed),
            1
        );
        // A kick while blocked does nothing.
        rng.process_queue(0);
        assert_eq!(tq.used_idx(), 1);
        // Lifting the limit: the timer fires and the request waiting is served.
        assert!(rng.update_rate_limiter(&RateLimiterConfig::default()));
        std::thread::sleep(Duration::from_millis(5));
        rng.limiter.as_mut().unwrap().timer_fired();
        rng.process_queue(0);
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(rng.metrics().bytes.load(Ordering::Relaxed), 128);
    }

    #[test]
    fn fills_writable_buffers() {
        let (mut rng, mut tq, irq) = setup();
        let head = tq.add_chain(&[w(BUF, 64), r(BUF + 0x1000, 64), w(BUF + 0x2000, 192)]);
        rng.process_queue(0);
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used_elem(0), (u32::from(head), 256));
        // 64 zero bytes from a CSPRNG: practically impossible.
        assert_ne!(read(&tq, BUF, 64), vec![0; 64]);
        assert_ne!(read(&tq, BUF + 0x2000, 192), vec![0; 192]);
        assert_eq!(
            read(&tq, BUF + 0x1000, 64),
            vec![0; 64],
            "readable untouched"
        );
        assert_ne!(read(&tq, BUF, 64), read(&tq, BUF + 0x2000, 64));
        assert_eq!(irq_count(&irq), 1);
        assert_eq!(rng.metrics().bytes.load(Ordering::Relaxed), 256);
    }

    #[test]
    fn caps_bytes_per_request() {
        let (mut rng, mut tq, _irq) = setup();
        tq.add_chain(&[w(BUF, 0x8000), w(BUF + 0x8000, 0x10000)]);
        rng.process_queue(0);
        assert_eq!(tq.used_elem(0).1, MAX_BYTES_PER_REQUEST as u32);
        let tail = read(&tq, BUF + MAX_BYTES_PER_REQUEST as u64, 0x8000);
        assert_eq!(tail, vec![0; 0x8000], "past the cap untouched");
    }

    #[test]
    fn bad_chains_are_consumed_empty() {
        let (mut rng, mut tq, irq) = setup();
        tq.add_chain(&[w(BUF, 16), w(0x40_0000 - 8, 16)]);
        tq.add_chain(&[w(u64::MAX, 2)]);
        // A loop.
        tq.set_desc(10, BUF, 16, 3, 11);
        tq.set_desc(11, BUF, 16, 3, 10);
        tq.publish(10);
        tq.add_chain(&[r(BUF, 16)]);
        rng.process_queue(0);
        assert_eq!(tq.used_idx(), 4);
        assert_eq!(tq.used_elem(0).1, 0);
        assert_eq!(tq.used_elem(1).1, 0);
        assert_eq!(tq.used_elem(2), (10, 0));
        assert_eq!(tq.used_elem(3).1, 0, "nothing writable");
        assert_eq!(read(&tq, BUF, 16), vec![0; 16]);
        assert_eq!(irq_count(&irq), 1);
        assert_eq!(rng.metrics().invalid_chains.load(Ordering::Relaxed), 3);
        // Still serving.
        tq.add_chain(&[w(BUF, 8)]);
        rng.process_queue(0);
        assert_eq!(tq.used_elem(4).1, 8);
    }

    #[test]
    fn a_driver_that_keeps_adding_buffers_cannot_hold_a_pass() {
        let (mut rng, mut tq, _irq) = setup();
        // Large requests: the driver has time to add more while the device works.
        let head = tq.add_chain(&[w(BUF, MAX_BYTES_PER_REQUEST as u32)]);
        let view = tq.clone();
        let driver = Recycler::start(tq, head, Duration::from_secs(3));
        rng.process_queue(0);
        let used = view.used_idx();
        drop(driver);
        assert_eq!(usize::from(used), MAX_CHAINS_PER_PASS);
        assert_eq!(
            rng.take_unfinished(),
            1,
            "the queue is left for another pass"
        );
        assert_eq!(rng.take_unfinished(), 0);
    }

    #[test]
    fn inactive_or_reset_does_nothing() {
        let (mut rng, mut tq, _irq) = setup();
        rng.process_queue(1);
        rng.reset();
        tq.add_chain(&[w(BUF, 8)]);
        rng.process_queue(0);
        assert_eq!(tq.used_idx(), 0);
        let mem = tq.mem.clone();
        assert_eq!(
            rng.activate(mem, 0, vec![], interrupt()),
            Err(ActivateError::QueueCount { want: 1, got: 0 })
        );
    }
}
