//! Tier 2: tiny guests on the local /dev/kvm.
//!
//! Each test builds a few dozen bytes of 64-bit guest code, wraps them in a minimal ELF
//! `vmlinux` (no PVH note, so flint enters it through the 64-bit boot protocol with paging on),
//! runs the real `flint boot` binary on it and checks what a user would see: console output,
//! exit status and flint's messages. These run on any KVM, including the PVM nested KVM of the
//! CI machines, which cannot boot a real Linux guest.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const LOAD_ADDR: u64 = 0x10_0000;
const COM1: u16 = 0x3f8;
const COM1_LSR: u16 = 0x3fd;
const BOOT_TIMER: u16 = 0x3f0;
const I8042_COMMAND: u16 = 0x64;

/// A tiny x86-64 machine-code emitter for the handful of instructions these guests use.
#[derive(Default)]
struct Guest {
    code: Vec<u8>,
}

impl Guest {
    fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
        self
    }

    /// `out port, byte`.
    fn out8(&mut self, port: u16, byte: u8) -> &mut Self {
        self.mov_dx(port);
        self.code.extend_from_slice(&[0xb0, byte, 0xee]);
        self
    }

    /// `in al, port`.
    fn in8(&mut self, port: u16) -> &mut Self {
        self.mov_dx(port);
        self.code.push(0xec);
        self
    }

    /// Print `text` on the serial console, one `out` per byte.
    fn print(&mut self, text: &str) -> &mut Self {
        self.mov_dx(COM1);
        for b in text.bytes() {
            self.code.extend_from_slice(&[0xb0, b, 0xee]);
        }
        self
    }

    /// Ask the keyboard controller to reset the machine, then spin until flint stops us.
    fn reset(&mut self) -> &mut Self {
        self.out8(I8042_COMMAND, 0xfe).spin()
    }

    /// `jmp $`.
    fn spin(&mut self) -> &mut Self {
        self.code.extend_from_slice(&[0xeb, 0xfe]);
        self
    }

    /// Unless the flags say "equal", print `message` and reset.
    fn or_fail(&mut self, message: &str) -> &mut Self {
        let mut fail = Guest::default();
        fail.print(message).reset();
        assert!(fail.code.len() < 128);
        self.code.extend_from_slice(&[0x74, fail.code.len() as u8]);
        self.code.extend_from_slice(&fail.code);
        self
    }

    /// `cmp al, byte` then [`Self::or_fail`].
    fn expect_al(&mut self, byte: u8, message: &str) -> &mut Self {
        self.code.extend_from_slice(&[0x3c, byte]);
        self.or_fail(message)
    }

    /// Write then read back a 32-bit MMIO location; an unclaimed read must see all ones.
    fn mmio_roundtrip_unclaimed(&mut self, addr: u32, message: &str) -> &mut Self {
        self.code.push(0xbf); // mov edi, imm32
        self.code.extend_from_slice(&addr.to_le_bytes());
        self.code
            .extend_from_slice(&[0xc7, 0x07, 0x78, 0x56, 0x34, 0x12]); // mov dword [rdi], imm32
        self.code.extend_from_slice(&[0x8b, 0x07]); // mov eax, [rdi]
        self.code.extend_from_slice(&[0x83, 0xf8, 0xff]); // cmp eax, -1
        self.or_fail(message)
    }

    /// Echo console input back until the guest reads `stop`.
    fn echo_until(&mut self, stop: u8) -> &mut Self {
        // wait: mov dx, LSR; in al, dx; test al, 1; jz wait
        self.in8(COM1_LSR);
        self.code.extend_from_slice(&[0xa8, 0x01, 0x74, 0xf7]);
        // mov dx, COM1; in al, dx; cmp al, stop; je done; out dx, al; jmp wait
        self.in8(COM1);
        self.code
            .extend_from_slice(&[0x3c, stop, 0x74, 0x03, 0xee, 0xeb, 0xeb]);
        self
    }

    /// An invalid opcode with no IDT to handle it: #UD, #GP, #DF, then a triple fault.
    fn ud2(&mut self) -> &mut Self {
        self.code.extend_from_slice(&[0x0f, 0x0b]);
        self
    }

    /// Wrap the code in an ELF64 executable loaded and entered at 1 MiB.
    fn elf(&self) -> Vec<u8> {
        const EHDR: usize = 64;
        const PHDR: usize = 56;
        let offset = (EHDR + PHDR) as u64;
        let len = self.code.len() as u64;
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
        f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        f.extend_from_slice(&(EHDR as u16).to_le_bytes());
        f.extend_from_slice(&(PHDR as u16).to_le_bytes());
        f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
        f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
        f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f.extend_from_slice(&7u32.to_le_bytes()); // RWX
        f.extend_from_slice(&offset.to_le_bytes());
        f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
        f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
        f.extend_from_slice(&len.to_le_bytes()); // p_filesz
        f.extend_from_slice(&len.to_le_bytes()); // p_memsz
        f.extend_from_slice(&0x1000u64.to_le_bytes());
        f.extend_from_slice(&self.code);
        f
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("flint-test-{}-{n}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn flint() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flint"));
    cmd.env_remove("FLINT_LOG");
    cmd
}

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

fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "flint did not exit within {limit:?}; stdout {:?} stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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

fn spawn_spinning_guest(dir: &TempDir, vcpus: &str) -> Child {
    let mut g = Guest::default();
    g.print("spinning\n").spin();
    let kernel = dir.write("vmlinux", &g.elf());
    let mut child = flint()
        .args(["boot", "--vcpus", vcpus, "--kernel"])
        .arg(&kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the guest runs before signalling.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !text(&seen).contains("spinning\n") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "guest output ended early: {:?}", text(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
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
            vec!["boot", "--kernel", k, "--memory", "16"],
            "16 MiB of guest memory is too small",
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
    let mut g = Guest::default();
    g.print("spinning\n").spin();
    let kernel = dir.write("vmlinux", &g.elf());
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
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !text(&seen).contains("spinning") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "output ended early: {:?}", text(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
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
    let mut g = Guest::default();
    g.print("spinning\n").spin();
    let kernel = dir.write("vmlinux", &g.elf());
    let mut cmd = flint();
    cmd.args(["boot", "--vcpus", "2", "--kernel"])
        .arg(&kernel)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn wait_for_spinning(child: &mut Child) {
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !text(&seen).contains("spinning\n") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "guest output ended early: {:?}", text(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
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

#[test]
fn a_forbidden_system_call_stops_flint_and_names_it() {
    for thread in ["vcpu", "event-loop", "console-in", "vmm"] {
        let dir = TempDir::new("violation");
        let child = spinning_flint(&dir, &[], &[("FLINT_SECCOMP_SELF_TEST", thread)]);
        let out = wait_bounded(child, Duration::from_secs(20));
        assert_eq!(
            out.status.code(),
            Some(128 + libc::SIGSYS),
            "{thread}: {}",
            text(&out.stderr)
        );
        let expected = format!(
            "flint: error: seccomp: the {thread} thread made the forbidden system call {}",
            libc::SYS_getppid
        );
        assert!(
            text(&out.stderr).contains(&expected),
            "{thread}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn the_api_thread_is_filtered_too() {
    let dir = TempDir::new("api-seccomp");
    let sock = dir.0.join("api.sock");
    let child = flint()
        .arg("--api-sock")
        .arg(&sock)
        .env("FLINT_SECCOMP_SELF_TEST", "api")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(child, Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGSYS),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("seccomp: the api thread made the forbidden system call"),
        "{}",
        text(&out.stderr)
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
