//! The agent's Prometheus metrics.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Counters and histograms the agent updates; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_seconds: Histogram,
    pub domains: Gauge,
    pub lease_renewals: Family<ResultLabel, Counter>,
    /// How many times the pool's heartbeat timings are stretched because the API
    /// server answered renewals slowly (1: not at all).
    pub heartbeat_stretch: Gauge,
    /// One bulk collection of every domain's and the host's statistics.
    pub usage_collect_seconds: Histogram,
    /// The last collection, exported at scrape time.
    pub usage: crate::usage::exporter::UsageMetrics,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            reconciles: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            domains: Gauge::default(),
            lease_renewals: Family::default(),
            heartbeat_stretch: Gauge::default(),
            usage_collect_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            usage: Default::default(),
        };
        registry.register(
            "covi_agent_reconciles",
            "Server reconciles by result (ok or an error kind)",
            m.reconciles.clone(),
        );
        registry.register(
            "covi_agent_reconcile_duration_seconds",
            "Time to converge one server",
            m.reconcile_seconds.clone(),
        );
        registry.register("covi_agent_domains", "covi domains on this host", m.domains.clone());
        registry.register("covi_agent_lease_renewals", "Host lease renewals by result", m.lease_renewals.clone());
        m.heartbeat_stretch.set(1);
        registry.register(
            "covi_agent_heartbeat_stretch",
            "How many times the heartbeat timings are stretched because the API server answers renewals slowly",
            m.heartbeat_stretch.clone(),
        );
        registry.register(
            "covi_agent_usage_collect_duration_seconds",
            "Time of one bulk collection of every domain's and the host's statistics",
            m.usage_collect_seconds.clone(),
        );
        registry.register_collector(Box::new(m.usage.clone()));
        m
    }

    pub fn observe_reconcile(&self, took: Duration, error: Option<&Error>) {
        let result = error.map(Error::label).unwrap_or("ok").to_string();
        self.reconciles.get_or_create(&ResultLabel { result }).inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
    }
}
