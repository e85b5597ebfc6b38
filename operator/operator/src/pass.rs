//! One pass of the leader over pools, hosts and servers: it reads the caches, asks
//! the pure rooms what every object should say ([`crate::scheduler`],
//! [`crate::migration`], [`crate::desired`]) and hands the writes to the
//! [`Writer`]. The state it keeps between passes is what the caches cannot tell: the
//! bindings it wrote that they do not show yet, and when each host's Lease renewed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use covi_api::contract::FINALIZER;
use covi_api::{Host, HostPool, VirtualServer};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};

use crate::desired::{self, Note, StatusWrite};
use crate::error::Result;
use crate::health::{Leases, Liveness, mass_failure};
use crate::metrics::Metrics;
use crate::migration::Action;
use crate::scheduler::{Assumed, Decision, PoolView, bound_host, in_pool};
use crate::writer::Writer;

/// The leader's state between passes.
pub struct Scheduler {
    pub writer: Writer,
    pub pools: Store<HostPool>,
    pub hosts: Store<Host>,
    pub servers: Store<VirtualServer>,
    /// Host Leases, in the operator's namespace, and the API to read one fresh.
    pub host_leases: Store<Lease>,
    lease_api: Api<Lease>,
    pub metrics: Metrics,
    /// Bindings written but perhaps not yet in the server store, by server UID.
    assumed: HashMap<String, Assumed>,
    /// When this operator saw each host's Lease renew.
    leases: Leases,
    /// Host liveness as the last full pass saw it.
    acted_on: HashMap<String, Liveness>,
    /// Addresses held by more than one server, as last reported.
    duplicates: BTreeMap<(String, std::net::Ipv4Addr), Vec<String>>,
    /// Where deleted servers' records go; without it none are kept.
    history: Option<crate::history::History>,
    /// When each pool's consolidation was last planned.
    consolidator: crate::consolidation::Consolidator,
    /// When this operator last wrote each host's status (counts alone wait, see
    /// [`desired::host::COALESCE_COUNTS`]).
    host_written: std::sync::Mutex<HashMap<String, Instant>>,
}

impl Scheduler {
    pub fn new(
        writer: Writer,
        pools: Store<HostPool>,
        hosts: Store<Host>,
        servers: Store<VirtualServer>,
        host_leases: Store<Lease>,
        lease_api: Api<Lease>,
        metrics: Metrics,
    ) -> Scheduler {
        Scheduler {
            writer,
            pools,
            hosts,
            servers,
            host_leases,
            lease_api,
            metrics,
            assumed: HashMap::new(),
            leases: Leases::default(),
            acted_on: HashMap::new(),
            duplicates: BTreeMap::new(),
            history: None,
            consolidator: Default::default(),
            host_written: Default::default(),
        }
    }

    /// Keeps a record of every deleted server in `history` (see [`crate::history`]).
    pub fn keep_history(mut self, history: crate::history::History) -> Scheduler {
        self.history = Some(history);
        self
    }

    pub async fn pass(&mut self) -> Result<()> {
        let servers = self.servers.state();
        let hosts = self.hosts.state();
        let pools = self.pools.state();
        self.forget_seen_bindings(&servers);
        let mut liveness = self.liveness(&pools, &hosts);
        self.confirm_losses(&pools, &hosts, &servers, &mut liveness).await;
        self.acted_on = liveness.clone();
        let unready: BTreeSet<String> =
            liveness.iter().filter(|(_, l)| **l != Liveness::Alive).map(|(h, _)| h.clone()).collect();
        let lost: BTreeSet<String> =
            liveness.iter().filter(|(_, l)| **l == Liveness::Lost).map(|(h, _)| h.clone()).collect();

        // The pools' status first: agents stretch their heartbeats by the fleet's size
        // it counts, and a fleet registering at once must see itself counted before
        // this pass writes a status for each new host (seconds to minutes of writes
        // on a loaded API server).
        self.update_pools(&pools, &hosts, &servers, &unready, &lost).await;
        self.add_finalizers(&servers).await?;
        self.release_deleted(&servers, &hosts, &lost).await?;
        self.record_deleted(&servers).await;

        let mut unmovable = BTreeMap::new();
        for pool in &pools {
            let members: Vec<_> = servers
                .iter()
                .filter(|s| Some(s.spec.host_pool.as_str()) == pool.metadata.name.as_deref())
                .cloned()
                .collect();
            let failover = pool.spec.failover.enabled && !failover_paused(&pools, pool, &hosts, &lost);
            let hosts_here: Vec<_> = hosts.iter().filter(|h| in_pool(&pools, pool, h)).cloned().collect();
            let mut decisions = crate::scheduler::pass(
                &self.view(pool, hosts_here.clone(), members.clone(), &unready, &lost),
                failover,
            );
            // A leader that has not yet seen every host of the pool renew (it has just
            // taken over) does not know what fits: a server it cannot place now may fit
            // on a host it has not confirmed. It says nothing of it until it knows, at
            // most a lease duration later, rather than writing Pending on every server
            // waiting in a burst.
            if hosts_here.iter().any(|h| liveness.get(&h.name_any()) == Some(&Liveness::Unconfirmed)) {
                decisions.retain(|(_, d)| !matches!(d, Decision::Pending { .. }));
            }
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
        let now = Timestamp::now();
        let stalled = servers.iter().filter_map(|s| Some(((), s.clone(), desired::server::stalled(s, now)?, None)));
        self.writer.apply_each(stalled.collect()).await;
        self.expire_servers(&pools, &servers).await;
        self.update_hosts(&pools, &hosts, &servers, &liveness, unmovable).await;
        self.consolidate(&pools, &hosts, &servers, &unready).await;
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
    pub fn liveness_changed(&mut self) -> bool {
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
                let failover = covi_api::host_pool::failover_for(pools, h.labels());
                (h.name_any(), self.leases.liveness(&h.name_any(), now, &failover))
            })
            .collect()
    }

