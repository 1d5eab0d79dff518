//! The VM side of flint's containerd runtime shim (`containerd-shim-flint-v2`, the `shim/`
//! crate): a container's root file system made into the read-only disk a sandbox mounts, and
//! the sandbox VM that runs the container's processes through the guest agent.
//!
//! The root file system comes as containerd's snapshotter hands it to a shim: a list of
//! mounts (an `overlay` for the default overlayfs snapshotter, a `bind` for the native one)
//! to be mounted on the bundle's `rootfs` directory, or none when the directory is filled
//! already. [`make_root_disk`] mounts them in a mount namespace of its own thread, so nothing
//! is ever mounted where the host (or containerd) sees it and nothing stays mounted once the
//! disk is built, even if the shim is killed meanwhile; then it builds an ext4 disk of the
//! tree with `mkfs.ext4 -d`, as `flint run --image` does for an image's unpacked layers. The
//! guest mounts that disk read-only under an overlay whose writes stay in guest memory (see
//! [`flint_agent::IMAGE_PARAM`]): the snapshot's upper directory is not written.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;

use flint_agent::poll::wait_readable;
use vmm::config::{DEFAULT_MEM_MIB, DEFAULT_VCPUS};
use vmm::{Ending, Vm};
use vmm_sys_util::eventfd::EventFd;

use super::console::{console_tail, console_to};
use super::image::{self, ImageError};
use super::podnet::{self, PodNet, PodNetError};
use super::{machine, RunOptions, SetupError};

/// What a pod's VM is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    /// Guest kernel (default: `$FLINT_CACHE/guest/vmlinux`).
    pub kernel: Option<PathBuf>,
    /// Sandbox initramfs with busybox and the agent (default:
    /// `$FLINT_CACHE/sandbox/initramfs.cpio.gz`).
    pub initramfs: Option<PathBuf>,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// The network namespace whose network the guest gets, if any.
    pub network: Option<PodNetwork>,
}

impl Default for PodSettings {
    fn default() -> Self {
        PodSettings {
            kernel: None,
            initramfs: None,
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            network: None,
        }
    }
}

/// The network of a pod's VM: the network namespace (CNI's, or any named by the
/// container's OCI spec) whose IPv4 interface the guest's NIC takes over (see
/// [`super::podnet`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    /// The namespace's path (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// The guest's name servers (its `/etc/resolv.conf`), at most 3 used.
    pub dns: Vec<Ipv4Addr>,
}

/// One mount of a container's root file system, as containerd's `Mount` has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootMount {
    /// `overlay`, `bind`, or a file system type (`ext4`, ...).
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Why a pod's root disk or VM could not be made.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PodError(#[from] Inner);

