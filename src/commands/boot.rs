//! `flint boot`: boot a guest kernel on the serial console.

use std::path::PathBuf;

use clap::{ArgMatches, Args};
use vmm::config::{DEFAULT_CMDLINE, DEFAULT_MEM_MIB, DEFAULT_VCPUS};
use vmm::{DriveConfig, HugePages, NetConfig, VmConfig, VsockConfig};

use super::{once, values};
use crate::cli::{CliError, Command};

pub(crate) const ABOUT: &str = "Boot a guest kernel on the serial console";

pub(crate) const AFTER_HELP: &str = "\
Boot a Linux guest and connect its serial console to this terminal. Input is forwarded; a
terminal is put in raw mode until flint exits, so Ctrl-C goes to the guest: type Ctrl-A x to
stop the VM from the console (Ctrl-A Ctrl-A sends one Ctrl-A). The guest always gets a
virtio-rng entropy device (/dev/hwrng).

Exit status: 0 when the guest reboots or powers off; 1 when flint cannot start the VM or a
vCPU fails (one line on stderr says why); 128+N when stopped by signal N (SIGINT, SIGTERM,
SIGHUP); 130 after Ctrl-A x. After the guest writes 123 to port 0x3f0, flint logs the time
from its start. Set FLINT_LOG=debug|info|warn|error|off to change how much flint logs
(default: info).";

#[derive(Debug, Args)]
pub(crate) struct BootArgs {
    /// Guest kernel: uncompressed ELF vmlinux (PVH entry used when present) or bzImage
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    kernel: Vec<PathBuf>,

    /// Initial RAM disk
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    initrd: Vec<PathBuf>,

    /// Kernel command line
    #[arg(long, value_name = "STRING", allow_hyphen_values = true, default_value = DEFAULT_CMDLINE)]
    cmdline: Vec<String>,

    #[arg(long, value_name = "N", allow_hyphen_values = true,
          help = format!("Number of vCPUs, 1-254 and at most what the host's KVM allows [default: {DEFAULT_VCPUS}]"),
          value_parser = |s: &str| values::number::<u32>("--vcpus", s))]
    vcpus: Vec<u32>,

    #[arg(long, value_name = "MIB", allow_hyphen_values = true,
          help = format!("Guest memory in MiB, at least 2 (the kernel and initrd must fit) [default: {DEFAULT_MEM_MIB}]"),
          value_parser = |s: &str| values::number::<u64>("--memory", s))]
    memory: Vec<u64>,

    /// What backs guest memory: none (ordinary 4 KiB pages), 2M (2 MiB pages from the host's
    /// hugetlbfs pool, vm.nr_hugepages, all reserved at start; --memory must be a multiple of 2)
    /// or transparent (the host kernel may use transparent huge pages) [default: none]
    #[arg(long = "huge-pages", value_name = "none|2M|transparent", allow_hyphen_values = true,
          value_parser = values::huge_pages)]
    huge_pages: Vec<HugePages>,

    /// A virtio-blk disk on a raw image file (size a multiple of 512); ro: read-only; root: the
    /// guest mounts it as / (root=/dev/vda); id: the serial the guest reads (at most 20
    /// characters); bw, iops: rate limits in data bytes and requests per second (token buckets
    /// refilled over 1 s). Repeatable; the guest sees the root disk first, then the others in
    /// order (vda, vdb, ...)
    #[arg(long, value_name = "PATH[,ro][,root][,id=NAME][,bw=BYTES_PER_SEC][,iops=N]",
          allow_hyphen_values = true, value_parser = values::disk)]
    disk: Vec<DriveConfig>,

    /// Shorthand for --disk PATH,root
    #[arg(long, value_name = "PATH", allow_hyphen_values = true, value_parser = values::root_disk)]
    rootfs: Vec<DriveConfig>,

    /// A virtio-net NIC on the host TAP device NAME (opened if it exists, else created and
    /// removed at exit; needs CAP_NET_ADMIN); bw: limit each direction (receive, transmit) to
    /// that many frame bytes per second (token buckets refilled over 1 s); mtu: the MTU
    /// offered to the guest (68-65535). Repeatable; the default MAC is 06:46:4c followed by
    /// three bytes of a hash of NAME
    #[arg(long, value_name = "tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,bw=BYTES_PER_SEC][,mtu=N]",
          allow_hyphen_values = true, value_parser = values::net)]
    net: Vec<NetConfig>,

    /// A virtio-vsock device with guest CID N (>= 3); host programs connect to the Unix socket
    /// PATH and send "CONNECT <port>\n" to reach a guest port; guest connections to host port P
    /// go to PATH_P
    #[arg(long, value_name = "cid=N,uds=PATH", allow_hyphen_values = true,
          value_parser = values::vsock)]
    vsock: Vec<VsockConfig>,

    /// Do not install seccomp filters (debugging only: every flint thread normally allows only
    /// the system calls it needs; a forbidden call stops flint with status 159 and a line
    /// naming the call)
    #[arg(long, overrides_with = "no_seccomp")]
    no_seccomp: bool,
}

impl BootArgs {
    /// The VM to boot. `matches` are this subcommand's, for the order of `--disk` and
    /// `--rootfs` among each other.
    pub(crate) fn into_command(self, matches: &ArgMatches) -> Result<Command, CliError> {
        super::no_seccomp(self.no_seccomp);
        let mut config = VmConfig::new(once("--kernel", self.kernel)?.ok_or(CliError::NoKernel)?);
        config.initrd = once("--initrd", self.initrd)?;
        config.cmdline = once("--cmdline", self.cmdline)?.unwrap_or(config.cmdline);
        config.vcpus = once("--vcpus", self.vcpus)?.unwrap_or(config.vcpus);
        config.mem_mib = once("--memory", self.memory)?.unwrap_or(config.mem_mib);
        config.huge_pages = once("--huge-pages", self.huge_pages)?.unwrap_or(config.huge_pages);
        config.drives = in_given_order(
            matches
                .indices_of("disk")
                .into_iter()
                .flatten()
                .zip(self.disk),
            matches
                .indices_of("rootfs")
                .into_iter()
                .flatten()
                .zip(self.rootfs),
        );
        config.nets = self.net;
        config.vsock = once("--vsock", self.vsock)?;
        Ok(Command::Boot(config))
    }
}

/// The items of two indexed lists in the order of their indices.
fn in_given_order<T>(
    a: impl Iterator<Item = (usize, T)>,
    b: impl Iterator<Item = (usize, T)>,
) -> Vec<T> {
    let mut all: Vec<(usize, T)> = a.chain(b).collect();
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}
