//! One vsock stream connection between a guest port and a host Unix socket: its state, the
//! credit accounting in both directions (virtio 1.2 section 5.10.6.3) and the buffers between
//! the guest and the host socket. Generic over the host stream so that it can be tested
//! without sockets.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::packet::{
    Header, MAX_PAYLOAD, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND,
};
use super::ring::ByteRing;

/// Receive buffer the device advertises to the guest for each connection: bytes from the
/// guest that are not yet written to the host socket.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Most bytes read from the host socket ahead of the guest taking them.
pub const FROM_HOST_MAX: usize = 64 * 1024;
/// The host socket is read only when at least this much of the buffer is free, so a stream
/// the guest takes 4 KiB at a time costs one read per 32 KiB rather than one per packet.
pub const FROM_HOST_REFILL: usize = FROM_HOST_MAX / 2;

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the device has (or will have) sent `OP_REQUEST`; waiting for the
    /// guest's `OP_RESPONSE`.
    Connecting,
    /// Data flows.
    Established,
}

/// Why a connection has to be reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    #[error("the guest sent {len} bytes with only {free} bytes of credit")]
    CreditExceeded { len: usize, free: u32 },
    #[error("the guest sent data after shutting its sending side down")]
    DataAfterShutdown,
    #[error("the guest sent data before the connection was established")]
    NotEstablished,
    #[error("host socket: {0}")]
    Host(String),
}

/// Where [`Connection::next_packet`] puts a packet: given its header and its payload as two
/// slices, in order (both empty for control packets).
pub type PacketWriter<'a> = dyn FnMut(&Header, &[u8], &[u8]) + 'a;

/// A packet [`Connection::next_packet`] handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub hdr: Header,
    /// After this packet the connection is finished and goes away.
    pub last: bool,
}

/// A stream connection.
#[derive(Debug)]
pub struct Connection<S> {
    pub stream: S,
    guest_cid: u64,
    /// The host-side port (the guest's destination port for guest-initiated connections).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    pub state: State,
    request_due: bool,
    response_due: bool,
    credit_update_due: bool,

    // Guest -> host.
    /// Bytes that go to the host before any guest data (the `OK <port>` line), uncounted.
    host_prefix: Vec<u8>,
    to_host: VecDeque<u8>,
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    buf_alloc: u32,

    // Host -> guest.
    from_host: ByteRing<FROM_HOST_MAX>,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,

    /// The host socket may have data or an EOF to read (edge-triggered readiness).
    pub host_readable: bool,
    /// The host socket may accept writes.
    pub host_writable: bool,
    /// The host socket returned EOF.
    host_eof: bool,
    /// The host hung up completely (it will read nothing more either).
    pub host_hup: bool,
    /// The host's write side was shut down after the guest's `SHUTDOWN(SEND)`.
    host_write_shut: bool,
    /// A `SHUTDOWN` was sent to the guest.
    shutdown_sent: bool,
    /// The guest will send no more.
    guest_send_shut: bool,
    /// The guest will receive no more.
    guest_rcv_shut: bool,
    /// The guest forgot the connection (its reset) after shutting down its sending side:
    /// only the bytes it sent before are still written to the host, nothing goes to it.
    guest_gone: bool,
    /// When the connection was made (for a host program's: when its `CONNECT` was served).
    opened: Instant,
    /// Since when neither side sends any more, with the bytes moved by then.
    closing: Option<(Instant, u32)>,
}

impl<S: Read + Write> Connection<S> {
    fn new(stream: S, guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            request_due: state == State::Connecting,
            response_due: false,
            credit_update_due: false,
            host_prefix: Vec::new(),
            to_host: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            buf_alloc: CONN_BUF_ALLOC,
            from_host: ByteRing::default(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_readable: true,
            host_writable: true,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            shutdown_sent: false,
            guest_send_shut: false,
            guest_rcv_shut: false,
            guest_gone: false,
            opened: Instant::now(),
            closing: None,
        }
    }

