//! Turning a virtio-blk descriptor chain into a typed [`Request`] or a typed error
//! ([`parse_request`]), without touching the disk.

use arch::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{
    MAX_DATA_LEN, MAX_DESCRIPTORS, SECTOR_SIZE, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

/// Size of the request header: type, reserved, sector.
const HEADER_LEN: u32 =
    std::mem::size_of::<virtio_bindings::virtio_blk::virtio_blk_outhdr>() as u32;

/// What kind of request a chain carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the guest.
    In,
    /// Write sectors from the guest.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Anything else; completed with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

pub use crate::virtio::chain::Segment;

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub request_type: RequestType,
    /// The first sector, from the header (checked against the disk size only when executed).
    pub sector: u64,
    /// The data buffers in order: device-readable for `Out`, device-writable for `In` and
    /// `GetId`, empty otherwise.
    pub data: Vec<Segment>,
    /// Sum of `data` lengths.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// What is wrong with a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the descriptor chain is empty or broken (bad index, loop or unreadable descriptor)")]
    BrokenChain,
    #[error("the chain has {0} descriptors; at most {MAX_DESCRIPTORS} are allowed")]
    TooManyDescriptors(usize),
    #[error("the chain does not end with a device-writable status byte")]
    NoStatus,
    #[error("a descriptor has length zero")]
    ZeroLength,
    #[error("a descriptor is not inside guest memory")]
    OutsideMemory,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the request header is shorter than 16 bytes")]
    ShortHeader,
    #[error("the request carries data in the wrong direction")]
    WrongDirection,
    #[error("the data length {0} is not a multiple of 512")]
    UnalignedLength(u32),
    #[error("the data length {0} exceeds the limit of {MAX_DATA_LEN} bytes")]
    TooLarge(u64),
}

/// A chain that is not a well-formed request, and where to report that, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRequest {
    pub error: RequestError,
    /// The status byte, when the chain has a usable one: the request completes with
    /// `VIRTIO_BLK_S_IOERR`. Without it the chain is returned with used length 0.
    pub status: Option<GuestAddress>,
}

/// Split the first `n` bytes off `segs`. `None` if `segs` holds fewer than `n` bytes.
fn take_front(segs: &[Segment], mut n: u32) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut front = Vec::new();
    let mut rest = Vec::new();
    for s in segs {
        if n == 0 {
            rest.push(*s);
        } else if s.len <= n {
            front.push(*s);
            n -= s.len;
        } else {
            front.push(Segment {
                addr: s.addr,
                len: n,
            });
            // In range: `s` was checked to lie inside guest memory.
            rest.push(Segment {
                addr: s.addr.unchecked_add(u64::from(n)),
                len: s.len - n,
            });
            n = 0;
        }
    }
    (n == 0).then_some((front, rest))
}

fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Turn a descriptor chain into a [`Request`], checking everything the guest controls except
/// the sector range (which depends on the disk).
///
/// The layout follows the spec without assuming descriptor boundaries: the device-readable
/// part starts with the 16-byte header and carries `OUT` data after it; the device-writable
/// part carries `IN`/`GET_ID` data and ends with the status byte.
pub fn parse_request(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
) -> Result<Request, BadRequest> {
    let bad = |error, status| BadRequest { error, status };

    let mut descs = Vec::new();
    let mut count = 0usize;
    let mut last = None;
    for d in chain {
        count += 1;
        if descs.len() < MAX_DESCRIPTORS {
            descs.push(d);
        }
        last = Some(d);
    }
    let last = match last {
        // A last descriptor that still points onwards means iteration stopped early: the
        // chain loops, links outside the table, or a descriptor could not be read.
        Some(d) if !d.has_next() => d,
        _ => return Err(bad(RequestError::BrokenChain, None)),
    };

    let status = (last.is_write_only() && last.len() > 0)
        .then(|| last.addr().checked_add(u64::from(last.len()) - 1))
        .flatten()
        .filter(|&a| mem.address_in_range(a))
        .ok_or(bad(RequestError::NoStatus, None))?;
    let fail = |error| Err(bad(error, Some(status)));

    if count > MAX_DESCRIPTORS {
        return fail(RequestError::TooManyDescriptors(count));
    }

    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in &descs {
        if d.len() == 0 {
            return fail(RequestError::ZeroLength);
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return fail(RequestError::OutsideMemory);
        }
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            return fail(RequestError::ReadableAfterWritable);
        }
    }
    // Drop the status byte from the writable part.
    if let Some(s) = writable.last_mut() {
        s.len -= 1;
        if s.len == 0 {
            writable.pop();
        }
    }

    let Some((header_segs, readable_data)) = take_front(&readable, HEADER_LEN) else {
        return fail(RequestError::ShortHeader);
    };
    let mut header = [0u8; HEADER_LEN as usize];
    let mut at = 0;
    for s in &header_segs {
        let end = at + s.len as usize;
        if mem.read_slice(&mut header[at..end], s.addr).is_err() {
            return fail(RequestError::OutsideMemory);
        }
        at = end;
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let (request_type, data) = match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID if !readable_data.is_empty() => {
            return fail(RequestError::WrongDirection)
        }
        VIRTIO_BLK_T_OUT if !writable.is_empty() => return fail(RequestError::WrongDirection),
        VIRTIO_BLK_T_IN => (RequestType::In, writable),
        VIRTIO_BLK_T_OUT => (RequestType::Out, readable_data),
        VIRTIO_BLK_T_GET_ID => (RequestType::GetId, writable),
        VIRTIO_BLK_T_FLUSH => (RequestType::Flush, Vec::new()),
        t => (RequestType::Unsupported(t), Vec::new()),
    };
    let data_len = total_len(&data);
    let data_len = match u32::try_from(data_len) {
        Ok(len) if len <= MAX_DATA_LEN => len,
        _ => return fail(RequestError::TooLarge(data_len)),
    };
    if matches!(request_type, RequestType::In | RequestType::Out)
        && u64::from(data_len) % SECTOR_SIZE != 0
    {
        return fail(RequestError::UnalignedLength(data_len));
    }
    Ok(Request {
        request_type,
        sector,
        data,
        data_len,
        status,
    })
}
