use super::*;
use std::collections::HashMap;

use covi_api::{Host, HostPool};
use serde_json::{Value, json};

fn pool(shared: bool, max_concurrent: u32) -> HostPool {
    serde_json::from_value(json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": "idc-a"},
        "spec": {
            "nodeSelector": {"covi.io/pool": "a"}, "hypervisor": "test",
            "overcommit": {"cpu": 1, "memory": 1}, "reserve": {"cpus": 0, "memory": "0"},
            "storage": {"pool": "p", "shared": shared},
            "images": [{"name": "debian-12", "volume": "d.img"}],
            "classes": [{"name": "small", "cpus": 1, "memory": "1Gi", "disk": "10Gi"}],
            "network": {"bridge": "br0", "cidr": "10.20.0.0/24", "gateway": "10.20.0.1"},
            "migration": {"maxConcurrent": max_concurrent}
        }
    }))
    .unwrap()
}

fn host(name: &str, cpus: u32, maintenance: bool) -> Arc<Host> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "Host",
            "metadata": {"name": name, "labels": {"covi.io/pool": "a"}},
            "spec": {"maintenance": maintenance},
            "status": {
                "capacity": {"cpus": cpus, "memory": "64Gi"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "r", "message": "m",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]
            }
        }))
        .unwrap(),
    )
}

/// A server bound to `on`, with `spec` merged into a small one and `status` into Running.
fn server(name: &str, on: &str, spec: Value, status: Value) -> Arc<VirtualServer> {
    let mut s = json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                     "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", name.len())},
        "spec": {"hostPool": "idc-a", "class": "small", "boot": {"image": "debian-12"}, "owner": "o", "purpose": "p"},
        "status": {"host": on, "phase": "Running", "conditions": [ready("True", "Running", "")]}
    });
    for (k, v) in spec.as_object().unwrap() {
        s["spec"][k] = v.clone();
    }
    for (k, v) in status.as_object().unwrap() {
        s["status"][k] = v.clone();
    }
    Arc::new(serde_json::from_value(s).unwrap())
}

