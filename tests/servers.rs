//! Servers come up: covi-operator binds them, covi-agents converge them on libvirt's
//! test driver, and status, conditions and Events tell the truth. Real API server,
//! real operator and agent processes, real libvirt (test driver, one inventory per host).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use covi_api::VirtualServer;
use covi_api::condition::find_condition;
use covi_api::virtual_server::VirtualServerPhase;
use covi_tests::fleet::{Fleet, Process, bin};
use covi_tests::guests::ready;
use covi_tests::{FIELD_MANAGER, admin, install_crds, kubectl, namespace, poll, wait_until};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

// Every test here runs its own operator, and an operator schedules every pool, so
// the tests take turns.
use covi_tests::SERIAL;
use covi_tests::fleet::apply_server;

const DEADLINE: Duration = Duration::from_secs(30);

fn phase(s: &VirtualServer) -> Option<VirtualServerPhase> {
    s.status.as_ref().and_then(|st| st.phase)
}

fn condition<'a>(s: &'a VirtualServer, type_: &str) -> Option<&'a covi_api::Condition> {
    s.status.as_ref().and_then(|st| find_condition(&st.conditions, type_))
}

async fn setup(id: &str, hosts: &[(u32, u64)]) -> (Client, Fleet, String, String, Api<VirtualServer>) {
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, id).await;
    let pool = fleet.apply_pool(&client, json!({})).await;
    for (n, (cpus, mem)) in hosts.iter().enumerate() {
        fleet.start_agent(n + 1, *cpus, *mem);
    }
    fleet.start_operator();
    fleet.wait_ready_hosts(&client, hosts.len()).await;
    fleet.wait_pool_ready(&client, &pool, hosts.len() as u32).await;
    let ns = namespace(&client, id).await;
    let api = Api::namespaced(client.clone(), &ns);
    (client, fleet, pool, ns, api)
}

