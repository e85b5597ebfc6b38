//! Consolidation in recommend mode, with the real operator and agents: a pool whose
//! servers have complementary daily profiles gets a plan that frees a host, in its
//! status and an Event; nothing moves.

use std::time::Duration;

use covi_api::{HostPool, VirtualServer};
use covi_tests::fleet::{Fleet, apply_server};
use covi_tests::{SERIAL, admin, install_crds, namespace, wait_until};
use k8s_openapi::api::core::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

/// A usage status whose profile is `busy` millicores in hours `from..to` (wrapping)
/// and 100 otherwise, as an agent writes it.
fn usage(busy: u32, from: u8, to: u8) -> Value {
    let profile: Vec<Value> = (0..24u8)
        .map(|h| {
            let on = if from < to { h >= from && h < to } else { h >= from || h < to };
            json!({"hour": h, "cpu": [if on { busy } else { 100 }], "memory": [400]})
        })
        .collect();
    json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer", "status": {"usage": {
        "intervalSeconds": 3600, "samples": 360, "cpu": {"mean": 100, "p95": 100},
        "memory": {"mean": 400, "p95": 400}, "profile": profile}}})
}

/// Two hosts of 4 CPUs, a pool that may allocate 8 vCPUs on each, and two running
/// servers, "office" (busy by day) and "batch" (busy by night), one per host (Spread).
async fn scene(id: &str) -> (Client, Fleet, String, Api<VirtualServer>) {
    let client = admin().await;
    install_crds(&client).await;
    let ns = namespace(&client, id).await;
    let mut fleet = Fleet::new(&client, id).await;
    let pool = fleet.apply_pool(&client, json!({"overcommit": {"cpu": 2}})).await;
    fleet.start_agent(1, 4, 8);
    fleet.start_agent(2, 4, 8);
    fleet.start_operator();
    fleet.wait_pool_ready(&client, &pool, 2).await;
    let servers: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    for name in ["office", "batch"] {
        apply_server(&servers, name, &pool, json!({})).await;
        fleet.wait_server(&servers, name, "to run", DEADLINE, |s| s.is_ready()).await;
    }
    // Busy by day and by night: 3 of a host's 4 CPUs each, never at once.
    let agent = PatchParams::apply("covi-agent-usage").force();
    servers.patch_status("office", &agent, &Patch::Apply(usage(3000, 8, 18))).await.expect("office usage");
    servers.patch_status("batch", &agent, &Patch::Apply(usage(3000, 20, 6))).await.expect("batch usage");
    (client, fleet, pool, servers)
}

#[tokio::test]
async fn a_day_and_a_night_server_are_planned_onto_one_host_and_nothing_moves() {
    let _turn = SERIAL.lock().await;
    let (client, _fleet, pool, servers) = scene("consolidate").await;
    let host_of = |s: &VirtualServer| s.status.as_ref().and_then(|st| st.host.clone());
    let before: Vec<_> =
        [servers.get("office").await.unwrap(), servers.get("batch").await.unwrap()].iter().map(host_of).collect();
    assert_ne!(before[0], before[1], "spread over both hosts");

    let pools: Api<HostPool> = Api::all(client.clone());
    let recommend = json!({"spec": {"consolidation": {"mode": "Recommend", "intervalSeconds": 10}}});
    pools.patch(&pool, &PatchParams::default(), &Patch::Merge(&recommend)).await.expect("recommend");
    let plan = wait_until("a plan that frees a host", DEADLINE, || async {
        let c = pools.get(&pool).await.ok()?.status?.consolidation?;
        (c.planned_hosts == 1).then_some(c)
    })
    .await;
    assert_eq!((plan.hosts_used, plan.moves.len(), plan.emptied_hosts.len(), plan.without_profile), (2, 1, 1, 0));
    let m = &plan.moves[0];
    let ns = servers.namespace().unwrap_or_default();
    assert!(m.server.starts_with(&format!("{ns}/")) && m.from != m.to, "{m:?}");
    let events: Api<Event> = Api::all(client.clone());
    let planned = wait_until("the ConsolidationPlanned Event", DEADLINE, || async {
        let list = events.list(&ListParams::default().fields(&format!("involvedObject.name={pool}"))).await.ok()?;
        list.items.into_iter().find(|e| e.reason.as_deref() == Some("ConsolidationPlanned"))
    })
    .await;
    let message = planned.message.unwrap_or_default();
    assert!(message.contains("1 host could run what 2 run now") && message.contains(&m.server), "{message}");
    // Recommend moves nothing.
    let after: Vec<_> =
        [servers.get("office").await.unwrap(), servers.get("batch").await.unwrap()].iter().map(host_of).collect();
    assert_eq!(after, before);

    // Both busy by day: no host can be freed, and the next plan says so.
    let agent = PatchParams::apply("covi-agent-usage").force();
    servers.patch_status("batch", &agent, &Patch::Apply(usage(3000, 9, 17))).await.expect("batch by day");
    let plan = wait_until("a plan with both hosts", DEADLINE, || async {
        let c = pools.get(&pool).await.ok()?.status?.consolidation?;
        (c.planned_hosts == 2).then_some(c)
    })
    .await;
    assert!(plan.moves.is_empty() && plan.emptied_hosts.is_empty(), "{plan:?}");
}

