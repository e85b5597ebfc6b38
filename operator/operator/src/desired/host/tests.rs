use super::*;
use crate::fixtures::{condition, host, keys};
use serde_json::json;

fn now() -> Timestamp {
    "2026-06-01T00:00:00Z".parse().unwrap()
}

fn facts(host: &Host, liveness: Liveness) -> Facts<'_> {
    Facts {
        host,
        pool: Some("idc-a".into()),
        servers: 0,
        leaving: 0,
        allocation: (Some("0/4".into()), Some("0/64Gi".into())),
        liveness,
        silent_secs: 12,
        unmovable: vec![],
        since_written: None,
    }
}

#[test]
fn a_lost_host_is_not_ready_first_then_lost() {
    let h = host("h1", json!({}));
    let update = update(facts(&h, Liveness::Lost), now()).unwrap();
    let readiness = update.readiness.expect("Ready spoken for the silent agent");
    assert_eq!(readiness.manager, manager::OPERATOR_FOR_AGENT);
    let ready = &readiness.status.conditions[0];
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "HostLost"));
    assert_eq!(update.summary.manager, manager::OPERATOR);
    let types: Vec<_> =
        update.summary.status.conditions.iter().map(|c| (c.type_.as_str(), c.status.as_str())).collect();
    assert_eq!(types, [("Lost", "True"), ("Stalled", "True")]);
    // The agent's facts (capacity, hypervisor, address) are not the operator's.
    assert_eq!(keys(&update.summary.status), ["conditions", "cpuAllocation", "memoryAllocation", "pool", "servers"]);
    let note = &update.notes[0];
    assert_eq!((note.reason.as_str(), note.message.contains("12s")), ("HostLost", true));
}

#[test]
fn a_host_that_says_it_all_is_not_written() {
    let h = host(
        "h1",
        json!({"status": {"pool": "idc-a", "servers": 0, "cpuAllocation": "0/4", "memoryAllocation": "0/64Gi"}}),
    );
    assert_eq!(update(facts(&h, Liveness::Alive), now()), None);
    let busier = Facts { servers: 1, ..facts(&h, Liveness::Alive) };
    let write = update(busier, now()).unwrap();
    assert_eq!((write.readiness, write.summary.status.servers, write.notes.len()), (None, 1, 0));
}

#[test]
fn a_returning_host_recovers() {
    let h = host(
        "h1",
        json!({"status": {"pool": "idc-a", "conditions": [
            condition("Ready", "False", "HostLost", "gone"), condition("Lost", "True", "HostLost", "gone"),
        ]}}),
    );
    let update = update(facts(&h, Liveness::Alive), now()).unwrap();
    assert_eq!(update.readiness.unwrap().status.conditions[0].status, "True");
    assert_eq!(update.notes[0].reason, "HostRecovered");
}

#[test]
fn an_empty_host_in_maintenance_is_evacuated_once() {
    let h = host("h1", json!({"spec": {"maintenance": true}}));
    let first = update(facts(&h, Liveness::Alive), now()).unwrap();
    assert_eq!(first.notes[0].reason, "Evacuated");
    let mut done = (*h).clone();
    done.status.as_mut().unwrap().conditions.extend(first.summary.status.conditions.clone());
    done.status.as_mut().unwrap().pool = Some("idc-a".into());
    done.status.as_mut().unwrap().cpu_allocation = Some("0/4".into());
    done.status.as_mut().unwrap().memory_allocation = Some("0/64Gi".into());
    assert_eq!(update(facts(&done, Liveness::Alive), now()), None);
}

#[test]
fn counts_alone_wait_for_the_coalescing_window_and_conditions_do_not() {
    let h = host(
        "h1",
        json!({"status": {"pool": "idc-a", "servers": 0, "cpuAllocation": "0/4", "memoryAllocation": "0/64Gi"}}),
    );
    let just_written = Some(std::time::Duration::from_secs(2));
    let busier = Facts { servers: 3, since_written: just_written, ..facts(&h, Liveness::Alive) };
    assert_eq!(update(busier.clone(), now()), None, "a count written 2 s ago waits");
    let later = Facts { since_written: Some(COALESCE_COUNTS), ..busier.clone() };
    assert_eq!(update(later, now()).unwrap().summary.status.servers, 3, "and is written once the window passed");
    let never = Facts { since_written: None, ..busier.clone() };
    assert!(update(never, now()).is_some(), "a host this operator never wrote is written at once");
    let lost = Facts { liveness: Liveness::Lost, ..busier };
    let write = update(lost, now()).expect("a lost host is written at once, counts and all");
    assert_eq!(write.summary.status.servers, 3);
    assert!(write.readiness.is_some());
}
