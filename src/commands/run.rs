//! `flint run`: run a command in a throwaway microVM.

use std::path::PathBuf;

use clap::Args;
use flint_image::ImageRef;
use vmm::config::{DEFAULT_MEM_MIB, DEFAULT_VCPUS};

use super::values::{self, RootImage};
use super::CommandArgs;
use crate::cli::{CliError, Command};
use crate::sandbox::pool::PoolRunOptions;
use crate::sandbox::{nat, RunOptions, SandboxNet};

pub(crate) const ABOUT: &str = "Run a command in a throwaway microVM and exit with its status";

pub(crate) fn after_help() -> String {
    format!(
        "\
Start a throwaway microVM, run COMMAND in it through the guest agent, stream its stdout and
stderr to flint's own (separately), forward stdin, and exit with COMMAND's status. Nothing is
left behind: the VM, its sockets and temporary files are gone when flint exits.

Without --rootfs, --net tap=... or --scratch, the microVM is restored from a snapshot of a booted
sandbox (in $FLINT_CACHE/sandbox/snapshots, made by the first such run, remade whenever the
kernel, the initramfs, the --image, flint, --vcpus or --memory change) instead of booting
Linux: each sandbox's memory is a private copy-on-write mapping of it, and its agent sets the
guest's clock and reseeds the guest's random number generator from the host before COMMAND
runs.

With --image, COMMAND runs in the container image's files, as `docker run` runs it: the
image's Entrypoint, then COMMAND (or the image's Cmd without one), its Env (--env adds or
replaces), WorkingDir (--workdir), and User (--user). The first run of an image imports it into
$FLINT_CACHE/images/store and builds a read-only ext4 disk of its files
($FLINT_CACHE/images/disks, needs mkfs.ext4 from e2fsprogs); later runs use that disk ('flint
image' lists, pulls, removes and prunes the cache). Each sandbox writes to its own overlay, so
the disk never changes. --copy-in and --copy-out paths are in the image's file system.

An image from a registry is pulled over HTTPS (plain HTTP only with --insecure-registry),
with the credentials 'docker login' or 'podman login' keep in $DOCKER_CONFIG/config.json
(default ~/.docker/config.json), resolving a multi-platform index to linux/amd64; every blob
is verified against its digest, and a download cut short resumes where it stopped. Later runs
of the same reference use the cached image ('flint image pull' updates it).

With --net nat, the guest's eth0 has {guest}/{prefix}, gateway {gw}, and name servers that
lead to the host's own (from /etc/resolv.conf, or systemd-resolved's upstream ones). flint
makes a network namespace for the sandbox, with the TAP and one end of a veth pair in it; the
other end, flvN, gets a /30 of 10.254.0.0/16 in the host's; an nftables table
flint_PID_STARTTIME_N masquerades the sandbox's traffic and keeps it from the host's own
addresses and from other sandboxes. It sets net.ipv4.ip_forward=1 (and leaves it so). All
of it is removed when flint ends; after a `kill -9` only the nftables table stays, and the
next `flint run --net nat` removes it. Each allow=CIDR[:PORT] lets the sandbox reach that
network (only TCP and UDP to PORT if given), host addresses included; with any allow=,
everything else but DNS is dropped. Restored snapshots work with --net nat.

Copy-outs (--copy-out) get mode 0755 on the host if the guest's file is executable by its
owner, else 0644, less the umask; all copy-outs together must finish within {copy_out_s} s.

With --pool PATH, COMMAND runs in a warm sandbox of the 'flint pool' listening on PATH (see
'flint pool --help'): no VM is restored or booted for it, so it starts sooner. Only --env,
--workdir and --timeout may go with it; the pool's options shape the VM. Stopping this flint
(or its end of the connection closing) stops COMMAND and that sandbox. Without a pool on PATH,
flint says so and exits with 125.

Exit status: COMMAND's status (128+N when signal N killed it); 124 when --timeout expired; 125
when the sandbox itself failed (one line on stderr says why); 127 when COMMAND could not be
started (not found, not executable); 128+N when flint was stopped by signal N (Ctrl-C kills
COMMAND, then the VM).",
        copy_out_s = flint_agent::COPY_OUT_TIMEOUT.as_secs(),
        guest = nat::GUEST_ADDR,
        prefix = nat::GUEST_PREFIX,
        gw = nat::GATEWAY,
    )
}

