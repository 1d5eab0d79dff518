//! A file being received (a copy-in on the guest side, a copy-out on the host side): written
//! under a hidden name next to its final one, renamed into place when complete, removed if
//! abandoned. So the file appears complete or not at all, and an existing one is replaced in
//! one step.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// See the module docs. Write the data with [`Write`], then [`PartFile::commit`]; dropped
/// uncommitted, the partial file is removed.
pub struct PartFile {
    file: File,
    /// Where the file is; the hidden name is cleared once it is renamed into place.
    place: Place,
}

enum Place {
    /// Paths: the hidden file (empty once renamed) and the final one.
    Paths { tmp: PathBuf, dest: PathBuf },
    /// Names in an open directory: the hidden one (empty once renamed) and the final one.
    InDir {
        dir: OwnedFd,
        tmp: CString,
        dest: CString,
    },
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `.NAME.flint-part-PID-N`
fn hidden_name(name: &OsStr) -> OsString {
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".flint-part-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    tmp_name
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the file name contains a NUL byte",
        )
    })
}

impl PartFile {
    /// Create the hidden file `.NAME.flint-part-PID-N` (mode 0600, a new file) next to `dest`,
    /// creating the parent directories.
    pub fn create(dest: &Path) -> io::Result<PartFile> {
        let name = dest
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fs::create_dir_all(dir)?;
        let tmp = dir.join(hidden_name(name));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        Ok(PartFile {
            file,
            place: Place::Paths {
                tmp,
                dest: dest.to_path_buf(),
            },
        })
    }

    /// Like [`create`](Self::create), for the file `name` (one path component, not `.` or
    /// `..`) of the open directory `dir`, which must exist. No path is resolved again: the
    /// file ends up in that directory whatever happens to the paths leading to it.
    pub fn create_in(dir: OwnedFd, name: &OsStr) -> io::Result<PartFile> {
        if name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&b'/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path names no file",
            ));
        }
        let dest = c_name(name)?;
        let tmp = c_name(&hidden_name(name))?;
        // SAFETY: `tmp` is a NUL-terminated string that outlives the call and `dir` an open
        // descriptor; the result is checked.
        let raw = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                tmp.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        Ok(PartFile {
            file,
            place: Place::InDir { dir, tmp, dest },
        })
    }

    /// Give the file its permission bits `mode` and its final name.
    pub fn commit(mut self, mode: u32) -> io::Result<()> {
        // Explicitly: the mode given at creation is subject to the umask.
        self.file
            .set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
        match &mut self.place {
            Place::Paths { tmp, dest } => {
                fs::rename(&*tmp, &*dest)?;
                // Renamed: nothing left to remove.
                *tmp = PathBuf::new();
            }
            Place::InDir { dir, tmp, dest } => {
                // SAFETY: both names are NUL-terminated strings that outlive the call and
                // `dir` is an open descriptor.
                let rc = unsafe {
                    libc::renameat(
                        dir.as_raw_fd(),
                        tmp.as_ptr(),
                        dir.as_raw_fd(),
                        dest.as_ptr(),
                    )
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                *tmp = CString::default();
            }
        }
        Ok(())
    }
}

impl Write for PartFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        match &self.place {
            Place::Paths { tmp, .. } => {
                if !tmp.as_os_str().is_empty() {
                    let _ = fs::remove_file(tmp);
                }
            }
            Place::InDir { dir, tmp, .. } => {
                if !tmp.is_empty() {
                    // SAFETY: `tmp` is a NUL-terminated string that outlives the call and
                    // `dir` an open descriptor.
                    unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("flint-part-file-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn appears_complete_with_its_mode_and_replaces_the_old_file() {
        let dir = scratch("commit");
        let dest = dir.join("a/b/f");
        let mut part = PartFile::create(&dest).unwrap();
        part.write_all(b"new data").unwrap();
        assert!(!dest.exists(), "visible before the commit");
        let hidden = entries(&dir.join("a/b"));
        assert_eq!(hidden.len(), 1);
        assert!(hidden[0].starts_with(".f.flint-part-"), "{hidden:?}");
        fs::write(&dest, b"old").unwrap();
        part.commit(0o751).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new data");
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o7777,
            0o751
        );
        assert_eq!(entries(&dir.join("a/b")), vec!["f".to_string()]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_at_once_and_abandoned_ones_leave_nothing() {
        let dir = scratch("drop");
        let dest = dir.join("f");
        let mut one = PartFile::create(&dest).unwrap();
        let two = PartFile::create(&dest).unwrap();
        one.write_all(b"x").unwrap();
        assert_eq!(entries(&dir).len(), 2);
        drop(one);
        drop(two);
        assert!(entries(&dir).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn open_dir(path: &Path) -> OwnedFd {
        OwnedFd::from(File::open(path).unwrap())
    }

    #[test]
    fn in_a_directory_it_appears_complete_there_or_not_at_all() {
        let dir = scratch("in-dir");
        fs::create_dir_all(dir.join("d")).unwrap();
        let mut part = PartFile::create_in(open_dir(&dir.join("d")), OsStr::new("f")).unwrap();
        part.write_all(b"data").unwrap();
        // The directory moves away: the file still lands in it.
        fs::rename(dir.join("d"), dir.join("moved")).unwrap();
        assert_eq!(entries(&dir.join("moved")).len(), 1);
        part.commit(0o640).unwrap();
        assert_eq!(fs::read(dir.join("moved/f")).unwrap(), b"data");
        assert_eq!(
            fs::metadata(dir.join("moved/f"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o640
        );
        assert_eq!(entries(&dir.join("moved")), vec!["f".to_string()]);
        let abandoned = PartFile::create_in(open_dir(&dir), OsStr::new("g")).unwrap();
        assert_eq!(entries(&dir).len(), 2);
        drop(abandoned);
        assert_eq!(entries(&dir), vec!["moved".to_string()]);
        for name in ["", ".", "..", "a/b"] {
            let e = PartFile::create_in(open_dir(&dir), OsStr::new(name))
                .err()
                .unwrap();
            assert_eq!(e.to_string(), "the path names no file", "{name:?}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        for path in ["/", "..", "a/.."] {
            let e = PartFile::create(Path::new(path)).err().unwrap();
            assert_eq!(e.to_string(), "the path names no file", "{path}");
        }
    }
}
