//! Moving servers between hosts, as a pure function of one pool's view: which
//! migrations start, wait, hand over, succeed or fail, and what maintenance cannot move.
//!
//! The protocol never lets two copies run: the operator records a Running migration;
//! the source agent shuts the domain down and undefines it (cold) or live-migrates it,
//! then reports Ready=False HandedOff; only then does the operator bind the server to
//! the target, whose agent defines and starts it from the same shared volume (or adopts
//! the live-migrated domain). A failure before the hand-over leaves the server on the
//! source. After a cold hand-over nothing runs anywhere, so a failure on the target
//! binds it back to the source, which starts it again; after a live one the guest runs
//! on the target and belongs there, whatever happens next. A host lost meanwhile goes
//! down the failover path like any other, except that a source lost during a live
//! migration hands the server to the target (the scheduler's `to_live_target`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use covi_api::condition::find_condition;
use covi_api::contract::condition_type;
use covi_api::host::UnmovableServer;
use covi_api::host_pool::Hypervisor;
use covi_api::virtual_server::{
    MigrationPhase, MigrationStatus, READY_HANDED_OFF, READY_MIGRATION_FAILED, VirtualServerPhase,
};
use covi_api::{HostPool, VirtualServer};
use covi_placement::{Demand, Pool};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use crate::scheduler::{Decision, PoolView, bound_host, holds, live_facts, rules};

/// What to do about one server's migration.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Write this migration record (Pending, Running, Succeeded or Failed).
    Record(MigrationStatus),
    /// Remove the record: the move was called off before it started.
    Cancel,
    /// The source handed the server off: bind it to `target`.
    HandOver { source: String, target: String },
    /// The target could not run it: bind it back to the source, recording the failure.
    Return { target: String, record: MigrationStatus },
}

/// The pass's result for one pool.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<(Arc<VirtualServer>, Action)>,
    /// Hosts in maintenance: the servers that cannot move, and why.
    pub unmovable: BTreeMap<String, Vec<UnmovableServer>>,
}

/// In a pool consolidating automatically, where the pool's current plan moves
/// `server` from `host` (the plan lives in the pool's status, so a new leader follows it).
fn consolidation_target(pool: &HostPool, server: &VirtualServer, host: &str, now: Timestamp) -> Option<String> {
    let c = &pool.spec.consolidation;
    if c.mode != covi_api::host_pool::ConsolidationMode::Automatic || !c.in_window(now) {
        return None;
    }
    let plan = pool.status.as_ref()?.consolidation.as_ref()?;
    let me = key(server);
    plan.moves.iter().find(|m| m.server == me && m.from == host).map(|m| m.to.clone())
}

fn key(server: &VirtualServer) -> String {
    format!("{}/{}", server.namespace().unwrap_or_default(), server.name_any())
}

fn ready_reason(server: &VirtualServer) -> Option<(&str, &str, &str)> {
    let c = find_condition(&server.status.as_ref()?.conditions, condition_type::READY)?;
    Some((c.status.as_str(), c.reason.as_str(), c.message.as_str()))
}

fn finished(m: &MigrationStatus, phase: MigrationPhase, reason: Option<String>, now: Timestamp) -> MigrationStatus {
    MigrationStatus { phase, finished_at: Some(Time(now)), reason, ..m.clone() }
}

