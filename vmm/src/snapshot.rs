//! The snapshot format: a JSON state file (vCPUs, interrupt controllers, clock, devices and the
//! VM's configuration) next to a memory file holding guest RAM.
//!
//! The memory file is the RAM regions back to back in guest-address order; all-zero pages are
//! holes. A restored VM maps it copy-on-write (or, with huge pages, reads it), so the file is
//! never modified and can back any number of VMs at once.
//!
//! A diff snapshot's memory file is as long, but holds only the pages changed since the
//! snapshot it applies on top of (its base: the one the VM last wrote or was loaded from);
//! every other page is a hole. Each state file names its memory with a random id, and a diff's
//! names its base's: [`merge`] writes the diff's pages over a copy of its base's memory file
//! and gives a snapshot that loads like any other. A diff itself is not loaded.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use devices::legacy::{I8042State, SerialConsoleState};
use devices::virtio::mmio::MmioTransportState;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::error::{Error, Result};

/// What the state file starts with.
pub const MAGIC: &str = "flint-snapshot";
/// The state file format this flint writes and reads. Version 2: guests have ACPI tables and
/// a VM generation ID (`vmgenid`); a version 1 guest has neither and cannot get a new one.
pub const VERSION: u32 = 2;
/// A state file is a few hundred KiB at most; anything far larger is not one.
const MAX_STATE_FILE: u64 = 64 << 20;

/// One vCPU as KVM holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    /// The CPUID the vCPU was given; restored as it is, never derived again.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM's MSR index list that KVM let us read.
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

/// VM-wide KVM state: the in-kernel interrupt controllers, the PIT and the guest clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The VM generation ID device: where the guest reads the ID. A restore writes a new one
/// there and raises the device's interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGenIdState {
    pub addr: u64,
}

/// Everything in a state file.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub magic: String,
    pub version: u32,
    /// The VM's configuration; a restore builds the same devices from it.
    pub config: VmConfig,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialConsoleState,
    pub i8042: I8042State,
    /// The virtio-mmio transports, in slot order.
    pub virtio: Vec<MmioTransportState>,
    /// The VM generation ID, when the guest has ACPI (not booted with `acpi=off`).
    pub vmgenid: Option<VmGenIdState>,
    /// The MMDS data store, when the VM serves the MMDS.
    #[serde(default)]
    pub mmds: Option<devices::mmds::MmdsState>,
    /// The balloon device's target, statistics and what the guest wrote, when the VM has one.
    #[serde(default)]
    pub balloon: Option<devices::virtio::balloon::BalloonState>,
    /// A random id of this snapshot's memory (what a later diff snapshot names as its base).
    #[serde(default)]
    pub memory_id: Option<u64>,
    /// For a diff snapshot: the `memory_id` of its base, whose memory file its memory file
    /// applies on top of. `None` for a complete snapshot.
    #[serde(default)]
    pub diff_base: Option<u64>,
}

/// Just the header, read first so that another version gets a clear message.
#[derive(Deserialize)]
struct Header {
    magic: String,
    version: u32,
}

impl SnapshotState {
    /// Check what a restore relies on beyond the file's shape.
    fn check(&self, path: &Path) -> Result<()> {
        let invalid = |reason: String| Error::SnapshotInvalid {
            path: path.to_path_buf(),
            reason,
        };
        // A restore builds memory, vCPUs and devices from the saved configuration: it must be
        // one flint would have run.
        self.config
            .validate()
            .map_err(|e| invalid(format!("its configuration is invalid: {e}")))?;
        if self.vcpus.len() != self.config.vcpus as usize {
            return Err(invalid(format!(
                "it holds {} vCPUs but its configuration has {}",
                self.vcpus.len(),
                self.config.vcpus
            )));
        }
        if let Some((i, v)) = self
            .vcpus
            .iter()
            .enumerate()
            .find(|(i, v)| v.id as usize != *i)
        {
            return Err(invalid(format!("vCPU {i} has id {}", v.id)));
        }
        // A restore writes there: only where flint puts the ID, never into guest RAM.
        if let Some(genid) = &self.vmgenid {
            if genid.addr != arch::layout::VMGENID_START {
                return Err(invalid(format!(
                    "its VM generation ID is at {:#x}, not at {:#x}",
                    genid.addr,
                    arch::layout::VMGENID_START
                )));
            }
        }
        Ok(())
    }
}

