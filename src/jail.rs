//! `flint jail`: start flint in a chroot with its own namespaces and cgroup, as an
//! unprivileged user (in the spirit of Firecracker's jailer).
//!
//! The jail process (root) prepares `<chroot-base>/<id>/root` with a copy of this binary, the
//! shared libraries it has mapped and the `--file`s; creates the cgroup `flint/<id>` (with
//! the default `pids.max` unless `--cgroup` sets it); and forks a child in a new PID
//! namespace. The child joins the cgroup, unshares the mount, IPC, UTS and network namespaces
//! (its own, so that `pivot_root` does not move the jail process too), pivots into the jail
//! root, mounts a fresh /proc and a small tmpfs on /dev with the device nodes flint needs,
//! hands the jail root to the jail's user, applies the rlimits (with the default
//! `RLIMIT_NOFILE` unless `--rlimit` sets it), drops every privilege and execs
//! `/flint FLINT_ARGS...`. The jail process forwards SIGINT, SIGTERM and SIGHUP to it, waits,
//! removes the cgroup and the jail directory, and exits with the child's status.
//!
//! The jail tree is built by root while only root can write to it: every directory and file
//! is made relative to a directory descriptor, without following symbolic links, and the
//! jail's user gets the root directory last. The jail directory is removed the same way,
//! whatever the jailed flint left in it (symbolic links out of its root, trees of any depth).

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use rustix::fs::{AtFlags, Dir, FileType, Gid, Mode, OFlags, RenameFlags, Uid};
use rustix::io::Errno;

use crate::fail;

/// Where jails go unless `--chroot-base` says otherwise.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/flint";
/// The cgroup (under each hierarchy) that holds every jail's cgroup.
const CGROUP_PARENT: &str = "flint";
/// The v1 controllers a jail's cgroup is created under, when the host has them mounted.
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The rlimits (soft and hard) the jailed flint gets unless `--rlimit` sets them: more
/// descriptors than flint holds at most (a vsock device's 4,096 connections and 1,024 host
/// connections waiting, the devices' files, sockets and event fds), few enough that a
/// compromised flint cannot take the host's.
pub const DEFAULT_RLIMITS: [(Rlimit, u64); 1] = [(Rlimit::NoFile, 8192)];
/// What the jail writes into its cgroup unless `--cgroup` sets it, where the host has the
/// controller: room for the threads of a VM with the most vCPUs (254) and its devices, and
/// no fork bomb.
pub const DEFAULT_CGROUP_SETTINGS: [(&str, &str); 1] = [("pids.max", "512")];
/// How many directories deep [`remove_tree`] goes before it moves what is below up to the
/// top of the tree, so that it never holds more descriptors than this.
const REMOVE_DEPTH: usize = 32;

