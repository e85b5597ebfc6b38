//! VmRequests, reconciled by their own controller (kube-runtime's `Controller`) that
//! owns their servers: a change to a request, or to one of its servers, reconciles
//! that request alone. Besides its own watches it reads the leader's caches of pools
//! and servers (quotas count every server of a namespace), and runs only while this
//! replica leads.
//!
//! dereference (pool, owned servers, quota held) → decide ([`desired::request::plan`])
//! → apply (create, delete) → update status and publish Events.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use covi_api::contract::REQUEST_LABEL;
use covi_api::vm_request::VmRequestPhase;
use covi_api::{HostPool, VirtualServer, VmRequest};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use crate::desired::{self, request::Facts};
use crate::error::{Error, Result};
use crate::requests::{owned, reconcile_replicas, server_from_template};
use crate::writer::Writer;

/// Requests reconciled at once. Quota checks stay exact across them: a request
/// reserves what it creates before it creates it.
const CONCURRENCY: u16 = 8;

/// How long a created server may take to show up in the cache, from the answer to its
/// POST, before it counts as missing again (say, deleted before the watch saw it).
const CREATED_GRACE: Duration = Duration::from_secs(30);

/// Looked at again at least this often, whatever the watches say.
const RESYNC: Duration = Duration::from_secs(300);

/// Looked at again this often while its servers come up or go.
const SETTLING: Duration = Duration::from_secs(2);

pub struct Context {
    pub writer: Writer,
    pub pools: Store<HostPool>,
    pub servers: Store<VirtualServer>,
    /// Servers created for requests, by "namespace/name", until the cache shows
    /// them: they are not created again, and quotas count them.
    created: Mutex<HashMap<String, Created>>,
}

/// A server created (or about to be) that the cache may not show yet.
struct Created {
    /// When its POST was answered; None while it is queued or in flight. Counting from
    /// the reservation instead let a burst's later POSTs, queued behind the earlier
    /// ones on an overloaded API server, count as missing and be sent twice.
    at: Option<Instant>,
    pool: String,
    /// Servers, CPUs and MiB it adds to its namespace's quota.
    size: (u32, u64, u64),
}

impl Context {
    pub fn new(writer: Writer, pools: Store<HostPool>, servers: Store<VirtualServer>) -> Context {
        Context { writer, pools, servers, created: Mutex::new(HashMap::new()) }
    }
}

/// Runs the controller until the leader's loop drops it: a watch of VmRequests and
/// one of the servers they own (by their request label only).
pub async fn run(client: Client, ctx: Arc<Context>) {
    let servers = watcher::Config::default().labels(REQUEST_LABEL);
    Controller::new(Api::<VmRequest>::all(client.clone()), watcher::Config::default())
        .owns(Api::<VirtualServer>::all(client), servers)
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                tracing::debug!(error = %e, "request controller");
            }
            futures::future::ready(())
        })
        .await;
}

