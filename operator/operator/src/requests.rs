//! VmRequests: the approval gate, the servers a request owns, fulfilment and expiry.
//! Decisions are pure functions of the request, its pool and its servers.

use std::collections::BTreeSet;
use std::time::Duration;

use covi_api::condition::find_condition;
use covi_api::contract::condition_type;
use covi_api::vm_request::{ApprovedSpec, VmRequestPhase};
use covi_api::{HostPool, VirtualServer, VmRequest};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

pub use covi_api::contract::REQUEST_LABEL;

/// Where a request stands with its approvers.
#[derive(Clone, Debug, PartialEq)]
pub enum Approval {
    /// Waiting for a person.
    Pending,
    /// An approver's Approved condition, or the pool's auto-approval policy, covers the
    /// request as it is now; `covers` is what was approved, to record in status.
    Approved {
        auto: bool,
        covers: Box<ApprovedSpec>,
    },
    /// Approved once, but the request has since grown or changed: it keeps what it has
    /// and waits for a new approval of `changes`.
    Outdated {
        changes: String,
    },
    Denied {
        message: String,
    },
}

/// The request's approval: a Denied condition wins; then an Approved condition, as far
/// as what it approved covers the request now; then the pool's auto-approval policy,
/// which also covers a request that outgrew a person's approval.
pub fn approval(request: &VmRequest, pool: Option<&HostPool>) -> Approval {
    let status = request.status.as_ref();
    let conditions = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
    if let Some(c) = find_condition(conditions, condition_type::DENIED).filter(|c| c.status == "True") {
        return Approval::Denied { message: c.message.clone() };
    }
    let now = request.approvable();
    let auto = || pool.is_some_and(|pool| within_auto_approval(request, pool));
    let Some(approved) = find_condition(conditions, condition_type::APPROVED).filter(|c| c.status == "True") else {
        return if auto() { Approval::Approved { auto: true, covers: Box::new(now) } } else { Approval::Pending };
    };
    // An approval covers the generation it names: the current one, or the one recorded
    // when the operator last acted on it.
    let recorded = status.and_then(|s| s.approved.as_ref());
    let covers = match approved.observed_generation {
        Some(g) if g == now.generation => Some(now.clone()),
        Some(g) => recorded.filter(|r| r.generation == g).cloned(),
        None => None,
    };
    if let Some(covers) = &covers
        && changes(covers, &now).is_empty()
    {
        return Approval::Approved { auto: approved.reason == "AutoApproved", covers: Box::new(covers.clone()) };
    }
    if auto() {
        return Approval::Approved { auto: true, covers: Box::new(now) };
    }
    let changes = match (covers, approved.observed_generation) {
        (Some(covers), _) => {
            format!(
                "changed since generation {} was approved: {}",
                covers.generation,
                changes(&covers, &now).join("; ")
            )
        }
        (None, Some(g)) => format!(
            "generation {g} was approved, but the request changed before covi acted on it (now generation {})",
            now.generation
        ),
        (None, None) => "the Approved condition does not name the generation it approves (observedGeneration)".into(),
    };
    Approval::Outdated { changes }
}

/// How the request `now` goes beyond what was `approved`; empty when the approval covers
/// it. Fewer replicas are covered; more, another lifetime or another template are not.
pub fn changes(approved: &ApprovedSpec, now: &ApprovedSpec) -> Vec<String> {
    let mut out = Vec::new();
    if now.replicas > approved.replicas {
        out.push(format!("replicas {} -> {}", approved.replicas, now.replicas));
    }
    if now.lifetime != approved.lifetime {
        let show = |l: &Option<String>| l.clone().unwrap_or_else(|| "none".into());
        out.push(format!("lifetime {} -> {}", show(&approved.lifetime), show(&now.lifetime)));
    }
    if now.template != approved.template {
        let (before, after) = (serde_json::to_value(&approved.template), serde_json::to_value(&now.template));
        let mut paths = Vec::new();
        if let (Ok(before), Ok(after)) = (before, after) {
            changed_paths("template", &before, &after, &mut paths);
        }
        if paths.is_empty() {
            paths.push("template".into());
        }
        out.push(format!("{} changed", paths.join(", ")));
    }
    out
}

