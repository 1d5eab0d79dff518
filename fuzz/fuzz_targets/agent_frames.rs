//! Fuzz the host side of the guest agent protocol: the input is what a hostile agent sends
//! back, fed over a real Unix socket pair to the real client ([`AgentClient`]) while it runs
//! a command, copies a file out (into a scratch directory, within a small byte budget) or
//! refreshes the guest; and to the frame decoder on its own. The client must never panic or
//! hang, must end every operation with a result, and must keep its promises: a copied-out
//! file is within the budget and never set-id, sticky, group- or world-writable, and every
//! error is one line.
//!
//! Input: one byte choosing the operations (0: run, 1: copy-out, 2: refresh, 3: copy-out
//! then run, 4: run then copy-out), then the agent's byte stream (at most 128 KiB are used).

#![no_main]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use flint_agent::protocol::decode_frame;
use flint_agent::{AgentClient, AgentError, CopyOutBudget, ExecSpec, FromAgent};
use flint_fuzz::scratch_dir;
use libfuzzer_sys::fuzz_target;

/// The copy-out byte budget of one input.
const BUDGET: u64 = 4096;
/// More than this is cut: the stream is written into the socket before the client reads,
/// and must fit in its buffer.
const MAX_STREAM: usize = 128 * 1024;

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Created and removed by each input, so that nothing stays behind after a run.
        scratch_dir().join(format!("flint-fuzz-agent-{}", std::process::id()))
    })
}

fn one_line(e: &AgentError) {
    let text = e.to_string();
    assert!(!text.contains('\n') && !text.contains('\x1b'), "{text:?}");
}

fn copy_out(client: &mut AgentClient) {
    let host = scratch().join("out");
    let _ = std::fs::remove_file(&host);
    let mut budget = CopyOutBudget::new(BUDGET, Duration::from_secs(5));
    match client.copy_out_within(Path::new("/guest/file"), &host, &mut budget) {
        Ok(()) => {
            let meta = std::fs::metadata(&host).unwrap();
            assert!(meta.len() <= BUDGET, "{} bytes copied", meta.len());
            let mode = meta.permissions().mode() & 0o7777;
            assert_eq!(mode & 0o7022, 0, "the host file got mode {mode:o}");
        }
        Err(e) => {
            one_line(&e);
            assert!(!host.exists(), "a failed copy left {}", host.display());
        }
    }
}

fn run(client: &mut AgentClient) {
    let spec = ExecSpec::new(["sh", "-c", "true"]);
    match client.run(
        &spec,
        None::<std::io::Empty>,
        std::io::sink(),
        std::io::sink(),
    ) {
        Ok(status) => assert!((0..=255).contains(&status.code())),
        Err(e) => one_line(&e),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ops, stream)) = data.split_first() else {
        return;
    };
    let stream = &stream[..stream.len().min(MAX_STREAM)];

    // The frame decoder on its own, frame after frame.
    let mut rest = stream;
    while let Ok(Some((msg, used))) = decode_frame::<FromAgent>(rest) {
        let _: FromAgent = msg;
        rest = &rest[used..];
    }

    // The client against an agent that says exactly `stream`, then stops talking.
    let (host, mut agent) = UnixStream::pair().unwrap();
    let sndbuf = (2 * MAX_STREAM) as libc::c_int;
    // SAFETY: setsockopt reads an int of the given size from a live local; the socket is open.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&agent),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&sndbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    agent.write_all(stream).unwrap();
    // End of stream for the client; its own requests still have somewhere to go (no EPIPE).
    agent.shutdown(std::net::Shutdown::Write).unwrap();
    let mut client = AgentClient::from_stream(host).unwrap();
    std::fs::create_dir_all(scratch()).unwrap();
    match ops % 5 {
        0 => run(&mut client),
        1 => copy_out(&mut client),
        2 => {
            if let Err(e) = client.refresh_within(Duration::from_secs(5)) {
                one_line(&e);
            }
        }
        3 => {
            copy_out(&mut client);
            run(&mut client);
        }
        _ => {
            run(&mut client);
            copy_out(&mut client);
        }
    }
    drop(client);
    drop(agent);
    std::fs::remove_dir_all(scratch()).unwrap();
});
