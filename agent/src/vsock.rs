//! Host-side `AF_VSOCK` connections, for VMMs whose vsock device is the kernel's vhost-vsock
//! (QEMU, Cloud Hypervisor): the host reaches guest port P of context id CID directly,
//! without flint's Unix-socket `CONNECT` handshake.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::client::{AgentClient, AgentError, Attempt};

/// Connect to the agent listening on vsock `port` of guest `cid`. Until `timeout` passes, a
/// guest that is still booting or has no agent listening yet is retried every
/// [`RETRY_INTERVAL`](crate::client::RETRY_INTERVAL), as [`AgentClient::connect`] does
/// through flint's socket.
pub fn connect_agent(cid: u32, port: u32, timeout: Duration) -> Result<AgentClient, AgentError> {
    AgentClient::connect_retrying(port, timeout, |deadline| {
        // One attempt waits at most 2 s for a guest whose vsock driver is not up yet.
        let attempt = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), Duration::from_secs(2));
        match connect(cid, port, attempt) {
            Ok(stream) => Ok(stream),
            Err(e) if worth_retrying(&e) => Err(Attempt::Retry(format!("last attempt: {e}"))),
            Err(e) => Err(Attempt::Fatal(AgentError::Io(e))),
        }
    })
}

/// Open a stream to guest `cid`, port `port`, waiting at most `timeout` for the guest to
/// answer.
///
/// The result is a [`UnixStream`] over the vsock socket: the client only reads, writes,
/// duplicates, times out and shuts down the stream, and those system calls behave the same
/// on any connected stream socket, whatever its family.
pub fn connect(cid: u32, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    // SAFETY: plain system call with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket this function just opened and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let stream = UnixStream::from(fd);
    // The connect timeout of a vsock socket is its own option, in a struct timeval.
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: `tv` is a valid timeval for the call and its size is passed with it.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: cid,
        svm_zero: [0; 4],
    };
    loop {
        // SAFETY: `addr` is a valid sockaddr_vm for the call and its size is passed with it.
        let rc = unsafe {
            libc::connect(
                stream.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` of linux/vm_sockets.h on 64-bit hosts (where its
/// `struct timeval` is the 64-bit one); libc does not define it.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

/// Whether a failed [`connect`] may succeed later: the guest is still booting (no vsock
/// driver yet: the connection times out or the host has no such CID yet) or nothing listens
/// on the port yet (reset).
pub fn worth_retrying(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNRESET
                | libc::ECONNREFUSED
                | libc::ETIMEDOUT
                | libc::EHOSTUNREACH
                | libc::ENODEV
                | libc::EINTR
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_guest_is_retried_or_refused_quickly() {
        // CID 0x7fff_fff0 belongs to no VM: without vsock support at all the socket cannot
        // be made; with it, the connection fails rather than hanging past the timeout.
        let start = std::time::Instant::now();
        match connect(0x7fff_fff0, 1234, Duration::from_millis(300)) {
            Ok(_) => panic!("connected to a VM that does not exist"),
            Err(e) => {
                let unsupported = matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EPERM | libc::EACCES)
                );
                assert!(
                    unsupported || worth_retrying(&e),
                    "unexpected error {e} for an absent guest"
                );
            }
        }
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
