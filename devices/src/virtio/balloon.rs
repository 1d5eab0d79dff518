//! virtio-balloon / traditional memory balloon device (virtio 1.2 section 5.5).
//!
//! The host sets a target (`num_pages` in the configuration space); the guest driver gives
//! pages to the balloon through the inflate queue and takes them back through the deflate
//! queue, and writes how many it holds (`actual`). Pages the guest inflates, and the free
//! ranges it reports on the free page reporting queue, are given back to the host with
//! `madvise(MADV_DONTNEED)`: guest memory is always a private mapping (anonymous, or a snapshot
//! file mapped copy-on-write), so the host frees the pages and the guest finds zeroes (or the
//! snapshot's contents) when it touches them again. flint refuses the balloon with huge pages,
//! whose 2 MiB pages 4 KiB page frame numbers cannot give back.
//!
//! Queues, in index order: inflate, deflate, then statistics (`VIRTIO_BALLOON_F_STATS_VQ`) and
//! free page reporting (`VIRTIO_BALLOON_F_REPORTING`) when offered and accepted (the driver
//! numbers only the queues it sets up). Statistics: the driver keeps one buffer of
//! `(le16 tag, le64 value)` entries in the statistics queue; the device reads it and holds it,
//! and at each polling interval hands it back so that the driver refills it.
//!
//! Everything the guest sends is untrusted: page frame numbers outside guest memory are
//! counted and ignored, every chain has a size limit, and one pass takes at most
//! [`MAX_CHAINS_PER_PASS`] chains.

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arch::GuestMemoryMmap;
use event_manager::{EventOps, Events};
use log::debug;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::timerfd::TimerFd;

use super::chain::{pop_chain, read_segments, segments, Direction};
use super::{
    feature, ActivateError, QueuePosition, VirtioDevice, VirtioInterrupt, BACKEND_EVENT_BASE,
    MAX_CHAINS_PER_PASS, VIRTIO_F_VERSION_1,
};

pub use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;

/// Feature bits (virtio 1.2 section 5.5.3).
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The balloon's page size: page frame numbers count 4 KiB pages whatever the guest's.
pub const PAGE_SHIFT: u32 = 12;
const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Most bytes of page frame numbers one inflate or deflate chain may hold (16384 pages; Linux
/// sends 256 at a time).
pub const MAX_PFN_BYTES: u64 = 64 * 1024;
/// Most bytes of one statistics buffer (64 entries; there are 16 tags).
pub const MAX_STATS_BYTES: u64 = 64 * 10;
/// Bytes of one statistics entry: `le16 tag`, `le64 value`, packed.
const STAT_ENTRY: usize = 10;

/// The statistics tags virtio 1.2 defines (section 5.5.6.3), by tag, as the API names them.
pub const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kill",
    "alloc_stall",
    "async_scan",
    "direct_scan",
    "async_reclaim",
    "direct_reclaim",
];

/// What the balloon offers the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonFeatures {
    /// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: the guest takes pages back when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Polling interval of the statistics in seconds; 0: no statistics queue.
    pub stats_interval_s: u16,
    /// `VIRTIO_BALLOON_F_REPORTING`: the guest reports free memory, which the host takes back.
    pub free_page_reporting: bool,
}

/// Counters.
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// Pages the guest put in the balloon (given back to the host).
    pub inflated_pages: AtomicU64,
    /// Pages the guest took back out of the balloon.
    pub deflated_pages: AtomicU64,
    /// Bytes of free memory the guest reported (given back to the host).
    pub reported_bytes: AtomicU64,
    /// Statistics buffers read.
    pub stats_updates: AtomicU64,
    /// Page frame numbers and reported ranges outside guest memory, ignored.
    pub invalid_pages: AtomicU64,
    /// Chains returned unused: broken, pointing the wrong way or outside guest memory, too long.
    pub invalid_chains: AtomicU64,
    /// `madvise` calls the host refused.
    pub discard_failures: AtomicU64,
}

/// The latest statistics the guest reported: a value per tag it sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestStats(pub [Option<u64>; 16]);

