//! `flint jail`: start flint in a chroot with its own namespaces and cgroup, as an
//! unprivileged user (in the spirit of Firecracker's jailer).
//!
//! The jail process (root) prepares `<chroot-base>/<id>/root` with a copy of this binary, the
//! shared libraries it has mapped, the `--file`s and the device nodes flint needs; creates the
//! cgroup `flint/<id>`; and forks a child in a new PID namespace. The child joins the cgroup,
//! unshares the mount, IPC, UTS and network namespaces (its own, so that `pivot_root` does not
//! move the jail process too), pivots into the jail root, mounts a fresh /proc, applies the
//! rlimits, drops every privilege and execs `/flint FLINT_ARGS...`. The jail process forwards
//! SIGINT, SIGTERM and SIGHUP to it, waits, removes the cgroup and the jail directory, and exits
//! with the child's status.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::fail;

/// Where jails go unless `--chroot-base` says otherwise.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/flint";
/// The cgroup (under each hierarchy) that holds every jail's cgroup.
const CGROUP_PARENT: &str = "flint";
/// The v1 controllers a jail's cgroup is created under, when the host has them mounted.
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

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

    fn resource(self) -> libc::__rlimit_resource_t {
        match self {
            Rlimit::NoFile => libc::RLIMIT_NOFILE,
            Rlimit::FSize => libc::RLIMIT_FSIZE,
            Rlimit::NProc => libc::RLIMIT_NPROC,
            Rlimit::Core => libc::RLIMIT_CORE,
            Rlimit::As => libc::RLIMIT_AS,
            Rlimit::MemLock => libc::RLIMIT_MEMLOCK,
        }
    }
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

/// `Err` with "cannot {what}: {reason}" for an I/O result.
fn ctx<T>(r: io::Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| JailError(format!("cannot {}: {}", what(), reason(&e))))
}

/// The result of a libc call that returns -1 on failure, as an `io::Result`.
fn check(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError(format!("the path {} contains a NUL byte", path.display())))
}

/// One directory of the jail's cgroup: `shown` is how messages name it.
struct Cgroup {
    path: PathBuf,
    shown: String,
}

/// What the jail has created so far, removed again by [`Jail::cleanup`].
struct Jail {
    dir: Option<PathBuf>,
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
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!(
                    "flint: warning: cannot remove the jail directory {}: {}",
                    dir.display(),
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
    ctx(std::fs::create_dir_all(&o.chroot_base), || {
        format!("create the chroot base {}", o.chroot_base.display())
    })?;
    let dir = o.chroot_base.join(&o.id);
    match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
        Ok(()) => jail.dir = Some(dir.clone()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(JailError(format!(
                "the jail directory {} is in use (is a jail with id {} running?)",
                dir.display(),
                o.id
            )))
        }
        Err(e) => {
            return ctx(Err(e), || {
                format!("create the jail directory {}", dir.display())
            })
        }
    }
    let root = dir.join("root");
    make_dir(&root, 0o755)?;
    chown(&root, o.uid, o.gid)?;

    // This binary, and the shared libraries (and loader) it runs with.
    copy_file(Path::new("/proc/self/exe"), &root.join("flint"))?;
    for lib in mapped_libraries()? {
        copy_into(&root, &lib)?;
    }
    for file in &o.files {
        let copy = copy_into(&root, file)?;
        chown(&copy, o.uid, o.gid)?;
    }
    make_dir(&root.join("proc"), 0o555)?;
    make_dir(&root.join("dev"), 0o755)?;
    make_device(&root, "dev/kvm", 10, 232, 0o660, o)?;
    make_dir(&root.join("dev/net"), 0o755)?;
    if Path::new("/dev/net/tun").exists() {
        make_device(&root, "dev/net/tun", 10, 200, 0o660, o)?;
    }
    if Path::new("/dev/urandom").exists() {
        make_device(&root, "dev/urandom", 1, 9, 0o666, o)?;
    }

    create_cgroups(o, jail)?;
    Ok(root)
}

fn make_dir(path: &Path, mode: u32) -> Result<()> {
    ctx(std::fs::DirBuilder::new().mode(mode).create(path), || {
        format!("create the jail directory {}", path.display())
    })?;
    // The umask may have taken bits away.
    ctx(
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)),
        || format!("set the mode of {}", path.display()),
    )
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    ctx(std::os::unix::fs::chown(path, Some(uid), Some(gid)), || {
        format!("change the owner of {}", path.display())
    })
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    ctx(std::fs::copy(from, to).map(drop), || {
        format!("copy {} into the jail", from.display())
    })
}

