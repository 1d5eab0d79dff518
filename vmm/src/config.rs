//! The one configuration type every front end (CLI flags today; config file and API later)
//! builds, and its validation, so that an error reads the same whichever front end caused it.

use std::path::PathBuf;

pub use devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig, MAX_REFILL_TIME_MS};

/// Kernel command line used when the user gives none: serial console, reboot through the
/// keyboard controller (which ends the VM), no PCI probing, and an i8042 driver that skips
/// probing a mouse port and multiplexer the VM does not have. ACPI stays on: the guest finds
/// its devices and the VM generation ID through it (see [`VmConfig::acpi`]).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u32 = 1;
/// Default guest memory in MiB.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Smallest guest memory accepted, in MiB.
/// Smallest MTU an interface may be given: what IPv4 needs (RFC 791).
pub const MIN_MTU: u16 = 68;
pub const MIN_MEM_MIB: u64 = arch::layout::MIN_MEM_SIZE >> 20;
/// Largest guest memory accepted, in MiB.
pub const MAX_MEM_MIB: u64 = arch::layout::MAX_MEM_SIZE >> 20;
/// Most vCPUs a guest can have (the MP table's limit); the host may allow fewer.
pub const MAX_VCPUS: u32 = 254;
/// Longest kernel command line in bytes, not counting the terminating NUL.
pub const MAX_CMDLINE_LEN: usize = arch::layout::CMDLINE_MAX_SIZE - 1;

/// Longest drive id (virtio-blk serial) in bytes.
pub const MAX_DRIVE_ID_LEN: usize = 20;
/// Most virtio devices a VM can have: one interrupt line each, on IOAPIC pins 5-23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Longest root partition UUID accepted, in bytes.
pub const MAX_PARTUUID_LEN: usize = 36;

/// What a guest's flush request does to a disk (Firecracker's `cache_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CacheType {
    /// The disk offers no flush command: the guest treats it as write-through and writes
    /// reach the host's page cache only (fast; lost if the host crashes).
    Unsafe,
    /// The disk offers a flush command, and a guest flush reaches stable storage
    /// (`fdatasync` of the image).
    #[default]
    Writeback,
}

/// One virtio-blk disk backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DriveConfig {
    /// The image file (or block device) on the host.
    pub path: PathBuf,
    /// Advertise the disk read-only and refuse writes.
    pub read_only: bool,
    /// The guest mounts this disk as `/` (`root=/dev/vda`).
    pub root: bool,
    /// What the guest reads as the disk's serial (virtio-blk get-id); a stable default derived
    /// from the file when `None`.
    pub id: Option<String>,
    /// Limits the disk's bandwidth (bytes) and operations (requests); unlimited when `None`.
    pub rate_limiter: Option<RateLimiterConfig>,
    /// For the root disk: the guest mounts `root=PARTUUID=<this>` (a partition of the disk)
    /// instead of the whole disk, `/dev/vda`.
    #[serde(default)]
    pub partuuid: Option<String>,
    /// What guest flushes do.
    #[serde(default)]
    pub cache: CacheType,
}

impl DriveConfig {
    /// A read-write, non-root disk without an id.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DriveConfig {
            path: path.into(),
            read_only: false,
            root: false,
            id: None,
            rate_limiter: None,
            partuuid: None,
            cache: CacheType::default(),
        }
    }
}

/// One virtio-net interface backed by a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// How the front end names the interface (the API's `iface_id`); `None` for the CLI.
    #[serde(default)]
    pub id: Option<String>,
    /// The TAP interface: opened if it exists, otherwise created (and gone when flint exits).
    pub tap: String,
    /// The guest's MAC address; a stable default per interface when `None`.
    pub mac: Option<[u8; 6]>,
    /// Limits frames from the TAP to the guest; unlimited when `None`.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits frames from the guest to the TAP; unlimited when `None`.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// The MTU offered to the guest (`VIRTIO_NET_F_MTU`); the guest's default when `None`.
    #[serde(default)]
    pub mtu: Option<u16>,
}

