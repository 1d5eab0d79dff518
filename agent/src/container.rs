//! The containers of a pod (the containerd shim's): each one's root file system, mounted
//! from a disk the host swapped in ([`mount`], [`unmount`]), and its PID and mount
//! namespaces, which its init creates and its other processes join ([`Inits`], [`enter`]).
//!
//! A container's process is started through an intermediate process: `Command` forks the
//! intermediate, which (in `pre_exec`) creates or joins the container's namespaces and forks
//! the process itself, so that the process is born in the container's PID namespace (pid 1
//! for the init). The intermediate closes all its descriptors, ignores every signal it can,
//! waits for the process and ends as it ended (same exit status, or killed by the same
//! signal), so the agent sees it as the command: its pid is the command's, and its process
//! group, which the process shares, is what signals reach. Should the intermediate be killed
//! (SIGKILL), the process gets SIGKILL too (its parent-death signal), and so does everything
//! in its PID namespace when it is the init.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use flint_agent::protocol::DISK_WAIT;
use flint_agent::UserSpec;

use crate::describe;
use crate::in_root::{self, Root};

/// `BLKFLSBUF` of `<linux/fs.h>`: `_IO(0x12, 97)`, drop a block device's cached blocks.
const BLKFLSBUF: libc::Ioctl = 0x1261;

/// The live inits of the pod's containers: the intermediate process of each (whose
/// namespaces are the container's), by container id.
#[derive(Default)]
pub struct Inits {
    map: Mutex<HashMap<String, Init>>,
}

struct Init {
    pid: u32,
    pidfd: OwnedFd,
}

/// Whether the process of `pidfd` still runs (a pidfd becomes readable when it exits).
fn alive(pidfd: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    matches!(crate::poll(&mut fds, 0), Ok(0))
}

fn no_init(id: &str) -> String {
    format!("the container {id} has no running init process")
}

impl Inits {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Init>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether container `id`'s init runs.
    pub fn live(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|init| alive(&init.pidfd))
    }

    /// Note that process `pid` (watched by `pidfd`) is container `id`'s init.
    pub fn register(&self, id: &str, pid: u32, pidfd: OwnedFd) {
        self.lock().insert(id.to_string(), Init { pid, pidfd });
    }

    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The mount namespace and the PID namespace (for children) of container `id`'s live
    /// init, opened; `Err` is the message for the host.
    fn namespaces(&self, id: &str) -> Result<(OwnedFd, OwnedFd), String> {
        let map = self.lock();
        let init = map
            .get(id)
            .filter(|init| alive(&init.pidfd))
            .ok_or_else(|| no_init(id))?;
        let open = |ns: &str| {
            File::open(format!("/proc/{}/ns/{ns}", init.pid))
                .map(OwnedFd::from)
                .map_err(|e| {
                    format!(
                        "cannot open the container {id}'s {ns} namespace: {}",
                        describe(&e)
                    )
                })
        };
        let namespaces = (open("mnt")?, open("pid_for_children")?);
        // Still alive after the opening, so not reaped: the pid was not reused meanwhile.
        if !alive(&init.pidfd) {
            return Err(no_init(id));
        }
        Ok(namespaces)
    }
}

/// How a container's process gets its namespaces.
enum How {
    /// New PID and mount namespaces, with `/proc` of the new PID namespace at `proc_dir`.
    New { proc_dir: CString },
    /// Those of the live init.
    Join { mnt: OwnedFd, pid: OwnedFd },
}

/// Everything [`enter`] needs, prepared before the fork.
pub struct Prepared {
    how: How,
    root: CString,
    workdir: CString,
    user: Option<UserSpec>,
    /// The container's cgroup's `cgroup.procs`, open for writing: the process joins it.
    pub cgroup: Option<RawFd>,
}

fn cstring(bytes: &[u8]) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| "a path contains a NUL byte".to_string())
}

/// The root directory of container `id` under `dir`.
pub fn root_of(dir: &Path, id: &str) -> PathBuf {
    dir.join(id).join("root")
}

