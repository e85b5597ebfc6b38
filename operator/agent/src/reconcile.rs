//! Converging one VirtualServer bound to this host, in the steps
//! dereference → validate/build (pure, `server::plan`) → apply → report status.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use covi_api::condition::{ConditionStatus, set_condition};
use covi_api::contract::{condition_type, manager, status_patch};
use covi_api::virtual_server::{
    MigrationPhase, MigrationStatus, READY_DISK_LEASE_HELD, READY_HANDED_OFF, READY_MIGRATION_FAILED, StartRecord,
    VirtualServerPhase,
};
use covi_api::{Host, HostPool, VirtualServer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::converge::{Step, steps};
use crate::domain_xml::{Boot, render};
use crate::error::{Error, Result};
use crate::libvirt::{Libvirt, StartRefused, VolumeError};
use crate::seed::build_iso;
use crate::server::{Failure, ServerPlan, plan, volume_names};

pub use covi_api::contract::FINALIZER;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub node: String,
    pub hypervisor: Libvirt,
    pub driver: String,
    pub pools: Store<HostPool>,
    pub recorder: Recorder,
    pub work_dir: PathBuf,
    pub resync: Duration,
    pub stop_grace: Duration,
    /// Template of another host's libvirt URI for live migration (`{address}`).
    pub peer_uri: String,
    /// Lab setting: live-migrate even where libvirt cannot see that storage is shared.
    pub unsafe_migration: bool,
    /// When a graceful stop was asked of each server, by UID.
    pub stops: Mutex<HashMap<String, Instant>>,
    pub reported: Arc<Reported>,
    pub metrics: crate::metrics::Metrics,
    pub fence: Arc<crate::fence::Fence>,
    /// The host's standing when the cache of its servers was last listed.
    pub listing: Arc<crate::fence::Listing>,
    /// Where the answers to the agent's status writes go into that cache.
    pub seen: crate::assigned::Seen,
}

/// What the agent last wrote to each server's status (by UID), and the version of the
/// server it wrote on top of. The watch cache lags behind the agent's own writes: a
/// reconcile woken by libvirt's "started" event still sees the version before the
/// agent's Running, and would write Running again (a new transition time, a new
/// version, another write per server). Until the cache holds a newer version, the
/// same outcome is not written twice; a newer version (the operator's, anyone's) is
/// compared as usual.
///
/// It also remembers, per highly-available server, the host's count of gaps in its
/// renewals when the agent last announced a start of it ([`announce_start`]): an
/// announcement holds until the next gap, so a start tried again (a disk lease still
/// held, a libvirt error) is not announced again, and the announcement's own answer,
/// which wakes the server's reconcile, does not turn into a loop of writes.
#[derive(Default)]
pub struct Reported {
    outcomes: Mutex<HashMap<String, (String, String)>>,
    announced: Mutex<HashMap<String, u64>>,
}

impl Reported {
    /// Whether `outcome` was already written on top of version `based_on`.
    pub fn written(&self, uid: &str, based_on: &str, outcome: &str) -> bool {
        let map = self.outcomes.lock().expect("reported lock");
        map.get(uid).is_some_and(|(rv, o)| rv == based_on && o == outcome)
    }

    pub fn record(&self, uid: &str, based_on: &str, outcome: &str) {
        self.outcomes
            .lock()
            .expect("reported lock")
            .insert(uid.to_string(), (based_on.to_string(), outcome.to_string()));
    }

    /// Whether a start of `uid` was announced when the host had had `gaps` gaps.
    pub fn announced_at(&self, uid: &str, gaps: u64) -> bool {
        self.announced.lock().expect("reported lock").get(uid) == Some(&gaps)
    }

    pub fn record_announcement(&self, uid: &str, gaps: u64) {
        self.announced.lock().expect("reported lock").insert(uid.to_string(), gaps);
    }

    pub fn forget(&self, uid: &str) {
        self.outcomes.lock().expect("reported lock").remove(uid);
        self.announced.lock().expect("reported lock").remove(uid);
    }

