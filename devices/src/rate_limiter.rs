//! Token-bucket rate limiting for devices, so that one guest cannot starve its neighbours of
//! disk or network bandwidth.
//!
//! A [`RateLimiter`] holds up to two [`TokenBucket`]s: `bandwidth` (tokens are bytes) and `ops`
//! (tokens are requests or frames). A device asks [`RateLimiter::consume`] before serving a
//! request; when the answer is no, the limiter arms its timerfd for the moment enough tokens
//! will be there and the device stops serving that queue until the event loop reports the
//! timer ([`RateLimiter::timer_fired`]).
//!
//! # Bucket rules
//!
//! - A bucket of `size` tokens refills continuously at `size` tokens per `refill_time`, in
//!   proportion to the monotonic time elapsed, and never holds more than `size`. It starts full.
//! - `one_time_burst` extra tokens are available once, on top of the bucket, and are spent
//!   first; they are never refilled.
//! - A request of `n <= size` tokens (after the burst) passes when the bucket holds `n` tokens.
//! - A request larger than `size` could never fit, so it passes when the bucket is full, and
//!   empties it (and whatever burst is left). Its excess is not carried as debt.
//! - Consumption is all or nothing across both buckets: a request that one bucket refuses
//!   takes nothing from the other.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// Longest refill time a bucket uses, in milliseconds: 2^64 nanoseconds, about 584 years. Any
/// longer refill time is accepted (Firecracker's API takes every 64-bit value) and acts as this
/// one, which no VM outlives; it keeps the bucket's arithmetic within 128 bits.
pub const MAX_REFILL_TIME_MS: u64 = u64::MAX / 1_000_000;

/// The configuration of one token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full, and refills per `refill_time_ms`.
    pub size: u64,
    /// Extra tokens available once, before the bucket itself is used.
    pub one_time_burst: u64,
    /// Milliseconds to refill the bucket from empty to full.
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    /// A bucket allowing `per_second` tokens a second, with no burst.
    pub fn per_second(per_second: u64) -> Self {
        TokenBucketConfig {
            size: per_second,
            one_time_burst: 0,
            refill_time_ms: 1000,
        }
    }

    /// Check the values; the error names the offending field (`size` or `refill_time`).
    pub fn validate(&self) -> Result<(), RateLimiterConfigError> {
        if self.size == 0 {
            return Err(RateLimiterConfigError::Size);
        }
        if self.refill_time_ms == 0 {
            return Err(RateLimiterConfigError::RefillTime(self.refill_time_ms));
        }
        Ok(())
    }
}

/// The configuration of a [`RateLimiter`]: each bucket is optional (absent means unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct RateLimiterConfig {
    /// Bytes.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests (block) or frames (net).
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Check both buckets.
    pub fn validate(&self) -> Result<(), (&'static str, RateLimiterConfigError)> {
        if let Some(b) = &self.bandwidth {
            b.validate().map_err(|e| ("bandwidth", e))?;
        }
        if let Some(b) = &self.ops {
            b.validate().map_err(|e| ("ops", e))?;
        }
        Ok(())
    }

    /// Whether neither bucket is set: the limiter would let everything through.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// What is wrong with a bucket configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RateLimiterConfigError {
    #[error("size must be at least 1")]
    Size,
    #[error("refill_time must be at least 1 millisecond, not {0}")]
    RefillTime(u64),
}

