//! Tier 2: `flint jail` on the local machine (needs root, /dev/kvm and cgroup v1 mounted per
//! controller under /sys/fs/cgroup; the tests say so and pass without checking otherwise).
//!
//! The jailed flint boots tiny guests (a few bytes of 64-bit code in a minimal ELF, from
//! tests/support/tiny.rs as in tests/tiny_guests.rs); the tests look at it from outside while it runs: namespaces, user,
//! cgroup membership and limits, and that nothing is left behind when it ends.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::tiny::{flint, text, wait_bounded, Guest};
use support::TempDir;

const UID: u32 = 10123;
const GID: u32 = 10124;
const V1: &str = "/sys/fs/cgroup";

/// The jail tests need root, /dev/kvm and the v1 memory, pids and cpu controllers (what the
/// development and CI machines have). Fail, never skip, when they are missing.
fn require_jail() {
    assert!(
        can_jail(),
        "the jail tests cannot run on this machine (see above)"
    );
}

/// Whether this machine can run the jail tests; says why not when it cannot.
fn can_jail() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root
        && Path::new("/dev/kvm").exists()
        && Path::new(V1).join("memory/tasks").exists()
        && Path::new(V1).join("pids/tasks").exists()
        && Path::new(V1).join("cpu/tasks").exists();
    if !ok {
        eprintln!("needs root, /dev/kvm and cgroup v1 (memory, pids, cpu) under {V1}");
    }
    ok
}

/// A jail id no other test (or test run) uses.
fn unique_id(name: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{name}-{}-{n}", std::process::id())
}

/// `flint jail --id ID --uid UID --gid GID --chroot-base BASE EXTRA... -- FLINT_ARGS...`.
fn jail(base: &TempDir, id: &str, extra: &[&str], flint_args: &[&str]) -> Command {
    let mut cmd = flint();
    cmd.args(["jail", "--id", id, "--uid", &UID.to_string()])
        .args(["--gid", &GID.to_string(), "--chroot-base"])
        .arg(&base.0)
        .args(extra)
        .arg("--")
        .args(flint_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    wait_bounded(cmd.spawn().unwrap(), Duration::from_secs(60))
}

/// The v1 cgroups of a jail, one per controller the jail uses.
fn cgroups_of(id: &str) -> Vec<PathBuf> {
    ["memory", "pids", "cpu"]
        .iter()
        .map(|c| Path::new(V1).join(c).join("flint").join(id))
        .collect()
}

fn assert_gone(base: &TempDir, id: &str) {
    let dir = base.0.join(id);
    assert!(!dir.exists(), "{} was left behind", dir.display());
    for cg in cgroups_of(id) {
        assert!(!cg.exists(), "{} was left behind", cg.display());
    }
}

#[test]
fn jailed_flint_boots_a_tiny_guest_and_leaves_nothing_behind() {
    require_jail();
    let base = TempDir::new("jail-base");
    let guests = TempDir::new("jail-guest");
    let kernel = guests.write(
        "vmlinux",
        &Guest::default().print("hi from jail\n").reset().elf(),
    );
    let kernel = kernel.to_str().unwrap();
    let id = unique_id("boot");
    let out = run(&mut jail(
        &base,
        &id,
        &["--file", kernel, "--cgroup", "pids.max=64"],
        &["boot", "--kernel", kernel],
    ));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("hi from jail"),
        "{}",
        text(&out.stdout)
    );
    assert_gone(&base, &id);
}

