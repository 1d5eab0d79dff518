//! virtio-blk (virtio 1.2 section 5.2) backed by a raw disk image file.
//!
//! Requests are served synchronously on the thread that calls
//! [`VirtioDevice::process_queue`]: data moves between guest memory and the file with
//! `read(2)`/`write(2)` straight into and out of guest memory (no bounce buffer). Every
//! guest-supplied descriptor is checked before use; [`parse_request`] turns a descriptor chain
//! into a typed [`Request`] or a typed error without touching the disk, which keeps it fuzzable.
//!
//! `request.rs` parses chains, `disk.rs` is the I/O engine that executes a parsed request
//! against the image, and this file is the device: configuration, features, activation, the
//! queue and the rate limiter.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arch::GuestMemoryMmap;
use event_manager::{EventOps, Events};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::chain::pop_chain;
use super::{
    feature, take_queues, ActivateError, QueuePosition, VirtioDevice, VirtioInterrupt,
    BACKEND_EVENT_BASE, MAX_CHAINS_PER_PASS, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::rate_limiter::RateLimiter;

mod disk;
mod request;

use disk::Disk;
pub use request::{parse_request, BadRequest, Request, RequestError, RequestType, Segment};

/// Bytes per sector: capacity and request offsets are counted in these.
pub const SECTOR_SIZE: u64 = 512;
/// The size of the device's only queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data descriptors in one request (the header and status take the other two).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most descriptors in one request chain.
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Most data bytes in one request.
pub const MAX_DATA_LEN: u32 = 128 << 20;
/// Length of the device ID string returned by `GET_ID`.
pub const ID_BYTES: usize = 20;

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

/// Request status values, as the one byte the device writes (virtio-bindings has them as u32).
pub const VIRTIO_BLK_S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Size of the configuration space we expose: capacity, size_max, seg_max.
const CONFIG_LEN: usize = 16;

/// Why a block device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open the disk image {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the disk image {} is {size} bytes, which is not a multiple of 512", path.display())]
    Size { path: PathBuf, size: u64 },
    #[error(
        "the id {id:?} given for the disk image {} is {len} bytes long; virtio-blk ids are at most 20 bytes",
        path.display()
    )]
    IdTooLong {
        path: PathBuf,
        id: String,
        len: usize,
    },
}

/// Request counters, shared with whoever reports metrics.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Completed `IN` requests.
    pub reads: AtomicU64,
    /// Completed `OUT` requests.
    pub writes: AtomicU64,
    /// Completed `FLUSH` requests that synced the file.
    pub flushes: AtomicU64,
    /// Completed `GET_ID` requests.
    pub get_ids: AtomicU64,
    /// Bytes read from the disk into the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub bytes_written: AtomicU64,
    /// Requests completed with `VIRTIO_BLK_S_IOERR` (including malformed ones).
    pub io_errors: AtomicU64,
    /// Requests completed with `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: AtomicU64,
    /// Malformed descriptor chains.
    pub invalid_chains: AtomicU64,
    /// Times a request did not fit the rate limiter and the queue paused until its timer.
    pub rate_limiter_throttled: AtomicU64,
}

