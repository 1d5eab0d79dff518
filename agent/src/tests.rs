//! The agent's connection handling, driven by the real client over Unix socket pairs (no VM:
//! the commands run on the test machine).

use super::*;
use flint_agent::protocol::{kind, write_message};
use flint_agent::{AgentClient, AgentError, CommandStatus, CopyOutBudget, REFRESH_ENTROPY};
use std::io::Cursor;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::{Instant, SystemTime};

/// What a `Refresh` asked of the (stand-in) system, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SystemCall {
    SetClock(u64),
    ReseedRng(Vec<u8>),
}

/// Stand-ins for the clock and the random number generator: they record what they are
/// asked and fail with the given messages.
#[derive(Default)]
struct FakeSystem {
    calls: Mutex<Vec<SystemCall>>,
    clock_error: Option<String>,
    rng_error: Option<String>,
}

impl FakeSystem {
    fn calls(&self) -> Vec<SystemCall> {
        self.calls.lock().unwrap().clone()
    }
}

impl System for FakeSystem {
    fn set_clock(&self, unix_time_ns: u64) -> Result<(), String> {
        let call = SystemCall::SetClock(unix_time_ns);
        self.calls.lock().unwrap().push(call);
        self.clock_error.clone().map_or(Ok(()), Err)
    }

    fn reseed_rng(&self, entropy: &[u8]) -> Result<(), String> {
        let call = SystemCall::ReseedRng(entropy.to_vec());
        self.calls.lock().unwrap().push(call);
        self.rng_error.clone().map_or(Ok(()), Err)
    }
}

struct TestAgent {
    shutdowns: Arc<AtomicU64>,
    system: Arc<FakeSystem>,
    containers: Arc<Containers>,
}

impl TestAgent {
    fn new() -> TestAgent {
        TestAgent::with_system(FakeSystem::default())
    }

    fn with_system(system: FakeSystem) -> TestAgent {
        TestAgent {
            shutdowns: Arc::new(AtomicU64::new(0)),
            system: Arc::new(system),
            containers: Arc::new(Containers {
                dir: PathBuf::from("/nonexistent/containers"),
                inits: container::Inits::default(),
                cgroups: cgroup::Cgroups::new(None),
            }),
        }
    }

    /// Serve one connection on a thread; returns the host end.
    fn connect_raw(&self) -> UnixStream {
        self.connect_raw_with_sndbuf(None)
    }

    /// [`connect_raw`](Self::connect_raw), with the agent's send buffer set to `sndbuf`.
    fn connect_raw_with_sndbuf(&self, sndbuf: Option<libc::c_int>) -> UnixStream {
        let (host, guest) = UnixStream::pair().unwrap();
        if let Some(size) = sndbuf {
            // SAFETY: setsockopt reads an int of the given size from a live local; the
            // socket is open.
            let rc = unsafe {
                libc::setsockopt(
                    guest.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    std::ptr::addr_of!(size).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        }
        let shutdowns = Arc::clone(&self.shutdowns);
        let system: Arc<dyn System> = self.system.clone();
        let containers = Arc::clone(&self.containers);
        std::thread::spawn(move || {
            let agent = Agent {
                on_shutdown: Box::new(move || {
                    shutdowns.fetch_add(1, Ordering::SeqCst);
                }),
                system,
                containers,
            };
            serve(File::from(OwnedFd::from(guest)), &agent);
        });
        host
    }

    fn client(&self) -> AgentClient {
        AgentClient::from_stream(self.connect_raw()).unwrap()
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flint-agent-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run `argv` (with `stdin`) and collect its output.
fn run(
    client: &mut AgentClient,
    spec: &ExecSpec,
    stdin: Option<Vec<u8>>,
) -> Result<(CommandStatus, Vec<u8>, Vec<u8>), AgentError> {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = client.run(spec, stdin.map(Cursor::new), &mut out, &mut err)?;
    Ok((status, out, err))
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec::new(["sh", "-c", script])
}

/// Pseudo-random bytes (xorshift), no extra crates.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct CountingWriter(u64);

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        assert!(
            buf.iter().all(|&b| b == 0),
            "unexpected bytes in the output"
        );
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence; no pointers.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn exit_statuses_and_signals() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    for code in [0, 1, 42, 255] {
        let (status, _, _) = run(&mut c, &sh(&format!("exit {code}")), None).unwrap();
        assert_eq!(status, CommandStatus::Exited(code));
    }
    let (status, _, _) = run(&mut c, &sh("kill -9 $$"), None).unwrap();
    assert_eq!(status, CommandStatus::Killed(9));
    assert_eq!(status.code(), 137);
    let (status, _, _) = run(&mut c, &sh("kill -SEGV $$"), None).unwrap();
    assert_eq!(status, CommandStatus::Killed(libc::SIGSEGV));
    // The connection is still good after all that.
    let (status, out, _) = run(&mut c, &ExecSpec::new(["echo", "still here"]), None).unwrap();
    assert!(status.success());
    assert_eq!(out, b"still here\n");
}

#[test]
fn stdout_and_stderr_stay_separate_and_ordered() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let script = "i=0; while [ $i -lt 300 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done";
    let (status, out, err) = run(&mut c, &sh(script), None).unwrap();
    assert!(status.success());
    let want = |p: &str| (0..300).map(|i| format!("{p}{i}\n")).collect::<String>();
    assert_eq!(String::from_utf8(out).unwrap(), want("out"));
    assert_eq!(String::from_utf8(err).unwrap(), want("err"));
}

#[test]
fn hundred_mib_of_output_and_a_stderr_flood() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let mut out = CountingWriter(0);
    let mut err = CountingWriter(0);
    let spec = sh("head -c 104857600 /dev/zero & head -c 20971520 /dev/zero >&2; wait");
    let status = c.run(&spec, None::<io::Empty>, &mut out, &mut err).unwrap();
    assert!(status.success());
    assert_eq!(out.0, 100 << 20);
    assert_eq!(err.0, 20 << 20);
}

/// A consumer that stalls on its first chunk.
struct StallingWriter(u64);

impl Write for StallingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0 == 0 {
            std::thread::sleep(OUTPUT_GRACE * 3);
        }
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stalled_reader_still_gets_all_the_output() {
    let agent = TestAgent::new();
    // A small send buffer for the agent, so that it blocks as soon as the host stalls (for
    // three times OUTPUT_GRACE) while the command exits with output still on its way: none of
    // it may be lost, however long the host takes.
    let host = agent.connect_raw_with_sndbuf(Some(4096));
    let mut c = AgentClient::from_stream(host).unwrap();
    let mut out = StallingWriter(0);
    // The first chunk makes the host stall; the rest is more than one read of the agent.
    let spec = sh("head -c 1000 /dev/zero; sleep 0.5; head -c 120000 /dev/zero");
    let status = c
        .run(&spec, None::<io::Empty>, &mut out, io::sink())
        .unwrap();
    assert!(status.success());
    assert_eq!(out.0, 121_000);
}

#[test]
fn stdin_reaches_the_command() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let input = noise(3 << 20, 7);
    let (status, out, _) = run(&mut c, &ExecSpec::new(["cat"]), Some(input.clone())).unwrap();
    assert!(status.success());
    assert!(out == input, "cat did not echo its input unchanged");
    // No stdin: the command sees end of file at once.
    let (status, out, _) = run(&mut c, &ExecSpec::new(["cat"]), None).unwrap();
    assert!(status.success() && out.is_empty());
    // A command that ignores its stdin while lots is sent still finishes.
    let (status, _, _) = run(&mut c, &sh("exit 3"), Some(noise(8 << 20, 3))).unwrap();
    assert_eq!(status, CommandStatus::Exited(3));
}

