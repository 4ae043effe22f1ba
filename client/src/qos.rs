//! Per-volume QoS, enforced on the host side (like QEMU's throttling and
//! Ceph's `rbd_qos_*`): IOPS and bandwidth limits, each for reads, writes
//! and both together, with bursts. Requests wait; they never fail.
//!
//! ```text
//! NbdBackend call ──▶ QosBackend ── Throttle::reserve(now, class, bytes) ──▶ admit at T
//!                        │                   (sans-IO, FIFO, one lock)
//!                        └── sleep until T ──▶ inner backend (VolumeClient)
//!
//! limits = stricter(volume record's VolumeQos, attach --qos-* flags)
//!   the agent re-reads the record with the partition map (every 2 s):
//!   a change retunes the buckets in place (set_limits)
//! ```
//!
//! * **Where limits come from.** The volume's QoS lives in the unit's
//!   replicated volume record ([`proto::qos::VolumeQos`], set by the zonal
//!   API's create/modify through the LCP's `SetVolumeQos`) and arrives with
//!   the partition map, so an agent attached without the zonal plane
//!   enforces it too. `rackblock attach --qos-*` adds host-side limits; per
//!   dimension the **stricter** (lower sustained rate) of the two wins
//!   ([`QosLimits::stricter`]), so a host can only tighten what the
//!   operator set.
//! * **Costs.** A request costs one I/O per started 256 KiB
//!   ([`proto::qos::io_cost`]: an operation of up to 256 KiB is one I/O)
//!   and its length in bytes. Reads charge the read and total dimensions,
//!   writes the write and total ones. Trim and write zeroes cost one write
//!   I/O and no bytes (no data crosses the network); flush costs nothing
//!   (it makes no round trip, see `nbd/backend.rs`).
//! * **Buckets** ([`proto::rate::TokenBucket`], the one rebuild and scrub
//!   use too). Each limited dimension has a *sustained* bucket that fills
//!   at the limit; its capacity is `burst × burst_length` when a burst is
//!   set (so an idle volume may run at up to the burst rate for
//!   `burst_length`), else a tenth of a second of the limit. With a burst,
//!   a *peak* bucket (filling at the burst rate, a tenth of a second deep)
//!   caps the rate during the burst.
//! * **Admission.** A request is admitted once every bucket it charges
//!   holds `min(cost, capacity)` tokens; then each loses `cost` (so a
//!   request larger than a bucket passes once the bucket is full, and its
//!   debt delays the next ones: the long-run rate still holds). The time of
//!   admission is computed when the request arrives ([`Throttle::reserve`]),
//!   so requests are admitted in arrival order (FIFO) and nothing is
//!   polled. A request whose waiting future is dropped keeps its tokens
//!   spent (the limit errs on the slow side).
//! * **Live changes** ([`Throttle::set_limits`]) retune the buckets in
//!   place: earned tokens are kept (clamped to the new capacities) and the
//!   admission frontier stays, so requests already waiting keep their
//!   times and order (none is dropped or failed) and later ones queue
//!   behind them at the new rates. A dimension that becomes limited starts
//!   with a full bucket; one that becomes unlimited drops its buckets.
//!   With no limit at all the layer is a pass-through (one atomic load
//!   per request): requests arriving after a change to unlimited go at
//!   once, even ahead of ones still waiting under the old limits.
//!
//! The arithmetic is sans-IO: time is a [`Duration`] since the throttle's
//! start, passed in by the caller, so tests drive it with a manual clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use proto::qos::VolumeQos;
use proto::rate::TokenBucket;

use crate::metrics::AgentMetrics;
use crate::nbd::{BackendError, BackendOp, NbdBackend};

/// One limit: a sustained rate, and optionally a burst rate allowed for
/// `burst_length` after an idle spell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Sustained rate, units (I/Os or bytes) per second; > 0.
    pub rate: f64,
    /// Peak rate during a burst; `None`: no burst beyond a tenth of a
    /// second of `rate`. Must be at least `rate`.
    pub burst: Option<f64>,
    /// How long a full bucket can sustain `burst` (default 1 s).
    pub burst_length: Duration,
}

impl Limit {
    pub fn new(rate: f64) -> Limit {
        Limit {
            rate,
            burst: None,
            burst_length: DEFAULT_BURST_LENGTH,
        }
    }

    pub fn with_burst(rate: f64, burst: f64, burst_length: Duration) -> Limit {
        Limit {
            rate,
            burst: Some(burst),
            burst_length,
        }
    }
}

