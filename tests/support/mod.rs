//! Harness for flint's tier-3 tests: real Linux guests booted by the real `flint` binary.
//!
//! Integration tests use it with `mod support;`.
//!
//! # Where guests run
//!
//! The development and CI machines have a `/dev/kvm` (PVM) that cannot boot Linux, so by
//! default a test *scenario* (a shell script) runs inside the nested KVM host VM of
//! `resources/nested-host/run.sh` (QEMU TCG with kvm_amd inside). On a machine whose own KVM
//! boots Linux, the same script runs directly with `sh`. `FLINT_TEST_RIG=nested` or
//! `FLINT_TEST_RIG=direct` overrides the choice.
//!
//! # What a scenario script sees (the same both ways)
//!
//! | variable     | nested host            | direct                       |
//! |--------------|------------------------|------------------------------|
//! | `$FLINT`     | `/flint`               | `CARGO_BIN_EXE_flint`        |
//! | `$VMLINUX`   | `/guest/vmlinux`       | `$FLINT_CACHE/guest/vmlinux` |
//! | `$BZIMAGE`   | `/guest/bzImage`       | `$FLINT_CACHE/guest/bzImage` |
//! | `$INITRAMFS` | `/guest/initramfs.cpio.gz` | `$FLINT_CACHE/guest/initramfs.cpio.gz` |
//! | `$FILES`     | `/files` (the `extra_files`, by name) | temp dir of symlinks |
//! | `$WORK`      | `/tmp/work` (tmpfs)    | fresh temp dir, removed after |
//!
//! Always call programs through these variables (full paths): in the nested host the script
//! runs under busybox `sh`, which prefers its own applets to anything on `PATH`. Write
//! POSIX/busybox shell. The preamble also defines:
//!
//! - `flint_case NAME CMD...` runs `CMD` (stdin `/dev/null`, killed after `$CASE_TIMEOUT`
//!   seconds, default 120) and prints its stdout and stderr framed as
//!   `=== CASE NAME` / `--- stdout` / `--- stderr` / `=== END NAME status=N`, which
//!   [`ScenarioRun::case`] parses back. `flint_case_stdin` is the same but keeps the caller's
//!   stdin (pipe into it). While it runs, the output files are `$WORK/NAME.out` and
//!   `$WORK/NAME.err`.
//! - `bg_case NAME CMD...` is `flint_case` in the background (PID in `$BG_PID`);
//!   `end_case NAME PID` waits for it and prints its section.
//! - `wait_for FILE TEXT SECONDS` waits until TEXT (a `grep` pattern) is in FILE; it returns 1
//!   after SECONDS.
//!
//! A case that runs into `$CASE_TIMEOUT` and a `wait_for` that gives up print markers that
//! [`rig_failure`] reads: such a scenario is run again (see there).
//!
//! Guest side: [`exec_cmdline`] builds a kernel command line whose `flint.exec=<base64>` the
//! guest initramfs (`resources/build-guest-initramfs.sh`) decodes and runs after printing
//! `FLINT-GUEST-READY`; it then prints `FLINT-GUEST-EXIT <status>` and reboots, which ends
//! flint with status 0.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

pub use guest_tools::elf;
pub mod api_shell;
pub mod tiny;

/// The command line flint uses when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// x86 `COMMAND_LINE_SIZE` of the guest kernel, including the terminating NUL.
pub const GUEST_CMDLINE_MAX: usize = 2048;

/// Root of the flint workspace (the `flint` package lives at the top).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `$FLINT_CACHE`, default (unset or empty) `$HOME/.cache/flint`: where the resources/ scripts
/// put images ([`flint::cache_dir`]).
pub fn cache_dir() -> PathBuf {
    flint::cache_dir()
}

/// The guest kernel (both formats) and initramfs built by the resources/ scripts.
#[derive(Debug, Clone)]
pub struct GuestImages {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
}

/// Locate the guest images. Panics (the test fails; it never skips) when they are missing.
pub fn guest_images() -> GuestImages {
    let dir = cache_dir().join("guest");
    let images = GuestImages {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initramfs: dir.join("initramfs.cpio.gz"),
    };
    for path in [&images.vmlinux, &images.bzimage, &images.initramfs] {
        assert!(
            path.is_file(),
            "guest images missing: {} does not exist; run resources/build-guest-kernel.sh and \
             resources/build-guest-initramfs.sh (or resources/run-tests.sh, which does both)",
            path.display()
        );
    }
    images
}

