use super::*;
use crate::fixtures::{condition, keys, server};
use covi_api::condition::find_condition;
use kube::runtime::events::EventType;
use serde_json::json;

fn now() -> Timestamp {
    "2026-06-01T00:00:00Z".parse().unwrap()
}

fn bind(host: &str) -> Decision {
    moved(host, None, None)
}

fn moved(host: &str, failover_from: Option<&str>, migrated_from: Option<&str>) -> Decision {
    Decision::Bind {
        host: host.into(),
        address: Some("10.20.0.5".parse().unwrap()),
        cpus: 1,
        memory: "1Gi".into(),
        failover_from: failover_from.map(str::to_string),
        migrated_from: migrated_from.map(str::to_string),
    }
}

#[test]
fn a_binding_writes_host_size_and_address_and_only_if_the_server_is_unchanged() {
    let s = server("a", json!({}));
    let (write, note) = decision(&s, &bind("h1"), now()).unwrap();
    assert_eq!(write.manager, manager::OPERATOR);
    assert_eq!(write.resource_version.as_deref(), Some("7"), "conditional on the version decided on");
    assert_eq!(write.status.host.as_deref(), Some("h1"));
    assert_eq!(write.status.address.as_deref(), Some("10.20.0.5"));
    assert_eq!(write.status.phase, Some(VirtualServerPhase::Scheduled));
    let scheduled = find_condition(&write.status.conditions, condition_type::SCHEDULED).unwrap();
    assert_eq!((scheduled.status.as_str(), scheduled.reason.as_str()), ("True", "Bound"));
    let ready = find_condition(&write.status.conditions, condition_type::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Scheduled"));
    // Exactly the fields this manager owns: the agent's domainUuid and the migration
    // record stay with their writers.
    assert_eq!(keys(&write.status), ["address", "conditions", "cpus", "host", "memory", "observedGeneration", "phase"]);
    assert_eq!(note.unwrap().reason, "Scheduled");
}

#[test]
fn a_failover_adds_to_the_record_and_a_hand_over_keeps_it() {
    let record = json!([{"from": "h0", "to": "h1", "at": "2026-01-01T00:00:00Z", "reason": "HostLost"}]);
    let s = server("a", json!({"status": {"host": "h1", "address": "10.20.0.5", "failovers": record}}));
    let failover = moved("h2", Some("h1"), None);
    let (write, note) = decision(&s, &failover, now()).unwrap();
    let hops: Vec<_> = write.status.failovers.iter().map(|f| (f.from.as_str(), f.to.as_str())).collect();
    assert_eq!(hops, [("h0", "h1"), ("h1", "h2")]);
    let note = note.unwrap();
    assert_eq!((note.type_, note.reason.as_str()), (EventType::Warning, "FailedOver"));
    let (write, note) = decision(&s, &moved("h3", None, Some("h1")), now()).unwrap();
    assert_eq!(write.status.failovers.len(), 1, "a move does not erase the failover history");
    assert_eq!(note.unwrap().reason, "HandedOver");
}

#[test]
fn a_pending_server_is_written_once_and_keeps_its_address() {
    let pending = Decision::Pending { reason: "NoRoom", message: "no host has room".into() };
    let fresh = server("a", json!({"status": {"address": "10.20.0.9"}}));
    let (write, note) = decision(&fresh, &pending, now()).unwrap();
    assert_eq!(write.resource_version, None, "only bindings are conditional");
    assert_eq!(write.status.address.as_deref(), Some("10.20.0.9"));
    assert_eq!(write.status.host, None);
    assert_eq!(note.unwrap().reason, "FailedScheduling");
    let written = server(
        "a",
        json!({"status": {"phase": "Pending", "observedGeneration": 1, "address": "10.20.0.9", "conditions": [
            condition("Scheduled", "False", "NoRoom", "no host has room"),
            condition("Ready", "False", "NoRoom", "no host has room"),
        ]}}),
    );
    assert_eq!(decision(&written, &pending, now()), None, "nothing new to say");
}

#[test]
fn a_server_left_on_a_lost_host_is_failed_in_the_agents_name() {
    let s = server("a", json!({"status": {"host": "h1", "phase": "Running"}}));
    let (write, note) = decision(&s, &Decision::HostLost { host: "h1".into() }, now()).unwrap();
    assert_eq!(write.manager, manager::OPERATOR_FOR_AGENT);
    assert_eq!(keys(&write.status), ["conditions", "phase"]);
    assert_eq!(write.status.phase, Some(VirtualServerPhase::Failed));
    assert!(note.unwrap().message.contains("not highly available"));
}

#[test]
fn stalled_follows_failed_and_is_written_once() {
    let failed = server(
        "a",
        json!({"status": {"phase": "Failed", "conditions": [condition("Ready", "False", "StartFailed", "boom")]}}),
    );
    let write = stalled(&failed, now()).unwrap();
    assert_eq!(write.manager, manager::OPERATOR_STALLED);
    let c = &write.status.conditions[0];
    assert_eq!((c.type_.as_str(), c.status.as_str(), c.reason.as_str()), ("Stalled", "True", "StartFailed"));
    let said = server(
        "a",
        json!({"status": {"phase": "Failed", "conditions": [
            condition("Ready", "False", "StartFailed", "boom"), condition("Stalled", "True", "StartFailed", "boom"),
        ]}}),
    );
    assert_eq!(stalled(&said, now()), None);
    let healthy = server("a", json!({"status": {"phase": "Running"}}));
    assert_eq!(stalled(&healthy, now()), None, "a server that never failed costs no write");
}

#[test]
fn a_migration_record_announces_changes_of_phase_only() {
    let running = json!({"source": "h1", "target": "h2", "phase": "Running", "mode": "Live",
                         "startedAt": "2026-01-01T00:00:00Z"});
    let s = server("a", json!({"status": {"migration": running}}));
    let same: MigrationStatus = serde_json::from_value(running).unwrap();
    let (write, note) = migration(&s, Some(&same));
    assert_eq!(write.manager, manager::OPERATOR_MIGRATION);
    assert_eq!(note, None);
    let failed = MigrationStatus { phase: MigrationPhase::Failed, reason: Some("target full".into()), ..same };
    let note = migration(&s, Some(&failed)).1.unwrap();
    assert_eq!((note.type_, note.reason.as_str()), (EventType::Warning, "MigrationFailed"));
    let (write, note) = migration(&s, None);
    assert!(keys(&write.status).is_empty(), "an empty apply gives the record up");
    assert_eq!(note.unwrap().reason, "MigrationCancelled");
}

#[test]
fn expiry_warns_once_before_and_deletes_after() {
    let expiring = |at: &str, conditions: serde_json::Value| {
        server("a", json!({"spec": {"expiresAt": at}, "status": {"conditions": conditions}}))
    };
    // Created 2026-01-01; the default warning is a day before.
    assert_eq!(expiry(&expiring("2026-06-10T00:00:00Z", json!([])), None, now()), None);
    let Some(Expiry::Warn(write, note)) = expiry(&expiring("2026-06-01T12:00:00Z", json!([])), None, now()) else {
        panic!("a warning half a day before")
    };
    assert_eq!(write.manager, manager::OPERATOR_EXPIRY);
    assert_eq!(note.reason, "ExpiringSoon");
    let warned = json!([condition("ExpiringSoon", "True", "ExpiresAt", "soon")]);
    assert_eq!(expiry(&expiring("2026-06-01T12:00:00Z", warned), None, now()), None);
    assert!(matches!(expiry(&expiring("2026-05-31T00:00:00Z", json!([])), None, now()), Some(Expiry::Delete(_))));
}

#[test]
fn a_request_announces_its_servers_bound_together_in_one_event() {
    let placed: Vec<String> = (0..10).map(|i| format!("web-{i} on h{i}")).collect();
    let note = scheduled_together(&placed);
    assert_eq!(note.reason, "Scheduled");
    assert!(note.message.starts_with("scheduled 10 servers: web-0 on h0, web-1 on h1"), "{}", note.message);
    assert!(note.message.ends_with("web-7 on h7 and 2 more"), "{}", note.message);
    assert_eq!(scheduled_together(&placed[..1]).message, "scheduled 1 server: web-0 on h0");
    // Sixty-three-character names stay under an Event note's 1 kB.
    let long: Vec<String> = (0..100).map(|i| format!("{:a>60}{i:02} on {:b>60}{i:02}", "", "")).collect();
    assert!(scheduled_together(&long).message.len() < 1024);
}

#[test]
fn only_a_request_servers_plain_binding_is_announced_on_the_request() {
    let owned = server(
        "web-0",
        json!({"metadata": {"ownerReferences": [{"apiVersion": "covi.io/v1alpha1", "kind": "VmRequest",
            "name": "web", "uid": "uid-web", "controller": true}]}}),
    );
    let on = announced_on_request(&owned, &bind("h1")).expect("a request's server");
    assert_eq!(
        (on.kind.as_deref(), on.name.as_deref(), on.namespace.as_deref()),
        (Some("VmRequest"), Some("web"), Some("ns"))
    );
    assert_eq!(on.uid.as_deref(), Some("uid-web"));
    assert_eq!(announced_on_request(&owned, &moved("h2", Some("h1"), None)), None, "a failover is the server's own");
    assert_eq!(announced_on_request(&owned, &moved("h2", None, Some("h1"))), None, "so is a hand-over");
    assert_eq!(announced_on_request(&server("solo", json!({})), &bind("h1")), None, "a server of no request");
}
