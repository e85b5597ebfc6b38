//! Lost hosts: self-fencing and HA restart, never two copies. Real operator and agents
//! (libvirt's test driver, one inventory inside each agent process), default timings.
//!
//! A sampler reads every host's `/domains` (libvirt's covi domains, as the agent sees
//! them) every 100 ms and counts servers active on two hosts at once. The test driver
//! lives inside the agent process, so a killed agent takes its guests with it (power
//! loss) and a frozen agent freezes them (a frozen host); a host that answers nothing
//! contributes no running guest. What matters is what a host reports once it answers
//! again: a host that should have fenced must show no stale guest in its first answer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use covi_api::condition::find_condition;
use covi_api::virtual_server::VirtualServerPhase;
use covi_api::{Host, VirtualServer};
use covi_tests::fleet::{Fleet, NetnsHost, Process, endpoint_of, get};
use covi_tests::guests::ready;
use covi_tests::sampler::Sampler;
use covi_tests::{Rng, admin, all_ready_again, install_crds, namespace, wait_until};
use kube::Client;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use covi_tests::SERIAL;
use covi_tests::fleet::apply_server;

const DEADLINE: Duration = Duration::from_secs(60);

fn host_of(s: &VirtualServer) -> Option<String> {
    s.status.as_ref().and_then(|st| st.host.clone())
}

/// A pool of three hosts whose servers all start on host 1.
struct Scene {
    client: Client,
    fleet: Fleet,
    pool: String,
    api: Api<VirtualServer>,
    hosts: Arc<Mutex<BTreeMap<String, std::path::PathBuf>>>,
}

impl Scene {
    async fn new(id: &str, ha: &[&str], plain: &[&str]) -> Scene {
        Scene::with_host_1(id, ha, plain, None).await
    }

    /// As `new`, with host 1 inside `netns` when given.
    async fn with_host_1(id: &str, ha: &[&str], plain: &[&str], netns: Option<&NetnsHost>) -> Scene {
        let client = admin().await;
        install_crds(&client).await;
        let mut fleet = Fleet::new(&client, id).await;
        let pool = fleet.apply_pool(&client, json!({})).await;
        match netns {
            None => {
                fleet.start_agent(1, 8, 16);
            }
            Some(ns) => {
                let node = fleet.host_name(1);
                let uri = format!("test://{}", covi_tests::fleet::node_xml(&node, 8, 16).display());
                fleet.start_agent_in(1, &uri, &[], ns);
            }
        }
        fleet.start_operator();
        fleet.wait_ready_hosts(&client, 1).await;
        fleet.wait_pool_ready(&client, &pool, 1).await;
        let ns = namespace(&client, id).await;
        let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
        for name in ha {
            apply_server(&api, name, &pool, json!({"highAvailability": true})).await;
        }
        for name in plain {
            apply_server(&api, name, &pool, json!({"highAvailability": false})).await;
        }
        for name in ha.iter().chain(plain) {
            fleet.wait_server(&api, name, "to run on host 1", DEADLINE, ready).await;
        }
        fleet.start_agent(2, 8, 16);
        fleet.start_agent(3, 8, 16);
        fleet.wait_ready_hosts(&client, 3).await;
        fleet.wait_pool_ready(&client, &pool, 3).await;
        let hosts = Arc::new(Mutex::new(
            (1..=3).map(|n| (fleet.host_name(n), fleet.agents[n - 1].log.clone())).collect::<BTreeMap<_, _>>(),
        ));
        Scene { client, fleet, pool, api, hosts }
    }

    fn agent(&mut self, n: usize) -> &mut Process {
        &mut self.fleet.agents[n - 1]
    }

    async fn host(&self, n: usize) -> Host {
        Api::<Host>::all(self.client.clone()).get(&self.fleet.host_name(n)).await.expect("host")
    }

    async fn servers(&self) -> Vec<VirtualServer> {
        self.api.list(&ListParams::default()).await.expect("list").items
    }

