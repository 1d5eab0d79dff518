//! Supervising a started sandbox: wait for the command, the VM's end or the timeout, then
//! stop the VM and turn what happened into flint's exit status.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use flint_agent::poll::wait_readable;
use flint_agent::AgentError;
use log::debug;
use vmm::{Ending, Vm};

use super::agent::{AgentThread, ClientResult};
use super::console::log_console_tail;
use super::machine::{make_template, Restored};
use super::{sandbox_failure, STATUS_NOT_STARTED, STATUS_SANDBOX_FAILED, STATUS_TIMEOUT};
use crate::template::Staging;

/// What ended the supervision of a running sandbox.
pub(super) enum Outcome {
    /// The agent client reported the command's status (and the copies are done).
    Finished(flint_agent::CommandStatus),
    /// The agent client failed.
    ClientFailed(AgentError),
    /// The VM ended before the agent client reported.
    Ended(Ending),
    /// The timeout passed first.
    TimedOut,
    /// A pool member's agent client is connected and waits for the command.
    Connected,
    /// Whoever the command ran for is gone (a pool's client hung up, or no job came): the
    /// command and the VM are stopped without a word.
    Abandoned,
}

/// Wait until the agent client reports, the VM ends, `timeout` passes or `hang_up` (a pool
/// client's connection, which sends nothing while its command runs) becomes readable.
/// Meanwhile, when the client says the booted guest is ready, snapshot it into `staging` for
/// later runs.
pub(super) fn supervise(
    vm: &Vm,
    client: &AgentThread,
    mut staging: Option<Staging>,
    timeout: Option<Duration>,
    hang_up: Option<&dyn AsRawFd>,
    start: Instant,
) -> Outcome {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match hang_up {
            Some(fd) => wait_readable(&[vm.ending_event(), &client.done, fd], timeout),
            None => wait_readable(&[vm.ending_event(), &client.done], timeout),
        }
        // Drain the counter: the client may report more than once.
        let _ = client.done.read();
        let mut result = client.results.try_recv().ok();
        if let Some(ClientResult::ReadyForSnapshot(refreshable)) = result {
            match staging.take() {
                Some(staging) if refreshable => make_template(vm, staging, start),
                Some(_) => log::warn!(
                    "sandbox: the guest agent cannot refresh a restored guest (rebuild the \
                     sandbox image with resources/build-sandbox-image.sh): no snapshot is made, \
                     every run boots"
                ),
                None => {}
            }
            let _ = client.snapshot_done.send(());
            result = client.results.try_recv().ok();
        }
        match result {
            Some(ClientResult::ReadyForSnapshot(_)) | None => {}
            // Once the status and the copies are in, nothing in the throwaway guest
            // matters: stop it rather than wait for it to power off.
            Some(ClientResult::Finished(status)) => {
                debug!("sandbox: status in at {} ms", start.elapsed().as_millis());
                return Outcome::Finished(status);
            }
            Some(ClientResult::Failed(e)) => return Outcome::ClientFailed(e),
            Some(ClientResult::Connected) => return Outcome::Connected,
        }
        if let Some(ending) = vm.ending() {
            debug!(
                "sandbox: the VM ended at {} ms",
                start.elapsed().as_millis()
            );
            return Outcome::Ended(ending);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Outcome::TimedOut;
        }
        if hang_up.is_some_and(|fd| readable_now(fd.as_raw_fd())) {
            return Outcome::Abandoned;
        }
    }
}

/// Whether `fd` is readable (or hung up) right now.
fn readable_now(fd: i32) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `poll` is one valid pollfd for the whole call; poll only reads and writes it.
    let n = unsafe { libc::poll(&mut poll, 1, 0) };
    n > 0 && poll.revents != 0
}

/// Stop the VM after `outcome` and say how the run ended: the command's status, or why there
/// is none. A template the guest was restored from is discarded if the guest could not be
/// refreshed (the next run boots and makes a new one). Returns flint's exit status.
pub(super) fn conclude(
    outcome: Outcome,
    vm: Vm,
    client: &AgentThread,
    restored: Option<&Restored>,
    console_log: &Path,
    timeout: Option<Duration>,
    start: Instant,
) -> u8 {
    let mut command_status = None;
    let mut client_error = None;
    match outcome {
        Outcome::Finished(status) => {
            command_status = Some(status);
            vm.shutdown(Ending::Reset);
        }
        Outcome::ClientFailed(e) => {
            client_error = Some(e);
            vm.shutdown(Ending::Reset);
        }
        Outcome::TimedOut => {
            let outcome = vm.shutdown(Ending::Signal(libc::SIGALRM));
            drop(outcome);
            eprintln!(
                "flint: error: the command did not finish within {} s; the VM was stopped",
                timeout.unwrap_or_default().as_secs()
            );
            return STATUS_TIMEOUT;
        }
        Outcome::Connected | Outcome::Abandoned => {
            if let Ok(signaller) = client.signaller.try_recv() {
                let _ = signaller.try_signal(libc::SIGKILL);
            }
            vm.shutdown(Ending::Reset);
            return STATUS_SANDBOX_FAILED;
        }
        Outcome::Ended(Ending::Signal(sig)) => {
            // Ctrl-C (or a stop signal): kill the command, then the VM. Never wait for the
            // connection: the VM stops next whatever happens.
            if let Ok(signaller) = client.signaller.try_recv() {
                let _ = signaller.try_signal(libc::SIGKILL);
            }
            vm.shutdown(Ending::Signal(sig));
            eprintln!("flint: stopped the sandbox on signal {sig}");
            return 128u8.saturating_add(sig as u8);
        }
        Outcome::Ended(Ending::Reset) => {
            // The guest powered off (the command may have rebooted it). The client may still
            // be reporting; wait for it briefly.
            match client.results.recv_timeout(Duration::from_secs(5)) {
                Ok(ClientResult::Finished(s)) => command_status = Some(s),
                Ok(ClientResult::Failed(e)) => client_error = Some(e),
                Ok(ClientResult::ReadyForSnapshot(_) | ClientResult::Connected) | Err(_) => {}
            }
            vm.shutdown(Ending::Reset);
        }
        Outcome::Ended(other) => {
            vm.shutdown(other.clone());
            log_console_tail(console_log, true);
            let reason = match other {
                Ending::Fault { vcpu, reason } => format!("vCPU {vcpu}: {reason}"),
                Ending::PageFaultHandlerGone(path) => {
                    vmm::Error::PageFaultHandlerGone(path).to_string()
                }
                Ending::ConsoleQuit => "the console asked to quit".to_string(),
                _ => "it ended".to_string(),
            };
            return sandbox_failure(&format!(
                "the sandbox VM stopped before the command finished: {reason}"
            ));
        }
    }
    debug!("sandbox: VM stopped at {} ms", start.elapsed().as_millis());
    if let Some(restored) = restored {
        restored.discard_if_unrefreshed();
    }
    match client_error {
        // The command itself could not start (not found, not executable...): as a shell.
        Some(e @ AgentError::NotStarted(_)) => {
            eprintln!("flint: error: {e}");
            return STATUS_NOT_STARTED;
        }
        Some(e) => {
            log_console_tail(console_log, command_status.is_none());
            return sandbox_failure(&e);
        }
        None => {}
    }
    match command_status {
        Some(status) => status.code().clamp(0, 255) as u8,
        None => sandbox_failure(&"the guest powered off before the command reported its status"),
    }
}
