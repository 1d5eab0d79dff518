//! `pty-run`: runs a program on a new pseudo-terminal, for tests that need a program (such
//! as `ctr run -t`) whose stdin, stdout and stderr are a terminal where there is none (the
//! nested test host's scenarios run without one).
//!
//! ```text
//! pty-run ROWS COLS [--resize-on TEXT ROWS2 COLS2] -- PROGRAM [ARG...]
//! ```
//!
//! The terminal starts ROWS x COLS; the program leads a new session with the terminal as
//! its controlling terminal. What `pty-run` reads on its stdin is typed on the terminal (the
//! end of its stdin types nothing: the terminal stays open); what the program writes on the
//! terminal is copied to `pty-run`'s stdout. With `--resize-on`, the first time TEXT appears
//! in that output the terminal becomes ROWS2 x COLS2 (the program gets SIGWINCH). Ends when
//! the program has ended and the terminal is drained, with the program's exit status
//! (128+N when signal N ended it).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};

fn usage() -> ! {
    eprintln!("usage: pty-run ROWS COLS [--resize-on TEXT ROWS2 COLS2] -- PROGRAM [ARG...]");
    std::process::exit(2);
}

fn fail(what: &str, e: std::io::Error) -> ! {
    eprintln!("pty-run: {what}: {e}");
    std::process::exit(1);
}

fn size(rows: &str, cols: &str) -> libc::winsize {
    let n = |s: &str| s.parse::<u16>().unwrap_or_else(|_| usage());
    libc::winsize {
        ws_row: n(rows),
        ws_col: n(cols),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_size(fd: &OwnedFd, ws: &libc::winsize) {
    // SAFETY: TIOCSWINSZ reads a winsize from a live reference; the descriptor is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, ws as *const libc::winsize) } != 0 {
        fail(
            "cannot set the window size",
            std::io::Error::last_os_error(),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args
        .iter()
        .position(|a| a == "--")
        .unwrap_or_else(|| usage());
    let (opts, program) = (&args[..split], &args[split + 1..]);
    if program.is_empty() || !(opts.len() == 2 || opts.len() == 6) {
        usage();
    }
    let first = size(&opts[0], &opts[1]);
    let mut resize_on = match opts.len() {
        6 if opts[2] == "--resize-on" => Some((opts[3].clone(), size(&opts[4], &opts[5]))),
        6 => usage(),
        _ => None,
    };

    // SAFETY: a path literal; the result is checked.
    let raw = unsafe { libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if raw < 0 {
        fail("cannot open /dev/ptmx", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from a live local; TIOCGPTPEER takes flags and
    // returns a fresh descriptor, checked.
    let slave = unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock);
        let raw = libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if raw < 0 {
            fail("cannot open the terminal", std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(raw)
    };
    set_size(&master, &first);

    let stdio = || Stdio::from(slave.try_clone().unwrap_or_else(|e| fail("dup", e)));
    let mut cmd = Command::new(&program[0]);
    cmd.args(&program[1..])
        .stdin(stdio())
        .stdout(stdio())
        .stderr(stdio());
    // SAFETY: only system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot run {}", program[0]), e));
    drop(cmd);
    drop(slave);

    let mut term = File::from(master.try_clone().unwrap_or_else(|e| fail("dup", e)));
    let mut stdin_open = true;
    let mut stdout = std::io::stdout();
    // The end of the output so far, to find TEXT across reads.
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut fds = vec![libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if stdin_open {
            fds.push(libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of the length passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            fail("poll", e);
        }
        if stdin_open && fds[1].revents != 0 {
            match std::io::stdin().read(&mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => {
                    let _ = term.write_all(&buf[..n]);
                }
            }
        }
        if fds[0].revents != 0 {
            match term.read(&mut buf) {
                // EIO: no process holds the terminal any more.
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = stdout.write_all(&buf[..n]);
                    let _ = stdout.flush();
                    if let Some((text, ws)) = &resize_on {
                        tail.extend_from_slice(&buf[..n]);
                        let found = tail
                            .windows(text.len().max(1))
                            .any(|w| w == text.as_bytes());
                        if found {
                            set_size(&master, ws);
                            resize_on = None;
                        } else {
                            let keep = text.len().saturating_sub(1);
                            let cut = tail.len().saturating_sub(keep);
                            tail.drain(..cut);
                        }
                    }
                }
            }
        }
    }
    let status = child.wait().unwrap_or_else(|e| fail("wait", e));
    std::process::exit(match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        _ => 255,
    });
}
