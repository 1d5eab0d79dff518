//! Fuzz the virtio-vsock device as a whole: a hostile guest driver (packets on the transmit
//! queue, receive and event buffers, notifications) and host programs (connecting to the
//! device's socket, writing, reading, hanging up) take turns against the real device on a real
//! event loop, with real guest memory and real Unix sockets. The device must never panic,
//! hang or hold more than its limits, whatever the order of events.
//!
//! Input: a sequence of operations, each an opcode byte followed by its argument bytes (see
//! `step`); at most `MAX_OPS` per input. Missing argument bytes read as zero.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arch::GuestMemoryMmap;
use devices::virtio::vsock::packet::{Header, HOST_CID, TYPE_STREAM};
use devices::virtio::vsock::{
    Vsock, EVENT_QUEUE, FIRST_HOST_PORT, MAX_CONNECTIONS, RX_QUEUE, TX_QUEUE,
};
use devices::virtio::{feature, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use flint_fuzz::{interrupt, scratch_dir, split_queue};
use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const MAX_OPS: usize = 128;
const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 0x10_0000;
const QSIZE: u16 = 64;
/// Ring bases of the receive, transmit and event queues.
const RINGS: [u64; 3] = [0x0000, 0x2000, 0x4000];
const RX_BUFS: u64 = 0x1_0000;
const RX_BUF_LEN: u32 = 0x1000;
const EV_BUFS: u64 = 0x5_0000;
const TX_BUFS: u64 = 0x6_0000;
const TX_SLOT: u64 = 0x2000;
/// Guest ports the guest connects to that have a host listener.
const LISTENED: [u32; 2] = [1000, 1001];
const MAX_HOSTS: usize = 8;

/// The driver side of one split queue.
struct Ring {
    mem: GuestMemoryMmap,
    base: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn avail(&self) -> u64 {
        self.base + 16 * u64::from(QSIZE)
    }

    fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * u64::from(QSIZE) + 3) & !3
    }

    fn new(mem: &GuestMemoryMmap, base: u64) -> Ring {
        let r = Ring {
            mem: mem.clone(),
            base,
            next_desc: 0,
            avail_idx: 0,
        };
        r.mem.write_obj(0u32, GuestAddress(r.avail())).unwrap();
        r.mem.write_obj(0u32, GuestAddress(r.used())).unwrap();
        r
    }

    fn queue(&self) -> Queue {
        split_queue(QSIZE, self.base, self.avail(), self.used())
    }

    /// Lay out a chain of (address, length, device-writable) and make it available; returns
    /// the descriptor index of its head.
    fn add(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let index = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let flags: u16 = u16::from(write) * 2 + u16::from(!last);
            let at = self.base + 16 * u64::from(index);
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem
                .write_obj((index + 1) % QSIZE, GuestAddress(at + 14))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .unwrap();
        head
    }
}

struct Sub(Arc<Mutex<Vsock>>);

impl MutEventSubscriber for Sub {
    fn init(&mut self, ops: &mut EventOps) {
        self.0.lock().unwrap().init_backend(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.0.lock().unwrap().process_backend(events, ops);
    }
}

struct Fixture {
    uds: PathBuf,
    listeners: Vec<UnixListener>,
    interrupt: Arc<VirtioInterrupt>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let uds = scratch_dir().join(format!("flint-fuzz-vsock-{}", std::process::id()));
        let listeners = LISTENED
            .iter()
            .map(|port| {
                let path = PathBuf::from(format!("{}_{port}", uds.display()));
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        Fixture {
            uds,
            listeners,
            interrupt: interrupt(),
        }
    })
}

/// The input, read a byte at a time (zero once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
}

struct World {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    manager: EventManager<Sub>,
    rings: [Ring; 3],
    hosts: Vec<UnixStream>,
}

