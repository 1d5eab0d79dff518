//! The containers' cgroups (cgroup v2) in the guest: made with their limits by a
//! `ContainerCgroup` request, joined by the container's commands before they run, read by
//! `ContainerStats`, and watched for OOM kills while a command runs (see the protocol's
//! *Cgroups of containers*).
//!
//! The guest's agent mounts cgroup v2 at [`GUEST_ROOT`] and makes each container's cgroup
//! there, as `container-ID` (a prefix no cgroup interface file has: a container id alone
//! could be `cgroup.procs`). The agent itself and the intermediate processes of a pod's
//! containers stay in the root cgroup, so a container's memory limit is never the agent's.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use flint_agent::protocol::{ExecSpec, IMAGE_ROOT};
use flint_agent::stats::{self, CgroupStats, MemoryStats, PidsStats, MEMORY_EVENTS, MEMORY_STAT};

use crate::{describe, log};

/// Where the guest's agent mounts cgroup v2.
pub const GUEST_ROOT: &str = "/sys/fs/cgroup";
/// The most bytes read of one cgroup file (`memory.stat` is about 1.5 KiB).
const READ_LIMIT: u64 = 16 * 1024;
/// How many times, 10 ms apart, the removal of a cgroup is tried while its last processes
/// are still being torn down.
const REMOVE_TRIES: u32 = 20;

/// The containers' cgroups.
pub struct Cgroups {
    /// The cgroup v2 directory the containers' cgroups are made in; `None` when the guest
    /// has no cgroup v2.
    root: Option<PathBuf>,
    /// The container whose cgroup the commands run in `image_dir` join.
    image: Mutex<Option<String>>,
    /// The image's root: [`IMAGE_ROOT`] (another directory in tests).
    pub image_dir: String,
}

/// A command's cgroup, opened before it is started.
pub struct Member {
    /// `cgroup.procs`, open for writing: the command writes itself into it.
    procs: File,
    /// `memory.events`, when the guest has the memory controller.
    events: Option<File>,
}

impl Member {
    /// The descriptor [`join`] takes (open until the member is dropped).
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// A watch on the cgroup's OOM kills, if it has the memory controller.
    pub fn oom_watch(&mut self) -> Option<OomWatch> {
        self.events.take().map(OomWatch::new)
    }
}