#[tokio::test]
async fn a_server_becomes_running_with_an_address_from_the_pool() {
    let _turn = SERIAL.lock().await;
    let (client, fleet, pool, ns, api) = setup("run", &[(8, 16), (8, 16)]).await;
    apply_server(&api, "web-1", &pool, json!({"hostname": "web-one"})).await;

    let (ok, out) = kubectl(&["wait", "-n", &ns, "--for=condition=Ready", "--timeout=30s", "virtualserver/web-1"]);
    assert!(ok, "kubectl wait failed: {out}\n{}", fleet.operator.as_ref().unwrap().log_tail());

    let s = api.get("web-1").await.expect("server");
    let status = s.status.clone().expect("status");
    assert_eq!(status.phase, Some(VirtualServerPhase::Running));
    let host = status.host.clone().expect("bound");
    assert!(host.starts_with("run-host-"), "{host}");
    let address: std::net::Ipv4Addr = status.address.as_deref().expect("address").parse().expect("IPv4");
    assert_eq!(address.octets()[..3], [10, 77, 0], "address {address} is in 10.77.0.0/24");
    assert_ne!(address.octets()[3], 1, "the gateway is never handed out");
    assert_eq!((status.cpus, status.memory.as_deref()), (Some(1), Some("1Gi")));
    assert_eq!(status.domain_uuid, s.uid(), "the domain's UUID is the server's UID");
    assert_eq!(status.observed_generation, s.metadata.generation);
    assert!(s.finalizers().iter().any(|f| f == covi_api::contract::FINALIZER));
    // The host's Assignment, which its agent watches, lists the server.
    let (ok, listed) = kubectl(&["get", "assignment", &host, "-o", "jsonpath={.spec.servers[*].name}"]);
    assert!(ok && listed.split_whitespace().any(|n| n == "web-1"), "Assignment {host} lists: {listed}");

    let events = covi_tests::events::wait(&client, &ns, "web-1", DEADLINE, |e| {
        ["Scheduled", "Started"].iter().all(|want| e.iter().any(|(r, _)| r == want))
    })
    .await;
    let reasons: BTreeSet<_> = events.iter().map(|(r, _)| r.as_str()).collect();
    for reason in ["Scheduled", "Started"] {
        assert!(reasons.contains(reason), "missing Event {reason}: {reasons:?}");
    }
    // Defined and started in one go: one Event says both.
    let started = events.iter().find(|(r, _)| r == "Started").map(|(_, note)| note.as_str()).unwrap_or_default();
    assert!(started.contains("defined and started on run-host-"), "{started}");

    // The agent reports its host's facts, storage included.
    let hosts: Api<covi_api::Host> = Api::all(client.clone());
    let facts = wait_until("the host to report its storage", DEADLINE, || async {
        let h = hosts.get(&host).await.ok()?;
        let c = h.status?.capacity?;
        c.storage.is_some().then_some(c)
    })
    .await;
    assert_eq!((facts.cpus, facts.memory.as_str()), (8, "16384Mi"));

    // Both binaries serve Prometheus metrics and a health endpoint.
    let operator = fleet.operator.as_ref().expect("operator");
    let metrics = wait_until("the operator to count the running server", DEADLINE, || async {
        let m = covi_tests::fleet::scrape(operator, "/metrics").await;
        // Servers of earlier tests still exist: at least this one runs.
        let running = m
            .lines()
            .find_map(|l| l.strip_prefix("covi_servers{phase=\"Running\"} "))
            .and_then(|n| n.trim().parse::<i64>().ok())
            .unwrap_or(0);
        (running >= 1).then_some(m)
    })
    .await;
    assert!(metrics.contains("covi_operator_reconciles_total{result=\"ok\"}"), "{metrics}");
    let agent_metrics = covi_tests::fleet::scrape(&fleet.agents[0], "/metrics").await;
    assert!(agent_metrics.contains("covi_agent_reconcile_duration_seconds"), "{agent_metrics}");
    assert_eq!(covi_tests::fleet::scrape(operator, "/healthz").await, "ok\n");

    let pools: Api<covi_api::HostPool> = Api::all(client.clone());
    let p = wait_until("pool status to count the server", DEADLINE, || async {
        let p = pools.get(&pool).await.ok()?;
        (p.status.as_ref()?.servers == 1).then_some(p)
    })
    .await;
    let ps = p.status.expect("pool status");
    assert_eq!((ps.ready_hosts, ps.total_hosts), (2, 2));
    assert_eq!(ps.cpu_allocation.as_deref(), Some("1/16"));
}

#[tokio::test]
async fn run_policy_stops_and_starts_and_delete_releases_the_finalizer() {
    let _turn = SERIAL.lock().await;
    let (client, fleet, pool, ns, api) = setup("policy", &[(8, 16)]).await;
    apply_server(&api, "db-1", &pool, json!({})).await;
    fleet.wait_server(&api, "db-1", "to be Ready", DEADLINE, ready).await;

    apply_server(&api, "db-1", &pool, json!({"runPolicy": "Stopped"})).await;
    let stopped = fleet
        .wait_server(&api, "db-1", "to be Stopped", DEADLINE, |s| phase(s) == Some(VirtualServerPhase::Stopped))
        .await;
    let c = condition(&stopped, "Ready").expect("Ready condition");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Stopped"), "stopped as the spec asks");
    let events =
        covi_tests::events::wait(&client, &ns, "db-1", DEADLINE, |e| e.iter().any(|(r, _)| r == "Stopped")).await;
    let reasons: Vec<_> = events.into_iter().map(|(r, _)| r).collect();
    assert!(reasons.iter().any(|r| r == "Stopped"), "an Event says it stopped: {reasons:?}");

    apply_server(&api, "db-1", &pool, json!({"runPolicy": "Running"})).await;
    fleet
        .wait_server(&api, "db-1", "to run again", DEADLINE, |s| {
            ready(s) && phase(s) == Some(VirtualServerPhase::Running)
        })
        .await;

    let host = api.get("db-1").await.expect("db-1").status.and_then(|s| s.host).expect("bound");
    api.delete("db-1", &DeleteParams::default()).await.expect("delete");
    wait_until("db-1 to be gone", DEADLINE, || async { api.get_opt("db-1").await.ok()?.is_none().then_some(()) }).await;
    // Nothing stays assigned to the host.
    let assignments: Api<covi_api::Assignment> = Api::all(client.clone());
    wait_until("the host's Assignment to be empty", DEADLINE, || async {
        let a = assignments.get(&host).await.ok()?;
        (a.spec.count == 0 && a.spec.servers.is_empty()).then_some(())
    })
    .await;
    let events =
        covi_tests::events::wait(&client, &ns, "db-1", DEADLINE, |e| e.iter().any(|(r, _)| r == "Removed")).await;
    let reasons: Vec<_> = events.into_iter().map(|(r, _)| r).collect();
    assert!(reasons.iter().any(|r| r == "Removed"), "the agent removed domain and disks first: {reasons:?}");
}

