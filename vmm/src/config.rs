//! The one configuration type every front end (CLI flags today; config file and API later)
//! builds, and its validation, so that an error reads the same whichever front end caused it.

use std::path::PathBuf;

/// Kernel command line used when the user gives none: serial console, reboot through the
/// keyboard controller (which ends the VM), no PCI probing, and an i8042 driver that skips
/// probing a mouse port and multiplexer the VM does not have.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u32 = 1;
/// Default guest memory in MiB.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Smallest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u64 = arch::layout::MIN_MEM_SIZE >> 20;
/// Largest guest memory accepted, in MiB.
pub const MAX_MEM_MIB: u64 = arch::layout::MAX_MEM_SIZE >> 20;
/// Most vCPUs a guest can have (the MP table's limit); the host may allow fewer.
pub const MAX_VCPUS: u32 = 254;
/// Longest kernel command line in bytes, not counting the terminating NUL.
pub const MAX_CMDLINE_LEN: usize = arch::layout::CMDLINE_MAX_SIZE - 1;

/// Everything needed to boot one microVM.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        }
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
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemoryTooSmall(self.mem_mib));
        }
        if self.mem_mib > MAX_MEM_MIB {
            return Err(ConfigError::MemoryTooLarge(self.mem_mib));
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
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

/// A configuration that cannot describe a VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("a VM needs at least 1 vCPU")]
    NoVcpus,
    #[error("{requested} vCPUs is more than flint supports (at most {max})")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("{0} MiB of guest memory is too small (at least {MIN_MEM_MIB} MiB)")]
    MemoryTooSmall(u64),
    #[error("{0} MiB of guest memory is more than flint supports (at most {MAX_MEM_MIB} MiB)")]
    MemoryTooLarge(u64),
    #[error("the kernel command line is {0} bytes long; at most {MAX_CMDLINE_LEN} fit")]
    CmdlineTooLong(usize),
    #[error("the kernel command line contains {0:?}; only printable ASCII is allowed")]
    CmdlineCharacter(char),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = VmConfig::new("/vmlinux");
        assert_eq!(c.validate(), Ok(()));
        assert_eq!((c.vcpus, c.mem_mib), (1, 128));
        assert!(c.cmdline.contains("console=ttyS0"));
        assert!(c.cmdline.contains("reboot=k"));
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
                    mem_mib: 63,
                    ..base.clone()
                },
                ConfigError::MemoryTooSmall(63),
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
    fn limits_are_inclusive() {
        let base = VmConfig::new("/vmlinux");
        for c in [
            VmConfig {
                vcpus: 254,
                ..base.clone()
            },
            VmConfig {
                mem_mib: 64,
                ..base.clone()
            },
            VmConfig {
                mem_mib: 8192,
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