impl NetConfig {
    /// An interface on the TAP `tap` with the default MAC address and no rate limits.
    pub fn new(tap: impl Into<String>) -> Self {
        NetConfig {
            id: None,
            tap: tap.into(),
            mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            mtu: None,
        }
    }
}

/// The virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The host side: a Unix socket flint listens on (`CONNECT <port>` to reach a guest port);
    /// guest connections to host port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// The microVM metadata service: which NICs reach it, where, and how.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmdsConfig {
    pub version: devices::mmds::MmdsVersion,
    /// The address the guest reaches it at (link-local, 169.254.0.0/16).
    pub ipv4_address: std::net::Ipv4Addr,
    /// The ids of the network interfaces whose guest reaches it.
    pub network_interfaces: Vec<String>,
    /// Always answer in IMDS format.
    pub imds_compat: bool,
    /// The data store the NICs serve (shared with the API); not part of the saved
    /// configuration: a restore gets its contents from the snapshot.
    #[serde(skip)]
    pub store: MmdsStore,
}

/// A data store handle, equal only to itself.
#[derive(Debug, Clone, Default)]
pub struct MmdsStore(pub devices::mmds::SharedMmds);

impl PartialEq for MmdsStore {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for MmdsStore {}

/// What backs guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HugePages {
    /// Ordinary 4 KiB pages, allocated as the guest touches them.
    #[default]
    None,
    /// 2 MiB pages from the host's hugetlbfs pool (`/proc/sys/vm/nr_hugepages`), all of the
    /// guest's reserved when the VM is built (so a host short of them refuses the VM then,
    /// instead of the guest faulting later). Guest memory must be a multiple of 2 MiB.
    #[serde(rename = "2M")]
    Size2M,
    /// Ordinary pages that the host kernel may back with transparent huge pages
    /// (`madvise(MADV_HUGEPAGE)` on guest memory; what the host's
    /// `/sys/kernel/mm/transparent_hugepage` settings then do is theirs).
    Transparent,
}

impl HugePages {
    /// The API's spelling: "None", "2M" or "Transparent".
    pub fn as_str(self) -> &'static str {
        match self {
            HugePages::None => "None",
            HugePages::Size2M => "2M",
            HugePages::Transparent => "Transparent",
        }
    }
}

/// The memory balloon (virtio-balloon).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonConfig {
    /// How much memory the guest is asked to give back, in MiB (the balloon's target).
    pub amount_mib: u32,
    /// The guest takes memory back from the balloon when it would otherwise run out.
    pub deflate_on_oom: bool,
    /// Interval of the guest's memory statistics in seconds; 0: no statistics. Statistics
    /// cannot be turned on or off once the VM runs, only their interval changed.
    pub stats_polling_interval_s: u16,
    /// The guest reports the memory it frees, which the host then takes back.
    pub free_page_reporting: bool,
}

impl BalloonConfig {
    /// The target in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.amount_mib.saturating_mul(256)
    }

    /// What the device offers the guest.
    pub fn features(&self) -> devices::virtio::balloon::BalloonFeatures {
        devices::virtio::balloon::BalloonFeatures {
            deflate_on_oom: self.deflate_on_oom,
            stats_interval_s: self.stats_polling_interval_s,
            free_page_reporting: self.free_page_reporting,
        }
    }
}

