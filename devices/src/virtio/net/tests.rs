use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::tap::tests::{bring_up, require_tun, unique_name};
use super::*;
use crate::virtio::test_utils::{
    guest_memory, interrupt, irq_count, r, w, BackendLoop, Recycler, TestQueue, VIRTQ_DESC_F_NEXT,
};

const MAC: [u8; 6] = [0x06, 0, 0, 0, 0, 0x42];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// IEEE local experimental ethertype: nothing else on the interface sends it.
const ETHERTYPE: u16 = 0x88b5;
const BUF: u64 = 0x10_0000;
const RXQ_BASE: u64 = 0;
const TXQ_BASE: u64 = 0x8000;

/// A raw `AF_PACKET` socket on one interface: the "other end" of the TAP.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn bind(ifname: &str) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto.into(),
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = CString::new(ifname).unwrap();
        // SAFETY: `cname` is a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(index, 0, "no interface {ifname}");
        // SAFETY: all-zero is a valid `sockaddr_ll`.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid `sockaddr_ll` of the length passed.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
        PacketSocket(fd)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length for the whole call.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }

    /// The next frame with our ethertype, within `timeout`.
    fn recv_ours(&self, timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 70000];
        while Instant::now() < end {
            // SAFETY: `buf` is valid for writes of its length for the whole call.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let f = &buf[..n as usize];
            if f.len() >= 14 && f[12..14] == ETHERTYPE.to_be_bytes() {
                return Some(f.to_vec());
            }
        }
        None
    }
}

fn frame(dst: [u8; 6], payload_len: usize, fill: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((0..payload_len).map(|i| fill.wrapping_add(i as u8)));
    f
}

struct Setup {
    net: Net,
    rxq: TestQueue,
    txq: TestQueue,
    irq: Arc<VirtioInterrupt>,
}

fn net_on_new_tap(up: bool) -> Net {
    require_tun();
    let name = unique_name();
    let net = Net::new(&name, MAC).unwrap();
    if up {
        bring_up(&name);
    }
    net
}

fn activate(mut net: Net, features: u64) -> Setup {
    let mem = guest_memory(0x40_0000);
    let rxq = TestQueue::new(&mem, RXQ_BASE, QUEUE_SIZE);
    let txq = TestQueue::new(&mem, TXQ_BASE, QUEUE_SIZE);
    let irq = interrupt();
    net.activate(mem, features, vec![rxq.queue(), txq.queue()], irq.clone())
        .unwrap();
    Setup { net, rxq, txq, irq }
}

fn setup(features: u64) -> Setup {
    activate(net_on_new_tap(true), features)
}