/// One token bucket. Tokens are kept scaled by the refill time in nanoseconds, so that
/// refilling is exact integer arithmetic with no rounding drift.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    /// Tokens in the bucket times `refill_ns`; at most `size * refill_ns`.
    scaled: u128,
    one_time_burst: u64,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket created at `now`; `None` if `size` or `refill_time` is zero (no limit).
    /// The refill time is capped at [`MAX_REFILL_TIME_MS`].
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Option<TokenBucket> {
        if config.size == 0 || config.refill_time_ms == 0 {
            return None;
        }
        let refill_ns = u128::from(config.refill_time_ms.min(MAX_REFILL_TIME_MS)) * 1_000_000;
        Some(TokenBucket {
            size: config.size,
            refill_ns,
            scaled: u128::from(config.size) * refill_ns,
            one_time_burst: config.one_time_burst,
            last_update: now,
        })
    }

    fn capacity(&self) -> u128 {
        u128::from(self.size) * self.refill_ns
    }

    /// Add the tokens earned since the last update (a clock going backwards earns nothing).
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        self.last_update = self.last_update.max(now);
        let earned = elapsed.saturating_mul(u128::from(self.size));
        self.scaled = self.scaled.saturating_add(earned).min(self.capacity());
    }

    /// Whole tokens in the bucket at the last update (burst not included).
    pub fn budget(&self) -> u64 {
        // At most `size`, so it fits.
        (self.scaled / self.refill_ns) as u64
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// The bucket's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Tokens the bucket must hold for `n` to pass (see the module rules).
    fn needed(&self, n: u64) -> u128 {
        let after_burst = n.saturating_sub(self.one_time_burst);
        u128::from(after_burst.min(self.size)) * self.refill_ns
    }

    /// Whether `n` tokens can be taken (after refilling to `now`).
    fn can_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        self.scaled >= self.needed(n)
    }

    /// Take `n` tokens; `can_take(n)` held.
    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        let rest = n - from_burst;
        if rest > self.size {
            // A request larger than the bucket empties it (and the burst: it had the chance).
            self.scaled = 0;
            self.one_time_burst = 0;
        } else {
            self.scaled = self
                .scaled
                .saturating_sub(u128::from(rest) * self.refill_ns);
        }
    }

    /// Refill to `now`, then take `n` tokens if they are there. Returns whether it did.
    pub fn consume(&mut self, n: u64, now: Instant) -> bool {
        if !self.can_take(n, now) {
            return false;
        }
        self.take(n);
        true
    }

    /// How long after the last update `n` tokens will be there (zero if they are).
    pub fn time_until(&self, n: u64) -> Duration {
        let deficit = self.needed(n).saturating_sub(self.scaled);
        let ns = deficit.div_ceil(u128::from(self.size));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// A bandwidth and an operations bucket with a timer for when a refused request will fit.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// A request was refused and the timer is armed: everything is refused until it fires.
    blocked: bool,
}

/// Shortest timer the limiter arms, so that a tiny deficit does not spin the event loop.
const MIN_WAIT: Duration = Duration::from_millis(1);

impl RateLimiter {
    /// A limiter for `config` with full buckets. Creates the (non-blocking) timerfd, so call it
    /// where `timerfd_create` is allowed (device construction, not the sandboxed threads).
    pub fn new(config: &RateLimiterConfig) -> io::Result<RateLimiter> {
        // SAFETY: plain syscall with constant arguments; the result is checked below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a timerfd we just created and own exclusively.
        let timer = unsafe { TimerFd::from_raw_fd(fd) };
        let now = Instant::now();
        Ok(RateLimiter {
            bandwidth: config.bandwidth.and_then(|c| TokenBucket::new(&c, now)),
            ops: config.ops.and_then(|c| TokenBucket::new(&c, now)),
            timer,
            blocked: false,
        })
    }

    /// Take `bytes` from the bandwidth bucket and one operation from the ops bucket, both or
    /// neither. On refusal the timer is armed for when both will fit.
    pub fn consume(&mut self, bytes: u64) -> bool {
        // A limiter without buckets (the VMM builds one for every device) admits everything:
        // no clock read, which is a system call where the vDSO cannot read the clock (as in
        // a nested host), once per frame.
        if self.bandwidth.is_none() && self.ops.is_none() && !self.blocked {
            return true;
        }
        self.consume_at(bytes, 1, Instant::now())
    }

