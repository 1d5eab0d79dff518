//! The jailed flint's process: forked in a new PID namespace, held until it is in the
//! jail's cgroup, then in the child: namespaces, the jail root, rlimits, the jail's user and
//! `exec /flint`; in the jail process: signals forwarded, and the child's exit status.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use rustix::fs::{Gid, Mode, OFlags, Uid};
use rustix::io::Errno;
use rustix::process::{Pid, Signal};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

use crate::cgroup::Cgroup;
use crate::devices::{devices_for_host, Device};
use crate::error::{Context, Error, Result};
use crate::options::JailOptions;
use crate::rlimit::{self, Rlimit};
use crate::root;
use crate::tree::cstring;

/// Where the jailed flint is in the jail.
const FLINT: &str = "/flint";
/// The signals the jail process passes on to the jailed flint.
const FORWARDED: [Signal; 3] = [Signal::INT, Signal::TERM, Signal::HUP];

/// What the child does, with every path and device looked up before the fork.
pub(crate) struct ChildPlan {
    root: CString,
    netns: Option<(CString, String)>,
    hostname: String,
    rlimits: Vec<(Rlimit, u64)>,
    devices: Vec<Device>,
    uid: u32,
    gid: u32,
    args: Vec<String>,
}

impl ChildPlan {
    /// The plan for the jail `o` whose root is `root`.
    pub(crate) fn new(o: &JailOptions, root: &Path) -> Result<ChildPlan> {
        if let Some(a) = o.flint_args.iter().find(|a| a.contains('\0')) {
            return Err(Error::NulInArgument(a.clone()));
        }
        let netns = match &o.netns {
            Some(p) => Some((cstring(p)?, p.display().to_string())),
            None => None,
        };
        Ok(ChildPlan {
            root: cstring(root)?,
            netns,
            hostname: o.id.clone(),
            rlimits: rlimit::with_defaults(&o.rlimits),
            devices: devices_for_host(),
            uid: o.uid,
            gid: o.gid,
            args: o.flint_args.clone(),
        })
    }

    /// Enter the jail and exec the jailed flint; returns only on failure.
    fn enter(&self) -> Error {
        match self.try_enter() {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    fn try_enter(&self) -> Result<std::convert::Infallible> {
        let mut flags = UnshareFlags::NEWNS | UnshareFlags::NEWIPC | UnshareFlags::NEWUTS;
        if let Some((path, shown)) = &self.netns {
            let fd = rustix::fs::open(
                path.as_c_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .cannot(|| format!("open the network namespace {shown}"))?;
            rustix::thread::move_into_link_name_space(fd.as_fd(), Some(LinkNameSpaceType::Network))
                .cannot(|| format!("join the network namespace {shown}"))?;
        } else {
            flags |= UnshareFlags::NEWNET;
        }
        // SAFETY: without CLONE_FILES no descriptor becomes invalid for another thread (and
        // this child has no other thread).
        unsafe { rustix::thread::unshare_unsafe(flags) }
            .cannot(|| "create the jail's namespaces".into())?;
        root::enter(&self.root)?;
        root::mount_proc()?;
        root::mount_dev(&self.devices, self.uid, self.gid)?;
        rustix::system::sethostname(self.hostname.as_bytes())
            .cannot(|| "set the jail's hostname".into())?;
        root::hand_over(self.uid, self.gid)?;
        rlimit::apply(&self.rlimits)?;
        close_other_fds();
        drop_privileges(self.uid, self.gid)?;
        // The environment is inherited; std gives the new program an empty signal mask and
        // the default SIGPIPE disposition (flint sets its own again).
        let e = Command::new(FLINT).args(&self.args).exec();
        Err(e).cannot(|| format!("run {FLINT} in the jail"))
    }
}

/// Become `uid`:`gid` with no supplementary groups, for good, and with `no_new_privs`.
fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    // This child has one thread: the per-thread calls change the whole process.
    rustix::thread::set_thread_groups(&[]).cannot(|| "drop the supplementary groups".into())?;
    let g = Gid::from_raw(gid);
    rustix::thread::set_thread_res_gid(g, g, g).cannot(|| format!("switch to group {gid}"))?;
    let u = Uid::from_raw(uid);
    rustix::thread::set_thread_res_uid(u, u, u).cannot(|| format!("switch to user {uid}"))?;
    rustix::thread::set_no_new_privs(true).cannot(|| "set no_new_privs".into())
}

/// Close every file descriptor above 2.
fn close_other_fds() {
    // SAFETY: close_range takes plain integers; this single-threaded child owns every fd it
    // closes and uses none of them again.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r < 0 {
        for fd in 3..1024 {
            // SAFETY: as above; closing an fd that is not open is harmless.
            unsafe { libc::close(fd) };
        }
    }
}

/// End the child at once, without running the jail process's destructors or atexit
/// handlers (its buffers and the jail's cleanup are the jail process's).
fn exit_child(code: i32) -> ! {
    // SAFETY: _exit takes a plain integer and never returns.
    unsafe { libc::_exit(code) }
}

/// The jailed flint's host PID, for the signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    // An atomic load and a kill system call: async-signal-safe.
    let child = Pid::from_raw(CHILD.load(Ordering::SeqCst));
    if let (Some(child), Some(sig)) = (child, Signal::from_named_raw(sig)) {
        let _ = rustix::process::kill_process(child, sig);
    }
}

