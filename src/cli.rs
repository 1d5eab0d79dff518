//! Command-line parsing: turns arguments into a [`Command`], with one-sentence errors.

use std::path::PathBuf;

use vmm::config::{DEFAULT_CMDLINE, DEFAULT_MEM_MIB, DEFAULT_VCPUS};
use vmm::{DriveConfig, NetConfig, RateLimiterConfig, TokenBucketConfig, VmConfig, VsockConfig};

use crate::api_mode::ApiOptions;
use crate::jail::{CgroupVersion, JailOptions, Rlimit, DEFAULT_CHROOT_BASE};
use crate::sandbox::{CommandOptions, ExecOptions, RunOptions};

/// What the user asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Print this help text and exit.
    Help(String),
    Version,
    Boot(VmConfig),
    /// Serve the REST API and/or boot from a config file.
    Api(ApiOptions),
    /// Run a command in a throwaway microVM.
    Run(Box<RunOptions>),
    /// Run a command in a running microVM.
    Exec(ExecOptions),
    /// Run flint in a jail.
    Jail(JailOptions),
}

/// Where the API socket goes when a config file is given without `--api-sock` or `--no-api`.
pub const DEFAULT_API_SOCK: &str = "/run/flint.socket";

/// A command line that cannot be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("no command given (see 'flint --help')")]
    NoCommand,
    #[error("unknown command '{0}' (see 'flint --help')")]
    UnknownCommand(String),
    #[error("unknown option '{option}' for 'flint {command}' (see 'flint {command} --help')")]
    UnknownOption {
        command: &'static str,
        option: String,
    },
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("{option} takes a whole number, not '{value}'")]
    NotANumber { option: &'static str, value: String },
    #[error("{0} was given more than once")]
    Repeated(&'static str),
    #[error(
        "--no-api needs --config-file: without the API, the VM can only be configured from a file"
    )]
    NoApiWithoutConfig,
    #[error("--no-api and --api-sock contradict each other")]
    NoApiWithSocket,
    #[error(
        "'flint {0}' needs a command after --, as in 'flint {0} [OPTIONS] -- COMMAND [ARG]...'"
    )]
    NoCommandToRun(&'static str),
    #[error("{option} takes KEY=VALUE, not '{value}'")]
    EnvSpec { option: &'static str, value: String },
    #[error("{option} takes {form}, not '{value}'")]
    CopySpec {
        option: &'static str,
        form: &'static str,
        value: String,
    },
    #[error("unknown --rootfs option '{0}' (expected bw=BYTES_PER_SEC or iops=N)")]
    RootfsOption(String),
    #[error("--rootfs needs a path before its options, as in --rootfs IMAGE[,bw=BYTES_PER_SEC][,iops=N]")]
    RootfsPath,
    #[error("'flint exec' needs --api-sock PATH (the API socket of the running VM)")]
    NoApiSock,
    #[error("{0} must be an absolute path inside the guest")]
    GuestPath(String),
    #[error("'flint boot' needs --kernel PATH")]
    NoKernel,
    #[error("--disk needs a path before its options, as in --disk PATH[,ro][,root][,id=NAME]")]
    DiskPath,
    #[error(
        "unknown --disk option '{0}' (expected ro, root, id=NAME, bw=BYTES_PER_SEC or iops=N)"
    )]
    DiskOption(String),
    #[error(
        "--net needs tap=NAME, as in --net tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,bw=BYTES_PER_SEC]; got '{0}'"
    )]
    NetSpec(String),
    #[error("{option} {key}= must be a whole number from 1 to {max}, not '{value}'")]
    Rate {
        option: &'static str,
        key: &'static str,
        value: String,
        max: u64,
    },
    #[error("--net: {0}")]
    NetMac(vmm::MacError),
    #[error("--vsock needs cid=N,uds=PATH; got '{0}'")]
    VsockSpec(String),
    #[error("'flint jail' needs {0}")]
    JailNeeds(&'static str),
    #[error("the jail id '{0}' must be 1 to 64 letters, digits and dashes")]
    JailId(String),
    #[error("'flint jail' needs a non-zero --uid: the jailed flint must not run as root")]
    JailRootUid,
    #[error("--cgroup-version takes 1 or 2, not '{0}'")]
    CgroupVersion(String),
    #[error("--cgroup takes FILE=VALUE with a cgroup file name such as memory.max, not '{0}'")]
    CgroupSpec(String),
    #[error("--rlimit takes RESOURCE=N[,RESOURCE=N]... with RESOURCE one of nofile, fsize, nproc, core, as, memlock; got '{0}'")]
    RlimitSpec(String),
    #[error("--file {0} must be an absolute path without '.' or '..'")]
    JailFile(String),
    #[error("{option} takes a size in bytes with an optional K, M or G suffix (powers of 1024), as in 512M, not '{value}'")]
    Size { option: &'static str, value: String },
}

/// A size in bytes: digits, optionally followed by `K`, `M` or `G` (KiB, MiB, GiB).
fn parse_size(option: &'static str, value: &str) -> Result<u64, CliError> {
    let bad = || CliError::Size {
        option,
        value: value.to_string(),
    };
    let (digits, unit) = match value.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => value.split_at(i),
        None => (value, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// A per-second rate given as `key=N` to `option`: a bucket of N tokens refilled in 1 s.
fn parse_rate(
    option: &'static str,
    key: &'static str,
    value: &str,
) -> Result<TokenBucketConfig, CliError> {
    // Anything above this is no limit worth asking for; it also keeps the arithmetic small.
    const MAX: u64 = 1 << 50;
    match value.parse::<u64>() {
        Ok(n) if (1..=MAX).contains(&n) && !value.starts_with('+') => {
            Ok(TokenBucketConfig::per_second(n))
        }
        _ => Err(CliError::Rate {
            option,
            key,
            value: value.to_string(),
            max: MAX,
        }),
    }
}

/// Parse `tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,bw=BYTES_PER_SEC]`. `bw` limits each direction
/// (receive and transmit) to that many frame bytes a second.
fn parse_net(spec: &str) -> Result<NetConfig, CliError> {
    let mut tap = None;
    let mut mac = None;
    let mut bw = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() && tap.is_none() => tap = Some(name),
            Some(("mac", m)) if mac.is_none() => {
                let parsed = vmm::parse_mac(m).map_err(CliError::NetMac)?;
                mac = Some(parsed);
            }
            Some(("bw", n)) if bw.is_none() => bw = Some(parse_rate("--net", "bw", n)?),
            _ => return Err(CliError::NetSpec(spec.to_string())),
        }
    }
    let tap = tap.ok_or_else(|| CliError::NetSpec(spec.to_string()))?;
    let limiter = bw.map(|b| RateLimiterConfig {
        bandwidth: Some(b),
        ops: None,
    });
    Ok(NetConfig {
        mac,
        rx_rate_limiter: limiter,
        tx_rate_limiter: limiter,
        ..NetConfig::new(tap)
    })
}

/// Parse `cid=N,uds=PATH`.
fn parse_vsock(spec: &str) -> Result<VsockConfig, CliError> {
    let bad = || CliError::VsockSpec(spec.to_string());
    let mut cid = None;
    let mut uds = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("cid", n)) if cid.is_none() => cid = Some(n.parse().map_err(|_| bad())?),
            Some(("uds", p)) if uds.is_none() && !p.is_empty() => uds = Some(PathBuf::from(p)),
            _ => return Err(bad()),
        }
    }
    Ok(VsockConfig {
        guest_cid: cid.ok_or_else(bad)?,
        uds_path: uds.ok_or_else(bad)?,
    })
}

