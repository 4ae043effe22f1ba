//! Prometheus metrics of the zonal control plane (OpenMetrics text on
//! `GET /metrics`).
//!
//! * `rackblock_zonal_http_requests_total{route,method,status}`: `route` is
//!   the matched route template (`/v1/volumes/{name}`), never the raw path,
//!   so label sets stay bounded.
//! * `rackblock_zonal_unit_polls_total{unit,result}`: status polls, `result`
//!   `ok` or `unreachable`.
//! * `rackblock_zonal_volumes{state}`, `rackblock_zonal_units`,
//!   `rackblock_zonal_units_reachable`: gauges refreshed from the store at
//!   every scrape.
//! * `rackblock_zonal_tls_handshake_failures_total`: HTTPS connections
//!   closed because their TLS handshake failed or timed out (plain HTTP
//!   sent to the HTTPS port, untrusted clients, scanners).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    pub unit: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub polls: Family<PollLabels, Counter>,
    pub volumes: Family<StateLabels, Gauge>,
    pub units: Gauge,
    pub units_reachable: Gauge,
    pub tls_handshake_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("rackblock_zonal");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route template, method and status",
            requests.clone(),
        );
        let polls = Family::<PollLabels, Counter>::default();
        registry.register("unit_polls", "Unit status polls by result", polls.clone());
        let volumes = Family::<StateLabels, Gauge>::default();
        registry.register("volumes", "Volumes by state", volumes.clone());
        let units = Gauge::default();
        registry.register("units", "Configured units", units.clone());
        let units_reachable = Gauge::default();
        registry.register(
            "units_reachable",
            "Units whose last status poll was answered",
            units_reachable.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "HTTPS connections whose TLS handshake failed or timed out",
            tls_handshake_failures.clone(),
        );
        Metrics {
            registry,
            tls_handshake_failures,
            requests,
            polls,
            volumes,
            units,
            units_reachable,
        }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