/// Which cgroup interface to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

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
    /// The resource named `name` as in `--rlimit NAME=N`.
    pub fn from_name(name: &str) -> Option<Rlimit> {
        Some(match name {
            "nofile" => Rlimit::NoFile,
            "fsize" => Rlimit::FSize,
            "nproc" => Rlimit::NProc,
            "core" => Rlimit::Core,
            "as" => Rlimit::As,
            "memlock" => Rlimit::MemLock,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
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
fn with_default_rlimits(given: &[(Rlimit, u64)]) -> Vec<(Rlimit, u64)> {
    let mut all: Vec<(Rlimit, u64)> = DEFAULT_RLIMITS
        .into_iter()
        .filter(|(r, _)| !given.iter().any(|(g, _)| g == r))
        .collect();
    all.extend_from_slice(given);
    all
}

/// The default cgroup settings `given` does not set.
fn default_cgroup_settings(given: &[(String, String)]) -> Vec<(&'static str, &'static str)> {
    DEFAULT_CGROUP_SETTINGS
        .into_iter()
        .filter(|(file, _)| !given.iter().any(|(g, _)| g == file))
        .collect()
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

/// A failure, as the one sentence flint prints.
#[derive(Debug)]
struct JailError(String);

type Result<T> = std::result::Result<T, JailError>;

/// An I/O error as a short reason: "Permission denied", without "(os error 13)".
fn reason(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// `Err` with "cannot {what}: {reason}" for an I/O result (of std or of rustix).
fn ctx<T, E: Into<io::Error>>(
    r: std::result::Result<T, E>,
    what: impl FnOnce() -> String,
) -> Result<T> {
    r.map_err(|e| JailError(format!("cannot {}: {}", what(), reason(&e.into()))))
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError(format!("the path {} contains a NUL byte", path.display())))
}

fn mode(bits: u32) -> Mode {
    Mode::from_raw_mode(bits)
}

/// Open the directory `name` in `dir`; a symbolic link there is not followed (`ELOOP`).
fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<OwnedFd> {
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
fn make_dir_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    bits: u32,
    reuse: bool,
    shown: &str,
) -> Result<OwnedFd> {
    let created = match rustix::fs::mkdirat(dir, name, mode(bits)) {
        Ok(()) => true,
        Err(Errno::EXIST) if reuse => false,
        Err(e) => return ctx(Err(e), || format!("create the jail directory {shown}")),
    };
    let fd = match open_dir_at(dir, name) {
        Err(Errno::LOOP | Errno::NOTDIR) => {
            return Err(JailError(format!(
                "cannot create the jail directory {shown}: something other than a directory \
                 is in its place"
            )))
        }
        r => ctx(r, || format!("open the jail directory {shown}"))?,
    };
    if created {
        // The umask may have taken bits away.
        ctx(rustix::fs::fchmod(&fd, mode(bits)), || {
            format!("set the mode of {shown}")
        })?;
    }
    Ok(fd)
}

/// Remove `name` in `parent` and everything in it, without following symbolic links and
/// with at most [`REMOVE_DEPTH`] directories open however deep the tree is: a directory
/// found that deep is first moved up to the top of the tree (under a new name).
fn remove_tree(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let top = match open_dir_at(parent, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::NOTDIR | Errno::LOOP) => {
            return Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?)
        }
        Err(e) => return Err(e.into()),
    };
    /// One open directory: its name in the one above, and whether an entry was seen in it
    /// since it was last read from the start.
    struct Level {
        dir: Dir,
        name: CString,
        seen: bool,
    }
    let open = |fd: OwnedFd, name: CString| -> io::Result<Level> {
        Ok(Level {
            dir: Dir::new(fd)?,
            name,
            seen: false,
        })
    };
    let mut stack = vec![open(top, name.to_owned())?];
    let mut moved = 0u64;
    // Directories found not empty when removed (someone else adds entries): bounded.
    let mut refilled = 0;
    while let Some(level) = stack.last_mut() {
        let entry = loop {
            match level.dir.next() {
                Some(entry) => {
                    let entry = entry?;
                    let n = entry.file_name();
                    if n != c"." && n != c".." {
                        break Some(n.to_owned());
                    }
                }
                None => break None,
            }
        };
        let Some(entry) = entry else {
            if level.seen {
                // Entries were removed while reading: read again until nothing is left.
                level.seen = false;
                level.dir.rewind();
                continue;
            }
            let Level { dir, name, .. } = stack.pop().expect("not empty");
            drop(dir);
            let above = match stack.last() {
                Some(l) => l.dir.fd()?,
                None => parent,
            };
            match rustix::fs::unlinkat(above, &name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::NOTEMPTY) if refilled < 100 => {
                    refilled += 1;
                    let fd = open_dir_at(above, &name)?;
                    stack.push(open(fd, name)?);
                }
                Err(e) => return Err(e.into()),
            }
            continue;
        };
        level.seen = true;
        let depth = stack.len();
        let fd = stack[depth - 1].dir.fd()?;
        match rustix::fs::unlinkat(fd, &entry, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => continue,
            Err(Errno::ISDIR) => {}
            Err(e) => return Err(e.into()),
        }
        if depth < REMOVE_DEPTH {
            match open_dir_at(fd, &entry) {
                Ok(sub) => stack.push(open(sub, entry)?),
                // Replaced or removed meanwhile: the next reading finds what is there.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => {}
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        // Too deep: move it to the top, where it is removed in turn.
        let top = stack[0].dir.fd()?;
        loop {
            moved += 1;
            let new_name = format!(".flint-removing-{moved}");
            match rustix::fs::renameat_with(fd, &entry, top, &new_name, RenameFlags::NOREPLACE) {
                Ok(()) | Err(Errno::NOENT) => break,
                Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// One directory of the jail's cgroup: `shown` is how messages name it.
struct Cgroup {
    path: PathBuf,
    shown: String,
}

/// The jail directory: the chroot base, open, and the jail's id in it.
struct JailDir {
    base: OwnedFd,
    id: CString,
    shown: PathBuf,
}

/// What the jail has created so far, removed again by [`Jail::cleanup`].
struct Jail {
    dir: Option<JailDir>,
    cgroups: Vec<Cgroup>,
}

impl Jail {
    /// Remove the cgroups and the jail directory; warnings for what cannot be removed.
    fn cleanup(&mut self) {
        for cg in self.cgroups.drain(..).rev() {
            // The cgroup may still count the child for a moment after it was reaped.
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&cg.path) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if tries < 100 && e.raw_os_error() == Some(libc::EBUSY) => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => {
                        eprintln!(
                            "flint: warning: cannot remove the jail's cgroup {}: {}",
                            cg.shown,
                            reason(&e)
                        );
                        break;
                    }
                }
            }
        }
        if let Some(dir) = self.dir.take() {
            if let Err(e) = remove_tree(dir.base.as_fd(), &dir.id) {
                eprintln!(
                    "flint: warning: cannot remove the jail directory {}: {}",
                    dir.shown.display(),
                    reason(&e)
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

/// Run `flint jail`: returns once the jailed flint has ended and the jail is gone.
pub fn run(options: &JailOptions) -> ExitCode {
    let mut jail = Jail {
        dir: None,
        cgroups: Vec::new(),
    };
    let result = prepare(options, &mut jail).and_then(|root| spawn_and_wait(options, &jail, &root));
    jail.cleanup();
    match result {
        Ok(status) => ExitCode::from(status),
        Err(JailError(message)) => fail(&message),
    }
}

/// Build the jail directory and the cgroup; returns the jail root.
fn prepare(o: &JailOptions, jail: &mut Jail) -> Result<PathBuf> {
    if !valid_id(&o.id) {
        return Err(JailError(format!(
            "the jail id '{}' must be 1 to 64 letters, digits and dashes",
            o.id
        )));
    }
    if o.uid == 0 {
        return Err(JailError(
            "the jail needs a non-zero --uid: the jailed flint must not run as root".into(),
        ));
    }
    if o.uid == u32::MAX || o.gid == u32::MAX {
        return Err(JailError(format!(
            "the jail's --uid and --gid must be below {}",
            u32::MAX
        )));
    }
    ctx(std::fs::create_dir_all(&o.chroot_base), || {
        format!("create the chroot base {}", o.chroot_base.display())
    })?;
    let base = ctx(
        rustix::fs::open(
            &o.chroot_base,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ),
        || format!("open the chroot base {}", o.chroot_base.display()),
    )?;
    let shown = o.chroot_base.join(&o.id);
    let id = CString::new(o.id.as_str()).expect("a valid id has no NUL");
    match rustix::fs::mkdirat(&base, &id, mode(0o755)) {
        Ok(()) => {}
        Err(Errno::EXIST) => {
            return Err(JailError(format!(
                "the jail directory {} is in use (is a jail with id {} running?)",
                shown.display(),
                o.id
            )))
        }
        Err(e) => {
            return ctx(Err(e), || {
                format!("create the jail directory {}", shown.display())
            })
        }
    }
    let dir = ctx(open_dir_at(base.as_fd(), &id), || {
        format!("open the jail directory {}", shown.display())
    })?;
    jail.dir = Some(JailDir {
        base,
        id,
        shown: shown.clone(),
    });
    ctx(rustix::fs::fchmod(&dir, mode(0o755)), || {
        format!("set the mode of {}", shown.display())
    })?;
    let root_shown = shown.join("root");
    let root = make_dir_at(
        dir.as_fd(),
        c"root",
        0o755,
        false,
        &root_shown.display().to_string(),
    )?;

    // This binary, and the shared libraries (and loader) it runs with.
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

    create_cgroups(o, jail)?;
    Ok(root_shown)
}

/// Copy the host file `from` to a new file `name` in `dir` (`shown` in the jail), with the
/// same permission bits (less set-user-ID and the like); `owner` gets it.
fn copy_file_at(
    from: &Path,
    dir: BorrowedFd<'_>,
    name: &CStr,
    shown: &str,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    let what = || format!("copy {} into the jail", from.display());
    let mut source = ctx(File::open(from), what)?;
    let meta = ctx(source.metadata(), what)?;
    if !meta.is_file() {
        return Err(JailError(format!(
            "cannot copy {} into the jail: it is not a regular file",
            from.display()
        )));
    }
    let bits = meta.permissions().mode() & 0o777;
    let copy = match rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        mode(bits),
    ) {
        Err(Errno::EXIST) => {
            return Err(JailError(format!(
                "cannot copy {} into the jail: {shown} is there already (flint, one of its \
                 libraries or another --file)",
                from.display()
            )))
        }
        r => ctx(r, what)?,
    };
    let mut copy = File::from(copy);
    ctx(io::copy(&mut source, &mut copy), what)?;
    ctx(rustix::fs::fchmod(&copy, mode(bits)), what)?;
    if let Some((uid, gid)) = owner {
        ctx(
            rustix::fs::fchown(&copy, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))),
            || format!("change the owner of {shown} in the jail"),
        )?;
    }
    Ok(())
}

/// Copy the host file `path` (absolute) to the same path under the jail root `root`,
/// creating the directories on the way (root's, mode 0755); `owner` gets the copy.
fn copy_into(root: BorrowedFd<'_>, path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    let relative = path.strip_prefix("/").map_err(|_| {
        JailError(format!(
            "--file {} must be an absolute path",
            path.display()
        ))
    })?;
    let mut names: Vec<&OsStr> = Vec::new();
    for c in relative.components() {
        match c {
            std::path::Component::Normal(n) => names.push(n),
            _ => {
                return Err(JailError(format!(
                    "--file {} must not contain '.' or '..'",
                    path.display()
                )))
            }
        }
    }
    let Some(file) = names.pop() else {
        return Err(JailError(format!(
            "--file {} must name a file",
            path.display()
        )));
    };
    if matches!(names.first().and_then(|n| n.to_str()), Some("dev" | "proc")) {
        return Err(JailError(format!(
            "--file {} cannot go into the jail: its /dev and /proc are its own",
            path.display()
        )));
    }
    let mut shown = String::new();
    let mut here: Option<OwnedFd> = None;
    for name in names {
        shown.push('/');
        shown.push_str(&name.to_string_lossy());
        let at = here.as_ref().map_or(root, |fd| fd.as_fd());
        let next = make_dir_at(at, &os_cstring(name)?, 0o755, true, &shown)?;
        here = Some(next);
    }
    shown.push('/');
    shown.push_str(&file.to_string_lossy());
    let at = here.as_ref().map_or(root, |fd| fd.as_fd());
    copy_file_at(path, at, &os_cstring(file)?, &shown, owner)
}

fn os_cstring(name: &OsStr) -> Result<CString> {
    cstring(Path::new(name))
}

/// The executable files mapped into this process other than its own binary: the dynamic
/// loader and shared libraries (none when flint is linked statically).
fn mapped_libraries() -> Result<Vec<PathBuf>> {
    let maps = ctx(std::fs::read_to_string("/proc/self/maps"), || {
        "read /proc/self/maps".into()
    })?;
    let exe = ctx(std::fs::read_link("/proc/self/exe"), || {
        "read /proc/self/exe".into()
    })?;
    let mut libs: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 6 || !fields[1].contains('x') || !fields[5].starts_with('/') {
            continue;
        }
        let path = PathBuf::from(fields[5]);
        if path != exe && !libs.contains(&path) && path.is_file() {
            libs.push(path);
        }
    }
    // The loader is mapped under its real path; the kernel looks for it under the one the
    // binary names (e.g. /lib64/ld-linux-x86-64.so.2, a symlink).
    let binary = ctx(std::fs::read("/proc/self/exe"), || {
        "read /proc/self/exe".into()
    })?;
    if let Some(interp) = elf_interpreter(&binary) {
        if !libs.contains(&interp) {
            libs.push(interp);
        }
    }
    Ok(libs)
}

/// The PT_INTERP path of a 64-bit little-endian ELF file, if it has one.
fn elf_interpreter(elf: &[u8]) -> Option<PathBuf> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| {
        let v = u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return None;
    }
    let phoff = u64_at(32)?;
    let (phentsize, phnum) = (usize::from(u16_at(54)?), usize::from(u16_at(56)?));
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == PT_INTERP {
            let (offset, size) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
            let bytes = elf.get(offset..offset.checked_add(size)?)?;
            let path = bytes.split(|&b| b == 0).next()?;
            return Some(PathBuf::from(std::ffi::OsStr::from_bytes(path)));
        }
    }
    None
}

/// A mounted cgroup file system, from /proc/self/mountinfo.
struct CgroupMount {
    path: PathBuf,
    v2: bool,
    /// The v1 controllers of this hierarchy (`memory`, `cpu`, ...).
    controllers: Vec<String>,
}

fn cgroup_mounts() -> Result<Vec<CgroupMount>> {
    let info = ctx(std::fs::read_to_string("/proc/self/mountinfo"), || {
        "read /proc/self/mountinfo".into()
    })?;
    let mut mounts = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut right = right.split(' ');
        let (fs_type, options) = (right.next(), right.nth(1).unwrap_or(""));
        let v2 = match fs_type {
            Some("cgroup2") => true,
            Some("cgroup") => false,
            _ => continue,
        };
        mounts.push(CgroupMount {
            path: PathBuf::from(mount_point.replace("\\040", " ")),
            v2,
            controllers: options.split(',').map(str::to_string).collect(),
        });
    }
    Ok(mounts)
}