/// Default burst length when a burst rate is given without one.
pub const DEFAULT_BURST_LENGTH: Duration = Duration::from_secs(1);
/// Depth of a bucket without a burst, and of every peak bucket, in
/// seconds of its rate.
const SHALLOW_BUCKET_SECONDS: f64 = 0.1;

/// The limits of one volume; `None` means unlimited in that dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QosLimits {
    pub iops: Option<Limit>,
    pub read_iops: Option<Limit>,
    pub write_iops: Option<Limit>,
    pub bps: Option<Limit>,
    pub read_bps: Option<Limit>,
    pub write_bps: Option<Limit>,
}

/// Why a set of limits is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QosError {
    #[error("QoS {dimension}: rate {rate} is not a positive finite number")]
    BadRate { dimension: &'static str, rate: f64 },
    #[error("QoS {dimension}: burst {burst} is below the rate {rate}")]
    BurstBelowRate {
        dimension: &'static str,
        rate: f64,
        burst: f64,
    },
    #[error("QoS {dimension}: burst length must be positive")]
    BadBurstLength { dimension: &'static str },
}

impl QosLimits {
    /// The limits a volume record holds (IOPS and bandwidth, reads and
    /// writes together; `None`: unlimited).
    pub fn from_volume(qos: Option<&VolumeQos>) -> QosLimits {
        let Some(qos) = qos else {
            return QosLimits::default();
        };
        let burst_length = Duration::from_millis(qos.burst_length_ms());
        let limit = |rate: Option<u64>, burst: Option<u64>| {
            rate.map(|rate| match burst {
                Some(burst) => Limit::with_burst(rate as f64, burst as f64, burst_length),
                None => Limit::new(rate as f64),
            })
        };
        QosLimits {
            iops: limit(qos.iops, qos.burst_iops),
            bps: limit(
                qos.bandwidth_bytes_per_second,
                qos.burst_bandwidth_bytes_per_second,
            ),
            ..QosLimits::default()
        }
    }

    /// Per dimension, the stricter of two sets of limits: the lower
    /// sustained rate (on a tie, the lower burst), or whichever is set.
    pub fn stricter(&self, other: &QosLimits) -> QosLimits {
        fn pick(a: Option<Limit>, b: Option<Limit>) -> Option<Limit> {
            match (a, b) {
                (Some(a), Some(b)) => {
                    let burst = |l: &Limit| l.burst.unwrap_or(l.rate);
                    if (b.rate, burst(&b)) < (a.rate, burst(&a)) {
                        Some(b)
                    } else {
                        Some(a)
                    }
                }
                (a, None) => a,
                (None, b) => b,
            }
        }
        QosLimits {
            iops: pick(self.iops, other.iops),
            read_iops: pick(self.read_iops, other.read_iops),
            write_iops: pick(self.write_iops, other.write_iops),
            bps: pick(self.bps, other.bps),
            read_bps: pick(self.read_bps, other.read_bps),
            write_bps: pick(self.write_bps, other.write_bps),
        }
    }

    /// True when nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.dimensions().iter().all(|(_, limit)| limit.is_none())
    }

    fn dimensions(&self) -> [(&'static str, Option<Limit>); 6] {
        [
            ("iops", self.iops),
            ("read-iops", self.read_iops),
            ("write-iops", self.write_iops),
            ("bps", self.bps),
            ("read-bps", self.read_bps),
            ("write-bps", self.write_bps),
        ]
    }

    pub fn validate(&self) -> Result<(), QosError> {
        for (dimension, limit) in self.dimensions() {
            let Some(limit) = limit else { continue };
            if !(limit.rate.is_finite() && limit.rate > 0.0) {
                return Err(QosError::BadRate {
                    dimension,
                    rate: limit.rate,
                });
            }
            if let Some(burst) = limit.burst {
                if !(burst.is_finite() && burst >= limit.rate) {
                    return Err(QosError::BurstBelowRate {
                        dimension,
                        rate: limit.rate,
                        burst,
                    });
                }
                if limit.burst_length.is_zero() {
                    return Err(QosError::BadBurstLength { dimension });
                }
            }
        }
        Ok(())
    }
}

/// The buckets of one dimension: sustained, and peak when bursting.
#[derive(Debug, Clone)]
struct Dimension {
    sustained: TokenBucket,
    peak: Option<TokenBucket>,
}

impl Dimension {
    fn capacities(limit: Limit) -> (f64, Option<(f64, f64)>) {
        match limit.burst {
            Some(burst) => (
                burst * limit.burst_length.as_secs_f64(),
                Some((burst, burst * SHALLOW_BUCKET_SECONDS)),
            ),
            None => (limit.rate * SHALLOW_BUCKET_SECONDS, None),
        }
    }

    fn new(limit: Limit) -> Dimension {
        let (capacity, peak) = Self::capacities(limit);
        Dimension {
            sustained: TokenBucket::new(limit.rate, capacity),
            peak: peak.map(|(rate, capacity)| TokenBucket::new(rate, capacity)),
        }
    }

    /// The same dimension under a new limit from `now` on (see
    /// [`TokenBucket::retune`]).
    fn retune(&mut self, now: Duration, limit: Limit) {
        let (capacity, peak) = Self::capacities(limit);
        self.sustained.retune(now, limit.rate, capacity);
        self.peak = match (self.peak.take(), peak) {
            (Some(mut bucket), Some((rate, capacity))) => {
                bucket.retune(now, rate, capacity);
                Some(bucket)
            }
            (None, Some((rate, capacity))) => Some(TokenBucket::new(rate, capacity)),
            (_, None) => None,
        };
    }

    fn buckets_mut(&mut self) -> impl Iterator<Item = &mut TokenBucket> {
        std::iter::once(&mut self.sustained).chain(self.peak.as_mut())
    }

    fn buckets(&self) -> impl Iterator<Item = &TokenBucket> {
        std::iter::once(&self.sustained).chain(self.peak.as_ref())
    }
}

/// Which dimensions a request charges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoClass {
    Read,
    Write,
}

