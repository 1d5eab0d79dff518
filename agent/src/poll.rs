//! Waiting for file descriptors to become readable, for the agent and for flint's front ends
//! (which wait for the VM's end, their API server or the agent client the same way).

use std::os::fd::AsRawFd;
use std::time::Duration;

/// Wait until one of `fds` is readable (data, end of file, an error or a hang-up), a signal
/// interrupts the wait, or `timeout` passes (`None`: no limit). It reports nothing: callers
/// look at their descriptors afterwards, and a descriptor that is not open only ends the wait.
pub fn wait_readable(fds: &[&dyn AsRawFd], timeout: Option<Duration>) {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout_ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    // SAFETY: `polls` is a valid, exclusively borrowed array of `polls.len()` pollfd structs
    // for the whole call; poll only reads and writes those, whatever the descriptors are.
    unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn waits_for_the_timeout_or_for_data() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (_c, d) = UnixStream::pair().unwrap();
        let began = Instant::now();
        wait_readable(&[&b, &d], Some(Duration::from_millis(50)));
        assert!(began.elapsed() >= Duration::from_millis(50));
        a.write_all(b"x").unwrap();
        let began = Instant::now();
        wait_readable(&[&d, &b], None);
        assert!(began.elapsed() < Duration::from_secs(10));
    }
}
