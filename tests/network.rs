//! Tier 3 networking: virtio-net on TAP interfaces and virtio-vsock, seen from real Linux
//! guests booted by the real `flint` binary, against real host-side programs.
//!
//! Like `tests/linux_boot.rs` the scenarios run in the nested KVM host VM on PVM machines
//! (tests/support); on a machine with hardware KVM they run directly. Either way every TAP and
//! bridge lives in a network namespace the scenario creates and deletes, so a direct run never
//! touches the machine's own interfaces (it needs root, like TAP creation itself).
//!
//! Extra tools:
//! - `vsock-io` (the `guest-tools` crate), built here as a static binary, runs in the guest
//!   (appended to the test initramfs under `/tools`) and on the host side: it streams
//!   deterministic bytes over vsock, Unix sockets or pipes and prints a 64-bit checksum per
//!   connection, so both ends of every transfer can be compared.
//! - iproute2's `ip` (`tuntap`, `netns`, bridges; busybox's `ip` has none of them).
//! - busybox `nc` carries the TCP streams on both sides.
//!
//! Sizes: 100 MiB of TCP each way and 16 MiB of vsock each way, as the issue asks. The TCP
//! streams go through vsock-io (64 KiB per system call) on both ends; busybox nc copies a few
//! KiB per call and ran at 2-7 MiB/s in the nested rig, which would make 100 MiB take minutes.
//! The bridge test between two guests, both under TCG, keeps a smaller stream.
//!
//! Bad `--net`/`--vsock` arguments are checked on the local machine (no guest ever starts).

mod support;

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use support::{
    assert_one_error, exec_cmdline, guest_images, initramfs_with, repo_root, run_scenario_with,
    Case, GuestFile, ScenarioOptions, GUEST_CMDLINE_MAX,
};

/// Bytes of each TCP stream (each direction).
const TCP_BYTES: &str = "100M";
const TCP_BYTES_N: u64 = 100 << 20;
/// Bytes of each single vsock stream (each direction).
const VSOCK_BYTES: &str = "16M";
const VSOCK_BYTES_N: u64 = 16 << 20;
/// Concurrent vsock connections in each direction, and the bytes each carries.
const VSOCK_CONNS: usize = 32;
const VSOCK_SMALL: &str = "256K";
const VSOCK_SMALL_N: u64 = 256 << 10;

// ---------------------------------------------------------------------------------------
// Tools and images
// ---------------------------------------------------------------------------------------

/// The static `vsock-io` binary, built once per test process with its own target directory.
fn vsock_io() -> &'static Path {
    static TOOL: OnceLock<PathBuf> = OnceLock::new();
    TOOL.get_or_init(build_vsock_io)
}

fn build_vsock_io() -> PathBuf {
    let triple = "x86_64-unknown-linux-gnu";
    let target_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-tools");
    let cargo = option_env!("CARGO").map_or_else(
        || std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
        Into::into,
    );
    let started = Instant::now();
    let out = Command::new(&cargo)
        .current_dir(repo_root())
        .args(["build", "--release", "--quiet", "-p", "guest-tools"])
        .args(["--bin", "vsock-io", "--target", triple, "--target-dir"])
        .arg(&target_dir)
        // Static against glibc: the guest has no libc. The encoded form wins over RUSTFLAGS.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build the guest tool vsock-io: {e}"));
    assert!(
        out.status.success(),
        "building the static guest tool vsock-io failed (it needs the {triple} target and \
         glibc's static libc.a from libc6-dev):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = target_dir.join(triple).join("release").join("vsock-io");
    let elf = std::fs::read(&bin)
        .unwrap_or_else(|e| panic!("built vsock-io missing at {}: {e}", bin.display()));
    assert!(
        is_static_elf(&elf),
        "{} is not a static ELF executable (it has an ELF interpreter); the guest has no \
         dynamic loader",
        bin.display()
    );
    println!(
        "built static vsock-io in {:?}: {}",
        started.elapsed(),
        bin.display()
    );
    bin
}

/// Whether `elf` is a 64-bit little-endian ELF without a `PT_INTERP` program header (static
/// or static-pie: it runs without a dynamic loader).
fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
}