fn ready(status: &str, reason: &str, message: &str) -> Value {
    json!({"type": "Ready", "status": status, "reason": reason, "message": message,
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

fn migration(phase: &str, source: &str, target: &str) -> Value {
    json!({"source": source, "target": target, "phase": phase, "mode": "Cold", "startedAt": "2026-01-01T00:00:00Z"})
}

fn run(pool: &HostPool, hosts: &[Arc<Host>], servers: &[Arc<VirtualServer>], lost: &[&str]) -> Plan {
    let lost: BTreeSet<String> = lost.iter().map(|s| s.to_string()).collect();
    let assumed = HashMap::new();
    let view = PoolView {
        pool,
        hosts: hosts.to_vec(),
        servers: servers.to_vec(),
        assumed: &assumed,
        unready: &lost,
        lost: &lost,
    };
    plan_moves(&view, &BTreeSet::new(), Timestamp::UNIX_EPOCH)
}

fn records(plan: &Plan) -> Vec<(String, MigrationPhase, String)> {
    plan.actions
        .iter()
        .filter_map(|(s, a)| match a {
            Action::Record(m) => Some((s.name_any(), m.phase, m.target.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_changed_pin_starts_a_cold_migration_and_a_reverted_one_cancels_it() {
    let hosts = [host("h1", 4, false), host("h2", 4, false)];
    let moved = server("web", "h1", json!({"placement": {"host": "h2"}}), json!({}));
    let p = run(&pool(true, 2), &hosts, &[moved], &[]);
    assert_eq!(records(&p), [("web".into(), MigrationPhase::Running, "h2".into())]);
    let Action::Record(m) = &p.actions[0].1 else { unreachable!() };
    assert_eq!((m.source.as_str(), m.mode.as_deref()), ("h1", Some("Cold")), "the test driver moves cold");

    // Still Pending (no slot yet) and the pin goes back to where it runs: called off.
    let reverted = server(
        "web",
        "h1",
        json!({"placement": {"host": "h1"}}),
        json!({"migration": migration("Pending", "h1", "h2")}),
    );
    let p = run(&pool(true, 2), &hosts, &[reverted], &[]);
    assert_eq!(p.actions[0].1, Action::Cancel);
}

#[test]
fn the_protocol_hands_over_only_after_the_source_let_go() {
    let hosts = [host("h1", 4, false), host("h2", 4, false)];
    let spec = json!({"placement": {"host": "h2"}});
    // Source still running it: nothing to do yet.
    let waiting = server("web", "h1", spec.clone(), json!({"migration": migration("Running", "h1", "h2")}));
    assert!(run(&pool(true, 2), &hosts, &[waiting], &[]).actions.is_empty());
    // Source reports the hand-off: bind to the target.
    let handed = server(
        "web",
        "h1",
        spec.clone(),
        json!({"phase": "Migrating", "conditions": [ready("False", "HandedOff", "undefined on h1")],
               "migration": migration("Running", "h1", "h2")}),
    );
    let p = run(&pool(true, 2), &hosts, std::slice::from_ref(&handed), &[]);
    assert_eq!(p.actions[0].1, Action::HandOver { source: "h1".into(), target: "h2".into() });
    // ... unless the target is gone meanwhile: then it fails and the source starts it again.
    let p = run(&pool(true, 2), &hosts, &[handed], &["h2"]);
    assert_eq!(records(&p), [("web".into(), MigrationPhase::Failed, "h2".into())]);
    // Ready on the target: Succeeded.
    let arrived = server("web", "h2", spec.clone(), json!({"migration": migration("Running", "h1", "h2")}));
    assert_eq!(
        records(&run(&pool(true, 2), &hosts, &[arrived], &[])),
        [("web".into(), MigrationPhase::Succeeded, "h2".into())]
    );
    // Failed on the target: back to the source, recorded.
    let broken = server(
        "web",
        "h2",
        spec,
        json!({"phase": "Failed", "conditions": [ready("False", "DiskNotFound", "no disk")],
               "migration": migration("Running", "h1", "h2")}),
    );
    match &run(&pool(true, 2), &hosts, &[broken], &[]).actions[0].1 {
        Action::Return { target, record } => {
            assert_eq!(target, "h1");
            assert_eq!(record.phase, MigrationPhase::Failed);
            assert_eq!(record.reason.as_deref(), Some("DiskNotFound: no disk"));
        }
        other => panic!("expected a return to the source, got {other:?}"),
    }
}

fn live(phase: &str, source: &str, target: &str) -> Value {
    let mut m = migration(phase, source, target);
    m["mode"] = json!("Live");
    m
}

/// Found by the protocol's model: the source of a live move handed off (the guest runs
/// on the target), then every host went silent at once, so failover paused (the
/// operator may be the one cut off). The move was failed and the server left bound to
/// the source, which started it again when it answered, beside the moved guest.
#[test]
fn a_live_hand_off_completes_even_when_the_source_is_lost_after_it() {
    let hosts = [host("h1", 4, false), host("h2", 4, false)];
    let handed = server(
        "web",
        "h1",
        json!({}),
        json!({"phase": "Migrating", "conditions": [ready("False", "HandedOff", "migrated live to h2")],
               "migration": live("Running", "h1", "h2")}),
    );
    for lost in [&["h1"][..], &["h1", "h2"]] {
        let p = run(&pool(true, 2), &hosts, std::slice::from_ref(&handed), lost);
        assert_eq!(p.actions[0].1, Action::HandOver { source: "h1".into(), target: "h2".into() }, "lost {lost:?}");
    }
}

/// The source of a live move is lost before it said how the move went: libvirt may
/// have finished the move, so the guest may run on the target. The move is not failed
/// (a source that answers again would start the server beside it): failover takes the
/// server to the target, or the source answers and the protocol goes on.
#[test]
fn a_live_move_whose_source_is_lost_before_it_hands_off_stays_open() {
    let hosts = [host("h1", 4, false), host("h2", 4, false)];
    let moving = server("web", "h1", json!({}), json!({"migration": live("Running", "h1", "h2")}));
    let p = run(&pool(true, 2), &hosts, std::slice::from_ref(&moving), &["h1"]);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    // Cold, nothing can run on the target before the hand-off: failed, failover takes over.
    let cold = server("web", "h1", json!({}), json!({"migration": migration("Running", "h1", "h2")}));
    assert_eq!(
        records(&run(&pool(true, 2), &hosts, &[cold], &["h1"])),
        [("web".into(), MigrationPhase::Failed, "h2".into())]
    );
}

fn live_migration(phase: &str, source: &str, target: &str) -> Value {
    let mut m = migration(phase, source, target);
    m["mode"] = json!("Live");
    m
}

#[test]
fn after_a_live_hand_off_the_server_belongs_to_the_target() {
    let hosts = [host("h1", 4, false), host("h2", 4, false)];
    let spec = json!({"placement": {"host": "h2"}});
    let handed = server(
        "web",
        "h1",
        spec.clone(),
        json!({"phase": "Migrating", "conditions": [ready("False", "HandedOff", "live-migrated from h1 to h2")],
               "migration": live_migration("Running", "h1", "h2")}),
    );
    // The target is not Ready (a new leader has confirmed no host yet): the guest runs
    // there all the same, so the server is bound there, not started again on h1.
    let unready: BTreeSet<String> = ["h2".to_string()].into();
    let (shared, assumed, lost) = (pool(true, 2), HashMap::new(), BTreeSet::new());
    let view = PoolView {
        pool: &shared,
        hosts: hosts.to_vec(),
        servers: vec![handed.clone()],
        assumed: &assumed,
        unready: &unready,
        lost: &lost,
    };
    let p = plan_moves(&view, &BTreeSet::new(), Timestamp::UNIX_EPOCH);
    assert_eq!(p.actions[0].1, Action::HandOver { source: "h1".into(), target: "h2".into() });
    // A failure the target reports after a live hand-off keeps the server there.
    let broken = server(
        "web",
        "h2",
        spec,
        json!({"phase": "Failed", "conditions": [ready("False", "ImageNotFound", "image gone from the catalog")],
               "migration": live_migration("Running", "h1", "h2")}),
    );
    let p = run(&pool(true, 2), &hosts, &[broken], &[]);
    assert_eq!(records(&p), [("web".into(), MigrationPhase::Failed, "h2".into())]);
    assert!(p.actions.iter().all(|(_, a)| !matches!(a, Action::Return { .. })), "never back to the source");
}

#[test]
fn a_lost_source_fails_the_migration_and_leaves_the_server_to_failover() {
    let hosts = [host("h1", 4, false), host("h2", 4, false)];
    let s = server(
        "web",
        "h1",
        json!({"placement": {"host": "h2"}}),
        json!({"migration": migration("Running", "h1", "h2")}),
    );
    let p = run(&pool(true, 2), &hosts, &[s], &["h1"]);
    assert_eq!(records(&p), [("web".into(), MigrationPhase::Failed, "h2".into())]);
    assert!(p.actions.iter().all(|(_, a)| !matches!(a, Action::HandOver { .. })));
    // Failover restarted it on the very target: still not a migration that succeeded.
    let restarted = server(
        "web",
        "h2",
        json!({"placement": {"host": "h2"}}),
        json!({"migration": migration("Running", "h1", "h2"),
               "failovers": [{"from": "h1", "to": "h2", "at": "2026-01-01T00:00:05Z", "reason": "HostLost"}]}),
    );
    let p = run(&pool(true, 2), &hosts, &[restarted], &["h1"]);
    assert_eq!(records(&p), [("web".into(), MigrationPhase::Failed, "h2".into())]);
}

#[test]
fn maintenance_moves_at_most_the_allowed_number_with_anti_affinity_and_lists_what_cannot_move() {
    let hosts = [host("h1", 16, true), host("h2", 8, false), host("h3", 8, false)];
    let mut servers: Vec<_> = (0..4)
        .map(|i| server(&format!("db{i}"), "h1", json!({"placement": {"antiAffinityGroup": "db"}}), json!({})))
        .collect();
    servers.push(server("pinned", "h1", json!({"placement": {"host": "h1"}}), json!({})));
    servers.push(server("booting", "h1", json!({}), json!({"phase": "Provisioning"})));
    let p = run(&pool(true, 2), &hosts, &servers, &[]);
    let recs = records(&p);
    let running: Vec<_> = recs.iter().filter(|r| r.1 == MigrationPhase::Running).collect();
    assert_eq!(running.len(), 2, "two at a time: {recs:?}");
    let targets: BTreeSet<_> = running.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(targets.len(), 2, "the db group never shares a host: {recs:?}");
    let unmovable: Vec<_> = p.unmovable["h1"].iter().map(|u| (u.server.as_str(), u.reason.as_str())).collect();
    // Two more of the group cannot fit anywhere (two other hosts, one each), plus the
    // pinned and the booting server.
    assert!(unmovable.contains(&("ns/pinned", "PinnedToHost")), "{unmovable:?}");
    assert!(unmovable.contains(&("ns/booting", "NotRunning")), "{unmovable:?}");
    assert_eq!(unmovable.iter().filter(|u| u.1 == "AntiAffinity").count(), 2, "{unmovable:?}");
}

#[test]
fn without_shared_storage_nothing_moves_and_the_reason_says_so() {
    let hosts = [host("h1", 4, true), host("h2", 4, false)];
    let p = run(&pool(false, 2), &hosts, &[server("web", "h1", json!({}), json!({}))], &[]);
    assert!(records(&p).is_empty());
    assert_eq!(p.unmovable["h1"][0].reason, "NoSharedStorage");
}

#[test]
fn a_failed_move_is_not_retried_until_the_target_changes() {
    let hosts = [host("h1", 4, false), host("h2", 4, false), host("h3", 4, false)];
    let failed = json!({"migration": {"source": "h1", "target": "h2", "phase": "Failed", "reason": "x"}});
    let same = server("web", "h1", json!({"placement": {"host": "h2"}}), failed.clone());
    assert!(run(&pool(true, 2), &hosts, &[same], &[]).actions.is_empty());
    let other = server("web", "h1", json!({"placement": {"host": "h3"}}), failed);
    assert_eq!(
        records(&run(&pool(true, 2), &hosts, &[other], &[])),
        [("web".into(), MigrationPhase::Running, "h3".into())]
    );
}

#[test]
fn evacuated_says_when_a_host_is_empty_and_names_what_is_stuck() {
    assert_eq!(evacuation(false, 3, &[]), None);
    assert_eq!(evacuation(true, 0, &[]).unwrap().1, "Evacuated");
    assert_eq!(evacuation(true, 2, &[]).unwrap().1, "Evacuating");
    let stuck = [UnmovableServer { server: "ns/db".into(), reason: "NoSharedStorage".into(), message: "m".into() }];
    let (status, reason, message) = evacuation(true, 2, &stuck).unwrap();
    assert_eq!((status, reason), (covi_api::ConditionStatus::False, "Blocked"));
    assert!(message.contains("ns/db (NoSharedStorage: m)"), "{message}");
}

#[test]
fn a_move_whose_server_failover_unbound_is_failed() {
    let hosts = [host("h1", 4, false), host("h2", 4, false)];
    let mut unbound = (*server("web", "h1", json!({}), json!({"migration": migration("Running", "h1", "h2")}))).clone();
    unbound.status.as_mut().unwrap().host = None;
    let p = run(&pool(true, 2), &hosts, &[Arc::new(unbound)], &["h2"]);
    assert_eq!(records(&p), [("web".into(), MigrationPhase::Failed, "h2".into())]);
}

#[test]
fn automatic_consolidation_moves_what_the_pools_plan_says_and_recommend_moves_nothing() {
    let hosts = [host("h1", 8, false), host("h2", 8, false)];
    let servers = [server("a", "h1", json!({}), json!({})), server("b", "h2", json!({}), json!({}))];
    let with_plan = |mode: &str| {
        let mut p = pool(true, 2);
        p.spec.consolidation.mode = serde_json::from_value(json!(mode)).unwrap();
        p.status = Some(
            serde_json::from_value(json!({"consolidation": {"plannedAt": "2026-01-01T00:00:00Z", "hostsUsed": 2,
                "plannedHosts": 1, "moves": [{"server": "ns/b", "from": "h2", "to": "h1"}],
                "emptiedHosts": ["h2"]}}))
            .unwrap(),
        );
        p
    };
    let plan = run(&with_plan("Automatic"), &hosts, &servers, &[]);
    assert_eq!(records(&plan), [("b".to_string(), MigrationPhase::Running, "h1".to_string())]);
    assert!(run(&with_plan("Recommend"), &hosts, &servers, &[]).actions.is_empty(), "recommend moves nothing");
    // Outside the pool's window (the test's clock reads 00:00 UTC) nothing starts.
    let mut closed = with_plan("Automatic");
    closed.spec.consolidation.window = Some("01:00-05:00".into());
    assert!(run(&closed, &hosts, &servers, &[]).actions.is_empty(), "outside the window");
    closed.spec.consolidation.window = Some("23:00-01:00".into());
    assert_eq!(run(&closed, &hosts, &servers, &[]).actions.len(), 1, "inside it");
    // Once b runs on h1 the plan's move (from h2) asks nothing more.
    let moved = [server("a", "h1", json!({}), json!({})), server("b", "h1", json!({}), json!({}))];
    assert!(run(&with_plan("Automatic"), &hosts, &moved, &[]).actions.is_empty());
}

#[test]
fn a_consolidation_move_keeps_the_failover_reserve_when_it_starts() {
    // Two hosts of 2 CPUs, one highly-available server each: moving b onto h1 would
    // leave too little room to restart h1's servers if it were lost.
    let hosts = [host("h1", 2, false), host("h2", 2, false)];
    let ha = json!({"highAvailability": true});
    let servers = [server("a", "h1", ha.clone(), json!({})), server("b", "h2", ha, json!({}))];
    let mut p = pool(true, 2);
    p.spec.failover.reserve_hosts = 1;
    p.spec.consolidation.mode = covi_api::host_pool::ConsolidationMode::Automatic;
    p.status = Some(
        serde_json::from_value(json!({"consolidation": {"plannedAt": "2026-01-01T00:00:00Z", "hostsUsed": 2,
            "plannedHosts": 1, "moves": [{"server": "ns/b", "from": "h2", "to": "h1"}]}}))
        .unwrap(),
    );
    let plan = run(&p, &hosts, &servers, &[]);
    let (_, action) = plan.actions.first().expect("a record");
    match action {
        Action::Record(m) => {
            assert_eq!((m.phase, m.target.as_str()), (MigrationPhase::Pending, "h1"));
            assert!(m.reason.as_deref().is_some_and(|r| r.starts_with("FailoverReserve")), "{m:?}");
        }
        other => panic!("{other:?}"),
    }
}
