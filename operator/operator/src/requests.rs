//! VmRequests: the approval gate, the servers a request owns, fulfilment and expiry.
//! Decisions are pure functions of the request, its pool and its servers.

use std::collections::BTreeSet;
use std::time::Duration;

use covi_api::condition::find_condition;
use covi_api::vm_request::VmRequestPhase;
use covi_api::{HostPool, VirtualServer, VmRequest};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

/// Label every server of a request carries.
pub const REQUEST_LABEL: &str = "covi.io/request";

/// Where a request stands with its approvers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Approval {
    /// Waiting for a person.
    Pending,
    /// An approver's Approved condition, or the pool's auto-approval policy.
    Approved {
        auto: bool,
    },
    Denied {
        message: String,
    },
}

/// The request's approval: a Denied condition wins, then Approved, then the pool's
/// auto-approval policy.
pub fn approval(request: &VmRequest, pool: Option<&HostPool>) -> Approval {
    let conditions = request.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    if let Some(c) = find_condition(conditions, "Denied").filter(|c| c.status == "True") {
        return Approval::Denied { message: c.message.clone() };
    }
    if find_condition(conditions, "Approved").is_some_and(|c| c.status == "True") {
        return Approval::Approved { auto: auto_approved(conditions) };
    }
    match pool {
        Some(pool) if within_auto_approval(request, pool) => Approval::Approved { auto: true },
        _ => Approval::Pending,
    }
}

fn auto_approved(conditions: &[covi_api::Condition]) -> bool {
    find_condition(conditions, "Approved").is_some_and(|c| c.reason == "AutoApproved")
}

/// Whether the pool's policy approves `request` without a person: within every limit
/// it sets, in a namespace it allows.
pub fn within_auto_approval(request: &VmRequest, pool: &HostPool) -> bool {
    let Some(policy) = pool.spec.approval.as_ref().and_then(|a| a.auto_approve.as_ref()) else {
        return false;
    };
    let namespace = request.namespace().unwrap_or_default();
    if !policy.namespaces.is_empty() && !policy.namespaces.contains(&namespace) {
        return false;
    }
    let replicas = request.spec.replicas.max(0) as u64;
    let Ok(size) = pool.size_of(&request.spec.template.spec) else {
        return false;
    };
    let within_memory = match &policy.max_memory {
        Some(max) => covi_api::quantity::parse_mib(max).is_ok_and(|max| size.memory_mib * replicas <= max),
        None => true,
    };
    replicas <= u64::from(policy.max_servers)
        && policy.max_cpus.is_none_or(|max| u64::from(size.cpus) * replicas <= u64::from(max))
        && within_memory
}

/// The name of server `index` of a request.
pub fn server_name(request: &str, index: u32) -> String {
    format!("{request}-{index}")
}

/// The index of a request's server, from its name.
fn index_of(request: &str, server: &str) -> Option<u32> {
    server.strip_prefix(request)?.strip_prefix('-')?.parse().ok()
}

/// What to change so the request owns exactly `replicas` servers, 0..replicas-1:
/// missing ones to create, and the rest to delete, newest (highest index) first.
pub fn reconcile_replicas(request: &str, replicas: i32, existing: &[String]) -> (Vec<String>, Vec<String>) {
    let want: BTreeSet<String> = (0..replicas.max(0) as u32).map(|i| server_name(request, i)).collect();
    let have: BTreeSet<&String> = existing.iter().collect();
    let create = want.iter().filter(|n| !have.contains(n)).cloned().collect();
    let mut delete: Vec<String> = existing.iter().filter(|n| !want.contains(*n)).cloned().collect();
    delete.sort_by_key(|n| std::cmp::Reverse(index_of(request, n).unwrap_or(u32::MAX)));
    (create, delete)
}

/// How a request's life has progressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub phase: VmRequestPhase,
    pub ready: i32,
    pub fulfilled: bool,
    /// When the servers are reclaimed, once known.
    pub expires_at: Option<Timestamp>,
    pub expiring_soon: bool,
    pub expired: bool,
}

