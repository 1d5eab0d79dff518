//! Tier 2: tiny guests on the local /dev/kvm.
//!
//! Each test builds a few dozen bytes of 64-bit guest code, wraps them in a minimal ELF
//! `vmlinux` (no PVH note, so flint enters it through the 64-bit boot protocol with paging on;
//! see tests/support/tiny.rs), runs the real `flint boot` binary on it and checks what a user would see: console output,
//! exit status and flint's messages. These run on any KVM, including the PVM nested KVM of the
//! CI machines, which cannot boot a real Linux guest.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::tiny::{flint, text, wait_bounded, Guest, BOOT_TIMER, COM1, I8042_COMMAND};
use support::TempDir;

/// Run `flint boot --kernel <guest> ARGS` with `input` on stdin, failing the test if it does not
/// finish within a generous bound (a hang is a bug, not a slow test).
fn boot(guest: &Guest, args: &[&str], input: &[u8]) -> Output {
    let dir = TempDir::new("guest");
    let kernel = dir.write("vmlinux", &guest.elf());
    let mut child = flint()
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    wait_bounded(child, Duration::from_secs(60))
}

/// flint's own stderr lines, without the one-line PVM note this CI machine gets.
fn messages(out: &Output) -> Vec<String> {
    text(&out.stderr)
        .lines()
        .filter(|l| !l.contains("kvm_pvm"))
        .map(str::to_string)
        .collect()
}