/// Plans every migration of `pool`. `members` are its hosts, `servers` its servers;
/// `unready` and `lost` as for the scheduling pass; `skip` (UIDs) are servers the
/// scheduling pass just rebound, left alone until the next pass sees their new status.
pub fn plan_moves(view: &PoolView, skip: &BTreeSet<String>, now: Timestamp) -> Plan {
    let PoolView { pool, hosts: members, servers, assumed, unready, lost } = view;
    let (pool, assumed, unready, lost) = (*pool, *assumed, *unready, *lost);
    let facts = live_facts(members, unready);
    let maintenance: BTreeSet<String> = members.iter().filter(|h| h.spec.maintenance).map(|h| h.name_any()).collect();
    let ready_hosts: BTreeSet<&str> = facts.iter().filter(|f| f.ready).map(|f| f.name.as_str()).collect();
    let mut plan = Plan::default();
    for host in &maintenance {
        plan.unmovable.insert(host.clone(), Vec::new());
    }

    // Everything bound counts against capacity, and a running migration also holds
    // room on its target.
    let mut bound = Vec::new();
    let mut running = 0u32;
    for s in servers.iter().filter(|s| s.meta().deletion_timestamp.is_none()) {
        let Some(host) = bound_host(s, assumed) else { continue };
        bound.extend(holds(pool, s, host));
        if s.active_migration().is_some_and(|m| m.phase == MigrationPhase::Running) {
            running += 1;
        }
    }
    let rules = rules(pool);
    let mut placement = Pool::new(&rules, &facts, &bound);
    let slots = pool.spec.migration.max_concurrent;
    let shared = pool.spec.storage.shared;

    // Oldest first, so the order of moves is stable from pass to pass.
    let mut ordered: Vec<&Arc<VirtualServer>> = servers
        .iter()
        .filter(|s| s.meta().deletion_timestamp.is_none())
        .filter(|s| s.metadata.uid.as_ref().is_none_or(|uid| !skip.contains(uid)))
        .collect();
    // Keys borrowed, not cloned: a pass sorts every server of the pool.
    fn key(s: &VirtualServer) -> (Option<Timestamp>, Option<&str>) {
        (s.metadata.creation_timestamp.as_ref().map(|t| t.0), s.metadata.name.as_deref())
    }
    ordered.sort_by(|a, b| key(a).cmp(&key(b)));
    let no_status = covi_api::VirtualServerStatus::default();

    for server in ordered {
        let Some(host) = bound_host(server, assumed).map(str::to_string) else {
            // Unbound while moving: failover took it off a lost host and waits for room.
            if let Some(m) = server.active_migration().filter(|m| m.phase == MigrationPhase::Running) {
                let why = "the server lost its host in the middle of the move; failover places it again";
                plan.actions
                    .push((server.clone(), Action::Record(finished(m, MigrationPhase::Failed, Some(why.into()), now))));
            }
            continue;
        };
        let status = server.status.as_ref().unwrap_or(&no_status);
        let pin = server.spec.placement.as_ref().and_then(|p| p.host.clone());
        let in_maintenance = maintenance.contains(&host);
        let consolidate = consolidation_target(pool, server, &host, now);

        // A migration under way follows the protocol.
        if let Some(m) = server.active_migration().filter(|m| m.phase == MigrationPhase::Running) {
            if let Some(action) = follow(server, m, &host, &ready_hosts, lost, now) {
                plan.actions.push((server.clone(), action));
            }
            continue;
        }

        // Is a move wanted, and to where?
        let wanted_target = match (&pin, in_maintenance) {
            (Some(p), _) if *p != host => Some(Some(p.clone())),
            (Some(_), true) => {
                unmovable(&mut plan, &host, server, "PinnedToHost", "spec.placement.host pins it to this host");
                None
            }
            (None, true) => Some(None),
            (None, false) => consolidate.map(Some),
            _ => None,
        };
        let Some(target) = wanted_target else {
            if server.active_migration().is_some() {
                // Pending, and no longer wanted (the pin was reverted): called off.
                plan.actions.push((server.clone(), Action::Cancel));
            }
            continue;
        };
        // Don't try again what failed, until the spec changes the target.
        if let Some(m) = &status.migration
            && m.phase == MigrationPhase::Failed
            && m.source == host
            && (target.is_none() || target.as_deref() == Some(m.target.as_str()))
        {
            if in_maintenance {
                let message = format!("the last move to {} failed: {}", m.target, m.reason.clone().unwrap_or_default());
                unmovable(&mut plan, &host, server, "MigrationFailed", &message);
            }
            continue;
        }
        // Listed on the host in maintenance; a requested target also gets a Pending record.
        let blocked = |plan: &mut Plan, reason: &str, message: String| {
            if in_maintenance {
                unmovable(plan, &host, server, reason, &message);
            }
            let Some(target) = &target else { return };
            let record = MigrationStatus {
                source: host.clone(),
                target: target.clone(),
                phase: MigrationPhase::Pending,
                mode: None,
                started_at: None,
                finished_at: None,
                reason: Some(format!("{reason}: {message}")),
            };
            if status.migration.as_ref() != Some(&record) {
                plan.actions.push((server.clone(), Action::Record(record)));
            }
        };
        if !shared {
            let message = format!("pool {} has no shared storage (storage.shared is false)", pool.name_any());
            blocked(&mut plan, "NoSharedStorage", message);
            continue;
        }
        let phase = status.phase;
        if !matches!(phase, Some(VirtualServerPhase::Running) | Some(VirtualServerPhase::Stopped)) {
            let message = format!("the server is {:?}; it moves once it is Running or Stopped", phase);
            blocked(&mut plan, "NotRunning", message);
            continue;
        }
        let Ok(size) = pool.size_of(&server.spec) else { continue };
        // Moving is not admission: reserve_hosts does not hold back maintenance or a
        // person's pin. A consolidation move is covi's own choice: it must keep the
        // N+1 reserve when it starts, not only when it was planned.
        let demand = Demand {
            pinned_host: target.clone(),
            ..crate::scheduler::demand(server, &size, pin.is_some() || in_maintenance)
        };
        // The source is excluded: in maintenance it is cordoned, and a pin names another host.
        let mut trial = placement.clone();
        let chosen = match trial.place(&demand) {
            Ok(h) => h,
            Err(misfit) => {
                blocked(&mut plan, misfit.reason, misfit.message);
                continue;
            }
        };
        if running >= slots {
            // Waiting for a slot, not for room: the target may change when it starts.
            let message = format!("{running} migrations run in the pool, at most {slots} at a time");
            let record = MigrationStatus {
                source: host.clone(),
                target: chosen,
                phase: MigrationPhase::Pending,
                mode: None,
                started_at: None,
                finished_at: None,
                reason: Some(format!("WaitingForSlot: {message}")),
            };
            if status.migration.as_ref().map(|m| (m.phase, &m.reason)) != Some((record.phase, &record.reason)) {
                plan.actions.push((server.clone(), Action::Record(record)));
            }
            continue;
        }
        placement = trial;
        running += 1;
        let live = pool.spec.hypervisor != Hypervisor::Test && phase == Some(VirtualServerPhase::Running);
        let record = MigrationStatus {
            source: host.clone(),
            target: chosen,
            phase: MigrationPhase::Running,
            mode: Some(if live { "Live" } else { "Cold" }.to_string()),
            started_at: Some(Time(now)),
            finished_at: None,
            reason: None,
        };
        plan.actions.push((server.clone(), Action::Record(record)));
    }
    plan
}