    /// Waits until every server in `names` is Ready on a host other than host 1.
    async fn wait_moved(&self, names: &[&str]) -> Vec<VirtualServer> {
        let away = self.fleet.host_name(1);
        let names: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
        let found = covi_tests::poll(DEADLINE, || async {
            let all = self.servers().await;
            let moved: Vec<_> = all
                .into_iter()
                .filter(|s| names.contains(s.metadata.name.as_deref().unwrap_or_default()))
                .filter(|s| ready(s) && host_of(s).is_some_and(|h| h != away))
                .collect();
            (moved.len() == names.len()).then_some(moved)
        })
        .await;
        match found {
            Some(moved) => moved,
            None => {
                let states: Vec<_> =
                    self.servers().await.iter().map(|s| format!("{:?} {:?}", s.metadata.name, s.status)).collect();
                panic!(
                    "servers did not move off host 1:\n{}\n{}",
                    states.join("\n"),
                    self.fleet.operator.as_ref().unwrap().log_tail()
                );
            }
        }
    }
}

/// Failed, with Ready saying its host was lost: a server that is not highly available.
fn failed_with_host_lost(s: &VirtualServer) -> bool {
    s.status.as_ref().is_some_and(|st| {
        st.phase == Some(VirtualServerPhase::Failed)
            && find_condition(&st.conditions, "Ready").is_some_and(|c| c.reason == "HostLost")
    })
}

fn condition(host: &Host, type_: &str) -> Option<covi_api::Condition> {
    host.status.as_ref().and_then(|s| find_condition(&s.conditions, type_).cloned())
}

#[tokio::test]
async fn power_loss_restarts_ha_servers_elsewhere_and_fails_the_rest() {
    let _turn = SERIAL.lock().await;
    let mut scene = Scene::new("power", &["ha-1", "ha-2", "ha-3"], &["plain-1"]).await;
    let sampler = Sampler::start(scene.hosts.clone());

    let killed = Instant::now();
    scene.agent(1).kill();
    scene.hosts.lock().unwrap().remove(&scene.fleet.host_name(1));
    let moved = scene.wait_moved(&["ha-1", "ha-2", "ha-3"]).await;
    println!(
        "power loss: 3 HA servers Ready elsewhere {:.1}s after kill -9 (lease 10s, grace 3s, fence 6s)",
        killed.elapsed().as_secs_f64()
    );

    for s in &moved {
        let record = &s.status.as_ref().unwrap().failovers;
        assert_eq!(record.len(), 1, "{:?}", s.metadata.name);
        assert_eq!(
            (record[0].from.as_str(), record[0].reason.as_str()),
            (scene.fleet.host_name(1).as_str(), "HostLost")
        );
        assert_eq!(Some(record[0].to.clone()), host_of(s));
    }
    let plain =
        scene.fleet.wait_server(&scene.api, "plain-1", "to fail with HostLost", DEADLINE, failed_with_host_lost).await;
    assert_eq!(host_of(&plain), Some(scene.fleet.host_name(1)), "a server that is not HA stays bound to its host");
    let host = wait_until("host 1 to be marked Lost", DEADLINE, || async {
        let h = scene.host(1).await;
        (condition(&h, "Lost")?.status == "True").then_some(h)
    })
    .await;
    assert_eq!(condition(&host, "Ready").map(|c| (c.status, c.reason)), Some(("False".into(), "HostLost".into())));
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(scene.client.clone());
    let reasons: BTreeSet<String> = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={}", scene.fleet.host_name(1))))
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.contains("HeartbeatMissed") && reasons.contains("HostLost"),
        "host Events tell the story: {reasons:?}"
    );

    let (samples, doubles) = sampler.finish().await;
    assert!(samples > 50, "the sampler ran ({samples} samples)");
    assert!(doubles.is_empty(), "servers ran twice: {doubles:?}");
}