/// The sans-IO throttle of one volume: every dimension's buckets.
#[derive(Debug, Clone)]
pub struct Throttle {
    limits: QosLimits,
    iops: Option<Dimension>,
    read_iops: Option<Dimension>,
    write_iops: Option<Dimension>,
    bps: Option<Dimension>,
    read_bps: Option<Dimension>,
    write_bps: Option<Dimension>,
    /// The latest admission time handed out: nothing is admitted before
    /// it (FIFO across limit changes, even to unlimited).
    frontier: Duration,
}

/// The tokens of one bucket, for the admin port.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketTokens {
    /// "iops", "read_iops", "write_iops", "bps", "read_bps", "write_bps".
    pub dimension: &'static str,
    /// "sustained" or "peak".
    pub bucket: &'static str,
    pub tokens: f64,
    pub capacity: f64,
}

impl Throttle {
    pub fn new(limits: QosLimits) -> Result<Throttle, QosError> {
        limits.validate()?;
        Ok(Throttle {
            limits,
            iops: limits.iops.map(Dimension::new),
            read_iops: limits.read_iops.map(Dimension::new),
            write_iops: limits.write_iops.map(Dimension::new),
            bps: limits.bps.map(Dimension::new),
            read_bps: limits.read_bps.map(Dimension::new),
            write_bps: limits.write_bps.map(Dimension::new),
            frontier: Duration::ZERO,
        })
    }

    pub fn limits(&self) -> QosLimits {
        self.limits
    }

    /// Change the limits at `now` without losing what is reserved (see the
    /// module docs). Refused limits change nothing.
    pub fn set_limits(&mut self, now: Duration, limits: QosLimits) -> Result<(), QosError> {
        limits.validate()?;
        let retune = |dimension: &mut Option<Dimension>, limit: Option<Limit>| {
            *dimension = match (dimension.take(), limit) {
                (Some(mut existing), Some(limit)) => {
                    existing.retune(now, limit);
                    Some(existing)
                }
                (None, Some(limit)) => Some(Dimension::new(limit)),
                (_, None) => None,
            };
        };
        retune(&mut self.iops, limits.iops);
        retune(&mut self.read_iops, limits.read_iops);
        retune(&mut self.write_iops, limits.write_iops);
        retune(&mut self.bps, limits.bps);
        retune(&mut self.read_bps, limits.read_bps);
        retune(&mut self.write_bps, limits.write_bps);
        self.limits = limits;
        Ok(())
    }

