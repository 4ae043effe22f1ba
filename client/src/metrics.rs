//! Metrics of the attach agent (served on its admin port, `admin.rs`):
//! what the host sees per operation ([`MeteredBackend`], at the backend
//! seam, so QoS waits are part of the latency), NBD connections, and what
//! the volume client does underneath ([`ClientMetrics`]: retries, failover
//! pauses, map refreshes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::nbd::{BackendError, BackendOp, NbdBackend};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DimensionLabels {
    dimension: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BucketLabels {
    dimension: &'static str,
    bucket: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

fn op_name(op: BackendOp) -> &'static str {
    match op {
        BackendOp::Read => "read",
        BackendOp::Write => "write",
        BackendOp::Flush => "flush",
        BackendOp::Trim => "trim",
        BackendOp::WriteZeroes => "write_zeroes",
    }
}

fn latency_histogram() -> Histogram {
    // 20 µs .. ~2.6 s
    Histogram::new(exponential_buckets(0.000_02, 2.0, 18))
}

fn pause_histogram() -> Histogram {
    // 10 ms .. ~160 s (the failover timeout is 120 s by default)
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

type HistogramFamily = Family<OpLabels, Histogram, fn() -> Histogram>;

/// What the volume client records (cheap to clone: shared handles).
#[derive(Debug, Clone)]
pub struct ClientMetrics {
    retries: Counter,
    failover_pauses: Counter,
    failover_pause_seconds: Histogram,
    longest_pause_us: Arc<AtomicU64>,
    longest_pause_seconds: Gauge<f64, AtomicU64>,
    waiting: Gauge,
    map_refreshes: Family<ResultLabels, Counter>,
}

impl Default for ClientMetrics {
    fn default() -> ClientMetrics {
        ClientMetrics::unregistered()
    }
}

impl ClientMetrics {
    /// Not registered anywhere (the default of a `ClientConfig`).
    pub fn unregistered() -> ClientMetrics {
        ClientMetrics {
            retries: Counter::default(),
            failover_pauses: Counter::default(),
            failover_pause_seconds: pause_histogram(),
            longest_pause_us: Arc::new(AtomicU64::new(0)),
            longest_pause_seconds: Gauge::default(),
            waiting: Gauge::default(),
            map_refreshes: Family::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rackblock_agent_retries",
            "Requests to head nodes sent again (NotPrimary, Unavailable, stale map, link failure, checksum)",
            self.retries.clone(),
        );
        registry.register(
            "rackblock_agent_failover_pauses",
            "Requests that completed (or failed) only after at least one retry",
            self.failover_pauses.clone(),
        );
        registry.register(
            "rackblock_agent_failover_pause_seconds",
            "Time a retried request spent from its first send to its end",
            self.failover_pause_seconds.clone(),
        );
        registry.register(
            "rackblock_agent_failover_pause_longest_seconds",
            "The longest such pause since the agent started",
            self.longest_pause_seconds.clone(),
        );
        registry.register(
            "rackblock_agent_requests_retrying",
            "Requests to head nodes being retried right now",
            self.waiting.clone(),
        );
        registry.register(
            "rackblock_agent_map_refreshes",
            "Partition map reads from the unit's control plane, by result",
            self.map_refreshes.clone(),
        );
    }

    pub(crate) fn retried(&self) {
        self.retries.inc();
    }

    /// A request starts retrying (after its first failed attempt).
    pub(crate) fn retrying_started(&self) {
        self.waiting.inc();
    }

    /// A request that was retried ended after `elapsed` from its first send.
    pub(crate) fn pause_ended(&self, elapsed: Duration) {
        self.waiting.dec();
        self.failover_pauses.inc();
        self.failover_pause_seconds.observe(elapsed.as_secs_f64());
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let previous = self.longest_pause_us.fetch_max(micros, Ordering::Relaxed);
        if micros > previous {
            self.longest_pause_seconds.set(elapsed.as_secs_f64());
        }
    }

    pub(crate) fn map_refreshed(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.map_refreshes
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Requests being retried right now.
    pub fn retrying(&self) -> i64 {
        self.waiting.get()
    }

    pub fn retries_total(&self) -> u64 {
        self.retries.get()
    }

    pub fn failover_pauses_total(&self) -> u64 {
        self.failover_pauses.get()
    }

    pub fn longest_pause(&self) -> Duration {
        Duration::from_micros(self.longest_pause_us.load(Ordering::Relaxed))
    }
}

/// NBD connection counts, updated by the server.
#[derive(Debug, Clone, Default)]
pub struct NbdMetrics {
    accepted: Counter,
    open: Gauge,
    refused_at_cap: Counter,
    handshake_timed_out: Counter,
    handshake_evicted: Counter,
    tls_handshake_failed: Counter,
}

impl NbdMetrics {
    pub(crate) fn refused_at_cap(&self) {
        self.refused_at_cap.inc();
    }

    pub(crate) fn handshake_timed_out(&self) {
        self.handshake_timed_out.inc();
    }

    pub(crate) fn handshake_evicted(&self) {
        self.handshake_evicted.inc();
    }

    pub(crate) fn tls_handshake_failed(&self) {
        self.tls_handshake_failed.inc();
    }

    /// Connections whose TLS handshake (after `NBD_OPT_STARTTLS`) failed.
    pub fn tls_handshakes_failed(&self) -> u64 {
        self.tls_handshake_failed.get()
    }

    /// Connections closed in their handshake: (timed out, evicted by newer ones).
    pub fn handshakes_dropped(&self) -> (u64, u64) {
        (self.handshake_timed_out.get(), self.handshake_evicted.get())
    }

    pub(crate) fn accepted(&self) {
        self.accepted.inc();
        self.open.inc();
    }

    pub(crate) fn closed(&self) {
        self.open.dec();
    }

    pub fn open(&self) -> i64 {
        self.open.get()
    }
}

const OPS: [BackendOp; 5] = [
    BackendOp::Read,
    BackendOp::Write,
    BackendOp::Flush,
    BackendOp::Trim,
    BackendOp::WriteZeroes,
];

fn op_index(op: BackendOp) -> usize {
    match op {
        BackendOp::Read => 0,
        BackendOp::Write => 1,
        BackendOp::Flush => 2,
        BackendOp::Trim => 3,
        BackendOp::WriteZeroes => 4,
    }
}

/// One operation's series, resolved once (no label lookup per request;
/// every series shows from the start, at zero).
#[derive(Debug, Clone)]
struct OpSeries {
    ok: Counter,
    error: Counter,
    bytes: Counter,
    latency: Histogram,
}

/// Every metric of one attach agent.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    series: Arc<[OpSeries; 5]>,
    in_flight: Gauge,
    qos_wait_seconds: Histogram,
    qos_throttled: Counter,
    qos_queued: Gauge,
    qos_limit: Family<DimensionLabels, FloatGauge>,
    qos_limit_changes: Counter,
    qos_tokens: Family<BucketLabels, FloatGauge>,
    pub nbd: NbdMetrics,
    pub client: ClientMetrics,
}

impl AgentMetrics {
    /// Register everything in `registry` (names in the README's table).
    pub fn new(registry: &mut Registry) -> AgentMetrics {
        let requests = Family::<OutcomeLabels, Counter>::default();
        let bytes = Family::<OpLabels, Counter>::default();
        let latency: HistogramFamily =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        // One `let` per lookup: a family's guard lives to the end of its
        // statement, and creating the next series takes the write lock.
        let series = OPS.map(|op| {
            let op = op_name(op);
            let ok = requests
                .get_or_create(&OutcomeLabels { op, outcome: "ok" })
                .clone();
            let error = requests
                .get_or_create(&OutcomeLabels {
                    op,
                    outcome: "error",
                })
                .clone();
            let bytes = bytes.get_or_create(&OpLabels { op }).clone();
            let latency = latency.get_or_create(&OpLabels { op }).clone();
            OpSeries {
                ok,
                error,
                bytes,
                latency,
            }
        });
        let metrics = AgentMetrics {
            series: Arc::new(series),
            in_flight: Gauge::default(),
            qos_wait_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            qos_throttled: Counter::default(),
            qos_queued: Gauge::default(),
            qos_limit: Family::default(),
            qos_limit_changes: Counter::default(),
            qos_tokens: Family::default(),
            nbd: NbdMetrics::default(),
            client: ClientMetrics::unregistered(),
        };
        registry.register(
            "rackblock_agent_requests",
            "Requests served to hosts, by operation and outcome (ok, error)",
            requests,
        );
        registry.register(
            "rackblock_agent_bytes",
            "Bytes read or written by hosts, by operation",
            bytes,
        );
        registry.register(
            "rackblock_agent_request_seconds",
            "Latency of host requests, by operation (QoS waits and failover pauses included)",
            latency,
        );
        registry.register(
            "rackblock_agent_requests_in_flight",
            "Host requests being served now (queue depth)",
            metrics.in_flight.clone(),
        );
        registry.register(
            "rackblock_agent_qos_wait_seconds",
            "Time each request of a limited volume waited for QoS tokens (0 when it did not wait)",
            metrics.qos_wait_seconds.clone(),
        );
        registry.register(
            "rackblock_agent_qos_throttled",
            "Requests that waited for QoS tokens",
            metrics.qos_throttled.clone(),
        );
        registry.register(
            "rackblock_agent_qos_queued",
            "Requests waiting for QoS tokens now",
            metrics.qos_queued.clone(),
        );
        registry.register(
            "rackblock_agent_qos_limit",
            "QoS limit in force per dimension (I/Os or bytes per second; 0: unlimited), \
             the stricter of the volume record and the attach flags",
            metrics.qos_limit.clone(),
        );
        registry.register(
            "rackblock_agent_qos_limit_changes",
            "Times the QoS limits in force were set (start and live changes)",
            metrics.qos_limit_changes.clone(),
        );
        registry.register(
            "rackblock_agent_qos_tokens",
            "Tokens in each QoS bucket at the scrape (negative: reserved ahead by waiting requests)",
            metrics.qos_tokens.clone(),
        );
        for dimension in QOS_DIMENSIONS {
            metrics
                .qos_limit
                .get_or_create(&DimensionLabels { dimension })
                .set(0.0);
        }
        registry.register(
            "rackblock_agent_nbd_connections_accepted",
            "NBD connections accepted",
            metrics.nbd.accepted.clone(),
        );
        registry.register(
            "rackblock_agent_nbd_connections_open",
            "NBD connections open now",
            metrics.nbd.open.clone(),
        );
        registry.register(
            "rackblock_agent_nbd_connections_refused",
            "NBD connections closed on accept: max_connections reached",
            metrics.nbd.refused_at_cap.clone(),
        );
        registry.register(
            "rackblock_agent_nbd_handshakes_timed_out",
            "NBD connections closed for not finishing the handshake in time",
            metrics.nbd.handshake_timed_out.clone(),
        );
        registry.register(
            "rackblock_agent_nbd_handshakes_evicted",
            "NBD connections closed in their handshake to make room for a newer one",
            metrics.nbd.handshake_evicted.clone(),
        );
        registry.register(
            "rackblock_agent_nbd_tls_handshakes_failed",
            "NBD connections closed because their TLS handshake (after NBD_OPT_STARTTLS) failed",
            metrics.nbd.tls_handshake_failed.clone(),
        );
        metrics.client.register(registry);
        metrics
    }

    /// The limits in force changed (or were set at start).
    pub(crate) fn qos_limits_changed(&self, limits: &crate::qos::QosLimits) {
        self.qos_limit_changes.inc();
        let rates = [
            limits.iops,
            limits.read_iops,
            limits.write_iops,
            limits.bps,
            limits.read_bps,
            limits.write_bps,
        ];
        for (dimension, limit) in QOS_DIMENSIONS.into_iter().zip(rates) {
            self.qos_limit
                .get_or_create(&DimensionLabels { dimension })
                .set(limit.map_or(0.0, |l| l.rate));
        }
    }

    /// Publish the buckets' tokens (the admin port does, before a scrape):
    /// a bucket not listed has no limit and shows nothing.
    pub fn publish_qos_tokens(&self, tokens: &[crate::qos::BucketTokens]) {
        self.qos_tokens.clear();
        for bucket in tokens {
            self.qos_tokens
                .get_or_create(&BucketLabels {
                    dimension: bucket.dimension,
                    bucket: bucket.bucket,
                })
                .set(bucket.tokens);
        }
    }

    /// A request waits for tokens until the guard drops.
    pub(crate) fn qos_queued(&self) -> QueuedGuard {
        self.qos_queued.inc();
        QueuedGuard(self.qos_queued.clone())
    }

    pub(crate) fn qos_waited(&self, wait: Duration) {
        self.qos_wait_seconds.observe(wait.as_secs_f64());
        if !wait.is_zero() {
            self.qos_throttled.inc();
        }
    }

    pub fn qos_throttled_total(&self) -> u64 {
        self.qos_throttled.get()
    }

    pub fn requests_total(&self, op: BackendOp, ok: bool) -> u64 {
        let series = &self.series[op_index(op)];
        if ok {
            series.ok.get()
        } else {
            series.error.get()
        }
    }

    fn record(&self, op: BackendOp, bytes: u64, started: Instant, ok: bool) {
        let series = &self.series[op_index(op)];
        if ok {
            series.ok.inc();
            if bytes > 0 {
                series.bytes.inc_by(bytes);
            }
        } else {
            series.error.inc();
        }
        series.latency.observe(started.elapsed().as_secs_f64());
    }
}

/// The dimensions of [`crate::qos::QosLimits`], as metric labels.
const QOS_DIMENSIONS: [&str; 6] = [
    "iops",
    "read_iops",
    "write_iops",
    "bps",
    "read_bps",
    "write_bps",
];

/// Counts a request waiting for QoS tokens until dropped.
#[derive(Debug)]
pub(crate) struct QueuedGuard(Gauge);

impl Drop for QueuedGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts a request in flight until dropped (a dropped future too).
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a Gauge) -> InFlight<'a> {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An [`NbdBackend`] that records every request in [`AgentMetrics`].
#[derive(Debug)]
pub struct MeteredBackend<B> {
    inner: B,
    metrics: AgentMetrics,
}