#[tokio::test]
async fn a_short_agent_restart_causes_no_failover() {
    let _turn = SERIAL.lock().await;
    let mut scene = Scene::new("restart", &["ha-1"], &["plain-1"]).await;
    let killed = Instant::now();
    scene.agent(1).kill();
    scene.agent(1).start();
    let home = scene.fleet.host_name(1);
    // Watch through leaseDuration + grace (and a second more) after the kill: the
    // operator must never move or fail anything.
    while killed.elapsed() < Duration::from_secs(14) {
        for s in scene.servers().await {
            let st = s.status.clone().unwrap_or_default();
            assert_eq!(st.host.as_deref(), Some(home.as_str()), "{:?} moved", s.metadata.name);
            assert!(st.failovers.is_empty(), "{:?} failed over", s.metadata.name);
            assert_ne!(st.phase, Some(VirtualServerPhase::Failed), "{:?} failed", s.metadata.name);
        }
        assert_ne!(condition(&scene.host(1).await, "Lost").map(|c| c.status), Some("True".into()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for name in ["ha-1", "plain-1"] {
        scene.fleet.wait_server(&scene.api, name, "to run again on its host", DEADLINE, ready).await;
    }
}

/// The chaos test found this double run: the leader reads a host's Lease, finds it
/// lost, and writes the failover of its HA server a moment later; in that moment the
/// host's restarted agent renews, reads the server (still bound to it) and starts it.
/// The late failover then lands beside a running copy. The test plays that leader
/// (the operator is stopped): it reads ha-1 while host 1 is lost, lets host 1 come
/// back and start ha-1, then sends the failover decided on what it read. The API
/// server must refuse it: every start of an HA server is written to the server first,
/// on the version it was decided on.
#[tokio::test]
async fn a_failover_decided_before_a_host_came_back_cannot_land_beside_its_start() {
    let _turn = SERIAL.lock().await;
    let mut scene = Scene::new("latejudge", &["ha-1"], &[]).await;
    scene.fleet.operator.as_mut().unwrap().kill();
    let home = scene.fleet.host_name(1);
    scene.agent(1).kill();
    // Until host 1's last renewal is older than leaseDuration + grace (10 + 3 s): any
    // leader would judge it lost then.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(scene.client.clone(), &scene.fleet.lease_namespace);
    wait_until("host 1's Lease to be older than lease + grace", DEADLINE, || async {
        let renewed = leases.get(&home).await.ok()?.spec?.renew_time?.0;
        let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed);
        (age.as_secs_f64() > 13.5).then_some(())
    })
    .await;
    let decided_on = scene.api.get("ha-1").await.expect("ha-1");
    let version = decided_on.metadata.resource_version.clone().expect("resourceVersion");

    scene.agent(1).start();
    let log = scene.fleet.agents[0].log.clone();
    wait_until("ha-1 to run on host 1 again", DEADLINE, || async {
        let body = get(&covi_tests::fleet::endpoint_in_log(&log)?, "/domains", Duration::from_secs(2)).await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let runs =
            |d: &Value| d["server"].as_str().is_some_and(|s| s.ends_with("/ha-1")) && d["running"] == json!(true);
        v["domains"].as_array()?.iter().any(runs).then_some(())
    })
    .await;

    // The failover the leader decided while host 1 was lost, arriving now.
    let late = json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
        "metadata": {"name": "ha-1", "resourceVersion": version},
        "status": {"host": scene.fleet.host_name(2),
                   "failovers": [{"from": home, "to": scene.fleet.host_name(2), "at": "2026-01-01T00:00:00Z", "reason": "HostLost"}]},
    });
    let params = kube::api::PatchParams::apply(covi_api::contract::manager::OPERATOR).force();
    let answer = scene.api.patch_status("ha-1", &params, &kube::api::Patch::Apply(&late)).await;
    match answer {
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        other => panic!(
            "a failover decided on version {version} (host 1 lost) was accepted after host 1 started ha-1 again: {:?}",
            other.map(|s| s.status)
        ),
    }
    let now = scene.api.get("ha-1").await.expect("ha-1");
    assert_eq!(host_of(&now), Some(home), "ha-1 stays where it runs");
}

