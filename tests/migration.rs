//! Moving servers between hosts: a cold migration through a spec change, cancelling one
//! that has not started, maintenance that empties a host with anti-affinity intact, and
//! faults in the middle of a move. Real operator and agents on libvirt's test driver; a
//! sampler reads every host's domains every 100 ms and fails the test if a server ever
//! runs on two hosts at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use covi_api::condition::find_condition;
use covi_api::virtual_server::MigrationPhase;
use covi_api::{Host, VirtualServer};
use covi_tests::fleet::Fleet;
use covi_tests::guests::ready;
use covi_tests::sampler::Sampler;
use covi_tests::{FIELD_MANAGER, admin, install_crds, namespace, wait_until};
use k8s_openapi::api::core::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use covi_tests::SERIAL;
const DEADLINE: Duration = Duration::from_secs(45);

struct Scene {
    client: Client,
    fleet: Fleet,
    pool: String,
    ns: String,
    api: Api<VirtualServer>,
    hosts: Api<Host>,
}

/// `cpus` per host; short failover timings; at most two migrations at a time.
async fn scene(id: &str, cpus: &[u32]) -> Scene {
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, id).await;
    let spec = json!({
        "storage": {"shared": true}, "migration": {"maxConcurrent": 2},
        "failover": {"renewSeconds": 1, "leaseDurationSeconds": 4, "fenceAfterSeconds": 2, "graceSeconds": 1}
    });
    let pool = fleet.apply_pool(&client, spec).await;
    for (n, c) in cpus.iter().enumerate() {
        fleet.start_agent(n + 1, *c, 64);
    }
    fleet.start_operator();
    fleet.wait_pool_ready(&client, &pool, cpus.len() as u32).await;
    let ns = namespace(&client, id).await;
    Scene { api: Api::namespaced(client.clone(), &ns), hosts: Api::all(client.clone()), client, fleet, pool, ns }
}

impl Scene {
    async fn apply(&self, name: &str, extra: Value) {
        let mut spec = json!({"hostPool": self.pool, "class": "small", "boot": {"image": "debian-12"},
                              "highAvailability": true, "owner": "team-test", "purpose": "migration test"});
        covi_tests::merge(&mut spec, &extra);
        let server = json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
                            "metadata": {"name": name}, "spec": spec});
        self.api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&server)).await.unwrap();
    }

    /// Sets (or with None clears) spec.placement.host by a merge patch, as `kubectl patch` would.
    async fn pin(&self, name: &str, host: Option<&str>) {
        let patch = json!({"spec": {"placement": {"host": host}}});
        self.api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }

    async fn maintenance(&self, host: &str, on: bool) {
        let patch = json!({"spec": {"maintenance": on}});
        self.hosts.patch(host, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }

    fn sampler(&self, count: usize) -> Sampler {
        let hosts = (1..=count)
            .map(|n| (self.fleet.host_name(n), self.fleet.agents[n - 1].log.clone()))
            .collect::<BTreeMap<_, _>>();
        Sampler::start(Arc::new(Mutex::new(hosts)))
    }

    async fn wait(&self, name: &str, what: &str, check: impl Fn(&VirtualServer) -> bool) -> VirtualServer {
        self.fleet.wait_server(&self.api, name, what, DEADLINE, check).await
    }

    /// The reasons of `name`'s Events once all of `wanted` are there, or as they are at
    /// the deadline.
    async fn events(&self, name: &str, wanted: &[&str]) -> Vec<String> {
        covi_tests::events::reasons_including(&self.client, &self.ns, name, Duration::from_secs(30), wanted).await
    }
}

fn host_of(s: &VirtualServer) -> Option<&str> {
    s.status.as_ref()?.host.as_deref()
}

fn migration(s: &VirtualServer) -> Option<&covi_api::virtual_server::MigrationStatus> {
    s.status.as_ref()?.migration.as_ref()
}

