//! `vsock-io`: streams deterministic bytes over vsock, Unix or TCP sockets and checksums them,
//! for flint's end-to-end network tests (`tests/network.rs`) and `resources/bench-net.sh`.
//!
//! It runs inside test guests, whose initramfs has only busybox, so it is built as a static
//! binary (`RUSTFLAGS="-C target-feature=+crt-static"`), and in the nested test host.
//!
//! ```text
//! vsock-io listen  ADDR [--conns N] (--recv [--expect BYTES] | --send BYTES)
//!                       [--abort-after BYTES] [--seed S]
//! vsock-io connect ADDR [--conns N] (--recv [--expect BYTES] | --send BYTES)
//!                       [--abort-after BYTES] [--seed S] [--retry SECS]
//! vsock-io gen BYTES [--seed S]          deterministic bytes to stdout (same as --send)
//! vsock-io sum                           checksum of stdin, printed like a connection's
//!
//! ADDR  vsock:PORT          listen on vsock PORT (any CID)
//!       vsock:CID:PORT      connect to vsock CID:PORT (2 is the host)
//!       unix:PATH           listen on / connect to the Unix socket PATH
//!       flint:PATH:PORT     connect to flint's vsock socket PATH and ask for guest PORT
//!                           (`CONNECT PORT\n`, answered `OK <host port>\n`)
//!       tcp:PORT            listen on TCP PORT (all IPv4 addresses)
//!       tcp:IP:PORT         connect to TCP IP:PORT
//! ```
//!
//! `listen` serves N connections (default 1) at once, `connect` opens N at once; each one
//! either receives until end of stream (`--recv`) or sends BYTES (`--send`; connection i
//! sends the stream of seed S+i), then half-closes and waits for the peer to close. With
//! `--abort-after B` a connection closes abruptly after B bytes instead. `--recv --expect B`
//! receives exactly B bytes and then closes without waiting for the end of the stream (an
//! earlier end is an error): for peers whose half-close does not come through, such as a guest
//! behind Firecracker's vsock device, which does not pass the guest's `shutdown(SHUT_WR)` on to
//! the host's Unix socket, so that a receiver waiting for the end of the stream and a sender
//! waiting for the receiver to close would wait for each other forever.
//! `--retry SECS` keeps
//! trying to connect (refused, or flint closed without `OK`) for up to SECS seconds. A vsock
//! connect waits up to 60 s for the peer's answer (Linux's default is 2 s).
//!
//! One line per connection on stdout, when it ends:
//! `vsock-io: conn=I mode=send|recv bytes=N sum=<16 hex digits> secs=S ok|aborted|error=<why>`,
//! where sum is a 64-bit checksum (FNV-1a over 64-bit words) of the bytes moved and S the
//! seconds from the start (sending) or the first byte (receiving) to the end. Exit status 0
//! when every connection ended `ok` or `aborted`, 1 when one failed, 2 for bad arguments.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

const BLOCK: usize = 64 * 1024;

/// A 64-bit checksum fed in pieces: FNV-1a's step applied to 64-bit little-endian words (8
/// times fewer steps than byte-wise FNV-1a, which matters in an emulated guest), then to the
/// 0-7 bytes left over. Equal however the stream is cut into pieces.
#[derive(Debug, Clone, Copy)]
struct Checksum {
    hash: u64,
    pending: [u8; 8],
    npending: usize,
}

impl Checksum {
    const PRIME: u64 = 0x0100_0000_01b3;

    fn new() -> Checksum {
        Checksum {
            hash: 0xcbf2_9ce4_8422_2325,
            pending: [0; 8],
            npending: 0,
        }
    }

    fn word(&mut self, w: u64) {
        self.hash = (self.hash ^ w).wrapping_mul(Self::PRIME);
    }

