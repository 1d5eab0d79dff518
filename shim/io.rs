//! A process's stdio through containerd's FIFOs (the paths in the create and exec requests;
//! an empty path means none).
//!
//! Output is written as it comes from the agent, one chunk at a time: nothing is buffered in
//! the shim, and a reader that does not read holds the guest's command back (as a pipe
//! does). Once the reader has gone, output is dropped, so the command still runs to its end.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// Where a process's stdout or stderr goes.
pub struct Output {
    file: Option<File>,
}

impl Output {
    /// Open `path` (a FIFO containerd reads, or a file) for writing; `""` discards output.
    /// A FIFO is opened without waiting for its reader.
    pub fn open(path: &str) -> io::Result<Output> {
        if path.is_empty() {
            return Ok(Output { file: None });
        }
        let path = path.strip_prefix("file://").unwrap_or(path);
        // Opening a FIFO read-write never blocks; with that end open, so does the write-only
        // open, whose descriptor fails with EPIPE once the real reader has closed its end.
        let keep = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        drop(keep);
        Ok(Output { file: Some(file) })
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(file) = &mut self.file {
            if let Err(e) = file.write_all(buf) {
                log::debug!("output dropped from now on: {e}");
                self.file = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A process's stdin: the FIFO at `path`, opened at the first read (which waits for
/// containerd's writer).
pub struct Input {
    path: PathBuf,
    file: Option<File>,
}

impl Input {
    /// `None` for `""` (no stdin: the process reads end of file at once).
    pub fn new(path: &str) -> Option<Input> {
        (!path.is_empty()).then(|| Input {
            path: PathBuf::from(path),
            file: None,
        })
    }
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.file.is_none() {
            self.file = Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&self.path)?,
            );
        }
        match &mut self.file {
            Some(file) => file.read(buf),
            None => Ok(0),
        }
    }
}

/// Hold the FIFO at `path` (a process's stdin) open for writing, so that its reader sees
/// the end of input only once this is dropped and containerd's writers have closed theirs
/// (as runc's shim does for a terminal: a client that detaches does not end the terminal's
/// input; `close_io` does). `None` for `""`.
pub fn hold_stdin(path: &str) -> io::Result<Option<File>> {
    if path.is_empty() {
        return Ok(None);
    }
    // Read-write: never waits for a reader, and is no reader that takes bytes (it is never
    // read).
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn fifo(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("flint-shim-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        path
    }

    #[test]
    fn output_reaches_the_reader_and_is_dropped_once_it_has_gone() {
        let path = fifo("out");
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let mut out = Output::open(path.to_str().unwrap()).unwrap();
        out.write_all(b"hello").unwrap();
        let mut got = [0u8; 16];
        let n = reader.read(&mut got).unwrap();
        assert_eq!(&got[..n], b"hello");
        drop(reader);
        // Without a reader a write fails with EPIPE (the shim's SIGPIPE is handled, as here).
        // SAFETY: ignoring SIGPIPE is process-wide and harmless in tests.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        out.write_all(b"more").unwrap();
        out.write_all(b"and more").unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_held_stdin_ends_only_once_released() {
        let path = fifo("in");
        let held = hold_stdin(path.to_str().unwrap()).unwrap();
        let mut input = Input::new(path.to_str().unwrap()).unwrap();
        let mut writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        writer.write_all(b"typed").unwrap();
        drop(writer);
        let mut got = [0u8; 16];
        let n = input.read(&mut got).unwrap();
        assert_eq!(&got[..n], b"typed");
        // The client's writer is gone but the shim's holds: no end of input yet.
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut rest = Vec::new();
            input.read_to_end(&mut rest).unwrap();
            tx.send(rest).unwrap();
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err());
        drop(held);
        let rest = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert!(rest.is_empty());
        reader.join().unwrap();
        assert!(hold_stdin("").unwrap().is_none());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn no_path_means_no_stdin_and_discarded_output() {
        assert!(Input::new("").is_none());
        let mut out = Output::open("").unwrap();
        out.write_all(b"gone").unwrap();
    }
}