#[test]
fn stdin_of_a_finished_command_goes_nowhere() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    // An input that blocks until we write to it.
    let (input, mut feeder) = UnixStream::pair().unwrap();
    let status = c
        .run(
            &ExecSpec::new(["true"]),
            Some(input),
            io::sink(),
            io::sink(),
        )
        .unwrap();
    assert!(status.success());
    // The forwarder wakes up now, after its command: the bytes must not reach the next one.
    feeder.write_all(b"stray input\n").unwrap();
    drop(feeder);
    std::thread::sleep(Duration::from_millis(100));
    let (status, out, _) = run(&mut c, &ExecSpec::new(["cat"]), None).unwrap();
    assert!(status.success());
    assert_eq!(out, b"");
}

#[test]
fn commands_that_cannot_start() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let e = run(&mut c, &ExecSpec::new(["no-such-command-xyz"]), None).unwrap_err();
    assert!(matches!(e, AgentError::NotStarted(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("no-such-command-xyz") && msg.contains("No such file"),
        "{msg}"
    );
    let e = run(&mut c, &ExecSpec::new(["/etc/hostname"]), None).unwrap_err();
    assert!(matches!(e, AgentError::NotStarted(_)), "{e:?}");
    let e = run(
        &mut c,
        &ExecSpec::new(["true"]).workdir("/no/such/dir"),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(&e, AgentError::NotStarted(m) if m.contains("/no/such/dir")),
        "{e:?}"
    );
    let e = run(
        &mut c,
        &ExecSpec::new(["true"]).workdir("/etc/hostname"),
        None,
    )
    .unwrap_err();
    assert!(matches!(e, AgentError::NotStarted(_)), "{e:?}");
    // An invalid request is refused before it is sent.
    let e = run(&mut c, &ExecSpec::new(["true"]).workdir("relative"), None).unwrap_err();
    assert!(matches!(e, AgentError::BadRequest(_)), "{e:?}");
    // None of that broke the connection.
    let (status, _, _) = run(&mut c, &ExecSpec::new(["true"]), None).unwrap();
    assert!(status.success());
}

#[test]
fn env_and_workdir_apply() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let dir = temp_dir("workdir");
    let spec = sh("pwd; echo \"$FOO|$HOME|$PATH|$EMPTY|${UNSET-unset}\"; env | wc -l")
        .env("FOO", "bar baz")
        .env("EMPTY", "")
        .workdir(dir.to_str().unwrap());
    let (status, out, _) = run(&mut c, &spec, None).unwrap();
    assert!(status.success());
    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], dir.to_str().unwrap());
    assert_eq!(
        lines[1],
        format!("bar baz|/root|{}||unset", DEFAULT_ENV[0].1)
    );
    // Only PATH, HOME, FOO, EMPTY and what sh itself adds (PWD, SHLVL, _).
    let count: usize = lines[2].trim().parse().unwrap();
    assert!(count <= 7, "the environment leaks variables: {count}");
    // HOME can be overridden; the default working directory is /.
    let (_, out, _) = run(&mut c, &sh("echo $HOME; pwd").env("HOME", "/tmp"), None).unwrap();
    assert_eq!(out, b"/tmp\n/\n");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn copy_in_preserves_bytes_and_mode_and_copy_out_bytes() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let dir = temp_dir("copy");
    for (name, len, mode) in [
        ("big", (3 << 20) + 12345, 0o751),
        ("empty", 0, 0o600),
        ("one", 1, 0o4755),
    ] {
        let src = dir.join(name);
        let data = noise(len, len as u64);
        fs::write(&src, &data).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(mode)).unwrap();
        let guest = dir.join("guest/a/b").join(name);
        c.copy_in(&src, &guest).unwrap();
        assert!(fs::read(&guest).unwrap() == data);
        assert_eq!(
            fs::metadata(&guest).unwrap().permissions().mode() & 0o7777,
            mode
        );
        let back = dir.join("back/c").join(name);
        c.copy_out(&guest, &back).unwrap();
        assert!(
            fs::read(&back).unwrap() == data,
            "{name}: copy-out changed the bytes"
        );
        // The host chooses the copy's mode: only whether it is executable comes from the
        // guest.
        assert_eq!(
            fs::metadata(&back).unwrap().permissions().mode() & 0o7777,
            flint_agent::host_file_mode(mode),
            "{name}"
        );
    }
    // Replacing an existing file.
    fs::write(dir.join("new"), b"new").unwrap();
    c.copy_in(&dir.join("new"), &dir.join("guest/a/b/big"))
        .unwrap();
    assert_eq!(fs::read(dir.join("guest/a/b/big")).unwrap(), b"new");
    // No temporary files left behind.
    let leftovers: Vec<_> = fs::read_dir(dir.join("guest/a/b"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("flint-part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Failures are reported and leave the connection usable.
    let e = c
        .copy_out(Path::new("/no/such/file"), &dir.join("x"))
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::Remote(m) if m.contains("/no/such/file")),
        "{e:?}"
    );
    assert!(!dir.join("x").exists());
    let e = c.copy_out(&dir, &dir.join("x")).unwrap_err();
    assert!(
        matches!(&e, AgentError::Remote(m) if m.contains("not a regular file")),
        "{e:?}"
    );
    let e = c
        .copy_in(&dir.join("new"), &dir.join("new/under-a-file"))
        .unwrap_err();
    assert!(matches!(e, AgentError::Remote(_)), "{e:?}");
    let e = c.copy_in(&dir.join("missing"), &dir.join("y")).unwrap_err();
    assert!(matches!(e, AgentError::HostRead { .. }), "{e:?}");
    let e = c
        .copy_in(&dir.join("new"), Path::new("relative"))
        .unwrap_err();
    assert!(matches!(e, AgentError::BadRequest(_)), "{e:?}");
    let (status, _, _) = run(&mut c, &ExecSpec::new(["true"]), None).unwrap();
    assert!(status.success());
    fs::remove_dir_all(dir).unwrap();
}

/// Whether a `sleep` process runs whose parent's command line contains `text`.
fn sleep_child_of_script_runs(text: &str) -> bool {
    let Ok(dir) = fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|entry| {
        let proc_dir = entry.path();
        let comm = fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
        if comm.trim() != "sleep" {
            return false;
        }
        let stat = fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
        // Field 4, after the parenthesised command name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .unwrap_or("0");
        let cmdline = fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains(text)
    })
}

#[test]
fn signals_reach_the_process_group() {
    // As when the agent's own parent ignored SIGINT (a shell's background job does): the
    // command must still get the default action. (Process-wide; no other test uses SIGINT.)
    // SAFETY: setting a disposition passes no pointers.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let agent = TestAgent::new();
    let mut c = agent.client();
    let signaller = c.signaller();
    assert!(
        !signaller.signal(libc::SIGTERM).unwrap(),
        "nothing runs yet"
    );
    let dir = temp_dir("signals");
    let marker = dir.join("started");
    let script = format!("touch {}; sleep 30; echo not killed", marker.display());
    let t = std::thread::spawn(move || {
        let status = run(&mut c, &sh(&script), None).unwrap();
        (status, c)
    });
    let start = Instant::now();
    // Signal once the shell waits for its `sleep` (the state a Ctrl-C meets): the marker
    // exists and a `sleep` whose parent's command line names the marker runs. On a loaded
    // machine that can take far longer than any fixed pause.
    let script_text = marker.display().to_string();
    while !(marker.exists() && sleep_child_of_script_runs(&script_text)) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the command never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(signaller.signal(libc::SIGINT).unwrap());
    let ((status, out, _), _c) = t.join().unwrap();
    assert_eq!(status, CommandStatus::Killed(libc::SIGINT));
    assert!(out.is_empty());
    // Well before the 30 s the command would otherwise take.
    assert!(start.elapsed() < Duration::from_secs(25));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn try_signal_kills_a_running_command() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let signaller = c.signaller();
    assert!(
        !signaller.try_signal(libc::SIGKILL).unwrap(),
        "nothing runs yet"
    );
    let t = std::thread::spawn(move || run(&mut c, &sh("sleep 30; echo not killed"), None));
    let start = Instant::now();
    while !signaller.try_signal(libc::SIGCONT).unwrap() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(signaller.try_signal(libc::SIGKILL).unwrap());
    let (status, out, _) = t.join().unwrap().unwrap();
    assert_eq!(status, CommandStatus::Killed(libc::SIGKILL));
    assert!(out.is_empty());
}

