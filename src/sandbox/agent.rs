//! The host side of the guest agent: the client that copies files in, runs the command and
//! copies files out, and (for `flint run`) the thread it runs on.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use flint_agent::{
    AgentClient, AgentError, CommandStatus, CopyOutBudget, ExecSpec, Signaller, AGENT_PORT,
    IMAGE_ROOT,
};
use flint_image::RunSpec;
use log::debug;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{CommandOptions, RunOptions, SetupError};

/// How long the guest gets to boot and start its agent.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

pub(super) fn exec_spec(command: &CommandOptions) -> ExecSpec {
    let mut spec = ExecSpec::new(command.argv.iter().cloned());
    spec.env = command.env.clone();
    spec.workdir = command.workdir.clone();
    spec
}

/// The command of a container image (its configuration with the user's overrides), run in the
/// image's root ([`IMAGE_ROOT`]) with its credentials.
pub(super) fn image_exec_spec(run: &RunSpec) -> ExecSpec {
    let mut spec = ExecSpec::new(run.argv.iter().cloned())
        .root(IMAGE_ROOT)
        .user(run.uid, run.gid, run.groups.clone());
    spec.env = run
        .env
        .iter()
        .map(|e| match e.split_once('=') {
            Some((name, value)) => (name.to_string(), value.to_string()),
            None => (e.clone(), String::new()),
        })
        .collect();
    spec.workdir = Some(run.workdir.clone());
    spec
}

/// What the agent-client thread reports.
pub(super) enum ClientResult {
    /// A pool member's agent answered (and a booted guest was snapshotted): the thread now
    /// waits for the command ([`AgentThread::job`]).
    Connected,
    Finished(CommandStatus),
    Failed(AgentError),
    /// The agent answered and the connection is closed again: the booted guest can be
    /// snapshotted now, if its agent accepted a refresh (the value). The client waits for
    /// the snapshot before it connects again.
    ReadyForSnapshot(bool),
}

/// What the agent client does between connecting and running the command.
pub(super) enum Prepare {
    /// Nothing: the guest booted just now.
    Nothing,
    /// The guest was restored from a snapshot: set its clock and reseed its random number
    /// generator from the host first. If that fails, `failed` is set: the snapshot is then
    /// discarded, so that the next run boots and makes a new one.
    Refresh { failed: Arc<AtomicBool> },
    /// `flint exec`: refresh if the agent can; an agent from before the Refresh request gets
    /// a warning and the command runs anyway.
    RefreshIfSupported,
    /// The guest booted and a template is to be made of it: check that its agent accepts a
    /// refresh (restored sandboxes need one), call `ready` with the answer and no connection
    /// open, wait for `done`, then connect again.
    Template {
        ready: Box<dyn FnOnce(bool) + Send>,
        done: mpsc::Receiver<()>,
    },
}

/// The files copied around the command.
#[derive(Default)]
pub(super) struct Copies {
    /// Host file, guest path: before the command.
    copy_in: Vec<(PathBuf, String)>,
    /// Guest path, host file: after the command.
    copy_out: Vec<(String, PathBuf)>,
    /// The most bytes all copy-outs together may bring.
    copy_out_limit: u64,
}

/// The command [`drive_agent`] runs: known now, or (a pool member's) once `wait` returns it,
/// which it calls with the agent connected, before a restored guest's refresh; `None` from
/// `wait`: no command comes.
pub(super) enum Work {
    Now(ExecSpec),
    Later(Box<dyn FnOnce() -> Option<ExecSpec> + Send>),
}