/// Automatic mode: the plan's move is carried out through the migration path, the
/// emptied host is labelled and marked Freed, and no server ever runs twice.
#[tokio::test]
async fn automatic_consolidation_empties_a_host_without_a_double_run() {
    let _turn = SERIAL.lock().await;
    let (client, fleet, pool, servers) = scene("autoconsol").await;
    let hosts_map = (1..=2)
        .map(|n| (fleet.host_name(n), fleet.agents[n - 1].log.clone()))
        .collect::<std::collections::BTreeMap<_, _>>();
    let sampler = covi_tests::sampler::Sampler::start(std::sync::Arc::new(std::sync::Mutex::new(hosts_map)));

    let pools: Api<HostPool> = Api::all(client.clone());
    let automatic = json!({"spec": {"consolidation": {"mode": "Automatic", "intervalSeconds": 10}}});
    pools.patch(&pool, &PatchParams::default(), &Patch::Merge(&automatic)).await.expect("automatic");
    let host_of = |s: &VirtualServer| s.status.as_ref().and_then(|st| st.host.clone());
    let together = wait_until("both servers on one host, running", DEADLINE, || async {
        let (a, b) = (servers.get("office").await.ok()?, servers.get("batch").await.ok()?);
        (host_of(&a).is_some() && host_of(&a) == host_of(&b) && a.is_ready() && b.is_ready()).then(|| host_of(&a))
    })
    .await
    .expect("a host");
    let freed_name = [fleet.host_name(1), fleet.host_name(2)].into_iter().find(|h| *h != together).unwrap();
    let hosts: Api<covi_api::Host> = Api::all(client.clone());
    let freed = wait_until("the emptied host marked free", DEADLINE, || async {
        let h = hosts.get(&freed_name).await.ok()?;
        let marked = h.metadata.labels.as_ref()?.get("covi.io/consolidation").map(String::as_str) == Some("free");
        let condition = covi_api::condition::find_condition(&h.status.as_ref()?.conditions, "Freed")?.clone();
        (marked && condition.status == "True").then_some(condition)
    })
    .await;
    assert_eq!(freed.reason, "Consolidated");
    let moved = servers.get("office").await.unwrap();
    let migration = moved.status.as_ref().and_then(|s| s.migration.clone());
    let other = servers.get("batch").await.unwrap();
    let record = migration.or_else(|| other.status.and_then(|s| s.migration)).expect("a migration record");
    assert_eq!(
        (format!("{:?}", record.phase), record.target.as_str()),
        ("Succeeded".to_string(), together.as_str()),
        "moved by the migration path: {record:?}"
    );
    sampler.assert_never_twice().await;

    // Consolidation switched off: the marks go.
    let disabled = json!({"spec": {"consolidation": {"mode": "Disabled"}}});
    pools.patch(&pool, &PatchParams::default(), &Patch::Merge(&disabled)).await.expect("disable");
    wait_until("the free mark taken back", DEADLINE, || async {
        let h = hosts.get(&freed_name).await.ok()?;
        let labelled = h.metadata.labels.as_ref().is_some_and(|l| l.contains_key("covi.io/consolidation"));
        let c = covi_api::condition::find_condition(&h.status.as_ref()?.conditions, "Freed")?.clone();
        (!labelled && c.status == "False").then_some(())
    })
    .await;
}