#[test]
fn serial_output_reaches_the_host_and_reset_exits_zero() {
    let mut g = Guest::default();
    g.print("hello from the guest\n").reset();
    let out = boot(&g, &[], b"");
    assert_eq!(text(&out.stdout), "hello from the guest\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn boot_timer_write_is_reported() {
    let mut g = Guest::default();
    g.out8(BOOT_TIMER, 123).print("booted\n").reset();
    let out = boot(&g, &[], b"");
    assert_eq!(out.status.code(), Some(0));
    let line = messages(&out)
        .into_iter()
        .find(|l| l.starts_with("flint: guest boot time: "))
        .unwrap_or_else(|| panic!("no boot time line in {:?}", text(&out.stderr)));
    let ms: u64 = line
        .trim_start_matches("flint: guest boot time: ")
        .trim_end_matches(" ms")
        .parse()
        .unwrap();
    assert!(ms < 60_000, "{line}");
}

#[test]
fn other_boot_timer_values_are_not_reported() {
    let mut g = Guest::default();
    g.out8(BOOT_TIMER, 7).print("done\n").reset();
    let out = boot(&g, &[], b"");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !text(&out.stderr).contains("boot time"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn unknown_port_and_mmio_accesses_are_ignored_and_counted() {
    let mut g = Guest::default();
    g.out8(0x1234, 1)
        .in8(0x5678)
        .expect_al(0xff, "port read not all ones\n")
        .mmio_roundtrip_unclaimed(0xd000_0000, "mmio read not all ones\n")
        .print("survived\n")
        .reset();
    let out = boot(&g, &[], b"");
    assert_eq!(text(&out.stdout), "survived\n");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        messages(&out)
            .contains(&"flint: ignored 2 port and 2 MMIO accesses that no device handles".into()),
        "{}",
        text(&out.stderr)
    );
}

/// Guest memory the string-I/O guests read into: 64 KiB past their code (loaded at 1 MiB).
const SCRATCH: u32 = 0x11_0000;

#[test]
fn rep_outsb_prints_the_whole_string() {
    let mut g = Guest::default();
    g.rep_outsb(COM1, "one string instruction, every byte of it\n")
        .print("done\n")
        .reset();
    let out = boot(&g, &[], b"");
    assert_eq!(
        text(&out.stdout),
        "one string instruction, every byte of it\ndone\n"
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn rep_insb_reads_every_item() {
    let mut g = Guest::default();
    // The console input arrives in one piece: once the first byte is there, all are.
    g.wait_for_input()
        .rep_insb(COM1, SCRATCH, 6)
        .print_memory(SCRATCH, 6)
        // Unclaimed ports read all ones, each item counted as an ignored access.
        .rep_insb(0x5678, SCRATCH, 3)
        .print_memory(SCRATCH, 3)
        .reset();
    let out = boot(&g, &[], b"abcdef");
    assert_eq!(out.stdout, b"abcdef\xff\xff\xff");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        messages(&out)
            .contains(&"flint: ignored 3 port and 0 MMIO accesses that no device handles".into()),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn console_input_reaches_the_guest() {
    let mut g = Guest::default();
    g.print("ready\n").echo_until(b'q').print("\nbye\n").reset();
    let out = boot(&g, &[], b"echo me back q ignored");
    assert_eq!(text(&out.stdout), "ready\necho me back \nbye\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn triple_fault_is_reported_with_the_vcpu() {
    let mut g = Guest::default();
    g.print("about to fault\n").ud2();
    let out = boot(&g, &[], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "about to fault\n");
    let messages = messages(&out);
    assert_eq!(messages.len(), 1, "{messages:?}");
    // The message says where the vCPU was, for whoever debugs the guest.
    assert!(
        messages[0]
            .starts_with("flint: error: vCPU 0: the guest triple-faulted (shutdown exit; rip 0x")
            && messages[0].contains(", cr3 0x"),
        "{messages:?}"
    );
}

#[test]
fn reset_with_several_vcpus_stops_them_all() {
    let mut g = Guest::default();
    g.print("bsp\n").reset();
    let out = boot(&g, &["--vcpus", "2"], b"");
    assert_eq!(text(&out.stdout), "bsp\n");
    assert_eq!(out.status.code(), Some(0));
}

/// Write the kernel of a guest that prints `spinning` and spins into `dir`.
fn spinning_kernel(dir: &TempDir) -> PathBuf {
    let mut g = Guest::default();
    g.print("spinning\n").spin();
    dir.write("vmlinux", &g.elf())
}

/// `flint boot --vcpus VCPUS --kernel <spinning guest>`, stdout and stderr piped.
fn spinning_flint_command(dir: &TempDir, vcpus: &str) -> Command {
    let mut cmd = flint();
    cmd.args(["boot", "--vcpus", vcpus, "--kernel"])
        .arg(spinning_kernel(dir))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Read `output` until it has given `marker`; fails the test if it ends first.
fn read_until(output: &mut impl Read, marker: &str) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !text(&seen).contains(marker) {
        let n = output.read(&mut buf).unwrap();
        assert!(n > 0, "output ended before {marker:?}: {:?}", text(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Wait until the spinning guest of `child` runs (has printed its line).
fn wait_for_spinning(child: &mut Child) {
    read_until(&mut child.stdout.take().unwrap(), "spinning\n");
}

fn spawn_spinning_guest(dir: &TempDir, vcpus: &str) -> Child {
    let mut child = spinning_flint_command(dir, vcpus)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the guest runs before signalling.
    wait_for_spinning(&mut child);
    child
}

#[test]
fn sigterm_stops_a_busy_guest_with_a_nonzero_status() {
    let dir = TempDir::new("sigterm");
    let child = spawn_spinning_guest(&dir, "2");
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = wait_bounded(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    assert!(
        messages(&out).contains(&"flint: warning: stopped the VM on signal SIGTERM".into()),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn sigint_stops_a_busy_guest() {
    let dir = TempDir::new("sigint");
    let child = spawn_spinning_guest(&dir, "1");
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = wait_bounded(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(128 + libc::SIGINT));
}

// ---- bad input: one sentence on stderr, status 1, never a panic ----

fn assert_one_error(args: &[&str], expected_fragment: &str) {
    let out = flint().args(args).stdin(Stdio::null()).output().unwrap();
    let msgs = messages(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {msgs:?}");
    assert_eq!(msgs.len(), 1, "{args:?}: expected one line, got {msgs:?}");
    assert!(msgs[0].starts_with("flint: error: "), "{msgs:?}");
    assert!(msgs[0].contains(expected_fragment), "{args:?}: {msgs:?}");
    assert!(out.stdout.is_empty());
}

fn hello_kernel(dir: &TempDir) -> PathBuf {
    let mut g = Guest::default();
    g.print("hi\n").reset();
    dir.write("vmlinux", &g.elf())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn bad_inputs_get_one_clear_sentence() {
    let dir = TempDir::new("bad");
    let kernel = hello_kernel(&dir);
    let k = s(&kernel);
    let junk = dir.write("junk", &[0x55; 4096]);
    let big_initrd = dir.write("initrd", &[]);
    std::fs::File::options()
        .write(true)
        .open(&big_initrd)
        .unwrap()
        .set_len(70 << 20)
        .unwrap();
    let long = "x".repeat(5000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["boot", "--kernel", "/nonexistent/vmlinux"],
            "cannot read the kernel /nonexistent/vmlinux",
        ),
        (vec!["boot", "--kernel", s(&dir.0)], "not a regular file"),
        (
            vec!["boot", "--kernel", s(&junk)],
            "is neither an ELF vmlinux nor a bzImage",
        ),
        (
            vec!["boot", "--kernel", k, "--vcpus", "0"],
            "at least 1 vCPU",
        ),
        (
            vec!["boot", "--kernel", k, "--vcpus", "1000"],
            "1000 vCPUs is more than",
        ),
        (
            vec!["boot", "--kernel", k, "--memory", "1"],
            "1 MiB of guest memory is too small",
        ),
        (
            vec![
                "boot",
                "--kernel",
                k,
                "--memory",
                "64",
                "--initrd",
                s(&big_initrd),
            ],
            "does not fit in 64 MiB of guest memory",
        ),
        (
            vec!["boot", "--kernel", k, "--initrd", "/nonexistent/initrd"],
            "cannot read the initrd",
        ),
        (
            vec!["boot", "--kernel", k, "--cmdline", &long],
            "5000 bytes long",
        ),
        (
            vec!["boot", "--kernel", k, "--frobnicate"],
            "unknown option '--frobnicate'",
        ),
        (vec!["boot"], "needs --kernel"),
    ];
    for (args, fragment) in &cases {
        assert_one_error(args, fragment);
    }
}

fn run_in_shell_as_root(script: &str) -> Output {
    Command::new("unshare")
        .args(["-m", "sh", "-c", script])
        .output()
        .unwrap()
}

#[test]
fn missing_dev_kvm_is_one_sentence() {
    let dir = TempDir::new("nokvm");
    let kernel = hello_kernel(&dir);
    // A private mount namespace with an empty /dev: flint sees no /dev/kvm.
    let out = run_in_shell_as_root(&format!(
        "mount -t tmpfs none /dev && exec {} boot --kernel {}",
        env!("CARGO_BIN_EXE_flint"),
        s(&kernel)
    ));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        messages(&out),
        vec![
            "flint: error: /dev/kvm does not exist: KVM is not available on this host".to_string()
        ]
    );
}

#[test]
fn no_permission_on_dev_kvm_is_one_sentence() {
    let dir = TempDir::new("noperm");
    let kernel = hello_kernel(&dir);
    // World-readable kernel in a world-readable directory, then run as nobody: /dev/kvm is
    // root-only (or group kvm) here.
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_flint"))
        .args(["boot", "--kernel", s(&kernel)])
        .output()
        .unwrap();
    let msgs = messages(&out);
    assert_eq!(out.status.code(), Some(1), "{msgs:?}");
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].starts_with("flint: error: no permission to open /dev/kvm"),
        "{msgs:?}"
    );
}

#[test]
fn ctrl_a_x_on_a_terminal_stops_the_vm() {
    let dir = TempDir::new("escape");
    let kernel = spinning_kernel(&dir);
    // `script` runs flint on a pseudo-terminal, as a user's shell would: flint switches it to
    // raw mode and watches the input for its escape sequence.
    let mut child = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{} boot --kernel {}",
            env!("CARGO_BIN_EXE_flint"),
            s(&kernel)
        ))
        .arg("/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    read_until(&mut stdout, "spinning");
    child.stdin.as_mut().unwrap().write_all(b"\x01x").unwrap();
    let status = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "Ctrl-A x did not stop flint");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(status.code(), Some(130), "output: {rest}");
    assert!(
        rest.contains("stopped the VM from the console (Ctrl-A x)"),
        "{rest}"
    );
}

// ---- seccomp ----

/// `Seccomp:` mode of every thread of `pid`, by thread name.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        modes.push((name, mode));
    }
    modes.sort();
    modes
}

fn spinning_flint(dir: &TempDir, extra: &[&str], env: &[(&str, &str)]) -> Child {
    spinning_flint_command(dir, "2")
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn every_thread_runs_under_a_seccomp_filter() {
    let dir = TempDir::new("seccomp");
    let mut child = spinning_flint(&dir, &[], &[]);
    wait_for_spinning(&mut child);
    // Threads start and install their filters concurrently with the guest's first output:
    // poll until all of them are there and filtered (KVM's own kernel threads that show up in
    // the task list are not flint's).
    let expected = ["vcpu0", "vcpu1", "event-loop", "console-in", "flint"];
    let deadline = Instant::now() + Duration::from_secs(10);
    let modes = loop {
        let modes: Vec<_> = seccomp_modes(child.id())
            .into_iter()
            .filter(|(name, _)| !name.starts_with("kvm"))
            .collect();
        let complete = expected.iter().all(|e| modes.iter().any(|(n, _)| n == e))
            && modes.len() == expected.len()
            && modes.iter().all(|(_, m)| m == "2");
        if complete || Instant::now() > deadline {
            break modes;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_bounded(child, Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        text(&out.stderr)
    );
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    for expected in expected {
        assert!(
            names.contains(&expected),
            "no {expected} thread in {modes:?}"
        );
    }
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "thread {name} is not filtered: {modes:?}");
    }
}

#[test]
fn no_seccomp_leaves_threads_unfiltered() {
    let dir = TempDir::new("noseccomp");
    let mut child = spinning_flint(&dir, &["--no-seccomp"], &[]);
    wait_for_spinning(&mut child);
    let modes = seccomp_modes(child.id());
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_bounded(child, Duration::from_secs(20));
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
}

/// Run `cmd` with `FLINT_SECCOMP_SELF_TEST=THREAD:PROBE`; `Err` unless flint stopped with
/// status 159 and named the thread and the call (number and name) its filter refused.
fn probe_refused(
    mut cmd: Command,
    thread: &str,
    probe: &str,
    call: (i64, &str),
) -> Result<(), String> {
    let child = cmd
        .env("FLINT_SECCOMP_SELF_TEST", format!("{thread}:{probe}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(child, Duration::from_secs(20));
    let stderr = text(&out.stderr);
    let expected = format!(
        "flint: error: seccomp: the {thread} thread made the forbidden system call {} ({}) \
         with arguments ",
        call.0, call.1
    );
    if out.status.code() == Some(128 + libc::SIGSYS) && stderr.contains(&expected) {
        Ok(())
    } else {
        Err(format!(
            "{thread}:{probe}: {:?}: {stderr}",
            out.status.code()
        ))
    }
}

/// Every case of `cases` (each a command, thread, probe and call) is refused.
fn assert_all_refused(
    cases: impl IntoIterator<Item = (Command, &'static str, &'static str, (i64, &'static str))>,
) {
    let failed: Vec<String> = cases
        .into_iter()
        .filter_map(|(cmd, thread, probe, call)| probe_refused(cmd, thread, probe, call).err())
        .collect();
    assert!(failed.is_empty(), "not refused:\n{}", failed.join("\n"));
}

const MMAP: (i64, &str) = (libc::SYS_mmap, "mmap");
const MPROTECT: (i64, &str) = (libc::SYS_mprotect, "mprotect");
const FUTEX: (i64, &str) = (libc::SYS_futex, "futex");
const FCNTL: (i64, &str) = (libc::SYS_fcntl, "fcntl");
const SOCKET: (i64, &str) = (libc::SYS_socket, "socket");
const OPENAT: (i64, &str) = (libc::SYS_openat, "openat");

#[test]
fn a_forbidden_system_call_stops_flint_and_names_it() {
    let dir = TempDir::new("violation");
    // `getppid`, which no thread may make.
    assert_all_refused(["vcpu", "event-loop", "console-in", "vmm"].map(|thread| {
        let cmd = spinning_flint_command(&dir, "2");
        (
            cmd,
            thread,
            "forbidden-call",
            (libc::SYS_getppid, "getppid"),
        )
    }));
}

#[test]
fn every_thread_refuses_arguments_outside_its_filter() {
    // Each probe is a call the thread makes in normal operation (every thread maps memory,
    // takes locks and duplicates descriptors; the event loop connects to Unix stream sockets;
    // the VMM thread kicks its own vCPU threads with tgkill), with arguments its rules
    // refuse: executable memory, a priority-inheritance futex, another fcntl command, an
    // Internet or datagram socket, a signal to another process, another signal's handler.
    let cases: &[(&'static str, &'static str, (i64, &'static str))] = &[
        ("vcpu", "mmap-exec", MMAP),
        ("vcpu", "mprotect-exec", MPROTECT),
        ("vcpu", "futex-pi", FUTEX),
        ("vcpu", "fcntl-getown", FCNTL),
        ("event-loop", "mmap-exec", MMAP),
        ("event-loop", "mprotect-exec", MPROTECT),
        ("event-loop", "futex-pi", FUTEX),
        ("event-loop", "fcntl-getown", FCNTL),
        ("event-loop", "socket-inet", SOCKET),
        ("event-loop", "socket-dgram", SOCKET),
        ("console-in", "mmap-exec", MMAP),
        ("console-in", "mprotect-exec", MPROTECT),
        ("console-in", "futex-pi", FUTEX),
        ("vmm", "mmap-exec", MMAP),
        ("vmm", "mprotect-exec", MPROTECT),
        ("vmm", "futex-pi", FUTEX),
        ("vmm", "fcntl-getown", FCNTL),
        ("vmm", "socket-inet", SOCKET),
        ("vmm", "tgkill-other-process", (libc::SYS_tgkill, "tgkill")),
        (
            "vmm",
            "sigaction-sigint",
            (libc::SYS_rt_sigaction, "rt_sigaction"),
        ),
    ];
    let dir = TempDir::new("arg-violation");
    assert_all_refused(
        cases
            .iter()
            .map(|&(thread, probe, call)| (spinning_flint_command(&dir, "2"), thread, probe, call)),
    );
}

#[test]
fn the_api_thread_is_filtered_too() {
    // Its listening socket is bound before it starts: it makes no socket at all.
    let dir = TempDir::new("api-seccomp");
    assert_all_refused(
        [
            ("forbidden-call", (libc::SYS_getppid, "getppid")),
            ("mmap-exec", MMAP),
            ("socket-inet", SOCKET),
            ("socket-dgram", SOCKET),
        ]
        .map(|(probe, call)| {
            let mut cmd = flint();
            cmd.arg("--api-sock").arg(dir.0.join("api.sock"));
            (cmd, "api", probe, call)
        }),
    );
}

#[test]
fn threads_that_open_no_files_cannot_open_any() {
    // Their `openat` fails with EACCES rather than stopping flint: glibc's malloc may read
    // /proc/sys/vm/overcommit_memory on any thread.
    let dir = TempDir::new("no-opens");
    for thread in ["vcpu", "event-loop", "console-in", "api"] {
        let mut cmd = if thread == "api" {
            let mut cmd = flint();
            cmd.arg("--api-sock").arg(dir.0.join("api.sock"));
            cmd
        } else {
            spinning_flint_command(&dir, "2")
        };
        let child = cmd
            .env("FLINT_SECCOMP_SELF_TEST", format!("{thread}:openat-read"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_bounded(child, Duration::from_secs(20));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{thread}: {stderr}");
        let expected = format!(
            "seccomp self-test: openat-read on the {thread} thread was not stopped: it returned \
             -1 (Permission denied (os error {}))",
            libc::EACCES
        );
        assert!(stderr.contains(&expected), "{thread}: {stderr}");
    }
}

#[test]
fn a_config_file_vm_serves_the_api_too() {
    // The VM starts from the file before the API is served: the VMM thread's filter, installed
    // at that start, must not keep the API server from binding its socket and starting.
    let dir = TempDir::new("config-file-api");
    let kernel = spinning_kernel(&dir);
    let config = dir.write(
        "vm.json",
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}}}"#,
            s(&kernel)
        )
        .as_bytes(),
    );
    let sock = dir.0.join("api.sock");
    let mut child = flint()
        .arg("--config-file")
        .arg(&config)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_spinning(&mut child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&sock) {
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            break answer;
        }
        assert!(Instant::now() < deadline, "the API socket never came up");
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_bounded(child, Duration::from_secs(20));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""state":"Running""#), "{answer}");
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        text(&out.stderr)
    );
}

/// `flint run` on a tiny guest that never answers: only its agent-client thread matters here,
/// which installs its filter before the VM starts.
fn tiny_sandbox(dir: &TempDir, extra: &[&str]) -> Command {
    let kernel = spinning_kernel(dir);
    let initramfs = dir.write("initramfs", b"not an initramfs");
    let mut cmd = flint();
    cmd.env("FLINT_CACHE", dir.0.join("cache"))
        .args(["run", "--cold", "--timeout", "10", "--kernel"])
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .args(extra)
        .args(["--", "true"]);
    cmd
}

#[test]
fn the_agent_client_thread_creates_files_only_for_copy_out() {
    let dir = TempDir::new("client-seccomp");
    assert_all_refused(
        [
            ("forbidden-call", (libc::SYS_getppid, "getppid")),
            ("mmap-exec", MMAP),
            ("futex-pi", FUTEX),
            ("socket-inet", SOCKET),
            ("socket-dgram", SOCKET),
            // It reads --copy-in files; without --copy-out it creates none.
            ("openat-creat", OPENAT),
            // It names its stdin forwarder thread, nothing else.
            ("prctl-dumpable", (libc::SYS_prctl, "prctl")),
        ]
        .map(|(probe, call)| (tiny_sandbox(&dir, &[]), "agent-client", probe, call)),
    );
    // With --copy-out the same open is allowed (it fails on /proc, creating nothing): the
    // self-test says so and exits 1.
    let dir = TempDir::new("client-copy-out");
    let host = dir.0.join("out");
    let out = wait_bounded(
        tiny_sandbox(
            &dir,
            &["--copy-out", &format!("/etc/hostname:{}", s(&host))],
        )
        .env("FLINT_SECCOMP_SELF_TEST", "agent-client:openat-creat")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
        Duration::from_secs(20),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .contains("seccomp self-test: openat-creat on the agent-client thread was not stopped"),
        "{stderr}"
    );
}

#[test]
fn a_reset_wins_over_what_the_guest_does_next() {
    // Linux follows a keyboard-controller reset with other reset methods, ending in a triple
    // fault, when the first does not take effect at once: flint must see the reset first.
    for _ in 0..20 {
        let mut g = Guest::default();
        g.print("resetting\n").out8(I8042_COMMAND, 0xfe).ud2();
        let out = boot(&g, &[], b"");
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    }
}

// ---- config file: the same requests as the API, logger included ----

#[test]
fn a_config_file_boots_the_guest_and_applies_its_logger_and_metrics() {
    let dir = TempDir::new("config-file");
    let kernel = hello_kernel(&dir);
    let log = dir.0.join("flint.log");
    let metrics = dir.0.join("metrics.json");
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": s(&kernel)},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "logger": {"log_path": s(&log), "level": "Debug", "show_level": true},
        "metrics": {"metrics_path": s(&metrics)},
    });
    let file = dir.write("vm.json", config.to_string().as_bytes());
    let child = flint()
        .arg("--config-file")
        .arg(&file)
        .arg("--no-api")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(child, Duration::from_secs(60));
    assert_eq!(text(&out.stdout), "hi\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    // flint's own lines went to the log file the config file named, at its level.
    let logged = std::fs::read_to_string(&log).expect("the logger section was not applied");
    assert!(
        logged.lines().any(|l| l.starts_with("flint: debug: ")),
        "{logged}"
    );
    assert!(messages(&out).is_empty(), "{:?}", messages(&out));
    // Metrics are written when the VM ends.
    let lines = std::fs::read_to_string(&metrics).unwrap();
    assert!(lines.contains("\"put_logger\":1"), "{lines}");
}

/// Firecracker's boot-timer MMIO address (its `--boot-timer`).
const FIRECRACKER_BOOT_TIMER: u32 = 0xd000_0000;

#[test]
fn firecrackers_command_line_options_work_as_its_jailer_passes_them() {
    let dir = TempDir::new("fc-options");
    let mut g = Guest::default();
    g.mmio_write8(FIRECRACKER_BOOT_TIMER, 123)
        .print("hi\n")
        .reset();
    let kernel = dir.write("vmlinux", &g.elf());
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": s(&kernel)},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 16, "smt": true},
        "balloon": null,
        "mmds-config": null,
    });
    let file = dir.write("vm.json", config.to_string().as_bytes());
    let run = |extra: &[&str], log: &Path, metrics: &Path| {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
            .to_string();
        let child = flint()
            .args(["--no-api", "--config-file", s(&file)])
            .args(["--level", "info", "--show-level", "--log-path", s(log)])
            .args(["--metrics-path", s(metrics)])
            .args(["--start-time-us", &now_us, "--start-time-cpu-us", "1"])
            .args([
                "--parent-cpu-time-us",
                "2",
                "--http-api-max-payload-size",
                "4096",
            ])
            .args(["--id", "fc-vm"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_bounded(child, Duration::from_secs(60));
        assert_eq!(text(&out.stdout), "hi\n");
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        std::fs::read_to_string(log).expect("--log-path was not applied")
    };
    let (log, metrics) = (dir.0.join("timer.log"), dir.0.join("timer.metrics"));
    let logged = run(&["--boot-timer"], &log, &metrics);
    let line = logged
        .lines()
        .find(|l| l.starts_with("flint: info: guest boot time: "))
        .unwrap_or_else(|| panic!("--boot-timer: no boot time line in {logged:?}"));
    assert!(line.ends_with(" ms"), "{line}");
    assert!(std::fs::read_to_string(&metrics)
        .unwrap()
        .contains("\"put_logger\":1"));

    // Without --boot-timer the address is not a device: nothing is logged of it.
    let (log, metrics) = (dir.0.join("plain.log"), dir.0.join("plain.metrics"));
    let logged = run(&[], &log, &metrics);
    assert!(!logged.contains("boot time"), "{logged}");
}

#[test]
fn firecracker_options_flint_lacks_are_refused_in_one_sentence() {
    let dir = TempDir::new("fc-refused");
    let file = dir.write("m.json", b"{}");
    let junk = dir.write("junk.json", b"{not json");
    let big = dir.write(
        "big.json",
        format!("{{\"a\": \"{}\"}}", "x".repeat(200)).as_bytes(),
    );
    let sock = dir.0.join("api.sock");
    for (args, expected) in [
        (
            vec!["--seccomp-filter", s(&file)],
            "--seccomp-filter is not supported: flint installs its own",
        ),
        (
            vec!["--api-sock", s(&sock), "--metadata", s(&junk)],
            "--metadata: ",
        ),
        (
            vec![
                "--api-sock",
                s(&sock),
                "--metadata",
                s(&big),
                "--mmds-size-limit",
                "100",
            ],
            "more than the MMDS limit of 100 bytes",
        ),
        (
            vec!["--mmds-size-limit", "0"],
            "--mmds-size-limit must be from 1 to",
        ),
        (vec!["--enable-pci"], "--enable-pci is not supported"),
        (vec!["--level", "loud"], "--level"),
        (
            vec!["--http-api-max-payload-size", "0"],
            "--http-api-max-payload-size must be from 1 to 67108864, not 0",
        ),
    ] {
        assert_one_error(&args, expected);
    }
}

#[test]
fn describe_snapshot_prints_the_state_files_version() {
    let dir = TempDir::new("describe");
    let state = dir.write("vm.state", br#"{"magic":"flint-snapshot","version":2}"#);
    let out = flint()
        .args(["--describe-snapshot", s(&state)])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "v2\n");
    assert_eq!(out.status.code(), Some(0));
    let out = flint().arg("--snapshot-version").output().unwrap();
    assert_eq!(text(&out.stdout), format!("v{}\n", vmm::snapshot::VERSION));
    let junk = dir.write("junk.state", b"not json");
    assert_one_error(
        &["--describe-snapshot", s(&junk)],
        "is not a flint snapshot state file",
    );
}

#[test]
fn a_bad_config_file_value_is_named_in_the_files_terms() {
    let dir = TempDir::new("config-file-bad");
    let kernel = hello_kernel(&dir);
    let cases = [
        (
            serde_json::json!({"machine-config": {"vcpu_count": 0, "mem_size_mib": 64}}),
            "vcpu_count: a VM needs at least 1 vCPU",
        ),
        (
            serde_json::json!({"network-interfaces": [
                {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:00:00:00:01"}]}),
            "guest_mac: MAC address 01:00:00:00:00:01 is a multicast address",
        ),
        (
            serde_json::json!({"drives": [{"drive_id": "root", "path_on_host": "/r",
                "is_root_device": true, "partuuid": "1 init=/bin/sh"}]}),
            "partuuid: partition UUID \"1 init=/bin/sh\" must be",
        ),
        (
            serde_json::json!({"machine-config": {"vcpu_count": 1, "mem_size_mib": 65,
                "huge_pages": "2M"}}),
            "mem_size_mib: 65 MiB of guest memory cannot be backed by 2 MiB huge pages",
        ),
    ];
    for (i, (mut config, expected)) in cases.into_iter().enumerate() {
        config["boot-source"] = serde_json::json!({"kernel_image_path": s(&kernel)});
        let file = dir.write(&format!("vm{i}.json"), config.to_string().as_bytes());
        assert_one_error(&["--config-file", s(&file), "--no-api"], expected);
    }
}

// ---- lazy restore: PUT /snapshot/load with the Uffd memory backend ----

/// One HTTP request on the API socket `sock`; the whole answer.
fn api(sock: &Path, method: &str, path: &str, body: &str) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// Wait until `sock` exists (a server listens there).
fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The example page-fault handler, built with the vmm crate's binaries (`cargo test
/// --workspace` builds them; alone: `cargo build -p vmm --bin flint-uffd-handler`).
fn uffd_handler() -> PathBuf {
    let path = support::flint_bin().with_file_name("flint-uffd-handler");
    assert!(
        path.exists(),
        "{} is missing: cargo build -p vmm --bin flint-uffd-handler",
        path.display()
    );
    path
}

/// A snapshot (state file, memory file) of the spinning guest, taken through the API.
fn spinning_snapshot(dir: &TempDir) -> (PathBuf, PathBuf) {
    let kernel = spinning_kernel(dir);
    let config = dir.write(
        "vm.json",
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}}}"#,
            s(&kernel)
        )
        .as_bytes(),
    );
    let (state, mem) = (dir.0.join("vm.snap"), dir.0.join("vm.mem"));
    // A snapshot of a running guest.
    let sock_a = dir.0.join("a.sock");
    let mut a = flint()
        .arg("--config-file")
        .arg(&config)
        .arg("--api-sock")
        .arg(&sock_a)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_spinning(&mut a);
    wait_for_socket(&sock_a);
    let answer = api(&sock_a, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        s(&state),
        s(&mem)
    );
    let answer = api(&sock_a, "PUT", "/snapshot/create", &body);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    wait_bounded(a, Duration::from_secs(20));
    (state, mem)
}

#[test]
fn a_snapshot_loads_through_a_page_fault_handler_and_its_death_ends_flint() {
    let dir = TempDir::new("uffd-api");
    let (state, mem) = spinning_snapshot(&dir);
    let sock_b = dir.0.join("b.sock");
    let b = flint()
        .arg("--api-sock")
        .arg(&sock_b)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock_b);
    let handler_sock = dir.0.join("uffd.sock");
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "{}"}}, "resume_vm": true}}"#,
        s(&state),
        s(&handler_sock)
    );
    // No handler yet: refused in one sentence, and the load can be tried again.
    let answer = api(&sock_b, "PUT", "/snapshot/load", &load);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains(&format!(
            "cannot load the snapshot: cannot connect to the page-fault handler's socket {}: ",
            s(&handler_sock)
        )),
        "{answer}"
    );
    let mut handler = Command::new(uffd_handler())
        .arg(&handler_sock)
        .arg(&mem)
        .spawn()
        .unwrap();
    wait_for_socket(&handler_sock);
    let answer = api(&sock_b, "PUT", "/snapshot/load", &load);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let answer = api(&sock_b, "GET", "/", "");
    assert!(answer.contains(r#""state":"Running""#), "{answer}");
    // The guest runs on pages the handler filled (its code is not in flint's memory
    // otherwise); a snapshot reads all of them through the handler.
    let answer = api(&sock_b, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let (state2, mem2) = (dir.0.join("vm2.snap"), dir.0.join("vm2.mem"));
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        s(&state2),
        s(&mem2)
    );
    let answer = api(&sock_b, "PUT", "/snapshot/create", &body);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    // All of it, but for the new VM generation ID the load wrote (16 bytes).
    let (before, after) = (std::fs::read(&mem).unwrap(), std::fs::read(&mem2).unwrap());
    let differ: Vec<usize> = (0..before.len().min(after.len()))
        .filter(|&i| before[i] != after[i])
        .collect();
    let same = before.len() == after.len()
        && differ.last().unwrap_or(&0) - differ.first().unwrap_or(&0) < 16;
    if !same {
        let _ = handler.kill();
        let _ = std::process::Command::new("kill")
            .arg(b.id().to_string())
            .status();
        panic!(
            "the memory read through the handler differs from the memory file at {} bytes",
            differ.len()
        );
    }
    let answer = api(&sock_b, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");

    // The handler dies: flint stops the VM and exits with one sentence.
    handler.kill().unwrap();
    handler.wait().unwrap();
    let out = wait_bounded(b, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        messages(&out),
        [format!(
            "flint: error: the page-fault handler for guest memory ({}) went away, so the guest \
             cannot continue",
            s(&handler_sock)
        )]
    );
}

/// A flint serving its API on `DIR/NAME.sock`, with `env`, that loads the snapshot of
/// [`spinning_snapshot`] through a new example handler (on `DIR/NAME.uffd`) and resumes it;
/// flint, the handler and the load's answer (empty if flint went away meanwhile).
fn uffd_restored_flint(
    dir: &TempDir,
    name: &str,
    (state, mem): (&Path, &Path),
    env: &[(&str, &str)],
) -> (Child, Child, String) {
    let sock = dir.0.join(format!("{name}.sock"));
    let handler_sock = dir.0.join(format!("{name}.uffd"));
    let flint = flint()
        .arg("--api-sock")
        .arg(&sock)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    let handler = Command::new(uffd_handler())
        .arg(&handler_sock)
        .arg(mem)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&handler_sock);
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "{}"}}, "resume_vm": true}}"#,
        s(state),
        s(&handler_sock)
    );
    // flint may stop in the middle of the request (a self-test): no answer then.
    let answer = (|| -> std::io::Result<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(&sock)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        write!(
            stream,
            "PUT /snapshot/load HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{load}",
            load.len()
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })()
    .unwrap_or_default();
    (flint, handler, answer)
}