    /// A host judged Lost that still has servers is confirmed by a fresh read of its
    /// Lease before anything acts on it: the cache of Leases may lag, and a renewal it
    /// does not show yet means the host is alive and will not fence itself (the
    /// protocol's model found the double run a lagging cache allows). The read is one
    /// consistent LIST of the namespace's Leases, however many hosts are lost: a host
    /// whose servers wait for it stays Lost pass after pass, and a read per lost host
    /// made every pass as long as hundreds of slow GETs when many hosts fenced at once.
    /// Unconfirmed (the read failed), a lost host counts as HeartbeatMissed this pass.
    async fn confirm_losses(
        &mut self,
        pools: &[Arc<HostPool>],
        hosts: &[Arc<Host>],
        servers: &[Arc<VirtualServer>],
        liveness: &mut HashMap<String, Liveness>,
    ) {
        let occupied: BTreeSet<&str> = servers.iter().filter_map(|s| bound_host(s, &self.assumed)).collect();
        let lost: Vec<&Arc<Host>> = hosts
            .iter()
            .filter(|h| {
                liveness.get(&h.name_any()) == Some(&Liveness::Lost) && occupied.contains(h.name_any().as_str())
            })
            .collect();
        if lost.is_empty() {
            return;
        }
        // No resourceVersion: a consistent read, as fresh as etcd.
        let fresh = match self.lease_api.list(&kube::api::ListParams::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                tracing::warn!(hosts = lost.len(), error = %e, "confirming lost hosts failed; not acting on them yet");
                for host in lost {
                    liveness.insert(host.name_any(), Liveness::HeartbeatMissed);
                }
                return;
            }
        };
        let fresh: HashMap<String, Lease> = fresh.into_iter().map(|l| (l.name_any(), l)).collect();
        let now = Instant::now();
        for host in lost {
            let name = host.name_any();
            // No Lease at all: nothing renews it.
            let Some(lease) = fresh.get(&name) else { continue };
            let renew = lease.spec.as_ref().and_then(|s| s.renew_time.as_ref()).map(|t| t.0.to_string());
            self.leases.observe(&name, renew, covi_api::host::lease_timings(lease), now);
            let failover = covi_api::host_pool::failover_for(pools, host.labels());
            let judged = self.leases.liveness(&name, now, &failover);
            if judged != Liveness::Lost {
                tracing::info!(host = %name, "the Lease renewed after all: the cache lagged; not lost");
            }
            liveness.insert(name, judged);
        }
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
        let mut wanted = vec![FINALIZER];
        if self.history.is_some() {
            wanted.push(covi_api::history::FINALIZER);
        }
        let missing = servers.iter().filter(|s| {
            s.meta().deletion_timestamp.is_none() && wanted.iter().any(|w| !s.finalizers().iter().any(|f| f == w))
        });
        let writes = missing.map(|s| {
            let wanted = &wanted;
            async move {
                let mut finalizers: Vec<&str> = s.finalizers().iter().map(String::as_str).collect();
                for w in wanted {
                    if !finalizers.contains(w) {
                        finalizers.push(w);
                    }
                }
                self.writer.set_finalizers(s.as_ref(), &finalizers).await.map(drop)
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
            let rest: Vec<&str> = s.finalizers().iter().map(String::as_str).filter(|f| *f != FINALIZER).collect();
            if self.writer.set_finalizers(s.as_ref(), &rest).await? && bound_host(s, &self.assumed).is_some() {
                self.writer.publish(s.object_ref(&()), Note::normal("Released", why, "Delete"));
            }
        }
        Ok(())
    }

    /// Deleted servers whose domain is gone (no covi.io/domain finalizer left): their
    /// record goes to the history, then the history finalizer. A failed write leaves
    /// the finalizer for the next pass.
    async fn record_deleted(&self, servers: &[Arc<VirtualServer>]) {
        let Some(history) = &self.history else { return };
        let done = servers.iter().filter(|s| {
            s.meta().deletion_timestamp.is_some()
                && !s.finalizers().iter().any(|f| f == FINALIZER)
                && s.finalizers().iter().any(|f| f == covi_api::history::FINALIZER)
        });
        for s in done {
            if let Err(e) = history.record(s).await {
                tracing::warn!(server = %s.name_any(), error = %e, "recording a deleted server's history failed; retrying next pass");
                continue;
            }
            let rest: Vec<&str> =
                s.finalizers().iter().map(String::as_str).filter(|f| *f != covi_api::history::FINALIZER).collect();
            if let Err(e) = self.writer.set_finalizers(s.as_ref(), &rest).await {
                tracing::warn!(server = %s.name_any(), error = %e, "releasing the history finalizer failed");
            }
        }
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
                    self.writer.publish(server.object_ref(&()), Note::warning("DuplicateAddress", message, "Schedule"));
                }
            }
        }
        self.duplicates = found;
    }

    /// Writes the scheduler's decisions; bindings written count as this leader's
    /// until the cache shows them.
    /// A request's servers bound in this pass are announced in one Event on the
    /// request (see [`desired::server::announced_on_request`]).
    async fn apply(&mut self, decisions: Vec<(Arc<VirtualServer>, Decision)>) {
        let now = Timestamp::now();
        let writes = decisions
            .into_iter()
            .filter_map(|(server, decision)| {
                let (write, note) = desired::server::decision(&server, &decision, now)?;
                let note = note.filter(|_| desired::server::announced_on_request(&server, &decision).is_none());
                Some((decision, server, write, note))
            })
            .collect();
        let mut batches: BTreeMap<String, (ObjectReference, Vec<String>)> = BTreeMap::new();
        for (decision, server, result) in self.writer.apply_each(writes).await {
            if result.is_ok() {
                if let (Some(request), Decision::Bind { host, .. }) =
                    (desired::server::announced_on_request(&server, &decision), &decision)
                {
                    let key = format!("{:?}/{:?}", request.namespace, request.name);
                    batches
                        .entry(key)
                        .or_insert_with(|| (request, Vec::new()))
                        .1
                        .push(format!("{} on {host}", server.name_any()));
                }
                self.assume(&server, &decision);
            }
        }
        for (request, placed) in batches.into_values() {
            self.writer.publish(request, desired::server::scheduled_together(&placed));
        }
    }

    fn assume(&mut self, server: &VirtualServer, decision: &Decision) {
        if let (Decision::Bind { host, address, .. }, Some(uid)) = (decision, server.uid()) {
            self.assumed.insert(uid, Assumed { host: host.clone(), address: *address });
        }
    }

    /// Carries out the migration plan's actions (see [`crate::migration`]).
    async fn migrate(&mut self, pool: &HostPool, actions: Vec<(Arc<VirtualServer>, Action)>) {
        for (server, action) in actions {
            let result = match action {
                Action::Record(record) => self.record_migration(&server, Some(&record)).await,
                Action::Cancel => self.record_migration(&server, None).await,
                Action::HandOver { source, target } => self.hand_over(pool, &server, source, target, None).await,
                Action::Return { target, record } => {
                    self.hand_over(pool, &server, record.target.clone(), target, Some(record)).await
                }
            };
            if let Err(e) = result {
                tracing::warn!(server = %server.name_any(), error = %e, "writing a migration step failed");
            }
        }
    }

    async fn record_migration(
        &self,
        server: &VirtualServer,
        record: Option<&covi_api::virtual_server::MigrationStatus>,
    ) -> Result<()> {
        let (write, note) = desired::server::migration(server, record);
        self.writer.apply_and_note(server, &write, note).await
    }

    /// Binds `server` to `to` (moved from `from`); a return also records why the move
    /// failed.
    async fn hand_over(
        &mut self,
        pool: &HostPool,
        server: &VirtualServer,
        from: String,
        to: String,
        record: Option<covi_api::virtual_server::MigrationStatus>,
    ) -> Result<()> {
        let decision = crate::migration::hand_over(pool, server, from, to);
        if let Some((write, note)) = desired::server::decision(server, &decision, Timestamp::now()) {
            self.writer.apply_and_note(server, &write, note).await?;
            self.assume(server, &decision);
        }
        match record {
            Some(record) => self.record_migration(server, Some(&record)).await,
            None => Ok(()),
        }
    }

    /// Standalone servers' `spec.expiresAt` (see [`desired::server::expiry`]).
    async fn expire_servers(&self, pools: &[Arc<HostPool>], servers: &[Arc<VirtualServer>]) {
        let now = Timestamp::now();
        for s in servers {
            let pool = pools.iter().find(|p| p.name_any() == s.spec.host_pool).map(|p| p.as_ref());
            let result = match desired::server::expiry(s, pool, now) {
                None => continue,
                Some(desired::server::Expiry::Delete(note)) => self.writer.delete(s.as_ref()).await.map(|()| {
                    self.writer.publish(s.object_ref(&()), note);
                }),
                Some(desired::server::Expiry::Warn(write, note)) => {
                    self.writer.apply_and_note(s.as_ref(), &write, Some(note)).await
                }
            };
            if let Err(e) = result {
                tracing::warn!(server = %s.name_any(), error = %e, "expiring a server failed");
            }
        }
    }

    /// Every Host's status (see [`desired::host`]); one write per changed host,
    /// several at once: while a burst lands, most hosts change in every pass.
    async fn update_hosts(
        &self,
        pools: &[Arc<HostPool>],
        hosts: &[Arc<Host>],
        servers: &[Arc<VirtualServer>],
        liveness: &HashMap<String, Liveness>,
        mut unmovable: BTreeMap<String, Vec<covi_api::host::UnmovableServer>>,
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
        let now = Timestamp::now();
        let clock = Instant::now();
        let written = {
            let mut written = self.host_written.lock().expect("host_written lock");
            let names: BTreeSet<String> = hosts.iter().map(|h| h.name_any()).collect();
            written.retain(|name, _| names.contains(name));
            written.clone()
        };
        let updates: Vec<_> = hosts
            .iter()
            .filter_map(|host| {
                let name = host.name_any();
                let pool = covi_api::host_pool::pool_for_labels(pools, host.labels());
                let on_host: &[&Arc<VirtualServer>] = by_host.get(name.as_str()).map(Vec::as_slice).unwrap_or_default();
                let facts = desired::host::Facts {
                    host,
                    pool: pool.map(|p| p.name_any()),
                    servers: on_host.len(),
                    leaving: leaving.get(name.as_str()).copied().unwrap_or(0),
                    allocation: match pool {
                        Some(pool) => desired::pool::allocation(pool, std::slice::from_ref(host), on_host),
                        None => (None, None),
                    },
                    liveness: liveness.get(&name).copied().unwrap_or(Liveness::Unknown),
                    silent_secs: self.leases.silent_for(&name, clock).map(|d| d.as_secs()).unwrap_or(0),
                    unmovable: unmovable.remove(&name).unwrap_or_default(),
                    since_written: written.get(&name).map(|at| clock.saturating_duration_since(*at)),
                };
                Some((host.clone(), desired::host::update(facts, now)?))
            })
            .collect();
        let writes = updates.into_iter().map(|(host, update)| async move {
            match self.write_host(&host, update).await {
                Ok(()) => {
                    self.host_written.lock().expect("host_written lock").insert(host.name_any(), Instant::now());
                }
                Err(e) => tracing::warn!(host = %host.name_any(), error = %e, "updating host status failed"),
            }
        });
        futures::stream::iter(writes).buffer_unordered(16).collect::<Vec<()>>().await;
    }

    async fn write_host(&self, host: &Host, update: desired::host::Update) -> Result<()> {
        if let Some(readiness) = &update.readiness {
            self.writer.apply(host, readiness).await?;
        }
        self.writer.apply(host, &update.summary).await?;
        for note in update.notes {
            self.writer.publish(host.object_ref(&()), note);
        }
        Ok(())
    }

    /// Every HostPool's status (see [`desired::pool`]).
    async fn update_pools(
        &self,
        pools: &[Arc<HostPool>],
        hosts: &[Arc<Host>],
        servers: &[Arc<VirtualServer>],
        unready: &BTreeSet<String>,
        lost: &BTreeSet<String>,
    ) {
        let now = Timestamp::now();
        let writes: Vec<_> = pools
            .iter()
            .filter_map(|pool| {
                let members: Vec<_> = hosts.iter().filter(|h| in_pool(pools, pool, h)).cloned().collect();
                let names: BTreeSet<_> = members.iter().map(|h| h.name_any()).collect();
                let on_pool: Vec<_> = servers
                    .iter()
                    .filter(|s| {
                        Some(s.spec.host_pool.as_str()) == pool.metadata.name.as_deref()
                            && bound_host(s, &self.assumed).is_some_and(|h| names.contains(h))
                    })
                    .collect();
                let facts = desired::pool::Facts {
                    pool,
                    members: &members,
                    servers: &on_pool,
                    unready,
                    lost,
                    failover_paused: failover_paused(pools, pool, hosts, lost),
                };
                let write: StatusWrite<_> = desired::pool::update(facts, now)?;
                Some(((), pool.clone(), write, None))
            })
            .collect();
        self.writer.apply_each(writes).await;
    }
}

