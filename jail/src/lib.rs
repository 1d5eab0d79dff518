//! `flint-jail`: runs flint in a chroot with its own namespaces, cgroup and rlimits, as an
//! unprivileged user — what `flint jail` does.
//!
//! [`run`] takes the [`JailOptions`] and goes through these steps, as root:
//!
//! 1. **The jail tree** (`tree.rs`, `libs.rs`): create
//!    `<chroot-base>/<id>/root` with a copy of this binary as `/flint`, the shared libraries
//!    and loader it has mapped, the `--file`s at their host paths (owned by the jail's user),
//!    and the mount points `/proc` and `/dev`. Root builds it while only root can write to it,
//!    and still makes every directory and file relative to a directory descriptor without
//!    following symbolic links: anything in the way is refused.
//! 2. **The cgroup** (`cgroup.rs`): `flint/<id>` under the cgroup2 file system,
//!    or under each v1 hierarchy with the memory, cpu or pids controller (or one a `--cgroup`
//!    setting names); the `--cgroup` settings, then the defaults
//!    ([`DEFAULT_CGROUP_SETTINGS`]) where the cgroup has their file.
//! 3. **The child** (`process.rs`): forked in a new PID namespace and held on
//!    a pipe until the jail process has moved it into the cgroup. It then joins the
//!    `--netns` or unshares a network namespace of its own, unshares the mount, IPC and UTS
//!    namespaces, and (`root.rs`) pivots into the jail root, mounts a fresh
//!    `/proc` and a small tmpfs on `/dev` with the device nodes flint needs
//!    (`devices.rs`), sets the hostname to the id, hands the jail root to the
//!    jail's user, applies the rlimits (`rlimit.rs`, [`DEFAULT_RLIMITS`] unless
//!    set), closes inherited descriptors, drops to the jail's user with no supplementary
//!    groups and `no_new_privs`, and execs `/flint FLINT_ARGS...`.
//! 4. **Waiting and cleaning up**: the jail process forwards SIGINT, SIGTERM and SIGHUP to
//!    the child, waits for it, removes the cgroup and the jail directory
//!    (`remove.rs`: whatever the jailed flint left there, symbolic links out of
//!    its root removed and never followed, trees of any depth with a bounded number of open
//!    descriptors), and returns the child's exit status (128 + N when signal N killed it).
//!
//! Whatever fails, what was created is removed again, and the failure is one [`Error`]
//! whose message is one sentence.

mod cgroup;
mod devices;
mod error;
mod libs;
mod options;
mod process;
mod remove;
mod rlimit;
mod root;
mod tree;

use std::os::fd::AsFd;
use std::path::PathBuf;

pub use cgroup::DEFAULT_CGROUP_SETTINGS;
pub use error::{Error, Result};
pub use options::{valid_id, CgroupVersion, JailOptions, DEFAULT_CHROOT_BASE};
pub use rlimit::{Rlimit, DEFAULT_RLIMITS};

use cgroup::Cgroup;
use error::Reason;
use process::ChildPlan;
use tree::JailDir;

/// Run `flint jail`: returns the exit status of the jailed flint once it has ended and the
/// jail is gone. Needs root; the calling process must be single-threaded (it forks).
///
/// Besides the error returned, a jail that cannot be removed completely is reported on
/// standard error as `flint: warning: ...`, and a failure of the child after the fork as
/// `flint: error: ...` (with exit status 1).
pub fn run(options: &JailOptions) -> Result<u8> {
    let mut jail = Jail {
        dir: None,
        cgroups: Vec::new(),
    };
    let result = prepare(options, &mut jail).and_then(|root| {
        let plan = ChildPlan::new(options, &root)?;
        process::spawn_and_wait(&plan, &jail.cgroups)
    });
    jail.cleanup();
    result
}

/// What the jail has created so far, removed again by [`Jail::cleanup`] (or when dropped).
struct Jail {
    dir: Option<JailDir>,
    cgroups: Vec<Cgroup>,
}

impl Jail {
    /// Remove the cgroups and the jail directory; warnings for what cannot be removed.
    fn cleanup(&mut self) {
        for cg in self.cgroups.drain(..).rev() {
            if let Err(e) = cg.remove() {
                eprintln!(
                    "flint: warning: cannot remove the jail's cgroup {}: {}",
                    cg.shown,
                    Reason(&e)
                );
            }
        }
        if let Some(dir) = self.dir.take() {
            if let Err(e) = remove::remove_tree(dir.base.as_fd(), &dir.id) {
                eprintln!(
                    "flint: warning: cannot remove the jail directory {}: {}",
                    dir.shown.display(),
                    Reason(&e)
                );
            }
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Build the jail directory and the cgroup, recording them in `jail`; returns the jail root.
fn prepare(o: &JailOptions, jail: &mut Jail) -> Result<PathBuf> {
    o.check()?;
    let dir = jail.dir.insert(tree::create_jail_dir(o)?);
    let fd = dir.open()?;
    let root = tree::fill(o, fd.as_fd(), &dir.shown)?;
    cgroup::create(o, &cgroup::mounts()?, &mut jail.cgroups)?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::tests::options;
    use crate::tree::tests::{message, require_root, Scratch};

    #[test]
    fn a_failed_jail_leaves_nothing_behind() {
        let base = Scratch::new("lib-failed");
        let mut o = options("failed");
        o.chroot_base = base.0.clone();
        o.files = vec![base.0.join("missing-kernel")];
        let m = message(run(&o));
        assert_eq!(
            m,
            format!(
                "cannot copy {} into the jail: No such file or directory",
                o.files[0].display()
            )
        );
        assert_eq!(std::fs::read_dir(&base.0).unwrap().count(), 0);

        // Refused before anything is made: not even the chroot base.
        let mut o = options("root");
        o.chroot_base = base.0.join("never");
        o.uid = 0;
        assert!(message(run(&o)).contains("needs a non-zero --uid"));
        assert!(!o.chroot_base.exists());
    }

    #[test]
    fn a_jail_in_use_is_left_alone() {
        let base = Scratch::new("lib-in-use");
        std::fs::create_dir(base.0.join("busy")).unwrap();
        std::fs::write(base.0.join("busy/keep"), b"").unwrap();
        let mut o = options("busy");
        o.chroot_base = base.0.clone();
        assert!(message(run(&o)).contains("is in use"));
        assert!(base.0.join("busy/keep").exists());
    }

    #[test]
    fn cleanup_removes_what_was_recorded() {
        require_root();
        let base = Scratch::new("lib-cleanup");
        let cg = Scratch::new("lib-cleanup-cg");
        let mut o = options("clean");
        o.chroot_base = base.0.clone();
        let mut jail = Jail {
            dir: None,
            cgroups: Vec::new(),
        };
        let dir = jail.dir.insert(tree::create_jail_dir(&o).unwrap());
        let fd = dir.open().unwrap();
        tree::fill(&o, fd.as_fd(), &dir.shown).unwrap();
        std::fs::create_dir(cg.0.join("clean")).unwrap();
        jail.cgroups.push(Cgroup {
            path: cg.0.join("clean"),
            shown: "flint/clean".into(),
        });
        drop(jail);
        assert_eq!(std::fs::read_dir(&base.0).unwrap().count(), 0);
        assert!(!cg.0.join("clean").exists());
    }
}