    /// Keeps only the servers `keep` says are still this host's.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.outcomes.lock().expect("reported lock").retain(|uid, _| keep(uid));
        self.announced.lock().expect("reported lock").retain(|uid, _| keep(uid));
    }
}

/// The outcome of applying a plan, for the status.
#[derive(Debug)]
struct Outcome {
    phase: VirtualServerPhase,
    ready: ConditionStatus,
    reason: &'static str,
    message: String,
    domain_uuid: Option<String>,
}

impl Outcome {
    fn failed(f: Failure) -> Outcome {
        Outcome {
            phase: VirtualServerPhase::Failed,
            ready: ConditionStatus::False,
            reason: f.reason,
            message: f.message,
            domain_uuid: None,
        }
    }
}

pub async fn reconcile(server: Arc<VirtualServer>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&server, &ctx).await;
    ctx.metrics.observe_reconcile(started.elapsed(), result.as_ref().err());
    result
}

async fn reconcile_inner(server: &VirtualServer, ctx: &Context) -> Result<Action> {
    // The cache holds the servers bound to this host; one that moved between the
    // event and now is the new host's business.
    if !server.bound_to(&ctx.node) {
        tracing::debug!(server = %server.name_any(), version = ?server.resource_version(), "bound elsewhere now");
        return Ok(Action::await_change());
    }
    if server.meta().deletion_timestamp.is_some() {
        return clean_up(server, ctx).await;
    }

    // dereference
    let pool = ctx.pools.state().into_iter().find(|p| p.name_any() == server.spec.host_pool);
    // validate + build
    let planned = match &pool {
        None => Err(Failure::new("PoolNotFound", format!("HostPool {} does not exist", server.spec.host_pool))),
        Some(pool) => plan(server, pool, &ctx.driver),
    };
    // apply
    let (outcome, requeue, announced) = match (planned, migrating_away(server, &ctx.node)) {
        // Leaving this host: hand the server off, whatever the plan says.
        (_, Some(m)) => {
            let (outcome, requeue) = hand_off(server, m, ctx).await?;
            (outcome, requeue, None)
        }
        (Err(failure), None) => (Outcome::failed(failure), ctx.resync, None),
        (Ok(plan), None) => {
            // Arriving by migration on real shared storage: the disk must be there
            // already; a fresh clone would silently replace the server's data.
            let adopting = arriving(server, &ctx.node).is_some()
                && pool.as_ref().is_some_and(|p| p.spec.hypervisor != covi_api::host_pool::Hypervisor::Test);
            apply(server, plan, ctx, adopting).await?
        }
    };
    // report, on top of the start's announcement if there was one
    report(announced.as_ref().unwrap_or(server), ctx, outcome).await?;
    Ok(Action::requeue(requeue))
}

