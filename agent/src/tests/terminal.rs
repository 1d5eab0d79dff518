//! Commands on terminals (run on the test machine, as the other agent tests are): they see
//! a terminal on stdin, stdout and stderr, of the asked window size; a resize reaches them
//! (SIGWINCH); typed input arrives and its end is seen; the same in a pod's container.

use super::*;
use std::sync::mpsc;

/// Output of a command on a terminal, as text (the terminal's `\r\n` line ends made `\n`).
fn lines(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace("\r\n", "\n")
}

/// A writer that hands each chunk to a channel.
struct Chunks(mpsc::Sender<Vec<u8>>);

impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.0.send(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Collect chunks from `rx` until the text holds `want` (panics after 10 s).
fn wait_for_text(rx: &mpsc::Receiver<Vec<u8>>, seen: &mut Vec<u8>, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lines(seen).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.extend(chunk),
            Err(_) => panic!("no {want:?} in the output: {:?}", lines(seen)),
        }
    }
}

/// Run `spec` on a thread; resize its terminal to `rows` x `cols` once its output says
/// `ready`; return its status and output.
fn run_and_resize(
    agent: &TestAgent,
    spec: ExecSpec,
    ready: &str,
    rows: u16,
    cols: u16,
) -> (CommandStatus, String) {
    let mut c = agent.client();
    let signaller = c.signaller();
    let (tx, rx) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        c.run(&spec, None::<Cursor<Vec<u8>>>, Chunks(tx), io::sink())
            .unwrap()
    });
    let mut seen = Vec::new();
    wait_for_text(&rx, &mut seen, ready);
    assert!(signaller.resize(rows, cols).unwrap(), "the command runs");
    let status = runner.join().unwrap();
    seen.extend(rx.try_iter().flatten());
    (status, lines(&seen))
}

#[test]
fn a_command_on_a_terminal_sees_one_of_the_asked_size_with_stderr_merged() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let spec =
        sh("test -t 0 && test -t 1 && test -t 2 && echo tty; stty size; echo oops >&2; exit 3")
            .terminal(33, 101);
    let (status, out, err) = run(&mut c, &spec, None).unwrap();
    assert_eq!(status, CommandStatus::Exited(3));
    assert_eq!(out, b"tty\r\n33 101\r\noops\r\n", "{:?}", lines(&out));
    assert!(err.is_empty(), "stderr is the terminal: {err:?}");
    // Its own session, led by itself, with the terminal as its controlling terminal.
    let (_, out, _) = run(
        &mut c,
        &sh("ps -o sid=,pid=,tty= -p $$").terminal(24, 80),
        None,
    )
    .unwrap();
    let out = lines(&out);
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{out}");
    assert_eq!(fields[0], fields[1], "the session leader: {out}");
    assert!(fields[2].starts_with("pts/"), "{out}");
    // Without a terminal, the same command sees none (the connection is still good).
    let (_, out, _) = run(&mut c, &sh("test -t 0 || echo none"), None).unwrap();
    assert_eq!(out, b"none\n");
    // A size of 0 x 0 is a terminal of unknown size, as a new one has.
    let (_, out, _) = run(&mut c, &sh("stty size").terminal(0, 0), None).unwrap();
    assert_eq!(lines(&out), "0 0\n");
}

#[test]
fn a_resize_reaches_the_command_with_sigwinch() {
    let agent = TestAgent::new();
    let script = "trap 'echo \"winch $(stty size)\"; exit 0' WINCH; echo \"ready $(stty size)\"; \
                  i=0; while [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; exit 9";
    let (status, out) = run_and_resize(&agent, sh(script).terminal(24, 80), "ready", 50, 200);
    assert_eq!(status, CommandStatus::Exited(0), "{out}");
    assert!(out.contains("ready 24 80\n"), "{out}");
    assert!(out.contains("winch 50 200\n"), "{out}");
    // A resize of a command without a terminal, or of none, changes nothing.
    let mut c = agent.client();
    let signaller = c.signaller();
    assert!(!signaller.resize(10, 10).unwrap(), "nothing runs");
    let (status, _, _) = run(&mut c, &sh("exit 0"), None).unwrap();
    assert!(status.success());
}

