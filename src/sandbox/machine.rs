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
use super::{nat, RunOptions, SandboxNet, SetupError};
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
        .initramfs
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

/// The disks of a sandbox that runs a container image (`--image`, `--scratch`).
#[derive(Debug, Default)]
pub(super) struct ImageDisks<'a> {
    /// The image's files (ext4), attached read-only.
    pub image: Option<&'a Path>,
    /// The overlay's writes (ext4), attached read-write.
    pub scratch: Option<&'a Path>,
}

/// The kernel command line of a sandbox: with a container image, its disk and the scratch
/// disk, named as the guest sees them (`/dev/vda`, `/dev/vdb`: in the order attached); with
/// `--net nat`, the guest's network settings (the same in every sandbox).
pub(super) fn sandbox_cmdline(disks: &ImageDisks, nat: bool) -> String {
    let mut cmdline = SANDBOX_CMDLINE.to_string();
    if nat {
        cmdline.push(' ');
        cmdline.push_str(&nat::guest_param());
    }
    if disks.image.is_some() {
        cmdline.push_str(&format!(" {}=/dev/vda", flint_agent::IMAGE_PARAM));
        if disks.scratch.is_some() {
            cmdline.push_str(&format!(" {}=/dev/vdb", flint_agent::SCRATCH_PARAM));
        }
    }
    cmdline
}

/// A sandbox's balloon (unless `--no-page-reporting`): no target, only free page reporting,
/// so that memory the guest frees (a finished build, a deleted file in its RAM file system)
/// goes back to the host.
pub(super) const SANDBOX_BALLOON: vmm::BalloonConfig = vmm::BalloonConfig {
    amount_mib: 0,
    deflate_on_oom: false,
    stats_polling_interval_s: 0,
    free_page_reporting: true,
};

