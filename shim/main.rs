//! `containerd-shim-flint-v2`: containerd's runtime shim v2 for flint. containerd starts it
//! for a container run with `--runtime io.containerd.flint.v2` (or a CRI runtime handler of
//! that type); the shim boots a flint microVM whose root file system is the container's
//! and runs the container's processes in it through flint's guest agent. The protocol is
//! containerd's own Rust shim crate (ttrpc); see [`task`] for the task API, [`config`] for
//! where the kernel and sandbox image come from.

mod config;
mod io;
mod spec;
mod task;

use std::sync::Arc;

use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

/// The runtime name containerd knows the shim by (`ctr run --runtime`).
const RUNTIME: &str = "io.containerd.flint.v2";

struct FlintShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    /// The socket this shim serves on (`-socket`, given to the serving process only).
    socket: String,
}

impl containerd_shim::Shim for FlintShim {
    type T = task::Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        FlintShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            socket: args.socket.clone(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // One shim, and so one VM, per container, or per pod for the containers of a pod
        // (CRI annotations): a pod's containers reach its sandbox's shim (the shim started
        // with the same socket finds it listening and answers its address).
        let bundle = std::env::current_dir().unwrap_or_default();
        let grouping = spec::grouping(&bundle, &opts.id);
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        // In the bundle (the working directory): the shim removes its socket on its way out,
        // and `delete` after a shim that died, by this file.
        containerd_shim::synchronous::util::write_address(&address)?;
        Ok(address)
    }

    /// containerd's cleanup after a shim that is gone (killed, crashed): its VM went with
    /// it; remove what it left on disk. Also after a container of a pod failed to be created
    /// in the pod's shim, which may well still run the pod's VM: its socket and the pod's
    /// directory then stay.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let address = containerd_shim::synchronous::util::read_address().ok();
        let alive = address.as_deref().is_some_and(shim_answers);
        if let Ok(config) = config::ShimConfig::load() {
            if let Some(dir) = task::work_dir(&config.work_dir, &self.namespace, &self.id) {
                task::remove_work_dir(&dir);
            }
            // A pod's VM went with its shim: its directory.
            let bundle = std::env::current_dir().unwrap_or_default();
            let read = spec::Bundle::read(&bundle).ok();
            // And its TAP: the redirect to it that is left in the network namespace.
            if let Some(network) = read.as_ref().and_then(task::pod_network).filter(|_| !alive) {
                match flint::podnet::remove_stale(&network.netns) {
                    Ok(true) => log::info!(
                        "removed the redirect a killed shim left in {}",
                        network.netns.display()
                    ),
                    Ok(false) => {}
                    Err(e) => log::warn!("{e}"),
                }
            }
            let member = read.and_then(|b| b.pod);
            if let Some(member) = member.filter(|_| !alive) {
                let dir = task::pod_dir(&config.work_dir, &self.namespace, &member.sandbox_id);
                if let Some(dir) = dir {
                    task::remove_work_dir(&dir);
                }
            }
        }
        if let Some(address) = address.filter(|_| !alive) {
            remove_socket(&address);
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(containerd_shim::util::timestamp()?),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
        // Remove the socket here, from the path this process was given: the shim crate does
        // it next from the bundle's `address` file, but containerd may have removed the
        // bundle by then (after a failed create it shuts the shim down and deletes the bundle
        // at once), and `delete` leaves the socket of a shim that still answers.
        if !self.socket.is_empty() {
            remove_socket(&self.socket);
        }
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        task::Service::new(&self.namespace, Some(publisher), Arc::clone(&self.exit))
    }
}

/// Whether a shim listens on `address` (`unix://PATH`): the socket accepts a connection.
fn shim_answers(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Remove the Unix socket a shim listened on (`unix://PATH`), if it is still there.
fn remove_socket(address: &str) {
    use std::os::unix::fs::FileTypeExt;
    let path = address.strip_prefix("unix://").unwrap_or(address);
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

fn main() {
    containerd_shim::run::<FlintShim>(
        RUNTIME,
        Some(Config {
            // The shim's only children are short-lived helpers (mkfs.ext4) it waits for
            // itself: a reaper would take their exit statuses away.
            no_reaper: true,
            no_sub_reaper: true,
            ..Default::default()
        }),
    );
}
