//! A VmRequest's servers and status as the operator decides them: which servers to
//! create and delete (approval, replicas, quota, lifetime) and what the request's
//! status says about it.

use std::collections::BTreeSet;

use covi_api::condition::{ConditionStatus, find_condition, is_condition_true, set_condition};
use covi_api::contract::{REQUEST_LABEL, condition_type, manager};
use covi_api::vm_request::{VmRequestPhase, VmRequestStatus};
use covi_api::{HostPool, VirtualServer, VmRequest};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Resource, ResourceExt};

use super::{Note, StatusWrite};
use crate::requests::{Approval, approval, over_quota, progress, reconcile_replicas};

/// What the controller knows about one request.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    pub request: &'a VmRequest,
    /// The pool its template names, if it exists.
    pub pool: Option<&'a HostPool>,
    /// The servers it owns.
    pub servers: &'a [&'a VirtualServer],
    /// Servers of its namespace created earlier that the cache does not show yet.
    pub in_flight: &'a BTreeSet<String>,
    /// What its namespace holds in the pool (servers, CPUs, MiB), in-flight included;
    /// read only when the request has servers to create (zero may stand for it
    /// otherwise).
    pub held: (u32, u64, u64),
}

/// The request's plan: servers to create and delete, then its status.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub create: Vec<String>,
    pub delete: Vec<String>,
    /// None when the request already says all of it.
    pub status: Option<StatusWrite<VmRequestStatus>>,
    pub notes: Vec<Note>,
    /// When the request changes by the clock alone (its expiry warning, its expiry).
    pub revisit_at: Option<Timestamp>,
}

/// Conditions the operator owns on a request (Approved too when the pool's policy
/// approved it).
const OWNED: [&str; 7] = [
    condition_type::FULFILLED,
    condition_type::EXPIRED,
    condition_type::EXPIRING_SOON,
    condition_type::QUOTA_EXCEEDED,
    condition_type::APPROVAL_OUTDATED,
    condition_type::READY,
    condition_type::STALLED,
];