fn read_mem(tq: &TestQueue, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    tq.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn m(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[test]
fn mac_parsing_and_default() {
    assert_eq!(
        parse_mac("06:aB:00:ff:10:9c"),
        Ok([0x06, 0xab, 0, 0xff, 0x10, 0x9c])
    );
    for bad in [
        "",
        "06:ab:00:ff:10",
        "06:ab:00:ff:10:9c:00",
        "06-ab-00-ff-10-9c",
        "6:ab:00:ff:10:9c",
        "06:ab:00:ff:10:9g",
        "06:ab:00:ff:10:+c",
        "06:ab:00:ff:10:9c:",
    ] {
        assert_eq!(parse_mac(bad), Err(MacError::Syntax(bad.into())), "{bad:?}");
    }
    assert!(matches!(
        parse_mac("01:00:5e:00:00:01"),
        Err(MacError::Multicast(_))
    ));
    assert!(matches!(
        parse_mac("00:00:00:00:00:00"),
        Err(MacError::Zero(_))
    ));
    let e = parse_mac("nope").unwrap_err().to_string();
    assert!(e.contains("\"nope\""), "{e}");

    let d = default_mac("fltap0");
    assert_eq!(d, default_mac("fltap0"), "stable");
    assert_ne!(d, default_mac("fltap1"));
    assert_ne!(default_mac("tap0"), default_mac("tap1"));
    // Locally administered unicast.
    assert_eq!(d[0] & 0b11, 0b10);
    assert_eq!(d[..3], [0x06, 0x46, 0x4c]);
    assert_eq!(default_mac("fltap1"), [0x06, 0x46, 0x4c, 0x41, 0x92, 0x13]);
    assert_eq!(d[0] & 0b11, 0b10, "locally administered unicast");
    assert_eq!(parse_mac(&format_mac(&d)), Ok(d));
}

#[test]
fn device_basics_and_config() {
    let net = net_on_new_tap(false);
    assert_eq!(net.device_type(), VIRTIO_ID_NET);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    let f = net.avail_features();
    for bit in [
        feature(VIRTIO_F_VERSION_1),
        feature(VIRTIO_NET_F_MAC),
        feature(VIRTIO_NET_F_STATUS),
        feature(VIRTIO_NET_F_CSUM),
        feature(VIRTIO_NET_F_GUEST_CSUM),
        feature(VIRTIO_NET_F_GUEST_TSO4),
        feature(VIRTIO_NET_F_GUEST_TSO6),
        feature(VIRTIO_NET_F_HOST_TSO4),
        feature(VIRTIO_NET_F_HOST_TSO6),
        feature(VIRTIO_NET_F_MRG_RXBUF),
    ] {
        assert_ne!(f & bit, 0, "{bit:#x}");
    }
    // mac, status (link up), one queue pair, no MTU offered.
    let mut cfg = [0xffu8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg, [0x06, 0, 0, 0, 0, 0x42, 1, 0, 1, 0, 0, 0]);
    assert_eq!(f & feature(VIRTIO_NET_F_MTU), 0);
    let mut b = [0u8; 2];
    net.read_config(6, &mut b);
    assert_eq!(u16::from_le_bytes(b), VIRTIO_NET_S_LINK_UP);
    net.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0]);
    assert_eq!(net.mac(), MAC);
    assert!(net.tap().created());
}

#[test]
fn an_mtu_is_offered_in_the_config_space() {
    let net = net_on_new_tap(false).with_mtu(9000);
    assert_ne!(net.avail_features() & feature(VIRTIO_NET_F_MTU), 0);
    let mut b = [0u8; 2];
    net.read_config(10, &mut b);
    assert_eq!(u16::from_le_bytes(b), 9000);
}

#[test]
fn bad_mac_and_tap_errors_name_the_tap() {
    let e = Net::new("flintx0", [1, 2, 3, 4, 5, 6])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("flintx0") && e.contains("multicast"), "{e}");
    let e = Net::new("this-name-is-too-long", MAC)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("this-name-is-too-long"), "{e}");
}

#[test]
fn activate_needs_both_queues_and_sets_offloads() {
    let mut net = net_on_new_tap(false);
    let mem = guest_memory(0x40_0000);
    let rxq = TestQueue::new(&mem, RXQ_BASE, QUEUE_SIZE);
    assert_eq!(
        net.activate(
            mem.clone(),
            feature(VIRTIO_F_VERSION_1),
            vec![rxq.queue()],
            interrupt()
        ),
        Err(ActivateError::QueueCount { want: 2, got: 1 })
    );
    let txq = TestQueue::new(&mem, TXQ_BASE, QUEUE_SIZE);
    let all = net.avail_features();
    net.activate(mem, all, vec![rxq.queue(), txq.queue()], interrupt())
        .unwrap();
    assert_eq!(net.acked_features(), all);
    net.reset();
    assert_eq!(net.acked_features(), 0);
}