impl GuestStats {
    /// `(API name, value)` of each statistic the guest reported, in tag order.
    pub fn reported(&self) -> Vec<(&'static str, u64)> {
        STAT_NAMES
            .iter()
            .zip(self.0)
            .filter_map(|(name, v)| v.map(|v| (*name, v)))
            .collect()
    }

    /// Parse a statistics buffer: whole 10-byte entries; unknown tags are ignored, a later
    /// entry of a tag replaces an earlier one.
    pub fn parse(buf: &[u8]) -> GuestStats {
        let mut stats = GuestStats::default();
        for entry in buf.chunks_exact(STAT_ENTRY) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&entry[2..]);
            if let Some(slot) = stats.0.get_mut(usize::from(tag)) {
                *slot = Some(u64::from_le_bytes(value));
            }
        }
        stats
    }
}

/// What a snapshot keeps of the device beyond its queues: what the guest wrote and sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    /// The target the host set last (pages).
    pub target_pages: u32,
    /// The statistics polling interval in seconds (0: no statistics).
    pub stats_interval_s: u16,
    /// The `actual` field the driver wrote (pages it holds).
    pub actual_pages: u32,
    /// The latest statistics.
    pub stats: GuestStats,
}

/// The roles of the queues the driver set up, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    roles: Vec<Role>,
    interrupt: Arc<VirtioInterrupt>,
    /// The statistics buffer the device holds until the next poll.
    stats_head: Option<u16>,
}

/// A virtio memory balloon.
pub struct Balloon {
    features: BalloonFeatures,
    queue_sizes: Vec<u16>,
    /// `num_pages` (target) and `actual`, little-endian.
    config: [u8; 8],
    active: Option<Active>,
    stats: Arc<Mutex<GuestStats>>,
    /// The statistics polling timer (with the statistics queue only).
    timer: Option<TimerFd>,
    metrics: Arc<BalloonMetrics>,
    unfinished: u64,
}

/// The event-loop data value of the statistics timer.
const STATS_TIMER_EVENT: u32 = BACKEND_EVENT_BASE;

fn new_timer() -> std::io::Result<TimerFd> {
    // SAFETY: plain syscall with constant arguments; the result is checked below.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a timerfd we just created and own exclusively.
    Ok(unsafe { TimerFd::from_raw_fd(fd) })
}

impl Balloon {
    /// A balloon of `target_pages` 4 KiB pages offering `features`. Creates the statistics
    /// timer (so call it where `timerfd_create` is allowed).
    pub fn new(target_pages: u32, features: BalloonFeatures) -> std::io::Result<Balloon> {
        let mut queue_sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        let timer = if features.stats_interval_s > 0 {
            queue_sizes.push(QUEUE_SIZE);
            let mut timer = new_timer()?;
            let every = Duration::from_secs(features.stats_interval_s.into());
            timer.reset(every, Some(every))?;
            Some(timer)
        } else {
            None
        };
        if features.free_page_reporting {
            queue_sizes.push(QUEUE_SIZE);
        }
        let mut config = [0u8; 8];
        config[..4].copy_from_slice(&target_pages.to_le_bytes());
        Ok(Balloon {
            features,
            queue_sizes,
            config,
            active: None,
            stats: Default::default(),
            timer,
            metrics: Default::default(),
            unfinished: 0,
        })
    }

    /// The counters; the handle stays valid for the device's lifetime.
    pub fn metrics(&self) -> Arc<BalloonMetrics> {
        self.metrics.clone()
    }

    /// The target the guest is asked to reach, in pages.
    pub fn target_pages(&self) -> u32 {
        u32::from_le_bytes([
            self.config[0],
            self.config[1],
            self.config[2],
            self.config[3],
        ])
    }

    /// The pages the guest says the balloon holds.
    pub fn actual_pages(&self) -> u32 {
        u32::from_le_bytes([
            self.config[4],
            self.config[5],
            self.config[6],
            self.config[7],
        ])
    }

    /// Ask the guest for a balloon of `pages`; the caller tells the driver the configuration
    /// changed (the transport's config interrupt).
    pub fn set_target_pages(&mut self, pages: u32) {
        self.config[..4].copy_from_slice(&pages.to_le_bytes());
    }

