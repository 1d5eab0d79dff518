//! The API server end to end over a real Unix socket, with a fake VMM thread that records the
//! requests it gets and answers them with canned responses. No VM, no KVM.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flint::api::routes::Reply;
use flint::api::{ApiError, ApiRequest, ApiServer};
use flint::config_file;
use serde_json::{json, Value};
use vmm::controller::{
    BootSource, ConfigView, InstanceInfo, MachineUpdate, Request, RequestError, Response, VmState,
};
use vmm::{CacheType, DriveConfig, NetConfig, VmConfig, VsockConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long a client waits for an answer before the test fails.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The tests run one at a time: the memory test measures this process.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh directory for one test's socket.
fn temp_dir() -> PathBuf {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flint-api-{}-{}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn full_config() -> ConfigView {
    ConfigView {
        boot_source: Some(BootSource {
            kernel: "/k".into(),
            initrd: None,
            cmdline: None,
        }),
        vm: VmConfig {
            drives: vec![DriveConfig {
                id: Some("rootfs".into()),
                root: true,
                cache: CacheType::Unsafe,
                ..DriveConfig::new("/r")
            }],
            ..VmConfig::new("/k")
        },
        metrics: None,
    }
}

/// What the fake VMM answers.
fn canned(request: &ApiRequest) -> Result<Response, RequestError> {
    let ApiRequest::Vmm(request) = request else {
        return Ok(Response::Done);
    };
    match request {
        Request::Describe => Ok(Response::Info(InstanceInfo {
            id: "test-vm".into(),
            state: VmState::NotStarted,
            vmm_version: "0.1.0".into(),
        })),
        Request::GetMachineConfig | Request::GetFullConfig => {
            Ok(Response::Config(Box::new(full_config())))
        }
        Request::SetDrive(d) if d.id.as_deref() == Some("refused") => Err(RequestError {
            field: None,
            message: "the drive refused cannot be opened".into(),
        }),
        Request::GetBalloon => Err(RequestError {
            field: None,
            message: "the VM has no balloon device".into(),
        }),
        _ => Ok(Response::Done),
    }
}

type Queue = Receiver<(ApiRequest, Sender<Reply>)>;

/// A fake VMM thread: records requests (when `record`) and answers with [`canned`]. It ends
/// when the server drops its sender.
fn fake_vmm(rx: Queue, record: bool) -> (Arc<Mutex<Vec<ApiRequest>>>, JoinHandle<()>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    let thread = std::thread::spawn(move || {
        for (request, reply) in rx {
            let answer = flint::api::routes::reply_for(&request, canned(&request), None);
            if record {
                log2.lock().unwrap().push(request);
            }
            let _ = reply.send(answer);
        }
    });
    (log, thread)
}

struct Fixture {
    server: Option<ApiServer>,
    socket: PathBuf,
    dir: PathBuf,
    log: Arc<Mutex<Vec<ApiRequest>>>,
    vmm: Option<JoinHandle<()>>,
    _serial: MutexGuard<'static, ()>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with_recording(true)
    }

    fn with_recording(record: bool) -> Fixture {
        let serial = serial();
        let dir = temp_dir();
        let socket = dir.join("api.sock");
        let (tx, rx) = mpsc::channel();
        let (log, vmm) = fake_vmm(rx, record);
        let server = ApiServer::start(&socket, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        Fixture {
            server: Some(server),
            socket,
            dir,
            log,
            vmm: Some(vmm),
            _serial: serial,
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket)
    }

    fn requests(&self) -> Vec<ApiRequest> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        if let Some(vmm) = self.vmm.take() {
            vmm.join().unwrap();
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One answer as the client read it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("answer body is not JSON ({e}): {self:?}"))
    }

    fn fault(&self) -> String {
        let msg = self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {self:?}"))
            .to_string();
        assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
        msg
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A hand-written HTTP/1.1 client on a Unix socket.
struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn send(&mut self, method: &str, path: &str, body: Option<&str>) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        if let Some(b) = body {
            req += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            );
        }
        req += "\r\n";
        req += body.unwrap_or("");
        self.raw(req.as_bytes());
    }

    /// Read one answer; `None` if the server closed the connection first.
    fn try_answer(&mut self) -> Option<Answer> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = resp.parse(&self.buf).unwrap() {
                let status = resp.code.unwrap();
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, v)| v.parse().unwrap());
                if self.buf.len() >= head + len {
                    let body = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    return Some(Answer {
                        status,
                        headers,
                        body,
                    });
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("no answer from the server: {e}"),
            }
        }
    }

    fn answer(&mut self) -> Answer {
        self.try_answer()
            .expect("the server closed the connection without answering")
    }

    fn call(&mut self, method: &str, path: &str, body: Option<&str>) -> Answer {
        self.send(method, path, body);
        self.answer()
    }

    /// Whether the server closed the connection (reads EOF within the timeout).
    fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0))
    }
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn every_endpoint_answers_and_reaches_the_vmm() {
    let f = Fixture::new();
    let mut c = f.client();

    let a = c.call("GET", "/", None);
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(
        a.json(),
        json!({"id": "test-vm", "state": "Not started", "vmm_version": "0.1.0",
               "app_name": "flint"})
    );

    let a = c.call("GET", "/version", None);
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["firecracker_version"], env!("CARGO_PKG_VERSION"));

    let a = c.call("GET", "/machine-config", None);
    assert_eq!(
        a.json(),
        json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
               "track_dirty_pages": false, "huge_pages": "None"})
    );

    let a = c.call("GET", "/vm/config", None);
    assert_eq!(a.status, 200);
    assert_eq!(a.json(), config_file::to_json(&full_config(), None));
    assert_eq!(a.json()["drives"][0]["drive_id"], "rootfs");

    let puts: &[(&str, &str, &str)] = &[
        (
            "PUT",
            "/logger",
            r#"{"log_path": "/tmp/l", "level": "Info"}"#,
        ),
        ("PUT", "/metrics", r#"{"metrics_path": "/tmp/m"}"#),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        ),
        ("PATCH", "/machine-config", r#"{"mem_size_mib": 512}"#),
        (
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}"#,
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#,
        ),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#,
        ),
        ("PUT", "/entropy", "{}"),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
        ("PATCH", "/vm", r#"{"state": "Paused"}"#),
        ("PATCH", "/vm", r#"{"state": "Resumed"}"#),
        (
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/r2"}"#,
        ),
        ("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#),
        ("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
    ];
    for (method, path, body) in puts {
        let a = c.call(method, path, Some(body));
        assert_eq!(a.status, 204, "{method} {path}: {a:?}");
        assert!(a.body.is_empty());
        assert_eq!(a.header("content-length"), None);
    }

    let got = f.requests();
    let mut loggers = 0;
    // GET /version is answered without the VMM.
    assert_eq!(got.len(), 3 + puts.len());
    let got: Vec<Request> = got
        .into_iter()
        .filter_map(|r| match r {
            ApiRequest::Vmm(r) => Some(r),
            ApiRequest::SetLogger(_) => {
                loggers += 1;
                None
            }
        })
        .collect();
    assert_eq!(loggers, 1);
    assert_eq!(got[0], Request::Describe);
    assert_eq!(got[1], Request::GetMachineConfig);
    assert_eq!(got[2], Request::GetFullConfig);
    assert_eq!(
        got[6],
        Request::UpdateMachineConfig(MachineUpdate {
            mem_mib: Some(512),
            ..Default::default()
        })
    );
    assert_eq!(
        got[8],
        Request::SetNetworkInterface(NetConfig {
            id: Some("eth0".into()),
            mac: Some([6, 0, 0xac, 0x10, 0, 2]),
            ..NetConfig::new("tap0")
        })
    );
    assert_eq!(
        got[9],
        Request::SetVsock(VsockConfig {
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into()
        })
    );
    assert_eq!(
        &got[10..],
        &[
            Request::SetEntropy(None),
            Request::Start,
            Request::Pause,
            Request::Resume,
            Request::UpdateDrive {
                id: "rootfs".into(),
                path: Some("/r2".into()),
                rate_limiter: None,
            },
            Request::FlushMetrics,
            Request::SendCtrlAltDel,
        ]
    );
}

#[test]
fn errors_have_a_status_and_a_fault_message() {
    let f = Fixture::new();
    let mut c = f.client();

    let a = c.call(
        "PUT",
        "/drives/refused",
        Some(r#"{"drive_id": "refused", "path_on_host": "/x", "is_root_device": false}"#),
    );
    assert_eq!(
        (a.status, a.fault()),
        (400, "the drive refused cannot be opened".into())
    );

    let a = c.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": "two", "mem_size_mib": 128}"#),
    );
    assert_eq!(a.status, 400);
    assert!(a.fault().starts_with("vcpu_count must be a whole number"));

    let a = c.call(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}"#),
    );
    assert_eq!(a.status, 400);
    assert!(a.fault().starts_with("guest_mac must be a MAC address"));

    let a = c.call("PUT", "/boot-source", Some("not json"));
    assert_eq!(a.status, 400);
    assert!(a.fault().starts_with("the body is not valid JSON"));

    let a = c.call("GET", "/balloon", None);
    assert_eq!(
        (a.status, a.fault()),
        (400, "the VM has no balloon device".into())
    );
    let a = c.call("PATCH", "/balloon/hinting/start", Some("{}"));
    assert_eq!(a.status, 400);
    assert!(a.fault().contains("no free page hinting"), "{}", a.fault());
    let a = c.call("GET", "/nope", None);
    assert_eq!((a.status, a.fault()), (404, "no such path: /nope".into()));

    let a = c.call("DELETE", "/vm", None);
    assert_eq!(a.status, 405);
    assert_eq!(a.header("allow"), Some("PATCH"));
    a.fault();

    // None of these reached the VMM except the refused drive and the balloon the VMM does not
    // have; the connection is still usable.
    assert_eq!(f.requests().len(), 2);
    assert_eq!(c.call("GET", "/", None).status, 200);
}

#[test]
fn an_oversized_body_is_refused_and_the_connection_closed() {
    let f = Fixture::new();
    let mut c = f.client();
    let body = format!(
        r#"{{"kernel_image_path": "/k", "boot_args": "{}"}}"#,
        "x".repeat(60 * 1024)
    );
    c.raw(
        format!(
            "PUT /boot-source HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    // The server answers from the head alone, without reading the body.
    let a = c.answer();
    assert_eq!(a.status, 413);
    assert!(a.fault().contains("more than the limit of 51200"), "{a:?}");
    assert_eq!(a.header("connection"), Some("close"));
    // Sending the body may fail once the server has closed the connection.
    let _ = c.stream.write_all(body.as_bytes());
    assert!(c.try_answer().is_none());
    assert!(f.requests().is_empty());

    // A body at the limit is read.
    let mut c = f.client();
    let pad = 50 * 1024 - r#"{"kernel_image_path": "/k", "boot_args": ""}"#.len();
    let body = format!(
        r#"{{"kernel_image_path": "/k", "boot_args": "{}"}}"#,
        "x".repeat(pad)
    );
    assert_eq!(body.len(), 50 * 1024);
    assert_eq!(c.call("PUT", "/boot-source", Some(&body)).status, 204);
}

#[test]
fn a_stalled_client_does_not_hold_up_another() {
    let f = Fixture::new();
    let mut slow = f.client();
    slow.raw(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 27\r\n\r\n{\"kernel_im");
    let mut slow_head = f.client();
    slow_head.raw(b"GET /machine-con");

    let start = Instant::now();
    let mut fast = f.client();
    for _ in 0..10 {
        assert_eq!(fast.call("GET", "/", None).status, 200);
    }
    assert!(start.elapsed() < Duration::from_secs(2));

    // The slow clients are still served when they finish.
    slow.raw(b"age_path\": \"/k\"}");
    assert_eq!(slow.answer().status, 204);
    slow_head.raw(b"fig HTTP/1.1\r\n\r\n");
    assert_eq!(slow_head.answer().status, 200);
}

#[test]
fn half_closed_connections_get_their_answers() {
    let f = Fixture::new();
    // A full request, then the client shuts its writing side: the answer still comes, then
    // the server closes.
    let mut c = f.client();
    c.send("GET", "/", None);
    c.send("PUT", "/entropy", Some("{}"));
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.answer().status, 200);
    assert_eq!(c.answer().status, 204);
    assert!(c.try_answer().is_none());

    // Half a request, then shutdown: the server closes without answering or waiting.
    let mut c = f.client();
    c.raw(b"PUT /entropy HTTP/1.1\r\nContent-Length: 10\r\n\r\n{");
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.try_answer().is_none());

    // A client that disappears with an answer pending does not disturb the server.
    let mut c = f.client();
    c.send("GET", "/vm/config", None);
    drop(c);
    assert_eq!(f.client().call("GET", "/", None).status, 200);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let f = Fixture::new();
    let mut c = f.client();
    c.raw(
        b"GET / HTTP/1.1\r\n\r\nPUT /entropy HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}\
          GET /nope HTTP/1.1\r\n\r\nGET /version HTTP/1.1\r\n\r\n",
    );
    let statuses: Vec<u16> = (0..4).map(|_| c.answer().status).collect();
    assert_eq!(statuses, [200, 204, 404, 200]);
}

#[test]
fn expect_continue_and_connection_close() {
    let f = Fixture::new();
    let mut c = f.client();
    c.raw(b"PUT /entropy HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(c.answer().status, 100);
    c.raw(b"{}");
    assert_eq!(c.answer().status, 204);

    let mut c = f.client();
    c.raw(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    let a = c.answer();
    assert_eq!((a.status, a.header("connection")), (200, Some("close")));
    assert!(c.closed_by_server());

    let mut c = f.client();
    c.raw(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(c.answer().status, 200);
    assert!(c.closed_by_server());

    // Garbage gets 400 and a closed connection.
    let mut c = f.client();
    c.raw(b"\x16\x03\x01 hello\r\n\r\n");
    let a = c.answer();
    assert_eq!(a.status, 400);
    a.fault();
    assert!(c.closed_by_server());
}

#[test]
fn a_thousand_requests_on_one_connection_do_not_grow_memory() {
    let f = Fixture::with_recording(false);
    let mut c = f.client();
    let body = r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}"#;
    let mut round = |n: usize| {
        for i in 0..n {
            let a = if i % 2 == 0 {
                c.call("GET", "/vm/config", None)
            } else {
                c.call("PUT", "/drives/rootfs", Some(body))
            };
            assert!(a.status == 200 || a.status == 204, "{a:?}");
        }
    };
    round(200);
    let before = vm_rss_kib();
    round(1000);
    let after = vm_rss_kib();
    assert!(
        after <= before + 512,
        "VmRSS grew from {before} KiB to {after} KiB over 1,000 requests"
    );
}

#[test]
fn the_socket_file_lives_as_long_as_the_server() {
    let mut f = Fixture::new();
    let socket = f.socket.clone();
    assert!(socket.exists());

    // A second server on the same live socket is refused.
    let (tx, _rx) = mpsc::channel();
    let e = ApiServer::start(&socket, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap_err();
    assert!(matches!(e, ApiError::InUse(_)));
    assert_eq!(
        e.to_string(),
        format!(
            "the API socket {} is in use by another process",
            socket.display()
        )
    );

    f.stop();
    assert!(!socket.exists(), "the socket file was left behind");
}

#[test]
fn stale_sockets_are_replaced_and_other_files_are_not() {
    let _serial = serial();
    let dir = temp_dir();

    // A socket file nobody listens on any more.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let (tx, rx) = mpsc::channel();
    let (_log, vmm) = fake_vmm(rx, false);
    let server = ApiServer::start(&stale, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    assert_eq!(Client::connect(&stale).call("GET", "/", None).status, 200);
    server.stop();
    vmm.join().unwrap();
    assert!(!stale.exists());

    // A regular file is never removed.
    let file = dir.join("file");
    std::fs::write(&file, "keep me").unwrap();
    let (tx, _rx) = mpsc::channel();
    let e = ApiServer::start(&file, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the API socket path {} exists and is not a socket",
            file.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    // A directory that does not exist.
    let (tx, _rx) = mpsc::channel();
    let e = ApiServer::start(
        &dir.join("no/such/dir.sock"),
        tx,
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap_err();
    assert!(
        e.to_string().starts_with("cannot create the API socket "),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_vmm_that_is_gone_gets_an_error_answer_not_a_hang() {
    let _serial = serial();
    let dir = temp_dir();
    let socket = dir.join("api.sock");

    // The VMM thread's queue is gone.
    let (tx, rx) = mpsc::channel();
    drop(rx);
    let server = ApiServer::start(&socket, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    let mut c = Client::connect(&socket);
    let a = c.call("GET", "/", None);
    assert_eq!(
        (a.status, a.fault()),
        (503, "the VMM is not running".into())
    );
    // Requests answered without the VMM still work.
    assert_eq!(c.call("GET", "/version", None).status, 200);
    server.stop();

    // The VMM thread takes the request and goes away without answering.
    let (tx, rx) = mpsc::channel::<(ApiRequest, Sender<Reply>)>();
    let vmm = std::thread::spawn(move || {
        let (_request, reply) = rx.recv().unwrap();
        drop(reply);
        drop(rx);
    });
    let server = ApiServer::start(&socket, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    let mut c = Client::connect(&socket);
    let a = c.call("PUT", "/entropy", Some("{}"));
    assert_eq!(
        (a.status, a.fault()),
        (503, "the VMM stopped before answering".into())
    );
    vmm.join().unwrap();
    let a = c.call("PUT", "/entropy", Some("{}"));
    assert_eq!(a.status, 503);
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stopping_while_a_request_waits_for_the_vmm_does_not_deadlock() {
    let _serial = serial();
    let dir = temp_dir();
    let socket = dir.join("api.sock");
    // A VMM thread that takes requests and never answers while the server stops.
    let (tx, rx) = mpsc::channel::<(ApiRequest, Sender<Reply>)>();
    let server = ApiServer::start(&socket, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    let mut c = Client::connect(&socket);
    c.send(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    let (_request, _reply) = rx.recv_timeout(CLIENT_TIMEOUT).unwrap();
    let start = Instant::now();
    server.stop();
    assert!(start.elapsed() < Duration::from_secs(2));
    // The waiting client got an answer before the server went away.
    let a = c.answer();
    assert_eq!(
        (a.status, a.fault()),
        (503, "flint is shutting down".into())
    );
    assert!(!socket.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_vmm_is_woken_for_each_request() {
    let _serial = serial();
    let dir = temp_dir();
    let socket = dir.join("api.sock");
    let wake = EventFd::new(EFD_NONBLOCK).unwrap();
    let (tx, rx) = mpsc::channel();
    let (_log, vmm) = fake_vmm(rx, false);
    let server = ApiServer::start(&socket, tx, wake.try_clone().unwrap()).unwrap();
    let mut c = Client::connect(&socket);
    for _ in 0..3 {
        c.call("GET", "/", None);
    }
    c.call("GET", "/version", None);
    assert_eq!(wake.read().unwrap(), 3);
    server.stop();
    vmm.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn many_clients_at_once() {
    let f = Fixture::with_recording(false);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let socket = f.socket.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket);
                for _ in 0..50 {
                    assert_eq!(c.call("GET", "/machine-config", None).status, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Not a test: serves the API with the fake VMM for a fuzzer such as schemathesis, e.g.
/// `FLINT_API_SOCKET=/tmp/api.sock FLINT_API_SERVE_SECS=300 cargo test --test api
/// serve_for_fuzzing -- --ignored`.
#[test]
#[ignore]
fn serve_for_fuzzing() {
    let socket = PathBuf::from(
        std::env::var_os("FLINT_API_SOCKET").expect("set FLINT_API_SOCKET to a socket path"),
    );
    let secs: u64 = std::env::var("FLINT_API_SERVE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let (tx, rx) = mpsc::channel();
    let (_log, vmm) = fake_vmm(rx, false);
    let server = ApiServer::start(&socket, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    std::thread::sleep(Duration::from_secs(secs));
    server.stop();
    vmm.join().unwrap();
}