    fn update(&mut self, mut data: &[u8]) {
        if self.npending > 0 {
            let take = data.len().min(8 - self.npending);
            self.pending[self.npending..self.npending + take].copy_from_slice(&data[..take]);
            self.npending += take;
            data = &data[take..];
            if self.npending < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.pending));
            self.npending = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().unwrap()));
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.npending = rest.len();
    }

    /// The checksum of everything fed so far.
    fn value(&self) -> u64 {
        let mut h = self.hash;
        for &b in &self.pending[..self.npending] {
            h = (h ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
        h
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), the same for a seed however they are
/// taken in pieces.
struct Generator {
    state: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl Generator {
    fn new(seed: u64) -> Generator {
        // splitmix64 of the seed, so that neighbouring seeds give unrelated streams; never 0.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Generator {
            state: z | 1,
            buf: vec![0; BLOCK],
            pos: BLOCK,
        }
    }

    /// The next bytes of the stream, at most `max` and at least one (when `max` > 0).
    fn next_chunk(&mut self, max: usize) -> &[u8] {
        if self.pos == self.buf.len() {
            for word in self.buf.chunks_exact_mut(8) {
                let mut x = self.state;
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                self.state = x;
                word.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
            }
            self.pos = 0;
        }
        let n = max.min(self.buf.len() - self.pos);
        &self.buf[self.pos..self.pos + n]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

/// A connected stream of either kind.
enum Conn {
    Vsock(File),
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Conn::Vsock(f) => {
                // SAFETY: shutdown(2) on a socket descriptor this value owns; no memory is
                // passed.
                let rc = unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Vsock(f) => f.read(buf),
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Vsock(f) => f.write(buf),
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (`linux/vm_sockets.h`, 64-bit layout: a `timeval`), at
/// socket level `AF_VSOCK`.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
/// How long a vsock connect waits for the peer's answer. Linux's default, 2 s, is too short
/// for a loaded (emulated) host where the request queues behind other streams' data: the
/// connect then fails although the device has already connected the host program, which
/// gets an empty stream, and a retry makes one connection more than the host program expects.
const VSOCK_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

fn vsock_connect(cid: u32, port: u32) -> io::Result<Conn> {
    let fd = vsock_socket()?;
    let tv = libc::timeval {
        tv_sec: VSOCK_CONNECT_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: tv is a valid timeval that outlives the call, and the length passed is its size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    let addr = vsock_addr(cid, port);
    // SAFETY: addr is a valid sockaddr_vm that outlives the call, and the length passed is
    // its size.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    Ok(Conn::Vsock(File::from(fd)))
}

fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: as in vsock_connect: a valid sockaddr_vm and its size.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen(2) takes no pointers.
    check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
    Ok(fd)
}

fn vsock_accept(listener: &OwnedFd) -> io::Result<Conn> {
    loop {
        // SAFETY: null address and length pointers are allowed: the peer's address is not
        // wanted.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            return Ok(Conn::Vsock(File::from(unsafe { OwnedFd::from_raw_fd(fd) })));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Addr {
    VsockListen(u32),
    Vsock(u32, u32),
    Unix(String),
    Flint(String, u32),
    TcpListen(u16),
    Tcp(String),
}

fn parse_addr(s: &str) -> Result<Addr, String> {
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("bad number {v:?} in {s:?}"))
    };
    if let Some(rest) = s.strip_prefix("vsock:") {
        return match rest.split_once(':') {
            None => Ok(Addr::VsockListen(num(rest)?)),
            Some((cid, port)) => Ok(Addr::Vsock(num(cid)?, num(port)?)),
        };
    }
    if let Some(rest) = s.strip_prefix("tcp:") {
        return match rest.rsplit_once(':') {
            None => rest
                .parse()
                .map(Addr::TcpListen)
                .map_err(|_| format!("bad port in {s:?}")),
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Addr::Tcp(rest.to_string()))
            }
            Some(_) => Err(format!("bad address {s:?}")),
        };
    }
    if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        return Ok(Addr::Unix(path.to_string()));
    }
    if let Some((path, port)) = s.strip_prefix("flint:").and_then(|r| r.rsplit_once(':')) {
        if !path.is_empty() {
            return Ok(Addr::Flint(path.to_string(), num(port)?));
        }
    }
    Err(format!("bad address {s:?}"))
}

/// Parse `123`, `16K`, `16M` or `1G` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Recv,
    Send(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    listen: bool,
    addr: Addr,
    conns: u32,
    mode: Mode,
    abort_after: Option<u64>,
    /// Receiving: the exact number of bytes to take before closing.
    expect: Option<u64>,
    seed: u64,
    retry: Duration,
}

fn parse_options(listen: bool, args: &[String]) -> Result<Options, String> {
    let mut it = args.iter();
    let addr = parse_addr(it.next().ok_or("missing address")?)?;
    match (&addr, listen) {
        (Addr::VsockListen(_) | Addr::Unix(_) | Addr::TcpListen(_), true) => {}
        (Addr::Vsock(..) | Addr::Unix(_) | Addr::Flint(..) | Addr::Tcp(_), false) => {}
        _ => {
            return Err(format!(
                "cannot {} on {addr:?}",
                if listen { "listen" } else { "connect" }
            ))
        }
    }
    let mut conns = 1;
    let mut mode = None;
    let mut abort_after = None;
    let mut expect = None;
    let mut seed = 0;
    let mut retry = Duration::ZERO;
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--conns" => {
                conns = value()?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("bad --conns")?
            }
            "--recv" => mode = Some(Mode::Recv),
            "--send" => mode = Some(Mode::Send(parse_size(value()?)?)),
            "--abort-after" => abort_after = Some(parse_size(value()?)?),
            "--expect" => expect = Some(parse_size(value()?)?),
            "--seed" => seed = value()?.parse().map_err(|_| "bad --seed")?,
            "--retry" => retry = Duration::from_secs(value()?.parse().map_err(|_| "bad --retry")?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let mode = mode.ok_or("one of --recv or --send BYTES is needed")?;
    if expect.is_some() && mode != Mode::Recv {
        return Err("--expect goes with --recv".into());
    }
    Ok(Options {
        listen,
        addr,
        conns,
        mode,
        abort_after,
        expect,
        seed,
        retry,
    })
}

/// How one connection ended.
struct Outcome {
    bytes: u64,
    sum: Checksum,
    /// Receiving: from the first byte to the end; sending: from the start to the end.
    secs: f64,
    result: Result<bool, io::Error>, // Ok(aborted)
}

/// Seconds since `start` (0 when nothing started).
fn secs_since(start: Option<Instant>) -> f64 {
    start.map_or(0.0, |s| s.elapsed().as_secs_f64())
}

/// Receive until the end of the stream, or `limit` bytes (then aborted), or exactly `expect`
/// bytes (then done; an earlier end is an error).
fn recv_stream(conn: &mut impl Read, limit: Option<u64>, expect: Option<u64>) -> Outcome {
    let mut buf = vec![0u8; BLOCK];
    let mut sum = Checksum::new();
    let mut bytes = 0u64;
    let mut first = None;
    let result = loop {
        let mut want = buf.len() as u64;
        match limit {
            Some(l) if bytes >= l => break Ok(true),
            Some(l) => want = want.min(l - bytes),
            None => {}
        }
        match expect {
            Some(e) if bytes >= e => break Ok(false),
            Some(e) => want = want.min(e - bytes),
            None => {}
        }
        match conn.read(&mut buf[..want as usize]) {
            Ok(0) => match expect {
                Some(e) => {
                    break Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the stream ended after {bytes} of the {e} bytes expected"),
                    ))
                }
                None => break Ok(false),
            },
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                sum.update(&buf[..n]);
                bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    Outcome {
        bytes,
        sum,
        secs: secs_since(first),
        result,
    }
}

fn send_stream(conn: &mut Conn, total: u64, seed: u64, limit: Option<u64>) -> Outcome {
    let start = Some(Instant::now());
    let mut gen = Generator::new(seed);
    let mut sum = Checksum::new();
    let mut bytes = 0u64;
    let stop = limit.map_or(total, |l| l.min(total));
    let mut failure = None;
    while bytes < stop {
        let chunk = gen.next_chunk((stop - bytes).min(BLOCK as u64) as usize);
        match conn.write(chunk) {
            Ok(0) => {
                failure = Some(io::ErrorKind::WriteZero.into());
                break;
            }
            Ok(n) => {
                sum.update(&chunk[..n]);
                gen.consume(n);
                bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let result = if let Some(e) = failure {
        Err(e)
    } else if limit.is_some_and(|l| l < total) {
        Ok(true)
    } else {
        // Half-close, then wait for the peer to close: when this returns, it has everything.
        conn.shutdown_write().and_then(|()| {
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest)?;
            if rest.is_empty() {
                Ok(false)
            } else {
                Err(io::Error::other(format!(
                    "the peer sent {} unexpected bytes",
                    rest.len()
                )))
            }
        })
    };
    Outcome {
        bytes,
        sum,
        secs: secs_since(start),
        result,
    }
}

/// Connect through flint's handshake: `CONNECT <port>\n`, then `OK <host port>\n`. The answer
/// is read a byte at a time so that no stream data after it is lost.
fn flint_connect(path: &str, port: u32) -> io::Result<Conn> {
    let mut s = UnixStream::connect(path)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "flint closed the socket without OK (nobody listening on the guest port?)",
            ));
        }
        if byte[0] == b'\n' {
            let text = String::from_utf8_lossy(&line);
            return if text.starts_with("OK ") {
                Ok(Conn::Unix(s))
            } else {
                Err(io::Error::other(format!("flint answered {text:?}")))
            };
        }
        line.push(byte[0]);
    }
    Err(io::Error::other("flint's answer line is too long"))
}

