//! An example page-fault handler for flint's lazy restore (`PUT /snapshot/load` with
//! `mem_backend` `{"backend_type": "Uffd", "backend_path": SOCKET}`).
//!
//! `flint-uffd-handler SOCKET MEMORY_FILE` listens on the Unix socket SOCKET, accepts one
//! flint, receives its guest memory regions (a JSON array, see `vmm::uffd::RegionMapping`)
//! with the userfaultfd as `SCM_RIGHTS` ancillary data, maps MEMORY_FILE (the snapshot's memory
//! file) read-only and fills each page the guest first touches: with `UFFDIO_COPY` of that
//! page of the file, or `UFFDIO_ZEROPAGE` where the file's page is all zeros. It exits when
//! flint closes the connection. The message is checked before anything is mapped: at most
//! `vmm::uffd::MAX_MESSAGE` bytes and `vmm::uffd::MAX_REGIONS` regions, each within the file.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;

use vmm::uffd::{self, RegionMapping, UffdMsg};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: flint-uffd-handler SOCKET MEMORY_FILE");
        return ExitCode::from(2);
    }
    match serve(&args[1], &args[2]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flint-uffd-handler: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The snapshot memory file, mapped read-only.
struct Mapping {
    addr: *const u8,
    len: usize,
}

impl Mapping {
    fn new(file: &std::fs::File, len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a new read-only shared mapping of `len` bytes of `file`; the kernel picks
        // the address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: addr.cast(),
            len,
        })
    }

    /// `len` bytes at `offset` (checked by the caller to be within the mapping).
    fn slice(&self, offset: u64, len: u64) -> &[u8] {
        assert!(offset
            .checked_add(len)
            .is_some_and(|e| e <= self.len as u64));
        // SAFETY: the range is within the mapping, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.addr.add(offset as usize), len as usize) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `new` made; no slice of it outlives `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len.max(1)) };
    }
}

fn serve(socket: &str, memory_file: &str) -> Result<(), String> {
    let file = std::fs::File::open(memory_file)
        .map_err(|e| format!("cannot open the memory file {memory_file}: {e}"))?;
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot read the memory file {memory_file}: {e}"))?
        .len();
    let listener =
        UnixListener::bind(socket).map_err(|e| format!("cannot listen on {socket}: {e}"))?;
    let (stream, _) = listener
        .accept()
        .map_err(|e| format!("cannot accept a connection on {socket}: {e}"))?;
    let (message, uffd) =
        receive(&stream).map_err(|e| format!("cannot receive guest memory's regions: {e}"))?;
    let uffd = uffd.ok_or("flint sent no userfaultfd with its regions")?;
    let regions = uffd::parse(&message, file_len).map_err(|e| e.to_string())?;
    let mapping = Mapping::new(&file, file_len as usize)
        .map_err(|e| format!("cannot map the memory file {memory_file}: {e}"))?;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfds for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("cannot wait for page faults: {e}"));
        }
        if fds[1].revents != 0 {
            // flint went away: nothing left to serve.
            return Ok(());
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return Ok(());
        }
        if fds[0].revents & libc::POLLIN != 0 {
            while let Some(msg) = read_msg(&uffd)? {
                if msg.event == uffd::UFFD_EVENT_PAGEFAULT {
                    serve_fault(&uffd, &regions, &mapping, msg.arg[1])?;
                }
            }
        }
    }
}

/// The next message of the userfaultfd, if one is waiting.
fn read_msg(uffd: &OwnedFd) -> Result<Option<UffdMsg>, String> {
    let mut msg = UffdMsg::default();
    // SAFETY: reading at most one `struct uffd_msg` into `msg`, which is one.
    let n = unsafe {
        libc::read(
            uffd.as_raw_fd(),
            (&mut msg as *mut UffdMsg).cast(),
            std::mem::size_of::<UffdMsg>(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(format!("cannot read the userfaultfd: {e}")),
        };
    }
    if n as usize != std::mem::size_of::<UffdMsg>() {
        return Ok(None);
    }
    Ok(Some(msg))
}

/// Fill the page at `address` from the memory file.
fn serve_fault(
    uffd: &OwnedFd,
    regions: &[RegionMapping],
    mapping: &Mapping,
    address: u64,
) -> Result<(), String> {
    let Some(region) = regions
        .iter()
        .find(|r| address >= r.base_host_virt_addr && address - r.base_host_virt_addr < r.size)
    else {
        return Err(format!("a page fault at {address:#x} is in no region"));
    };
    let page = address & !(region.page_size - 1);
    let offset = region.offset + (page - region.base_host_virt_addr);
    let data = mapping.slice(offset, region.page_size);
    let zero = region.page_size == 4096 && data.iter().all(|&b| b == 0);
    let (rc, what) = if zero {
        let mut z = uffd::UffdioZeropage {
            range: uffd::UffdioRange {
                start: page,
                len: region.page_size,
            },
            ..Default::default()
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `struct uffdio_zeropage`; it fills a
        // page of flint's registered memory, never this process's.
        let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), uffd::UFFDIO_ZEROPAGE as _, &mut z) };
        (rc, "UFFDIO_ZEROPAGE")
    } else {
        let mut copy = uffd::UffdioCopy {
            dst: page,
            src: data.as_ptr() as u64,
            len: region.page_size,
            ..Default::default()
        };
        // SAFETY: UFFDIO_COPY reads and writes one `struct uffdio_copy`; it reads
        // `page_size` bytes at `src`, which `data` holds, and fills a page of flint's
        // registered memory.
        let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), uffd::UFFDIO_COPY as _, &mut copy) };
        (rc, "UFFDIO_COPY")
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        // EEXIST: filled meanwhile (another thread faulted on it too); EAGAIN: the mapping
        // changed, the fault is retried.
        match e.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::EAGAIN) => {}
            _ => return Err(format!("{what} at {page:#x} failed: {e}")),
        }
    }
    Ok(())
}

/// One message of at most `MAX_MESSAGE` bytes, with the descriptor it carries if any.
fn receive(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; uffd::MAX_MESSAGE + 1];
    let mut control = [0u64; 8];
    let mut iov = [IoSliceMut::new(&mut buf)];
    // SAFETY: an all-zero msghdr is valid (no name, no buffers).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at live buffers (`iov`, `control`) for the whole call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into `control`, within
    // `msg_controllen`, with the CMSG macros; an SCM_RIGHTS message's data is descriptors.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw: RawFd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                // Only the first one is kept; any more are closed.
                if fd.is_none() {
                    fd = Some(OwnedFd::from_raw_fd(raw));
                } else {
                    drop(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let n = n as usize;
    buf.truncate(n);
    Ok((buf, fd))
}