async fn apply(
    server: &VirtualServer,
    mut plan: ServerPlan,
    ctx: &Context,
    disk_must_exist: bool,
) -> Result<(Outcome, Duration, Option<VirtualServer>)> {
    let hv = &ctx.hypervisor;
    // The server as written by this start's announcement, if one was made.
    let mut announced: Option<VirtualServer> = None;
    let uid = plan.domain.uuid.clone();
    let observed = hv.observe_server(&plan.domain.name, &uid).await?;
    let stop_waited = ctx.stops.lock().expect("stops lock").get(&uid).map(|t| t.elapsed());
    let mut requeue = ctx.resync;
    let mut defined = None;
    let steps = steps(&plan, &observed, stop_waited, ctx.stop_grace);
    let acts = !steps.is_empty();
    for step in steps {
        match step {
            Step::RemoveStale { uuid } => {
                tracing::info!(%uuid, name = %plan.domain.name, "removing a leftover domain with this server's name");
                hv.remove(&uuid).await?;
            }
            Step::Define => {
                if disk_must_exist && !hv.volume_exists(&plan.disk.storage_pool, &plan.disk.volume).await? {
                    let message = format!(
                        "disk {} is not in storage pool {} on {}: is the pool's storage shared between its hosts?",
                        plan.disk.volume, plan.disk.storage_pool, ctx.node
                    );
                    return Ok((Outcome::failed(Failure::new("DiskNotFound", message)), ctx.resync, announced));
                }
                if let Err(failure) = prepare_volumes(&mut plan, ctx).await? {
                    return Ok((Outcome::failed(failure), ctx.resync, announced));
                }
                if let Err(message) = hv.define(render(&plan.domain)).await? {
                    return Ok((Outcome::failed(Failure::new("DefineFailed", message)), ctx.resync, announced));
                }
                // Said with the start when both happen now: an Event is an API write.
                defined = Some(format!("domain {} defined on {}", plan.domain.name, ctx.node));
            }
            Step::Start => {
                // A host that lost its lease, or fenced and has not yet cleaned up, starts
                // nothing (checked again, under the fencing lock, at the start itself).
                if !ctx.fence.may_start() {
                    requeue = Duration::from_secs(1);
                    continue;
                }
                // A server the operator fails over is announced first, on the version
                // this start was decided on (see `announce_start`). Any other is moved
                // only with this host's part in it; but the cache may lag behind what
                // happened while this agent was away: unless it was listed since the
                // host's last gap in renewals, start only what the API server says is
                // bound here now.
                let gaps = if server.spec.high_availability {
                    let gaps = ctx.fence.gaps();
                    if !ctx.reported.announced_at(&uid, gaps) {
                        match announce_start(server, ctx).await? {
                            Some(written) => {
                                ctx.reported.record_announcement(&uid, gaps);
                                announced = Some(written);
                            }
                            None => {
                                requeue = Duration::from_secs(1);
                                continue;
                            }
                        }
                    }
                    Some(gaps)
                } else {
                    let on_cache = ctx.fence.cache_suffices(ctx.listing.listed());
                    tracing::debug!(server = %server.name_any(), on_cache, "starting: on the watch cache, or after reading the server");
                    if !on_cache && !bound_here_now(server, ctx).await? {
                        requeue = Duration::from_secs(1);
                        continue;
                    }
                    None
                };
                let started = hv.start(&uid, ctx.fence.clone(), gaps).await?;
                tracing::debug!(server = %server.name_any(), ?started, "start");
                match started {
                    Ok(()) => {}
                    Err(StartRefused::Fenced) => {
                        requeue = Duration::from_secs(1);
                        continue;
                    }
                    // Another copy of this server still runs somewhere and holds its
                    // disk: not a failure of this host. Try again until it is gone.
                    Err(StartRefused::DiskLeaseHeld(message)) => {
                        announce_defined(ctx, server, defined.take()).await;
                        let current = announced.as_ref().unwrap_or(server);
                        return Ok((disk_lease_held(current, ctx, &message).await, DISK_LEASE_RETRY, announced));
                    }
                    Err(StartRefused::Failed(message)) => {
                        announce_defined(ctx, server, defined.take()).await;
                        publish(ctx, server, EventType::Warning, "StartFailed", message.clone()).await;
                        return Ok((Outcome::failed(Failure::new("StartFailed", message)), ctx.resync, announced));
                    }
                }
                ctx.stops.lock().expect("stops lock").remove(&uid);
                let note = match defined.take() {
                    Some(_) => format!("domain {} defined and started on {}", plan.domain.name, ctx.node),
                    None => format!("started on {}", ctx.node),
                };
                publish(ctx, server, EventType::Normal, "Started", note).await;
            }
            Step::Stop { force } => {
                hv.stop(&uid, force).await?;
                ctx.stops.lock().expect("stops lock").entry(uid.clone()).or_insert_with(Instant::now);
                if force {
                    publish(
                        ctx,
                        server,
                        EventType::Normal,
                        "Stopped",
                        "forced off after the shutdown grace period".into(),
                    )
                    .await;
                }
                requeue = Duration::from_secs(2);
            }
        }
    }
    if let Some(note) = defined {
        publish(ctx, server, EventType::Normal, "Defined", note).await;
    }
    // Nothing done: the domain is as just observed (most reconciles, at every resync).
    let now = match acts {
        true => hv.domain(&uid).await?,
        false => observed.into_iter().find(|o| o.uuid == uid),
    };
    let outcome = match (now, plan.run) {
        (Some(d), true) if d.active => Outcome {
            phase: VirtualServerPhase::Running,
            ready: ConditionStatus::True,
            reason: "Running",
            message: format!("domain {} runs on {}", d.name, ctx.node),
            domain_uuid: Some(d.uuid),
        },
        (Some(d), false) if !d.active => {
            ctx.stops.lock().expect("stops lock").remove(&uid);
            Outcome {
                phase: VirtualServerPhase::Stopped,
                // Ready means "as the spec asks": GitOps tools wait for it, and a
                // server stopped on purpose is done.
                ready: ConditionStatus::True,
                reason: "Stopped",
                message: "runPolicy is Stopped; the domain is shut off".into(),
                domain_uuid: Some(d.uuid),
            }
        }
        (Some(d), false) => Outcome {
            phase: VirtualServerPhase::Running,
            ready: ConditionStatus::False,
            reason: "Stopping",
            message: "shutting down".into(),
            domain_uuid: Some(d.uuid),
        },
        (Some(d), true) => Outcome {
            phase: VirtualServerPhase::Provisioning,
            ready: ConditionStatus::False,
            reason: "Starting",
            message: "the domain is defined and starting".into(),
            domain_uuid: Some(d.uuid),
        },
        (None, _) => Outcome {
            phase: VirtualServerPhase::Provisioning,
            ready: ConditionStatus::False,
            reason: "Provisioning",
            message: "preparing disks and the domain".into(),
            domain_uuid: None,
        },
    };
    Ok((outcome, requeue, announced))
}

