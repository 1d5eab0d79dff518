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
    // Its own files, the jail's, not the host's.
    let jail_root = base.0.join(&id).join("root");
    assert!(jail_root.join("flint").is_file());
    assert!(jail_root.join(kernel.trim_start_matches('/')).is_file());
    {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let kvm = std::fs::metadata(jail_root.join("dev/kvm")).unwrap();
        assert!(kvm.file_type().is_char_device());
        assert_eq!(kvm.rdev(), libc::makedev(10, 232));
        assert_eq!(
            (kvm.uid(), kvm.gid(), kvm.mode() & 0o777),
            (UID, GID, 0o660)
        );
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
