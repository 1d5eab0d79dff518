//! Pseudo-terminals for commands that ask for one (see the protocol's *Terminals*): the
//! allocation of a pair from the `devpts` the command will see, its window size, the switch
//! of the command onto it (new session, controlling terminal) and the end of typed input.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use flint_agent::WindowSize;

use crate::describe;
use crate::in_root::Root;

/// The device number of `/dev/ptmx` (and of each `devpts`'s `ptmx`): major 5, minor 2.
const PTMX_MAJOR: u32 = 5;
const PTMX_MINOR: u32 = 2;

/// A pseudo-terminal pair: the master the agent reads and writes, the slave the command
/// gets as its stdin, stdout, stderr and controlling terminal.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Open a `ptmx` found at `path` inside `root` (or, with no root, at `path` of the agent's
/// own file system) as a new pseudo-terminal master. The path is first opened without
/// following it into a device (`O_PATH`) and checked to be the `ptmx` character device, so
/// that whatever a command planted there (a FIFO, another device) is never opened for real.
fn open_ptmx(root: Option<&Root>, path: &str) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_NOFOLLOW;
    let located = match root {
        Some(root) => root.open_at(Path::new(path), flags)?,
        None => {
            let c = std::ffi::CString::new(path)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: `c` is NUL-terminated and outlives the call; the result is checked.
            let raw = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: open returned a fresh descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(raw) }
        }
    };
    // SAFETY: `st` is plain old data the kernel fills; the descriptor is open.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(located.as_raw_fd(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        st
    };
    let is_ptmx = st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && libc::major(st.st_rdev) == PTMX_MAJOR
        && libc::minor(st.st_rdev) == PTMX_MINOR;
    if !is_ptmx {
        return Err(io::Error::other("not the ptmx device"));
    }
    // Reopen what was checked, not the path again.
    let again = std::ffi::CString::new(format!("/proc/self/fd/{}", located.as_raw_fd()))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `again` is NUL-terminated and outlives the call; the result is checked.
    let raw = unsafe {
        libc::open(
            again.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Unlock the master's slave and open it (through the master, without a path).
fn open_slave(master: &OwnedFd) -> io::Result<OwnedFd> {
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from a live local; the descriptor is open.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open(2) flags and returns a fresh descriptor, checked.
    let raw = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Allocate a pseudo-terminal of window size `size` for a command whose root is `root`
/// (its `/dev/pts/ptmx` first, so that the command finds its terminal in its `/dev/pts`;
/// the agent's own `/dev/ptmx` when that is not there), owned by `uid` when given. `Err`
/// is the message for the host.
pub fn allocate(root: Option<&Root>, size: WindowSize, uid: Option<u32>) -> Result<Pty, String> {
    let master = match root {
        Some(root) => {
            open_ptmx(Some(root), "/dev/pts/ptmx").or_else(|_| open_ptmx(None, "/dev/ptmx"))
        }
        None => open_ptmx(None, "/dev/ptmx"),
    }
    .map_err(|e| format!("cannot allocate a terminal (/dev/ptmx): {}", describe(&e)))?;
    let slave = open_slave(&master)
        .map_err(|e| format!("cannot open the terminal's slave: {}", describe(&e)))?;
    set_size(master.as_raw_fd(), size)
        .map_err(|e| format!("cannot set the terminal's size: {}", describe(&e)))?;
    if let Some(uid) = uid {
        // As login does: the user's terminal is theirs. Best effort (the command can use the
        // descriptors it is given either way).
        // SAFETY: fchown takes a descriptor and ids; -1 leaves the group.
        unsafe { libc::fchown(slave.as_raw_fd(), uid, libc::gid_t::MAX) };
    }
    Ok(Pty { master, slave })
}

/// Set the window size of the terminal whose master (or slave) is `fd`; the kernel sends
/// `SIGWINCH` to its foreground process group when it changes.
pub fn set_size(fd: RawFd, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a live local; the descriptor is open.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Make the calling process the leader of a new session whose controlling terminal is its
/// stdin (the slave): run in the child between `fork` and `exec`, before anything else of
/// the command's set-up (only system calls).
pub fn take_terminal() -> io::Result<()> {
    // SAFETY: setsid and ioctl take no pointers (TIOCSCTTY's argument is an integer).
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The bytes that end the typed input of the terminal whose master is `master`, after
/// `last` was the last byte typed: its end-of-file character, once when the input is at the
/// start of a line (nothing typed, or a line end last), twice otherwise (the first ends the
/// pending line); nothing when the terminal is not in canonical mode or has no such
/// character.
pub fn eof_bytes(master: RawFd, last: Option<u8>) -> Vec<u8> {
    // SAFETY: termios is plain old data the kernel fills; the descriptor is open.
    let tio = unsafe {
        let mut tio: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(master, &mut tio) != 0 {
            return Vec::new();
        }
        tio
    };
    let eof = tio.c_cc[libc::VEOF];
    if tio.c_lflag & libc::ICANON == 0 || eof == 0 {
        return Vec::new();
    }
    let line_ends = [
        b'\n',
        b'\r',
        eof,
        tio.c_cc[libc::VEOL],
        tio.c_cc[libc::VEOL2],
    ];
    match last {
        Some(b) if !line_ends.contains(&b) || b == 0 => vec![eof, eof],
        _ => vec![eof],
    }
}

/// Type the end of input on the terminal whose master is `master` (see [`eof_bytes`]).
pub fn type_eof(master: &mut File, last: Option<u8>) {
    let bytes = eof_bytes(master.as_raw_fd(), last);
    if !bytes.is_empty() {
        let _ = master.write_all(&bytes);
    }
}