/// iproute2's `ip`, which the scenarios need for TAPs, bridges and namespaces.
fn iproute2() -> PathBuf {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect(
            "iproute2's ip is missing (apt-get install iproute2): the network tests need it \
             for TAPs, bridges and network namespaces",
        )
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("network-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest initramfs plus `/tools/vsock-io` and the guest scripts `/tools/NAME.sh`.
fn tools_initramfs(scratch: &Scratch, scripts: &[(&str, &str)]) -> PathBuf {
    let mut files = vec![GuestFile {
        path: "/tools/vsock-io".into(),
        data: std::fs::read(vsock_io()).expect("read vsock-io"),
        mode: 0o755,
    }];
    for (name, text) in scripts {
        files.push(GuestFile {
            path: format!("/tools/{name}.sh"),
            data: text.as_bytes().to_vec(),
            mode: 0o755,
        });
    }
    let out = scratch.0.join("initramfs-net.cpio");
    initramfs_with(&guest_images().initramfs, &files, &out);
    out
}

/// Extra files of every network scenario; the initramfs is `$FILES/initramfs-net.cpio`.
fn scenario_files(initramfs: PathBuf) -> Vec<(PathBuf, &'static str)> {
    vec![
        (initramfs, "initramfs-net.cpio"),
        (vsock_io().to_path_buf(), "vsock-io"),
        (iproute2(), "ip"),
    ]
}

/// Kernel command line running `guest_script` (short: it calls a script under /tools), with
/// room left for the `virtio_mmio.device=` entries flint appends.
fn guest_cmdline(guest_script: &str) -> String {
    let cmdline = exec_cmdline(guest_script);
    assert!(
        cmdline.len() + 6 * 40 < GUEST_CMDLINE_MAX,
        "command line too long"
    );
    support::sh_quote(&cmdline)
}

fn options(timeout_secs: u32) -> ScenarioOptions {
    ScenarioOptions {
        timeout_secs,
        ..ScenarioOptions::default()
    }
}

/// Shell functions of the network scenarios, after the support preamble.
///
/// - `$IP` is iproute2, `$T` vsock-io, `$INITRD` the initramfs with /tools.
/// - `$NS CMD...` runs CMD in the scenario's own network namespace (deleted on exit).
/// - `link_state DEV` prints `present` or `absent` (in the namespace);
///   `wait_link DEV SECS` waits until DEV exists.
/// - `host_run NAME CMD...` runs CMD (time-limited) and prefixes its output lines `HOST NAME `.
const NET_PREAMBLE: &str = r#"
IP="$FILES/ip"
T="$FILES/vsock-io"
INITRD="$FILES/initramfs-net.cpio"
NSN=flint-net-$$
if ! "$IP" netns add "$NSN"; then
    echo "HOST cannot create the network namespace $NSN"
    exit 1
fi
NS="$IP netns exec $NSN"
cleanup() {
    for p in $(jobs -p); do kill "$p" 2>/dev/null; done
    "$IP" netns del "$NSN" 2>/dev/null
}
trap cleanup EXIT
$NS "$IP" link set lo up
link_state() {
    if $NS "$IP" link show "$1" >/dev/null 2>&1; then echo present; else echo absent; fi
}
wait_link() {
    _wl=0
    while [ $_wl -lt "$2" ] && [ "$(link_state "$1")" = absent ]; do
        sleep 1
        _wl=$((_wl + 1))
    done
}
host_run() {
    _hr_name=$1
    shift
    timeout "$CASE_TIMEOUT" "$@" </dev/null 2>&1 | sed "s/^/HOST $_hr_name /"
}
"#;

// ---------------------------------------------------------------------------------------
// Output parsing and checks
// ---------------------------------------------------------------------------------------

/// One `vsock-io: conn=...` report line.
#[derive(Debug, Clone, PartialEq)]
struct Xfer {
    conn: u32,
    mode: String,
    bytes: u64,
    sum: String,
    secs: f64,
    /// `ok`, `aborted` or `error=...`
    end: String,
}

impl Xfer {
    fn ok(&self) -> bool {
        self.end == "ok"
    }
    fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.secs.max(1e-6)
    }
}

fn parse_xfer(line: &str) -> Option<Xfer> {
    let rest = line.split_once("vsock-io: ")?.1;
    let mut fields = BTreeMap::new();
    let mut end = None;
    for word in rest.split_whitespace() {
        match word.split_once('=') {
            Some(("error", _)) | None => end = Some(word.to_string()),
            Some((k, v)) => {
                fields.insert(k, v);
            }
        }
    }
    Some(Xfer {
        conn: fields.get("conn")?.parse().ok()?,
        mode: fields.get("mode")?.to_string(),
        bytes: fields.get("bytes")?.parse().ok()?,
        sum: fields.get("sum")?.to_string(),
        secs: fields.get("secs")?.parse().ok()?,
        end: end?,
    })
}

/// The transfers reported on lines starting with `prefix ` (e.g. `HOST h2g` or `G5000`),
/// sorted by connection.
fn xfers(text: &str, prefix: &str) -> Vec<Xfer> {
    let tag = format!("{prefix} vsock-io: ");
    let mut v: Vec<Xfer> = text
        .lines()
        .filter_map(|l| {
            let at = l.find(&tag)?;
            parse_xfer(&l[at + prefix.len() + 1..])
        })
        .collect();
    v.sort_by_key(|x| x.conn);
    v
}

/// The single transfer reported under `prefix`.
fn one_xfer(text: &str, prefix: &str, context: &str) -> Xfer {
    let v = xfers(text, prefix);
    assert_eq!(
        v.len(),
        1,
        "expected one `{prefix} vsock-io:` report, found {}\n{context}",
        v.len()
    );
    v.into_iter().next().unwrap()
}

/// flint exited with `status` after a guest that ran its script: no kernel trouble, no error
/// or panic from flint.
fn assert_guest_ran(case: &Case, status: i32, done_marker: &str) {
    assert_eq!(
        case.status,
        status,
        "flint exited with an unexpected status\n{}",
        case.show()
    );
    assert!(
        case.stdout.contains("FLINT-GUEST-READY"),
        "guest init never printed FLINT-GUEST-READY\n{}",
        case.show()
    );
    assert!(
        case.stdout.lines().any(|l| l.trim() == done_marker),
        "the guest script did not get to {done_marker}\n{}",
        case.show()
    );
    case.assert_no_errors();
}

/// busybox ping's summary for `count` pings, all answered.
fn assert_pings_answered(case: &Case, host: &str, count: u32) {
    let header = format!("PING {host} ");
    let summary = case
        .stdout
        .split(&header)
        .nth(1)
        .and_then(|after| after.lines().find(|l| l.contains("packets transmitted")))
        .unwrap_or_else(|| panic!("no ping summary for {host}\n{}", case.show()));
    assert!(
        summary.contains(&format!(
            "{count} packets transmitted, {count} packets received, 0% packet loss"
        )),
        "the guest's pings to {host} were not all answered: {summary:?}\n{}",
        case.show()
    );
}

// ---------------------------------------------------------------------------------------
// TAP: address, ping, TCP both ways, TAP lifetime
// ---------------------------------------------------------------------------------------

/// Guest side: eth0 on the persistent TAP fltap0 (10.0.0.0/24), eth1 on the TAP that flint
/// creates, fltap1 (10.0.1.0/24). Pings both host ends, then TCP through vsock-io: $SIZE
/// bytes host -> guest, then guest -> host.
const GUEST_TAP: &str = r#"T=/tools/vsock-io
for i in 0 1; do echo "ETH$i-MAC=$(cat /sys/class/net/eth$i/address)"; done
for i in 0 1; do echo "ETH$i-MTU=$(cat /sys/class/net/eth$i/mtu)"; done
ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0
ip link set eth1 up && ip addr add 10.0.1.2/24 dev eth1
ip -4 addr show eth0 | grep -q 'inet 10.0.0.2/24' && echo ETH0-ADDR=yes
for h in 10.0.0.1 10.0.1.1; do
    i=0
    while [ $i -lt 90 ] && ! ping -c 1 -W 1 $h >/dev/null 2>&1; do i=$((i + 1)); done
    ping -c 3 $h
done
echo BIG-PINGS
ping -c 2 -s 8000 10.0.0.1
$T connect tcp:10.0.0.1:5001 --recv --retry 30 | sed 's/^/H2G /'
$T connect tcp:10.0.0.1:5002 --send $SIZE --seed 2 --retry 30 | sed 's/^/G2H-SENT /'
echo NET-GUEST-DONE
"#;

/// The guest gets its addresses and pings the host side of both TAPs; TCP carries
/// [`TCP_BYTES`] each way with matching checksums; `--net mac=` sets the guest's MAC; the TAP
/// flint created is gone after flint exits while the pre-existing persistent TAP stays.
#[test]
fn tap_ping_tcp_and_tap_lifetime() {
    let scratch = Scratch::new("tap");
    let initramfs = tools_initramfs(&scratch, &[("tap", GUEST_TAP)]);
    let g = guest_cmdline(&format!("SIZE={TCP_BYTES} sh /tools/tap.sh"));
    let script = format!(
        r#"
CASE_TIMEOUT=400
{NET_PREAMBLE}
$NS "$IP" tuntap add dev fltap0 mode tap
$NS "$IP" addr add 10.0.0.1/24 dev fltap0
$NS "$IP" link set fltap0 up
echo "HOST fltap1-before=$(link_state fltap1)"

# host side of both TCP streams, listening before the guest starts
timeout "$CASE_TIMEOUT" $NS "$T" listen tcp:5001 --send {TCP_BYTES} --seed 1 >"$WORK/h2g.txt" 2>&1 &
timeout "$CASE_TIMEOUT" $NS "$T" listen tcp:5002 --recv >"$WORK/g2h.txt" 2>&1 &

bg_case tap_guest $NS "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRD" --memory 256 \
    --net tap=fltap0,mac=02:00:00:00:00:10 --net tap=fltap1,mtu=4000 --cmdline {g}
GUEST=$BG_PID
wait_link fltap1 120
echo "HOST fltap1-during=$(link_state fltap1)"
$NS "$IP" addr add 10.0.1.1/24 dev fltap1
$NS "$IP" link set fltap1 up
end_case tap_guest $GUEST
wait
echo "HOST fltap1-after=$(link_state fltap1)"
echo "HOST fltap0-after=$(link_state fltap0)"
sed 's/^/HOST g2h /' "$WORK/g2h.txt"
sed 's/^/HOST h2g-sent /' "$WORK/h2g.txt"
"#
    );
    let started = Instant::now();
    let run = run_scenario_with(&script, &scenario_files(initramfs), &options(900));
    println!("TAP scenario took {:?}", started.elapsed());
    run.assert_ok();

    let guest = run.case("tap_guest");
    assert_guest_ran(&guest, 0, "NET-GUEST-DONE");
    let ctx = guest.show();
    assert_eq!(
        guest.value_of("ETH0-MAC"),
        "02:00:00:00:00:10",
        "the guest's first NIC does not have the MAC given with mac=\n{ctx}"
    );
    // mtu= reaches the guest's driver (VIRTIO_NET_F_MTU); without it the default stays.
    assert_eq!(guest.value_of("ETH0-MTU"), "1500", "{ctx}");
    assert_eq!(guest.value_of("ETH1-MTU"), "4000", "{ctx}");
    let mac1 = guest.value_of("ETH1-MAC");
    // The default for fltap1: 06:46:4c and the 32-bit FNV-1a hash of "fltap1" without its top byte.
    assert_eq!(
        mac1, "06:46:4c:41:92:13",
        "the second NIC should have the default MAC of the TAP fltap1\n{ctx}"
    );
    assert_eq!(guest.value_of("ETH0-ADDR"), "yes", "{ctx}");
    assert_pings_answered(&guest, "10.0.0.1", 3);
    assert_pings_answered(&guest, "10.0.1.1", 3);
    // 8 KB echo requests and replies: IP fragments in both directions.
    let big = guest.stdout.split("BIG-PINGS").nth(1).unwrap_or_default();
    assert!(
        big.contains("2 packets transmitted, 2 packets received, 0% packet loss"),
        "fragmented 8000-byte pings were not answered\n{ctx}"
    );

    // host -> guest
    let sent = one_xfer(&run.output, "HOST h2g-sent", &ctx);
    let got = one_xfer(&guest.stdout, "H2G", &ctx);
    assert_eq!(sent.bytes, TCP_BYTES_N);
    assert_eq!(
        (got.bytes, &got.sum),
        (sent.bytes, &sent.sum),
        "TCP host -> guest: the guest received other bytes than the host sent\n{ctx}"
    );
    // guest -> host
    let sent = one_xfer(&guest.stdout, "G2H-SENT", &ctx);
    let got = one_xfer(&run.output, "HOST g2h", &ctx);
    assert_eq!(sent.bytes, TCP_BYTES_N);
    assert_eq!(
        (got.bytes, &got.sum),
        (sent.bytes, &sent.sum),
        "TCP guest -> host: the host received other bytes than the guest sent"
    );
    println!(
        "TCP {TCP_BYTES} host -> guest in {:.1} s, guest -> host in {:.1} s (nested rig)",
        one_xfer(&guest.stdout, "H2G", &ctx).secs,
        got.secs
    );

    assert_eq!(run.host_value("fltap1-before"), "absent");
    assert_eq!(
        run.host_value("fltap1-during"),
        "present",
        "flint did not create the TAP fltap1 named by --net"
    );
    assert_eq!(
        run.host_value("fltap1-after"),
        "absent",
        "the TAP flint created is still there after flint exited"
    );
    assert_eq!(
        run.host_value("fltap0-after"),
        "present",
        "the persistent TAP that existed before flint is gone after flint exited"
    );
}

// ---------------------------------------------------------------------------------------
// Two microVMs on a bridge
// ---------------------------------------------------------------------------------------

/// Guest A (10.0.2.2): receives a stream from B on port 7000, then pings B.
const GUEST_BRIDGE_A: &str = r#"T=/tools/vsock-io
ip link set eth0 up && ip addr add 10.0.2.2/24 dev eth0
mkfifo /tmp/idle
nc -l -p 7000 <>/tmp/idle | $T sum | sed 's/^/A-GOT /'
ping -c 3 10.0.2.3
echo A-DONE
"#;

/// Guest B (10.0.2.3): waits for A to answer, pings it, sends it a stream, then stays up
/// until the host stops its flint with SIGTERM.
const GUEST_BRIDGE_B: &str = r#"T=/tools/vsock-io
ip link set eth0 up && ip addr add 10.0.2.3/24 dev eth0
i=0
while [ $i -lt 120 ] && ! ping -c 1 -W 1 10.0.2.2 >/dev/null 2>&1; do i=$((i + 1)); done
ping -c 3 10.0.2.2
i=0
until $T gen $SIZE --seed 7 | nc 10.0.2.2 7000 || [ $i -ge 20 ]; do sleep 1; i=$((i + 1)); done
$T gen $SIZE --seed 7 | $T sum | sed 's/^/B-SENT /'
echo B-DONE
sleep 600
"#;

/// Two microVMs whose TAPs are on one bridge reach each other (ping and a TCP stream). A's TAP
/// is persistent; B's is created by flint and bridged by the host once it appears, and is
/// gone after B's flint is stopped with SIGTERM.
#[test]
fn two_guests_on_a_bridge() {
    const BYTES: &str = "4M";
    let scratch = Scratch::new("bridge");
    let initramfs = tools_initramfs(&scratch, &[("a", GUEST_BRIDGE_A), ("b", GUEST_BRIDGE_B)]);
    let ga = guest_cmdline("sh /tools/a.sh");
    let gb = guest_cmdline(&format!("SIZE={BYTES} sh /tools/b.sh"));
    let script = format!(
        r#"
CASE_TIMEOUT=300
{NET_PREAMBLE}
$NS "$IP" link add flbr0 type bridge
$NS "$IP" link set flbr0 up
$NS "$IP" tuntap add dev fltapa mode tap
$NS "$IP" link set fltapa master flbr0
$NS "$IP" link set fltapa up
bg_case guest_a $NS "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRD" \
    --net tap=fltapa,mac=02:00:00:00:0a:01 --cmdline {ga}
A=$BG_PID
# While A runs: its TAP is busy, and the bridge is no TAP. Both must fail without harming
# A, its TAP or the bridge.
wait_for "$WORK/guest_a.err" "boot time" 120
flint_case busy_tap $NS "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRD" --net tap=fltapa
flint_case not_a_tap $NS "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRD" --net tap=flbr0
echo "HOST flbr0-after-not-a-tap=$(link_state flbr0)"
# B joins the bridge while A runs.
bg_case guest_b $NS "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRD" \
    --net tap=fltapb,mac=02:00:00:00:0b:01 --cmdline {gb}
B=$BG_PID
wait_link fltapb 120
$NS "$IP" link set fltapb master flbr0
$NS "$IP" link set fltapb up
$NS sh -c 'echo "HOST bridge-ports-ns=$(ls /sys/class/net/flbr0/brif | tr "\n" " ")"'
end_case guest_a $A
wait_for "$WORK/guest_b.out" B-DONE 120
kill -TERM $B
end_case guest_b $B
echo "HOST fltapb-after=$(link_state fltapb)"
echo "HOST fltapa-after=$(link_state fltapa)"
"#
    );
    let started = Instant::now();
    let run = run_scenario_with(&script, &scenario_files(initramfs), &options(900));
    println!("bridge scenario took {:?}", started.elapsed());
    run.assert_ok();

    let a = run.case("guest_a");
    let b = run.case("guest_b");
    assert_guest_ran(&a, 0, "A-DONE");
    // B is stopped with SIGTERM while its script sleeps: 128 + 15.
    assert_guest_ran(&b, 143, "B-DONE");
    assert_pings_answered(&b, "10.0.2.2", 3);
    assert_pings_answered(&a, "10.0.2.3", 3);
    let sent = one_xfer(&b.stdout, "B-SENT", &b.show());
    let got = one_xfer(&a.stdout, "A-GOT", &a.show());
    assert_eq!(sent.bytes, 4 << 20);
    assert_eq!(
        (got.bytes, &got.sum),
        (sent.bytes, &sent.sum),
        "guest A received other bytes than guest B sent over the bridge\n{}\n{}",
        a.show(),
        b.show()
    );
    assert!(
        run.host_value("bridge-ports-ns").contains("fltapb"),
        "fltapb was never attached to the bridge"
    );
    assert_eq!(
        run.host_value("fltapb-after"),
        "absent",
        "the TAP flint created is still there after flint was stopped with SIGTERM"
    );
    assert_eq!(run.host_value("fltapa-after"), "present");

    assert_case_rejected(&run.case("busy_tap"), &["fltapa"]);
    assert_case_rejected(&run.case("not_a_tap"), &["flbr0"]);
    assert_eq!(
        run.host_value("flbr0-after-not-a-tap"),
        "present",
        "a failed --net tap=flbr0 removed the bridge flbr0"
    );
}

/// A flint run in the scenario that must fail at start: status 1, nothing on stdout, one
/// `flint: error:` line mentioning every needle.
fn assert_case_rejected(case: &Case, needles: &[&str]) {
    assert_eq!(case.status, 1, "flint should exit 1\n{}", case.show());
    assert!(
        case.stdout.trim().is_empty(),
        "the guest must not start\n{}",
        case.show()
    );
    let lines = case.stderr_lines();
    assert!(
        lines.len() == 1 && lines[0].starts_with("flint: error: "),
        "expected exactly one line `flint: error: ...`\n{}",
        case.show()
    );
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "the error should mention {needle:?}\n{}",
            case.show()
        );
    }
}