/// Copy the host file `path` (absolute) to the same path under `root`; returns the copy.
fn copy_into(root: &Path, path: &Path) -> Result<PathBuf> {
    let relative = path.strip_prefix("/").map_err(|_| {
        JailError(format!(
            "--file {} must be an absolute path",
            path.display()
        ))
    })?;
    if relative
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(JailError(format!(
            "--file {} must not contain '.' or '..'",
            path.display()
        )));
    }
    let copy = root.join(relative);
    if let Some(parent) = copy.parent() {
        ctx(
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent),
            || format!("create the jail directory {}", parent.display()),
        )?;
    }
    copy_file(path, &copy)?;
    Ok(copy)
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

fn make_device(
    root: &Path,
    name: &str,
    major: u32,
    minor: u32,
    mode: u32,
    o: &JailOptions,
) -> Result<()> {
    let path = root.join(name);
    let c_path = cstring(&path)?;
    // SAFETY: c_path is a valid NUL-terminated string; mknod only reads it.
    let ret = unsafe {
        libc::mknod(
            c_path.as_ptr(),
            libc::S_IFCHR | mode,
            libc::makedev(major, minor),
        )
    };
    ctx(check(ret.into()), || {
        format!("create the device /{name} in the jail")
    })?;
    ctx(
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)),
        || format!("set the mode of /{name} in the jail"),
    )?;
    chown(&path, o.uid, o.gid)
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
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: pipe writes two fds into the array it is given.
    ctx(
        check(unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) }.into()),
        || "create a pipe".into(),
    )?;
    let [read_end, write_end] = pipe;
    // SAFETY: unshare takes no pointers; it only affects this process's future children.
    ctx(
        check(unsafe { libc::unshare(libc::CLONE_NEWPID) }.into()),
        || "create a PID namespace for the jail".into(),
    )?;
    // SAFETY: this process is single-threaded here, so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return ctx(Err(io::Error::last_os_error()), || "fork the jail".into());
    }
    if pid == 0 {
        // SAFETY: closing our copy of the write end, which nothing else uses.
        unsafe { libc::close(write_end) };
        let mut go = 0u8;
        // SAFETY: reading one byte into a local.
        let n = unsafe { libc::read(read_end, (&mut go as *mut u8).cast(), 1) };
        if n != 1 {
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
    // SAFETY: closing our copy of the read end.
    unsafe { libc::close(read_end) };
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
        // SAFETY: writing one byte from a local.
        unsafe { libc::write(write_end, b"g".as_ptr().cast(), 1) };
    }
    // SAFETY: closing the write end; without "g" the child exits.
    unsafe { libc::close(write_end) };
    let status = wait_for(pid);
    CHILD.store(0, Ordering::SeqCst);
    joined?;
    status
}

fn wait_for(pid: libc::pid_t) -> Result<u8> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return ctx(Err(e), || "wait for the jailed flint".into());
        }
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u8
    } else {
        128u8.saturating_add(libc::WTERMSIG(status) as u8)
    })
}