/// Publishes the Defined Event of a domain that was defined but not started.
async fn announce_defined(ctx: &Context, server: &VirtualServer, note: Option<String>) {
    if let Some(note) = note {
        publish(ctx, server, EventType::Normal, "Defined", note).await;
    }
}

/// How often a start refused for a held disk lease is tried again.
const DISK_LEASE_RETRY: Duration = Duration::from_secs(3);

/// The status of a server whose start the lock manager refused: a copy elsewhere
/// still holds its disk (a host cut off with its guests running, an agent that died
/// while its guests live). Not Failed: nothing is wrong on this host, and the server
/// starts here once that copy stops. Names the likely holder: the host the server was
/// last failed over or moved from.
async fn disk_lease_held(server: &VirtualServer, ctx: &Context, libvirt: &str) -> Outcome {
    let status = server.status.as_ref();
    let holder = status
        .and_then(|s| s.failovers.last().map(|f| f.from.clone()))
        .or_else(|| status.and_then(|s| s.migration.as_ref()).map(|m| m.source.clone()))
        .filter(|h| h != &ctx.node);
    let whose = match holder {
        Some(host) => format!("a copy still running on {host} (the host it was failed over or moved from)"),
        None => "a copy still running on another host".to_string(),
    };
    let message = format!(
        "not started on {}: its disk lease is held by {whose}; it starts here once that copy stops ({libvirt})",
        ctx.node
    );
    let already = status
        .and_then(|s| covi_api::condition::find_condition(&s.conditions, condition_type::READY))
        .is_some_and(|c| c.reason == READY_DISK_LEASE_HELD);
    if !already {
        publish(ctx, server, EventType::Warning, READY_DISK_LEASE_HELD, message.clone()).await;
    }
    Outcome {
        phase: VirtualServerPhase::Provisioning,
        ready: ConditionStatus::False,
        reason: READY_DISK_LEASE_HELD,
        message,
        domain_uuid: None,
    }
}