    /// The latest statistics the guest reported.
    pub fn stats(&self) -> GuestStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the device has a statistics queue.
    pub fn has_stats(&self) -> bool {
        self.timer.is_some()
    }

    /// Poll the statistics every `seconds` (more than 0) from now on, asking for them at once.
    /// False when the device has no statistics queue.
    pub fn set_stats_interval(&mut self, seconds: u16) -> bool {
        let Some(timer) = self.timer.as_mut() else {
            return false;
        };
        if seconds == 0 {
            return false;
        }
        self.features.stats_interval_s = seconds;
        let every = Duration::from_secs(seconds.into());
        if let Err(e) = timer.reset(every, Some(every)) {
            log::warn!("virtio-balloon: cannot arm the statistics timer: {e}");
        }
        self.request_stats();
        true
    }

    /// What a snapshot keeps.
    pub fn state(&self) -> BalloonState {
        BalloonState {
            target_pages: self.target_pages(),
            stats_interval_s: self.features.stats_interval_s,
            actual_pages: self.actual_pages(),
            stats: self.stats(),
        }
    }

    /// Continue from `state` (after the transport restored the queues).
    pub fn restore_state(&mut self, state: &BalloonState) {
        self.set_target_pages(state.target_pages);
        if state.stats_interval_s > 0 && self.timer.is_some() {
            self.features.stats_interval_s = state.stats_interval_s;
            let every = Duration::from_secs(state.stats_interval_s.into());
            if let Some(Err(e)) = self.timer.as_mut().map(|t| t.reset(every, Some(every))) {
                log::warn!("virtio-balloon: cannot arm the statistics timer: {e}");
            }
        }
        self.config[4..].copy_from_slice(&state.actual_pages.to_le_bytes());
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = state.stats;
    }

    /// Hand the statistics buffer back so that the driver refills it.
    fn request_stats(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(index) = active.roles.iter().position(|r| *r == Role::Stats) else {
            return;
        };
        let Some(head) = active.stats_head.take() else {
            return;
        };
        let queue = &mut active.queues[index];
        if let Err(e) = queue.add_used(&active.mem, head, 0) {
            crate::guest_warn!("virtio-balloon: cannot return the statistics buffer: {e}");
            return;
        }
        if queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
    }
}

