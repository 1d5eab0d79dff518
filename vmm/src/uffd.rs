//! Lazy restore through a page-fault handler: the `Uffd` memory backend of a snapshot load.
//!
//! Guest memory is mapped as anonymous private memory and registered with a userfaultfd for
//! missing-page faults. flint connects to the handler's Unix socket and sends one message: the
//! JSON array of its guest memory regions ([`RegionMapping`]: where each one is in flint's
//! address space, how long it is, where its contents start in the snapshot memory file, its
//! page size), with the userfaultfd as `SCM_RIGHTS` ancillary data. From then on the handler
//! fills each page the guest (or flint) first touches, typically with `UFFDIO_COPY` of the page
//! from the memory file, which flint never opens.
//!
//! flint keeps its own copy of the userfaultfd and the connection open for as long as the VM
//! lives. A thread of its own ([`Watch`]) waits for the handler to go away (the connection
//! ends) and then ends the VM ([`Ending::PageFaultHandlerGone`]): no page could be filled any
//! more, and a guest touching one would wait forever. If the thread that owns the VM does not
//! stop it within [`GRACE`] (it waits itself on a page no one will fill), the watch thread
//! ends the process with the same sentence.
//!
//! The kernel interface (the `ioctl`s, their structures and the fault message) is written out
//! here, as `<linux/userfaultfd.h>` defines it: `libc` does not have it, and the crate that
//! binds it generates its bindings with `bindgen` at build time. The example handler in
//! `vmm/src/bin/flint-uffd-handler.rs` uses the same definitions.

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{Ending, Endings};
use arch::GuestMemoryMmap;

/// `UFFD_API`: the only version of the interface.
pub const UFFD_API: u64 = 0xaa;
/// `_IOWR(0xaa, 0x3f, struct uffdio_api)`.
pub const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xaa, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `_IOWR(0xaa, 0x03, struct uffdio_copy)`.
pub const UFFDIO_COPY: u64 = 0xc028_aa03;
/// `_IOWR(0xaa, 0x04, struct uffdio_zeropage)`.
pub const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
/// Register for faults on pages not present yet.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// The event of a [`UffdMsg`] that is a page fault.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffd_msg`, as read from a userfaultfd; for a page fault, `arg[0]` holds the flags
/// and `arg[1]` the faulting address.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);

/// One guest memory region as the handler is told of it (Firecracker's message format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionMapping {
    /// Where the region starts in flint's address space.
    pub base_host_virt_addr: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where its contents start in the snapshot memory file.
    pub offset: u64,
    /// The size of the pages backing it, in bytes.
    pub page_size: u64,
    /// The same in KiB, as older Firecracker versions sent it.
    pub page_size_kib: u64,
}

/// The most regions a message may describe (flint sends one or two).
pub const MAX_REGIONS: usize = 64;
/// The longest message a handler needs to accept.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Why a message of regions is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("the message is longer than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("the message is not a JSON array of guest memory regions: {0}")]
    Json(String),
    #[error("the message describes no guest memory region")]
    Empty,
    #[error("the message describes more than {MAX_REGIONS} guest memory regions")]
    TooMany,
    #[error(
        "guest memory region {0} has a page size that is not a power of two of at least 4096 bytes"
    )]
    PageSize(usize),
    #[error("guest memory region {0} is empty or not a whole number of its pages, or is not page-aligned")]
    Size(usize),
    #[error(
        "guest memory region {0} extends past the end of the address space or the memory file"
    )]
    Overflow(usize),
}

/// The message describing `mem`, whose pages are `page_size` bytes: its regions in address
/// order, laid out back to back in the memory file as a snapshot writes them.
pub fn encode(mem: &GuestMemoryMmap, page_size: u64) -> Vec<u8> {
    let mut offset = 0;
    let regions: Vec<RegionMapping> = mem
        .iter()
        .map(|r| {
            let mapping = RegionMapping {
                base_host_virt_addr: r.as_ptr() as u64,
                size: r.len(),
                offset,
                page_size,
                page_size_kib: page_size / 1024,
            };
            offset += r.len();
            mapping
        })
        .collect();
    // Serialising plain numbers cannot fail.
    serde_json::to_vec(&regions).unwrap_or_default()
}