/// The `flint` binary cargo built for this test run.
pub fn flint_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flint"))
}

/// Whether this machine's own `/dev/kvm` can boot a Linux guest: not when it is missing, nor
/// when it is PVM (`kvm_pvm`), whose instruction emulator cannot run a stock kernel.
pub fn local_kvm_boots_linux() -> bool {
    Path::new("/dev/kvm").exists() && !vmm::host_kvm_is_pvm()
}

/// Result of [`run_scenario`].
#[derive(Debug, Clone)]
pub struct ScenarioRun {
    /// The scenario script's exit status (run.sh: 98 = timeout, 99 = host VM failure).
    pub status: i32,
    /// Everything printed (console of the host VM, or stdout then stderr when direct),
    /// with `\r` removed.
    pub output: String,
}

/// One `flint_case` section of a scenario's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub name: String,
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Case {
    /// Non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// The whole case, for assertion messages.
    pub fn show(&self) -> String {
        format!(
            "case {} (status {}):\n--- stdout\n{}--- stderr\n{}",
            self.name, self.status, self.stdout, self.stderr
        )
    }

    /// The value of the first stdout line `KEY=value` (guest scripts print them); panics,
    /// showing the case, when there is none.
    pub fn value_of(&self, key: &str) -> &str {
        value_in(&self.stdout, key)
            .unwrap_or_else(|| panic!("no {key}= line in the guest output\n{}", self.show()))
    }

    /// No guest kernel oops, panic or warning on the console, and no error from flint.
    pub fn assert_no_errors(&self) {
        self.assert_no_errors_or(&[]);
    }

    /// [`Self::assert_no_errors`], and none of `also_bad` on the console either.
    pub fn assert_no_errors_or(&self, also_bad: &[&str]) {
        let usual = [
            "Kernel panic",
            "BUG:",
            "Oops:",
            "WARNING:",
            "Call Trace",
            "NETDEV WATCHDOG",
        ];
        for bad in usual.iter().chain(also_bad) {
            assert!(
                !self.stdout.contains(bad),
                "guest kernel reported {bad:?}\n{}",
                self.show()
            );
        }
        for line in self.stderr_lines() {
            assert!(
                !line.starts_with("flint: error:") && !line.contains("panicked"),
                "unexpected error output from flint\n{}",
                self.show()
            );
        }
    }
}

/// The value of the first line `KEY=value` in `text`, trimmed.
pub fn value_in<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
}

/// Result of one `flint` run on this machine (see [`flint_boot_local`]).
pub struct LocalRun {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl LocalRun {
    pub fn show(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Run `flint boot --kernel <guest kernel> ARGS` on this machine (stdin closed), killed
/// after 60 s. For configuration errors, which flint reports before any guest code runs.
pub fn flint_boot_local(args: &[&str]) -> LocalRun {
    let kernel = cache_dir().join("guest").join("vmlinux");
    let mut child = Command::new(flint_bin())
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flint");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait for flint").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect flint's output");
    LocalRun {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `flint boot --kernel ... ARGS` exits 1 with nothing on stdout and exactly one stderr line
/// `flint: error: ...` that contains every one of `needles`.
pub fn assert_one_error(args: &[&str], needles: &[&str]) {
    let run = flint_boot_local(args);
    let what = format!("flint boot --kernel ... {}", args.join(" "));
    assert_eq!(run.status, Some(1), "{what}: should exit 1\n{}", run.show());
    assert!(
        run.stdout.trim().is_empty(),
        "{what}: nothing should reach stdout\n{}",
        run.show()
    );
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected exactly one stderr line\n{}",
        run.show()
    );
    assert!(
        lines[0].starts_with("flint: error: ") && !lines[0].contains("panicked"),
        "{what}: stderr line is not `flint: error: <sentence>`\n{}",
        run.show()
    );
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{what}: the error should mention {needle:?}\n{}",
            run.show()
        );
    }
}

impl ScenarioRun {
    /// The scenario script exited 0 (see [`Self::status`]).
    pub fn assert_ok(&self) {
        assert_eq!(
            self.status, 0,
            "scenario failed (98: timeout, 99: host VM failure); output above"
        );
    }

    /// The value of the scenario's `HOST name=value` line (scenarios print host-side facts so).
    pub fn host_value(&self, name: &str) -> &str {
        let prefix = format!("HOST {name}=");
        self.output
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no `{prefix}` line in the scenario output (see above)"))
    }