#[test]
fn tx_frame_reaches_the_tap_interface() {
    let mut s = setup(feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF));
    let sock = PacketSocket::bind(s.net.tap().name());
    let f = frame([0xff; 6], 300, 7);
    // Header in its own descriptor, the frame split over two more.
    s.txq
        .mem
        .write_slice(&[0u8; 12], GuestAddress(BUF))
        .unwrap();
    s.txq
        .mem
        .write_slice(&f[..100], GuestAddress(BUF + 0x1000))
        .unwrap();
    s.txq
        .mem
        .write_slice(&f[100..], GuestAddress(BUF + 0x2000))
        .unwrap();
    let head = s.txq.add_chain(&[
        r(BUF, 12),
        r(BUF + 0x1000, 100),
        r(BUF + 0x2000, (f.len() - 100) as u32),
    ]);
    s.net.process_queue(TX_QUEUE);
    assert_eq!(s.txq.used_idx(), 1);
    assert_eq!(s.txq.used_elem(0), (u32::from(head), 0));
    assert_eq!(irq_count(&s.irq), 1);
    let got = sock
        .recv_ours(Duration::from_secs(2))
        .expect("frame on the wire");
    assert_eq!(got, f);
    let mm = s.net.metrics();
    assert_eq!(m(&mm.tx_frames), 1);
    assert_eq!(m(&mm.tx_bytes), f.len() as u64);
    assert_eq!(m(&mm.tx_malformed), 0);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mut s = setup(feature(VIRTIO_F_VERSION_1));
    let sock = PacketSocket::bind(s.net.tap().name());
    // Too short: header only, and less than a header.
    s.txq.add_chain(&[r(BUF, 12)]);
    s.txq.add_chain(&[r(BUF, 8)]);
    // Too long.
    s.txq
        .add_chain(&[r(BUF, 12), r(BUF + 0x1000, MAX_FRAME_LEN as u32 + 1)]);
    // Outside guest memory, and overflowing the address space.
    s.txq.add_chain(&[r(BUF, 12), r(0x40_0000 - 8, 64)]);
    s.txq.add_chain(&[r(u64::MAX - 4, 64)]);
    // Wrong direction.
    s.txq.add_chain(&[r(BUF, 12), w(BUF + 0x1000, 64)]);
    // A descriptor loop.
    s.txq.set_desc(200, BUF, 64, VIRTQ_DESC_F_NEXT, 201);
    s.txq.set_desc(201, BUF, 64, VIRTQ_DESC_F_NEXT, 200);
    s.txq.publish(200);
    // A next index outside the table.
    s.txq.set_desc(210, BUF, 64, VIRTQ_DESC_F_NEXT, 4000);
    s.txq.publish(210);
    s.net.process_queue(TX_QUEUE);
    assert_eq!(s.txq.used_idx(), 8);
    for i in 0..8 {
        assert_eq!(s.txq.used_elem(i).1, 0);
    }
    let mm = s.net.metrics();
    assert_eq!(m(&mm.tx_malformed), 8);
    assert_eq!(m(&mm.tx_frames), 0);
    assert!(sock.recv_ours(Duration::from_millis(100)).is_none());

    // Still working.
    let f = frame([0xff; 6], 60, 1);
    let mut chain = vec![0u8; 12];
    chain.extend_from_slice(&f);
    s.txq.mem.write_slice(&chain, GuestAddress(BUF)).unwrap();
    s.txq.add_chain(&[r(BUF, chain.len() as u32)]);
    s.net.process_queue(TX_QUEUE);
    assert_eq!(m(&mm.tx_frames), 1);
    assert_eq!(sock.recv_ours(Duration::from_secs(2)), Some(f));
}

#[test]
fn a_driver_that_keeps_adding_tx_chains_cannot_hold_a_pass() {
    let mut s = setup(feature(VIRTIO_F_VERSION_1));
    let f = frame([0xff; 6], 1500, 1);
    let mut chain = vec![0u8; 12];
    chain.extend_from_slice(&f);
    s.txq.mem.write_slice(&chain, GuestAddress(BUF)).unwrap();
    let head = s.txq.add_chain(&[r(BUF, chain.len() as u32)]);
    let view = s.txq.clone();
    let driver = Recycler::start(view.clone(), head, Duration::from_secs(3));
    s.net.process_queue(TX_QUEUE);
    let used = view.used_idx();
    drop(driver);
    assert_eq!(usize::from(used), MAX_CHAINS_PER_PASS);
    assert_eq!(s.net.take_unfinished(), 1 << TX_QUEUE);
    assert_eq!(s.net.take_unfinished(), 0);
}

#[test]
fn a_driver_that_keeps_adding_rx_chains_cannot_hold_a_pass() {
    let mut s = setup(feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF));
    // Unusable receive chains (device-readable), returned empty as soon as they are taken.
    let head = s.rxq.add_chain(&[r(BUF, 64)]);
    let view = s.rxq.clone();
    let driver = Recycler::start(view.clone(), head, Duration::from_secs(3));
    s.net.process_queue(RX_QUEUE);
    let used = view.used_idx();
    drop(driver);
    assert!(
        usize::from(used) <= MAX_CHAINS_PER_PASS,
        "{used} chains in one pass"
    );
    assert_eq!(s.net.take_unfinished(), 1 << RX_QUEUE);
}

