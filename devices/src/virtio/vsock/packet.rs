//! The virtio-vsock packet header (virtio 1.2 section 5.10.6) and the checks every packet from
//! the guest goes through. Pure functions: no queues, no sockets.
//!
//! virtio-bindings has no `virtio_vsock` header, so the wire constants are spelled out here
//! from the specification.

/// Length of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Largest payload in one packet, in either direction.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `type`: stream sockets, the only kind the device supports.
pub const TYPE_STREAM: u16 = 1;

/// Operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `flags` of `OP_SHUTDOWN`: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded packet header (all fields little endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Decode the wire format.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encode the wire format.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A host-to-guest stream packet from host port `src_port` to guest port `dst_port`.
    pub fn to_guest(guest_cid: u64, src_port: u32, dst_port: u32, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }
}

/// A checked operation from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown { rcv: bool, send: bool },
    Rw,
    CreditUpdate,
    CreditRequest,
}

/// Why a packet from the guest was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("the source CID {0} is not the guest's")]
    WrongSrcCid(u64),
    #[error("the destination CID {0} is not the host's")]
    WrongDstCid(u64),
    #[error("socket type {0} is not supported (only streams are)")]
    BadType(u16),
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    #[error("operation {op} carries {len} payload bytes")]
    UnexpectedPayload { op: u16, len: u32 },
}

impl PacketError {
    /// Whether the device answers the packet with `OP_RST`: when it reliably came from the
    /// guest and is not itself a reset.
    pub fn wants_rst(&self, hdr: &Header) -> bool {
        !matches!(self, PacketError::WrongSrcCid(_)) && hdr.op != OP_RST
    }
}

/// Check a header from the guest (whose payload length was checked against the chain).
pub fn check_guest_header(hdr: &Header, guest_cid: u64) -> Result<Op, PacketError> {
    if hdr.src_cid != guest_cid {
        return Err(PacketError::WrongSrcCid(hdr.src_cid));
    }
    if hdr.dst_cid != HOST_CID {
        return Err(PacketError::WrongDstCid(hdr.dst_cid));
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(PacketError::BadType(hdr.type_));
    }
    let op = match hdr.op {
        OP_REQUEST => Op::Request,
        OP_RESPONSE => Op::Response,
        OP_RST => Op::Rst,
        OP_SHUTDOWN => Op::Shutdown {
            rcv: hdr.flags & SHUTDOWN_RCV != 0,
            send: hdr.flags & SHUTDOWN_SEND != 0,
        },
        OP_RW => Op::Rw,
        OP_CREDIT_UPDATE => Op::CreditUpdate,
        OP_CREDIT_REQUEST => Op::CreditRequest,
        other => return Err(PacketError::UnknownOp(other)),
    };
    if op != Op::Rw && hdr.len != 0 {
        return Err(PacketError::UnexpectedPayload {
            op: hdr.op,
            len: hdr.len,
        });
    }
    Ok(op)
}

/// The reset answering `hdr` (from the guest).
pub fn rst_for(hdr: &Header, guest_cid: u64) -> Header {
    Header::to_guest(guest_cid, hdr.dst_port, hdr.src_port, OP_RST)
}

/// Parse a host's `CONNECT <port>\n` line (without the newline; a trailing `\r` is allowed).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"CONNECT ")?;
    if rest.is_empty() || rest.len() > 10 || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_hdr(op: u16) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 80,
            type_: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }

    #[test]
    fn header_round_trip_and_layout() {
        let h = Header {
            src_cid: 0x0102030405060708,
            dst_cid: 2,
            src_port: 0xaabbccdd,
            dst_port: 7,
            len: 99,
            type_: 1,
            op: OP_RW,
            flags: 3,
            buf_alloc: 0x10000,
            fwd_cnt: 5,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[16..20], [0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(b[24], 99);
        assert_eq!(b[30], 5);
        assert_eq!(b[38], 1);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn guest_headers_are_checked() {
        assert_eq!(
            check_guest_header(&guest_hdr(OP_REQUEST), 3),
            Ok(Op::Request)
        );
        let mut h = guest_hdr(OP_SHUTDOWN);
        h.flags = SHUTDOWN_SEND;
        assert_eq!(
            check_guest_header(&h, 3),
            Ok(Op::Shutdown {
                rcv: false,
                send: true
            })
        );
        let mut h = guest_hdr(OP_RW);
        h.len = 10;
        assert_eq!(check_guest_header(&h, 3), Ok(Op::Rw));
        let mut h = guest_hdr(OP_CREDIT_UPDATE);
        h.len = 10;
        assert_eq!(
            check_guest_header(&h, 3),
            Err(PacketError::UnexpectedPayload { op: 6, len: 10 })
        );

        let e = check_guest_header(&guest_hdr(OP_RW), 4).unwrap_err();
        assert_eq!(e, PacketError::WrongSrcCid(3));
        assert!(!e.wants_rst(&guest_hdr(OP_RW)));
        let mut h = guest_hdr(OP_RW);
        h.dst_cid = 7;
        assert_eq!(check_guest_header(&h, 3), Err(PacketError::WrongDstCid(7)));
        let mut h = guest_hdr(OP_RW);
        h.type_ = 2;
        let e = check_guest_header(&h, 3).unwrap_err();
        assert_eq!(e, PacketError::BadType(2));
        assert!(e.wants_rst(&h));
        let e = check_guest_header(&guest_hdr(0), 3).unwrap_err();
        assert_eq!(e, PacketError::UnknownOp(0));
        assert_eq!(
            check_guest_header(&guest_hdr(8), 3),
            Err(PacketError::UnknownOp(8))
        );
        let mut h = guest_hdr(OP_RST);
        h.type_ = 9;
        assert!(!check_guest_header(&h, 3).unwrap_err().wants_rst(&h));

        let r = rst_for(&guest_hdr(OP_RW), 3);
        assert_eq!(
            (r.src_cid, r.src_port, r.dst_cid, r.dst_port, r.op),
            (2, 80, 3, 1000, OP_RST)
        );
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT 4294967296",
            b"CONNECT -1",
            b"CONNECT 12 ",
            b"connect 12",
            b"CONNECT  12",
            b"CONNECT 99999999999",
            b"",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }
}