/// `--net none`, `--net nat[,allow=...]` or a NIC on a TAP.
#[derive(Debug, Clone)]
pub(crate) struct NetOrNone(Option<SandboxNet>);

fn net_or_none(spec: &str) -> Result<NetOrNone, CliError> {
    if spec == "none" {
        return Ok(NetOrNone(None));
    }
    if let Some(nat) = nat::parse(spec) {
        return Ok(NetOrNone(Some(SandboxNet::Nat(nat?))));
    }
    values::net(spec).map(|n| NetOrNone(Some(SandboxNet::Tap(n))))
}

/// The most a `--scratch` disk may have (1 TiB): the file is sparse, but a mistyped size
/// should not promise the guest a disk the host cannot hold.
const SCRATCH_MAX: u64 = 1 << 40;
/// The least a `--scratch` disk may have: room for ext4's own metadata and some writes.
const SCRATCH_MIN: u64 = 8 << 20;

/// `--scratch SIZE`: MiB without a suffix; in bytes.
fn scratch_size(value: &str) -> Result<u64, CliError> {
    let bytes = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value
            .parse::<u64>()
            .ok()
            .and_then(|mib| mib.checked_mul(1 << 20))
            .ok_or_else(|| CliError::Size {
                option: "--scratch",
                value: value.to_string(),
            })?
    } else {
        values::size("--scratch", value)?
    };
    if !(SCRATCH_MIN..=SCRATCH_MAX).contains(&bytes) {
        return Err(CliError::ScratchSize(value.to_string()));
    }
    Ok(bytes)
}

