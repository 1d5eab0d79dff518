//! Tier 3: the sandbox guest agent (agent/) in a real guest. One VM boots the project's
//! guest kernel with the sandbox initramfs (resources/build-sandbox-image.sh) and a vsock
//! device; `agent-client` (a static host-side program around `flint_agent::AgentClient`,
//! built by the same script) drives the agent through flint's vsock socket. On PVM machines
//! this runs in the nested KVM host like the other tier-3 tests; one host boot, about a
//! minute in all there.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{cache_dir, repo_root, run_scenario, Case};

/// Build (or find up to date: the script is cached by a stamp) the sandbox image and the
/// client, and return their paths.
fn sandbox_artefacts() -> (PathBuf, PathBuf) {
    let script = repo_root().join("resources/build-sandbox-image.sh");
    let mut cmd = Command::new(&script);
    // The script runs its own cargo: keep this test run's cargo settings out of it.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME") || key.starts_with("RUSTC_") {
            cmd.env_remove(key);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(status.success(), "{} failed: {status}", script.display());
    let dir = cache_dir().join("sandbox");
    let (image, client) = (dir.join("initramfs.cpio.gz"), dir.join("agent-client"));
    assert!(
        image.is_file() && client.is_file(),
        "sandbox artefacts missing in {}",
        dir.display()
    );
    (image, client)
}

const SCENARIO: &str = r#"
CASE_TIMEOUT=150
C="$FILES/agent-client"
S="$WORK/v.sock"

"$FLINT" boot --kernel "$VMLINUX" --initrd "$FILES/sandbox.cpio.gz" --memory 256 \
    --vsock cid=3,uds="$S" </dev/null >"$WORK/vm.out" 2>"$WORK/vm.err" &
VM=$!

# The first client waits for the guest to boot and the agent to listen.
flint_case first "$C" "$S" --timeout 120 -- echo hello from the sandbox
if ! grep -q 'hello from the sandbox' "$WORK/first.out"; then
    echo "AGENT-UNREACHABLE"
    kill "$VM"
    wait "$VM"
    _flint_case_report vm $?
    exit 1
fi
A="--timeout 30"

flint_case exit0 "$C" "$S" $A -- true
flint_case exit1 "$C" "$S" $A -- false
flint_case exit42 "$C" "$S" $A -- sh -c 'exit 42'
flint_case kill9 "$C" "$S" $A -- sh -c 'kill -9 $$'
flint_case streams "$C" "$S" $A -- sh -c 'echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 3'
flint_case notfound "$C" "$S" $A -- /no/such/command
flint_case badworkdir "$C" "$S" $A --workdir /no/such/dir -- true
flint_case envwd "$C" "$S" $A --env FOO=bar --env 'SPACED=a b' --workdir /tmp -- \
    sh -c 'echo "$FOO|$SPACED|$HOME|$PATH"; pwd'

# 100 MiB of stdout, counted on the host (never stored).
cat >"$WORK/big.sh" <<'EOF'
set -o pipefail
start=$(date +%s)
"$1" "$2" --timeout 30 -- head -c 104857600 /dev/zero | wc -c
echo "status=$? seconds=$(($(date +%s) - start))"
EOF
flint_case big sh "$WORK/big.sh" "$C" "$S"

# 20 MiB of stderr while stdout carries a line.
cat >"$WORK/flood.sh" <<'EOF'
"$1" "$2" --timeout 30 -- sh -c 'head -c 20971520 /dev/zero >&2; echo done' 2>"$WORK/flood.stderr"
echo "status=$? stderr_bytes=$(wc -c <"$WORK/flood.stderr")"
EOF
flint_case flood sh "$WORK/flood.sh" "$C" "$S"