/// Prepare a process of container `id` (its root under `dir`): its init when
/// `new_namespaces`, else a process joining the init's namespaces. `workdir` is created in
/// the container's root when missing. `Err` is the message for the host.
pub fn prepare(
    inits: &Inits,
    dir: &Path,
    id: &str,
    new_namespaces: bool,
    workdir: &str,
    user: Option<&UserSpec>,
) -> Result<Prepared, String> {
    let root = root_of(dir, id);
    let opened = Root::open(&root.to_string_lossy())
        .map_err(|e| format!("the container {id} is not mounted ({})", describe(&e)))?;
    opened.create_dir_all(Path::new(workdir)).map_err(|e| {
        format!(
            "cannot use {workdir} as the working directory: {}",
            describe(&e)
        )
    })?;
    let how = if new_namespaces {
        if fs::symlink_metadata("/proc/self/ns/pid").is_err() {
            return Err(
                "the guest kernel has no PID namespaces (CONFIG_PID_NS), which the containers of a pod need"
                    .into(),
            );
        }
        if inits.live(id) {
            return Err(format!("the container {id} has a running init already"));
        }
        How::New {
            proc_dir: cstring(root.join("proc").as_os_str().as_bytes())?,
        }
    } else {
        let (mnt, pid) = inits.namespaces(id)?;
        How::Join { mnt, pid }
    };
    Ok(Prepared {
        how,
        root: cstring(root.as_os_str().as_bytes())?,
        workdir: cstring(workdir.as_bytes())?,
        user: user.cloned(),
        cgroup: None,
    })
}

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Enter the container `p` describes: run in the child between `fork` and `exec` (only
/// system calls, nothing that allocates or locks). Returns in the container's process (in
/// its namespaces and root, with its credentials); the intermediate never returns.
pub fn enter(p: &Prepared) -> io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    match &p.how {
        // SAFETY: unshare and mount take flags and NUL-terminated strings (or null) that
        // outlive the calls.
        How::New { .. } => unsafe {
            check(libc::syscall(
                libc::SYS_unshare,
                libc::CLONE_NEWNS | libc::CLONE_NEWPID,
            ))?;
            // Nothing mounted in the container propagates back, nor the other way.
            check(libc::syscall(
                libc::SYS_mount,
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null,
            ))?;
        },
        // SAFETY: setns takes open namespace descriptors and a flag.
        How::Join { mnt, pid } => unsafe {
            check(libc::syscall(
                libc::SYS_setns,
                mnt.as_raw_fd(),
                libc::CLONE_NEWNS,
            ))?;
            check(libc::syscall(
                libc::SYS_setns,
                pid.as_raw_fd(),
                libc::CLONE_NEWPID,
            ))?;
        },
    }
    // SAFETY: a plain fork (clone with only the exit signal); the child continues with this
    // single thread's copy of memory.
    let child =
        unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child > 0 {
        intermediate(child as libc::pid_t);
    }
    if let Some(procs) = p.cgroup {
        crate::cgroup::join(procs)?;
    }
    // SAFETY: prctl, mount, chdir and chroot take integers and NUL-terminated strings
    // that outlive the calls.
    unsafe {
        check(libc::syscall(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
        ))?;
        if let How::New { proc_dir } = &p.how {
            check(libc::syscall(
                libc::SYS_mount,
                c"proc".as_ptr(),
                proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                null,
            ))?;
        }
        check(libc::syscall(libc::SYS_chdir, p.root.as_ptr()))?;
        check(libc::syscall(libc::SYS_chroot, c".".as_ptr()))?;
        // Inside the new root: the path cannot lead out of it.
        check(libc::syscall(libc::SYS_chdir, p.workdir.as_ptr()))?;
    }
    in_root::enter(None, p.user.as_ref())
}