#[test]
fn parse_tx_chain_accepts_limits() {
    let mem = guest_memory(0x40_0000);
    let mut tq = TestQueue::new(&mem, 0, 16);
    tq.add_chain(&[r(BUF, 12), r(BUF + 0x1000, 0), r(BUF + 0x2000, 14)]);
    tq.add_chain(&[r(BUF, (12 + MAX_FRAME_LEN) as u32)]);
    tq.add_chain(&[r(BUF, 12 + 13)]);
    let mut q = tq.queue();
    let c = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(
        parse_tx_chain(&mem, c),
        Ok(vec![
            Segment {
                addr: GuestAddress(BUF),
                len: 12
            },
            Segment {
                addr: GuestAddress(BUF + 0x2000),
                len: 14
            }
        ]),
        "empty descriptors are skipped"
    );
    let c = q.pop_descriptor_chain(&mem).unwrap();
    assert!(parse_tx_chain(&mem, c).is_ok());
    let c = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(parse_tx_chain(&mem, c), Err(TxError::TooShort(25)));
}

/// Put `frame` (header included) through `Active::deliver` directly.
/// Deliver `frame` as a fresh receive pass would.
fn deliver(s: &mut Setup, frame: &mut [u8]) -> Delivery {
    let metrics = s.net.metrics();
    let active = s.net.active.as_mut().unwrap();
    active.rx_budget = MAX_CHAINS_PER_PASS;
    active.deliver(frame, &metrics)
}

fn with_hdr(f: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 12];
    v[0] = 1; // NEEDS_CSUM, passed through
    v[10] = 0xaa; // num_buffers is ours to set
    v.extend_from_slice(f);
    v
}

#[test]
fn mergeable_rx_spans_chains_and_sets_num_buffers() {
    let mut s = setup(feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF));
    // No buffers: the frame waits.
    let f = frame(MAC, 2986, 3);
    let mut buf = with_hdr(&f);
    assert_eq!(buf.len(), 3012);
    assert_eq!(deliver(&mut s, &mut buf), Delivery::NoBuffers);
    for i in 0..2 {
        s.rxq.add_chain(&[w(BUF + i * 0x1000, 1024)]);
    }
    assert_eq!(
        deliver(&mut s, &mut buf),
        Delivery::NoBuffers,
        "2 KiB is too little"
    );
    assert_eq!(s.rxq.used_idx(), 0, "chains kept, not returned");
    // A chain of two descriptors completes it.
    s.rxq
        .add_chain(&[w(BUF + 0x2000, 512), w(BUF + 0x3000, 1024)]);
    assert_eq!(deliver(&mut s, &mut buf), Delivery::Delivered);
    assert_eq!(s.rxq.used_idx(), 3);
    assert_eq!(s.rxq.used_elem(0), (0, 1024));
    assert_eq!(s.rxq.used_elem(1), (1, 1024));
    assert_eq!(s.rxq.used_elem(2), (2, 3012 - 2048));
    let mut got = read_mem(&s.rxq, BUF, 1024);
    got.extend(read_mem(&s.rxq, BUF + 0x1000, 1024));
    got.extend(read_mem(&s.rxq, BUF + 0x2000, 512));
    got.extend(read_mem(&s.rxq, BUF + 0x3000, 3012 - 2560));
    assert_eq!(got[0], 1, "header flags passed through");
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[12..], &f[..]);
}

#[test]
fn rx_without_mergeable_buffers_uses_one_chain_or_drops() {
    let mut s = setup(feature(VIRTIO_F_VERSION_1));
    s.rxq.add_chain(&[w(BUF, 12), w(BUF + 0x1000, 1000)]);
    let mut big = with_hdr(&frame(MAC, 1500, 0));
    assert_eq!(deliver(&mut s, &mut big), Delivery::TooBig);
    assert_eq!(s.rxq.used_idx(), 0, "the chain stays for the next frame");
    let f = frame(MAC, 500, 9);
    let mut small = with_hdr(&f);
    assert_eq!(deliver(&mut s, &mut small), Delivery::Delivered);
    assert_eq!(s.rxq.used_elem(0), (0, 12 + f.len() as u32));
    let hdr = read_mem(&s.rxq, BUF, 12);
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
    assert_eq!(read_mem(&s.rxq, BUF + 0x1000, f.len()), f);
}