/// The regions of a message, checked: at most [`MAX_REGIONS`], each a whole number of
/// page-aligned pages that fits in the address space and, with its offset, in a memory file of
/// `file_len` bytes.
pub fn parse(message: &[u8], file_len: u64) -> Result<Vec<RegionMapping>, MessageError> {
    if message.len() > MAX_MESSAGE {
        return Err(MessageError::TooLong);
    }
    let regions: Vec<RegionMapping> =
        serde_json::from_slice(message).map_err(|e| MessageError::Json(e.to_string()))?;
    if regions.is_empty() {
        return Err(MessageError::Empty);
    }
    if regions.len() > MAX_REGIONS {
        return Err(MessageError::TooMany);
    }
    for (i, r) in regions.iter().enumerate() {
        if r.page_size < 4096 || !r.page_size.is_power_of_two() {
            return Err(MessageError::PageSize(i));
        }
        if r.size == 0 || r.size % r.page_size != 0 || r.base_host_virt_addr % r.page_size != 0 {
            return Err(MessageError::Size(i));
        }
        let in_file = r.offset.checked_add(r.size).is_some_and(|e| e <= file_len);
        if r.base_host_virt_addr.checked_add(r.size).is_none() || !in_file {
            return Err(MessageError::Overflow(i));
        }
    }
    Ok(regions)
}

/// `USERFAULTFD_IOC_NEW`: `_IO(0xaa, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;
/// The device that hands out userfaultfds to whoever may open it (Linux 6.1 and later).
const USERFAULTFD_DEVICE: &str = "/dev/userfaultfd";

