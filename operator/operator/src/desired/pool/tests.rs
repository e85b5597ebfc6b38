use super::*;
use crate::fixtures::{host, pool};
use serde_json::json;

fn now() -> Timestamp {
    "2026-06-01T00:00:00Z".parse().unwrap()
}

#[test]
fn a_pool_counts_its_ready_hosts_and_says_when_failover_waits() {
    let p = pool(json!({}));
    let hosts = vec![host("h1", json!({})), host("h2", json!({})), host("h3", json!({}))];
    let lost: BTreeSet<String> = ["h2".to_string(), "h3".to_string()].into();
    let facts = Facts { pool: &p, members: &hosts, servers: &[], unready: &lost, lost: &lost, failover_paused: true };
    let write = update(facts, now()).unwrap();
    assert_eq!((write.status.ready_hosts, write.status.total_hosts), (1, 3));
    assert_eq!(write.status.cpu_allocation.as_deref(), Some("0/12"));
    let paused = write.status.conditions.iter().find(|c| c.type_ == condition_type::FAILOVER_PAUSED).unwrap();
    assert_eq!((paused.status.as_str(), paused.reason.as_str()), ("True", "MassFailure"));
    assert!(paused.message.starts_with("2 of 3 hosts are lost at once"), "{}", paused.message);
}

#[test]
fn a_pool_without_hosts_is_not_ready_and_written_once() {
    let mut p = pool(json!({}));
    let none = BTreeSet::new();
    fn facts<'a>(p: &'a HostPool, none: &'a BTreeSet<String>) -> Facts<'a> {
        Facts { pool: p, members: &[], servers: &[], unready: none, lost: none, failover_paused: false }
    }
    let write = update(facts(&p, &none), now()).unwrap();
    let ready = write.status.conditions.iter().find(|c| c.type_ == condition_type::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "NoHosts"));
    p.status = Some(write.status);
    assert_eq!(update(facts(&p, &none), now()), None);
}