/// Fork the child in a new PID namespace, move it into `cgroups`, let it go and wait for it.
/// Returns the exit status to use.
pub(crate) fn spawn_and_wait(plan: &ChildPlan, cgroups: &[Cgroup]) -> Result<u8> {
    let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .cannot(|| "create a pipe".into())?;
    // SAFETY: without CLONE_FILES, unshare cannot make a descriptor another thread uses
    // invalid; CLONE_NEWPID only affects this process's future children.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWPID) }
        .cannot(|| "create a PID namespace for the jail".into())?;
    // SAFETY: this process is single-threaded here, so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error()).cannot(|| "fork the jail".into());
    }
    if pid == 0 {
        child(plan, read_end, write_end);
    }
    CHILD.store(pid, Ordering::SeqCst);
    drop(read_end);
    let joined = cgroups.iter().try_for_each(|cg| cg.join(pid));
    if joined.is_ok() {
        for sig in FORWARDED {
            // SAFETY: forward_signal is async-signal-safe (an atomic load and kill).
            unsafe {
                libc::signal(
                    sig.as_raw(),
                    forward_signal as *const () as libc::sighandler_t,
                )
            };
        }
        // Should the child be gone already, waiting says how it ended.
        let _ = rustix::io::write(&write_end, b"g");
    }
    // Without "g", the child exits.
    drop(write_end);
    let status = wait_for(pid);
    CHILD.store(0, Ordering::SeqCst);
    joined?;
    status
}

/// The forked child: wait for the jail process's go, then enter the jail; never returns.
fn child(plan: &ChildPlan, read_end: OwnedFd, write_end: OwnedFd) -> ! {
    drop(write_end);
    let mut go = [0u8; 1];
    if rustix::io::read(&read_end, &mut go) != Ok(1) {
        // The jail process failed and says why.
        exit_child(1);
    }
    let message = plan.enter();
    // No eprintln: a panic here would unwind into the parent's cleanup.
    let _ = std::io::Write::write_all(
        &mut io::stderr(),
        format!("flint: error: {message}\n").as_bytes(),
    );
    exit_child(1)
}

fn wait_for(pid: libc::pid_t) -> Result<u8> {
    use rustix::process::{waitpid, WaitOptions};
    let pid = Pid::from_raw(pid).expect("a forked child's PID is positive");
    let status = loop {
        match waitpid(Some(pid), WaitOptions::empty()) {
            Ok(Some((_, status))) => break status,
            Ok(None) | Err(Errno::INTR) => {}
            Err(e) => return Err(e).cannot(|| "wait for the jailed flint".into()),
        }
    };
    Ok(exit_status(
        status.exit_status(),
        status.terminating_signal(),
    ))
}

/// The status `flint jail` exits with for a child that exited with `code` or was killed by
/// `signal`: the same code, or 128 + the signal.
fn exit_status(code: Option<i32>, signal: Option<i32>) -> u8 {
    match (code, signal) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::tests::options;
    use crate::tree::tests::message;

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(Some(0), None), 0);
        assert_eq!(exit_status(Some(3), None), 3);
        assert_eq!(exit_status(Some(255), None), 255);
        assert_eq!(exit_status(None, Some(libc::SIGTERM)), 143);
        assert_eq!(exit_status(None, Some(libc::SIGKILL)), 137);
        assert_eq!(exit_status(None, Some(libc::SIGINT)), 130);
        assert_eq!(exit_status(None, None), 1);
    }

    #[test]
    fn the_plan_is_made_before_the_fork() {
        let mut o = options("plan");
        o.flint_args = vec!["boot".into(), "--kernel".into(), "/k".into()];
        o.netns = Some("/var/run/netns/n".into());
        let plan = ChildPlan::new(&o, Path::new("/srv/flint/plan/root")).unwrap();
        assert_eq!(plan.root.as_c_str(), c"/srv/flint/plan/root");
        let (path, shown) = plan.netns.as_ref().unwrap();
        assert_eq!(
            (path.as_c_str(), shown.as_str()),
            (c"/var/run/netns/n", "/var/run/netns/n")
        );
        assert_eq!(plan.hostname, "plan");
        assert_eq!(plan.args, ["boot", "--kernel", "/k"]);
        assert_eq!(plan.rlimits, [(Rlimit::NoFile, 8192)]);
        assert_eq!((plan.uid, plan.gid), (10123, 10124));
        assert_eq!(plan.devices, devices_for_host());

        o.flint_args.push("a\0b".into());
        assert_eq!(
            message(ChildPlan::new(&o, Path::new("/r"))),
            "the argument 'a\0b' contains a NUL byte"
        );
    }

    #[test]
    fn forwarded_signals_are_those_that_end_flint() {
        let raw: Vec<i32> = FORWARDED.iter().map(|s| s.as_raw()).collect();
        assert_eq!(raw, [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
        // No child: the handler does nothing (and does not signal process 0's group).
        CHILD.store(0, Ordering::SeqCst);
        forward_signal(libc::SIGTERM);
    }
}