# stdin: 1 MiB of random bytes; the guest's md5sum must match the host's.
head -c 1048576 /dev/urandom >"$WORK/in.bin"
cat >"$WORK/stdin.sh" <<'EOF'
echo "guest $("$1" "$2" --timeout 30 -- md5sum <"$WORK/in.bin")"
echo "host $(md5sum <"$WORK/in.bin")"
EOF
flint_case stdin sh "$WORK/stdin.sh" "$C" "$S"

# copy-in, then copy-out: same bytes and mode.
head -c 3000000 /dev/urandom >"$WORK/blob"
chmod 751 "$WORK/blob"
flint_case copy "$C" "$S" $A --copy-in "$WORK/blob:/data/sub/blob" \
    --copy-out "/data/sub/blob:$WORK/back/blob" -- \
    sh -c 'md5sum </data/sub/blob; stat -c %a /data/sub/blob'
cat >"$WORK/copycheck.sh" <<'EOF'
echo "host $(md5sum <"$WORK/blob") $(stat -c %a "$WORK/blob")"
echo "back $(md5sum <"$WORK/back/blob") $(stat -c %a "$WORK/back/blob")"
EOF
flint_case copycheck sh "$WORK/copycheck.sh"
flint_case copymissing "$C" "$S" $A --copy-out "/no/such/file:$WORK/nothing"

# Ctrl-C: SIGINT to the client reaches the command.
cat >"$WORK/sigint.sh" <<'EOF'
"$1" "$2" --timeout 30 -- sleep 60 &
p=$!
sleep 3
kill -INT $p
wait $p
echo "status=$?"
EOF
flint_case sigint sh "$WORK/sigint.sh" "$C" "$S"

# A client that dies takes its command (process group) with it.
cat >"$WORK/drop.sh" <<'EOF'
"$1" "$2" --timeout 30 -- sh -c 'echo $$ >/tmp/victim; sleep 300' &
p=$!
sleep 3
kill -9 $p
wait $p
sleep 2
"$1" "$2" --timeout 30 -- sh -c 'if kill -0 $(cat /tmp/victim) 2>/dev/null; then echo ALIVE; else echo GONE; fi'
EOF
flint_case drop sh "$WORK/drop.sh" "$C" "$S"

# Two connections at once; then no zombies are left after a command that orphans a child.
cat >"$WORK/concurrent.sh" <<'EOF'
"$1" "$2" --timeout 30 -- sh -c 'sleep 2; echo A' >"$WORK/conc.a" &
p=$!
"$1" "$2" --timeout 30 -- sh -c 'echo B'
wait $p
cat "$WORK/conc.a"
"$1" "$2" --timeout 30 -- sh -c 'sleep 1 & echo orphaned'
sleep 3
"$1" "$2" --timeout 30 -- sh -c 'echo ZOMBIES=$(cat /proc/[0-9]*/stat | awk "\$3 == \"Z\"" | wc -l)'
EOF
flint_case concurrent sh "$WORK/concurrent.sh" "$C" "$S"

# Shutdown: the agent reboots the guest and flint exits 0.
flint_case shutdown "$C" "$S" $A --shutdown
i=0
while kill -0 "$VM" 2>/dev/null && [ $i -lt 60 ]; do
    sleep 1
    i=$((i + 1))
done
kill "$VM" 2>/dev/null
wait "$VM"
_flint_case_report vm $?
"#;

