//! `flint run` and `flint exec`: run a command in a throwaway microVM (or a running one)
//! through the guest agent, stream its output, and exit with its status.
//!
//! `flint run` goes through phases, a module each: [`machine`] makes the sandbox's VM
//! configuration from the [`RunOptions`] and obtains its VM, restored from the snapshot
//! template of a booted sandbox or booted; [`agent`] runs the command through the guest agent
//! on a thread of its own; [`supervise`] waits for the command, the VM's end or the timeout
//! and turns what happened into flint's exit status; [`console`] keeps the guest's console in
//! a capped log whose last lines a failure shows. With `--image`, [`image`] first makes the
//! container image into the read-only disk the sandbox mounts, and the command that runs in it.
//! [`pool`] keeps sandboxes made this way warm, each waiting for one command
//! (`flint pool`, `flint run --pool`).

mod agent;
mod console;
mod image;
pub(crate) mod image_cache;
mod machine;
pub mod nat;
pub mod pod;
pub mod podnet;
pub mod pool;
mod supervise;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flint_agent::AgentError;
use vmm::NetConfig;

use agent::{
    drive_agent, exec_spec, image_exec_spec, AgentThread, Copies, FirstStep, Prepare, Work,
};

/// Exit status when the command timed out (the VM is killed first), as `timeout(1)` does.
pub const STATUS_TIMEOUT: u8 = 124;
/// Exit status when the sandbox itself failed: the VM could not start, the agent could not be
/// reached, or a copy failed. The command's own statuses are passed through unchanged.
pub const STATUS_SANDBOX_FAILED: u8 = 125;
/// Exit status when the command could not be started (not found, not executable, bad working
/// directory), as a shell reports it.
pub const STATUS_NOT_STARTED: u8 = 127;

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
    /// The sandbox initramfs (busybox and the agent).
    pub initramfs: Option<PathBuf>,
    /// A container image whose files the command runs in.
    pub image: Option<flint_image::ImageRef>,
    /// Registries (`HOST[:PORT]`) that `image` may be pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// With `image`: `USER[:GROUP]` to run as.
    pub user: Option<String>,
    /// With `image`: a replacement for its Entrypoint (empty: none).
    pub entrypoint: Option<String>,
    /// With `image`: the size in bytes of a throwaway disk for the overlay's writes.
    pub scratch: Option<u64>,
    pub rootfs: Option<PathBuf>,
    /// Limits on the root disk (`--rootfs IMAGE,bw=N,iops=N`).
    pub rootfs_rate_limiter: Option<vmm::RateLimiterConfig>,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub timeout: Option<Duration>,
    /// The sandbox's network, if any.
    pub net: Option<SandboxNet>,
    pub copy_in: Vec<(PathBuf, String)>,
    pub copy_out: Vec<(String, PathBuf)>,
    /// The most bytes all copy-outs together may bring to the host (`--copy-out-limit`).
    pub copy_out_limit: u64,
    pub command: CommandOptions,
    /// Boot the guest even when a snapshot of a booted sandbox could be restored.
    pub cold: bool,
    /// No balloon: the memory the guest frees stays with the sandbox (`--no-page-reporting`).
    pub no_page_reporting: bool,
}

/// A sandbox's network (`flint run --net`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxNet {
    /// A NIC on a host TAP, with its MAC and bandwidth limit if given.
    Tap(NetConfig),
    /// Outbound IPv4 and DNS through NAT on the host (`--net nat`), in a network namespace
    /// of the sandbox's own.
    Nat(nat::NatOptions),
}

/// `flint exec` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    pub api_sock: PathBuf,
    pub command: CommandOptions,
}

