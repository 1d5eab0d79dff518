//! Inside the child, in its own mount namespace: making the jail root its root, with a fresh
//! /proc and a small tmpfs on /dev, and handing the root to the jail's user.

use std::ffi::CStr;
use std::os::fd::AsFd;

use rustix::fs::{AtFlags, Gid, Mode, OFlags, Uid};
use rustix::io::Errno;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use crate::devices::{make_nodes, Device};
use crate::error::{Context, Result};
use crate::tree::mode;

/// Make the jail root `root` the root of this process, which must be alone in a new mount
/// namespace: the mounts become private, `root` becomes a mount point (a bind mount of
/// itself), and the process pivots into it.
pub(crate) fn enter(root: &CStr) -> Result<()> {
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .cannot(|| "make the jail's mounts private".into())?;
    rustix::mount::mount_bind_recursive(root, root).cannot(|| "bind-mount the jail root".into())?;
    rustix::process::chdir(root).cannot(|| "enter the jail root".into())?;
    switch_root()
}

/// Make the current directory (the jail root, a mount point) the root: `pivot_root` and
/// drop the host's root; where the host's root cannot be pivoted away from (an initramfs),
/// move the jail root over / and chroot into it instead.
fn switch_root() -> Result<()> {
    rustix::fs::mkdir("old_root", mode(0o700))
        .cannot(|| "create the jail's old_root directory".into())?;
    if let Err(e) = rustix::process::pivot_root(".", "old_root") {
        let _ = rustix::fs::unlinkat(rustix::fs::CWD, "old_root", AtFlags::REMOVEDIR);
        if e != Errno::INVAL {
            return Err(e).cannot(|| "pivot_root into the jail".into());
        }
        return move_root();
    }
    rustix::process::chdir("/").cannot(|| "enter the jail root".into())?;
    rustix::mount::unmount("/old_root", UnmountFlags::DETACH)
        .cannot(|| "unmount the host's root in the jail".into())?;
    rustix::fs::unlinkat(rustix::fs::CWD, "/old_root", AtFlags::REMOVEDIR)
        .cannot(|| "remove the jail's old_root directory".into())
}

/// The fallback of [`switch_root`] for a host whose root is an initramfs.
fn move_root() -> Result<()> {
    rustix::mount::mount_move(".", "/").cannot(|| "move the jail root over /".into())?;
    rustix::process::chroot(".").cannot(|| "chroot into the jail".into())?;
    rustix::process::chdir("/").cannot(|| "enter the jail root".into())
}

/// Mount a fresh /proc (of the jail's PID namespace) in the jail.
pub(crate) fn mount_proc() -> Result<()> {
    rustix::mount::mount(
        "proc",
        "/proc",
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        None,
    )
    .cannot(|| "mount /proc in the jail".into())
}

/// Mount a small tmpfs on the jail's /dev (owned by root, in the jail's own mount
/// namespace) and make the device nodes in it for the jail's user.
pub(crate) fn mount_dev(devices: &[Device], uid: u32, gid: u32) -> Result<()> {
    rustix::mount::mount(
        "tmpfs",
        "/dev",
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        c"mode=755,size=64k",
    )
    .cannot(|| "mount a tmpfs on /dev in the jail".into())?;
    let dev = rustix::fs::open(
        "/dev",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .cannot(|| "open /dev in the jail".into())?;
    make_nodes(dev.as_fd(), devices, uid, gid)
}

/// Hand the jail root to the jail's user: the last of what root does in the jail tree.
pub(crate) fn hand_over(uid: u32, gid: u32) -> Result<()> {
    let root = rustix::fs::open(
        "/",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .cannot(|| "open the jail root".into())?;
    rustix::fs::fchown(&root, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .cannot(|| format!("hand the jail root to user {uid}"))
}