#[tokio::test]
async fn a_frozen_host_is_replaced_and_fences_itself_when_it_thaws() {
    let _turn = SERIAL.lock().await;
    let mut scene = Scene::new("frozen", &["ha-1", "ha-2"], &[]).await;
    let sampler = Sampler::start(scene.hosts.clone());
    let pid = scene.agent(1).pid().expect("agent 1 runs") as i32;
    // SAFETY: plain signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let frozen = Instant::now();
    scene.wait_moved(&["ha-1", "ha-2"]).await;
    println!("frozen host: HA servers Ready elsewhere {:.1}s after SIGSTOP", frozen.elapsed().as_secs_f64());
    unsafe { libc::kill(pid, libc::SIGCONT) };

    // Its first answer after thawing shows no running guest: it has fenced (and may
    // already have recovered and removed the stale domains).
    let addr = endpoint_of(scene.agent(1)).expect("agent 1 endpoint");
    let body = wait_until("the thawed host to answer", DEADLINE, || async {
        get(&addr, "/domains", Duration::from_secs(2)).await
    })
    .await;
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        v["domains"].as_array().unwrap().iter().all(|d| d["active"] == json!(false)),
        "stale guests still run: {v}"
    );
    wait_until("host 1 to record the fencing and recover", DEADLINE, || async {
        let h = scene.host(1).await;
        let fenced = condition(&h, "Fenced")?;
        (fenced.reason == "Recovered" || fenced.status == "True").then_some(())
    })
    .await;
    // The servers stay where they were restarted; host 1 removed its stale domains.
    wait_until("host 1 to undefine the domains bound elsewhere", DEADLINE, || async {
        let body = get(&addr, "/domains", Duration::from_secs(2)).await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["domains"].as_array()?.is_empty().then_some(())
    })
    .await;
    let (samples, doubles) = sampler.finish().await;
    assert!(samples > 50, "the sampler ran ({samples} samples)");
    assert!(doubles.is_empty(), "servers ran twice: {doubles:?}");
    let _ = &scene.pool;
}

#[tokio::test]
async fn a_partitioned_host_fences_itself_before_its_servers_restart_elsewhere() {
    let _turn = SERIAL.lock().await;
    let netns = NetnsHost::create("part").await;
    let scene = Scene::with_host_1("part", &["ha-1", "ha-2"], &["plain-1"], Some(&netns)).await;
    let sampler = Sampler::start(scene.hosts.clone());
    let addr = endpoint_of(&scene.fleet.agents[0]).expect("agent 1 endpoint");

    netns.cut();
    let cut = Instant::now();
    // The agent keeps running and answering on its link; it only loses the API server.
    let fenced_at = wait_until("host 1 to fence itself", DEADLINE, || async {
        let body = get(&addr, "/domains", Duration::from_secs(1)).await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["fenced"] == json!(true)).then(|| cut.elapsed())
    })
    .await;
    let moved = scene.wait_moved(&["ha-1", "ha-2"]).await;
    let moved_at = cut.elapsed();
    println!(
        "partition: fenced after {:.1}s, servers Ready elsewhere after {:.1}s",
        fenced_at.as_secs_f64(),
        moved_at.as_secs_f64()
    );
    assert!(fenced_at < moved_at, "the host fenced before its servers restarted elsewhere");
    // Every failover record was written after the fence.
    for s in &moved {
        assert_eq!(s.status.as_ref().unwrap().failovers.len(), 1);
    }

    // The server that is not highly available stays bound to host 1, said to be down.
    scene.fleet.wait_server(&scene.api, "plain-1", "to fail with HostLost", DEADLINE, failed_with_host_lost).await;

    netns.heal();
    wait_until("host 1 to recover and remove its stale domains", DEADLINE, || async {
        let body = get(&addr, "/domains", Duration::from_secs(1)).await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let stale = v["domains"].as_array()?.iter().any(|d| !d["server"].as_str().unwrap_or("").ends_with("/plain-1"));
        (v["fenced"] == json!(false) && !stale).then_some(())
    })
    .await;
    let h = wait_until("host 1 to be Ready again with the fencing on record", DEADLINE, || async {
        let h = scene.host(1).await;
        let ready = condition(&h, "Ready")?.status == "True";
        let fenced = condition(&h, "Fenced")?;
        (ready && fenced.reason == "Recovered").then_some(h)
    })
    .await;
    assert_eq!(condition(&h, "Lost").map(|c| c.status), Some("False".into()));
    // The same agent process, back in touch, runs plain-1 again and says so: it learnt
    // of the operator's HostLost while it was cut off.
    let plain = scene
        .fleet
        .wait_server(&scene.api, "plain-1", "to run again on host 1", DEADLINE, |s| {
            ready(s) && s.status.as_ref().is_some_and(|st| st.phase == Some(VirtualServerPhase::Running))
        })
        .await;
    assert_eq!(host_of(&plain), Some(scene.fleet.host_name(1)));
    let (samples, doubles) = sampler.finish().await;
    assert!(samples > 50, "the sampler ran ({samples} samples)");
    assert!(doubles.is_empty(), "servers ran twice: {doubles:?}");
}

