//! What `flint jail` is asked to do, and the checks made before anything is created.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::rlimit::Rlimit;

/// Where jails go unless `--chroot-base` says otherwise.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/flint";

/// Which cgroup interface to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// What `flint jail` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailOptions {
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub netns: Option<PathBuf>,
    /// `None`: use v2 when /sys/fs/cgroup is cgroup2, else v1.
    pub cgroup_version: Option<CgroupVersion>,
    /// `(file, value)` pairs written into the jail's cgroup, in order.
    pub cgroups: Vec<(String, String)>,
    pub rlimits: Vec<(Rlimit, u64)>,
    /// Host files copied into the jail at the same absolute path.
    pub files: Vec<PathBuf>,
    /// The arguments of the jailed flint.
    pub flint_args: Vec<String>,
}

/// Whether `id` is a valid jail id: 1 to 64 ASCII letters, digits and dashes.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl JailOptions {
    /// Refuse what no jail can be made of: a bad id, the root user, or the user or group ID
    /// that means "unchanged" to the kernel.
    pub fn check(&self) -> Result<()> {
        if !valid_id(&self.id) {
            return Err(Error::InvalidId(self.id.clone()));
        }
        if self.uid == 0 {
            return Err(Error::RootUid);
        }
        if self.uid == u32::MAX || self.gid == u32::MAX {
            return Err(Error::IdOutOfRange);
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Options for jail `id` with nothing asked beyond what is required.
    pub(crate) fn options(id: &str) -> JailOptions {
        JailOptions {
            id: id.into(),
            uid: 10123,
            gid: 10124,
            chroot_base: PathBuf::from(DEFAULT_CHROOT_BASE),
            netns: None,
            cgroup_version: None,
            cgroups: Vec::new(),
            rlimits: Vec::new(),
            files: Vec::new(),
            flint_args: vec!["boot".into()],
        }
    }

    #[test]
    fn ids() {
        assert!(valid_id("a"));
        assert!(valid_id("vm-01-ABC"));
        assert!(valid_id(&"x".repeat(64)));
        assert!(!valid_id(""));
        assert!(!valid_id(&"x".repeat(65)));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(".."));
        assert!(!valid_id("."));
        assert!(!valid_id("a_b"));
        assert!(!valid_id("a b"));
        assert!(!valid_id("a\0b"));
        // Letters of other scripts are not ASCII: a path component, but not a portable one.
        assert!(!valid_id("é"));
    }

    #[test]
    fn checks_refuse_what_no_jail_can_be_made_of() {
        assert!(options("ok").check().is_ok());
        let with = |f: fn(&mut JailOptions)| {
            let mut o = options("ok");
            f(&mut o);
            o.check().unwrap_err().to_string()
        };
        assert_eq!(
            with(|o| o.id = "../etc".into()),
            "the jail id '../etc' must be 1 to 64 letters, digits and dashes"
        );
        assert_eq!(
            with(|o| o.uid = 0),
            "the jail needs a non-zero --uid: the jailed flint must not run as root"
        );
        assert!(with(|o| o.uid = u32::MAX).contains("must be below 4294967295"));
        assert!(with(|o| o.gid = u32::MAX).contains("must be below 4294967295"));
        // Group 0 is allowed: only the user must not be root.
        let mut o = options("ok");
        o.gid = 0;
        assert!(o.check().is_ok());
    }
}