    fn named(&self) -> [(&'static str, Option<&Dimension>); 6] {
        [
            ("iops", self.iops.as_ref()),
            ("read_iops", self.read_iops.as_ref()),
            ("write_iops", self.write_iops.as_ref()),
            ("bps", self.bps.as_ref()),
            ("read_bps", self.read_bps.as_ref()),
            ("write_bps", self.write_bps.as_ref()),
        ]
    }

    /// Every bucket's tokens at `now` (negative: requests are reserved
    /// ahead, the debt they leave).
    pub fn tokens(&self, now: Duration) -> Vec<BucketTokens> {
        let mut out = Vec::new();
        for (dimension, buckets) in self.named() {
            let Some(buckets) = buckets else { continue };
            out.push(BucketTokens {
                dimension,
                bucket: "sustained",
                tokens: buckets.sustained.tokens_at(now),
                capacity: buckets.sustained.capacity(),
            });
            if let Some(peak) = &buckets.peak {
                out.push(BucketTokens {
                    dimension,
                    bucket: "peak",
                    tokens: peak.tokens_at(now),
                    capacity: peak.capacity(),
                });
            }
        }
        out
    }

    /// The (dimension, cost) pairs a request charges.
    fn charges(&mut self, class: IoClass, bytes: u64) -> [(Option<&mut Dimension>, f64); 4] {
        let ops = proto::qos::io_cost(bytes) as f64;
        let bytes = bytes as f64;
        let (class_ops, data) = match class {
            IoClass::Read => (&mut self.read_iops, &mut self.read_bps),
            IoClass::Write => (&mut self.write_iops, &mut self.write_bps),
        };
        [
            (self.iops.as_mut(), ops),
            (class_ops.as_mut(), ops),
            (if bytes > 0.0 { self.bps.as_mut() } else { None }, bytes),
            (if bytes > 0.0 { data.as_mut() } else { None }, bytes),
        ]
    }

    /// Reserve a request arriving at `now` (time since the throttle's
    /// start): the time at which it may proceed, not before `now`. Its
    /// tokens are taken at once, so later arrivals queue behind it.
    pub fn reserve(&mut self, now: Duration, class: IoClass, bytes: u64) -> Duration {
        let mut admit = now.max(self.frontier);
        let mut charges = self.charges(class, bytes);
        for (dimension, cost) in charges.iter() {
            if let Some(dimension) = dimension {
                for bucket in dimension.buckets() {
                    admit = admit.max(bucket.earliest(now, *cost));
                }
            }
        }
        for (dimension, cost) in charges.iter_mut() {
            if let Some(dimension) = dimension {
                for bucket in dimension.buckets_mut() {
                    bucket.take(admit, *cost);
                }
            }
        }
        self.frontier = admit;
        admit
    }
}

/// Clock of a [`QosBackend`]: tokio's, so tests with paused time work.
#[derive(Debug)]
struct Shared {
    start: tokio::time::Instant,
    throttle: Mutex<Throttle>,
    /// No limit in force: requests go straight to the inner backend (no
    /// lock, no clock, no extra future), so an unlimited volume pays one
    /// atomic load for the QoS layer. Set with the limits, under the lock.
    unlimited: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Throttle> {
        // Plain arithmetic under the lock: consistent across a panic.
        self.throttle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.start)
    }
}

/// A handle on a [`QosBackend`]'s throttle: what the admin port reads and
/// the limit watcher changes (cheap to clone).
#[derive(Debug, Clone)]
pub struct QosHandle {
    shared: Arc<Shared>,
    metrics: Option<AgentMetrics>,
}

impl QosHandle {
    pub fn limits(&self) -> QosLimits {
        self.shared.lock().limits()
    }

    /// Replace the limits from now on, keeping waiting requests in place
    /// ([`Throttle::set_limits`]).
    pub fn set_limits(&self, limits: QosLimits) -> Result<(), QosError> {
        let now = self.shared.now();
        let mut throttle = self.shared.lock();
        throttle.set_limits(now, limits)?;
        self.shared
            .unlimited
            .store(limits.is_unlimited(), Ordering::Relaxed);
        drop(throttle);
        if let Some(metrics) = &self.metrics {
            metrics.qos_limits_changed(&limits);
        }
        Ok(())
    }

    /// Every bucket's tokens now.
    pub fn tokens(&self) -> Vec<BucketTokens> {
        let now = self.shared.now();
        self.shared.lock().tokens(now)
    }
}

/// An [`NbdBackend`] that throttles another (the seam every front end
/// goes through). Flush is never throttled.
#[derive(Debug)]
pub struct QosBackend<B> {
    inner: B,
    shared: Arc<Shared>,
    metrics: Option<AgentMetrics>,
}

impl<B: NbdBackend> QosBackend<B> {
    pub fn new(
        inner: B,
        limits: QosLimits,
        metrics: Option<AgentMetrics>,
    ) -> Result<QosBackend<B>, QosError> {
        let throttle = Throttle::new(limits)?;
        if let Some(metrics) = &metrics {
            metrics.qos_limits_changed(&limits);
        }
        Ok(QosBackend {
            inner,
            shared: Arc::new(Shared {
                start: tokio::time::Instant::now(),
                throttle: Mutex::new(throttle),
                unlimited: AtomicBool::new(limits.is_unlimited()),
            }),
            metrics,
        })
    }

    pub fn handle(&self) -> QosHandle {
        QosHandle {
            shared: self.shared.clone(),
            metrics: self.metrics.clone(),
        }
    }