/// The next step of a Running migration, by where the server is bound now.
fn follow(
    server: &VirtualServer,
    m: &MigrationStatus,
    host: &str,
    ready_hosts: &BTreeSet<&str>,
    lost: &BTreeSet<String>,
    now: Timestamp,
) -> Option<Action> {
    let fail = |why: String| Some(Action::Record(finished(m, MigrationPhase::Failed, Some(why), now)));
    let phase = server.status.as_ref().and_then(|s| s.phase);
    let ready = ready_reason(server);
    if host == m.source {
        return match ready {
            Some((_, READY_HANDED_OFF, _)) if phase == Some(VirtualServerPhase::Migrating) => {
                // Live: the guest runs on the target now and belongs there, Ready or not
                // (a new leader has confirmed no host yet), and whatever became of the
                // source since (lost while failover pauses, it would start the server
                // again beside the moved guest when it answers); a sick target goes
                // down the failover path from there, never back to the source.
                if live(m) || ready_hosts.contains(m.target.as_str()) {
                    Some(Action::HandOver { source: m.source.clone(), target: m.target.clone() })
                } else {
                    // Cold: nothing runs anywhere now: the source starts it again.
                    fail(format!("the target host {} is not ready; the server starts again on {host}", m.target))
                }
            }
            Some((_, READY_MIGRATION_FAILED, message)) => fail(message.to_string()),
            // Lost before it said how a live move went: libvirt may have finished it,
            // and the guest run on the target. Failing the move would let the source
            // start the server beside it when it answers; it stays open until failover
            // binds the server to the target or the source answers.
            _ if lost.contains(host) && live(m) => None,
            _ if lost.contains(host) => fail(format!("the source host {host} was lost; failover takes over")),
            _ => None,
        };
    }
    // Failover rebound it after the source was lost: whatever host it runs on now, the
    // move did not happen.
    let started = m.started_at.as_ref().map(|t| t.0);
    let failed_over = server
        .status
        .as_ref()
        .is_some_and(|s| s.failovers.iter().any(|f| f.from == m.source && started.is_none_or(|t| f.at.0 >= t)));
    if failed_over && host == m.target {
        return fail(format!(
            "the source host {} was lost during the live migration; the server continues on {host}",
            m.source
        ));
    }
    if failed_over {
        return fail(format!("the source host {} was lost; failover restarted the server on {host}", m.source));
    }
    if host == m.target {
        if lost.contains(host) {
            return fail(format!("the target host {host} was lost; failover takes over"));
        }
        return match (phase, ready) {
            // The guest was live-migrated here and runs here: sending it back would
            // start a second copy on the source. It stays, with the failure on record.
            (Some(VirtualServerPhase::Failed), Some((_, reason, message))) if live(m) => {
                fail(format!("{reason}: {message}; the live-migrated guest stays on {host}"))
            }
            (Some(VirtualServerPhase::Failed), Some((_, reason, message))) => Some(Action::Return {
                target: m.source.clone(),
                record: finished(m, MigrationPhase::Failed, Some(format!("{reason}: {message}")), now),
            }),
            (Some(VirtualServerPhase::Running | VirtualServerPhase::Stopped), Some(("True", _, _))) => {
                Some(Action::Record(finished(m, MigrationPhase::Succeeded, None, now)))
            }
            _ => None,
        };
    }
    fail(format!("the server is now bound to {host}"))
}