#[tokio::test]
async fn anti_affinity_members_never_share_a_host() {
    let _turn = SERIAL.lock().await;
    let (_client, fleet, pool, _ns, api) = setup("anti", &[(8, 16), (8, 16), (8, 16)]).await;
    for i in 1..=4 {
        apply_server(&api, &format!("web-{i}"), &pool, json!({"placement": {"antiAffinityGroup": "web"}})).await;
    }
    let mut hosts = BTreeSet::new();
    let mut pending = Vec::new();
    for i in 1..=4 {
        let s = fleet
            .wait_server(&api, &format!("web-{i}"), "to be decided", DEADLINE, |s| {
                ready(s) || condition(s, "Scheduled").is_some_and(|c| c.status == "False")
            })
            .await;
        match s.status.as_ref().and_then(|st| st.host.clone()) {
            Some(h) => assert!(hosts.insert(h.clone()), "two members of group web share {h}"),
            None => pending.push(condition(&s, "Scheduled").cloned().expect("Scheduled condition")),
        }
    }
    assert_eq!(hosts.len(), 3, "three hosts, three members");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].reason, "AntiAffinity");
    assert!(pending[0].message.contains("anti-affinity group web"), "{}", pending[0].message);
}

#[tokio::test]
async fn too_large_a_server_waits_with_a_reason_and_binds_when_a_host_joins() {
    let _turn = SERIAL.lock().await;
    let (client, mut fleet, pool, ns, api) = setup("large", &[(4, 16)]).await;
    apply_server(&api, "big", &pool, json!({"class": null, "resources": {"cpus": 8, "memory": "2Gi", "disk": "10Gi"}}))
        .await;
    let s = fleet
        .wait_server(&api, "big", "to be Pending with a reason", DEADLINE, |s| {
            condition(s, "Scheduled").is_some_and(|c| c.status == "False" && c.reason == "InsufficientCPU")
        })
        .await;
    assert_eq!(phase(&s), Some(VirtualServerPhase::Pending));
    let c = condition(&s, "Scheduled").expect("Scheduled");
    assert_eq!(c.reason, "InsufficientCPU");
    assert!(
        c.message.starts_with(&format!("no host in pool {pool} has 8 free CPUs; the largest free is 4")),
        "{}",
        c.message
    );
    let found = |r: &str, m: &str| r == "FailedScheduling" && m.contains("8 free CPUs");
    let events = covi_tests::events::wait(&client, &ns, "big", DEADLINE, |e| e.iter().any(|(r, m)| found(r, m))).await;
    assert!(events.iter().any(|(r, m)| found(r, m)), "{events:?}");

    fleet.start_agent(2, 16, 32);
    let s = fleet.wait_server(&api, "big", "to run once a large host joins", DEADLINE, ready).await;
    assert_eq!(s.status.and_then(|st| st.host), Some(fleet.host_name(2)));
}

