//! A VirtualServer's status as the operator decides it: the scheduler's decision
//! (binding, pending, invalid, host lost), the Stalled condition, the migration
//! record and expiry.

use std::time::Duration;

use covi_api::condition::{ConditionStatus, find_condition, is_condition_true, set_condition};
use covi_api::contract::{condition_type, manager};
use covi_api::virtual_server::{FailoverRecord, MigrationPhase, MigrationStatus, VirtualServerPhase};
use covi_api::{HostPool, VirtualServer, VirtualServerStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use super::{Conditions, Note, StatusWrite, only};
use crate::scheduler::Decision;

/// A write with the Event it announces.
pub type Update<S> = (StatusWrite<S>, Option<Note>);

/// The status a scheduling decision asks for. A binding is always written (and only
/// if the server is still at the version it was decided on: a second leader, or a
/// pass on a stale cache, gets a conflict instead of binding the server twice);
/// anything else only when it changes what the server says.
pub fn decision(server: &VirtualServer, decision: &Decision, now: Timestamp) -> Option<Update<VirtualServerStatus>> {
    if let Decision::HostLost { host } = decision {
        return Some(host_lost(server, host, now));
    }
    let status = server.status.clone().unwrap_or_default();
    let generation = server.meta().generation;
    let mut conditions = status.conditions.clone();
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
        Decision::HostLost { .. } => unreachable!("returned above"),
    };
    let mut changed =
        set_condition(&mut conditions, condition_type::SCHEDULED, scheduled, reason, message.clone(), generation, now);
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
    let bind = matches!(decision, Decision::Bind { .. });
    if !bind && !changed && status.phase == Some(phase) && status.observed_generation == generation {
        return None;
    }
    let mut desired = VirtualServerStatus {
        observed_generation: generation,
        phase: Some(phase),
        conditions: only(&conditions, &[condition_type::SCHEDULED, condition_type::READY]),
        // A server waiting for room elsewhere keeps its address, and every server
        // its failover record.
        address: status.address.clone(),
        failovers: status.failovers.clone(),
        ..Default::default()
    };
    if let Decision::Bind { host, address, cpus, memory, failover_from, .. } = decision {
        desired.host = Some(host.clone());
        desired.cpus = Some(*cpus);
        desired.memory = Some(memory.clone());
        desired.address = address.map(|a| a.to_string());
        if let Some(from) = failover_from {
            let record =
                FailoverRecord { from: from.clone(), to: host.clone(), at: Time(now), reason: "HostLost".into() };
            desired.failovers.push(record);
        }
    }
    let note = match decision {
        Decision::Bind { failover_from: Some(_), .. } => Note::warning("FailedOver", message, "Schedule"),
        Decision::Bind { migrated_from: Some(_), .. } => Note::normal("HandedOver", message, "Schedule"),
        Decision::Bind { .. } => Note::normal("Scheduled", message, "Schedule"),
        Decision::Pending { .. } => Note::warning("FailedScheduling", message, "Schedule"),
        _ => Note::warning(reason, message, "Schedule"),
    };
    let mut write = StatusWrite::new(manager::OPERATOR, desired);
    if bind {
        write.resource_version = server.resource_version();
    }
    Some((write, Some(note)))
}

/// The request a plain binding of `server` is announced on instead of the server
/// itself: a burst of a request's servers bound in one pass is one Event on the
/// request, not one per server. Failovers and hand-overs are always the server's own.
pub fn announced_on_request(
    server: &VirtualServer,
    decision: &Decision,
) -> Option<k8s_openapi::api::core::v1::ObjectReference> {
    if !matches!(decision, Decision::Bind { failover_from: None, migrated_from: None, .. }) {
        return None;
    }
    let owner = server.owner_references().iter().find(|o| o.kind == "VmRequest" && o.controller == Some(true))?;
    Some(k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(owner.api_version.clone()),
        kind: Some(owner.kind.clone()),
        name: Some(owner.name.clone()),
        namespace: server.namespace(),
        uid: Some(owner.uid.clone()),
        ..Default::default()
    })
}

/// Servers named in one request's Scheduled Event at most; the rest are counted.
const NAMED_IN_ONE_EVENT: usize = 8;

/// Bytes of servers' names in one Event at most: an Event's note is limited to 1 kB.
const NAMES_IN_ONE_EVENT: usize = 900;

/// The Scheduled Event of a request whose servers `placed` ("name on host") were bound
/// in one pass.
pub fn scheduled_together(placed: &[String]) -> Note {
    let mut named: Vec<&str> = Vec::new();
    let mut bytes = 0;
    for p in placed.iter().take(NAMED_IN_ONE_EVENT) {
        if bytes + p.len() + 2 > NAMES_IN_ONE_EVENT {
            break;
        }
        bytes += p.len() + 2;
        named.push(p);
    }
    let more = placed.len() - named.len();
    let servers = if placed.len() == 1 { "server" } else { "servers" };
    let mut message = format!("scheduled {} {servers}: {}", placed.len(), named.join(", "));
    if more > 0 {
        message.push_str(&format!(" and {more} more"));
    }
    Note::normal("Scheduled", message, "Schedule")
}

