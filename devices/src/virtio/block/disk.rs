//! The I/O engine: a well-formed request executed against the disk image, straight between
//! the file and guest memory, and its status written back.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::sync::Arc;

use arch::GuestMemoryMmap;
use log::debug;
use vm_memory::{Bytes, GuestMemoryBackend, ReadVolatile, WriteVolatile};

use super::request::{BadRequest, Request, RequestType};
use super::{
    inc, BlockMetrics, ID_BYTES, SECTOR_SIZE, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};

/// The disk and what the device reports about it.
pub(super) struct Disk {
    pub(super) file: File,
    /// Size in bytes, a multiple of [`SECTOR_SIZE`].
    pub(super) size: u64,
    pub(super) read_only: bool,
    /// Whether a flush syncs the image (otherwise it is acknowledged as done: the
    /// `Unsafe` cache type, where the disk does not offer flushing in the first place).
    pub(super) sync_on_flush: bool,
    pub(super) id: [u8; ID_BYTES],
    pub(super) metrics: Arc<BlockMetrics>,
}

/// Why an executed request failed (logged at debug level; the guest sees IOERR).
#[derive(Debug, thiserror::Error)]
enum IoError {
    #[error("sectors {sector}+{len} bytes are past the end of the disk")]
    PastEnd { sector: u64, len: u32 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("disk: {0}")]
    Disk(#[from] std::io::Error),
}

impl Disk {
    /// The byte offset of a `len`-byte transfer at `sector`, if it lies inside the disk.
    fn offset(&self, sector: u64, len: u32) -> Result<u64, IoError> {
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|off| {
                off.checked_add(u64::from(len))
                    .is_some_and(|end| end <= self.size)
            })
            .ok_or(IoError::PastEnd { sector, len })
    }

    /// Read into `data`; on error, `done` holds the bytes already placed in the guest.
    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        req: &Request,
        done: &mut u32,
    ) -> Result<(), IoError> {
        let off = self.offset(req.sector, req.data_len)?;
        self.file.seek(SeekFrom::Start(off))?;
        for seg in &req.data {
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
                let mut slice = slice.map_err(|e| IoError::Memory(e.to_string()))?;
                self.file
                    .read_exact_volatile(&mut slice)
                    .map_err(|e| IoError::Memory(e.to_string()))?;
                *done += slice.len() as u32;
            }
        }
        Ok(())
    }

    fn write(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        let off = self.offset(req.sector, req.data_len)?;
        self.file.seek(SeekFrom::Start(off))?;
        for seg in &req.data {
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
                let slice = slice.map_err(|e| IoError::Memory(e.to_string()))?;
                self.file
                    .write_all_volatile(&slice)
                    .map_err(|e| IoError::Memory(e.to_string()))?;
            }
        }
        Ok(())
    }

    fn get_id(&self, mem: &GuestMemoryMmap, req: &Request, done: &mut u32) -> Result<(), IoError> {
        let mut left = &self.id[..];
        for seg in &req.data {
            if left.is_empty() {
                break;
            }
            let n = left.len().min(seg.len as usize);
            mem.write_slice(&left[..n], seg.addr)
                .map_err(|e| IoError::Memory(e.to_string()))?;
            left = &left[n..];
            *done += n as u32;
        }
        Ok(())
    }

    /// Run a well-formed request. Returns the status and how many data bytes went to the guest.
    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        let m = self.metrics.clone();
        let mut done = 0;
        let result = match req.request_type {
            RequestType::In => self.read(mem, req, &mut done).map(|()| {
                inc(&m.reads, 1);
                inc(&m.bytes_read, u64::from(req.data_len));
            }),
            RequestType::Out => self.write(mem, req).map(|()| {
                inc(&m.writes, 1);
                inc(&m.bytes_written, u64::from(req.data_len));
            }),
            // Nothing can be pending on a read-only disk, and a disk that does not offer
            // flushing has nothing to say to one.
            RequestType::Flush if self.read_only || !self.sync_on_flush => Ok(()),
            RequestType::Flush => self
                .file
                .sync_data()
                .map(|()| inc(&m.flushes, 1))
                .map_err(IoError::from),
            RequestType::GetId => self
                .get_id(mem, req, &mut done)
                .map(|()| inc(&m.get_ids, 1)),
            RequestType::Unsupported(t) => {
                debug!("virtio-blk: unsupported request type {t}");
                inc(&m.unsupported, 1);
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
        };
        match result {
            Ok(()) => (VIRTIO_BLK_S_OK, done),
            Err(e) => {
                debug!("virtio-blk: {:?} request failed: {e}", req.request_type);
                inc(&m.io_errors, 1);
                (VIRTIO_BLK_S_IOERR, done)
            }
        }
    }

    /// Serve a parsed chain. Returns the used length: bytes written to the guest.
    pub(super) fn complete(
        &mut self,
        mem: &GuestMemoryMmap,
        parsed: Result<Request, BadRequest>,
    ) -> u32 {
        let (status, status_addr, done) = match parsed {
            Ok(req) => {
                let (status, done) = self.execute(mem, &req);
                (status, req.status, done)
            }
            Err(bad) => {
                debug!("virtio-blk: malformed request: {}", bad.error);
                inc(&self.metrics.invalid_chains, 1);
                let Some(addr) = bad.status else {
                    return 0;
                };
                inc(&self.metrics.io_errors, 1);
                (VIRTIO_BLK_S_IOERR, addr, 0)
            }
        };
        match mem.write_obj(status, status_addr) {
            Ok(()) => done + 1,
            Err(_) => done,
        }
    }
}
