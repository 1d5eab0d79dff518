//! The MMDS as the guest sees it on a NIC: a host with its own MAC and the MMDS IPv4 address
//! that answers ARP and serves HTTP on TCP port 80. A smoltcp interface does ARP, IPv4 and TCP;
//! the NIC hands it the guest's frames for the MMDS (see [`MmdsEndpoint::wants`]) instead of
//! sending them to its TAP, and delivers the frames it answers with to the guest.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Instant as StdInstant;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

use super::guest_http::{self, Parsed, MAX_REQUEST};
use super::SharedMmds;

/// The MMDS's MAC address on every NIC (locally administered).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// Connections served at once; more wait for the guest's retransmissions.
const CONNECTIONS: usize = 8;
/// Each connection's TCP buffers.
const TCP_BUFFER: usize = 16 * 1024;
/// Largest frame the endpoint takes from the guest (an Ethernet frame with a 64 KiB packet).
pub const MAX_FRAME: usize = 14 + 65_535;
/// Frames from the guest waiting for the endpoint, and frames from it waiting for the guest's
/// receive buffers: beyond these, new ones are dropped (TCP recovers; a flood gets nothing).
const MAX_QUEUED: usize = 64;
/// Most bytes of answers a connection keeps for the guest beyond its TCP buffer: a request
/// that would need more is answered and the connection closed.
const MAX_PENDING_OUT: usize = 1 << 20;

/// Frame queues between the NIC and the interface.
#[derive(Default)]
struct Queues {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
}

struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        if self.0.len() < MAX_QUEUED {
            self.0.push_back(frame);
        }
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.from_guest.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.to_guest)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut checksum = ChecksumCapabilities::default();
        // The guest leaves checksums to the device (virtio-net checksum offload): computed on
        // what the endpoint sends, not verified on what it receives (the frames never left
        // the host).
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // What the guest's receive buffers surely hold: a standard Ethernet frame.
        caps.max_transmission_unit = 1514;
        caps.checksum = checksum;
        caps
    }
}

/// One connection slot: its socket, the request bytes read so far and the answer bytes not yet
/// handed to the socket.
struct Connection {
    handle: SocketHandle,
    request: Vec<u8>,
    out: Vec<u8>,
    close_after: bool,
}

/// The MMDS endpoint of one NIC.
pub struct MmdsEndpoint {
    ip: Ipv4Addr,
    iface: Interface,
    sockets: SocketSet<'static>,
    connections: Vec<Connection>,
    queues: Queues,
    store: SharedMmds,
    epoch: StdInstant,
}

/// Whether the IPv4 sender of `frame` (an ARP packet's sender protocol address, an IPv4
/// packet's source) is an address a reply can go to: not unspecified (0.0.0.0), broadcast or
/// multicast. The guest chooses these bytes; smoltcp asserts that it never sends to an
/// unspecified address, so a SYN from 0.0.0.0 would otherwise panic the VMM's thread.
fn sender_is_unicast(frame: &[u8]) -> bool {
    let sender = match frame.get(12..14) {
        Some([0x08, 0x06]) => frame.get(14 + 14..14 + 18),
        Some([0x08, 0x00]) => frame.get(14 + 12..14 + 16),
        _ => None,
    };
    match sender {
        Some(&[a, b, c, d]) => {
            let ip = std::net::Ipv4Addr::new(a, b, c, d);
            !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast())
        }
        _ => false,
    }
}

