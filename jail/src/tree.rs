//! Building the jail tree on the host: `<chroot-base>/<id>/root` with a copy of flint, the
//! shared libraries it runs with, the `--file`s and the mount points of /proc and /dev.
//!
//! Root builds the tree while only root can write to it, and still never trusts what it finds:
//! every directory and file is made relative to a directory descriptor, without following
//! symbolic links, and anything other than what it expects in the way is refused.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Gid, Mode, OFlags, Uid};
use rustix::io::Errno;

use crate::error::{Context, Error, Result};
use crate::libs::mapped_libraries;
use crate::options::JailOptions;

/// The jail directory `<chroot-base>/<id>`: the chroot base, open, and the id in it.
pub(crate) struct JailDir {
    pub base: OwnedFd,
    pub id: CString,
    /// How messages name it.
    pub shown: PathBuf,
}

/// `path` as a C string.
pub(crate) fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::NulInPath(path.into()))
}

pub(crate) fn mode(bits: u32) -> Mode {
    Mode::from_raw_mode(bits)
}

/// Open the directory `name` in `dir`; a symbolic link there is not followed (`ELOOP`).
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Create the directory `name` in `dir` with exactly `bits` as its mode and open it; with
/// `reuse`, a directory already there is used as it is. Anything else in its place (a
/// symbolic link, a file) is refused, never followed. `shown` names it in messages.
pub(crate) fn make_dir_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    bits: u32,
    reuse: bool,
    shown: &str,
) -> Result<OwnedFd> {
    let created = match rustix::fs::mkdirat(dir, name, mode(bits)) {
        Ok(()) => true,
        Err(Errno::EXIST) if reuse => false,
        Err(e) => return Err(e).cannot(|| format!("create the jail directory {shown}")),
    };
    let fd = match open_dir_at(dir, name) {
        Err(Errno::LOOP | Errno::NOTDIR) => return Err(Error::NotADirectory(shown.into())),
        r => r.cannot(|| format!("open the jail directory {shown}"))?,
    };
    if created {
        // The umask may have taken bits away.
        rustix::fs::fchmod(&fd, mode(bits)).cannot(|| format!("set the mode of {shown}"))?;
    }
    Ok(fd)
}

/// Create the jail directory `<chroot-base>/<id>` (and the chroot base as needed). Once
/// this returns, the directory is the caller's to remove; one already there means the id is
/// in use, and is left alone.
pub(crate) fn create_jail_dir(o: &JailOptions) -> Result<JailDir> {
    std::fs::create_dir_all(&o.chroot_base)
        .cannot(|| format!("create the chroot base {}", o.chroot_base.display()))?;
    let base = rustix::fs::open(
        &o.chroot_base,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .cannot(|| format!("open the chroot base {}", o.chroot_base.display()))?;
    let shown = o.chroot_base.join(&o.id);
    let id = CString::new(o.id.as_str()).map_err(|_| Error::InvalidId(o.id.clone()))?;
    match rustix::fs::mkdirat(&base, &id, mode(0o755)) {
        Ok(()) => Ok(JailDir { base, id, shown }),
        Err(Errno::EXIST) => Err(Error::DirInUse {
            path: shown,
            id: o.id.clone(),
        }),
        Err(e) => Err(e).cannot(|| format!("create the jail directory {}", shown.display())),
    }
}

impl JailDir {
    /// Open the jail directory, not following a symbolic link put in its place.
    pub(crate) fn open(&self) -> Result<OwnedFd> {
        open_dir_at(self.base.as_fd(), &self.id)
            .cannot(|| format!("open the jail directory {}", self.shown.display()))
    }
}

/// Fill the jail directory `dir` (`shown`): its `root` with a copy of this binary as /flint,
/// the shared libraries (and loader) it runs with, the `--file`s (owned by the jail's user)
/// and the mount points /proc and /dev. Returns the jail root's path.
pub(crate) fn fill(o: &JailOptions, dir: BorrowedFd<'_>, shown: &Path) -> Result<PathBuf> {
    rustix::fs::fchmod(dir, mode(0o755))
        .cannot(|| format!("set the mode of {}", shown.display()))?;
    let root_shown = shown.join("root");
    let root = make_dir_at(
        dir,
        c"root",
        0o755,
        false,
        &root_shown.display().to_string(),
    )?;

    copy_file_at(
        Path::new("/proc/self/exe"),
        root.as_fd(),
        c"flint",
        "/flint",
        None,
    )?;
    for lib in mapped_libraries()? {
        copy_into(root.as_fd(), &lib, None)?;
    }
    let mut files: Vec<&PathBuf> = Vec::new();
    for file in &o.files {
        if !files.contains(&file) {
            files.push(file);
        }
    }
    for file in files {
        copy_into(root.as_fd(), file, Some((o.uid, o.gid)))?;
    }
    // Mount points: the child mounts /proc and a tmpfs with the device nodes on /dev.
    make_dir_at(root.as_fd(), c"proc", 0o555, false, "/proc")?;
    make_dir_at(root.as_fd(), c"dev", 0o755, false, "/dev")?;
    Ok(root_shown)
}

/// Copy the host file `from` to a new file `name` in `dir` (`shown` in the jail), with the
/// same permission bits (less set-user-ID and the like); `owner` gets it.
pub(crate) fn copy_file_at(
    from: &Path,
    dir: BorrowedFd<'_>,
    name: &CStr,
    shown: &str,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    let what = || format!("copy {} into the jail", from.display());
    let mut source = File::open(from).cannot(what)?;
    let meta = source.metadata().cannot(what)?;
    if !meta.is_file() {
        return Err(Error::NotARegularFile(from.into()));
    }
    let bits = meta.permissions().mode() & 0o777;
    let copy = match rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        mode(bits),
    ) {
        Err(Errno::EXIST) => {
            return Err(Error::AlreadyInJail {
                from: from.into(),
                shown: shown.into(),
            })
        }
        r => r.cannot(what)?,
    };
    let mut copy = File::from(copy);
    io::copy(&mut source, &mut copy).cannot(what)?;
    rustix::fs::fchmod(&copy, mode(bits)).cannot(what)?;
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(&copy, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .cannot(|| format!("change the owner of {shown} in the jail"))?;
    }
    Ok(())
}

