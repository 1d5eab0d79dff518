//! The numbers of a container's cgroup (the agent's `ContainerStats` answer): their wire
//! form, the checks a host makes of them, and how the agent reads them from the cgroup v2
//! files (`cpu.stat`, `memory.current`, `memory.max`, `memory.stat`, `memory.events`,
//! `pids.current`, `pids.max`).

use crate::protocol::{Decoder, ProtocolError, MAX_PIDS};

/// The fields of `memory.stat` a [`MemoryStats`] carries, in wire order (containerd's
/// cgroup v2 metrics have them all).
pub const MEMORY_STAT: [&str; 19] = [
    "anon",
    "file",
    "kernel_stack",
    "slab",
    "sock",
    "shmem",
    "file_mapped",
    "file_dirty",
    "file_writeback",
    "anon_thp",
    "inactive_anon",
    "active_anon",
    "inactive_file",
    "active_file",
    "unevictable",
    "slab_reclaimable",
    "slab_unreclaimable",
    "pgfault",
    "pgmajfault",
];

/// The fields of `memory.events` a [`MemoryStats`] carries, in wire order.
pub const MEMORY_EVENTS: [&str; 5] = ["low", "high", "max", "oom", "oom_kill"];

/// A cgroup's numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupStats {
    /// `cpu.stat`'s `usage_usec`: CPU time of the cgroup's processes, microseconds.
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    /// Absent when the guest has no memory controller.
    pub memory: Option<MemoryStats>,
    /// Absent when the guest has no pids controller.
    pub pids: Option<PidsStats>,
}

/// The memory controller's numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// `memory.current`, bytes.
    pub current: u64,
    /// `memory.max`, bytes; `None` for `max` (no limit).
    pub max: Option<u64>,
    /// The [`MEMORY_STAT`] fields of `memory.stat`.
    pub stat: [u64; MEMORY_STAT.len()],
    /// The [`MEMORY_EVENTS`] fields of `memory.events`.
    pub events: [u64; MEMORY_EVENTS.len()],
}

/// The pids controller's numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PidsStats {
    /// `pids.current`.
    pub current: u64,
    /// `pids.max`; `None` for `max`.
    pub max: Option<u64>,
}

impl MemoryStats {
    /// The `memory.stat` field `name` (one of [`MEMORY_STAT`]; 0 for others).
    pub fn stat(&self, name: &str) -> u64 {
        MEMORY_STAT
            .iter()
            .position(|n| *n == name)
            .map_or(0, |i| self.stat[i])
    }

    /// The `memory.events` field `name` (one of [`MEMORY_EVENTS`]; 0 for others).
    pub fn event(&self, name: &str) -> u64 {
        MEMORY_EVENTS
            .iter()
            .position(|n| *n == name)
            .map_or(0, |i| self.events[i])
    }
}

/// A limit on the wire: a flag byte, then the number when there is a limit.
fn put_limit(out: &mut Vec<u8>, limit: Option<u64>) {
    match limit {
        None => out.push(0),
        Some(n) => {
            out.push(1);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

fn limit(d: &mut Decoder<'_>, bad: &'static str) -> Result<Option<u64>, ProtocolError> {
    match d.flag(bad)? {
        false => Ok(None),
        true => d.u64().map(Some),
    }
}

impl CgroupStats {
    /// The payload: `[cpu usage, user, system: u64]`, then the memory part as an option
    /// (`[current: u64][max: option of u64][memory.stat: 19 × u64][memory.events: 5 × u64]`),
    /// then the pids part as an option (`[current: u64][max: option of u64]`).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        for n in [
            self.cpu_usage_usec,
            self.cpu_user_usec,
            self.cpu_system_usec,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        match &self.memory {
            None => out.push(0),
            Some(m) => {
                out.push(1);
                out.extend_from_slice(&m.current.to_le_bytes());
                put_limit(out, m.max);
                for n in m.stat.iter().chain(&m.events) {
                    out.extend_from_slice(&n.to_le_bytes());
                }
            }
        }
        match &self.pids {
            None => out.push(0),
            Some(p) => {
                out.push(1);
                out.extend_from_slice(&p.current.to_le_bytes());
                put_limit(out, p.max);
            }
        }
    }

    pub(crate) fn decode(d: &mut Decoder<'_>) -> Result<CgroupStats, ProtocolError> {
        let cpu_usage_usec = d.u64()?;
        let cpu_user_usec = d.u64()?;
        let cpu_system_usec = d.u64()?;
        let memory = match d.flag("the memory flag is not 0 or 1")? {
            false => None,
            true => {
                let current = d.u64()?;
                let max = limit(d, "the memory-limit flag is not 0 or 1")?;
                let mut m = MemoryStats {
                    current,
                    max,
                    ..MemoryStats::default()
                };
                for n in m.stat.iter_mut().chain(m.events.iter_mut()) {
                    *n = d.u64()?;
                }
                Some(m)
            }
        };
        let pids = match d.flag("the pids flag is not 0 or 1")? {
            false => None,
            true => Some(PidsStats {
                current: d.u64()?,
                max: limit(d, "the pids-limit flag is not 0 or 1")?,
            }),
        };
        Ok(CgroupStats {
            cpu_usage_usec,
            cpu_user_usec,
            cpu_system_usec,
            memory,
            pids,
        })
    }

    /// What a kernel could have written: user and system time within the usage (give or
    /// take the kernel's rounding to microseconds), pid counts within the kernel's limit.
    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        let split = self.cpu_user_usec.checked_add(self.cpu_system_usec);
        if split.is_none_or(|s| s > self.cpu_usage_usec.saturating_add(2)) {
            return Err(ProtocolError::Invalid(
                "a container's user and system CPU time exceed its CPU usage",
            ));
        }
        if let Some(p) = &self.pids {
            if p.current > MAX_PIDS || p.max.is_some_and(|m| m > MAX_PIDS) {
                return Err(ProtocolError::Invalid(
                    "a container's pid count or limit exceeds 4194304",
                ));
            }
        }
        Ok(())
    }
}

/// The values of the `key value` lines of a flat-keyed cgroup file (`cpu.stat`,
/// `memory.stat`, `memory.events`) named in `names`, in that order; 0 for missing ones.
pub fn flat_keyed<const N: usize>(text: &str, names: &[&str; N]) -> [u64; N] {
    let mut values = [0u64; N];
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        if let (Some(i), Ok(v)) = (names.iter().position(|n| *n == key), value.parse()) {
            values[i] = v;
        }
    }
    values
}