/// Run one command through the agent: copies in, the command, copies out.
pub(super) fn drive_agent(
    uds: &Path,
    work: Work,
    copies: &Copies,
    signaller: &mpsc::Sender<Signaller>,
    prepare: Prepare,
    start: Instant,
) -> Result<CommandStatus, AgentError> {
    let mut client = AgentClient::connect(uds, AGENT_PORT, AGENT_CONNECT_TIMEOUT)?;
    debug!(
        "sandbox: agent connected at {} ms",
        start.elapsed().as_millis()
    );
    let mut refresh = None;
    match prepare {
        Prepare::Nothing => {}
        Prepare::Refresh { failed } => refresh = Some(failed),
        Prepare::RefreshIfSupported => {
            if let Err(e) = client.refresh() {
                log::warn!(
                    "the guest agent did not refresh the guest's clock and random number \
                     generator ({e}); an agent from before flint's snapshots cannot"
                );
                // A refused request may have closed the connection.
                client = AgentClient::connect(uds, AGENT_PORT, AGENT_CONNECT_TIMEOUT)?;
            }
        }
        Prepare::Template { ready, done } => {
            let refreshable = client.refresh().is_ok();
            drop(client);
            ready(refreshable);
            // Whether or not the snapshot was made, the guest runs on.
            let _ = done.recv();
            client = AgentClient::connect(uds, AGENT_PORT, AGENT_CONNECT_TIMEOUT)?;
        }
    }
    // A pool member refreshes its restored guest before it waits for a job, off the job's
    // path: from then on the guest runs, so its random number generator is its own and its
    // clock follows the host's (kvm-clock). Only a long wait calls for another refresh.
    let mut refreshed_at = None;
    let spec = match work {
        Work::Now(spec) => spec,
        Work::Later(wait) => {
            if let Some(failed) = &refresh {
                refresh_guest(&mut client, failed, start)?;
                refreshed_at = Some(Instant::now());
            }
            wait().ok_or(AgentError::Closed)?
        }
    };
    if let Some(failed) = &refresh {
        if refreshed_at.is_none_or(|at| at.elapsed() > WARM_REFRESH_VALID) {
            refresh_guest(&mut client, failed, start)?;
        }
    }
    let spec = &spec;
    // Copies go to and from the command's root, as the command sees its files.
    client.set_root(spec.root.as_deref());
    let _ = signaller.send(client.signaller());
    for (host, guest) in &copies.copy_in {
        client.copy_in(host, Path::new(guest))?;
    }
    // An input with nothing to read needs no forwarder thread: the command's stdin is just
    // closed, as the forwarder would do at its first read.
    let stdin: Option<Box<dyn Read + Send>> = if reads_nothing(libc::STDIN_FILENO) {
        None
    } else {
        Some(Box::new(std::io::stdin()))
    };
    let status = client.run(spec, stdin, std::io::stdout(), std::io::stderr())?;
    debug!(
        "sandbox: command ended at {} ms",
        start.elapsed().as_millis()
    );
    // The guest decides how much it sends and how fast: bound both, even without --timeout.
    let mut budget = CopyOutBudget::new(copies.copy_out_limit, flint_agent::COPY_OUT_TIMEOUT);
    for (guest, host) in &copies.copy_out {
        client.copy_out_within(Path::new(guest), host, &mut budget)?;
    }
    Ok(status)
}

/// Whether file descriptor `fd` is closed or `/dev/null` (the character device 1:3): every
/// read would return end of file at once.
pub(super) fn reads_nothing(fd: libc::c_int) -> bool {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `struct stat` into the valid buffer and touches nothing else.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF);
    }
    // SAFETY: fstat returned 0, so it initialised the buffer.
    let stat = unsafe { stat.assume_init() };
    stat.st_mode & libc::S_IFMT == libc::S_IFCHR && stat.st_rdev == libc::makedev(1, 3)
}

/// How long a warm sandbox's refresh holds. A running guest's clock keeps the host's time
/// through kvm-clock, but not a step of the host's clock (`settimeofday`, an NTP step) nor
/// its slewing: a pool member that waited for its job longer than this is refreshed again
/// right before the command, so its clock is never off by more than what this long a wait
/// can make it.
const WARM_REFRESH_VALID: Duration = Duration::from_secs(10);

/// Set a restored guest's clock and reseed its random number generator; on failure, set
/// `failed` (the snapshot's guest cannot be refreshed).
fn refresh_guest(
    client: &mut AgentClient,
    failed: &AtomicBool,
    start: Instant,
) -> Result<(), AgentError> {
    if let Err(e) = client.refresh() {
        failed.store(true, Ordering::Release);
        return Err(e);
    }
    debug!(
        "sandbox: guest clock and RNG refreshed at {} ms",
        start.elapsed().as_millis()
    );
    Ok(())
}

/// What the agent-client thread of `flint run` does before the command.
pub(super) enum FirstStep {
    /// Nothing: the guest booted just now.
    Nothing,
    /// Refresh the restored guest; on failure, set the flag.
    Refresh(Arc<AtomicBool>),
    /// Let the booted guest be snapshotted ([`ClientResult::ReadyForSnapshot`]), then go on
    /// once [`AgentThread::snapshot_done`] says so.
    Template,
}