/// The intermediate: wait for the container's process `child` and end as it ended.
fn intermediate(child: libc::pid_t) -> ! {
    // SAFETY: only system calls on integers and on `status` and `action`, which live on this
    // stack; `_exit` ends the process without running anything of the parent's.
    unsafe {
        // Command's exec-error pipe among them: only the process may hold it.
        libc::syscall(libc::SYS_close_range, 0, u32::MAX, 0);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_IGN;
        for signal in 1..=64 {
            if !matches!(signal, libc::SIGKILL | libc::SIGSTOP | libc::SIGCHLD) {
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
        let mut status: libc::c_int = 0;
        loop {
            let rc = libc::syscall(
                libc::SYS_wait4,
                child,
                &mut status as *mut libc::c_int,
                0,
                std::ptr::null_mut::<libc::rusage>(),
            );
            if rc == child as libc::c_long {
                break;
            }
            if rc < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(255);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        let signal = libc::WTERMSIG(status);
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(signal, &action, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::syscall(libc::SYS_kill, libc::syscall(libc::SYS_getpid), signal);
        libc::_exit(128 + signal);
    }
}

/// `mount(2)` of `source` (type `fstype`) on `target`.
pub fn mount_fs(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let fail = |e: io::Error| {
        format!(
            "cannot mount {fstype} on {}: {}",
            target.display(),
            describe(&e)
        )
    };
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (source_c, target_c, fstype_c, data_c) = (
        c(source.as_bytes()).map_err(fail)?,
        c(target.as_os_str().as_bytes()).map_err(fail)?,
        c(fstype.as_bytes()).map_err(fail)?,
        c(data.as_bytes()).map_err(fail)?,
    );
    // SAFETY: NUL-terminated strings that outlive the call; the kernel copies them.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                data_c.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    Ok(())
}

/// Wait (at most [`DISK_WAIT`]) until the guest sees `disk` as `size` bytes long: the host
/// has just given it a new medium.
fn wait_for_size(disk: &str, size: u64) -> Result<(), String> {
    let name = disk.trim_start_matches("/dev/");
    let sys = format!("/sys/block/{name}/size");
    let began = Instant::now();
    loop {
        let sectors = fs::read_to_string(&sys)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if sectors.map(|s| s.saturating_mul(512)) == Some(size) {
            return Ok(());
        }
        if began.elapsed() > DISK_WAIT {
            return Err(format!(
                "the disk {disk} is not {size} bytes long after {} s (it is {})",
                DISK_WAIT.as_secs(),
                sectors.map_or("unknown".into(), |s| format!("{} bytes", s * 512))
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Drop whatever the guest cached of `disk`'s previous medium.
fn flush_cache(disk: &str) -> Result<(), String> {
    let file = File::open(disk).map_err(|e| format!("cannot open {disk}: {}", describe(&e)))?;
    // SAFETY: BLKFLSBUF takes no argument; the descriptor is open.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKFLSBUF, 0) } != 0 {
        let e = io::Error::last_os_error();
        return Err(format!("cannot flush {disk}'s cache: {}", describe(&e)));
    }
    Ok(())
}

/// Make `name` (a top-level entry of the root `root`) a directory, whatever the image had
/// there (a symbolic link would lead a mount out of the root).
fn top_level_dir(root: &Root, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    let fd: RawFd = root.raw_fd();
    // SAFETY: `st` is plain old data the kernel fills; `name` is NUL-terminated and
    // outlives the calls, `fd` is an open directory.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(fd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) == 0 {
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                return Ok(());
            }
            if libc::unlinkat(fd, name.as_ptr(), 0) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if libc::mkdirat(fd, name.as_ptr(), mode) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::fchmodat(fd, name.as_ptr(), mode, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Mount container `id`'s disk `disk` (`size` bytes) under `dir` (see the protocol's
/// module docs); `Err` is the message for the host, and nothing is left mounted then.
pub fn mount(dir: &Path, id: &str, disk: &str, size: u64) -> Result<(), String> {
    let base = dir.join(id);
    if fs::symlink_metadata(&base).is_ok() {
        return Err(format!("the container {id} is mounted already"));
    }
    wait_for_size(disk, size)?;
    flush_cache(disk)?;
    let (image, rw, root) = (base.join("image"), base.join("rw"), base.join("root"));
    for d in [&image, &rw, &root] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .map_err(|e| format!("cannot create {}: {}", d.display(), describe(&e)))?;
    }
    let result = mount_layers(disk, &image, &rw, &root);
    if result.is_err() {
        let _ = detach(&base);
    }
    result
}

fn mount_layers(disk: &str, image: &Path, rw: &Path, root: &Path) -> Result<(), String> {
    mount_fs(disk, image, "ext4", libc::MS_RDONLY, "noload")?;
    mount_fs("tmpfs", rw, "tmpfs", 0, "mode=755")?;
    for d in ["upper", "work"] {
        fs::create_dir(rw.join(d))
            .map_err(|e| format!("cannot create {}: {}", rw.join(d).display(), describe(&e)))?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        image.display(),
        rw.join("upper").display(),
        rw.join("work").display()
    );
    mount_fs("overlay", root, "overlay", 0, &data)?;
    // The root seen by the container's processes: /proc comes with its init (of its PID
    // namespace), the rest now.
    let opened = Root::open(&root.to_string_lossy())
        .map_err(|e| format!("cannot open {}: {}", root.display(), describe(&e)))?;
    for (name, mode) in [
        (c"proc", 0o555),
        (c"sys", 0o555),
        (c"dev", 0o755),
        (c"tmp", 0o1777),
    ] {
        let keep_tmp = name == c"tmp" && opened.open_dir(Path::new("/tmp")).is_ok();
        if !keep_tmp {
            top_level_dir(&opened, name, mode).map_err(|e| {
                format!(
                    "cannot make /{} a directory in the container: {}",
                    name.to_string_lossy(),
                    describe(&e)
                )
            })?;
        }
    }
    let quiet = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_fs(
        "sysfs",
        &root.join("sys"),
        "sysfs",
        quiet | libc::MS_RDONLY,
        "",
    )?;
    mount_fs(
        "devtmpfs",
        &root.join("dev"),
        "devtmpfs",
        libc::MS_NOSUID,
        "",
    )?;
    for d in ["pts", "shm"] {
        let path = root.join("dev").join(d);
        fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {}", path.display(), describe(&e)))?;
    }
    mount_fs(
        "devpts",
        &root.join("dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    )?;
    mount_fs("tmpfs", &root.join("dev/shm"), "tmpfs", quiet, "mode=1777")?;
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let path = root.join("dev").join(link);
        if fs::symlink_metadata(&path).is_err() {
            std::os::unix::fs::symlink(to, &path)
                .map_err(|e| format!("cannot create {}: {}", path.display(), describe(&e)))?;
        }
    }
    let _ = fs::set_permissions(root, fs::Permissions::from_mode(0o755));
    Ok(())
}

/// Detach whatever is mounted of the container at `base` and remove its directories.
fn detach(base: &Path) -> Result<(), String> {
    for d in ["root", "rw", "image"] {
        let path = base.join(d);
        if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
            // SAFETY: a NUL-terminated path that outlives the call. Lazily, with everything
            // mounted below it; EINVAL (not mounted) is fine.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    for d in ["root", "rw", "image"] {
        let path = base.join(d);
        match fs::remove_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(format!(
                    "cannot remove {}: {}",
                    path.display(),
                    describe(&e)
                ))
            }
        }
    }
    fs::remove_dir(base).map_err(|e| format!("cannot remove {}: {}", base.display(), describe(&e)))
}

/// Unmount container `id` (under `dir`) and remove its directory.
pub fn unmount(dir: &Path, id: &str) -> Result<(), String> {
    let base = dir.join(id);
    if fs::symlink_metadata(&base).is_err() {
        return Err(format!("the container {id} is not mounted"));
    }
    detach(&base)
}