/// A new random id for a snapshot's memory.
pub(crate) fn new_memory_id() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Unique enough when the kernel has no randomness to give: time and process.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return nanos ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_ne_bytes(bytes)
}

/// Merge the diff snapshot `diff` (state file, memory file) into its base `base`: write to
/// `out` the snapshot `diff` describes, with `base`'s memory file under the diff's pages. `out`
/// loads like any snapshot when `base` is complete (and is a diff of `base`'s base otherwise).
/// `out` may name the same files as `base` or `diff`: each is written to a new file renamed
/// over the old one.
pub fn merge(base: (&Path, &Path), diff: (&Path, &Path), out: (&Path, &Path)) -> Result<()> {
    let base_state = read_state(base.0)?;
    let diff_state = read_state(diff.0)?;
    let Some(wanted) = diff_state.diff_base else {
        return Err(Error::NotADiff(diff.0.to_path_buf()));
    };
    if base_state.memory_id != Some(wanted)
        || base_state.config.mem_mib != diff_state.config.mem_mib
    {
        return Err(Error::WrongBase {
            diff: diff.0.to_path_buf(),
            base: base.0.to_path_buf(),
        });
    }
    crate::memory::merge(base.1, diff.1, out.1, diff_state.config.mem_bytes())?;
    let merged = SnapshotState {
        diff_base: base_state.diff_base,
        ..diff_state
    };
    write_state(out.0, &merged)
}