#[test]
fn a_dropped_connection_kills_the_process_group() {
    let agent = TestAgent::new();
    let mut host = agent.connect_raw();
    let spec = sh("sleep 300 & echo $!; wait");
    write_message(&mut host, &ToAgent::Exec(spec)).unwrap();
    let Some(FromAgent::Started { pid }) = read_message(&mut host).unwrap() else {
        panic!("no Started")
    };
    let Some(FromAgent::Stdout(line)) = read_message(&mut host).unwrap() else {
        panic!("no Stdout")
    };
    let sleeper: i32 = String::from_utf8(line).unwrap().trim().parse().unwrap();
    assert!(process_exists(pid as i32) && process_exists(sleeper));
    drop(host);
    let start = Instant::now();
    while process_exists(pid as i32) || process_exists(sleeper) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the command survived its connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn processes_left_behind_do_not_hold_up_the_exit() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let start = Instant::now();
    let (status, out, _) = run(&mut c, &sh("sleep 5 & echo started"), None).unwrap();
    assert!(status.success());
    assert_eq!(out, b"started\n");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn connections_run_concurrently() {
    let agent = TestAgent::new();
    let start = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let mut c = agent.client();
            std::thread::spawn(move || {
                let (status, out, _) =
                    run(&mut c, &sh(&format!("sleep 1; echo {i}")), None).unwrap();
                assert!(status.success());
                assert_eq!(out, format!("{i}\n").into_bytes());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "connections were serialized"
    );
}

#[test]
fn one_command_at_a_time_per_connection() {
    let agent = TestAgent::new();
    let mut host = agent.connect_raw();
    write_message(&mut host, &ToAgent::Exec(sh("read x; echo got $x"))).unwrap();
    assert!(matches!(
        read_message::<FromAgent, _>(&mut host).unwrap(),
        Some(FromAgent::Started { .. })
    ));
    write_message(&mut host, &ToAgent::Exec(sh("true"))).unwrap();
    let Some(FromAgent::Error(m)) = read_message(&mut host).unwrap() else {
        panic!("a second Exec should be refused")
    };
    assert!(m.contains("already running"), "{m}");
    write_message(&mut host, &ToAgent::Stdin(b"hello\n".to_vec())).unwrap();
    write_message(&mut host, &ToAgent::StdinEof).unwrap();
    assert_eq!(
        read_message::<FromAgent, _>(&mut host).unwrap(),
        Some(FromAgent::Stdout(b"got hello\n".to_vec()))
    );
    assert_eq!(
        read_message::<FromAgent, _>(&mut host).unwrap(),
        Some(FromAgent::Exited { code: 0 })
    );
    // Stdin and signals after the end are ignored; the next command runs.
    write_message(&mut host, &ToAgent::Stdin(b"late".to_vec())).unwrap();
    write_message(&mut host, &ToAgent::Signal(9)).unwrap();
    write_message(&mut host, &ToAgent::Exec(sh("exit 5"))).unwrap();
    assert!(matches!(
        read_message::<FromAgent, _>(&mut host).unwrap(),
        Some(FromAgent::Started { .. })
    ));
    write_message(&mut host, &ToAgent::StdinEof).unwrap();
    assert_eq!(
        read_message::<FromAgent, _>(&mut host).unwrap(),
        Some(FromAgent::Exited { code: 5 })
    );
}

/// Send raw bytes; expect one `Error` frame and then the end of the connection.
fn expect_error_and_hangup(agent: &TestAgent, bytes: &[u8], what: &str) {
    let mut host = agent.connect_raw();
    host.write_all(bytes).unwrap();
    match read_message::<FromAgent, _>(&mut host) {
        Ok(Some(FromAgent::Error(m))) => assert!(m.contains(what), "{m:?} lacks {what:?}"),
        other => panic!("expected an Error frame, got {other:?}"),
    }
    assert!(matches!(read_message::<FromAgent, _>(&mut host), Ok(None)));
}

#[test]
fn malformed_frames_get_an_error_and_a_hangup() {
    let agent = TestAgent::new();
    expect_error_and_hangup(&agent, &[0x42, 0, 0, 0, 0], "unknown");
    expect_error_and_hangup(&agent, &[kind::OK, 0, 0, 0, 0], "unknown");
    expect_error_and_hangup(&agent, &[kind::STDIN, 0xff, 0xff, 0xff, 0xff], "exceeds");
    expect_error_and_hangup(&agent, &[kind::COPY_OUT, 3, 0, 0, 0, 1, 0, 0], "truncated");
    expect_error_and_hangup(
        &agent,
        &[kind::COPY_OUT, 5, 0, 0, 0, 1, 0, 0, 0, 0xff],
        "UTF-8",
    );
    expect_error_and_hangup(
        &agent,
        &[kind::FILE_END_IN, 0, 0, 0, 0],
        "outside of a copy-in",
    );
    // A copy-in interrupted by another request; its partial file is removed.
    let dir = temp_dir("bad-copy");
    let target = dir.join("f");
    let mut bytes = ToAgent::CopyIn {
        path: target.to_str().unwrap().into(),
        mode: 0o644,
        root: None,
    }
    .encode()
    .unwrap();
    bytes.extend(ToAgent::FileData(b"partial".to_vec()).encode().unwrap());
    bytes.extend(ToAgent::Exec(sh("true")).encode().unwrap());
    expect_error_and_hangup(&agent, &bytes, "middle of a copy-in");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        0,
        "partial file left behind"
    );
    fs::remove_dir_all(dir).unwrap();
    // An end of stream inside a frame just ends the connection.
    let mut host = agent.connect_raw();
    host.write_all(&[kind::EXEC, 10, 0]).unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(
        read_message::<FromAgent, _>(&mut host),
        Ok(Some(FromAgent::Error(_))) | Ok(None)
    ));
}

#[test]
fn shutdown_is_acknowledged() {
    let agent = TestAgent::new();
    let c = agent.client();
    let start = Instant::now();
    c.shutdown().unwrap();
    while agent.shutdowns.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
    // The client hung up, so the agent did not wait out the grace period.
    assert!(start.elapsed() < SHUTDOWN_GRACE);
}

