//! The operator's control loop: watch pools, hosts and servers; whenever anything
//! changes (or at every resync), run one pass that adds finalizers, releases servers
//! that can go, schedules pending servers pool by pool, and keeps Host and HostPool
//! status current. Only the leader runs it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use covi_api::condition::{ConditionStatus, find_condition, set_condition};
use covi_api::virtual_server::VirtualServerPhase;
use covi_api::{Host, HostPool, VirtualServer};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::scheduler::{Assumed, Decision, bound_host, host_facts, in_pool, pass, rules};

/// Field manager of everything the operator writes.
pub const MANAGER: &str = "covi-operator";
/// The finalizer that keeps a server until its domain and disks are gone.
pub const FINALIZER: &str = "covi.io/domain";

pub async fn client(config: &Config) -> Result<Client> {
    covi_daemon::kube_client(config.kubeconfig.as_deref()).await.map_err(Error::Config)
}

/// Watches `api` into a store and pokes `changed` on every event.
fn watch<K>(api: Api<K>, changed: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .for_each(move |_| {
            changed.notify_one();
            futures::future::ready(())
        });
    tokio::spawn(stream);
    store
}

/// The leader's state between passes.
pub struct Scheduler {
    client: Client,
    pools: Store<HostPool>,
    hosts: Store<Host>,
    servers: Store<VirtualServer>,
    recorder: Recorder,
    metrics: Metrics,
    /// Bindings written but perhaps not yet in the server store, by server UID.
    assumed: HashMap<String, Assumed>,
}

