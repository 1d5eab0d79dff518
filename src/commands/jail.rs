//! `flint jail`: run flint in a jail.

use std::path::{Component, PathBuf};

use clap::Args;

use super::{once, values};
use crate::cli::{CliError, Command};
use crate::jail::{CgroupVersion, JailOptions, Rlimit, DEFAULT_CHROOT_BASE};

pub(crate) const ABOUT: &str =
    "Run flint in a chroot with its own namespaces and cgroup as an unprivileged user";

/// What 'flint jail' says when flint's own arguments are missing.
pub(crate) const NEEDS_FLINT_ARGS: &str = "flint's arguments after --, as in 'flint jail --id ID --uid UID --gid GID -- boot --kernel PATH'";

pub(crate) const AFTER_HELP: &str = "\
Run 'flint FLINT_ARGS...' in a jail (needs root): a copy of flint in CHROOT_BASE/ID/root with
its own /dev (/dev/kvm, /dev/net/tun and /dev/urandom), its own mount, IPC, UTS, network and
PID namespaces, the cgroup flint/ID, rlimits, and the user UID:GID (who gets the jail root)
with no supplementary groups and no way to gain privileges. When it ends, the cgroup and
CHROOT_BASE/ID are removed and 'flint jail' exits with its status. SIGINT, SIGTERM and SIGHUP
are forwarded to it.

Exit status: the jailed flint's (128+N when signal N killed it); 1 when the jail cannot be set
up (one line on stderr says why).";

fn id(value: &str) -> Result<String, CliError> {
    if crate::jail::valid_id(value) {
        Ok(value.to_string())
    } else {
        Err(CliError::JailId(value.to_string()))
    }
}

fn cgroup_version(value: &str) -> Result<CgroupVersion, CliError> {
    match value {
        "1" => Ok(CgroupVersion::V1),
        "2" => Ok(CgroupVersion::V2),
        _ => Err(CliError::CgroupVersion(value.to_string())),
    }
}

fn cgroup(value: &str) -> Result<(String, String), CliError> {
    match value.split_once('=') {
        Some((file, setting))
            if file.contains('.')
                && !file.starts_with('.')
                && !file.contains('/')
                && !setting.is_empty() =>
        {
            Ok((file.to_string(), setting.to_string()))
        }
        _ => Err(CliError::CgroupSpec(value.to_string())),
    }
}

/// One `--rlimit RESOURCE=N[,RESOURCE=N]...`.
#[derive(Debug, Clone)]
pub(crate) struct Rlimits(Vec<(Rlimit, u64)>);

fn rlimits(value: &str) -> Result<Rlimits, CliError> {
    value
        .split(',')
        .map(|part| {
            part.split_once('=')
                .and_then(|(r, n)| Some((Rlimit::from_name(r)?, n.parse::<u64>().ok()?)))
                .ok_or_else(|| CliError::RlimitSpec(value.to_string()))
        })
        .collect::<Result<_, _>>()
        .map(Rlimits)
}

fn file(value: &str) -> Result<PathBuf, CliError> {
    let path = PathBuf::from(value);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
    {
        return Err(CliError::JailFile(value.to_string()));
    }
    Ok(path)
}

fn cgroup_help() -> String {
    format!(
        "Write VALUE to FILE in the jail's cgroup, e.g. memory.max=268435456 or pids.max=64 (v1: \
         memory.limit_in_bytes, cpu.cfs_quota_us); repeatable (default: pids.max={} where the \
         pids controller is)",
        crate::jail::DEFAULT_CGROUP_SETTINGS[0].1
    )
}

fn rlimit_help() -> String {
    format!(
        "Set limits (soft and hard) on nofile, fsize, nproc, core, as, memlock; repeatable \
         (default: nofile={})",
        crate::jail::DEFAULT_RLIMITS[0].1
    )
}

#[derive(Debug, Args)]
pub(crate) struct JailArgs {
    /// The jail's name: 1 to 64 letters, digits and dashes; also the hostname in the jail
    #[arg(long, value_name = "ID", allow_hyphen_values = true, value_parser = id)]
    id: Vec<String>,

    /// The user the jailed flint runs as (not 0)
    #[arg(long, value_name = "UID", allow_hyphen_values = true,
          value_parser = |s: &str| values::number::<u32>("--uid", s))]
    uid: Vec<u32>,

    /// The group the jailed flint runs as
    #[arg(long, value_name = "GID", allow_hyphen_values = true,
          value_parser = |s: &str| values::number::<u32>("--gid", s))]
    gid: Vec<u32>,

    /// Where jails go
    #[arg(long = "chroot-base", value_name = "DIR", allow_hyphen_values = true,
          default_value = DEFAULT_CHROOT_BASE)]
    chroot_base: Vec<PathBuf>,

    /// Join this network namespace (e.g. /var/run/netns/NAME) instead of a new, empty one
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    netns: Vec<PathBuf>,

    /// The cgroup interface (default: 2 when /sys/fs/cgroup is cgroup2)
    #[arg(long = "cgroup-version", value_name = "1|2", allow_hyphen_values = true,
          value_parser = cgroup_version)]
    cgroup_version: Vec<CgroupVersion>,

    #[arg(long, value_name = "FILE=VALUE", allow_hyphen_values = true, value_parser = cgroup,
          help = cgroup_help())]
    cgroup: Vec<(String, String)>,

    #[arg(long, value_name = "RESOURCE=N[,RESOURCE=N]...", allow_hyphen_values = true,
          value_parser = rlimits, help = rlimit_help())]
    rlimit: Vec<Rlimits>,

    /// Copy this host file (e.g. the kernel) into the jail at the same absolute path (not under
    /// /dev or /proc); repeatable
    #[arg(long, value_name = "HOST_PATH", allow_hyphen_values = true, value_parser = file)]
    file: Vec<PathBuf>,

    /// flint's own arguments, as in 'flint FLINT_ARGS...'
    #[arg(last = true, value_name = "FLINT_ARGS")]
    flint_args: Vec<String>,
}

impl JailArgs {
    pub(crate) fn into_command(self) -> Result<Command, CliError> {
        if self.flint_args.is_empty() {
            return Err(CliError::JailNeeds(NEEDS_FLINT_ARGS));
        }
        let id = once("--id", self.id)?;
        let uid = once("--uid", self.uid)?;
        let gid = once("--gid", self.gid)?;
        let chroot_base = once("--chroot-base", self.chroot_base)?;
        let netns = once("--netns", self.netns)?;
        let cgroup_version = once("--cgroup-version", self.cgroup_version)?;
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
            cgroups: self.cgroup,
            rlimits: self.rlimit.into_iter().flat_map(|r| r.0).collect(),
            files: self.file,
            flint_args: self.flint_args,
        }))
    }
}
