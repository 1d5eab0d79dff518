use std::io::{Read, Write};
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use arch::GuestMemoryMmap;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::packet::*;
use super::*;
use crate::virtio::test_utils::{
    guest_memory, interrupt, r, w, BackendLoop, Desc, TestQueue, VIRTQ_DESC_F_NEXT,
};
use crate::virtio::{feature, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_ID_VSOCK};

const CID: u64 = 3;
const RXBUF: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = 0x1000;
const TXBUF: u64 = 0x40_0000;
const TIMEOUT: Duration = Duration::from_secs(3);

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "flint-vsock-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("v.sock")
    }
    fn port_path(&self, port: u32) -> PathBuf {
        self.0.join(format!("v.sock_{port}"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest driver's side.
struct Guest {
    rxq: TestQueue,
    txq: TestQueue,
    seen: u16,
    buf_alloc: u32,
}

impl Guest {
    fn give_rx(&mut self, lp: &mut BackendLoop<Vsock>, n: usize) {
        for _ in 0..n {
            let slot = u64::from(self.rxq.next_desc());
            self.rxq
                .add_chain(&[w(RXBUF + slot * u64::from(RX_BUF_LEN), RX_BUF_LEN)]);
        }
        lp.dev().process_queue(RX_QUEUE);
    }

    fn hdr(&self, op: u16, guest_port: u32, host_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: self.buf_alloc,
            ..Header::default()
        }
    }

    fn send(&mut self, lp: &mut BackendLoop<Vsock>, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        self.send_raw(lp, &hdr.to_bytes(), payload);
    }

    fn send_raw(&mut self, lp: &mut BackendLoop<Vsock>, hdr: &[u8], payload: &[u8]) {
        let mem = &self.txq.mem;
        mem.write_slice(hdr, GuestAddress(TXBUF)).unwrap();
        mem.write_slice(payload, GuestAddress(TXBUF + 0x1000))
            .unwrap();
        if payload.is_empty() {
            self.txq.add_chain(&[r(TXBUF, hdr.len() as u32)]);
        } else {
            self.txq.add_chain(&[
                r(TXBUF, hdr.len() as u32),
                r(TXBUF + 0x1000, payload.len() as u32),
            ]);
        }
        lp.dev().process_queue(TX_QUEUE);
    }

    fn pending(&self) -> u16 {
        self.rxq.used_idx().wrapping_sub(self.seen)
    }

    /// Packets the device delivered since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.pending() > 0 {
            let (head, len) = self.rxq.used_elem(self.seen);
            self.seen = self.seen.wrapping_add(1);
            let addr = RXBUF + u64::from(head) * u64::from(RX_BUF_LEN);
            let mut b = vec![0u8; len as usize];
            self.rxq.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            let mut hb = [0u8; HDR_LEN];
            hb.copy_from_slice(&b[..HDR_LEN]);
            let hdr = Header::from_bytes(&hb);
            assert_eq!(hdr.len as usize, b.len() - HDR_LEN);
            out.push((hdr, b[HDR_LEN..].to_vec()));
        }
        out
    }

    /// Wait for at least `n` more packets.
    fn wait(&mut self, lp: &mut BackendLoop<Vsock>, n: u16) -> Vec<(Header, Vec<u8>)> {
        let rxq_used = |g: &Guest| g.pending() >= n;
        let end = Instant::now() + TIMEOUT;
        while !rxq_used(self) && Instant::now() < end {
            lp.run_once(5);
        }
        let got = self.recv();
        assert!(got.len() >= n as usize, "wanted {n} packets, got {got:?}");
        got
    }
}

struct Setup {
    dir: TempDir,
    lp: BackendLoop<Vsock>,
    g: Guest,
}

fn setup() -> Setup {
    setup_with_rx(128)
}

fn setup_with_rx(rx_buffers: usize) -> Setup {
    let dir = TempDir::new();
    let dev = Vsock::new(CID, &dir.sock()).unwrap();
    let mut lp = BackendLoop::new(dev);
    let mem = guest_memory(0x80_0000);
    let rxq = TestQueue::new(&mem, 0, QUEUE_SIZE);
    let txq = TestQueue::new(&mem, 0x8000, QUEUE_SIZE);
    let evq = TestQueue::new(&mem, 0x10000, QUEUE_SIZE);
    lp.dev()
        .activate(
            mem,
            feature(VIRTIO_F_VERSION_1),
            vec![rxq.queue(), txq.queue(), evq.queue()],
            interrupt(),
        )
        .unwrap();
    let mut g = Guest {
        rxq,
        txq,
        seen: 0,
        buf_alloc: 1 << 20,
    };
    g.give_rx(&mut lp, rx_buffers);
    Setup { dir, lp, g }
}

/// Read from a host stream (non-blocking) while pumping the loop, until `n` bytes or EOF.
fn host_read(lp: &mut BackendLoop<Vsock>, s: &mut UnixStream, n: usize) -> (Vec<u8>, bool) {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let end = Instant::now() + TIMEOUT;
    while out.len() < n && Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                lp.run_once(5);
            }
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

fn wait_eof(lp: &mut BackendLoop<Vsock>, s: &mut UnixStream) {
    let (data, eof) = host_read(lp, s, usize::MAX);
    assert!(eof, "expected EOF, got {} more bytes", data.len());
}

fn m(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A host program connects to guest port `port`; the guest accepts. Returns the stream and
/// the host port.
fn host_connect(s: &mut Setup, port: u32, guest_accepts: bool) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(s.dir.sock()).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(pkts.len(), 1);
    let (req, _) = &pkts[0];
    assert_eq!(
        (req.op, req.src_cid, req.dst_cid, req.dst_port, req.type_),
        (OP_REQUEST, HOST_CID, CID, port, TYPE_STREAM)
    );
    assert!(req.src_port >= FIRST_HOST_PORT);
    assert_eq!(req.buf_alloc, conn::CONN_BUF_ALLOC);
    let hp = req.src_port;
    let op = if guest_accepts { OP_RESPONSE } else { OP_RST };
    let h = s.g.hdr(op, port, hp);
    s.g.send(&mut s.lp, h, &[]);
    (host, hp)
}

#[test]
fn new_checks_cid_and_socket_path() {
    let dir = TempDir::new();
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let e = Vsock::new(cid, &dir.sock()).err().unwrap();
        assert!(matches!(e, VsockError::InvalidCid(_)), "{e}");
    }
    let v = Vsock::new(3, &dir.sock()).unwrap();
    assert_eq!(v.guest_cid(), 3);
    assert_eq!(v.uds_path(), dir.sock());
    let e = Vsock::new(4, &dir.sock()).err().unwrap();
    assert!(matches!(e, VsockError::InUse(_)), "{e}");
    assert!(e.to_string().contains("v.sock"));
    drop(v);
    assert!(!dir.sock().exists(), "removed on drop");

    // A stale socket file is replaced.
    let stale = UnixListener::bind(dir.sock()).unwrap();
    drop(stale);
    assert!(dir.sock().exists());
    let v = Vsock::new(3, &dir.sock()).unwrap();
    drop(v);

    std::fs::write(dir.sock(), b"data").unwrap();
    let e = Vsock::new(3, &dir.sock()).err().unwrap();
    assert!(matches!(e, VsockError::NotASocket(_)), "{e}");
    assert!(dir.sock().exists(), "a regular file is never removed");
    std::fs::remove_file(dir.sock()).unwrap();

    let e = Vsock::new(3, &dir.0.join("missing/v.sock")).err().unwrap();
    assert!(matches!(e, VsockError::Bind { .. }), "{e}");
}

