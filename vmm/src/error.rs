//! The errors a VM can fail to start or run with, each one sentence for the user.

use std::io;
use std::path::PathBuf;

use crate::config::ConfigError;

/// Why flint could not start or keep running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}", kvm_open_message(.0))]
    KvmOpen(io::Error),
    #[error("KVM API version {0} is not supported (flint needs version 12)")]
    KvmApiVersion(i32),
    #[error("KVM on this host lacks {0}, which flint needs")]
    KvmCapability(&'static str),
    #[error("{requested} vCPUs is more than this host's KVM allows (at most {max})")]
    HostVcpuLimit { requested: u32, max: u32 },
    #[error("KVM failed to {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    GuestMemory { mib: u64, reason: String },
    #[error("cannot read {what} {}: {}", .path.display(), io_reason(.source))]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is neither an ELF vmlinux nor a bzImage kernel", .0.display())]
    KernelFormat(PathBuf),
    #[error("cannot load the kernel {} into {mib} MiB of guest memory: {reason}", .path.display())]
    KernelLoad {
        path: PathBuf,
        mib: u64,
        reason: String,
    },
    #[error("the initrd {} ({size} bytes) does not fit in {mib} MiB of guest memory beside the kernel", .path.display())]
    InitrdTooLarge { path: PathBuf, size: u64, mib: u64 },
    #[error(
        "the snapshot's guest clock was saved without the host's real time (KVM reads it only \
         with a TSC-based host clock), so it cannot be advanced by the time since"
    )]
    ClockWithoutRealtime,
    #[error("cannot write the kernel command line into guest memory: {0}")]
    Cmdline(String),
    #[error(transparent)]
    Block(#[from] devices::virtio::block::BlockError),
    #[error(transparent)]
    Net(#[from] devices::virtio::net::NetError),
    #[error(transparent)]
    Vsock(#[from] devices::virtio::vsock::VsockError),
    #[error(transparent)]
    VmGenId(#[from] devices::vmgenid::VmGenIdError),
    #[error("{device}: cannot create a rate limiter timer: {}", io_reason(.source))]
    RateLimiterTimer {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("no interrupt line left for virtio device {0}")]
    NoInterruptLine(usize),
    #[error("cannot place virtio device {number} on the MMIO bus: {source}")]
    MmioBus {
        number: usize,
        #[source]
        source: devices::bus::BusError,
    },
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("there is no drive with drive_id {0:?}")]
    NoSuchDrive(String),
    #[error("device {0} is not a disk")]
    NotADisk(String),
    #[error("there is no network interface number {0}")]
    NoSuchNet(usize),
    #[error("the VM has no balloon device")]
    NoBalloon,
    #[error("the balloon's statistics are not enabled: set stats_polling_interval_s before the VM starts")]
    BalloonStatsDisabled,
    #[error("the device {0} has no rate limiter to change")]
    NoRateLimiter(String),
    #[error("the kernel command line with flint's device parameters is {len} bytes long; at most {max} fit")]
    CmdlineWithDevicesTooLong { len: usize, max: usize },
    #[error("cannot set up the boot state: {0}")]
    Arch(#[from] arch::Error),
    #[error("cannot set up vCPU {id}: {what}: {source}")]
    VcpuSetup {
        id: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot snapshot the VM: it is not paused")]
    NotPaused,
    #[error("cannot save the vCPUs' state: {0}")]
    SnapshotVcpus(String),
    #[error("cannot write the {what} file {}: {}", .path.display(), io_reason(.source))]
    SnapshotWrite {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a flint snapshot state file: {reason}", .path.display())]
    SnapshotFormat { path: PathBuf, reason: String },
    #[error("{} is a version {version} flint snapshot; this flint reads only version {}", .path.display(), crate::snapshot::VERSION)]
    SnapshotVersion { path: PathBuf, version: u32 },
    #[error("the snapshot {} cannot be restored: {reason}", .path.display())]
    SnapshotInvalid { path: PathBuf, reason: String },
    #[error("the snapshot memory file {} holds {size} bytes but the snapshot's VM has {expected} bytes of memory", .path.display())]
    SnapshotMemorySize {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    #[error("cannot map the snapshot memory file {}: {reason}", .path.display())]
    SnapshotMemoryMap { path: PathBuf, reason: String },
    #[error("cannot back {mib} MiB of guest memory with 2 MiB huge pages: it needs {needed} of them and the host has {available} free (raise vm.nr_hugepages, /proc/sys/vm/nr_hugepages)")]
    HugePagesShort {
        mib: u64,
        needed: u64,
        available: u64,
    },
    #[error("this host has no pool of 2 MiB huge pages (/sys/kernel/mm/hugepages/hugepages-2048kB), so huge_pages \"2M\" cannot be used")]
    NoHugePages,
    #[error("this host's kernel has no transparent huge pages (madvise MADV_HUGEPAGE is refused), so huge_pages \"Transparent\" cannot be used")]
    NoTransparentHugePages,
    #[error("a diff snapshot needs dirty-page tracking: set track_dirty_pages in the machine configuration (or the snapshot load) before the VM starts")]
    DiffWithoutTracking,
    #[error("a diff snapshot needs a base, and this VM has written no snapshot yet (nor was it loaded from one that names its memory): create a Full snapshot first")]
    DiffWithoutBase,
    #[error("{} is a diff snapshot, which holds only the pages changed since its base: merge it into its base first (flint snapshot merge)", .0.display())]
    DiffSnapshotLoad(PathBuf),
    #[error("{} is not a diff snapshot, so there is nothing to merge", .0.display())]
    NotADiff(PathBuf),
    #[error(transparent)]
    Uffd(#[from] crate::uffd::UffdError),
    #[error("the Uffd memory backend serves ordinary pages only: load the snapshot with huge_pages \"None\" or \"Transparent\"")]
    UffdHugePages,
    #[error("the page-fault handler for guest memory ({}) went away, so the guest cannot continue", .0.display())]
    PageFaultHandlerGone(PathBuf),
    #[error("the diff snapshot {} applies on top of a different snapshot than {}", .diff.display(), .base.display())]
    WrongBase { diff: PathBuf, base: PathBuf },
    #[error("KVM refused MSR {index:#x} of vCPU {id} from the snapshot")]
    SnapshotMsr { id: u32, index: u32 },
    #[error("cannot {what}: {}", io_reason(.source))]
    Host {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An I/O error as a short reason: "No such file or directory", without "(os error 2)".
fn io_reason(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn kvm_open_message(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => {
            "/dev/kvm does not exist: KVM is not available on this host".to_string()
        }
        io::ErrorKind::PermissionDenied => {
            "no permission to open /dev/kvm: run flint as a user with read-write access to it \
             (usually the kvm group)"
                .to_string()
        }
        _ => format!("cannot open /dev/kvm: {}", io_reason(e)),
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_open_errors_say_what_to_do() {
        let missing = Error::KvmOpen(io::Error::from_raw_os_error(libc::ENOENT)).to_string();
        assert_eq!(
            missing,
            "/dev/kvm does not exist: KVM is not available on this host"
        );
        let denied = Error::KvmOpen(io::Error::from_raw_os_error(libc::EACCES)).to_string();
        assert!(
            denied.starts_with("no permission to open /dev/kvm"),
            "{denied}"
        );
    }

    #[test]
    fn messages_are_one_line() {
        let e = Error::KernelFormat(PathBuf::from("/tmp/x"));
        assert_eq!(
            e.to_string(),
            "/tmp/x is neither an ELF vmlinux nor a bzImage kernel"
        );
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn device_errors_keep_their_sentence_and_source() {
        use std::error::Error as _;
        let e = Error::from(devices::virtio::vsock::VsockError::InvalidCid(2));
        assert_eq!(
            e.to_string(),
            "the guest CID 2 is reserved; use a CID from 3 to 4294967294"
        );
        let e = Error::RateLimiterTimer {
            device: "tap0".into(),
            source: io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert_eq!(
            e.to_string(),
            "tap0: cannot create a rate limiter timer: Too many open files"
        );
        assert!(e.source().is_some());
    }
}
