//! Prometheus metrics of one sled controller.
//!
//! One [`Metrics`] per process, shared (`Arc`) by the service, the device
//! stores, the scrubber and the listeners; the admin endpoint encodes its
//! [`Registry`] in the OpenMetrics text format. Label sets are small and
//! bounded: `op` and `result` come from fixed lists, `device` is the device
//! index within the sled, `network` is `a` or `b`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpOnlyLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: u16,
}

/// Which internal network.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Network {
    A,
    B,
}

impl Network {
    pub fn name(self) -> &'static str {
        match self {
            Network::A => "a",
            Network::B => "b",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NetworkLabels {
    /// `a` or `b`.
    pub network: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 us .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every metric of the sled controller.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub operations: Family<OpLabels, Counter>,
    pub operation_seconds: HistogramFamily<OpOnlyLabels>,
    pub appended_bytes: Counter,
    pub read_bytes: Counter,
    /// Reads done again because a rewrite or free of the column overlapped
    /// them (they hold no column lock across device I/O).
    pub read_retries: Counter,
    pub checksum_errors: Counter,
    pub device_up: Family<DeviceLabels, Gauge>,
    pub free_columns: Family<DeviceLabels, Gauge>,
    pub listener_up: Family<NetworkLabels, Gauge>,
    pub requests_by_network: Family<NetworkLabels, Counter>,
    pub scrub_bad_blocks: Counter,
    /// Bad-block list entries dropped at its bound (oldest first).
    pub scrub_bad_blocks_dropped: Counter,
    pub scrub_bytes_verified: Counter,
    pub scrub_passes: Counter,
    /// Connection-level counters of the protocol servers (both networks).
    pub server: proto::server::ServerMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let server = proto::server::ServerMetrics::new(&mut registry);
        let operations = Family::<OpLabels, Counter>::default();
        registry.register(
            "rackblock_sled_operations",
            "Sled requests by operation and result",
            operations.clone(),
        );
        let operation_seconds: HistogramFamily<OpOnlyLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "rackblock_sled_operation_seconds",
            "Sled request latency in seconds",
            operation_seconds.clone(),
        );
        let appended_bytes = Counter::default();
        registry.register(
            "rackblock_sled_appended_bytes",
            "Bytes appended to columns",
            appended_bytes.clone(),
        );
        let read_bytes = Counter::default();
        registry.register(
            "rackblock_sled_read_bytes",
            "Bytes read from columns",
            read_bytes.clone(),
        );
        let read_retries = Counter::default();
        registry.register(
            "rackblock_sled_read_retries",
            "Reads done again because a rewrite or free of the column overlapped them",
            read_retries.clone(),
        );
        let checksum_errors = Counter::default();
        registry.register(
            "rackblock_sled_checksum_errors",
            "Blocks that failed CRC-32C verification on read",
            checksum_errors.clone(),
        );
        let device_up = Family::<DeviceLabels, Gauge>::default();
        registry.register(
            "rackblock_sled_device_up",
            "1 if the device is healthy, 0 if failed",
            device_up.clone(),
        );
        let free_columns = Family::<DeviceLabels, Gauge>::default();
        registry.register(
            "rackblock_sled_free_columns",
            "Free columns per device",
            free_columns.clone(),
        );
        let listener_up = Family::<NetworkLabels, Gauge>::default();
        registry.register(
            "rackblock_sled_listener_up",
            "1 if the listener on the network is bound",
            listener_up.clone(),
        );
        let requests_by_network = Family::<NetworkLabels, Counter>::default();
        registry.register(
            "rackblock_sled_network_requests",
            "Requests received per network",
            requests_by_network.clone(),
        );
        let scrub_bad_blocks = Counter::default();
        registry.register(
            "rackblock_sled_scrub_bad_blocks",
            "Bad blocks found by the scrubber",
            scrub_bad_blocks.clone(),
        );
        let scrub_bad_blocks_dropped = Counter::default();
        registry.register(
            "rackblock_sled_scrub_bad_blocks_dropped",
            "Bad-block list entries dropped, oldest first, when the list was full",
            scrub_bad_blocks_dropped.clone(),
        );
        let scrub_bytes_verified = Counter::default();
        registry.register(
            "rackblock_sled_scrub_verified_bytes",
            "Bytes verified by the scrubber",
            scrub_bytes_verified.clone(),
        );
        let scrub_passes = Counter::default();
        registry.register(
            "rackblock_sled_scrub_passes",
            "Completed scrub passes",
            scrub_passes.clone(),
        );
        Self {
            registry,
            operations,
            operation_seconds,
            appended_bytes,
            read_bytes,
            read_retries,
            checksum_errors,
            device_up,
            free_columns,
            listener_up,
            requests_by_network,
            scrub_bad_blocks,
            scrub_bad_blocks_dropped,
            scrub_bytes_verified,
            scrub_passes,
            server,
        }
    }

    pub fn record_op(&self, op: &'static str, result: &'static str, elapsed: Duration) {
        self.operations
            .get_or_create(&OpLabels { op, result })
            .inc();
        self.operation_seconds
            .get_or_create(&OpOnlyLabels { op })
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_device_up(&self, device: u16, up: bool) {
        self.device_up
            .get_or_create(&DeviceLabels { device })
            .set(i64::from(up));
    }

    pub fn set_free_columns(&self, device: u16, free: u32) {
        self.free_columns
            .get_or_create(&DeviceLabels { device })
            .set(i64::from(free));
    }

    pub fn set_listener_up(&self, network: Network, up: bool) {
        self.listener_up
            .get_or_create(&NetworkLabels {
                network: network.name(),
            })
            .set(i64::from(up));
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_as_documented() {
        let m = Metrics::new();
        m.scrub_bad_blocks.inc();
        m.set_listener_up(Network::B, true);
        m.record_op("read", "ok", Duration::from_millis(1));
        let text = m.encode().unwrap();
        assert!(
            text.contains("rackblock_sled_scrub_bad_blocks_total 1"),
            "{text}"
        );
        assert!(
            text.contains("rackblock_sled_listener_up{network=\"b\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rackblock_sled_operations_total{op=\"read\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rackblock_sled_checksum_errors_total 0"),
            "{text}"
        );
    }
}