/// What the child does, with every string converted before the fork.
struct ChildPlan {
    root: CString,
    netns: Option<(CString, String)>,
    hostname: String,
    rlimits: Vec<(Rlimit, u64)>,
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
        Ok(ChildPlan {
            root: cstring(root)?,
            netns,
            hostname: o.id.clone(),
            rlimits: o.rlimits.clone(),
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
        // SAFETY: mkdir with a NUL-terminated path.
        ctx(
            check(unsafe { libc::mkdir(c"old_root".as_ptr(), 0o700) }.into()),
            || "create the jail's old_root directory".into(),
        )?;
        // SAFETY: pivot_root with two NUL-terminated paths relative to the jail root.
        let r = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c"old_root".as_ptr()) };
        if let Err(e) = check(r) {
            // SAFETY: rmdir with a NUL-terminated path.
            unsafe { libc::rmdir(c"old_root".as_ptr()) };
            if e.raw_os_error() != Some(libc::EINVAL) {
                return ctx(Err(e), || "pivot_root into the jail".into());
            }
            return Self::move_root();
        }
        // SAFETY: chdir to a NUL-terminated path.
        ctx(check(unsafe { libc::chdir(c"/".as_ptr()) }.into()), || {
            "enter the jail root".into()
        })?;
        // SAFETY: detaching the old root, a NUL-terminated path.
        let r = unsafe { libc::umount2(c"/old_root".as_ptr(), libc::MNT_DETACH) };
        ctx(check(r.into()), || {
            "unmount the host's root in the jail".into()
        })?;
        // SAFETY: rmdir with a NUL-terminated path.
        ctx(
            check(unsafe { libc::rmdir(c"/old_root".as_ptr()) }.into()),
            || "remove the jail's old_root directory".into(),
        )?;
        Ok(())
    }

    /// The fallback of [`Self::switch_root`] for a host whose root is an initramfs.
    fn move_root() -> Result<()> {
        let none = std::ptr::null();
        // SAFETY: moving the mount at "." (the jail root) onto "/", NUL-terminated strings.
        let r = unsafe {
            libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                none,
                libc::MS_MOVE,
                none.cast(),
            )
        };
        ctx(check(r.into()), || "move the jail root over /".into())?;
        // SAFETY: chroot and chdir with NUL-terminated paths.
        ctx(check(unsafe { libc::chroot(c".".as_ptr()) }.into()), || {
            "chroot into the jail".into()
        })?;
        // SAFETY: as above.
        ctx(check(unsafe { libc::chdir(c"/".as_ptr()) }.into()), || {
            "enter the jail root".into()
        })
    }

    fn try_enter(&self) -> Result<()> {
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if let Some((path, shown)) = &self.netns {
            // SAFETY: path is NUL-terminated; the fd is closed right after setns.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            ctx(check(fd.into()), || {
                format!("open the network namespace {shown}")
            })?;
            // SAFETY: setns on an fd we own.
            let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
            // SAFETY: closing the fd opened above.
            unsafe { libc::close(fd) };
            ctx(check(r.into()), || {
                format!("join the network namespace {shown}")
            })?;
        } else {
            flags |= libc::CLONE_NEWNET;
        }
        // SAFETY: unshare takes no pointers.
        ctx(check(unsafe { libc::unshare(flags) }.into()), || {
            "create the jail's namespaces".into()
        })?;
        let none = std::ptr::null();
        // SAFETY: mount with a NUL-terminated target and null source/type/data, as
        // MS_PRIVATE allows.
        let r = unsafe {
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        ctx(check(r.into()), || "make the jail's mounts private".into())?;
        // SAFETY: bind-mounting the jail root onto itself; both strings are NUL-terminated.
        let r = unsafe {
            libc::mount(
                self.root.as_ptr(),
                self.root.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        };
        ctx(check(r.into()), || "bind-mount the jail root".into())?;
        // SAFETY: chdir to a NUL-terminated path.
        ctx(
            check(unsafe { libc::chdir(self.root.as_ptr()) }.into()),
            || "enter the jail root".into(),
        )?;
        self.switch_root()?;
        // SAFETY: mounting proc with NUL-terminated strings and no data.
        let r = unsafe {
            libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        };
        ctx(check(r.into()), || "mount /proc in the jail".into())?;
        // SAFETY: the pointer and length describe the hostname bytes.
        let r = unsafe { libc::sethostname(self.hostname.as_ptr().cast(), self.hostname.len()) };
        ctx(check(r.into()), || "set the jail's hostname".into())?;
        for &(limit, value) in &self.rlimits {
            let rl = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: setrlimit reads the struct it is given.
            let r = unsafe { libc::setrlimit(limit.resource(), &rl) };
            ctx(check(r.into()), || {
                format!("set the {} rlimit to {value}", limit.name())
            })?;
        }
        close_other_fds();
        // SAFETY: setgroups with an empty list reads nothing.
        ctx(
            check(unsafe { libc::setgroups(0, std::ptr::null()) }.into()),
            || "drop the supplementary groups".into(),
        )?;
        let (uid, gid) = (self.uid, self.gid);
        // SAFETY: plain integer arguments.
        ctx(
            check(unsafe { libc::setresgid(gid, gid, gid) }.into()),
            || format!("switch to group {gid}"),
        )?;
        // SAFETY: plain integer arguments.
        ctx(
            check(unsafe { libc::setresuid(uid, uid, uid) }.into()),
            || format!("switch to user {uid}"),
        )?;
        // SAFETY: plain integer arguments.
        let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        ctx(check(r.into()), || "set no_new_privs".into())?;
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
    // SAFETY: close_range takes plain integers; only fds this process owns are closed.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r < 0 {
        for fd in 3..1024 {
            // SAFETY: closing an fd that may not be open is harmless.
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

    #[test]
    fn controllers_of_files() {
        assert_eq!(controller_of("memory.max"), "memory");
        assert_eq!(controller_of("cpu.cfs_quota_us"), "cpu");
        assert_eq!(controller_of("pids.max"), "pids");
    }
}
