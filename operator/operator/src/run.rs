//! The leader's watches and loop: whenever a pool, host or server changes (or at
//! every resync, or when a host's liveness changes) it runs one
//! [`Scheduler::pass`]; beside it, VmRequests run in their own controller
//! ([`crate::request_controller`]) and each host's Assignment is kept in step with the
//! servers bound to it ([`publish_assignments`]). Only the leader runs this.

use std::sync::Arc;
use std::time::{Duration, Instant};

use covi_api::contract::manager;
use covi_api::{Assignment, Host, HostPool, VirtualServer};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Notify;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::pass::Scheduler;
use crate::request_controller::{self, Context};
use crate::writer::Writer;

pub async fn client(config: &Config) -> Result<Client> {
    covi_daemon::kube_client(config.kubeconfig.as_deref()).await.map_err(Error::Client)
}

/// Watches `api` into a store and pokes each of `changed` on every event, until the
/// returned guard is dropped (the leader's loop ended).
fn watch<K>(api: Api<K>, changed: Vec<Arc<Notify>>) -> (Store<K>, AbortOnDrop)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    // Managed fields are most of a stored object and the operator never reads them:
    // without them the cache of 20,000 servers is a fraction of the size.
    let events = watcher(api, watcher::Config::default()).modify(|o| o.managed_fields_mut().clear());
    let kind = K::kind(&());
    let stream = reflector(writer, events).default_backoff().touched_objects().for_each(move |event| {
        match event {
            // The watcher lists or watches again after a backoff; until then the cache
            // is as old as its last event, which a stuck pass would otherwise hide.
            Err(e) => tracing::warn!(cache = %kind, error = %e, "a watch failed; trying again"),
            Ok(_) => changed.iter().for_each(|c| c.notify_one()),
        }
        futures::future::ready(())
    });
    (store, AbortOnDrop(tokio::spawn(stream)))
}

pub async fn run_leader(client: Client, config: &Config, metrics: Metrics) -> Result<()> {
    let changed = Arc::new(Notify::new());
    let servers_changed = Arc::new(Notify::new());
    let (pools, _pools_watch) = watch(Api::<HostPool>::all(client.clone()), vec![changed.clone()]);
    let (hosts, _hosts_watch) = watch(Api::<Host>::all(client.clone()), vec![changed.clone()]);
    let (servers, _servers_watch) =
        watch(Api::<VirtualServer>::all(client.clone()), vec![changed.clone(), servers_changed.clone()]);
    // Renewals are not changes worth a pass; the one-second tick reads them.
    let (host_leases, _leases_watch) = watch(Api::<Lease>::namespaced(client.clone(), &config.namespace), vec![]);
    let (assignments, _assignments_watch) = watch(Api::<Assignment>::all(client.clone()), vec![]);
    let reporter = Reporter { controller: manager::OPERATOR.into(), instance: Some(config.identity.clone()) };
    let writer = Writer::new(client.clone(), reporter);
    wait_synced("HostPools", &pools).await?;
    wait_synced("Hosts", &hosts).await?;
    wait_synced("VirtualServers", &servers).await?;
    wait_synced("Leases", &host_leases).await?;
    wait_synced("Assignments", &assignments).await?;
    let _stop_assignments =
        AbortOnDrop(tokio::spawn(publish_assignments(writer.clone(), servers.clone(), assignments, servers_changed)));
    // VmRequests have their own controller, with its own watches.
    let ctx = Arc::new(Context::new(writer.clone(), pools.clone(), servers.clone()));
    let _stop_controller = AbortOnDrop(tokio::spawn(request_controller::run(client.clone(), ctx)));
    let lease_api = Api::<Lease>::namespaced(client.clone(), &config.namespace);
    let mut scheduler = Scheduler::new(writer, pools, hosts, servers, host_leases, lease_api, metrics)
        .keep_history(crate::history::History::new(client.clone(), &config.namespace));
    tracing::info!("leading: scheduling servers");
    loop {
        let started = Instant::now();
        let result = scheduler.pass().await;
        let took = started.elapsed();
        scheduler.metrics.observe_pass(took, result.as_ref().err());
        // Nothing is bound or failed over while a pass runs: a long one is worth a line.
        if took > SLOW_PASS {
            tracing::warn!(seconds = took.as_secs(), "a scheduling pass took long");
        }
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

/// A pass longer than this is logged.
const SLOW_PASS: Duration = Duration::from_secs(10);

/// How long after a server changes its host's Assignment is written: the changes of
/// one scheduling pass (a burst bound at once) go out as one write per host.
const ASSIGNMENT_COALESCE: Duration = Duration::from_millis(50);

/// How often every Assignment is compared, not only those of hosts whose servers
/// changed: one someone else changed or deleted is put right, a failed write tried
/// again.
const ASSIGNMENT_RETRY: Duration = Duration::from_secs(2);

/// Keeps each host's Assignment listing the servers bound to it, for its agent.
async fn publish_assignments(
    writer: Writer,
    servers: Store<VirtualServer>,
    assignments: Store<Assignment>,
    changed: Arc<Notify>,
) {
    use crate::desired::assignment::{Board, changes};
    use std::collections::{BTreeSet, HashMap};
    let mut board = Board::default();
    // What this leader wrote last, by host: the cache may not show it yet.
    let mut written: HashMap<String, covi_api::AssignmentSpec> = HashMap::new();
    let mut last_full: Option<Instant> = None;
    loop {
        let _ = tokio::time::timeout(ASSIGNMENT_RETRY, changed.notified()).await;
        tokio::time::sleep(ASSIGNMENT_COALESCE).await;
        let mut look_at = board.update(&servers.state());
        let cached: HashMap<String, Arc<Assignment>> =
            assignments.state().into_iter().map(|a| (a.name_any(), a)).collect();
        // Once the cache shows a write, the cache speaks for it again (an Assignment
        // someone deleted is then written anew).
        written.retain(|host, spec| cached.get(host).is_none_or(|a| a.spec != *spec));
        if last_full.is_none_or(|at| at.elapsed() >= ASSIGNMENT_RETRY) {
            look_at.extend(board.hosts().cloned());
            look_at.extend(cached.keys().cloned());
            look_at.extend(written.keys().cloned());
            last_full = Some(Instant::now());
        }
        let writes = changes(&board, &look_at, &cached, &written);
        let known: BTreeSet<&String> = cached.keys().chain(written.keys()).collect();
        let writes: Vec<_> = writes.into_iter().map(|(host, spec)| (known.contains(&host), host, spec)).collect();
        let results: Vec<_> = futures::stream::iter(writes.into_iter().map(|(exists, host, spec)| {
            let writer = writer.clone();
            async move {
                let result = writer.assign(&host, &spec, exists).await;
                (host, spec, result)
            }
        }))
        .buffer_unordered(crate::writer::WRITES_AT_ONCE)
        .collect()
        .await;
        for (host, spec, result) in results {
            match result {
                Ok(()) => {
                    written.insert(host, spec);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "publishing an Assignment failed; trying again");
                    written.remove(&host);
                    // Compared again at the next look, not only at the next full one.
                    last_full = None;
                }
            }
        }
    }
}

/// Waits for a cache to fill, saying so every ten seconds while it has not.
async fn wait_synced<K>(what: &'static str, store: &Store<K>) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(10), store.wait_until_ready()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => return Err(Error::WatchEnded(what)),
            Err(_) => tracing::warn!(cache = what, "still waiting for the first list of the watch"),
        }
    }
}

/// Stops a watch or the request controller when the leader's loop ends (leadership
/// lost): a replica that leads again starts them afresh.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