#[tokio::test]
async fn bad_input_gets_a_reason_and_an_event_and_nothing_is_created() {
    let _turn = SERIAL.lock().await;
    let (client, fleet, pool, ns, api) = setup("bad", &[(8, 16)]).await;
    apply_server(&api, "taken-first", &pool, json!({"network": {"address": "10.77.0.50"}})).await;
    fleet.wait_server(&api, "taken-first", "to be Ready", DEADLINE, ready).await;
    // The network's own addresses: a reserved range and a resolver inside the CIDR.
    let network = json!({"network": {"reserved": ["10.77.0.200-10.77.0.210"], "dns": ["10.77.0.53"]}});
    fleet.apply_pool(&client, network).await;

    let cases = [
        (
            "no-image",
            json!({"boot": {"image": "windows-95"}}),
            "ImageNotFound",
            "image windows-95 is not in the catalog",
        ),
        ("no-class", json!({"class": "gigantic"}), "ClassNotFound", "class gigantic is not defined in pool"),
        (
            "outside",
            json!({"network": {"address": "192.0.2.10"}}),
            "AddressOutsideNetwork",
            "outside the pool's network 10.77.0.0/24",
        ),
        ("taken", json!({"network": {"address": "10.77.0.50"}}), "AddressTaken", "10.77.0.50 is already used"),
        (
            "in-reserved",
            json!({"network": {"address": "10.77.0.205"}}),
            "AddressReserved",
            "address 10.77.0.205 is in the pool's reserved range 10.77.0.200-10.77.0.210",
        ),
        (
            "on-dns",
            json!({"network": {"address": "10.77.0.53"}}),
            "AddressReserved",
            "address 10.77.0.53 is one of the pool's DNS servers",
        ),
    ];
    for (name, extra, _, _) in &cases {
        apply_server(&api, name, &pool, extra.clone()).await;
    }
    for (name, _, reason, message) in cases {
        let s =
            fleet.wait_server(&api, name, "to fail", DEADLINE, |s| phase(s) == Some(VirtualServerPhase::Failed)).await;
        let c = condition(&s, "Scheduled").expect("Scheduled condition");
        assert_eq!(c.reason, reason, "{name}");
        assert!(c.message.contains(message), "{name}: {}", c.message);
        let status = s.status.clone().unwrap_or_default();
        assert!(
            status.host.is_none() && status.address.is_none() && status.domain_uuid.is_none(),
            "{name} half-created: {status:?}"
        );
        let events = covi_tests::events::wait(&client, &ns, name, DEADLINE, |e| {
            e.iter().any(|(r, m)| r == reason && m.contains(message))
        })
        .await;
        assert!(events.iter().any(|(r, m)| r == reason && m.contains(message)), "{name}: {events:?}");
    }
    // Deleting a server that never ran is immediate: no agent has anything to clean.
    api.delete("no-image", &DeleteParams::default()).await.expect("delete");
    wait_until("no-image to be gone", DEADLINE, || async {
        api.get_opt("no-image").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn thirty_servers_bind_in_a_burst_without_overcommitting_a_host() {
    let _turn = SERIAL.lock().await;
    let (client, _fleet, pool, _ns, api) = setup("burst", &[(10, 64), (10, 64), (10, 64)]).await;
    let started = Instant::now();
    let applies = (0..31).map(|i| {
        let (api, pool) = (api.clone(), pool.clone());
        async move { apply_server(&api, &format!("b-{i}"), &pool, json!({})).await }
    });
    futures::future::join_all(applies).await;
    let all = wait_until("30 servers Ready and one Pending", DEADLINE, || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        let ready_count = list.items.iter().filter(|s| ready(s)).count();
        let pending = list
            .items
            .iter()
            .filter(|s| condition(s, "Scheduled").is_some_and(|c| c.reason == "InsufficientCPU"))
            .count();
        (ready_count == 30 && pending == 1).then_some(list.items)
    })
    .await;
    println!("30 servers Ready {:?} after the first create", started.elapsed());
    let mut per_host = std::collections::BTreeMap::new();
    for s in &all {
        if let Some(h) = s.status.as_ref().and_then(|st| st.host.clone()) {
            *per_host.entry(h).or_insert(0) += 1;
        }
    }
    assert!(per_host.values().all(|n| *n == 10), "each 10-CPU host holds exactly 10 servers: {per_host:?}");
    let hosts: Api<covi_api::Host> = Api::all(client);
    // Counts alone reach a Host's status within the operator's coalescing window
    // (10 s) and its next full pass (at most 10 s later).
    for h in per_host.keys() {
        let allocation = || async { hosts.get(h).await.ok()?.status?.cpu_allocation };
        let full = poll(Duration::from_secs(30), || async { allocation().await.filter(|a| a == "10/10") }).await;
        assert!(full.is_some(), "{h} says {:?}, not 10/10", allocation().await);
    }
}

/// The leader election tests' start: one host and its pool, `operators` (identity and
/// lease seconds) started, and a server `before` Ready under the first leader.
async fn under_a_first_leader(
    id: &str,
    operators: &[(&str, u32)],
) -> (Client, Fleet, String, Api<VirtualServer>, Vec<Process>) {
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, id).await;
    let pool = fleet.apply_pool(&client, json!({})).await;
    fleet.start_agent(1, 8, 16);
    let processes = operators
        .iter()
        .map(|(identity, lease)| {
            Process::spawn(&format!("{id}-{identity}"), bin("covi-operator"), fleet.operator_args(identity, *lease))
        })
        .collect();
    fleet.wait_ready_hosts(&client, 1).await;
    let ns = namespace(&client, id).await;
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    apply_server(&api, "before", &pool, json!({})).await;
    fleet.wait_server(&api, "before", "to be Ready under the first leader", DEADLINE, ready).await;
    (client, fleet, pool, api, processes)
}

#[tokio::test]
async fn the_standby_operator_takes_over_when_the_leader_dies() {
    let _turn = SERIAL.lock().await;
    let (client, fleet, pool, api, mut operators) =
        under_a_first_leader("leader", &[("operator-a", 3), ("operator-b", 3)]).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &fleet.lease_namespace);
    let holder =
        leases.get("covi-operator").await.expect("leader lease").spec.and_then(|s| s.holder_identity).expect("holder");
    let killed_at = Instant::now();
    match holder.as_str() {
        "operator-a" => operators[0].kill(),
        "operator-b" => operators[1].kill(),
        other => panic!("unexpected leader {other}"),
    }
    apply_server(&api, "after", &pool, json!({})).await;
    fleet.wait_server(&api, "after", "to be Ready under the new leader", DEADLINE, ready).await;
    let new_holder = leases.get("covi-operator").await.expect("lease").spec.and_then(|s| s.holder_identity);
    assert_ne!(new_holder.as_deref(), Some(holder.as_str()), "the standby leads now");
    println!("standby bound a new server {:?} after the leader was killed", killed_at.elapsed());
}