// ---------------------------------------------------------------------------------------
// vsock
// ---------------------------------------------------------------------------------------

/// Guest side of the vsock scenario. Listeners (started first, served concurrently):
/// 5000 receives one stream; 5001 receives 32 at once; 5002 sends 4 MiB to each of two
/// connections (the host drops the first after 1 MiB); 5003 receives two streams (the host
/// drops the first after 1 MiB). Meanwhile the guest connects to the host: one $SIZE stream
/// to port 6000, then 32 at once to port 6001, then to port 6999 where nobody listens.
const GUEST_VSOCK: &str = r#"T=/tools/vsock-io
$T listen vsock:5000 --recv >/tmp/l5000 2>&1 &
$T listen vsock:5001 --conns 32 --recv >/tmp/l5001 2>&1 &
$T listen vsock:5002 --conns 2 --send 4M --seed 400 >/tmp/l5002 2>&1 &
$T listen vsock:5003 --conns 2 --recv >/tmp/l5003 2>&1 &
$T connect vsock:2:6000 --send $SIZE --seed 500 --retry 30 2>&1 | sed 's/^/G6000 /'
$T connect vsock:2:6001 --conns 32 --send $SMALL --seed 600 --retry 30 2>&1 | sed 's/^/G6001 /'
$T connect vsock:2:6999 --recv 2>&1 | sed 's/^/G6999 /'
wait
for p in 5000 5001 5002 5003; do sed "s/^/G$p /" /tmp/l$p; done
echo VSOCK-GUEST-DONE
"#;