    /// A connection the host opened: `OP_REQUEST` goes to the guest first. `early` holds
    /// bytes the host sent after its `CONNECT` line.
    pub fn host_initiated(
        stream: S,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        early: &[u8],
    ) -> Self {
        let mut c = Self::new(stream, guest_cid, local_port, peer_port, State::Connecting);
        // The bytes that came with a `CONNECT` line: far fewer than the buffer holds.
        c.from_host.extend(early);
        c
    }

    /// A connection the guest requested with `hdr`, accepted: `OP_RESPONSE` goes back.
    pub fn guest_initiated(stream: S, guest_cid: u64, hdr: &Header) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            hdr.dst_port,
            hdr.src_port,
            State::Established,
        );
        c.response_due = true;
        c.update_peer_credit(hdr);
        c
    }

    /// Every guest packet carries its receive buffer state.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Bytes the guest can still take.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes the guest may still send us.
    pub fn our_free(&self) -> u32 {
        self.buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_cnt))
    }

    /// The guest answered our `OP_REQUEST`: tell the host program its port.
    pub fn on_response(&mut self, hdr: &Header) {
        self.update_peer_credit(hdr);
        self.state = State::Established;
        self.request_due = false;
        self.host_prefix = format!("OK {}\n", self.local_port).into_bytes();
    }

    /// The guest sent `payload` (`OP_RW`).
    pub fn on_guest_data(&mut self, payload: &[u8]) -> Result<(), ConnError> {
        if self.state != State::Established {
            return Err(ConnError::NotEstablished);
        }
        if self.guest_send_shut {
            return Err(ConnError::DataAfterShutdown);
        }
        let free = self.our_free();
        if payload.len() > free as usize {
            return Err(ConnError::CreditExceeded {
                len: payload.len(),
                free,
            });
        }
        self.to_host.extend(payload);
        // At most `free`, a u32.
        self.rx_cnt = self.rx_cnt.wrapping_add(payload.len() as u32);
        Ok(())
    }

    /// The guest shut down one or both directions.
    pub fn on_guest_shutdown(&mut self, rcv: bool, send: bool) {
        self.guest_rcv_shut |= rcv;
        self.guest_send_shut |= send;
        if rcv {
            // Nothing more goes to the guest.
            self.from_host.clear();
        }
    }

    /// The guest reset the connection. Returns whether it stays to write what the guest sent
    /// before to the host.
    ///
    /// A reset after the guest shut down its sending side is not an abort: Linux's guest
    /// driver sends it when its close timeout (8 s) passes before the device's own reset,
    /// which the device sends once the host program has read everything. The bytes were
    /// accepted under the credit the device advertised, and the guest's `send()` reported
    /// them sent, so they still go to the host program, as a TCP stack delivers data before
    /// its FIN. That lasts while the host program reads (bounded by the connection's credit
    /// buffer and the shutdown timeout without progress); nothing more goes to the guest. A
    /// reset while the guest could still send is an abort: the buffered bytes are dropped.
    pub fn on_guest_reset(&mut self) -> bool {
        if self.state != State::Established
            || !self.guest_send_shut
            || self.host_hup
            || self.to_host_len() == 0
        {
            return false;
        }
        self.guest_gone = true;
        self.guest_rcv_shut = true;
        self.from_host.clear();
        self.response_due = false;
        self.credit_update_due = false;
        true
    }

    /// Whether the guest reset the connection and only its last bytes still go to the host.
    pub fn guest_gone(&self) -> bool {
        self.guest_gone
    }

    /// The guest asked for our credit.
    pub fn on_credit_request(&mut self) {
        self.credit_update_due = true;
    }

    /// Both sides are done: the guest shut down both directions and its data reached the
    /// host. The device answers with `OP_RST` and forgets the connection.
    pub fn finished(&self) -> bool {
        self.guest_send_shut
            && self.guest_rcv_shut
            && self.to_host.is_empty()
            && self.host_prefix.is_empty()
    }

    /// Whether the connection has waited too long at `now` for the other side: the guest's
    /// answer to our request for more than `connect`, or, once neither side sends new data,
    /// the last bytes to move for more than `shutdown` without any progress. (A connection
    /// shut down in one direction only still carries data the other way, and is left alone.)
    pub fn expired(&mut self, now: Instant, connect: Duration, shutdown: Duration) -> bool {
        if self.state == State::Connecting {
            return now.saturating_duration_since(self.opened) >= connect;
        }
        let host_done = self.host_eof || self.host_hup || self.guest_rcv_shut;
        if !(self.guest_send_shut && host_done) {
            self.closing = None;
            return false;
        }
        // Bytes moved either way (only equality matters).
        let moved = self.fwd_cnt.wrapping_add(self.tx_cnt);
        match self.closing {
            Some((since, at)) if at == moved => now.saturating_duration_since(since) >= shutdown,
            _ => {
                self.closing = Some((now, moved));
                false
            }
        }
    }

    /// Bytes waiting for the host socket.
    pub fn to_host_len(&self) -> usize {
        self.host_prefix.len() + self.to_host.len()
    }

    /// Write what is buffered for the host, as far as the socket takes it.
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        while self.host_writable && !self.host_prefix.is_empty() {
            match self.stream.write(&self.host_prefix) {
                Ok(0) => return Err(ConnError::Host("the socket accepts no data".into())),
                Ok(n) => {
                    self.host_prefix.drain(..n);
                }
                Err(e) => self.host_write_error(e)?,
            }
        }
        while self.host_writable && self.host_prefix.is_empty() && !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ConnError::Host("the socket accepts no data".into())),
                Ok(n) => {
                    self.to_host.drain(..n);
                    // At most the buffered bytes, which fit our u32 credit.
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) => self.host_write_error(e)?,
            }
        }
        // Tell the guest about freed space once its view of our buffer is half full.
        let guest_view_free = self
            .buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent));
        if self.fwd_cnt != self.last_fwd_cnt_sent && guest_view_free < self.buf_alloc / 2 {
            self.credit_update_due = true;
        }
        Ok(())
    }

    fn host_write_error(&mut self, e: io::Error) -> Result<(), ConnError> {
        match e.kind() {
            io::ErrorKind::WouldBlock => {
                self.host_writable = false;
                Ok(())
            }
            io::ErrorKind::Interrupted => Ok(()),
            _ => {
                self.host_hup = true;
                Err(ConnError::Host(e.to_string()))
            }
        }
    }

    /// The guest shut its sending side and everything reached the host: pass the EOF on.
    /// Returns whether the host's write side should be shut down now.
    pub fn take_host_write_shutdown(&mut self) -> bool {
        if self.guest_send_shut && !self.host_write_shut && self.to_host_len() == 0 {
            self.host_write_shut = true;
            return true;
        }
        false
    }

    /// Read from the host socket, straight into the buffer with one vectored read over its
    /// free space, while at least [`FROM_HOST_REFILL`] bytes of it are free. The socket stays
    /// marked readable until a read finds it empty, so what is left in it is read once the
    /// guest has taken enough.
    pub fn fill_from_host(&mut self) -> Result<(), ConnError> {
        while self.host_readable
            && !self.host_eof
            && !self.guest_rcv_shut
            && self.from_host.free() >= FROM_HOST_REFILL
        {
            match self.from_host.read_from(&mut self.stream) {
                Ok(0) => self.host_eof = true,
                Ok(_) => {}
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => self.host_readable = false,
                    io::ErrorKind::Interrupted => {}
                    _ => {
                        self.host_hup = true;
                        return Err(ConnError::Host(e.to_string()));
                    }
                },
            }
        }
        Ok(())
    }

    /// Whether [`Connection::next_packet`] has something.
    pub fn has_packet(&self) -> bool {
        !self.guest_gone
            && (self.request_due
                || self.response_due
                || self.credit_update_due
                || self.data_ready()
                || self.shutdown_ready())
    }

    fn data_ready(&self) -> bool {
        self.state == State::Established
            && !self.guest_rcv_shut
            && !self.from_host.is_empty()
            && self.peer_free() > 0
    }

    fn shutdown_ready(&self) -> bool {
        self.state == State::Established
            && !self.shutdown_sent
            && (self.host_eof || self.host_hup)
            && (self.from_host.is_empty() || self.guest_rcv_shut)
    }

    fn header(&mut self, op: u16) -> Header {
        let mut h = Header::to_guest(self.guest_cid, self.local_port, self.peer_port, op);
        h.buf_alloc = self.buf_alloc;
        h.fwd_cnt = self.fwd_cnt;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_due = false;
        h
    }

    /// The next packet for the guest, with at most `max_payload` payload bytes. `write` is
    /// given its header and its payload (empty for control packets) as two slices, in order,
    /// to copy where the guest reads them, before the connection lets go of the bytes.
    pub fn next_packet(
        &mut self,
        max_payload: usize,
        write: &mut PacketWriter<'_>,
    ) -> Option<Outgoing> {
        if self.guest_gone {
            return None;
        }
        fn control(write: &mut PacketWriter<'_>, hdr: Header) -> Outgoing {
            write(&hdr, &[], &[]);
            Outgoing { hdr, last: false }
        }
        if self.request_due {
            self.request_due = false;
            return Some(control(write, self.header(OP_REQUEST)));
        }
        if self.response_due {
            self.response_due = false;
            return Some(control(write, self.header(OP_RESPONSE)));
        }
        if self.data_ready() && max_payload > 0 {
            let n = self
                .from_host
                .len()
                .min(self.peer_free() as usize)
                .min(max_payload)
                .min(MAX_PAYLOAD as usize);
            // `n` is at most MAX_PAYLOAD.
            self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
            let mut hdr = self.header(OP_RW);
            hdr.len = n as u32;
            let (front, back) = self.from_host.peek(n);
            write(&hdr, front, back);
            self.from_host.consume(n);
            return Some(Outgoing { hdr, last: false });
        }
        if self.shutdown_ready() {
            self.shutdown_sent = true;
            let mut hdr = self.header(OP_SHUTDOWN);
            hdr.flags = SHUTDOWN_SEND;
            // A host that hung up takes nothing more either: the connection is over.
            if self.host_hup {
                hdr.flags |= SHUTDOWN_RCV;
            }
            write(&hdr, &[], &[]);
            return Some(Outgoing {
                hdr,
                last: self.host_hup,
            });
        }
        if self.credit_update_due {
            return Some(control(write, self.header(OP_CREDIT_UPDATE)));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::{OP_RST, TYPE_STREAM};
    use super::*;

    /// A host stream whose reads and writes the test scripts.
    #[derive(Default)]
    struct Mock {
        input: VecDeque<u8>,
        eof: bool,
        written: Vec<u8>,
        write_room: usize,
        broken: bool,
        /// Read calls made.
        reads: usize,
    }

    impl Read for Mock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.read_vectored(&mut [io::IoSliceMut::new(buf)])
        }

        /// Like readv(2): the buffers are filled in turn.
        fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
            self.reads += 1;
            if self.broken {
                return Err(io::Error::from(io::ErrorKind::ConnectionReset));
            }
            if self.input.is_empty() {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let mut n = 0;
            for buf in bufs.iter_mut() {
                let k = buf.len().min(self.input.len());
                for (b, v) in buf.iter_mut().zip(self.input.drain(..k)) {
                    *b = v;
                }
                n += k;
            }
            Ok(n)
        }
    }

    impl Write for Mock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.broken {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            if self.write_room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.write_room);
            self.written.extend_from_slice(&buf[..n]);
            self.write_room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A packet as the guest receives it.
    #[derive(Debug, PartialEq)]
    struct Pkt {
        hdr: Header,
        payload: Vec<u8>,
        last: bool,
        /// The payload came in two pieces (across the buffer's wrap).
        wrapped: bool,
    }

    /// The connection's next packet, as `next_packet` writes it out.
    fn next(c: &mut Connection<Mock>, max_payload: usize) -> Option<Pkt> {
        let mut payload = Vec::new();
        let mut written = None;
        let mut wrapped = false;
        let o = c.next_packet(max_payload, &mut |hdr, front, back| {
            assert!(written.is_none(), "one write per packet");
            written = Some(*hdr);
            wrapped = !back.is_empty();
            payload.extend_from_slice(front);
            payload.extend_from_slice(back);
        })?;
        assert_eq!(written, Some(o.hdr), "the packet's header is written");
        assert_eq!(o.hdr.len as usize, payload.len());
        Some(Pkt {
            hdr: o.hdr,
            payload,
            last: o.last,
            wrapped,
        })
    }

    fn req(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 4000,
            dst_port: 80,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    fn conn(buf_alloc: u32) -> Connection<Mock> {
        let mut c = Connection::guest_initiated(Mock::default(), 3, &req(buf_alloc, 0));
        let resp = next(&mut c, 4096).unwrap();
        assert_eq!(resp.hdr.op, OP_RESPONSE);
        assert_eq!((resp.hdr.src_port, resp.hdr.dst_port), (80, 4000));
        assert_eq!(resp.hdr.buf_alloc, CONN_BUF_ALLOC);
        c
    }

    #[test]
    fn host_data_respects_guest_credit() {
        let mut c = conn(100);
        c.stream.input.extend(vec![7u8; 300]);
        c.fill_from_host().unwrap();
        let p = next(&mut c, 4096).unwrap();
        assert_eq!((p.hdr.op, p.hdr.len, p.payload.len()), (OP_RW, 100, 100));
        assert_eq!(c.peer_free(), 0);
        assert!(!c.has_packet(), "no credit left");
        assert_eq!(next(&mut c, 4096), None);
        // The guest consumed 60 bytes.
        let mut upd = req(100, 60);
        upd.op = OP_CREDIT_UPDATE;
        c.update_peer_credit(&upd);
        assert_eq!(c.peer_free(), 60);
        let p = next(&mut c, 50).unwrap();
        assert_eq!(p.payload.len(), 50, "limited by the buffer");
        let p = next(&mut c, 4096).unwrap();
        assert_eq!(p.payload.len(), 10);
        assert_eq!(next(&mut c, 4096), None);
    }

    #[test]
    fn host_data_keeps_its_order_with_one_read_per_half_buffer() {
        let mut c = conn(1 << 30);
        let data: Vec<u8> = (0..256 * 1024).map(|i| (i * 13 + i / 4093) as u8).collect();
        c.stream.input.extend(&data);
        c.fill_from_host().unwrap();
        // The buffer grows from 4 KiB while reads fill it: a few reads the first time.
        assert_eq!(c.from_host.len(), FROM_HOST_MAX);
        let first = c.stream.reads;
        assert!(first <= 5, "{first} reads to fill the buffer");
        // What a 4 KiB Linux receive buffer holds after the header: packets straddle the
        // buffer's wrap.
        let max = 4096 - 44;
        let mut got = Vec::new();
        let mut wrapped = 0;
        while got.len() < data.len() {
            let p = next(&mut c, max).expect("data for the guest");
            assert_eq!(p.hdr.op, OP_RW);
            wrapped += usize::from(p.wrapped);
            got.extend_from_slice(&p.payload);
            // As the muxer does after every packet.
            c.fill_from_host().unwrap();
            if got.len() < 32 * 1024 {
                assert_eq!(
                    c.stream.reads, first,
                    "no read until half the buffer is free"
                );
            }
        }
        assert!(got == data, "bytes lost or reordered");
        assert!(wrapped >= 3, "packets crossed the wrap {wrapped} times");
        // Then a read per 32 KiB or more taken, and one that finds the socket empty.
        let refills = c.stream.reads - first;
        assert!(
            refills <= (data.len() - 64 * 1024) / (32 * 1024) + 1,
            "{refills} reads for {} bytes after the first 64 KiB",
            data.len() - FROM_HOST_MAX
        );
        assert_eq!(next(&mut c, max), None);
        // Every byte counted against the guest's credit.
        assert_eq!(c.peer_free(), (1 << 30) - data.len() as u32);
    }

    #[test]
    fn guest_data_respects_our_credit_and_updates_it() {
        let mut c = conn(1000);
        assert_eq!(c.our_free(), CONN_BUF_ALLOC);
        let big = vec![1u8; CONN_BUF_ALLOC as usize];
        c.on_guest_data(&big).unwrap();
        assert_eq!(c.our_free(), 0);
        assert_eq!(
            c.on_guest_data(&[1]),
            Err(ConnError::CreditExceeded { len: 1, free: 0 })
        );
        // The host takes 1000 bytes: credit update due, reflecting them.
        c.stream.write_room = 1000;
        c.flush_to_host().unwrap();
        assert!(!c.host_writable);
        assert_eq!(c.stream.written.len(), 1000);
        assert_eq!(c.our_free(), 1000);
        let p = next(&mut c, 4096).unwrap();
        assert_eq!((p.hdr.op, p.hdr.fwd_cnt), (OP_CREDIT_UPDATE, 1000));
        assert_eq!(next(&mut c, 4096), None);
        // A credit request is answered even without progress.
        c.on_credit_request();
        assert_eq!(next(&mut c, 4096).unwrap().hdr.op, OP_CREDIT_UPDATE);
    }

    #[test]
    fn host_initiated_handshake_and_prefix() {
        let mut c = Connection::host_initiated(Mock::default(), 3, 1024, 5000, b"early");
        assert!(c.has_packet());
        let p = next(&mut c, 4096).unwrap();
        assert_eq!(p.hdr.op, OP_REQUEST);
        assert_eq!(
            (p.hdr.src_port, p.hdr.dst_port, p.hdr.dst_cid),
            (1024, 5000, 3)
        );
        assert!(!c.has_packet(), "no data before the response");
        assert_eq!(c.on_guest_data(b"x"), Err(ConnError::NotEstablished));
        let mut resp = req(500, 0);
        resp.op = OP_RESPONSE;
        c.on_response(&resp);
        c.on_guest_data(b"hi").unwrap();
        c.stream.write_room = 100;
        c.flush_to_host().unwrap();
        assert_eq!(c.stream.written, b"OK 1024\nhi");
        let p = next(&mut c, 4096).unwrap();
        assert_eq!(p.payload, b"early");
    }

    #[test]
    fn shutdowns_both_ways() {
        let mut c = conn(1000);
        // Host half-closes after some data: data first, then SHUTDOWN(SEND).
        c.stream.input.extend(b"bye");
        c.stream.eof = true;
        c.fill_from_host().unwrap();
        assert_eq!(next(&mut c, 4096).unwrap().payload, b"bye");
        let p = next(&mut c, 4096).unwrap();
        assert_eq!(
            (p.hdr.op, p.hdr.flags, p.last),
            (OP_SHUTDOWN, SHUTDOWN_SEND, false)
        );
        assert_eq!(next(&mut c, 4096), None);
        // The guest still sends, then shuts down its side: host EOF after the data.
        c.on_guest_data(b"more").unwrap();
        c.on_guest_shutdown(false, true);
        assert_eq!(c.on_guest_data(b"x"), Err(ConnError::DataAfterShutdown));
        assert!(!c.take_host_write_shutdown(), "data first");
        c.stream.write_room = 10;
        c.flush_to_host().unwrap();
        assert!(c.take_host_write_shutdown());
        assert!(!c.take_host_write_shutdown(), "once");
        assert!(!c.finished());
        c.on_guest_shutdown(true, true);
        assert!(c.finished());
    }

    #[test]
    fn host_hangup_ends_the_connection() {
        let mut c = conn(1000);
        c.stream.broken = true;
        c.on_guest_data(b"data").unwrap();
        assert!(matches!(c.flush_to_host(), Err(ConnError::Host(_))));
        assert!(c.host_hup);
        let p = next(&mut c, 4096).unwrap();
        assert_eq!(p.hdr.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
        assert!(p.last);
        assert!(c.fill_from_host().is_err());
        let _ = OP_RST;
    }
}