#[test]
fn agent_runs_commands_in_a_sandbox_guest() {
    let (image, client) = sandbox_artefacts();
    let run = run_scenario(
        SCENARIO,
        &[(image, "sandbox.cpio.gz"), (client, "agent-client")],
    );
    assert!(
        !run.output.contains("AGENT-UNREACHABLE"),
        "the agent never answered; the VM's console is in case `vm` above"
    );
    assert_eq!(
        run.status, 0,
        "scenario failed (98: timeout, 99: host VM failure)"
    );

    let case = |name: &str| run.case(name);
    let expect = |c: &Case, status: i32, stdout: &str| {
        assert_eq!(c.status, status, "{}", c.show());
        assert_eq!(c.stdout, stdout, "{}", c.show());
    };

    expect(&case("first"), 0, "hello from the sandbox\n");
    expect(&case("exit0"), 0, "");
    expect(&case("exit1"), 1, "");
    expect(&case("exit42"), 42, "");
    expect(&case("kill9"), 128 + 9, "");

    let streams = case("streams");
    expect(&streams, 3, "out1\nout2\n");
    assert_eq!(streams.stderr, "err1\nerr2\n", "{}", streams.show());

    for name in ["notfound", "badworkdir"] {
        let c = case(name);
        assert_eq!(c.status, 127, "{}", c.show());
        assert!(c.stdout.is_empty(), "{}", c.show());
        let lines = c.stderr_lines();
        assert_eq!(lines.len(), 1, "{}", c.show());
        assert!(
            lines[0].starts_with("agent-client: error: "),
            "{}",
            c.show()
        );
    }
    assert!(case("notfound").stderr.contains("/no/such/command"));
    assert!(case("badworkdir").stderr.contains("working directory"));

    expect(
        &case("envwd"),
        0,
        "bar|a b|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/tmp\n",
    );

    let big = case("big");
    let mut lines = big.stdout.lines();
    assert_eq!(
        lines.next().map(str::trim),
        Some("104857600"),
        "{}",
        big.show()
    );
    assert!(
        lines.next().is_some_and(|l| l.starts_with("status=0 ")),
        "{}",
        big.show()
    );

    expect(&case("flood"), 0, "done\nstatus=0 stderr_bytes=20971520\n");

    let stdin = case("stdin");
    let sums: Vec<&str> = stdin
        .stdout
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(sums.len(), 2, "{}", stdin.show());
    assert!(
        sums[0].len() == 32 && sums[0] == sums[1],
        "{}",
        stdin.show()
    );

    let copy = case("copy");
    let copycheck = case("copycheck");
    assert_eq!(copy.status, 0, "{}", copy.show());
    let host_line = copycheck.stdout.lines().next().unwrap_or("");
    let host: Vec<&str> = host_line.split_whitespace().collect();
    assert_eq!(host.len(), 4, "{}", copycheck.show()); // host <md5> - 751
    assert_eq!(
        copy.stdout,
        format!("{}  -\n751\n", host[1]),
        "copy-in changed the bytes or the mode\n{}",
        copy.show()
    );
    // The bytes come back unchanged; the mode is the host's choice, not the guest's: 0755 for
    // a file its owner may execute (the guest's 0751 gives others no write bit either way).
    assert_eq!(
        copycheck.stdout,
        format!(
            "{host_line}\n{}\n",
            host_line
                .replacen("host", "back", 1)
                .replace(" 751", " 755")
        ),
        "copy-out changed the bytes or did not choose the host's mode\n{}",
        copycheck.show()
    );
    let missing = case("copymissing");
    assert_eq!(missing.status, 125, "{}", missing.show());
    assert!(
        missing.stderr.contains("/no/such/file"),
        "{}",
        missing.show()
    );

    expect(&case("sigint"), 0, "status=130\n");
    expect(&case("drop"), 0, "GONE\n");
    expect(&case("concurrent"), 0, "B\nA\norphaned\nZOMBIES=0\n");

    expect(&case("shutdown"), 0, "");
    let vm = case("vm");
    assert_eq!(
        vm.status,
        0,
        "flint should exit 0 after the agent's reboot\n{}",
        vm.show()
    );
    assert!(
        vm.stderr.contains("guest boot time"),
        "the sandbox /init did not write the boot timer\n{}",
        vm.show()
    );
    for bad in ["Kernel panic", "BUG:", "Oops:", "restarting it", "panicked"] {
        assert!(
            !vm.stdout.contains(bad),
            "guest reported {bad:?}\n{}",
            vm.show()
        );
    }
}