pub async fn run_leader(client: Client, config: &Config, metrics: Metrics) -> Result<()> {
    let changed = Arc::new(Notify::new());
    let pools = watch(Api::<HostPool>::all(client.clone()), changed.clone());
    let hosts = watch(Api::<Host>::all(client.clone()), changed.clone());
    let servers = watch(Api::<VirtualServer>::all(client.clone()), changed.clone());
    for (what, ready) in [
        ("HostPools", pools.wait_until_ready().await.is_ok()),
        ("Hosts", hosts.wait_until_ready().await.is_ok()),
        ("VirtualServers", servers.wait_until_ready().await.is_ok()),
    ] {
        if !ready {
            return Err(Error::Config(format!("the watch of {what} ended before it synced")));
        }
    }
    let reporter = Reporter { controller: MANAGER.into(), instance: Some(config.identity.clone()) };
    let mut scheduler = Scheduler {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        pools,
        hosts,
        servers,
        metrics,
        assumed: HashMap::new(),
    };
    tracing::info!("leading: scheduling servers");
    loop {
        let started = Instant::now();
        let result = scheduler.pass().await;
        scheduler.metrics.observe_pass(started.elapsed(), result.as_ref().err());
        if let Err(e) = result {
            tracing::warn!(error = %e, "scheduling pass failed; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(config.resync) => {}
        }
        // Let a burst of watch events land, so 100 new servers bind in one pass.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Scheduler {
    async fn pass(&mut self) -> Result<()> {
        let servers = self.servers.state();
        let hosts = self.hosts.state();
        let pools = self.pools.state();
        self.forget_seen_bindings(&servers);

        self.add_finalizers(&servers).await?;
        self.release_deleted(&servers, &hosts).await?;

        for pool in &pools {
            let members: Vec<_> = servers.iter().filter(|s| s.spec.host_pool == pool.name_any()).cloned().collect();
            let decisions = pass(pool, &hosts, &members, &self.assumed);
            self.apply(decisions).await;
        }
        let pool_names: BTreeSet<_> = pools.iter().map(|p| p.name_any()).collect();
        let orphans: Vec<_> = servers
            .iter()
            .filter(|s| !pool_names.contains(&s.spec.host_pool) && bound_host(s, &self.assumed).is_none())
            .map(|s| {
                let message = format!("HostPool {} does not exist", s.spec.host_pool);
                (s.clone(), Decision::Invalid { reason: "PoolNotFound", message })
            })
            .collect();
        self.apply(orphans).await;

        self.update_host_status(&pools, &hosts, &servers).await;
        self.update_pool_status(&pools, &hosts, &servers).await;
        self.metrics.count_phases(&servers, &hosts);
        Ok(())
    }

    fn forget_seen_bindings(&mut self, servers: &[Arc<VirtualServer>]) {
        let live: HashMap<String, bool> = servers
            .iter()
            .filter_map(|s| Some((s.uid()?, s.status.as_ref().and_then(|st| st.host.as_ref()).is_some())))
            .collect();
        self.assumed.retain(|uid, _| live.get(uid) == Some(&false));
    }

    async fn add_finalizers(&self, servers: &[Arc<VirtualServer>]) -> Result<()> {
        let missing = servers
            .iter()
            .filter(|s| s.meta().deletion_timestamp.is_none() && !s.finalizers().iter().any(|f| f == FINALIZER));
        let writes = missing.map(|s| async move {
            let mut finalizers = s.finalizers().to_vec();
            finalizers.push(FINALIZER.to_string());
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": s.resource_version()}});
            let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &s.namespace().unwrap_or_default());
            match api.patch(&s.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
                // A conflict means the object moved on; the next pass sees the new one.
                Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
                Err(e) => Err(Error::from(e)),
            }
        });
        futures::stream::iter(writes).buffer_unordered(16).collect::<Vec<_>>().await.into_iter().collect()
    }

    /// Servers being deleted that no agent will clean up: never bound, or bound to a
    /// Host that no longer exists.
    async fn release_deleted(&self, servers: &[Arc<VirtualServer>], hosts: &[Arc<Host>]) -> Result<()> {
        let host_names: BTreeSet<_> = hosts.iter().map(|h| h.name_any()).collect();
        for s in servers.iter().filter(|s| s.meta().deletion_timestamp.is_some()) {
            if !s.finalizers().iter().any(|f| f == FINALIZER) {
                continue;
            }
            let releasable = match bound_host(s, &self.assumed) {
                None => true,
                Some(host) => !host_names.contains(host),
            };
            if releasable {
                let rest: Vec<_> = s.finalizers().iter().filter(|f| *f != FINALIZER).collect();
                let patch = json!({"metadata": {"finalizers": rest, "resourceVersion": s.resource_version()}});
                let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &s.namespace().unwrap_or_default());
                match api.patch(&s.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) | Err(kube::Error::Api(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    async fn apply(&mut self, decisions: Vec<(Arc<VirtualServer>, Decision)>) {
        let writes = decisions.into_iter().map(|(server, decision)| {
            let this = &*self;
            async move {
                let result = this.write_decision(&server, &decision).await;
                (server, decision, result)
            }
        });
        let results: Vec<_> = futures::stream::iter(writes).buffer_unordered(32).collect().await;
        for (server, decision, result) in results {
            match result {
                Ok(()) => {
                    if let (Decision::Bind { host, address, .. }, Some(uid)) = (&decision, server.uid()) {
                        self.assumed.insert(uid, Assumed { host: host.clone(), address: *address });
                    }
                }
                Err(e) => {
                    tracing::warn!(server = %server.name_any(), error = %e, "writing a scheduling decision failed")
                }
            }
        }
    }

    async fn write_decision(&self, server: &VirtualServer, decision: &Decision) -> Result<()> {
        let status = server.status.clone().unwrap_or_default();
        let generation = server.meta().generation;
        let mut conditions = status.conditions.clone();
        let now = Timestamp::now();
        let (phase, scheduled, reason, message) = match decision {
            Decision::Bind { host, address, .. } => (
                VirtualServerPhase::Scheduled,
                ConditionStatus::True,
                "Bound",
                match address {
                    Some(a) => format!("bound to host {host} with address {a}"),
                    None => format!("bound to host {host}"),
                },
            ),
            Decision::Pending { reason, message } => {
                (VirtualServerPhase::Pending, ConditionStatus::False, *reason, message.clone())
            }
            Decision::Invalid { reason, message } => {
                (VirtualServerPhase::Failed, ConditionStatus::False, *reason, message.clone())
            }
        };
        let changed = set_condition(&mut conditions, "Scheduled", scheduled, reason, message.clone(), generation, now);
        let unchanged = !changed && status.phase == Some(phase) && status.observed_generation == generation;
        if unchanged && !matches!(decision, Decision::Bind { .. }) {
            return Ok(());
        }
        let scheduled: Vec<_> = conditions.into_iter().filter(|c| c.type_ == "Scheduled").collect();
        let mut body = json!({
            "observedGeneration": generation,
            "phase": phase,
            "conditions": scheduled,
        });
        if let Decision::Bind { host, address, cpus, memory } = decision {
            body["host"] = json!(host);
            body["cpus"] = json!(cpus);
            body["memory"] = json!(memory);
            if let Some(a) = address {
                body["address"] = json!(a.to_string());
            }
        }
        let patch = json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer", "status": body});
        let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &server.namespace().unwrap_or_default());
        api.patch_status(&server.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
        let (type_, event_reason) = match decision {
            Decision::Bind { .. } => (EventType::Normal, "Scheduled"),
            Decision::Pending { .. } => (EventType::Warning, "FailedScheduling"),
            Decision::Invalid { .. } => (EventType::Warning, reason),
        };
        let event = Event {
            type_,
            reason: event_reason.into(),
            note: Some(message),
            action: "Schedule".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &server.object_ref(&())).await {
            tracing::warn!(error = %e, "publishing an event failed");
        }
        Ok(())
    }

    async fn update_host_status(&self, pools: &[Arc<HostPool>], hosts: &[Arc<Host>], servers: &[Arc<VirtualServer>]) {
        for host in hosts {
            let pool = pools.iter().find(|p| in_pool(p, host));
            let name = host.name_any();
            let on_host: Vec<_> =
                servers.iter().filter(|s| bound_host(s, &self.assumed) == Some(name.as_str())).collect();
            let (cpu, memory) = match pool {
                Some(pool) => allocation(pool, std::slice::from_ref(host), &on_host),
                None => (None, None),
            };
            let status = host.status.clone().unwrap_or_default();
            let pool_name = pool.map(|p| p.name_any());
            if status.pool == pool_name
                && status.servers == on_host.len() as u32
                && status.cpu_allocation == cpu
                && status.memory_allocation == memory
            {
                continue;
            }
            let patch = json!({"apiVersion": "covi.io/v1alpha1", "kind": "Host", "status": {
                "pool": pool_name, "servers": on_host.len(), "cpuAllocation": cpu, "memoryAllocation": memory,
            }});
            let api: Api<Host> = Api::all(self.client.clone());
            if let Err(e) = api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await {
                tracing::warn!(host = %name, error = %e, "updating host status failed");
            }
        }
    }

    async fn update_pool_status(&self, pools: &[Arc<HostPool>], hosts: &[Arc<Host>], servers: &[Arc<VirtualServer>]) {
        for pool in pools {
            let members: Vec<_> = hosts.iter().filter(|h| in_pool(pool, h)).cloned().collect();
            let ready = members.iter().filter(|h| host_facts(h).ready).count() as u32;
            let names: BTreeSet<_> = members.iter().map(|h| h.name_any()).collect();
            let on_pool: Vec<_> = servers
                .iter()
                .filter(|s| {
                    s.spec.host_pool == pool.name_any()
                        && bound_host(s, &self.assumed).is_some_and(|h| names.contains(h))
                })
                .collect();
            let (cpu, memory) = allocation(pool, &members, &on_pool);
            let status = pool.status.clone().unwrap_or_default();
            let mut conditions = status.conditions.clone();
            let (ok, reason, message) = if ready > 0 {
                (ConditionStatus::True, "HostsReady", format!("{ready} of {} hosts are ready", members.len()))
            } else if members.is_empty() {
                (ConditionStatus::False, "NoHosts", "no Host matches the pool's nodeSelector".to_string())
            } else {
                (ConditionStatus::False, "NoReadyHost", format!("none of the pool's {} hosts is ready", members.len()))
            };
            let generation = pool.meta().generation;
            let changed = set_condition(&mut conditions, "Ready", ok, reason, message, generation, Timestamp::now());
            if !changed
                && status.observed_generation == generation
                && status.ready_hosts == ready
                && status.total_hosts == members.len() as u32
                && status.servers == on_pool.len() as u32
                && status.cpu_allocation == cpu
                && status.memory_allocation == memory
            {
                continue;
            }
            let patch = json!({"apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "status": {
                "observedGeneration": generation,
                "readyHosts": ready, "totalHosts": members.len(), "servers": on_pool.len(),
                "cpuAllocation": cpu, "memoryAllocation": memory,
                "conditions": conditions.iter().filter(|c| c.type_ == "Ready").collect::<Vec<_>>(),
            }});
            let api: Api<HostPool> = Api::all(self.client.clone());
            if let Err(e) =
                api.patch_status(&pool.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await
            {
                tracing::warn!(pool = %pool.name_any(), error = %e, "updating pool status failed");
            }
        }
    }
}

/// "allocated/schedulable" CPUs and memory over `hosts` for `servers`.
fn allocation(
    pool: &HostPool,
    hosts: &[Arc<Host>],
    servers: &[&Arc<VirtualServer>],
) -> (Option<String>, Option<String>) {
    let rules = rules(pool);
    let (mut cap_cpu, mut cap_mem) = (0u64, 0u64);
    for h in hosts {
        let cap = rules.schedulable(&host_facts(h));
        cap_cpu += u64::from(cap.cpus);
        cap_mem += cap.memory_mib;
    }
    let (mut cpu, mut mem) = (0u64, 0u64);
    for s in servers {
        if let Ok(size) = pool.size_of(&s.spec) {
            cpu += u64::from(size.cpus);
            mem += size.memory_mib;
        }
    }
    (
        Some(format!("{cpu}/{cap_cpu}")),
        Some(format!("{}/{}", covi_placement::format_mib(mem), covi_placement::format_mib(cap_mem))),
    )
}

/// Whether `server`'s Ready condition is True.
pub fn server_ready(server: &VirtualServer) -> bool {
    server.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).is_some_and(|c| c.status == "True")
}
