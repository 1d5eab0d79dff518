//! `flint run` and `flint exec`: run a command in a throwaway microVM (or a running one)
//! through the guest agent, stream its output, and exit with its status.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use log::debug;

use flint_agent::poll::wait_readable;
use flint_agent::{AgentClient, AgentError, CommandStatus, CopyOutBudget, ExecSpec, AGENT_PORT};
use vmm::{ConsoleIo, DriveConfig, Ending, NetConfig, Vm, VmConfig, VsockConfig};

use crate::template::{Staging, Template};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Exit status when the command timed out (the VM is killed first), as `timeout(1)` does.
pub const STATUS_TIMEOUT: u8 = 124;
/// Exit status when the sandbox itself failed: the VM could not start, the agent could not be
/// reached, or a copy failed. The command's own statuses are passed through unchanged.
pub const STATUS_SANDBOX_FAILED: u8 = 125;
/// Exit status when the command could not be started (not found, not executable, bad working
/// directory), as a shell reports it.
pub const STATUS_NOT_STARTED: u8 = 127;
/// How long the guest gets to boot and start its agent.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// The guest's vsock context id inside a `flint run` sandbox.
const SANDBOX_CID: u64 = 3;
/// Kernel command line of sandboxes: a silent console (it is not shown) and quick reboots.
/// ACPI stays on: with it, a sandbox restored from the template gets a new VM generation ID
/// and its kernel reseeds its random number generator by itself.
const SANDBOX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet \
                               i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// What the command runs with, common to `run` and `exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOptions {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
}

/// `flint run` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    pub kernel: Option<PathBuf>,
    pub image: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    /// Limits on the root disk (`--rootfs IMAGE,bw=N,iops=N`).
    pub rootfs_rate_limiter: Option<vmm::RateLimiterConfig>,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub timeout: Option<Duration>,
    /// A NIC on a host TAP, with its MAC and bandwidth limit if given.
    pub net: Option<NetConfig>,
    pub copy_in: Vec<(PathBuf, String)>,
    pub copy_out: Vec<(String, PathBuf)>,
    /// The most bytes all copy-outs together may bring to the host (`--copy-out-limit`).
    pub copy_out_limit: u64,
    pub command: CommandOptions,
    /// Boot the guest even when a snapshot of a booted sandbox could be restored.
    pub cold: bool,
}

/// `flint exec` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    pub api_sock: PathBuf,
    pub command: CommandOptions,
}

fn sandbox_failed(message: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("flint: error: {message}");
    ExitCode::from(STATUS_SANDBOX_FAILED)
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("FLINT_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/flint"),
    }
}

