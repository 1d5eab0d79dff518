//! A file being received (a copy-in on the guest side, a copy-out on the host side): written
//! under a hidden name next to its final one, renamed into place when complete, removed if
//! abandoned. So the file appears complete or not at all, and an existing one is replaced in
//! one step.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// See the module docs. Write the data with [`Write`], then [`PartFile::commit`]; dropped
/// uncommitted, the partial file is removed.
pub struct PartFile {
    file: File,
    /// The hidden file; empty once it is renamed to `dest`.
    tmp: PathBuf,
    dest: PathBuf,
}

impl PartFile {
    /// Create the hidden file `.NAME.flint-part-PID-N` (mode 0600, a new file) next to `dest`,
    /// creating the parent directories.
    pub fn create(dest: &Path) -> io::Result<PartFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = dest
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fs::create_dir_all(dir)?;
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".flint-part-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        Ok(PartFile {
            file,
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    /// Give the file its permission bits `mode` and its final name.
    pub fn commit(mut self, mode: u32) -> io::Result<()> {
        // Explicitly: the mode given at creation is subject to the umask.
        self.file
            .set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
        fs::rename(&self.tmp, &self.dest)?;
        // Renamed: nothing left to remove.
        self.tmp = PathBuf::new();
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
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
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

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        for path in ["/", "..", "a/.."] {
            let e = PartFile::create(Path::new(path)).err().unwrap();
            assert_eq!(e.to_string(), "the path names no file", "{path}");
        }
    }
}