/// Everything needed to boot one microVM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Guest kernel: an uncompressed ELF `vmlinux` or a `bzImage`.
    pub kernel: PathBuf,
    /// Optional initial RAM disk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// virtio-blk disks, in the order the guest sees them (a root disk always comes first).
    pub drives: Vec<DriveConfig>,
    /// Whether the guest gets a virtio-rng entropy device.
    pub entropy: bool,
    /// Limits on the entropy device: bytes handed out (bandwidth) and requests (ops).
    #[serde(default)]
    pub entropy_rate_limiter: Option<RateLimiterConfig>,
    /// virtio-net interfaces, in the order the guest sees them (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Simultaneous multithreading: the guest sees two threads per core (vCPUs 2n and 2n + 1
    /// on core n) instead of one; needs an even vCPU count above 1.
    #[serde(default)]
    pub smt: bool,
    /// Firecracker's boot timer at its MMIO address (`0xd000_0000`) as well as flint's port
    /// `0x3f0`: a guest writing 123 there gets its boot time logged.
    #[serde(default)]
    pub boot_timer: bool,
    /// The microVM metadata service, if any NIC serves it.
    #[serde(default)]
    pub mmds: Option<MmdsConfig>,
    /// What backs guest memory.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Record which pages of guest memory change (KVM's dirty log for the guest's writes,
    /// `vm-memory`'s bitmap for the VMM's), so that a diff snapshot can hold only the pages
    /// that changed since the previous snapshot.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// The memory balloon, if any.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            drives: Vec::new(),
            entropy: true,
            entropy_rate_limiter: None,
            nets: Vec::new(),
            vsock: None,
            smt: false,
            boot_timer: false,
            mmds: None,
            huge_pages: HugePages::None,
            track_dirty_pages: false,
            balloon: None,
        }
    }

    /// Whether the guest reads ACPI tables: unless its command line says `acpi=off`. With
    /// ACPI, the guest finds the virtio devices and the VM generation ID (which makes a
    /// restored guest reseed its random number generator) in the tables; without, it finds
    /// the devices on its command line, its CPUs in the MP table, and has no generation ID.
    pub fn acpi(&self) -> bool {
        !self
            .cmdline
            .split_ascii_whitespace()
            .any(|p| p == "acpi=off")
    }

    /// Check what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        if self.smt && self.vcpus > 1 && self.vcpus % 2 != 0 {
            return Err(ConfigError::SmtOddVcpus(self.vcpus));
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemoryTooSmall(self.mem_mib));
        }
        if self.mem_mib > MAX_MEM_MIB {
            return Err(ConfigError::MemoryTooLarge(self.mem_mib));
        }
        if self.huge_pages == HugePages::Size2M && self.mem_mib % 2 != 0 {
            return Err(ConfigError::HugePagesMemory(self.mem_mib));
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if let Some(c) = self
            .cmdline
            .chars()
            .find(|c| !c.is_ascii() || c.is_ascii_control())
        {
            return Err(ConfigError::CmdlineCharacter(c));
        }
        if self.drives.iter().filter(|d| d.root).count() > 1 {
            return Err(ConfigError::SeveralRootDisks);
        }
        let devices = self.drives.len()
            + usize::from(self.entropy)
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        for (i, drive) in self.drives.iter().enumerate() {
            if let Some(id) = &drive.id {
                let printable = id.chars().all(|c| c.is_ascii_graphic());
                if id.is_empty() || id.len() > MAX_DRIVE_ID_LEN || !printable {
                    return Err(ConfigError::DriveId(id.clone()));
                }
                if self.drives[..i].iter().any(|d| d.id.as_ref() == Some(id)) {
                    return Err(ConfigError::DuplicateDriveId(id.clone()));
                }
            }
        }
        for drive in &self.drives {
            if let Some(uuid) = &drive.partuuid {
                let well_formed = uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
                if uuid.is_empty() || uuid.len() > MAX_PARTUUID_LEN || !well_formed {
                    return Err(ConfigError::Partuuid(uuid.clone()));
                }
                if !drive.root {
                    return Err(ConfigError::PartuuidNotRoot(uuid.clone()));
                }
            }
        }
        for (i, net) in self.nets.iter().enumerate() {
            if self.nets[..i].iter().any(|n| n.tap == net.tap) {
                return Err(ConfigError::DuplicateTap(net.tap.clone()));
            }
            if let Some(id) = &net.id {
                if self.nets[..i].iter().any(|n| n.id.as_ref() == Some(id)) {
                    return Err(ConfigError::DuplicateNetId(id.clone()));
                }
            }
            if let Some(mac) = net.mac {
                if mac[0] & 1 != 0 {
                    return Err(ConfigError::MulticastMac(format_mac(&mac)));
                }
            }
            if let Some(mtu) = net.mtu.filter(|m| *m < MIN_MTU) {
                return Err(ConfigError::Mtu(mtu));
            }
        }
        let limiters = self
            .drives
            .iter()
            .map(|d| {
                (
                    d.path.display().to_string(),
                    "rate_limiter",
                    &d.rate_limiter,
                )
            })
            .chain(self.nets.iter().flat_map(|n| {
                [
                    (n.tap.clone(), "rx_rate_limiter", &n.rx_rate_limiter),
                    (n.tap.clone(), "tx_rate_limiter", &n.tx_rate_limiter),
                ]
            }))
            .chain([(
                "the entropy device".to_string(),
                "rate_limiter",
                &self.entropy_rate_limiter,
            )]);
        for (device, field, limiter) in limiters {
            if let Some(Err((bucket, e))) = limiter.as_ref().map(RateLimiterConfig::validate) {
                return Err(ConfigError::RateLimiter {
                    device,
                    field: format!("{field}.{bucket}"),
                    problem: e.to_string(),
                });
            }
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 || vsock.guest_cid > u64::from(u32::MAX - 1) {
                return Err(ConfigError::VsockCid(vsock.guest_cid));
            }
        }
        if let Some(balloon) = &self.balloon {
            if u64::from(balloon.amount_mib) > self.mem_mib {
                return Err(ConfigError::BalloonTooLarge {
                    amount: balloon.amount_mib,
                    memory: self.mem_mib,
                });
            }
            if self.huge_pages == HugePages::Size2M {
                return Err(ConfigError::BalloonHugePages);
            }
        }
        if let Some(mmds) = &self.mmds {
            if !mmds.ipv4_address.is_link_local() {
                return Err(ConfigError::MmdsAddress(mmds.ipv4_address));
            }
            if mmds.network_interfaces.is_empty() {
                return Err(ConfigError::MmdsNoInterface);
            }
            for id in &mmds.network_interfaces {
                if !self.nets.iter().any(|n| n.id.as_ref() == Some(id)) {
                    return Err(ConfigError::MmdsInterface(id.clone()));
                }
            }
        }
        Ok(())
    }

    /// The drives in the order the guest enumerates them: the root disk first (it becomes
    /// `/dev/vda`), then the others as given.
    pub fn drives_in_guest_order(&self) -> Vec<&DriveConfig> {
        let root = self.drives.iter().filter(|d| d.root);
        root.chain(self.drives.iter().filter(|d| !d.root)).collect()
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The part of a [`VmConfig`] a [`ConfigError`] is about, so that each front end can name it
/// in its own terms (a command-line flag, an API field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Vcpus,
    Memory,
    Cmdline,
    /// A disk's root flag.
    DriveRoot,
    /// A disk's id.
    DriveId,
    /// A disk's root partition UUID.
    DrivePartuuid,
    /// The devices as a whole (their number).
    Devices,
    /// An interface's TAP device.
    NetTap,
    /// An interface's id.
    NetId,
    /// An interface's MAC address.
    NetMac,
    NetMtu,
    Mmds,
    /// A rate limiter (the error names the device and the limiter's field itself).
    RateLimiter,
    /// The vsock device's guest CID.
    VsockCid,
    /// A disk's backing file (when it is replaced on a running VM).
    DrivePath,
    /// The file metrics are written to.
    MetricsPath,
    /// The balloon device.
    Balloon,
}