/// The agent-client thread of `flint run`, as the supervising thread sees it.
pub(super) struct AgentThread {
    /// Readable whenever the thread has sent something on `results`.
    pub done: EventFd,
    pub results: mpsc::Receiver<ClientResult>,
    /// The command's signaller, once it runs.
    pub signaller: mpsc::Receiver<Signaller>,
    /// Tells the thread, after [`ClientResult::ReadyForSnapshot`], that the guest may go on.
    pub snapshot_done: mpsc::Sender<()>,
    /// A pool member's command, once its job came (after [`ClientResult::Connected`]).
    pub job: mpsc::Sender<ExecSpec>,
}

impl AgentThread {
    /// Start the thread that runs `options`' command through the agent at `uds`, `spec`, or
    /// without one (a pool member), the one sent on [`AgentThread::job`] after it reported
    /// [`ClientResult::Connected`]. It is started before the VMM thread restricts itself
    /// (threads inherit filters), with its own filter.
    pub(super) fn spawn(
        uds: &Path,
        options: &RunOptions,
        spec: Option<ExecSpec>,
        first: FirstStep,
        start: Instant,
    ) -> Result<AgentThread, SetupError> {
        let done = EventFd::new(EFD_NONBLOCK).map_err(SetupError::EventFd)?;
        let done_writer = done.try_clone().map_err(SetupError::EventFd)?;
        let (result_tx, result_rx) = mpsc::channel();
        let (signaller_tx, signaller_rx) = mpsc::channel();
        let (snapshot_done_tx, snapshot_done_rx) = mpsc::channel();
        let (job_tx, job_rx) = mpsc::channel();
        let work = match spec {
            Some(spec) => Work::Now(spec),
            None => {
                let connected_tx = result_tx.clone();
                let connected_writer = done_writer.try_clone().map_err(SetupError::EventFd)?;
                Work::Later(Box::new(move || {
                    let _ = connected_tx.send(ClientResult::Connected);
                    let _ = connected_writer.write(1);
                    job_rx.recv().ok()
                }))
            }
        };
        let prepare = match first {
            FirstStep::Nothing => Prepare::Nothing,
            FirstStep::Refresh(failed) => Prepare::Refresh { failed },
            FirstStep::Template => {
                let ready_tx = result_tx.clone();
                let ready_writer = done_writer.try_clone().map_err(SetupError::EventFd)?;
                Prepare::Template {
                    ready: Box::new(move |refreshable| {
                        let _ = ready_tx.send(ClientResult::ReadyForSnapshot(refreshable));
                        let _ = ready_writer.write(1);
                    }),
                    done: snapshot_done_rx,
                }
            }
        };
        let copies = Copies {
            copy_in: options.copy_in.clone(),
            copy_out: options.copy_out.clone(),
            copy_out_limit: options.copy_out_limit,
        };
        // Only a run that copies files out may create files on the host.
        let copies_out = !copies.copy_out.is_empty();
        let client_uds = uds.to_path_buf();
        thread::Builder::new()
            .name("agent-client".into())
            .spawn(move || {
                let result = match crate::seccomp::agent_client(copies_out).install() {
                    Err(e) => ClientResult::Failed(AgentError::Remote(e.to_string())),
                    Ok(()) => {
                        match drive_agent(&client_uds, work, &copies, &signaller_tx, prepare, start)
                        {
                            Ok(status) => ClientResult::Finished(status),
                            Err(e) => ClientResult::Failed(e),
                        }
                    }
                };
                let _ = result_tx.send(result);
                let _ = done_writer.write(1);
            })
            .map_err(SetupError::ClientThread)?;
        Ok(AgentThread {
            done,
            results: result_rx,
            signaller: signaller_rx,
            snapshot_done: snapshot_done_tx,
            job: job_tx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::reads_nothing;
    use std::os::fd::AsRawFd;

    /// Only /dev/null and a closed descriptor skip the stdin forwarder: a pipe, a file or a
    /// terminal-like character device (/dev/zero has data) is forwarded.
    #[test]
    fn only_an_input_without_data_goes_without_a_forwarder() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(reads_nothing(null.as_raw_fd()));
        let zero = std::fs::File::open("/dev/zero").unwrap();
        assert!(!reads_nothing(zero.as_raw_fd()));
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(!reads_nothing(file.as_raw_fd()));
        let (reader, _writer) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!reads_nothing(reader.as_raw_fd()));
        // Above any open file limit: never open.
        assert!(reads_nothing(1 << 30), "a closed descriptor reads nothing");
    }
}
