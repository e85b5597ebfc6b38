//! The operator's Prometheus metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use covi_api::{Host, VirtualServer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Error;
use crate::scheduler::host_ready;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub passes: Family<ResultLabel, Counter>,
    pub pass_seconds: Histogram,
    pub servers: Family<PhaseLabel, Gauge>,
    pub hosts: Family<StateLabel, Gauge>,
    pub leader: Gauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            passes: Family::default(),
            pass_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            servers: Family::default(),
            hosts: Family::default(),
            leader: Gauge::default(),
        };
        registry.register("covi_operator_reconciles", "Scheduling passes by result", m.passes.clone());
        registry.register(
            "covi_operator_reconcile_duration_seconds",
            "Time of one scheduling pass",
            m.pass_seconds.clone(),
        );
        registry.register("covi_servers", "VirtualServers by phase", m.servers.clone());
        registry.register("covi_hosts", "Hosts by state", m.hosts.clone());
        registry.register("covi_operator_leader", "1 while this replica leads", m.leader.clone());
        m
    }

    pub fn observe_pass(&self, took: Duration, error: Option<&Error>) {
        let result = error.map(Error::label).unwrap_or("ok").to_string();
        self.passes.get_or_create(&ResultLabel { result }).inc();
        self.pass_seconds.observe(took.as_secs_f64());
    }

    pub fn count_phases(&self, servers: &[Arc<VirtualServer>], hosts: &[Arc<Host>]) {
        let mut phases: BTreeMap<String, i64> = BTreeMap::new();
        for phase in
            ["Pending", "Scheduled", "Provisioning", "Running", "Stopped", "Migrating", "Failed", "Terminating"]
        {
            phases.insert(phase.into(), 0);
        }
        for s in servers {
            let phase =
                s.status.as_ref().and_then(|st| st.phase).map(|p| format!("{p:?}")).unwrap_or_else(|| "Pending".into());
            *phases.entry(phase).or_default() += 1;
        }
        for (phase, n) in phases {
            self.servers.get_or_create(&PhaseLabel { phase }).set(n);
        }
        let ready = hosts.iter().filter(|h| host_ready(h)).count() as i64;
        self.hosts.get_or_create(&StateLabel { state: "Ready".into() }).set(ready);
        self.hosts.get_or_create(&StateLabel { state: "NotReady".into() }).set(hosts.len() as i64 - ready);
    }
}
