//! The image configuration as `docker run` honours it, merged with the user's overrides into
//! a [`RunSpec`]:
//! - the command is Entrypoint followed by Cmd; a user COMMAND replaces Cmd, a user entrypoint
//!   replaces Entrypoint and drops the image's Cmd;
//! - Env is the image's, with `PATH` defaulted as Docker does, then the user's entries replacing
//!   those of the same name, and `HOME` from the user's `/etc/passwd` entry (or `/`) if unset;
//! - WorkingDir, or `/`; a relative one is taken from `/`;
//! - User is `USER[:GROUP]`, each numeric or a name looked up in the unpacked tree's
//!   `/etc/passwd` and `/etc/group` (read without following a symbolic link anywhere on the way,
//!   so a hostile image cannot point flint at the host's files). Without a group, the user's
//!   `/etc/passwd` group applies (0 for a numeric user it does not list); the supplementary groups
//!   are the `/etc/group` entries that list the user's name.

use std::io;
use std::path::Path;

use oci_spec::image::ImageConfiguration;

/// The default `PATH`, as Docker sets it when the image does not.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The largest `/etc/passwd` or `/etc/group` read (4 MiB).
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// What the user asked for on top of the image's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOverrides {
    /// COMMAND and its arguments, replacing the image's Cmd.
    pub command: Option<Vec<String>>,
    /// A replacement entrypoint (which also drops the image's Cmd).
    pub entrypoint: Option<Vec<String>>,
    /// `NAME=VALUE` entries, replacing the image's of the same name.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// What runs in the sandbox: a plain description for the guest's init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Why the run configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the image names no command (no Entrypoint or Cmd), so one must be given")]
    NoCommand,
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
    #[error("user {0:?} is not USER[:GROUP] with each a name or a number")]
    BadUser(String),
    #[error("environment entry {0:?} is not NAME=VALUE")]
    BadEnv(String),
    #[error("cannot read the image's /etc/{file}: {source}")]
    Io {
        file: &'static str,
        source: io::Error,
    },
}

/// Merges the image configuration with `overrides`, resolving names against the unpacked tree at
/// `rootfs`.
pub fn run_spec(
    config: &ImageConfiguration,
    rootfs: &Path,
    overrides: &RunOverrides,
) -> Result<RunSpec, ConfigError> {
    let c = config.config().clone().unwrap_or_default();
    let entrypoint = overrides
        .entrypoint
        .clone()
        .or_else(|| c.entrypoint().clone())
        .unwrap_or_default();
    let cmd = match (&overrides.command, &overrides.entrypoint) {
        (Some(cmd), _) => cmd.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => c.cmd().clone().unwrap_or_default(),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(ConfigError::NoCommand);
    }

    let user_spec = overrides
        .user
        .clone()
        .or_else(|| c.user().clone())
        .unwrap_or_default();
    let user = resolve_user(&user_spec, rootfs)?;

    let mut env: Vec<String> = c.env().clone().unwrap_or_default();
    if !env.iter().any(|e| env_name(e) == "PATH") {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    for e in &overrides.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(ConfigError::BadEnv(e.clone()));
        }
        let name = env_name(e);
        env.retain(|x| env_name(x) != name);
        env.push(e.clone());
    }
    if !env.iter().any(|e| env_name(e) == "HOME") {
        env.push(format!("HOME={}", user.home.as_deref().unwrap_or("/")));
    }

    let wd = overrides
        .workdir
        .clone()
        .or_else(|| c.working_dir().clone())
        .unwrap_or_default();
    let workdir = if wd.starts_with('/') {
        wd
    } else {
        format!("/{wd}")
    };

    Ok(RunSpec {
        argv,
        env,
        workdir,
        uid: user.uid,
        gid: user.gid,
        groups: user.groups,
    })
}

fn env_name(e: &str) -> &str {
    e.split_once('=').map_or(e, |(n, _)| n)
}

struct User {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    home: Option<String>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn read_accounts(rootfs: &Path, file: &'static str) -> Result<String, ConfigError> {
    let data = crate::unpack::read_file_beneath(rootfs, &["etc", file], MAX_ACCOUNT_FILE)
        .map_err(|source| ConfigError::Io { file, source })?;
    Ok(data
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .unwrap_or_default())
}

fn passwd(rootfs: &Path) -> Result<Vec<PasswdEntry>, ConfigError> {
    Ok(read_accounts(rootfs, "passwd")?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].into(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].into(),
            })
        })
        .collect())
}

fn groups(rootfs: &Path) -> Result<Vec<GroupEntry>, ConfigError> {
    Ok(read_accounts(rootfs, "group")?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            Some(GroupEntry {
                name: f[0].into(),
                gid: f[2].parse().ok()?,
                members,
            })
        })
        .collect())
}

fn resolve_user(spec: &str, rootfs: &Path) -> Result<User, ConfigError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if group_part == Some("") || (user_part.is_empty() && group_part.is_some()) {
        return Err(ConfigError::BadUser(spec.to_string()));
    }
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let pw = passwd(rootfs)?;
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => pw.into_iter().find(|p| p.uid == uid),
        Err(_) => Some(
            pw.into_iter()
                .find(|p| p.name == user_part)
                .ok_or_else(|| ConfigError::UnknownUser(user_part.to_string()))?,
        ),
    };
    let uid = match (&entry, user_part.parse::<u32>()) {
        (_, Ok(uid)) => uid,
        (Some(e), Err(_)) => e.uid,
        (None, Err(_)) => unreachable!("a named user without an entry was refused"),
    };
    let all_groups = groups(rootfs)?;
    let gid = match group_part {
        None => entry.as_ref().map_or(0, |e| e.gid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => all_groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| ConfigError::UnknownGroup(g.to_string()))?,
        },
    };
    let mut supplementary: Vec<u32> = match &entry {
        Some(e) => all_groups
            .iter()
            .filter(|g| g.members.contains(&e.name))
            .map(|g| g.gid)
            .collect(),
        None => Vec::new(),
    };
    supplementary.sort_unstable();
    supplementary.dedup();
    Ok(User {
        uid,
        gid,
        groups: supplementary,
        home: entry.map(|e| e.home),
    })
}
