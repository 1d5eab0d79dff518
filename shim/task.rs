//! containerd's task API. A container of its own gets a microVM of its own; the containers
//! of a pod (containerd's CRI annotations, see [`crate::spec::PodMember`]) share one shim and
//! one microVM, each in a root file system and PID and mount namespaces of its own in the
//! guest (see `flint_agent::protocol`, *Containers of a pod*). Processes run in the guest
//! through flint's agent, each on a connection of its own.
//!
//! Process ids: the task's pid (create, start, exec, delete, events) is the shim's own, the
//! host process that holds the VM (killing it ends the container); `pids` lists the
//! processes' ids in the guest.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use containerd_shim::api::{self, Status};
use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat as CpuV2, MemoryEvents as MemoryEventsV2, MemoryStat as MemoryV2, Metrics as MetricsV2,
    PidsStat as PidsV2,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal, TtrpcContext, TtrpcResult};
use flint::pod::{make_root_disk, slot_disk, Pod, PodNetwork, RootMount};
use flint_agent::{
    AgentClient, AgentError, ExecSpec, InContainer, Signaller, WindowSize, AGENT_PORT,
};

use crate::config::ShimConfig;
use crate::io::{hold_stdin, Input, Output};
use crate::spec::{exec_process, window_size, Bundle, PodMember};

/// How long a guest gets to boot and start its agent.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agent of a running pod VM gets to answer a container's unmount.
const AGENT_UNMOUNT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the agent gets to answer `stats` (connection and answer, each) before the
/// host's numbers are given instead.
const AGENT_STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// The exit status of processes whose VM ended under them (as other VM runtimes report it).
pub const STATUS_VM_GONE: u32 = 255;
/// The exit status of a process killed by `signal`, as runc's shim reports it.
fn killed(signal: u32) -> u32 {
    128 + signal
}

fn error(code: Code, message: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.to_string()))
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

/// How a process ended.
#[derive(Debug, Clone)]
struct Exit {
    status: u32,
    at: Timestamp,
}

enum Phase {
    Created,
    Running { signaller: Option<Signaller> },
    Stopped(Exit),
}

struct Process {
    spec: ExecSpec,
    stdin: String,
    stdout: String,
    stderr: String,
    phase: Phase,
    /// The process id in the guest, once it runs.
    guest_pid: Option<u32>,
    /// It runs on a terminal (its stdout carries the terminal's output, stderr nothing).
    terminal: bool,
    /// With a terminal: the shim's own writer of the stdin FIFO, held until `close_io` or
    /// the process's end (see [`hold_stdin`]).
    stdin_held: Option<std::fs::File>,
}

impl Process {
    /// A process not started yet, running `spec` (on a terminal when the request or the
    /// spec asks for one) with these FIFOs.
    fn new(
        mut spec: ExecSpec,
        terminal: bool,
        stdin: &str,
        stdout: &str,
        stderr: &str,
    ) -> Result<Process, String> {
        if terminal && spec.terminal.is_none() {
            spec.terminal = Some(WindowSize::default());
        }
        let terminal = spec.terminal.is_some();
        let stdin_held = match terminal {
            true => hold_stdin(stdin)
                .map_err(|e| format!("cannot open the process's stdin {stdin}: {e}"))?,
            false => None,
        };
        Ok(Process {
            spec,
            stdin: stdin.to_string(),
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
            phase: Phase::Created,
            guest_pid: None,
            terminal,
            stdin_held,
        })
    }
}

impl Process {
    fn status(&self) -> Status {
        match self.phase {
            Phase::Created => Status::CREATED,
            Phase::Running { .. } => Status::RUNNING,
            Phase::Stopped(_) => Status::STOPPED,
        }
    }

    fn exit(&self) -> Option<&Exit> {
        match &self.phase {
            Phase::Stopped(exit) => Some(exit),
            _ => None,
        }
    }
}

struct Container {
    id: String,
    bundle: String,
    pod: Arc<Pod>,
    /// The container's disk (and, with a VM of its own, its sockets and console log);
    /// removed with the container.
    work: PathBuf,
    /// `""` is the init process; the others are exec ids.
    processes: HashMap<String, Process>,
    /// With a VM of its own: tells the VM watcher to stop watching.
    unwatch: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
    /// The VM's vCPUs are paused (`ctr task pause`).
    paused: bool,
    /// The VM's memory, in bytes (the memory limit `stats` reports).
    vm_memory: u64,
    /// In a pod's VM: the container slot its root disk is in.
    slot: Option<usize>,
    /// The limits of the container's cgroup in the guest (bytes, processes).
    memory_limit: Option<u64>,
    pids_limit: Option<u64>,
    /// The OOM kills the guest has reported for the container's cgroup, and when the last
    /// `TaskOOM` event went out.
    oom: OomEvents,
}

/// The shortest time between two `TaskOOM` events of one container. The guest reports its
/// cgroup's OOM kill count, which a hostile guest could raise in a tight loop: each rise
/// within this window is recorded but not published, so a guest can cause at most one event
/// RPC to containerd a second per container.
const OOM_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// The OOM kill count of one container's guest cgroup, and whether a report of it is news.
#[derive(Debug, Default)]
struct OomEvents {
    /// The highest count the guest has reported.
    kills: u64,
    /// When the last `TaskOOM` was published.
    last_event: Option<Instant>,
}

impl OomEvents {
    /// The guest reports `count` kills at `now`: record it, and say whether a `TaskOOM` event
    /// is due (the count rose and no event went out in the last [`OOM_EVENT_INTERVAL`]).
    fn report(&mut self, count: u64, now: Instant) -> bool {
        if count <= self.kills {
            return false;
        }
        self.kills = count;
        let due = self
            .last_event
            .is_none_or(|last| now.saturating_duration_since(last) >= OOM_EVENT_INTERVAL);
        if due {
            self.last_event = Some(now);
        }
        due
    }
}

