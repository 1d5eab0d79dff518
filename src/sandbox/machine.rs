//! The sandbox's VM: its configuration from the [`RunOptions`], and the VM itself, restored
//! from the snapshot template of a booted sandbox or booted (and then snapshotted for the
//! runs after this one).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::debug;
use vmm::{DriveConfig, Vm, VmConfig, VsockConfig};

use super::console::console_to;
use super::{RunOptions, SetupError};
use crate::template::{Staging, Template};

/// The guest's vsock context id inside a `flint run` sandbox.
const SANDBOX_CID: u64 = 3;
/// Kernel command line of sandboxes: a silent console (it is not shown) and quick reboots.
/// ACPI stays on: with it, a sandbox restored from the template gets a new VM generation ID
/// and its kernel reseeds its random number generator by itself.
const SANDBOX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet \
                               i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The guest kernel and the sandbox image (an initramfs, unused with `--rootfs`) a sandbox
/// boots: the options' or the default ones in `cache`, which must exist.
pub(super) fn images(options: &RunOptions, cache: &Path) -> Result<(PathBuf, PathBuf), SetupError> {
    let kernel = options
        .kernel
        .clone()
        .unwrap_or_else(|| cache.join("guest/vmlinux"));
    let image = options
        .image
        .clone()
        .unwrap_or_else(|| cache.join("sandbox/initramfs.cpio.gz"));
    for (what, path, hint) in [
        ("guest kernel", &kernel, "resources/build-guest-kernel.sh"),
        ("sandbox image", &image, "resources/build-sandbox-image.sh"),
    ] {
        let needed = options.rootfs.is_none() || what == "guest kernel";
        if needed && !path.is_file() {
            return Err(SetupError::MissingImage {
                what,
                path: path.clone(),
                hint,
            });
        }
    }
    Ok((kernel, image))
}

/// The sandbox's VM configuration, its sockets and disk copies in `work`.
pub(super) fn vm_config(
    options: &RunOptions,
    kernel: &Path,
    image: PathBuf,
    work: &Path,
) -> Result<VmConfig, SetupError> {
    let mut config = VmConfig::new(kernel);
    config.cmdline = SANDBOX_CMDLINE.to_string();
    config.vcpus = options.vcpus;
    config.mem_mib = options.mem_mib;
    config.vsock = Some(VsockConfig {
        guest_cid: SANDBOX_CID,
        uds_path: work.join("vsock.sock"),
    });
    if let Some(net) = &options.net {
        config.nets.push(net.clone());
    }
    match &options.rootfs {
        // A private copy: the image itself is never modified.
        Some(rootfs) => {
            let copy = work.join("rootfs.img");
            if let Err(source) = std::fs::copy(rootfs, &copy) {
                return Err(SetupError::CopyRootfs {
                    path: rootfs.clone(),
                    source,
                });
            }
            let mut drive = DriveConfig::new(copy);
            drive.root = true;
            drive.rate_limiter = options.rootfs_rate_limiter;
            config.drives.push(drive);
        }
        None => config.initrd = Some(image),
    }
    config.validate()?;
    Ok(config)
}

/// The host end of the sandbox's vsock device, where its agent is reached.
pub(super) fn agent_socket(config: &VmConfig) -> &Path {
    &config
        .vsock
        .as_ref()
        .expect("a sandbox has a vsock device")
        .uds_path
}

/// The template a sandbox's VM was restored from. The guest's clock and random number
/// generator are refreshed first; if that fails, `refresh_failed` is set and the template is
/// discarded, so that the next run boots and makes a new one.
pub(super) struct Restored {
    pub template: Template,
    pub refresh_failed: Arc<AtomicBool>,
}

impl Restored {
    /// Discard the template if the guest restored from it could not be refreshed.
    pub(super) fn discard_if_unrefreshed(&self) {
        if self.refresh_failed.load(Ordering::Acquire) {
            self.template.discard();
            log::warn!("sandbox: the restored guest could not be refreshed; its snapshot was discarded, the next run boots");
        }
    }
}

/// The sandbox's VM, not started yet, and where it came from.
pub(super) struct SandboxVm {
    pub vm: Vm,
    /// Set when the VM was restored from a template.
    pub restored: Option<Restored>,
    /// Set when the VM booted and a template is to be made of it once its agent answers.
    pub staging: Option<Staging>,
}

