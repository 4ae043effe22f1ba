//! The one token bucket of the project: the attach agent's per-volume QoS
//! (`client/src/qos.rs`, a sustained and a peak bucket per dimension), a
//! primary's column rebuild (`head-node/src/partition/rebuild.rs`, bytes
//! per second) and the sled's scrubber (`sled-controller/src/scrub.rs`,
//! bytes per second) all pace with it.
//!
//! ```text
//! tokens ▲ capacity ─────────╮      ╭──────── (refills at `rate`, capped)
//!        │                   │     ╱
//!        │                   ╰──╮ ╱  reserve(now, cost): admitted at the
//!        │                      ╰    earliest T ≥ max(now, last admission)
//!        0 ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─   with min(cost, capacity) tokens; then
//!        │          debt ╲╱          tokens -= cost (may go negative)
//! ```
//!
//! * **Sans-IO.** Time is a [`Duration`] since an origin the caller picks
//!   (its own start), passed in with every call, so tests drive it with a
//!   manual clock and the arithmetic never sleeps. [`Pacer`] is the thin
//!   shell for a single task that sleeps on tokio's clock.
//! * **FIFO.** A reservation computes its admission time when it is made
//!   and takes its tokens at that time: later reservations queue behind
//!   it (the bucket's `at` never moves back), so many callers sharing one
//!   bucket under a lock are admitted in arrival order without polling.
//! * **Large costs.** A cost above the capacity is admitted once the
//!   bucket is full and leaves a debt (negative tokens) that delays the
//!   next ones: the long-run rate holds whatever the sizes.
//! * **Retuning** ([`TokenBucket::retune`]) keeps the admission frontier
//!   and the tokens (clamped to the new capacity), so a live limit change
//!   neither releases a burst nor reorders reservations already made.

use std::time::Duration;

/// A token bucket on a caller-supplied timeline (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    /// Tokens per second; > 0 and finite.
    rate: f64,
    /// Most tokens held; > 0 and finite.
    capacity: f64,
    /// Tokens at `at`; negative after a cost larger than the bucket.
    tokens: f64,
    /// Time of the last admission (in the future while requests are
    /// reserved ahead).
    at: Duration,
}

/// Longest wait a bucket computes (a guard against absurd rates: a wait
/// is always representable and a caller's sleep always ends).
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

fn seconds(value: f64) -> Duration {
    if value.is_finite() && value > 0.0 {
        Duration::try_from_secs_f64(value)
            .unwrap_or(MAX_WAIT)
            .min(MAX_WAIT)
    } else {
        Duration::ZERO
    }
}

impl TokenBucket {
    /// A full bucket at time zero. `rate` and `capacity` are clamped to a
    /// positive minimum (a zero rate would never refill: callers that mean
    /// "unlimited" use no bucket).
    pub fn new(rate: f64, capacity: f64) -> TokenBucket {
        let (rate, capacity) = Self::sane(rate, capacity);
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            at: Duration::ZERO,
        }
    }

    fn sane(rate: f64, capacity: f64) -> (f64, f64) {
        let positive = |v: f64| if v.is_finite() && v > 0.0 { v } else { 1e-9 };
        (positive(rate), positive(capacity))
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Tokens the bucket holds at `time` (negative while in debt; capacity
    /// at most). Before the last admission it answers for that admission.
    pub fn tokens_at(&self, time: Duration) -> f64 {
        let elapsed = time.saturating_sub(self.at).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.capacity)
    }

    /// The earliest time, not before `now` nor before the last admission,
    /// at which `cost` may be admitted.
    pub fn earliest(&self, now: Duration, cost: f64) -> Duration {
        let base = now.max(self.at);
        let need = cost.min(self.capacity);
        let have = self.tokens_at(base);
        if have >= need {
            return base;
        }
        base + seconds((need - have) / self.rate)
    }

    /// Admits `cost` at `time` (a time [`earliest`](Self::earliest)
    /// allowed, or later): the tokens go, `time` becomes the frontier.
    pub fn take(&mut self, time: Duration, cost: f64) {
        let time = time.max(self.at);
        self.tokens = self.tokens_at(time) - cost;
        self.at = time;
    }

    /// [`earliest`](Self::earliest) then [`take`](Self::take): the time at
    /// which a cost arriving at `now` may proceed.
    pub fn reserve(&mut self, now: Duration, cost: f64) -> Duration {
        let admit = self.earliest(now, cost);
        self.take(admit, cost);
        admit
    }

    /// New rate and capacity from `now` on. Tokens earned so far at the
    /// old rate are kept (clamped to the new capacity) and the admission
    /// frontier stays: reservations already made keep their times.
    pub fn retune(&mut self, now: Duration, rate: f64, capacity: f64) {
        let (rate, capacity) = Self::sane(rate, capacity);
        let time = now.max(self.at);
        self.tokens = self.tokens_at(time).min(capacity);
        self.at = time;
        self.rate = rate;
        self.capacity = capacity;
    }
}

/// A bucket paced on tokio's clock for one task (rebuild, scrub): costs
/// in units per second, `rate == 0` meaning unlimited.
#[derive(Debug)]
pub struct Pacer {
    bucket: Option<TokenBucket>,
    start: tokio::time::Instant,
}

