//! `flint pool`: keep sandboxes warm for `flint run --pool`; and its hidden `pool-member`.

use std::path::PathBuf;

use clap::Args;
use vmm::config::{DEFAULT_MEM_MIB, DEFAULT_VCPUS};

use super::values;
use crate::cli::{CliError, Command};
use crate::sandbox::pool::{PoolOptions, POOL_SIZE_MAX};
use crate::sandbox::RunOptions;

pub(crate) const ABOUT: &str = "Keep sandboxes warm for 'flint run --pool'";

pub(crate) fn after_help() -> String {
    format!(
        "\
Keep N sandboxes ready on the Unix socket PATH (created owner-only, removed when the pool
ends) for 'flint run --pool PATH -- COMMAND': each is a flint process whose microVM is
restored from the sandbox snapshot (as 'flint run' restores it), started, and whose guest
agent answers. A 'flint run --pool' hands its command, environment, working directory,
timeout and its own stdin, stdout and stderr to one of them, which sets the guest's clock,
reseeds its random number generator, runs COMMAND and reports its status; then that sandbox
is destroyed. A sandbox runs one command only: nothing is shared between commands. Running
sandboxes count toward N, but one is always kept ready: replacements start as commands end
(or at once when none is ready), so that restoring them does not take the CPU from running
commands.

Only the pool's own user may use it. A client waits for a free sandbox (at most 120 s);
when its client goes away, a sandbox stops its command and its VM. SIGINT, SIGTERM or
SIGHUP end the pool and every sandbox of it, running ones too; so does the pool's death.
Nothing is left: no processes, work directories or socket (a socket left by a pool that
was killed with SIGKILL is replaced by the next pool).

N is from 1 to {POOL_SIZE_MAX}. The pool gives up (status 1) when its sandboxes fail to start
three times in a row.",
    )
}

/// The VM options of the pool's sandboxes (`flint run`'s).
#[derive(Debug, Args)]
pub(crate) struct PoolVmArgs {
    /// Guest kernel (default: $FLINT_CACHE/guest/vmlinux)
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    kernel: Option<PathBuf>,

    /// Sandbox initramfs with busybox and the agent (default:
    /// $FLINT_CACHE/sandbox/initramfs.cpio.gz)
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    initramfs: Option<PathBuf>,

    /// vCPUs of each sandbox
    #[arg(long, value_name = "N", allow_hyphen_values = true, default_value_t = DEFAULT_VCPUS,
          value_parser = |s: &str| values::number::<u32>("--vcpus", s))]
    vcpus: u32,

    /// Guest memory of each sandbox in MiB
    #[arg(long, value_name = "MIB", allow_hyphen_values = true, default_value_t = DEFAULT_MEM_MIB,
          value_parser = |s: &str| values::number::<u64>("--memory", s))]
    memory: u64,

    /// Do not install seccomp filters (debugging only)
    #[arg(long)]
    no_seccomp: bool,
}

impl PoolVmArgs {
    fn into_options(self) -> RunOptions {
        super::no_seccomp(self.no_seccomp);
        RunOptions {
            kernel: self.kernel,
            initramfs: self.initramfs,
            vcpus: self.vcpus,
            mem_mib: self.memory,
            copy_out_limit: flint_agent::COPY_OUT_LIMIT,
            ..RunOptions::default()
        }
    }
}

/// `--size N`: from 1 to [`POOL_SIZE_MAX`].
fn pool_size(value: &str) -> Result<usize, CliError> {
    let n: usize = values::number("--size", value)?;
    if !(1..=POOL_SIZE_MAX).contains(&n) {
        return Err(CliError::Range {
            option: "--size",
            value: value.to_string(),
            min: 1,
            max: POOL_SIZE_MAX as u64,
        });
    }
    Ok(n)
}

#[derive(Debug, Args)]
pub(crate) struct PoolArgs {
    /// The Unix socket that 'flint run --pool' connects to
    #[arg(long, value_name = "PATH", allow_hyphen_values = true, required = true)]
    socket: PathBuf,

    /// How many sandboxes to keep ready
    #[arg(long, value_name = "N", allow_hyphen_values = true, default_value_t = 2,
          value_parser = pool_size)]
    size: usize,

    #[command(flatten)]
    vm: PoolVmArgs,
}

impl PoolArgs {
    pub(crate) fn into_command(self) -> Result<Command, CliError> {
        Ok(Command::Pool(Box::new(PoolOptions {
            socket: self.socket,
            size: self.size,
            vm: self.vm.into_options(),
        })))
    }
}

/// The hidden `flint pool-member`, which `flint pool` starts.
#[derive(Debug, Args)]
pub(crate) struct PoolMemberArgs {
    #[command(flatten)]
    vm: PoolVmArgs,
}

impl PoolMemberArgs {
    pub(crate) fn into_command(self) -> Result<Command, CliError> {
        Ok(Command::PoolMember(Box::new(self.vm.into_options())))
    }
}