/// Announces a start of highly-available `server` on this host in its status
/// (`lastStart`), conditional on the version the start was decided on; returns the
/// server as written, or `None` when it changed since (read again into the cache: it
/// may have been failed over). The operator's failovers are conditional too, so of a
/// failover decided before this host came back and this start, the later write is
/// refused: a failover decided on an older version than the announcement cannot land
/// beside the running copy, and one decided on it or later read the host's Lease after
/// it, so it can judge the host lost only after a gap in its renewals. A start goes
/// ahead only if no gap came since the announcement, which therefore holds for every
/// start until the next gap, whatever the cache shows meanwhile.
async fn announce_start(server: &VirtualServer, ctx: &Context) -> Result<Option<VirtualServer>> {
    let count = server.status.as_ref().and_then(|s| s.last_start.as_ref()).map_or(0, |l| l.count) + 1;
    let record = StartRecord { host: ctx.node.clone(), at: Time(Timestamp::now()), count };
    let mut patch = status_patch::<VirtualServer>(json!({"lastStart": record}));
    patch["metadata"] = json!({"resourceVersion": server.resource_version()});
    let api: Api<VirtualServer> = Api::namespaced(ctx.client.clone(), &server.namespace().unwrap_or_default());
    let params = PatchParams::apply(manager::AGENT_START).force();
    match api.patch_status(&server.name_any(), &params, &Patch::Apply(&patch)).await {
        Ok(written) => {
            let _ = ctx.seen.send(written.clone());
            Ok(Some(written))
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            tracing::debug!(server = %server.name_any(), "the server changed before its start; reading it again");
            if let Some(fresh) = api.get_opt(&server.name_any()).await? {
                let _ = ctx.seen.send(fresh);
            }
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether the API server (not the watch cache) has `server` bound to this host.
async fn bound_here_now(server: &VirtualServer, ctx: &Context) -> Result<bool> {
    let api: Api<VirtualServer> = Api::namespaced(ctx.client.clone(), &server.namespace().unwrap_or_default());
    let fresh = api.get_opt(&server.name_any()).await?;
    Ok(fresh.is_some_and(|s| s.uid() == server.uid() && s.bound_to(&ctx.node)))
}

/// The running migration taking this server away from `node`, if any.
fn migrating_away<'a>(server: &'a VirtualServer, node: &str) -> Option<&'a MigrationStatus> {
    let m = server.status.as_ref()?.migration.as_ref()?;
    (m.phase == MigrationPhase::Running && m.source == node).then_some(m)
}

/// The running migration bringing this server to `node`, if any.
fn arriving<'a>(server: &'a VirtualServer, node: &str) -> Option<&'a MigrationStatus> {
    let m = server.status.as_ref()?.migration.as_ref()?;
    (m.phase == MigrationPhase::Running && m.target == node).then_some(m)
}