#[test]
fn device_basics() {
    let dir = TempDir::new();
    let mut v = Vsock::new(0x1_0000_0003 & 0xffff_ffff, &dir.sock()).unwrap();
    assert_eq!(v.device_type(), VIRTIO_ID_VSOCK);
    assert_eq!(v.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(v.avail_features(), feature(VIRTIO_F_VERSION_1));
    let mut cfg = [0xffu8; 12];
    v.read_config(0, &mut cfg);
    assert_eq!(cfg, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut b = [0u8; 4];
    v.read_config(u64::MAX - 1, &mut b);
    assert_eq!(b, [0; 4]);
    let mem = guest_memory(0x10_0000);
    let q = TestQueue::new(&mem, 0, 16);
    assert_eq!(
        v.activate(
            mem,
            feature(VIRTIO_F_VERSION_1),
            vec![q.queue(), q.queue()],
            interrupt()
        ),
        Err(ActivateError::QueueCount { want: 3, got: 2 })
    );
    // Nothing happens while inactive.
    v.process_queue(0);
    v.process_queue(1);
    v.process_queue(2);
    v.process_queue(9);
}

#[test]
fn host_to_guest_handshake_and_data_both_ways() {
    let mut s = setup();
    let (mut host, hp) = host_connect(&mut s, 5000, true);
    assert_eq!(hp, FIRST_HOST_PORT);
    let (line, _) = host_read(&mut s.lp, &mut host, 8);
    assert_eq!(line, b"OK 1024\n");

    host.write_all(b"hello").unwrap();
    let pkts = s.g.wait(&mut s.lp, 1);
    let (h, p) = &pkts[0];
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, hp, 5000));
    assert_eq!(p, b"hello");

    let rw = s.g.hdr(OP_RW, 5000, hp);
    s.g.send(&mut s.lp, rw, b"world");
    let (got, _) = host_read(&mut s.lp, &mut host, 5);
    assert_eq!(got, b"world");

    // A second program gets the next port.
    let (mut host2, hp2) = host_connect(&mut s, 5000, true);
    assert_eq!(hp2, FIRST_HOST_PORT + 1);
    assert_eq!(host_read(&mut s.lp, &mut host2, 8).0, b"OK 1025\n");
    assert_eq!(s.lp.dev().connection_count(), 2);
    let mm = s.lp.dev().metrics();
    assert_eq!(m(&mm.connections_opened), 2);
    assert_eq!(m(&mm.malformed), 0);
}

#[test]
fn early_host_data_follows_the_handshake() {
    let mut s = setup();
    let mut host = UnixStream::connect(s.dir.sock()).unwrap();
    host.write_all(b"CONNECT 7\nearly").unwrap();
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(pkts[0].0.op, OP_REQUEST);
    assert_eq!(pkts.len(), 1, "no data before the response");
    let resp = s.g.hdr(OP_RESPONSE, 7, pkts[0].0.src_port);
    s.g.send(&mut s.lp, resp, &[]);
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(pkts[0].1, b"early");
    assert_eq!(host_read(&mut s.lp, &mut host, 8).0, b"OK 1024\n");
}

#[test]
fn guest_refusal_closes_the_host_socket() {
    let mut s = setup();
    let (mut host, _) = host_connect(&mut s, 6000, false);
    wait_eof(&mut s.lp, &mut host);
    assert_eq!(s.lp.dev().connection_count(), 0);
}

#[test]
fn bad_connect_lines_close_the_host_socket() {
    let mut s = setup();
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'A'; 100][..]] {
        let mut host = UnixStream::connect(s.dir.sock()).unwrap();
        host.write_all(line).unwrap();
        wait_eof(&mut s.lp, &mut host);
    }
    // Leaving before the line is fine too.
    drop(UnixStream::connect(s.dir.sock()).unwrap());
    for _ in 0..10 {
        s.lp.run_once(5);
    }
    let mm = s.lp.dev().metrics();
    assert_eq!(m(&mm.bad_connect_lines), 3);
    assert_eq!(s.g.recv(), vec![], "the guest saw nothing");
}

#[test]
fn guest_to_host_connect_data_and_refusal() {
    let mut s = setup();
    let listener = UnixListener::bind(s.dir.port_path(5000)).unwrap();
    let req = s.g.hdr(OP_REQUEST, 40000, 5000);
    s.g.send(&mut s.lp, req, &[]);
    let pkts = s.g.wait(&mut s.lp, 1);
    let (h, _) = &pkts[0];
    assert_eq!(
        (h.op, h.src_cid, h.src_port, h.dst_cid, h.dst_port),
        (OP_RESPONSE, HOST_CID, 5000, CID, 40000)
    );
    let (mut host, _) = listener.accept().unwrap();
    let rw = s.g.hdr(OP_RW, 40000, 5000);
    s.g.send(&mut s.lp, rw, b"ping");
    assert_eq!(host_read(&mut s.lp, &mut host, 4).0, b"ping");
    host.write_all(b"pong").unwrap();
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!((pkts[0].0.op, pkts[0].1.as_slice()), (OP_RW, &b"pong"[..]));

    // Nobody listens on port 5001.
    let req = s.g.hdr(OP_REQUEST, 40001, 5001);
    s.g.send(&mut s.lp, req, &[]);
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
        (OP_RST, 5001, 40001)
    );
    assert_eq!(m(&s.lp.dev().metrics().connect_failures), 1);

    // A second request for a live connection resets it.
    let req = s.g.hdr(OP_REQUEST, 40000, 5000);
    s.g.send(&mut s.lp, req, &[]);
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    wait_eof(&mut s.lp, &mut host);
    assert_eq!(s.lp.dev().connection_count(), 0);
}

#[test]
fn host_data_never_exceeds_guest_credit() {
    let mut s = setup();
    s.g.buf_alloc = 1000;
    let (mut host, hp) = host_connect(&mut s, 80, true);
    let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    host.write_all(&data).unwrap();
    let mut got = Vec::new();
    let mut fwd = 0u32;
    while got.len() < data.len() {
        // Take what fits the credit, then nothing more until we report consumption.
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            s.lp.run_once(5);
        }
        let pkts = s.g.recv();
        let bytes: usize = pkts.iter().map(|(_, p)| p.len()).sum();
        assert!(bytes as u32 <= 1000, "credit overrun: {bytes}");
        assert!(bytes > 0, "stalled at {}", got.len());
        for (h, p) in pkts {
            assert_eq!(h.op, OP_RW);
            got.extend(p);
        }
        fwd += bytes as u32;
        let mut upd = s.g.hdr(OP_CREDIT_UPDATE, 80, hp);
        upd.fwd_cnt = fwd;
        s.g.send(&mut s.lp, upd, &[]);
    }
    assert_eq!(got, data);
}