/// The paths at which two JSON values differ, down to the fields of a server's spec.
fn changed_paths(at: &str, before: &serde_json::Value, after: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (before, after) {
        (Value::Object(b), Value::Object(a)) if at.matches('.').count() < 3 => {
            let keys: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
            for key in keys {
                let (x, y) = (b.get(key).unwrap_or(&Value::Null), a.get(key).unwrap_or(&Value::Null));
                if x != y {
                    changed_paths(&format!("{at}.{key}"), x, y, out);
                }
            }
        }
        _ if before != after => out.push(at.to_string()),
        _ => {}
    }
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
    let ready = servers.iter().filter(|s| s.is_ready()).count() as i32;
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
    // Borrowed, not cloned: every reconcile of a request looks at every server.
    let (ns, uid) = (request.metadata.namespace.as_deref(), request.metadata.uid.as_deref());
    servers
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == ns)
        .filter(|s| s.owner_references().iter().any(|o| Some(o.uid.as_str()) == uid && o.controller == Some(true)))
        .map(|s| s.as_ref())
        .collect()
}

/// The approver a request's Approved condition names (see
/// [`covi_api::history::approver_from_message`]).
pub fn approver(request: &VmRequest) -> Option<String> {
    let conditions = request.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    covi_api::condition::find_condition(conditions, covi_api::contract::condition_type::APPROVED)
        .filter(|c| c.status == "True")
        .and_then(|c| covi_api::history::approver_from_message(&c.message))
}