/// The sandbox's VM configuration, its sockets and disk copies in `work`.
pub(super) fn vm_config(
    options: &RunOptions,
    kernel: &Path,
    image: PathBuf,
    disks: &ImageDisks,
    work: &Path,
) -> Result<VmConfig, SetupError> {
    let mut config = VmConfig::new(kernel);
    let is_nat = matches!(options.net, Some(SandboxNet::Nat(_)));
    config.cmdline = sandbox_cmdline(disks, is_nat);
    config.vcpus = options.vcpus;
    config.mem_mib = options.mem_mib;
    config.vsock = Some(VsockConfig {
        guest_cid: SANDBOX_CID,
        uds_path: work.join("vsock.sock"),
    });
    if !options.no_page_reporting {
        config.balloon = Some(SANDBOX_BALLOON);
    }
    match &options.net {
        Some(SandboxNet::Tap(net)) => config.nets.push(net.clone()),
        // In the sandbox's own network namespace: always the same TAP and MAC address.
        Some(SandboxNet::Nat(_)) => config.nets.push(vmm::NetConfig {
            mac: Some(nat::GUEST_MAC),
            ..vmm::NetConfig::new(nat::TAP_NAME)
        }),
        None => {}
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
    if let Some(disk) = disks.image {
        let mut drive = DriveConfig::new(disk);
        drive.read_only = true;
        config.drives.push(drive);
        if let Some(scratch) = disks.scratch {
            config.drives.push(DriveConfig::new(scratch));
        }
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
    // Without a root disk, a TAP of the user's or a scratch disk (whose backends a restored
    // guest would find changed), restore a snapshot of a booted sandbox (made by the first
    // such run) instead of booting. A container image's disk never changes: its path names
    // its digest and the template's key covers the file. `--net nat` looks the same to every
    // guest (the same TAP, addresses and MAC in each sandbox's own network namespace), and
    // its settings are on the command line, which the key covers.
    let template = (!options.cold
        && options.rootfs.is_none()
        && !matches!(options.net, Some(SandboxNet::Tap(_)))
        && options.scratch.is_none())
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
/// initramfs, command line and machine, a vsock device, the same NIC (`--net nat`'s) or none,
/// and no disk but a container image's, the same file read-only.
fn same_sandbox(restored: &VmConfig, want: &VmConfig) -> bool {
    let same_disks = restored.drives.len() == want.drives.len()
        && restored
            .drives
            .iter()
            .zip(&want.drives)
            .all(|(r, w)| r.path == w.path && r.read_only && w.read_only && !r.root && !w.root);
    restored.kernel == want.kernel
        && restored.initrd == want.initrd
        && restored.cmdline == want.cmdline
        && restored.vcpus == want.vcpus
        && restored.mem_mib == want.mem_mib
        && restored.entropy == want.entropy
        && restored.balloon == want.balloon
        && same_disks
        && restored.nets.len() == want.nets.len()
        && restored.nets.iter().zip(&want.nets).all(|(r, w)| {
            r.tap == w.tap
                && r.mac == w.mac
                && r.rx_rate_limiter.is_none()
                && r.tx_rate_limiter.is_none()
        })
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
        let written = vm
            .snapshot(state, memory, vmm::SnapshotType::Full)
            .map_err(|e| e.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_and_scratch_disks_are_named_on_the_command_line() {
        let none = sandbox_cmdline(&ImageDisks::default(), false);
        assert_eq!(none, SANDBOX_CMDLINE);
        let image = Path::new("/c/images/disks/ab.ext4");
        let with_image = sandbox_cmdline(
            &ImageDisks {
                image: Some(image),
                scratch: None,
            },
            false,
        );
        assert_eq!(
            with_image,
            format!("{SANDBOX_CMDLINE} flint.image=/dev/vda")
        );
        let with_scratch = sandbox_cmdline(
            &ImageDisks {
                image: Some(image),
                scratch: Some(Path::new("/w/scratch.ext4")),
            },
            false,
        );
        assert_eq!(
            with_scratch,
            format!("{SANDBOX_CMDLINE} flint.image=/dev/vda flint.scratch=/dev/vdb")
        );
    }

    #[test]
    fn net_nat_gives_every_sandbox_the_same_nic_and_keeps_the_snapshot() {
        let dir = std::env::temp_dir().join(format!("flint-machine-nat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let nat = RunOptions {
            vcpus: 1,
            mem_mib: 256,
            net: Some(SandboxNet::Nat(Default::default())),
            ..Default::default()
        };
        let k = Path::new("/k/vmlinux");
        let none = ImageDisks::default();
        let config = vm_config(&nat, k, PathBuf::from("/s/i"), &none, &dir).unwrap();
        assert_eq!(config.nets.len(), 1);
        assert_eq!(config.nets[0].tap, "flint0");
        assert_eq!(config.nets[0].mac, Some(nat::GUEST_MAC));
        assert!(config
            .cmdline
            .ends_with(" flint.net=10.0.2.15/24,10.0.2.2,10.0.2.3,10.0.2.4,10.0.2.5"));
        assert!(same_sandbox(&config, &config));
        // allow= is the host's business: the guest is the same.
        let allow = RunOptions {
            net: Some(SandboxNet::Nat(
                nat::parse("nat,allow=10.0.0.0/8").unwrap().unwrap(),
            )),
            ..nat.clone()
        };
        let other = vm_config(&allow, k, PathBuf::from("/s/i"), &none, &dir).unwrap();
        assert!(same_sandbox(&config, &other));
        // A snapshot without the NIC is not this sandbox, nor the other way round.
        let plain = RunOptions {
            net: None,
            ..nat.clone()
        };
        let plain = vm_config(&plain, k, PathBuf::from("/s/i"), &none, &dir).unwrap();
        assert!(plain.nets.is_empty());
        assert!(!same_sandbox(&plain, &config));
        assert!(!same_sandbox(&config, &plain));
        let mut moved = config.clone();
        moved.nets[0].mac = Some([2, 0, 0, 0, 0, 1]);
        assert!(!same_sandbox(&moved, &config));
        // Every sandbox reports its free memory; a snapshot of one without is not this one.
        assert_eq!(config.balloon, Some(SANDBOX_BALLOON));
        assert!(config
            .balloon
            .is_some_and(|b| b.free_page_reporting && b.amount_mib == 0));
        let mut old = config.clone();
        old.balloon = None;
        assert!(!same_sandbox(&old, &config));
        let keep = RunOptions {
            no_page_reporting: true,
            ..nat.clone()
        };
        let keep = vm_config(&keep, k, PathBuf::from("/s/i"), &none, &dir).unwrap();
        assert_eq!(keep.balloon, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_image_disk_is_attached_read_only_before_the_scratch_disk() {
        let dir = std::env::temp_dir().join(format!("flint-machine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = RunOptions {
            vcpus: 1,
            mem_mib: 256,
            ..Default::default()
        };
        let disks = ImageDisks {
            image: Some(Path::new("/c/ab.ext4")),
            scratch: Some(Path::new("/w/scratch.ext4")),
        };
        let config = vm_config(
            &options,
            Path::new("/k/vmlinux"),
            PathBuf::from("/s/initramfs"),
            &disks,
            &dir,
        )
        .unwrap();
        assert_eq!(config.initrd, Some(PathBuf::from("/s/initramfs")));
        let drives: Vec<_> = config
            .drives_in_guest_order()
            .iter()
            .map(|d| (d.path.clone(), d.read_only, d.root))
            .collect();
        assert_eq!(
            drives,
            vec![
                (PathBuf::from("/c/ab.ext4"), true, false),
                (PathBuf::from("/w/scratch.ext4"), false, false),
            ]
        );
        // A restored template is this sandbox only with the same image disk, read-only (and
        // no scratch disk: runs with one boot).
        assert!(!same_sandbox(&config, &config));
        let mut config = config;
        config.drives.truncate(1);
        assert!(same_sandbox(&config, &config));
        let mut other = config.clone();
        other.drives[0].path = PathBuf::from("/c/cd.ext4");
        assert!(!same_sandbox(&other, &config));
        let mut writable = config.clone();
        writable.drives[0].read_only = false;
        assert!(!same_sandbox(&writable, &config));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