/// vsock both ways with matching checksums: one [`VSOCK_BYTES`] stream each way, then 32
/// connections at once each way; a host program that drops its connection mid-transfer
/// (reading, then sending) leaves the guest and flint healthy: the next connection works and
/// the guest reboots cleanly.
#[test]
fn vsock_streams_concurrency_and_aborts() {
    let scratch = Scratch::new("vsock");
    let initramfs = tools_initramfs(&scratch, &[("vsock", GUEST_VSOCK)]);
    let g = guest_cmdline(&format!(
        "SIZE={VSOCK_BYTES} SMALL={VSOCK_SMALL} sh /tools/vsock.sh"
    ));
    let script = format!(
        r#"
CASE_TIMEOUT=400
{NET_PREAMBLE}
timeout "$CASE_TIMEOUT" "$T" listen unix:"$WORK/v.sock_6000" --recv >"$WORK/h6000.txt" 2>&1 &
timeout "$CASE_TIMEOUT" "$T" listen unix:"$WORK/v.sock_6001" --conns {VSOCK_CONNS} --recv >"$WORK/h6001.txt" 2>&1 &
wait_for "$WORK/h6000.txt" listening 30
wait_for "$WORK/h6001.txt" listening 30
bg_case vsock_guest "$FLINT" boot --kernel "$BZIMAGE" --initrd "$INITRD" --memory 256 \
    --vsock cid=3,uds="$WORK/v.sock" --cmdline {g}
GUEST=$BG_PID
V="flint:$WORK/v.sock"
host_run h2g "$T" connect "$V:5000" --send {VSOCK_BYTES} --seed 100 --retry 180
host_run nobody "$T" connect "$V:5999" --recv
host_run h2g32 "$T" connect "$V:5001" --conns {VSOCK_CONNS} --send {VSOCK_SMALL} --seed 200 --retry 60
host_run drop-reading "$T" connect "$V:5002" --recv --abort-after 1M --retry 60
host_run after-drop-reading "$T" connect "$V:5002" --recv --retry 60
host_run drop-sending "$T" connect "$V:5003" --send 64M --abort-after 1M --seed 300 --retry 60
host_run after-drop-sending "$T" connect "$V:5003" --send 4M --seed 301 --retry 60
end_case vsock_guest $GUEST
wait
sed 's/^/HOST g2h /' "$WORK/h6000.txt"
sed 's/^/HOST g2h32 /' "$WORK/h6001.txt"
"#
    );
    let started = Instant::now();
    let run = run_scenario_with(&script, &scenario_files(initramfs), &options(900));
    println!("vsock scenario took {:?}", started.elapsed());
    run.assert_ok();

    let guest = run.case("vsock_guest");
    assert_guest_ran(&guest, 0, "VSOCK-GUEST-DONE");
    let ctx = guest.show();
    let out = &run.output;

    // One stream each way.
    let sent = one_xfer(out, "HOST h2g", &ctx);
    let got = one_xfer(&guest.stdout, "G5000", &ctx);
    assert!(
        sent.ok() && sent.bytes == VSOCK_BYTES_N,
        "host -> guest send failed: {sent:?}"
    );
    assert!(got.ok(), "guest receive failed: {got:?}\n{ctx}");
    assert_eq!(
        (got.bytes, &got.sum),
        (sent.bytes, &sent.sum),
        "vsock host -> guest: the guest received other bytes than the host sent\n{ctx}"
    );
    let sent = one_xfer(&guest.stdout, "G6000", &ctx);
    let got = one_xfer(out, "HOST g2h", &ctx);
    assert!(
        sent.ok() && sent.bytes == VSOCK_BYTES_N,
        "guest -> host send failed: {sent:?}\n{ctx}"
    );
    assert!(got.ok(), "host receive failed: {got:?}");
    assert_eq!(
        (got.bytes, &got.sum),
        (sent.bytes, &sent.sum),
        "vsock guest -> host: the host received other bytes than the guest sent\n{ctx}"
    );
    println!(
        "vsock {VSOCK_BYTES}: host -> guest {:.1} MiB/s, guest -> host {:.1} MiB/s (nested rig)",
        one_xfer(out, "HOST h2g", &ctx).mib_per_s(),
        sent.mib_per_s()
    );

    // 32 at once each way: every connection completes, and the sets of checksums match
    // (streams have distinct seeds, so crossed or mixed streams would not).
    for (what, senders, receivers) in [
        (
            "host -> guest",
            xfers(out, "HOST h2g32"),
            xfers(&guest.stdout, "G5001"),
        ),
        (
            "guest -> host",
            xfers(&guest.stdout, "G6001"),
            xfers(out, "HOST g2h32"),
        ),
    ] {
        assert_eq!(
            senders.len(),
            VSOCK_CONNS,
            "{what}: senders {senders:?}\n{ctx}"
        );
        assert_eq!(
            receivers.len(),
            VSOCK_CONNS,
            "{what}: receivers {receivers:?}\n{ctx}"
        );
        for x in senders.iter().chain(&receivers) {
            assert!(
                x.ok() && x.bytes == VSOCK_SMALL_N,
                "{what}: a concurrent connection failed or was short: {x:?}\n{ctx}"
            );
        }
        let mut a: Vec<&str> = senders.iter().map(|x| x.sum.as_str()).collect();
        let mut b: Vec<&str> = receivers.iter().map(|x| x.sum.as_str()).collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(
            a, b,
            "{what}: received streams differ from the sent ones\n{ctx}"
        );
    }

    // Nobody listening: the host program's socket is closed without `OK`, and the guest's
    // connection is refused at once (reset, not a timeout); the later connections work.
    let nobody = one_xfer(out, "HOST nobody", &ctx);
    assert!(
        nobody.end.starts_with("error=") && nobody.end.contains("without_OK"),
        "CONNECT to a guest port without listener: {nobody:?}"
    );
    let refused = one_xfer(&guest.stdout, "G6999", &ctx);
    assert!(
        refused.end.starts_with("error=") && !refused.end.contains("timed_out"),
        "a guest connection to a host port without listener should be refused at once: \
         {refused:?}\n{ctx}"
    );

    // The host reads 1 MiB of 4 MiB and drops the connection: the guest's sender fails or
    // stops early (it must not hang), and the next connection gets all 4 MiB intact.
    let dropped = one_xfer(out, "HOST drop-reading", &ctx);
    assert_eq!((dropped.bytes, dropped.end.as_str()), (1 << 20, "aborted"));
    let guest_5002 = xfers(&guest.stdout, "G5002");
    assert_eq!(
        guest_5002.len(),
        2,
        "guest port 5002: {guest_5002:?}\n{ctx}"
    );
    assert!(
        !guest_5002[0].ok() || guest_5002[0].bytes < 4 << 20,
        "the guest's first 5002 sender finished although the host dropped it after 1 MiB: \
         {:?}\n{ctx}",
        guest_5002[0]
    );
    let after = one_xfer(out, "HOST after-drop-reading", &ctx);
    assert!(
        guest_5002[1].ok(),
        "guest sender after the drop: {:?}\n{ctx}",
        guest_5002[1]
    );
    assert_eq!(
        (after.end.as_str(), after.bytes, &after.sum),
        ("ok", 4 << 20, &guest_5002[1].sum),
        "the connection after a dropped one did not carry the guest's 4 MiB intact\n{ctx}"
    );

    // The host sends 1 MiB of a 64 MiB stream and drops the connection: the guest sees the
    // stream end after exactly what was sent, and the next connection works.
    let dropped = one_xfer(out, "HOST drop-sending", &ctx);
    assert_eq!((dropped.bytes, dropped.end.as_str()), (1 << 20, "aborted"));
    let guest_5003 = xfers(&guest.stdout, "G5003");
    assert_eq!(
        guest_5003.len(),
        2,
        "guest port 5003: {guest_5003:?}\n{ctx}"
    );
    assert_eq!(
        (guest_5003[0].bytes, &guest_5003[0].sum),
        (dropped.bytes, &dropped.sum),
        "the guest did not get exactly the 1 MiB the host sent before dropping: {:?}\n{ctx}",
        guest_5003[0]
    );
    let after = one_xfer(out, "HOST after-drop-sending", &ctx);
    assert!(after.ok() && after.bytes == 4 << 20, "{after:?}");
    assert_eq!(
        (
            guest_5003[1].end.as_str(),
            guest_5003[1].bytes,
            &guest_5003[1].sum
        ),
        ("ok", after.bytes, &after.sum),
        "the connection after a dropped one did not carry the host's 4 MiB intact\n{ctx}"
    );
}

