//! The operator's control loop: watch pools, hosts and servers; whenever anything
//! changes (or at every resync), run one pass that adds finalizers, releases servers
//! that can go, schedules pending servers pool by pool, and keeps Host and HostPool
//! status current. Only the leader runs it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use covi_api::condition::{ConditionStatus, find_condition, is_condition_true, set_condition};
use covi_api::contract::{condition_type, manager, status_patch};
use covi_api::virtual_server::FailoverRecord;
use covi_api::virtual_server::VirtualServerPhase;
use covi_api::vm_request::VmRequestPhase;
use covi_api::{Host, HostPool, VirtualServer, VmRequest};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
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
use crate::health::{Leases, Liveness, mass_failure};
use crate::metrics::Metrics;
use crate::scheduler::{Assumed, Decision, PoolView, bound_host, host_facts, in_pool, pass, rules};

pub use covi_api::contract::FINALIZER;

pub async fn client(config: &Config) -> Result<Client> {
    covi_daemon::kube_client(config.kubeconfig.as_deref()).await.map_err(Error::Client)
}

/// Watches `api` into a store and pokes `changed` on every event.
fn watch<K>(api: Api<K>, changed: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    // Managed fields are most of a stored object and the operator never reads them:
    // without them the cache of 20,000 servers is a fraction of the size.
    let events = watcher(api, watcher::Config::default()).modify(|o| o.managed_fields_mut().clear());
    let stream = reflector(writer, events).default_backoff().touched_objects().for_each(move |_| {
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
    /// Host Leases, in the operator's namespace.
    host_leases: Store<Lease>,
    requests: Store<VmRequest>,
    /// When this operator saw each host's Lease renew.
    leases: Leases,
    /// Servers created for requests ("namespace/name"), until a pass's snapshot shows
    /// them: the next pass must not POST them again, and quotas count them.
    created: std::sync::Mutex<HashMap<String, Created>>,
    /// Events published at once, in the background.
    event_slots: Arc<tokio::sync::Semaphore>,
    /// Webhook calls at once, in the background.
    webhook_slots: Arc<tokio::sync::Semaphore>,
    /// Host liveness as the last full pass saw it.
    acted_on: HashMap<String, Liveness>,
    /// Addresses held by more than one server, as last reported.
    duplicates: BTreeMap<(String, std::net::Ipv4Addr), Vec<String>>,
}

/// A server this operator created that the store may not show yet.
struct Created {
    at: Instant,
    pool: String,
    /// Servers, CPUs and MiB it adds to its namespace's quota.
    size: (u32, u64, u64),
}

/// How long a created server may take to show up in the store before it counts as
/// missing again (say, deleted before the watch saw it).
const CREATED_GRACE: Duration = Duration::from_secs(30);

pub async fn run_leader(client: Client, config: &Config, metrics: Metrics) -> Result<()> {
    let changed = Arc::new(Notify::new());
    let pools = watch(Api::<HostPool>::all(client.clone()), changed.clone());
    let hosts = watch(Api::<Host>::all(client.clone()), changed.clone());
    let servers = watch(Api::<VirtualServer>::all(client.clone()), changed.clone());
    // Renewals are not changes worth a pass; the one-second tick reads them.
    let host_leases = watch(Api::<Lease>::namespaced(client.clone(), &config.namespace), Arc::new(Notify::new()));
    let requests = watch(Api::<VmRequest>::all(client.clone()), changed.clone());
    for (what, ready) in [
        ("HostPools", pools.wait_until_ready().await.is_ok()),
        ("Hosts", hosts.wait_until_ready().await.is_ok()),
        ("VirtualServers", servers.wait_until_ready().await.is_ok()),
        ("Leases", host_leases.wait_until_ready().await.is_ok()),
        ("VmRequests", requests.wait_until_ready().await.is_ok()),
    ] {
        if !ready {
            return Err(Error::WatchEnded(what));
        }
    }
    let reporter = Reporter { controller: manager::OPERATOR.into(), instance: Some(config.identity.clone()) };
    let mut scheduler = Scheduler {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        pools,
        hosts,
        servers,
        metrics,
        assumed: HashMap::new(),
        host_leases,
        requests,
        leases: Leases::default(),
        created: Default::default(),
        event_slots: Arc::new(tokio::sync::Semaphore::new(16)),
        webhook_slots: Arc::new(tokio::sync::Semaphore::new(4)),
        acted_on: HashMap::new(),
        duplicates: Default::default(),
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
        // A full pass on every change, at least every resync, and as soon as a host's
        // liveness changes: Leases are read every second (liveness is judged by this
        // clock), but a pass over every server each second would cost a steady share
        // of a core at twenty thousand servers for nothing.
        let last_full = Instant::now();
        loop {
            let woken = tokio::select! {
                _ = changed.notified() => true,
                _ = tokio::time::sleep(config.resync.min(Duration::from_secs(1))) => false,
            };
            if woken || last_full.elapsed() >= config.resync || scheduler.liveness_changed() {
                break;
            }
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
        let liveness = self.liveness(&pools, &hosts);
        self.acted_on = liveness.clone();
        let unready: BTreeSet<String> =
            liveness.iter().filter(|(_, l)| **l != Liveness::Alive).map(|(h, _)| h.clone()).collect();
        let lost: BTreeSet<String> =
            liveness.iter().filter(|(_, l)| **l == Liveness::Lost).map(|(h, _)| h.clone()).collect();

        self.add_finalizers(&servers).await?;
        self.release_deleted(&servers, &hosts, &lost).await?;

        let mut unmovable = BTreeMap::new();
        for pool in &pools {
            let members: Vec<_> = servers.iter().filter(|s| s.spec.host_pool == pool.name_any()).cloned().collect();
            let failover = pool.spec.failover.enabled && !failover_paused(&pools, pool, &hosts, &lost);
            let hosts_here: Vec<_> = hosts.iter().filter(|h| in_pool(&pools, pool, h)).cloned().collect();
            let decisions = pass(&self.view(pool, hosts_here.clone(), members.clone(), &unready, &lost), failover);
            // Servers rebound in this pass (failover) wait for the next one: their
            // migration, if any, is judged on the status that records the failover.
            let rebound: BTreeSet<String> = decisions
                .iter()
                .filter(|(_, d)| matches!(d, Decision::Bind { .. }))
                .filter_map(|(s, _)| s.uid())
                .collect();
            self.apply(decisions).await;
            // Planned after the bindings just written count, as this pass's Assumed.
            let view = self.view(pool, hosts_here, members, &unready, &lost);
            let moves = crate::migration::plan_moves(&view, &rebound, Timestamp::now());
            unmovable.extend(moves.unmovable);
            self.migrate(pool, moves.actions).await;
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

        self.report_duplicate_addresses(&servers);
        self.mark_stalled(&servers).await;
        self.reconcile_requests(&pools, &servers).await;
        self.expire_servers(&pools, &servers).await;
        self.update_host_status(&pools, &hosts, &servers, &liveness, &unmovable).await;
        self.update_pool_status(&pools, &hosts, &servers, &unready, &lost).await;
        self.metrics.count_phases(&servers, &hosts);
        Ok(())
    }

    /// One pool as this pass sees it, with the bindings this leader has written.
    fn view<'a>(
        &'a self,
        pool: &'a HostPool,
        hosts: Vec<Arc<Host>>,
        servers: Vec<Arc<VirtualServer>>,
        unready: &'a BTreeSet<String>,
        lost: &'a BTreeSet<String>,
    ) -> PoolView<'a> {
        PoolView { pool, hosts, servers, assumed: &self.assumed, unready, lost }
    }

    /// Between full passes: reads the Leases and says whether any host's liveness
    /// differs from what the last pass acted on.
    fn liveness_changed(&mut self) -> bool {
        let (pools, hosts) = (self.pools.state(), self.hosts.state());
        self.liveness(&pools, &hosts) != self.acted_on
    }

    /// Every host's liveness by this operator's clock, with its pool's timings.
    fn liveness(&mut self, pools: &[Arc<HostPool>], hosts: &[Arc<Host>]) -> HashMap<String, Liveness> {
        let now = Instant::now();
        for lease in self.host_leases.state() {
            let renew = lease.spec.as_ref().and_then(|s| s.renew_time.as_ref()).map(|t| t.0.to_string());
            self.leases.observe(&lease.name_any(), renew, covi_api::host::lease_timings(&lease), now);
        }
        hosts
            .iter()
            .map(|h| {
                let failover = covi_api::host_pool::pool_for_labels(pools, h.labels())
                    .map(|p| p.spec.failover.clone())
                    .unwrap_or_default();
                (h.name_any(), self.leases.liveness(&h.name_any(), now, &failover))
            })
            .collect()
    }

    /// Drops assumed bindings the store now shows (or whose server is gone).
    fn forget_seen_bindings(&mut self, servers: &[Arc<VirtualServer>]) {
        let hosts: HashMap<String, Option<&str>> = servers
            .iter()
            .filter_map(|s| Some((s.uid()?, s.status.as_ref().and_then(|st| st.host.as_deref()))))
            .collect();
        self.assumed.retain(|uid, a| matches!(hosts.get(uid), Some(h) if *h != Some(a.host.as_str())));
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

    /// Servers being deleted that no agent will clean up (see
    /// [`crate::scheduler::release_reason`]), with an Event saying why.
    async fn release_deleted(
        &self,
        servers: &[Arc<VirtualServer>],
        hosts: &[Arc<Host>],
        lost: &BTreeSet<String>,
    ) -> Result<()> {
        let host_names: BTreeSet<_> = hosts.iter().map(|h| h.name_any()).collect();
        for s in servers.iter().filter(|s| s.meta().deletion_timestamp.is_some()) {
            if !s.finalizers().iter().any(|f| f == FINALIZER) {
                continue;
            }
            let Some(why) = crate::scheduler::release_reason(s, &self.assumed, &host_names, lost) else {
                continue;
            };
            let rest: Vec<_> = s.finalizers().iter().filter(|f| *f != FINALIZER).collect();
            let patch = json!({"metadata": {"finalizers": rest, "resourceVersion": s.resource_version()}});
            let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &s.namespace().unwrap_or_default());
            match api.patch(&s.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) if bound_host(s, &self.assumed).is_some() => {
                    self.publish(s.object_ref(&()), EventType::Normal, "Released", why, "Delete");
                }
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Keeps each server's Stalled condition in step with its phase (see
    /// [`crate::readiness::server_stalled`]).
    async fn mark_stalled(&self, servers: &[Arc<VirtualServer>]) {
        let writes = servers.iter().filter(|s| s.meta().deletion_timestamp.is_none()).filter_map(|s| {
            let status = s.status.as_ref()?;
            let desired = crate::readiness::server_stalled(status)?;
            if desired.matches(find_condition(&status.conditions, condition_type::STALLED)) {
                return None;
            }
            let mut conditions = status.conditions.clone();
            set_condition(
                &mut conditions,
                condition_type::STALLED,
                desired.status,
                &desired.reason,
                desired.message,
                s.meta().generation,
                Timestamp::now(),
            );
            let stalled: Vec<_> = conditions.into_iter().filter(|c| c.type_ == condition_type::STALLED).collect();
            let patch = status_patch::<VirtualServer>(json!({"conditions": stalled}));
            let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &s.namespace().unwrap_or_default());
            Some(async move {
                let params = PatchParams::apply(manager::OPERATOR_STALLED).force();
                if let Err(e) = api.patch_status(&s.name_any(), &params, &Patch::Apply(&patch)).await {
                    tracing::warn!(server = %s.name_any(), error = %e, "updating the Stalled condition failed");
                }
            })
        });
        futures::stream::iter(writes).buffer_unordered(16).collect::<Vec<_>>().await;
    }

    /// A Warning Event on every server sharing an address with another, once per new
    /// finding: bindings are conditional writes, so this takes two leaders at once or
    /// an address set by hand, and a person must decide which server keeps it.
    fn report_duplicate_addresses(&mut self, servers: &[Arc<VirtualServer>]) {
        // Addresses are a pool's: two pools may use one CIDR on separate networks.
        let mut by_pool: BTreeMap<&str, Vec<Arc<VirtualServer>>> = BTreeMap::new();
        for s in servers {
            by_pool.entry(s.spec.host_pool.as_str()).or_default().push(s.clone());
        }
        let mut found = BTreeMap::new();
        for (pool, members) in by_pool {
            for (address, holders) in crate::scheduler::duplicate_addresses(&members, &self.assumed) {
                found.insert((pool.to_string(), address), holders);
            }
        }
        for ((pool, address), holders) in &found {
            if self.duplicates.get(&(pool.clone(), *address)) == Some(holders) {
                continue;
            }
            tracing::error!(%pool, %address, ?holders, "one address is held by several servers");
            for server in servers {
                let key = format!("{}/{}", server.namespace().unwrap_or_default(), server.name_any());
                if holders.contains(&key) {
                    let message = format!("address {address} is also held by {}", holders.join(", "));
                    self.publish(server.object_ref(&()), EventType::Warning, "DuplicateAddress", message, "Schedule");
                }
            }
        }
        self.duplicates = found;
    }

    async fn apply(&mut self, decisions: Vec<(Arc<VirtualServer>, Decision)>) {
        let writes = decisions.into_iter().map(|(server, decision)| {
            let this = &*self;
            async move {
                let result = this.write_decision(&server, &decision).await;
                (server, decision, result)
            }
        });
        let results: Vec<_> = futures::stream::iter(writes).buffer_unordered(64).collect().await;
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

    /// Carries out the migration plan's actions (see [`crate::migration`]).
    async fn migrate(&mut self, pool: &HostPool, actions: Vec<(Arc<VirtualServer>, crate::migration::Action)>) {
        use crate::migration::Action;
        for (server, action) in actions {
            let result = match action {
                Action::Record(record) => self.write_migration(&server, Some(&record)).await,
                Action::Cancel => self.write_migration(&server, None).await,
                Action::HandOver { .. } | Action::Return { .. } => {
                    // Bind to `to`; a return also records why the move failed.
                    let (from, to, record) = match action {
                        Action::HandOver { source, target } => (source, target, None),
                        Action::Return { target, record } => (record.target.clone(), target, Some(record)),
                        _ => unreachable!("matched above"),
                    };
                    let status = server.status.clone().unwrap_or_default();
                    let size = pool.size_of(&server.spec).ok();
                    let decision = Decision::Bind {
                        host: to.clone(),
                        address: status.address.as_deref().and_then(|a| a.parse().ok()),
                        cpus: status.cpus.or(size.as_ref().map(|s| s.cpus)).unwrap_or(0),
                        memory: status
                            .memory
                            .clone()
                            .or(size.map(|s| covi_placement::format_mib(s.memory_mib)))
                            .unwrap_or_default(),
                        failover_from: None,
                        migrated_from: Some(from),
                    };
                    let bound = self.write_decision(&server, &decision).await;
                    if bound.is_ok()
                        && let (Decision::Bind { host, address, .. }, Some(uid)) = (&decision, server.uid())
                    {
                        self.assumed.insert(uid, Assumed { host: host.clone(), address: *address });
                    }
                    match (bound, record) {
                        (Ok(()), Some(record)) => self.write_migration(&server, Some(&record)).await,
                        (result, _) => result,
                    }
                }
            };
            if let Err(e) = result {
                tracing::warn!(server = %server.name_any(), error = %e, "writing a migration step failed");
            }
        }
    }

    /// Writes (or with None removes) a server's migration record, with an Event for
    /// each change of phase.
    async fn write_migration(
        &self,
        server: &VirtualServer,
        record: Option<&covi_api::virtual_server::MigrationStatus>,
    ) -> Result<()> {
        use covi_api::virtual_server::MigrationPhase;
        let body = match record {
            Some(m) => json!({"migration": m}),
            None => json!({}),
        };
        let patch = status_patch::<VirtualServer>(json!(body));
        let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &server.namespace().unwrap_or_default());
        api.patch_status(
            &server.name_any(),
            &PatchParams::apply(manager::OPERATOR_MIGRATION).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        let before = server.status.as_ref().and_then(|s| s.migration.as_ref());
        let event = match record {
            None => Some((EventType::Normal, "MigrationCancelled", "the move was called off before it started".into())),
            Some(m) if before.map(|b| (b.phase, &b.reason)) == Some((m.phase, &m.reason)) => None,
            Some(m) => {
                let what = format!("from {} to {}", m.source, m.target);
                Some(match m.phase {
                    MigrationPhase::Pending => (
                        EventType::Normal,
                        "MigrationPending",
                        format!("{what} waits: {}", m.reason.clone().unwrap_or_default()),
                    ),
                    MigrationPhase::Running => (
                        EventType::Normal,
                        "MigrationStarted",
                        format!("{what} ({})", m.mode.clone().unwrap_or_default()),
                    ),
                    MigrationPhase::Succeeded => (EventType::Normal, "Migrated", format!("moved {what}")),
                    MigrationPhase::Failed => (
                        EventType::Warning,
                        "MigrationFailed",
                        format!("{what}: {}", m.reason.clone().unwrap_or_default()),
                    ),
                })
            }
        };
        if let Some((type_, reason, note)) = event {
            self.publish(server.object_ref(&()), type_, reason, note, "Migrate");
        }
        Ok(())
    }

    /// Publishes an Event about `object` in the background: the write it follows is
    /// not held up by it (a burst of binds would wait for twice as many round trips).
    /// A failure to publish is logged, never fatal.
    fn publish(
        &self,
        object: k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: impl Into<String>,
        note: impl Into<String>,
        action: &str,
    ) {
        let event =
            Event { type_, reason: reason.into(), note: Some(note.into()), action: action.into(), secondary: None };
        let (recorder, slots) = (self.recorder.clone(), self.event_slots.clone());
        tokio::spawn(async move {
            let _slot = slots.acquire().await;
            if let Err(e) = recorder.publish(&event, &object).await {
                tracing::warn!(error = %e, "publishing an event failed");
            }
        });
    }

    /// POSTs to a pool's webhook in the background, a few at a time: a slow or
    /// unreachable URL never holds up a pass (and with it failover). A failure is a
    /// WebhookFailed Event on the request.
    fn notify(&self, url: String, body: serde_json::Value, object: k8s_openapi::api::core::v1::ObjectReference) {
        let (recorder, slots) = (self.recorder.clone(), self.webhook_slots.clone());
        tokio::spawn(async move {
            let _slot = slots.acquire().await;
            if let Err(e) = crate::webhook::post(&url, &body).await {
                let note = Some(format!("{url}: {e}"));
                let event = Event {
                    type_: EventType::Warning,
                    reason: "WebhookFailed".into(),
                    note,
                    action: "Notify".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &object).await {
                    tracing::warn!(error = %e, "publishing an event failed");
                }
            }
        });
    }

    async fn write_decision(&self, server: &VirtualServer, decision: &Decision) -> Result<()> {
        let status = server.status.clone().unwrap_or_default();
        let generation = server.meta().generation;
        let mut conditions = status.conditions.clone();
        let now = Timestamp::now();
        if let Decision::HostLost { host } = decision {
            return self.write_host_lost(server, host).await;
        }
        let (phase, scheduled, reason, message) = match decision {
            Decision::Bind { host, address, failover_from, migrated_from, .. } => (
                VirtualServerPhase::Scheduled,
                ConditionStatus::True,
                match (failover_from, migrated_from) {
                    (Some(_), _) => "FailedOver",
                    (None, Some(_)) => "Migrated",
                    (None, None) => "Bound",
                },
                match (failover_from, migrated_from, address) {
                    (Some(from), _, _) => format!("restarted on host {host} after host {from} was lost"),
                    (None, Some(from), _) => format!("moved from host {from} to host {host}"),
                    (None, None, Some(a)) => format!("bound to host {host} with address {a}"),
                    (None, None, None) => format!("bound to host {host}"),
                },
            ),
            Decision::Pending { reason, message } => {
                (VirtualServerPhase::Pending, ConditionStatus::False, *reason, message.clone())
            }
            Decision::Invalid { reason, message } => {
                (VirtualServerPhase::Failed, ConditionStatus::False, *reason, message.clone())
            }
            Decision::HostLost { .. } => unreachable!("handled above"),
        };
        let mut changed = set_condition(
            &mut conditions,
            condition_type::SCHEDULED,
            scheduled,
            reason,
            message.clone(),
            generation,
            now,
        );
        // Not Ready until an agent says so: without the condition, GitOps tools (kstatus)
        // would take a bound but not yet started server as done. The agent's forced
        // apply takes the condition over.
        let (ready_reason, ready_message) = match decision {
            Decision::Bind { host, .. } => ("Scheduled", format!("waiting for the agent on host {host}")),
            _ => (reason, message.clone()),
        };
        changed |= set_condition(
            &mut conditions,
            condition_type::READY,
            ConditionStatus::False,
            ready_reason,
            ready_message,
            generation,
            now,
        );
        let unchanged = !changed && status.phase == Some(phase) && status.observed_generation == generation;
        if unchanged && !matches!(decision, Decision::Bind { .. }) {
            return Ok(());
        }
        let scheduled: Vec<_> = conditions
            .into_iter()
            .filter(|c| c.type_ == condition_type::SCHEDULED || c.type_ == condition_type::READY)
            .collect();
        let mut body = json!({
            "observedGeneration": generation,
            "phase": phase,
            "conditions": scheduled,
        });
        match decision {
            Decision::Bind { host, address, cpus, memory, failover_from, .. } => {
                body["host"] = json!(host);
                body["cpus"] = json!(cpus);
                body["memory"] = json!(memory);
                if let Some(a) = address {
                    body["address"] = json!(a.to_string());
                }
                if let Some(from) = failover_from {
                    let mut failovers = status.failovers.clone();
                    failovers.push(FailoverRecord {
                        from: from.clone(),
                        to: host.clone(),
                        at: Time(now),
                        reason: "HostLost".into(),
                    });
                    body["failovers"] = json!(failovers);
                }
            }
            // A server waiting for room elsewhere keeps its address (and its record).
            _ => {
                if let Some(a) = &status.address {
                    body["address"] = json!(a);
                }
                if !status.failovers.is_empty() {
                    body["failovers"] = json!(status.failovers);
                }
            }
        }
        let mut patch = status_patch::<VirtualServer>(json!(body));
        // A binding (and the address it claims) is conditional on the version it was
        // decided on: a second leader, or a pass on a stale cache, gets a conflict
        // instead of binding the server twice.
        if matches!(decision, Decision::Bind { .. }) {
            patch["metadata"] = json!({"resourceVersion": server.resource_version()});
        }
        let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &server.namespace().unwrap_or_default());
        api.patch_status(&server.name_any(), &PatchParams::apply(manager::OPERATOR).force(), &Patch::Apply(&patch))
            .await?;
        let (type_, event_reason) = match decision {
            Decision::Bind { failover_from: Some(_), .. } => (EventType::Warning, "FailedOver"),
            Decision::Bind { migrated_from: Some(_), .. } => (EventType::Normal, "HandedOver"),
            Decision::Bind { .. } => (EventType::Normal, "Scheduled"),
            Decision::HostLost { .. } => (EventType::Warning, "HostLost"),
            Decision::Pending { .. } => (EventType::Warning, "FailedScheduling"),
            Decision::Invalid { .. } => (EventType::Warning, reason),
        };
        self.publish(server.object_ref(&()), type_, event_reason, message, "Schedule");
        Ok(())
    }

    /// A server that is not highly available stays on its lost host, Failed: it runs
    /// again if the host comes back.
    async fn write_host_lost(&self, server: &VirtualServer, host: &str) -> Result<()> {
        let status = server.status.clone().unwrap_or_default();
        let mut conditions = status.conditions.clone();
        let message = if server.spec.high_availability {
            format!(
                "host {host} was lost; the server is highly available, but pool {}'s storage is not shared (storage.shared: false), so elsewhere it would boot from a blank disk: it runs again if the host returns",
                server.spec.host_pool
            )
        } else {
            format!("host {host} was lost and the server is not highly available; it runs again if the host returns")
        };
        set_condition(
            &mut conditions,
            condition_type::READY,
            ConditionStatus::False,
            "HostLost",
            message.clone(),
            server.meta().generation,
            Timestamp::now(),
        );
        let ready: Vec<_> = conditions.into_iter().filter(|c| c.type_ == condition_type::READY).collect();
        let patch = status_patch::<VirtualServer>(json!({
            "phase": VirtualServerPhase::Failed, "conditions": ready,
        }));
        let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &server.namespace().unwrap_or_default());
        api.patch_status(
            &server.name_any(),
            &PatchParams::apply(manager::OPERATOR_FOR_AGENT).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        self.publish(server.object_ref(&()), EventType::Warning, "HostLost", message, "Failover");
        Ok(())
    }

    async fn update_host_status(
        &self,
        pools: &[Arc<HostPool>],
        hosts: &[Arc<Host>],
        servers: &[Arc<VirtualServer>],
        liveness: &HashMap<String, Liveness>,
        unmovable: &BTreeMap<String, Vec<covi_api::host::UnmovableServer>>,
    ) {
        // Computed once, not per host: a pass at thousands of hosts and servers.
        let mut by_host: HashMap<&str, Vec<&Arc<VirtualServer>>> = HashMap::new();
        let mut leaving: HashMap<&str, usize> = HashMap::new();
        for s in servers {
            let bound = bound_host(s, &self.assumed);
            if let Some(h) = bound {
                by_host.entry(h).or_default().push(s);
            }
            // Servers handed over but not yet running on their target still count.
            if let Some(m) = s.active_migration()
                && bound != Some(m.source.as_str())
            {
                *leaving.entry(m.source.as_str()).or_default() += 1;
            }
        }
        let (by_host, leaving) = (&by_host, &leaving);
        // One write per changed host, several at once: while a burst lands, most hosts
        // change in every pass, and one at a time would hold up the next pass.
        let writes = hosts.iter().map(|host| async move {
            let pool = covi_api::host_pool::pool_for_labels(pools, host.labels());
            let name = host.name_any();
            let on_host: &[&Arc<VirtualServer>] = by_host.get(name.as_str()).map(Vec::as_slice).unwrap_or_default();
            let (cpu, memory) = match pool {
                Some(pool) => allocation(pool, std::slice::from_ref(host), on_host),
                None => (None, None),
            };
            let status = host.status.clone().unwrap_or_default();
            let pool_name = pool.map(|p| p.name_any());
            let mut conditions = status.conditions.clone();
            let transition = liveness_conditions(
                &mut conditions,
                liveness.get(&name).copied().unwrap_or(Liveness::Unknown),
                &self.leases,
                &name,
            );
            let stuck = if host.spec.maintenance { unmovable.get(&name).cloned().unwrap_or_default() } else { vec![] };
            let was_evacuated = is_condition_true(&conditions, condition_type::EVACUATED);
            let in_flight = leaving.get(name.as_str()).copied().unwrap_or(0);
            let evacuation = crate::migration::evacuation(host.spec.maintenance, on_host.len() + in_flight, &stuck);
            let evacuation_changed = match &evacuation {
                Some((st, reason, message)) => set_condition(
                    &mut conditions,
                    condition_type::EVACUATED,
                    *st,
                    reason,
                    message.clone(),
                    None,
                    Timestamp::now(),
                ),
                None => {
                    let had = conditions.iter().any(|c| c.type_ == condition_type::EVACUATED);
                    conditions.retain(|c| c.type_ != condition_type::EVACUATED);
                    had
                }
            };
            if transition.is_none()
                && !evacuation_changed
                && status.unmovable == stuck
                && status.pool == pool_name
                && status.servers == on_host.len() as u32
                && status.cpu_allocation == cpu
                && status.memory_allocation == memory
            {
                return;
            }
            let api: Api<Host> = Api::all(self.client.clone());
            // Ready first: whoever sees Lost=True also sees Ready=False HostLost.
            if transition.is_some() {
                // Ready is the agent's condition; the operator speaks for a silent agent.
                let ready: Vec<_> = conditions.iter().filter(|c| c.type_ == condition_type::READY).collect();
                let patch = status_patch::<Host>(json!({"conditions": ready}));
                let params = PatchParams::apply(manager::OPERATOR_FOR_AGENT).force();
                if let Err(e) = api.patch_status(&name, &params, &Patch::Apply(&patch)).await {
                    tracing::warn!(host = %name, error = %e, "updating host readiness failed");
                    return;
                }
            }
            let mine: Vec<_> = conditions
                .iter()
                .filter(|c| {
                    c.type_ == condition_type::LOST
                        || c.type_ == condition_type::STALLED
                        || c.type_ == condition_type::EVACUATED
                })
                .collect();
            let patch = status_patch::<Host>(json!({
                "pool": pool_name, "servers": on_host.len(), "cpuAllocation": cpu, "memoryAllocation": memory,
                "conditions": mine, "unmovable": stuck,
            }));
            if let Err(e) =
                api.patch_status(&name, &PatchParams::apply(manager::OPERATOR).force(), &Patch::Apply(&patch)).await
            {
                tracing::warn!(host = %name, error = %e, "updating host status failed");
                return;
            }
            let evacuated = match &evacuation {
                Some((ConditionStatus::True, _, message)) if !was_evacuated => {
                    Some((EventType::Normal, "Evacuated", message.clone()))
                }
                _ => None,
            };
            for (type_, reason, message) in transition.into_iter().chain(evacuated) {
                self.publish(host.object_ref(&()), type_, reason, message, "Heartbeat");
            }
        });
        futures::stream::iter(writes).buffer_unordered(16).collect::<Vec<()>>().await;
    }

    async fn update_pool_status(
        &self,
        pools: &[Arc<HostPool>],
        hosts: &[Arc<Host>],
        servers: &[Arc<VirtualServer>],
        unready: &BTreeSet<String>,
        lost: &BTreeSet<String>,
    ) {
        for pool in pools {
            let members: Vec<_> = hosts.iter().filter(|h| in_pool(pools, pool, h)).cloned().collect();
            let ready =
                members.iter().filter(|h| host_facts(h).ready && !unready.contains(&h.name_any())).count() as u32;
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
            let mut changed = set_condition(
                &mut conditions,
                condition_type::READY,
                ok,
                reason,
                message,
                generation,
                Timestamp::now(),
            );
            let lost_here = members.iter().filter(|h| lost.contains(&h.name_any())).count();
            let paused = failover_paused(pools, pool, hosts, lost);
            let (status_, reason, message) = if paused {
                (
                    ConditionStatus::True,
                    "MassFailure",
                    format!(
                        "{lost_here} of {} hosts are lost at once, more than {}%: failover waits (the operator itself may be cut off)",
                        members.len(),
                        pool.spec.failover.max_lost_percent
                    ),
                )
            } else {
                (ConditionStatus::False, "WithinLimits", format!("{lost_here} of {} hosts are lost", members.len()))
            };
            changed |= set_condition(
                &mut conditions,
                condition_type::FAILOVER_PAUSED,
                status_,
                reason,
                message.clone(),
                generation,
                Timestamp::now(),
            );
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
            let patch = status_patch::<HostPool>(json!({
                "observedGeneration": generation,
                "readyHosts": ready, "totalHosts": members.len(), "servers": on_pool.len(),
                "cpuAllocation": cpu, "memoryAllocation": memory,
                "conditions": conditions.iter().filter(|c| c.type_ == condition_type::READY || c.type_ == condition_type::FAILOVER_PAUSED).collect::<Vec<_>>(),
            }));
            let api: Api<HostPool> = Api::all(self.client.clone());
            if let Err(e) = api
                .patch_status(&pool.name_any(), &PatchParams::apply(manager::OPERATOR).force(), &Patch::Apply(&patch))
                .await
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

impl Scheduler {
    /// Brings every request's servers in line with its approval, replicas and lifetime.
    async fn reconcile_requests(&self, pools: &[Arc<HostPool>], servers: &[Arc<VirtualServer>]) {
        // Forgotten once this pass's snapshot shows them, which quotas count from.
        {
            let mut created = self.created.lock().expect("created lock");
            if !created.is_empty() {
                let seen: HashSet<String> = servers
                    .iter()
                    .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
                    .filter(|key| created.contains_key(key))
                    .collect();
                created.retain(|key, c| c.at.elapsed() < CREATED_GRACE && !seen.contains(key));
            }
        }
        for request in self.requests.state() {
            if request.meta().deletion_timestamp.is_some() {
                // Owner references let the garbage collector return the servers.
                continue;
            }
            if let Err(e) = self.reconcile_request(&request, pools, servers).await {
                tracing::warn!(request = %request.name_any(), error = %e, "reconciling a request failed");
            }
        }
    }

    async fn reconcile_request(
        &self,
        request: &VmRequest,
        pools: &[Arc<HostPool>],
        servers: &[Arc<VirtualServer>],
    ) -> Result<()> {
        use crate::requests::{Approval, REQUEST_LABEL, approval, owned, progress, reconcile_replicas};
        let ns = request.namespace().unwrap_or_default();
        let name = request.name_any();
        let pool = pools.iter().find(|p| p.name_any() == request.spec.template.spec.host_pool);
        let mine = owned(request, servers);
        let status = request.status.clone().unwrap_or_default();
        let now = Timestamp::now();
        let generation = request.meta().generation;
        let mut conditions = status.conditions.clone();
        let mut body = json!({
            "observedGeneration": generation,
            "replicas": mine.len(),
            "selector": format!("{REQUEST_LABEL}={name}"),
        });
        let mut events: Vec<(EventType, &str, String)> = Vec::new();
        let decision = approval(request, pool.map(|p| p.as_ref()));
        // Outgrown approvals: the request keeps what it has and waits for a new approval.
        match &decision {
            Approval::Outdated { changes } => {
                let message = format!("{changes}; an approver must approve generation {}", generation.unwrap_or(0));
                if set_condition(
                    &mut conditions,
                    condition_type::APPROVAL_OUTDATED,
                    ConditionStatus::True,
                    "ChangedSinceApproval",
                    message.clone(),
                    generation,
                    now,
                ) {
                    events.push((EventType::Warning, "ChangedSinceApproval", message));
                }
                if let Some(recorded) = &status.approved {
                    body["approved"] = json!(recorded);
                }
            }
            _ if conditions.iter().any(|c| c.type_ == condition_type::APPROVAL_OUTDATED) => {
                set_condition(
                    &mut conditions,
                    condition_type::APPROVAL_OUTDATED,
                    ConditionStatus::False,
                    "Covered",
                    "the approval covers the request as it is",
                    generation,
                    now,
                );
            }
            _ => {}
        }
        let phase = match decision {
            Approval::Pending => VmRequestPhase::Pending,
            Approval::Denied { message } => {
                if status.phase != Some(VmRequestPhase::Denied) {
                    events.push((EventType::Normal, "Denied", message));
                }
                VmRequestPhase::Denied
            }
            Approval::Approved { .. } | Approval::Outdated { .. } => {
                let may_grow = match &decision {
                    Approval::Approved { auto, covers } => {
                        body["approved"] = json!(covers);
                        let named = find_condition(&conditions, condition_type::APPROVED)
                            .filter(|c| c.status == "True")
                            .and_then(|c| c.observed_generation);
                        if *auto && named != Some(covers.generation) {
                            let message = "within the pool's auto-approval policy".to_string();
                            set_condition(
                                &mut conditions,
                                condition_type::APPROVED,
                                ConditionStatus::True,
                                "AutoApproved",
                                message.clone(),
                                Some(covers.generation),
                                now,
                            );
                            events.push((EventType::Normal, "Approved", message));
                        } else if matches!(status.phase, None | Some(VmRequestPhase::Pending)) {
                            events.push((EventType::Normal, "Approved", "approved".into()));
                        }
                        true
                    }
                    _ => false,
                };
                let warning = pool
                    .and_then(|p| p.spec.approval.as_ref())
                    .and_then(|a| a.expiry_warning.as_deref())
                    .and_then(covi_api::duration::parse)
                    .unwrap_or(Duration::from_secs(24 * 3600));
                let p = progress(request, &mine, warning, now);
                let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &ns);
                if p.expired {
                    for s in &mine {
                        if s.meta().deletion_timestamp.is_none() {
                            let _ = api.delete(&s.name_any(), &Default::default()).await;
                        }
                    }
                    if status.phase != Some(VmRequestPhase::Expired) {
                        let message = format!(
                            "the lifetime {} ended; its servers are deleted",
                            request.spec.lifetime.as_deref().unwrap_or_default()
                        );
                        set_condition(
                            &mut conditions,
                            condition_type::EXPIRED,
                            ConditionStatus::True,
                            "LifetimeEnded",
                            message.clone(),
                            generation,
                            now,
                        );
                        events.push((EventType::Normal, "Expired", message));
                    }
                } else {
                    let existing: Vec<String> = mine.iter().map(|s| s.name_any()).collect();
                    let (mut create, delete) = reconcile_replicas(&name, request.spec.replicas, &existing);
                    if !may_grow {
                        create.clear();
                    }
                    // Created in an earlier pass but not in the snapshot yet: not again.
                    create.retain(|server| {
                        !self.created.lock().expect("created lock").contains_key(&format!("{ns}/{server}"))
                    });
                    // Quota: all of the growth fits, or none of it is created. What this
                    // pass (or one the snapshot lags) created counts too.
                    let quota = match (pool, create.is_empty()) {
                        (Some(pool), false) => pool.size_of(&request.spec.template.spec).ok().and_then(|size| {
                            let held = self.namespace_usage(pool, &ns, servers);
                            let n = create.len() as u32;
                            crate::requests::over_quota(
                                pool,
                                &ns,
                                held,
                                (n, u64::from(size.cpus) * u64::from(n), size.memory_mib * u64::from(n)),
                            )
                        }),
                        _ => None,
                    };
                    match &quota {
                        Some(message) => {
                            if set_condition(
                                &mut conditions,
                                condition_type::QUOTA_EXCEEDED,
                                ConditionStatus::True,
                                "OverQuota",
                                message.clone(),
                                generation,
                                now,
                            ) {
                                events.push((EventType::Warning, "QuotaExceeded", message.clone()));
                            }
                            create.clear();
                        }
                        None if conditions.iter().any(|c| c.type_ == condition_type::QUOTA_EXCEEDED) => {
                            set_condition(
                                &mut conditions,
                                condition_type::QUOTA_EXCEEDED,
                                ConditionStatus::False,
                                "WithinQuota",
                                "the request fits the namespace's quota",
                                generation,
                                now,
                            );
                        }
                        None => {}
                    }
                    // Many at once: a request of a thousand servers is a thousand POSTs.
                    let size = pool.and_then(|p| p.size_of(&request.spec.template.spec).ok());
                    let size = size.map(|s| (1, u64::from(s.cpus), s.memory_mib)).unwrap_or((1, 0, 0));
                    let creates = create.iter().map(|server| self.create_request_server(request, server, size));
                    let created: Vec<Result<()>> = futures::stream::iter(creates).buffer_unordered(32).collect().await;
                    created.into_iter().collect::<Result<Vec<()>>>()?;
                    for server in &delete {
                        let _ = api.delete(server, &Default::default()).await;
                    }
                    if !create.is_empty() && status.phase != Some(VmRequestPhase::Provisioning) {
                        events.push((EventType::Normal, "Provisioning", format!("creating {} servers", create.len())));
                    }
                    if p.fulfilled
                        && status.phase != Some(VmRequestPhase::Fulfilled)
                        && create.is_empty()
                        && delete.is_empty()
                    {
                        events.push((
                            EventType::Normal,
                            "Fulfilled",
                            format!("all {} servers are Ready", request.spec.replicas),
                        ));
                    }
                    let fulfilled = p.fulfilled && create.is_empty() && delete.is_empty();
                    let (st, reason, message) = if fulfilled {
                        (
                            ConditionStatus::True,
                            "AllReady",
                            format!("{} of {} servers Ready", p.ready, request.spec.replicas),
                        )
                    } else {
                        (
                            ConditionStatus::False,
                            "Provisioning",
                            format!("{} of {} servers Ready", p.ready, request.spec.replicas),
                        )
                    };
                    set_condition(&mut conditions, condition_type::FULFILLED, st, reason, message, generation, now);
                    if p.expiring_soon
                        && !covi_api::condition::is_condition_true(&conditions, condition_type::EXPIRING_SOON)
                    {
                        let at = p.expires_at.map(|t| t.to_string()).unwrap_or_default();
                        let message = format!("the servers are deleted at {at}");
                        set_condition(
                            &mut conditions,
                            condition_type::EXPIRING_SOON,
                            ConditionStatus::True,
                            "LifetimeEnding",
                            message.clone(),
                            generation,
                            now,
                        );
                        events.push((EventType::Warning, "ExpiringSoon", message));
                    }
                }
                if let Some(at) = p.expires_at {
                    body["expiresAt"] = json!(Time(at));
                }
                body["readyReplicas"] = json!(p.ready);
                let blocked = covi_api::condition::is_condition_true(&conditions, condition_type::QUOTA_EXCEEDED);
                if (blocked && mine.is_empty()) || !may_grow { VmRequestPhase::Pending } else { p.phase }
            }
        };
        body["phase"] = json!(phase);
        for (type_, d) in crate::readiness::request_conditions(phase, &conditions) {
            set_condition(&mut conditions, type_, d.status, &d.reason, d.message, generation, now);
        }
        let mine_types = [
            condition_type::FULFILLED,
            condition_type::EXPIRED,
            condition_type::EXPIRING_SOON,
            condition_type::QUOTA_EXCEEDED,
            condition_type::APPROVAL_OUTDATED,
            condition_type::READY,
            condition_type::STALLED,
        ];
        let auto = conditions.iter().any(|c| c.type_ == condition_type::APPROVED && c.reason == "AutoApproved");
        let owned_conditions: Vec<_> = conditions
            .iter()
            .filter(|c| mine_types.contains(&c.type_.as_str()) || (auto && c.type_ == condition_type::APPROVED))
            .collect();
        body["conditions"] = json!(owned_conditions);
        // Write only when something the operator owns differs.
        let mut current = json!({
            "observedGeneration": status.observed_generation,
            "replicas": status.replicas,
            "selector": status.selector,
            "phase": status.phase,
            "conditions": status.conditions.iter()
                .filter(|c| mine_types.contains(&c.type_.as_str()) || (auto && c.type_ == condition_type::APPROVED))
                .collect::<Vec<_>>(),
        });
        if body.get("readyReplicas").is_some() {
            current["readyReplicas"] = json!(status.ready_replicas);
        }
        if let Some(at) = &status.expires_at {
            current["expiresAt"] = json!(at);
        }
        if let Some(approved) = &status.approved {
            current["approved"] = json!(approved);
        }
        let unchanged = events.is_empty() && current == body;
        if !unchanged {
            let patch = status_patch::<VmRequest>(json!(body));
            let api: Api<VmRequest> = Api::namespaced(self.client.clone(), &ns);
            api.patch_status(&name, &PatchParams::apply(manager::OPERATOR).force(), &Patch::Apply(&patch)).await?;
        }
        let webhook = pool.and_then(|p| p.spec.approval.as_ref()).and_then(|a| a.webhook_url.clone());
        for (type_, reason, note) in events {
            if let Some(url) = &webhook
                && (reason == "Fulfilled" || reason == "ExpiringSoon")
            {
                let message = json!({
                    "event": reason, "namespace": ns, "request": name, "message": note,
                    "requester": request.spec.requester,
                    "servers": mine.iter().map(|s| s.name_any()).collect::<Vec<_>>(),
                });
                self.notify(url.clone(), message, request.object_ref(&()));
            }
            self.publish(request.object_ref(&()), type_, reason, note, "Request");
        }
        Ok(())
    }

    /// What a namespace's servers hold in a pool: the snapshot's, plus servers created
    /// since that the snapshot does not show yet.
    fn namespace_usage(&self, pool: &HostPool, ns: &str, servers: &[Arc<VirtualServer>]) -> (u32, u64, u64) {
        let (mut n, mut cpus, mut mib) = snapshot_usage(pool, ns, servers);
        let prefix = format!("{ns}/");
        for (key, c) in self.created.lock().expect("created lock").iter() {
            if key.starts_with(&prefix) && c.pool == pool.name_any() {
                (n, cpus, mib) = (n + c.size.0, cpus + c.size.1, mib + c.size.2);
            }
        }
        (n, cpus, mib)
    }

    /// Creates server `name` from the request's template, owned by the request.
    async fn create_request_server(&self, request: &VmRequest, name: &str, size: (u32, u64, u64)) -> Result<()> {
        let template = &request.spec.template;
        let meta = template.metadata.clone().unwrap_or_default();
        let mut labels = meta.labels.clone();
        labels.insert(crate::requests::REQUEST_LABEL.into(), request.name_any());
        let server = json!({
            "apiVersion": VirtualServer::api_version(&()), "kind": VirtualServer::kind(&()),
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": meta.annotations,
                // Born with covi's finalizer: one write fewer per server than adding it later.
                "finalizers": [FINALIZER],
                "ownerReferences": [{
                    "apiVersion": VmRequest::api_version(&()), "kind": VmRequest::kind(&()),
                    "name": request.name_any(), "uid": request.uid().unwrap_or_default(),
                    "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": template.spec,
        });
        let server: VirtualServer =
            serde_json::from_value(server).map_err(|source| Error::Template { request: request.name_any(), source })?;
        let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &request.namespace().unwrap_or_default());
        let result = match api.create(&Default::default(), &server).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        };
        if result.is_ok() {
            let key = format!("{}/{name}", request.namespace().unwrap_or_default());
            let created = Created { at: Instant::now(), pool: template.spec.host_pool.clone(), size };
            self.created.lock().expect("created lock").insert(key, created);
        }
        result
    }

    /// Deletes standalone servers whose spec.expiresAt has passed.
    /// Standalone servers honour spec.expiresAt: an ExpiringSoon warning (the pool's
    /// expiryWarning before, at most half the server's life), then deletion.
    async fn expire_servers(&self, pools: &[Arc<HostPool>], servers: &[Arc<VirtualServer>]) {
        let now = Timestamp::now();
        for s in servers {
            let Some(at) = s.spec.expires_at.as_ref().map(|t| t.0) else { continue };
            if s.meta().deletion_timestamp.is_some() {
                continue;
            }
            let api: Api<VirtualServer> = Api::namespaced(self.client.clone(), &s.namespace().unwrap_or_default());
            if at <= now {
                if api.delete(&s.name_any(), &Default::default()).await.is_ok() {
                    let note = "spec.expiresAt has passed; the server is deleted".to_string();
                    self.publish(s.object_ref(&()), EventType::Normal, "Expired", note, "Expire");
                }
                continue;
            }
            let conditions = s.status.as_ref().map(|st| st.conditions.clone()).unwrap_or_default();
            if covi_api::condition::is_condition_true(&conditions, condition_type::EXPIRING_SOON) {
                continue;
            }
            let configured = pools
                .iter()
                .find(|p| p.name_any() == s.spec.host_pool)
                .and_then(|p| p.spec.approval.as_ref())
                .and_then(|a| a.expiry_warning.as_deref())
                .and_then(covi_api::duration::parse)
                .unwrap_or(Duration::from_secs(24 * 3600));
            let life = s.creation_timestamp().map(|c| at.duration_since(c.0)).and_then(|d| Duration::try_from(d).ok());
            let warn = life.map(|l| configured.min(l / 2)).unwrap_or(configured);
            if now + warn < at {
                continue;
            }
            let message = format!("the server is deleted at {at} (spec.expiresAt)");
            let mut mine = Vec::new();
            set_condition(
                &mut mine,
                condition_type::EXPIRING_SOON,
                ConditionStatus::True,
                "ExpiresAt",
                message.clone(),
                s.meta().generation,
                now,
            );
            let patch = status_patch::<VirtualServer>(json!({"conditions": mine}));
            // Its own field manager: the operator's other status applies never carry it.
            let params = PatchParams::apply("covi-operator-expiry").force();
            if api.patch_status(&s.name_any(), &params, &Patch::Apply(&patch)).await.is_ok() {
                self.publish(s.object_ref(&()), EventType::Warning, "ExpiringSoon", message, "Expire");
            }
        }
    }
}

/// What the servers of namespace `ns` hold in `pool`: (servers, CPUs, MiB).
fn snapshot_usage(pool: &HostPool, ns: &str, servers: &[Arc<VirtualServer>]) -> (u32, u64, u64) {
    let mut held = (0u32, 0u64, 0u64);
    for s in servers.iter().filter(|s| s.namespace().as_deref() == Some(ns) && s.spec.host_pool == pool.name_any()) {
        if s.meta().deletion_timestamp.is_some() {
            continue;
        }
        if let Ok(size) = pool.size_of(&s.spec) {
            held = (held.0 + 1, held.1 + u64::from(size.cpus), held.2 + size.memory_mib);
        }
    }
    held
}

/// Whether failover in `pool` must wait because too many of its hosts are lost at once.
fn failover_paused(pools: &[Arc<HostPool>], pool: &HostPool, hosts: &[Arc<Host>], lost: &BTreeSet<String>) -> bool {
    let members: Vec<_> = hosts.iter().filter(|h| in_pool(pools, pool, h)).collect();
    let lost_here = members.iter().filter(|h| lost.contains(&h.name_any())).count();
    mass_failure(lost_here, members.len(), pool.spec.failover.max_lost_percent)
}

/// Sets a host's Ready and Lost conditions from its liveness; returns the Event to
/// publish when something changed.
fn liveness_conditions(
    conditions: &mut Vec<covi_api::Condition>,
    liveness: Liveness,
    leases: &Leases,
    host: &str,
) -> Option<(EventType, &'static str, String)> {
    use ConditionStatus::{False, True};
    use condition_type::{LOST, READY, STALLED};
    let now = Timestamp::now();
    let silent = leases.silent_for(host, Instant::now()).map(|d| d.as_secs()).unwrap_or(0);
    let ready_reason = find_condition(conditions, READY).map(|c| (c.status.clone(), c.reason.clone()));
    let was_lost = find_condition(conditions, LOST).is_some_and(|c| c.status == "True");
    let mut set = |changes: &[(&str, ConditionStatus)], reason: &str, message: &str| {
        for (type_, status) in changes {
            set_condition(conditions, type_, *status, reason, message, None, now);
        }
    };
    match liveness {
        Liveness::Lost if !was_lost => {
            let message = format!(
                "no lease renewal seen for {silent}s: the host is lost and its highly-available servers restart elsewhere"
            );
            set(&[(LOST, True), (STALLED, True), (READY, False)], "HostLost", &message);
            Some((EventType::Warning, "HostLost", message))
        }
        Liveness::HeartbeatMissed if ready_reason.as_ref().is_none_or(|(s, _)| s == "True") => {
            let message = format!("no lease renewal seen for {silent}s");
            set(&[(READY, False)], "HeartbeatMissed", &message);
            Some((EventType::Warning, "HeartbeatMissed", message))
        }
        Liveness::Alive
            if was_lost
                || ready_reason
                    .as_ref()
                    .is_some_and(|(s, r)| s == "False" && (r == "HeartbeatMissed" || r == "HostLost")) =>
        {
            let message = "the host renews its lease again".to_string();
            set(&[(LOST, False), (STALLED, False), (READY, True)], "LeaseRenewed", &message);
            Some((EventType::Normal, "HostRecovered", message))
        }
        _ => None,
    }
}