/// `--image REF`: an image in a registry or in a file (which must exist).
pub(crate) fn image_ref(value: &str) -> Result<ImageRef, CliError> {
    let looks_like_file = [".tar", ".tar.gz", ".tgz"]
        .iter()
        .any(|ext| value.ends_with(ext));
    match ImageRef::parse(value) {
        Ok(ImageRef::Registry(_)) if looks_like_file => {
            Err(CliError::ImageMissing(value.to_string()))
        }
        Ok(ImageRef::Layout(path) | ImageRef::Archive(path)) if !path.exists() => {
            Err(CliError::ImageMissing(value.to_string()))
        }
        Ok(image) => Ok(image),
        Err(e) => Err(CliError::ImageRef {
            value: value.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// `--insecure-registry HOST[:PORT]`: a registry as image references name it.
pub(crate) fn insecure_registry(value: &str) -> Result<String, CliError> {
    match flint_image::Reference::parse(&format!("{value}/x")) {
        Ok(r) if r.registry == value => Ok(value.to_string()),
        _ => Err(CliError::InsecureRegistry(value.to_string())),
    }
}

/// A `--copy-in HOST:GUEST` pair.
fn copy_in(value: &str) -> Result<(PathBuf, String), CliError> {
    let bad = || CliError::CopySpec {
        option: "--copy-in",
        form: "HOST:GUEST",
        value: value.to_string(),
    };
    let (host, guest) = value.split_once(':').ok_or_else(bad)?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.into(), values::guest_path(guest)?))
}

/// A `--copy-out GUEST:HOST` pair.
fn copy_out(value: &str) -> Result<(String, PathBuf), CliError> {
    let bad = || CliError::CopySpec {
        option: "--copy-out",
        form: "GUEST:HOST",
        value: value.to_string(),
    };
    let (guest, host) = value.split_once(':').ok_or_else(bad)?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((values::guest_path(guest)?, host.into()))
}

// Every option may be given again; the last one counts (repeatable ones add up).
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Guest kernel (default: $FLINT_CACHE/guest/vmlinux, built by build-guest-kernel.sh;
    /// FLINT_CACHE defaults to ~/.cache/flint)
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    kernel: Option<PathBuf>,

    /// Sandbox initramfs with busybox and the agent (default:
    /// $FLINT_CACHE/sandbox/initramfs.cpio.gz, built by build-sandbox-image.sh); the guest's
    /// root is a RAM file system, so the initramfs is never modified
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    initramfs: Option<PathBuf>,

    /// Run COMMAND in this container image: a registry reference [REGISTRY/]NAME[:TAG|@DIGEST]
    /// (Docker Hub without a REGISTRY; pulled on its first use, then taken from the cache), or
    /// a path to an OCI image layout directory, an OCI archive or a `docker save` tarball;
    /// without COMMAND, the image's own (Entrypoint and Cmd) runs. The image becomes a
    /// read-only disk (cached in $FLINT_CACHE/images); writes go to an overlay in guest
    /// memory, or on a throwaway disk with --scratch
    #[arg(long, value_name = "REF", allow_hyphen_values = true, value_parser = image_ref,
          conflicts_with = "rootfs")]
    image: Option<ImageRef>,

    /// Allow pulling --image from this registry over plain HTTP instead of HTTPS (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]", allow_hyphen_values = true,
          value_parser = insecure_registry, requires = "image")]
    insecure_registry: Vec<String>,

    /// Run COMMAND as USER (and GROUP), each a name from the image's /etc/passwd and
    /// /etc/group or a number (default: the image's User, else root); needs --image
    #[arg(
        long,
        value_name = "USER[:GROUP]",
        allow_hyphen_values = true,
        requires = "image"
    )]
    user: Option<String>,

    /// Replace the image's Entrypoint with PROGRAM (and drop its Cmd), as `docker run
    /// --entrypoint` does; an empty PROGRAM clears it; needs --image
    #[arg(
        long,
        value_name = "PROGRAM",
        allow_hyphen_values = true,
        requires = "image"
    )]
    entrypoint: Option<String>,

    /// Keep the image's writes on a throwaway ext4 disk of SIZE (MiB, or with a K, M or G
    /// suffix) instead of guest memory; made for this run and removed after it; needs --image
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true, requires = "image",
          value_parser = scratch_size)]
    scratch: Option<u64>,

    /// Boot from this ext4 image instead (its init must start flint-agent); the guest writes to
    /// a private copy, never to IMAGE; bw, iops: limits on the guest's disk
    #[arg(long, value_name = "IMAGE[,bw=BYTES_PER_SEC][,iops=N]", allow_hyphen_values = true,
          value_parser = values::root_image)]
    rootfs: Option<RootImage>,

    /// vCPUs
    #[arg(long, value_name = "N", allow_hyphen_values = true, default_value_t = DEFAULT_VCPUS,
          value_parser = |s: &str| values::number::<u32>("--vcpus", s))]
    vcpus: u32,

    /// Guest memory in MiB
    #[arg(long, value_name = "MIB", allow_hyphen_values = true, default_value_t = DEFAULT_MEM_MIB,
          value_parser = |s: &str| values::number::<u64>("--memory", s))]
    memory: u64,

    /// Stop the VM and exit with 124 if COMMAND has not finished by then
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true,
          value_parser = |s: &str| values::number::<u64>("--timeout", s))]
    timeout: Option<u64>,

    /// No network (default); nat: outbound IPv4 and DNS through NAT on the host (needs root,
    /// `ip` and `nft`; see below), limited to the allow= destinations if any are given; or a
    /// NIC on the host TAP device NAME (bw limits each direction; mtu is offered to the guest)
    #[arg(long, value_name = "none|nat[,allow=CIDR[:PORT]]...|tap=NAME[,mac=MAC][,bw=BYTES_PER_SEC][,mtu=N]",
          allow_hyphen_values = true, value_parser = net_or_none)]
    net: Option<NetOrNone>,

    #[command(flatten)]
    command: CommandArgs,

    /// Copy a host file into the guest before COMMAND runs (repeatable)
    #[arg(long = "copy-in", value_name = "HOST:GUEST", allow_hyphen_values = true,
          value_parser = copy_in)]
    copy_in: Vec<(PathBuf, String)>,

    /// Copy a guest file out after COMMAND ends (repeatable)
    #[arg(long = "copy-out", value_name = "GUEST:HOST", allow_hyphen_values = true,
          value_parser = copy_out)]
    copy_out: Vec<(String, PathBuf)>,

    /// The most bytes all copy-outs together may bring to the host, with an optional K, M or G
    /// suffix (default: 1G); a copy that would go over fails (status 125) and leaves no file
    /// behind
    #[arg(long = "copy-out-limit", value_name = "SIZE", allow_hyphen_values = true,
          value_parser = |s: &str| values::size("--copy-out-limit", s))]
    copy_out_limit: Option<u64>,

    /// Boot the guest instead of restoring the snapshot (and make none)
    #[arg(long)]
    cold: bool,

    /// Keep the memory the guest frees: no free page reporting (by default the guest reports
    /// it and flint gives it back to the host)
    #[arg(long)]
    no_page_reporting: bool,

    /// Do not install seccomp filters (debugging only)
    #[arg(long)]
    no_seccomp: bool,

    /// Run COMMAND in a warm sandbox of the 'flint pool' listening on PATH instead of a new
    /// one (with --env, --workdir and --timeout only: the pool made the VM)
    #[arg(long, value_name = "PATH", allow_hyphen_values = true,
          conflicts_with_all = ["kernel", "initramfs", "image", "insecure_registry", "user",
              "entrypoint", "scratch", "rootfs", "vcpus", "memory", "net", "copy_in", "copy_out",
              "copy_out_limit", "cold", "no_page_reporting", "no_seccomp"])]
    pool: Option<PathBuf>,

    /// The command to run in the guest and its arguments
    #[arg(last = true, value_name = "COMMAND")]
    argv: Vec<String>,
}