/// The controller a cgroup file belongs to: `memory` for `memory.max`.
fn controller_of(file: &str) -> &str {
    file.split('.').next().unwrap_or(file)
}

fn create_cgroups(o: &JailOptions, jail: &mut Jail) -> Result<()> {
    let mounts = cgroup_mounts()?;
    let version = match o.cgroup_version {
        Some(v) => v,
        None if mounts
            .iter()
            .any(|m| m.v2 && m.path == Path::new("/sys/fs/cgroup")) =>
        {
            CgroupVersion::V2
        }
        None if mounts.iter().any(|m| !m.v2) => CgroupVersion::V1,
        None if mounts.iter().any(|m| m.v2) => CgroupVersion::V2,
        None => {
            return Err(JailError(
                "cannot create the jail's cgroup: this host has no cgroup file system mounted"
                    .into(),
            ))
        }
    };
    match version {
        CgroupVersion::V2 => create_v2(o, jail, &mounts),
        CgroupVersion::V1 => create_v1(o, jail, &mounts),
    }
}

/// mkdir the jail's cgroup under `base` (creating `flint` as needed) and remember it.
fn make_cgroup(jail: &mut Jail, base: &Path, prefix: &str, id: &str) -> Result<()> {
    let parent = base.join(CGROUP_PARENT);
    let shown = format!("{prefix}{CGROUP_PARENT}/{id}");
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return ctx(Err(e), || format!("create the jail's cgroup {shown}")),
    }
    let path = parent.join(id);
    match std::fs::create_dir(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(JailError(format!(
                "the jail's cgroup {shown} is in use (is a jail with id {id} running?)"
            )))
        }
        Err(e) => return ctx(Err(e), || format!("create the jail's cgroup {shown}")),
    }
    jail.cgroups.push(Cgroup { path, shown });
    Ok(())
}

