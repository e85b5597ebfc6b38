use super::*;
use crate::fixtures::{condition, pool, request, server};
use kube::runtime::events::EventType;
use serde_json::json;

fn now() -> Timestamp {
    "2026-06-01T00:00:00Z".parse().unwrap()
}

fn approved(replicas: i32) -> VmRequest {
    request(replicas, json!({"status": {"conditions": [condition("Approved", "True", "ByBob", "ok")]}}))
}

fn plan_for(request: &VmRequest, pool: &HostPool, servers: &[&VirtualServer], in_flight: &[&str]) -> Plan {
    let in_flight: BTreeSet<String> = in_flight.iter().map(|s| s.to_string()).collect();
    let held = (servers.len() as u32, servers.len() as u64, 1024 * servers.len() as u64);
    plan(Facts { request, pool: Some(pool), servers, in_flight: &in_flight, held }, now())
}

fn owned_server(name: &str, ready: bool) -> std::sync::Arc<VirtualServer> {
    let status = if ready { "True" } else { "False" };
    server(
        name,
        json!({"metadata": {"ownerReferences": [{"apiVersion": "covi.io/v1alpha1", "kind": "VmRequest",
                                                  "name": "web", "uid": "uid-web", "controller": true}]},
               "status": {"phase": "Running", "conditions": [condition("Ready", status, "Running", "")]}}),
    )
}

#[test]
fn an_approved_request_creates_its_servers_once() {
    let (r, p) = (approved(2), pool(json!({})));
    let plan = plan_for(&r, &p, &[], &[]);
    assert_eq!(plan.create, ["web-0", "web-1"]);
    let reasons: Vec<_> = plan.notes.iter().map(|n| n.reason.as_str()).collect();
    assert_eq!(reasons, ["Approved", "Provisioning"]);
    let status = plan.status.unwrap().status;
    assert_eq!(status.phase, Some(VmRequestPhase::Provisioning));
    assert_eq!(status.selector.as_deref(), Some("covi.io/request=web"));
    assert_eq!(status.approved.map(|a| a.replicas), Some(2), "what was approved is recorded");
    // Created in an earlier reconcile, not in the cache yet: not created again.
    assert_eq!(plan_for(&r, &p, &[], &["web-0"]).create, ["web-1"]);
}

#[test]
fn a_request_waiting_for_approval_creates_nothing() {
    let (r, p) = (request(2, json!({})), pool(json!({"spec": {"approval": {"autoApprove": {"maxServers": 0}}}})));
    let plan = plan_for(&r, &p, &[], &[]);
    assert!(plan.create.is_empty());
    assert_eq!(plan.status.unwrap().status.phase, Some(VmRequestPhase::Pending));
}

#[test]
fn growth_over_quota_creates_none_of_it() {
    let r = approved(3);
    let p = pool(json!({"spec": {"approval": {"quotas": [{"namespace": "ns", "maxServers": 2}]}}}));
    let plan = plan_for(&r, &p, &[], &[]);
    assert!(plan.create.is_empty(), "all of the growth fits, or none of it is created: {plan:?}");
    let status = plan.status.unwrap().status;
    let quota = status.conditions.iter().find(|c| c.type_ == condition_type::QUOTA_EXCEEDED).unwrap();
    assert_eq!((quota.status.as_str(), quota.reason.as_str()), ("True", "OverQuota"));
    assert_eq!(status.phase, Some(VmRequestPhase::Pending));
    assert!(plan.notes.iter().any(|n| n.reason == "QuotaExceeded" && n.type_ == EventType::Warning));
}

#[test]
fn a_fulfilled_request_says_so_once_and_then_is_quiet() {
    let mut r = approved(2);
    let (a, b) = (owned_server("web-0", true), owned_server("web-1", true));
    let p = pool(json!({}));
    let plan = plan_for(&r, &p, &[&a, &b], &[]);
    assert!(plan.create.is_empty() && plan.delete.is_empty());
    assert!(plan.notes.iter().any(|n| n.reason == "Fulfilled"));
    let status = plan.status.unwrap().status;
    assert_eq!((status.phase, status.replicas, status.ready_replicas), (Some(VmRequestPhase::Fulfilled), 2, 2));
    // Its own write read back: nothing more to say.
    let approved_condition = r.status.as_ref().unwrap().conditions.clone();
    r.status = Some(VmRequestStatus { conditions: [approved_condition, status.conditions.clone()].concat(), ..status });
    let again = plan_for(&r, &p, &[&a, &b], &[]);
    assert_eq!((again.status, again.notes), (None, vec![]));
}

#[test]
fn a_shrunk_request_deletes_its_highest_servers() {
    let r = approved(1);
    let (a, b) = (owned_server("web-0", true), owned_server("web-1", true));
    let plan = plan_for(&r, &pool(json!({})), &[&a, &b], &[]);
    assert_eq!(plan.delete, ["web-1"]);
}

#[test]
fn an_expired_request_deletes_every_server_and_is_revisited_at_its_end() {
    let living = request(
        1,
        json!({"spec": {"lifetime": "2h"}, "status": {"expiresAt": "2026-06-01T01:00:00Z",
               "conditions": [condition("Approved", "True", "ByBob", "ok")]}}),
    );
    let a = owned_server("web-0", true);
    let plan = plan_for(&living, &pool(json!({})), &[&a], &[]);
    assert!(plan.notes.iter().any(|n| n.reason == "ExpiringSoon"), "within half its life of the end");
    assert_eq!(plan.revisit_at, Some("2026-06-01T01:00:00Z".parse().unwrap()));
    let ended = request(
        1,
        json!({"spec": {"lifetime": "2h"}, "status": {"expiresAt": "2026-05-31T23:00:00Z",
               "conditions": [condition("Approved", "True", "ByBob", "ok")]}}),
    );
    let plan = plan_for(&ended, &pool(json!({})), &[&a], &[]);
    assert_eq!(plan.delete, ["web-0"]);
    assert!(plan.notes.iter().any(|n| n.reason == "Expired"));
    assert_eq!(plan.status.unwrap().status.phase, Some(VmRequestPhase::Expired));
}