impl RunArgs {
    pub(crate) fn into_command(self) -> Result<Command, CliError> {
        super::no_seccomp(self.no_seccomp);
        // An image has a command of its own.
        if self.argv.is_empty() && self.image.is_none() {
            return Err(CliError::NoCommandToRun("run"));
        }
        if let Some(socket) = self.pool {
            return Ok(Command::RunInPool(PoolRunOptions {
                socket,
                command: self.command.into_options(self.argv),
                timeout: self.timeout.map(std::time::Duration::from_secs),
            }));
        }
        let (rootfs, rootfs_rate_limiter) = match self.rootfs {
            Some(RootImage { path, limiter }) => (Some(path), limiter),
            None => (None, None),
        };
        Ok(Command::Run(Box::new(RunOptions {
            kernel: self.kernel,
            initramfs: self.initramfs,
            image: self.image,
            insecure_registries: self.insecure_registry,
            user: self.user,
            entrypoint: self.entrypoint,
            scratch: self.scratch,
            rootfs,
            rootfs_rate_limiter,
            vcpus: self.vcpus,
            mem_mib: self.memory,
            timeout: self.timeout.map(std::time::Duration::from_secs),
            net: self.net.and_then(|n| n.0),
            copy_in: self.copy_in,
            copy_out: self.copy_out,
            copy_out_limit: self.copy_out_limit.unwrap_or(flint_agent::COPY_OUT_LIMIT),
            command: self.command.into_options(self.argv),
            cold: self.cold,
            no_page_reporting: self.no_page_reporting,
        })))
    }
}