/// The VM a pod's containers share.
struct PodVm {
    pod: Arc<Pod>,
    /// The pod's sandbox id.
    sandbox_id: String,
    /// The VM's sockets, console log and placeholder disk; removed with the VM.
    dir: PathBuf,
    /// The container each slot holds (or is being set up for).
    slots: Vec<Option<String>>,
    unwatch: Arc<vmm_sys_util::eventfd::EventFd>,
    vm_memory: u64,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    /// The pod's VM, while one of its containers exists (or is being created).
    pod: Option<PodVm>,
}

impl State {
    fn get(&self, id: &str) -> TtrpcResult<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| error(Code::NOT_FOUND, format!("no container '{id}' in this shim")))
    }

    fn get_mut(&mut self, id: &str) -> TtrpcResult<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| error(Code::NOT_FOUND, format!("no container '{id}' in this shim")))
    }

    /// Take the pod's VM if no container uses it or is being set up in it any more.
    fn take_idle_pod(&mut self) -> Option<PodVm> {
        let idle = self
            .pod
            .as_ref()
            .is_some_and(|p| p.slots.iter().all(Option::is_none));
        if idle {
            self.pod.take()
        } else {
            None
        }
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    namespace: String,
    publisher: Option<RemotePublisher>,
    exit: Arc<ExitSignal>,
}

/// The task service containerd talks to.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

/// The directory of the VM of pod `sandbox_id` of `namespace` under `root` (`@` is in no
/// container id, so it is no container's directory).
pub fn pod_dir(root: &Path, namespace: &str, sandbox_id: &str) -> Option<PathBuf> {
    work_dir(root, namespace, &format!("{sandbox_id}@pod"))
}

/// The directory of container `id` of `namespace` under `root`.
pub fn work_dir(root: &Path, namespace: &str, id: &str) -> Option<PathBuf> {
    let plain =
        |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0');
    (plain(namespace) && plain(id)).then(|| root.join(namespace).join(id))
}

/// The network a container's VM joins: the network namespace its spec names, for a
/// container of its own or a pod's sandbox (whose VM the pod's containers share; theirs name
/// the sandbox task's namespaces, which with flint are the shim's own).
pub fn pod_network(bundle: &Bundle) -> Option<PodNetwork> {
    if bundle.pod.as_ref().is_some_and(|member| !member.sandbox) {
        return None;
    }
    let netns = bundle.netns.clone()?;
    let dns = bundle
        .resolv_conf
        .as_deref()
        .map(flint::podnet::name_servers)
        .unwrap_or_default();
    Some(PodNetwork { netns, dns })
}

/// What the shim's process (the VM's vCPUs and devices, and the shim) has used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    user_ns: u64,
    kernel_ns: u64,
    /// Resident memory, bytes: mostly the guest memory the guest has touched.
    resident: u64,
}

/// [`Usage`] from `stat` and `statm` (the contents of `/proc/self/stat` and `statm`),
/// with `tick` clock ticks a second and `page` bytes a page.
fn parse_usage(stat: &str, statm: &str, tick: u64, page: u64) -> Option<Usage> {
    // The command name, in parentheses, may hold spaces: count fields after it. utime and
    // stime are fields 14 and 15 of proc(5); after the name come the state (3) onwards.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let ns = |ticks: u64| ticks.saturating_mul(1_000_000_000) / tick.max(1);
    Some(Usage {
        user_ns: ns(utime),
        kernel_ns: ns(stime),
        resident: resident.saturating_mul(page),
    })
}

fn own_usage() -> Option<Usage> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    // SAFETY: sysconf only reads configuration values.
    let (tick, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    parse_usage(
        &stat,
        &statm,
        u64::try_from(tick).ok()?,
        u64::try_from(page).ok()?,
    )
}

/// What the init of a container asks of the guest before it runs: the container's cgroup.
struct CgroupRequest {
    in_pod: bool,
    memory_limit: Option<u64>,
    pids_limit: Option<u64>,
}

