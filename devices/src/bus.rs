//! An address bus (port I/O or MMIO) that routes guest accesses to devices by address range.

use std::sync::{Arc, Mutex};

/// A device reachable through register accesses on a bus.
///
/// `offset` is relative to the start of the range the device was inserted at; `data` holds the
/// bytes of the access (1, 2, 4 or 8 of them). Devices must accept any offset and length: both
/// are guest-controlled.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Registers of a device that are served without taking the device's lock (atomics shared
/// with the device), so that a vCPU touching them does not wait while another thread holds
/// the device for a long piece of work. Tried before the device; same offsets and data rules.
pub trait LockFreeRegisters: Send + Sync {
    /// Serve a read of `data.len()` bytes at `offset`; false leaves it to the device.
    fn read(&self, offset: u64, data: &mut [u8]) -> bool;
    /// Serve a write of `data` at `offset`; false leaves it to the device.
    fn write(&self, offset: u64, data: &[u8]) -> bool;
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or overlaps a range that is already taken.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
    lock_free: Option<Arc<dyn LockFreeRegisters>>,
}

/// Address ranges mapped to devices. Built before the vCPUs start, then only read.
#[derive(Default)]
pub struct Bus {
    // Sorted by base; ranges never overlap.
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Map `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        self.insert_with(device, None, base, len)
    }

    /// Map `device` at `[base, base + len)`, with `lock_free` serving some of its registers
    /// without its lock.
    pub fn insert_with(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        lock_free: Option<Arc<dyn LockFreeRegisters>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(
            pos,
            Entry {
                base,
                len,
                device,
                lock_free,
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(&Entry, u64)> {
        let idx = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let entry = &self.entries[idx];
        let offset = addr - entry.base;
        // The whole access must fall inside the device's range.
        let last = offset.checked_add(len.saturating_sub(1) as u64)?;
        (last < entry.len).then_some((entry, offset))
    }

    /// Route a read. Returns false (and leaves `data` untouched) when no device claims the
    /// address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                if !entry
                    .lock_free
                    .as_ref()
                    .is_some_and(|r| r.read(offset, data))
                {
                    lock(&entry.device).read(offset, data);
                }
                true
            }
            None => false,
        }
    }

    /// Route a write. Returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                if !entry
                    .lock_free
                    .as_ref()
                    .is_some_and(|r| r.write(offset, data))
                {
                    lock(&entry.device).write(offset, data);
                }
                true
            }
            None => false,
        }
    }
}

/// Lock a device, recovering it if a thread panicked while holding it: device state stays
/// usable and the VMM never dies of a poisoned lock.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        bus.insert(a.clone(), 0x60, 5).unwrap();
        assert!(bus.write(0x3fb, &[7]));
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(b.lock().unwrap().writes, vec![(3, vec![7])]);
        assert_eq!(a.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
    }

    #[test]
    fn unclaimed_and_straddling_accesses_are_refused() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(a, 0x1000, 0x10).unwrap();
        let mut data = [0xaau8; 4];
        assert!(!bus.read(0xfff, &mut data));
        assert!(!bus.read(0x100e, &mut data), "access crossing the end");
        assert!(!bus.write(0x1010, &[1]));
        assert!(!bus.write(u64::MAX, &[1, 2]));
        assert_eq!(data, [0xaa; 4]);
    }

    /// Serves offset 0 (reads 0x5a, writes recorded) and leaves the rest to the device.
    #[derive(Default)]
    struct Offset0 {
        written: Mutex<Vec<u8>>,
    }

    impl LockFreeRegisters for Offset0 {
        fn read(&self, offset: u64, data: &mut [u8]) -> bool {
            offset == 0 && {
                data.fill(0x5a);
                true
            }
        }
        fn write(&self, offset: u64, data: &[u8]) -> bool {
            offset == 0 && {
                self.written.lock().unwrap().extend_from_slice(data);
                true
            }
        }
    }

    #[test]
    fn lock_free_registers_are_served_while_the_device_is_held() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let fast = Arc::new(Offset0::default());
        let mut bus = Bus::new();
        bus.insert_with(dev.clone(), Some(fast.clone()), 0x1000, 0x10)
            .unwrap();
        let bus = Arc::new(bus);
        // Another thread holds the device (as the event loop does during a pass); a vCPU's
        // access to a lock-free register completes meanwhile.
        let held = dev.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let b = bus.clone();
        let vcpu = std::thread::spawn(move || {
            let mut data = [0u8; 4];
            let routed = b.read(0x1000, &mut data) && b.write(0x1000, &[1, 2]);
            tx.send((routed, data)).unwrap();
        });
        let (routed, data) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the lock-free register waited for the device's lock");
        assert!(routed);
        assert_eq!(data, [0x5a; 4]);
        assert_eq!(*fast.written.lock().unwrap(), vec![1, 2]);
        drop(held);
        vcpu.join().unwrap();
        // Other offsets still reach the device, with offsets relative to its base.
        let mut data = [0u8; 1];
        assert!(bus.read(0x1003, &mut data));
        assert_eq!(data, [3]);
        assert!(bus.write(0x1004, &[9]));
        assert_eq!(dev.lock().unwrap().writes, vec![(4, vec![9])]);
    }

    #[test]
    fn overlapping_or_empty_ranges_are_rejected() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev(), 0x10f, 1).is_err());
        assert!(bus.insert(dev(), 0xf0, 0x11).is_err());
        assert!(bus.insert(dev(), 0x200, 0).is_err());
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
        bus.insert(dev(), 0x110, 1).unwrap();
    }
}
