//! The device nodes of the jail's own /dev: /dev/kvm always, /dev/net/tun and /dev/urandom
//! where the host has them.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Gid, Uid};

use crate::error::{Context, Result};
use crate::tree::{make_dir_at, mode};

/// A character device node the child makes in the jail's /dev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Device {
    /// Under /dev/net rather than /dev.
    pub in_net: bool,
    pub name: &'static CStr,
    pub major: u32,
    pub minor: u32,
    /// Its permission bits; the jail's user owns it.
    pub mode: u32,
}

const KVM: Device = Device {
    in_net: false,
    name: c"kvm",
    major: 10,
    minor: 232,
    mode: 0o660,
};
const TUN: Device = Device {
    in_net: true,
    name: c"tun",
    major: 10,
    minor: 200,
    mode: 0o660,
};
const URANDOM: Device = Device {
    in_net: false,
    name: c"urandom",
    major: 1,
    minor: 9,
    mode: 0o666,
};

/// The device nodes of the jail: /dev/kvm, and /dev/net/tun and /dev/urandom where the host
/// has them.
pub(crate) fn devices_for_host() -> Vec<Device> {
    devices(
        Path::new("/dev/net/tun").exists(),
        Path::new("/dev/urandom").exists(),
    )
}

/// The device nodes of a jail on a host that has `tun` and `urandom` or not.
fn devices(tun: bool, urandom: bool) -> Vec<Device> {
    let mut all = vec![KVM];
    if tun {
        all.push(TUN);
    }
    if urandom {
        all.push(URANDOM);
    }
    all
}

/// Make `devices` in the directory `dev` (and its new subdirectory `net`, mode 0755), each
/// with exactly its mode whatever the umask, owned by `uid`:`gid`.
pub(crate) fn make_nodes(
    dev: BorrowedFd<'_>,
    devices: &[Device],
    uid: u32,
    gid: u32,
) -> Result<()> {
    let net = make_dir_at(dev, c"net", 0o755, false, "/dev/net")?;
    let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    for d in devices {
        let (dir, shown) = if d.in_net {
            (net.as_fd(), "/dev/net/")
        } else {
            (dev, "/dev/")
        };
        let what = || {
            format!(
                "create the device {shown}{} in the jail",
                d.name.to_string_lossy()
            )
        };
        let node = rustix::fs::makedev(d.major, d.minor);
        rustix::fs::mknodat(dir, d.name, FileType::CharacterDevice, mode(d.mode), node)
            .cannot(what)?;
        // The umask may have taken bits away.
        rustix::fs::chmodat(dir, d.name, mode(d.mode), AtFlags::empty()).cannot(what)?;
        rustix::fs::chownat(dir, d.name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
            .cannot(what)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::tests::{message, require_root, with_umask, Scratch};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    #[test]
    fn the_nodes_are_those_of_the_host_kernel() {
        assert_eq!(devices(false, false), [KVM]);
        assert_eq!(devices(true, true), [KVM, TUN, URANDOM]);
        assert_eq!(devices(false, true), [KVM, URANDOM]);
        // The numbers Linux gives these devices (Documentation/admin-guide/devices.txt).
        let host = devices_for_host();
        for d in &host {
            let path = if d.in_net {
                Path::new("/dev/net").join(d.name.to_str().unwrap())
            } else {
                Path::new("/dev").join(d.name.to_str().unwrap())
            };
            let Ok(meta) = std::fs::metadata(&path) else {
                // /dev/kvm is in the table whether or not this host has it.
                assert_eq!(*d, KVM);
                continue;
            };
            assert!(meta.file_type().is_char_device(), "{path:?}");
            assert_eq!(meta.rdev(), libc::makedev(d.major, d.minor), "{path:?}");
        }
        assert_eq!(KVM.mode, 0o660);
        assert_eq!(TUN.mode, 0o660);
        assert_eq!(URANDOM.mode, 0o666);
    }

    #[test]
    fn nodes_get_their_mode_and_the_jail_user() {
        require_root();
        let dev = Scratch::new("dev");
        let fd = dev.open();
        let made = with_umask(0o077, || {
            make_nodes(fd.as_fd(), &[KVM, TUN, URANDOM], 10123, 10124)
        });
        made.unwrap();
        for (path, d) in [("kvm", KVM), ("net/tun", TUN), ("urandom", URANDOM)] {
            let meta = std::fs::symlink_metadata(dev.0.join(path)).unwrap();
            assert!(meta.file_type().is_char_device(), "{path}");
            assert_eq!(meta.rdev(), libc::makedev(d.major, d.minor), "{path}");
            assert_eq!(meta.mode() & 0o7777, d.mode, "{path}");
            assert_eq!((meta.uid(), meta.gid()), (10123, 10124), "{path}");
        }
        let net = std::fs::metadata(dev.0.join("net")).unwrap();
        assert_eq!((net.uid(), net.mode() & 0o7777), (0, 0o755));
        // A second time: the net directory is there, refused rather than reused.
        assert_eq!(
            message(make_nodes(fd.as_fd(), &[], 1, 1)),
            "cannot create the jail directory /dev/net: File exists"
        );
        std::fs::remove_dir(dev.0.join("net/tun")).unwrap_err();
        std::fs::remove_file(dev.0.join("net/tun")).unwrap();
        std::fs::remove_dir(dev.0.join("net")).unwrap();
        assert_eq!(
            message(make_nodes(fd.as_fd(), &[KVM], 1, 1)),
            "cannot create the device /dev/kvm in the jail: File exists"
        );
    }
}