#[test]
fn typed_input_arrives_and_its_end_is_seen() {
    let agent = TestAgent::new();
    let mut c = agent.client();
    let dir = temp_dir("tty-input");
    let file = dir.join("typed");
    // The last line does not end: the end of input first ends it, then is seen.
    let spec = sh(&format!("cat >{}; echo \"done $?\"", file.display())).terminal(24, 80);
    let (status, out, _) = run(&mut c, &spec, Some(b"one\ntwo".to_vec())).unwrap();
    assert_eq!(status, CommandStatus::Exited(0), "{:?}", lines(&out));
    assert_eq!(fs::read(&file).unwrap(), b"one\ntwo");
    let out = lines(&out);
    // The terminal echoes what is typed, as a terminal does.
    assert!(
        out.contains("one\n") && out.ends_with("done 0\n"),
        "{out:?}"
    );
    // Input that ends a line, and no input at all: one end of input, seen at once.
    let spec = sh("cat; echo \"done $?\"").terminal(24, 80);
    let (status, out, _) = run(&mut c, &spec, Some(b"three\n".to_vec())).unwrap();
    assert!(status.success());
    let out = lines(&out);
    assert!(
        out.contains("three\n") && out.ends_with("done 0\n"),
        "{out:?}"
    );
    let (status, out, _) = run(&mut c, &sh("cat; echo done").terminal(24, 80), None).unwrap();
    assert!(status.success());
    assert_eq!(lines(&out), "done\n");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_command_in_another_root_gets_a_terminal_as_its_user() {
    let image = ImageRoot::new("root-tty");
    let agent = TestAgent::new();
    let mut c = agent.client();
    let spec = image
        .sh("test -t 0 && echo tty; id -u; cat /etc/marker")
        .user(1234, 2345, [])
        .terminal(24, 80);
    let (status, out, err) = run(&mut c, &spec, None).unwrap();
    assert!(status.success(), "{}", lines(&err));
    assert_eq!(lines(&out), "tty\n1234\ninside\n");
}

/// A pod's container (the test machine's own files as its root, as in the other container
/// test): its init and a process joining it run on terminals, and a resize reaches the
/// joining process through the intermediate process that waits for it.
#[test]
fn a_containers_processes_get_terminals() {
    let (agent, dir, bind) = agent_with_host_root_container("containers-tty", "t1");

    let (tx, rx) = mpsc::channel();
    let mut init_client = agent.client();
    let init_signaller = init_client.signaller();
    let init = std::thread::spawn(move || {
        let spec = sh("test -t 0 && echo tty; echo \"pid $$\"; stty size; exec sleep 30")
            .container("t1", true)
            .terminal(12, 34);
        init_client
            .run(&spec, None::<Cursor<Vec<u8>>>, Chunks(tx), io::sink())
            .unwrap()
    });
    let mut seen = Vec::new();
    wait_for_text(&rx, &mut seen, "12 34\n");
    assert!(
        lines(&seen).starts_with("tty\npid 1\n"),
        "{:?}",
        lines(&seen)
    );

    let script =
        "trap 'echo \"winch $(stty size)\"; exit 0' WINCH; test -t 1 && echo \"ready $$\"; \
                  i=0; while [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; exit 9";
    let spec = sh(script).container("t1", false).terminal(24, 80);
    let (status, out) = run_and_resize(&agent, spec, "ready", 40, 120);
    assert_eq!(status, CommandStatus::Exited(0), "{out}");
    let pid: u32 = line_after(&out, "ready ").parse().unwrap();
    assert!(pid >= 2, "in the container's PID namespace: {out}");
    assert!(out.contains("winch 40 120\n"), "{out}");

    // Signals reach the init through its session's process group.
    assert!(init_signaller.signal(libc::SIGKILL).unwrap());
    assert_eq!(init.join().unwrap(), CommandStatus::Killed(libc::SIGKILL));
    unmount_container_root(&bind);
    fs::remove_dir_all(&dir).unwrap();
}

fn line_after<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {text:?}"))
}