impl ConfigError {
    /// Which part of the configuration is wrong.
    pub fn field(&self) -> Field {
        match self {
            ConfigError::NoVcpus
            | ConfigError::TooManyVcpus { .. }
            | ConfigError::SmtOddVcpus(_) => Field::Vcpus,
            ConfigError::MemoryTooSmall(_)
            | ConfigError::MemoryTooLarge(_)
            | ConfigError::HugePagesMemory(_) => Field::Memory,
            ConfigError::CmdlineTooLong(_) | ConfigError::CmdlineCharacter(_) => Field::Cmdline,
            ConfigError::SeveralRootDisks => Field::DriveRoot,
            ConfigError::TooManyDevices(_) => Field::Devices,
            ConfigError::DriveId(_) | ConfigError::DuplicateDriveId(_) => Field::DriveId,
            ConfigError::Partuuid(_) | ConfigError::PartuuidNotRoot(_) => Field::DrivePartuuid,
            ConfigError::DuplicateTap(_) => Field::NetTap,
            ConfigError::DuplicateNetId(_) => Field::NetId,
            ConfigError::MulticastMac(_) => Field::NetMac,
            ConfigError::Mtu(_) => Field::NetMtu,
            ConfigError::VsockCid(_) => Field::VsockCid,
            ConfigError::MmdsAddress(_)
            | ConfigError::MmdsNoInterface
            | ConfigError::MmdsInterface(_) => Field::Mmds,
            ConfigError::RateLimiter { .. } => Field::RateLimiter,
            ConfigError::BalloonTooLarge { .. } | ConfigError::BalloonHugePages => Field::Balloon,
        }
    }
}

