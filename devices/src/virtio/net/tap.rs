//! A Linux TAP interface opened through `/dev/net/tun` (see the kernel's
//! `Documentation/networking/tuntap.rst`), with a 12-byte virtio-net header in front of every
//! frame in both directions.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

/// Longest interface name including the terminating NUL (`IFNAMSIZ`).
pub const IFNAMSIZ: usize = 16;
/// The virtio-net header length the TAP is set up for: `virtio_net_hdr_v1` with `num_buffers`.
pub const VNET_HDR_LEN: usize =
    std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>();

/// `TUNSETOFFLOAD` flags: what the kernel may hand us (and so the guest) un-checksummed or
/// un-segmented.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

const TUNTAP: std::os::raw::c_uint = 0x54;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, std::os::raw::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, std::os::raw::c_uint);
ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, std::os::raw::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, std::os::raw::c_int);

/// `struct ifreq` as far as the TUN ioctls use it: the name and the flags of the union.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// Why a TAP could not be opened or configured.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "the TAP name {0:?} is empty, longer than 15 bytes or contains '/', NUL or whitespace"
    )]
    InvalidName(String),
    #[error("cannot open /dev/net/tun for the TAP {name}: {source}")]
    OpenTun { name: String, source: io::Error },
    #[error("cannot create or attach to the TAP {name} (is it a TAP owned by someone else, or is CAP_NET_ADMIN missing?): {source}")]
    SetIff { name: String, source: io::Error },
    #[error("cannot set the virtio-net header size on the TAP {name}: {source}")]
    VnetHdrSize { name: String, source: io::Error },
    #[error("cannot set the offload flags on the TAP {name}: {source}")]
    Offload { name: String, source: io::Error },
}

/// An open TAP interface; non-blocking, frames prefixed with a 12-byte virtio-net header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

/// Whether `name` is usable as an interface name.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b == b':' || b.is_ascii_whitespace())
}

impl Tap {
    /// Attach to the TAP `name` if it exists (a persistent TAP made with `ip tuntap add`), or
    /// have the kernel create it. A TAP created here is not persistent: it disappears when
    /// the returned `Tap` is dropped.
    pub fn open_or_create(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let existed = Path::new("/sys/class/net").join(name).exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a properly sized and
        // aligned `#[repr(C)]` mirror of it (40 bytes) that lives across the call, and `file`
        // is an open /dev/net/tun descriptor.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len: std::os::raw::c_int = VNET_HDR_LEN as std::os::raw::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer; `hdr_len` outlives the
        // call and the descriptor is an attached TAP.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
        if ret < 0 {
            return Err(TapError::VnetHdrSize {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
            created: !existed,
        };
        // No offloads until the driver negotiated some.
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Tell the kernel which offloads the receiver (the guest) accepts (`TUN_F_*`).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret = unsafe {
            ioctl_with_val(
                &self.file,
                TUNSETOFFLOAD(),
                std::os::raw::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Offload {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the interface did not exist before (the kernel created it for us, and removes
    /// it again when this `Tap` is dropped).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The `IFF_*` flags the kernel reports for the attached interface.
    pub fn flags(&self) -> io::Result<i16> {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF fills a `struct ifreq`, which `req` mirrors and which outlives the
        // call.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, TUNGETIFF(), &mut req) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(req.flags)
    }

    /// Read one frame (header included) into `buf`. `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a valid, exclusively borrowed buffer of `buf.len()` bytes, the
            // only memory the kernel writes.
            let n =
                unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Read one frame (header included) scattered over `iovs`, in order. `WouldBlock` when none
    /// is queued.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is valid for writes for the whole call.
    pub unsafe fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let count = std::os::raw::c_int::try_from(iovs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: the caller guarantees each iovec is writable; `iovs` itself is a valid
            // slice of `count` entries.
            let n = unsafe { libc::readv(self.file.as_raw_fd(), iovs.as_ptr(), count) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Write one frame (header included) gathered from `iovs`.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is valid for reads for the whole call.
    pub unsafe fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let count = std::os::raw::c_int::try_from(iovs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: the caller guarantees each iovec is readable; `iovs` itself is a valid
            // slice of `count` entries.
            let n = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), count) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Write one frame (header included) from a buffer.
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the iovec describes `buf`, which is borrowed for the whole call.
        unsafe { self.writev(&[iov]) }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fail (never skip) when the test cannot create TAPs.
    pub fn require_tun() {
        assert!(
            Path::new("/dev/net/tun").exists(),
            "this test needs /dev/net/tun (load the tun module)"
        );
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test creates TAP interfaces and needs root (CAP_NET_ADMIN)"
        );
    }

    /// A fresh interface name for this test process.
    pub fn unique_name() -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!(
            "flt{}n{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn run(args: &[&str]) {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Bring `name` up without IPv6 (no autoconfiguration chatter on the wire).
    pub fn bring_up(name: &str) {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        run(&["ip", "link", "set", "dev", name, "up"]);
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "0123456789abcdef", "a b", "x\0", ".", "a:1"] {
            assert!(
                matches!(Tap::open_or_create(bad), Err(TapError::InvalidName(_))),
                "{bad:?}"
            );
        }
        let e = Tap::open_or_create("0123456789abcdef").unwrap_err();
        assert!(e.to_string().contains("0123456789abcdef"));
    }

    #[test]
    fn created_tap_is_removed_on_drop() {
        require_tun();
        let name = unique_name();
        let tap = Tap::open_or_create(&name).unwrap();
        assert!(tap.created());
        assert_eq!(tap.name(), name);
        let flags = tap.flags().unwrap();
        assert_eq!(
            flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR),
            IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        );
        assert!(Path::new("/sys/class/net").join(&name).exists());
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .unwrap();
        // Nothing queued: non-blocking read.
        let mut buf = [0u8; 2048];
        assert_eq!(
            tap.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(tap);
        assert!(!Path::new("/sys/class/net").join(&name).exists());
    }

    #[test]
    fn persistent_tap_is_attached_and_kept() {
        require_tun();
        let name = unique_name();
        run(&[
            "ip", "tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr",
        ]);
        let tap = Tap::open_or_create(&name);
        let ok = tap
            .as_ref()
            .map(|t| !t.created())
            .map_err(|e| e.to_string());
        drop(tap);
        let still_there = Path::new("/sys/class/net").join(&name).exists();
        run(&["ip", "tuntap", "del", "dev", &name, "mode", "tap"]);
        assert!(ok.unwrap(), "attached, not created");
        assert!(still_there);
    }

    #[test]
    fn non_tap_interface_is_refused() {
        require_tun();
        let e = Tap::open_or_create("lo").unwrap_err();
        assert!(matches!(e, TapError::SetIff { .. }), "{e}");
        assert!(e.to_string().contains("lo"));
    }
}