// ---------------------------------------------------------------------------------------
// Malformed configuration (local, no guest)
// ---------------------------------------------------------------------------------------

/// The guest side of the MMDS scenario: a V2 session token, the data in IMDS and JSON
/// formats, data the host changed after boot, a refusal without a token, and a burst of
/// connections that gets answers or nothing, after which the service still answers.
const GUEST_MMDS: &str = r#"M=169.254.169.254
ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0 && ip route add $M/32 dev eth0
req() { printf "$1" | timeout 20 nc $M 80; }
TOKEN=$(req 'PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n' | tail -n 1)
echo "TOKEN-LEN=${#TOKEN}"
echo "NO-TOKEN=$(req 'GET /latest/meta-data/id HTTP/1.1\r\nConnection: close\r\n\r\n' | head -n 1 | cut -d' ' -f2)"
echo "IMDS=$(req "GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: $TOKEN\r\nConnection: close\r\n\r\n" | tail -n 1)"
echo "KEYS=$(req "GET /latest/meta-data HTTP/1.1\r\nX-metadata-token: $TOKEN\r\nConnection: close\r\n\r\n" | tail -n 2 | tr '\n' ,)"
echo "JSON=$(req "GET /latest/meta-data HTTP/1.1\r\nAccept: application/json\r\nX-metadata-token: $TOKEN\r\nConnection: close\r\n\r\n" | tail -n 1)"
echo MMDS-GUEST-WAITING
i=0; while [ $i -lt 120 ] && ! req "GET /latest/meta-data/later HTTP/1.1\r\nX-metadata-token: $TOKEN\r\nConnection: close\r\n\r\n" | grep -q '^set-after-boot'; do sleep 1; i=$((i + 1)); done
echo "LATER=$(req "GET /latest/meta-data/later HTTP/1.1\r\nX-metadata-token: $TOKEN\r\nConnection: close\r\n\r\n" | tail -n 1)"
j=0; while [ $j -lt 40 ]; do req 'GET / HTTP/1.1\r\n\r\n' >/dev/null 2>&1 & j=$((j + 1)); done; wait
echo "AFTER-BURST=$(req "GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: $TOKEN\r\nConnection: close\r\n\r\n" | tail -n 1)"
echo NET-GUEST-DONE
"#;