    /// All `flint_case` sections, in order.
    pub fn cases(&self) -> Vec<Case> {
        parse_cases(&self.output)
    }

    /// The section of case `name`; panics (showing the output) if the scenario did not print it.
    pub fn case(&self, name: &str) -> Case {
        self.cases()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "case {name:?} missing from the scenario output (status {}):\n{}",
                    self.status, self.output
                )
            })
    }
}

/// Parse `=== CASE name` ... `=== END name status=N` sections (see the module docs).
pub fn parse_cases(output: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut current: Option<(String, String, String, u8)> = None; // name, out, err, part
    for line in output.lines() {
        // Markers are matched anywhere in the line: terminal escape sequences from the
        // firmware or a guest may precede them on the console.
        if let Some((_, name)) = line.split_once("=== CASE ") {
            current = Some((name.trim().to_string(), String::new(), String::new(), 0));
            continue;
        }
        let Some((name, out, err, part)) = current.as_mut() else {
            continue;
        };
        if let Some((_, rest)) = line.split_once("=== END ") {
            let mut words = rest.split_whitespace();
            if words.next() == Some(name.as_str()) {
                let status = words
                    .next()
                    .and_then(|w| w.strip_prefix("status="))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(-1);
                let (name, out, err, _) = current.take().unwrap();
                cases.push(Case {
                    name,
                    status,
                    stdout: out,
                    stderr: err,
                });
                continue;
            }
        }
        match (line, *part) {
            ("--- stdout", 0) => *part = 1,
            ("--- stderr", 1) => *part = 2,
            (_, 1) => {
                out.push_str(line);
                out.push('\n');
            }
            (_, 2) => {
                err.push_str(line);
                err.push('\n');
            }
            _ => {}
        }
    }
    cases
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Kernel command line that makes the guest run `guest_script` (with `sh`) after boot:
/// `console=ttyS0 reboot=k panic=1 pci=off flint.exec=<base64>`. Panics when the result does
/// not fit the guest's command line (about 1.4 KiB of script).
pub fn exec_cmdline(guest_script: &str) -> String {
    let cmdline = format!(
        "{DEFAULT_CMDLINE} flint.exec={}",
        base64_encode(guest_script.as_bytes())
    );
    assert!(
        cmdline.len() < GUEST_CMDLINE_MAX,
        "guest script too long for the kernel command line ({} of {} bytes)",
        cmdline.len(),
        GUEST_CMDLINE_MAX - 1
    );
    cmdline
}

/// Quote `s` for a POSIX shell (single quotes).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Shell functions every scenario gets after the variables (see the module docs).
const PREAMBLE_FUNCTIONS: &str = r#"
CASE_TIMEOUT=${CASE_TIMEOUT:-120}
_flint_case_report() {
    echo "=== CASE $1"
    echo "--- stdout"
    cat "$WORK/$1.out"
    echo "--- stderr"
    cat "$WORK/$1.err"
    echo "=== END $1 status=$2"
}
# A case that `timeout` had to stop (124 from GNU timeout, 143 when busybox passes on flint's
# SIGTERM status) is marked: its guest froze (see rig_failure).
_flint_case_timed() {
    case $2 in 124 | 143) echo "RIG-CASE-TIMEOUT $1" ;; esac
    _flint_case_report "$1" "$2"
}
flint_case() {
    _fc_name=$1
    shift
    timeout "$CASE_TIMEOUT" "$@" </dev/null >"$WORK/$_fc_name.out" 2>"$WORK/$_fc_name.err"
    _flint_case_timed "$_fc_name" $?
}
flint_case_stdin() {
    _fc_name=$1
    shift
    timeout "$CASE_TIMEOUT" "$@" >"$WORK/$_fc_name.out" 2>"$WORK/$_fc_name.err"
    _flint_case_timed "$_fc_name" $?
}
bg_case() {
    _bg_name=$1
    shift
    date +%s >"$WORK/$_bg_name.started"
    timeout "$CASE_TIMEOUT" "$@" </dev/null >"$WORK/$_bg_name.out" 2>"$WORK/$_bg_name.err" &
    BG_PID=$!
}
# Only a case that ran for its whole $CASE_TIMEOUT is marked: the scenario may stop a
# background case itself (with SIGTERM, 143) long before that.
end_case() {
    wait "$2"
    _ec_status=$?
    _ec_secs=$(($(date +%s) - $(cat "$WORK/$1.started")))
    if [ "$_ec_secs" -ge "$CASE_TIMEOUT" ]; then
        _flint_case_timed "$1" $_ec_status
    else
        _flint_case_report "$1" $_ec_status
    fi
}
wait_for() {
    _wf_end=$(($(date +%s) + $3))
    until grep -q "$2" "$1" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$_wf_end" ]; then
            echo "RIG-WAIT-TIMEOUT $1: no '$2' after $3 s" >&2
            return 1
        fi
        sleep 0.2 2>/dev/null || sleep 1
    done
}
"#;