/// Join the cgroup whose `cgroup.procs` is open as `procs`: for the child between `fork`
/// and `exec` (one system call, nothing that allocates or locks).
pub fn join(procs: RawFd) -> io::Result<()> {
    // "0" is the writing process itself.
    // SAFETY: a write of one byte from a static buffer to an open descriptor.
    let n = unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The contents of the cgroup file `path`, at most [`READ_LIMIT`] bytes.
fn read_file(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    File::open(path)?
        .take(READ_LIMIT)
        .read_to_string(&mut text)?;
    Ok(text)
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    file.write_at(value.as_bytes(), 0).map(drop)
}

/// Mount cgroup v2 at [`GUEST_ROOT`] unless it is there already, and enable the memory and
/// pids controllers for the containers' cgroups. `None` (and a line in the kernel log) when
/// the guest kernel has no cgroups.
pub fn mount_guest() -> Option<PathBuf> {
    let root = Path::new(GUEST_ROOT);
    if !root.join("cgroup.controllers").exists() {
        // sysfs has the directory when the kernel has cgroups (CONFIG_CGROUPS).
        if !root.is_dir() {
            log(
                6,
                "the guest kernel has no cgroups: containers get no cgroups, limits or stats",
            );
            return None;
        }
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if let Err(e) = crate::container::mount_fs("cgroup2", root, "cgroup2", flags, "") {
            log(3, &e);
            return None;
        }
    }
    enable_controllers(root);
    Some(root.to_path_buf())
}

/// Enable the memory and pids controllers of `root` for its children, those it has (each on
/// its own: one missing leaves the other).
pub fn enable_controllers(root: &Path) {
    let available = read_file(&root.join("cgroup.controllers")).unwrap_or_default();
    for controller in ["memory", "pids"] {
        if available.split_whitespace().any(|c| c == controller) {
            let path = root.join("cgroup.subtree_control");
            if let Err(e) = write_file(&path, &format!("+{controller}")) {
                log(
                    3,
                    &format!(
                        "cannot enable the {controller} controller: {}",
                        describe(&e)
                    ),
                );
            }
        }
    }
}

impl Cgroups {
    /// The containers' cgroups under the cgroup v2 directory `root` (`None`: no cgroups).
    pub fn new(root: Option<PathBuf>) -> Cgroups {
        Cgroups {
            root,
            image: Mutex::new(None),
            image_dir: IMAGE_ROOT.to_string(),
        }
    }

    fn image(&self) -> MutexGuard<'_, Option<String>> {
        self.image.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Container `id`'s cgroup directory (whether or not it exists).
    fn dir(&self, id: &str) -> Option<PathBuf> {
        self.root
            .as_ref()
            .map(|root| root.join(format!("container-{id}")))
    }

    /// Make (or update) container `id`'s cgroup with these limits; `Err` is the message for
    /// the host.
    pub fn setup(
        &self,
        id: &str,
        image_root: bool,
        memory_max: Option<u64>,
        pids_max: Option<u64>,
    ) -> Result<(), String> {
        let dir = self.dir(id).ok_or_else(|| {
            "the guest has no cgroup v2 (its kernel needs CONFIG_CGROUPS), so the container gets no cgroup"
                .to_string()
        })?;
        match fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot create the container {id}'s cgroup: {}",
                    describe(&e)
                ))
            }
        }
        let result = self.set_limits(&dir, id, memory_max, pids_max);
        if result.is_ok() && image_root {
            *self.image() = Some(id.to_string());
        }
        result
    }

    fn set_limits(
        &self,
        dir: &Path,
        id: &str,
        memory_max: Option<u64>,
        pids_max: Option<u64>,
    ) -> Result<(), String> {
        for (file, limit, controller, config) in [
            ("memory.max", memory_max, "memory", "CONFIG_MEMCG"),
            ("pids.max", pids_max, "pids", "CONFIG_CGROUP_PIDS"),
        ] {
            let path = dir.join(file);
            let present = path.exists();
            let value = match (limit, present) {
                (Some(n), true) => n.to_string(),
                // No limit: `max`, in case an earlier request set one.
                (None, true) => "max".to_string(),
                (None, false) => continue,
                (Some(_), false) => {
                    return Err(format!(
                        "the guest kernel has no {controller} cgroup controller ({config}), so the container {id}'s {controller} limit cannot be applied"
                    ))
                }
            };
            write_file(&path, &value).map_err(|e| {
                format!(
                    "cannot set the container {id}'s {file} to {value}: {}",
                    describe(&e)
                )
            })?;
        }
        Ok(())
    }

    /// Remove container `id`'s cgroup (its processes have ended, or are ending).
    pub fn remove(&self, id: &str) {
        {
            let mut image = self.image();
            if image.as_deref() == Some(id) {
                *image = None;
            }
        }
        let Some(dir) = self.dir(id) else { return };
        for _ in 0..REMOVE_TRIES {
            match fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                // Busy: processes still being torn down.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        log(
            3,
            &format!("cannot remove the container {id}'s cgroup: processes are left in it"),
        );
    }

    /// The cgroup the command of `spec` joins, opened: its container's (a pod's container,
    /// or the image's container for a command run in [`IMAGE_ROOT`]), if that container has
    /// one. `Err` is the message for the host.
    pub fn for_command(&self, spec: &ExecSpec) -> Result<Option<Member>, String> {
        let id = match (&spec.container, &spec.root) {
            (Some(c), _) => Some(c.id.clone()),
            (None, Some(root)) if *root == self.image_dir => self.image().clone(),
            (None, _) => None,
        };
        let Some((id, dir)) = id.and_then(|id| self.dir(&id).map(|dir| (id, dir))) else {
            return Ok(None);
        };
        if !dir.is_dir() {
            return Ok(None);
        }
        let procs = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join("cgroup.procs"))
            .map_err(|e| format!("cannot open the container {id}'s cgroup: {}", describe(&e)))?;
        let events = File::open(dir.join("memory.events")).ok();
        Ok(Some(Member { procs, events }))
    }

    /// Container `id`'s cgroup's numbers; `Err` is the message for the host.
    pub fn stats(&self, id: &str) -> Result<CgroupStats, String> {
        let dir = self
            .dir(id)
            .filter(|d| d.is_dir())
            .ok_or_else(|| format!("the container {id} has no cgroup"))?;
        let read = |file: &str| {
            read_file(&dir.join(file))
                .map_err(|e| format!("cannot read the container {id}'s {file}: {}", describe(&e)))
        };
        let [usage, user, system] = stats::flat_keyed(
            &read("cpu.stat")?,
            &["usage_usec", "user_usec", "system_usec"],
        );
        let number = |file: &str| -> Result<u64, String> {
            read(file)?
                .trim()
                .parse()
                .map_err(|_| format!("the container {id}'s {file} is not a number"))
        };
        let limit = |file: &str| -> Result<Option<u64>, String> {
            stats::limit_value(&read(file)?)
                .ok_or_else(|| format!("the container {id}'s {file} is not a limit"))
        };
        let memory = if dir.join("memory.current").exists() {
            Some(MemoryStats {
                current: number("memory.current")?,
                max: limit("memory.max")?,
                stat: stats::flat_keyed(&read("memory.stat")?, &MEMORY_STAT),
                events: stats::flat_keyed(&read("memory.events")?, &MEMORY_EVENTS),
            })
        } else {
            None
        };
        let pids = if dir.join("pids.current").exists() {
            Some(PidsStats {
                current: number("pids.current")?,
                max: limit("pids.max")?,
            })
        } else {
            None
        };
        Ok(CgroupStats {
            cpu_usage_usec: usage,
            cpu_user_usec: user,
            cpu_system_usec: system,
            memory,
            pids,
        })
    }
}

/// A running command's watch on its cgroup's OOM kills: `memory.events`, which the kernel
/// marks changed (for `poll`, `POLLPRI`) when one of its counts changes.
pub struct OomWatch {
    events: File,
    /// The `oom_kill` count last read.
    seen: u64,
}

impl OomWatch {
    fn new(events: File) -> OomWatch {
        let mut watch = OomWatch { events, seen: 0 };
        // Reading also clears the changed mark.
        watch.seen = watch.read().unwrap_or(0);
        watch
    }

    /// The descriptor to poll (for `POLLPRI`).
    pub fn fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }

    fn read(&self) -> Option<u64> {
        let mut buf = [0u8; 1024];
        let n = self.events.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let [kills] = stats::flat_keyed(text, &["oom_kill"]);
        Some(kills)
    }

    /// The cgroup's total of OOM kills if it rose since the last look.
    pub fn check(&mut self) -> Option<u64> {
        let kills = self.read()?;
        (kills > self.seen).then(|| {
            self.seen = kills;
            kills
        })
    }
}