/// MMDS from inside a real guest: Firecracker's V2 session tokens, both output formats, data
/// the host sets after boot through the API, and a guest that floods it.
#[test]
fn mmds_from_a_real_guest() {
    let scratch = Scratch::new("mmds");
    let initramfs = tools_initramfs(&scratch, &[("mmds", GUEST_MMDS)]);
    let g = exec_cmdline("sh /tools/mmds.sh");
    let curl = PathBuf::from("/usr/bin/curl");
    assert!(
        curl.is_file(),
        "curl is needed for this test (apt-get install curl)"
    );
    let script = format!(
        r#"
CASE_TIMEOUT=300
{NET_PREAMBLE}
CURL=$FILES/curl
$NS "$IP" tuntap add dev fltapm mode tap
$NS "$IP" link set fltapm up
printf '%s' '{{"latest": {{"meta-data": {{"id": "i-0123", "zone": "nested"}}}}}}' >"$WORK/meta.json"
printf '%s' "{{\"boot-source\": {{\"kernel_image_path\": \"$BZIMAGE\", \"initrd_path\": \"$INITRD\", \"boot_args\": \"{g}\"}},
  \"machine-config\": {{\"vcpu_count\": 1, \"mem_size_mib\": 256}},
  \"network-interfaces\": [{{\"iface_id\": \"eth0\", \"host_dev_name\": \"fltapm\"}}],
  \"mmds-config\": {{\"version\": \"V2\", \"network_interfaces\": [\"eth0\"]}}}}" >"$WORK/vm.json"
bg_case mmds_guest $NS "$FLINT" --api-sock "$WORK/api.sock" --config-file "$WORK/vm.json" --metadata "$WORK/meta.json"
GUEST=$BG_PID
wait_for "$WORK/mmds_guest.out" MMDS-GUEST-WAITING 200
echo "HOST patch=$("$CURL" -s -o /dev/null -w '%{{http_code}}' --unix-socket "$WORK/api.sock" -X PATCH \
    -d '{{"latest": {{"meta-data": {{"later": "set-after-boot"}}}}}}' http://localhost/mmds)"
echo "HOST get=$("$CURL" -s --unix-socket "$WORK/api.sock" http://localhost/mmds)"
wait_for "$WORK/mmds_guest.out" NET-GUEST-DONE 200
"$CURL" -s -o /dev/null --unix-socket "$WORK/api.sock" -X PUT -d '{{"action_type": "SendCtrlAltDel"}}' http://localhost/actions
end_case mmds_guest $GUEST
"#
    );
    let mut files = scenario_files(initramfs);
    files.push((curl, "curl"));
    let run = run_scenario_with(&script, &files, &options(600));
    run.assert_ok();
    let guest = run.case("mmds_guest");
    let ctx = guest.show();
    assert_eq!(guest.value_of("TOKEN-LEN"), "64", "{ctx}");
    assert_eq!(guest.value_of("NO-TOKEN"), "401", "{ctx}");
    assert_eq!(guest.value_of("IMDS"), "i-0123", "{ctx}");
    assert_eq!(guest.value_of("KEYS"), "id,zone", "{ctx}");
    assert_eq!(
        guest.value_of("JSON"),
        r#"{"id":"i-0123","zone":"nested"}"#,
        "{ctx}"
    );
    assert_eq!(run.host_value("patch"), "204", "{}", run.output);
    assert!(
        run.host_value("get").contains("set-after-boot"),
        "{}",
        run.output
    );
    assert_eq!(guest.value_of("LATER"), "set-after-boot", "{ctx}");
    assert_eq!(guest.value_of("AFTER-BURST"), "i-0123", "{ctx}");
}