fn connect_once(addr: &Addr) -> io::Result<Conn> {
    match addr {
        Addr::Vsock(cid, port) => vsock_connect(*cid, *port),
        Addr::Unix(path) => UnixStream::connect(path).map(Conn::Unix),
        Addr::Flint(path, port) => flint_connect(path, *port),
        Addr::Tcp(addr) => TcpStream::connect(addr.as_str()).map(Conn::Tcp),
        Addr::VsockListen(_) | Addr::TcpListen(_) => unreachable!("checked by parse_options"),
    }
}

fn connect_retrying(addr: &Addr, retry: Duration) -> io::Result<Conn> {
    let deadline = Instant::now() + retry;
    loop {
        match connect_once(addr) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

fn serve(conn: io::Result<Conn>, index: u32, opts: &Options) -> bool {
    let outcome = match conn {
        Err(e) => Outcome {
            bytes: 0,
            sum: Checksum::new(),
            secs: 0.0,
            result: Err(e),
        },
        Ok(mut c) => match opts.mode {
            Mode::Recv => recv_stream(&mut c, opts.abort_after, opts.expect),
            Mode::Send(n) => send_stream(
                &mut c,
                n,
                opts.seed.wrapping_add(u64::from(index)),
                opts.abort_after,
            ),
        },
    };
    let mode = match opts.mode {
        Mode::Recv => "recv",
        Mode::Send(_) => "send",
    };
    let (end, good) = match &outcome.result {
        Ok(false) => ("ok".to_string(), true),
        Ok(true) => ("aborted".to_string(), true),
        Err(e) => (format!("error={}", e.to_string().replace(' ', "_")), false),
    };
    report(index, mode, &outcome, &end);
    good
}

fn report(index: u32, mode: &str, outcome: &Outcome, end: &str) {
    println!(
        "vsock-io: conn={index} mode={mode} bytes={} sum={:016x} secs={:.3} {end}",
        outcome.bytes,
        outcome.sum.value(),
        outcome.secs
    );
}

fn run(opts: &Options) -> io::Result<bool> {
    let results: Vec<bool> = if opts.listen {
        enum Listener {
            Vsock(OwnedFd),
            Unix(UnixListener),
            Tcp(TcpListener),
        }
        let listener = match &opts.addr {
            Addr::VsockListen(port) => Listener::Vsock(vsock_listen(*port)?),
            Addr::Unix(path) => {
                let _ = std::fs::remove_file(path);
                Listener::Unix(UnixListener::bind(path)?)
            }
            Addr::TcpListen(port) => Listener::Tcp(TcpListener::bind(("0.0.0.0", *port))?),
            _ => unreachable!("checked by parse_options"),
        };
        // Ready: scripts may wait for this line.
        println!("vsock-io: listening");
        thread::scope(|scope| {
            let mut handles = Vec::new();
            for i in 0..opts.conns {
                let conn = match &listener {
                    Listener::Vsock(fd) => vsock_accept(fd),
                    Listener::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(s)),
                    Listener::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
                };
                handles.push(scope.spawn(move || serve(conn, i, opts)));
            }
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    } else {
        thread::scope(|scope| {
            let handles: Vec<_> = (0..opts.conns)
                .map(|i| {
                    scope.spawn(move || serve(connect_retrying(&opts.addr, opts.retry), i, opts))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    Ok(results.iter().all(|&ok| ok))
}

fn gen_to_stdout(total: u64, seed: u64) -> io::Result<()> {
    let mut gen = Generator::new(seed);
    let mut out = io::stdout().lock();
    let mut left = total;
    while left > 0 {
        let chunk = gen.next_chunk(left.min(BLOCK as u64) as usize);
        let n = chunk.len();
        out.write_all(chunk)?;
        gen.consume(n);
        left -= n as u64;
    }
    out.flush()
}

fn sum_stdin() -> io::Result<()> {
    let outcome = recv_stream(&mut io::stdin().lock(), None, None);
    outcome
        .result
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
    report(0, "recv", &outcome, "ok");
    Ok(())
}

const USAGE: &str = "usage: vsock-io listen|connect ADDR [--conns N] (--recv [--expect BYTES] | \
--send BYTES) [--abort-after BYTES] [--seed S] [--retry SECS]\n       vsock-io gen BYTES [--seed S]\n       \
vsock-io sum\nADDR: vsock:PORT | vsock:CID:PORT | unix:PATH | flint:PATH:PORT | tcp:PORT | tcp:IP:PORT";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some(cmd @ ("listen" | "connect")) => match parse_options(cmd == "listen", &args[1..]) {
            Ok(opts) => run(&opts).map_err(|e| format!("{}: {e}", args[1])),
            Err(e) => {
                eprintln!("vsock-io: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("gen") => {
            let seed = match args.get(2..) {
                Some([flag, s]) if flag == "--seed" => s.parse().ok(),
                Some([]) => Some(0),
                _ => None,
            };
            match (args.get(1).map(|s| parse_size(s)), seed) {
                (Some(Ok(n)), Some(seed)) => gen_to_stdout(n, seed)
                    .map(|()| true)
                    .map_err(|e| e.to_string()),
                _ => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(2);
                }
            }
        }
        Some("sum") if args.len() == 1 => sum_stdin().map(|()| true).map_err(|e| e.to_string()),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vsock-io: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generate(seed: u64, total: usize, piece: usize) -> Vec<u8> {
        let mut gen = Generator::new(seed);
        let mut out = Vec::new();
        while out.len() < total {
            let chunk = gen.next_chunk(piece.min(total - out.len()));
            let n = chunk.len();
            out.extend_from_slice(chunk);
            gen.consume(n);
        }
        out
    }

    #[test]
    fn generated_stream_does_not_depend_on_piece_sizes() {
        let whole = generate(7, 200_000, BLOCK);
        assert_eq!(whole, generate(7, 200_000, 1000));
        assert_eq!(whole, generate(7, 200_000, 3));
        assert_ne!(whole, generate(8, 200_000, BLOCK));
    }

    #[test]
    fn checksum_in_pieces_equals_whole() {
        let data = generate(1, 10_003, BLOCK);
        let mut a = Checksum::new();
        a.update(&data);
        for piece in [1, 3, 7, 8, 9, 4096] {
            let mut b = Checksum::new();
            for p in data.chunks(piece) {
                b.update(p);
            }
            assert_eq!(a.value(), b.value(), "pieces of {piece}");
        }
        let mut c = Checksum::new();
        c.update(&data[..10_002]);
        assert_ne!(a.value(), c.value());
        // Below 8 bytes it is byte-wise FNV-1a: test vector for "a".
        let mut one = Checksum::new();
        one.update(b"a");
        assert_eq!(one.value(), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn addresses_and_sizes() {
        assert_eq!(parse_addr("vsock:5000"), Ok(Addr::VsockListen(5000)));
        assert_eq!(parse_addr("vsock:2:6000"), Ok(Addr::Vsock(2, 6000)));
        assert_eq!(parse_addr("unix:/tmp/x"), Ok(Addr::Unix("/tmp/x".into())));
        assert_eq!(
            parse_addr("flint:/tmp/v:sock:52"),
            Ok(Addr::Flint("/tmp/v:sock".into(), 52))
        );
        for bad in [
            "vsock:", "vsock:x", "unix:", "flint:/p", "flint::5", "tcp:x", "tcp::5", "tcp:h:x",
            "udp:1",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_addr("tcp:5001"), Ok(Addr::TcpListen(5001)));
        assert_eq!(
            parse_addr("tcp:10.0.0.1:5001"),
            Ok(Addr::Tcp("10.0.0.1:5001".into()))
        );
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("3k"), Ok(3072));
        assert_eq!(parse_size("12"), Ok(12));
        assert!(parse_size("M").is_err() && parse_size("1T").is_err());
    }

    #[test]
    fn options() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse_options(
            false,
            &args("flint:/v.sock:5 --conns 32 --send 1M --retry 9"),
        )
        .unwrap();
        assert_eq!(o.conns, 32);
        assert_eq!(o.mode, Mode::Send(1 << 20));
        assert_eq!(o.retry, Duration::from_secs(9));
        assert!(parse_options(true, &args("vsock:2:5 --recv")).is_err());
        assert!(parse_options(false, &args("vsock:5 --recv")).is_err());
        assert!(parse_options(true, &args("vsock:5")).is_err());
        assert!(parse_options(true, &args("vsock:5 --recv --conns 0")).is_err());
        assert_eq!(
            parse_options(true, &args("unix:/v_6000 --recv --expect 2M"))
                .unwrap()
                .expect,
            Some(2 << 20)
        );
        assert!(parse_options(true, &args("vsock:5 --send 1M --expect 1M")).is_err());
    }

    /// Both ends over a Unix socket pair: sums match, half-close works, abort is reported.
    #[test]
    fn send_and_receive_over_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let sender = thread::spawn(move || send_stream(&mut Conn::Unix(a), 300_000, 5, None));
        let got = recv_stream(&mut Conn::Unix(b), None, None);
        let sent = sender.join().unwrap();
        assert!(matches!(sent.result, Ok(false)));
        assert!(matches!(got.result, Ok(false)));
        assert_eq!((sent.bytes, sent.sum.value()), (300_000, got.sum.value()));
        assert_eq!(got.bytes, 300_000);

        let (a, b) = UnixStream::pair().unwrap();
        let sender = thread::spawn(move || send_stream(&mut Conn::Unix(a), 300_000, 5, Some(1000)));
        let got = recv_stream(&mut Conn::Unix(b), None, None);
        let sent = sender.join().unwrap();
        assert!(matches!(sent.result, Ok(true)));
        assert_eq!((got.bytes, got.sum.value()), (1000, sent.sum.value()));
    }

    /// A peer whose half-close never arrives (as behind Firecracker's vsock): with --expect
    /// the receiver closes after the bytes it expects, and then the sender's wait for that
    /// close ends too; a stream that ends short of the count is an error.
    #[test]
    fn expect_ends_a_stream_without_the_peers_half_close() {
        let (a, b) = UnixStream::pair().unwrap();
        // The sender's half-close is not passed on: its data reaches the receiver through a
        // second socket pair whose far end stays open until the receiver has closed.
        let (relay_in, relay_out) = UnixStream::pair().unwrap();
        let sender = thread::spawn(move || send_stream(&mut Conn::Unix(a), 300_000, 9, None));
        let relay = thread::spawn(move || {
            let mut from_sender = b;
            let mut to_receiver = relay_in;
            let mut buf = vec![0u8; 4096];
            loop {
                let n = from_sender.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                to_receiver.write_all(&buf[..n]).unwrap();
            }
            // Keep the receiver's side open (no EOF) until it closes, then close ours.
            let mut rest = Vec::new();
            let _ = to_receiver.read_to_end(&mut rest);
        });
        let got = recv_stream(&mut Conn::Unix(relay_out), None, Some(300_000));
        relay.join().unwrap();
        let sent = sender.join().unwrap();
        assert!(matches!(got.result, Ok(false)), "{:?}", got.result.err());
        assert!(matches!(sent.result, Ok(false)));
        assert_eq!((got.bytes, got.sum.value()), (300_000, sent.sum.value()));

        let (a, b) = UnixStream::pair().unwrap();
        let sender = thread::spawn(move || send_stream(&mut Conn::Unix(a), 1000, 9, None));
        let got = recv_stream(&mut Conn::Unix(b), None, Some(2000));
        sender.join().unwrap();
        assert_eq!(got.bytes, 1000);
        assert_eq!(got.result.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