fn inc(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// What the device holds while the driver has it running.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio block device on a raw disk image.
pub struct Block {
    disk: Disk,
    path: PathBuf,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    limiter: Option<RateLimiter>,
    /// The last pass stopped at [`MAX_CHAINS_PER_PASS`].
    unfinished: bool,
}

/// The event-loop data value of the rate limiter's timer.
const RATE_LIMITER_EVENT: u32 = BACKEND_EVENT_BASE;

/// Open the disk image at `path` (read-write unless `read_only`) and find its size, which
/// must be a whole number of sectors.
fn open_image(path: &Path, read_only: bool) -> Result<(std::fs::File, u64), BlockError> {
    let open_err = |source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(open_err)?;
    if file.metadata().map_err(open_err)?.is_dir() {
        return Err(open_err(std::io::Error::other("it is a directory")));
    }
    // Seeking to the end also works for block devices, whose metadata length is 0.
    let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
    if size % SECTOR_SIZE != 0 {
        return Err(BlockError::Size {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok((file, size))
}

impl Block {
    /// A block device on the image at `path`, opened read-write unless `read_only`. `id` is
    /// what `GET_ID` returns (at most 20 bytes); an empty `id` picks one from the file's device
    /// and inode numbers.
    pub fn new(path: &Path, read_only: bool, id: &str) -> Result<Block, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        if id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong {
                path: path.to_path_buf(),
                id: id.to_string(),
                len: id.len(),
            });
        }
        let (file, size) = open_image(path, read_only)?;
        let meta = file.metadata().map_err(open_err)?;

        let mut id_bytes = [0u8; ID_BYTES];
        let id = if id.is_empty() {
            format!("{:x}-{:x}", meta.dev(), meta.ino())
        } else {
            id.to_string()
        };
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);

        let mut avail_features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_FLUSH)
            | feature(VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            avail_features |= feature(VIRTIO_BLK_F_RO);
        }

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        Ok(Block {
            disk: Disk {
                file,
                size,
                read_only,
                sync_on_flush: true,
                id: id_bytes,
                metrics: Arc::new(BlockMetrics::default()),
            },
            path: path.to_path_buf(),
            avail_features,
            acked_features: 0,
            config,
            active: None,
            limiter: None,
            unfinished: false,
        })
    }

    /// Limit the device's requests with `limiter`: each read or write takes its data length
    /// from the bandwidth bucket, and every well-formed request takes one operation (flush and
    /// get-id requests take no bandwidth). Malformed chains are not limited.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Do not offer the flush command (`VIRTIO_BLK_F_FLUSH`): the guest then treats the disk
    /// as write-through and its writes reach the host's page cache only. A flush request
    /// sent anyway is acknowledged without syncing.
    pub fn without_flush(mut self) -> Self {
        self.avail_features &= !feature(VIRTIO_BLK_F_FLUSH);
        self.disk.sync_on_flush = false;
        self
    }

    /// Apply `config` to the device's rate limiter from its next request on. Returns false
    /// when the device was built without one (see [`Block::with_rate_limiter`]).
    pub fn update_rate_limiter(&mut self, config: &crate::rate_limiter::RateLimiterConfig) -> bool {
        crate::rate_limiter::update_limiter(&mut self.limiter, config)
    }

    /// The rate limiter, if any.
    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.limiter.as_ref()
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disk size in bytes.
    pub fn size(&self) -> u64 {
        self.disk.size
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    /// The `GET_ID` string, zero padded.
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.disk.id
    }

    /// The request counters; the handle stays valid for the device's lifetime.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.disk.metrics.clone()
    }

    /// The features the driver accepted at the last activation.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
}

impl Block {
    /// Swap the backing file for the image at `path` (a new medium), keeping the id and the
    /// read-only setting; returns the new size in bytes. The caller tells the driver that the
    /// configuration changed so that it re-reads the capacity.
    pub fn replace_disk(&mut self, path: &Path) -> Result<u64, BlockError> {
        let (file, size) = open_image(path, self.disk.read_only)?;
        self.disk.file = file;
        self.disk.size = size;
        self.path = path.to_path_buf();
        self.config[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
        Ok(size)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let [queue] = take_queues(queues)?;
        self.acked_features = acked_features;
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
        let Active {
            mem,
            queue,
            interrupt,
        } = active;
        let mem: &GuestMemoryMmap = mem;
        let mut used_any = false;
        if self.limiter.as_ref().is_some_and(RateLimiter::is_blocked) {
            // The limiter's timer restarts the queue.
            return;
        }
        let mut budget = MAX_CHAINS_PER_PASS;
        'serve: loop {
            // Only an optimisation (fewer guest exits while we work); failures are harmless.
            let _ = queue.disable_notification(mem);
            let mut popped = false;
            while budget > 0 {
                let Some(chain) = pop_chain(queue, mem) else {
                    break;
                };
                popped = true;
                budget -= 1;
                let head = chain.head_index();
                let parsed = parse_request(mem, chain);
                if let (Ok(req), Some(limiter)) = (&parsed, self.limiter.as_mut()) {
                    let bytes = match req.request_type {
                        RequestType::In | RequestType::Out => u64::from(req.data_len),
                        _ => 0,
                    };
                    if !limiter.consume(bytes) {
                        // Leave the request in the queue (notifications stay off: the guest
                        // need not kick) until the limiter's timer fires.
                        queue.go_to_previous_position();
                        inc(&self.disk.metrics.rate_limiter_throttled, 1);
                        break 'serve;
                    }
                }
                let len = self.disk.complete(mem, parsed);
                if let Err(e) = queue.add_used(mem, head, len) {
                    crate::guest_warn!(
                        "virtio-blk {}: cannot return a buffer: {e}",
                        self.path.display()
                    );
                    break;
                }
                used_any = true;
            }
            if budget == 0 {
                // Notifications stay off: the transport brings us back.
                self.unfinished = true;
                break;
            }
            // Re-arm notifications; if the driver added requests meanwhile, go again (unless
            // nothing could be taken, e.g. a bogus available index: wait for the next kick).
            match queue.enable_notification(mem) {
                Ok(true) if popped => continue,
                _ => break,
            }
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
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
        self.acked_features = 0;
        if let Some(limiter) = self.limiter.as_mut() {
            limiter.unblock();
        }
    }

    fn init_backend(&mut self, ops: &mut EventOps) {
        let name = format!("virtio-blk {}", self.path.display());
        crate::rate_limiter::watch_timer(&self.limiter, ops, RATE_LIMITER_EVENT, &name);
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
mod tests;
