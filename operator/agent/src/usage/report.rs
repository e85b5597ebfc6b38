//! The usage loop: collect every sample interval, keep the metrics snapshot current,
//! and at the end of each summary interval write every server's and the Host's
//! `status.usage` (one write each per interval).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use covi_api::contract::manager;
use covi_api::usage::{Stat, Usage};
use covi_api::{Host, VirtualServer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use prometheus_client::metrics::histogram::Histogram;
use serde_json::json;

use super::exporter::{ServerLabels, Snapshot, UsageMetrics};
use super::{Completed, Tracker};
use crate::libvirt::Libvirt;

pub struct UsageLoop {
    pub client: Client,
    pub node: String,
    pub hypervisor: Libvirt,
    pub servers: Store<VirtualServer>,
    pub host_cpus: u32,
    pub metrics: UsageMetrics,
    pub collect_seconds: Histogram,
    pub sample_every: Duration,
    pub interval: Duration,
    /// Where the servers the usage writes return go into the cache.
    pub seen: crate::assigned::Seen,
}

impl UsageLoop {
    /// A fixed delay per host, up to a tenth of the interval (at most 5 minutes), before
    /// it writes an interval's usage: every host's interval ends at the same moment, and
    /// a fleet writing all at once would be a burst of one write per server.
    fn spread(&self) -> Duration {
        let h =
            self.node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let window = (self.interval / 10).min(Duration::from_secs(300)).as_millis() as u64;
        Duration::from_millis(h % window.max(1))
    }

    pub async fn run(self: Arc<Self>) {
        let mut tracker = Tracker::new(self.interval.as_secs());
        let mut tick = tokio::time::interval(self.sample_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
            let started = Instant::now();
            let collection = match self.hypervisor.run(move |c| super::collect::collect(c, at)).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "collecting usage failed");
                    continue;
                }
            };
            self.collect_seconds.observe(started.elapsed().as_secs_f64());
            let servers: HashMap<String, Arc<VirtualServer>> =
                self.servers.state().into_iter().filter_map(|s| Some((s.uid()?, s))).collect();
            let labelled = collection
                .domains
                .iter()
                .filter_map(|d| {
                    let s = servers.get(&d.uuid)?;
                    let labels = ServerLabels {
                        namespace: s.namespace().unwrap_or_default(),
                        name: s.name_any(),
                        pool: s.spec.host_pool.clone(),
                        host: self.node.clone(),
                    };
                    Some((labels, d.clone()))
                })
                .collect();
            self.metrics.set(Snapshot {
                host: self.node.clone(),
                servers: labelled,
                counters: collection.host,
                cpus: self.host_cpus,
            });
            if let Some(done) = tracker.observe(&collection) {
                let this = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(this.spread()).await;
                    this.write(&done).await;
                });
            }
        }
    }

    /// One write per measured server and one for the Host, in sequence (spreading an
    /// hour's writes of a full host over a few seconds rather than a burst).
    async fn write(&self, done: &Completed) {
        let sampled_at = Time(Timestamp::from_second(done.ended_at as i64).unwrap_or_else(|_| Timestamp::now()));
        let mut written = 0;
        // Read again now: the write comes a while after the interval ended.
        let now: HashMap<String, Arc<VirtualServer>> =
            self.servers.state().into_iter().filter_map(|s| Some((s.uid()?, s))).collect();
        for (uuid, (cpu, memory, samples)) in &done.domains {
            // Gone or moved away since: its new host reports it (one write per interval).
            let Some(server) = now.get(uuid) else { continue };
            if !server.bound_to(&self.node) {
                continue;
            }
            let previous = server.status.as_ref().and_then(|s| s.usage.clone());
            let usage = self.next(previous, done, (*cpu, *memory, *samples), &sampled_at);
            let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &server.namespace().unwrap_or_default());
            match apply_usage::<VirtualServer>(&api, &server.name_any(), usage).await {
                Ok(server) => {
                    written += 1;
                    let _ = self.seen.send(server);
                }
                Err(e) => tracing::warn!(server = %server.name_any(), error = %e, "writing usage failed"),
            }
        }
        if let Some(summary) = done.host {
            let api: Api<Host> = Api::all(self.client.clone());
            let previous = api.get_opt(&self.node).await.ok().flatten().and_then(|h| h.status.and_then(|s| s.usage));
            let usage = self.next(previous, done, summary, &sampled_at);
            if let Err(e) = apply_usage::<Host>(&api, &self.node, usage).await.map(drop) {
                tracing::warn!(error = %e, "writing the Host's usage failed");
            }
        }
        tracing::info!(servers = written, hour = done.hour, "wrote usage for the interval");
    }

    fn next(
        &self,
        previous: Option<Usage>,
        done: &Completed,
        (cpu, memory, samples): (Stat, Stat, u32),
        at: &Time,
    ) -> Usage {
        let mut usage = previous.unwrap_or_default();
        // A profile kept at another interval length (a test bed's) does not mix.
        if usage.interval_seconds != self.interval.as_secs() as u32 {
            usage.profile.clear();
        }
        usage.record_hour(done.hour, cpu.p95, memory.p95);
        Usage {
            sampled_at: Some(at.clone()),
            interval_seconds: self.interval.as_secs() as u32,
            host: Some(self.node.clone()),
            samples,
            cpu,
            memory,
            profile: usage.profile,
        }
    }
}

async fn apply_usage<K>(api: &Api<K>, name: &str, usage: Usage) -> kube::Result<K>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({
        "apiVersion": K::api_version(&()), "kind": K::kind(&()),
        "status": {"usage": usage},
    });
    api.patch_status(name, &PatchParams::apply(manager::AGENT_USAGE).force(), &Patch::Apply(&patch)).await
}
