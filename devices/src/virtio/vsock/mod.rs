//! virtio-vsock (virtio 1.2 section 5.10) with the guest's streams mapped to Unix sockets on
//! the host:
//!
//! - Host to guest: a host program connects to the device's socket (`uds_path`) and sends
//!   `CONNECT <port>\n`; the device opens a stream to guest port `<port>` from a host port it
//!   allocates (counting up from [`FIRST_HOST_PORT`]). When the guest accepts, the program
//!   reads `OK <host port>\n` and the socket carries the stream; when the guest refuses, the
//!   socket is closed.
//! - Guest to host: a guest connecting to CID 2 port `P` makes the device connect to the Unix
//!   socket `<uds_path>_P`.
//!
//! Every stream has its own credit in both directions: the device never sends the guest more
//! than it has room for, and buffers at most what it advertised for data on its way to a slow
//! host socket. Bytes the guest sent under that credit before shutting down its sending side
//! reach the host program even if the guest resets the connection afterwards (Linux's close
//! timeout; see [`conn::Connection::on_guest_reset`]). Host sockets are non-blocking and watched edge-triggered on the VMM's event
//! loop; socket registrations made while serving a queue notification (which has no access
//! to the event loop) are handed to the loop through an internal eventfd.
//!
//! Everything the guest sends is hostile input, and what it can make the host hold or do is
//! bounded:
//! - at most [`MAX_CONNECTIONS`] (128) connections, each buffering at most
//!   [`conn::CONN_BUF_ALLOC`] (256 KiB) towards the host and [`conn::FROM_HOST_MAX`] (64 KiB)
//!   towards the guest: [`MAX_BUFFERED_BYTES`] (40 MiB) per device;
//! - at most [`MAX_CONTROL_PACKETS`] (1024) resets waiting for receive buffers (more are
//!   dropped and counted);
//! - at most [`MAX_TX_CHAINS_PER_PASS`] / [`MAX_RX_CHAINS_PER_PASS`] (64) chains per pass over
//!   a queue, one packet (at most 64 KiB of payload) held at a time; a pass that stops with
//!   work left is continued from the internal eventfd, so the loop serves other devices in
//!   between and the work is finished without another guest notification;
//! - [`Timeouts`] (10 s each) for a host connection the guest does not answer, a connection
//!   whose last bytes do not move once neither side sends, and a host connection held back
//!   after a restore until the guest handles the transport reset.
//!
//! Host data for the guest is read from the host socket with one `readv(2)` into the
//! connection's ring buffer (`ring.rs`) whenever half of it is free, and copied from there
//! straight into the guest's receive descriptors, header and payload alike.
//!
//! The device ([`Vsock`], `device.rs`) owns the queues: it takes the guest's packets from the
//! transmit queue, fills the receive queue and sends the transport-reset event. The muxer
//! (`muxer.rs`) owns the host side: the connection table ([`conn`]), host programs waiting
//! to be connected, resets waiting for the guest, and the limits and timeouts above.

pub mod conn;
mod device;
mod muxer;
pub mod packet;
mod ring;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

pub use device::{
    parse_tx_chain, TxChainError, Vsock, EVENT_QUEUE, MAX_RX_CHAINS_PER_PASS,
    MAX_TX_CHAINS_PER_PASS, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
};
pub use muxer::{
    Timeouts, FIRST_HOST_PORT, MAX_BUFFERED_BYTES, MAX_CONNECTIONS, MAX_CONNECT_LINE,
    MAX_CONTROL_PACKETS, MAX_PENDING_HOST,
};

use crate::virtio::BACKEND_EVENT_BASE;

// Event-loop data values: the muxer's listener, timer and host sockets, and the device's
// wakeup eventfd.
const LISTENER_EVENT: u32 = BACKEND_EVENT_BASE;
const WAKE_EVENT: u32 = BACKEND_EVENT_BASE + 1;
const TIMER_EVENT: u32 = BACKEND_EVENT_BASE + 2;
const FIRST_SOCKET_EVENT: u32 = BACKEND_EVENT_BASE + 3;

/// Why a vsock device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("the guest CID {0} is reserved; use a CID from 3 to 4294967294")]
    InvalidCid(u64),
    #[error("the vsock socket path {} is in use by another program", .0.display())]
    InUse(PathBuf),
    #[error("the vsock socket path {} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot listen on the vsock socket {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot create the vsock device's wakeup eventfd: {0}")]
    EventFd(io::Error),
    #[error("cannot create the vsock device's timer: {0}")]
    Timer(io::Error),
    #[error("cannot look at the vsock socket {} after binding it: {source}", path.display())]
    Stat { path: PathBuf, source: io::Error },
}

/// Counters, shared with whoever reports metrics.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets put in the guest's receive queue.
    pub rx_packets: AtomicU64,
    /// Payload bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Packets taken from the guest's transmit queue.
    pub tx_packets: AtomicU64,
    /// Payload bytes from the guest accepted for host sockets.
    pub tx_bytes: AtomicU64,
    /// Malformed transmit chains or packets, dropped (and reset when they name a connection).
    pub malformed: AtomicU64,
    /// Unusable receive chains, returned empty.
    pub rx_errors: AtomicU64,
    /// Resets sent to the guest.
    pub resets_sent: AtomicU64,
    /// Connections established (either direction).
    pub connections_opened: AtomicU64,
    /// Connections removed.
    pub connections_closed: AtomicU64,
    /// Guest connections to `<uds_path>_<port>` that failed.
    pub connect_failures: AtomicU64,
    /// Host programs that sent no valid `CONNECT <port>` line.
    pub bad_connect_lines: AtomicU64,
    /// Guests that sent more than their credit.
    pub credit_violations: AtomicU64,
    /// Host socket errors that reset a connection.
    pub host_errors: AtomicU64,
    /// Resets for the guest dropped because [`MAX_CONTROL_PACKETS`] were already waiting.
    pub control_dropped: AtomicU64,
    /// Connections refused because [`MAX_CONNECTIONS`] were open (or, for host programs,
    /// [`MAX_PENDING_HOST`] waited).
    pub connections_refused: AtomicU64,
    /// Connections ended by one of the [`Timeouts`].
    pub timeouts: AtomicU64,
}

fn inc(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A connection's key: (host-side port, guest port).
pub type Key = (u32, u32);

#[cfg(test)]
mod tests;