#[tokio::test]
async fn a_stopped_leader_hands_its_lease_over_at_once() {
    let _turn = SERIAL.lock().await;
    // A lease of a minute: a next replica that had to wait it out (as after a crash)
    // could not schedule within the deadline below; one that takes the given-up Lease
    // a third of it later (20 s, and up to 12 s until it looks again) can.
    let (client, fleet, pool, api, mut operators) = under_a_first_leader("handover", &[("operator-a", 60)]).await;

    // SIGTERM, as a rolling update of the Deployment sends.
    assert!(operators[0].terminate(Duration::from_secs(10)), "the leader exits within 10 s of SIGTERM");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &fleet.lease_namespace);
    let spec = leases.get("covi-operator").await.expect("leader lease").spec.unwrap_or_default();
    assert_eq!(spec.holder_identity, None, "the stopped leader gave its Lease up: {spec:?}");

    let stopped_at = Instant::now();
    let _b = Process::spawn("handover-operator-b", bin("covi-operator"), fleet.operator_args("operator-b", 60));
    apply_server(&api, "after", &pool, json!({})).await;
    let within = Duration::from_secs(45);
    fleet.wait_server(&api, "after", "to be Ready under the next replica", within, ready).await;
    let holder = leases.get("covi-operator").await.expect("lease").spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("operator-b"), "the next replica leads");
    println!("the next replica bound a new server {:?} after the leader stopped", stopped_at.elapsed());
}