/// Brings a request's servers in line with its approval, replicas and lifetime.
pub fn plan(facts: Facts, now: Timestamp) -> Plan {
    let Facts { request, pool, servers, in_flight, held } = facts;
    let name = request.name_any();
    let ns = request.namespace().unwrap_or_default();
    let status = request.status.clone().unwrap_or_default();
    let generation = request.meta().generation;
    let mut conditions = status.conditions.clone();
    let mut notes = Vec::new();
    let (mut create, mut delete) = (Vec::new(), Vec::new());
    let mut desired = VmRequestStatus {
        observed_generation: generation,
        replicas: servers.len() as i32,
        ready_replicas: servers.iter().filter(|s| s.is_ready()).count() as i32,
        selector: Some(format!("{REQUEST_LABEL}={name}")),
        ..Default::default()
    };
    let mut revisit_at = None;
    let decision = approval(request, pool);
    // Outgrown approvals: the request keeps what it has and waits for a new approval.
    match &decision {
        Approval::Outdated { changes } => {
            let message = format!("{changes}; an approver must approve generation {}", generation.unwrap_or(0));
            let st = ConditionStatus::True;
            let outdated = condition_type::APPROVAL_OUTDATED;
            if set_condition(&mut conditions, outdated, st, "ChangedSinceApproval", &message, generation, now) {
                notes.push(Note::warning("ChangedSinceApproval", message, "Request"));
            }
            desired.approved = status.approved.clone();
        }
        _ if conditions.iter().any(|c| c.type_ == condition_type::APPROVAL_OUTDATED) => {
            let message = "the approval covers the request as it is";
            let st = ConditionStatus::False;
            set_condition(&mut conditions, condition_type::APPROVAL_OUTDATED, st, "Covered", message, generation, now);
        }
        _ => {}
    }
    let phase = match decision {
        Approval::Pending => VmRequestPhase::Pending,
        Approval::Denied { message } => {
            if status.phase != Some(VmRequestPhase::Denied) {
                notes.push(Note::normal("Denied", message, "Request"));
            }
            VmRequestPhase::Denied
        }
        Approval::Approved { .. } | Approval::Outdated { .. } => {
            let may_grow = match &decision {
                Approval::Approved { auto, covers } => {
                    desired.approved = Some((**covers).clone());
                    let named = find_condition(&conditions, condition_type::APPROVED)
                        .filter(|c| c.status == "True")
                        .and_then(|c| c.observed_generation);
                    if *auto && named != Some(covers.generation) {
                        let message = "within the pool's auto-approval policy";
                        let (st, at) = (ConditionStatus::True, Some(covers.generation));
                        set_condition(&mut conditions, condition_type::APPROVED, st, "AutoApproved", message, at, now);
                        notes.push(Note::normal("Approved", message, "Request"));
                    } else if matches!(status.phase, None | Some(VmRequestPhase::Pending)) {
                        notes.push(Note::normal("Approved", "approved", "Request"));
                    }
                    true
                }
                _ => false,
            };
            let warning = super::server::expiry_warning(pool);
            let p = progress(request, servers, warning, now);
            if p.expired {
                delete.extend(servers.iter().filter(|s| s.meta().deletion_timestamp.is_none()).map(|s| s.name_any()));
                if status.phase != Some(VmRequestPhase::Expired) {
                    let lifetime = request.spec.lifetime.as_deref().unwrap_or_default();
                    let message = format!("the lifetime {lifetime} ended; its servers are deleted");
                    let st = ConditionStatus::True;
                    set_condition(
                        &mut conditions,
                        condition_type::EXPIRED,
                        st,
                        "LifetimeEnded",
                        &message,
                        generation,
                        now,
                    );
                    notes.push(Note::normal("Expired", message, "Request"));
                }
            } else {
                let existing: Vec<String> = servers.iter().map(|s| s.name_any()).collect();
                let (grow, shrink) = reconcile_replicas(&name, request.spec.replicas, &existing);
                // Created earlier but not in the cache yet: not again.
                create = if may_grow { grow.into_iter().filter(|s| !in_flight.contains(s)).collect() } else { vec![] };
                delete = shrink;
                // Quota: all of the growth fits, or none of it is created.
                let quota = match (pool, create.is_empty()) {
                    (Some(pool), false) => pool.size_of(&request.spec.template.spec).ok().and_then(|size| {
                        let n = create.len() as u32;
                        let adding = (n, u64::from(size.cpus) * u64::from(n), size.memory_mib * u64::from(n));
                        over_quota(pool, &ns, held, adding)
                    }),
                    _ => None,
                };
                let exceeded = condition_type::QUOTA_EXCEEDED;
                match quota {
                    Some(message) => {
                        let st = ConditionStatus::True;
                        if set_condition(&mut conditions, exceeded, st, "OverQuota", &message, generation, now) {
                            notes.push(Note::warning("QuotaExceeded", message, "Request"));
                        }
                        create.clear();
                    }
                    None if conditions.iter().any(|c| c.type_ == exceeded) => {
                        let message = "the request fits the namespace's quota";
                        let st = ConditionStatus::False;
                        set_condition(&mut conditions, exceeded, st, "WithinQuota", message, generation, now);
                    }
                    None => {}
                }
                if !create.is_empty() && status.phase != Some(VmRequestPhase::Provisioning) {
                    notes.push(Note::normal("Provisioning", format!("creating {} servers", create.len()), "Request"));
                }
                let replicas = request.spec.replicas;
                let fulfilled = p.fulfilled && create.is_empty() && delete.is_empty();
                if fulfilled && status.phase != Some(VmRequestPhase::Fulfilled) {
                    notes.push(Note::normal("Fulfilled", format!("all {replicas} servers are Ready"), "Request"));
                }
                let (st, reason) = if fulfilled {
                    (ConditionStatus::True, "AllReady")
                } else {
                    (ConditionStatus::False, "Provisioning")
                };
                let message = format!("{} of {replicas} servers Ready", p.ready);
                set_condition(&mut conditions, condition_type::FULFILLED, st, reason, message, generation, now);
                if p.expiring_soon && !is_condition_true(&conditions, condition_type::EXPIRING_SOON) {
                    let at = p.expires_at.map(|t| t.to_string()).unwrap_or_default();
                    let message = format!("the servers are deleted at {at}");
                    let st = ConditionStatus::True;
                    let soon = condition_type::EXPIRING_SOON;
                    set_condition(&mut conditions, soon, st, "LifetimeEnding", &message, generation, now);
                    notes.push(Note::warning("ExpiringSoon", message, "Request"));
                }
                revisit_at = p.expires_at.map(|at| {
                    let life = request.spec.lifetime.as_deref().and_then(covi_api::duration::parse);
                    let warn = life.map(|l| warning.min(l / 2)).unwrap_or(warning);
                    let warn_at = at - SignedDuration::try_from(warn).unwrap_or(SignedDuration::ZERO);
                    if warn_at > now { warn_at } else { at }
                });
            }
            desired.expires_at = p.expires_at.map(Time);
            desired.ready_replicas = p.ready;
            let blocked = is_condition_true(&conditions, condition_type::QUOTA_EXCEEDED);
            if (blocked && servers.is_empty()) || !may_grow { VmRequestPhase::Pending } else { p.phase }
        }
    };
    desired.phase = Some(phase);
    for (type_, d) in crate::readiness::request_conditions(phase, &conditions) {
        set_condition(&mut conditions, type_, d.status, &d.reason, d.message, generation, now);
    }
    desired.conditions = owned_conditions(&conditions);
    // Write only when something the operator owns differs.
    let current = VmRequestStatus {
        observed_generation: status.observed_generation,
        phase: status.phase,
        replicas: status.replicas,
        ready_replicas: status.ready_replicas,
        selector: status.selector.clone(),
        expires_at: status.expires_at.clone(),
        approved: status.approved.clone(),
        conditions: owned_conditions(&status.conditions),
    };
    let status =
        if notes.is_empty() && current == desired { None } else { Some(StatusWrite::new(manager::OPERATOR, desired)) };
    Plan { create, delete, status, notes, revisit_at }
}

/// The operator's conditions among `all`: [`OWNED`], and Approved when the pool's
/// policy (not a person) approved.
fn owned_conditions(all: &[covi_api::Condition]) -> Vec<covi_api::Condition> {
    let auto = all.iter().any(|c| c.type_ == condition_type::APPROVED && c.reason == "AutoApproved");
    all.iter()
        .filter(|c| OWNED.contains(&c.type_.as_str()) || (auto && c.type_ == condition_type::APPROVED))
        .cloned()
        .collect()
}

/// The body POSTed to the pool's webhook for a note that concerns the requester
/// (Fulfilled, ExpiringSoon), if it does.
pub fn webhook_body(request: &VmRequest, servers: &[&VirtualServer], note: &Note) -> Option<serde_json::Value> {
    if note.reason != "Fulfilled" && note.reason != "ExpiringSoon" {
        return None;
    }
    Some(serde_json::json!({
        "event": note.reason, "namespace": request.namespace(), "request": request.name_any(),
        "message": note.message, "requester": request.spec.requester,
        "servers": servers.iter().map(|s| s.name_any()).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests;