/// The source's side of a migration: the domain leaves this host, and only then does
/// the status say HandedOff (the operator binds the server to the target on that).
/// Live: libvirt moves the running guest peer to peer and undefines it here; if that
/// fails the guest still runs here and the status says MigrationFailed. Cold: a
/// graceful shutdown (forced after the grace period), then undefine; the disks stay,
/// on shared storage, for the target.
async fn hand_off(server: &VirtualServer, m: &MigrationStatus, ctx: &Context) -> Result<(Outcome, Duration)> {
    let hv = &ctx.hypervisor;
    let uid = server.uid().unwrap_or_default();
    let outcome =
        |phase, ready, reason, message: String, domain_uuid| Outcome { phase, ready, reason, message, domain_uuid };
    let Some(domain) = hv.domain(&uid).await? else {
        ctx.stops.lock().expect("stops lock").remove(&uid);
        let message = format!("the domain left {} for {}", ctx.node, m.target);
        return Ok((
            outcome(VirtualServerPhase::Migrating, ConditionStatus::False, READY_HANDED_OFF, message, None),
            ctx.resync,
        ));
    };
    if domain.active && m.mode.as_deref() == Some("Live") {
        // A migration libvirt still runs (this agent restarted in the middle): wait
        // for it, neither issuing a second one nor calling it failed.
        if hv.job_running(&uid).await? {
            let message = format!("live migration to {} in progress", m.target);
            return Ok((
                outcome(VirtualServerPhase::Migrating, ConditionStatus::True, "Migrating", message, Some(domain.uuid)),
                Duration::from_secs(1),
            ));
        }
        let hosts: Api<Host> = Api::all(ctx.client.clone());
        let address = hosts.get_opt(&m.target).await?.and_then(|h| h.status?.address);
        let result = match address {
            None => Err(format!("host {} has no address to migrate to", m.target)),
            Some(address) => {
                let uri = ctx.peer_uri.replace("{address}", &address);
                let started = Instant::now();
                let result = hv.migrate_live(&uid, &uri, ctx.unsafe_migration).await?;
                if result.is_ok() {
                    let took = started.elapsed();
                    tracing::info!(server = %server.name_any(), %uri, ?took, "live migration done");
                    publish(ctx, server, EventType::Normal, "LiveMigrated", format!("to {} in {took:.1?}", m.target))
                        .await;
                }
                result
            }
        };
        return Ok(match result {
            Ok(()) => {
                let message = format!("live-migrated from {} to {}", ctx.node, m.target);
                (
                    outcome(VirtualServerPhase::Migrating, ConditionStatus::False, READY_HANDED_OFF, message, None),
                    Duration::from_secs(1),
                )
            }
            // libvirt reported an error, yet the guest no longer runs here (the move
            // completed, or the guest stopped): nothing runs here to fall back on.
            Err(e) if !hv.domain(&uid).await?.is_some_and(|d| d.active) => {
                let message = format!(
                    "the domain left {} for {} (libvirt reported: {e}); it no longer runs here",
                    ctx.node, m.target
                );
                (
                    outcome(VirtualServerPhase::Migrating, ConditionStatus::False, READY_HANDED_OFF, message, None),
                    Duration::from_secs(1),
                )
            }
            Err(e) => {
                publish(ctx, server, EventType::Warning, READY_MIGRATION_FAILED, e.clone()).await;
                let message = format!("live migration to {} failed, still running on {}: {e}", m.target, ctx.node);
                (
                    outcome(
                        VirtualServerPhase::Running,
                        ConditionStatus::True,
                        READY_MIGRATION_FAILED,
                        message,
                        Some(domain.uuid),
                    ),
                    ctx.resync,
                )
            }
        });
    }
    if domain.active {
        let waited = ctx.stops.lock().expect("stops lock").get(&uid).map(|t| t.elapsed());
        let force = waited.is_some_and(|w| w >= ctx.stop_grace);
        hv.stop(&uid, force).await?;
        ctx.stops.lock().expect("stops lock").entry(uid.clone()).or_insert_with(Instant::now);
        let message = format!("shutting down on {} to move to {}", ctx.node, m.target);
        return Ok((
            outcome(VirtualServerPhase::Migrating, ConditionStatus::False, "ShuttingDown", message, Some(domain.uuid)),
            Duration::from_secs(1),
        ));
    }
    hv.remove(&uid).await?;
    ctx.stops.lock().expect("stops lock").remove(&uid);
    publish(ctx, server, EventType::Normal, READY_HANDED_OFF, format!("undefined on {} for {}", ctx.node, m.target))
        .await;
    let message = format!("shut down and undefined on {}; its disks stay for {}", ctx.node, m.target);
    Ok((outcome(VirtualServerPhase::Migrating, ConditionStatus::False, READY_HANDED_OFF, message, None), ctx.resync))
}