/// A private directory for the sandbox's sockets and disk copies, removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> std::io::Result<WorkDir> {
        let base = std::env::temp_dir();
        for attempt in 0..100u32 {
            let dir = base.join(format!("flint-run-{}-{attempt}", std::process::id()));
            // Private from the start: no moment when others could enter it.
            let made =
                std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                    .create(&dir);
            match made {
                Ok(()) => return Ok(WorkDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free temporary directory name"))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn exec_spec(command: &CommandOptions) -> ExecSpec {
    let mut spec = ExecSpec::new(command.argv.iter().cloned());
    spec.env = command.env.clone();
    spec.workdir = command.workdir.clone();
    spec
}

/// What the agent-client thread reports.
enum ClientResult {
    Finished(CommandStatus),
    Failed(AgentError),
    /// The agent answered and the connection is closed again: the booted guest can be
    /// snapshotted now, if its agent accepted a refresh (the value). The client waits for
    /// the snapshot before it connects again.
    ReadyForSnapshot(bool),
}

/// What the agent client does between connecting and running the command.
enum Prepare {
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
struct Copies {
    /// Host file, guest path: before the command.
    copy_in: Vec<(PathBuf, String)>,
    /// Guest path, host file: after the command.
    copy_out: Vec<(String, PathBuf)>,
    /// The most bytes all copy-outs together may bring.
    copy_out_limit: u64,
}

/// Run one command through the agent: copies in, the command, copies out.
fn drive_agent(
    uds: &Path,
    spec: &ExecSpec,
    copies: &Copies,
    signaller: &mpsc::Sender<flint_agent::Signaller>,
    prepare: Prepare,
    start: Instant,
) -> Result<CommandStatus, AgentError> {
    let mut client = AgentClient::connect(uds, AGENT_PORT, AGENT_CONNECT_TIMEOUT)?;
    debug!(
        "sandbox: agent connected at {} ms",
        start.elapsed().as_millis()
    );
    match prepare {
        Prepare::Nothing => {}
        Prepare::Refresh { failed } => {
            if let Err(e) = client.refresh() {
                failed.store(true, Ordering::Release);
                return Err(e);
            }
            debug!(
                "sandbox: guest clock and RNG refreshed at {} ms",
                start.elapsed().as_millis()
            );
        }
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
    let _ = signaller.send(client.signaller());
    for (host, guest) in &copies.copy_in {
        client.copy_in(host, Path::new(guest))?;
    }
    let stdin: Option<Box<dyn Read + Send>> = Some(Box::new(std::io::stdin()));
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

/// Whether a VM restored with `restored` is the sandbox `want` describes: the same kernel,
/// image, command line and machine, a vsock device, and no disk or NIC (whose backends a
/// snapshot would open).
fn same_sandbox(restored: &VmConfig, want: &VmConfig) -> bool {
    restored.kernel == want.kernel
        && restored.initrd == want.initrd
        && restored.cmdline == want.cmdline
        && restored.vcpus == want.vcpus
        && restored.mem_mib == want.mem_mib
        && restored.entropy == want.entropy
        && restored.drives.is_empty()
        && restored.nets.is_empty()
        && restored.vsock.as_ref().map(|v| v.guest_cid) == Some(SANDBOX_CID)
}

/// Most bytes of the guest's console kept in a sandbox's console log: the guest decides how
/// much it prints, the host's disk is not its to fill.
const CONSOLE_LOG_MAX: u64 = 1 << 20;
/// How much of the console log's end is read to show its last lines.
const CONSOLE_TAIL_BYTES: u64 = 16 * 1024;
/// How many of the console log's last lines a failure shows.
const CONSOLE_TAIL_LINES: usize = 20;

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
fn console_to(path: &Path) -> Result<ConsoleIo, String> {
    let file =
        std::fs::File::create(path).map_err(|e| format!("cannot create the console log: {e}"))?;
    Ok(ConsoleIo {
        output: Box::new(CappedLog::new(file, CONSOLE_LOG_MAX)),
        input: None,
        escape: false,
    })
}

/// Restore the sandbox VM from `template` (its vsock socket moved to `uds`); `None`, with the
/// template discarded, when that fails.
fn restore(template: &Template, want: &VmConfig, console_log: &Path, start: Instant) -> Option<Vm> {
    let uds = &want
        .vsock
        .as_ref()
        .expect("a sandbox has a vsock device")
        .uds_path;
    let (state, memory) = template.files()?;
    let console = console_to(console_log).ok()?;
    let mut move_socket = |config: &mut VmConfig| {
        if let Some(vsock) = config.vsock.as_mut() {
            vsock.uds_path = uds.to_path_buf();
        }
    };
    match Vm::restore(&state, &memory, &mut move_socket, console, start) {
        Ok((vm, config)) if same_sandbox(&config, want) => Some(vm),
        Ok(_) => {
            log::warn!("sandbox: the snapshot is not of this sandbox's VM; booting instead");
            template.discard();
            None
        }
        Err(e) => {
            log::warn!("sandbox: cannot restore the snapshot ({e}); booting instead");
            template.discard();
            None
        }
    }
}

/// `flint run`.
pub fn run(options: &RunOptions, start: Instant) -> ExitCode {
    let cache = cache_dir();
    let kernel = options
        .kernel
        .clone()
        .unwrap_or_else(|| cache.join("guest/vmlinux"));
    let image = options
        .image
        .clone()
        .unwrap_or_else(|| cache.join("sandbox/initramfs.cpio.gz"));
    for (what, path, hint) in [
        ("guest kernel", &kernel, "resources/build-guest-kernel.sh"),
        ("sandbox image", &image, "resources/build-sandbox-image.sh"),
    ] {
        let needed = options.rootfs.is_none() || what == "guest kernel";
        if needed && !path.is_file() {
            return sandbox_failed(&format!(
                "the {what} {} does not exist (build it with {hint}, or pass it explicitly)",
                path.display()
            ));
        }
    }
    let work = match WorkDir::create() {
        Ok(w) => w,
        Err(e) => return sandbox_failed(&format!("cannot create a temporary directory: {e}")),
    };
    let uds = work.0.join("vsock.sock");
    let mut config = VmConfig::new(&kernel);
    config.cmdline = SANDBOX_CMDLINE.to_string();
    config.vcpus = options.vcpus;
    config.mem_mib = options.mem_mib;
    config.vsock = Some(VsockConfig {
        guest_cid: SANDBOX_CID,
        uds_path: uds.clone(),
    });
    if let Some(net) = &options.net {
        config.nets.push(net.clone());
    }
    match &options.rootfs {
        // A private copy: the image itself is never modified.
        Some(rootfs) => {
            let copy = work.0.join("rootfs.img");
            if let Err(e) = std::fs::copy(rootfs, &copy) {
                return sandbox_failed(&format!(
                    "cannot copy the root file system {}: {e}",
                    rootfs.display()
                ));
            }
            let mut drive = DriveConfig::new(copy);
            drive.root = true;
            drive.rate_limiter = options.rootfs_rate_limiter;
            config.drives.push(drive);
        }
        None => config.initrd = Some(image),
    }
    if let Err(e) = config.validate() {
        return sandbox_failed(&e);
    }

    // The guest's console is not shown: the command's output is. Keep it for diagnostics.
    let console_log = work.0.join("console.log");
    // With the default image and no network, restore a snapshot of a booted sandbox (made by
    // the first such run) instead of booting.
    let template = (!options.cold && options.rootfs.is_none() && options.net.is_none())
        .then(|| Template::for_config(&cache, &config))
        .and_then(|t| {
            t.map_err(|e| log::warn!("sandbox: no snapshot cache: {e}"))
                .ok()
        });
    let restored = template
        .as_ref()
        .and_then(|t| restore(t, &config, &console_log, start));
    let refresh_failed = Arc::new(AtomicBool::new(false));
    let restored_from = restored.as_ref().and(template.clone());
    let prepare_first = if restored.is_some() {
        debug!("sandbox: restored at {} ms", start.elapsed().as_millis());
        Prepare::Refresh {
            failed: refresh_failed.clone(),
        }
    } else {
        Prepare::Nothing
    };
    let mut vm = match restored {
        Some(vm) => vm,
        None => {
            let console = match console_to(&console_log) {
                Ok(c) => c,
                Err(e) => return sandbox_failed(&e),
            };
            match Vm::build(&config, console, start) {
                Ok(vm) => vm,
                Err(e) => return sandbox_failed(&e),
            }
        }
    };
    // A booted guest is snapshotted once its agent answers, for the runs after this one.
    let mut staging = template
        .filter(|_| matches!(prepare_first, Prepare::Nothing))
        .and_then(|t| {
            t.prepare()
                .map_err(|e| log::warn!("sandbox: cannot make a snapshot for later runs: {e}"))
                .ok()
        });

    // The agent client runs on its own thread, started before the VMM thread restricts
    // itself (threads inherit filters), with its own filter.
    let done = match EventFd::new(EFD_NONBLOCK) {
        Ok(e) => e,
        Err(e) => return sandbox_failed(&format!("cannot create an eventfd: {e}")),
    };
    let done_writer = match done.try_clone() {
        Ok(e) => e,
        Err(e) => return sandbox_failed(&format!("cannot create an eventfd: {e}")),
    };
    let (result_tx, result_rx) = mpsc::channel();
    let (signaller_tx, signaller_rx) = mpsc::channel();
    let (snapshot_done_tx, snapshot_done_rx) = mpsc::channel();
    let prepare = match &staging {
        Some(_) => {
            let ready_tx = result_tx.clone();
            let ready_writer = match done_writer.try_clone() {
                Ok(e) => e,
                Err(e) => return sandbox_failed(&format!("cannot create an eventfd: {e}")),
            };
            Prepare::Template {
                ready: Box::new(move |refreshable| {
                    let _ = ready_tx.send(ClientResult::ReadyForSnapshot(refreshable));
                    let _ = ready_writer.write(1);
                }),
                done: snapshot_done_rx,
            }
        }
        None => prepare_first,
    };
    let spec = exec_spec(&options.command);
    let copies = Copies {
        copy_in: options.copy_in.clone(),
        copy_out: options.copy_out.clone(),
        copy_out_limit: options.copy_out_limit,
    };
    // Only a run that copies files out may create files on the host.
    let copies_out = !copies.copy_out.is_empty();
    let client_uds = uds.clone();
    let client = thread::Builder::new()
        .name("agent-client".into())
        .spawn(move || {
            let result = match crate::seccomp::agent_client(copies_out).install() {
                Err(e) => ClientResult::Failed(AgentError::Remote(e.to_string())),
                Ok(()) => {
                    match drive_agent(&client_uds, &spec, &copies, &signaller_tx, prepare, start) {
                        Ok(status) => ClientResult::Finished(status),
                        Err(e) => ClientResult::Failed(e),
                    }
                }
            };
            let _ = result_tx.send(result);
            let _ = done_writer.write(1);
        });
    if let Err(e) = client {
        return sandbox_failed(&format!("cannot start the agent client: {e}"));
    }
    if let Err(e) = vm.start(&crate::seccomp::vmm_thread()) {
        return sandbox_failed(&e);
    }

    let deadline = options.timeout.map(|t| Instant::now() + t);
    let mut command_status = None;
    let mut client_error = None;
    let ending = loop {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        wait_readable(&[vm.ending_event(), &done], timeout);
        // Drain the counter: the client may report more than once.
        let _ = done.read();
        let mut result = result_rx.try_recv().ok();
        if let Some(ClientResult::ReadyForSnapshot(refreshable)) = result {
            match staging.take() {
                Some(staging) if refreshable => make_template(&vm, staging, start),
                Some(_) => log::warn!(
                    "sandbox: the guest agent cannot refresh a restored guest (rebuild the \
                     sandbox image with resources/build-sandbox-image.sh): no snapshot is made, \
                     every run boots"
                ),
                None => {}
            }
            let _ = snapshot_done_tx.send(());
            result = result_rx.try_recv().ok();
        }
        if let Some(result) = result {
            match result {
                ClientResult::ReadyForSnapshot(_) => {}
                // Once the status and the copies are in, nothing in the throwaway guest
                // matters: stop it rather than wait for it to power off.
                ClientResult::Finished(status) => {
                    debug!("sandbox: status in at {} ms", start.elapsed().as_millis());
                    command_status = Some(status);
                    break None;
                }
                ClientResult::Failed(e) => {
                    client_error = Some(e);
                    break None;
                }
            }
        }
        if let Some(ending) = vm.ending() {
            debug!(
                "sandbox: the VM ended at {} ms",
                start.elapsed().as_millis()
            );
            break Some(ending);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let outcome = vm.shutdown(Ending::Signal(libc::SIGALRM));
            drop(outcome);
            eprintln!(
                "flint: error: the command did not finish within {} s; the VM was stopped",
                options.timeout.unwrap_or_default().as_secs()
            );
            return ExitCode::from(STATUS_TIMEOUT);
        }
    };
    match ending {
        Some(Ending::Signal(sig)) => {
            // Ctrl-C (or a stop signal): kill the command, then the VM. Never wait for the
            // connection: the VM stops next whatever happens.
            if let Ok(signaller) = signaller_rx.try_recv() {
                let _ = signaller.try_signal(libc::SIGKILL);
            }
            vm.shutdown(Ending::Signal(sig));
            eprintln!("flint: stopped the sandbox on signal {sig}");
            return ExitCode::from(128u8.saturating_add(sig as u8));
        }
        Some(Ending::Reset) => {
            // The guest powered off (the command may have rebooted it). The client may still
            // be reporting; wait for it briefly.
            if command_status.is_none() && client_error.is_none() {
                match result_rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(ClientResult::Finished(s)) => command_status = Some(s),
                    Ok(ClientResult::Failed(e)) => client_error = Some(e),
                    Ok(ClientResult::ReadyForSnapshot(_)) | Err(_) => {}
                }
            }
            vm.shutdown(Ending::Reset);
        }
        Some(other) => {
            vm.shutdown(other.clone());
            log_console_tail(&console_log, true);
            let reason = match other {
                Ending::Fault { vcpu, reason } => format!("vCPU {vcpu}: {reason}"),
                Ending::ConsoleQuit => "the console asked to quit".to_string(),
                _ => "it ended".to_string(),
            };
            return sandbox_failed(&format!(
                "the sandbox VM stopped before the command finished: {reason}"
            ));
        }
        None => {
            vm.shutdown(Ending::Reset);
        }
    }
    debug!("sandbox: VM stopped at {} ms", start.elapsed().as_millis());
    if refresh_failed.load(Ordering::Acquire) {
        if let Some(template) = &restored_from {
            template.discard();
            log::warn!("sandbox: the restored guest could not be refreshed; its snapshot was discarded, the next run boots");
        }
    }
    match client_error {
        // The command itself could not start (not found, not executable...): as a shell.
        Some(e @ AgentError::NotStarted(_)) => {
            eprintln!("flint: error: {e}");
            return ExitCode::from(STATUS_NOT_STARTED);
        }
        Some(e) => {
            log_console_tail(&console_log, command_status.is_none());
            return sandbox_failed(&e);
        }
        None => {}
    }
    match command_status {
        Some(status) => ExitCode::from(status.code().clamp(0, 255) as u8),
        None => sandbox_failed(&"the guest powered off before the command reported its status"),
    }
}

/// Snapshot the booted sandbox into `template` (pausing it meanwhile). A failure is logged:
/// this run goes on, and the next one boots again.
fn make_template(vm: &Vm, staging: Staging, start: Instant) {
    let began = Instant::now();
    let made = staging.commit(|state, memory| {
        vm.pause().map_err(|e| e.to_string())?;
        let written = vm.snapshot(state, memory).map_err(|e| e.to_string());
        vm.resume();
        written
    });
    match made {
        Ok(()) => debug!(
            "sandbox: snapshot of the booted guest made in {} ms (at {} ms)",
            began.elapsed().as_millis(),
            start.elapsed().as_millis()
        ),
        Err(e) => log::warn!("sandbox: cannot snapshot the booted sandbox for later runs: {e}"),
    }
}

/// On failure, show what the guest printed last (it may say why).
fn log_console_tail(path: &Path, failed: bool) {
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
fn console_tail(path: &Path) -> Vec<String> {
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

/// Ask a running flint's API for its vsock socket.
fn vsock_path(api_sock: &Path) -> Result<PathBuf, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(api_sock).map_err(|e| {
        format!(
            "cannot connect to the API socket {}: {e}",
            api_sock.display()
        )
    })?;
    stream
        .write_all(b"GET /vm/config HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("cannot talk to the API socket {}: {e}", api_sock.display()))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| {
        format!(
            "cannot read from the API socket {}: {e}",
            api_sock.display()
        )
    })?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or("the API answered something that is not HTTP")?;
    let json: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("the API's /vm/config is not JSON: {e}"))?;
    json.get("vsock")
        .and_then(|v| v.get("uds_path"))
        .and_then(|p| p.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| {
            format!(
                "the VM behind {} has no vsock device, so it has no agent to run commands",
                api_sock.display()
            )
        })
}

/// `flint exec`.
pub fn exec(options: &ExecOptions) -> ExitCode {
    let uds = match vsock_path(&options.api_sock) {
        Ok(p) => p,
        Err(e) => return sandbox_failed(&e),
    };
    let (signaller_tx, _signaller_rx) = mpsc::channel();
    let spec = exec_spec(&options.command);
    match drive_agent(
        &uds,
        &spec,
        &Copies::default(),
        &signaller_tx,
        // The VM may have been loaded from a snapshot: its clock and random state would be
        // the snapshot's. Cheap, and harmless for a VM that booted.
        Prepare::RefreshIfSupported,
        Instant::now(),
    ) {
        Ok(status) => ExitCode::from(status.code().clamp(0, 255) as u8),
        Err(e @ AgentError::NotStarted(_)) => {
            eprintln!("flint: error: {e}");
            ExitCode::from(STATUS_NOT_STARTED)
        }
        Err(e) => sandbox_failed(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flint-sandbox-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The copy-out bounds (socket timeouts, the umask from /proc, removing a partial file)
    /// need nothing the agent-client thread's seccomp filter forbids: a forbidden call would
    /// stop the test process.
    #[test]
    fn bounded_copy_outs_run_under_the_agent_client_filter() {
        use flint_agent::protocol::write_message;
        use flint_agent::FromAgent;
        use std::os::unix::net::UnixStream;
        let dir = scratch("seccomp-copy-out");
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = thread::spawn(move || {
            let mut request = [0u8; 64];
            let _ = guest.read(&mut request);
            write_message(&mut guest, &FromAgent::FileData(vec![1; 10])).unwrap();
            write_message(&mut guest, &FromAgent::FileEnd { mode: 0o6777 }).unwrap();
            let _ = guest.read(&mut request);
            // Over the budget.
            write_message(&mut guest, &FromAgent::FileData(vec![2; 100])).unwrap();
            let _ = std::io::copy(&mut guest, &mut std::io::sink());
        });
        let out = dir.clone();
        let client = thread::spawn(move || {
            assert!(vmm::seccomp::enabled());
            crate::seccomp::agent_client(true).install().unwrap();
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            assert!(status.contains("Seccomp:\t2"), "no filter on this thread");
            let mut client = AgentClient::from_stream(host).unwrap();
            let mut budget = CopyOutBudget::new(50, Duration::from_secs(30));
            client
                .copy_out_within(Path::new("/a"), &out.join("a"), &mut budget)
                .unwrap();
            client
                .copy_out_within(Path::new("/b"), &out.join("b"), &mut budget)
                .unwrap_err()
        });
        let e = client.join().unwrap();
        assert!(matches!(e, AgentError::CopyOutTooLarge { .. }), "{e:?}");
        agent.join().unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join("a")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o7022, 0, "{mode:o}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A run without copy-outs opens host files read-only only: reading a --copy-in file needs
    /// nothing more (a forbidden call would stop the test process).
    #[test]
    fn copy_ins_run_under_the_read_only_agent_client_filter() {
        use flint_agent::protocol::{read_message, write_message};
        use flint_agent::{FromAgent, ToAgent};
        use std::os::unix::net::UnixStream;
        let dir = scratch("seccomp-copy-in");
        let file = dir.join("in");
        std::fs::write(&file, b"hello").unwrap();
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = thread::spawn(move || {
            let mut data = Vec::new();
            loop {
                match read_message::<ToAgent, _>(&mut guest).unwrap() {
                    Some(ToAgent::FileData(d)) => data.extend(d),
                    Some(ToAgent::FileEnd) | None => break,
                    Some(_) => {}
                }
            }
            write_message(&mut guest, &FromAgent::Ok).unwrap();
            data
        });
        let client = thread::spawn(move || {
            crate::seccomp::agent_client(false).install().unwrap();
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            assert!(status.contains("Seccomp:\t2"), "no filter on this thread");
            let mut client = AgentClient::from_stream(host).unwrap();
            client.copy_in(&file, Path::new("/data/in"))
        });
        client.join().unwrap().unwrap();
        assert_eq!(agent.join().unwrap(), b"hello");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_work_directory_is_private_and_goes_away() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let one = WorkDir::create().unwrap();
        let two = WorkDir::create().unwrap();
        assert_ne!(one.0, two.0);
        let meta = std::fs::symlink_metadata(&one.0).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        // SAFETY: geteuid has no preconditions.
        assert_eq!(meta.uid(), unsafe { libc::geteuid() });
        let path = one.0.clone();
        drop(one);
        assert!(!path.exists());
    }

    #[test]
    fn a_guest_printing_forever_fills_at_most_the_console_log_cap() {
        let dir = scratch("console-cap");
        let path = dir.join("console.log");
        let mut console = console_to(&path).unwrap().output;
        let line = [b'y'; 4095];
        // 64 MiB of output, as a guest running `yes` would print.
        for _ in 0..16 * 1024 {
            console.write_all(&line).unwrap();
            console.write_all(b"\n").unwrap();
        }
        console.flush().unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(
            (CONSOLE_LOG_MAX..CONSOLE_LOG_MAX + 100).contains(&size),
            "the console log has {size} bytes"
        );
        let tail = console_tail(&path);
        assert_eq!(
            tail.last().map(String::as_str),
            Some("[flint: the console log is full; later output is dropped]")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_console_tail_reads_only_the_end_and_defuses_escapes() {
        let dir = scratch("console-tail");
        let path = dir.join("console.log");
        // A huge (sparse) log: reading it whole would take 64 GiB of memory.
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 << 30).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        for i in 0..30 {
            writeln!(file, "line {i}").unwrap();
        }
        writeln!(file, "\x1b]0;owned\x07\x1b[2Jlast\tline").unwrap();
        drop(file);
        let tail = console_tail(&path);
        assert_eq!(tail.len(), CONSOLE_TAIL_LINES);
        assert_eq!(tail[0], "line 11");
        assert_eq!(tail[CONSOLE_TAIL_LINES - 1], "?]0;owned??[2Jlast\tline");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(console_tail(&path).is_empty(), "a missing log has no tail");
    }
}