/// Serializes scenarios: two nested host VMs at once would share 2 cores and time out.
static SCENARIO_LOCK: Mutex<()> = Mutex::new(());

/// Run `script` (see the module docs for what it sees) and return its status and output.
/// `extra_files` are `(host path, name)`: each is available as `$FILES/name`.
/// The output is also printed, so a failing test shows it.
pub fn run_scenario(script: &str, extra_files: &[(PathBuf, &str)]) -> ScenarioRun {
    run_scenario_with(script, extra_files, &ScenarioOptions::default())
}

/// Knobs of [`run_scenario_with`].
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    /// Memory of the nested host VM, MiB.
    pub host_mem_mib: u32,
    /// Whole-scenario time limit, seconds (nested: includes the host VM boot).
    pub timeout_secs: u32,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            host_mem_mib: 3072,
            timeout_secs: 600,
        }
    }
}

/// What flint reports when a guest triple-faults on AMD, whose KVM resets the vCPU before
/// saying so. See [`rig_failure`].
pub const RIG_TRIPLE_FAULT: &str =
    "the guest triple-faulted (shutdown exit; KVM reset the vCPU's registers";

/// What a scenario prints when a `flint_case` ran into its `$CASE_TIMEOUT`. See
/// [`rig_failure`].
pub const RIG_CASE_TIMEOUT: &str = "RIG-CASE-TIMEOUT ";

/// Shell function for sandbox scenarios: `rig_fault STATUS FILE` tells whether a `flint run`
/// failed because its guest died or froze in the nested host. It is true when the guest died
/// of a triple fault (status 125 and flint's message in FILE), when flint gave up on a guest
/// whose agent never answered (125, a guest frozen while booting), or when the guest froze so
/// that `timeout` stopped flint with SIGTERM (flint exits 143 then; a flint that ignored
/// SIGTERM gets SIGKILL from `timeout -k`: 137). It then prints the marker of
/// [`rig_failure`], so that the harness runs the scenario again; the Rust side requires every
/// sandbox of the last try to succeed.
pub const RIG_FAULT_SH: &str = r#"
rig_fault() {
    if [ "$1" = 125 ] && grep -q -e "triple-faulted (shutdown exit; KVM reset" \
        -e "the guest agent did not answer" "$2"; then
        echo "RIG-CASE-TIMEOUT sandbox: $(grep -e triple-faulted -e 'did not answer' "$2")"
    elif [ "$1" = 143 ]; then
        echo "RIG-CASE-TIMEOUT sandbox: stopped by timeout"
    else
        return 1
    fi
}
"#;

/// What a scenario prints when a `wait_for` gave up. See [`rig_failure`].
pub const RIG_WAIT_TIMEOUT: &str = "RIG-WAIT-TIMEOUT ";

/// How often a scenario runs at most when every try fails for reasons of the rig.
pub const RIG_TRIES: u32 = 3;

/// Why a nested-host run failed for reasons of the rig rather than of flint, if it did.
///
/// The nested host is QEMU's software emulation of an AMD CPU with SVM, running KVM. While
/// it emulated nested paging too, a guest died of a triple fault or stopped at a random point
/// a few times in a hundred boots (far more often with two guests at once); without it
/// (resources/nested-host/run.sh) that has become rare, but the host VM's own kernel still
/// crashes now and then (recursive page faults in exception entry, with QEMU as the nested
/// VMM as well) or freezes. A scenario that shows one of these runs again, up to [`RIG_TRIES`] times in all; a
/// fault of flint's that makes a guest freeze every time still fails the test. Every try is
/// listed in `$FLINT_TEST_RIG_LOG` when it is set (resources/run-tests.sh prints that list).
pub fn rig_failure(run: &ScenarioRun) -> Option<&'static str> {
    match run.status {
        98 => Some("the nested host VM timed out (it freezes now and then)"),
        99 => Some("the nested host VM crashed"),
        _ if run.output.contains(RIG_TRIPLE_FAULT) => {
            Some("a guest died of a triple fault in the emulated nested host")
        }
        // A case's `timeout` had to stop flint: its guest froze.
        _ if run.output.contains(RIG_CASE_TIMEOUT) => {
            Some("a guest froze in the emulated nested host (its case timed out)")
        }
        _ if run.output.contains(RIG_WAIT_TIMEOUT) => {
            Some("a guest froze in the emulated nested host (a wait_for gave up)")
        }
        _ => None,
    }
}