impl MmdsEndpoint {
    /// An endpoint at `ip` serving `store`.
    pub fn new(ip: Ipv4Addr, store: SharedMmds) -> MmdsEndpoint {
        let mut queues = Queues::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(MMDS_MAC)));
        let mut seed = [0u8; 8];
        let _ = crate::virtio::rng::fill_random(&mut seed);
        config.random_seed = u64::from_le_bytes(seed);
        let epoch = StdInstant::now();
        let mut iface = Interface::new(config, &mut queues, Instant::from_millis(0));
        let o = ip.octets();
        // Prefix 0: whatever address the guest has is on the link, so the endpoint answers
        // it directly (the guest reaches the MMDS by a host route, whatever its own subnet).
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(
                Ipv4Address::new(o[0], o[1], o[2], o[3]).into(),
                0,
            ));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let connections = (0..CONNECTIONS)
            .map(|_| {
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
                    tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
                );
                socket.set_ack_delay(None);
                socket.set_nagle_enabled(false);
                Connection {
                    handle: sockets.add(socket),
                    request: Vec::new(),
                    out: Vec::new(),
                    close_after: false,
                }
            })
            .collect();
        let mut endpoint = MmdsEndpoint {
            ip,
            iface,
            sockets,
            connections,
            queues,
            store,
            epoch,
        };
        endpoint.relisten();
        endpoint
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Whether the Ethernet frame `frame` (no virtio-net header) is for the MMDS: an ARP
    /// packet about its address, or an IPv4 packet to it.
    pub fn wants(&self, frame: &[u8]) -> bool {
        let ip = self.ip.octets();
        match frame.get(12..14) {
            // ARP: the target protocol address at 24..28 of the ARP packet.
            Some([0x08, 0x06]) => frame.get(14 + 24..14 + 28) == Some(&ip[..]),
            // IPv4: the destination at 16..20 of the header.
            Some([0x08, 0x00]) => frame.get(14 + 16..14 + 20) == Some(&ip[..]),
            _ => false,
        }
    }

    /// Take the guest's frame (for the MMDS, see [`Self::wants`]) and do what it asks.
    /// A frame whose sender could not be answered (see [`sender_is_unicast`]) is dropped:
    /// the TCP/IP stack must never be asked to reply to such an address.
    pub fn receive(&mut self, frame: &[u8]) {
        if frame.len() > MAX_FRAME
            || self.queues.from_guest.len() >= MAX_QUEUED
            || !sender_is_unicast(frame)
        {
            return;
        }
        self.queues.from_guest.push_back(frame.to_vec());
        self.poll();
    }

    /// The next frame for the guest, if any.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        self.queues.to_guest.pop_front()
    }

    /// Whether frames wait for the guest.
    pub fn has_frames(&self) -> bool {
        !self.queues.to_guest.is_empty()
    }

    /// Run the interface and the connections until nothing changes.
    fn poll(&mut self) {
        // Each round either moves bytes or ends; bounded all the same.
        for _ in 0..8 {
            let now = self.now();
            self.iface.poll(now, &mut self.queues, &mut self.sockets);
            if !self.serve() {
                break;
            }
        }
        let now = self.now();
        self.iface.poll(now, &mut self.queues, &mut self.sockets);
    }

    /// Read requests, answer them, send answers; whether anything moved.
    fn serve(&mut self) -> bool {
        let mut moved = false;
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        let now = StdInstant::now();
        for c in &mut self.connections {
            let socket = self.sockets.get_mut::<tcp::Socket>(c.handle);
            while socket.can_recv() && c.request.len() < MAX_REQUEST && !c.close_after {
                let room = MAX_REQUEST - c.request.len();
                let mut chunk = vec![0u8; room.min(4096)];
                match socket.recv_slice(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        c.request.extend_from_slice(&chunk[..n]);
                        moved = true;
                    }
                }
            }
            while !c.close_after && !c.request.is_empty() {
                match guest_http::answer(&c.request, &mut store, now) {
                    Parsed::Incomplete => break,
                    Parsed::Answered {
                        len,
                        response,
                        close,
                    } => {
                        c.request.drain(..len.min(c.request.len()));
                        if c.out.len() + response.len() > MAX_PENDING_OUT {
                            c.close_after = true;
                            break;
                        }
                        c.out.extend_from_slice(&response);
                        c.close_after |= close;
                        moved = true;
                    }
                }
            }
            if !c.out.is_empty() && socket.can_send() {
                if let Ok(n) = socket.send_slice(&c.out) {
                    c.out.drain(..n);
                    moved |= n > 0;
                }
            }
            if c.close_after && c.out.is_empty() && socket.is_open() {
                socket.close();
            }
            // The guest closed its side and everything is answered: close ours.
            if !socket.may_recv() && c.out.is_empty() && socket.state() == tcp::State::CloseWait {
                socket.close();
            }
        }
        drop(store);
        let relistened = self.relisten();
        moved || relistened
    }

    /// Listen again on every connection slot that finished; whether any did.
    fn relisten(&mut self) -> bool {
        let mut any = false;
        for c in &mut self.connections {
            let socket = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if !socket.is_open() {
                c.request.clear();
                c.out.clear();
                c.close_after = false;
                if socket.listen(80).is_ok() {
                    any = true;
                }
            }
        }
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmds::{Mmds, MmdsVersion};
    use serde_json::json;
    use smoltcp::iface::{Config as IfConfig, Interface as Iface};
    use smoltcp::wire::IpAddress;

    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0f];

    /// A guest-side smoltcp stack wired to the endpoint by plain frame hand-over.
    struct Guest {
        iface: Iface,
        sockets: SocketSet<'static>,
        queues: Queues,
        epoch: StdInstant,
    }

    impl Guest {
        fn new() -> Guest {
            let mut queues = Queues::default();
            let mut iface = Iface::new(
                IfConfig::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC))),
                &mut queues,
                Instant::from_millis(0),
            );
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::v4(169, 254, 0, 2), 16));
            });
            Guest {
                iface,
                sockets: SocketSet::new(Vec::new()),
                queues,
                epoch: StdInstant::now(),
            }
        }

        /// Exchange frames with `mmds` until quiet; every guest frame must be one it wants.
        fn run(&mut self, mmds: &mut MmdsEndpoint) {
            let mut idle = 0;
            while idle < 5 {
                let now = Instant::from_micros(self.epoch.elapsed().as_micros() as i64);
                self.iface.poll(now, &mut self.queues, &mut self.sockets);
                let mut moved = false;
                while let Some(f) = self.queues.to_guest.pop_front() {
                    assert!(mmds.wants(&f), "a guest frame the MMDS does not want");
                    mmds.receive(&f);
                    moved = true;
                }
                while let Some(f) = mmds.next_frame() {
                    self.queues.from_guest.push_back(f);
                    moved = true;
                }
                if moved {
                    idle = 0;
                } else {
                    idle += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }

        /// One HTTP exchange on a new connection: the answer.
        fn http(&mut self, mmds: &mut MmdsEndpoint, request: &str, port: u16) -> String {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 65536]),
                tcp::SocketBuffer::new(vec![0; 65536]),
            );
            socket
                .connect(
                    self.iface.context(),
                    (IpAddress::v4(169, 254, 169, 254), 80),
                    port,
                )
                .unwrap();
            let h = self.sockets.add(socket);
            self.run(mmds);
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            assert!(s.may_send(), "not connected: {:?}", s.state());
            s.send_slice(request.as_bytes()).unwrap();
            self.run(mmds);
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            let mut out = vec![0u8; 65536];
            let n = s.recv_slice(&mut out).unwrap_or(0);
            s.close();
            self.run(mmds);
            self.sockets.remove(h);
            String::from_utf8_lossy(&out[..n]).into_owned()
        }
    }

    fn endpoint() -> MmdsEndpoint {
        let store = Mmds::shared(4096);
        store
            .lock()
            .unwrap()
            .put(json!({"latest": {"meta-data": {"id": "i-9"}}}))
            .unwrap();
        MmdsEndpoint::new(super::super::DEFAULT_IPV4, store)
    }

    #[test]
    fn a_guest_stack_reads_metadata_over_tcp() {
        let mut mmds = endpoint();
        let mut guest = Guest::new();
        let r = guest.http(
            &mut mmds,
            "GET /latest/meta-data/id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
            40000,
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
        assert!(r.ends_with("i-9"), "{r:?}");
        // Again on a new connection: the slot listens again.
        for port in 40001..40012 {
            let r = guest.http(&mut mmds, "GET /latest HTTP/1.1\r\n\r\n", port);
            assert!(r.ends_with("meta-data/"), "{port}: {r:?}");
        }
    }

    #[test]
    fn v2_tokens_over_tcp() {
        let mut mmds = endpoint();
        mmds.store.lock().unwrap().configure(MmdsVersion::V2, false);
        let mut guest = Guest::new();
        let r = guest.http(&mut mmds, "GET /latest HTTP/1.1\r\n\r\n", 41000);
        assert!(r.starts_with("HTTP/1.1 401"), "{r:?}");
        let r = guest.http(
            &mut mmds,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
            41001,
        );
        let token = r.split_once("\r\n\r\n").unwrap().1.to_string();
        let r = guest.http(
            &mut mmds,
            &format!("GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n"),
            41002,
        );
        assert!(r.ends_with("i-9"), "{r:?}");
    }

    /// A TCP SYN to the MMDS from 0.0.0.0 (found by the mmds fuzz target): smoltcp would
    /// answer it and assert on the unspecified destination, panicking the VMM's thread. It
    /// is dropped, as are ARP packets and IPv4 packets from broadcast or multicast senders.
    #[test]
    fn frames_from_unanswerable_senders_are_dropped() {
        let mut mmds = endpoint();
        let syn_from = |src: [u8; 4]| {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&GUEST_MAC);
            f.extend_from_slice(&[0x08, 0x00]);
            // IPv4: 20 bytes, total 40, TTL 64, TCP; checksums left 0.
            f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
            f.extend_from_slice(&src);
            f.extend_from_slice(&[169, 254, 169, 254]);
            // TCP: 40000 -> 80, SYN, window 65535.
            f.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 3, 232, 0, 0, 0, 0, 0x50, 2]);
            f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
            f
        };
        for src in [[0, 0, 0, 0], [255, 255, 255, 255], [224, 0, 0, 1]] {
            let frame = syn_from(src);
            assert!(mmds.wants(&frame));
            assert!(!sender_is_unicast(&frame), "{src:?}");
            mmds.receive(&frame);
            assert!(!mmds.has_frames(), "nothing is answered to {src:?}");
        }
        assert!(sender_is_unicast(&syn_from([169, 254, 0, 2])));
        // An ARP probe (sender 0.0.0.0) for the MMDS's address.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&GUEST_MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&GUEST_MAC);
        arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 169, 254, 169, 254]);
        assert!(mmds.wants(&arp));
        mmds.receive(&arp);
        assert!(!mmds.has_frames());
    }

    #[test]
    fn frames_not_for_the_mmds_are_not_wanted_and_junk_is_harmless() {
        let mut mmds = endpoint();
        let mut frame = vec![0u8; 64];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[30..34].copy_from_slice(&[10, 0, 0, 1]);
        assert!(!mmds.wants(&frame));
        frame[30..34].copy_from_slice(&[169, 254, 169, 254]);
        assert!(mmds.wants(&frame));
        assert!(!mmds.wants(&frame[..20]));
        // Garbage and floods: bounded queues, no answer to junk, no panic.
        for len in [0usize, 1, 14, 34, 60, 1500, MAX_FRAME + 1] {
            let mut junk = vec![0xa5u8; len];
            if len >= 34 {
                junk[12..14].copy_from_slice(&[0x08, 0x00]);
                junk[30..34].copy_from_slice(&[169, 254, 169, 254]);
            }
            mmds.receive(&junk);
        }
        for _ in 0..10_000 {
            mmds.receive(&frame);
        }
        assert!(mmds.queues.from_guest.len() <= MAX_QUEUED);
        assert!(mmds.queues.to_guest.len() <= MAX_QUEUED);
    }
}