/// The progress of an approved request from its servers and the clock.
pub fn progress(request: &VmRequest, servers: &[&VirtualServer], warning: Duration, now: Timestamp) -> Progress {
    let status = request.status.clone().unwrap_or_default();
    let ready = servers.iter().filter(|s| crate::run::server_ready(s)).count() as i32;
    let already_expired = status.phase == Some(VmRequestPhase::Expired);
    let lifetime = request.spec.lifetime.as_deref().and_then(covi_api::duration::parse);
    let fulfilled = ready >= request.spec.replicas && servers.len() as i32 == request.spec.replicas;
    // The lifetime starts at the first fulfilment.
    let expires_at = status.expires_at.as_ref().map(|t| t.0).or_else(|| {
        let life = lifetime?;
        fulfilled.then(|| now + life)
    });
    let expired = already_expired || expires_at.is_some_and(|at| now >= at);
    let expiring_soon = !expired
        && match (expires_at, lifetime) {
            (Some(at), Some(life)) => {
                let warn = warning.min(life / 2);
                now + warn >= at
            }
            _ => false,
        };
    let phase = if expired {
        VmRequestPhase::Expired
    } else if fulfilled {
        VmRequestPhase::Fulfilled
    } else {
        VmRequestPhase::Provisioning
    };
    Progress { phase, ready, fulfilled, expires_at, expiring_soon, expired }
}

/// The servers a request owns: labelled for it and owned by its UID.
pub fn owned<'a>(request: &VmRequest, servers: &'a [std::sync::Arc<VirtualServer>]) -> Vec<&'a VirtualServer> {
    let uid = request.uid();
    servers
        .iter()
        .filter(|s| s.namespace() == request.namespace())
        .filter(|s| s.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref() && o.controller == Some(true)))
        .map(|s| s.as_ref())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(auto: serde_json::Value) -> HostPool {
        serde_json::from_value(json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": "lab"},
            "spec": {"storage": {"pool": "p"}, "network": {"bridge": "b", "cidr": "10.0.0.0/24"},
                     "classes": [{"name": "small", "cpus": 2, "memory": "2Gi", "disk": "10Gi"}],
                     "approval": {"autoApprove": auto}}
        }))
        .unwrap()
    }

    fn request(replicas: i32, conditions: serde_json::Value) -> VmRequest {
        serde_json::from_value(json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "VmRequest",
            "metadata": {"name": "web", "namespace": "shop", "uid": "r1"},
            "spec": {"replicas": replicas, "reason": "r", "lifetime": "10s",
                     "template": {"spec": {"hostPool": "lab", "class": "small", "boot": {"image": "i"}, "owner": "o", "purpose": "p"}}},
            "status": {"conditions": conditions}
        }))
        .unwrap()
    }

    fn condition(type_: &str, status: &str, reason: &str) -> serde_json::Value {
        json!({"type": type_, "status": status, "reason": reason, "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn approval_needs_a_person_unless_the_policy_allows_it() {
        let strict = pool(json!({"maxServers": 0}));
        assert_eq!(approval(&request(2, json!([])), Some(&strict)), Approval::Pending);
        let approved = request(2, json!([condition("Approved", "True", "ApprovedByBob")]));
        assert_eq!(approval(&approved, Some(&strict)), Approval::Approved { auto: false });
        let denied = request(2, json!([condition("Approved", "True", "x"), condition("Denied", "True", "No")]));
        assert!(matches!(approval(&denied, Some(&strict)), Approval::Denied { .. }), "Denied wins");
    }

    #[test]
    fn auto_approval_checks_every_limit() {
        let policy = pool(json!({"maxServers": 3, "maxCpus": 6, "maxMemory": "6Gi"}));
        assert!(within_auto_approval(&request(3, json!([])), &policy));
        assert!(!within_auto_approval(&request(4, json!([])), &policy));
        let tight = pool(json!({"maxServers": 10, "maxCpus": 4}));
        assert!(!within_auto_approval(&request(3, json!([])), &tight), "6 CPUs is over 4");
        let elsewhere = pool(json!({"maxServers": 10, "namespaces": ["other"]}));
        assert!(!within_auto_approval(&request(1, json!([])), &elsewhere));
    }

    #[test]
    fn replicas_are_kept_and_the_newest_go_first() {
        let have = |n: u32| (0..n).map(|i| server_name("web", i)).collect::<Vec<_>>();
        assert_eq!(reconcile_replicas("web", 3, &have(1)), (vec!["web-1".into(), "web-2".into()], vec![]));
        assert_eq!(
            reconcile_replicas("web", 2, &have(5)),
            (vec![], vec!["web-4".into(), "web-3".into(), "web-2".into()])
        );
        assert_eq!(reconcile_replicas("web", 0, &have(2)).1, vec!["web-1".to_string(), "web-0".to_string()]);
    }

    #[test]
    fn the_lifetime_starts_at_fulfilment_and_warns_before_expiry() {
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        let req = request(0, json!([]));
        let p = progress(&req, &[], Duration::from_secs(86400), t0);
        assert!(p.fulfilled);
        assert_eq!(p.expires_at, Some(t0 + Duration::from_secs(10)));
        assert!(!p.expiring_soon);
        let mut later = req.clone();
        later.status.as_mut().unwrap().expires_at =
            p.expires_at.map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time);
        // Warned at half the lifetime when the configured warning is longer.
        assert!(progress(&later, &[], Duration::from_secs(86400), t0 + Duration::from_secs(6)).expiring_soon);
        let gone = progress(&later, &[], Duration::from_secs(86400), t0 + Duration::from_secs(10));
        assert!(gone.expired);
        assert_eq!(gone.phase, VmRequestPhase::Expired);
    }
}