#[tokio::test]
async fn an_installer_iso_is_a_volume_of_the_pool_never_a_host_path() {
    let _turn = SERIAL.lock().await;
    let (client, fleet, pool, ns, api) = setup("iso", &[(8, 16)]).await;
    // A volume the pool's storage pool has: attached, and the server runs.
    apply_server(&api, "installer", &pool, json!({"boot": {"image": null, "iso": "debian-12.img"}})).await;
    fleet.wait_server(&api, "installer", "to run from the ISO volume", DEADLINE, ready).await;
    // One it does not have: refused by the host's agent with the reason, nothing started.
    apply_server(&api, "missing", &pool, json!({"boot": {"image": null, "iso": "installer.iso"}})).await;
    let s =
        fleet.wait_server(&api, "missing", "to fail", DEADLINE, |s| phase(s) == Some(VirtualServerPhase::Failed)).await;
    let c = condition(&s, "Ready").expect("Ready condition");
    assert_eq!(c.reason, "IsoNotFound");
    assert!(c.message.contains("ISO volume installer.iso is not in storage pool default-pool"), "{}", c.message);
    let events =
        covi_tests::events::wait(&client, &ns, "missing", DEADLINE, |e| e.iter().any(|(r, _)| r == "IsoNotFound"))
            .await;
    assert!(events.iter().any(|(r, _)| r == "IsoNotFound"), "{events:?}");
    // A host path is refused at admission, naming the field.
    let path = json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer", "metadata": {"name": "shadow"},
        "spec": {"hostPool": pool, "class": "small", "boot": {"iso": "/etc/shadow"}, "owner": "o", "purpose": "p"}});
    let refused = api.patch("shadow", &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&path)).await;
    let message = refused.expect_err("a host path must be refused").to_string();
    assert!(message.contains("spec.boot.iso") && message.contains("not a path"), "{message}");
}

#[tokio::test]
async fn two_operators_under_one_forged_lease_never_both_lead() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, "forged").await;
    let pool = fleet.apply_pool(&client, json!({})).await;
    fleet.start_agent(1, 16, 32);
    // A leader Lease someone copied: held by "operator-x", just renewed. Both replicas
    // below are started under that very identity.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &fleet.lease_namespace);
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
    let forged: Lease = serde_json::from_value(json!({
        "metadata": {"name": "covi-operator"},
        "spec": {"holderIdentity": "operator-x", "leaseDurationSeconds": 3, "acquireTime": now, "renewTime": now}
    }))
    .unwrap();
    let _ = leases.delete("covi-operator", &DeleteParams::default()).await;
    leases.create(&Default::default(), &forged).await.expect("forge the leader lease");
    let a = Process::spawn("forged-operator-a", bin("covi-operator"), fleet.operator_args("operator-x", 3));
    let b = Process::spawn("forged-operator-b", bin("covi-operator"), fleet.operator_args("operator-x", 3));
    fleet.wait_ready_hosts(&client, 1).await;
    let ns = namespace(&client, "forged").await;
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    for i in 0..12 {
        apply_server(&api, &format!("s{i}"), &pool, json!({})).await;
    }
    for i in 0..12 {
        fleet.wait_server(&api, &format!("s{i}"), "to be Ready", DEADLINE, ready).await;
    }
    // Exactly one of the two leads, sampled for a while.
    let leaders = || async {
        let mut n = 0;
        for p in [&a, &b] {
            let metrics = covi_tests::fleet::scrape(p, "/metrics").await;
            n += metrics.lines().filter(|l| l.trim() == "covi_operator_leader 1").count();
        }
        n
    };
    let wrong = covi_tests::poll(Duration::from_secs(3), || async {
        let n = leaders().await;
        (n != 1).then_some(n)
    })
    .await;
    assert!(wrong.is_none(), "one replica leads, never two: {wrong:?} led at once");
    let servers = api.list(&ListParams::default()).await.expect("list");
    let addresses: BTreeSet<_> =
        servers.items.iter().filter_map(|s| s.status.as_ref().and_then(|st| st.address.clone())).collect();
    assert_eq!(addresses.len(), 12, "every server its own address");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let duplicates = events.list(&ListParams::default().fields("reason=DuplicateAddress")).await.expect("events");
    assert!(duplicates.items.is_empty(), "{:?}", duplicates.items);
}