    pub fn limits(&self) -> QosLimits {
        self.shared.lock().limits()
    }

    /// Replace the limits (see [`QosHandle::set_limits`]).
    pub fn set_limits(&self, limits: QosLimits) -> Result<(), QosError> {
        self.handle().set_limits(limits)
    }

    fn unlimited(&self) -> bool {
        self.shared.unlimited.load(Ordering::Relaxed)
    }

    async fn admit(&self, class: IoClass, bytes: u64) {
        // The clock is read under the lock: reservations are made in
        // time order, so with no limit (or tokens to spare) nobody waits
        // behind a concurrent caller that read the clock a moment later.
        let (now, since_start, admit) = {
            let mut throttle = self.shared.lock();
            let now = tokio::time::Instant::now();
            let since_start = now.saturating_duration_since(self.shared.start);
            (
                now,
                since_start,
                throttle.reserve(since_start, class, bytes),
            )
        };
        let wait = admit.saturating_sub(since_start);
        if let Some(metrics) = &self.metrics {
            metrics.qos_waited(wait);
        }
        if !wait.is_zero() {
            let _queued = self.metrics.as_ref().map(AgentMetrics::qos_queued);
            tokio::time::sleep_until(now + wait).await;
        }
    }
}

impl<B: NbdBackend> NbdBackend for QosBackend<B> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn description(&self) -> String {
        self.inner.description()
    }

    fn read(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        if self.unlimited() {
            return self.inner.read(offset_bytes, len);
        }
        Box::pin(async move {
            self.admit(IoClass::Read, len).await;
            self.inner.read(offset_bytes, len).await
        })
    }

    fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        if self.unlimited() {
            return self.inner.write(offset_bytes, data, fua);
        }
        Box::pin(async move {
            self.admit(IoClass::Write, data.len() as u64).await;
            self.inner.write(offset_bytes, data, fua).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        self.inner.flush()
    }

    fn trim(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        if self.unlimited() {
            return self.inner.trim(offset_bytes, len);
        }
        Box::pin(async move {
            self.admit(IoClass::Write, 0).await;
            self.inner.trim(offset_bytes, len).await
        })
    }

    fn write_zeroes(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        if self.unlimited() {
            return self.inner.write_zeroes(offset_bytes, len);
        }
        Box::pin(async move {
            self.admit(IoClass::Write, 0).await;
            self.inner.write_zeroes(offset_bytes, len).await
        })
    }
}

