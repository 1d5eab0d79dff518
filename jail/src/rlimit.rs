//! The resource limits of the jailed flint: which ones `--rlimit` names, the defaults, and
//! applying them.

use crate::error::{Context, Result};

/// The rlimits (soft and hard) the jailed flint gets unless `--rlimit` sets them: more
/// descriptors than flint holds at most (a vsock device's 4,096 connections and 1,024 host
/// connections waiting, the devices' files, sockets and event fds), few enough that a
/// compromised flint cannot take the host's.
pub const DEFAULT_RLIMITS: [(Rlimit, u64); 1] = [(Rlimit::NoFile, 8192)];

/// A resource `--rlimit` can limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlimit {
    NoFile,
    FSize,
    NProc,
    Core,
    As,
    MemLock,
}

impl Rlimit {
    /// Every resource `--rlimit` can limit.
    pub const ALL: [Rlimit; 6] = [
        Rlimit::NoFile,
        Rlimit::FSize,
        Rlimit::NProc,
        Rlimit::Core,
        Rlimit::As,
        Rlimit::MemLock,
    ];

    /// The resource named `name` as in `--rlimit NAME=N`.
    pub fn from_name(name: &str) -> Option<Rlimit> {
        Rlimit::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Its name in `--rlimit NAME=N`: `nofile` for `RLIMIT_NOFILE`.
    pub fn name(self) -> &'static str {
        match self {
            Rlimit::NoFile => "nofile",
            Rlimit::FSize => "fsize",
            Rlimit::NProc => "nproc",
            Rlimit::Core => "core",
            Rlimit::As => "as",
            Rlimit::MemLock => "memlock",
        }
    }

    fn resource(self) -> rustix::process::Resource {
        use rustix::process::Resource;
        match self {
            Rlimit::NoFile => Resource::Nofile,
            Rlimit::FSize => Resource::Fsize,
            Rlimit::NProc => Resource::Nproc,
            Rlimit::Core => Resource::Core,
            Rlimit::As => Resource::As,
            Rlimit::MemLock => Resource::Memlock,
        }
    }
}

/// The rlimits to apply, in order: the defaults `given` does not set, then `given`.
pub(crate) fn with_defaults(given: &[(Rlimit, u64)]) -> Vec<(Rlimit, u64)> {
    let mut all: Vec<(Rlimit, u64)> = DEFAULT_RLIMITS
        .into_iter()
        .filter(|(r, _)| !given.iter().any(|(g, _)| g == r))
        .collect();
    all.extend_from_slice(given);
    all
}

/// Set each limit, soft and hard, for this process.
pub(crate) fn apply(limits: &[(Rlimit, u64)]) -> Result<()> {
    for &(limit, value) in limits {
        let rl = rustix::process::Rlimit {
            current: Some(value),
            maximum: Some(value),
        };
        rustix::process::setrlimit(limit.resource(), rl)
            .cannot(|| format!("set the {} rlimit to {value}", limit.name()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_those_of_the_command_line() {
        for (name, r) in [
            ("nofile", Rlimit::NoFile),
            ("fsize", Rlimit::FSize),
            ("nproc", Rlimit::NProc),
            ("core", Rlimit::Core),
            ("as", Rlimit::As),
            ("memlock", Rlimit::MemLock),
        ] {
            assert_eq!(Rlimit::from_name(name), Some(r));
            assert_eq!(r.name(), name);
        }
        for bad in ["", "NOFILE", "RLIMIT_NOFILE", "stack", "nofile "] {
            assert_eq!(Rlimit::from_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn each_names_its_own_kernel_resource() {
        let expected = [
            (Rlimit::NoFile, libc::RLIMIT_NOFILE),
            (Rlimit::FSize, libc::RLIMIT_FSIZE),
            (Rlimit::NProc, libc::RLIMIT_NPROC),
            (Rlimit::Core, libc::RLIMIT_CORE),
            (Rlimit::As, libc::RLIMIT_AS),
            (Rlimit::MemLock, libc::RLIMIT_MEMLOCK),
        ];
        for (r, resource) in expected {
            assert_eq!(r.resource() as i64, i64::from(resource), "{r:?}");
        }
    }

    #[test]
    fn defaults_give_way_to_what_is_asked() {
        assert_eq!(with_defaults(&[]), [(Rlimit::NoFile, 8192)]);
        assert_eq!(
            with_defaults(&[(Rlimit::FSize, 10)]),
            [(Rlimit::NoFile, 8192), (Rlimit::FSize, 10)]
        );
        assert_eq!(
            with_defaults(&[(Rlimit::NoFile, 64)]),
            [(Rlimit::NoFile, 64)]
        );
        assert_eq!(
            with_defaults(&[(Rlimit::Core, 0), (Rlimit::NoFile, 64)]),
            [(Rlimit::Core, 0), (Rlimit::NoFile, 64)]
        );
    }

    #[test]
    fn applying_a_limit_sets_soft_and_hard() {
        // RLIMIT_CORE of this test process: lowering it harms no other test.
        let before = rustix::process::getrlimit(rustix::process::Resource::Core);
        let low = before.maximum.map_or(4096, |m| m.min(4096));
        apply(&[(Rlimit::Core, low)]).unwrap();
        let after = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!((after.current, after.maximum), (Some(low), Some(low)));
    }
}
