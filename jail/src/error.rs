//! Why a jail cannot be made or run: each error is the one sentence flint prints.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// A failure of `flint jail`. Its message is one sentence, as flint prints it after
/// `flint: error: `.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call or file operation failed while the jail was doing `action`.
    #[error("cannot {action}: {}", Reason(source))]
    Io { action: String, source: io::Error },
    #[error("the jail id '{0}' must be 1 to 64 letters, digits and dashes")]
    InvalidId(String),
    #[error("the jail needs a non-zero --uid: the jailed flint must not run as root")]
    RootUid,
    #[error("the jail's --uid and --gid must be below {}", u32::MAX)]
    IdOutOfRange,
    #[error("the jail directory {} is in use (is a jail with id {id} running?)", path.display())]
    DirInUse { path: PathBuf, id: String },
    #[error(
        "cannot create the jail directory {0}: something other than a directory is in its place"
    )]
    NotADirectory(String),
    #[error("cannot copy {} into the jail: it is not a regular file", .0.display())]
    NotARegularFile(PathBuf),
    #[error(
        "cannot copy {} into the jail: {shown} is there already (flint, one of its libraries \
         or another --file)",
        from.display()
    )]
    AlreadyInJail { from: PathBuf, shown: String },
    #[error("--file {} must be an absolute path", .0.display())]
    FileNotAbsolute(PathBuf),
    #[error("--file {} must not contain '.' or '..'", .0.display())]
    FileNotNormal(PathBuf),
    #[error("--file {} must name a file", .0.display())]
    FileWithoutName(PathBuf),
    #[error("--file {} cannot go into the jail: its /dev and /proc are its own", .0.display())]
    FileInDevOrProc(PathBuf),
    #[error("the path {} contains a NUL byte", .0.display())]
    NulInPath(PathBuf),
    #[error("the argument '{0}' contains a NUL byte")]
    NulInArgument(String),
    #[error("cannot create the jail's cgroup: this host has no cgroup file system mounted")]
    NoCgroupMounted,
    #[error("cannot create the jail's cgroup: this host has no cgroup2 file system mounted")]
    NoCgroup2Mounted,
    #[error(
        "cannot create the jail's cgroup: this host has no cgroup v1 hierarchy with the memory, \
         cpu or pids controller mounted"
    )]
    NoV1Hierarchy,
    #[error("cannot use the cgroup {0} controller: no cgroup v1 hierarchy on this host has it")]
    NoV1Controller(String),
    #[error("the jail's cgroup {cgroup} is in use (is a jail with id {id} running?)")]
    CgroupInUse { cgroup: String, id: String },
    #[error("cannot set {file} in the jail's cgroup {cgroup}: there is no such cgroup file")]
    NoSuchCgroupFile { file: String, cgroup: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// An I/O error as a short reason: "Permission denied", without "(os error 13)".
pub(crate) struct Reason<'a>(pub &'a io::Error);

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.to_string();
        match s.find(" (os error") {
            Some(i) => f.write_str(&s[..i]),
            None => f.write_str(&s),
        }
    }
}

/// Turns an I/O result (of std or of rustix) into a [`Result`] that says what was being done.
pub(crate) trait Context<T> {
    /// `Err` becomes [`Error::Io`] with the action `action()` ("create a pipe", ...).
    fn cannot(self, action: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<io::Error>> Context<T> for std::result::Result<T, E> {
    fn cannot(self, action: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Io {
            action: action(),
            source: e.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_read_as_one_sentence_without_the_os_error_number() {
        let r: std::result::Result<(), _> = Err(rustix::io::Errno::ACCESS);
        let e = r.cannot(|| "open the thing".into()).unwrap_err();
        assert_eq!(e.to_string(), "cannot open the thing: Permission denied");
        let r: std::result::Result<(), _> = Err(io::Error::other("gone"));
        let e = r.cannot(|| "do it".into()).unwrap_err();
        assert_eq!(e.to_string(), "cannot do it: gone");
        assert!(matches!(e, Error::Io { .. }));
    }

    #[test]
    fn messages_are_one_line() {
        let all = [
            Error::InvalidId("a/b".into()),
            Error::RootUid,
            Error::IdOutOfRange,
            Error::DirInUse {
                path: "/srv/flint/a".into(),
                id: "a".into(),
            },
            Error::NotADirectory("/x".into()),
            Error::NotARegularFile("/x".into()),
            Error::AlreadyInJail {
                from: "/x".into(),
                shown: "/x".into(),
            },
            Error::FileNotAbsolute("x".into()),
            Error::FileNotNormal("/a/../b".into()),
            Error::FileWithoutName("/".into()),
            Error::FileInDevOrProc("/dev/kvm".into()),
            Error::NulInPath("/x".into()),
            Error::NulInArgument("x".into()),
            Error::NoCgroupMounted,
            Error::NoCgroup2Mounted,
            Error::NoV1Hierarchy,
            Error::NoV1Controller("hugetlb".into()),
            Error::CgroupInUse {
                cgroup: "flint/a".into(),
                id: "a".into(),
            },
            Error::NoSuchCgroupFile {
                file: "memory.bogus".into(),
                cgroup: "memory/flint/a".into(),
            },
        ];
        for e in all {
            let m = e.to_string();
            assert!(!m.contains('\n') && !m.contains("  "), "{m:?}");
            assert!(!m.ends_with('.'), "{m:?}");
        }
        assert_eq!(
            Error::IdOutOfRange.to_string(),
            "the jail's --uid and --gid must be below 4294967295"
        );
        assert_eq!(
            Error::AlreadyInJail {
                from: "/k".into(),
                shown: "/k".into()
            }
            .to_string(),
            "cannot copy /k into the jail: /k is there already (flint, one of its libraries or \
             another --file)"
        );
    }
}
