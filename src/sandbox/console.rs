//! The guest console of a sandbox: not shown (the command's output is), but kept in a capped
//! log whose last lines a failure shows.

use std::io::{Read, Write};
use std::path::Path;

use vmm::ConsoleIo;

/// Most bytes of the guest's console kept in a sandbox's console log: the guest decides how
/// much it prints, the host's disk is not its to fill.
pub(super) const CONSOLE_LOG_MAX: u64 = 1 << 20;
/// How much of the console log's end is read to show its last lines.
const CONSOLE_TAIL_BYTES: u64 = 16 * 1024;
/// How many of the console log's last lines a failure shows.
pub(super) const CONSOLE_TAIL_LINES: usize = 20;

/// A log that keeps the first `left` bytes written to it and a note that the rest was
/// dropped; every write succeeds.
struct CappedLog<W: Write> {
    out: W,
    left: u64,
    noted: bool,
}

impl<W: Write> CappedLog<W> {
    fn new(out: W, max: u64) -> Self {
        CappedLog {
            out,
            left: max,
            noted: false,
        }
    }
}

impl<W: Write> Write for CappedLog<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let keep = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if keep > 0 {
            self.out.write_all(&buf[..keep])?;
            self.left -= keep as u64;
        }
        if keep < buf.len() && !self.noted {
            self.noted = true;
            self.out
                .write_all(b"\n[flint: the console log is full; later output is dropped]\n")?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The guest's console goes to `path` (it is not shown; it is kept for diagnostics), at most
/// [`CONSOLE_LOG_MAX`] bytes of it.
pub(super) fn console_to(path: &Path) -> std::io::Result<ConsoleIo> {
    let file = std::fs::File::create(path)?;
    Ok(ConsoleIo {
        output: Box::new(CappedLog::new(file, CONSOLE_LOG_MAX)),
        input: None,
        escape: false,
    })
}

/// On failure, show what the guest printed last (it may say why).
pub(super) fn log_console_tail(path: &Path, failed: bool) {
    if !failed {
        return;
    }
    for line in console_tail(path) {
        eprintln!("flint: guest console: {line}");
    }
}

/// The last [`CONSOLE_TAIL_LINES`] lines of the console log, from its last
/// [`CONSOLE_TAIL_BYTES`] only, control characters (the guest's escape sequences) replaced
/// by `?`.
pub(super) fn console_tail(path: &Path) -> Vec<String> {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return Vec::new();
    };
    let from = len.saturating_sub(CONSOLE_TAIL_BYTES);
    let mut tail = Vec::new();
    if file.seek(SeekFrom::Start(from)).is_err()
        || file
            .take(CONSOLE_TAIL_BYTES)
            .read_to_end(&mut tail)
            .is_err()
    {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&tail);
    let mut lines: Vec<&str> = text.lines().collect();
    if from > 0 && !lines.is_empty() {
        // The first line is cut.
        lines.remove(0);
    }
    lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..]
        .iter()
        .map(|line| {
            line.chars()
                .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
                .collect()
        })
        .collect()
}