/// Create (or replace) `path` with mode 0600 through a temporary file in the same directory,
/// renamed over it once complete: a reader never sees a half-written file, and a VM whose
/// memory is mapped from the old file keeps it.
pub(crate) fn write_atomically(
    path: &Path,
    what: &'static str,
    write: impl FnOnce(&File) -> std::io::Result<()>,
) -> Result<()> {
    let err = |source| Error::SnapshotWrite {
        what,
        path: path.to_path_buf(),
        source,
    };
    let tmp = temp_path(path);
    // Left behind by an earlier process with this pid that died mid-write.
    let _ = std::fs::remove_file(&tmp);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|file| {
            write(&file)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Write `state` to `path`.
pub fn write_state(path: &Path, state: &SnapshotState) -> Result<()> {
    write_atomically(path, "snapshot state", |file| {
        let mut w = BufWriter::new(file);
        serde_json::to_writer(&mut w, state).map_err(std::io::Error::other)?;
        w.flush()
    })
}

/// The bytes of the state file at `path`, at most one more than [`MAX_STATE_FILE`].
fn read_state_bytes(path: &Path) -> Result<Vec<u8>> {
    let read_err = |source| Error::ReadFile {
        what: "the snapshot state file",
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    Ok(bytes)
}

/// Read and check the state file at `path`.
pub fn read_state(path: &Path) -> Result<SnapshotState> {
    parse_state(&read_state_bytes(path)?, path)
}

/// The data format version of the flint state file at `path` (`flint --describe-snapshot`),
/// whether or not this flint reads that version.
pub fn state_version(path: &Path) -> Result<u32> {
    Ok(parse_header(&read_state_bytes(path)?, path)?.version)
}

/// The header of a state file's contents: a flint state file of some version, or an error.
fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let format = |reason: String| Error::SnapshotFormat {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(format(format!(
            "it is larger than {} MiB",
            MAX_STATE_FILE >> 20
        )));
    }
    let header: Header = serde_json::from_slice(bytes).map_err(|e| format(e.to_string()))?;
    if header.magic != MAGIC {
        return Err(format(format!("it starts with {:?}", header.magic)));
    }
    Ok(header)
}

/// Decode and check the contents of a state file (`path` names it in errors). Anything but a
/// state file this flint wrote is refused with an error.
#[doc(hidden)]
pub fn parse_state(bytes: &[u8], path: &Path) -> Result<SnapshotState> {
    let format = |reason: String| Error::SnapshotFormat {
        path: path.to_path_buf(),
        reason,
    };
    let header = parse_header(bytes, path)?;
    if header.version != VERSION {
        return Err(Error::SnapshotVersion {
            path: path.to_path_buf(),
            version: header.version,
        });
    }
    let state: SnapshotState = serde_json::from_slice(bytes).map_err(|e| format(e.to_string()))?;
    state.check(path)?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("flint-snapshot-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn path(&self, file: &str) -> PathBuf {
            self.0.join(file)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn vcpu(id: u32) -> VcpuState {
        let regs = kvm_regs {
            rip: 0x10_0000 + u64::from(id),
            rbx: 42,
            ..Default::default()
        };
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        VcpuState {
            id,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
            mp_state: kvm_mp_state::default(),
            regs,
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic,
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 123_456_789,
                ..Default::default()
            }],
            vcpu_events: kvm_vcpu_events::default(),
        }
    }

    fn sample() -> SnapshotState {
        let mut config = VmConfig::new("/boot/vmlinux");
        config.vcpus = 2;
        let clock = kvm_clock_data {
            clock: 987_654_321,
            ..Default::default()
        };
        SnapshotState {
            magic: MAGIC.into(),
            version: VERSION,
            config,
            vcpus: vec![vcpu(0), vcpu(1)],
            vm: VmState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip {
                    chip_id: 1,
                    ..Default::default()
                },
                ioapic: kvm_irqchip {
                    chip_id: 2,
                    ..Default::default()
                },
                pit: kvm_pit_state2::default(),
                clock,
            },
            serial: SerialConsoleState {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 3,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: b"ab".to_vec(),
            },
            i8042: I8042State {
                ctr: 0x47,
                status_cmd: false,
                out: vec![],
                awaiting_data_for: None,
            },
            virtio: vec![MmioTransportState::default()],
            mmds: None,
            vmgenid: Some(VmGenIdState {
                addr: arch::layout::VMGENID_START,
            }),
            balloon: None,
            memory_id: Some(7),
            diff_base: None,
        }
    }

    #[test]
    fn state_file_round_trip() {
        let dir = TempDir::new("round-trip");
        let path = dir.path("vm.state");
        let state = sample();
        write_state(&path, &state).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let back = read_state(&path).unwrap();
        assert_eq!(back.config, state.config);
        assert_eq!(back.vcpus.len(), 2);
        assert_eq!(back.vcpus[1].regs.rip, 0x10_0001);
        assert_eq!(back.vcpus[1].regs.rbx, 42);
        assert_eq!(back.vcpus[0].lapic.regs[0x20], 7);
        assert_eq!(back.vcpus[0].cpuid[0].eax, 0x806f8);
        assert_eq!(back.vcpus[0].msrs[0].data, 123_456_789);
        assert_eq!(back.vm.clock.clock, 987_654_321);
        assert_eq!(back.vm.ioapic.chip_id, 2);
        assert_eq!(back.serial, state.serial);
        assert_eq!(back.i8042, state.i8042);
        assert_eq!(back.virtio, state.virtio);
        // Replacing an existing file works and leaves no temporary file behind.
        write_state(&path, &state).unwrap();
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    fn message<T: std::fmt::Debug>(r: Result<T>) -> String {
        let msg = r.expect_err("refused").to_string();
        assert!(!msg.contains('\n'), "{msg}");
        msg
    }

    #[test]
    fn bad_state_files_are_refused_clearly() {
        let dir = TempDir::new("bad");
        let path = dir.path("vm.state");
        let good = serde_json::to_vec(&sample()).unwrap();

        let msg = message(read_state(&dir.path("missing")));
        assert!(
            msg.starts_with("cannot read the snapshot state file"),
            "{msg}"
        );

        for len in [0, 1, 10, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..len]).unwrap();
            let msg = message(read_state(&path));
            assert!(
                msg.contains("is not a flint snapshot state file"),
                "{len}: {msg}"
            );
        }

        let mut corrupt = good.clone();
        let at = corrupt.len() / 3;
        corrupt[at..at + 8].copy_from_slice(b"@@@@@@@@");
        std::fs::write(&path, &corrupt).unwrap();
        assert!(message(read_state(&path)).contains("is not a flint snapshot state file"));

        std::fs::write(&path, b"{\"magic\":\"something-else\",\"version\":1}").unwrap();
        assert!(message(read_state(&path)).contains("is not a flint snapshot state file"));

        let mut other = sample();
        other.version = 7;
        std::fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
        let msg = message(read_state(&path));
        assert!(
            msg.ends_with("is a version 7 flint snapshot; this flint reads only version 2"),
            "{msg}"
        );
        // Describing tells the version of any flint state file, readable or not.
        assert_eq!(state_version(&path).unwrap(), 7);
        std::fs::write(&path, &good).unwrap();
        assert_eq!(state_version(&path).unwrap(), VERSION);
        std::fs::write(&path, b"{\"magic\":\"something-else\",\"version\":1}").unwrap();
        assert!(message(state_version(&path)).contains("is not a flint snapshot state file"));

        let mut wrong_count = sample();
        wrong_count.vcpus.pop();
        std::fs::write(&path, serde_json::to_vec(&wrong_count).unwrap()).unwrap();
        let msg = message(read_state(&path));
        assert!(
            msg.contains("holds 1 vCPUs but its configuration has 2"),
            "{msg}"
        );

        // The saved configuration must be one flint would run: a restore sizes memory and
        // builds vCPUs and devices from it.
        let mut no_vcpus = sample();
        no_vcpus.config.vcpus = 0;
        no_vcpus.vcpus.clear();
        std::fs::write(&path, serde_json::to_vec(&no_vcpus).unwrap()).unwrap();
        let msg = message(read_state(&path));
        assert!(msg.contains("its configuration is invalid"), "{msg}");
        let mut huge = sample();
        huge.config.mem_mib = 1 << 44;
        std::fs::write(&path, serde_json::to_vec(&huge).unwrap()).unwrap();
        let msg = message(read_state(&path));
        assert!(msg.contains("its configuration is invalid"), "{msg}");

        let mut wrong_id = sample();
        wrong_id.vcpus[1].id = 5;
        std::fs::write(&path, serde_json::to_vec(&wrong_id).unwrap()).unwrap();
        assert!(message(read_state(&path)).contains("vCPU 1 has id 5"));

        // A generation ID anywhere but its own page would have a restore write into the guest.
        let mut wrong_genid = sample();
        wrong_genid.vmgenid = Some(VmGenIdState { addr: 0x10_0000 });
        std::fs::write(&path, serde_json::to_vec(&wrong_genid).unwrap()).unwrap();
        let msg = message(read_state(&path));
        assert!(
            msg.contains("its VM generation ID is at 0x100000, not at 0xf0000"),
            "{msg}"
        );

        // Random bytes never panic.
        let mut seed = 0x1234_5678u64;
        for _ in 0..200 {
            let mut bytes = good.clone();
            for _ in 0..4 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                let i = (seed >> 33) as usize % bytes.len();
                bytes[i] = (seed >> 17) as u8;
            }
            std::fs::write(&path, &bytes).unwrap();
            let _ = read_state(&path);
        }
    }
}