/// Append one line about a scenario try to `$FLINT_TEST_RIG_LOG`, if set: which test, which
/// try, its status and time, and whether it failed for reasons of the rig.
fn log_try(attempt: u32, run: &ScenarioRun, secs: u64, rig: Option<&str>) {
    let Some(path) = std::env::var_os("FLINT_TEST_RIG_LOG") else {
        return;
    };
    // cargo names test binaries NAME-HASH
    let exe = std::env::args().next().unwrap_or_default();
    let file = Path::new(&exe)
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    let binary = file.rsplit_once('-').map_or(&*file, |(name, _)| name);
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    let verdict = rig.map_or(String::from("ran"), |why| format!("rig fault: {why}"));
    let line = format!(
        "{binary}::{test} try {attempt}: status {}, {secs} s, {verdict}\n",
        run.status
    );
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// [`run_scenario`] with explicit options.
pub fn run_scenario_with(
    script: &str,
    extra_files: &[(PathBuf, &str)],
    options: &ScenarioOptions,
) -> ScenarioRun {
    let images = guest_images();
    let flint = flint_bin();
    assert!(flint.is_file(), "flint binary missing: {}", flint.display());
    for (path, name) in extra_files {
        assert!(path.exists(), "extra file missing: {}", path.display());
        assert!(
            !name.is_empty() && !name.contains('/') && !name.contains(':'),
            "bad extra file name {name:?}"
        );
    }
    let direct = match std::env::var("FLINT_TEST_RIG").as_deref() {
        Ok("direct") => true,
        Ok("nested") => false,
        _ => local_kvm_boots_linux(),
    };
    let _guard = SCENARIO_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut attempt = 1;
    let run = loop {
        let started = std::time::Instant::now();
        let run = if direct {
            run_direct(script, extra_files, &images, &flint)
        } else {
            run_nested(script, extra_files, &images, &flint, options)
        };
        let rig = rig_failure(&run).filter(|_| !direct);
        log_try(attempt, &run, started.elapsed().as_secs(), rig);
        match rig {
            Some(why) if attempt < RIG_TRIES => println!(
                "----- try {attempt} (nested host) exit status {} -----\n{}\n----- {why}: \
                 running the scenario again -----",
                run.status, run.output
            ),
            _ => break run,
        }
        attempt += 1;
    };
    println!(
        "----- scenario ({}) exit status {} -----\n{}\n----- end of scenario output -----",
        if direct { "direct" } else { "nested host" },
        run.status,
        run.output
    );
    run
}

fn preamble(vars: &[(&str, &Path)]) -> String {
    // The first `echo` ends whatever the firmware left on the console's current line.
    let mut s = String::from("# flint test scenario (generated by tests/support)\necho\n");
    for (name, path) in vars {
        let _ = writeln!(s, "{name}={}", sh_quote(&path.to_string_lossy()));
        let _ = writeln!(s, "export {name}");
    }
    s.push_str(PREAMBLE_FUNCTIONS);
    s
}

/// A temporary directory, `$TMPDIR/flint-test-TAG-PID-N` (default `/tmp`), removed on drop
/// (no extra crates for tempfile).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "flint-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Write `bytes` to the file `name` in the directory; returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn combined_output(out: &std::process::Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.stderr.is_empty() {
        s.push_str("\n----- stderr -----\n");
        s.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    s.replace('\r', "")
}