#[test]
fn the_uffd_watch_thread_is_filtered_and_its_forbidden_calls_stop_flint() {
    let dir = TempDir::new("uffd-seccomp");
    let (state, mem) = spinning_snapshot(&dir);
    let snapshot = (state.as_path(), mem.as_path());

    // Restored through a handler, flint has one more thread, and it is filtered too.
    let (flint, mut handler, answer) = uffd_restored_flint(&dir, "modes", snapshot, &[]);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let modes = loop {
        let modes = seccomp_modes(flint.id());
        let watched = modes.iter().any(|(n, m)| n == "uffd-watch" && m == "2");
        let all = modes.iter().all(|(n, m)| n.starts_with("kvm") || m == "2");
        if (watched && all) || Instant::now() > deadline {
            break modes;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Under its filter the thread still does its work: it sees the handler go away (poll,
    // recvfrom) and flint ends with its sentence.
    handler.kill().unwrap();
    handler.wait().unwrap();
    let out = wait_bounded(flint, Duration::from_secs(20));
    assert!(
        modes.iter().any(|(n, m)| n == "uffd-watch" && m == "2"),
        "no filtered uffd-watch thread: {modes:?}"
    );
    for (name, mode) in modes.iter().filter(|(n, _)| !n.starts_with("kvm")) {
        assert_eq!(mode, "2", "thread {name} is not filtered: {modes:?}");
    }
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("the page-fault handler for guest memory ("),
        "{}",
        text(&out.stderr)
    );

    // A call outside its filter stops flint and is named: one no thread may make, and calls
    // every thread makes with arguments its rules refuse; it makes no sockets at all.
    let cases = [
        ("forbidden-call", (libc::SYS_getppid, "getppid")),
        ("mmap-exec", MMAP),
        ("mprotect-exec", MPROTECT),
        ("futex-pi", FUTEX),
        ("fcntl-getown", FCNTL),
        ("socket-inet", SOCKET),
        ("socket-dgram", SOCKET),
    ];
    let mut failed = Vec::new();
    for (i, (probe, call)) in cases.into_iter().enumerate() {
        let env = [("FLINT_SECCOMP_SELF_TEST", format!("uffd-watch:{probe}"))];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (flint, mut handler, _) = uffd_restored_flint(&dir, &format!("p{i}"), snapshot, &env);
        let out = wait_bounded(flint, Duration::from_secs(20));
        let _ = handler.kill();
        let _ = handler.wait();
        let stderr = text(&out.stderr);
        let expected = format!(
            "flint: error: seccomp: the uffd-watch thread made the forbidden system call {} ({}) \
             with arguments ",
            call.0, call.1
        );
        if out.status.code() != Some(128 + libc::SIGSYS) || !stderr.contains(&expected) {
            failed.push(format!("{probe}: {:?}: {stderr}", out.status.code()));
        }
    }
    assert!(failed.is_empty(), "not refused:\n{}", failed.join("\n"));

    // It opens no files: an open fails (EACCES) instead of stopping flint, so the self-test
    // reports that the call came back.
    let env = [("FLINT_SECCOMP_SELF_TEST", "uffd-watch:openat-read")];
    let (flint, mut handler, _) = uffd_restored_flint(&dir, "open", snapshot, &env);
    let out = wait_bounded(flint, Duration::from_secs(20));
    let _ = handler.kill();
    let _ = handler.wait();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "seccomp self-test: openat-read on the uffd-watch thread was not stopped: it \
             returned -1 (Permission denied (os error {}))",
            libc::EACCES
        )),
        "{stderr}"
    );
}