/// Why growing a namespace's servers in a pool would break its quota, if it would.
/// `current` is what the namespace's servers in the pool hold now (servers, CPUs, MiB);
/// `adding` what the request would add.
pub fn over_quota(
    pool: &HostPool,
    namespace: &str,
    current: (u32, u64, u64),
    adding: (u32, u64, u64),
) -> Option<String> {
    let quota = pool.spec.approval.as_ref()?.quotas.iter().find(|q| q.namespace == namespace)?;
    let (servers, cpus, mib) = (current.0 + adding.0, current.1 + adding.1, current.2 + adding.2);
    if let Some(max) = quota.max_servers
        && servers > max
    {
        return Some(format!(
            "namespace {namespace} may hold {max} servers in pool {}; this would make {servers}",
            pool.name_any()
        ));
    }
    if let Some(max) = quota.max_cpus
        && cpus > u64::from(max)
    {
        return Some(format!(
            "namespace {namespace} may hold {max} CPUs in pool {}; this would make {cpus}",
            pool.name_any()
        ));
    }
    if let Some(max) = quota.max_memory.as_deref().and_then(|m| covi_api::quantity::parse_mib(m).ok())
        && mib > max
    {
        return Some(format!(
            "namespace {namespace} may hold {} of memory in pool {}; this would make {}",
            covi_placement::format_mib(max),
            pool.name_any(),
            covi_placement::format_mib(mib)
        ));
    }
    None
}

#[cfg(test)]
mod quota_tests {
    use super::*;

    #[test]
    fn quotas_name_the_limit_that_is_crossed() {
        let pool: HostPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": "lab"},
            "spec": {"storage": {"pool": "p"}, "network": {"bridge": "b", "cidr": "10.0.0.0/24"},
                     "approval": {"quotas": [{"namespace": "shop", "maxServers": 4, "maxCpus": 6, "maxMemory": "8Gi"}]}}
        }))
        .unwrap();
        assert_eq!(over_quota(&pool, "shop", (2, 2, 2048), (2, 2, 2048)), None);
        assert_eq!(
            over_quota(&pool, "shop", (2, 2, 2048), (3, 3, 3072)).as_deref(),
            Some("namespace shop may hold 4 servers in pool lab; this would make 5")
        );
        assert!(over_quota(&pool, "shop", (0, 0, 0), (2, 8, 1024)).unwrap().contains("6 CPUs"));
        assert!(over_quota(&pool, "shop", (0, 0, 0), (1, 1, 9216)).unwrap().contains("8Gi of memory"));
        assert_eq!(over_quota(&pool, "other", (100, 100, 100_000), (1, 1, 1)), None, "no quota, no limit");
    }
}