#[derive(Debug, thiserror::Error)]
enum Inner {
    #[error("the {what} {} does not exist (build it with {hint}, or name another in the shim's configuration file)", path.display())]
    MissingImage {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("the container's VM cannot be made: {0}")]
    VmConfig(vmm::ConfigError),
    #[error("the container's root file system cannot be made into a disk: {0}")]
    Disk(#[from] ImageError),
    #[error("cannot mount the container's root file system ({fstype} from {from}): {error}")]
    Mount {
        fstype: String,
        from: String,
        error: std::io::Error,
    },
    #[error("cannot make a private mount namespace for the container's root file system: {0}")]
    Namespace(std::io::Error),
    #[error("a mount of the container's root file system has a NUL byte in it")]
    Nul,
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot watch the VM: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Net(#[from] PodNetError),
    #[error("cannot create the placeholder disk {}: {error}", path.display())]
    Placeholder {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl From<PodNetError> for PodError {
    fn from(e: PodNetError) -> Self {
        PodError(Inner::Net(e))
    }
}

/// `mount(2)` flags and the file system's own options of `options`, as `mount(8)` takes them.
fn mount_flags(options: &[String]) -> (libc::c_ulong, String) {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => flags &= !libc::MS_RDONLY,
            "bind" => flags |= libc::MS_BIND,
            "rbind" => flags |= libc::MS_BIND | libc::MS_REC,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "noatime" => flags |= libc::MS_NOATIME,
            "nodiratime" => flags |= libc::MS_NODIRATIME,
            "relatime" => flags |= libc::MS_RELATIME,
            "suid" | "dev" | "exec" | "defaults" => {}
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

fn cstring(s: &[u8]) -> Result<CString, Inner> {
    CString::new(s).map_err(|_| Inner::Nul)
}

/// Mount `mount` on `target` (in the calling thread's mount namespace).
fn mount_one(mount: &RootMount, target: &Path) -> Result<(), Inner> {
    let (mut flags, data) = mount_flags(&mount.options);
    let fstype = match mount.fstype.as_str() {
        "bind" | "rbind" => {
            flags |= libc::MS_BIND;
            "none"
        }
        other => other,
    };
    let source = cstring(mount.source.as_bytes())?;
    let target_c = cstring(target.as_os_str().as_bytes())?;
    let fstype_c = cstring(fstype.as_bytes())?;
    let data_c = cstring(data.as_bytes())?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; the kernel
    // copies what it needs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                data_c.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        return Err(Inner::Mount {
            fstype: mount.fstype.clone(),
            from: mount.source.clone(),
            error: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Give the calling thread a mount namespace of its own in which no mount propagates back
/// to the host's. The namespace goes away with the thread and the processes it starts.
fn private_mount_namespace() -> Result<(), Inner> {
    // SAFETY: unshare only changes the calling thread's namespaces (CLONE_NEWNS implies
    // CLONE_FS, which a thread may unshare in a multithreaded process).
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(Inner::Namespace(std::io::Error::last_os_error()));
    }
    let root = c"/";
    // SAFETY: a valid NUL-terminated path; null type and data are allowed for a change of
    // propagation.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Inner::Namespace(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// An ext4 disk at `disk` (which must not exist) of the tree at `dir`.
fn disk_from_dir(dir: &Path, disk: &Path) -> Result<(), Inner> {
    let size = image::measure(dir).map_err(image::io_at(dir))?;
    let (bytes, inodes) = image::disk_geometry(&size);
    let began = Instant::now();
    image::make_ext4_with(disk, bytes, Some(dir), Some(inodes), &mut |_| {})?;
    log::debug!(
        "pod: {} MiB root disk with {inodes} inodes built in {} ms",
        bytes >> 20,
        began.elapsed().as_millis()
    );
    if std::fs::symlink_metadata(dir.join("lost+found")).is_err() {
        image::remove_lost_found(disk);
    }
    Ok(())
}

/// Make the container's root file system into an ext4 disk at `disk` (which must not exist):
/// `mounts` mounted on `rootfs` in a private mount namespace, or `rootfs` itself when there
/// are none. Nothing stays mounted afterwards.
pub fn make_root_disk(mounts: &[RootMount], rootfs: &Path, disk: &Path) -> Result<(), PodError> {
    if mounts.is_empty() {
        return Ok(disk_from_dir(rootfs, disk)?);
    }
    let mounts = mounts.to_vec();
    let target = rootfs.to_path_buf();
    let disk = disk.to_path_buf();
    // The thread's namespace, and so its mounts, end with it (and with mkfs.ext4, which runs
    // in it).
    let worker = std::thread::Builder::new()
        .name("pod-rootfs".into())
        .spawn(move || -> Result<(), Inner> {
            private_mount_namespace()?;
            for mount in &mounts {
                mount_one(mount, &target)?;
            }
            disk_from_dir(&target, &disk)
        })
        .map_err(Inner::Thread)?;
    match worker.join() {
        Ok(result) => Ok(result?),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A pod's VM: booted from the sandbox image with a container's root disk, its guest agent
/// reachable at [`Pod::agent_socket`]. Stopped by [`Pod::stop`] or when dropped.
///
/// The VM lives on a thread of its own, which starts it and is then restricted to the VMM
/// thread's seccomp filter (as `flint run`'s main thread is): the caller's threads stay free.
pub struct Pod {
    /// Wakes the VM's thread for a [`Command`].
    wake: EventFd,
    commands: Mutex<mpsc::Sender<Command>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    ended: EventFd,
    reason: Arc<Mutex<Option<String>>>,
    agent_socket: PathBuf,
    console_log: PathBuf,
    /// The VM's network, undone once the VM has stopped.
    net: Mutex<Option<PodNet>>,
}

/// What the VM's thread is asked to do.
enum Command {
    /// Give the disk of this name a new backing file; answers its size.
    ReplaceDisk(String, PathBuf, mpsc::Sender<Result<u64, String>>),
    Pause(mpsc::Sender<Result<(), String>>),
    Resume(mpsc::Sender<()>),
    Stop,
}

/// Why a VM ended, one sentence.
fn describe(ending: &Ending) -> String {
    match ending {
        Ending::Reset => "the guest powered off".into(),
        Ending::Signal(sig) => format!("the shim got signal {sig}"),
        Ending::ConsoleQuit => "the console asked to quit".into(),
        Ending::Fault { vcpu, reason } => format!("vCPU {vcpu} failed: {reason}"),
        Ending::PageFaultHandlerGone(path) => {
            vmm::Error::PageFaultHandlerGone(path.clone()).to_string()
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The VM's thread: start the VM, report, then carry out commands until told to stop
/// (noting why the VM ended if it ends first), and stop it.
fn run_vm(
    mut vm: Vm,
    wake: EventFd,
    commands: mpsc::Receiver<Command>,
    reason: Arc<Mutex<Option<String>>>,
    started: mpsc::Sender<Result<EventFd, PodError>>,
) {
    let ended = match vm.ending_event().try_clone() {
        Ok(fd) => fd,
        Err(e) => {
            let _ = started.send(Err(Inner::EventFd(e).into()));
            return;
        }
    };
    if let Err(e) = vm.start(&crate::seccomp::vmm_thread()) {
        let _ = started.send(Err(Inner::Setup(SetupError::Vm(e)).into()));
        vm.shutdown(Ending::Reset);
        return;
    }
    let _ = started.send(Ok(ended));
    'serve: loop {
        let noted = lock(&reason).is_some();
        if noted {
            wait_readable(&[&wake], None);
        } else {
            wait_readable(&[vm.ending_event(), &wake], None);
        }
        let _ = wake.read();
        loop {
            match commands.try_recv() {
                Ok(Command::ReplaceDisk(name, path, reply)) => {
                    let _ = reply.send(vm.replace_disk(&name, &path).map_err(|e| e.to_string()));
                }
                Ok(Command::Pause(reply)) => {
                    let _ = reply.send(vm.pause().map_err(|e| e.to_string()));
                }
                Ok(Command::Resume(reply)) => {
                    vm.resume();
                    let _ = reply.send(());
                }
                Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => break 'serve,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if !noted {
            if let Some(ending) = vm.ending() {
                *lock(&reason) = Some(describe(&ending));
            }
        }
    }
    vm.shutdown(Ending::Reset);
}

/// The most container slots a pod's VM may have (`/dev/vda` to `/dev/vdx`).
pub const MAX_SLOTS: usize = 24;
/// The size of the placeholder a free container slot holds.
const PLACEHOLDER_SIZE: u64 = 4096;

/// The guest's name of container slot `slot` (below [`MAX_SLOTS`]): `/dev/vda`, `/dev/vdb`...
pub fn slot_disk(slot: usize) -> String {
    format!(
        "/dev/vd{}",
        char::from(b'a' + slot.min(MAX_SLOTS - 1) as u8)
    )
}

impl Pod {
    /// Boot a VM of `settings` whose guest runs commands in the files of `disk` (made by
    /// [`make_root_disk`]), its sockets and console log in `work` (private, kept until the
    /// pod is gone).
    pub fn boot(settings: &PodSettings, disk: &Path, work: &Path) -> Result<Pod, PodError> {
        let disks = machine::ImageDisks {
            image: Some(disk),
            scratch: None,
        };
        Pod::boot_with(settings, &disks, 0, work)
    }

    /// Boot a VM of `settings` for several containers: no image, but `slots` (1 to
    /// [`MAX_SLOTS`]) read-only disks holding a small placeholder (`work/placeholder`),
    /// which [`Pod::replace_disk`] swaps for a container's root disk while the VM runs. The
    /// guest names slot `n` [`slot_disk`]`(n)`.
    pub fn boot_slots(settings: &PodSettings, slots: usize, work: &Path) -> Result<Pod, PodError> {
        Pod::boot_with(
            settings,
            &machine::ImageDisks::default(),
            slots.clamp(1, MAX_SLOTS),
            work,
        )
    }

    /// The file a free slot holds.
    pub fn placeholder(work: &Path) -> PathBuf {
        work.join("placeholder")
    }

    fn boot_with(
        settings: &PodSettings,
        disks: &machine::ImageDisks,
        slots: usize,
        work: &Path,
    ) -> Result<Pod, PodError> {
        let cache = crate::cache_dir();
        let options = Pod::run_options(settings, &cache);
        let (kernel, initramfs) = Pod::images(&options, &cache)?;
        // Dropped after the VM (declared before it): the TAP goes first, then the redirect.
        let mut net = match &settings.network {
            Some(network) => Some((PodNet::open(&network.netns)?, &network.dns)),
            None => None,
        };
        let mut config =
            machine::vm_config(&options, &kernel, initramfs, disks, work).map_err(|e| match e {
                // Not in terms of flint run's options: the shim has none.
                SetupError::Config(e) => Inner::VmConfig(e),
                other => Inner::Setup(other),
            })?;
        if let Some((net, dns)) = &net {
            config.nets.push(net.nic());
            config.cmdline.push(' ');
            config
                .cmdline
                .push_str(&podnet::guest_param(net.interface(), dns));
            config.validate().map_err(Inner::VmConfig)?;
        }
        if slots > 0 {
            let placeholder = Pod::placeholder(work);
            std::fs::File::create(&placeholder)
                .and_then(|f| f.set_len(PLACEHOLDER_SIZE))
                .map_err(|error| Inner::Placeholder {
                    path: placeholder.clone(),
                    error,
                })?;
            for _ in 0..slots {
                let mut drive = vmm::DriveConfig::new(&placeholder);
                drive.read_only = true;
                config.drives.push(drive);
            }
        }
        let console_log = work.join("console.log");
        let console =
            console_to(&console_log).map_err(|e| Inner::Setup(SetupError::ConsoleLog(e)))?;
        let vm = match &net {
            // Its TAP is the namespace's.
            Some((net, _)) => net.inside(|| Vm::build(&config, console, Instant::now()))?,
            None => Vm::build(&config, console, Instant::now()),
        }
        .map_err(|e| Inner::Setup(SetupError::Vm(e)))?;
        if let Some((net, _)) = net.as_mut() {
            net.connect()?;
        }
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(Inner::EventFd)?;
        let thread_wake = wake.try_clone().map_err(Inner::EventFd)?;
        let (commands, thread_commands) = mpsc::channel();
        let reason = Arc::new(Mutex::new(None));
        let thread_reason = Arc::clone(&reason);
        let (started_tx, started_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pod-vmm".into())
            .spawn(move || run_vm(vm, thread_wake, thread_commands, thread_reason, started_tx))
            .map_err(Inner::Thread)?;
        let ended = match started_rx.recv() {
            Ok(Ok(ended)) => ended,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Inner::Thread(std::io::Error::other("the VM's thread ended")).into());
            }
        };
        Ok(Pod {
            wake,
            commands: Mutex::new(commands),
            thread: Mutex::new(Some(thread)),
            ended,
            reason,
            agent_socket: machine::agent_socket(&config).to_path_buf(),
            console_log,
            net: Mutex::new(net.map(|(net, _)| net)),
        })
    }

    /// Check that the kernel and the sandbox image of `settings` exist (before a root disk
    /// is made for nothing).
    pub fn check(settings: &PodSettings) -> Result<(), PodError> {
        let cache = crate::cache_dir();
        Pod::images(&Pod::run_options(settings, &cache), &cache).map(drop)
    }

    fn images(options: &RunOptions, cache: &Path) -> Result<(PathBuf, PathBuf), PodError> {
        match machine::images(options, cache) {
            Ok(images) => Ok(images),
            Err(SetupError::MissingImage { what, path, hint }) => {
                Err(Inner::MissingImage { what, path, hint }.into())
            }
            Err(e) => Err(Inner::Setup(e).into()),
        }
    }

    fn run_options(settings: &PodSettings, cache: &Path) -> RunOptions {
        RunOptions {
            kernel: Some(
                settings
                    .kernel
                    .clone()
                    .unwrap_or_else(|| cache.join("guest/vmlinux")),
            ),
            initramfs: Some(
                settings
                    .initramfs
                    .clone()
                    .unwrap_or_else(|| cache.join("sandbox/initramfs.cpio.gz")),
            ),
            vcpus: settings.vcpus,
            mem_mib: settings.mem_mib,
            cold: true,
            ..Default::default()
        }
    }

    /// The host end of the guest agent's vsock (see [`flint_agent::AgentClient::connect`]).
    pub fn agent_socket(&self) -> &Path {
        &self.agent_socket
    }

    /// Readable once the VM has ended (for `poll`); its count is never read here.
    pub fn ended_event(&self) -> &EventFd {
        &self.ended
    }

    /// Why the VM ended, one sentence, if it has (or was stopped).
    pub fn ending(&self) -> Option<String> {
        if let Some(reason) = lock(&self.reason).clone() {
            return Some(reason);
        }
        lock(&self.thread)
            .is_none()
            .then(|| "the VM was stopped".to_string())
    }

    /// The last lines of the guest's console (for diagnostics).
    pub fn console_tail(&self) -> Vec<String> {
        console_tail(&self.console_log)
    }

    fn send(&self, command: Command) -> bool {
        let sent = lock(&self.commands).send(command).is_ok();
        sent && self.wake.write(1).is_ok()
    }

    /// Give container slot `slot` (of [`Pod::boot_slots`]) the disk `path` (read-only); its
    /// size in bytes, or one sentence.
    pub fn replace_disk(&self, slot: usize, path: &Path) -> Result<u64, String> {
        let (reply, answer) = mpsc::channel();
        let name = slot_disk(slot).trim_start_matches("/dev/").to_string();
        if !self.send(Command::ReplaceDisk(name, path.to_path_buf(), reply)) {
            return Err("the VM was stopped".into());
        }
        answer
            .recv()
            .unwrap_or_else(|_| Err("the VM was stopped".into()))
    }

    /// Pause the VM's vCPUs (its devices finish what they are doing); one sentence on failure.
    pub fn pause(&self) -> Result<(), String> {
        let (reply, answer) = mpsc::channel();
        if !self.send(Command::Pause(reply)) {
            return Err("the VM was stopped".into());
        }
        answer
            .recv()
            .unwrap_or_else(|_| Err("the VM was stopped".into()))
    }

    /// Let a paused VM's vCPUs run again.
    pub fn resume(&self) {
        let (reply, answer) = mpsc::channel();
        if self.send(Command::Resume(reply)) {
            let _ = answer.recv();
        }
    }

    /// Stop the VM (at once: the guest is not asked) and wait until it has; nothing happens
    /// if it was stopped.
    pub fn stop(&self) {
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            self.send(Command::Stop);
            let _ = thread.join();
        }
        // The VM, and with it its TAP, is gone: now the interface's redirect.
        drop(lock(&self.net).take());
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mount_options_become_flags_and_file_system_data() {
        let (flags, data) = mount_flags(&strings(&[
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/a:/b",
        ]));
        assert_eq!(flags, 0);
        assert_eq!(data, "index=off,workdir=/w,upperdir=/u,lowerdir=/a:/b");
        let (flags, data) = mount_flags(&strings(&["ro", "rbind", "nosuid"]));
        assert_eq!(
            flags,
            libc::MS_RDONLY | libc::MS_BIND | libc::MS_REC | libc::MS_NOSUID
        );
        assert_eq!(data, "");
        let (flags, _) = mount_flags(&strings(&["ro", "rw"]));
        assert_eq!(flags, 0);
    }

    fn debugfs_cat(disk: &Path, file: &str) -> String {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("cat {file}")])
            .arg(disk)
            .output()
            .expect("debugfs (e2fsprogs) runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// containerd's overlayfs snapshotter hands the shim an overlay mount: its merged tree
    /// becomes the disk, and the mount is never seen outside (nor left behind). Needs root.
    #[test]
    fn an_overlay_root_becomes_a_disk_without_leaving_a_mount() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "this test mounts an overlay: run it as root");
        let dir = std::env::temp_dir().join(format!("flint-pod-overlay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["lower1", "lower2", "upper", "work", "rootfs"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("lower1/a"), "one\n").unwrap();
        std::fs::write(dir.join("lower1/keep"), "kept\n").unwrap();
        std::fs::write(dir.join("lower2/a"), "two\n").unwrap();
        std::fs::write(dir.join("upper/b"), "written\n").unwrap();
        let p = |sub: &str| dir.join(sub).display().to_string();
        let overlay = RootMount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={}", p("work")),
                format!("upperdir={}", p("upper")),
                format!("lowerdir={}:{}", p("lower2"), p("lower1")),
            ],
        };
        let disk = dir.join("rootfs.ext4");
        make_root_disk(std::slice::from_ref(&overlay), &dir.join("rootfs"), &disk).unwrap();
        assert_eq!(debugfs_cat(&disk, "/a"), "two\n");
        assert_eq!(debugfs_cat(&disk, "/keep"), "kept\n");
        assert_eq!(debugfs_cat(&disk, "/b"), "written\n");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&p("rootfs")),
            "the overlay is still mounted"
        );
        assert_eq!(std::fs::read_dir(dir.join("rootfs")).unwrap().count(), 0);

        // A mount that cannot be made: one sentence, and no disk.
        let missing = RootMount {
            options: vec![format!("lowerdir={}", p("nonexistent"))],
            ..overlay
        };
        let bad = dir.join("bad.ext4");
        let e = make_root_disk(&[missing], &dir.join("rootfs"), &bad).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "cannot mount the container's root file system (overlay from overlay): "
            ),
            "{e}"
        );
        assert!(!bad.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