/// Bad `--net` and `--vsock` values fail before any guest runs, with one sentence that names
/// the problem. The last cases get past argument parsing and fail when flint sets the devices
/// up (after opening the local /dev/kvm, before any guest code runs).
#[test]
fn rejects_malformed_net_and_vsock() {
    let scratch = Scratch::new("bad");
    assert_one_error(&["--net", "tap="], &["--net", "tap=NAME"]);
    assert_one_error(&["--net", ""], &["--net"]);
    assert_one_error(&["--net", "mac=02:00:00:00:00:01"], &["tap=NAME"]);
    assert_one_error(&["--net", "tap=x,colour=red"], &["colour=red"]);
    assert_one_error(&["--net", "tap=x,mac=zz"], &["zz", "MAC"]);
    assert_one_error(&["--net", "tap=x,mac=02:00:00:00:00"], &["02:00:00:00:00"]);
    assert_one_error(
        &["--net", "tap=x,mac=02:00:00:00:00:0g"],
        &["02:00:00:00:00:0g"],
    );
    assert_one_error(&["--net", "tap=x,mac=01:00:5e:00:00:01"], &["multicast"]);
    assert_one_error(&["--net", "tap=x,mac=00:00:00:00:00:00"], &["all-zero"]);
    assert_one_error(&["--net"], &["--net"]);

    let sock = scratch.0.join("v.sock");
    let uds = sock.display().to_string();
    assert_one_error(&["--vsock", &format!("cid=2,uds={uds}")], &["CID 2"]);
    assert_one_error(&["--vsock", &format!("cid=0,uds={uds}")], &["CID 0"]);
    assert_one_error(&["--vsock", &format!("cid=1,uds={uds}")], &["CID 1"]);
    assert_one_error(
        &["--vsock", &format!("cid=4294967295,uds={uds}")],
        &["4294967295"],
    );
    assert_one_error(
        &["--vsock", &format!("cid=x,uds={uds}")],
        &["cid=N,uds=PATH"],
    );
    assert_one_error(&["--vsock", "cid=3"], &["cid=N,uds=PATH"]);
    assert_one_error(&["--vsock", &format!("uds={uds}")], &["cid=N,uds=PATH"]);
    assert_one_error(&["--vsock", "cid=3,uds="], &["cid=N,uds=PATH"]);
    assert_one_error(
        &[
            "--vsock",
            &format!("cid=3,uds={uds}"),
            "--vsock",
            &format!("cid=4,uds={uds}2"),
        ],
        &["--vsock"],
    );

    // Past the parser: TAP names the kernel cannot take, and unusable socket paths.
    assert_one_error(&["--net", "tap=abcdefghijklmnopq"], &["abcdefghijklmnopq"]);
    assert_one_error(&["--net", "tap=a/b"], &["a/b"]);
    let file = scratch.0.join("not-a-socket");
    std::fs::write(&file, b"x").unwrap();
    let file_arg = format!("cid=3,uds={}", file.display());
    assert_one_error(
        &["--vsock", &file_arg],
        &[&file.display().to_string(), "not a socket"],
    );
    assert!(
        file.is_file(),
        "flint removed a regular file given as the vsock socket path"
    );
    let missing = "/nonexistent/flint-network-test/v.sock";
    assert_one_error(&["--vsock", &format!("cid=3,uds={missing}")], &[missing]);
    let _listener = UnixListener::bind(&sock).expect("bind a Unix socket");
    assert_one_error(&["--vsock", &format!("cid=3,uds={uds}")], &[&uds, "in use"]);
}