fn create_v1(o: &JailOptions, jail: &mut Jail, mounts: &[CgroupMount]) -> Result<()> {
    let mut wanted: Vec<&str> = V1_CONTROLLERS.to_vec();
    for (file, _) in &o.cgroups {
        let c = controller_of(file);
        if !wanted.contains(&c) {
            wanted.push(c);
        }
    }
    let find = |c: &str| {
        mounts
            .iter()
            .position(|m| !m.v2 && m.controllers.iter().any(|x| x == c))
    };
    // One cgroup per hierarchy; a hierarchy may hold several controllers (cpu,cpuacct).
    let mut made: Vec<(usize, usize)> = Vec::new(); // (mount, index in jail.cgroups)
    for c in &wanted {
        let Some(m) = find(c) else {
            if V1_CONTROLLERS.contains(c) {
                continue;
            }
            return Err(JailError(format!(
                "cannot use the cgroup {c} controller: no cgroup v1 hierarchy on this host has it"
            )));
        };
        if made.iter().any(|&(mm, _)| mm == m) {
            continue;
        }
        make_cgroup(jail, &mounts[m].path, &format!("{c}/"), &o.id)?;
        made.push((m, jail.cgroups.len() - 1));
    }
    if made.is_empty() {
        return Err(JailError(
            "cannot create the jail's cgroup: this host has no cgroup v1 hierarchy with the \
             memory, cpu or pids controller mounted"
                .into(),
        ));
    }
    for (file, value) in &o.cgroups {
        let m = find(controller_of(file)).expect("every controller got a cgroup");
        let (_, i) = made.iter().find(|&&(mm, _)| mm == m).expect("made above");
        write_setting(&jail.cgroups[*i], file, value)?;
    }
    for (file, value) in default_cgroup_settings(&o.cgroups) {
        let made_for =
            find(controller_of(file)).and_then(|m| made.iter().find(|&&(mm, _)| mm == m));
        if let Some(&(_, i)) = made_for {
            write_default(&jail.cgroups[i], file, value)?;
        }
    }
    Ok(())
}

