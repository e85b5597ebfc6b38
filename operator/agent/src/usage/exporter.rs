//! Prometheus metrics of the last collection: a collector that encodes the latest
//! snapshot at scrape time, so a domain that left the host leaves no stale series.
//! Counters are libvirt's own (cumulative since the domain started): they survive an
//! agent restart, and a restart or migration of the guest is a counter reset (or a new
//! `host` label) that Prometheus's `rate()` handles.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{DomainCounters, HostCounters};

/// A server's labels: bounded by the servers on the host.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub namespace: String,
    pub name: String,
    pub pool: String,
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

/// The latest collection, labelled.
#[derive(Default, Debug)]
pub struct Snapshot {
    pub host: String,
    pub servers: Vec<(ServerLabels, DomainCounters)>,
    pub counters: Option<HostCounters>,
    pub cpus: u32,
}

/// Shared between the collecting loop and the metrics endpoint.
#[derive(Clone, Default, Debug)]
pub struct UsageMetrics(pub Arc<Mutex<Snapshot>>);

impl UsageMetrics {
    pub fn set(&self, snapshot: Snapshot) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
    }
}

type Field = fn(&DomainCounters) -> Option<f64>;

/// Per-server series: name, help, type, value.
const SERVER_SERIES: &[(&str, &str, MetricType, Field)] = &[
    (
        "covi_server_cpu_seconds",
        "CPU time the server's domain used on its host (vCPUs and emulator), since the domain started",
        MetricType::Counter,
        |d| Some(d.cpu_time_ns as f64 / 1e9),
    ),
    ("covi_server_vcpus", "vCPUs online", MetricType::Gauge, |d| Some(f64::from(d.vcpus))),
    (
        "covi_server_memory_used_bytes",
        "Host memory the server uses (resident set; the balloon size where libvirt reports no RSS)",
        MetricType::Gauge,
        |d| d.memory_kib.map(|k| k as f64 * 1024.0),
    ),
    (
        "covi_server_memory_assigned_bytes",
        "Memory the guest has (the balloon's current size)",
        MetricType::Gauge,
        |d| d.memory_assigned_kib.map(|k| k as f64 * 1024.0),
    ),
    ("covi_server_disk_read_bytes", "Bytes read from the server's disks", MetricType::Counter, |d| {
        Some(d.block_read_bytes as f64)
    }),
    ("covi_server_disk_written_bytes", "Bytes written to the server's disks", MetricType::Counter, |d| {
        Some(d.block_write_bytes as f64)
    }),
    ("covi_server_network_received_bytes", "Bytes the server's interfaces received", MetricType::Counter, |d| {
        Some(d.net_rx_bytes as f64)
    }),
    ("covi_server_network_transmitted_bytes", "Bytes the server's interfaces sent", MetricType::Counter, |d| {
        Some(d.net_tx_bytes as f64)
    }),
];

impl Collector for UsageMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (name, help, kind, value) in SERVER_SERIES {
            let mut family = encoder.encode_descriptor(name, help, None, *kind)?;
            for (labels, d) in &snapshot.servers {
                let Some(v) = value(d) else { continue };
                let metric = family.encode_family(labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(v).encode(metric)?,
                    _ => ConstGauge::new(v).encode(metric)?,
                }
            }
        }
        let host = HostLabels { host: snapshot.host.clone() };
        if let Some(h) = snapshot.counters {
            let series: [(&str, &str, MetricType, f64); 3] = [
                (
                    "covi_host_cpu_busy_seconds",
                    "CPU time the host spent busy (user and kernel, all CPUs)",
                    MetricType::Counter,
                    h.cpu_busy_ns as f64 / 1e9,
                ),
                (
                    "covi_host_memory_used_bytes",
                    "Host memory in use (total less free, buffers and cache)",
                    MetricType::Gauge,
                    h.memory_used_kib as f64 * 1024.0,
                ),
                ("covi_host_memory_bytes", "Host memory in all", MetricType::Gauge, h.memory_total_kib as f64 * 1024.0),
            ];
            for (name, help, kind, v) in series {
                let mut family = encoder.encode_descriptor(name, help, None, kind)?;
                let metric = family.encode_family(&host)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(v).encode(metric)?,
                    _ => ConstGauge::new(v).encode(metric)?,
                }
            }
        }
        if snapshot.cpus > 0 {
            let mut family =
                encoder.encode_descriptor("covi_host_cpus", "Host CPUs (threads)", None, MetricType::Gauge)?;
            ConstGauge::new(i64::from(snapshot.cpus)).encode(family.encode_family(&host)?)?;
        }
        Ok(())
    }
}