/// Parse `PATH[,ro][,root][,id=NAME][,bw=BYTES_PER_SEC][,iops=N]`.
fn parse_disk(spec: &str) -> Result<DriveConfig, CliError> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or(CliError::DiskPath)?;
    let mut drive = DriveConfig::new(path);
    let mut limiter = RateLimiterConfig::default();
    for opt in parts {
        if parse_limit("--disk", opt, &mut limiter)? {
            continue;
        }
        match (opt, opt.split_once('=')) {
            ("ro", _) => drive.read_only = true,
            ("root", _) => drive.root = true,
            (_, Some(("id", id))) => drive.id = Some(id.to_string()),
            _ => return Err(CliError::DiskOption(opt.to_string())),
        }
    }
    drive.rate_limiter = (!limiter.is_unlimited()).then_some(limiter);
    Ok(drive)
}

/// Parse `flint run --rootfs IMAGE[,bw=BYTES_PER_SEC][,iops=N]`: the image and its limits.
fn parse_rootfs(spec: &str) -> Result<(PathBuf, Option<RateLimiterConfig>), CliError> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or(CliError::RootfsPath)?;
    let mut limiter = RateLimiterConfig::default();
    for opt in parts {
        if !parse_limit("--rootfs", opt, &mut limiter)? {
            return Err(CliError::RootfsOption(opt.to_string()));
        }
    }
    Ok((path.into(), (!limiter.is_unlimited()).then_some(limiter)))
}

/// Apply a block device's `bw=BYTES_PER_SEC` or `iops=N` option of `option` to `limiter`;
/// false when `opt` is neither.
fn parse_limit(
    option: &'static str,
    opt: &str,
    limiter: &mut RateLimiterConfig,
) -> Result<bool, CliError> {
    match opt.split_once('=') {
        Some(("bw", n)) => limiter.bandwidth = Some(parse_rate(option, "bw", n)?),
        Some(("iops", n)) => limiter.ops = Some(parse_rate(option, "iops", n)?),
        _ => return Ok(false),
    }
    Ok(true)
}

fn main_help() -> String {
    format!(
        "flint {version}: a KVM-based microVM monitor

Usage:
  flint boot --kernel PATH [OPTIONS]   boot a guest kernel on the serial console
  flint run [OPTIONS] -- COMMAND [ARG]...
                                       run a command in a throwaway microVM and exit with
                                       its status ('flint run --help')
  flint exec --api-sock PATH [OPTIONS] -- COMMAND [ARG]...
                                       run a command in a running microVM
  flint --api-sock PATH [--config-file FILE] [--id ID]
                                       serve the REST API (Firecracker-compatible) on a
                                       Unix socket; configure and start the VM through it
  flint --config-file FILE [--no-api | --api-sock PATH] [--id ID]
                                       boot the VM a JSON config file describes (same schema
                                       as the API bodies); the API is served on PATH (default
                                       {DEFAULT_API_SOCK}) unless --no-api
  flint jail --id ID --uid UID --gid GID [OPTIONS] -- FLINT_ARGS...
                                       run flint in a chroot with its own namespaces and
                                       cgroup as an unprivileged user ('flint jail --help')
  flint --help | --version

Run 'flint boot --help' for the boot options.
",
        version = env!("CARGO_PKG_VERSION")
    )
}

fn boot_help() -> String {
    format!(
        "Usage: flint boot --kernel PATH [OPTIONS]

Boot a Linux guest and connect its serial console to this terminal. Input is forwarded; a
terminal is put in raw mode until flint exits, so Ctrl-C goes to the guest: type Ctrl-A x
to stop the VM from the console (Ctrl-A Ctrl-A sends one Ctrl-A).

Options:
  --kernel PATH     guest kernel: uncompressed ELF vmlinux (PVH entry used when present)
                    or bzImage
  --initrd PATH     initial RAM disk
  --cmdline STRING  kernel command line (default: \"{DEFAULT_CMDLINE}\")
  --vcpus N         number of vCPUs, 1-254 and at most what the host's KVM allows
                    (default: {DEFAULT_VCPUS})
  --memory MIB      guest memory in MiB, at least 64 (default: {DEFAULT_MEM_MIB})
  --disk PATH[,ro][,root][,id=NAME][,bw=BYTES_PER_SEC][,iops=N]
                    a virtio-blk disk on a raw image file (size a multiple of 512); ro:
                    read-only; root: the guest mounts it as / (root=/dev/vda); id: the
                    serial the guest reads (at most 20 characters); bw, iops: rate limits
                    in data bytes and requests per second (token buckets refilled over
                    1 s). Repeatable; the guest sees the root disk first, then the others
                    in order (vda, vdb, ...)
  --rootfs PATH     shorthand for --disk PATH,root
  --net tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,bw=BYTES_PER_SEC]
                    a virtio-net NIC on the host TAP device NAME (opened if it exists,
                    else created and removed at exit; needs CAP_NET_ADMIN); bw: limit
                    each direction (receive, transmit) to that many frame bytes per second
                    (token buckets refilled over 1 s). Repeatable; the default MAC is
                    06:46:4c followed by three bytes of a hash of NAME
  --vsock cid=N,uds=PATH
                    a virtio-vsock device with guest CID N (>= 3); host programs connect
                    to the Unix socket PATH and send \"CONNECT <port>\\n\" to reach a guest
                    port; guest connections to host port P go to PATH_P
  The guest always gets a virtio-rng entropy device (/dev/hwrng).
  --no-seccomp      do not install seccomp filters (debugging only: every flint thread
                    normally allows only the system calls it needs; a forbidden call stops
                    flint with status 159 and a line naming the call)
  -h, --help        print this help

Exit status: 0 when the guest reboots or powers off; 1 when flint cannot start the VM or a
vCPU fails (one line on stderr says why); 128+N when stopped by signal N (SIGINT, SIGTERM,
SIGHUP); 130 after Ctrl-A x. After the guest writes 123 to port 0x3f0, flint logs the time from its start.
Set FLINT_LOG=debug|info|warn|error|off to change how much flint logs (default: info).
"
    )
}

