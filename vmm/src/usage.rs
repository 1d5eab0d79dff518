//! How much host memory the VMM itself uses beyond the guest's own pages.

use arch::GuestMemoryMmap;
use vm_memory::GuestMemoryBackend;

/// Resident memory of this process, split into guest RAM and everything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Resident set of the whole process, in KiB.
    pub rss_kib: u64,
    /// Resident pages of guest RAM mappings, in KiB.
    pub guest_kib: u64,
}

impl MemoryUsage {
    /// What the VMM costs beyond the guest's pages.
    pub fn overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_kib)
    }
}

/// Sum `Rss:` of the mappings in an smaps text, and separately of those whose start address
/// is in `guest_starts`.
fn parse_smaps(smaps: &str, guest_starts: &[u64]) -> MemoryUsage {
    let mut usage = MemoryUsage::default();
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            usage.rss_kib += kib;
            if in_guest {
                usage.guest_kib += kib;
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            // A mapping header: "start-end perms offset dev inode path".
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(start) = u64::from_str_radix(start, 16) {
                    in_guest = guest_starts.contains(&start);
                }
            }
        }
    }
    usage
}

/// Measure this process now. `None` if `/proc/self/smaps` cannot be read.
pub fn measure(mem: &GuestMemoryMmap) -> Option<MemoryUsage> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let starts: Vec<u64> = mem.iter().map(|r| r.as_ptr() as u64).collect();
    Some(parse_smaps(&smaps, &starts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn parses_rss_per_mapping() {
        let smaps = "\
55d0-55e0 r-xp 00000000 08:01 123 /usr/bin/flint
Size:                 64 kB
Rss:                  40 kB
7f00-7f80 rw-p 00000000 00:00 0
Size:                512 kB
Rss:                 300 kB
7f80-7f90 rw-p 00000000 00:00 0
Rss:                   8 kB
";
        let u = parse_smaps(smaps, &[0x7f00]);
        assert_eq!(
            u,
            MemoryUsage {
                rss_kib: 348,
                guest_kib: 300
            }
        );
        assert_eq!(u.overhead_kib(), 48);
    }

    #[test]
    fn touched_guest_pages_count_as_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let before = measure(&mem).unwrap();
        for page in 0..1024u64 {
            mem.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        let after = measure(&mem).unwrap();
        assert!(
            after.guest_kib >= before.guest_kib + 4000,
            "{before:?} {after:?}"
        );
    }
}