/// A small deterministic generator, seeded from the clock (the seed is printed, so a
/// failing run can be repeated with COVI_CHAOS_SEED).
#[tokio::test]
async fn chaos_of_kills_freezes_and_partitions_never_runs_a_server_twice() {
    let _turn = SERIAL.lock().await;
    let mut rng = Rng::seeded();

    // Short timings so twenty rounds fit in a few minutes: lost after 5 s.
    let client = admin().await;
    install_crds(&client).await;
    let netns = NetnsHost::create("chaos").await;
    let mut fleet = Fleet::new(&client, "chaos").await;
    let timings =
        json!({"failover": {"renewSeconds": 1, "leaseDurationSeconds": 4, "fenceAfterSeconds": 2, "graceSeconds": 1}});
    let pool = fleet.apply_pool(&client, timings).await;
    for n in 1..=3 {
        fleet.start_agent(n, 8, 16);
    }
    let node = fleet.host_name(4);
    let uri = format!("test://{}", covi_tests::fleet::node_xml(&node, 8, 16).display());
    fleet.start_agent_in(4, &uri, &[], &netns);
    fleet.start_operator();
    fleet.wait_ready_hosts(&client, 4).await;
    fleet.wait_pool_ready(&client, &pool, 4).await;
    let ns = namespace(&client, "chaos").await;
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    let servers: Vec<String> = (1..=6).map(|i| format!("ha-{i}")).collect();
    for name in &servers {
        apply_server(&api, name, &pool, json!({"highAvailability": true})).await;
    }
    let all_ready = || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        (list.items.len() == servers.len() && list.items.iter().all(ready)).then_some(())
    };
    wait_until("every server Ready", DEADLINE, all_ready).await;
    let hosts = Arc::new(Mutex::new((1..=4).map(|n| (fleet.host_name(n), fleet.agents[n - 1].log.clone())).collect()));
    let sampler = Sampler::start(hosts);

    let rounds = 20;
    let mut failovers_seen = 0;
    for round in 1..=rounds {
        let host = 1 + rng.below(4) as usize;
        let action = match (host, rng.below(3)) {
            (4, 2) => "partition",
            (_, 0) | (_, 2) => "kill",
            _ => "freeze",
        };
        // Sometimes shorter than fencing, sometimes past a lost host.
        let hold = Duration::from_millis(500 + rng.below(7_500));
        let pid = fleet.agents[host - 1].pid().expect("agent runs") as i32;
        match action {
            "kill" => fleet.agents[host - 1].kill(),
            // SAFETY: plain signals to our own child process.
            "freeze" => unsafe {
                libc::kill(pid, libc::SIGSTOP);
            },
            _ => netns.cut(),
        }
        tokio::time::sleep(hold).await;
        match action {
            "kill" => fleet.agents[host - 1].start(),
            "freeze" => unsafe {
                libc::kill(pid, libc::SIGCONT);
            },
            _ => netns.heal(),
        }
        let resumed = k8s_openapi::jiff::Timestamp::now();
        println!("round {round}: {action} host {host} for {:.1}s", hold.as_secs_f64());
        // The disturbed agent first renews its Lease (fencing itself first if it is
        // overdue); only then can the statuses be trusted to say where servers run.
        fleet.wait_lease_renewed_after(&client, host, resumed).await;
        all_ready_again(&api, DEADLINE, &format!("round {round}"), all_ready).await;
    }
    // After the last round every server must be Running again, wherever it ended up.
    all_ready_again(&api, DEADLINE, "after the last round", all_ready).await;
    for s in api.list(&ListParams::default()).await.expect("list").items {
        failovers_seen += s.status.map(|st| st.failovers.len()).unwrap_or(0);
    }
    let (samples, doubles) = sampler.finish().await;
    println!(
        "chaos: {rounds} rounds, {} servers, {failovers_seen} failovers, {samples} samples, {} double runs",
        servers.len(),
        doubles.len()
    );
    assert!(doubles.is_empty(), "servers ran twice: {doubles:?}");
}