fn create_v2(o: &JailOptions, jail: &mut Jail, mounts: &[CgroupMount]) -> Result<()> {
    let base = mounts
        .iter()
        .filter(|m| m.v2)
        .min_by_key(|m| m.path != Path::new("/sys/fs/cgroup"))
        .map(|m| m.path.clone())
        .ok_or_else(|| {
            JailError(
                "cannot create the jail's cgroup: this host has no cgroup2 file system mounted"
                    .into(),
            )
        })?;
    let mut wanted: Vec<&str> = vec!["memory", "cpu", "pids"];
    for (file, _) in &o.cgroups {
        let c = controller_of(file);
        if c != "cgroup" && !wanted.contains(&c) {
            wanted.push(c);
        }
    }
    // Make the controllers' files appear in flint/<id>: enable them in the subtree_control
    // of the root and of flint/, where available.
    let parent = base.join(CGROUP_PARENT);
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return ctx(Err(e), || {
                format!("create the jail's cgroup {CGROUP_PARENT}")
            })
        }
    }
    enable_controllers(&base, &wanted)?;
    enable_controllers(&parent, &wanted)?;
    make_cgroup(jail, &base, "", &o.id)?;
    for (file, value) in &o.cgroups {
        write_setting(&jail.cgroups[0], file, value)?;
    }
    for (file, value) in default_cgroup_settings(&o.cgroups) {
        write_default(&jail.cgroups[0], file, value)?;
    }
    Ok(())
}

fn enable_controllers(dir: &Path, wanted: &[&str]) -> Result<()> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let available = read("cgroup.controllers");
    let enabled = read("cgroup.subtree_control");
    for c in wanted {
        let has = |s: &str| s.split_whitespace().any(|x| x == *c);
        if has(&available) && !has(&enabled) {
            ctx(
                std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")),
                || format!("enable the cgroup {c} controller in {}", dir.display()),
            )?;
        }
    }
    Ok(())
}

fn write_setting(cg: &Cgroup, file: &str, value: &str) -> Result<()> {
    let path = cg.path.join(file);
    if file.contains('/') || !path.is_file() {
        return Err(JailError(format!(
            "cannot set {file} in the jail's cgroup {}: there is no such cgroup file",
            cg.shown
        )));
    }
    ctx(std::fs::write(&path, value), || {
        format!("write {file}={value} in the jail's cgroup {}", cg.shown)
    })
}

/// Write a default setting, where the cgroup has the file (its controller is enabled).
fn write_default(cg: &Cgroup, file: &str, value: &str) -> Result<()> {
    if cg.path.join(file).is_file() {
        write_setting(cg, file, value)?;
    }
    Ok(())
}

/// The jailed flint's host PID, for the signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe and takes no pointers.
        unsafe { libc::kill(child, sig) };
    }
}

/// Fork the child in a new PID namespace, put it in the cgroup, let it go and wait for it.
/// Returns the exit status to use.
fn spawn_and_wait(o: &JailOptions, jail: &Jail, root: &Path) -> Result<u8> {
    // Everything the child needs is prepared here, before the fork.
    let plan = ChildPlan::new(o, root)?;
    let (read_end, write_end) = ctx(
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC),
        || "create a pipe".into(),
    )?;
    ctx(
        // SAFETY: without CLONE_FILES, unshare cannot make a descriptor another thread uses
        // invalid; CLONE_NEWPID only affects this process's future children.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWPID) },
        || "create a PID namespace for the jail".into(),
    )?;
    // SAFETY: this process is single-threaded here, so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return ctx(Err(io::Error::last_os_error()), || "fork the jail".into());
    }
    if pid == 0 {
        drop(write_end);
        let mut go = [0u8; 1];
        if rustix::io::read(&read_end, &mut go) != Ok(1) {
            // The jail process failed and says why.
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(1) };
        }
        let JailError(message) = plan.enter();
        // No eprintln: a panic here would unwind into the parent's cleanup.
        let _ = std::io::Write::write_all(
            &mut io::stderr(),
            format!("flint: error: {message}\n").as_bytes(),
        );
        // SAFETY: as above.
        unsafe { libc::_exit(1) };
    }
    CHILD.store(pid, Ordering::SeqCst);
    drop(read_end);
    let joined = jail.cgroups.iter().try_for_each(|cg| {
        ctx(
            std::fs::write(cg.path.join("cgroup.procs"), pid.to_string()),
            || format!("move the jailed flint into the cgroup {}", cg.shown),
        )
    });
    if joined.is_ok() {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: forward_signal is async-signal-safe (an atomic load and kill).
            unsafe { libc::signal(sig, forward_signal as *const () as libc::sighandler_t) };
        }
        // Should the child be gone already, waiting says how it ended.
        let _ = rustix::io::write(&write_end, b"g");
    }
    // Without "g", the child exits.
    drop(write_end);
    let status = wait_for(pid);
    CHILD.store(0, Ordering::SeqCst);
    joined?;
    status
}

