//! Tier 2: the request sequences real Firecracker clients send, replayed against the real
//! flint binary with a tiny guest on the local /dev/kvm: the command lines and API calls of
//! firectl (through firecracker-go-sdk), flintlock's config file, E2B's create, snapshot and
//! resume, and Firecracker's own example config file. Every answer is checked, and the guest
//! is seen running. (What the guest makes of `smt`, `mtu` and rate limits is checked with real
//! Linux guests in tests/linux_boot.rs, tests/network.rs and tests/api_lifecycle.rs.)

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::tiny::{flint, text, wait_bounded, Guest};
use support::TempDir;

/// One HTTP/1.1 request on a new connection to `sock`: the status and the body.
fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = UnixStream::connect(sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `call`, expecting `status`.
fn expect(sock: &Path, method: &str, path: &str, body: Option<&str>, status: u16) -> String {
    let (got, answer) = call(sock, method, path, body);
    assert_eq!(
        got,
        status,
        "{method} {path} {}: {answer}",
        body.unwrap_or("")
    );
    answer
}

/// A guest that prints "up" and spins.
fn spinning_kernel(dir: &TempDir) -> PathBuf {
    let mut g = Guest::default();
    g.print("up\n").spin();
    dir.write("vmlinux", &g.elf())
}

/// flint with `args`, its API socket up (when it has one).
fn start(args: &[&str], sock: Option<&Path>) -> Child {
    let child = flint()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(sock) = sock {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "the API socket never came up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    child
}

/// Wait until the guest printed "up" (the VM runs), then stop flint; its output.
fn stop_when_up(mut child: Child, sock: Option<&Path>) -> (String, String) {
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"up\n") {
        match stdout.read(&mut byte) {
            Ok(1) => seen.push(byte[0]),
            _ => panic!("the guest never ran: {:?}", text(&seen)),
        }
    }
    if let Some(sock) = sock {
        let state = expect(sock, "GET", "/", None, 200);
        assert!(state.contains(r#""state":"Running""#), "{state}");
    }
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_bounded(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    (text(&seen), text(&out.stderr))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(s(path)).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A unique TAP name for this process (flint creates it and removes it at exit).
fn tap_name(tag: &str) -> String {
    format!("flfc{tag}{}", std::process::id() % 100_000)
}

fn tap_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn require_tun() {
    assert!(
        Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (load the tun module)"
    );
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates TAP interfaces and needs root (CAP_NET_ADMIN)"
    );
}

#[test]
fn firectl_through_firecracker_go_sdk() {
    require_tun();
    let dir = TempDir::new("fc-firectl");
    let kernel = spinning_kernel(&dir);
    let root = dir.write("root.ext4", &vec![0u8; 1 << 20]);
    let other = dir.write("other.ext4", &vec![0u8; 1 << 20]);
    let (log, metrics) = (dir.0.join("log.fifo"), dir.0.join("metrics.fifo"));
    // The SDK makes FIFOs for the log and metrics and may read them late: flint never blocks.
    mkfifo(&log);
    mkfifo(&metrics);
    let sock = dir.0.join("firecracker.sock");
    let tap = tap_name("a");
    let child = start(&["--api-sock", s(&sock), "--id", "firectl-vm"], Some(&sock));
    for (method, path, body) in [
        (
            "PUT",
            "/logger",
            format!(
                r#"{{"log_path":"{}","level":"Debug","show_level":true,"show_log_origin":true}}"#,
                s(&log)
            ),
        ),
        (
            "PUT",
            "/metrics",
            format!(r#"{{"metrics_path":"{}"}}"#, s(&metrics)),
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":64,"smt":true,"track_dirty_pages":false}"#.into(),
        ),
        (
            "PUT",
            "/boot-source",
            format!(
                r#"{{"kernel_image_path":"{}","boot_args":"ro console=ttyS0 noapic reboot=k panic=1 pci=off nomodules"}}"#,
                s(&kernel)
            ),
        ),
        (
            "PUT",
            "/drives/1",
            format!(
                r#"{{"drive_id":"1","path_on_host":"{}","is_root_device":true,"is_read_only":false,"io_engine":"Sync","cache_type":"Unsafe"}}"#,
                s(&root)
            ),
        ),
        (
            "PUT",
            &format!("/network-interfaces/{tap}"),
            format!(
                r#"{{"iface_id":"{tap}","host_dev_name":"{tap}","guest_mac":"06:00:ac:10:00:02","rx_rate_limiter":{{"bandwidth":{{"size":0,"refill_time":0}}}}}}"#
            ),
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#.into(),
        ),
        // After start: a new medium, and new limits on the interface and the drive.
        (
            "PATCH",
            "/drives/1",
            format!(r#"{{"drive_id":"1","path_on_host":"{}"}}"#, s(&other)),
        ),
        (
            "PATCH",
            &format!("/network-interfaces/{tap}"),
            format!(
                r#"{{"iface_id":"{tap}","tx_rate_limiter":{{"bandwidth":{{"size":1048576,"refill_time":1000}}}}}}"#
            ),
        ),
        (
            "PATCH",
            "/drives/1",
            r#"{"drive_id":"1","rate_limiter":{"ops":{"size":100,"refill_time":1000}}}"#.into(),
        ),
    ] {
        expect(&sock, method, path, Some(&body), 204);
    }
    assert!(tap_exists(&tap), "flint did not create the TAP {tap}");
    let config = expect(&sock, "GET", "/vm/config", None, 200);
    assert!(config.contains(r#""smt":true"#), "{config}");
    assert!(config.contains(s(&other)), "{config}");
    let machine = expect(&sock, "GET", "/machine-config", None, 200);
    assert!(machine.contains(r#""vcpu_count":2"#), "{machine}");
    stop_when_up(child, Some(&sock));
    assert!(!tap_exists(&tap), "flint left its TAP {tap} behind");
    assert!(!sock.exists(), "flint left its API socket behind");
}

/// firecracker-go-sdk's balloon calls (`CreateBalloon`, `GetBalloonConfig`, `UpdateBalloon`,
/// `GetBalloonStats`, `UpdateBalloonStats`) on a VM whose tiny guest has no balloon driver:
/// the target is the host's, what the guest holds stays 0.
#[test]
fn firecracker_go_sdks_balloon_calls() {
    let dir = TempDir::new("fc-balloon");
    let kernel = spinning_kernel(&dir);
    let sock = dir.0.join("balloon.sock");
    let child = start(&["--api-sock", s(&sock)], Some(&sock));
    for (method, path, body) in [
        (
            "PUT",
            "/boot-source",
            format!(
                r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k panic=1 pci=off"}}"#,
                s(&kernel)
            ),
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":64}"#.into(),
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib":16,"deflate_on_oom":true,"stats_polling_interval_s":1}"#.into(),
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#.into(),
        ),
        ("PATCH", "/balloon", r#"{"amount_mib":32}"#.into()),
        (
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s":5}"#.into(),
        ),
    ] {
        expect(&sock, method, path, Some(&body), 204);
    }
    let config = expect(&sock, "GET", "/balloon", None, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&config).unwrap(),
        serde_json::json!({"amount_mib": 32, "deflate_on_oom": true,
            "stats_polling_interval_s": 5, "free_page_reporting": false,
            "free_page_hinting": false})
    );
    let stats = expect(&sock, "GET", "/balloon/statistics", None, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stats).unwrap(),
        serde_json::json!({"target_pages": 8192, "actual_pages": 0, "target_mib": 32,
            "actual_mib": 0})
    );
    // More than the guest's memory; statistics turned off after start; a second balloon.
    for (method, path, body, says) in [
        (
            "PATCH",
            "/balloon",
            r#"{"amount_mib":65}"#,
            "larger than the guest's",
        ),
        (
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s":0}"#,
            "cannot be turned on or off",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib":1,"deflate_on_oom":false}"#,
            "before the VM starts",
        ),
    ] {
        let (status, answer) = call(&sock, method, path, Some(body));
        assert_eq!(status, 400, "{method} {path} {body}: {answer}");
        assert!(answer.contains(says), "{answer}");
    }
    let config = expect(&sock, "GET", "/vm/config", None, 200);
    assert!(config.contains(r#""balloon":{"amount_mib":32"#), "{config}");
    stop_when_up(child, Some(&sock));
}

#[test]
fn flintlocks_command_line_and_config_file() {
    let dir = TempDir::new("fc-flintlock");
    let kernel = spinning_kernel(&dir);
    let root = dir.write("root.img", &vec![0u8; 1 << 20]);
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": s(&kernel), "boot_args": "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux"},
        "drives": [{"drive_id": "root", "path_on_host": s(&root), "is_root_device": true,
                    "is_read_only": false, "cache_type": "Unsafe", "io_engine": "Sync",
                    "rate_limiter": null, "partuuid": null}],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 64, "smt": true,
                           "track_dirty_pages": false, "huge_pages": "None"},
        "network-interfaces": [],
        "mmds-config": null,
        "balloon": null,
        "vsock": null,
        "logger": {"log_path": s(&dir.0.join("flintlock.log")), "level": "Debug",
                   "show_level": true, "show_log_origin": true},
        "metrics": {"metrics_path": s(&dir.0.join("flintlock.metrics"))},
    });
    let file = dir.write("vm.json", config.to_string().as_bytes());
    let sock = dir.0.join("flintlock.sock");
    let child = start(
        &[
            "--id",
            "flintlock-vm",
            "--api-sock",
            s(&sock),
            "--config-file",
            s(&file),
            "--boot-timer",
            "--level",
            "Debug",
            "--show-level",
            "--show-log-origin",
        ],
        Some(&sock),
    );
    let (_, stderr) = stop_when_up(child, Some(&sock));
    assert!(!stderr.contains("error"), "{stderr}");
    let metrics = std::fs::read_to_string(dir.0.join("flintlock.metrics")).unwrap();
    assert!(metrics.contains(r#""put_api_requests""#), "{metrics}");
}

#[test]
fn firecrackers_example_config_file_boots_as_given() {
    let dir = TempDir::new("fc-example");
    let kernel = spinning_kernel(&dir);
    let root = dir.write("rootfs.ext4", &vec![0u8; 1 << 20]);
    // Every key Firecracker's own example files write, those flint does not use as null.
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": s(&kernel),
                        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
                        "initrd_path": null},
        "drives": [{"drive_id": "rootfs", "partuuid": null, "is_root_device": true,
                    "cache_type": "Unsafe", "is_read_only": false, "path_on_host": s(&root),
                    "io_engine": "Sync", "rate_limiter": null, "socket": null}],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 64, "smt": false,
                           "track_dirty_pages": false, "huge_pages": "None"},
        "cpu-config": null,
        "balloon": null,
        "network-interfaces": [],
        "vsock": null,
        "logger": null,
        "metrics": null,
        "mmds-config": null,
        "entropy": null,
        "pmem": null,
        "memory-hotplug": null,
        "serial": null,
    });
    let file = dir.write("vm_config.json", config.to_string().as_bytes());
    let child = start(&["--no-api", "--config-file", s(&file)], None);
    stop_when_up(child, None);
}

#[test]
fn e2bs_create_snapshot_and_resume() {
    require_tun();
    let dir = TempDir::new("fc-e2b");
    let tap = tap_name("e");
    let kernel = spinning_kernel(&dir);
    let root = dir.write("rootfs.ext4", &vec![0u8; 1 << 20]);
    let sock = dir.0.join("fc.sock");
    let a = start(&["--api-sock", s(&sock)], Some(&sock));
    let vsock = dir.0.join("v.sock");
    for (method, path, body) in [
        (
            "PUT",
            "/boot-source",
            format!(
                r#"{{"kernel_image_path":"{}","boot_args":"quiet loglevel=1 console=ttyS0 reboot=k panic=1 pci=off"}}"#,
                s(&kernel)
            ),
        ),
        (
            "PUT",
            "/drives/rootfs",
            format!(
                r#"{{"drive_id":"rootfs","path_on_host":"{}","is_root_device":true,"is_read_only":false}}"#,
                s(&root)
            ),
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":64,"smt":true}"#.into(),
        ),
        (
            "PUT",
            "/entropy",
            r#"{"rate_limiter":{"bandwidth":{"size":1048576,"one_time_burst":0,"refill_time":100}}}"#
                .into(),
        ),
        (
            "PUT",
            "/vsock",
            format!(r#"{{"guest_cid":3,"uds_path":"{}"}}"#, s(&vsock)),
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            format!(r#"{{"iface_id":"eth0","host_dev_name":"{tap}"}}"#),
        ),
        (
            "PUT",
            "/mmds/config",
            r#"{"version":"V2","network_interfaces":["eth0"]}"#.into(),
        ),
        (
            "PUT",
            "/mmds",
            r#"{"instanceID":"sbx-1","envID":"base","address":"10.0.0.2"}"#.into(),
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#.into(),
        ),
        ("PATCH", "/vm", r#"{"state":"Paused"}"#.into()),
        (
            "PUT",
            "/snapshot/create",
            format!(
                r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
                s(&dir.0.join("snapfile")),
                s(&dir.0.join("memfile"))
            ),
        ),
    ] {
        expect(&sock, method, path, Some(&body), 204);
    }
    // The MMDS configuration is for before the start.
    let (status, answer) = call(
        &sock,
        "PUT",
        "/mmds/config",
        Some(r#"{"version":"V1","network_interfaces":["eth0"]}"#),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("before the VM starts"), "{answer}");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    wait_bounded(a, Duration::from_secs(20));
    assert!(
        !tap_exists(&tap),
        "the first flint left its TAP {tap} behind"
    );

    // Resume in a new flint, the socket moved, the clock advanced if KVM saved real time.
    let sock = dir.0.join("fc2.sock");
    let b = start(&["--api-sock", s(&sock)], Some(&sock));
    let moved = dir.0.join("v2.sock");
    let load = |clock_realtime: bool| {
        format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"enable_diff_snapshots":false,"resume_vm":true,"vsock_override":{{"uds_path":"{}"}},"clock_realtime":{clock_realtime}}}"#,
            s(&dir.0.join("snapfile")),
            s(&dir.0.join("memfile")),
            s(&moved)
        )
    };
    let (status, answer) = call(&sock, "PUT", "/snapshot/load", Some(&load(true)));
    if status != 204 {
        // Only acceptable refusal: this host's KVM saved no real time with the clock.
        assert!(answer.contains("real time"), "{status}: {answer}");
        expect(&sock, "PUT", "/snapshot/load", Some(&load(false)), 204);
    }
    let state = expect(&sock, "GET", "/", None, 200);
    assert!(state.contains(r#""state":"Running""#), "{state}");
    let config = expect(&sock, "GET", "/vm/config", None, 200);
    assert!(config.contains(s(&moved)), "{config}");
    assert!(config.contains(r#""mmds-config":{"#), "{config}");
    // The MMDS data came back with the snapshot.
    let data = expect(&sock, "GET", "/mmds", None, 200);
    assert_eq!(
        data,
        r#"{"address":"10.0.0.2","envID":"base","instanceID":"sbx-1"}"#
    );
    assert!(config.contains(r#""rate_limiter""#), "{config}");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(b.id() as i32, libc::SIGTERM) };
    let out = wait_bounded(b, Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !tap_exists(&tap),
        "the resumed flint left its TAP {tap} behind"
    );
}

/// What the PyPI client does, through its own `firecracker.api.Api` class: configure and start
/// a VM, pause it, snapshot it, resume it, and load the snapshot in a second flint.
const PYPI_CLIENT: &str = r#"
import json, sys
from firecracker.api import Api

sock, sock2, kernel, snap, mem = sys.argv[1:6]
api = Api(sock)
api.boot.put(kernel_image_path=kernel, boot_args="console=ttyS0 reboot=k panic=1 pci=off")
api.machine_config.put(vcpu_count=1, mem_size_mib=64)
api.actions.put(action_type="InstanceStart")
print("STATE", api.describe.get().json()["state"])
api.vm.patch(state="Paused")
print("STATE", api.describe.get().json()["state"])
api.create_snapshot.put(snapshot_path=snap, mem_file_path=mem, snapshot_type="Full")
api.vm.patch(state="Resumed")
print("STATE", api.describe.get().json()["state"])
print("VCPUS", api.machine_config.get().json()["vcpu_count"])
api2 = Api(sock2)
api2.load_snapshot.put(
    snapshot_path=snap,
    mem_backend={"backend_type": "File", "backend_path": mem},
    resume_vm=True,
)
print("LOADED", api2.describe.get().json()["state"])
print("VERSION", api.version.get().json()["firecracker_version"])
api.close()
api2.close()
"#;

/// An unmodified Firecracker client library from PyPI (`firecracker-python`, installed by
/// resources/build-client-venv.sh) drives flint: create, start, pause, snapshot, resume, load.
/// Importing the library creates /var/lib/firecracker, so it runs with a private, empty
/// /var/lib (a mount namespace): the machine is left as it was.
#[test]
fn an_unmodified_pypi_client_drives_flint() {
    let cache = std::env::var_os("FLINT_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/flint")
        });
    let python = cache.join("venv-fc-clients/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run resources/build-client-venv.sh",
        python.display()
    );
    let dir = TempDir::new("fc-pypi");
    let kernel = spinning_kernel(&dir);
    let client_dir = Path::new("/var/lib/firecracker");
    let had_client_dir = client_dir.exists();
    let (sock, sock2) = (dir.0.join("a.sock"), dir.0.join("b.sock"));
    let a = start(&["--api-sock", s(&sock)], Some(&sock));
    let b = start(&["--api-sock", s(&sock2)], Some(&sock2));
    let script = dir.write("client.py", PYPI_CLIENT.as_bytes());
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs flint-test /var/lib && exec \"$0\" \"$@\"")
        .arg(&python)
        .arg(&script)
        .args([s(&sock), s(&sock2), s(&kernel)])
        .arg(dir.0.join("vm.snap"))
        .arg(dir.0.join("vm.mem"))
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "the client failed: {stdout}{}",
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for expected in ["STATE Running", "STATE Paused", "VCPUS 1", "LOADED Running"] {
        assert!(lines.contains(&expected), "no {expected:?} in {stdout}");
    }
    assert_eq!(
        lines.iter().filter(|l| **l == "STATE Running").count(),
        2,
        "{stdout}"
    );
    for child in [a, b] {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = wait_bounded(child, Duration::from_secs(20));
        assert_eq!(
            out.status.code(),
            Some(128 + libc::SIGTERM),
            "{}",
            text(&out.stderr)
        );
    }
    assert_eq!(
        client_dir.exists(),
        had_client_dir,
        "the client's import changed /var/lib/firecracker on the machine"
    );
}
