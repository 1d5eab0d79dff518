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

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::json;

    use super::*;

    fn image(config: serde_json::Value) -> ImageConfiguration {
        serde_json::from_value(json!({
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
        .unwrap()
    }

    fn rootfs() -> tempfile::TempDir {
        let dir = crate::testutil::tempdir();
        fs::create_dir(dir.path().join("etc")).unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\nbroken line\nweb:x:33:33::/var/www:/usr/sbin/nologin\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nstaff:x:50:app,web\naudio:x:29:app\nweb:x:33:\n",
        )
        .unwrap();
        dir
    }

    fn spec(config: serde_json::Value, o: RunOverrides) -> Result<RunSpec, ConfigError> {
        let r = rootfs();
        run_spec(&image(config), r.path(), &o)
    }

    #[test]
    fn entrypoint_and_cmd_combine_as_docker_run_does() {
        let cfg = json!({"Entrypoint": ["/bin/tini", "--"], "Cmd": ["python3"]});
        assert_eq!(
            spec(cfg.clone(), RunOverrides::default()).unwrap().argv,
            ["/bin/tini", "--", "python3"]
        );
        let o = RunOverrides {
            command: Some(vec!["pytest".into(), "-q".into()]),
            ..Default::default()
        };
        assert_eq!(
            spec(cfg.clone(), o).unwrap().argv,
            ["/bin/tini", "--", "pytest", "-q"]
        );
        let o = RunOverrides {
            entrypoint: Some(vec!["/bin/sh".into()]),
            ..Default::default()
        };
        assert_eq!(spec(cfg, o).unwrap().argv, ["/bin/sh"]);
        assert_eq!(
            spec(json!({"Cmd": ["sh", "-c", "x"]}), RunOverrides::default())
                .unwrap()
                .argv,
            ["sh", "-c", "x"]
        );
        let err = spec(json!({}), RunOverrides::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the image names no command (no Entrypoint or Cmd), so one must be given"
        );
        let o = RunOverrides {
            command: Some(vec!["true".into()]),
            ..Default::default()
        };
        assert_eq!(spec(json!(null), o).unwrap().argv, ["true"]);
    }

    #[test]
    fn env_merges_with_defaults_and_user_entries() {
        let cfg = json!({"Cmd": ["x"], "Env": ["LANG=C.UTF-8", "A=image"]});
        let o = RunOverrides {
            env: vec!["A=user".into(), "B=b=c".into()],
            ..Default::default()
        };
        let s = spec(cfg, o).unwrap();
        assert_eq!(
            s.env,
            [
                &format!("PATH={DEFAULT_PATH}"),
                "LANG=C.UTF-8",
                "A=user",
                "B=b=c",
                "HOME=/root"
            ]
        );
        let s = spec(
            json!({"Cmd": ["x"], "Env": ["PATH=/opt/bin", "HOME=/srv"]}),
            RunOverrides::default(),
        )
        .unwrap();
        assert_eq!(s.env, ["PATH=/opt/bin", "HOME=/srv"]);
        let o = RunOverrides {
            env: vec!["NOVALUE".into()],
            ..Default::default()
        };
        assert_eq!(
            spec(json!({"Cmd": ["x"]}), o).unwrap_err().to_string(),
            "environment entry \"NOVALUE\" is not NAME=VALUE"
        );
    }

    #[test]
    fn workdir_defaults_to_root_and_can_be_overridden() {
        assert_eq!(
            spec(json!({"Cmd": ["x"]}), RunOverrides::default())
                .unwrap()
                .workdir,
            "/"
        );
        assert_eq!(
            spec(
                json!({"Cmd": ["x"], "WorkingDir": "/app"}),
                RunOverrides::default()
            )
            .unwrap()
            .workdir,
            "/app"
        );
        assert_eq!(
            spec(
                json!({"Cmd": ["x"], "WorkingDir": "app"}),
                RunOverrides::default()
            )
            .unwrap()
            .workdir,
            "/app"
        );
        let o = RunOverrides {
            workdir: Some("/tmp".into()),
            ..Default::default()
        };
        assert_eq!(
            spec(json!({"Cmd": ["x"], "WorkingDir": "/app"}), o)
                .unwrap()
                .workdir,
            "/tmp"
        );
    }

    #[test]
    fn users_and_groups_resolve_against_the_image() {
        let ids = |user: &str| {
            let s = spec(json!({"Cmd": ["x"], "User": user}), RunOverrides::default())?;
            Ok::<_, ConfigError>((s.uid, s.gid, s.groups, s.env.last().cloned().unwrap()))
        };
        assert_eq!(ids("").unwrap(), (0, 0, vec![], "HOME=/root".into()));
        assert_eq!(
            ids("app").unwrap(),
            (1000, 1000, vec![29, 50], "HOME=/home/app".into())
        );
        assert_eq!(
            ids("1000").unwrap(),
            (1000, 1000, vec![29, 50], "HOME=/home/app".into())
        );
        assert_eq!(
            ids("app:staff").unwrap(),
            (1000, 50, vec![29, 50], "HOME=/home/app".into())
        );
        assert_eq!(
            ids("web:7").unwrap(),
            (33, 7, vec![50], "HOME=/var/www".into())
        );
        assert_eq!(
            ids("4242").unwrap(),
            (4242, 0, vec![], "HOME=/".into()),
            "a numeric user the image does not list"
        );
        assert_eq!(
            ids("4242:4243").unwrap(),
            (4242, 4243, vec![], "HOME=/".into())
        );
        assert_eq!(
            ids("nobody").unwrap_err().to_string(),
            "user \"nobody\" is not in the image's /etc/passwd"
        );
        assert_eq!(
            ids("app:wheel").unwrap_err().to_string(),
            "group \"wheel\" is not in the image's /etc/group"
        );
        assert!(matches!(ids("app:"), Err(ConfigError::BadUser(_))));
        // The user's override wins over the image's.
        let o = RunOverrides {
            user: Some("web".into()),
            ..Default::default()
        };
        assert_eq!(
            spec(json!({"Cmd": ["x"], "User": "app"}), o).unwrap().uid,
            33
        );
    }

    #[test]
    fn account_files_linked_out_of_the_image_are_not_read() {
        let dir = crate::testutil::tempdir();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(dir.path().join("passwd"), "hostuser:x:7:7::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/../passwd", root.join("etc/passwd")).unwrap();
        let err = run_spec(
            &image(json!({"Cmd": ["x"], "User": "hostuser"})),
            &root,
            &RunOverrides::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::UnknownUser(_)), "{err}");
        // Without account files, numeric users still work.
        let s = run_spec(
            &image(json!({"Cmd": ["x"], "User": "5:6"})),
            &root,
            &RunOverrides::default(),
        )
        .unwrap();
        assert_eq!((s.uid, s.gid), (5, 6));
    }

    #[test]
    fn a_docker_save_tarball_becomes_a_tree_and_a_run_spec() {
        use crate::testutil::{config_json, Tar};
        use crate::{unpack, Digest, ImageSource, Limits, Store};
        let dir = crate::testutil::tempdir();
        let base = Tar::new()
            .dir("etc", 0o755)
            .file(
                "etc/passwd",
                0o644,
                b"root:x:0:0:root:/root:/bin/sh\nsvc:x:900:901::/srv:/bin/false\n",
            )
            .file("etc/group", 0o644, b"root:x:0:\nsvc:x:901:\n")
            .file("bin/app", 0o755, b"app v1")
            .bytes();
        let upper = Tar::new()
            .file("bin/app", 0o755, b"app v2")
            .file("bin/.wh.old", 0o644, b"")
            .bytes();
        let cfg = config_json(
            "amd64",
            &[Digest::of(&base), Digest::of(&upper)],
            json!({"Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "User": "svc", "WorkingDir": "/srv", "Env": ["MODE=prod"]}),
        );
        let cfg_name = format!("{}.json", Digest::of(&cfg).hex());
        let tarball = Tar::new()
            .file("l1/layer.tar", 0o644, &base)
            .file("l2/layer.tar", 0o644, &upper)
            .file(&cfg_name, 0o644, &cfg)
            .file(
                "manifest.json",
                0o644,
                &serde_json::to_vec(&json!([{"Config": cfg_name, "RepoTags": ["svc:1"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]))
                    .unwrap(),
            )
            .bytes();
        let path = dir.path().join("svc.tar");
        fs::write(&path, tarball).unwrap();

        let src = ImageSource::open_archive(&path).unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let img = store.import(&src, &["svc:1".into()]).unwrap();
        let root = dir.path().join("rootfs");
        unpack(store.layer_inputs(&img).unwrap(), &root, &Limits::default()).unwrap();
        assert_eq!(fs::read(root.join("bin/app")).unwrap(), b"app v2");
        let o = RunOverrides {
            command: Some(vec!["--check".into()]),
            env: vec!["MODE=test".into()],
            ..Default::default()
        };
        let s = run_spec(&img.config, &root, &o).unwrap();
        assert_eq!(
            s,
            RunSpec {
                argv: vec!["/bin/app".into(), "--check".into()],
                env: vec![
                    format!("PATH={DEFAULT_PATH}"),
                    "MODE=test".into(),
                    "HOME=/srv".into()
                ],
                workdir: "/srv".into(),
                uid: 900,
                gid: 901,
                groups: vec![],
            }
        );
    }
}
