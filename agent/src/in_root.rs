//! Another root directory (a container image's, [`flint_agent::protocol::IMAGE_ROOT`]): its
//! paths resolved as a process whose root directory it is resolves them, with `openat2`'s
//! `RESOLVE_IN_ROOT`: `..` stops at the root and absolute symbolic links start from it, so
//! nothing the commands plant inside it makes the agent reach a file outside it; and the
//! switch of a command into it (root directory, working directory, credentials).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use flint_agent::UserSpec;

/// How often a resolution that raced with a rename somewhere in the root is retried.
const EAGAIN_RETRIES: usize = 16;

/// An open root directory.
pub struct Root {
    fd: OwnedFd,
}

impl Root {
    /// Open the directory `path` (a path of the agent's own file system).
    pub fn open(path: &str) -> io::Result<Root> {
        let c = cstring(path.as_bytes())?;
        // SAFETY: `c` is a NUL-terminated string that outlives the call; the result is
        // checked.
        let raw = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: open returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Root { fd })
    }

    /// The root directory's descriptor.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Open `path` (inside the root) with the `open(2)` `flags` (close-on-exec is added).
    /// Symbolic links are followed, inside the root; `/proc`'s magic links are not.
    pub fn open_at(&self, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
        let c = cstring(path.as_os_str().as_bytes())?;
        // SAFETY: open_how is plain old data for which all zeroes is a valid value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        for _ in 0..EAGAIN_RETRIES {
            // SAFETY: `c` is a NUL-terminated string and `how` an open_how whose size is
            // passed; both outlive the call, which only reads them. The result is checked.
            let raw = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    std::ptr::addr_of!(how),
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if raw >= 0 {
                // SAFETY: openat2 returned a fresh descriptor that nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
        }
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }

    /// The directory `path` (inside the root), as an `O_PATH` descriptor.
    pub fn open_dir(&self, path: &Path) -> io::Result<OwnedFd> {
        self.open_at(path, libc::O_PATH | libc::O_DIRECTORY)
    }

    /// The directory `path` (inside the root), created with its missing parents (mode 0755
    /// less the umask) when it does not exist.
    pub fn create_dir_all(&self, path: &Path) -> io::Result<OwnedFd> {
        match self.open_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let mut prefix = PathBuf::from("/");
        let mut dir = self.open_dir(&prefix)?;
        for component in path.components() {
            let name = match component {
                Component::Normal(name) => Some(name),
                Component::ParentDir => None,
                Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
            };
            prefix.push(component);
            dir = match self.open_dir(&prefix) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let Some(name) = name else { return Err(e) };
                    let c = cstring(name.as_bytes())?;
                    // SAFETY: `c` is a NUL-terminated string that outlives the call and `dir`
                    // an open descriptor.
                    let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) };
                    if rc != 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::AlreadyExists {
                            return Err(e);
                        }
                    }
                    self.open_dir(&prefix)?
                }
                other => other?,
            };
        }
        Ok(dir)
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the path contains a NUL byte"))
}

/// Switch the calling process into `root` (with the working directory `cwd`, a directory
/// inside it) and to `user`'s credentials, in that order: run in the child between `fork`
/// and `exec` (only system calls, nothing that allocates or locks).
///
/// The system calls are made directly rather than through the C library's wrappers, which
/// in a multithreaded program coordinate all threads: the child has only this one.
pub fn enter(root: Option<(RawFd, RawFd)>, user: Option<&UserSpec>) -> io::Result<()> {
    let check = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    if let Some((root, cwd)) = root {
        // SAFETY: fchdir and chroot take a descriptor or a NUL-terminated literal; no
        // memory is handed over beyond the call.
        unsafe {
            check(libc::fchdir(root).into())?;
            check(libc::chroot(c".".as_ptr()).into())?;
            check(libc::fchdir(cwd).into())?;
        }
    }
    if let Some(user) = user {
        let (uid, gid) = (user.uid as libc::uid_t, user.gid as libc::gid_t);
        // SAFETY: `groups` is a slice of gid_t (u32) of the length passed that outlives the
        // call, which only reads it; the other calls take plain integers.
        unsafe {
            check(libc::syscall(
                libc::SYS_setgroups,
                user.groups.len(),
                user.groups.as_ptr(),
            ))?;
            check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
            check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
        }
    }
    Ok(())
}