/// Clones the boot disk and writes the seed ISO; fills in their paths.
async fn prepare_volumes(plan: &mut ServerPlan, ctx: &Context) -> Result<std::result::Result<(), Failure>> {
    let hv = &ctx.hypervisor;
    let disk = &plan.disk;
    let volume = |e: VolumeError| match e {
        VolumeError::StoragePoolNotFound(m) => Failure::new("StoragePoolNotFound", m),
        VolumeError::ImageNotFound(m) => Failure::new("ImageNotFound", m),
        VolumeError::Failed(m) => Failure::new("VolumeFailed", m),
    };
    if let Err(e) = hv.ensure_pool(&disk.storage_pool, disk.storage_path.as_deref()).await? {
        return Ok(Err(volume(e)));
    }
    match hv
        .ensure_volume(&disk.storage_pool, &disk.volume, disk.image_volume.as_deref(), &disk.format, disk.capacity)
        .await?
    {
        Ok(path) => plan.domain.disk_path = path,
        Err(e) => return Ok(Err(volume(e))),
    }
    // An installer ISO is a volume of the pool's storage pool, never a path on the host.
    if let Boot::Cdrom { iso } = &plan.domain.boot {
        let storage = &plan.disk.storage_pool;
        match hv.volume_path(storage, iso).await? {
            Some(path) => plan.domain.boot = Boot::Cdrom { iso: path },
            None => {
                let message = format!("ISO volume {iso} is not in storage pool {storage} on {}", ctx.node);
                return Ok(Err(Failure::new("IsoNotFound", message)));
            }
        }
    }
    let iso = build_iso(&plan.seed, &ctx.work_dir).await?;
    match hv.ensure_file_volume(&disk.storage_pool, &plan.seed_volume, iso).await? {
        Ok(path) => plan.domain.seed_path = Some(path),
        Err(e) => return Ok(Err(volume(e))),
    }
    Ok(Ok(()))
}

/// Removes the domain and its volumes, then releases the finalizer.
async fn clean_up(server: &VirtualServer, ctx: &Context) -> Result<Action> {
    let uid = server.uid().unwrap_or_default();
    ctx.hypervisor.remove(&uid).await?;
    let pool = ctx.pools.state().into_iter().find(|p| p.name_any() == server.spec.host_pool);
    if let Some(pool) = pool {
        let (disk, seed) = volume_names(&server.namespace().unwrap_or_default(), &server.name_any(), &uid);
        let deleted = ctx.hypervisor.delete_volumes(&pool.spec.storage.pool, vec![disk, seed]).await?;
        tracing::info!(server = %server.name_any(), ?deleted, "removed the server's domain and volumes");
    }
    ctx.stops.lock().expect("stops lock").remove(&uid);
    ctx.reported.forget(&uid);
    release_finalizer(&ctx.client, server).await?;
    publish(ctx, server, EventType::Normal, "Removed", format!("domain and disks removed from {}", ctx.node)).await;
    Ok(Action::await_change())
}