#[tokio::test]
async fn losing_too_much_of_a_pool_at_once_pauses_failover() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, "mass").await;
    let spec = json!({"failover": {"renewSeconds": 1, "leaseDurationSeconds": 4, "fenceAfterSeconds": 2, "graceSeconds": 1, "maxLostPercent": 40}});
    let pool = fleet.apply_pool(&client, spec).await;
    fleet.start_agent(1, 8, 16);
    fleet.start_operator();
    fleet.wait_pool_ready(&client, &pool, 1).await;
    let ns = namespace(&client, "mass").await;
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    apply_server(&api, "ha-1", &pool, json!({"highAvailability": true})).await;
    fleet.wait_server(&api, "ha-1", "to run on host 1", DEADLINE, ready).await;
    fleet.start_agent(2, 8, 16);
    fleet.wait_pool_ready(&client, &pool, 2).await;

    fleet.agents[0].kill();
    let pools: Api<covi_api::HostPool> = Api::all(client.clone());
    let paused = wait_until("failover to pause", DEADLINE, || async {
        let p = pools.get(&pool).await.ok()?;
        let c = find_condition(&p.status?.conditions, "FailoverPaused")?.clone();
        (c.status == "True").then_some(c)
    })
    .await;
    assert_eq!(paused.reason, "MassFailure");
    assert!(paused.message.contains("1 of 2 hosts are lost at once, more than 40%"), "{}", paused.message);
    let s = api.get("ha-1").await.expect("server");
    assert_eq!(host_of(&s), Some(fleet.host_name(1)), "the server was not moved");
    assert!(s.status.unwrap().failovers.is_empty());
}