/// The directories on the way to the host file `path` (absolute, without `.` or `..`) and its
/// name: where [`copy_into`] puts it under the jail root.
fn jail_path(path: &Path) -> Result<(Vec<&OsStr>, &OsStr)> {
    let relative = path
        .strip_prefix("/")
        .map_err(|_| Error::FileNotAbsolute(path.into()))?;
    let mut names: Vec<&OsStr> = Vec::new();
    for c in relative.components() {
        match c {
            Component::Normal(n) => names.push(n),
            _ => return Err(Error::FileNotNormal(path.into())),
        }
    }
    let Some(file) = names.pop() else {
        return Err(Error::FileWithoutName(path.into()));
    };
    if matches!(names.first().and_then(|n| n.to_str()), Some("dev" | "proc")) {
        return Err(Error::FileInDevOrProc(path.into()));
    }
    Ok((names, file))
}

/// Copy the host file `path` (absolute) to the same path under the jail root `root`,
/// creating the directories on the way (root's, mode 0755); `owner` gets the copy.
pub(crate) fn copy_into(
    root: BorrowedFd<'_>,
    path: &Path,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    let (dirs, file) = jail_path(path)?;
    let mut shown = String::new();
    let mut here: Option<OwnedFd> = None;
    for name in dirs {
        shown.push('/');
        shown.push_str(&name.to_string_lossy());
        let at = here.as_ref().map_or(root, |fd| fd.as_fd());
        let next = make_dir_at(at, &cstring(Path::new(name))?, 0o755, true, &shown)?;
        here = Some(next);
    }
    shown.push('/');
    shown.push_str(&file.to_string_lossy());
    let at = here.as_ref().map_or(root, |fd| fd.as_fd());
    copy_file_at(path, at, &cstring(Path::new(file))?, &shown, owner)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A fresh directory under the system's temporary directory, removed when dropped.
    pub(crate) struct Scratch(pub PathBuf);

    impl Scratch {
        pub(crate) fn new(tag: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("flint-jail-unit-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        pub(crate) fn open(&self) -> OwnedFd {
            open_dir(&self.0)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Fail, never skip, where the test needs root (to chown, to make device nodes), as the
    /// jail does.
    pub(crate) fn require_root() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root, as the jail does"
        );
    }

    /// Run `f` with the umask `bits`: one test at a time, since the umask is the process's.
    pub(crate) fn with_umask<T>(bits: u32, f: impl FnOnce() -> T) -> T {
        static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = UMASK.lock().unwrap_or_else(|e| e.into_inner());
        let old = rustix::process::umask(mode(bits));
        let r = f();
        rustix::process::umask(old);
        r
    }

    pub(crate) fn open_dir(path: &Path) -> OwnedFd {
        rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap()
    }

    pub(crate) fn message<T>(r: Result<T>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    fn bits(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn paths_in_the_jail_are_plain_absolute_paths_outside_dev_and_proc() {
        let (dirs, file) = jail_path(Path::new("/a/b/kernel")).unwrap();
        assert_eq!(dirs, [OsStr::new("a"), OsStr::new("b")]);
        assert_eq!(file, "kernel");
        let (dirs, file) = jail_path(Path::new("/kernel")).unwrap();
        assert!(dirs.is_empty());
        assert_eq!(file, "kernel");
        // A trailing slash or a doubled one changes nothing.
        assert_eq!(jail_path(Path::new("//a//k/")).unwrap().1, "k");
        for (path, expected) in [
            ("a/kernel", "--file a/kernel must be an absolute path"),
            (
                "/a/../etc/passwd",
                "--file /a/../etc/passwd must not contain '.' or '..'",
            ),
            ("/", "--file / must name a file"),
            (
                "/dev/kvm",
                "--file /dev/kvm cannot go into the jail: its /dev and /proc are its own",
            ),
            (
                "/proc/self/exe",
                "--file /proc/self/exe cannot go into the jail: its /dev and /proc are its own",
            ),
        ] {
            assert_eq!(message(jail_path(Path::new(path))), expected, "{path}");
        }
        // Only the first component counts: /srv/dev is an ordinary directory.
        assert!(jail_path(Path::new("/srv/dev/k")).is_ok());
        assert!(jail_path(Path::new("/devices")).is_ok());
    }

    #[test]
    fn directories_get_exactly_their_mode_and_links_are_refused() {
        let s = Scratch::new("mkdir");
        let dir = s.open();
        // A umask that would take bits away.
        let made = with_umask(0o077, || make_dir_at(dir.as_fd(), c"d", 0o755, false, "/d"));
        made.unwrap();
        assert_eq!(bits(&s.0.join("d")), 0o755);

        // Already there: refused unless reused, and a reused one keeps its mode.
        std::fs::set_permissions(s.0.join("d"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let m = message(make_dir_at(dir.as_fd(), c"d", 0o755, false, "/d"));
        assert_eq!(m, "cannot create the jail directory /d: File exists");
        make_dir_at(dir.as_fd(), c"d", 0o755, true, "/d").unwrap();
        assert_eq!(bits(&s.0.join("d")), 0o700);

        // A symbolic link to a directory, or a file, in its place: refused, not followed.
        let outside = Scratch::new("mkdir-outside");
        std::os::unix::fs::symlink(&outside.0, s.0.join("link")).unwrap();
        std::fs::write(s.0.join("file"), b"").unwrap();
        for name in [c"link", c"file"] {
            let m = message(make_dir_at(dir.as_fd(), name, 0o755, true, "/x"));
            assert_eq!(
                m,
                "cannot create the jail directory /x: something other than a directory is in \
                 its place"
            );
        }
        assert_eq!(std::fs::read_dir(&outside.0).unwrap().count(), 0);
    }

    #[test]
    fn copy_into_never_follows_what_is_in_its_way() {
        require_root();
        let host = Scratch::new("copy-host");
        let jail = Scratch::new("copy-jail");
        let outside = Scratch::new("copy-outside");
        let file = host.0.join("kernel");
        std::fs::write(&file, b"kernel").unwrap();
        let root = jail.open();
        let inside = jail.0.join(file.strip_prefix("/").unwrap());
        let first = jail.0.join(file.components().nth(1).unwrap());

        // A symbolic link where a directory goes: refused, nothing written through it.
        std::os::unix::fs::symlink(&outside.0, &first).unwrap();
        let m = message(copy_into(root.as_fd(), &file, None));
        assert!(
            m.ends_with("something other than a directory is in its place"),
            "{m}"
        );
        assert_eq!(std::fs::read_dir(&outside.0).unwrap().count(), 0);
        std::fs::remove_file(&first).unwrap();

        // A symbolic link where the copy goes: refused, its target untouched.
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::write(outside.0.join("target"), b"untouched").unwrap();
        std::os::unix::fs::symlink(outside.0.join("target"), &inside).unwrap();
        let m = message(copy_into(root.as_fd(), &file, None));
        assert!(m.contains("is there already"), "{m}");
        assert_eq!(
            std::fs::read(outside.0.join("target")).unwrap(),
            b"untouched"
        );
        std::fs::remove_file(&inside).unwrap();

        // Nothing in the way: copied, with the same permission bits (less set-user-ID).
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o4750)).unwrap();
        copy_into(root.as_fd(), &file, None).unwrap();
        assert_eq!(std::fs::read(&inside).unwrap(), b"kernel");
        assert_eq!(bits(&inside), 0o750);
        let meta = std::fs::metadata(&inside).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0));

        // A second copy to the same place is refused, the first left as it was.
        let m = message(copy_into(root.as_fd(), &file, None));
        assert!(m.contains("is there already"), "{m}");
        assert_eq!(std::fs::read(&inside).unwrap(), b"kernel");

        let m = message(copy_into(root.as_fd(), Path::new("/dev/kvm"), None));
        assert!(m.contains("its /dev and /proc are its own"), "{m}");
    }

    #[test]
    fn copies_go_to_their_owner_and_only_regular_files_are_copied() {
        require_root();
        let host = Scratch::new("owner-host");
        let jail = Scratch::new("owner-jail");
        let root = jail.open();
        let file = host.0.join("disk.img");
        std::fs::write(&file, b"disk").unwrap();
        let copied = with_umask(0o077, || {
            copy_into(root.as_fd(), &file, Some((10123, 10124)))
        });
        copied.unwrap();
        let inside = jail.0.join(file.strip_prefix("/").unwrap());
        let meta = std::fs::metadata(&inside).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (10123, 10124));
        // The directories on the way are root's, 0755 whatever the umask.
        let parent = inside.parent().unwrap();
        let meta = std::fs::metadata(parent).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o755));

        let m = message(copy_into(root.as_fd(), &host.0, None));
        assert_eq!(
            m,
            format!(
                "cannot copy {} into the jail: it is not a regular file",
                host.0.display()
            )
        );
        let m = message(copy_into(root.as_fd(), &host.0.join("none"), None));
        assert_eq!(
            m,
            format!(
                "cannot copy {} into the jail: No such file or directory",
                host.0.join("none").display()
            )
        );
    }

    #[test]
    fn a_jail_directory_already_there_is_in_use() {
        let base = Scratch::new("in-use");
        let mut o = crate::options::tests::options("in-use");
        o.chroot_base = base.0.join("deeper/base");
        let dir = create_jail_dir(&o).unwrap();
        assert_eq!(dir.shown, o.chroot_base.join("in-use"));
        assert_eq!(bits(&dir.shown), 0o755);
        let m = message(create_jail_dir(&o));
        assert_eq!(
            m,
            format!(
                "the jail directory {} is in use (is a jail with id in-use running?)",
                dir.shown.display()
            )
        );
    }

    #[test]
    fn the_jail_root_holds_flint_its_libraries_the_files_and_mount_points() {
        require_root();
        let base = Scratch::new("fill");
        let host = Scratch::new("fill-host");
        let kernel = host.0.join("vmlinux");
        std::fs::write(&kernel, b"kernel").unwrap();
        let mut o = crate::options::tests::options("fill");
        o.chroot_base = base.0.clone();
        // Named twice: copied once.
        o.files = vec![kernel.clone(), kernel.clone()];
        let dir = create_jail_dir(&o).unwrap();
        let root = fill(&o, dir.open().unwrap().as_fd(), &dir.shown).unwrap();
        assert_eq!(root, base.0.join("fill/root"));

        let exe = std::fs::read("/proc/self/exe").unwrap();
        assert!(std::fs::read(root.join("flint")).unwrap() == exe);
        let inside = root.join(kernel.strip_prefix("/").unwrap());
        let meta = std::fs::metadata(&inside).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (10123, 10124));
        for lib in mapped_libraries().unwrap() {
            assert!(
                root.join(lib.strip_prefix("/").unwrap()).is_file(),
                "{lib:?}"
            );
        }
        assert_eq!(bits(&root.join("proc")), 0o555);
        assert_eq!(bits(&root.join("dev")), 0o755);
        assert_eq!(std::fs::read_dir(root.join("dev")).unwrap().count(), 0);
        // Root builds it; the jail's user gets the root only in the child, last.
        assert_eq!(std::fs::metadata(&root).unwrap().uid(), 0);

        // A --file that is one of flint's libraries is refused: the copy is there already.
        let lib = mapped_libraries().unwrap().into_iter().next();
        let lib = lib.expect("the test binary is linked dynamically");
        let mut clash = o.clone();
        clash.id = "fill-lib".into();
        clash.files = vec![lib];
        let dir = create_jail_dir(&clash).unwrap();
        let m = message(fill(&clash, dir.open().unwrap().as_fd(), &dir.shown));
        assert!(
            m.contains("is there already (flint, one of its libraries"),
            "{m}"
        );
    }
}