/// The sandbox's VM, not started yet: restored from its template when `options` allow one
/// (the default image, no network, not `--cold`) and it restores, booted otherwise.
pub(super) fn obtain(
    options: &RunOptions,
    cache: &Path,
    config: &VmConfig,
    console_log: &Path,
    start: Instant,
) -> Result<SandboxVm, SetupError> {
    // With the default image and no network, restore a snapshot of a booted sandbox (made by
    // the first such run) instead of booting.
    let template = (!options.cold && options.rootfs.is_none() && options.net.is_none())
        .then(|| Template::for_config(cache, config))
        .and_then(|t| {
            t.map_err(|e| log::warn!("sandbox: no snapshot cache: {e}"))
                .ok()
        });
    if let Some(template) = &template {
        if let Some(vm) = restore(template, config, console_log, start) {
            debug!("sandbox: restored at {} ms", start.elapsed().as_millis());
            return Ok(SandboxVm {
                vm,
                restored: Some(Restored {
                    template: template.clone(),
                    refresh_failed: Arc::new(AtomicBool::new(false)),
                }),
                staging: None,
            });
        }
    }
    let console = console_to(console_log).map_err(SetupError::ConsoleLog)?;
    let vm = Vm::build(config, console, start)?;
    // A booted guest is snapshotted once its agent answers, for the runs after this one.
    let staging = template.and_then(|t| {
        t.prepare()
            .map_err(|e| log::warn!("sandbox: cannot make a snapshot for later runs: {e}"))
            .ok()
    });
    Ok(SandboxVm {
        vm,
        restored: None,
        staging,
    })
}

/// Whether a VM restored with `restored` is the sandbox `want` describes: the same kernel,
/// image, command line and machine, a vsock device, and no disk or NIC (whose backends a
/// snapshot would open).
fn same_sandbox(restored: &VmConfig, want: &VmConfig) -> bool {
    restored.kernel == want.kernel
        && restored.initrd == want.initrd
        && restored.cmdline == want.cmdline
        && restored.vcpus == want.vcpus
        && restored.mem_mib == want.mem_mib
        && restored.entropy == want.entropy
        && restored.drives.is_empty()
        && restored.nets.is_empty()
        && restored.vsock.as_ref().map(|v| v.guest_cid) == Some(SANDBOX_CID)
}

/// Restore the sandbox VM from `template` (its vsock socket moved to `want`'s); `None`, with
/// the template discarded, when that fails.
fn restore(template: &Template, want: &VmConfig, console_log: &Path, start: Instant) -> Option<Vm> {
    let uds = agent_socket(want);
    let (state, memory) = template.files()?;
    let console = console_to(console_log).ok()?;
    let mut move_socket = |config: &mut VmConfig| {
        if let Some(vsock) = config.vsock.as_mut() {
            vsock.uds_path = uds.to_path_buf();
        }
    };
    match Vm::restore(&state, &memory, &mut move_socket, console, start) {
        Ok((vm, config)) if same_sandbox(&config, want) => Some(vm),
        Ok(_) => {
            log::warn!("sandbox: the snapshot is not of this sandbox's VM; booting instead");
            template.discard();
            None
        }
        Err(e) => {
            log::warn!("sandbox: cannot restore the snapshot ({e}); booting instead");
            template.discard();
            None
        }
    }
}

/// Snapshot the booted sandbox into `template` (pausing it meanwhile). A failure is logged:
/// this run goes on, and the next one boots again.
pub(super) fn make_template(vm: &Vm, staging: Staging, start: Instant) {
    let began = Instant::now();
    let made = staging.commit(|state, memory| {
        vm.pause().map_err(|e| e.to_string())?;
        let written = vm.snapshot(state, memory).map_err(|e| e.to_string());
        vm.resume();
        written
    });
    match made {
        Ok(()) => debug!(
            "sandbox: snapshot of the booted guest made in {} ms (at {} ms)",
            began.elapsed().as_millis(),
            start.elapsed().as_millis()
        ),
        Err(e) => log::warn!("sandbox: cannot snapshot the booted sandbox for later runs: {e}"),
    }
}