    /// [`RateLimiter::consume`] with explicit token counts and clock.
    pub fn consume_at(&mut self, bytes: u64, ops: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let bw_ok = self
            .bandwidth
            .as_mut()
            .is_none_or(|b| b.can_take(bytes, now));
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.can_take(ops, now));
        if bw_ok && ops_ok {
            if let Some(b) = self.bandwidth.as_mut() {
                b.take(bytes);
            }
            if let Some(b) = self.ops.as_mut() {
                b.take(ops);
            }
            return true;
        }
        let wait = self
            .bandwidth
            .as_ref()
            .map_or(Duration::ZERO, |b| b.time_until(bytes))
            .max(
                self.ops
                    .as_ref()
                    .map_or(Duration::ZERO, |b| b.time_until(ops)),
            )
            .max(MIN_WAIT);
        match self.timer.reset(wait, None) {
            Ok(()) => self.blocked = true,
            // Without a timer nothing would wake the device: let the next attempt retry.
            Err(e) => log::warn!("rate limiter: cannot arm the timer: {e}"),
        }
        false
    }

    /// Apply `config` from now on, with full buckets. A request refused under the old
    /// configuration is retried at once: the timer is re-armed to fire, so the device's
    /// usual timer path restarts its queue.
    pub fn update(&mut self, config: &RateLimiterConfig) {
        let now = Instant::now();
        self.bandwidth = config.bandwidth.and_then(|c| TokenBucket::new(&c, now));
        self.ops = config.ops.and_then(|c| TokenBucket::new(&c, now));
        if self.blocked {
            if let Err(e) = self.timer.reset(MIN_WAIT, None) {
                // Nothing would wake the device: let the next attempt retry.
                log::warn!("rate limiter: cannot arm the timer: {e}");
                self.blocked = false;
            }
        }
    }

    /// Whether a refused request is waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer fired (the event loop reported the fd readable): requests may pass again.
    pub fn timer_fired(&mut self) {
        // Drain the expiration count; `EAGAIN` (a spurious wake-up) is harmless.
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// Forget a pending refusal and disarm the timer (the device was reset).
    pub fn unblock(&mut self) {
        let _ = self.timer.clear();
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// The bandwidth bucket, if any.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The operations bucket, if any.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }
}

/// Have the event loop report `limiter`'s timer (when there is a limiter) with `data`; a
/// failure is logged, naming `device`.
pub fn watch_timer(
    limiter: &Option<RateLimiter>,
    ops: &mut event_manager::EventOps,
    data: u32,
    device: &dyn std::fmt::Display,
) {
    let Some(limiter) = limiter else {
        return;
    };
    let ev = event_manager::Events::with_data_raw(
        limiter.as_raw_fd(),
        data,
        vmm_sys_util::epoll::EventSet::IN,
    );
    if let Err(e) = ops.add(ev) {
        log::warn!("{device}: cannot watch a rate limiter's timer: {e:?}");
    }
}

/// Apply `config` to `limiter` ([`RateLimiter::update`]); false when there is none.
pub fn update_limiter(limiter: &mut Option<RateLimiter>, config: &RateLimiterConfig) -> bool {
    match limiter.as_mut() {
        Some(limiter) => {
            limiter.update(config);
            true
        }
        None => false,
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: refill_ms,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bucket_starts_full_and_refills_in_proportion_to_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(1000, 0, 1000), t0).unwrap();
        assert!(b.consume(1000, t0));
        assert!(!b.consume(1, t0));
        assert_eq!(b.time_until(100), ms(100));
        assert!(!b.consume(100, t0 + ms(99)));
        assert!(b.consume(100, t0 + ms(100)));
        // Fractions are kept: 1.5 ms of refill twice earns 3 tokens.
        let t = t0 + ms(100);
        assert!(!b.consume(2, t + Duration::from_micros(1500)));
        assert!(b.consume(3, t + Duration::from_micros(3000)));
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn bucket_refill_is_capped_at_size() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(500, 0, 100), t0).unwrap();
        assert!(b.consume(500, t0));
        b.refill(t0 + Duration::from_secs(3600));
        assert_eq!(b.budget(), 500);
        assert!(b.consume(500, t0 + Duration::from_secs(3600)));
        assert!(!b.consume(1, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(100, 250, 1000), t0).unwrap();
        assert!(b.consume(300, t0)); // 250 burst + 50 bucket
        assert_eq!((b.one_time_burst(), b.budget()), (0, 50));
        assert!(b.consume(50, t0));
        assert!(!b.consume(1, t0));
        b.refill(t0 + Duration::from_secs(100));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
    }

    #[test]
    fn requests_larger_than_the_bucket_pass_when_it_is_full() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(100, 0, 1000), t0).unwrap();
        assert!(
            b.consume(10_000, t0),
            "full bucket lets a big request through"
        );
        assert_eq!(b.budget(), 0);
        assert!(!b.consume(10_000, t0 + ms(999)));
        assert_eq!(b.time_until(10_000), ms(1));
        assert!(b.consume(10_000, t0 + ms(1000)));
        // Not full: refused even though it could never fit anyway.
        assert!(b.consume(1, t0 + ms(2000)));
        assert!(!b.consume(10_000, t0 + ms(2000)));
    }

    #[test]
    fn zero_sized_or_zero_time_buckets_are_no_limit() {
        let t0 = Instant::now();
        assert!(TokenBucket::new(&bucket(0, 0, 1000), t0).is_none());
        assert!(TokenBucket::new(&bucket(10, 0, 0), t0).is_none());
    }

    #[test]
    fn clock_going_backwards_earns_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(&bucket(100, 0, 1000), t0).unwrap();
        assert!(b.consume(100, t0));
        assert!(!b.consume(1, t0 - Duration::from_secs(5)));
        assert!(b.consume(10, t0 + ms(100)));
    }

    #[test]
    fn unlimited_limiter_always_passes() {
        let mut rl = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(rl.consume_at(u64::MAX, u64::MAX, t0));
        }
        assert!(rl.consume(u64::MAX));
        assert!(!rl.is_blocked());
    }

    #[test]
    fn both_buckets_all_or_nothing() {
        let cfg = RateLimiterConfig {
            bandwidth: Some(bucket(1000, 0, 1000)),
            ops: Some(bucket(2, 0, 1000)),
        };
        let mut rl = RateLimiter::new(&cfg).unwrap();
        let t0 = rl.bandwidth().unwrap().last_update;
        assert!(rl.consume_at(100, 1, t0));
        assert!(rl.consume_at(100, 1, t0));
        // Ops exhausted: bandwidth must not be charged for the refused request.
        assert!(!rl.consume_at(100, 1, t0));
        assert!(rl.is_blocked());
        assert_eq!(rl.bandwidth().unwrap().budget(), 800);
        assert_eq!(rl.ops().unwrap().budget(), 0);
        // Blocked until the timer fires, whatever the clock says.
        assert!(!rl.consume_at(1, 1, t0 + Duration::from_secs(10)));
        rl.timer_fired();
        assert!(rl.consume_at(800, 1, t0 + ms(500)));
        // Bandwidth exhausted now: ops must not be charged.
        assert!(!rl.consume_at(600, 1, t0 + ms(500)));
        rl.timer_fired();
        assert_eq!(rl.ops().unwrap().budget(), 0);
    }

    #[test]
    fn refusal_arms_the_timer_for_when_tokens_are_there() {
        let cfg = RateLimiterConfig {
            bandwidth: Some(bucket(1000, 0, 100)),
            ops: None,
        };
        let mut rl = RateLimiter::new(&cfg).unwrap();
        assert!(rl.consume(1000));
        let start = Instant::now();
        assert!(!rl.consume(500));
        assert!(rl.is_blocked());
        assert!(rl.timer.is_armed().unwrap());
        // The timerfd becomes readable within about 50 ms.
        let mut pfd = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1);
        assert!(start.elapsed() >= ms(40));
        rl.timer_fired();
        assert!(!rl.is_blocked());
        assert!(rl.consume(500));
        // A spurious wake-up does not block (the timerfd is non-blocking).
        rl.timer_fired();
    }

    #[test]
    fn unblock_disarms() {
        let cfg = RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(1, 0, 1000)),
        };
        let mut rl = RateLimiter::new(&cfg).unwrap();
        assert!(rl.consume(0));
        assert!(!rl.consume(0));
        rl.unblock();
        assert!(!rl.is_blocked());
        assert!(!rl.timer.is_armed().unwrap());
    }

    #[test]
    fn an_update_takes_effect_at_once_and_wakes_a_blocked_device() {
        let mut rl = RateLimiter::new(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(1, 0, 3_600_000)),
        })
        .unwrap();
        assert!(rl.consume(0));
        assert!(!rl.consume(0));
        assert!(rl.is_blocked());
        // No limit from now on: the timer fires soon and everything passes after it.
        rl.update(&RateLimiterConfig::default());
        assert!(rl.timer.is_armed().unwrap());
        std::thread::sleep(MIN_WAIT * 5);
        rl.timer_fired();
        assert!((0..1000).all(|_| rl.consume(1 << 20)));
        // A limit set on a limiter that had none applies to the next request.
        rl.update(&RateLimiterConfig {
            bandwidth: Some(bucket(100, 0, 3_600_000)),
            ops: None,
        });
        assert!(rl.consume(100));
        assert!(!rl.consume(1));
    }

    #[test]
    fn config_validation_names_the_field() {
        assert_eq!(TokenBucketConfig::per_second(5).validate(), Ok(()));
        let cfg = RateLimiterConfig {
            bandwidth: Some(bucket(10, 0, 1000)),
            ops: Some(bucket(0, 0, 1000)),
        };
        assert_eq!(cfg.validate(), Err(("ops", RateLimiterConfigError::Size)));
        let cfg = RateLimiterConfig {
            bandwidth: Some(bucket(10, 0, 0)),
            ops: None,
        };
        let (field, err) = cfg.validate().unwrap_err();
        assert_eq!(field, "bandwidth");
        assert!(err.to_string().starts_with("refill_time must be"));
        assert!(RateLimiterConfig::default().is_unlimited());
    }
}