#[test]
fn bad_rx_chains_are_returned_empty() {
    let mut s = setup(feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF));
    s.rxq.add_chain(&[r(BUF, 2048)]); // wrong direction
    s.rxq.add_chain(&[w(0x40_0000 - 16, 2048)]); // outside memory
    s.rxq.add_chain(&[w(BUF, 8)]); // no room for a header
    s.rxq.set_desc(100, BUF, 64, VIRTQ_DESC_F_NEXT | 2, 100); // loop
    s.rxq.publish(100);
    s.rxq.add_chain(&[w(BUF + 0x4000, 2048)]);
    let f = frame(MAC, 100, 0);
    let mut buf = with_hdr(&f);
    assert_eq!(deliver(&mut s, &mut buf), Delivery::Delivered);
    assert_eq!(s.rxq.used_idx(), 5);
    for i in 0..4 {
        assert_eq!(s.rxq.used_elem(i).1, 0);
    }
    assert_eq!(s.rxq.used_elem(4).1, buf.len() as u32);
    assert_eq!(m(&s.net.metrics().rx_errors), 4);
}

#[test]
fn rx_never_fitting_the_whole_ring_is_dropped() {
    let mut net = net_on_new_tap(false);
    let mem = guest_memory(0x40_0000);
    let rxq = TestQueue::new(&mem, RXQ_BASE, 4);
    let txq = TestQueue::new(&mem, TXQ_BASE, 4);
    net.activate(
        mem,
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF),
        vec![rxq.queue(), txq.queue()],
        interrupt(),
    )
    .unwrap();
    let mut s = Setup {
        net,
        rxq,
        txq,
        irq: interrupt(),
    };
    for i in 0..4 {
        s.rxq.add_chain(&[w(BUF + i * 0x1000, 100)]);
    }
    let mut buf = with_hdr(&frame(MAC, 1000, 0));
    assert_eq!(deliver(&mut s, &mut buf), Delivery::TooBig);
    let mut small = with_hdr(&frame(MAC, 150, 0));
    assert_eq!(deliver(&mut s, &mut small), Delivery::Delivered);
    assert_eq!(s.rxq.used_idx(), 2);
    let _ = &s.txq;
}

#[test]
fn rx_from_the_wire_waits_for_buffers_then_arrives() {
    let net = net_on_new_tap(true);
    let name = net.tap().name().to_string();
    let sock = PacketSocket::bind(&name);
    let s = activate(
        net,
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF),
    );
    let Setup {
        net,
        mut rxq,
        txq: _txq,
        irq,
    } = s;
    let metrics = net.metrics();
    let mut lp = BackendLoop::new(net);
    let f1 = frame(MAC, 200, 1);
    let f2 = frame(MAC, 1400, 2);
    sock.send(&f1);
    sock.send(&f2);
    // The TAP turns readable, but the guest has no buffers: nothing is taken.
    lp.run_once(200);
    for _ in 0..5 {
        lp.run_once(10);
    }
    assert_eq!(m(&metrics.rx_frames), 0);
    assert_eq!(m(&metrics.rx_dropped), 0);
    assert!(lp.dev().rx_pending.is_none(), "nothing read from the TAP");
    // The guest refills: both frames arrive, in order.
    for i in 0..4 {
        rxq.add_chain(&[w(BUF + i * 0x1000, 2048)]);
    }
    lp.dev().process_queue(RX_QUEUE);
    assert!(lp.run_until(Duration::from_secs(2), |_| m(&metrics.rx_frames) == 2));
    assert_eq!(rxq.used_idx(), 2);
    assert_eq!(rxq.used_elem(0), (0, 12 + f1.len() as u32));
    assert_eq!(rxq.used_elem(1), (1, 12 + f2.len() as u32));
    let hdr = read_mem(&rxq, BUF, 12);
    assert_eq!(hdr[1], 0, "no GSO");
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
    assert_eq!(read_mem(&rxq, BUF + 12, f1.len()), f1);
    assert_eq!(read_mem(&rxq, BUF + 0x1000 + 12, f2.len()), f2);
    assert!(irq_count(&irq) >= 1);
    assert_eq!(m(&metrics.rx_bytes), (f1.len() + f2.len()) as u64);

    // Later frames arrive straight away while buffers remain.
    let f3 = frame(MAC, 64, 3);
    sock.send(&f3);
    assert!(lp.run_until(Duration::from_secs(2), |_| m(&metrics.rx_frames) == 3));
    assert_eq!(read_mem(&rxq, BUF + 0x2000 + 12, f3.len()), f3);
}