fn wait_for(pid: libc::pid_t) -> Result<u8> {
    use rustix::process::{waitpid, Pid, WaitOptions};
    let pid = Pid::from_raw(pid).expect("a forked child's PID is positive");
    let status = loop {
        match waitpid(Some(pid), WaitOptions::empty()) {
            Ok(Some((_, status))) => break status,
            Ok(None) | Err(Errno::INTR) => {}
            Err(e) => return ctx(Err(e), || "wait for the jailed flint".into()),
        }
    };
    Ok(exit_status(
        status.exit_status(),
        status.terminating_signal(),
    ))
}

/// The status `flint jail` exits with for a child that exited with `code` or was killed by
/// `signal`: the same code, or 128 + the signal.
fn exit_status(code: Option<i32>, signal: Option<i32>) -> u8 {
    match (code, signal) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        (None, None) => 1,
    }
}

/// A device node the child makes in the jail's /dev.
struct Device {
    /// Under /dev/net rather than /dev.
    in_net: bool,
    name: &'static CStr,
    major: u32,
    minor: u32,
    mode: u32,
}

/// What the child does, with every string converted before the fork.
struct ChildPlan {
    root: CString,
    netns: Option<(CString, String)>,
    hostname: String,
    rlimits: Vec<(Rlimit, u64)>,
    devices: Vec<Device>,
    uid: u32,
    gid: u32,
    argv: Vec<CString>,
}

impl ChildPlan {
    fn new(o: &JailOptions, root: &Path) -> Result<ChildPlan> {
        let mut argv = vec![CString::new("/flint").expect("no NUL")];
        for a in &o.flint_args {
            argv.push(
                CString::new(a.as_str())
                    .map_err(|_| JailError(format!("the argument '{a}' contains a NUL byte")))?,
            );
        }
        let netns = match &o.netns {
            Some(p) => Some((cstring(p)?, p.display().to_string())),
            None => None,
        };
        let mut devices = vec![Device {
            in_net: false,
            name: c"kvm",
            major: 10,
            minor: 232,
            mode: 0o660,
        }];
        if Path::new("/dev/net/tun").exists() {
            devices.push(Device {
                in_net: true,
                name: c"tun",
                major: 10,
                minor: 200,
                mode: 0o660,
            });
        }
        if Path::new("/dev/urandom").exists() {
            devices.push(Device {
                in_net: false,
                name: c"urandom",
                major: 1,
                minor: 9,
                mode: 0o666,
            });
        }
        Ok(ChildPlan {
            root: cstring(root)?,
            netns,
            hostname: o.id.clone(),
            rlimits: with_default_rlimits(&o.rlimits),
            devices,
            uid: o.uid,
            gid: o.gid,
            argv,
        })
    }

    /// Enter the jail and exec the jailed flint; returns only on failure.
    fn enter(&self) -> JailError {
        match self.try_enter() {
            Ok(()) => unreachable!("exec returned success"),
            Err(e) => e,
        }
    }

    /// Make the current directory (the jail root, a mount point) the root: `pivot_root` and
    /// drop the host's root; where the host's root cannot be pivoted away from (an initramfs),
    /// move the jail root over / and chroot into it instead.
    fn switch_root(&self) -> Result<()> {
        ctx(rustix::fs::mkdir("old_root", mode(0o700)), || {
            "create the jail's old_root directory".into()
        })?;
        if let Err(e) = rustix::process::pivot_root(".", "old_root") {
            let _ = rustix::fs::unlinkat(rustix::fs::CWD, "old_root", AtFlags::REMOVEDIR);
            if e != Errno::INVAL {
                return ctx(Err(e), || "pivot_root into the jail".into());
            }
            return Self::move_root();
        }
        ctx(rustix::process::chdir("/"), || "enter the jail root".into())?;
        ctx(
            rustix::mount::unmount("/old_root", rustix::mount::UnmountFlags::DETACH),
            || "unmount the host's root in the jail".into(),
        )?;
        ctx(
            rustix::fs::unlinkat(rustix::fs::CWD, "/old_root", AtFlags::REMOVEDIR),
            || "remove the jail's old_root directory".into(),
        )
    }

    /// The fallback of [`Self::switch_root`] for a host whose root is an initramfs.
    fn move_root() -> Result<()> {
        ctx(rustix::mount::mount_move(".", "/"), || {
            "move the jail root over /".into()
        })?;
        ctx(rustix::process::chroot("."), || {
            "chroot into the jail".into()
        })?;
        ctx(rustix::process::chdir("/"), || "enter the jail root".into())
    }