/// A configuration that cannot describe a VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("a VM needs at least 1 vCPU")]
    NoVcpus,
    #[error("{requested} vCPUs is more than flint supports (at most {max})")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("{0} vCPUs cannot be paired into cores: with simultaneous multithreading the vCPU count must be 1 or even")]
    SmtOddVcpus(u32),
    #[error("{0} MiB of guest memory is too small (at least {MIN_MEM_MIB} MiB)")]
    MemoryTooSmall(u64),
    #[error("{0} MiB of guest memory is more than flint supports (at most {MAX_MEM_MIB} MiB)")]
    MemoryTooLarge(u64),
    #[error("{0} MiB of guest memory cannot be backed by 2 MiB huge pages: with huge_pages \"2M\" it must be a multiple of 2 MiB")]
    HugePagesMemory(u64),
    #[error("the kernel command line is {0} bytes long; at most {MAX_CMDLINE_LEN} fit")]
    CmdlineTooLong(usize),
    #[error("the kernel command line contains {0:?}; only printable ASCII is allowed")]
    CmdlineCharacter(char),
    #[error("only one disk can be the root disk")]
    SeveralRootDisks,
    #[error("{0} virtio devices is more than a VM can have (at most {MAX_VIRTIO_DEVICES})")]
    TooManyDevices(usize),
    #[error(
        "drive id {0:?} must be 1 to {MAX_DRIVE_ID_LEN} printable ASCII characters without spaces"
    )]
    DriveId(String),
    #[error("drive id {0:?} is used by more than one disk")]
    DuplicateDriveId(String),
    #[error("TAP device {0} is given to more than one network interface")]
    DuplicateTap(String),
    #[error("interface id {0:?} is used by more than one network interface")]
    DuplicateNetId(String),
    #[error("MAC address {0} is a multicast address; a network interface needs a unicast one")]
    MulticastMac(String),
    #[error("an MTU of {0} is too small for IPv4: it must be from {MIN_MTU} to 65535")]
    Mtu(u16),
    #[error("partition UUID {0:?} must be 1 to {MAX_PARTUUID_LEN} hexadecimal digits and dashes")]
    Partuuid(String),
    #[error("partition UUID {0:?} is given for a disk that is not the root disk")]
    PartuuidNotRoot(String),
    #[error("vsock guest CID {0} is invalid: it must be from 3 to 4294967294")]
    VsockCid(u64),
    #[error("the MMDS address {0} is not link-local: it must be in 169.254.0.0/16")]
    MmdsAddress(std::net::Ipv4Addr),
    #[error("a balloon of {amount} MiB is larger than the guest's {memory} MiB of memory")]
    BalloonTooLarge { amount: u32, memory: u64 },
    #[error(
        "the balloon cannot be used with 2 MiB huge pages: it gives memory back in 4 KiB pages"
    )]
    BalloonHugePages,
    #[error("the MMDS needs at least one network interface")]
    MmdsNoInterface,
    #[error(
        "the MMDS names the network interface {0:?}, which is not configured (configure it first)"
    )]
    MmdsInterface(String),
    #[error("{device}: {field}.{problem}")]
    RateLimiter {
        device: String,
        field: String,
        problem: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiters_are_validated_with_the_device_and_field() {
        let mut c = VmConfig::new("/vmlinux");
        c.drives.push(DriveConfig {
            rate_limiter: Some(RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig::per_second(1 << 20)),
                ops: Some(TokenBucketConfig::per_second(100)),
            }),
            ..DriveConfig::new("/d.img")
        });
        c.nets.push(NetConfig {
            tx_rate_limiter: Some(RateLimiterConfig::default()),
            ..NetConfig::new("tap0")
        });
        assert_eq!(c.validate(), Ok(()));
        c.nets[0].rx_rate_limiter = Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                refill_time_ms: 0,
                ..TokenBucketConfig::per_second(5)
            }),
        });
        let err = c.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "tap0: rx_rate_limiter.ops.refill_time must be at least 1 millisecond, not 0"
        );
        c.nets.clear();
        c.drives[0].rate_limiter = Some(RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::per_second(0)),
            ops: None,
        });
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "/d.img: rate_limiter.bandwidth.size must be at least 1"
        );
    }

    #[test]
    fn defaults_are_valid() {
        let mut c = VmConfig::new("/vmlinux");
        assert_eq!(c.validate(), Ok(()));
        assert_eq!((c.vcpus, c.mem_mib), (1, 128));
        assert!(c.cmdline.contains("console=ttyS0"));
        assert!(c.cmdline.contains("reboot=k"));
        assert!(c.acpi(), "the default command line keeps ACPI on");
        c.cmdline = "console=ttyS0 acpi=off quiet".into();
        assert!(!c.acpi());
        c.cmdline = "console=ttyS0 xacpi=off acpi=offx".into();
        assert!(c.acpi());
    }

    #[test]
    fn each_bad_value_is_named() {
        let base = VmConfig::new("/vmlinux");
        let cases = [
            (
                VmConfig {
                    vcpus: 0,
                    ..base.clone()
                },
                ConfigError::NoVcpus,
            ),
            (
                VmConfig {
                    vcpus: 255,
                    ..base.clone()
                },
                ConfigError::TooManyVcpus {
                    requested: 255,
                    max: 254,
                },
            ),
            (
                VmConfig {
                    mem_mib: 1,
                    ..base.clone()
                },
                ConfigError::MemoryTooSmall(1),
            ),
            (
                VmConfig {
                    mem_mib: 129,
                    huge_pages: HugePages::Size2M,
                    ..base.clone()
                },
                ConfigError::HugePagesMemory(129),
            ),
            (
                VmConfig {
                    vcpus: 3,
                    smt: true,
                    ..base.clone()
                },
                ConfigError::SmtOddVcpus(3),
            ),
            (
                VmConfig {
                    mem_mib: MAX_MEM_MIB + 1,
                    ..base.clone()
                },
                ConfigError::MemoryTooLarge(MAX_MEM_MIB + 1),
            ),
            (
                VmConfig {
                    cmdline: "x".repeat(2048),
                    ..base.clone()
                },
                ConfigError::CmdlineTooLong(2048),
            ),
            (
                VmConfig {
                    cmdline: "a\nb".into(),
                    ..base.clone()
                },
                ConfigError::CmdlineCharacter('\n'),
            ),
        ];
        for (config, want) in cases {
            assert_eq!(config.validate(), Err(want));
        }
    }

    #[test]
    fn drive_rules() {
        let mut c = VmConfig::new("/vmlinux");
        let disk = |p: &str, root: bool, id: Option<&str>| DriveConfig {
            root,
            id: id.map(str::to_string),
            ..DriveConfig::new(p)
        };
        c.drives = vec![disk("/a", false, Some("data")), disk("/b", true, None)];
        assert_eq!(c.validate(), Ok(()));
        let order: Vec<_> = c
            .drives_in_guest_order()
            .iter()
            .map(|d| d.path.clone())
            .collect();
        assert_eq!(order, vec![PathBuf::from("/b"), PathBuf::from("/a")]);

        c.drives.push(disk("/c", true, None));
        assert_eq!(c.validate(), Err(ConfigError::SeveralRootDisks));
        c.drives.pop();
        c.drives.push(disk("/c", false, Some("data")));
        assert_eq!(
            c.validate(),
            Err(ConfigError::DuplicateDriveId("data".into()))
        );
        c.drives.pop();
        for bad in ["", "has space", "x".repeat(21).as_str()] {
            c.drives[0].id = Some(bad.to_string());
            assert_eq!(c.validate(), Err(ConfigError::DriveId(bad.to_string())));
        }
        c.drives = (0..19)
            .map(|i| disk(&format!("/d{i}"), false, None))
            .collect();
        assert_eq!(c.validate(), Err(ConfigError::TooManyDevices(20)));
        c.entropy = false;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn partuuid_mac_and_interface_ids_are_checked() {
        let mut c = VmConfig::new("/vmlinux");
        c.drives.push(DriveConfig {
            root: true,
            partuuid: Some("4cbb6a2a-01".into()),
            ..DriveConfig::new("/r.img")
        });
        assert_eq!(c.validate(), Ok(()));
        // Whatever reaches the kernel command line must not add parameters to it.
        for bad in ["", "abc def", "x", "1 init=/bin/sh", &"a".repeat(37)] {
            c.drives[0].partuuid = Some(bad.into());
            let err = c.validate().unwrap_err();
            assert_eq!(err, ConfigError::Partuuid(bad.into()));
            assert_eq!(err.field(), Field::DrivePartuuid);
        }
        c.drives[0].partuuid = Some("0a1b".into());
        c.drives[0].root = false;
        assert_eq!(
            c.validate(),
            Err(ConfigError::PartuuidNotRoot("0a1b".into()))
        );
        c.drives.clear();

        let net = |id: &str, tap: &str, mac: Option<[u8; 6]>| NetConfig {
            id: Some(id.into()),
            mac,
            ..NetConfig::new(tap)
        };
        c.nets = vec![
            net("eth0", "tap0", Some([0x02, 0, 0, 0, 0, 1])),
            net("eth1", "tap1", None),
        ];
        assert_eq!(c.validate(), Ok(()));
        c.nets[0].mtu = Some(67);
        assert_eq!(c.validate(), Err(ConfigError::Mtu(67)));
        assert_eq!(ConfigError::Mtu(67).field(), Field::NetMtu);
        c.nets[0].mtu = Some(68);
        assert_eq!(c.validate(), Ok(()));
        c.nets[1].id = Some("eth0".into());
        assert_eq!(
            c.validate(),
            Err(ConfigError::DuplicateNetId("eth0".into()))
        );
        c.nets[1].id = Some("eth1".into());
        c.nets[1].mac = Some([0x03, 0, 0, 0, 0, 2]);
        let err = c.validate().unwrap_err();
        assert_eq!(err, ConfigError::MulticastMac("03:00:00:00:00:02".into()));
        assert_eq!(err.field(), Field::NetMac);
    }

    #[test]
    fn limits_are_inclusive() {
        let base = VmConfig::new("/vmlinux");
        for c in [
            VmConfig {
                vcpus: 254,
                ..base.clone()
            },
            VmConfig {
                mem_mib: 2,
                ..base.clone()
            },
            VmConfig {
                vcpus: 1,
                smt: true,
                ..base.clone()
            },
            VmConfig {
                vcpus: 4,
                smt: true,
                ..base.clone()
            },
            VmConfig {
                mem_mib: 8192,
                ..base.clone()
            },
            VmConfig {
                mem_mib: 130,
                huge_pages: HugePages::Size2M,
                ..base.clone()
            },
            VmConfig {
                mem_mib: 129,
                huge_pages: HugePages::None,
                ..base.clone()
            },
            VmConfig {
                cmdline: "x".repeat(2047),
                ..base.clone()
            },
        ] {
            assert_eq!(c.validate(), Ok(()));
        }
    }
}