fn error_policy(request: Arc<VmRequest>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(request = %request.name_any(), error = %error, "reconciling a request failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile(request: Arc<VmRequest>, ctx: Arc<Context>) -> Result<Action> {
    if request.meta().deletion_timestamp.is_some() {
        // Owner references let the garbage collector return the servers.
        return Ok(Action::await_change());
    }
    // Decided on full caches only: a partial one would miss servers the request has.
    ctx.servers.wait_until_ready().await.map_err(|_| Error::WatchEnded("VirtualServers"))?;
    ctx.pools.wait_until_ready().await.map_err(|_| Error::WatchEnded("HostPools"))?;
    let ns = request.namespace().unwrap_or_default();
    let pool = ctx.pools.get(&ObjectRef::new(&request.spec.template.spec.host_pool));
    let now = Timestamp::now();
    let size = pool.as_ref().and_then(|p| p.size_of(&request.spec.template.spec).ok());
    let size = size.map(|s| (1, u64::from(s.cpus), s.memory_mib)).unwrap_or((1, 0, 0));
    // Decided and reserved under one lock: two requests of a namespace reconciled
    // at once never both fit the last of a quota.
    let servers;
    let (mine, plan) = {
        let mut created = ctx.created.lock().expect("created lock");
        created.retain(|key, c| {
            let (ns, name) = key.split_once('/').unwrap_or_default();
            !expired(c.at, CREATED_GRACE) && ctx.servers.get(&ObjectRef::new(name).within(ns)).is_none()
        });
        // Read after the in-flight set let go of what the cache shows, so a server
        // is always in one or the other: a snapshot taken before would miss one that
        // reached the cache in between, and the request would create it twice.
        servers = ctx.servers.state();
        let mine = owned(&request, &servers);
        let prefix = format!("{ns}/");
        let in_flight: BTreeSet<String> =
            created.keys().filter_map(|k| k.strip_prefix(&prefix)).map(str::to_string).collect();
        // The namespace's usage (a look at every server) only counts for servers the
        // request would create; otherwise the plan does not read it.
        let names: Vec<String> = mine.iter().map(|s| s.name_any()).collect();
        let (grow, _) = reconcile_replicas(&request.name_any(), request.spec.replicas, &names);
        let may_create = grow.iter().any(|name| !in_flight.contains(name));
        let held = match &pool {
            Some(pool) if may_create => {
                let mut held = namespace_usage(pool, &ns, &servers);
                for (key, c) in created.iter() {
                    if key.starts_with(&prefix) && c.pool == pool.name_any() {
                        held = (held.0 + c.size.0, held.1 + c.size.1, held.2 + c.size.2);
                    }
                }
                held
            }
            _ => (0, 0, 0),
        };
        let facts = Facts { request: &request, pool: pool.as_deref(), servers: &mine, in_flight: &in_flight, held };
        let plan = desired::request::plan(facts, now);
        for name in &plan.create {
            let pool = request.spec.template.spec.host_pool.clone();
            created.insert(format!("{ns}/{name}"), Created { at: None, pool, size });
        }
        (mine, plan)
    };
    // Many at once: a request of a thousand servers is a thousand POSTs.
    let creates = plan.create.iter().cloned().map(|name| create(ctx.clone(), request.clone(), name));
    let created: Vec<Result<()>> = futures::stream::iter(creates).buffer_unordered(32).collect().await;
    created.into_iter().collect::<Result<Vec<()>>>()?;
    for name in &plan.delete {
        if let Some(server) = mine.iter().find(|s| s.name_any() == *name) {
            ctx.writer.delete(*server).await?;
        }
    }
    if let Some(write) = &plan.status {
        ctx.writer.apply(request.as_ref(), write).await?;
    }
    let phase = plan.status.as_ref().map(|w| w.status.phase).unwrap_or(request.status.as_ref().and_then(|s| s.phase));
    // The servers were read from the leader's cache, which may trail the watch that
    // woke this reconcile: while servers come up, look again soon.
    let settling = phase == Some(VmRequestPhase::Provisioning) || !plan.create.is_empty() || !plan.delete.is_empty();
    let webhook = pool.as_ref().and_then(|p| p.spec.approval.as_ref()).and_then(|a| a.webhook_url.clone());
    for note in plan.notes {
        if let Some(url) = &webhook
            && let Some(body) = desired::request::webhook_body(&request, &mine, &note)
        {
            ctx.writer.notify(url.clone(), body, request.object_ref(&()));
        }
        ctx.writer.publish(request.object_ref(&()), note);
    }
    let revisit = plan
        .revisit_at
        .and_then(|at| Duration::try_from(at.duration_since(now)).ok())
        .map(|d| d + Duration::from_millis(100))
        .unwrap_or(RESYNC)
        .min(if settling { SETTLING } else { RESYNC });
    Ok(Action::requeue(revisit))
}

/// Creates server `name` of `request`; a failure gives its reservation back.
async fn create(ctx: Arc<Context>, request: Arc<VmRequest>, name: String) -> Result<()> {
    let result = match server_from_template(&request, &name) {
        Some(server) => ctx.writer.create(&server).await,
        None => Err(Error::Template { request: request.name_any(), message: "the request has no UID yet".into() }),
    };
    let key = format!("{}/{name}", request.namespace().unwrap_or_default());
    let mut created = ctx.created.lock().expect("created lock");
    match result {
        Ok(()) => {
            if let Some(c) = created.get_mut(&key) {
                c.at = Some(Instant::now());
            }
        }
        Err(_) => {
            created.remove(&key);
        }
    }
    result
}

/// Whether a reservation answered `at` (None: its POST not answered yet) has waited
/// longer than `grace` for the cache.
fn expired(at: Option<Instant>, grace: Duration) -> bool {
    at.is_some_and(|at| at.elapsed() >= grace)
}

/// What the servers of namespace `ns` hold in `pool` by the cache: (servers, CPUs, MiB).
/// Every reconcile of a request looks at every server, so nothing is cloned and a
/// class's size is worked out once.
fn namespace_usage(pool: &HostPool, ns: &str, servers: &[Arc<VirtualServer>]) -> (u32, u64, u64) {
    let pool_name = pool.metadata.name.as_deref().unwrap_or_default();
    let mut classes: HashMap<&str, Option<covi_api::host_pool::Size>> = HashMap::new();
    let mut held = (0u32, 0u64, 0u64);
    for s in servers.iter().filter(|s| s.metadata.namespace.as_deref() == Some(ns) && s.spec.host_pool == pool_name) {
        if s.meta().deletion_timestamp.is_some() {
            continue;
        }
        let size = match (&s.spec.resources, &s.spec.class) {
            (None, Some(class)) => *classes.entry(class).or_insert_with(|| pool.size_of(&s.spec).ok()),
            _ => pool.size_of(&s.spec).ok(),
        };
        if let Some(size) = size {
            held = (held.0 + 1, held.1 + u64::from(size.cpus), held.2 + size.memory_mib);
        }
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_waits_for_its_post_before_its_grace_counts() {
        let grace = Duration::from_secs(30);
        // Queued or in flight, however long: never missing, never sent twice.
        assert!(!expired(None, grace));
        let answered = Instant::now();
        assert!(!expired(Some(answered), grace));
        let long_ago = Instant::now().checked_sub(Duration::from_secs(31)).expect("a machine up for 31 s");
        assert!(expired(Some(long_ago), grace), "answered and still not in the cache after the grace");
    }
}