#[tokio::test]
async fn changing_the_pinned_host_moves_a_running_server_cold() {
    let _turn = SERIAL.lock().await;
    let s = scene("mig-cold", &[4, 4]).await;
    let (h1, h2) = (s.fleet.host_name(1), s.fleet.host_name(2));
    s.apply("web", json!({"placement": {"host": h1}})).await;
    let before = s.wait("web", "to run on host 1", |v| ready(v) && host_of(v) == Some(h1.as_str())).await;
    let sampler = s.sampler(2);

    s.pin("web", Some(&h2)).await;
    let after = s
        .wait("web", "to run on host 2 after a migration", |v| {
            ready(v)
                && host_of(v) == Some(h2.as_str())
                && migration(v).is_some_and(|m| m.phase == MigrationPhase::Succeeded)
        })
        .await;
    let m = migration(&after).unwrap();
    assert_eq!((m.source.as_str(), m.target.as_str(), m.mode.as_deref()), (h1.as_str(), h2.as_str(), Some("Cold")));
    let (started, finished) = (m.started_at.clone().expect("start").0, m.finished_at.clone().expect("end").0);
    assert!(finished >= started, "{started} .. {finished}");
    println!("cold migration took {:.2}s", (finished - started).total(k8s_openapi::jiff::Unit::Second).unwrap());
    let uuid = |v: &VirtualServer| v.status.as_ref().and_then(|st| st.domain_uuid.clone());
    assert_eq!(uuid(&after), uuid(&before), "the same domain UUID on the new host");
    assert_eq!(after.status.as_ref().unwrap().address, before.status.as_ref().unwrap().address, "same address");
    sampler.assert_never_twice().await;
    let wanted = ["MigrationStarted", "HandedOff", "HandedOver", "Migrated"];
    let events = s.events("web", &wanted).await;
    for reason in wanted {
        assert!(events.iter().any(|e| e == reason), "Event {reason}: {events:?}");
    }
}

#[tokio::test]
async fn reverting_the_pin_before_the_move_starts_cancels_it() {
    let _turn = SERIAL.lock().await;
    let s = scene("mig-cancel", &[4, 1]).await;
    let (h1, h2) = (s.fleet.host_name(1), s.fleet.host_name(2));
    // Host 2's only CPU is taken, so a move there waits.
    s.apply("filler", json!({"placement": {"host": h2}})).await;
    s.apply("web", json!({"placement": {"host": h1}})).await;
    s.wait("web", "to run on host 1", |v| ready(v) && host_of(v) == Some(h1.as_str())).await;
    s.wait("filler", "to run on host 2", ready).await;

    s.pin("web", Some(&h2)).await;
    let waiting =
        s.wait("web", "to wait for room", |v| migration(v).is_some_and(|m| m.phase == MigrationPhase::Pending)).await;
    let reason = migration(&waiting).unwrap().reason.clone().unwrap_or_default();
    assert!(reason.starts_with("InsufficientCPU"), "the record says why it waits: {reason}");
    assert!(ready(&waiting) && host_of(&waiting) == Some(h1.as_str()), "still running on host 1");

    s.pin("web", Some(&h1)).await;
    let cancelled = s.wait("web", "the move to be called off", |v| migration(v).is_none()).await;
    assert!(ready(&cancelled) && host_of(&cancelled) == Some(h1.as_str()));
    assert!(s.events("web", &["MigrationCancelled"]).await.iter().any(|e| e == "MigrationCancelled"));
}