/// A cgroup limit file (`memory.max`, `pids.max`): `Some(None)` for `max`, `Some(Some(n))`
/// for a number, `None` for anything else.
pub fn limit_value(text: &str) -> Option<Option<u64>> {
    match text.trim() {
        "max" => Some(None),
        n => n.parse().ok().map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FromAgent, Message};

    fn sample() -> CgroupStats {
        let mut memory = MemoryStats {
            current: 5 << 20,
            max: Some(64 << 20),
            ..MemoryStats::default()
        };
        for (i, n) in memory.stat.iter_mut().enumerate() {
            *n = i as u64 * 1000 + 7;
        }
        memory.events = [0, 0, 12, 3, 2];
        CgroupStats {
            cpu_usage_usec: 1500,
            cpu_user_usec: 1000,
            cpu_system_usec: 500,
            memory: Some(memory),
            pids: Some(PidsStats {
                current: 3,
                max: None,
            }),
        }
    }

    #[test]
    fn stats_round_trip_with_and_without_controllers() {
        for stats in [
            sample(),
            CgroupStats {
                memory: None,
                pids: None,
                ..sample()
            },
            CgroupStats::default(),
        ] {
            let msg = FromAgent::ContainerStats(Box::new(stats.clone()));
            let bytes = msg.encode().unwrap();
            assert_eq!(
                FromAgent::decode(bytes[0], &bytes[5..]),
                Ok(FromAgent::ContainerStats(Box::new(stats)))
            );
            // Cut anywhere: truncated; one byte more: trailing.
            for cut in 5..bytes.len() {
                assert_eq!(
                    FromAgent::decode(bytes[0], &bytes[5..cut]),
                    Err(ProtocolError::Truncated),
                    "cut at {cut}"
                );
            }
            let mut longer = bytes[5..].to_vec();
            longer.push(0);
            assert_eq!(
                FromAgent::decode(bytes[0], &longer),
                Err(ProtocolError::TrailingBytes(1))
            );
        }
        assert_eq!(sample().memory.unwrap().event("oom_kill"), 2);
        assert_eq!(sample().memory.unwrap().stat("file"), 1007);
        assert_eq!(sample().memory.unwrap().stat("nonexistent"), 0);
    }

    #[test]
    fn impossible_stats_are_refused_both_ways() {
        let bad = [
            CgroupStats {
                cpu_user_usec: u64::MAX,
                cpu_system_usec: 2,
                ..sample()
            },
            CgroupStats {
                cpu_usage_usec: 10,
                cpu_user_usec: 10,
                cpu_system_usec: 5,
                ..sample()
            },
            CgroupStats {
                pids: Some(PidsStats {
                    current: MAX_PIDS + 1,
                    max: None,
                }),
                ..sample()
            },
            CgroupStats {
                pids: Some(PidsStats {
                    current: 1,
                    max: Some(u64::MAX),
                }),
                ..sample()
            },
        ];
        for stats in bad {
            let msg = FromAgent::ContainerStats(Box::new(stats.clone()));
            assert!(
                matches!(msg.encode(), Err(ProtocolError::Invalid(_))),
                "{stats:?}"
            );
            let mut payload = Vec::new();
            stats.encode(&mut payload);
            assert!(matches!(
                FromAgent::decode(msg.kind(), &payload),
                Err(ProtocolError::Invalid(_))
            ));
        }
        // Rounding: one or two microseconds over is what the kernel may write.
        let rounded = CgroupStats {
            cpu_usage_usec: 10,
            cpu_user_usec: 6,
            cpu_system_usec: 6,
            ..sample()
        };
        assert!(FromAgent::ContainerStats(Box::new(rounded))
            .encode()
            .is_ok());
        // A flag byte other than 0 or 1.
        let mut payload = Vec::new();
        CgroupStats::default().encode(&mut payload);
        payload[24] = 2;
        assert!(matches!(
            FromAgent::decode(crate::protocol::kind::CONTAINER_STATS_REPLY, &payload),
            Err(ProtocolError::Invalid(_))
        ));
    }

    #[test]
    fn cgroup_files_are_parsed() {
        let cpu = "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 0\n";
        assert_eq!(
            flat_keyed(cpu, &["usage_usec", "user_usec", "system_usec"]),
            [2500, 2000, 500]
        );
        let events = "low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(flat_keyed(events, &MEMORY_EVENTS), [0, 0, 17, 1, 1]);
        // Missing, malformed and unknown lines give 0 or are skipped.
        assert_eq!(
            flat_keyed(
                "anon x\nfile 12 13\nshmem 4096\n\nbogus\n",
                &["anon", "file", "shmem"]
            ),
            [0, 0, 4096]
        );
        assert_eq!(limit_value("max\n"), Some(None));
        assert_eq!(limit_value("67108864\n"), Some(Some(64 << 20)));
        assert_eq!(limit_value("lots"), None);
    }
}