/// Parse the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, CliError> {
    let Some(first) = args.first() else {
        return Err(CliError::NoCommand);
    };
    match first.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help(main_help())),
        "-V" | "--version" => Ok(Command::Version),
        "boot" => parse_boot(&args[1..]),
        "run" => parse_run(&args[1..]),
        "exec" => parse_exec(&args[1..]),
        "jail" => parse_jail(&args[1..]),
        a if a.starts_with("--") => parse_api(args),
        other => Err(CliError::UnknownCommand(other.to_string())),
    }
}

/// Split `--name=value` or take the value from the next argument.
fn option_value<'a>(
    name: &'static str,
    inline: Option<&'a str>,
    rest: &mut impl Iterator<Item = &'a String>,
) -> Result<&'a str, CliError> {
    match inline {
        Some(v) => Ok(v),
        None => rest
            .next()
            .map(String::as_str)
            .ok_or(CliError::MissingValue(name)),
    }
}

fn set_once<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), CliError> {
    if slot.is_some() {
        return Err(CliError::Repeated(name));
    }
    *slot = Some(value);
    Ok(())
}

fn number<T: std::str::FromStr>(option: &'static str, value: &str) -> Result<T, CliError> {
    value.parse().map_err(|_| CliError::NotANumber {
        option,
        value: value.to_string(),
    })
}

fn run_help() -> String {
    format!(
        "Usage: flint run [OPTIONS] -- COMMAND [ARG]...

Start a throwaway microVM, run COMMAND in it through the guest agent, stream its stdout and
stderr to flint's own (separately), forward stdin, and exit with COMMAND's status. Nothing
is left behind: the VM, its sockets and temporary files are gone when flint exits.

With the default image and no network, the microVM is restored from a snapshot of a booted
sandbox (in $FLINT_CACHE/sandbox/snapshots, made by the first such run, remade whenever the
kernel, the image, flint, --vcpus or --memory change) instead of booting Linux: each
sandbox's memory is a private copy-on-write mapping of it, and its agent sets the guest's
clock and reseeds the guest's random number generator from the host before COMMAND runs.

Options:
  --kernel PATH        guest kernel (default: $FLINT_CACHE/guest/vmlinux, built by
                       resources/build-guest-kernel.sh; FLINT_CACHE defaults to ~/.cache/flint)
  --image PATH         sandbox initramfs with busybox and the agent (default:
                       $FLINT_CACHE/sandbox/initramfs.cpio.gz, resources/build-sandbox-image.sh);
                       the guest's root is a RAM file system, so the image is never modified
  --rootfs IMAGE[,bw=BYTES_PER_SEC][,iops=N]
                       boot from this ext4 image instead (its init must start flint-agent);
                       the guest writes to a private copy, never to IMAGE; bw, iops: limits
                       on the guest's disk
  --vcpus N            vCPUs (default: {DEFAULT_VCPUS})
  --memory MIB         guest memory in MiB (default: {DEFAULT_MEM_MIB})
  --timeout SECONDS    stop the VM and exit with 124 if COMMAND has not finished by then
  --net none|tap=NAME[,mac=MAC][,bw=BYTES_PER_SEC]
                       no network (default), or a NIC on the host TAP device NAME (bw limits
                       each direction)
  --env KEY=VALUE      set an environment variable for COMMAND (repeatable)
  --workdir DIR        COMMAND's working directory in the guest (default: /)
  --copy-in HOST:GUEST copy a host file into the guest before COMMAND runs (repeatable)
  --copy-out GUEST:HOST
                       copy a guest file out after COMMAND ends (repeatable); the host file
                       gets mode 0755 if the guest's is executable by its owner, else 0644,
                       less the umask; all copy-outs together must finish within {copy_out_s} s
  --copy-out-limit SIZE
                       the most bytes all copy-outs together may bring to the host, with an
                       optional K, M or G suffix (default: 1G); a copy that would go over
                       fails (status 125) and leaves no file behind
  --cold               boot the guest instead of restoring the snapshot (and make none)
  --no-seccomp         do not install seccomp filters (debugging only)

Exit status: COMMAND's status (128+N when signal N killed it); 124 when --timeout expired;
125 when the sandbox itself failed (one line on stderr says why); 127 when COMMAND could not
be started (not found, not executable); 128+N when flint was stopped by signal N (Ctrl-C
kills COMMAND, then the VM).
",
        copy_out_s = flint_agent::COPY_OUT_TIMEOUT.as_secs()
    )
}

fn exec_help() -> String {
    "Usage: flint exec --api-sock PATH [--env KEY=VALUE]... [--workdir DIR] -- COMMAND [ARG]...

Run COMMAND in the running microVM whose API socket is PATH (its guest must run flint-agent
and the VM must have a vsock device), like 'flint run' but without a new VM; any number of
times. First the agent sets the guest's clock from the host's and reseeds the guest's random
number generator (the VM may have been loaded from a snapshot). Exit status: COMMAND's, or 125
when flint cannot reach the agent.
"
    .to_string()
}

/// Split the arguments at `--`: options before, the command after.
fn split_command<'a>(
    args: &'a [String],
    command: &'static str,
) -> Result<(&'a [String], Vec<String>), CliError> {
    let dash = args
        .iter()
        .position(|a| a == "--")
        .ok_or(CliError::NoCommandToRun(command))?;
    let argv = args[dash + 1..].to_vec();
    if argv.is_empty() {
        return Err(CliError::NoCommandToRun(command));
    }
    Ok((&args[..dash], argv))
}

fn parse_env(value: &str) -> Result<(String, String), CliError> {
    match value.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') => Ok((k.to_string(), v.to_string())),
        _ => Err(CliError::EnvSpec {
            option: "--env",
            value: value.to_string(),
        }),
    }
}

fn guest_path(path: &str) -> Result<String, CliError> {
    if path.starts_with('/') {
        Ok(path.to_string())
    } else {
        Err(CliError::GuestPath(path.to_string()))
    }
}

/// Options shared by `run` and `exec`; `Ok(true)` when `name` was one of them.
fn command_option<'a>(
    name: &str,
    inline: Option<&'a str>,
    rest: &mut impl Iterator<Item = &'a String>,
    command: &mut CommandOptions,
) -> Result<bool, CliError> {
    match name {
        "--env" => {
            let v = option_value("--env", inline, rest)?;
            command.env.push(parse_env(v)?);
        }
        "--workdir" => {
            let v = option_value("--workdir", inline, rest)?;
            command.workdir = Some(guest_path(v)?);
        }
        _ => return Ok(false),
    }
    Ok(true)
}