/// Which op a class is, for callers mapping [`BackendOp`]s.
pub fn class_of(op: BackendOp) -> Option<IoClass> {
    match op {
        BackendOp::Read => Some(IoClass::Read),
        BackendOp::Write | BackendOp::Trim | BackendOp::WriteZeroes => Some(IoClass::Write),
        BackendOp::Flush => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Admit requests back to back (each arriving as soon as the previous
    /// one was admitted, i.e. a saturating client with queue depth 1) until
    /// `until`; count them.
    fn saturate(throttle: &mut Throttle, class: IoClass, bytes: u64, until: Duration) -> u64 {
        let mut now = Duration::ZERO;
        let mut count = 0;
        loop {
            let admit = throttle.reserve(now, class, bytes);
            if admit >= until {
                return count;
            }
            count += 1;
            now = admit;
        }
    }

    #[test]
    fn iops_limit_holds_over_time() {
        let mut throttle = Throttle::new(QosLimits {
            iops: Some(Limit::new(500.0)),
            ..QosLimits::default()
        })
        .unwrap();
        let count = saturate(&mut throttle, IoClass::Read, 4096, Duration::from_secs(10));
        // 10 s at 500/s plus the initial bucket (0.1 s of rate = 50).
        assert!((5000..=5051).contains(&count), "{count}");
    }

    #[test]
    fn many_arrivals_at_once_are_spaced_in_fifo_order() {
        let mut throttle = Throttle::new(QosLimits {
            iops: Some(Limit::new(100.0)),
            ..QosLimits::default()
        })
        .unwrap();
        let admits: Vec<Duration> = (0..30)
            .map(|_| throttle.reserve(Duration::ZERO, IoClass::Write, 4096))
            .collect();
        // 10 pass at once (the bucket), then one every 10 ms, in order.
        assert!(admits[..10].iter().all(|t| t.is_zero()));
        for pair in admits.windows(2) {
            assert!(pair[0] <= pair[1]);
        }
        let last = admits[29].as_secs_f64();
        assert!((last - 0.2).abs() < 1e-6, "{last}");
    }

    #[test]
    fn a_request_costs_one_io_per_started_256k() {
        let mut throttle = Throttle::new(QosLimits {
            iops: Some(Limit::new(100.0)),
            ..QosLimits::default()
        })
        .unwrap();
        // 1 MiB reads cost 4 I/Os: 10 s at 100 I/O/s is ~250 of them.
        let count = saturate(&mut throttle, IoClass::Read, MIB, Duration::from_secs(10));
        assert!((250..=253).contains(&count), "{count}");
        let mut throttle = Throttle::new(QosLimits {
            iops: Some(Limit::new(100.0)),
            ..QosLimits::default()
        })
        .unwrap();
        let count = saturate(
            &mut throttle,
            IoClass::Read,
            256 << 10,
            Duration::from_secs(10),
        );
        assert!((1000..=1011).contains(&count), "{count}");
    }

    #[test]
    fn a_live_change_keeps_reservations_and_applies_the_new_rate() {
        let mut throttle = Throttle::new(QosLimits {
            iops: Some(Limit::new(100.0)),
            ..QosLimits::default()
        })
        .unwrap();
        // 30 queued at once: the last one is admitted at 0.2 s.
        let queued: Vec<Duration> = (0..30)
            .map(|_| throttle.reserve(Duration::ZERO, IoClass::Write, 4096))
            .collect();
        assert!((queued[29].as_secs_f64() - 0.2).abs() < 1e-6);
        // Raised to 1000/s at 0.05 s: nothing reserved moves, newcomers
        // queue behind the last reservation and go at the new rate.
        let now = Duration::from_millis(50);
        throttle
            .set_limits(
                now,
                QosLimits {
                    iops: Some(Limit::new(1000.0)),
                    ..QosLimits::default()
                },
            )
            .unwrap();
        let next = throttle.reserve(now, IoClass::Write, 4096);
        assert!(next >= queued[29], "{next:?} before {:?}", queued[29]);
        let mut at = next;
        let mut count = 0;
        while at < Duration::from_millis(1200) {
            at = throttle.reserve(at, IoClass::Write, 4096);
            count += 1;
        }
        assert!((990..=1010).contains(&count), "{count}");
        // Lowered to 10/s: the rate follows.
        throttle
            .set_limits(
                at,
                QosLimits {
                    iops: Some(Limit::new(10.0)),
                    ..QosLimits::default()
                },
            )
            .unwrap();
        let start = at;
        let mut count = 0;
        while at < start + Duration::from_secs(10) {
            at = throttle.reserve(at, IoClass::Write, 4096);
            count += 1;
        }
        assert!((99..=103).contains(&count), "{count}");
        // To unlimited: FIFO still holds for what is queued.
        let last = throttle.reserve(at, IoClass::Write, 4096);
        throttle.set_limits(at, QosLimits::default()).unwrap();
        assert!(throttle.reserve(at, IoClass::Write, 4096) >= last);
        // Refused limits change nothing.
        assert!(throttle
            .set_limits(
                at,
                QosLimits {
                    iops: Some(Limit::new(-1.0)),
                    ..QosLimits::default()
                }
            )
            .is_err());
        assert!(throttle.limits().is_unlimited());
    }

    #[test]
    fn the_volume_record_and_the_host_flags_combine_to_the_stricter() {
        let record = QosLimits::from_volume(Some(&VolumeQos {
            iops: Some(1000),
            burst_iops: Some(3000),
            burst_length_ms: Some(10_000),
            bandwidth_bytes_per_second: Some(50 << 20),
            ..VolumeQos::default()
        }));
        assert_eq!(
            record.iops,
            Some(Limit::with_burst(1000.0, 3000.0, Duration::from_secs(10)))
        );
        assert_eq!(record.bps, Some(Limit::new((50 << 20) as f64)));
        let host = QosLimits {
            iops: Some(Limit::new(500.0)),
            bps: Some(Limit::new((100 << 20) as f64)),
            write_iops: Some(Limit::new(200.0)),
            ..QosLimits::default()
        };
        let both = record.stricter(&host);
        assert_eq!(both.iops, host.iops);
        assert_eq!(both.bps, record.bps);
        assert_eq!(both.write_iops, host.write_iops);
        assert_eq!(both, host.stricter(&record));
        assert!(QosLimits::from_volume(None).is_unlimited());
    }

    #[test]
    fn a_large_request_costs_its_bytes_and_its_ios() {
        let mut throttle = Throttle::new(QosLimits {
            iops: Some(Limit::new(1000.0)),
            bps: Some(Limit::new(MIB as f64)),
            ..QosLimits::default()
        })
        .unwrap();
        // Bucket holds 0.1 MiB: a 1 MiB write passes once it is full, and
        // its debt holds the next request back ~0.9 s + its own cost.
        assert_eq!(
            throttle.reserve(Duration::ZERO, IoClass::Write, MIB),
            Duration::ZERO
        );
        let next = throttle.reserve(Duration::ZERO, IoClass::Write, 4096);
        assert!((next.as_secs_f64() - 0.9).abs() < 0.01, "{next:?}");
        // Over 10 s, 1 MiB writes reach ~10 MiB: the byte limit binds,
        // not the IOPS one.
        let mut throttle = Throttle::new(QosLimits {
            iops: Some(Limit::new(1000.0)),
            bps: Some(Limit::new(MIB as f64)),
            ..QosLimits::default()
        })
        .unwrap();
        let count = saturate(&mut throttle, IoClass::Write, MIB, Duration::from_secs(10));
        assert!((10..=11).contains(&count), "{count}");
    }

    #[test]
    fn reads_and_writes_have_their_own_limits_and_share_the_total() {
        let mut throttle = Throttle::new(QosLimits {
            read_iops: Some(Limit::new(100.0)),
            write_iops: Some(Limit::new(200.0)),
            ..QosLimits::default()
        })
        .unwrap();
        let reads = saturate(
            &mut throttle.clone(),
            IoClass::Read,
            4096,
            Duration::from_secs(10),
        );
        let writes = saturate(&mut throttle, IoClass::Write, 4096, Duration::from_secs(10));
        assert!((1000..=1011).contains(&reads), "{reads}");
        assert!((2000..=2021).contains(&writes), "{writes}");

        let mut throttle = Throttle::new(QosLimits {
            iops: Some(Limit::new(100.0)),
            ..QosLimits::default()
        })
        .unwrap();
        // Alternating reads and writes share the total.
        let mut now = Duration::ZERO;
        let mut count = 0;
        while now < Duration::from_secs(10) {
            let class = if count % 2 == 0 {
                IoClass::Read
            } else {
                IoClass::Write
            };
            now = throttle.reserve(now, class, 4096);
            count += 1;
        }
        assert!((1000..=1012).contains(&count), "{count}");
    }

    #[test]
    fn trims_cost_an_op_and_no_bytes() {
        let mut throttle = Throttle::new(QosLimits {
            write_bps: Some(Limit::new(4096.0)),
            ..QosLimits::default()
        })
        .unwrap();
        for _ in 0..1000 {
            assert_eq!(
                throttle.reserve(Duration::ZERO, IoClass::Write, 0),
                Duration::ZERO
            );
        }
    }

    #[test]
    fn a_burst_runs_at_the_burst_rate_then_decays_to_the_limit() {
        let limit = Limit::with_burst(100.0, 1000.0, Duration::from_secs(2));
        let mut throttle = Throttle::new(QosLimits {
            iops: Some(limit),
            ..QosLimits::default()
        })
        .unwrap();
        // Saturating: count admissions per 100 ms window.
        let mut now = Duration::ZERO;
        let mut windows = vec![0u32; 100];
        loop {
            let admit = throttle.reserve(now, IoClass::Read, 4096);
            let window = (admit.as_secs_f64() * 10.0) as usize;
            if window >= windows.len() {
                break;
            }
            windows[window] += 1;
            now = admit;
        }
        // First: the peak bucket caps at ~1000/s (100 per window, plus its
        // 0.1 s depth in the very first).
        assert!((195..=205).contains(&windows[0]), "{windows:?}");
        for &w in &windows[1..15] {
            assert!((95..=105).contains(&w), "{windows:?}");
        }
        // The sustained bucket (1000 × 2 s = 2000 ops, refilled at 100/s)
        // runs dry after ~2.2 s; afterwards the limit, 10 per window.
        for &w in &windows[30..] {
            assert!((9..=11).contains(&w), "{windows:?}");
        }
        let total: u32 = windows.iter().sum();
        // The sustained bucket bounds the total: 2000 + 10 s at 100/s.
        assert!((2990..=3001).contains(&total), "{total}");
    }

    #[test]
    fn an_idle_volume_earns_its_burst_back() {
        let limit = Limit::with_burst(100.0, 1000.0, Duration::from_secs(1));
        let mut throttle = Throttle::new(QosLimits {
            iops: Some(limit),
            ..QosLimits::default()
        })
        .unwrap();
        // Drain it.
        let count = saturate(&mut throttle, IoClass::Read, 4096, Duration::from_secs(5));
        assert!(count > 1000);
        // 10 s idle refills the 1000-op bucket; the next 100 go at once.
        let idle = Duration::from_secs(15);
        let admits: Vec<Duration> = (0..100)
            .map(|_| throttle.reserve(idle, IoClass::Read, 4096))
            .collect();
        assert!(admits.iter().all(|t| *t == idle), "{admits:?}");
    }

    #[test]
    fn bad_limits_are_refused() {
        let bad = |limits: QosLimits| Throttle::new(limits).unwrap_err();
        assert!(matches!(
            bad(QosLimits {
                iops: Some(Limit::new(0.0)),
                ..QosLimits::default()
            }),
            QosError::BadRate { .. }
        ));
        assert!(matches!(
            bad(QosLimits {
                bps: Some(Limit::with_burst(100.0, 50.0, Duration::from_secs(1))),
                ..QosLimits::default()
            }),
            QosError::BurstBelowRate { .. }
        ));
        assert!(matches!(
            bad(QosLimits {
                read_iops: Some(Limit::with_burst(100.0, 500.0, Duration::ZERO)),
                ..QosLimits::default()
            }),
            QosError::BadBurstLength { .. }
        ));
        assert!(QosLimits::default().is_unlimited());
    }

    #[tokio::test(start_paused = true)]
    async fn qos_backend_delays_and_never_fails() {
        use crate::nbd::MemoryBackend;
        let backend = QosBackend::new(
            MemoryBackend::new(1 << 20),
            QosLimits {
                write_iops: Some(Limit::new(100.0)),
                ..QosLimits::default()
            },
            None,
        )
        .unwrap();
        let start = tokio::time::Instant::now();
        let writes = (0..110)
            .map(|i| backend.write((i % 256) * 4096, Bytes::from(vec![i as u8; 4096]), false));
        for result in futures::future::join_all(writes).await {
            result.unwrap();
        }
        // 10 from the bucket, 100 more at 100/s.
        let elapsed = start.elapsed().as_secs_f64();
        assert!((elapsed - 1.0).abs() < 0.02, "{elapsed}");
        // Reads are not limited.
        let start = tokio::time::Instant::now();
        for _ in 0..1000 {
            backend.read(0, 4096).await.unwrap();
        }
        assert!(start.elapsed() < Duration::from_millis(1));
        backend.flush().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_change_under_a_queue_fails_nothing() {
        use crate::nbd::MemoryBackend;
        let backend = QosBackend::new(
            MemoryBackend::new(1 << 20),
            QosLimits {
                iops: Some(Limit::new(10.0)),
                ..QosLimits::default()
            },
            None,
        )
        .unwrap();
        let handle = backend.handle();
        let start = tokio::time::Instant::now();
        // 201 queued: 1 from the bucket, then 10/s would take 20 s.
        let writes = futures::future::join_all(
            (0..201u64)
                .map(|i| backend.write((i % 256) * 4096, Bytes::from(vec![i as u8; 4096]), false)),
        );
        let change = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            handle
                .set_limits(QosLimits {
                    iops: Some(Limit::new(1000.0)),
                    ..QosLimits::default()
                })
                .unwrap();
        };
        let (results, ()) = tokio::join!(writes, change);
        assert!(results.iter().all(Result::is_ok));
        // Everything was reserved at the old rate on arrival: the change
        // moves no reservation (they finish at ~20 s), and new requests
        // go at the new rate behind them.
        let elapsed = start.elapsed().as_secs_f64();
        assert!((elapsed - 20.0).abs() < 0.05, "{elapsed}");
        let again = tokio::time::Instant::now();
        for i in 0..100u64 {
            backend
                .write(i * 4096, Bytes::from(vec![1u8; 4096]), false)
                .await
                .unwrap();
        }
        assert!(
            again.elapsed() < Duration::from_millis(150),
            "{:?}",
            again.elapsed()
        );
        assert_eq!(handle.limits().iops, Some(Limit::new(1000.0)));
        assert!(!handle.tokens().is_empty());
        // Unlimited: a pass-through; limited again: throttled again.
        handle.set_limits(QosLimits::default()).unwrap();
        let again = tokio::time::Instant::now();
        for i in 0..1000u64 {
            backend
                .write((i % 256) * 4096, Bytes::from(vec![2u8; 4096]), false)
                .await
                .unwrap();
        }
        assert_eq!(again.elapsed(), Duration::ZERO);
        handle
            .set_limits(QosLimits {
                write_iops: Some(Limit::new(100.0)),
                ..QosLimits::default()
            })
            .unwrap();
        let again = tokio::time::Instant::now();
        for i in 0..110u64 {
            backend
                .write((i % 256) * 4096, Bytes::from(vec![3u8; 4096]), false)
                .await
                .unwrap();
        }
        let elapsed = again.elapsed().as_secs_f64();
        assert!((elapsed - 1.0).abs() < 0.05, "{elapsed}");
    }
}