#[test]
fn rx_reads_the_tap_straight_into_mergeable_buffers() {
    use vm_memory::bitmap::Bitmap;
    // As the VMM builds it: with limiters that limit nothing (until the API sets them).
    let unlimited = || {
        Some(
            crate::rate_limiter::RateLimiter::new(
                &crate::rate_limiter::RateLimiterConfig::default(),
            )
            .unwrap(),
        )
    };
    let net = net_on_new_tap(true).with_rate_limiters(unlimited(), unlimited());
    let sock = PacketSocket::bind(net.tap().name());
    let Setup {
        mut net,
        mut rxq,
        txq: _txq,
        irq: _irq,
    } = activate(
        net,
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF),
    );
    net.rx_buf.fill(0x5a);
    let metrics = net.metrics();
    let mut lp = BackendLoop::new(net);
    // 70 chains of 1 KiB, more than a frame of any size needs, each split 8 + 1016 so that
    // `num_buffers` (bytes 10-11 of the header) lies in a chain's second descriptor.
    const CHAIN: u64 = 0x400;
    let chain_at = |i: u64| BUF + i * 0x800;
    for i in 0..70 {
        rxq.add_chain(&[
            w(chain_at(i), 8),
            w(chain_at(i) + 0x400, (CHAIN - 8) as u32),
        ]);
    }
    lp.dev().process_queue(RX_QUEUE);
    let f1 = frame(MAC, 200, 1);
    let f2 = frame(MAC, 1400, 2);
    sock.send(&f1);
    sock.send(&f2);
    assert!(lp.run_until(Duration::from_secs(2), |_| m(&metrics.rx_frames) == 2));
    // A chain's bytes, as the guest reads them.
    let chain_bytes = |i: u64, len: usize| {
        let mut b = read_mem(&rxq, chain_at(i), 8.min(len));
        b.extend(read_mem(&rxq, chain_at(i) + 0x400, len.saturating_sub(8)));
        b
    };
    // f1 fills one chain, f2 (12 + 1414 bytes) two.
    assert_eq!(rxq.used_idx(), 3);
    assert_eq!(rxq.used_elem(0), (0, 12 + f1.len() as u32));
    assert_eq!(rxq.used_elem(1), (2, CHAIN as u32));
    assert_eq!(rxq.used_elem(2), (4, (12 + f2.len()) as u32 - CHAIN as u32));
    let got1 = chain_bytes(0, 12 + f1.len());
    assert_eq!(u16::from_le_bytes([got1[10], got1[11]]), 1);
    assert_eq!(got1[12..], f1[..]);
    let mut got2 = chain_bytes(1, CHAIN as usize);
    got2.extend(chain_bytes(2, 12 + f2.len() - CHAIN as usize));
    assert_eq!(u16::from_le_bytes([got2[10], got2[11]]), 2);
    assert_eq!(got2[12..], f2[..]);
    assert_eq!(m(&metrics.rx_bytes), (f1.len() + f2.len()) as u64);
    // Straight from the TAP: the bounce buffer was not used, and the pages the kernel wrote
    // are marked dirty (for snapshots) while the unused chains' are not.
    assert!(lp.dev().rx_buf.iter().all(|&b| b == 0x5a));
    let region = rxq.mem.find_region(GuestAddress(BUF)).unwrap();
    assert!(region.bitmap().dirty_at(chain_at(2) as usize + 0x400));
    assert!(!region.bitmap().dirty_at(chain_at(10) as usize + 0x400));
    // The chains not used are given back to the ring when the queue's position is saved.
    assert_eq!(lp.dev().queue_positions()[RX_QUEUE].next_avail, 3);
}