#[test]
fn guest_data_beyond_our_credit_resets() {
    let mut s = setup();
    let (mut host, hp) = host_connect(&mut s, 80, true);
    assert_eq!(host_read(&mut s.lp, &mut host, 8).0, b"OK 1024\n");
    // The host does not read, and its socket buffer is tiny: the device buffers up to its
    // advertised credit.
    {
        let dev = s.lp.dev();
        let fd = dev
            .muxer
            .conns
            .values()
            .next()
            .unwrap()
            .1
            .stream
            .as_raw_fd();
        let size: libc::c_int = 4096;
        // SAFETY: `size` is a valid int for the length passed; `fd` is an open socket.
        let ret = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0);
    }
    let chunk = vec![0x5a; 60000];
    let mut sent = 0u32;
    while sent + 60000 <= conn::CONN_BUF_ALLOC {
        let rw = s.g.hdr(OP_RW, 80, hp);
        s.g.send(&mut s.lp, rw, &chunk);
        sent += 60000;
    }
    assert_eq!(s.lp.dev().connection_count(), 1, "within credit");
    // Ask for credit: the reply reflects what reached the host socket.
    let cr = s.g.hdr(OP_CREDIT_REQUEST, 80, hp);
    s.g.send(&mut s.lp, cr, &[]);
    let pkts = s.g.wait(&mut s.lp, 1);
    let upd = pkts
        .iter()
        .rfind(|(h, _)| h.op == OP_CREDIT_UPDATE)
        .unwrap()
        .0;
    assert_eq!(upd.buf_alloc, conn::CONN_BUF_ALLOC);
    let in_flight = sent - upd.fwd_cnt;
    // Exceed what is left.
    let over = vec![1u8; (conn::CONN_BUF_ALLOC - in_flight + 1) as usize];
    assert!(
        over.len() <= MAX_PAYLOAD as usize,
        "{} bytes in flight",
        in_flight
    );
    let rw = s.g.hdr(OP_RW, 80, hp);
    s.g.send(&mut s.lp, rw, &over);
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(pkts.last().unwrap().0.op, OP_RST);
    assert_eq!(m(&s.lp.dev().metrics().credit_violations), 1);
    assert_eq!(s.lp.dev().connection_count(), 0);
    // The host gets what was accepted, then EOF.
    let (got, eof) = host_read(&mut s.lp, &mut host, usize::MAX);
    assert!(eof);
    assert!(got.len() <= sent as usize);
}

#[test]
fn slow_host_reader_gets_everything_with_credit_updates() {
    let mut s = setup();
    let (mut host, hp) = host_connect(&mut s, 80, true);
    assert_eq!(host_read(&mut s.lp, &mut host, 8).0, b"OK 1024\n");
    let total = 2 * 1024 * 1024usize;
    let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
    let mut sent = 0usize;
    let mut peer_fwd = 0u32;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    host.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while got.len() < total {
        assert!(Instant::now() < end, "stuck at {} of {total}", got.len());
        // Send what our credit allows, in 16 KiB packets.
        let credit = conn::CONN_BUF_ALLOC - (sent as u32 - peer_fwd);
        let n = (credit as usize).min(16384).min(total - sent);
        if n > 0 {
            let rw = s.g.hdr(OP_RW, 80, hp);
            s.g.send(&mut s.lp, rw, &data[sent..sent + n]);
            sent += n;
        }
        // The host reads a little at a time.
        if let Ok(k) = host.read(&mut buf[..4096]) {
            got.extend_from_slice(&buf[..k]);
        }
        s.lp.run_once(0);
        for (h, _) in s.g.recv() {
            assert_ne!(h.op, OP_RST);
            peer_fwd = h.fwd_cnt;
        }
        if s.g.rxq.used_idx().wrapping_sub(s.g.rxq.next_desc()) < 8 {
            s.g.give_rx(&mut s.lp, 64);
        }
    }
    assert_eq!(got, data);
    assert_eq!(m(&s.lp.dev().metrics().credit_violations), 0);
}

#[test]
fn shutdown_paths() {
    let mut s = setup();
    let (mut host, hp) = host_connect(&mut s, 80, true);
    assert_eq!(host_read(&mut s.lp, &mut host, 8).0, b"OK 1024\n");

    // The guest stops sending: the host reads EOF, but can still send.
    let mut sd = s.g.hdr(OP_SHUTDOWN, 80, hp);
    sd.flags = SHUTDOWN_SEND;
    let rw = s.g.hdr(OP_RW, 80, hp);
    s.g.send(&mut s.lp, rw, b"last");
    s.g.send(&mut s.lp, sd, &[]);
    let (got, eof) = host_read(&mut s.lp, &mut host, usize::MAX);
    assert_eq!((got.as_slice(), eof), (&b"last"[..], true));
    host.write_all(b"reply").unwrap();
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(pkts[0].1, b"reply");

    // The host stops sending too: SHUTDOWN both ways, connection gone.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let pkts = s.g.wait(&mut s.lp, 1);
    let (h, _) = &pkts[0];
    assert_eq!(h.op, OP_SHUTDOWN);
    assert_ne!(h.flags & SHUTDOWN_SEND, 0);
    let deadline = Instant::now() + TIMEOUT;
    while s.lp.dev().connection_count() != 0 && Instant::now() < deadline {
        s.lp.run_once(5);
        s.g.recv();
    }
    assert_eq!(s.lp.dev().connection_count(), 0);

    // A guest close (SHUTDOWN both) is answered with RST after the data reached the host.
    let (mut host, hp) = host_connect(&mut s, 81, true);
    assert_eq!(host_read(&mut s.lp, &mut host, 8).0, b"OK 1025\n");
    let rw = s.g.hdr(OP_RW, 81, hp);
    s.g.send(&mut s.lp, rw, b"bye");
    let mut sd = s.g.hdr(OP_SHUTDOWN, 81, hp);
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    s.g.send(&mut s.lp, sd, &[]);
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(pkts.last().unwrap().0.op, OP_RST);
    let (got, eof) = host_read(&mut s.lp, &mut host, usize::MAX);
    assert_eq!((got.as_slice(), eof), (&b"bye"[..], true));

    // The guest resets: the host socket closes.
    let (mut host, hp) = host_connect(&mut s, 82, true);
    let rst = s.g.hdr(OP_RST, 82, hp);
    s.g.send(&mut s.lp, rst, &[]);
    let (got, eof) = host_read(&mut s.lp, &mut host, usize::MAX);
    assert_eq!((got.as_slice(), eof), (&b"OK 1026\n"[..], true));
    assert_eq!(s.lp.dev().connection_count(), 0);
}