/// A server that is not highly available (or whose disk stays behind) stays on its
/// lost host, Failed: it runs again if the host comes back. Written for the silent
/// agent, whose next apply takes phase and Ready back.
fn host_lost(server: &VirtualServer, host: &str, now: Timestamp) -> Update<VirtualServerStatus> {
    let mut conditions = server.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let message = if server.spec.high_availability {
        format!(
            "host {host} was lost; the server is highly available, but pool {}'s storage is not shared (storage.shared: false), so elsewhere it would boot from a blank disk: it runs again if the host returns",
            server.spec.host_pool
        )
    } else {
        format!("host {host} was lost and the server is not highly available; it runs again if the host returns")
    };
    let generation = server.meta().generation;
    set_condition(
        &mut conditions,
        condition_type::READY,
        ConditionStatus::False,
        covi_api::virtual_server::READY_HOST_LOST,
        &message,
        generation,
        now,
    );
    let desired = VirtualServerStatus {
        phase: Some(VirtualServerPhase::Failed),
        conditions: only(&conditions, &[condition_type::READY]),
        ..Default::default()
    };
    (StatusWrite::new(manager::OPERATOR_FOR_AGENT, desired), Some(Note::warning("HostLost", message, "Failover")))
}

/// The server's Stalled condition, in step with its phase (see
/// [`crate::readiness::server_stalled`]), when it differs from what the server says.
pub fn stalled(server: &VirtualServer, now: Timestamp) -> Option<StatusWrite<Conditions>> {
    if server.meta().deletion_timestamp.is_some() {
        return None;
    }
    let status = server.status.as_ref()?;
    let desired = crate::readiness::server_stalled(status)?;
    if desired.matches(find_condition(&status.conditions, condition_type::STALLED)) {
        return None;
    }
    let mut conditions = status.conditions.clone();
    let generation = server.meta().generation;
    let (st, reason) = (desired.status, desired.reason.as_str());
    set_condition(&mut conditions, condition_type::STALLED, st, reason, desired.message, generation, now);
    let conditions = only(&conditions, &[condition_type::STALLED]);
    Some(StatusWrite::new(manager::OPERATOR_STALLED, Conditions { conditions }))
}

/// The migration record `record` (None: the move is called off and the record goes),
/// with an Event when its phase or reason changes.
pub fn migration(server: &VirtualServer, record: Option<&MigrationStatus>) -> Update<VirtualServerStatus> {
    let desired = VirtualServerStatus { migration: record.cloned(), ..Default::default() };
    let before = server.status.as_ref().and_then(|s| s.migration.as_ref());
    let note = match record {
        None => Some(Note::normal("MigrationCancelled", "the move was called off before it started", "Migrate")),
        Some(m) if before.map(|b| (b.phase, &b.reason)) == Some((m.phase, &m.reason)) => None,
        Some(m) => {
            let what = format!("from {} to {}", m.source, m.target);
            let reason = m.reason.clone().unwrap_or_default();
            Some(match m.phase {
                MigrationPhase::Pending => {
                    Note::normal("MigrationPending", format!("{what} waits: {reason}"), "Migrate")
                }
                MigrationPhase::Running => {
                    let mode = m.mode.clone().unwrap_or_default();
                    Note::normal("MigrationStarted", format!("{what} ({mode})"), "Migrate")
                }
                MigrationPhase::Succeeded => Note::normal("Migrated", format!("moved {what}"), "Migrate"),
                MigrationPhase::Failed => Note::warning("MigrationFailed", format!("{what}: {reason}"), "Migrate"),
            })
        }
    };
    (StatusWrite::new(manager::OPERATOR_MIGRATION, desired), note)
}

/// What `spec.expiresAt` asks of a standalone server now.
#[derive(Clone, Debug, PartialEq)]
pub enum Expiry {
    /// The time has passed: delete it (and say so).
    Delete(Note),
    /// The time is near: say so on the server, once.
    Warn(StatusWrite<Conditions>, Note),
}

/// How long before expiry a warning goes out when the pool does not say.
pub const DEFAULT_EXPIRY_WARNING: Duration = Duration::from_secs(24 * 3600);

/// The pool's `approval.expiryWarning`, or a day.
pub fn expiry_warning(pool: Option<&HostPool>) -> Duration {
    pool.and_then(|p| p.spec.approval.as_ref())
        .and_then(|a| a.expiry_warning.as_deref())
        .and_then(covi_api::duration::parse)
        .unwrap_or(DEFAULT_EXPIRY_WARNING)
}

/// Standalone servers honour `spec.expiresAt`: an ExpiringSoon warning (the pool's
/// expiryWarning before, at most half the server's life), then deletion.
pub fn expiry(server: &VirtualServer, pool: Option<&HostPool>, now: Timestamp) -> Option<Expiry> {
    let at = server.spec.expires_at.as_ref()?.0;
    if server.meta().deletion_timestamp.is_some() {
        return None;
    }
    if at <= now {
        return Some(Expiry::Delete(Note::normal(
            "Expired",
            "spec.expiresAt has passed; the server is deleted",
            "Expire",
        )));
    }
    let conditions = server.status.as_ref().map(|st| st.conditions.as_slice()).unwrap_or_default();
    if is_condition_true(conditions, condition_type::EXPIRING_SOON) {
        return None;
    }
    let configured = expiry_warning(pool);
    let life = server.creation_timestamp().map(|c| at.duration_since(c.0)).and_then(|d| Duration::try_from(d).ok());
    let warn = life.map(|l| configured.min(l / 2)).unwrap_or(configured);
    if now + warn < at {
        return None;
    }
    let message = format!("the server is deleted at {at} (spec.expiresAt)");
    let mut conditions = Vec::new();
    let generation = server.meta().generation;
    let st = ConditionStatus::True;
    set_condition(&mut conditions, condition_type::EXPIRING_SOON, st, "ExpiresAt", &message, generation, now);
    let write = StatusWrite::new(manager::OPERATOR_EXPIRY, Conditions { conditions });
    Some(Expiry::Warn(write, Note::warning("ExpiringSoon", message, "Expire")))
}

#[cfg(test)]
mod tests;