impl CgroupRequest {
    /// Make container `id`'s cgroup in the guest. A guest that cannot (a kernel without
    /// cgroups) runs the container without one (no guest stats, no OOM events; a VM of its
    /// own is still limited by its size), except that a pod's container whose limits cannot
    /// be applied does not start.
    fn send(&self, client: &mut AgentClient, id: &str) -> Result<(), AgentError> {
        let limited = self.memory_limit.is_some() || self.pids_limit.is_some();
        match client.container_cgroup(id, !self.in_pod, self.memory_limit, self.pids_limit) {
            Ok(()) => Ok(()),
            Err(AgentError::Remote(message)) if self.in_pod && limited => {
                Err(AgentError::NotStarted(message))
            }
            Err(AgentError::Remote(message)) => {
                log::warn!("container {id}: {message}");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// containerd's cgroup v2 metrics of the guest's numbers for a container's cgroup; without a
/// memory limit the VM's memory (`vm_memory` bytes) is the limit.
fn guest_metrics(stats: &flint_agent::CgroupStats, vm_memory: u64) -> MetricsV2 {
    let mut metrics = MetricsV2 {
        cpu: MessageField::some(CpuV2 {
            usage_usec: stats.cpu_usage_usec,
            user_usec: stats.cpu_user_usec,
            system_usec: stats.cpu_system_usec,
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(m) = &stats.memory {
        metrics.memory = MessageField::some(MemoryV2 {
            usage: m.current,
            usage_limit: m.max.unwrap_or(vm_memory).min(vm_memory),
            anon: m.stat("anon"),
            file: m.stat("file"),
            kernel_stack: m.stat("kernel_stack"),
            slab: m.stat("slab"),
            sock: m.stat("sock"),
            shmem: m.stat("shmem"),
            file_mapped: m.stat("file_mapped"),
            file_dirty: m.stat("file_dirty"),
            file_writeback: m.stat("file_writeback"),
            anon_thp: m.stat("anon_thp"),
            inactive_anon: m.stat("inactive_anon"),
            active_anon: m.stat("active_anon"),
            inactive_file: m.stat("inactive_file"),
            active_file: m.stat("active_file"),
            unevictable: m.stat("unevictable"),
            slab_reclaimable: m.stat("slab_reclaimable"),
            slab_unreclaimable: m.stat("slab_unreclaimable"),
            pgfault: m.stat("pgfault"),
            pgmajfault: m.stat("pgmajfault"),
            ..Default::default()
        });
        metrics.memory_events = MessageField::some(MemoryEventsV2 {
            low: m.event("low"),
            high: m.event("high"),
            max: m.event("max"),
            oom: m.event("oom"),
            oom_kill: m.event("oom_kill"),
            ..Default::default()
        });
    }
    if let Some(p) = &stats.pids {
        metrics.pids = MessageField::some(PidsV2 {
            current: p.current,
            // 0 for no limit, as runc's shim reports `max`.
            limit: p.max.unwrap_or(0),
            ..Default::default()
        });
    }
    metrics
}

/// The same metrics measured on the host, for a guest that cannot answer: the shim
/// process's CPU time and resident memory (the VM's vCPUs and devices, and the guest memory
/// touched so far), the VM's memory as the limit and the running processes.
fn host_metrics(usage: &Usage, vm_memory: u64, processes: u64) -> MetricsV2 {
    MetricsV2 {
        cpu: MessageField::some(CpuV2 {
            usage_usec: (usage.user_ns + usage.kernel_ns) / 1000,
            user_usec: usage.user_ns / 1000,
            system_usec: usage.kernel_ns / 1000,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryV2 {
            usage: usage.resident,
            usage_limit: vm_memory,
            ..Default::default()
        }),
        pids: MessageField::some(PidsV2 {
            current: processes,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Remove a container's directory, and its namespace's if that is empty then.
pub fn remove_work_dir(work: &Path) {
    if let Err(e) = std::fs::remove_dir_all(work) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", work.display());
        }
    }
    if let Some(namespace) = work.parent() {
        // Fails, as it should, while other containers of the namespace have theirs.
        let _ = std::fs::remove_dir(namespace);
    }
}

impl Service {
    pub fn new(namespace: &str, publisher: Option<RemotePublisher>, exit: Arc<ExitSignal>) -> Self {
        Service {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                namespace: namespace.to_string(),
                publisher,
                exit,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Some(publisher) = &self.shared.publisher {
            if let Err(e) =
                publisher.publish(Context::default(), topic, &self.shared.namespace, event)
            {
                log::warn!("cannot publish {topic}: {e}");
            }
        }
    }

    /// Record that process `exec_id` of container `container_id` ended with `status` unless
    /// it ended before; wake the waiters and tell containerd.
    fn record_exit(&self, container_id: &str, exec_id: &str, status: u32) {
        let (container_id, exit) = {
            let mut guard = self.lock();
            let Some(container) = guard.containers.get_mut(container_id) else {
                return;
            };
            let Some(process) = container.processes.get_mut(exec_id) else {
                return;
            };
            if process.exit().is_some() {
                return;
            }
            let exit = Exit { status, at: now() };
            process.phase = Phase::Stopped(exit.clone());
            process.stdin_held = None;
            (container.id.clone(), exit)
        };
        self.shared.changed.notify_all();
        let event = TaskExit {
            container_id: container_id.clone(),
            id: if exec_id.is_empty() {
                container_id
            } else {
                exec_id.to_string()
            },
            pid: std::process::id(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        };
        self.publish("/tasks/exit", Box::new(event));
    }

    /// Container `id`'s init process ended (or its VM did). With a VM of its own, every
    /// process has, and the VM is stopped; in a pod's VM, the init's end ends its PID
    /// namespace, and the other processes report their own ends.
    fn end_all(&self, id: &str, init_status: u32) {
        self.record_exit(id, "", init_status);
        let (pod, others): (Option<Arc<Pod>>, Vec<String>) = {
            let guard = self.lock();
            match guard.containers.get(id) {
                Some(c) if c.slot.is_none() => (
                    Some(Arc::clone(&c.pod)),
                    c.processes
                        .keys()
                        .filter(|k| !k.is_empty())
                        .cloned()
                        .collect(),
                ),
                _ => (None, Vec::new()),
            }
        };
        for exec_id in others {
            self.record_exit(id, &exec_id, STATUS_VM_GONE);
        }
        if let Some(pod) = pod {
            pod.stop();
        }
    }

    /// The pod's VM ended: every process of its containers has, with [`STATUS_VM_GONE`].
    fn end_pod(&self) {
        let processes: Vec<(String, String)> = {
            let guard = self.lock();
            guard
                .containers
                .values()
                .filter(|c| c.slot.is_some())
                .flat_map(|c| c.processes.keys().map(|p| (c.id.clone(), p.clone())))
                .collect()
        };
        for (id, exec_id) in processes {
            self.record_exit(&id, &exec_id, STATUS_VM_GONE);
        }
    }

    /// Watch a VM: when it ends before the processes have reported, they end with
    /// [`STATUS_VM_GONE`]: container `id`'s (a VM of its own), or all the pod's (`None`).
    fn watch(
        &self,
        pod: Arc<Pod>,
        unwatch: Arc<vmm_sys_util::eventfd::EventFd>,
        id: Option<String>,
    ) {
        let service = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vm-watch".into())
            .spawn(move || {
                flint_agent::poll::wait_readable(&[pod.ended_event(), unwatch.as_ref()], None);
                if unwatch.read().is_ok() {
                    return;
                }
                if let Some(reason) = pod.ending() {
                    log::warn!("the container's VM ended: {reason}");
                    for line in pod.console_tail() {
                        log::warn!("guest console: {line}");
                    }
                }
                match id {
                    Some(id) => service.end_all(&id, STATUS_VM_GONE),
                    None => service.end_pod(),
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot watch the VM: {e}");
        }
    }

    fn create_container(&self, req: &api::CreateTaskRequest) -> Result<Container, String> {
        let config = ShimConfig::load().map_err(|e| e.to_string())?;
        let bundle = Bundle::read(Path::new(&req.bundle)).map_err(|e| e.to_string())?;
        let spec = bundle.process.exec_spec().map_err(|e| e.to_string())?;
        let init = Process::new(spec, req.terminal, &req.stdin, &req.stdout, &req.stderr)?;
        let mut settings = config.pod_for(&bundle.resources);
        settings.network = pod_network(&bundle);
        Pod::check(&settings).map_err(|e| e.to_string())?;
        if let Some(member) = &bundle.pod {
            if flint_agent::protocol::check_container_id(&req.id).is_err() {
                return Err(format!(
                    "the container id '{}' cannot name a container in a pod's VM",
                    req.id
                ));
            }
            {
                let guard = self.lock();
                if let Some(vm) = &guard.pod {
                    if vm.sandbox_id != member.sandbox_id {
                        return Err(format!(
                            "this shim runs the VM of pod {}, not of pod {}",
                            vm.sandbox_id, member.sandbox_id
                        ));
                    }
                }
            }
        } else if !self.lock().containers.is_empty() {
            return Err("this shim runs a container already".into());
        }
        let work = work_dir(&config.work_dir, &self.shared.namespace, &req.id)
            .ok_or_else(|| format!("the container id '{}' cannot name a directory", req.id))?;
        let slot = match &bundle.pod {
            Some(member) => Some(self.reserve_slot(&config, &settings, member, &req.id)?),
            None => None,
        };
        let made = self.create_with(req, &bundle, &settings, &work, slot);
        let (pod, unwatch, vm_memory) = match made {
            Ok(made) => made,
            Err(e) => {
                remove_work_dir(&work);
                if let Some(slot) = slot {
                    self.free_slot(slot);
                }
                return Err(e);
            }
        };
        let mut processes = HashMap::new();
        processes.insert(String::new(), init);
        Ok(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            pod,
            work,
            processes,
            unwatch,
            paused: false,
            vm_memory,
            slot,
            memory_limit: bundle.resources.memory_bytes(),
            pids_limit: bundle.resources.pids_limit(),
            oom: OomEvents::default(),
        })
    }

    /// Reserve a free slot of the pod's VM for container `id`, booting the VM (from
    /// `settings`, with `config`'s number of slots) when the pod has none yet.
    fn reserve_slot(
        &self,
        config: &ShimConfig,
        settings: &flint::pod::PodSettings,
        member: &PodMember,
        id: &str,
    ) -> Result<usize, String> {
        let mut guard = self.lock();
        if guard.pod.is_none() {
            let dir = pod_dir(&config.work_dir, &self.shared.namespace, &member.sandbox_id)
                .ok_or_else(|| {
                    format!("the pod id '{}' cannot name a directory", member.sandbox_id)
                })?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("cannot create the pod's directory {}: {e}", dir.display()))?;
            let unwatch = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| format!("cannot create an eventfd: {e}"))?;
            let pod = match Pod::boot_slots(settings, config.pod_containers, &dir) {
                Ok(pod) => Arc::new(pod),
                Err(e) => {
                    remove_work_dir(&dir);
                    return Err(e.to_string());
                }
            };
            let unwatch = Arc::new(unwatch);
            self.watch(Arc::clone(&pod), Arc::clone(&unwatch), None);
            guard.pod = Some(PodVm {
                pod,
                sandbox_id: member.sandbox_id.clone(),
                dir,
                slots: vec![None; config.pod_containers],
                unwatch,
                vm_memory: settings.mem_mib << 20,
            });
        }
        let vm = guard.pod.as_mut().expect("booted above");
        let count = vm.slots.len();
        let free = vm.slots.iter().position(Option::is_none).ok_or_else(|| {
            format!(
                "the pod's VM holds at most {count} containers (pod_containers in the flint shim's configuration file)"
            )
        })?;
        vm.slots[free] = Some(id.to_string());
        Ok(free)
    }

    /// Give slot `slot` of the pod's VM back; stop the VM when nothing uses it any more.
    fn free_slot(&self, slot: usize) {
        let idle = {
            let mut guard = self.lock();
            if let Some(vm) = guard.pod.as_mut() {
                if let Some(s) = vm.slots.get_mut(slot) {
                    *s = None;
                }
            }
            guard.take_idle_pod()
        };
        if let Some(vm) = idle {
            let _ = vm.unwatch.write(1);
            vm.pod.stop();
            remove_work_dir(&vm.dir);
        }
    }

    /// Make the container's root disk and its VM: a VM of its own (`slot` `None`), or slot
    /// `slot` of the pod's VM, mounted by the guest agent. Returns the VM, its watcher's
    /// stop switch (a VM of its own) and its memory in bytes.
    #[allow(clippy::type_complexity)]
    fn create_with(
        &self,
        req: &api::CreateTaskRequest,
        bundle: &Bundle,
        settings: &flint::pod::PodSettings,
        work: &Path,
        slot: Option<usize>,
    ) -> Result<(Arc<Pod>, Option<Arc<vmm_sys_util::eventfd::EventFd>>, u64), String> {
        let _ = std::fs::remove_dir_all(work);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(work)
            .map_err(|e| {
                format!(
                    "cannot create the container's directory {}: {e}",
                    work.display()
                )
            })?;
        let mounts: Vec<RootMount> = req
            .rootfs
            .iter()
            .map(|m| RootMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let disk = work.join("rootfs.ext4");
        make_root_disk(&mounts, &bundle.rootfs, &disk).map_err(|e| e.to_string())?;
        let Some(slot) = slot else {
            let unwatch = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| format!("cannot create an eventfd: {e}"))?;
            let pod = Pod::boot(settings, &disk, work).map_err(|e| e.to_string())?;
            return Ok((
                Arc::new(pod),
                Some(Arc::new(unwatch)),
                settings.mem_mib << 20,
            ));
        };
        let (pod, vm_memory, placeholder) = {
            let guard = self.lock();
            let vm = guard
                .pod
                .as_ref()
                .ok_or_else(|| "the pod's VM has stopped".to_string())?;
            (Arc::clone(&vm.pod), vm.vm_memory, Pod::placeholder(&vm.dir))
        };
        let size = pod
            .replace_disk(slot, &disk)
            .map_err(|e| format!("cannot attach the container's root disk to the pod's VM: {e}"))?;
        let mounted = AgentClient::connect(pod.agent_socket(), AGENT_PORT, AGENT_CONNECT_TIMEOUT)
            // The guest sees whole sectors.
            .and_then(|mut agent| {
                agent.mount_container(&req.id, &slot_disk(slot), size / 512 * 512)
            });
        if let Err(e) = mounted {
            let _ = pod.replace_disk(slot, &placeholder);
            return Err(format!(
                "the pod's VM cannot mount the container's root file system: {e}"
            ));
        }
        Ok((pod, None, vm_memory))
    }

    /// Run process `exec_id` through the agent on a thread of its own; returns its guest pid
    /// once it runs.
    fn start_process(&self, container_id: &str, exec_id: &str) -> TtrpcResult<u32> {
        let (pod, spec, stdin, stdout, stderr, cgroup) = {
            let guard = self.lock();
            let container = guard.get(container_id)?;
            let process = container
                .processes
                .get(exec_id)
                .ok_or_else(|| error(Code::NOT_FOUND, format!("no process '{exec_id}'")))?;
            if !matches!(process.phase, Phase::Created) {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    "the process was started already",
                ));
            }
            if !exec_id.is_empty() && container.processes[""].exit().is_some() {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    "the container has stopped",
                ));
            }
            let mut spec = process.spec.clone();
            if container.slot.is_some() {
                // In the container's own root and namespaces, which its init creates.
                spec.root = None;
                spec.container = Some(InContainer {
                    id: container.id.clone(),
                    new_namespaces: exec_id.is_empty(),
                });
            }
            // The init first gives the container its cgroup in the guest, with its limits.
            let cgroup = exec_id.is_empty().then_some(CgroupRequest {
                in_pod: container.slot.is_some(),
                memory_limit: container.memory_limit,
                pids_limit: container.pids_limit,
            });
            (
                Arc::clone(&container.pod),
                spec,
                process.stdin.clone(),
                process.stdout.clone(),
                process.stderr.clone(),
                cgroup,
            )
        };
        let stdout = Output::open(&stdout).map_err(|e| {
            error(
                Code::INTERNAL,
                format!("cannot open the process's stdout {stdout}: {e}"),
            )
        })?;
        let stderr = Output::open(&stderr).map_err(|e| {
            error(
                Code::INTERNAL,
                format!("cannot open the process's stderr {stderr}: {e}"),
            )
        })?;
        let stdin = Input::new(&stdin);
        let (started_tx, started_rx) = mpsc::channel::<Result<u32, String>>();
        let service = self.clone();
        let id = exec_id.to_string();
        let cid = container_id.to_string();
        std::thread::Builder::new()
            .name(format!("process-{id}"))
            .spawn(move || {
                let result = (|| {
                    let mut client = AgentClient::connect(
                        pod.agent_socket(),
                        AGENT_PORT,
                        AGENT_CONNECT_TIMEOUT,
                    )?;
                    if let Some(cgroup) = &cgroup {
                        cgroup.send(&mut client, &cid)?;
                    }
                    // Told before the process's end (see the protocol's *Cgroups of
                    // containers*), so TaskOOM comes before TaskExit, as runc's shim has it.
                    let oom_service = service.clone();
                    let oom_cid = cid.clone();
                    client.on_oom_kills(Box::new(move |count| {
                        oom_service.oom_killed(&oom_cid, count)
                    }));
                    let signaller = client.signaller();
                    let mut tell = |pid: u32| {
                        {
                            let mut guard = service.lock();
                            if let Some(p) = guard
                                .containers
                                .get_mut(&cid)
                                .and_then(|c| c.processes.get_mut(&id))
                            {
                                if matches!(p.phase, Phase::Created) {
                                    p.phase = Phase::Running {
                                        signaller: Some(signaller.clone()),
                                    };
                                    p.guest_pid = Some(pid);
                                }
                            }
                        }
                        let _ = started_tx.send(Ok(pid));
                    };
                    client.run_and_tell(&spec, stdin, stdout, stderr, &mut tell)
                })();
                match result {
                    Ok(status) => {
                        let status = status.code().clamp(0, 255) as u32;
                        if id.is_empty() {
                            service.end_all(&cid, status);
                        } else {
                            service.record_exit(&cid, &id, status);
                        }
                    }
                    Err(e) => {
                        // Before it started, the error is the start request's answer.
                        let _ = started_tx.send(Err(match &e {
                            AgentError::NotStarted(m) => m.clone(),
                            other => format!("the guest agent failed: {other}"),
                        }));
                        let status = match e {
                            AgentError::NotStarted(_) => 127,
                            _ => STATUS_VM_GONE,
                        };
                        if id.is_empty() {
                            service.end_all(&cid, status);
                        } else {
                            service.record_exit(&cid, &id, status);
                        }
                    }
                }
            })
            .map_err(|e| error(Code::INTERNAL, format!("cannot start a thread: {e}")))?;
        loop {
            match started_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(pid)) => return Ok(pid),
                Ok(Err(message)) => return Err(error(Code::UNKNOWN, message)),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(error(Code::UNKNOWN, "the process ended before it started"))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            // The VM may end (or be killed) while the agent is still awaited.
            let reason = {
                let guard = self.lock();
                let container = guard.containers.get(container_id);
                let stopped = container
                    .and_then(|c| c.processes.get(exec_id))
                    .is_none_or(|p| p.exit().is_some());
                stopped.then(|| container.and_then(|c| c.pod.ending()))
            };
            if let Some(reason) = reason {
                return Err(error(
                    Code::UNKNOWN,
                    format!(
                        "the container's VM ended before the process started ({})",
                        reason.unwrap_or_else(|| "the container was removed".into())
                    ),
                ));
            }
        }
    }

    /// The guest reports `count` OOM kills in container `id`'s cgroup: tell containerd
    /// (`TaskOOM`) if that is more than before, at most once per [`OOM_EVENT_INTERVAL`].
    fn oom_killed(&self, id: &str, count: u64) {
        let due = {
            let mut guard = self.lock();
            guard
                .containers
                .get_mut(id)
                .is_some_and(|c| c.oom.report(count, Instant::now()))
        };
        if due {
            log::info!("container {id}: OOM kill in the guest ({count} in all)");
            let event = TaskOOM {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.publish("/tasks/oom", Box::new(event));
        }
    }

    /// The guest's numbers for container `id`'s cgroup, or `None` (with a warning) when the
    /// guest cannot answer.
    fn guest_stats(&self, id: &str) -> Option<flint_agent::CgroupStats> {
        let pod = {
            let guard = self.lock();
            let container = guard.containers.get(id)?;
            // A paused VM cannot answer; neither can one whose container has not started
            // (it has no cgroup yet).
            let started = !matches!(
                container.processes.get("").map(|p| &p.phase),
                Some(Phase::Created) | None
            );
            if container.paused || !started {
                return None;
            }
            Arc::clone(&container.pod)
        };
        if pod.ending().is_some() {
            return None;
        }
        let answer = AgentClient::connect(pod.agent_socket(), AGENT_PORT, AGENT_STATS_TIMEOUT)
            .and_then(|mut agent| agent.container_stats(id, AGENT_STATS_TIMEOUT));
        match answer {
            Ok(stats) => Some(stats),
            Err(e) => {
                log::warn!(
                    "container {id}: the guest gave no stats ({e}); the host's numbers are given"
                );
                None
            }
        }
    }

    /// The VM of a container of its own whose init process runs (pause and resume act on
    /// it).
    fn running_pod(&self, id: &str) -> TtrpcResult<Arc<Pod>> {
        let guard = self.lock();
        let container = guard.get(id)?;
        if container.slot.is_some() {
            return Err(error(
                Code::FAILED_PRECONDITION,
                "a container of a pod's VM cannot be paused or resumed alone (flint pauses whole VMs)",
            ));
        }
        match container.processes.get("").map(|p| &p.phase) {
            Some(Phase::Running { .. }) => Ok(Arc::clone(&container.pod)),
            _ => Err(error(
                Code::FAILED_PRECONDITION,
                "the container is not running",
            )),
        }
    }

    /// Remove the container: stop its VM, or unmount it from the pod's VM and free its
    /// slot (stopping that VM with its last container); remove its directory.
    fn remove(&self, container: Container) {
        // Waiters on its processes answer that they are gone.
        self.shared.changed.notify_all();
        match container.slot {
            None => {
                if let Some(unwatch) = &container.unwatch {
                    let _ = unwatch.write(1);
                }
                container.pod.stop();
            }
            Some(slot) => {
                if container.pod.ending().is_none() {
                    let unmounted = AgentClient::connect(
                        container.pod.agent_socket(),
                        AGENT_PORT,
                        AGENT_UNMOUNT_TIMEOUT,
                    )
                    .and_then(|mut agent| agent.unmount_container(&container.id));
                    if let Err(e) = unmounted {
                        log::warn!(
                            "cannot unmount container {} in the pod's VM: {e}",
                            container.id
                        );
                    }
                    let placeholder = {
                        let guard = self.lock();
                        guard.pod.as_ref().map(|vm| Pod::placeholder(&vm.dir))
                    };
                    if let Some(placeholder) = placeholder {
                        if let Err(e) = container.pod.replace_disk(slot, &placeholder) {
                            log::warn!("cannot free the pod VM's slot {slot}: {e}");
                        }
                    }
                }
                remove_work_dir(&container.work);
                drop(container.pod);
                self.free_slot(slot);
                return;
            }
        }
        drop(container.pod);
        remove_work_dir(&container.work);
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.lock().containers.contains_key(&req.id) {
            return Err(error(
                Code::ALREADY_EXISTS,
                format!("the container '{}' exists already", req.id),
            ));
        }
        let container = self
            .create_container(&req)
            .map_err(|message| error(Code::UNKNOWN, message))?;
        let watch = container
            .unwatch
            .as_ref()
            .map(|unwatch| (Arc::clone(&container.pod), Arc::clone(unwatch)));
        self.lock().containers.insert(req.id.clone(), container);
        if let Some((pod, unwatch)) = watch {
            self.watch(pod, unwatch, Some(req.id.clone()));
        }
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            pid: std::process::id(),
            ..Default::default()
        };
        self.publish("/tasks/create", Box::new(event));
        Ok(api::CreateTaskResponse {
            pid: std::process::id(),
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        self.start_process(&req.id, &req.exec_id)?;
        let pid = std::process::id();
        if req.exec_id.is_empty() {
            let event = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            self.publish("/tasks/start", Box::new(event));
        } else {
            let event = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish("/tasks/exec-started", Box::new(event));
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let process = exec_process(
            req.spec
                .as_ref()
                .map(|a| a.value.as_slice())
                .unwrap_or(b"{}"),
        )
        .and_then(|p| p.exec_spec())
        .map_err(|e| error(Code::INVALID_ARGUMENT, e))?;
        {
            let mut guard = self.lock();
            let container = guard.get_mut(&req.id)?;
            if req.exec_id.is_empty() || container.processes.contains_key(&req.exec_id) {
                return Err(error(
                    Code::ALREADY_EXISTS,
                    format!("the process '{}' exists already", req.exec_id),
                ));
            }
            let process = Process::new(process, req.terminal, &req.stdin, &req.stdout, &req.stderr)
                .map_err(|e| error(Code::INTERNAL, e))?;
            container.processes.insert(req.exec_id.clone(), process);
        }
        let event = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish("/tasks/exec-added", Box::new(event));
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut guard = self.lock();
        loop {
            let container = guard.get(&req.id)?;
            let process = container
                .processes
                .get(&req.exec_id)
                .ok_or_else(|| error(Code::NOT_FOUND, format!("no process '{}'", req.exec_id)))?;
            if let Some(exit) = process.exit() {
                return Ok(api::WaitResponse {
                    exit_status: exit.status,
                    exited_at: MessageField::some(exit.at.clone()),
                    ..Default::default()
                });
            }
            guard = self
                .shared
                .changed
                .wait(guard)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let signal = req.signal;
        if !(1..=64).contains(&signal) {
            return Err(error(
                Code::INVALID_ARGUMENT,
                format!("{signal} is not a signal"),
            ));
        }
        let (signaller, others, in_pod) = {
            let guard = self.lock();
            let container = guard.get(&req.id)?;
            // `all` of the container: its exec processes too.
            let others: Vec<Signaller> = if req.all && req.exec_id.is_empty() {
                container
                    .processes
                    .iter()
                    .filter(|(id, _)| !id.is_empty())
                    .filter_map(|(_, p)| match &p.phase {
                        Phase::Running { signaller } => signaller.clone(),
                        _ => None,
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let process = container
                .processes
                .get(&req.exec_id)
                .ok_or_else(|| error(Code::NOT_FOUND, format!("no process '{}'", req.exec_id)))?;
            let signaller = match &process.phase {
                Phase::Stopped(_) => {
                    return Err(error(Code::NOT_FOUND, "the process has finished already"))
                }
                Phase::Created => None,
                Phase::Running { signaller } => signaller.clone(),
            };
            (signaller, others, container.slot.is_some())
        };
        let init = req.exec_id.is_empty();
        for other in others {
            let _ = other.signal(signal as i32);
        }
        match signaller {
            // SIGKILL for a container with a VM of its own: stopping the VM is surer than
            // asking a guest that may not answer.
            _ if init && !in_pod && signal == libc::SIGKILL as u32 => {
                self.end_all(&req.id, killed(signal));
            }
            Some(signaller) => {
                signaller
                    .signal(signal as i32)
                    .map_err(|e| error(Code::UNKNOWN, format!("cannot signal the process: {e}")))?;
            }
            // Not started: it ends as if the signal had killed it.
            None if init => self.end_all(&req.id, killed(signal)),
            None => self.record_exit(&req.id, &req.exec_id, killed(signal)),
        }
        Ok(api::Empty::new())
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let guard = self.lock();
        let container = guard.get(&req.id)?;
        let process = container
            .processes
            .get(&req.exec_id)
            .ok_or_else(|| error(Code::NOT_FOUND, format!("no process '{}'", req.exec_id)))?;
        let mut state = api::StateResponse {
            id: if req.exec_id.is_empty() {
                container.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: container.bundle.clone(),
            pid: std::process::id(),
            status: match process.status() {
                Status::RUNNING if container.paused => Status::PAUSED,
                status => status,
            }
            .into(),
            stdin: process.stdin.clone(),
            stdout: process.stdout.clone(),
            stderr: process.stderr.clone(),
            terminal: process.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        if let Some(exit) = process.exit() {
            state.exit_status = exit.status;
            state.exited_at = MessageField::some(exit.at.clone());
        }
        Ok(state)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let guard = self.lock();
        let container = guard.get(&req.id)?;
        let processes = container
            .processes
            .values()
            .filter(|p| matches!(p.phase, Phase::Running { .. }))
            .filter_map(|p| p.guest_pid)
            .map(|pid| ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let pod = self.running_pod(&req.id)?;
        pod.pause().map_err(|e| {
            error(
                Code::UNKNOWN,
                format!("cannot pause the container's VM: {e}"),
            )
        })?;
        if let Some(c) = self.lock().containers.get_mut(&req.id) {
            c.paused = true;
        }
        let event = TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish("/tasks/paused", Box::new(event));
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let pod = self.running_pod(&req.id)?;
        pod.resume();
        if let Some(c) = self.lock().containers.get_mut(&req.id) {
            c.paused = false;
        }
        let event = TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish("/tasks/resumed", Box::new(event));
        Ok(api::Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let (vm_memory, processes) = {
            let guard = self.lock();
            let container = guard.get(&req.id)?;
            let running = container
                .processes
                .values()
                .filter(|p| matches!(p.phase, Phase::Running { .. }))
                .count();
            (container.vm_memory, running as u64)
        };
        let metrics = match self.guest_stats(&req.id) {
            Some(stats) => guest_metrics(&stats, vm_memory),
            None => {
                let usage = own_usage().ok_or_else(|| {
                    error(Code::INTERNAL, "cannot read the shim's own usage in /proc")
                })?;
                host_metrics(&usage, vm_memory, processes)
            }
        };
        let stats = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| error(Code::INTERNAL, format!("cannot encode the stats: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        // The process's stdin ends once containerd's writers of the FIFO have closed it
        // too, after what they wrote: without a terminal, that alone ends it; with one,
        // the shim's own writer held it open until now. The agent then types the
        // terminal's end of file.
        let mut guard = self.lock();
        let container = guard.get_mut(&req.id)?;
        let process = container
            .processes
            .get_mut(&req.exec_id)
            .ok_or_else(|| error(Code::NOT_FOUND, format!("no process '{}'", req.exec_id)))?;
        process.stdin_held = None;
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let size = window_size(req.height, req.width);
        let signaller = {
            let mut guard = self.lock();
            let container = guard.get_mut(&req.id)?;
            let process = container
                .processes
                .get_mut(&req.exec_id)
                .ok_or_else(|| error(Code::NOT_FOUND, format!("no process '{}'", req.exec_id)))?;
            if !process.terminal {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    "the process has no terminal to resize",
                ));
            }
            match &process.phase {
                // Not started: it starts with that size.
                Phase::Created => {
                    process.spec.terminal = Some(size);
                    None
                }
                Phase::Running { signaller } => signaller.clone(),
                Phase::Stopped(_) => None,
            }
        };
        if let Some(signaller) = signaller {
            signaller.resize(size.rows, size.cols).map_err(|e| {
                error(
                    Code::UNKNOWN,
                    format!("cannot resize the process's terminal: {e}"),
                )
            })?;
        }
        Ok(api::Empty::new())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut guard = self.lock();
        let container = guard.get_mut(&req.id)?;
        let process = container
            .processes
            .get(&req.exec_id)
            .ok_or_else(|| error(Code::NOT_FOUND, format!("no process '{}'", req.exec_id)))?;
        let exit = match &process.phase {
            Phase::Running { .. } => {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    "the process is still running",
                ))
            }
            Phase::Created => Exit {
                status: 0,
                at: now(),
            },
            Phase::Stopped(exit) => exit.clone(),
        };
        let container_id = container.id.clone();
        if req.exec_id.is_empty() {
            if let Some(container) = guard.containers.remove(&req.id) {
                drop(guard);
                self.remove(container);
            }
        } else {
            container.processes.remove(&req.exec_id);
            drop(guard);
        }
        self.shared.changed.notify_all();
        let event = TaskDelete {
            container_id: container_id.clone(),
            id: if req.exec_id.is_empty() {
                container_id
            } else {
                req.exec_id.clone()
            },
            pid: std::process::id(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at.clone()),
            ..Default::default()
        };
        if req.exec_id.is_empty() {
            self.publish("/tasks/delete", Box::new(event));
        }
        Ok(api::DeleteResponse {
            pid: std::process::id(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: std::process::id(),
            version: format!("flint {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let containers: Vec<Container> = {
            let mut guard = self.lock();
            if !guard.containers.is_empty() && !req.now {
                // containerd deletes the containers first; until then the shim stays.
                return Ok(api::Empty::new());
            }
            guard.containers.drain().map(|(_, c)| c).collect()
        };
        for container in containers {
            self.remove(container);
        }
        let idle = self.lock().pod.take();
        if let Some(vm) = idle {
            let _ = vm.unwatch.write(1);
            vm.pod.stop();
            remove_work_dir(&vm.dir);
        }
        self.shared.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_raising_its_oom_count_in_a_loop_gets_one_event_a_second() {
        let start = Instant::now();
        let mut oom = OomEvents::default();
        // The first kill is told at once (containerd sees TaskOOM before TaskExit).
        assert!(oom.report(1, start));
        // A hostile guest reports a rising count as fast as it can: recorded, not published.
        let events = (2..10_000u64)
            .filter(|&n| oom.report(n, start + Duration::from_micros(n)))
            .count();
        assert_eq!(events, 0);
        assert_eq!(oom.kills, 9_999);
        // A repeated or lower count is never news, however late.
        let later = start + OOM_EVENT_INTERVAL * 5;
        assert!(!oom.report(9_999, later));
        assert!(!oom.report(3, later));
        // A rise after the interval is.
        assert!(oom.report(10_000, later));
        assert!(!oom.report(10_001, later + OOM_EVENT_INTERVAL / 2));
        assert!(oom.report(10_002, later + OOM_EVENT_INTERVAL));
    }

    #[test]
    fn container_directories_stay_under_the_work_directory() {
        let root = Path::new("/w");
        assert_eq!(
            work_dir(root, "default", "c1"),
            Some(PathBuf::from("/w/default/c1"))
        );
        assert_eq!(work_dir(root, "default", ".."), None);
        assert_eq!(work_dir(root, "a/b", "c"), None);
        assert_eq!(work_dir(root, "k8s.io", ""), None);
    }

    #[test]
    fn usage_comes_from_proc_whatever_the_command_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 5 1 2";
        let usage = parse_usage(stat, "5000 1200 300 1 0 900 0", 100, 4096).unwrap();
        assert_eq!(
            usage,
            Usage {
                user_ns: 2_500_000_000,
                kernel_ns: 500_000_000,
                resident: 1200 * 4096,
            }
        );
        assert_eq!(parse_usage("garbage", "", 100, 4096), None);
    }

    #[test]
    fn a_signal_kills_with_128_plus_its_number() {
        assert_eq!(killed(9), 137);
        assert_eq!(killed(15), 143);
    }
}