#[test]
fn host_disconnect_mid_transfer_ends_the_connection() {
    let mut s = setup();
    let (mut host, hp) = host_connect(&mut s, 80, true);
    assert_eq!(host_read(&mut s.lp, &mut host, 8).0, b"OK 1024\n");
    host.write_all(b"partial").unwrap();
    drop(host);
    let mut pkts = s.g.wait(&mut s.lp, 1);
    if pkts.len() < 2 {
        pkts.extend(s.g.wait(&mut s.lp, 1));
    }
    assert_eq!(pkts[0].1, b"partial");
    let (h, _) = pkts[1];
    assert_eq!(h.op, OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
    assert_eq!(s.lp.dev().connection_count(), 0);
    // The guest's late data is answered with RST; its RST with nothing.
    let rw = s.g.hdr(OP_RW, 80, hp);
    s.g.send(&mut s.lp, rw, b"late");
    assert_eq!(s.g.wait(&mut s.lp, 1)[0].0.op, OP_RST);
    let rst = s.g.hdr(OP_RST, 80, hp);
    s.g.send(&mut s.lp, rst, &[]);
    // Still healthy.
    let (mut host, _) = host_connect(&mut s, 80, true);
    assert_eq!(host_read(&mut s.lp, &mut host, 8).0, b"OK 1025\n");
}

#[test]
fn malformed_packets_are_dropped_or_reset() {
    let mut s = setup();
    let mm = s.lp.dev().metrics();
    let base = s.g.hdr(OP_RW, 1, 2);

    // Chains the device cannot read: no reply.
    s.g.send_raw(&mut s.lp, &base.to_bytes()[..40], &[]);
    let mut long = base;
    long.len = MAX_PAYLOAD + 1;
    s.g.send_raw(&mut s.lp, &long.to_bytes(), &[0; 100]);
    let mut short = base;
    short.len = 10;
    s.g.send_raw(&mut s.lp, &short.to_bytes(), &[0; 5]);
    s.g.txq.add_chain(&[r(TXBUF, 44), w(TXBUF + 0x1000, 16)]);
    s.g.txq.add_chain(&[r(0x80_0000 - 20, 44)]);
    s.g.txq.set_desc(250, TXBUF, 44, VIRTQ_DESC_F_NEXT, 250);
    s.g.txq.publish(250);
    s.lp.dev().process_queue(TX_QUEUE);
    assert_eq!(m(&mm.malformed), 6);
    // Source CID not the guest's: dropped silently.
    let mut h = base;
    h.src_cid = 7;
    s.g.send(&mut s.lp, h, &[]);
    assert_eq!(m(&mm.malformed), 7);
    for _ in 0..5 {
        s.lp.run_once(2);
    }
    assert_eq!(s.g.recv(), vec![]);

    // Reset: unknown op, wrong destination CID, non-stream type, data for no connection.
    let mut h = base;
    h.op = 99;
    s.g.send(&mut s.lp, h, &[]);
    let mut h = base;
    h.dst_cid = 5;
    s.g.send(&mut s.lp, h, &[]);
    let mut h = base;
    h.type_ = 2;
    s.g.send(&mut s.lp, h, &[]);
    s.g.send(&mut s.lp, base, b"data");
    let mut h = base;
    h.op = OP_CREDIT_UPDATE;
    h.len = 3;
    s.g.send_raw(&mut s.lp, &h.to_bytes(), &[1, 2, 3]);
    let pkts = s.g.wait(&mut s.lp, 5);
    assert_eq!(pkts.len(), 5);
    for (p, _) in &pkts {
        assert_eq!(
            (p.op, p.src_cid, p.dst_cid, p.src_port, p.dst_port),
            (OP_RST, HOST_CID, CID, 2, 1)
        );
    }
    assert_eq!(m(&mm.malformed), 12);
    assert_eq!(m(&mm.resets_sent), 5);
    // A reset for nothing gets nothing back.
    let rst = s.g.hdr(OP_RST, 1, 2);
    s.g.send(&mut s.lp, rst, &[]);
    // RESPONSE on a guest-initiated (established) connection is a protocol error.
    let listener = UnixListener::bind(s.dir.port_path(9)).unwrap();
    let req = s.g.hdr(OP_REQUEST, 300, 9);
    s.g.send(&mut s.lp, req, &[]);
    assert_eq!(s.g.wait(&mut s.lp, 1)[0].0.op, OP_RESPONSE);
    let resp = s.g.hdr(OP_RESPONSE, 300, 9);
    s.g.send(&mut s.lp, resp, &[]);
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    drop(listener);
}

#[test]
fn transmit_chains_through_indirect_tables_are_refused() {
    // No flint device offers VIRTIO_F_INDIRECT_DESC: a request the guest hides in an indirect
    // table is malformed, not served.
    let mut s = setup();
    let mm = s.lp.dev().metrics();
    let listener = UnixListener::bind(s.dir.port_path(9)).unwrap();
    let mut req = s.g.hdr(OP_REQUEST, 300, 9);
    req.len = 0;
    let table = TXBUF + 0x2000;
    s.g.txq
        .mem
        .write_slice(&req.to_bytes(), GuestAddress(TXBUF))
        .unwrap();
    // The indirect table: one readable descriptor holding the header.
    s.g.txq.mem.write_obj(TXBUF, GuestAddress(table)).unwrap();
    s.g.txq
        .mem
        .write_obj(HDR_LEN as u32, GuestAddress(table + 8))
        .unwrap();
    s.g.txq
        .mem
        .write_obj(0u16, GuestAddress(table + 12))
        .unwrap();
    let head = s.g.txq.next_desc();
    s.g.txq.set_desc(
        head,
        table,
        16,
        crate::virtio::chain::VIRTQ_DESC_F_INDIRECT,
        0,
    );
    s.g.txq.publish(head);
    s.lp.dev().process_queue(TX_QUEUE);
    assert_eq!(m(&mm.malformed), 1);
    assert_eq!(s.g.txq.used_idx(), 1, "the chain goes back to the guest");
    for _ in 0..5 {
        s.lp.run_once(2);
    }
    assert_eq!(
        s.g.recv(),
        vec![],
        "no response to a request in an indirect table"
    );
    drop(listener);
}

#[test]
fn bad_rx_chains_are_returned_empty() {
    let mut s = setup_with_rx(0);
    s.g.rxq.add_chain(&[r(RXBUF, 64)]);
    s.g.rxq.add_chain(&[w(RXBUF + 0x1000, 20)]);
    s.g.rxq.add_chain(&[w(0x80_0000 - 8, 64)]);
    s.g.give_rx(&mut s.lp, 1);
    let mut host = UnixStream::connect(s.dir.sock()).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    let end = Instant::now() + TIMEOUT;
    while s.g.pending() < 4 && Instant::now() < end {
        s.lp.run_once(5);
    }
    assert_eq!(s.g.rxq.used_idx(), 4);
    for i in 0..3 {
        assert_eq!(s.g.rxq.used_elem(i), (u32::from(i), 0));
    }
    assert_eq!(s.g.rxq.used_elem(3), (3, HDR_LEN as u32));
    assert_eq!(m(&s.lp.dev().metrics().rx_errors), 3);
}

/// Guest memory for receive chains laid out by the tests below (above the standard buffers).
const SPLITBUF: u64 = 0x20_0000;

/// Read back what the device wrote into a chain of `descs` (device-writable, in order), `len`
/// bytes: the header and the payload.
fn read_chain(mem: &GuestMemoryMmap, descs: &[(u64, u32)], len: u32) -> (Header, Vec<u8>) {
    let mut bytes = Vec::new();
    let mut left = len as usize;
    for &(addr, dlen) in descs {
        let n = left.min(dlen as usize);
        let mut b = vec![0u8; n];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        bytes.extend_from_slice(&b);
        left -= n;
    }
    assert_eq!(left, 0, "the device reported more than the chain holds");
    let mut hb = [0u8; HDR_LEN];
    hb.copy_from_slice(&bytes[..HDR_LEN]);
    let hdr = Header::from_bytes(&hb);
    assert_eq!(hdr.len as usize, bytes.len() - HDR_LEN);
    (hdr, bytes[HDR_LEN..].to_vec())
}

#[test]
fn host_data_reaches_chains_that_split_the_header_in_order() {
    let mut s = setup_with_rx(1);
    let (mut host, hp) = host_connect(&mut s, 4242, true);
    assert_eq!(host_read(&mut s.lp, &mut host, 8).0, b"OK 1024\n");
    // Several times the connection's buffer, so its wrap falls inside packets.
    let data: Vec<u8> = (0..300 * 1024u32)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 11)) as u8)
        .collect();
    host.set_nonblocking(false).unwrap();
    let writer = {
        let mut host = host.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || host.write_all(&data).unwrap())
    };
    let mem = s.g.rxq.mem.clone();
    let mut got = Vec::new();
    let mut layouts: HashMap<u16, Vec<(u64, u32)>> = HashMap::new();
    let end = Instant::now() + TIMEOUT * 4;
    let mut round = 0u64;
    let mut outstanding = 0;
    while got.len() < data.len() && Instant::now() < end {
        if outstanding == 0 {
            // 16 chains: the header split 10 + 34 over two descriptors (the second also
            // holding the payload's first bytes), then a payload descriptor of an odd size.
            for j in 0..16u64 {
                let base = SPLITBUF + j * 0x8000;
                let tail = 3000 + ((round * 16 + j) * 97 % 5000) as u32;
                let descs = vec![(base, 10), (base + 0x100, 40), (base + 0x1000, tail)];
                let chain: Vec<_> = descs.iter().map(|&(a, l)| w(a, l)).collect();
                let head = s.g.rxq.add_chain(&chain);
                layouts.insert(head, descs);
            }
            outstanding = 16;
            round += 1;
            s.lp.dev().process_queue(RX_QUEUE);
        }
        s.lp.run_once(5);
        while s.g.pending() > 0 {
            let (head, len) = s.g.rxq.used_elem(s.g.seen);
            s.g.seen = s.g.seen.wrapping_add(1);
            outstanding -= 1;
            let (hdr, payload) = read_chain(&mem, &layouts[&(head as u16)], len);
            assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RW, hp, 4242));
            assert!(hdr.len > 0);
            got.extend_from_slice(&payload);
        }
    }
    writer.join().unwrap();
    assert_eq!(got.len(), data.len(), "all bytes arrive");
    assert!(got == data, "bytes reordered or corrupted");
    let mm = s.lp.dev().metrics();
    assert_eq!(m(&mm.rx_errors), 0);
    assert_eq!(m(&mm.rx_bytes), data.len() as u64);
}

