//! Directory walks relative to an open directory that never follow a symbolic link.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};

/// Why a walk below a directory stopped.
#[derive(Debug)]
pub(crate) enum WalkError {
    /// A component is a symbolic link or not a directory.
    NotDirectory(String),
    /// A component does not exist (and was not to be created).
    Missing(String),
    Io(io::Error),
}

/// Opens directory `dir` (an `O_PATH` descriptor) for each name in turn, never following a
/// symbolic link; with `create`, missing directories are made (mode 0755, owned by the caller).
/// The names are single path components (no `/`, no `..`: the caller checked).
pub(crate) fn walk_dirs<'a>(
    root: &impl AsFd,
    names: impl IntoIterator<Item = &'a OsStr>,
    create: bool,
    created: &mut u64,
) -> Result<OwnedFd, WalkError> {
    let mut cur =
        rfs::openat(root, ".", dir_flags(), Mode::empty()).map_err(|e| WalkError::Io(e.into()))?;
    for name in names {
        debug_assert!(!name.as_bytes().contains(&b'/') && name != ".." && name != ".");
        let next = match rfs::openat(&cur, name, dir_flags(), Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) if create => {
                match rfs::mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) => *created += 1,
                    Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(WalkError::Io(e.into())),
                }
                rfs::openat(&cur, name, dir_flags(), Mode::empty())
                    .map_err(|e| classify(e, name))?
            }
            Err(e) => return Err(classify(e, name)),
        };
        cur = next;
    }
    Ok(cur)
}

fn dir_flags() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn classify(e: rustix::io::Errno, name: &OsStr) -> WalkError {
    let n = name.to_string_lossy().into_owned();
    match e {
        rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP => WalkError::NotDirectory(n),
        rustix::io::Errno::NOENT => WalkError::Missing(n),
        e => WalkError::Io(e.into()),
    }
}

/// Removes `name` in `dir` and, if it is a directory, everything below it, never following a
/// symbolic link.
pub(crate) fn remove_all_at(dir: &impl AsFd, name: &OsStr) -> io::Result<()> {
    let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory {
        let fd = rfs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        clear_dir(&fd)?;
        rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rfs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}

/// Removes everything in the open directory `fd` except the names `keep` accepts.
pub(crate) fn clear_dir_except(fd: &OwnedFd, keep: &dyn Fn(&OsStr) -> bool) -> io::Result<()> {
    for name in list_dir(fd)? {
        if !keep(&name) {
            remove_all_at(fd, &name)?;
        }
    }
    Ok(())
}

fn clear_dir(fd: &OwnedFd) -> io::Result<()> {
    clear_dir_except(fd, &|_| false)
}

/// The names in an open directory, without `.` and `..`.
pub(crate) fn list_dir(fd: &OwnedFd) -> io::Result<Vec<std::ffi::OsString>> {
    let dup = rfs::openat(
        fd,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in rfs::Dir::read_from(&dup)? {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(names)
}