#[tokio::test]
async fn maintenance_empties_a_host_with_anti_affinity_intact_then_uncordons() {
    let _turn = SERIAL.lock().await;
    let mut s = scene("mig-maint", &[16]).await;
    let h1 = s.fleet.host_name(1);
    // Ten servers on host 1, each in its own anti-affinity group.
    for i in 0..10 {
        s.apply(&format!("s-{i}"), json!({"placement": {"antiAffinityGroup": format!("g{i}")}})).await;
    }
    wait_until("ten servers Ready on host 1", DEADLINE, || async {
        let list = s.api.list(&ListParams::default()).await.ok()?;
        (list.items.iter().filter(|v| ready(v) && host_of(v) == Some(h1.as_str())).count() == 10).then_some(())
    })
    .await;
    // Two more hosts, and a peer of every group on one of them: each server has exactly
    // one host it may move to.
    s.fleet.start_agent(2, 16, 64);
    s.fleet.start_agent(3, 16, 64);
    s.fleet.wait_pool_ready(&s.client, &s.pool, 3).await;
    let (h2, h3) = (s.fleet.host_name(2), s.fleet.host_name(3));
    for i in 0..10 {
        let peer_host = if i % 2 == 0 { &h2 } else { &h3 };
        s.apply(&format!("peer-{i}"), json!({"placement": {"antiAffinityGroup": format!("g{i}"), "host": peer_host}}))
            .await;
    }
    wait_until("every peer Ready", DEADLINE, || async {
        let list = s.api.list(&ListParams::default()).await.ok()?;
        (list.items.iter().filter(|v| ready(v)).count() == 20).then_some(())
    })
    .await;
    let sampler = s.sampler(3);

    s.maintenance(&h1, true).await;
    let most_at_once = std::cell::Cell::new(0);
    let (scene, most, first) = (&s, &most_at_once, h1.as_str());
    let (host, servers) = wait_until("host 1 to report Evacuated", Duration::from_secs(90), || async move {
        let list = scene.api.list(&ListParams::default()).await.ok()?;
        let running =
            list.items.iter().filter(|v| migration(v).is_some_and(|m| m.phase == MigrationPhase::Running)).count();
        most.set(most.get().max(running));
        let host = scene.hosts.get(first).await.ok()?;
        let c = find_condition(&host.status.as_ref()?.conditions, "Evacuated")?.clone();
        (c.status == "True").then_some((host, list.items))
    })
    .await;
    let most_at_once = most_at_once.get();
    assert!(most_at_once <= 2, "at most maxConcurrent (2) migrations at once, saw {most_at_once}");
    assert!(most_at_once >= 1, "migrations were seen running");
    assert_eq!(host.status.as_ref().unwrap().servers, 0);
    assert_eq!(servers.len(), 20);
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for v in &servers {
        assert!(ready(v), "{:?} is Ready", v.metadata.name);
        assert_ne!(host_of(v), Some(h1.as_str()), "{:?} left host 1", v.metadata.name);
        let group = v.spec.placement.as_ref().and_then(|p| p.anti_affinity_group.clone()).unwrap();
        let fresh = groups.entry(group.clone()).or_default().insert(host_of(v).unwrap().to_string());
        assert!(fresh, "group {group} shares a host: {:?}", v.metadata.name);
    }
    sampler.assert_never_twice().await;
    let evacuated_events = {
        let events: Api<Event> = Api::all(s.client.clone());
        let list = events.list(&ListParams::default().fields(&format!("involvedObject.name={h1}"))).await.unwrap();
        list.items.into_iter().filter_map(|e| e.reason).filter(|r| r == "Evacuated").count()
    };
    assert_eq!(evacuated_events, 1, "one Evacuated Event on the host");

    // A server pinned to a host in maintenance cannot move: listed, and it keeps running.
    s.maintenance(&h1, false).await;
    wait_until("the Evacuated condition to go", DEADLINE, || async {
        let host = s.hosts.get(&h1).await.ok()?;
        find_condition(&host.status?.conditions, "Evacuated").is_none().then_some(())
    })
    .await;
    s.apply("stay", json!({"placement": {"host": h1}})).await;
    s.wait("stay", "to run on the uncordoned host 1", |v| ready(v) && host_of(v) == Some(h1.as_str())).await;
    s.maintenance(&h1, true).await;
    let blocked = wait_until("host 1 to list what cannot move", DEADLINE, || async {
        let host = s.hosts.get(&h1).await.ok()?;
        let status = host.status?;
        let c = find_condition(&status.conditions, "Evacuated")?.clone();
        (c.reason == "Blocked" && !status.unmovable.is_empty()).then_some((c, status.unmovable))
    })
    .await;
    assert_eq!(blocked.1[0].server, format!("{}/stay", s.ns));
    assert_eq!(blocked.1[0].reason, "PinnedToHost");
    assert!(blocked.0.message.contains("stay (PinnedToHost"), "{}", blocked.0.message);
    let stay = s.api.get("stay").await.unwrap();
    assert!(ready(&stay) && host_of(&stay) == Some(h1.as_str()), "nothing is stopped silently");
}