#[test]
fn hostile_receive_chains_get_nothing_and_the_data_waits_for_a_good_one() {
    let mut s = setup_with_rx(1);
    let (mut host, _) = host_connect(&mut s, 4343, true);
    assert_eq!(host_read(&mut s.lp, &mut host, 8).0, b"OK 1024\n");
    let mem = s.g.rxq.mem.clone();
    let end_of_mem = 0x80_0000u64;
    mem.write_slice(&[0xee; 0x2000], GuestAddress(SPLITBUF))
        .unwrap();
    mem.write_slice(&[0xee; 8], GuestAddress(end_of_mem - 8))
        .unwrap();
    let bad: [&[Desc]; 7] = [
        // An address that wraps around the top of the address space.
        &[w(u64::MAX - 15, 64)],
        // Past the end of guest memory, and longer than all of it.
        &[w(end_of_mem - 8, 64)],
        &[w(SPLITBUF, 0x1000_0000)],
        // Too short for a header, in one descriptor or two.
        &[w(SPLITBUF, HDR_LEN as u32 - 1)],
        &[w(SPLITBUF, 20), w(SPLITBUF + 0x1000, 20)],
        // A good descriptor followed by one outside memory.
        &[w(SPLITBUF, 4096), w(end_of_mem - 4, 64)],
        // The wrong way round.
        &[w(SPLITBUF, 30), r(SPLITBUF + 0x1000, 4096)],
    ];
    for chain in bad {
        s.g.rxq.add_chain(chain);
    }
    host.write_all(b"payload").unwrap();
    let good =
        s.g.rxq
            .add_chain(&[w(SPLITBUF + 0x4000, 8), w(SPLITBUF + 0x5000, 4096)]);
    s.lp.dev().process_queue(RX_QUEUE);
    let first = s.g.seen;
    let stop = Instant::now() + TIMEOUT;
    while s.g.pending() < 8 && Instant::now() < stop {
        s.lp.run_once(5);
    }
    assert_eq!(s.g.pending(), 8);
    for i in 0..7 {
        assert_eq!(
            s.g.rxq.used_elem(first.wrapping_add(i)).1,
            0,
            "bad chain {i}"
        );
    }
    let (head, len) = s.g.rxq.used_elem(first.wrapping_add(7));
    assert_eq!(head, u32::from(good));
    let (hdr, payload) = read_chain(
        &mem,
        &[(SPLITBUF + 0x4000, 8), (SPLITBUF + 0x5000, 4096)],
        len,
    );
    assert_eq!((hdr.op, payload.as_slice()), (OP_RW, &b"payload"[..]));
    assert_eq!(m(&s.lp.dev().metrics().rx_errors), 7);
    // Nothing was written into the bad chains.
    let mut b = vec![0u8; 0x2000];
    mem.read_slice(&mut b, GuestAddress(SPLITBUF)).unwrap();
    assert!(b.iter().all(|&x| x == 0xee));
    let mut b = [0u8; 8];
    mem.read_slice(&mut b, GuestAddress(end_of_mem - 8))
        .unwrap();
    assert_eq!(b, [0xee; 8]);
}

#[test]
fn no_rx_buffers_holds_packets_until_refill() {
    let dir = TempDir::new();
    let mut lp = BackendLoop::new(Vsock::new(CID, &dir.sock()).unwrap());
    let mem = guest_memory(0x80_0000);
    let rxq = TestQueue::new(&mem, 0, QUEUE_SIZE);
    let txq = TestQueue::new(&mem, 0x8000, QUEUE_SIZE);
    let evq = TestQueue::new(&mem, 0x10000, QUEUE_SIZE);
    // A host program connects before the driver is up.
    let mut host = UnixStream::connect(dir.sock()).unwrap();
    host.write_all(b"CONNECT 22\n").unwrap();
    for _ in 0..10 {
        lp.run_once(5);
    }
    lp.dev()
        .activate(
            mem,
            feature(VIRTIO_F_VERSION_1),
            vec![rxq.queue(), txq.queue(), evq.queue()],
            interrupt(),
        )
        .unwrap();
    let mut s = Setup {
        dir,
        lp,
        g: Guest {
            rxq,
            txq,
            seen: 0,
            buf_alloc: 1 << 20,
        },
    };
    for _ in 0..10 {
        s.lp.run_once(5);
    }
    assert_eq!(s.g.pending(), 0);
    s.g.give_rx(&mut s.lp, 4);
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(pkts[0].0.op, OP_REQUEST);
    let _ = &mut host;
}

#[test]
fn thirty_two_connections_at_once() {
    let mut s = setup();
    s.g.give_rx(&mut s.lp, 100);
    let mut hosts = Vec::new();
    for i in 0..16u32 {
        let (mut h, hp) = host_connect(&mut s, 6000 + i, true);
        assert_eq!(
            host_read(&mut s.lp, &mut h, 8 + (hp >= 10_000) as usize).0,
            format!("OK {hp}\n").into_bytes()
        );
        hosts.push((h, hp, 6000 + i));
    }
    let mut listeners = Vec::new();
    for i in 0..16u32 {
        let l = UnixListener::bind(s.dir.port_path(7000 + i)).unwrap();
        let req = s.g.hdr(OP_REQUEST, 50000 + i, 7000 + i);
        s.g.send(&mut s.lp, req, &[]);
        assert_eq!(s.g.wait(&mut s.lp, 1)[0].0.op, OP_RESPONSE);
        let (h, _) = l.accept().unwrap();
        listeners.push(l);
        hosts.push((h, 7000 + i, 50000 + i));
    }
    assert_eq!(s.lp.dev().connection_count(), 32);
    // Every host writes its own message; every guest port gets its own.
    for (i, (h, _, _)) in hosts.iter_mut().enumerate() {
        h.write_all(format!("from-host-{i}").as_bytes()).unwrap();
    }
    let mut seen = HashMap::new();
    let end = Instant::now() + TIMEOUT;
    while seen.len() < 32 && Instant::now() < end {
        s.lp.run_once(5);
        for (h, p) in s.g.recv() {
            assert_eq!(h.op, OP_RW);
            seen.entry(h.dst_port).or_insert_with(Vec::new).extend(p);
        }
        if s.g.pending() == 0 {
            s.g.give_rx(&mut s.lp, 16);
        }
    }
    for (i, (_, _, gp)) in hosts.iter().enumerate() {
        assert_eq!(seen[gp], format!("from-host-{i}").into_bytes());
    }
    for (i, (h, hp, gp)) in hosts.iter_mut().enumerate() {
        let rw = s.g.hdr(OP_RW, *gp, *hp);
        s.g.send(&mut s.lp, rw, format!("from-guest-{i}").as_bytes());
        let want = format!("from-guest-{i}").into_bytes();
        assert_eq!(host_read(&mut s.lp, h, want.len()).0, want);
    }
    // Reset drops everything.
    s.lp.dev().reset();
    for (h, _, _) in hosts.iter_mut() {
        wait_eof(&mut s.lp, h);
    }
    assert_eq!(s.lp.dev().connection_count(), 0);
}