/// Give the guest memory `[addr, addr + len)` back to the host. Returns the bytes given back;
/// parts outside guest memory are skipped (and counted in `invalid_pages`).
fn discard(mem: &GuestMemoryMmap, addr: u64, len: u64, metrics: &BalloonMetrics) -> u64 {
    let mut cur = addr;
    let end = addr.saturating_add(len);
    let mut done = 0;
    while cur < end {
        let Some(region) = mem.find_region(GuestAddress(cur)) else {
            // Skip to the next page; ranges are page-aligned by the callers.
            metrics.invalid_pages.fetch_add(1, Ordering::Relaxed);
            cur = cur.saturating_add(PAGE_SIZE);
            continue;
        };
        let region_end = region.start_addr().0.saturating_add(region.len());
        let n = (end.min(region_end) - cur) as usize;
        match mem.get_host_address(GuestAddress(cur)) {
            Ok(host) => {
                // SAFETY: `[host, host + n)` lies inside one mapped guest memory region (checked
                // above against the region's bounds); MADV_DONTNEED on a private mapping only
                // drops its pages, which read back as zeroes or the mapped file's contents; no
                // Rust reference points into guest memory across this call.
                let r = unsafe { libc::madvise(host.cast(), n, libc::MADV_DONTNEED) };
                if r == 0 {
                    done += n as u64;
                } else {
                    metrics.discard_failures.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        "virtio-balloon: madvise failed: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
            Err(_) => {
                metrics.invalid_pages.fetch_add(1, Ordering::Relaxed);
            }
        }
        cur += n as u64;
    }
    done
}

/// Give back (when `give_back`) the pages whose frame numbers `buf` holds (le32 each);
/// contiguous numbers are given back together. Returns the number of valid pages.
fn handle_pfns(
    mem: &GuestMemoryMmap,
    buf: &[u8],
    give_back: bool,
    metrics: &BalloonMetrics,
) -> u64 {
    let mut valid = 0;
    // The current run: first address and length in bytes.
    let mut run: Option<(u64, u64)> = None;
    let flush = |run: Option<(u64, u64)>| {
        if let (Some((start, len)), true) = (run, give_back) {
            discard(mem, start, len, metrics);
        }
    };
    for chunk in buf.chunks_exact(4) {
        let pfn = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let addr = u64::from(pfn) << PAGE_SHIFT;
        if !mem.check_range(GuestAddress(addr), PAGE_SIZE as usize) {
            metrics.invalid_pages.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        valid += 1;
        match &mut run {
            Some((start, len)) if *start + *len == addr => *len += PAGE_SIZE,
            _ => {
                flush(run.take());
                run = Some((addr, PAGE_SIZE));
            }
        }
    }
    flush(run);
    valid
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let mut f = feature(VIRTIO_F_VERSION_1);
        if self.features.deflate_on_oom {
            f |= feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
        }
        if self.timer.is_some() {
            f |= feature(VIRTIO_BALLOON_F_STATS_VQ);
        }
        if self.features.free_page_reporting {
            f |= feature(VIRTIO_BALLOON_F_REPORTING);
        }
        f
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let mut ignored = false;
        for (i, b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(o @ 4..=7) => self.config[o as usize] = *b,
                _ => ignored = true,
            }
        }
        if ignored {
            crate::guest_warn!("virtio-balloon: write to read-only configuration ignored");
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if acked_features & feature(VIRTIO_BALLOON_F_STATS_VQ) != 0 {
            roles.push(Role::Stats);
        }
        if acked_features & feature(VIRTIO_BALLOON_F_REPORTING) != 0 {
            roles.push(Role::Reporting);
        }
        if queues.len() != roles.len() {
            return Err(ActivateError::QueueCount {
                want: roles.len(),
                got: queues.len(),
            });
        }
        let count = queues.len();
        self.active = Some(Active {
            mem,
            queues,
            roles,
            interrupt,
            stats_head: None,
        });
        // Linux makes its first statistics buffer available before it sets DRIVER_OK: a
        // notification the device could not act on yet. Look at every queue once.
        for index in 0..count {
            self.process_queue(index);
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(&role) = active.roles.get(index) else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[index];
        let metrics = &self.metrics;
        let mut used_any = false;
        let mut budget = MAX_CHAINS_PER_PASS;
        let mut buf = Vec::new();
        while budget > 0 {
            let Some(chain) = pop_chain(queue, mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            match role {
                Role::Inflate | Role::Deflate => {
                    match segments(mem, chain, Direction::DeviceReads, MAX_PFN_BYTES) {
                        Ok((segs, _)) => {
                            if read_segments(mem, &segs, &mut buf) {
                                let inflate = role == Role::Inflate;
                                let pages = handle_pfns(mem, &buf, inflate, metrics);
                                let counter = if inflate {
                                    &metrics.inflated_pages
                                } else {
                                    &metrics.deflated_pages
                                };
                                counter.fetch_add(pages, Ordering::Relaxed);
                            } else {
                                metrics.invalid_chains.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            debug!("virtio-balloon: {e}");
                            metrics.invalid_chains.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Role::Reporting => {
                    // Linux makes the reported ranges device-writable; either way is taken.
                    let mut last = None;
                    for d in chain {
                        last = Some(d);
                        let start = d.addr().0.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
                        let end = d.addr().0.saturating_add(u64::from(d.len())) & !(PAGE_SIZE - 1);
                        if end <= start {
                            continue;
                        }
                        if !mem.check_range(GuestAddress(start), (end - start) as usize) {
                            metrics
                                .invalid_pages
                                .fetch_add((end - start) >> PAGE_SHIFT, Ordering::Relaxed);
                            continue;
                        }
                        let n = discard(mem, start, end - start, metrics);
                        metrics.reported_bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    if last.is_none_or(|d| d.has_next()) {
                        metrics.invalid_chains.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Role::Stats => {
                    match segments(mem, chain, Direction::DeviceReads, MAX_STATS_BYTES) {
                        Ok((segs, _)) => {
                            if read_segments(mem, &segs, &mut buf) {
                                *self.stats.lock().unwrap_or_else(|e| e.into_inner()) =
                                    GuestStats::parse(&buf);
                                metrics.stats_updates.fetch_add(1, Ordering::Relaxed);
                                // A driver that adds a second buffer gets the first back.
                                if let Some(old) = active.stats_head.replace(head) {
                                    if queue.add_used(mem, old, 0).is_err() {
                                        break;
                                    }
                                    used_any = true;
                                }
                                continue;
                            }
                            metrics.invalid_chains.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            debug!("virtio-balloon: statistics: {e}");
                            metrics.invalid_chains.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                crate::guest_warn!("virtio-balloon: cannot return a buffer: {e}");
                break;
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        if budget == 0 {
            self.unfinished |= 1 << index;
        }
    }

    fn take_unfinished(&mut self) -> u64 {
        std::mem::take(&mut self.unfinished)
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        let Some(active) = &self.active else {
            return Vec::new();
        };
        active
            .queues
            .iter()
            .zip(&active.roles)
            .map(|(q, role)| {
                let mut pos = QueuePosition::of(q);
                if *role == Role::Stats && active.stats_head.is_some() {
                    // The held buffer is the last one taken: give it back to be taken again.
                    pos.next_avail = pos.next_avail.wrapping_sub(1);
                }
                pos
            })
            .collect()
    }

    fn reset(&mut self) {
        self.active = None;
        self.unfinished = 0;
        self.config[4..].fill(0);
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn init_backend(&mut self, ops: &mut EventOps) {
        if let Some(timer) = &self.timer {
            let ev = Events::with_data_raw(
                timer.as_raw_fd(),
                STATS_TIMER_EVENT,
                vmm_sys_util::epoll::EventSet::IN,
            );
            if let Err(e) = ops.add(ev) {
                log::warn!("virtio-balloon: cannot watch the statistics timer: {e:?}");
            }
        }
    }

    fn process_backend(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() != STATS_TIMER_EVENT {
            return;
        }
        if let Some(timer) = self.timer.as_mut() {
            // Drain the expiration count; `EAGAIN` (a spurious wake-up) is harmless.
            let _ = timer.wait();
        }
        self.request_stats();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{
        guest_memory, interrupt, irq_count, r, w, Recycler, TestQueue,
    };
    use vm_memory::Bytes;

    const MEM: usize = 0x40_0000;
    /// Where the test puts the buffers the driver sends (PFN arrays, statistics).
    const BUF: u64 = 0x10_0000;
    /// Guest pages the tests fill and give back.
    const DATA: u64 = 0x20_0000;

    fn features(stats: u16, reporting: bool) -> BalloonFeatures {
        BalloonFeatures {
            deflate_on_oom: true,
            stats_interval_s: stats,
            free_page_reporting: reporting,
        }
    }

    /// A balloon activated with all its queues (each at its own 64 KiB of memory).
    fn setup(f: BalloonFeatures) -> (Balloon, Vec<TestQueue>, Arc<VirtioInterrupt>) {
        let mem = guest_memory(MEM);
        let mut b = Balloon::new(0, f).unwrap();
        let tqs: Vec<_> = (0..b.queue_max_sizes().len())
            .map(|i| TestQueue::new(&mem, i as u64 * 0x1_0000, QUEUE_SIZE))
            .collect();
        let irq = interrupt();
        b.activate(
            mem,
            b.avail_features(),
            tqs.iter().map(TestQueue::queue).collect(),
            irq.clone(),
        )
        .unwrap();
        (b, tqs, irq)
    }

    fn fill(tq: &TestQueue, addr: u64, len: usize, byte: u8) {
        tq.mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    fn read(tq: &TestQueue, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        tq.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn pfns(tq: &TestQueue, addr: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        tq.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        bytes.len() as u32
    }

    #[test]
    fn features_queues_and_configuration_follow_the_settings() {
        let b = Balloon::new(256, BalloonFeatures::default()).unwrap();
        assert_eq!(b.device_type(), VIRTIO_ID_BALLOON);
        assert_eq!(b.queue_max_sizes(), &[256, 256]);
        assert_eq!(b.avail_features(), feature(VIRTIO_F_VERSION_1));
        assert!(!b.has_stats());
        let mut all = Balloon::new(256, features(5, true)).unwrap();
        assert_eq!(all.queue_max_sizes().len(), 4);
        assert_eq!(
            all.avail_features(),
            feature(VIRTIO_F_VERSION_1)
                | feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
                | feature(VIRTIO_BALLOON_F_STATS_VQ)
                | feature(VIRTIO_BALLOON_F_REPORTING)
        );
        let mut cfg = [0u8; 8];
        all.read_config(0, &mut cfg);
        assert_eq!(cfg, [0, 1, 0, 0, 0, 0, 0, 0]);
        // The driver writes `actual`; the target is the host's.
        all.write_config(4, &7u32.to_le_bytes());
        all.write_config(0, &[9, 9, 9, 9]);
        all.write_config(u64::MAX, &[1, 2]);
        assert_eq!((all.target_pages(), all.actual_pages()), (256, 7));
        all.set_target_pages(1000);
        assert_eq!(all.target_pages(), 1000);
        all.reset();
        assert_eq!(all.actual_pages(), 0);
    }

    #[test]
    fn inflated_pages_go_back_to_the_host_and_bad_frame_numbers_are_counted() {
        let (mut b, mut tqs, irq) = setup(features(0, false));
        let pages = 4;
        fill(&tqs[0], DATA, pages * 4096, 0xaa);
        let first = (DATA >> 12) as u32;
        // Two runs of valid pages, a page past the end of memory, the largest number.
        let len = pfns(
            &tqs[0],
            BUF,
            &[first, first + 1, (MEM >> 12) as u32, first + 3, u32::MAX],
        );
        let head = tqs[0].add_chain(&[r(BUF, len)]);
        b.process_queue(0);
        assert_eq!(tqs[0].used_elem(0), (u32::from(head), 0));
        assert_eq!(irq_count(&irq), 1);
        assert_eq!(read(&tqs[0], DATA, 8192), vec![0; 8192], "given back");
        assert_eq!(read(&tqs[0], DATA + 0x2000, 4096), vec![0xaa; 4096], "kept");
        assert_eq!(
            read(&tqs[0], DATA + 0x3000, 4096),
            vec![0; 4096],
            "given back"
        );
        let m = b.metrics();
        assert_eq!(m.inflated_pages.load(Ordering::Relaxed), 3);
        assert_eq!(m.invalid_pages.load(Ordering::Relaxed), 2);
        // Deflating gives nothing back: the guest uses the pages again.
        fill(&tqs[1], DATA, 4096, 0xbb);
        let len = pfns(&tqs[1], BUF, &[first, u32::MAX]);
        tqs[1].add_chain(&[r(BUF, len)]);
        b.process_queue(1);
        assert_eq!(tqs[1].used_idx(), 1);
        assert_eq!(read(&tqs[1], DATA, 4096), vec![0xbb; 4096]);
        assert_eq!(m.deflated_pages.load(Ordering::Relaxed), 1);
        assert_eq!(m.invalid_pages.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn hostile_chains_are_returned_unused_and_counted() {
        let (mut b, mut tqs, _irq) = setup(features(0, false));
        fill(&tqs[0], DATA, 4096, 0xaa);
        let len = pfns(&tqs[0], BUF, &[(DATA >> 12) as u32]);
        // Device-writable PFNs, a buffer past memory, one longer than the limit, a loop.
        tqs[0].add_chain(&[w(BUF, len)]);
        tqs[0].add_chain(&[r(MEM as u64 - 2, 4)]);
        tqs[0].add_chain(&[r(BUF, 0x8000), r(BUF + 0x8000, 0x8004)]);
        tqs[0].set_desc(20, BUF, len, 1, 21);
        tqs[0].set_desc(21, BUF, len, 1, 20);
        tqs[0].publish(20);
        // Bytes that are not a whole number: the trailing bytes are ignored.
        tqs[0].add_chain(&[r(BUF, 3)]);
        b.process_queue(0);
        assert_eq!(tqs[0].used_idx(), 5);
        assert_eq!(
            read(&tqs[0], DATA, 4096),
            vec![0xaa; 4096],
            "nothing given back"
        );
        let m = b.metrics();
        assert_eq!(m.invalid_chains.load(Ordering::Relaxed), 4);
        assert_eq!(m.inflated_pages.load(Ordering::Relaxed), 0);
        // Still serving.
        tqs[0].add_chain(&[r(BUF, len)]);
        b.process_queue(0);
        assert_eq!(m.inflated_pages.load(Ordering::Relaxed), 1);
        // Queues that do not exist and an inactive device do nothing.
        b.process_queue(7);
        b.reset();
        tqs[0].add_chain(&[r(BUF, len)]);
        b.process_queue(0);
        assert_eq!(tqs[0].used_idx(), 6);
    }

    fn stat(tag: u16, value: u64) -> Vec<u8> {
        let mut v = tag.to_le_bytes().to_vec();
        v.extend_from_slice(&value.to_le_bytes());
        v
    }

    #[test]
    fn statistics_are_parsed_held_and_handed_back_at_each_poll() {
        let (mut b, mut tqs, irq) = setup(features(3600, false));
        let mut buf = stat(4, 1 << 20);
        buf.extend(stat(5, 512 << 20));
        buf.extend(stat(99, 1)); // unknown tag
        buf.extend(stat(4, 2 << 20)); // repeated: the later one counts
        buf.extend([1, 2, 3]); // partial entry
        tqs[2].mem.write_slice(&buf, GuestAddress(BUF)).unwrap();
        let head = tqs[2].add_chain(&[r(BUF, buf.len() as u32)]);
        b.process_queue(2);
        assert_eq!(tqs[2].used_idx(), 0, "held until the next poll");
        assert_eq!(
            b.stats().reported(),
            vec![("free_memory", 2 << 20), ("total_memory", 512 << 20)]
        );
        // A snapshot now gives the held buffer back to be taken again.
        let pos = b.queue_positions();
        assert_eq!(pos[2].next_avail, 0);
        assert_eq!(pos[0].next_avail, 0);
        // Polling (here: a new interval, which asks at once) hands it back.
        assert!(b.set_stats_interval(1));
        assert_eq!(tqs[2].used_elem(0), (u32::from(head), 0));
        assert_eq!(irq_count(&irq), 1);
        assert!(!b.set_stats_interval(0), "statistics cannot be turned off");
        // Nothing held: a poll does nothing.
        b.request_stats();
        assert_eq!(tqs[2].used_idx(), 1);
        // A buffer too long, or writable, is returned at once.
        tqs[2].add_chain(&[r(BUF, MAX_STATS_BYTES as u32 + 10)]);
        tqs[2].add_chain(&[w(BUF, 10)]);
        b.process_queue(2);
        assert_eq!(tqs[2].used_idx(), 3);
        // Two buffers: the first comes back, the second is held.
        let first = tqs[2].add_chain(&[r(BUF, 10)]);
        tqs[2].add_chain(&[r(BUF, 10)]);
        b.process_queue(2);
        assert_eq!(tqs[2].used_idx(), 4);
        assert_eq!(tqs[2].used_elem(3).0, u32::from(first));
        b.set_target_pages(512);
        b.write_config(4, &100u32.to_le_bytes());
        let state = b.state();
        assert_eq!(state.stats_interval_s, 1);
        let mut fresh = Balloon::new(0, features(3600, false)).unwrap();
        fresh.restore_state(&state);
        assert_eq!(fresh.stats().reported(), vec![("free_memory", 1 << 20)]);
        assert_eq!((fresh.target_pages(), fresh.actual_pages()), (512, 100));
        assert_eq!(fresh.state(), state);
        assert_eq!(b.metrics().stats_updates.load(Ordering::Relaxed), 3);
        let none = Balloon::new(0, features(0, false)).unwrap();
        assert!(!none.has_stats());
    }

    #[test]
    fn reported_free_ranges_go_back_to_the_host() {
        // No statistics queue: reporting is queue 2.
        let (mut b, mut tqs, _irq) = setup(features(0, true));
        assert_eq!(tqs.len(), 3);
        fill(&tqs[2], DATA, 0x4000, 0xcc);
        // Whole pages inside a range that starts and ends mid-page; one range outside memory.
        tqs[2].add_chain(&[w(DATA + 0x800, 0x2000), w(MEM as u64, 0x1000)]);
        b.process_queue(2);
        assert_eq!(tqs[2].used_idx(), 1);
        assert_eq!(read(&tqs[2], DATA, 0x1000), vec![0xcc; 0x1000]);
        assert_eq!(read(&tqs[2], DATA + 0x1000, 0x1000), vec![0; 0x1000]);
        assert_eq!(read(&tqs[2], DATA + 0x2000, 0x2000), vec![0xcc; 0x2000]);
        let m = b.metrics();
        assert_eq!(m.reported_bytes.load(Ordering::Relaxed), 0x1000);
        assert_eq!(m.invalid_pages.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn statistics_made_available_before_activation_are_read() {
        let mem = guest_memory(MEM);
        let mut b = Balloon::new(0, features(3600, false)).unwrap();
        let mut tqs: Vec<_> = (0..3)
            .map(|i| TestQueue::new(&mem, i * 0x1_0000, QUEUE_SIZE))
            .collect();
        let buf = stat(5, 42);
        mem.write_slice(&buf, GuestAddress(BUF)).unwrap();
        tqs[2].add_chain(&[r(BUF, buf.len() as u32)]);
        let queues = tqs.iter().map(TestQueue::queue).collect();
        b.activate(mem, b.avail_features(), queues, interrupt())
            .unwrap();
        assert_eq!(b.stats().reported(), vec![("total_memory", 42)]);
        assert_eq!(tqs[2].used_idx(), 0, "held");
    }

    #[test]
    fn queues_follow_the_features_the_driver_accepted() {
        let mem = guest_memory(MEM);
        let mut b = Balloon::new(0, features(5, true)).unwrap();
        let tqs: Vec<_> = (0..3)
            .map(|i| TestQueue::new(&mem, i * 0x1_0000, QUEUE_SIZE))
            .collect();
        let queues = || tqs.iter().map(TestQueue::queue).collect::<Vec<_>>();
        // Statistics refused by the driver: reporting is queue 2.
        let acked = b.avail_features() & !feature(VIRTIO_BALLOON_F_STATS_VQ);
        assert_eq!(
            b.activate(mem.clone(), b.avail_features(), queues(), interrupt()),
            Err(ActivateError::QueueCount { want: 4, got: 3 })
        );
        b.activate(mem, acked, queues(), interrupt()).unwrap();
        let mut tq = tqs[2].clone();
        fill(&tq, DATA, 0x1000, 0xcc);
        tq.add_chain(&[w(DATA, 0x1000)]);
        b.process_queue(2);
        assert_eq!(read(&tq, DATA, 0x1000), vec![0; 0x1000]);
    }

    #[test]
    fn a_driver_that_keeps_adding_buffers_cannot_hold_a_pass() {
        let (mut b, mut tqs, _irq) = setup(features(0, false));
        let len = pfns(&tqs[0], BUF, &[(DATA >> 12) as u32; 16]);
        let head = tqs[0].add_chain(&[r(BUF, len)]);
        let view = tqs[0].clone();
        let driver = Recycler::start(tqs.remove(0), head, Duration::from_secs(3));
        b.process_queue(0);
        let used = view.used_idx();
        drop(driver);
        assert_eq!(usize::from(used), MAX_CHAINS_PER_PASS);
        assert_eq!(b.take_unfinished(), 1);
        assert_eq!(b.take_unfinished(), 0);
    }
}