    /// Mount a small tmpfs on the jail's /dev (owned by root, in the jail's own mount
    /// namespace) and make the device nodes in it for the jail's user.
    fn make_devices(&self) -> Result<()> {
        use rustix::mount::MountFlags;
        ctx(
            rustix::mount::mount(
                "tmpfs",
                "/dev",
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NOEXEC,
                c"mode=755,size=64k",
            ),
            || "mount a tmpfs on /dev in the jail".into(),
        )?;
        let dev = ctx(
            rustix::fs::open(
                "/dev",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ),
            || "open /dev in the jail".into(),
        )?;
        let net = make_dir_at(dev.as_fd(), c"net", 0o755, false, "/dev/net")?;
        let owner = (Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)));
        for d in &self.devices {
            let (dir, shown) = if d.in_net {
                (net.as_fd(), "/dev/net/")
            } else {
                (dev.as_fd(), "/dev/")
            };
            let what = || {
                format!(
                    "create the device {shown}{} in the jail",
                    d.name.to_string_lossy()
                )
            };
            let node = rustix::fs::makedev(d.major, d.minor);
            ctx(
                rustix::fs::mknodat(dir, d.name, FileType::CharacterDevice, mode(d.mode), node),
                what,
            )?;
            // The umask may have taken bits away.
            ctx(
                rustix::fs::chmodat(dir, d.name, mode(d.mode), AtFlags::empty()),
                what,
            )?;
            ctx(
                rustix::fs::chownat(dir, d.name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW),
                what,
            )?;
        }
        Ok(())
    }

    fn try_enter(&self) -> Result<()> {
        use rustix::thread::UnshareFlags;
        let mut flags = UnshareFlags::NEWNS | UnshareFlags::NEWIPC | UnshareFlags::NEWUTS;
        if let Some((path, shown)) = &self.netns {
            let fd = ctx(
                rustix::fs::open(
                    path.as_c_str(),
                    OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                ),
                || format!("open the network namespace {shown}"),
            )?;
            ctx(
                rustix::thread::move_into_link_name_space(
                    fd.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                ),
                || format!("join the network namespace {shown}"),
            )?;
        } else {
            flags |= UnshareFlags::NEWNET;
        }
        // SAFETY: without CLONE_FILES no descriptor becomes invalid for another thread (and
        // this child has no other thread).
        ctx(unsafe { rustix::thread::unshare_unsafe(flags) }, || {
            "create the jail's namespaces".into()
        })?;
        use rustix::mount::MountPropagationFlags as Propagation;
        ctx(
            rustix::mount::mount_change("/", Propagation::PRIVATE | Propagation::REC),
            || "make the jail's mounts private".into(),
        )?;
        ctx(
            rustix::mount::mount_bind_recursive(self.root.as_c_str(), self.root.as_c_str()),
            || "bind-mount the jail root".into(),
        )?;
        ctx(rustix::process::chdir(self.root.as_c_str()), || {
            "enter the jail root".into()
        })?;
        self.switch_root()?;
        use rustix::mount::MountFlags;
        ctx(
            rustix::mount::mount(
                "proc",
                "/proc",
                "proc",
                MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                None,
            ),
            || "mount /proc in the jail".into(),
        )?;
        self.make_devices()?;
        ctx(
            rustix::system::sethostname(self.hostname.as_bytes()),
            || "set the jail's hostname".into(),
        )?;
        // Last of what root does in the jail tree: hand its root to the jail's user.
        let (uid, gid) = (self.uid, self.gid);
        let root = ctx(
            rustix::fs::open(
                "/",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ),
            || "open the jail root".into(),
        )?;
        ctx(
            rustix::fs::fchown(&root, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))),
            || format!("hand the jail root to user {uid}"),
        )?;
        drop(root);
        for &(limit, value) in &self.rlimits {
            let rl = rustix::process::Rlimit {
                current: Some(value),
                maximum: Some(value),
            };
            ctx(rustix::process::setrlimit(limit.resource(), rl), || {
                format!("set the {} rlimit to {value}", limit.name())
            })?;
        }
        close_other_fds();
        // This child has one thread: the per-thread calls change the whole process.
        ctx(rustix::thread::set_thread_groups(&[]), || {
            "drop the supplementary groups".into()
        })?;
        let g = Gid::from_raw(gid);
        ctx(rustix::thread::set_thread_res_gid(g, g, g), || {
            format!("switch to group {gid}")
        })?;
        let u = Uid::from_raw(uid);
        ctx(rustix::thread::set_thread_res_uid(u, u, u), || {
            format!("switch to user {uid}")
        })?;
        ctx(rustix::thread::set_no_new_privs(true), || {
            "set no_new_privs".into()
        })?;
        let mut ptrs: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        // SAFETY: a NUL-terminated path and a null-terminated array of NUL-terminated strings
        // that outlive the call; the environment is inherited.
        unsafe { libc::execv(ptrs[0], ptrs.as_ptr()) };
        ctx(Err(io::Error::last_os_error()), || {
            "run /flint in the jail".into()
        })
    }
}