#[test]
fn parse_tx_chain_splits_header_and_payload_anywhere() {
    let mem = guest_memory(0x10_0000);
    let mut tq = TestQueue::new(&mem, 0, 16);
    let mut h = Header::to_guest(2, 1, 2, OP_RW);
    h.len = 6;
    let mut bytes = h.to_bytes().to_vec();
    bytes.extend_from_slice(b"abcdef");
    mem.write_slice(&bytes[..30], GuestAddress(0x8000)).unwrap();
    mem.write_slice(&bytes[30..48], GuestAddress(0x9000))
        .unwrap();
    mem.write_slice(&bytes[48..], GuestAddress(0xa000)).unwrap();
    tq.add_chain(&[r(0x8000, 30), r(0x9000, 18), r(0xa000, 2), r(0xb000, 0)]);
    let mut q = tq.queue();
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let (got, payload) = parse_tx_chain(&mem, chain).unwrap();
    assert_eq!(got, h);
    assert_eq!(payload, b"abcdef");
}

/// A fresh device activated with queues at `positions` (as the transport does on restore),
/// told it was restored. Returns it with the driver's event queue.
fn restored_device(
    dir: &TempDir,
    mem: &GuestMemoryMmap,
    event_buffer_first: bool,
) -> (Vsock, TestQueue) {
    let rxq = TestQueue::new(mem, 0, QUEUE_SIZE);
    let txq = TestQueue::new(mem, 0x8000, QUEUE_SIZE);
    let mut evq = TestQueue::new(mem, 0x10000, QUEUE_SIZE);
    if event_buffer_first {
        evq.add_chain(&[w(0x20000, 4)]);
    }
    let mut dev = Vsock::new(CID, &dir.sock()).unwrap();
    dev.activate(
        mem.clone(),
        feature(VIRTIO_F_VERSION_1),
        vec![rxq.queue(), txq.queue(), evq.queue()],
        interrupt(),
    )
    .unwrap();
    assert_eq!(dev.queue_positions().len(), 3);
    dev.restored();
    (dev, evq)
}

#[test]
fn restore_sends_a_transport_reset_event() {
    let dir = TempDir::new();
    let mem = guest_memory(0x80_0000);
    mem.write_obj(0xffff_ffffu32, GuestAddress(0x20000))
        .unwrap();
    let (dev, evq) = restored_device(&dir, &mem, true);
    assert_eq!(evq.used_idx(), 1);
    assert_eq!(evq.used_elem(0), (0, 4));
    let id: u32 = mem.read_obj(GuestAddress(0x20000)).unwrap();
    assert_eq!(id, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    assert_eq!(dev.queue_positions()[EVENT_QUEUE].next_used, 1);
}

#[test]
fn transport_reset_waits_for_an_event_buffer() {
    let dir = TempDir::new();
    let mem = guest_memory(0x80_0000);
    mem.write_obj(0xffff_ffffu32, GuestAddress(0x20000))
        .unwrap();
    let (mut dev, mut evq) = restored_device(&dir, &mem, false);
    assert_eq!(evq.used_idx(), 0);
    evq.add_chain(&[w(0x20000, 4)]);
    dev.process_queue(EVENT_QUEUE);
    assert_eq!(evq.used_idx(), 1);
    let id: u32 = mem.read_obj(GuestAddress(0x20000)).unwrap();
    assert_eq!(id, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    // Only one.
    evq.add_chain(&[w(0x20100, 4)]);
    dev.process_queue(EVENT_QUEUE);
    assert_eq!(evq.used_idx(), 1);
}

#[test]
fn a_booted_device_sends_no_events() {
    let s = setup();
    let mem = s.g.rxq.mem.clone();
    let mut evq = TestQueue::new(&mem, 0x10000, QUEUE_SIZE);
    evq.add_chain(&[w(0x20000, 4)]);
    s.lp.dev().process_queue(EVENT_QUEUE);
    assert_eq!(evq.used_idx(), 0);
}

#[test]
fn host_connections_wait_until_the_guest_has_handled_the_reset() {
    let dir = TempDir::new();
    let mem = guest_memory(0x80_0000);
    let rxq = TestQueue::new(&mem, 0, QUEUE_SIZE);
    let txq = TestQueue::new(&mem, 0x8000, QUEUE_SIZE);
    let mut evq = TestQueue::new(&mem, 0x10000, QUEUE_SIZE);
    // Linux keeps several event buffers on the queue.
    evq.add_chain(&[w(0x20000, 4)]);
    evq.add_chain(&[w(0x20100, 4)]);
    let mut lp = BackendLoop::new(Vsock::new(CID, &dir.sock()).unwrap());
    lp.dev()
        .activate(
            mem.clone(),
            feature(VIRTIO_F_VERSION_1),
            vec![rxq.queue(), txq.queue(), evq.queue()],
            interrupt(),
        )
        .unwrap();
    lp.dev().restored();
    // As the transport does after a restore: look at every queue once.
    for q in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
        lp.dev().process_queue(q);
    }
    assert_eq!(evq.used_idx(), 1, "the reset event was sent");
    let mut g = Guest {
        rxq,
        txq,
        seen: 0,
        buf_alloc: 1 << 20,
    };
    g.give_rx(&mut lp, 16);

    // A host program connects at once (flint run's client does): the guest must not see the
    // request while it may still reset its connections, this one included.
    let mut host = UnixStream::connect(dir.sock()).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    for _ in 0..20 {
        lp.run_once(5);
    }
    lp.dev().process_queue(EVENT_QUEUE);
    assert_eq!(
        g.pending(),
        0,
        "a request before the guest handled the reset"
    );

    // The driver handled the event and gives its buffer back: now the request goes out.
    evq.add_chain(&[w(0x20000, 4)]);
    lp.dev().process_queue(EVENT_QUEUE);
    let pkts = g.wait(&mut lp, 1);
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (OP_REQUEST, 52));
    let resp = g.hdr(OP_RESPONSE, 52, pkts[0].0.src_port);
    g.send(&mut lp, resp, &[]);
    let (answer, _) = host_read(&mut lp, &mut host, 8);
    assert!(answer.starts_with(b"OK "), "{answer:?}");
    assert_eq!(lp.dev().connection_count(), 1);
}

/// A guest that never posts receive buffers and sends to ports nobody listens on.
#[test]
fn resets_for_a_guest_that_reads_nothing_are_bounded_and_counted() {
    let mut s = setup_with_rx(0);
    for i in 0..100_000u32 {
        let h = s.g.hdr(OP_RW, 10_000 + i % 50_000, 20_000 + i / 50_000);
        s.g.send(&mut s.lp, h, b"x");
    }
    let queued = s.lp.dev().muxer.ctrl.len();
    assert_eq!(queued, MAX_CONTROL_PACKETS, "resets held for the guest");
    let mm = s.lp.dev().metrics();
    assert_eq!(m(&mm.control_dropped), 100_000 - MAX_CONTROL_PACKETS as u64);
    // When the guest reads again, it gets the resets that were kept, and the device works.
    s.g.give_rx(&mut s.lp, 200);
    assert_eq!(s.g.wait(&mut s.lp, 200).len(), 200);
    s.g.give_rx(&mut s.lp, 200);
    assert_eq!(s.g.wait(&mut s.lp, 200).len(), 200);
    assert_eq!(m(&mm.resets_sent), 400);
}