#[test]
fn jailed_flint_cannot_see_host_files() {
    require_jail();
    let base = TempDir::new("jail-base");
    let id = unique_id("files");
    let out = run(&mut jail(
        &base,
        &id,
        &[],
        &["boot", "--kernel", "/etc/passwd"],
    ));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot read the kernel /etc/passwd: No such file or directory"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_gone(&base, &id);
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The host PID of the jailed flint (the jail process's only child) once it runs /flint.
fn jailed_flint(jail_pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{jail_pid}/task/{jail_pid}/children"))
                .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(b"/flint\0boot") {
                return pid.parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "the jailed flint did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until the guest has printed `marker` (so the VM runs), reading stdout on a thread.
fn wait_for_output(child: &mut Child, marker: &str) -> JoinHandle<String> {
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        let mut told = false;
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !told && String::from_utf8_lossy(&seen).contains(&marker) {
                told = true;
                let _ = tx.send(());
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the jailed guest did not print its marker");
    reader
}

/// Stops a jail a failing test leaves running (SIGTERM reaches the jailed flint).
struct StopOnPanic(i32);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: kill takes plain integers; the pid is the test's own child.
            unsafe { libc::kill(self.0, libc::SIGTERM) };
        }
    }
}

/// Spawn `cmd`, a [`jail`] command whose guest prints `ready`, and wait until the guest runs.
/// Returns the jail process, the guard that stops it should the test fail (keep it alive to
/// the end), the thread reading the guest's output (see [`wait_for_output`]) and the host PID
/// of the jailed flint.
fn start_jail(cmd: &mut Command) -> (Child, StopOnPanic, JoinHandle<String>, String) {
    let mut child = cmd.spawn().unwrap();
    let stop = StopOnPanic(child.id() as i32);
    let reader = wait_for_output(&mut child, "ready");
    let pid = jailed_flint(child.id()).to_string();
    (child, stop, reader, pid)
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// Send `signal` to the jail process, wait for it to end and check that it exits with status
/// 128 + `signal` (the jailed flint stopped the VM on the signal).
fn stop_jail(child: Child, signal: i32) -> Output {
    // SAFETY: kill takes plain integers; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = wait_bounded(child, Duration::from_secs(30));
    assert_eq!(
        out.status.code(),
        Some(128 + signal),
        "stderr: {}",
        text(&out.stderr)
    );
    out
}

#[test]
fn running_jail_is_isolated_unprivileged_and_limited() {
    require_jail();
    let base = TempDir::new("jail-base");
    let guests = TempDir::new("jail-guest");
    let kernel = guests.write("vmlinux", &Guest::default().print("ready\n").spin().elf());
    let kernel = kernel.to_str().unwrap();
    let id = unique_id("run");
    let (child, _stop, reader, pid) = start_jail(&mut jail(
        &base,
        &id,
        &[
            "--file",
            kernel,
            "--cgroup",
            "memory.limit_in_bytes=268435456",
            "--cgroup=pids.max=64",
            "--cgroup",
            "cpu.cfs_quota_us=50000",
            "--rlimit",
            "nofile=128,fsize=1048576",
        ],
        &["boot", "--kernel", kernel],
    ));

    // Namespaces: none shared with the host (this test), apart from the user namespace.
    for kind in ["net", "mnt", "pid", "ipc", "uts"] {
        assert_ne!(
            ns(&pid, kind),
            ns("self", kind),
            "{kind} namespace is the host's"
        );
    }
    // The jailed flint is PID 1 of its PID namespace.
    let status = read(format!("/proc/{pid}/status"));
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.trim_end().ends_with("\t1"), "{nspid}");
    // Unprivileged: uid and gid, real/effective/saved/fs, and no supplementary groups.
    let line = |key: &str| {
        let l = status.lines().find(|l| l.starts_with(key)).unwrap();
        l[key.len()..]
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(line("Uid:"), vec![UID.to_string(); 4]);
    assert_eq!(line("Gid:"), vec![GID.to_string(); 4]);
    assert!(line("Groups:").is_empty(), "{:?}", line("Groups:"));
    assert_eq!(line("NoNewPrivs:"), vec!["1".to_string()]);
    // Its root is the jail root: flint and the kernel are there, the host's /etc is not.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(root.join("flint").is_file());
    assert!(root.join(kernel.trim_start_matches('/')).is_file());
    assert!(!root.join("etc/passwd").exists());
    assert!(!root.join("old_root").exists());
    // Rlimits.
    let limits = read(format!("/proc/{pid}/limits"));
    let limit = |name: &str| {
        let l = limits.lines().find(|l| l.starts_with(name)).unwrap();
        l[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(limit("Max open files"), vec!["128", "128"]);
    assert_eq!(limit("Max file size"), vec!["1048576", "1048576"]);
    // The cgroup: limits in force and the jailed flint in it.
    let memory = Path::new(V1).join("memory/flint").join(&id);
    let pids = Path::new(V1).join("pids/flint").join(&id);
    let cpu = Path::new(V1).join("cpu/flint").join(&id);
    assert_eq!(
        read(memory.join("memory.limit_in_bytes")).trim(),
        "268435456"
    );
    assert_eq!(read(pids.join("pids.max")).trim(), "64");
    assert_eq!(read(cpu.join("cpu.cfs_quota_us")).trim(), "50000");
    for cg in [&memory, &pids, &cpu] {
        let procs = read(cg.join("cgroup.procs"));
        assert!(
            procs.lines().any(|p| p == pid),
            "{pid} not in {}: {procs}",
            cg.display()
        );
    }
    // Its own files, the jail's, not the host's; the jail root and the --file are its user's.
    let jail_root = base.0.join(&id).join("root");
    assert!(jail_root.join("flint").is_file());
    assert!(jail_root.join(kernel.trim_start_matches('/')).is_file());
    {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let owner = |p: &Path| {
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(owner(&jail_root), (UID, GID));
        assert_eq!(
            owner(&jail_root.join(kernel.trim_start_matches('/'))),
            (UID, GID)
        );
        assert_eq!(owner(&jail_root.join("flint")), (0, 0));
        // The device nodes are in the jail's own /dev (a tmpfs only the jail sees).
        let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
        assert!(kvm.file_type().is_char_device());
        assert_eq!(kvm.rdev(), libc::makedev(10, 232));
        assert_eq!(
            (kvm.uid(), kvm.gid(), kvm.mode() & 0o777),
            (UID, GID, 0o660)
        );
        assert!(!jail_root.join("dev/kvm").exists());
    }
    // The hostname in the jail is its id.
    if Path::new("/usr/bin/nsenter").exists() {
        let out = Command::new("/usr/bin/nsenter")
            .args(["-t", &pid, "-u", "cat", "/proc/sys/kernel/hostname"])
            .output()
            .unwrap();
        assert_eq!(text(&out.stdout).trim(), id);
    }

    // SIGTERM to the jail process reaches the jailed flint, which stops the VM.
    let out = stop_jail(child, libc::SIGTERM);
    assert!(
        text(&out.stderr).contains("SIGTERM"),
        "{}",
        text(&out.stderr)
    );
    assert!(reader.join().unwrap().contains("ready"));
    assert_gone(&base, &id);
}

#[test]
fn cgroup_v2_when_asked() {
    // This machine mounts a cgroup2 hierarchy (without controllers) next to the v1 ones.
    let unified = Path::new(V1).join("unified");
    require_jail();
    assert!(
        unified.join("cgroup.procs").exists(),
        "this test needs a cgroup2 hierarchy at {}",
        unified.display()
    );
    let base = TempDir::new("jail-base");
    let guests = TempDir::new("jail-guest");
    let kernel = guests.write("vmlinux", &Guest::default().print("ready\n").spin().elf());
    let kernel = kernel.to_str().unwrap();
    let id = unique_id("v2");
    let (child, _stop, reader, pid) = start_jail(&mut jail(
        &base,
        &id,
        &["--file", kernel, "--cgroup-version", "2"],
        &["boot", "--kernel", kernel],
    ));
    let cg = unified.join("flint").join(&id);
    let procs = read(cg.join("cgroup.procs"));
    assert!(
        procs.lines().any(|p| p == pid),
        "{pid} not in {}: {procs}",
        cg.display()
    );
    stop_jail(child, libc::SIGINT);
    drop(reader.join());
    assert!(!cg.exists(), "{} was left behind", cg.display());
    assert!(!base.0.join(&id).exists());
}

/// One line on stderr containing `expected`, exit status 1, nothing left behind.
fn assert_refused(base: &TempDir, id: &str, out: &Output, expected: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("flint: error: "), "{stderr}");
    assert!(stderr.contains(expected), "{stderr:?} lacks {expected:?}");
    assert_gone(base, id);
}

#[test]
fn bad_input_gets_one_sentence_and_leaves_nothing() {
    require_jail();
    let base = TempDir::new("jail-base");
    let id = unique_id("bad");
    let boot = ["boot", "--kernel", "/k"];

    let mut uid0 = flint();
    uid0.args([
        "jail",
        "--id",
        &id,
        "--uid",
        "0",
        "--gid",
        "0",
        "--chroot-base",
    ])
    .arg(&base.0)
    .args(["--"])
    .args(boot);
    let out = uid0.output().unwrap();
    assert_refused(&base, &id, &out, "needs a non-zero --uid");

    let out = run(&mut jail(&base, "bad_id", &[], &boot));
    assert_refused(
        &base,
        "bad_id",
        &out,
        "the jail id 'bad_id' must be 1 to 64 letters",
    );

    let mut no_dash = flint();
    no_dash
        .args(["jail", "--id", &id, "--uid", "1", "--gid", "1", "boot"])
        .stdin(Stdio::null());
    let out = no_dash.output().unwrap();
    assert_refused(
        &base,
        &id,
        &out,
        "'flint jail' needs flint's arguments after --",
    );

    let out = run(&mut jail(
        &base,
        &id,
        &["--cgroup", "memory.bogus=1"],
        &boot,
    ));
    assert_refused(
        &base,
        &id,
        &out,
        &format!(
            "cannot set memory.bogus in the jail's cgroup memory/flint/{id}: there is no such \
             cgroup file"
        ),
    );

    let out = run(&mut jail(
        &base,
        &id,
        &["--netns", "/nonexistent/netns"],
        &boot,
    ));
    assert_refused(
        &base,
        &id,
        &out,
        "cannot open the network namespace /nonexistent/netns: No such file or directory",
    );

    let out = run(&mut jail(
        &base,
        &id,
        &["--file", "/nonexistent/kernel"],
        &boot,
    ));
    assert_refused(
        &base,
        &id,
        &out,
        "cannot copy /nonexistent/kernel into the jail",
    );

    // A jail directory that exists means the id is in use: refused, and left alone.
    std::fs::create_dir_all(base.0.join(&id)).unwrap();
    let out = run(&mut jail(&base, &id, &[], &boot));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is in use"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(base.0.join(&id).is_dir());
    std::fs::remove_dir(base.0.join(&id)).unwrap();
    for cg in cgroups_of(&id) {
        assert!(!cg.exists(), "{} was left behind", cg.display());
    }
}

#[test]
fn joins_the_network_namespace_given() {
    require_jail();
    assert!(
        Path::new("/usr/bin/unshare").exists(),
        "this test needs /usr/bin/unshare (util-linux)"
    );
    // A process that holds a network namespace of its own.
    let mut holder = Command::new("/usr/bin/unshare")
        .args(["--net", "sleep", "60"])
        .spawn()
        .unwrap();
    let netns = format!("/proc/{}/ns/net", holder.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(&netns).ok() == std::fs::read_link("/proc/self/ns/net").ok() {
        assert!(Instant::now() < deadline, "unshare did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let base = TempDir::new("jail-base");
    let guests = TempDir::new("jail-guest");
    let kernel = guests.write("vmlinux", &Guest::default().print("ready\n").spin().elf());
    let kernel = kernel.to_str().unwrap();
    let id = unique_id("netns");
    let (child, _stop, reader, pid) = start_jail(&mut jail(
        &base,
        &id,
        &["--file", kernel, "--netns", &netns],
        &["boot", "--kernel", kernel],
    ));
    assert_eq!(ns(&pid, "net"), std::fs::read_link(&netns).unwrap());
    // The other namespaces are still new ones.
    assert_ne!(ns(&pid, "mnt"), ns("self", "mnt"));
    stop_jail(child, libc::SIGTERM);
    drop(reader.join());
    let _ = holder.kill();
    let _ = holder.wait();
    assert_gone(&base, &id);
}

/// A C string of a path or name, for the libc calls below.
fn c(path: impl AsRef<Path>) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_ref().as_os_str().as_bytes()).unwrap()
}

/// Make the file operations of the calling thread (only) run as `UID:GID`, without root's
/// file capabilities: the thread acts as another process of the jail's user on the host, or
/// as the jailed flint itself once it has been compromised.
fn become_jail_user() {
    // SAFETY: setfsuid and setfsgid take plain integers and change the credentials of the
    // calling thread only (the raw system calls, not glibc's process-wide wrappers).
    unsafe {
        libc::syscall(libc::SYS_setfsgid, GID);
        libc::syscall(libc::SYS_setfsuid, UID);
    }
}

/// Open the directory `path` as an `O_PATH` descriptor (to use as the `dirfd` of `*at` calls).
fn open_dir(path: &Path) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: open with a NUL-terminated path; a non-negative result is a new fd we own.
    let fd = unsafe {
        libc::open(
            c(path).as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    // SAFETY: fd is a new descriptor nothing else owns.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `symlinkat(target, dir, name)`: whether it was created.
fn symlink_in(dir: &std::os::fd::OwnedFd, name: &str, target: &Path) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: two NUL-terminated strings and a directory fd we own.
    unsafe { libc::symlinkat(c(target).as_ptr(), dir.as_raw_fd(), c(name).as_ptr()) == 0 }
}

/// As another process of the jail's user on the host would: wait for the jail root `root`
/// to appear, then keep trying to plant symlinks to `outside` at `names` in it until one of
/// them is planted, or until `stop`. Returns the names it managed to plant.
fn plant_while_built(
    root: &Path,
    outside: &Path,
    names: &[&str],
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let dir = loop {
        if let Some(dir) = open_dir(root) {
            break dir;
        }
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            return Vec::new();
        }
        std::thread::yield_now();
    };
    become_jail_user();
    let mut planted = Vec::new();
    while planted.is_empty() && !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        for name in names {
            if symlink_in(&dir, name, outside) {
                planted.push(name.to_string());
            }
        }
        std::thread::yield_now();
    }
    planted
}

/// The names in `dir`.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn symlinks_planted_while_the_jail_is_built_are_not_followed() {
    require_jail();
    let base = TempDir::new("jail-base");
    let guests = TempDir::new("jail-guest");
    let outside = TempDir::new("jail-outside");
    let kernel = guests.write(
        "vmlinux",
        &Guest::default().print("hi from jail\n").reset().elf(),
    );
    let kernel = kernel.to_str().unwrap();
    let id = unique_id("plant");
    let root = base.0.join(&id).join("root");
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Another process of the jail's user races the jail for the directory the --file goes
    // into (/tmp) and for the one the device nodes went into (/dev).
    let first = kernel.split('/').nth(1).unwrap();
    let (out, planted) = std::thread::scope(|s| {
        let planter = s.spawn(|| plant_while_built(&root, &outside.0, &[first, "dev"], &stop));
        let out = run(&mut jail(
            &base,
            &id,
            &["--file", kernel],
            &["boot", "--kernel", kernel],
        ));
        stop.store(true, Ordering::SeqCst);
        (out, planter.join().unwrap())
    });
    assert!(
        names_in(&outside.0).is_empty(),
        "the jail wrote through the planted symlinks {planted:?}: {:?} (stderr: {})",
        names_in(&outside.0),
        text(&out.stderr)
    );
    // The jail root belongs to root until the jail is built: nothing could be planted in time
    // (the planter may get in once the jailed flint has its root, too late to matter).
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("hi from jail"));
    assert_gone(&base, &id);
}

#[test]
fn cleanup_removes_what_the_jailed_flint_left_without_following_its_links() {
    require_jail();
    // On a tmpfs: this machine's disk takes about 2 ms per directory made.
    let base = TempDir(PathBuf::from(format!(
        "/dev/shm/flint-test-jail-base-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&base.0).unwrap();
    let guests = TempDir::new("jail-guest");
    let outside = TempDir::new("jail-outside");
    let precious = outside.write("precious", b"keep me");
    std::fs::create_dir(outside.0.join("dir")).unwrap();
    outside.write("dir/also-precious", b"keep me too");
    let kernel = guests.write("vmlinux", &Guest::default().print("ready\n").spin().elf());
    let kernel = kernel.to_str().unwrap();
    let id = unique_id("leftovers");
    let (child, _stop, reader, _pid) = start_jail(&mut jail(
        &base,
        &id,
        &["--file", kernel],
        &["boot", "--kernel", kernel],
    ));
    // What a compromised jailed flint can leave in its root (it owns it): links to outside
    // its root (they resolve on the host once it is gone) and a tree deeper than the jail
    // process has file descriptors (20,000 on the development machine).
    let root = base.0.join(&id).join("root");
    std::thread::scope(|s| {
        s.spawn(|| {
            become_jail_user();
            let dir = open_dir(&root).unwrap();
            assert!(symlink_in(&dir, "escape", &outside.0));
            assert!(symlink_in(&dir, "escape-file", &precious));
            let mut cur = dir;
            for _ in 0..25_000 {
                use std::os::fd::AsRawFd;
                // SAFETY: mkdirat with a NUL-terminated name in a directory fd we own.
                let r = unsafe { libc::mkdirat(cur.as_raw_fd(), c"d".as_ptr(), 0o755) };
                assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
                assert!(symlink_in(&cur, "up", &outside.0.join("dir")));
                // SAFETY: as above; the new fd is checked and owned below.
                let fd = unsafe {
                    libc::openat(
                        cur.as_raw_fd(),
                        c"d".as_ptr(),
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    )
                };
                assert!(fd >= 0, "{}", std::io::Error::last_os_error());
                // SAFETY: fd is a new descriptor nothing else owns.
                cur = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
            }
        });
    });
    let out = stop_jail(child, libc::SIGTERM);
    drop(reader.join());
    if base.0.join(&id).exists() {
        // Left behind: std's remove_dir_all (TempDir's) cannot remove it either.
        std::mem::forget(base);
        panic!("the jail directory was left behind: {}", text(&out.stderr));
    }
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    assert_eq!(
        std::fs::read(outside.0.join("dir/also-precious")).unwrap(),
        b"keep me too"
    );
    assert_eq!(names_in(&outside.0), ["dir", "precious"]);
    assert!(
        !text(&out.stderr).contains("cannot remove"),
        "{}",
        text(&out.stderr)
    );
    assert_gone(&base, &id);
}

#[test]
fn jailed_flint_gets_default_limits() {
    require_jail();
    let base = TempDir::new("jail-base");
    let guests = TempDir::new("jail-guest");
    let kernel = guests.write("vmlinux", &Guest::default().print("ready\n").spin().elf());
    let kernel = kernel.to_str().unwrap();
    let id = unique_id("defaults");
    let (child, _stop, reader, pid) = start_jail(&mut jail(
        &base,
        &id,
        &["--file", kernel],
        &["boot", "--kernel", kernel],
    ));
    let limits = read(format!("/proc/{pid}/limits"));
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        nofile
            .split_whitespace()
            .skip(3)
            .take(2)
            .collect::<Vec<_>>(),
        ["8192", "8192"],
        "{nofile}"
    );
    let pids = Path::new(V1).join("pids/flint").join(&id);
    assert_eq!(read(pids.join("pids.max")).trim(), "512");
    stop_jail(child, libc::SIGTERM);
    drop(reader.join());
    assert_gone(&base, &id);
}
