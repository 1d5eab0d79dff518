//! `agent-client`: a small host program around [`AgentClient`], for tests and by-hand use.
//!
//! ```text
//! agent-client UDS|vsock:CID [--port N] [--timeout SECS] [--refresh] [--env K=V]...
//!              [--workdir DIR] [--root DIR] [--user UID:GID[:GROUP,...]]
//!              [--copy-in HOST:GUEST]... [--copy-out GUEST:HOST]...
//!              [--shutdown] [-- COMMAND [ARG]...]
//! ```
//!
//! Connects to the guest agent through flint's vsock socket UDS, or with `vsock:CID` straight
//! to guest CID over AF_VSOCK (a VMM with vhost-vsock, such as QEMU), retrying for `--timeout`
//! seconds (default 60); with `--refresh` sets the guest's clock to the host's and reseeds
//! its kernel's random number generator from the host's (for a guest restored from a
//! snapshot); copies files in, runs COMMAND (with `--root`, chrooted into that guest
//! directory, where the copies' guest paths are too; with `--user`, as those numeric ids) (its stdout and stderr go to ours, our
//! stdin goes to it; SIGINT, SIGTERM and SIGHUP are forwarded to it), copies files out, then
//! with `--shutdown` powers the guest off. Exit status: the command's (128 + N when signal N
//! killed it), 127 when it could not be started, 125 for any other failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use flint_agent::{AgentClient, AgentError, ExecSpec, Signaller, UserSpec, AGENT_PORT};

/// Where the agent is.
enum Target {
    /// flint's vsock Unix socket.
    Uds(PathBuf),
    /// A guest context id, over AF_VSOCK.
    Cid(u32),
}

struct Args {
    target: Target,
    port: u32,
    timeout: Duration,
    spec: ExecSpec,
    copy_in: Vec<(PathBuf, PathBuf)>,
    copy_out: Vec<(PathBuf, PathBuf)>,
    refresh: bool,
    shutdown: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut target = None;
    let mut port = AGENT_PORT;
    let mut timeout = Duration::from_secs(60);
    let mut spec = ExecSpec::default();
    let mut copy_in = Vec::new();
    let mut copy_out = Vec::new();
    let mut refresh = false;
    let mut shutdown = false;
    let pair = |v: String, what: &str| -> Result<(PathBuf, PathBuf), String> {
        match v.split_once(':') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.into(), b.into())),
            _ => Err(format!("{what} wants SRC:DEST, got {v:?}")),
        }
    };
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--port" => port = value("--port")?.parse().map_err(|_| "bad --port")?,
            "--timeout" => {
                let secs: f64 = value("--timeout")?.parse().map_err(|_| "bad --timeout")?;
                timeout = Duration::try_from_secs_f64(secs).map_err(|_| "bad --timeout")?;
            }
            "--env" => {
                let kv = value("--env")?;
                let (k, v) = kv
                    .split_once('=')
                    .ok_or(format!("--env wants K=V, got {kv:?}"))?;
                spec.env.push((k.into(), v.into()));
            }
            "--workdir" => spec.workdir = Some(value("--workdir")?),
            "--root" => spec.root = Some(value("--root")?),
            "--user" => spec.user = Some(parse_user(&value("--user")?)?),
            "--copy-in" => copy_in.push(pair(value("--copy-in")?, "--copy-in")?),
            "--copy-out" => copy_out.push(pair(value("--copy-out")?, "--copy-out")?),
            "--refresh" => refresh = true,
            "--shutdown" => shutdown = true,
            "--" => {
                spec.argv = it.by_ref().collect();
                if spec.argv.is_empty() {
                    return Err("no command after --".into());
                }
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s if target.is_none() => {
                target = Some(match s.strip_prefix("vsock:") {
                    Some(cid) => Target::Cid(cid.parse().map_err(|_| format!("bad CID in {s:?}"))?),
                    None => Target::Uds(PathBuf::from(s)),
                })
            }
            s => return Err(format!("unexpected argument {s:?}")),
        }
    }
    Ok(Args {
        target: target.ok_or("missing the vsock socket path (UDS) or vsock:CID")?,
        port,
        timeout,
        spec,
        copy_in,
        copy_out,
        refresh,
        shutdown,
    })
}

/// `UID:GID[:GROUP,...]`, all numeric.
fn parse_user(s: &str) -> Result<UserSpec, String> {
    let bad = || format!("--user wants UID:GID[:GROUP,...] (numbers), got {s:?}");
    let mut parts = s.splitn(3, ':');
    let id = |part: Option<&str>| part.and_then(|p| p.parse::<u32>().ok()).ok_or_else(bad);
    let uid = id(parts.next())?;
    let gid = id(parts.next())?;
    let groups = match parts.next() {
        None | Some("") => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|g| id(Some(g)))
            .collect::<Result<_, _>>()?,
    };
    Ok(UserSpec { uid, gid, groups })
}

/// Block the forwarded signals in this thread (and the threads it starts later) and forward
/// them from a thread of their own.
fn forward_signals(signaller: Signaller) {
    let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it in place and
    // pthread_sigmask reads it; all pointers are to this local for the calls' duration.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    for s in signals {
        // A shell starts background jobs with SIGINT ignored, and an ignored signal never
        // becomes pending for sigwait: take the default back (it is blocked, so it only
        // queues).
        // SAFETY: installs the default disposition; no handler code and no pointers.
        unsafe { libc::signal(s, libc::SIG_DFL) };
    }
    std::thread::spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` and `sig` are valid for the call; sigwait only reads the one and
        // writes the other.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            let _ = signaller.signal(sig);
        }
    });
}

fn run(args: &Args) -> Result<i32, AgentError> {
    let mut client = match &args.target {
        Target::Uds(path) => AgentClient::connect(path, args.port, args.timeout)?,
        Target::Cid(cid) => flint_agent::vsock::connect_agent(*cid, args.port, args.timeout)?,
    };
    forward_signals(client.signaller());
    client.set_root(args.spec.root.as_deref());
    if args.refresh {
        client.refresh()?;
    }
    for (host, guest) in &args.copy_in {
        client.copy_in(host, guest)?;
    }
    let mut code = 0;
    if !args.spec.argv.is_empty() {
        let status = client.run(
            &args.spec,
            Some(std::io::stdin()),
            std::io::stdout().lock(),
            std::io::stderr().lock(),
        )?;
        code = status.code();
    }
    for (guest, host) in &args.copy_out {
        client.copy_out(guest, Path::new(host))?;
    }
    if args.shutdown {
        client.shutdown()?;
    }
    Ok(code)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("agent-client: error: {e}");
            eprintln!(
                "usage: agent-client UDS|vsock:CID [--port N] [--timeout SECS] [--refresh] [--env K=V]... [--workdir DIR] \
                 [--root DIR] [--user UID:GID[:GROUP,...]] [--copy-in HOST:GUEST]... [--copy-out GUEST:HOST]... [--shutdown] [-- COMMAND [ARG]...]"
            );
            return ExitCode::from(125);
        }
    };
    match run(&args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("agent-client: error: {e}");
            ExitCode::from(if matches!(e, AgentError::NotStarted(_)) {
                127
            } else {
                125
            })
        }
    }
}