/// The protocol's model found this double run with no fault at all: the leader judges
/// liveness on its watch cache of Leases, and a cache that lags by more than
/// leaseDuration + grace declares a host lost that has kept renewing (and so never
/// fences). The leader's real pass runs here over real caches of pools, hosts and
/// servers, but a cache of Leases that stops taking host 1's renewals; host 1's agent
/// renews all along. Its HA server must stay where it runs.
#[tokio::test]
async fn a_lease_cache_that_lags_never_fails_over_a_host_that_renews() {
    use covi_operator::pass::Scheduler;
    use futures::StreamExt;
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::ResourceExt;
    use kube::runtime::events::Reporter;
    use kube::runtime::reflector::{self, Store};
    use kube::runtime::{WatchStreamExt, watcher};

    let _turn = SERIAL.lock().await;
    let mut scene = Scene::new("lagging", &["ha-1"], &[]).await;
    // From here this test's pass is the only leader.
    scene.fleet.operator.as_mut().unwrap().kill();
    let client = scene.client.clone();
    fn cache<K>(api: Api<K>) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync,
        K: 'static,
    {
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
        tokio::spawn(stream.for_each(|_| futures::future::ready(())));
        store
    }
    let home = scene.fleet.host_name(1);
    // The Lease cache: every event, except host 1's renewals once it has been listed.
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), &scene.fleet.lease_namespace);
    let (leases, mut lease_writer) = reflector::store::<Lease>();
    let lagging = home.clone();
    tokio::spawn(watcher(lease_api.clone(), watcher::Config::default()).default_backoff().for_each(move |event| {
        let stale = matches!(&event, Ok(watcher::Event::Apply(l)) if l.name_any() == lagging);
        if let Ok(event) = event
            && !stale
        {
            lease_writer.apply_watcher_event(&event);
        }
        futures::future::ready(())
    }));
    let (pools, hosts, servers) =
        (cache(Api::all(client.clone())), cache(Api::all(client.clone())), cache(Api::all(client.clone())));
    for (what, ready) in [
        ("pools", pools.wait_until_ready().await.is_ok()),
        ("hosts", hosts.wait_until_ready().await.is_ok()),
        ("servers", servers.wait_until_ready().await.is_ok()),
        ("leases", leases.wait_until_ready().await.is_ok()),
    ] {
        assert!(ready, "the cache of {what} syncs");
    }
    let reporter = Reporter { controller: "covi-operator-test".into(), instance: None };
    let writer = covi_operator::writer::Writer::new(client.clone(), reporter);
    let metrics = covi_operator::metrics::Metrics::new(&mut prometheus_client::registry::Registry::default());
    let mut leader = Scheduler::new(writer, pools, hosts, servers, leases.clone(), lease_api.clone(), metrics);

    // Past leaseDuration + grace (10 + 3 s by default) and two seconds more, a pass
    // every half second: ha-1 stays on host 1 and never fails over.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        leader.pass().await.expect("a pass");
        let s = scene.api.get("ha-1").await.expect("ha-1");
        let st = s.status.clone().unwrap_or_default();
        assert_eq!(st.host.as_deref(), Some(home.as_str()), "ha-1 moved off a host that renews: {st:?}");
        assert!(st.failovers.is_empty(), "ha-1 failed over from a host that renews: {st:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The cache did lag by more than the loss deadline: its host 1 Lease is the one
    // listed at the start, and host 1 has renewed since.
    let renew = |l: &Lease| l.spec.as_ref().and_then(|s| s.renew_time.clone()).map(|t| t.0).expect("renewTime");
    let cached = renew(&leases.state().into_iter().find(|l| l.name_any() == home).expect("host 1 in the cache"));
    let fresh = renew(&lease_api.get(&home).await.expect("host 1's Lease"));
    let lag = fresh.duration_since(cached).as_secs_f64();
    assert!(lag > 13.0, "the cache lagged {lag:.1} s, not past leaseDuration + grace");
    scene.fleet.wait_server(&scene.api, "ha-1", "to run on host 1", DEADLINE, ready).await;
}