/// The guest puts a whole ring of packets on the transmit queue at once.
#[test]
fn a_full_transmit_ring_is_served_in_bounded_passes_without_a_new_kick() {
    let mut s = setup();
    let rst = s.g.hdr(OP_RST, 1, 2);
    s.g.txq
        .mem
        .write_slice(&rst.to_bytes(), GuestAddress(TXBUF))
        .unwrap();
    for _ in 0..QUEUE_SIZE {
        s.g.txq.add_chain(&[r(TXBUF, HDR_LEN as u32)]);
    }
    s.lp.dev().process_queue(TX_QUEUE);
    let first_pass = s.g.txq.used_idx();
    assert!(first_pass > 0 && first_pass < QUEUE_SIZE, "{first_pass}");
    // No new notification: the device picks the rest up from its event loop.
    let done = s.lp.run_until(TIMEOUT, |d| m(&d.metrics.tx_packets) == 256);
    assert!(done, "handled {}", m(&s.lp.dev().metrics.tx_packets));
    assert_eq!(s.g.txq.used_idx(), QUEUE_SIZE);
}

/// A vCPU keeps moving `avail.idx` (and notifying) while the device serves the transmit queue.
#[test]
fn a_transmit_queue_that_never_empties_is_served_in_bounded_passes() {
    use std::sync::atomic::AtomicBool;
    const TOTAL: u64 = 50_000;
    let mut s = setup();
    let rst = s.g.hdr(OP_RST, 1, 2);
    let txq = &s.g.txq;
    txq.mem
        .write_slice(&rst.to_bytes(), GuestAddress(TXBUF))
        .unwrap();
    txq.set_desc(0, TXBUF, HDR_LEN as u32, 0, 0);
    let (mem, avail, used) = (txq.mem.clone(), txq.avail, txq.used);
    let kicked = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (kicked2, stop2) = (kicked.clone(), stop.clone());
    // The "vCPU": keeps the ring full of the same one-descriptor chain, notifying each time.
    let vcpu = std::thread::spawn(move || {
        let mut published: u64 = 0;
        while !stop2.load(Ordering::Relaxed) && published < TOTAL * 4 {
            let used_idx: u16 = mem.read_obj(GuestAddress(used.0 + 2)).unwrap();
            let avail_idx = published as u16;
            if avail_idx.wrapping_sub(used_idx) < QUEUE_SIZE {
                let slot = GuestAddress(avail.0 + 4 + 2 * u64::from(avail_idx % QUEUE_SIZE));
                mem.write_obj(0u16, slot).unwrap();
                std::sync::atomic::fence(Ordering::Release);
                mem.write_obj(avail_idx.wrapping_add(1), GuestAddress(avail.0 + 2))
                    .unwrap();
                published += 1;
                kicked2.store(true, Ordering::Release);
            } else {
                std::hint::spin_loop();
            }
        }
    });
    // Let the vCPU fill most of the ring first.
    let avail_idx = |s: &Setup| {
        s.g.txq
            .mem
            .read_obj::<u16>(GuestAddress(s.g.txq.avail.0 + 2))
            .unwrap()
    };
    while avail_idx(&s) < 200 {
        std::hint::spin_loop();
    }
    let mut most = 0;
    // The event loop: every notification is one call, and the device's own wakeups are passes.
    let done = s.lp.run_until(Duration::from_secs(60), |d| {
        if kicked.swap(false, Ordering::Acquire) {
            let before = m(&d.metrics.tx_packets);
            d.process_queue(TX_QUEUE);
            most = most.max(m(&d.metrics.tx_packets) - before);
        }
        m(&d.metrics.tx_packets) >= TOTAL
    });
    stop.store(true, Ordering::Relaxed);
    vcpu.join().unwrap();
    assert!(done, "only {} handled", m(&s.lp.dev().metrics.tx_packets));
    assert!(
        most <= u64::from(MAX_TX_CHAINS_PER_PASS),
        "one notification served {most} packets"
    );
}

#[test]
fn drop_leaves_a_file_that_replaced_the_socket_alone() {
    let dir = TempDir::new();
    let v = Vsock::new(CID, &dir.sock()).unwrap();
    // Someone else removed our socket and put their own file there.
    std::fs::remove_file(dir.sock()).unwrap();
    std::fs::write(dir.sock(), b"not yours").unwrap();
    drop(v);
    assert_eq!(std::fs::read(dir.sock()).unwrap(), b"not yours");
    std::fs::remove_file(dir.sock()).unwrap();

    // And another program's socket (a second flint, say) likewise.
    let v = Vsock::new(CID, &dir.sock()).unwrap();
    std::fs::remove_file(dir.sock()).unwrap();
    let other = UnixListener::bind(dir.sock()).unwrap();
    drop(v);
    assert!(
        UnixStream::connect(dir.sock()).is_ok(),
        "the other socket is gone"
    );
    drop(other);
}

/// Short timeouts for the tests that wait for them.
fn short_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_millis(200),
        shutdown: Duration::from_millis(200),
        deferred: Duration::from_millis(200),
    }
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let mut s = setup();
    let listener = UnixListener::bind(s.dir.port_path(5000)).unwrap();
    let mut accepted = Vec::new();
    for i in 0..MAX_CONNECTIONS as u32 {
        let req = s.g.hdr(OP_REQUEST, 40000 + i, 5000);
        s.g.send(&mut s.lp, req, &[]);
        let pkts = s.g.wait(&mut s.lp, 1);
        assert_eq!(pkts[0].0.op, OP_RESPONSE, "connection {i}");
        accepted.push(listener.accept().unwrap().0);
        s.g.give_rx(&mut s.lp, 1);
    }
    assert_eq!(s.lp.dev().connection_count(), MAX_CONNECTIONS);
    // One more from the guest: reset, and no host connection made.
    let req = s.g.hdr(OP_REQUEST, 49999, 5000);
    s.g.send(&mut s.lp, req, &[]);
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (OP_RST, 49999));
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "a host connection beyond the limit"
    );
    // One more from a host program: closed.
    let mut host = UnixStream::connect(s.dir.sock()).unwrap();
    let _ = host.write_all(b"CONNECT 7\n");
    wait_eof(&mut s.lp, &mut host);
    assert_eq!(s.lp.dev().connection_count(), MAX_CONNECTIONS);
    assert_eq!(m(&s.lp.dev().metrics().connections_refused), 2);
    // Room again once one closes.
    let rst = s.g.hdr(OP_RST, 40000, 5000);
    s.g.send(&mut s.lp, rst, &[]);
    let req = s.g.hdr(OP_REQUEST, 49999, 5000);
    s.g.send(&mut s.lp, req, &[]);
    assert_eq!(s.g.wait(&mut s.lp, 1)[0].0.op, OP_RESPONSE);
}

#[test]
fn a_request_the_guest_never_answers_times_out() {
    let mut s = setup();
    s.lp.dev().set_timeouts(short_timeouts());
    let mut host = UnixStream::connect(s.dir.sock()).unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    let pkts = s.g.wait(&mut s.lp, 1);
    let (req, _) = pkts[0];
    assert_eq!(req.op, OP_REQUEST);
    // The guest never answers: the host program is let go and the guest told.
    let started = Instant::now();
    wait_eof(&mut s.lp, &mut host);
    assert!(started.elapsed() >= Duration::from_millis(100));
    let pkts = s.g.wait(&mut s.lp, 1);
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
        (OP_RST, req.src_port, 5000)
    );
    assert_eq!(s.lp.dev().connection_count(), 0);
    assert_eq!(m(&s.lp.dev().metrics().timeouts), 1);

    // A host program that never sends its line is let go too.
    let mut silent = UnixStream::connect(s.dir.sock()).unwrap();
    wait_eof(&mut s.lp, &mut silent);
    assert_eq!(m(&s.lp.dev().metrics().timeouts), 2);
}