/// Close every file descriptor above 2.
fn close_other_fds() {
    // SAFETY: close_range takes plain integers; this single-threaded child owns every fd it
    // closes and uses none of them again.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r < 0 {
        for fd in 3..1024 {
            // SAFETY: as above; closing an fd that is not open is harmless.
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("a"));
        assert!(valid_id("vm-01-ABC"));
        assert!(valid_id(&"x".repeat(64)));
        assert!(!valid_id(""));
        assert!(!valid_id(&"x".repeat(65)));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(".."));
        assert!(!valid_id("a_b"));
    }

    /// A fresh directory under the system's temporary directory.
    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("flint-jail-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn open_dir(path: &Path) -> OwnedFd {
        rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap()
    }

    #[test]
    fn remove_tree_removes_deep_trees_and_does_not_follow_links() {
        let base = scratch("remove");
        let outside = scratch("remove-outside");
        std::fs::write(outside.join("keep"), b"kept").unwrap();
        let tree = base.join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep"), tree.join("file-link")).unwrap();
        // Far deeper than REMOVE_DEPTH, with a link out and a file at every level.
        let mut fd = open_dir(&tree);
        for i in 0..10 * REMOVE_DEPTH {
            rustix::fs::mkdirat(&fd, c"d", mode(0o755)).unwrap();
            rustix::fs::symlinkat(&outside, &fd, c"out").unwrap();
            let f = rustix::fs::openat(
                &fd,
                format!("f{i}"),
                OFlags::CREATE | OFlags::WRONLY,
                mode(0o644),
            );
            drop(f.unwrap());
            fd = open_dir_at(fd.as_fd(), c"d").unwrap();
        }
        drop(fd);
        remove_tree(open_dir(&base).as_fd(), c"tree").unwrap();
        assert!(!tree.exists());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"kept");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        // A link or a file in place of the tree is removed, not followed.
        std::os::unix::fs::symlink(&outside, base.join("tree")).unwrap();
        remove_tree(open_dir(&base).as_fd(), c"tree").unwrap();
        assert!(std::fs::symlink_metadata(base.join("tree")).is_err());
        assert!(outside.join("keep").exists());
        // Nothing there: nothing to do.
        remove_tree(open_dir(&base).as_fd(), c"tree").unwrap();
        std::fs::remove_dir_all(&base).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    fn message<T>(r: Result<T>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(JailError(m)) => m,
        }
    }

    #[test]
    fn copy_into_never_follows_what_is_in_its_way() {
        let host = scratch("copy-host");
        let jail = scratch("copy-jail");
        let outside = scratch("copy-outside");
        let file = host.join("kernel");
        std::fs::write(&file, b"kernel").unwrap();
        let root = open_dir(&jail);
        let inside = jail.join(file.strip_prefix("/").unwrap());
        let first = jail.join(file.components().nth(1).unwrap());

        // A symbolic link where a directory goes: refused, nothing written through it.
        std::os::unix::fs::symlink(&outside, &first).unwrap();
        let m = message(copy_into(root.as_fd(), &file, None));
        assert!(
            m.ends_with("something other than a directory is in its place"),
            "{m}"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        std::fs::remove_file(&first).unwrap();

        // A symbolic link where the copy goes: refused, its target untouched.
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::write(outside.join("target"), b"untouched").unwrap();
        std::os::unix::fs::symlink(outside.join("target"), &inside).unwrap();
        let m = message(copy_into(root.as_fd(), &file, None));
        assert!(m.contains("is there already"), "{m}");
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"untouched");
        std::fs::remove_file(&inside).unwrap();

        // Nothing in the way: copied, with the same permission bits.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o4750)).unwrap();
        copy_into(root.as_fd(), &file, None).unwrap();
        assert_eq!(std::fs::read(&inside).unwrap(), b"kernel");
        let bits = std::fs::metadata(&inside).unwrap().permissions().mode() & 0o7777;
        assert_eq!(bits, 0o750);

        let m = message(copy_into(root.as_fd(), Path::new("/dev/kvm"), None));
        assert!(m.contains("its /dev and /proc are its own"), "{m}");
        for dir in [host, jail, outside] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn defaults_give_way_to_what_is_asked() {
        assert_eq!(with_default_rlimits(&[]), [(Rlimit::NoFile, 8192)]);
        assert_eq!(
            with_default_rlimits(&[(Rlimit::FSize, 10)]),
            [(Rlimit::NoFile, 8192), (Rlimit::FSize, 10)]
        );
        assert_eq!(
            with_default_rlimits(&[(Rlimit::NoFile, 64)]),
            [(Rlimit::NoFile, 64)]
        );
        assert_eq!(default_cgroup_settings(&[]), [("pids.max", "512")]);
        let asked = [("memory.max".to_string(), "1".to_string())];
        assert_eq!(default_cgroup_settings(&asked), [("pids.max", "512")]);
        let asked = [("pids.max".to_string(), "64".to_string())];
        assert!(default_cgroup_settings(&asked).is_empty());
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(Some(0), None), 0);
        assert_eq!(exit_status(Some(3), None), 3);
        assert_eq!(exit_status(None, Some(libc::SIGTERM)), 143);
        assert_eq!(exit_status(None, Some(libc::SIGKILL)), 137);
    }

    #[test]
    fn controllers_of_files() {
        assert_eq!(controller_of("memory.max"), "memory");
        assert_eq!(controller_of("cpu.cfs_quota_us"), "cpu");
        assert_eq!(controller_of("pids.max"), "pids");
    }
}
