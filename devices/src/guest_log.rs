//! Warnings a guest can trigger at will, written without letting the guest flood the host's log.
//!
//! A malformed descriptor chain or a register write in the wrong state is the guest's doing, and a
//! hostile guest can repeat it millions of times a second. Each call site of
//! [`guest_warn!`](crate::guest_warn!) therefore logs its first [`BURST`] messages, then at most
//! one per [`INTERVAL_MS`] (saying how many it held back since its last line). Every message, written or not, is counted in
//! [`counts`], which the VMM's metrics report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Messages a call site writes before it is limited.
pub const BURST: u64 = 10;
/// Once limited, a call site writes at most one message per this many milliseconds.
pub const INTERVAL_MS: u64 = 10_000;

static LOGGED: AtomicU64 = AtomicU64::new(0);
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Guest-triggered warnings so far, over all call sites: `(written, held back)`.
pub fn counts() -> (u64, u64) {
    (
        LOGGED.load(Ordering::Relaxed),
        SUPPRESSED.load(Ordering::Relaxed),
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The state of one call site (a `static` made by [`guest_warn!`](crate::guest_warn!)).
#[derive(Debug)]
pub struct Limiter {
    /// Messages seen at this site.
    seen: AtomicU64,
    /// When the site last wrote a message after its burst (ms since the epoch).
    last_ms: AtomicU64,
    /// Messages held back since the site last wrote one.
    held: AtomicU64,
}

impl Limiter {
    /// A call site that has written nothing yet.
    pub const fn new() -> Self {
        Limiter {
            seen: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// Whether the next message is written: `Some(n)` with the number held back before it, or
    /// `None` when it is held back (and counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(now_ms())
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        if self.seen.fetch_add(1, Ordering::Relaxed) < BURST {
            LOGGED.fetch_add(1, Ordering::Relaxed);
            return Some(0);
        }
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= INTERVAL_MS
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            LOGGED.fetch_add(1, Ordering::Relaxed);
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `warn!` for conditions a guest can cause: rate-limited per call site and counted (see the
/// module documentation).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::guest_log::Limiter = $crate::guest_log::Limiter::new();
        match LIMITER.admit() {
            Some(0) => log::warn!($($arg)+),
            Some(held) => log::warn!(
                "{} ({} more like this not logged)",
                format_args!($($arg)+),
                held
            ),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_writes_its_burst_then_one_line_per_interval() {
        let site = Limiter::new();
        let t0 = 1_000_000;
        for _ in 0..BURST {
            assert_eq!(site.admit_at(t0), Some(0));
        }
        // The first message after the burst is written (the site has never been limited) ...
        assert_eq!(site.admit_at(t0), Some(0));
        // ... and everything after it within the interval is held back and counted.
        for _ in 0..1000 {
            assert_eq!(site.admit_at(t0 + 1), None);
        }
        assert_eq!(site.admit_at(t0 + INTERVAL_MS - 1), None);
        assert_eq!(site.admit_at(t0 + INTERVAL_MS), Some(1001));
        assert_eq!(site.admit_at(t0 + INTERVAL_MS + 5), None);
        let (logged, suppressed) = counts();
        assert!(logged >= BURST + 2);
        assert!(suppressed >= 1002);
    }

    #[test]
    fn a_million_guest_warnings_write_a_handful_of_lines() {
        let mut written = 0;
        for i in 0..1_000_000 {
            // One call site, so one limiter.
            static SITE: Limiter = Limiter::new();
            if SITE.admit().is_some() {
                written += 1;
            }
            let _ = i;
        }
        // The burst plus at most a line per interval of the test's running time.
        assert!(written <= BURST + 2, "{written} lines written");
    }
}