#[tokio::test]
async fn a_server_whose_host_is_gone_for_good_can_still_be_deleted() {
    let _turn = SERIAL.lock().await;
    let (client, mut fleet, pool, _ns, api) = setup("gone", &[(8, 16)]).await;
    apply_server(&api, "orphan", &pool, json!({})).await;
    fleet.wait_server(&api, "orphan", "to be Ready", DEADLINE, ready).await;
    // The hypervisor is decommissioned: agent stopped, Host object removed.
    fleet.agents[0].kill();
    let hosts: Api<covi_api::Host> = Api::all(client.clone());
    hosts.delete(&fleet.host_name(1), &DeleteParams::default()).await.expect("delete host");
    api.delete("orphan", &DeleteParams::default()).await.expect("delete server");
    wait_until("the server to be gone", DEADLINE, || async {
        api.get_opt("orphan").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn operator_and_agents_run_with_their_least_privilege_roles() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    // The release namespace of deploy/base, where the roles grant Leases: covi-system.
    let mut fleet = Fleet::new(&client, "system").await;
    let root = covi_tests::repo_root();
    let (ok, out) =
        kubectl(&["apply", "--server-side", "-f", &root.join("deploy/base/rbac.yaml").display().to_string()]);
    assert!(ok, "{out}");
    for (name, role, group) in [
        ("covi-agents-lp", "covi-agent", "covi:agents-lp"),
        ("covi-operators-lp", "covi-operator", "covi:operators-lp"),
    ] {
        let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]});
        let api: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(client.clone());
        api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&binding)).await.expect("bind role");
    }
    // The Lease roles are bound to the service accounts and covi:agents; bind this
    // test's groups as a user binds their own.
    for (role, group) in [("covi-agent-leases", "covi:agents-lp"), ("covi-operator-leases", "covi:operators-lp")] {
        let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("{role}-lp"), "namespace": fleet.lease_namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]});
        let api: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(client.clone(), &fleet.lease_namespace);
        let name = format!("{role}-lp");
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&binding)).await.expect("bind");
    }
    let pool = fleet.apply_pool(&client, json!({})).await;
    for n in 1..=2 {
        let node = fleet.host_name(n);
        let kc = covi_tests::fleet::kubeconfig_as(
            &format!("agent-{node}"),
            &format!("covi-agent:{node}"),
            &["covi:agents-lp"],
        );
        let uri = format!("test://{}", covi_tests::fleet::node_xml(&node, 8, 16).display());
        fleet.start_agent_uri(n, &uri, &["--kubeconfig", &kc.display().to_string()]);
    }
    let kc = covi_tests::fleet::kubeconfig_as("operator-lp", "covi-operator", &["covi:operators-lp"]);
    let mut args = fleet.operator_args("leastpriv-operator", 5);
    args.extend(["--kubeconfig".to_string(), kc.display().to_string()]);
    fleet.operator = Some(Process::spawn("leastpriv-operator", bin("covi-operator"), args));
    fleet.wait_ready_hosts(&client, 2).await;
    fleet.wait_pool_ready(&client, &pool, 2).await;

    let ns = namespace(&client, "leastpriv").await;
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    apply_server(&api, "lp-1", &pool, json!({"highAvailability": true})).await;
    fleet.wait_server(&api, "lp-1", "to run", DEADLINE, ready).await;
    api.delete("lp-1", &DeleteParams::default()).await.expect("delete");
    wait_until("lp-1 to be gone", DEADLINE, || async { api.get_opt("lp-1").await.ok()?.is_none().then_some(()) }).await;
    for log in fleet.agents.iter().map(|a| a.log_tail()).chain(fleet.operator.iter().map(|o| o.log_tail())) {
        assert!(!log.contains("forbidden"), "a covi process was refused something:\n{log}");
    }
}

