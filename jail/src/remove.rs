//! Removing the jail directory, whatever the jailed flint left in it: symbolic links out of
//! its root are removed, never followed, and trees of any depth are removed with a bounded
//! number of open descriptors.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, Dir, RenameFlags};
use rustix::io::Errno;

use crate::tree::open_dir_at;

/// How many directories deep [`remove_tree`] goes before it moves what is below up to the
/// top of the tree, so that it never holds more descriptors than this.
pub(crate) const REMOVE_DEPTH: usize = 32;

/// Remove `name` in `parent` and everything in it, without following symbolic links and
/// with at most [`REMOVE_DEPTH`] directories open however deep the tree is: a directory
/// found that deep is first moved up to the top of the tree (under a new name). A link or a
/// file named `name` is removed itself; nothing there is nothing to do.
pub(crate) fn remove_tree(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    remove_tree_within(parent, name, REMOVE_DEPTH)
}

/// [`remove_tree`] with at most `max_depth` (at least 2: the top and one below, whose
/// subdirectories are moved up) directories open.
fn remove_tree_within(parent: BorrowedFd<'_>, name: &CStr, max_depth: usize) -> io::Result<()> {
    debug_assert!(max_depth >= 2);
    let top = match open_dir_at(parent, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::NOTDIR | Errno::LOOP) => {
            return Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?)
        }
        Err(e) => return Err(e.into()),
    };
    /// One open directory: its name in the one above, and whether an entry was seen in it
    /// since it was last read from the start.
    struct Level {
        dir: Dir,
        name: CString,
        seen: bool,
    }
    let open = |fd: OwnedFd, name: CString| -> io::Result<Level> {
        Ok(Level {
            dir: Dir::new(fd)?,
            name,
            seen: false,
        })
    };
    let mut stack = vec![open(top, name.to_owned())?];
    let mut moved = 0u64;
    // Directories found not empty when removed (someone else adds entries): bounded.
    let mut refilled = 0;
    while let Some(level) = stack.last_mut() {
        let entry = loop {
            match level.dir.next() {
                Some(entry) => {
                    let entry = entry?;
                    let n = entry.file_name();
                    if n != c"." && n != c".." {
                        break Some(n.to_owned());
                    }
                }
                None => break None,
            }
        };
        let Some(entry) = entry else {
            if level.seen {
                // Entries were removed while reading: read again until nothing is left.
                level.seen = false;
                level.dir.rewind();
                continue;
            }
            let Level { dir, name, .. } = stack.pop().expect("not empty");
            drop(dir);
            let above = match stack.last() {
                Some(l) => l.dir.fd()?,
                None => parent,
            };
            match rustix::fs::unlinkat(above, &name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::NOTEMPTY) if refilled < 100 => {
                    refilled += 1;
                    let fd = open_dir_at(above, &name)?;
                    stack.push(open(fd, name)?);
                }
                Err(e) => return Err(e.into()),
            }
            continue;
        };
        level.seen = true;
        let depth = stack.len();
        let fd = stack[depth - 1].dir.fd()?;
        match rustix::fs::unlinkat(fd, &entry, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => continue,
            Err(Errno::ISDIR) => {}
            Err(e) => return Err(e.into()),
        }
        if depth < max_depth {
            match open_dir_at(fd, &entry) {
                Ok(sub) => stack.push(open(sub, entry)?),
                // Replaced or removed meanwhile: the next reading finds what is there.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => {}
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        // Too deep: move it to the top, where it is removed in turn.
        let top = stack[0].dir.fd()?;
        loop {
            moved += 1;
            let new_name = format!(".flint-removing-{moved}");
            match rustix::fs::renameat_with(fd, &entry, top, &new_name, RenameFlags::NOREPLACE) {
                Ok(()) | Err(Errno::NOENT) => break,
                Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::mode;
    use crate::tree::tests::{open_dir, Scratch};
    use rustix::fs::OFlags;
    use std::os::fd::AsFd;
    use std::path::Path;

    /// Build under `dir` a chain of `depth` directories `d`, each also holding a file, a link
    /// to `outside` and a link to a file in it.
    fn deep_tree(dir: &Path, depth: usize, outside: &Path) {
        let mut fd = open_dir(dir);
        for i in 0..depth {
            rustix::fs::mkdirat(&fd, c"d", mode(0o755)).unwrap();
            rustix::fs::symlinkat(outside, &fd, c"out").unwrap();
            rustix::fs::symlinkat(outside.join("keep"), &fd, c"out-file").unwrap();
            let f = rustix::fs::openat(
                &fd,
                format!("f{i}"),
                OFlags::CREATE | OFlags::WRONLY,
                mode(0o644),
            );
            drop(f.unwrap());
            fd = open_dir_at(fd.as_fd(), c"d").unwrap();
        }
    }

    fn assert_untouched(outside: &Path) {
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"kept");
        assert_eq!(std::fs::read_dir(outside).unwrap().count(), 1);
    }

    #[test]
    fn deep_trees_are_removed_and_links_are_not_followed() {
        let base = Scratch::new("remove");
        let outside = Scratch::new("remove-outside");
        std::fs::write(outside.0.join("keep"), b"kept").unwrap();
        let tree = base.0.join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::os::unix::fs::symlink(&outside.0, tree.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.0.join("keep"), tree.join("file-link")).unwrap();
        // Far deeper than REMOVE_DEPTH, with a link out and a file at every level.
        deep_tree(&tree, 10 * REMOVE_DEPTH, &outside.0);
        remove_tree(base.open().as_fd(), c"tree").unwrap();
        assert!(!tree.exists());
        assert_untouched(&outside.0);
        // Only the tree went.
        assert_eq!(std::fs::read_dir(&base.0).unwrap().count(), 0);

        // A link or a file in place of the tree is removed, not followed.
        std::os::unix::fs::symlink(&outside.0, base.0.join("tree")).unwrap();
        remove_tree(base.open().as_fd(), c"tree").unwrap();
        assert!(std::fs::symlink_metadata(base.0.join("tree")).is_err());
        assert_untouched(&outside.0);
        std::fs::write(base.0.join("tree"), b"file").unwrap();
        remove_tree(base.open().as_fd(), c"tree").unwrap();
        assert!(std::fs::symlink_metadata(base.0.join("tree")).is_err());
        // Nothing there: nothing to do.
        remove_tree(base.open().as_fd(), c"tree").unwrap();
    }

    #[test]
    fn what_is_too_deep_moves_up_without_replacing_what_is_there() {
        let base = Scratch::new("remove-shallow");
        let outside = Scratch::new("remove-shallow-outside");
        std::fs::write(outside.0.join("keep"), b"kept").unwrap();
        let tree = base.0.join("tree");
        std::fs::create_dir(&tree).unwrap();
        // Names the moves would take, there already: a tree of its own and a file.
        std::fs::create_dir_all(tree.join(".flint-removing-1/x/y")).unwrap();
        std::fs::write(tree.join(".flint-removing-2"), b"").unwrap();
        deep_tree(&tree, 50, &outside.0);
        // With two directories open at most, nearly every level is moved up once.
        remove_tree_within(base.open().as_fd(), c"tree", 2).unwrap();
        assert!(!tree.exists());
        assert_untouched(&outside.0);
        assert_eq!(std::fs::read_dir(&base.0).unwrap().count(), 0);
    }
}