/// A TCP proxy to the API server that delivers what the client sends `delay` late
/// (a delay line: bytes keep their order and their spacing, nothing queues behind a
/// sleep). Changing the delay takes effect for bytes read from then on.
struct SlowLine {
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    kubeconfig: std::path::PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl SlowLine {
    async fn start(name: &str) -> SlowLine {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let api = std::env::var("COVI_APISERVER").expect("COVI_APISERVER is set by hack/test.sh");
        let upstream = api.trim_start_matches("https://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("addr").port();
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                let (mut from_client, mut to_client) = inbound.into_split();
                let (mut from_server, mut to_server) = outbound.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                });
                let (line, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                tokio::spawn(async move {
                    while let Some((at, bytes)) = due.recv().await {
                        tokio::time::sleep_until(at).await;
                        if to_server.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                });
                let delay = delay.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from_client.read(&mut buf).await {
                        let at = tokio::time::Instant::now() + Duration::from_millis(delay.load(Ordering::SeqCst));
                        if n == 0 || line.send((at, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let admin =
            std::fs::read_to_string(covi_tests::testbed_dir().join("admin.kubeconfig")).expect("admin kubeconfig");
        let kubeconfig = covi_tests::testbed_dir().join(format!("{name}.kubeconfig"));
        std::fs::write(&kubeconfig, admin.replace(&api, &format!("https://127.0.0.1:{port}"))).expect("kubeconfig");
        SlowLine { delay_ms, kubeconfig, task }
    }

    fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SlowLine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An API server that answers late makes an agent renew less often, recorded on its
/// Lease, instead of fencing; once it answers quickly again the pool's own timings
/// return. (Before agents paced themselves, a whole fleet starting at once kept the
/// API server late and every host fenced.)
#[tokio::test]
async fn an_agent_paces_its_heartbeat_to_a_slow_api_server_and_never_fences() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, "pace").await;
    // The default timings: renew 2 s, fenceAfter 6 s, lease 10 s.
    let pool = fleet.apply_pool(&client, json!({})).await;
    let line = SlowLine::start("pace-agent").await;
    let node = fleet.host_name(1);
    let uri = format!("test://{}", covi_tests::fleet::node_xml(&node, 8, 16).display());
    let kubeconfig = line.kubeconfig.display().to_string();
    fleet.start_agent_uri(1, &uri, &["--kubeconfig", &kubeconfig]);
    fleet.start_operator();
    fleet.wait_ready_hosts(&client, 1).await;
    fleet.wait_pool_ready(&client, &pool, 1).await;
    let ns = namespace(&client, "pace").await;
    let servers: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    apply_server(&servers, "steady", &pool, json!({"highAvailability": true})).await;
    fleet.wait_server(&servers, "steady", "to run", DEADLINE, ready).await;

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &fleet.lease_namespace);
    let lease_seconds = || async {
        let lease = leases.get(&node).await.expect("the host's Lease");
        lease.spec.and_then(|s| s.lease_duration_seconds).expect("leaseDurationSeconds")
    };
    assert_eq!(lease_seconds().await, 10, "the pool's own timings while the API server is quick");
    let hosts: Api<Host> = Api::all(client.clone());
    let healthy = || async {
        let host = hosts.get(&node).await.expect("host");
        let fenced = condition(&host, "Fenced").is_some_and(|c| c.status == "True");
        let lost = condition(&host, "Lost").is_some_and(|c| c.status == "True");
        let server = servers.get("steady").await.expect("steady");
        assert!(!fenced && !lost, "the host fenced or was lost: {:?}", host.status);
        assert!(
            ready(&server) && host_of(&server).as_deref() == Some(node.as_str()),
            "steady moved: {:?}",
            server.status
        );
    };

    // Every byte the agent sends now arrives 1.2 s late: a renewal takes longer than
    // half of its 2-s interval, though well within fenceAfter.
    line.set_delay(Duration::from_millis(1200));
    let stretched = covi_tests::poll(DEADLINE, || async {
        healthy().await;
        let seconds = lease_seconds().await;
        (seconds >= 20).then_some(seconds)
    })
    .await;
    let log = || fleet.agents[0].log_tail();
    let stretched = stretched.unwrap_or_else(|| panic!("the Lease never recorded longer timings:\n{}", log()));
    assert!(log().contains("set a new pace"), "the agent says why:\n{}", log());
    // Held there for a while: no fencing, no failover, the server stays.
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(20) {
        healthy().await;
        assert!(lease_seconds().await >= 20, "the stretch holds while the API server stays slow");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Quick again: the pool's own timings come back.
    line.set_delay(Duration::ZERO);
    let back = covi_tests::poll(Duration::from_secs(120), || async {
        healthy().await;
        (lease_seconds().await == 10).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the Lease kept stretched timings ({stretched} s) after the API server was quick again:\n{}",
        log()
    );
}