fn parse_run(args: &[String]) -> Result<Command, CliError> {
    if args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-h" || a == "--help")
    {
        return Ok(Command::Help(run_help()));
    }
    let (opts, argv) = split_command(args, "run")?;
    let mut o = RunOptions {
        vcpus: DEFAULT_VCPUS,
        mem_mib: DEFAULT_MEM_MIB,
        copy_out_limit: flint_agent::COPY_OUT_LIMIT,
        ..RunOptions::default()
    };
    let mut rest = opts.iter();
    while let Some(arg) = rest.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg.as_str(), None),
        };
        if command_option(name, inline, &mut rest, &mut o.command)? {
            continue;
        }
        match name {
            "--kernel" => o.kernel = Some(option_value("--kernel", inline, &mut rest)?.into()),
            "--image" => o.image = Some(option_value("--image", inline, &mut rest)?.into()),
            "--rootfs" => {
                let (path, limiter) = parse_rootfs(option_value("--rootfs", inline, &mut rest)?)?;
                o.rootfs = Some(path);
                o.rootfs_rate_limiter = limiter;
            }
            "--vcpus" => o.vcpus = number("--vcpus", option_value("--vcpus", inline, &mut rest)?)?,
            "--memory" => {
                o.mem_mib = number("--memory", option_value("--memory", inline, &mut rest)?)?
            }
            "--timeout" => {
                let secs: u64 = number("--timeout", option_value("--timeout", inline, &mut rest)?)?;
                o.timeout = Some(std::time::Duration::from_secs(secs));
            }
            "--net" => {
                let v = option_value("--net", inline, &mut rest)?;
                o.net = match v {
                    "none" => None,
                    _ => Some(parse_net(v)?),
                };
            }
            "--copy-in" => {
                let v = option_value("--copy-in", inline, &mut rest)?;
                let bad = || CliError::CopySpec {
                    option: "--copy-in",
                    form: "HOST:GUEST",
                    value: v.to_string(),
                };
                let (host, guest) = v.split_once(':').ok_or_else(bad)?;
                if host.is_empty() {
                    return Err(bad());
                }
                o.copy_in.push((host.into(), guest_path(guest)?));
            }
            "--copy-out" => {
                let v = option_value("--copy-out", inline, &mut rest)?;
                let bad = || CliError::CopySpec {
                    option: "--copy-out",
                    form: "GUEST:HOST",
                    value: v.to_string(),
                };
                let (guest, host) = v.split_once(':').ok_or_else(bad)?;
                if host.is_empty() {
                    return Err(bad());
                }
                o.copy_out.push((guest_path(guest)?, host.into()));
            }
            "--copy-out-limit" => {
                let v = option_value("--copy-out-limit", inline, &mut rest)?;
                o.copy_out_limit = parse_size("--copy-out-limit", v)?;
            }
            "--no-seccomp" if inline.is_none() => vmm::seccomp::disable(),
            "--cold" if inline.is_none() => o.cold = true,
            _ => {
                return Err(CliError::UnknownOption {
                    command: "run",
                    option: arg.clone(),
                })
            }
        }
    }
    o.command.argv = argv;
    Ok(Command::Run(Box::new(o)))
}

fn parse_exec(args: &[String]) -> Result<Command, CliError> {
    if args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-h" || a == "--help")
    {
        return Ok(Command::Help(exec_help()));
    }
    let (opts, argv) = split_command(args, "exec")?;
    let mut command = CommandOptions::default();
    let mut api_sock = None;
    let mut rest = opts.iter();
    while let Some(arg) = rest.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg.as_str(), None),
        };
        if command_option(name, inline, &mut rest, &mut command)? {
            continue;
        }
        match name {
            "--api-sock" => {
                let v = option_value("--api-sock", inline, &mut rest)?;
                set_once(&mut api_sock, "--api-sock", PathBuf::from(v))?;
            }
            _ => {
                return Err(CliError::UnknownOption {
                    command: "exec",
                    option: arg.clone(),
                })
            }
        }
    }
    command.argv = argv;
    Ok(Command::Exec(ExecOptions {
        api_sock: api_sock.ok_or(CliError::NoApiSock)?,
        command,
    }))
}

fn jail_help() -> String {
    format!(
        "Usage: flint jail --id ID --uid UID --gid GID [OPTIONS] -- FLINT_ARGS...

Run 'flint FLINT_ARGS...' in a jail (needs root): a copy of flint in CHROOT_BASE/ID/root with
its own /dev (/dev/kvm, /dev/net/tun and /dev/urandom), its own mount, IPC, UTS, network and
PID namespaces, the cgroup flint/ID, rlimits, and the user UID:GID (who gets the jail root)
with no supplementary groups and no way to gain privileges. When it ends, the cgroup and
CHROOT_BASE/ID are removed and 'flint jail' exits with its status. SIGINT, SIGTERM and SIGHUP
are forwarded to it.

Options:
  --id ID                 the jail's name: 1 to 64 letters, digits and dashes; also the
                          hostname in the jail
  --uid UID, --gid GID    the user and group the jailed flint runs as (UID not 0)
  --chroot-base DIR       where jails go (default: {DEFAULT_CHROOT_BASE})
  --netns PATH            join this network namespace (e.g. /var/run/netns/NAME) instead
                          of a new, empty one
  --cgroup-version 1|2    the cgroup interface (default: 2 when /sys/fs/cgroup is cgroup2)
  --cgroup FILE=VALUE     write VALUE to FILE in the jail's cgroup, e.g. memory.max=268435456
                          or pids.max=64 (v1: memory.limit_in_bytes, cpu.cfs_quota_us);
                          repeatable (default: pids.max={pids_max} where the pids controller is)
  --rlimit RESOURCE=N[,RESOURCE=N]...
                          set limits (soft and hard) on nofile, fsize, nproc, core, as,
                          memlock; repeatable (default: nofile={nofile})
  --file HOST_PATH        copy this host file (e.g. the kernel) into the jail at the same
                          absolute path (not under /dev or /proc); repeatable

Exit status: the jailed flint's (128+N when signal N killed it); 1 when the jail cannot be
set up (one line on stderr says why).
",
        pids_max = crate::jail::DEFAULT_CGROUP_SETTINGS[0].1,
        nofile = crate::jail::DEFAULT_RLIMITS[0].1,
    )
}