/// A stand-in for flint's vsock socket: refuses the first `refusals` connections the way
/// flint does when no guest program listens (closes them), then answers `OK` and hands the
/// stream to the agent.
fn fake_vsock(
    path: &Path,
    refusals: usize,
    answer: &'static str,
) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut line = String::new();
        for (i, stream) in listener.incoming().enumerate() {
            let mut stream = stream.unwrap();
            line.clear();
            let mut byte = [0u8; 1];
            while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0] as char);
            }
            if i < refusals {
                continue; // dropped: refused
            }
            stream.write_all(answer.as_bytes()).unwrap();
            let agent = Agent {
                on_shutdown: Box::new(|| {}),
                system: Arc::new(FakeSystem::default()),
                containers: Arc::new(Containers {
                    dir: PathBuf::from("/nonexistent/containers"),
                    inits: container::Inits::default(),
                    cgroups: cgroup::Cgroups::new(None),
                }),
            };
            serve(File::from(OwnedFd::from(stream)), &agent);
            return line;
        }
        unreachable!()
    })
}

#[test]
fn connect_retries_until_the_agent_answers() {
    let dir = temp_dir("connect");
    let sock = dir.join("v.sock");
    // The socket appears late and the first attempts are refused.
    let sock2 = sock.clone();
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        fake_vsock(&sock2, 3, "OK 1024\n").join().unwrap()
    });
    let mut c = AgentClient::connect(&sock, AGENT_PORT, Duration::from_secs(20)).unwrap();
    let (status, out, _) = run(&mut c, &ExecSpec::new(["echo", "via vsock"]), None).unwrap();
    assert!(status.success());
    assert_eq!(out, b"via vsock\n");
    drop(c);
    assert_eq!(server.join().unwrap(), "CONNECT 52");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn connect_gives_up_with_a_reason() {
    let dir = temp_dir("connect-fail");
    let start = Instant::now();
    let e =
        AgentClient::connect(&dir.join("none.sock"), 52, Duration::from_millis(500)).unwrap_err();
    assert!(matches!(e, AgentError::Timeout { .. }), "{e:?}");
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(e.to_string().contains("port 52"), "{e}");

    let sock = dir.join("bad.sock");
    let _server = fake_vsock(&sock, 0, "NOPE\n");
    let e = AgentClient::connect(&sock, 52, Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(&e, AgentError::Handshake(a) if a == "NOPE"),
        "{e:?}"
    );

    // Something that is not a socket.
    fs::write(dir.join("file"), b"").unwrap();
    let e = AgentClient::connect(&dir.join("file"), 52, Duration::from_secs(1)).unwrap_err();
    assert!(
        matches!(e, AgentError::Connect { .. } | AgentError::Timeout { .. }),
        "{e:?}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_closed_connection_is_an_error_not_a_hang() {
    let (host, guest) = UnixStream::pair().unwrap();
    let mut c = AgentClient::from_stream(host).unwrap();
    drop(guest);
    let e = run(&mut c, &ExecSpec::new(["true"]), None).unwrap_err();
    assert!(matches!(e, AgentError::Closed | AgentError::Io(_)), "{e:?}");
    let e = run(&mut c, &ExecSpec::new(["true"]), None).unwrap_err();
    assert!(matches!(e, AgentError::Broken), "{e:?}");
}

const NOV_2023_NS: u64 = 1_700_000_000_123_456_789;

fn refresh_request(unix_time_ns: u64, entropy: Vec<u8>) -> ToAgent {
    ToAgent::Refresh {
        unix_time_ns,
        entropy,
    }
}

#[test]
fn refresh_sets_the_clock_then_reseeds() {
    let agent = TestAgent::new();
    let mut host = agent.connect_raw();
    let entropy = noise(64, 11);
    write_message(&mut host, &refresh_request(NOV_2023_NS, entropy.clone())).unwrap();
    assert_eq!(
        read_message::<FromAgent, _>(&mut host).unwrap(),
        Some(FromAgent::Ok)
    );
    assert_eq!(
        agent.system.calls(),
        [
            SystemCall::SetClock(NOV_2023_NS),
            SystemCall::ReseedRng(entropy.clone())
        ]
    );
    // Any number of times, and commands still run on the connection afterwards.
    let bigger = noise(512, 12);
    write_message(&mut host, &refresh_request(u64::MAX, bigger.clone())).unwrap();
    assert_eq!(
        read_message::<FromAgent, _>(&mut host).unwrap(),
        Some(FromAgent::Ok)
    );
    assert_eq!(agent.system.calls().len(), 4);
    assert_eq!(
        agent.system.calls()[2..],
        [
            SystemCall::SetClock(u64::MAX),
            SystemCall::ReseedRng(bigger)
        ]
    );
    let mut c = AgentClient::from_stream(host).unwrap();
    let (status, out, _) = run(&mut c, &ExecSpec::new(["echo", "after"]), None).unwrap();
    assert!(status.success());
    assert_eq!(out, b"after\n");
}

#[test]
fn refresh_failures_are_reported_and_the_reseed_still_happens() {
    let cases = [
        (Some("cannot set the guest clock: Operation not permitted"), None),
        (None, Some("cannot reseed the guest kernel's random number generator (RNDRESEEDCRNG): No data available")),
        (Some("cannot set the guest clock: Invalid argument"), Some("cannot open /dev/urandom: No such file or directory")),
    ];
    for (clock_error, rng_error) in cases {
        let agent = TestAgent::with_system(FakeSystem {
            clock_error: clock_error.map(String::from),
            rng_error: rng_error.map(String::from),
            ..FakeSystem::default()
        });
        let mut host = agent.connect_raw();
        let entropy = noise(32, 5);
        write_message(&mut host, &refresh_request(NOV_2023_NS, entropy.clone())).unwrap();
        let Some(FromAgent::Error(message)) = read_message(&mut host).unwrap() else {
            panic!("a failed refresh should be an Error")
        };
        for part in clock_error.iter().chain(&rng_error) {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
        match (clock_error, rng_error) {
            (Some(_), None) => assert!(message.contains("was reseeded"), "{message}"),
            (None, Some(_)) => assert!(message.contains("clock was set"), "{message}"),
            _ => {}
        }
        assert!(!message.contains('\n'), "{message:?}");
        // Both steps were attempted, whatever failed.
        assert_eq!(
            agent.system.calls(),
            [
                SystemCall::SetClock(NOV_2023_NS),
                SystemCall::ReseedRng(entropy)
            ]
        );
        // The connection stays usable.
        let mut c = AgentClient::from_stream(host).unwrap();
        let (status, _, _) = run(&mut c, &ExecSpec::new(["true"]), None).unwrap();
        assert!(status.success());
    }
}

#[test]
fn malformed_refreshes_are_refused_without_touching_the_system() {
    let agent = TestAgent::new();
    let frame = |time: u64, entropy_len: usize| {
        let mut payload = time.to_le_bytes().to_vec();
        payload.extend_from_slice(&(entropy_len as u32).to_le_bytes());
        payload.extend(noise(entropy_len, 3));
        let mut f = vec![kind::REFRESH];
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend(payload);
        f
    };
    expect_error_and_hangup(&agent, &frame(NOV_2023_NS, 31), "entropy");
    expect_error_and_hangup(&agent, &frame(NOV_2023_NS, 513), "entropy");
    expect_error_and_hangup(&agent, &frame(0, 64), "before 2000");
    let mut short = frame(NOV_2023_NS, 64);
    short[1..HEADER_LEN].copy_from_slice(&10u32.to_le_bytes());
    short.truncate(HEADER_LEN + 10);
    expect_error_and_hangup(&agent, &short, "truncated");
    assert_eq!(agent.system.calls(), []);
}

#[test]
fn rand_pool_info_layout() {
    let entropy: Vec<u8> = (1..=34).collect();
    let words = rand_pool_info(&entropy).unwrap();
    assert_eq!(words.len(), 2 + 9);
    assert_eq!(words[0], 34 * 8, "entropy_count is in bits");
    assert_eq!(words[1], 34, "buf_size is in bytes");
    let buf: Vec<u8> = words[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    assert_eq!(buf[..34], entropy[..]);
    assert_eq!(buf[34..], [0, 0], "the last word is padded with zeros");
    let words = rand_pool_info(&[9; 32]).unwrap();
    let mut want = vec![256, 32];
    want.extend([0x0909_0909; 8]);
    assert_eq!(words, want);
}

#[test]
fn random_ioctl_numbers_match_linux() {
    // <linux/random.h>: RNDADDENTROPY _IOW('R', 0x03, int[2]), RNDRESEEDCRNG _IO('R', 0x07).
    assert_eq!(
        RNDADDENTROPY,
        libc::_IOW::<[libc::c_int; 2]>(b'R'.into(), 0x03)
    );
    assert_eq!(RNDRESEEDCRNG, libc::_IO(b'R'.into(), 0x07));
    assert_eq!(RNDADDENTROPY, 0x4008_5203);
    assert_eq!(RNDRESEEDCRNG, 0x5207);
}

fn now_ns() -> u64 {
    let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
    since.unwrap().as_nanos() as u64
}

#[test]
fn the_client_refreshes_with_the_host_time_and_fresh_entropy() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let before = now_ns();
    c.refresh().unwrap();
    let after = now_ns();
    c.refresh().unwrap();
    let calls = agent.system.calls();
    let [SystemCall::SetClock(t1), SystemCall::ReseedRng(e1), SystemCall::SetClock(t2), SystemCall::ReseedRng(e2)] =
        &calls[..]
    else {
        panic!("two refreshes should set the clock and reseed twice: {calls:?}")
    };
    assert!(before <= *t1 && *t1 <= after, "{before} <= {t1} <= {after}");
    assert!(t1 <= t2);
    assert_eq!(e1.len(), REFRESH_ENTROPY);
    assert_eq!(e2.len(), REFRESH_ENTROPY);
    assert_ne!(e1, e2, "each refresh needs entropy of its own");
    assert!(e1.iter().any(|&b| b != 0) && e2.iter().any(|&b| b != 0));
    let (status, out, _) = run(&mut c, &ExecSpec::new(["echo", "after"]), None).unwrap();
    assert!(status.success());
    assert_eq!(out, b"after\n");
}

#[test]
fn the_client_reports_a_failed_refresh() {
    let agent = TestAgent::with_system(FakeSystem {
        clock_error: Some("cannot set the guest clock: Operation not permitted".into()),
        ..FakeSystem::default()
    });
    let mut c = agent.client();
    let e = c.refresh().unwrap_err();
    assert!(
        matches!(&e, AgentError::Remote(m) if m.contains("Operation not permitted") && m.contains("reseeded")),
        "{e:?}"
    );
    // Not a broken connection.
    let (status, _, _) = run(&mut c, &ExecSpec::new(["true"]), None).unwrap();
    assert!(status.success());
}

#[test]
fn a_refresh_the_agent_never_answers_times_out() {
    let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut c = AgentClient::from_stream(host).unwrap();
    let began = std::time::Instant::now();
    let e = c
        .refresh_within(std::time::Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(e, AgentError::RefreshTimeout(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains("did not answer the refresh within 0.2 s"),
        "{e}"
    );
    assert!(began.elapsed() < std::time::Duration::from_secs(5));
    drop(guest);
}

/// A stand-in agent on a socket pair: it reads one request, then `serve` writes whatever it
/// likes on the stream; it ends when `serve` returns and the host hangs up.
fn hostile_agent(
    serve: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> (AgentClient, std::thread::JoinHandle<()>) {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let agent = std::thread::spawn(move || {
        let _request = read_message::<ToAgent, _>(&mut guest);
        serve(&mut guest);
        // Wait for the host to hang up (or give up on its own).
        let _ = guest.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = io::copy(&mut guest, &mut io::sink());
    });
    (AgentClient::from_stream(host).unwrap(), agent)
}

fn part_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_guest_cannot_choose_the_host_files_mode() {
    let dir = temp_dir("mode");
    for (guest_mode, executable) in [
        (0o7777, true),
        (0o4755, true),
        (0o2700, true),
        (0o1666, false),
        (0o666, false),
        (0o000, false),
        (0o100, true),
    ] {
        let (mut c, agent) = hostile_agent(move |g| {
            write_message(g, &FromAgent::FileData(b"#!/bin/sh\n".to_vec())).unwrap();
            write_message(g, &FromAgent::FileEnd { mode: guest_mode }).unwrap();
        });
        let host = dir.join(format!("f{guest_mode:o}"));
        c.copy_out(Path::new("/f"), &host).unwrap();
        let mode = fs::metadata(&host).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode & 0o7022, 0, "guest mode {guest_mode:o} gave {mode:o}");
        let want = if executable { 0o755 } else { 0o644 };
        assert_eq!(
            mode,
            want & !process_umask(),
            "guest mode {guest_mode:o} gave {mode:o}"
        );
        drop(c);
        agent.join().unwrap();
    }
    fs::remove_dir_all(dir).unwrap();
}

/// The umask, read without changing it.
fn process_umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
}

#[test]
fn an_endless_copy_out_stops_at_the_byte_limit_and_leaves_nothing() {
    let dir = temp_dir("endless");
    let (mut c, agent) = hostile_agent(|g| {
        let chunk = FromAgent::FileData(vec![0xaa; DATA_CHUNK]);
        // Until the host hangs up.
        while write_message(g, &chunk).is_ok() {}
    });
    let host = dir.join("sub/out");
    let mut budget = CopyOutBudget::new(1 << 20, Duration::from_secs(60));
    let e = c
        .copy_out_within(Path::new("/dev/zero"), &host, &mut budget)
        .unwrap_err();
    assert!(matches!(e, AgentError::CopyOutTooLarge { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("copy-out limit of 1048576 bytes") && !text.contains('\n'),
        "{text}"
    );
    assert!(!host.exists());
    assert!(
        part_files(&dir.join("sub")).is_empty(),
        "{:?}",
        part_files(&dir.join("sub"))
    );
    // The connection is closed: the agent's writes fail and it ends.
    drop(c);
    agent.join().unwrap();
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_copy_out_limit_counts_all_copies_of_a_budget() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let dir = temp_dir("budget");
    let src = dir.join("src");
    fs::write(&src, noise(600, 1)).unwrap();
    let mut budget = CopyOutBudget::new(1000, Duration::from_secs(60));
    c.copy_out_within(&src, &dir.join("one"), &mut budget)
        .unwrap();
    assert_eq!(budget.bytes_left(), 400);
    let e = c
        .copy_out_within(&src, &dir.join("two"), &mut budget)
        .unwrap_err();
    assert!(
        matches!(e, AgentError::CopyOutTooLarge { limit: 1000, .. }),
        "{e:?}"
    );
    assert_eq!(fs::read(dir.join("one")).unwrap(), noise(600, 1));
    assert!(!dir.join("two").exists());
    let left: Vec<_> = part_files(&dir)
        .into_iter()
        .filter(|n| n.contains("flint-part"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_stalled_copy_out_ends_at_the_deadline() {
    let dir = temp_dir("stall");
    let (mut c, agent) = hostile_agent(|g| {
        write_message(g, &FromAgent::FileData(vec![1; 100])).unwrap();
        // Then nothing: no more data, no end.
    });
    let host = dir.join("out");
    let mut budget = CopyOutBudget::new(1 << 30, Duration::from_millis(300));
    let began = Instant::now();
    let e = c
        .copy_out_within(Path::new("/f"), &host, &mut budget)
        .unwrap_err();
    assert!(matches!(e, AgentError::CopyOutTimeout { .. }), "{e:?}");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    assert!(e.to_string().contains("deadline"), "{e}");
    assert!(!host.exists());
    assert!(part_files(&dir).is_empty(), "{:?}", part_files(&dir));
    // A deadline already past fails at once, sending nothing.
    let e = c
        .copy_out_within(Path::new("/f"), &host, &mut budget)
        .unwrap_err();
    assert!(matches!(e, AgentError::Broken), "{e:?}");
    drop(c);
    agent.join().unwrap();
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_agents_error_messages_are_bounded_and_printable() {
    let hostile = format!(
        "\x1b]0;owned\x07\x1b[2J{}\nflint: error: forged\u{202e}",
        "x".repeat(100_000)
    );
    let message = hostile.clone();
    let (mut c, agent) = hostile_agent(move |g| {
        write_message(g, &FromAgent::Error(message)).unwrap();
    });
    let e = c
        .copy_out(Path::new("/f"), Path::new("/nonexistent/never"))
        .unwrap_err();
    assert!(matches!(e, AgentError::Remote(_)), "{e:?}");
    let text = e.to_string();
    assert!(text.len() < 1000, "{} bytes", text.len());
    assert!(
        !text.chars().any(|ch| ch.is_control() || ch == '\u{202e}'),
        "{text:?}"
    );
    assert!(text.starts_with("?]0;owned??[2Jxxx"), "{text:?}");
    drop(c);
    agent.join().unwrap();

    // The same for a command that cannot start.
    let (mut c, agent) = hostile_agent(move |g| {
        write_message(g, &FromAgent::Error(hostile)).unwrap();
    });
    let e = run(&mut c, &ExecSpec::new(["x"]), None).unwrap_err();
    assert!(matches!(e, AgentError::NotStarted(_)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.len() < 1000 && !text.chars().any(char::is_control),
        "{text:?}"
    );
    drop(c);
    agent.join().unwrap();
}

// --- Commands and copies in another root (a container image's) -----------------------------

/// A root directory with a static busybox (`sh`, `id`, `cat`, ...) in `/bin` and
/// `/etc/marker`, and an "outside" directory next to it (a directory of the test machine
/// that commands and copies in the root must never reach).
struct ImageRoot {
    dir: PathBuf,
    root: PathBuf,
    outside: PathBuf,
}

impl ImageRoot {
    fn new(tag: &str) -> ImageRoot {
        // SAFETY: geteuid takes no arguments and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "changing the root directory and the credentials needs root"
        );
        let busybox = ["/usr/bin/busybox", "/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .expect("these tests need a static busybox (Debian's busybox-static)");
        let dir = temp_dir(tag);
        let root = dir.join("root");
        let outside = dir.join("outside");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        // A hard link where it can be: a copy is written through a descriptor that a
        // command spawned meanwhile by another test's thread inherits until its exec, and
        // executing the copy then fails with ETXTBSY.
        if fs::hard_link(busybox, root.join("bin/busybox")).is_err() {
            fs::copy(busybox, root.join("bin/busybox")).unwrap();
        }
        for applet in ["sh", "id", "cat", "pwd", "ls", "echo", "ln", "mkfifo"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        fs::write(root.join("etc/marker"), b"inside\n").unwrap();
        fs::write(outside.join("secret"), b"secret\n").unwrap();
        ImageRoot { dir, root, outside }
    }

    fn root(&self) -> &str {
        self.root.to_str().unwrap()
    }

    fn sh(&self, script: &str) -> ExecSpec {
        sh(script).root(self.root())
    }
}

impl Drop for ImageRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

#[test]
fn a_command_in_another_root_sees_that_root() {
    let image = ImageRoot::new("root-files");
    let agent = TestAgent::new();
    let mut c = agent.client();
    let spec = image
        .sh("cat /etc/marker; pwd; ls /; echo \"$HOME|$PATH|$FOO\"")
        .env("FOO", "bar")
        .workdir("/work/here");
    let (status, out, err) = run(&mut c, &spec, None).unwrap();
    assert!(status.success(), "{}", text(err));
    assert_eq!(
        text(out),
        format!(
            "inside\n/work/here\nbin\netc\nwork\n/root|{}|bar\n",
            DEFAULT_ENV[0].1
        )
    );
    // The missing working directory was created inside the root.
    assert!(image.root.join("work/here").is_dir());
    // The default working directory is the root's `/`.
    let (_, out, _) = run(&mut c, &image.sh("pwd; ls"), None).unwrap();
    assert_eq!(text(out), "/\nbin\netc\nwork\n");
    // The program is looked up inside the root: the test machine's programs are not there.
    let e = run(&mut c, &ExecSpec::new(["env"]).root(image.root()), None).unwrap_err();
    assert!(
        matches!(&e, AgentError::NotStarted(m) if m.contains("cannot run `env`")),
        "{e:?}"
    );
    let e = run(&mut c, &sh("true").root("/no/such/root"), None).unwrap_err();
    assert!(
        matches!(&e, AgentError::NotStarted(m)
            if m.contains("cannot use /no/such/root as the root directory")),
        "{e:?}"
    );
    let e = run(&mut c, &image.sh("true").workdir("/etc/marker"), None).unwrap_err();
    assert!(
        matches!(&e, AgentError::NotStarted(m)
            if m.contains("cannot use /etc/marker as the working directory")),
        "{e:?}"
    );
    // The connection is still good, and commands without a root still use the guest's.
    let (status, out, _) = run(&mut c, &sh("pwd"), None).unwrap();
    assert!(status.success());
    assert_eq!(out, b"/\n");
}

#[test]
fn credentials_apply_inside_and_outside_a_root() {
    let image = ImageRoot::new("root-user");
    fs::write(image.root.join("etc/shadow"), b"root only\n").unwrap();
    fs::set_permissions(
        image.root.join("etc/shadow"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let agent = TestAgent::new();
    let mut c = agent.client();
    let script = "id -u; id -g; id -G; cat /etc/shadow || echo refused";
    let spec = image.sh(script).user(1234, 2345, [3456, 4567]);
    let (status, out, _) = run(&mut c, &spec, None).unwrap();
    assert!(status.success());
    assert_eq!(text(out), "1234\n2345\n2345 3456 4567\nrefused\n");
    // No supplementary groups at all.
    let spec = image.sh("id -G").user(1234, 2345, []);
    let (_, out, _) = run(&mut c, &spec, None).unwrap();
    assert_eq!(text(out), "2345\n");
    // Root, by default, reads it.
    let (_, out, _) = run(&mut c, &image.sh(script), None).unwrap();
    assert_eq!(text(out), "0\n0\n0\nroot only\n");
    // Without a root: the guest's own file system, as that user, in the working directory.
    let dir = temp_dir("user-no-root");
    let spec = sh("id -u; id -g; pwd")
        .user(65534, 65533, [65532])
        .workdir(dir.to_str().unwrap());
    let (status, out, _) = run(&mut c, &spec, None).unwrap();
    assert!(status.success());
    assert_eq!(
        text(out),
        format!("65534\n65533\n{}\n", dir.to_str().unwrap())
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_working_directory_behind_a_symlink_stays_inside_the_root() {
    let image = ImageRoot::new("root-workdir");
    // Absolute and relative links that would lead to the outside directory on the test
    // machine.
    std::os::unix::fs::symlink(&image.outside, image.root.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../..", image.root.join("up")).unwrap();
    let inside = image.root.join(image.outside.strip_prefix("/").unwrap());
    // While the links dangle inside the root, there is nothing to work in (as `mkdir -p`
    // does not create a link's target).
    let agent = TestAgent::new();
    let mut c = agent.client();
    let e = run(&mut c, &image.sh("pwd").workdir("/abs/new"), None).unwrap_err();
    assert!(
        matches!(&e, AgentError::NotStarted(m) if m.contains("working directory")),
        "{e:?}"
    );
    assert!(!image.outside.join("new").exists(), "escaped the root");
    fs::create_dir_all(&inside).unwrap();
    for (workdir, want) in [
        ("/abs/new", image.outside.join("new")),
        (
            &*format!("/up{}/new2", image.outside.to_str().unwrap()),
            image.outside.join("new2"),
        ),
    ] {
        let agent = TestAgent::new();
        let mut c = agent.client();
        let (status, out, err) = run(&mut c, &image.sh("pwd").workdir(workdir), None).unwrap();
        assert!(status.success(), "{}", text(err));
        // The command runs in the root's copy of that path, created there...
        assert_eq!(text(out).trim_end(), want.to_str().unwrap(), "{workdir}");
        assert!(inside.join(want.file_name().unwrap()).is_dir(), "{workdir}");
        // ...never in the test machine's.
        assert!(!want.exists(), "{workdir} escaped the root");
    }
}

#[test]
fn copies_inside_a_root() {
    let image = ImageRoot::new("root-copy");
    let agent = TestAgent::new();
    let mut c = agent.client();
    c.set_root(Some(image.root()));
    let data = noise(200_000, 7);
    let src = image.dir.join("src");
    fs::write(&src, &data).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o640)).unwrap();
    c.copy_in(&src, Path::new("/data/x/in.bin")).unwrap();
    let landed = image.root.join("data/x/in.bin");
    assert!(fs::read(&landed).unwrap() == data);
    assert_eq!(
        fs::metadata(&landed).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    // `..` at the top stays at the top.
    c.copy_in(&src, Path::new("/../../../top.bin")).unwrap();
    assert!(image.root.join("top.bin").is_file());
    // A command in the root sees the file and writes one that is copied out.
    let (status, out, _) = run(
        &mut c,
        &image.sh("cat /data/x/in.bin; echo made >/data/made"),
        None,
    )
    .unwrap();
    assert!(status.success());
    assert!(out == data);
    let back = image.dir.join("back");
    c.copy_out(Path::new("/data/made"), &back).unwrap();
    assert_eq!(fs::read(&back).unwrap(), b"made\n");
    c.copy_out(Path::new("/data/x/in.bin"), &back).unwrap();
    assert!(fs::read(&back).unwrap() == data);
    // Paths of the test machine mean nothing inside the root.
    let e = c
        .copy_out(&image.outside.join("secret"), &back)
        .unwrap_err();
    assert!(matches!(e, AgentError::Remote(_)), "{e:?}");
    // Back to the guest's own root.
    c.set_root(None);
    c.copy_out(&image.outside.join("secret"), &back).unwrap();
    assert_eq!(fs::read(&back).unwrap(), b"secret\n");
    // No hidden part files left anywhere.
    for dir in [image.root.join("data/x"), image.root.clone()] {
        let names = part_files(&dir);
        assert!(!names.iter().any(|n| n.contains("flint-part")), "{names:?}");
    }
}

#[test]
fn symlinks_planted_in_a_root_do_not_lead_the_copies_out_of_it() {
    let image = ImageRoot::new("root-planted");
    let agent = TestAgent::new();
    let mut c = agent.client();
    let outside = image.outside.to_str().unwrap();
    // What a hostile command leaves behind before the copy-out.
    let plant = format!(
        "ln -s {outside}/secret /abs && ln -s ../../../../../../../..{outside}/secret /rel \
         && ln -s {outside} /dirlink && ln -s /proc/self/root /magic && mkfifo /fifo"
    );
    let (status, _, err) = run(&mut c, &image.sh(&plant), None).unwrap();
    assert!(status.success(), "{}", text(err));
    c.set_root(Some(image.root()));
    let back = image.dir.join("back");
    for path in ["/abs", "/rel", "/dirlink/secret", "/magic/etc/marker"] {
        let e = c.copy_out(Path::new(path), &back).unwrap_err();
        assert!(matches!(e, AgentError::Remote(_)), "{path}: {e:?}");
        assert!(!back.exists(), "{path}: a file was copied out");
    }
    // A FIFO is refused at once, not waited on.
    let started = Instant::now();
    let e = c.copy_out(Path::new("/fifo"), &back).unwrap_err();
    assert!(
        matches!(&e, AgentError::Remote(m) if m.contains("not a regular file")),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Copy-ins through the planted links never land outside: while the link dangles inside
    // the root (as it does there) the copy fails, once its target exists there it lands in
    // it...
    let src = image.dir.join("src");
    fs::write(&src, b"planted\n").unwrap();
    let e = c.copy_in(&src, Path::new("/dirlink/planted")).unwrap_err();
    assert!(matches!(e, AgentError::Remote(_)), "{e:?}");
    assert!(!image.outside.join("planted").exists(), "escaped the root");
    let inside = image.root.join(image.outside.strip_prefix("/").unwrap());
    fs::create_dir_all(&inside).unwrap();
    c.copy_in(&src, Path::new("/dirlink/planted")).unwrap();
    assert!(!image.outside.join("planted").exists(), "escaped the root");
    assert_eq!(fs::read(inside.join("planted")).unwrap(), b"planted\n");
    // ...and one onto a link replaces the link, not what it points to.
    c.copy_in(&src, Path::new("/abs")).unwrap();
    assert_eq!(fs::read(image.outside.join("secret")).unwrap(), b"secret\n");
    let meta = fs::symlink_metadata(image.root.join("abs")).unwrap();
    assert!(meta.is_file());
    assert_eq!(fs::read(image.root.join("abs")).unwrap(), b"planted\n");
}

/// A pod's containers (run on the test machine, as root): a container's init is pid 1 of a
/// new PID namespace whose `/proc` it sees, in its own root; another process of the
/// container joins those namespaces and sees the init; the statuses are the processes'.
/// A test agent whose containers directory (a new one, `tag`) holds container `id` with the
/// test machine's own files as its root: `/` bind-mounted there (not recursive, so its
/// `/proc` is an empty directory). The caller unmounts the returned mount point
/// ([`unmount_container_root`]) and removes the directory. Needs root.
fn agent_with_host_root_container(tag: &str, id: &str) -> (TestAgent, PathBuf, std::ffi::CString) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test mounts: run it as root");
    let dir = temp_dir(tag);
    let root = container::root_of(&dir, id);
    fs::create_dir_all(&root).unwrap();
    let bind = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"/".as_ptr(),
            bind.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    let mut agent = TestAgent::new();
    agent.containers = Arc::new(Containers {
        dir: dir.clone(),
        inits: container::Inits::default(),
        cgroups: cgroup::Cgroups::new(None),
    });
    (agent, dir, bind)
}

/// Undo [`agent_with_host_root_container`]'s bind mount.
fn unmount_container_root(bind: &std::ffi::CStr) {
    // SAFETY: a NUL-terminated path.
    unsafe { libc::umount2(bind.as_ptr(), libc::MNT_DETACH) };
}

#[test]
fn container_processes_run_in_the_containers_pid_namespace_and_root() {
    let (agent, dir, bind) = agent_with_host_root_container("containers", "c1");

    // Joining a container without an init: one sentence.
    let mut joiner = agent.client();
    let e = run(&mut joiner, &sh("true").container("c1", false), None).unwrap_err();
    assert!(
        e.to_string()
            .contains("the container c1 has no running init process"),
        "{e}"
    );

    // The init: pid 1, its /proc that of its namespace.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut init_client = agent.client();
    let init = std::thread::spawn(move || {
        let mut out = Vec::new();
        let spec = sh("echo $$; echo /proc/[0-9]*; exec sleep 30").container("c1", true);
        let status = init_client
            .run_and_tell(
                &spec,
                None::<Cursor<Vec<u8>>>,
                &mut out,
                io::sink(),
                &mut |pid| {
                    let _ = tx.send(pid);
                },
            )
            .unwrap();
        (status, out)
    });
    let init_pid = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // Time for the init to print and become `sleep`.
    std::thread::sleep(Duration::from_millis(500));

    // A second init while the first runs: refused.
    let mut other = agent.client();
    let e = run(&mut other, &sh("true").container("c1", true), None).unwrap_err();
    assert!(e.to_string().contains("has a running init already"), "{e}");

    // A process joining: pid 2 or more, sees the init as pid 1, and its status is its own.
    let (status, out, _) = run(
        &mut joiner,
        &sh("echo $$; cat /proc/1/comm; exit 7").container("c1", false),
        None,
    )
    .unwrap();
    assert_eq!(status, CommandStatus::Exited(7));
    let out = String::from_utf8(out).unwrap();
    let mut lines = out.lines();
    let pid: u32 = lines.next().unwrap().parse().unwrap();
    assert!(pid >= 2, "{out}");
    assert_eq!(lines.next(), Some("sleep"), "{out}");

    // SIGKILL to the init's process group: the init is killed, as the agent reports it.
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(-(init_pid as i32), libc::SIGKILL) };
    let (status, out) = init.join().unwrap();
    assert_eq!(status, CommandStatus::Killed(libc::SIGKILL));
    let out = String::from_utf8(out).unwrap();
    assert_eq!(
        out, "1\n/proc/1\n",
        "the init is pid 1 and alone in its /proc"
    );
    let mut after = agent.client();
    let e = run(&mut after, &sh("true").container("c1", false), None).unwrap_err();
    assert!(e.to_string().contains("has no running init process"), "{e}");

    unmount_container_root(&bind);
    fs::remove_dir_all(&dir).unwrap();
}

mod terminal;

// --- Containers' cgroups ----------------------------------------------------------------

/// A cgroup v2 directory of the test's own under the test machine's cgroup v2 mount,
/// removed when dropped (with the containers' cgroups left in it).
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(tag: &str) -> TestCgroup {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "making cgroups needs root");
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        // `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS... - TYPE SOURCE ...`
        let mount = mountinfo
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                (right.split_whitespace().next()? == "cgroup2")
                    .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
            })
            .expect("these tests need a cgroup v2 mount on the test machine");
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = mount.join(format!(
            "flint-agent-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir).unwrap();
        TestCgroup(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let _ = fs::remove_dir(entry.path());
                }
            }
        }
        let _ = fs::remove_dir(&self.0);
    }
}

/// A container's cgroup (run on the test machine, as root, in a cgroup of the test's own):
/// the image's commands join it before they run, others do not; its stats are its own; a
/// limit the kernel's controllers cannot apply is one sentence; unmounting removes it. (The
/// test machine's cgroup v2 may lack the memory and pids controllers: what they add, and
/// OOM kills, are tested in a guest by tests/containerd.rs.)
#[test]
fn the_image_containers_commands_join_its_cgroup_and_its_stats_are_its_own() {
    let cgroup = TestCgroup::new("cgroups");
    cgroup::enable_controllers(&cgroup.0);
    let image = ImageRoot::new("cgroup-image");
    std::os::unix::fs::symlink("busybox", image.root.join("bin/sleep")).unwrap();
    let mut agent = TestAgent::new();
    let mut cgroups = cgroup::Cgroups::new(Some(cgroup.0.clone()));
    cgroups.image_dir = image.root().to_string();
    agent.containers = Arc::new(Containers {
        dir: PathBuf::from("/nonexistent/containers"),
        inits: container::Inits::default(),
        cgroups,
    });
    let mut c = agent.client();
    let dir = cgroup.0.join("container-img");

    // No cgroup yet: no numbers.
    let e = c
        .container_stats("img", Duration::from_secs(5))
        .unwrap_err();
    assert_eq!(e.to_string(), "the container img has no cgroup");
    c.container_cgroup("img", true, None, None).unwrap();
    assert!(dir.is_dir());

    // The image's command is in the cgroup from its start (the agent's output thread and
    // the test's are not) and uses CPU time there.
    let procs = dir.join("cgroup.procs");
    let mut seen = None;
    let mut out = Vec::new();
    let script = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 0.2; echo $i";
    let status = c
        .run_and_tell(
            &image.sh(script),
            None::<Cursor<Vec<u8>>>,
            &mut out,
            io::sink(),
            &mut |pid| seen = Some((pid, fs::read_to_string(&procs).unwrap())),
        )
        .unwrap();
    assert_eq!(
        (status, text(out).trim()),
        (CommandStatus::Exited(0), "20000")
    );
    let (pid, members) = seen.unwrap();
    assert_eq!(members.trim(), pid.to_string(), "only the command is in it");
    let stats = c.container_stats("img", Duration::from_secs(5)).unwrap();
    assert!(stats.cpu_usage_usec >= 1000, "{stats:?}");
    assert!(
        stats.cpu_user_usec + stats.cpu_system_usec <= stats.cpu_usage_usec,
        "{stats:?}"
    );
    assert_eq!(stats.memory.is_some(), dir.join("memory.current").exists());
    assert_eq!(stats.pids.is_some(), dir.join("pids.current").exists());
    if let Some(pids) = &stats.pids {
        assert_eq!((pids.current, pids.max), (0, None), "the command has ended");
    }
    assert_eq!(
        fs::read_to_string(&procs).unwrap(),
        "",
        "nothing left in it"
    );

    // A command outside the image's root stays out of it.
    let (status, out, _) = run(&mut c, &sh("cat /proc/self/cgroup"), None).unwrap();
    assert_eq!(status, CommandStatus::Exited(0));
    assert!(!text(out).contains("container-img"));
    let again = c.container_stats("img", Duration::from_secs(5)).unwrap();
    assert!(
        again.cpu_usage_usec - stats.cpu_usage_usec < 1000,
        "{again:?}"
    );

    // Limits: applied where the controller is there, one sentence where it is not.
    let limited = c.container_cgroup("lim", false, Some(64 << 20), None);
    match fs::read_to_string(cgroup.0.join("cgroup.subtree_control")) {
        Ok(s) if s.split_whitespace().any(|c| c == "memory") => {
            limited.unwrap();
            let max = fs::read_to_string(cgroup.0.join("container-lim/memory.max")).unwrap();
            assert_eq!(max.trim(), "67108864");
        }
        _ => assert_eq!(
            limited.unwrap_err().to_string(),
            "the guest kernel has no memory cgroup controller (CONFIG_MEMCG), so the \
             container lim's memory limit cannot be applied"
        ),
    }

    // Unmounting the container (not mounted here: an error) removes its cgroup.
    assert!(c.unmount_container("img").is_err());
    assert!(!dir.exists());
    assert_eq!(
        c.container_stats("img", Duration::from_secs(5))
            .unwrap_err()
            .to_string(),
        "the container img has no cgroup"
    );
    // And the image's commands no longer join anything.
    let (status, _, _) = run(&mut c, &image.sh("true"), None).unwrap();
    assert_eq!(status, CommandStatus::Exited(0));
    assert!(!dir.exists());
}