/// Drops covi's finalizer, guarded by the resourceVersion so a concurrent change to
/// the list is never overwritten.
pub async fn release_finalizer(client: &Client, server: &VirtualServer) -> Result<()> {
    if !server.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &server.namespace().unwrap_or_default());
    let rest: Vec<_> = server.finalizers().iter().filter(|f| *f != FINALIZER).collect();
    let patch = json!({"metadata": {"finalizers": rest, "resourceVersion": server.resource_version()}});
    match api.patch(&server.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        // Already gone: nothing left to release.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes the agent's status fields, if they changed, by server-side apply.
async fn report(server: &VirtualServer, ctx: &Context, outcome: Outcome) -> Result<()> {
    let status = server.status.clone().unwrap_or_default();
    let mut conditions = status.conditions.clone();
    let generation = server.meta().generation;
    let changed = set_condition(
        &mut conditions,
        condition_type::READY,
        outcome.ready,
        outcome.reason,
        outcome.message.clone(),
        generation,
        Timestamp::now(),
    );
    let same = !changed
        && status.phase == Some(outcome.phase)
        && status.domain_uuid == outcome.domain_uuid
        && status.observed_generation == generation;
    let (uid, based_on, key) =
        (server.uid().unwrap_or_default(), server.resource_version().unwrap_or_default(), format!("{outcome:?}"));
    if same || ctx.reported.written(&uid, &based_on, &key) {
        return Ok(());
    }
    if outcome.phase == VirtualServerPhase::Failed && status.phase != Some(VirtualServerPhase::Failed) {
        publish(ctx, server, EventType::Warning, outcome.reason, outcome.message.clone()).await;
    }
    if outcome.phase == VirtualServerPhase::Stopped && status.phase != Some(VirtualServerPhase::Stopped) {
        publish(ctx, server, EventType::Normal, "Stopped", format!("shut off on {}", ctx.node)).await;
    }
    let ready: Vec<_> = conditions.into_iter().filter(|c| c.type_ == condition_type::READY).collect();
    let mut patch = status_patch::<VirtualServer>(json!({
        "observedGeneration": generation,
        "phase": outcome.phase,
        "conditions": ready,
    }));
    // Omitted rather than null: under server-side apply, leaving a field out is how a
    // manager says it has no value for it.
    if let Some(uuid) = outcome.domain_uuid {
        patch["status"]["domainUuid"] = json!(uuid);
    }
    // Only on top of the version this was decided on: an agent that fell behind (a
    // frozen process, a partition) must not overwrite what the server's new host
    // reported, which that host would not hear of (its Assignment leaves the agent's
    // own fields out). A conflict reads the server again instead.
    patch["metadata"] = json!({"resourceVersion": based_on});
    let api: Api<VirtualServer> = Api::namespaced(ctx.client.clone(), &server.namespace().unwrap_or_default());
    let params = PatchParams::apply(manager::AGENT).force();
    match api.patch_status(&server.name_any(), &params, &Patch::Apply(&patch)).await {
        Ok(written) => {
            ctx.reported.record(&uid, &based_on, &key);
            let _ = ctx.seen.send(written);
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            tracing::debug!(server = %server.name_any(), %based_on, "the server changed since; reading it again");
            if let Some(fresh) = api.get_opt(&server.name_any()).await? {
                let _ = ctx.seen.send(fresh);
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn publish(ctx: &Context, server: &VirtualServer, type_: EventType, reason: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Converge".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &server.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event failed");
    }
}

/// Retries soon after a failure; the error is in the log and the metrics.
pub fn error_policy(server: Arc<VirtualServer>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(server = %server.name_any(), error = %error, "reconcile failed");
    Action::requeue(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::Reported;

    #[test]
    fn an_outcome_is_written_once_per_version_it_was_written_on() {
        let reported = Reported::default();
        assert!(!reported.written("u", "10", "Running"));
        reported.record("u", "10", "Running");
        // The cache still shows version 10: the same outcome was written already.
        assert!(reported.written("u", "10", "Running"));
        // Something else to say on the same version is written.
        assert!(!reported.written("u", "10", "Failed"));
        // A newer version (someone wrote after the agent) is judged as usual.
        assert!(!reported.written("u", "12", "Running"));
        reported.forget("u");
        assert!(!reported.written("u", "10", "Running"));
        reported.record("u", "10", "Running");
        reported.record("v", "3", "Running");
        reported.retain(|uid| uid == "v");
        assert!(!reported.written("u", "10", "Running"), "a server that left is forgotten");
        assert!(reported.written("v", "3", "Running"));
    }

    #[test]
    fn an_announcement_holds_until_the_next_gap_and_leaves_with_its_server() {
        let reported = Reported::default();
        assert!(!reported.announced_at("u", 0));
        reported.record_announcement("u", 0);
        assert!(reported.announced_at("u", 0));
        assert!(!reported.announced_at("u", 1), "a gap since: announce again");
        reported.retain(|uid| uid != "u");
        assert!(!reported.announced_at("u", 0), "a server that left is forgotten");
    }
}