/// Runs until the server is Ready again; returns it, with the sampler's verdict.
async fn settle(s: &Scene, sampler: Sampler, name: &str) -> VirtualServer {
    let server = s.wait(name, "to run again, exactly once", ready).await;
    sampler.assert_never_twice().await;
    server
}

#[tokio::test]
async fn a_source_lost_in_the_middle_of_a_move_goes_down_the_failover_path() {
    let _turn = SERIAL.lock().await;
    let mut s = scene("mig-lost-src", &[4, 4, 4]).await;
    let (h1, h2) = (s.fleet.host_name(1), s.fleet.host_name(2));
    s.apply("db", json!({"placement": {"host": h1}})).await;
    s.wait("db", "to run on host 1", |v| ready(v) && host_of(v) == Some(h1.as_str())).await;
    let sampler = s.sampler(3);
    // The source's agent dies (its test-driver domains with it), then the move is asked.
    s.fleet.agents[0].kill();
    s.pin("db", Some(&h2)).await;
    let failed = s
        .wait("db", "its migration to fail with the lost source", |v| {
            migration(v).is_some_and(|m| m.phase == MigrationPhase::Failed)
        })
        .await;
    let reason = migration(&failed).unwrap().reason.clone().unwrap_or_default();
    assert!(reason.contains("was lost"), "{reason}");
    let server = settle(&s, sampler, "db").await;
    assert_ne!(host_of(&server), Some(h1.as_str()), "restarted elsewhere by failover");
    assert_eq!(server.status.as_ref().unwrap().failovers.len(), 1, "a failover record");
    s.fleet.agents[0].start();
}

#[tokio::test]
async fn a_target_frozen_in_the_middle_of_a_move_never_yields_two_copies() {
    let _turn = SERIAL.lock().await;
    let s = scene("mig-frozen-dst", &[4, 4, 4]).await;
    let (h1, h2) = (s.fleet.host_name(1), s.fleet.host_name(2));
    s.apply("db", json!({"placement": {"host": h1}})).await;
    s.wait("db", "to run on host 1", |v| ready(v) && host_of(v) == Some(h1.as_str())).await;
    let sampler = s.sampler(3);
    let pid = s.fleet.agents[1].pid().expect("agent 2 runs") as i32;
    // SAFETY: plain signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    s.pin("db", Some(&h2)).await;
    // The fault lasts until the operator declares the target lost (it fences itself
    // when it thaws).
    let h2_for_wait = h2.clone();
    wait_until("the frozen target to be declared lost", DEADLINE, || {
        let (hosts, name) = (s.hosts.clone(), h2_for_wait.clone());
        async move {
            let host = hosts.get(&name).await.ok()?;
            find_condition(&host.status?.conditions, "Lost").is_some_and(|c| c.status == "True").then_some(())
        }
    })
    .await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let server = settle(&s, sampler, "db").await;
    let m = migration(&server).expect("a migration record");
    assert_eq!(m.phase, MigrationPhase::Failed, "{m:?}");
    println!("db runs on {:?}; migration: {:?}", host_of(&server), m.reason);
}