impl Pacer {
    /// `rate_per_second` (0: unlimited) with a full bucket of `capacity`.
    pub fn new(rate_per_second: u64, capacity: u64) -> Pacer {
        Pacer {
            bucket: (rate_per_second > 0)
                .then(|| TokenBucket::new(rate_per_second as f64, capacity.max(1) as f64)),
            start: tokio::time::Instant::now(),
        }
    }

    /// How long to wait, from `now`, before `cost` may be spent; the
    /// tokens are reserved (so the caller must then wait that long).
    pub fn reserve(&mut self, cost: u64, now: tokio::time::Instant) -> Duration {
        let Some(bucket) = &mut self.bucket else {
            return Duration::ZERO;
        };
        let since = now.saturating_duration_since(self.start);
        bucket.reserve(since, cost as f64).saturating_sub(since)
    }

    /// Waits until `cost` may be spent.
    pub async fn acquire(&mut self, cost: u64) {
        let wait = self.reserve(cost, tokio::time::Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn a_full_bucket_passes_its_capacity_then_paces_at_the_rate() {
        let mut bucket = TokenBucket::new(100.0, 10.0);
        for _ in 0..10 {
            assert_eq!(bucket.reserve(Duration::ZERO, 1.0), Duration::ZERO);
        }
        let next = bucket.reserve(Duration::ZERO, 1.0);
        assert!((next.as_secs_f64() - 0.01).abs() < 1e-9, "{next:?}");
        // FIFO: another arrival at time zero queues behind it.
        let after = bucket.reserve(Duration::ZERO, 1.0);
        assert!((after.as_secs_f64() - 0.02).abs() < 1e-9, "{after:?}");
    }

    #[test]
    fn a_cost_above_the_capacity_passes_when_full_and_leaves_a_debt() {
        let mut bucket = TokenBucket::new(1_000.0, 100.0);
        assert_eq!(bucket.reserve(Duration::ZERO, 1_000.0), Duration::ZERO);
        // 900 tokens of debt plus 100 for the next one: one second.
        let next = bucket.reserve(Duration::ZERO, 100.0);
        assert!((next.as_secs_f64() - 1.0).abs() < 1e-9, "{next:?}");
    }

    #[test]
    fn the_long_run_rate_holds_for_any_costs() {
        let mut bucket = TokenBucket::new(1_000.0, 50.0);
        let mut now = Duration::ZERO;
        let mut spent = 0.0;
        let mut i = 0u64;
        while now < Duration::from_secs(10) {
            let cost = [1.0, 7.0, 300.0, 49.0][(i % 4) as usize];
            now = bucket.reserve(now, cost);
            spent += cost;
            i += 1;
        }
        // 10 s at 1000/s plus the initial 50, plus the last admitted cost.
        assert!(spent <= 10_000.0 + 50.0 + 300.0, "{spent}");
        assert!(spent >= 9_700.0, "{spent}");
    }

    #[test]
    fn idle_time_refills_up_to_the_capacity_only() {
        let mut bucket = TokenBucket::new(10.0, 5.0);
        bucket.reserve(Duration::ZERO, 5.0);
        assert!((bucket.tokens_at(Duration::from_secs(100)) - 5.0).abs() < 1e-9);
        assert!((bucket.tokens_at(ms(200)) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn retuning_keeps_the_frontier_and_clamps_the_tokens() {
        let mut bucket = TokenBucket::new(100.0, 100.0);
        // 150 reserved at time zero: the frontier is 0.5 s ahead.
        for _ in 0..150 {
            bucket.reserve(Duration::ZERO, 1.0);
        }
        bucket.retune(Duration::ZERO, 1_000.0, 10.0);
        // The next one comes after the frontier, at the new rate.
        let next = bucket.reserve(Duration::ZERO, 1.0);
        assert!(next >= ms(500), "{next:?}");
        assert!(next <= ms(502), "{next:?}");
        // A full bucket retuned smaller holds the new capacity only.
        let mut full = TokenBucket::new(100.0, 100.0);
        full.retune(Duration::from_secs(5), 100.0, 10.0);
        assert!((full.tokens_at(Duration::from_secs(5)) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn absurd_parameters_do_not_panic() {
        let mut bucket = TokenBucket::new(0.0, f64::NAN);
        let wait = bucket.reserve(Duration::ZERO, 1e30);
        assert!(wait <= MAX_WAIT);
        let mut bucket = TokenBucket::new(f64::INFINITY, 1.0);
        bucket.reserve(Duration::ZERO, 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_sleeps_for_the_debt_and_unlimited_never_waits() {
        let mut pacer = Pacer::new(1 << 20, 1 << 20);
        let start = tokio::time::Instant::now();
        pacer.acquire(1 << 20).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        pacer.acquire(512 << 10).await;
        let elapsed = start.elapsed().as_secs_f64();
        assert!((elapsed - 0.5).abs() < 0.001, "{elapsed}");
        let mut unlimited = Pacer::new(0, 1);
        assert_eq!(
            unlimited.reserve(u64::MAX, tokio::time::Instant::now()),
            Duration::ZERO
        );
    }
}