impl<B: NbdBackend> MeteredBackend<B> {
    pub fn new(inner: B, metrics: AgentMetrics) -> MeteredBackend<B> {
        MeteredBackend { inner, metrics }
    }

    async fn timed<T>(
        &self,
        op: BackendOp,
        bytes: u64,
        call: BoxFuture<'_, Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let _in_flight = InFlight::new(&self.metrics.in_flight);
        let started = Instant::now();
        let result = call.await;
        self.metrics.record(op, bytes, started, result.is_ok());
        result
    }
}

impl<B: NbdBackend> NbdBackend for MeteredBackend<B> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn description(&self) -> String {
        self.inner.description()
    }

    fn read(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        Box::pin(self.timed(BackendOp::Read, len, self.inner.read(offset_bytes, len)))
    }

    fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        let len = data.len() as u64;
        Box::pin(self.timed(
            BackendOp::Write,
            len,
            self.inner.write(offset_bytes, data, fua),
        ))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(self.timed(BackendOp::Flush, 0, self.inner.flush()))
    }

    fn trim(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(self.timed(BackendOp::Trim, len, self.inner.trim(offset_bytes, len)))
    }

    fn write_zeroes(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(self.timed(
            BackendOp::WriteZeroes,
            len,
            self.inner.write_zeroes(offset_bytes, len),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::nbd::{MemoryBackend, MemoryFault, NbdErrno};

    #[tokio::test]
    async fn metered_backend_counts_ops_outcomes_and_bytes() {
        let mut registry = Registry::default();
        let metrics = AgentMetrics::new(&mut registry);
        let memory = MemoryBackend::new(1 << 20);
        memory.inject_fault(MemoryFault {
            op: BackendOp::Read,
            offset_bytes: 8192,
            len: 512,
            errno: NbdErrno::Io,
        });
        let backend = MeteredBackend::new(memory, metrics.clone());
        backend
            .write(0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        backend.read(0, 4096).await.unwrap();
        backend.read(8192, 4096).await.unwrap_err();
        backend.flush().await.unwrap();
        backend.trim(0, 4096).await.unwrap();
        assert_eq!(metrics.requests_total(BackendOp::Write, true), 1);
        assert_eq!(metrics.requests_total(BackendOp::Read, true), 1);
        assert_eq!(metrics.requests_total(BackendOp::Read, false), 1);
        assert_eq!(metrics.requests_total(BackendOp::Flush, true), 1);
        assert_eq!(metrics.in_flight.get(), 0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"rackblock_agent_requests_total{op="read",outcome="error"} 1"#));
        assert!(text.contains(r#"rackblock_agent_bytes_total{op="write"} 4096"#));
        assert!(text.contains(r#"rackblock_agent_request_seconds_count{op="trim"} 1"#));
        assert!(text.contains("rackblock_agent_failover_pause_longest_seconds"));
        // Every operation's series exists from the start.
        assert!(
            text.contains(r#"rackblock_agent_requests_total{op="write_zeroes",outcome="ok"} 0"#)
        );
    }

    #[test]
    fn the_longest_pause_is_kept() {
        let metrics = ClientMetrics::unregistered();
        for ms in [30, 500, 20] {
            metrics.retrying_started();
            metrics.pause_ended(Duration::from_millis(ms));
        }
        assert_eq!(metrics.longest_pause(), Duration::from_millis(500));
        assert_eq!(metrics.failover_pauses_total(), 3);
        assert_eq!(metrics.retrying(), 0);
        assert!((metrics.longest_pause_seconds.get() - 0.5).abs() < 1e-9);
    }
}