#[test]
fn idle_and_half_closed_connections_do_not_time_out() {
    let mut s = setup();
    s.lp.dev().set_timeouts(short_timeouts());
    let (mut host, hp) = host_connect(&mut s, 80, true);
    assert_eq!(host_read(&mut s.lp, &mut host, 8).0, b"OK 1024\n");
    // Both directions stay open: an idle connection is left alone.
    let end = Instant::now() + Duration::from_millis(600);
    while Instant::now() < end {
        s.lp.run_once(10);
    }
    assert_eq!(s.lp.dev().connection_count(), 1);
    // One direction closed (the guest stops sending): data still flows the other way.
    let mut sd = s.g.hdr(OP_SHUTDOWN, 80, hp);
    sd.flags = SHUTDOWN_SEND;
    s.g.send(&mut s.lp, sd, &[]);
    wait_eof(&mut s.lp, &mut host);
    let end = Instant::now() + Duration::from_millis(600);
    while Instant::now() < end {
        s.lp.run_once(10);
    }
    assert_eq!(s.lp.dev().connection_count(), 1, "a half-closed stream");
    host.write_all(b"still").unwrap();
    assert_eq!(s.g.wait(&mut s.lp, 1)[0].1, b"still");
    assert_eq!(m(&s.lp.dev().metrics().timeouts), 0);
}

#[test]
fn guest_data_the_host_never_reads_after_a_close_is_dropped_after_its_timeout() {
    let mut s = setup();
    s.lp.dev().set_timeouts(short_timeouts());
    let listener = UnixListener::bind(s.dir.port_path(9)).unwrap();
    let req = s.g.hdr(OP_REQUEST, 300, 9);
    s.g.send(&mut s.lp, req, &[]);
    assert_eq!(s.g.wait(&mut s.lp, 1)[0].0.op, OP_RESPONSE);
    let (host, _) = listener.accept().unwrap();
    // More than the host socket buffers, which the host never reads; then the guest closes.
    let chunk = vec![1u8; 60000];
    for _ in 0..4 {
        let rw = s.g.hdr(OP_RW, 300, 9);
        s.g.send(&mut s.lp, rw, &chunk);
    }
    let mut sd = s.g.hdr(OP_SHUTDOWN, 300, 9);
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    s.g.send(&mut s.lp, sd, &[]);
    let done = s.lp.run_until(TIMEOUT, |d| d.connection_count() == 0);
    assert!(done, "the stuck connection is still there");
    assert_eq!(m(&s.lp.dev().metrics().timeouts), 1);
    drop(host);
}

#[test]
fn host_connections_held_for_a_reset_the_guest_never_handles_time_out() {
    let dir = TempDir::new();
    let mem = guest_memory(0x80_0000);
    let (dev, _evq) = restored_device(&dir, &mem, true);
    let mut lp = BackendLoop::new(dev);
    lp.dev().set_timeouts(short_timeouts());
    let mut host = UnixStream::connect(dir.sock()).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let started = Instant::now();
    wait_eof(&mut lp, &mut host);
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(m(&lp.dev().metrics().timeouts), 1);
    assert!(lp.dev().muxer.deferred.is_empty());
}

/// The guest fills the connection's whole credit while the host program has not accepted its
/// connection yet, closes (SHUTDOWN both ways), and gives up waiting for the device's reset
/// (Linux's close timeout) before the host program reads. The host program must still get
/// every byte the guest's `send()` reported sent, then EOF.
#[test]
fn data_sent_before_a_guest_close_reaches_a_late_host_reader_despite_the_guest_reset() {
    let mut s = setup();
    let listener = UnixListener::bind(s.dir.port_path(6001)).unwrap();
    let req = s.g.hdr(OP_REQUEST, 300, 6001);
    s.g.send(&mut s.lp, req, &[]);
    assert_eq!(s.g.wait(&mut s.lp, 1)[0].0.op, OP_RESPONSE);
    let total = conn::CONN_BUF_ALLOC as usize;
    let data: Vec<u8> = (0..total).map(|i| (i * 13 % 251) as u8).collect();
    for chunk in data.chunks(16 * 1024) {
        let rw = s.g.hdr(OP_RW, 300, 6001);
        s.g.send(&mut s.lp, rw, chunk);
    }
    let mut sd = s.g.hdr(OP_SHUTDOWN, 300, 6001);
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    s.g.send(&mut s.lp, sd, &[]);
    for _ in 0..20 {
        s.lp.run_once(5);
    }
    s.g.recv();
    // The host socket buffers cannot hold it all: part of it still waits in the device.
    let held: usize =
        s.lp.dev()
            .muxer
            .conns
            .values()
            .map(|(_, c)| c.to_host_len())
            .sum();
    assert!(held > 0, "the host socket took everything: nothing to test");
    let rst = s.g.hdr(OP_RST, 300, 6001);
    s.g.send(&mut s.lp, rst, &[]);
    // The host program accepts only now, and reads slowly.
    let (mut host, _) = listener.accept().unwrap();
    let (got, eof) = host_read(&mut s.lp, &mut host, usize::MAX);
    assert!(eof, "no EOF after {} bytes", got.len());
    assert_eq!(got.len(), total, "the host program got a short stream");
    assert!(got == data, "the host program got other bytes");
    assert_eq!(s.lp.dev().connection_count(), 0);
    // The guest forgot the connection: nothing more goes to it.
    assert_eq!(s.g.recv(), Vec::new());
    assert_eq!(m(&s.lp.dev().metrics().timeouts), 0);
}

/// The same, but the host program never reads: a guest cannot make the device hold the
/// connection beyond the shutdown timeout.
#[test]
fn data_after_a_guest_reset_the_host_never_reads_is_dropped_after_its_timeout() {
    let mut s = setup();
    s.lp.dev().set_timeouts(short_timeouts());
    let listener = UnixListener::bind(s.dir.port_path(9)).unwrap();
    let req = s.g.hdr(OP_REQUEST, 300, 9);
    s.g.send(&mut s.lp, req, &[]);
    assert_eq!(s.g.wait(&mut s.lp, 1)[0].0.op, OP_RESPONSE);
    let (host, _) = listener.accept().unwrap();
    for chunk in vec![1u8; conn::CONN_BUF_ALLOC as usize].chunks(16 * 1024) {
        let rw = s.g.hdr(OP_RW, 300, 9);
        s.g.send(&mut s.lp, rw, chunk);
    }
    let mut sd = s.g.hdr(OP_SHUTDOWN, 300, 9);
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    s.g.send(&mut s.lp, sd, &[]);
    s.lp.run_once(5);
    s.g.recv();
    let rst = s.g.hdr(OP_RST, 300, 9);
    s.g.send(&mut s.lp, rst, &[]);
    assert_eq!(s.lp.dev().connection_count(), 1, "still flushing");
    // Packets on the forgotten connection are answered as for an unknown one.
    let rw = s.g.hdr(OP_RW, 300, 9);
    s.g.send(&mut s.lp, rw, b"late");
    let pkts = s.g.wait(&mut s.lp, 1);
    assert!(
        pkts.iter()
            .any(|(h, _)| (h.op, h.dst_port) == (OP_RST, 300)),
        "{pkts:?}"
    );
    let done = s.lp.run_until(TIMEOUT, |d| d.connection_count() == 0);
    assert!(done, "the stuck connection is still there");
    assert_eq!(m(&s.lp.dev().metrics().timeouts), 1);
    // The timeout sends no reset to a guest that already forgot the connection.
    assert!(s.g.recv().iter().all(|(h, _)| h.op != OP_RST));
    drop(host);
}