fn parse_jail(args: &[String]) -> Result<Command, CliError> {
    if args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-h" || a == "--help")
    {
        return Ok(Command::Help(jail_help()));
    }
    let Some(dash) = args.iter().position(|a| a == "--") else {
        return Err(CliError::JailNeeds(
            "flint's arguments after --, as in 'flint jail --id ID --uid UID --gid GID -- boot --kernel PATH'",
        ));
    };
    let flint_args = args[dash + 1..].to_vec();
    if flint_args.is_empty() {
        return Err(CliError::JailNeeds(
            "flint's arguments after --, as in 'flint jail --id ID --uid UID --gid GID -- boot --kernel PATH'",
        ));
    }
    let mut id = None;
    let mut uid = None;
    let mut gid = None;
    let mut chroot_base = None;
    let mut netns = None;
    let mut cgroup_version = None;
    let mut cgroups = Vec::new();
    let mut rlimits = Vec::new();
    let mut files = Vec::new();
    let mut rest = args[..dash].iter();
    while let Some(arg) = rest.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg.as_str(), None),
        };
        match name {
            "--id" => {
                let v = option_value("--id", inline, &mut rest)?;
                if !crate::jail::valid_id(v) {
                    return Err(CliError::JailId(v.to_string()));
                }
                set_once(&mut id, "--id", v.to_string())?;
            }
            "--uid" => {
                let v = option_value("--uid", inline, &mut rest)?;
                set_once(&mut uid, "--uid", number::<u32>("--uid", v)?)?;
            }
            "--gid" => {
                let v = option_value("--gid", inline, &mut rest)?;
                set_once(&mut gid, "--gid", number::<u32>("--gid", v)?)?;
            }
            "--chroot-base" => {
                let v = option_value("--chroot-base", inline, &mut rest)?;
                set_once(&mut chroot_base, "--chroot-base", PathBuf::from(v))?;
            }
            "--netns" => {
                let v = option_value("--netns", inline, &mut rest)?;
                set_once(&mut netns, "--netns", PathBuf::from(v))?;
            }
            "--cgroup-version" => {
                let v = option_value("--cgroup-version", inline, &mut rest)?;
                let version = match v {
                    "1" => CgroupVersion::V1,
                    "2" => CgroupVersion::V2,
                    _ => return Err(CliError::CgroupVersion(v.to_string())),
                };
                set_once(&mut cgroup_version, "--cgroup-version", version)?;
            }
            "--cgroup" => {
                let v = option_value("--cgroup", inline, &mut rest)?;
                match v.split_once('=') {
                    Some((file, value))
                        if file.contains('.')
                            && !file.starts_with('.')
                            && !file.contains('/')
                            && !value.is_empty() =>
                    {
                        cgroups.push((file.to_string(), value.to_string()))
                    }
                    _ => return Err(CliError::CgroupSpec(v.to_string())),
                }
            }
            "--rlimit" => {
                let v = option_value("--rlimit", inline, &mut rest)?;
                for part in v.split(',') {
                    let limit = part
                        .split_once('=')
                        .and_then(|(r, n)| Some((Rlimit::from_name(r)?, n.parse::<u64>().ok()?)));
                    rlimits.push(limit.ok_or_else(|| CliError::RlimitSpec(v.to_string()))?);
                }
            }
            "--file" => {
                let v = option_value("--file", inline, &mut rest)?;
                let path = PathBuf::from(v);
                if !path.is_absolute()
                    || path.components().any(|c| {
                        matches!(
                            c,
                            std::path::Component::CurDir | std::path::Component::ParentDir
                        )
                    })
                {
                    return Err(CliError::JailFile(v.to_string()));
                }
                files.push(path);
            }
            _ => {
                return Err(CliError::UnknownOption {
                    command: "jail",
                    option: arg.clone(),
                })
            }
        }
    }
    let uid = uid.ok_or(CliError::JailNeeds("--uid UID"))?;
    if uid == 0 {
        return Err(CliError::JailRootUid);
    }
    Ok(Command::Jail(JailOptions {
        id: id.ok_or(CliError::JailNeeds("--id ID"))?,
        uid,
        gid: gid.ok_or(CliError::JailNeeds("--gid GID"))?,
        chroot_base: chroot_base.unwrap_or_else(|| PathBuf::from(DEFAULT_CHROOT_BASE)),
        netns,
        cgroup_version,
        cgroups,
        rlimits,
        files,
        flint_args,
    }))
}

fn parse_api(args: &[String]) -> Result<Command, CliError> {
    let mut api_sock = None;
    let mut config_file = None;
    let mut id = None;
    let mut no_api = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg.as_str(), None),
        };
        match name {
            "--api-sock" => {
                let v = option_value("--api-sock", inline, &mut rest)?;
                set_once(&mut api_sock, "--api-sock", PathBuf::from(v))?;
            }
            "--config-file" => {
                let v = option_value("--config-file", inline, &mut rest)?;
                set_once(&mut config_file, "--config-file", PathBuf::from(v))?;
            }
            "--id" => {
                let v = option_value("--id", inline, &mut rest)?;
                set_once(&mut id, "--id", v.to_string())?;
            }
            "--no-api" if inline.is_none() => no_api = true,
            "--no-seccomp" if inline.is_none() => vmm::seccomp::disable(),
            _ => return Err(CliError::UnknownCommand(arg.clone())),
        }
    }
    if no_api && api_sock.is_some() {
        return Err(CliError::NoApiWithSocket);
    }
    if no_api && config_file.is_none() {
        return Err(CliError::NoApiWithoutConfig);
    }
    if !no_api && api_sock.is_none() {
        api_sock = Some(PathBuf::from(DEFAULT_API_SOCK));
    }
    Ok(Command::Api(ApiOptions {
        api_sock,
        config_file,
        id: id.unwrap_or_else(|| "anonymous-instance".to_string()),
    }))
}