/// A new userfaultfd from the system call or, when that is not permitted (an unprivileged
/// process on a host with `vm.unprivileged_userfaultfd=0`), from [`USERFAULTFD_DEVICE`].
fn new_userfaultfd() -> std::io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd system call takes flags only and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: `fd` is a descriptor the kernel just created for this process alone.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let denied = std::io::Error::last_os_error();
    if denied.raw_os_error() != Some(libc::EPERM) {
        return Err(denied);
    }
    let Ok(device) = std::fs::File::options()
        .read(true)
        .write(true)
        .open(USERFAULTFD_DEVICE)
    else {
        return Err(denied);
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as its argument and
    // returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(device.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor the kernel just created for this process alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A userfaultfd (see [`new_userfaultfd`]): its API version agreed, non-blocking and closed
/// on exec.
pub fn create() -> std::io::Result<OwnedFd> {
    let fd = new_userfaultfd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `api` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Register `len` bytes at `start` with `uffd` for missing-page faults.
fn register(uffd: &OwnedFd, start: u64, len: u64) -> std::io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes exactly one `struct uffdio_register`; it changes
    // how faults in the range are served, never what memory is mapped there.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Send `message` on `stream` with `fd` as `SCM_RIGHTS` ancillary data.
pub fn send_with_fd(stream: &UnixStream, message: &[u8], fd: RawFd) -> std::io::Result<()> {
    const SPACE: usize = 64;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    assert!(space <= SPACE);
    let mut control = [0u64; SPACE / 8];
    let mut iov = [IoSlice::new(message)];
    // SAFETY: an all-zero msghdr is valid (no name, no buffers).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` has a control buffer of `space` bytes, room for one header with one
    // descriptor; CMSG_FIRSTHDR returns its start, and CMSG_DATA the data inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    let mut sent = 0;
    while sent < message.len() {
        // SAFETY: `msg` points at live buffers (`iov`, `control`) for the whole call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
        if sent < message.len() {
            // The descriptor went with the first part; the rest goes as plain data.
            use std::io::Write;
            let mut s = stream;
            s.write_all(&message[sent..])?;
            sent = message.len();
        }
    }
    Ok(())
}

/// Why guest memory could not be handed to a page-fault handler.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd for guest memory ({0}); flint needs CAP_SYS_PTRACE, read-write access to /dev/userfaultfd or vm.unprivileged_userfaultfd=1 for the Uffd memory backend")]
    Create(std::io::Error),
    #[error("cannot register guest memory with the userfaultfd: {0}")]
    Register(std::io::Error),
    #[error("cannot connect to the page-fault handler's socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot send guest memory's regions to the page-fault handler at {}: {source}", path.display())]
    Send {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A page-fault handler serving guest memory: flint's copy of the userfaultfd and its
/// connection to the handler.
pub struct Handler {
    path: PathBuf,
    uffd: OwnedFd,
    stream: UnixStream,
}

/// Register every region of `mem` (of `page_size`-byte pages) with a new userfaultfd, connect
/// to the handler listening on `path` and send it the regions and the userfaultfd.
pub fn hand_over(mem: &GuestMemoryMmap, page_size: u64, path: &Path) -> Result<Handler, UffdError> {
    let uffd = create().map_err(UffdError::Create)?;
    for region in mem.iter() {
        register(&uffd, region.as_ptr() as u64, region.len()).map_err(UffdError::Register)?;
    }
    let stream = UnixStream::connect(path).map_err(|source| UffdError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    send_with_fd(&stream, &encode(mem, page_size), uffd.as_raw_fd()).map_err(|source| {
        UffdError::Send {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(Handler {
        path: path.to_path_buf(),
        uffd,
        stream,
    })
}

/// How long the watch thread waits, after reporting that the handler went away, for the VM's
/// owner to stop it before ending the process itself.
pub const GRACE: Duration = Duration::from_secs(3);

/// The thread watching a page-fault handler's connection; stopping it (dropping it) closes
/// flint's userfaultfd and the connection.
pub struct Watch {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    /// Watch `handler`'s connection; when it ends, report
    /// [`Ending::PageFaultHandlerGone`] to `endings`.
    pub fn start(handler: Handler, endings: Arc<Endings>) -> std::io::Result<Watch> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_thread = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("uffd-watch".into())
            .spawn(move || watch(handler, &stop_thread, &endings))?;
        Ok(Watch {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Wait until `fds` (at most 2) may be read; returns which.
fn wait(fds: &[RawFd], timeout_ms: i32) -> Vec<bool> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        })
        .collect();
    // SAFETY: `polls` is a live array of `polls.len()` pollfds for the whole call.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as _, timeout_ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    polls.iter().map(|p| p.revents != 0).collect()
}

fn watch(handler: Handler, stop: &EventFd, endings: &Endings) {
    if let Err(e) = crate::seccomp::Filter::uffd_watch().install() {
        endings.report(Ending::Fault {
            vcpu: 0,
            reason: e.to_string(),
        });
        return;
    }
    let mut stream = &handler.stream;
    let mut buf = [0u8; 256];
    loop {
        let ready = wait(&[stop.as_raw_fd(), handler.stream.as_raw_fd()], -1);
        if ready[0] {
            return;
        }
        if ready[1] {
            // The handler has nothing to say: what it sends is read and dropped, a bounded
            // amount at a time; the end of the connection is what matters.
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        }
    }
    let gone = crate::Error::PageFaultHandlerGone(handler.path.clone());
    endings.report(Ending::PageFaultHandlerGone(handler.path.clone()));
    // The VM's owner stops the VM and drops this watch; if it cannot (it waits on a page no
    // one will fill), nothing else will end the process.
    if !wait(&[stop.as_raw_fd()], GRACE.as_millis() as i32)[0] {
        eprintln!("flint: {gone}");
        // SAFETY: _exit ends the process at once; nothing of this thread is used afterwards.
        unsafe { libc::_exit(1) };
    }
    drop(handler.uffd);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HugePages;

    #[test]
    fn the_message_lists_every_region_back_to_back_in_the_file() {
        let mem = crate::memory::create(4 << 30, HugePages::None).unwrap();
        let message = encode(&mem, 4096);
        let value: serde_json::Value = serde_json::from_slice(&message).unwrap();
        let regions = value.as_array().unwrap();
        assert_eq!(regions.len(), 2);
        let low = mem.iter().next().unwrap();
        let high = mem.iter().nth(1).unwrap();
        assert_eq!(
            regions[0],
            serde_json::json!({
                "base_host_virt_addr": low.as_ptr() as u64,
                "size": low.len(),
                "offset": 0,
                "page_size": 4096,
                "page_size_kib": 4,
            })
        );
        assert_eq!(regions[1]["offset"], low.len());
        assert_eq!(regions[1]["size"], high.len());
        assert_eq!(regions[1]["base_host_virt_addr"], high.as_ptr() as u64);
        // And a handler reads back what flint sent.
        let parsed = parse(&message, 4 << 30).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].offset + parsed[1].size, 4 << 30);
    }

    #[test]
    fn hostile_messages_are_refused() {
        let region = |addr: u64, size: u64, offset: u64, page: u64| {
            format!(
                r#"{{"base_host_virt_addr":{addr},"size":{size},"offset":{offset},"page_size":{page},"page_size_kib":{}}}"#,
                page / 1024
            )
        };
        let one = |r: String| format!("[{r}]").into_bytes();
        let file = 1 << 20;
        assert!(parse(&one(region(0x1000, 0x2000, 0, 4096)), file).is_ok());
        assert_eq!(parse(b"[]", file), Err(MessageError::Empty));
        assert!(matches!(parse(b"{}", file), Err(MessageError::Json(_))));
        assert!(matches!(
            parse(b"[{\"size\": 1}]", file),
            Err(MessageError::Json(_))
        ));
        let many = format!(
            "[{}]",
            vec![region(0x1000, 0x1000, 0, 4096); MAX_REGIONS + 1].join(",")
        );
        assert_eq!(parse(many.as_bytes(), file), Err(MessageError::TooMany));
        assert_eq!(
            parse(&vec![b' '; MAX_MESSAGE + 1], file),
            Err(MessageError::TooLong)
        );
        for page in [0, 1000, 2048, 4097] {
            assert_eq!(
                parse(&one(region(0x1000, 0x2000, 0, page)), file),
                Err(MessageError::PageSize(0))
            );
        }
        assert_eq!(
            parse(&one(region(0x1000, 0x1800, 0, 4096)), file),
            Err(MessageError::Size(0))
        );
        assert_eq!(
            parse(&one(region(0x1800, 0x1000, 0, 4096)), file),
            Err(MessageError::Size(0))
        );
        assert_eq!(
            parse(&one(region(0x1000, 0, 0, 4096)), file),
            Err(MessageError::Size(0))
        );
        // Past the file, past the address space, offsets that overflow.
        assert_eq!(
            parse(&one(region(0x1000, 0x2000, file - 0x1000, 4096)), file),
            Err(MessageError::Overflow(0))
        );
        assert_eq!(
            parse(&one(region(u64::MAX - 0xfff, 0x2000, 0, 4096)), u64::MAX),
            Err(MessageError::Overflow(0))
        );
        assert_eq!(
            parse(
                &one(region(0x1000, 0x2000, u64::MAX - 0xfff, 4096)),
                u64::MAX
            ),
            Err(MessageError::Overflow(0))
        );
        // Negative or fractional numbers are not numbers of bytes.
        assert!(matches!(
            parse(
                br#"[{"base_host_virt_addr":-4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#,
                file
            ),
            Err(MessageError::Json(_))
        ));
    }
}