impl World {
    fn activate(&mut self) {
        self.rings = RINGS.map(|base| Ring::new(&self.mem, base));
        let queues = self.rings.iter().map(Ring::queue).collect();
        let interrupt = fixture().interrupt.clone();
        let mut dev = self.dev.lock().unwrap();
        dev.activate(
            self.mem.clone(),
            feature(VIRTIO_F_VERSION_1),
            queues,
            interrupt,
        )
        .unwrap();
    }

    fn host(&mut self, input: &mut Input) -> Option<&mut UnixStream> {
        let n = self.hosts.len();
        let i = usize::from(input.byte());
        if n == 0 {
            None
        } else {
            self.hosts.get_mut(i % n)
        }
    }

    /// One operation.
    fn step(&mut self, input: &mut Input) {
        match input.byte() % 12 {
            // A packet from the guest.
            0 => {
                let op_byte = input.byte();
                let guest_port = 40000 + u32::from(input.byte() % 4);
                let h = input.byte() % 8;
                let host_port = if h < 4 {
                    LISTENED[0] + u32::from(h)
                } else {
                    FIRST_HOST_PORT + u32::from(h - 4)
                };
                let flags = u32::from(input.byte());
                let buf_alloc = u32::from(input.u16()) << 4;
                let fwd_cnt = u32::from(input.u16()) << 4;
                let len_byte = input.byte();
                let payload_len = u32::from(len_byte & 0x7f) * 32;
                let mut hdr = Header {
                    src_cid: GUEST_CID,
                    dst_cid: HOST_CID,
                    src_port: guest_port,
                    dst_port: host_port,
                    len: payload_len,
                    type_: TYPE_STREAM,
                    op: u16::from(op_byte & 7) + 1,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                };
                if op_byte & 0x08 != 0 {
                    hdr.src_cid = 7;
                }
                if op_byte & 0x10 != 0 {
                    hdr.type_ = 2;
                }
                if op_byte & 0x20 != 0 {
                    // A header that lies about the payload.
                    hdr.len = hdr.len.wrapping_add(u32::from(len_byte) << 9);
                }
                let ring = &mut self.rings[TX_QUEUE];
                let slot = TX_BUFS + u64::from(ring.next_desc % 32) * TX_SLOT;
                self.mem
                    .write_slice(&hdr.to_bytes(), GuestAddress(slot))
                    .unwrap();
                let payload = vec![len_byte; payload_len as usize];
                self.mem
                    .write_slice(&payload, GuestAddress(slot + 64))
                    .unwrap();
                if op_byte & 0x40 != 0 {
                    // Header split across two descriptors, payload in a third.
                    ring.add(&[
                        (slot, 20, false),
                        (slot + 20, 24, false),
                        (slot + 64, payload_len, false),
                    ]);
                } else if payload_len > 0 {
                    ring.add(&[(slot, 44, false), (slot + 64, payload_len, false)]);
                } else {
                    ring.add(&[(slot, 44, false)]);
                }
                if op_byte & 0x80 == 0 {
                    self.dev.lock().unwrap().process_queue(TX_QUEUE);
                }
            }
            // Receive buffers.
            1 => {
                let b = input.byte();
                let ring = &mut self.rings[RX_QUEUE];
                for _ in 0..(b % 16) + 1 {
                    let addr = RX_BUFS + u64::from(ring.next_desc) * u64::from(RX_BUF_LEN);
                    match b >> 6 {
                        0 | 1 => ring.add(&[(addr, RX_BUF_LEN, true)]),
                        2 => ring.add(&[(addr, 30, true)]),
                        _ => ring.add(&[(addr, 20, true), (addr + 20, 100, true)]),
                    };
                }
                if b & 0x20 == 0 {
                    self.dev.lock().unwrap().process_queue(RX_QUEUE);
                }
            }
            // A host program connects.
            2 => {
                let b = input.byte();
                if self.hosts.len() >= MAX_HOSTS {
                    return;
                }
                let Ok(mut s) = UnixStream::connect(&fixture().uds) else {
                    return;
                };
                let _ = s.set_nonblocking(true);
                let line = match b >> 6 {
                    0 | 1 => format!("CONNECT {}\n", 40000 + u32::from(b % 4)),
                    2 => format!("CONNECT {}\nearly", 40000 + u32::from(b % 4)),
                    _ => "CONNEC".to_string(),
                };
                let _ = s.write(line.as_bytes());
                self.hosts.push(s);
            }
            // A host program writes.
            3 => {
                let n = usize::from(input.byte()) * 64;
                if let Some(s) = self.host(input) {
                    let _ = s.write(&vec![0x5a; n]);
                }
            }
            // A host program shuts down or goes away.
            4 => {
                let b = input.byte();
                if self.hosts.is_empty() {
                    return;
                }
                let i = usize::from(b >> 2) % self.hosts.len();
                match b & 3 {
                    0 => drop(self.hosts.swap_remove(i)),
                    1 => drop(self.hosts[i].shutdown(std::net::Shutdown::Write)),
                    2 => drop(self.hosts[i].shutdown(std::net::Shutdown::Read)),
                    _ => drop(self.hosts[i].shutdown(std::net::Shutdown::Both)),
                }
            }
            // Host programs read what they have.
            5 => {
                let mut buf = [0u8; 16 * 1024];
                for s in &mut self.hosts {
                    for _ in 0..4 {
                        if !matches!(s.read(&mut buf), Ok(n) if n > 0) {
                            break;
                        }
                    }
                }
            }
            // The event loop runs a few rounds.
            6 => {
                for _ in 0..4 {
                    let _ = self.manager.run_with_timeout(0);
                }
            }
            // A notification for any queue index.
            7 => {
                let q = usize::from(input.byte() % 4);
                self.dev.lock().unwrap().process_queue(q);
            }
            // An event buffer, and its notification.
            8 => {
                let b = input.byte();
                let len = if b & 1 == 0 { 4 } else { 2 };
                let addr = EV_BUFS + u64::from(self.rings[EVENT_QUEUE].next_desc) * 16;
                self.rings[EVENT_QUEUE].add(&[(addr, len, b & 2 == 0)]);
                self.dev.lock().unwrap().process_queue(EVENT_QUEUE);
            }
            // Time passes: whatever can time out does.
            9 => {
                let later = Instant::now() + Duration::from_secs(3600);
                self.dev.lock().unwrap().expire_at(later);
            }
            // The host's listeners accept guest connections.
            10 => {
                for l in &fixture().listeners {
                    while let Ok((s, _)) = l.accept() {
                        if self.hosts.len() < MAX_HOSTS {
                            let _ = s.set_nonblocking(true);
                            self.hosts.push(s);
                        }
                    }
                }
            }
            // A snapshot restore, or a device reset and new activation.
            _ => {
                if input.byte() & 1 == 0 {
                    self.dev.lock().unwrap().restored();
                } else {
                    self.dev.lock().unwrap().reset();
                    self.activate();
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &fx.uds).unwrap()));
    let mut manager = EventManager::<Sub>::new().unwrap();
    manager.add_subscriber(Sub(dev.clone()));
    let mut world = World {
        rings: RINGS.map(|base| Ring::new(&mem, base)),
        mem,
        dev,
        manager,
        hosts: Vec::new(),
    };
    world.activate();
    let mut input = Input(data);
    for _ in 0..MAX_OPS {
        if input.0.is_empty() {
            break;
        }
        world.step(&mut input);
        let _ = world.manager.run_with_timeout(0);
        assert!(world.dev.lock().unwrap().connection_count() <= MAX_CONNECTIONS);
    }
    for _ in 0..4 {
        let _ = world.manager.run_with_timeout(0);
    }
    let World {
        dev,
        manager,
        hosts,
        ..
    } = world;
    drop(hosts);
    drop(manager);
    drop(dev);
    // Nothing carries over to the next input.
    for l in &fx.listeners {
        while l.accept().is_ok() {}
    }
    let _ = fx.interrupt.irq().eventfd().read();
});