fn parse_boot(args: &[String]) -> Result<Command, CliError> {
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    let mut vcpus = None;
    let mut memory = None;
    let mut drives = Vec::new();
    let mut nets = Vec::new();
    let mut vsock = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg.as_str(), None),
        };
        match name {
            "-h" | "--help" => return Ok(Command::Help(boot_help())),
            "--no-seccomp" if inline.is_none() => vmm::seccomp::disable(),
            "--kernel" => {
                let v = option_value("--kernel", inline, &mut rest)?;
                set_once(&mut kernel, "--kernel", PathBuf::from(v))?;
            }
            "--initrd" => {
                let v = option_value("--initrd", inline, &mut rest)?;
                set_once(&mut initrd, "--initrd", PathBuf::from(v))?;
            }
            "--cmdline" => {
                let v = option_value("--cmdline", inline, &mut rest)?;
                set_once(&mut cmdline, "--cmdline", v.to_string())?;
            }
            "--vcpus" => {
                let v = option_value("--vcpus", inline, &mut rest)?;
                set_once(&mut vcpus, "--vcpus", number("--vcpus", v)?)?;
            }
            "--memory" => {
                let v = option_value("--memory", inline, &mut rest)?;
                set_once(&mut memory, "--memory", number("--memory", v)?)?;
            }
            "--disk" => {
                let v = option_value("--disk", inline, &mut rest)?;
                drives.push(parse_disk(v)?);
            }
            "--net" => {
                let v = option_value("--net", inline, &mut rest)?;
                nets.push(parse_net(v)?);
            }
            "--vsock" => {
                let v = option_value("--vsock", inline, &mut rest)?;
                set_once(&mut vsock, "--vsock", parse_vsock(v)?)?;
            }
            "--rootfs" => {
                let v = option_value("--rootfs", inline, &mut rest)?;
                let mut drive = DriveConfig::new(v);
                drive.root = true;
                drives.push(drive);
            }
            _ => {
                return Err(CliError::UnknownOption {
                    command: "boot",
                    option: arg.clone(),
                })
            }
        }
    }
    let mut config = VmConfig::new(kernel.ok_or(CliError::NoKernel)?);
    config.initrd = initrd;
    if let Some(c) = cmdline {
        config.cmdline = c;
    }
    if let Some(v) = vcpus {
        config.vcpus = v;
    }
    if let Some(m) = memory {
        config.mem_mib = m;
    }
    config.drives = drives;
    config.nets = nets;
    config.vsock = vsock;
    Ok(Command::Boot(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    fn boot(s: &[&str]) -> Result<VmConfig, CliError> {
        let mut all = vec!["boot"];
        all.extend_from_slice(s);
        match parse(&args(&all))? {
            Command::Boot(c) => Ok(c),
            other => panic!("expected boot, got {other:?}"),
        }
    }

    #[test]
    fn boot_with_defaults() {
        let c = boot(&["--kernel", "/k"]).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
    }

    #[test]
    fn boot_with_every_option_in_both_spellings() {
        let c = boot(&[
            "--kernel=/k",
            "--initrd",
            "/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--vcpus=4",
            "--memory",
            "2048",
        ])
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.initrd, Some(PathBuf::from("/i")));
        assert_eq!(c.cmdline, "console=ttyS0 quiet");
        assert_eq!((c.vcpus, c.mem_mib), (4, 2048));
    }

    #[test]
    fn cmdline_values_may_contain_equals_signs() {
        let c = boot(&["--kernel", "/k", "--cmdline", "root=/dev/vda rw"]).unwrap();
        assert_eq!(c.cmdline, "root=/dev/vda rw");
        let c = boot(&["--kernel", "/k", "--cmdline=a=b c=d"]).unwrap();
        assert_eq!(c.cmdline, "a=b c=d");
    }

    #[test]
    fn bad_command_lines_get_one_sentence() {
        let cases: &[(&[&str], CliError)] = &[
            (&[], CliError::NoCommand),
            (&["frob"], CliError::UnknownCommand("frob".into())),
            (&["boot"], CliError::NoKernel),
            (&["boot", "--kernel"], CliError::MissingValue("--kernel")),
            (
                &["boot", "--kernel", "/k", "--vcpus", "two"],
                CliError::NotANumber {
                    option: "--vcpus",
                    value: "two".into(),
                },
            ),
            (
                &["boot", "--kernel", "/k", "--memory", "-5"],
                CliError::NotANumber {
                    option: "--memory",
                    value: "-5".into(),
                },
            ),
            (
                &["boot", "--kernel", "/k", "--kernel", "/j"],
                CliError::Repeated("--kernel"),
            ),
            (
                &["boot", "--kernel", "/k", "--frobnicate", "x"],
                CliError::UnknownOption {
                    command: "boot",
                    option: "--frobnicate".into(),
                },
            ),
            (
                &["boot", "--kernel", "/k", "--disk", ",ro"],
                CliError::DiskPath,
            ),
            (
                &["boot", "--kernel", "/k", "--disk", "/d,rw"],
                CliError::DiskOption("rw".into()),
            ),
        ];
        for (argv, want) in cases {
            let got = parse(&args(argv)).unwrap_err();
            assert_eq!(&got, want, "for {argv:?}");
            assert!(!got.to_string().contains('\n'));
        }
    }

    #[test]
    fn disk_and_net_rate_limits() {
        let c = boot(&[
            "--kernel",
            "/k",
            "--disk",
            "/a.img,bw=1048576,iops=100,ro",
            "--disk=/b.img,iops=5",
            "--net",
            "tap=t0,bw=125000",
        ])
        .unwrap();
        let per_sec = |size| TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        assert_eq!(
            c.drives[0].rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: Some(per_sec(1 << 20)),
                ops: Some(per_sec(100)),
            })
        );
        assert!(c.drives[0].read_only);
        assert_eq!(
            c.drives[1].rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: None,
                ops: Some(per_sec(5)),
            })
        );
        let want = Some(RateLimiterConfig {
            bandwidth: Some(per_sec(125_000)),
            ops: None,
        });
        assert_eq!(c.nets[0].rx_rate_limiter, want);
        assert_eq!(c.nets[0].tx_rate_limiter, want);
        assert_eq!(
            boot(&["--kernel", "/k", "--disk", "/a.img"])
                .unwrap()
                .drives[0]
                .rate_limiter,
            None
        );
        for (option, spec) in [
            ("--disk", "/a,bw=0"),
            ("--disk", "/a,iops=-1"),
            ("--disk", "/a,bw=1k"),
            ("--disk", "/a,iops="),
            ("--disk", "/a,bw=+5"),
            ("--disk", "/a,bw=99999999999999999999"),
            ("--net", "tap=t,bw=0"),
        ] {
            let err = boot(&["--kernel", "/k", option, spec]).unwrap_err();
            assert!(matches!(err, CliError::Rate { .. }), "{spec}: {err:?}");
            assert!(err.to_string().starts_with(option), "{err}");
        }
        assert!(matches!(
            boot(&["--kernel", "/k", "--net", "tap=t,bw=5,bw=6"]),
            Err(CliError::NetSpec(_))
        ));
        assert!(matches!(
            boot(&["--kernel", "/k", "--net", "tap=t,iops=5"]),
            Err(CliError::NetSpec(_))
        ));
    }

    #[test]
    fn disks_in_every_form() {
        let c = boot(&[
            "--kernel",
            "/k",
            "--disk",
            "/a.img",
            "--disk=/b.img,ro,id=data",
            "--rootfs",
            "/root.ext4",
        ])
        .unwrap();
        let want = vec![
            DriveConfig::new("/a.img"),
            DriveConfig {
                read_only: true,
                id: Some("data".into()),
                ..DriveConfig::new("/b.img")
            },
            DriveConfig {
                root: true,
                ..DriveConfig::new("/root.ext4")
            },
        ];
        assert_eq!(c.drives, want);
        assert!(c.entropy);
    }

    #[test]
    fn nets_and_vsock() {
        let c = boot(&[
            "--kernel",
            "/k",
            "--net",
            "tap=tap0",
            "--net=tap=tap1,mac=02:00:00:00:00:01",
            "--vsock",
            "cid=3,uds=/tmp/v.sock",
        ])
        .unwrap();
        assert_eq!(
            c.nets,
            vec![
                NetConfig::new("tap0"),
                NetConfig {
                    mac: Some([2, 0, 0, 0, 0, 1]),
                    ..NetConfig::new("tap1")
                },
            ]
        );
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                guest_cid: 3,
                uds_path: "/tmp/v.sock".into()
            })
        );
        for bad in [
            "mac=02:00:00:00:00:01",
            "tap=",
            "tap=a,foo=b",
            "tap=a,tap=b",
        ] {
            assert!(
                matches!(
                    boot(&["--kernel", "/k", "--net", bad]),
                    Err(CliError::NetSpec(_))
                ),
                "{bad}"
            );
        }
        for bad in [
            "01:00:00:00:00:01",
            "00:00:00:00:00:00",
            "02:00:00:00:00",
            "zz:00:00:00:00:01",
        ] {
            let spec = format!("tap=t,mac={bad}");
            assert!(
                matches!(
                    boot(&["--kernel", "/k", "--net", &spec]),
                    Err(CliError::NetMac(_))
                ),
                "{bad}"
            );
        }
        for bad in ["cid=3", "uds=/x", "cid=x,uds=/x", "cid=3,uds=/x,extra=1"] {
            assert!(
                matches!(
                    boot(&["--kernel", "/k", "--vsock", bad]),
                    Err(CliError::VsockSpec(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn run_and_exec_options() {
        let run = |argv: &[&str]| match parse(&args(argv)) {
            Ok(Command::Run(o)) => Ok(o),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let o = run(&[
            "run",
            "--memory",
            "256",
            "--timeout=5",
            "--env",
            "A=b=c",
            "--workdir",
            "/tmp",
            "--copy-in",
            "/h/in:/g/in",
            "--copy-out",
            "/g/out:/h/out",
            "--net",
            "tap=t0",
            "--",
            "sh",
            "-c",
            "echo --env",
        ])
        .unwrap();
        assert_eq!(o.mem_mib, 256);
        assert_eq!(o.timeout, Some(std::time::Duration::from_secs(5)));
        assert_eq!(o.command.env, vec![("A".to_string(), "b=c".to_string())]);
        assert_eq!(o.command.workdir.as_deref(), Some("/tmp"));
        assert_eq!(o.command.argv, ["sh", "-c", "echo --env"]);
        assert_eq!(
            o.copy_in,
            vec![(PathBuf::from("/h/in"), "/g/in".to_string())]
        );
        assert_eq!(
            o.copy_out,
            vec![("/g/out".to_string(), PathBuf::from("/h/out"))]
        );
        assert_eq!(o.net.as_ref().map(|n| n.tap.as_str()), Some("t0"));
        assert!(!o.cold, "restoring the snapshot is the default");
        assert!(run(&["run", "--cold", "--", "true"]).unwrap().cold);
        // Copy-outs are limited by default; --copy-out-limit takes K, M and G.
        assert_eq!(o.copy_out_limit, 1 << 30);
        for (value, bytes) in [
            ("0", 0),
            ("1000", 1000),
            ("4k", 4096),
            ("512M", 512 << 20),
            ("2G", 2 << 30),
        ] {
            let o = run(&["run", "--copy-out-limit", value, "--", "true"]).unwrap();
            assert_eq!(o.copy_out_limit, bytes, "{value}");
        }
        for bad in ["", "M", "1.5G", "-1", "1T", "1 G", "99999999999G"] {
            let e = run(&["run", &format!("--copy-out-limit={bad}"), "--", "true"]).unwrap_err();
            assert!(matches!(e, CliError::Size { .. }), "{bad}: {e:?}");
            assert!(e.to_string().contains("K, M or G"), "{e}");
        }
        assert_eq!(
            run(&["run", "true"]).unwrap_err(),
            CliError::NoCommandToRun("run")
        );
        assert_eq!(
            run(&["run", "--"]).unwrap_err(),
            CliError::NoCommandToRun("run")
        );
        assert!(matches!(
            run(&["run", "--env", "noequals", "--", "x"]),
            Err(CliError::EnvSpec { .. })
        ));
        assert!(matches!(
            run(&["run", "--copy-in", "nocolon", "--", "x"]),
            Err(CliError::CopySpec { .. })
        ));
        assert_eq!(
            run(&["run", "--copy-in", "/h:relative", "--", "x"]).unwrap_err(),
            CliError::GuestPath("relative".into())
        );
        assert_eq!(
            run(&["run", "--net", "eth0", "--", "x"]).unwrap_err(),
            CliError::NetSpec("eth0".into())
        );
        // Rate limits for the sandbox's NIC and root disk, as for flint boot.
        let o = run(&[
            "run",
            "--net",
            "tap=t1,mac=02:00:00:00:00:01,bw=1000000",
            "--rootfs",
            "/img,bw=2000000,iops=300",
            "--",
            "true",
        ])
        .unwrap();
        let net = o.net.unwrap();
        assert_eq!(net.tap, "t1");
        assert_eq!(net.mac, Some([2, 0, 0, 0, 0, 1]));
        let bw = Some(TokenBucketConfig::per_second(1_000_000));
        assert_eq!(net.rx_rate_limiter.unwrap().bandwidth, bw);
        assert_eq!(net.tx_rate_limiter.unwrap().bandwidth, bw);
        assert_eq!(o.rootfs, Some(PathBuf::from("/img")));
        let disk = o.rootfs_rate_limiter.unwrap();
        assert_eq!(
            disk.bandwidth,
            Some(TokenBucketConfig::per_second(2_000_000))
        );
        assert_eq!(disk.ops, Some(TokenBucketConfig::per_second(300)));
        assert_eq!(
            run(&["run", "--rootfs", "/img", "--", "true"])
                .unwrap()
                .rootfs_rate_limiter,
            None
        );
        assert_eq!(
            run(&["run", "--rootfs", "/img,ro", "--", "x"]).unwrap_err(),
            CliError::RootfsOption("ro".into())
        );
        // Errors name --rootfs, not the --disk option it resembles.
        let err = run(&["run", "--rootfs", "/img,bw=0", "--", "x"]).unwrap_err();
        assert!(
            matches!(
                err,
                CliError::Rate {
                    option: "--rootfs",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("--rootfs bw="), "{err}");
        for bad in [",bw=5", ""] {
            let err = run(&["run", "--rootfs", bad, "--", "x"]).unwrap_err();
            assert_eq!(err, CliError::RootfsPath);
            assert!(
                err.to_string().starts_with("--rootfs needs a path"),
                "{err}"
            );
        }
        assert_eq!(
            run(&["run", "--rootfs", "/img,id=x", "--", "x"]).unwrap_err(),
            CliError::RootfsOption("id=x".into())
        );
        match parse(&args(&[
            "exec",
            "--api-sock",
            "/s",
            "--env",
            "K=V",
            "--",
            "ls",
            "-l",
        ]))
        .unwrap()
        {
            Command::Exec(o) => {
                assert_eq!(o.api_sock, PathBuf::from("/s"));
                assert_eq!(o.command.argv, ["ls", "-l"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(&args(&["exec", "--", "ls"])).unwrap_err(),
            CliError::NoApiSock
        );
        assert!(matches!(
            parse(&args(&["run", "--help"])),
            Ok(Command::Help(_))
        ));
    }

    #[test]
    fn api_mode_options() {
        let api = |argv: &[&str]| match parse(&args(argv)) {
            Ok(Command::Api(o)) => Ok(o),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let o = api(&["--api-sock", "/tmp/f.sock"]).unwrap();
        assert_eq!(o.api_sock, Some(PathBuf::from("/tmp/f.sock")));
        assert_eq!(o.config_file, None);
        let o = api(&["--config-file=/c.json", "--no-api", "--id", "vm1"]).unwrap();
        assert_eq!((o.api_sock, o.id.as_str()), (None, "vm1"));
        let o = api(&["--config-file", "/c.json"]).unwrap();
        assert_eq!(o.api_sock, Some(PathBuf::from(DEFAULT_API_SOCK)));
        assert_eq!(
            api(&["--no-api"]).unwrap_err(),
            CliError::NoApiWithoutConfig
        );
        assert_eq!(
            api(&["--no-api", "--config-file", "/c", "--api-sock", "/s"]).unwrap_err(),
            CliError::NoApiWithSocket
        );
        assert_eq!(
            api(&["--api-sock", "/s", "--bogus"]).unwrap_err(),
            CliError::UnknownCommand("--bogus".into())
        );
    }

    fn jail(s: &[&str]) -> Result<JailOptions, CliError> {
        let mut all = vec!["jail"];
        all.extend_from_slice(s);
        match parse(&args(&all))? {
            Command::Jail(o) => Ok(o),
            other => panic!("expected jail, got {other:?}"),
        }
    }

    #[test]
    fn jail_options() {
        let o = jail(&[
            "--id",
            "vm-1",
            "--uid",
            "1000",
            "--gid=100",
            "--",
            "boot",
            "--kernel",
            "/k",
        ])
        .unwrap();
        assert_eq!(
            o,
            JailOptions {
                id: "vm-1".into(),
                uid: 1000,
                gid: 100,
                chroot_base: PathBuf::from("/srv/flint"),
                netns: None,
                cgroup_version: None,
                cgroups: vec![],
                rlimits: vec![],
                files: vec![],
                flint_args: args(&["boot", "--kernel", "/k"]),
            }
        );
        let o = jail(&[
            "--id=a",
            "--uid=1",
            "--gid=2",
            "--chroot-base",
            "/tmp/j",
            "--netns",
            "/var/run/netns/x",
            "--cgroup-version",
            "2",
            "--cgroup",
            "memory.max=268435456",
            "--cgroup=cpu.max=50000 100000",
            "--rlimit",
            "nofile=64,fsize=1000",
            "--rlimit=core=0",
            "--file",
            "/k",
            "--file=/d/disk.img",
            "--",
            "--id",
            "x",
        ])
        .unwrap();
        assert_eq!(o.chroot_base, PathBuf::from("/tmp/j"));
        assert_eq!(o.netns, Some(PathBuf::from("/var/run/netns/x")));
        assert_eq!(o.cgroup_version, Some(CgroupVersion::V2));
        assert_eq!(
            o.cgroups,
            vec![
                ("memory.max".to_string(), "268435456".to_string()),
                ("cpu.max".to_string(), "50000 100000".to_string())
            ]
        );
        assert_eq!(
            o.rlimits,
            vec![
                (Rlimit::NoFile, 64),
                (Rlimit::FSize, 1000),
                (Rlimit::Core, 0)
            ]
        );
        assert_eq!(
            o.files,
            vec![PathBuf::from("/k"), PathBuf::from("/d/disk.img")]
        );
        // Options after -- are flint's, not the jail's.
        assert_eq!(o.flint_args, args(&["--id", "x"]));
        assert!(matches!(
            parse(&args(&["jail", "--help"])),
            Ok(Command::Help(_))
        ));
    }

    #[test]
    fn bad_jail_command_lines_get_one_sentence() {
        let base = ["--id", "a", "--uid", "1", "--gid", "1"];
        let with = |extra: &[&str], tail: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            v.extend_from_slice(tail);
            jail(&v).unwrap_err().to_string()
        };
        let cases: Vec<(String, &str)> = vec![
            (
                with(&[], &[]),
                "'flint jail' needs flint's arguments after --",
            ),
            (
                with(&[], &["--"]),
                "'flint jail' needs flint's arguments after --",
            ),
            (
                jail(&["--id", "a", "--gid", "1", "--", "boot"])
                    .unwrap_err()
                    .to_string(),
                "'flint jail' needs --uid UID",
            ),
            (
                jail(&["--uid", "1", "--gid", "1", "--", "boot"])
                    .unwrap_err()
                    .to_string(),
                "'flint jail' needs --id ID",
            ),
            (
                jail(&["--id", "a", "--uid", "1", "--", "boot"])
                    .unwrap_err()
                    .to_string(),
                "'flint jail' needs --gid GID",
            ),
            (
                jail(&["--id", "a", "--uid", "0", "--gid", "1", "--", "boot"])
                    .unwrap_err()
                    .to_string(),
                "non-zero --uid",
            ),
            (
                jail(&["--id", "a/b", "--uid", "1", "--gid", "1", "--", "boot"])
                    .unwrap_err()
                    .to_string(),
                "the jail id 'a/b' must be 1 to 64 letters, digits and dashes",
            ),
            (
                with(&["--uid", "2"], &["--", "boot"]),
                "--uid was given more than once",
            ),
            (
                with(&["--cgroup-version", "3"], &["--", "boot"]),
                "--cgroup-version takes 1 or 2",
            ),
            (
                with(&["--cgroup", "memory"], &["--", "boot"]),
                "--cgroup takes FILE=VALUE",
            ),
            (
                with(&["--cgroup", "../x=1"], &["--", "boot"]),
                "--cgroup takes FILE=VALUE",
            ),
            (
                with(&["--rlimit", "nofile=x"], &["--", "boot"]),
                "--rlimit takes",
            ),
            (
                with(&["--rlimit", "stack=1"], &["--", "boot"]),
                "--rlimit takes",
            ),
            (
                with(&["--file", "k"], &["--", "boot"]),
                "--file k must be an absolute path",
            ),
            (
                with(&["--file", "/a/../b"], &["--", "boot"]),
                "must be an absolute path",
            ),
            (
                with(&["--bogus"], &["--", "boot"]),
                "unknown option '--bogus' for 'flint jail'",
            ),
            (
                with(&["--uid", "x"], &["--", "boot"]),
                "--uid takes a whole number",
            ),
        ];
        for (message, expected) in cases {
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
            assert!(!message.contains('\n'), "{message:?}");
        }
    }

    #[test]
    fn help_and_version() {
        assert!(
            matches!(parse(&args(&["--help"])), Ok(Command::Help(t)) if t.contains("flint boot"))
        );
        assert!(
            matches!(parse(&args(&["boot", "--kernel", "/k", "--help"])), Ok(Command::Help(t)) if t.contains("--memory MIB"))
        );
        assert_eq!(parse(&args(&["--version"])), Ok(Command::Version));
    }
}