fn live(m: &MigrationStatus) -> bool {
    m.mode.as_deref() == Some("Live")
}

/// A host's Evacuated condition: absent unless in maintenance; True once no server is
/// bound to it; False while servers remain, saying which cannot move and why.
pub fn evacuation(
    maintenance: bool,
    servers_left: usize,
    unmovable: &[UnmovableServer],
) -> Option<(covi_api::ConditionStatus, &'static str, String)> {
    use covi_api::ConditionStatus;
    if !maintenance {
        return None;
    }
    if servers_left == 0 {
        return Some((ConditionStatus::True, "Evacuated", "every server has moved off; the host is cordoned".into()));
    }
    if unmovable.is_empty() {
        return Some((ConditionStatus::False, "Evacuating", format!("{servers_left} servers left to move")));
    }
    let stuck: Vec<String> = unmovable.iter().map(|u| format!("{} ({}: {})", u.server, u.reason, u.message)).collect();
    Some((
        ConditionStatus::False,
        "Blocked",
        format!("{servers_left} servers left; {} cannot move and keep running here: {}", stuck.len(), stuck.join("; ")),
    ))
}

fn unmovable(plan: &mut Plan, host: &str, server: &VirtualServer, reason: &str, message: &str) {
    if let Some(list) = plan.unmovable.get_mut(host) {
        list.push(UnmovableServer { server: key(server), reason: reason.into(), message: message.into() });
    }
}

/// The binding that hands `server` over from `from` to `to`: same address, same size.
pub fn hand_over(pool: &HostPool, server: &VirtualServer, from: String, to: String) -> Decision {
    let status = server.status.clone().unwrap_or_default();
    let size = pool.size_of(&server.spec).ok();
    Decision::Bind {
        host: to,
        address: status.address.as_deref().and_then(|a| a.parse().ok()),
        cpus: status.cpus.or(size.as_ref().map(|s| s.cpus)).unwrap_or(0),
        memory: status.memory.clone().or(size.map(|s| covi_placement::format_mib(s.memory_mib))).unwrap_or_default(),
        failover_from: None,
        migrated_from: Some(from),
    }
}

#[cfg(test)]
mod tests;