fn run_direct(
    script: &str,
    extra_files: &[(PathBuf, &str)],
    images: &GuestImages,
    flint: &Path,
) -> ScenarioRun {
    let tmp = TempDir::new("direct");
    let work = tmp.0.join("work");
    let files = tmp.0.join("files");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&files).unwrap();
    for (path, name) in extra_files {
        let abs = std::fs::canonicalize(path).unwrap();
        std::os::unix::fs::symlink(abs, files.join(name)).unwrap();
    }
    let mut text = preamble(&[
        ("FLINT", flint),
        ("VMLINUX", &images.vmlinux),
        ("BZIMAGE", &images.bzimage),
        ("INITRAMFS", &images.initramfs),
        ("FILES", &files),
        ("WORK", &work),
    ]);
    text.push_str(script);
    let path = tmp.0.join("scenario.sh");
    std::fs::write(&path, text).unwrap();
    let out = Command::new("sh")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    ScenarioRun {
        status: out.status.code().unwrap_or(-1),
        output: combined_output(&out),
    }
}

fn run_nested(
    script: &str,
    extra_files: &[(PathBuf, &str)],
    images: &GuestImages,
    flint: &Path,
    options: &ScenarioOptions,
) -> ScenarioRun {
    let tmp = TempDir::new("nested");
    let mut text = preamble(&[
        ("FLINT", Path::new("/flint")),
        ("VMLINUX", Path::new("/guest/vmlinux")),
        ("BZIMAGE", Path::new("/guest/bzImage")),
        ("INITRAMFS", Path::new("/guest/initramfs.cpio.gz")),
        ("FILES", Path::new("/files")),
        ("WORK", Path::new("/tmp/work")),
    ]);
    text.push_str("mkdir -p \"$WORK\" \"$FILES\"\n");
    text.push_str(script);
    let path = tmp.0.join("scenario.sh");
    std::fs::write(&path, text).unwrap();

    let run_sh = repo_root().join("resources/nested-host/run.sh");
    let mut cmd = Command::new(&run_sh);
    cmd.arg("--mem")
        .arg(options.host_mem_mib.to_string())
        .arg("--timeout")
        .arg(options.timeout_secs.to_string())
        .arg("--scenario")
        .arg(&path);
    let mut add = |host: &Path, guest: &str| {
        let mut a = host.as_os_str().to_owned();
        a.push(":");
        a.push(guest);
        cmd.arg("--add").arg(a);
    };
    add(flint, "/flint");
    add(&images.vmlinux, "/guest/vmlinux");
    add(&images.bzimage, "/guest/bzImage");
    add(&images.initramfs, "/guest/initramfs.cpio.gz");
    for (host, name) in extra_files {
        add(host, &format!("/files/{name}"));
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", run_sh.display()));
    ScenarioRun {
        status: out.status.code().unwrap_or(-1),
        output: combined_output(&out),
    }
}

/// One file for [`initramfs_with`]: its absolute path in the guest, contents and permission
/// bits (e.g. `0o755`).
#[derive(Debug, Clone)]
pub struct GuestFile {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// An uncompressed newc cpio archive (with trailer) of `files`, owned by root, preceded by
/// entries for their parent directories (mode 0755).
pub fn newc_archive(files: &[GuestFile]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
        use std::io::Write as _;
        let size = u32::try_from(data.len()).expect("a cpio newc file is below 4 GiB");
        // Owned by root (uid and gid 0), one link, inode and times 0.
        let mut writer = cpio::newc::Builder::new(name).mode(mode).write(out, size);
        writer.write_all(data).expect("writing to memory");
        writer.finish().expect("writing to memory");
    }
    let mut out = Vec::new();
    let mut dirs: Vec<&str> = Vec::new();
    for f in files {
        let path = f.path.trim_start_matches('/');
        assert!(
            f.path.starts_with('/')
                && !path.is_empty()
                && !path.split('/').any(|c| c.is_empty() || c == ".."),
            "bad guest path {:?}",
            f.path
        );
        for (i, _) in path.match_indices('/') {
            if !dirs.contains(&&path[..i]) {
                dirs.push(&path[..i]);
                entry(&mut out, &path[..i], 0o040_755, &[]);
            }
        }
        entry(&mut out, path, 0o100_000 | (f.mode & 0o7777), &f.data);
    }
    cpio::newc::trailer(&mut out).expect("writing to memory");
    out
}

/// Write `out`: the guest initramfs `base` followed by an archive of `files` (the kernel
/// unpacks concatenated archives, later files replacing earlier ones). `base` is padded with
/// zeros to a multiple of 4 bytes, where the kernel expects an uncompressed archive to start.
pub fn initramfs_with(base: &Path, files: &[GuestFile], out: &Path) {
    let mut data = std::fs::read(base)
        .unwrap_or_else(|e| panic!("cannot read the initramfs {}: {e}", base.display()));
    data.resize(data.len().next_multiple_of(4), 0);
    data.extend_from_slice(&newc_archive(files));
    std::fs::write(out, data).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), encoded, "{plain:?}");
        }
        assert_eq!(base64_encode(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn cases_are_parsed_back() {
        let out = "noise\n\x1bc\x1b[2J=== CASE a\n--- stdout\nhello\n--- stderr\nflint: error: x\n=== END a status=1\n\
                   junk\n=== CASE b\n--- stdout\n--- stderr\n=== END b status=0\n";
        let cases = parse_cases(out);
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[0].name, "a");
        assert_eq!(cases[0].status, 1);
        assert_eq!(cases[0].stdout, "hello\n");
        assert_eq!(cases[0].stderr_lines(), vec!["flint: error: x"]);
        assert_eq!(cases[1].status, 0);
        assert!(cases[1].stdout.is_empty() && cases[1].stderr.is_empty());
    }

    #[test]
    fn rig_failures_are_recognised() {
        let run = |status, output: &str| ScenarioRun {
            status,
            output: output.to_string(),
        };
        assert!(rig_failure(&run(98, "")).is_some());
        assert!(rig_failure(&run(99, "")).is_some());
        assert!(rig_failure(&run(0, &format!("x {RIG_TRIPLE_FAULT} y"))).is_some());
        let frozen =
            "RIG-CASE-TIMEOUT a\n=== CASE a\n--- stdout\n--- stderr\n=== END a status=143\n";
        assert!(rig_failure(&run(0, frozen)).unwrap().contains("froze"));
        let waited = "x\nRIG-WAIT-TIMEOUT /tmp/work/a.out: no 'A-DONE' after 120 s\n";
        assert!(rig_failure(&run(0, waited)).unwrap().contains("wait_for"));
        // A background case stopped on purpose with SIGTERM is no rig failure.
        let stopped = "=== CASE b\n--- stdout\n--- stderr\n=== END b status=143\n";
        assert_eq!(rig_failure(&run(0, stopped)), None);
    }

    #[test]
    fn console_trouble_and_host_values_are_found() {
        let case = Case {
            name: "c".into(),
            status: 0,
            stdout: "FLINT-GUEST-READY\nEXT4-fs error (device vda)\n".into(),
            stderr: "flint: guest boot time: 5 ms\n".into(),
        };
        case.assert_no_errors();
        let extra = std::panic::catch_unwind(|| case.assert_no_errors_or(&["EXT4-fs error"]));
        assert!(extra.is_err(), "the extra console text was not caught");
        let usual = Case {
            stdout: "Kernel panic - not syncing\n".into(),
            ..case.clone()
        };
        assert!(std::panic::catch_unwind(|| usual.assert_no_errors_or(&["x"])).is_err());

        let run = ScenarioRun {
            status: 0,
            output: "noise\n  HOST md5=abc \nHOST md5x=no\n".into(),
        };
        run.assert_ok();
        assert_eq!(run.host_value("md5"), "abc");
        assert!(std::panic::catch_unwind(|| run.host_value("other")).is_err());
        let failed = ScenarioRun { status: 98, ..run };
        assert!(std::panic::catch_unwind(|| failed.assert_ok()).is_err());
    }

    #[test]
    fn exec_cmdline_carries_the_script() {
        let c = exec_cmdline("echo hi");
        assert_eq!(c, format!("{DEFAULT_CMDLINE} flint.exec=ZWNobyBoaQ=="));
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn newc_archive_layout() {
        let a = newc_archive(&[GuestFile {
            path: "/t/x".into(),
            data: b"hello".to_vec(),
            mode: 0o755,
        }]);
        assert_eq!(a.len() % 4, 0);
        // directory t, file t/x, trailer
        let text = String::from_utf8_lossy(&a);
        assert_eq!(text.matches("070701").count(), 3);
        assert!(a.starts_with(b"07070100000000000041ed"));
        let file = text.find("t/x\0").unwrap();
        assert_eq!(&text[file - 110 + 14..file - 110 + 22], "000081ed");
        assert_eq!(&text[file - 110 + 54..file - 110 + 62], "00000005");
        let data = (file + 4).next_multiple_of(4);
        assert_eq!(&a[data..data + 5], b"hello");
        assert!(text.contains("TRAILER!!!"));
    }
}