impl Scheduler {
    /// Consolidation: the plan of every pool that asks and is due, in its status (the
    /// migration planner carries out an automatic pool's moves), and the Freed marks.
    async fn consolidate(
        &mut self,
        pools: &[Arc<HostPool>],
        hosts: &[Arc<Host>],
        servers: &[Arc<VirtualServer>],
        unready: &BTreeSet<String>,
    ) {
        #[derive(serde::Serialize)]
        struct Only {
            consolidation: covi_api::host_pool::ConsolidationStatus,
        }
        let now = Timestamp::now();
        let mut writes = Vec::new();
        for pool in pools {
            if !self.consolidator.due(pool) {
                continue;
            }
            let members: Vec<_> = hosts.iter().filter(|h| in_pool(pools, pool, h)).cloned().collect();
            let here: Vec<_> = servers
                .iter()
                .filter(|s| Some(s.spec.host_pool.as_str()) == pool.metadata.name.as_deref())
                .cloned()
                .collect();
            let (status, note) = crate::consolidation::recommend(pool, &members, &here, &self.assumed, unready, now);
            let write =
                StatusWrite::new(covi_api::contract::manager::OPERATOR_CONSOLIDATION, Only { consolidation: status });
            writes.push(((), pool.clone(), write, note));
        }
        self.writer.apply_each(writes).await;
        // Hosts automatic consolidation emptied: a label and a condition, each pass; a
        // pool that stopped consolidating has its marks taken back.
        for pool in pools {
            let members: Vec<_> = hosts.iter().filter(|h| in_pool(pools, pool, h)).cloned().collect();
            let marked = |h: &Arc<Host>| {
                h.labels().contains_key(covi_api::contract::FREED_LABEL)
                    || h.status.as_ref().is_some_and(|s| {
                        covi_api::condition::find_condition(&s.conditions, covi_api::contract::condition_type::FREED)
                            .is_some_and(|c| c.status == "True")
                    })
            };
            let disabled = pool.spec.consolidation.mode == covi_api::host_pool::ConsolidationMode::Disabled;
            if disabled && !members.iter().any(marked) {
                continue;
            }
            for (host, freed, condition, note) in
                crate::consolidation::freed_marks(pool, &members, servers, &self.assumed, now)
            {
                let label = freed.then_some("free");
                if let Err(e) = self.writer.set_label(host.as_ref(), covi_api::contract::FREED_LABEL, label).await {
                    tracing::warn!(host = %host.name_any(), error = %e, "marking a freed host failed");
                    continue;
                }
                let write = StatusWrite::new(
                    covi_api::contract::manager::OPERATOR_CONSOLIDATION,
                    desired::Conditions { conditions: vec![condition] },
                );
                if let Err(e) = self.writer.apply_and_note(host.as_ref(), &write, note).await {
                    tracing::warn!(host = %host.name_any(), error = %e, "writing a host's Freed condition failed");
                }
            }
        }
    }
}

/// Whether failover in `pool` must wait because too many of its hosts are lost at once.
fn failover_paused(pools: &[Arc<HostPool>], pool: &HostPool, hosts: &[Arc<Host>], lost: &BTreeSet<String>) -> bool {
    let members: Vec<_> = hosts.iter().filter(|h| in_pool(pools, pool, h)).collect();
    let lost_here = members.iter().filter(|h| lost.contains(&h.name_any())).count();
    mass_failure(lost_here, members.len(), pool.spec.failover.max_lost_percent)
}