#[test]
fn inactive_or_reset_device_leaves_the_tap_alone() {
    let net = net_on_new_tap(true);
    let sock = PacketSocket::bind(net.tap().name());
    let metrics = net.metrics();
    let mut lp = BackendLoop::new(net);
    sock.send(&frame(MAC, 100, 0));
    lp.run_once(200);
    lp.dev().process_queue(0);
    lp.dev().process_queue(1);
    lp.dev().process_queue(7);
    assert_eq!(m(&metrics.rx_frames), 0);
    // Activating afterwards picks the queued frame up.
    let mem = guest_memory(0x40_0000);
    let mut rxq = TestQueue::new(&mem, RXQ_BASE, QUEUE_SIZE);
    let txq = TestQueue::new(&mem, TXQ_BASE, QUEUE_SIZE);
    lp.dev()
        .activate(
            mem,
            feature(VIRTIO_F_VERSION_1),
            vec![rxq.queue(), txq.queue()],
            interrupt(),
        )
        .unwrap();
    rxq.add_chain(&[w(BUF, 4096)]);
    lp.dev().process_queue(RX_QUEUE);
    assert!(lp.run_until(Duration::from_secs(2), |_| m(&metrics.rx_frames) == 1));
    lp.dev().reset();
    assert!(lp.dev().active.is_none());
}

fn ops_limiter(per_refill: u64, refill_time_ms: u64) -> RateLimiter {
    use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    RateLimiter::new(&RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: per_refill,
            one_time_burst: 0,
            refill_time_ms,
        }),
    })
    .unwrap()
}

#[test]
fn tx_rate_limiter_holds_frames_in_the_queue_until_the_timer() {
    let net = net_on_new_tap(true).with_rate_limiters(None, Some(ops_limiter(1, 100)));
    let s = activate(net, feature(VIRTIO_F_VERSION_1));
    let Setup {
        net,
        rxq: _rxq,
        mut txq,
        irq: _irq,
    } = s;
    let sock = PacketSocket::bind(net.tap().name());
    let metrics = net.metrics();
    let mut lp = BackendLoop::new(net);
    for i in 0..3u8 {
        let f = frame([0xff; 6], 100, i);
        let at = BUF + u64::from(i) * 0x1000;
        txq.mem.write_slice(&[0u8; 12], GuestAddress(at)).unwrap();
        txq.mem.write_slice(&f, GuestAddress(at + 12)).unwrap();
        txq.add_chain(&[r(at, 12 + f.len() as u32)]);
    }
    let start = Instant::now();
    lp.dev().process_queue(TX_QUEUE);
    assert_eq!(txq.used_idx(), 1, "one frame per 100 ms");
    assert_eq!(m(&metrics.tx_frames), 1);
    assert_eq!(m(&metrics.tx_rate_limiter_throttled), 1);
    assert!(lp.dev().tx_rate_limiter().unwrap().is_blocked());
    // Kicks while throttled send nothing and are not counted again.
    lp.dev().process_queue(TX_QUEUE);
    assert_eq!(txq.used_idx(), 1);
    assert_eq!(m(&metrics.tx_rate_limiter_throttled), 1);
    assert!(lp.run_until(Duration::from_secs(5), |_| txq.used_idx() == 3));
    assert!(start.elapsed() >= Duration::from_millis(180));
    assert_eq!(m(&metrics.tx_frames), 3);
    for i in 0..3u8 {
        let got = sock.recv_ours(Duration::from_secs(2)).expect("frame");
        assert_eq!(got, frame([0xff; 6], 100, i), "frames in order");
    }
}

#[test]
fn rx_rate_limiter_holds_frames_until_the_timer() {
    let net = net_on_new_tap(true).with_rate_limiters(Some(ops_limiter(1, 100)), None);
    let name = net.tap().name().to_string();
    let sock = PacketSocket::bind(&name);
    let s = activate(
        net,
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF),
    );
    let Setup {
        net,
        mut rxq,
        txq: _txq,
        irq: _irq,
    } = s;
    let metrics = net.metrics();
    for i in 0..4 {
        rxq.add_chain(&[w(BUF + i * 0x1000, 2048)]);
    }
    let mut lp = BackendLoop::new(net);
    let frames: Vec<_> = (0..3u8).map(|i| frame(MAC, 200, i)).collect();
    for f in &frames {
        sock.send(f);
    }
    let start = Instant::now();
    assert!(lp.run_until(Duration::from_secs(2), |_| m(&metrics.rx_frames) >= 1));
    assert!(m(&metrics.rx_rate_limiter_throttled) >= 1);
    assert!(lp.run_until(Duration::from_secs(5), |_| m(&metrics.rx_frames) == 3));
    assert!(start.elapsed() >= Duration::from_millis(180));
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(read_mem(&rxq, BUF + i as u64 * 0x1000 + 12, f.len()), *f);
    }
    assert_eq!(m(&metrics.rx_dropped), 0);
}