/// Why `flint run` could not get as far as running the command.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("the {what} {} does not exist (build it with {hint}, or pass it explicitly)", path.display())]
    MissingImage {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("cannot create a temporary directory: {0}")]
    WorkDir(std::io::Error),
    #[error("cannot copy the root file system {}: {source}", path.display())]
    CopyRootfs {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Named by the command-line option it is about.
    #[error("{}", crate::commands::config_error(.0))]
    Config(#[from] vmm::ConfigError),
    #[error("cannot create the console log: {0}")]
    ConsoleLog(std::io::Error),
    #[error(transparent)]
    Vm(#[from] vmm::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start the agent client: {0}")]
    ClientThread(std::io::Error),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Nat(#[from] nat::NatError),
}

fn sandbox_failed(message: &dyn std::fmt::Display) -> ExitCode {
    ExitCode::from(sandbox_failure(message))
}

/// Say why the sandbox failed; [`STATUS_SANDBOX_FAILED`].
fn sandbox_failure(message: &dyn std::fmt::Display) -> u8 {
    eprintln!("flint: error: {message}");
    STATUS_SANDBOX_FAILED
}

/// `$FLINT_CACHE` (see [`crate::cache_dir`]).
fn cache_dir() -> PathBuf {
    crate::cache_dir()
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

/// `flint run`.
pub fn run(options: &RunOptions, start: Instant) -> ExitCode {
    crate::lean::restart_without_malloc_cache();
    no_transparent_huge_pages();
    crate::lean::prepare();
    match run_sandbox(options, start) {
        Ok(code) => code,
        Err(e) => sandbox_failed(&e),
    }
}

/// Keep this process's memory in small pages. Where the host backs anonymous memory with
/// transparent huge pages whenever it can (`always`), a thread's 2 MiB stack mapping that
/// happens to span an aligned 2 MiB block is filled with a whole huge page at its first
/// touch: in about a third of sandboxes 2 MiB more resident memory for a few KiB of stack.
/// A sandbox's guest memory is its template's file (never huge pages) or, booted, memory
/// the guest's free page reporting returns in pieces smaller than a huge page. Best effort:
/// a host without the call just keeps its default.
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes nothing but this
    // process's huge page policy.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        log::debug!(
            "sandbox: cannot turn transparent huge pages off: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A sandbox made as far as its VM, not started yet: the first part of `flint run`, and all of
/// a pool member's preparation.
struct Sandbox {
    vm: machine::SandboxVm,
    config: vmm::VmConfig,
    /// The guest's console is not shown: the command's output is. Kept for diagnostics.
    console_log: PathBuf,
    /// With `--image`: the image's command, with the user's overrides.
    image_spec: Option<flint_agent::ExecSpec>,
    /// With `--image`: held while the sandbox runs (the image is in use).
    _image: Option<image::Prepared>,
    // Dropped after the VM (declared after it): its TAP goes first, then the rest.
    _nat: Option<nat::Nat>,
    _work: WorkDir,
}

impl Sandbox {
    /// Make the VM configuration from `options` and obtain the VM, restored or booted.
    fn prepare(options: &RunOptions, start: Instant) -> Result<Sandbox, SetupError> {
        let cache = cache_dir();
        let (kernel, initramfs) = machine::images(options, &cache)?;
        let prepared = match &options.image {
            Some(reference) => Some(image::prepare(
                reference,
                &cache,
                &image::overrides(options),
                &flint_image::PullOptions {
                    insecure: options.insecure_registries.clone(),
                    ..Default::default()
                },
            )?),
            None => None,
        };
        let work = WorkDir::create().map_err(SetupError::WorkDir)?;
        let nat = match &options.net {
            Some(SandboxNet::Nat(nat)) => Some(nat::Nat::setup(nat)?),
            _ => None,
        };
        let scratch = match options.scratch {
            Some(bytes) => Some(image::make_scratch(&work.0, bytes)?),
            None => None,
        };
        let disks = machine::ImageDisks {
            image: prepared.as_ref().map(|p| p.disk.as_path()),
            scratch: scratch.as_deref(),
        };
        let config = machine::vm_config(options, &kernel, initramfs, &disks, &work.0)?;
        let console_log = work.0.join("console.log");
        let vm = match &nat {
            // The TAP is the one in the sandbox's network namespace.
            Some(nat) => {
                nat.inside(|| machine::obtain(options, &cache, &config, &console_log, start))??
            }
            None => machine::obtain(options, &cache, &config, &console_log, start)?,
        };
        Ok(Sandbox {
            vm,
            config,
            console_log,
            image_spec: prepared.as_ref().map(|p| image_exec_spec(&p.spec)),
            _image: prepared,
            _nat: nat,
            _work: work,
        })
    }

    /// What the agent client does first: refresh a restored guest, let a booted one be
    /// snapshotted for later runs, or nothing.
    fn first_step(&self) -> FirstStep {
        match (&self.vm.restored, &self.vm.staging) {
            (Some(restored), _) => FirstStep::Refresh(restored.refresh_failed.clone()),
            (None, Some(_)) => FirstStep::Template,
            (None, None) => FirstStep::Nothing,
        }
    }
}

/// `flint run` once it has a VM configuration, a VM and an agent client; setting those up can
/// fail, what happens after is an exit status.
fn run_sandbox(options: &RunOptions, start: Instant) -> Result<ExitCode, SetupError> {
    let mut sandbox = Sandbox::prepare(options, start)?;
    let spec = sandbox
        .image_spec
        .take()
        .unwrap_or_else(|| exec_spec(&options.command));
    let first = sandbox.first_step();
    let uds = machine::agent_socket(&sandbox.config);
    let client = AgentThread::spawn(uds, options, Some(spec), first, start)?;
    let machine::SandboxVm {
        mut vm,
        restored,
        staging,
    } = sandbox.vm;
    vm.start(&crate::seccomp::vmm_thread())?;
    // The VM is restored or booted and runs: the deep and allocation-heavy part is over.
    crate::lean::release_setup_memory();
    let outcome = supervise::supervise(&vm, &client, staging, options.timeout, None, start);
    Ok(ExitCode::from(supervise::conclude(
        outcome,
        vm,
        &client,
        restored.as_ref(),
        &sandbox.console_log,
        options.timeout,
        start,
    )))
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
        Work::Now(spec),
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
    use super::console::{console_tail, console_to, CONSOLE_LOG_MAX, CONSOLE_TAIL_LINES};
    use super::*;
    use flint_agent::{AgentClient, CopyOutBudget};
    use std::thread;

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
            // Looking at stdin before the command, as drive_agent does.
            use std::os::fd::AsRawFd;
            assert!(!super::agent::reads_nothing(host.as_raw_fd()));
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