/// Server `name` of a request, from its template: labelled for the request, owned by
/// it (so the garbage collector returns it with the request) and born with covi's
/// finalizer (one write fewer per server than adding it later). None while the
/// request has no UID.
pub fn server_from_template(request: &VmRequest, name: &str) -> Option<VirtualServer> {
    let template = &request.spec.template;
    let meta = template.metadata.clone().unwrap_or_default();
    let mut labels = meta.labels;
    labels.insert(REQUEST_LABEL.into(), request.name_any());
    let mut server = VirtualServer::new(name, template.spec.clone());
    server.metadata.namespace = request.namespace();
    server.metadata.labels = Some(labels);
    // Who approved is the operator's to say, from the approval; never the template's.
    let mut annotations = meta.annotations;
    annotations.remove(covi_api::history::APPROVED_BY);
    if let Some(approver) = approver(request) {
        annotations.insert(covi_api::history::APPROVED_BY.into(), approver);
    }
    server.metadata.annotations = Some(annotations).filter(|a| !a.is_empty());
    // Both finalizers at once: no second write to add the history one.
    server.metadata.finalizers =
        Some(vec![covi_api::contract::FINALIZER.to_string(), covi_api::history::FINALIZER.to_string()]);
    server.metadata.owner_references = Some(vec![request.controller_owner_ref(&())?]);
    Some(server)
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
            "metadata": {"name": "web", "namespace": "shop", "uid": "r1", "generation": 3},
            "spec": {"replicas": replicas, "reason": "r", "lifetime": "10s",
                     "template": {"spec": {"hostPool": "lab", "class": "small", "boot": {"image": "i"}, "owner": "o", "purpose": "p"}}},
            "status": {"conditions": conditions}
        }))
        .unwrap()
    }

    fn condition(type_: &str, status: &str, reason: &str) -> serde_json::Value {
        json!({"type": type_, "status": status, "reason": reason, "message": "m",
               "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3})
    }

    #[test]
    fn approval_needs_a_person_unless_the_policy_allows_it() {
        let strict = pool(json!({"maxServers": 0}));
        assert_eq!(approval(&request(2, json!([])), Some(&strict)), Approval::Pending);
        let approved = request(2, json!([condition("Approved", "True", "ApprovedByBob")]));
        assert_eq!(
            approval(&approved, Some(&strict)),
            Approval::Approved { auto: false, covers: Box::new(approved.approvable()) }
        );
        let denied = request(2, json!([condition("Approved", "True", "x"), condition("Denied", "True", "No")]));
        assert!(matches!(approval(&denied, Some(&strict)), Approval::Denied { .. }), "Denied wins");
    }

    #[test]
    fn a_requests_server_is_labelled_owned_and_born_with_the_finalizer() {
        let mut r = request(1, json!([]));
        r.spec.template.metadata = Some(serde_json::from_value(json!({"labels": {"app": "web"}})).unwrap());
        let server = server_from_template(&r, "web-0").unwrap();
        assert_eq!(server.namespace().as_deref(), Some("shop"));
        assert_eq!(server.labels().get("app").map(String::as_str), Some("web"));
        assert_eq!(server.labels().get(REQUEST_LABEL).map(String::as_str), Some("web"));
        assert_eq!(server.finalizers(), [covi_api::contract::FINALIZER, covi_api::history::FINALIZER]);
        let owner = &server.owner_references()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("VmRequest", "r1", Some(true)));
        r.metadata.uid = None;
        assert_eq!(server_from_template(&r, "web-0"), None, "no owner reference without a UID");
    }

    #[test]
    fn a_requests_server_names_its_approver_and_a_template_cannot_forge_it() {
        let forged = json!({"annotations": {covi_api::history::APPROVED_BY: "mallory", "note": "kept"}});
        let mut r = request(
            1,
            json!([{"type": "Approved", "status": "True", "reason": "ApprovedByUser",
            "message": "for the report (bob)", "lastTransitionTime": "2026-01-01T00:00:00Z"}]),
        );
        r.spec.template.metadata = Some(serde_json::from_value(forged.clone()).unwrap());
        let server = server_from_template(&r, "web-0").unwrap();
        assert_eq!(server.annotations().get(covi_api::history::APPROVED_BY).map(String::as_str), Some("bob"));
        assert_eq!(server.annotations().get("note").map(String::as_str), Some("kept"));
        let mut unnamed = request(1, json!([]));
        unnamed.spec.template.metadata = Some(serde_json::from_value(forged).unwrap());
        let server = server_from_template(&unnamed, "web-0").unwrap();
        assert_eq!(server.annotations().get(covi_api::history::APPROVED_BY), None, "no approver named: none");
    }

    /// `request` as changed by its requester after generation 3 was approved and recorded.
    fn changed(request: &VmRequest, change: impl Fn(&mut VmRequest)) -> VmRequest {
        let mut next = request.clone();
        next.status.as_mut().unwrap().approved = Some(request.approvable());
        change(&mut next);
        next.metadata.generation = Some(4);
        next
    }

    #[test]
    fn an_approval_covers_what_was_approved_and_no_more() {
        let strict = pool(json!({"maxServers": 0}));
        let six = request(6, json!([condition("Approved", "True", "ApprovedByBob")]));
        let fewer = changed(&six, |r| r.spec.replicas = 2);
        assert_eq!(
            approval(&fewer, Some(&strict)),
            Approval::Approved { auto: false, covers: Box::new(six.approvable()) },
            "scaling down needs no approval, and the approval still covers six"
        );
        let mut back = fewer.clone();
        back.spec.replicas = 6;
        back.metadata.generation = Some(5);
        assert!(matches!(approval(&back, Some(&strict)), Approval::Approved { .. }), "back up to what was approved");
        let more = changed(&six, |r| r.spec.replicas = 20);
        assert_eq!(
            approval(&more, Some(&strict)),
            Approval::Outdated { changes: "changed since generation 3 was approved: replicas 6 -> 20".into() }
        );
        let bigger = changed(&six, |r| {
            r.spec.template.spec.class = Some("large".into());
            r.spec.lifetime = Some("720h".into());
        });
        assert_eq!(
            approval(&bigger, Some(&strict)),
            Approval::Outdated {
                changes: "changed since generation 3 was approved: lifetime 10s -> 720h; template.spec.class changed"
                    .into()
            }
        );
        let labelled = changed(&six, |r| {
            r.spec.template.metadata = Some(covi_api::vm_request::TemplateMetadata {
                labels: [("tier".to_string(), "db".to_string())].into(),
                ..Default::default()
            })
        });
        assert!(
            matches!(approval(&labelled, Some(&strict)), Approval::Outdated { changes } if changes.ends_with("template.metadata changed"))
        );
    }

    #[test]
    fn an_approval_of_a_generation_never_acted_on_is_not_stretched() {
        let strict = pool(json!({"maxServers": 0}));
        // Approved at generation 3 while the requester already scaled to 20 (generation 4):
        // the operator never recorded what generation 3 was.
        let mut raced = request(20, json!([condition("Approved", "True", "ApprovedByBob")]));
        raced.metadata.generation = Some(4);
        assert!(
            matches!(approval(&raced, Some(&strict)), Approval::Outdated { changes } if changes.contains("now generation 4"))
        );
        let mut unnamed = request(2, json!([condition("Approved", "True", "ApprovedByBob")]));
        unnamed.status.as_mut().unwrap().conditions[0].observed_generation = None;
        assert!(
            matches!(approval(&unnamed, Some(&strict)), Approval::Outdated { changes } if changes.contains("observedGeneration"))
        );
    }

    #[test]
    fn growth_within_the_policy_is_approved_again_by_the_policy() {
        let policy = pool(json!({"maxServers": 4}));
        let two = request(2, json!([condition("Approved", "True", "ApprovedByBob")]));
        let four = changed(&two, |r| r.spec.replicas = 4);
        assert_eq!(
            approval(&four, Some(&policy)),
            Approval::Approved { auto: true, covers: Box::new(four.approvable()) }
        );
        let five = changed(&two, |r| r.spec.replicas = 5);
        assert!(matches!(approval(&five, Some(&policy)), Approval::Outdated { .. }));
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