#[test]
fn event_idx_interrupts_where_the_driver_asks_and_rearms_kicks_when_out_of_buffers() {
    let mut net = net_on_new_tap(true);
    let sock = PacketSocket::bind(net.tap().name());
    let mem = guest_memory(0x40_0000);
    let mut rxq = TestQueue::new(&mem, RXQ_BASE, QUEUE_SIZE);
    let mut txq = TestQueue::new(&mem, TXQ_BASE, QUEUE_SIZE);
    let irq = interrupt();
    let queues = [rxq.queue(), txq.queue()].map(|mut q| {
        q.set_event_idx(true);
        q
    });
    let features = feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_NET_F_MRG_RXBUF)
        | feature(VIRTIO_RING_F_EVENT_IDX);
    assert_eq!(net.avail_features() & features, features, "offered");
    net.activate(mem.clone(), features, queues.into(), irq.clone())
        .unwrap();
    // The driver's `used_event` (after its available ring) and the device's `avail_event`
    // (after its used ring).
    let set_used_event = |tq: &TestQueue, v: u16| {
        let at = tq.avail.unchecked_add(4 + 2 * u64::from(tq.size));
        tq.mem.write_obj(v, at).unwrap();
    };
    let avail_event = |tq: &TestQueue| -> u16 {
        let at = tq.used.unchecked_add(4 + 8 * u64::from(tq.size));
        tq.mem.read_obj(at).unwrap()
    };

    let mut f = vec![0u8; 12];
    f.extend(frame([0xff; 6], 100, 1));
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    // Transmit: the driver asks for an interrupt once the 4th chain is used (used_event 3).
    set_used_event(&txq, 3);
    for _ in 0..3 {
        txq.add_chain(&[r(BUF, f.len() as u32)]);
    }
    net.process_queue(TX_QUEUE);
    assert_eq!(txq.used_idx(), 3);
    assert_eq!(irq_count(&irq), 0, "used_event not reached: no interrupt");
    assert_eq!(avail_event(&txq), 3, "drained: the next chain must kick");
    txq.add_chain(&[r(BUF, f.len() as u32)]);
    net.process_queue(TX_QUEUE);
    assert_eq!(txq.used_idx(), 4);
    assert_eq!(irq_count(&irq), 1, "used_event reached: one interrupt");
    assert_eq!(m(&net.metrics().tx_frames), 4);

    // Receive: one buffer for two frames. The first arrives with an interrupt (used_event 0),
    // the second waits in the TAP, and the device asks for a kick on the next buffer.
    let metrics = net.metrics();
    let mut lp = BackendLoop::new(net);
    rxq.add_chain(&[w(BUF + 0x1000, 2048)]);
    sock.send(&frame(MAC, 200, 1));
    sock.send(&frame(MAC, 300, 2));
    lp.dev().process_queue(RX_QUEUE);
    assert!(lp.run_until(Duration::from_secs(2), |_| m(&metrics.rx_frames) == 1));
    for _ in 0..5 {
        lp.run_once(10);
    }
    assert_eq!(
        m(&metrics.rx_frames),
        1,
        "the second frame waits for a buffer"
    );
    assert_eq!(rxq.used_idx(), 1);
    assert_eq!(irq_count(&irq), 1, "used_event 0 reached");
    assert_eq!(
        avail_event(&rxq),
        1,
        "out of buffers: the next one must kick"
    );
    rxq.add_chain(&[w(BUF + 0x2000, 2048)]);
    lp.dev().process_queue(RX_QUEUE);
    assert_eq!(m(&metrics.rx_frames), 2);
    assert_eq!(rxq.used_idx(), 2);
}