/// Deleting a server whose host is gone dark does not wait for that host: once the
/// host is lost (and so has fenced itself), the operator releases it, saying why.
#[tokio::test]
async fn deleting_a_server_on_a_lost_host_does_not_wait_for_the_host() {
    let _turn = SERIAL.lock().await;
    let (client, mut fleet, pool, ns, api) = setup("deadhost", &[(8, 16)]).await;
    apply_server(&api, "stranded", &pool, json!({})).await;
    fleet.wait_server(&api, "stranded", "to run", DEADLINE, ready).await;
    fleet.agents[0].kill();
    api.delete("stranded", &DeleteParams::default()).await.expect("delete");
    // The pool's default timings: lost 13 s after the last renewal.
    wait_until("the server to be gone once its host is lost", Duration::from_secs(60), || async {
        api.get_opt("stranded").await.ok()?.is_none().then_some(())
    })
    .await;
    let host = fleet.host_name(1);
    let released = |r: &str, m: &str| r == "Released" && m.contains(&format!("its host {host} is lost"));
    let events =
        covi_tests::events::wait(&client, &ns, "stranded", DEADLINE, |e| e.iter().any(|(r, m)| released(r, m))).await;
    assert!(events.iter().any(|(r, m)| released(r, m)), "{events:?}");
}

/// `storage.path`: a host without the pool's storage pool defines it there, as a
/// directory pool, and the server runs.
#[tokio::test]
async fn a_missing_storage_pool_is_defined_at_the_pools_path() {
    let _turn = SERIAL.lock().await;
    let (client, fleet, pool, _ns, api) = setup("newpool", &[(8, 16)]).await;
    let storage = json!({"storage": {"pool": "covi-made-here", "path": "/var/lib/covi-made-here"}});
    fleet.apply_pool(&client, storage).await;
    apply_server(&api, "made", &pool, json!({"boot": {"image": null, "network": {}}})).await;
    let s = fleet.wait_server(&api, "made", "to run from the pool the agent defined", DEADLINE, ready).await;
    assert!(s.status.and_then(|st| st.domain_uuid).is_some());
}

#[tokio::test]
async fn an_operator_that_loses_its_lease_stops_scheduling_and_leads_again_later() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, "relead").await;
    let pool = fleet.apply_pool(&client, json!({})).await;
    fleet.start_agent(1, 16, 32);
    let mut operator = Process::spawn("relead-operator", bin("covi-operator"), fleet.operator_args("relead-op", 3));
    fleet.wait_ready_hosts(&client, 1).await;
    let ns = namespace(&client, "relead").await;
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    apply_server(&api, "before", &pool, json!({})).await;
    fleet.wait_server(&api, "before", "to be Ready", DEADLINE, ready).await;
    assert!(leads(&operator).await, "the only replica leads");

    // Someone else holds the Lease now (as a replica whose renewals got through while
    // this one's did not): this replica stops scheduling but keeps running.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &fleet.lease_namespace);
    let usurp = || async {
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
        let patch = json!({"metadata": {"annotations": {"covi.io/leader-instance": "usurper-1"}},
                           "spec": {"holderIdentity": "usurper", "renewTime": now, "leaseDurationSeconds": 3}});
        leases.patch("covi-operator", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("usurp");
    };
    usurp().await;
    wait_until("the replica to stop leading", DEADLINE, || async {
        usurp().await;
        (!leads(&operator).await).then_some(())
    })
    .await;
    apply_server(&api, "meanwhile", &pool, json!({})).await;
    for _ in 0..10 {
        usurp().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let waiting = api.get("meanwhile").await.expect("server");
    assert!(waiting.status.as_ref().and_then(|s| s.host.as_ref()).is_none(), "nothing is scheduled without the lease");
    assert!(!operator.exited(), "the replica stands by instead of exiting");

    // The usurper stops renewing: after the lease's duration the replica leads again
    // and schedules what waited.
    fleet.wait_server(&api, "meanwhile", "to be Ready once the replica leads again", DEADLINE, ready).await;
    assert!(leads(&operator).await);
}

/// Whether an operator says it leads, on its metrics endpoint.
async fn leads(operator: &Process) -> bool {
    let metrics = covi_tests::fleet::scrape(operator, "/metrics").await;
    metrics.lines().any(|l| l.trim() == "covi_operator_leader 1")
}
