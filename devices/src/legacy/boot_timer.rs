//! The boot-timer port: the guest writes [`BOOT_TIMER_MAGIC`] once it has booted, and the VMM
//! learns how long the boot took, measured from its own start.

use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// The byte a guest writes to the boot-timer port when it reaches user space.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Reports the time from `start` to the guest's first boot-timer write.
pub struct BootTimer {
    start: Instant,
    report: Option<Box<dyn FnOnce(Duration) + Send>>,
}

impl BootTimer {
    /// A boot timer counting from `start` that calls `report` with the elapsed time the first
    /// time the guest writes the magic byte.
    pub fn new(start: Instant, report: impl FnOnce(Duration) + Send + 'static) -> Self {
        BootTimer {
            start,
            report: Some(Box::new(report)),
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) {
            if let Some(report) = self.report.take() {
                report(self.start.elapsed());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reports_once_on_magic_write_only() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let start = Instant::now() - Duration::from_millis(50);
        let mut timer = BootTimer::new(start, move |d| s.lock().unwrap().push(d));
        timer.write(0, &[1]);
        timer.write(1, &[BOOT_TIMER_MAGIC]);
        assert!(seen.lock().unwrap().is_empty());
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0] >= Duration::from_millis(50));
    }
}
