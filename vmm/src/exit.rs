//! How a VM ends, and how its threads tell the VMM thread.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why a running VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The guest reset or powered off the machine.
    Reset,
    /// The VMM was told to stop by a signal.
    Signal(i32),
    /// The user typed the console's quit sequence (Ctrl-A x).
    ConsoleQuit,
    /// A vCPU hit something flint cannot continue from.
    Fault { vcpu: u32, reason: String },
    /// The page-fault handler serving guest memory (listening on this socket) went away.
    PageFaultHandlerGone(std::path::PathBuf),
}

/// The first ending reported wins; the VMM thread waits on `evt`.
pub struct Endings {
    first: Mutex<Option<Ending>>,
    /// Set with `first`: lets vCPU threads stop without taking the lock.
    ended: std::sync::atomic::AtomicBool,
    evt: EventFd,
}

impl Endings {
    /// A fresh, unsignalled set.
    pub fn new() -> std::io::Result<Self> {
        Ok(Endings {
            first: Mutex::new(None),
            ended: Default::default(),
            evt: EventFd::new(0)?,
        })
    }

    /// Record `ending` unless another one came first, and wake the VMM thread.
    pub fn report(&self, ending: Ending) {
        let mut first = devices::bus::lock(&self.first);
        if first.is_none() {
            *first = Some(ending);
            self.ended.store(true, std::sync::atomic::Ordering::Release);
        }
        drop(first);
        // Fails only if the counter is saturated, which means a wake-up is already pending.
        let _ = self.evt.write(1);
    }

    /// The eventfd the VMM thread waits on; others may write it to wake that thread.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Whether an ending has been reported.
    pub fn ended(&self) -> bool {
        self.ended.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The ending reported so far, if any.
    pub fn first(&self) -> Option<Ending> {
        devices::bus::lock(&self.first).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_ending_wins_and_wakes() {
        let e = Endings::new().unwrap();
        assert_eq!(e.first(), None);
        e.report(Ending::Fault {
            vcpu: 1,
            reason: "x".into(),
        });
        e.report(Ending::Reset);
        assert_eq!(e.eventfd().read().unwrap(), 2);
        assert!(matches!(e.first(), Some(Ending::Fault { vcpu: 1, .. })));
    }
}
