//! Never two copies when the agent is gone. On the test bed's two real libvirt daemons
//! (peers a and b, each with virtlockd and one shared lockspace), whose QEMU/TCG guests
//! outlive their agents: a killed agent's guest keeps its disk lease, so its failover
//! copy waits (and says so) until the old copy is gone; a gracefully restarted agent
//! causes no failover at all; an agent survives a libvirtd restart.
//!
//! The pool's folder is split: each daemon sees the same path backed by a folder of
//! its own, so QEMU's per-file image lock cannot see the other copy, and whatever
//! refuses a second start is the lock manager (see `testbed_libvirt_peers`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use covi_api::VirtualServer;
use covi_api::condition::find_condition;
use covi_api::virtual_server::{READY_DISK_LEASE_HELD, VirtualServerPhase};
use covi_tests::fleet::{Fleet, NetnsHost};
use covi_tests::guests::{apply_server, fixtures_in, peer_sockets, peer_uri, qemu_pool, ready, testbed_env};
use covi_tests::sampler::Sampler;
use covi_tests::{admin, install_crds, namespace, poll, wait_until};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use virt::connect::Connect;

// The peers are shared by every test here (and their guests by the sampler).
use covi_tests::SERIAL;

const POOL: &str = "covi-split";
const DEADLINE: Duration = Duration::from_secs(60);

struct Bed {
    client: Client,
    fleet: Fleet,
    pool: String,
    api: Api<VirtualServer>,
    /// libvirt URIs of peers a (host 1) and b (host 2).
    uris: [String; 2],
    hosts: [String; 2],
}

impl Bed {
    /// Host 1 on peer a with its agent and the operator; host 2 is started by the test.
    async fn new(id: &str) -> Bed {
        Bed::with_host_1_in(id, None).await
    }

    /// As `new`, with host 1's agent inside `netns` when given (it reaches peer a's
    /// socket from there, and the API server only through the namespace's link).
    async fn with_host_1_in(id: &str, netns: Option<&NetnsHost>) -> Bed {
        let uris = split_pool_on_both_peers();
        let client = admin().await;
        install_crds(&client).await;
        let mut fleet = Fleet::new(&client, id).await;
        let pool = fleet.apply_pool(&client, qemu_pool(POOL, true)).await;
        let grace = ["--stop-grace-seconds", "3"];
        match netns {
            None => fleet.start_agent_uri(1, &uris[0], &grace),
            Some(ns) => fleet.start_agent_in(1, &uris[0], &grace, ns),
        };
        fleet.start_operator();
        fleet.wait_pool_ready(&client, &pool, 1).await;
        let ns = namespace(&client, id).await;
        let hosts = [fleet.host_name(1), fleet.host_name(2)];
        Bed { api: Api::namespaced(client.clone(), &ns), client, fleet, pool, uris, hosts }
    }

    /// Starts host 2's agent on peer b and waits until the pool has both hosts.
    async fn add_host_2(&mut self) {
        self.fleet.start_agent_uri(2, &self.uris[1], &["--stop-grace-seconds", "3"]);
        self.fleet.wait_pool_ready(&self.client, &self.pool, 2).await;
    }

    /// A bed with an HA server `name` running on host 1 and host 2's agent started;
    /// the server's UID.
    async fn with_guest(id: &str, name: &str) -> (Bed, String) {
        let mut bed = Bed::new(id).await;
        let uid = bed.server_on_host_1(name).await.uid().expect("uid");
        bed.add_host_2().await;
        (bed, uid)
    }

    /// An HA server running on host 1.
    async fn server_on_host_1(&self, name: &str) -> VirtualServer {
        apply_server(&self.api, name, &self.pool, json!({"highAvailability": true})).await;
        let on_1 = |s: &VirtualServer| ready(s) && host_of(s) == Some(self.hosts[0].as_str());
        self.fleet.wait_server(&self.api, name, "to run on host 1", DEADLINE, on_1).await
    }

    fn sampler(&self) -> Sampler {
        Sampler::on_daemons(self.hosts.iter().cloned().zip(self.uris.iter().cloned()).collect())
    }

    async fn delete(&self, name: &str) {
        covi_tests::delete_and_wait(&self.api, name, DEADLINE).await;
    }
}

/// The split pool's fixtures on peers a and b; their libvirt URIs.
fn split_pool_on_both_peers() -> [String; 2] {
    let (a, b) = peer_sockets();
    let uris = [peer_uri(&a), peer_uri(&b)];
    let split = testbed_env("COVI_SPLIT_POOL_DIR");
    for uri in &uris {
        fixtures_in(&connect(uri), POOL, &split);
    }
    uris
}

fn connect(uri: &str) -> Connect {
    Connect::open(Some(uri)).unwrap_or_else(|e| panic!("opening {uri}: {e}"))
}

fn host_of(s: &VirtualServer) -> Option<&str> {
    s.status.as_ref().and_then(|st| st.host.as_deref())
}

fn ready_reason(s: &VirtualServer) -> Option<(String, String)> {
    let c = find_condition(&s.status.as_ref()?.conditions, "Ready")?;
    Some((c.reason.clone(), c.message.clone()))
}

/// Whether the domain with this UUID runs guest code on `conn` (libvirt's state
/// Running: a start the lock manager refuses is briefly active, never running);
/// `None` when it is not defined.
fn active(conn: &Connect, uid: &str) -> Option<bool> {
    let dom = conn.lookup_domain_by_uuid_string(uid).ok()?;
    let (state, _) = dom.state().ok()?;
    Some(matches!(state, virt::enumutil::Enum::Known(virt::domain::DomainState::Running)))
}

/// The reasons of the Events about server `name`.
async fn event_reasons(client: &Client, ns: &str, name: &str) -> Vec<String> {
    covi_tests::events::of(client, ns, name).await.into_iter().map(|(reason, _)| reason).collect()
}

#[tokio::test]
async fn a_killed_agents_guest_holds_its_disk_and_its_failover_waits_for_it() {
    let _turn = SERIAL.lock().await;
    let (mut bed, uid) = Bed::with_guest("lease-kill", "db").await;
    let (a, b) = (connect(&bed.uris[0]), connect(&bed.uris[1]));
    let sampler = bed.sampler();

    // A second start of the running server's disk, by hand on the other host (its
    // definition copied there under another name), is refused by the lock manager.
    let original = a.lookup_domain_by_uuid_string(&uid).expect("the domain is on a");
    let xml = original.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE).expect("definition");
    let copy = without_element(&without_element(&xml, "uuid"), "metadata").replacen(
        &format!("<name>{}</name>", original.name().expect("name")),
        "<name>copy-by-hand</name>",
        1,
    );
    let files = stand_in_files(&b, &copy);
    let by_hand = b.define_domain_xml(&copy).expect("define the copy on b");
    let refused = by_hand.create().expect_err("a second start of a held disk must fail").to_string();
    by_hand.undefine().expect("remove the copy");
    for file in files {
        file.delete(0).expect("remove the stand-in file");
    }
    assert!(
        refused.contains("resource busy") && refused.contains("Lockspace resource"),
        "refused by virtlockd, not something else: {refused}"
    );
    assert!(!refused.contains("write\" lock"), "QEMU's image lock answered, not the lock manager: {refused}");

    // Host 1's agent dies; its guest runs on. After lease + grace the operator places
    // the server on host 2, whose start the lock manager refuses: the status says so,
    // naming host 1, and never calls the server Failed.
    bed.fleet.agents[0].kill();
    let held = |s: &VirtualServer| {
        host_of(s) == Some(bed.hosts[1].as_str())
            && ready_reason(s).is_some_and(|(reason, _)| reason == READY_DISK_LEASE_HELD)
    };
    let blocked = bed.fleet.wait_server(&bed.api, "db", "to wait for its disk lease on host 2", DEADLINE, held).await;
    let (_, message) = ready_reason(&blocked).expect("Ready");
    assert!(message.contains(&bed.hosts[0]), "the message names the holder: {message}");
    assert!(message.contains("Lockspace resource"), "and libvirt's refusal: {message}");
    assert_ne!(blocked.status.as_ref().and_then(|s| s.phase), Some(VirtualServerPhase::Failed));
    assert_eq!(active(&a, &uid), Some(true), "the old copy still runs on a");

    // For as long as the old copy lives, the new one never starts, and the status
    // keeps telling why.
    let started = poll(Duration::from_secs(8), || async {
        let s = bed.api.get("db").await.ok()?;
        let on_b = active(&b, &uid);
        (on_b == Some(true) || !held(&s)).then(|| format!("active on b: {on_b:?}, status: {:?}", s.status))
    })
    .await;
    assert!(started.is_none(), "a second copy started, or the status stopped saying why not: {started:?}");

    // The old copy stops (a reset of host 1, by hand): the server starts on host 2.
    original.destroy().expect("destroy the old copy on a");
    let on_2 = |s: &VirtualServer| {
        ready(s)
            && host_of(s) == Some(bed.hosts[1].as_str())
            && s.status.as_ref().and_then(|st| st.phase) == Some(VirtualServerPhase::Running)
    };
    bed.fleet.wait_server(&bed.api, "db", "to run on host 2 once the old copy is gone", DEADLINE, on_2).await;
    assert_eq!(active(&b, &uid), Some(true));
    sampler.assert_never_twice().await;
    let reasons = event_reasons(&bed.client, bed.api.namespace().unwrap_or_default(), "db").await;
    assert!(reasons.iter().any(|r| r == READY_DISK_LEASE_HELD), "an Event said why it waited: {reasons:?}");
    assert!(!reasons.iter().any(|r| r == "StartFailed"), "a held lease is not a failed start: {reasons:?}");

    // Host 1's agent returns: it starts nothing and removes the definition left there.
    bed.fleet.agents[0].start();
    wait_until("host 1 to remove the stale definition", DEADLINE, || async {
        active(&a, &uid).is_none().then_some(())
    })
    .await;
    assert_eq!(active(&b, &uid), Some(true), "the server still runs on b");
    bed.delete("db").await;
}

#[tokio::test]
async fn a_rolling_restart_longer_than_lease_and_grace_moves_nothing() {
    let _turn = SERIAL.lock().await;
    let (mut bed, uid) = Bed::with_guest("lease-roll", "web").await;
    let a = connect(&bed.uris[0]);
    let guest_id = a.lookup_domain_by_uuid_string(&uid).expect("on a").id().expect("running guest's id");
    let sampler = bed.sampler();

    // SIGTERM, as a DaemonSet rolling update sends: the agent's last renewal asks the
    // operator to wait for its successor, and records the longer fenceAfter it keeps.
    assert!(bed.fleet.agents[0].terminate(Duration::from_secs(20)), "the agent exits on SIGTERM");
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.fleet.lease_namespace);
    let lease = leases.get(&bed.hosts[0]).await.expect("host 1's Lease");
    assert_eq!(lease.spec.as_ref().and_then(|s| s.lease_duration_seconds), Some(10 + 120), "{lease:?}");
    assert_eq!(lease.annotations().get(covi_api::host::LEASE_FENCE_AFTER).map(String::as_str), Some("126"));

    // Away for longer than the pool's lease + grace (13 s): nothing moves, and the
    // Host is not declared lost.
    let hosts: Api<covi_api::Host> = Api::all(bed.client.clone());
    let moved = poll(Duration::from_secs(18), || async {
        let s = bed.api.get("web").await.ok()?;
        let host = hosts.get(&bed.hosts[0]).await.ok()?;
        let lost = host
            .status
            .as_ref()
            .is_some_and(|st| find_condition(&st.conditions, "Ready").is_some_and(|c| c.reason == "HostLost"));
        (host_of(&s) != Some(bed.hosts[0].as_str()) || lost).then_some(format!("{:?}", s.status))
    })
    .await;
    assert!(moved.is_none(), "a restarting agent's server was moved or its host declared lost: {moved:?}");

    // The new agent takes over the guest as it is: the same QEMU process.
    bed.fleet.agents[0].start();
    wait_until("host 1's agent to renew with the pool's timings again", DEADLINE, || async {
        let lease = leases.get(&bed.hosts[0]).await.ok()?;
        (lease.spec?.lease_duration_seconds == Some(10)).then_some(())
    })
    .await;
    let s = bed.api.get("web").await.expect("server");
    assert!(ready(&s) && host_of(&s) == Some(bed.hosts[0].as_str()), "{:?}", s.status);
    let now = a.lookup_domain_by_uuid_string(&uid).expect("still on a");
    assert_eq!(now.id().expect("running guest's id"), guest_id, "the guest was never restarted");
    sampler.assert_never_twice().await;
    bed.delete("web").await;
}

#[tokio::test]
async fn an_agent_reconnects_after_libvirtd_restarts_and_healthz_says_so_meanwhile() {
    let _turn = SERIAL.lock().await;
    let bed = Bed::new("lease-libvirtd").await;
    let server = bed.server_on_host_1("app").await;
    let uid = server.uid().expect("uid");
    let agent = covi_tests::fleet::endpoint_of(&bed.fleet.agents[0]).expect("the agent's endpoint");
    let healthz = || async { covi_tests::fleet::get(&agent, "/healthz", Duration::from_secs(2)).await };
    assert_eq!(healthz().await.as_deref(), Some("ok\n"));

    // Past its start: libvirtd kills a guest whose start job it finds unfinished when
    // it comes back (seen here when the restart followed Ready within 300 ms).
    let a = connect(&bed.uris[0]);
    let dom = a.lookup_domain_by_uuid_string(&uid).expect("on a");
    let first = dom.info().expect("info").cpu_time;
    wait_until("the guest to run past its start", DEADLINE, || async {
        let idle = dom.job_info().ok()?.r#type == virt::sys::VIR_DOMAIN_JOB_NONE as i32;
        (idle && dom.info().ok()?.cpu_time > first).then_some(())
    })
    .await;
    drop((dom, a));

    // Stop peer a's libvirtd and keep it down (virtlockd and the guest stay).
    let dir = peer_dir(&peer_sockets().0);
    let hold = dir.join("libvirtd.hold");
    std::fs::write(&hold, "").expect("hold libvirtd down");
    let pid: i32 = std::fs::read_to_string(dir.join("libvirtd.pid")).expect("libvirtd pid").trim().parse().unwrap();
    // SAFETY: kill(2) on the test bed's libvirtd.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "stopping libvirtd");
    wait_until("/healthz to fail while libvirtd is down", DEADLINE, || async {
        (healthz().await.as_deref() == Some("not healthy\n")).then_some(())
    })
    .await;
    std::fs::remove_file(&hold).expect("let libvirtd start again");
    wait_until("/healthz to pass once libvirtd is back", DEADLINE, || async {
        (healthz().await.as_deref() == Some("ok\n")).then_some(())
    })
    .await;

    // The agent's own connection works again: a guest destroyed behind its back is
    // started again.
    // (QEMU guests outlive a libvirtd restart, but libvirtd kills one it finds in the
    // middle of a job as it reconnects: seen under load. Down either way, then.)
    let a = connect(&bed.uris[0]);
    match a.lookup_domain_by_uuid_string(&uid).expect("on a").destroy() {
        Ok(()) => {}
        Err(e) if matches!(e.code(), virt::enumutil::Enum::Known(virt::error::ErrorNumber::OperationInvalid)) => {}
        Err(e) => panic!("virsh destroy: {e}"),
    }
    wait_until("the agent to start the guest again", DEADLINE, || async {
        (active(&a, &uid) == Some(true)).then_some(())
    })
    .await;
    bed.delete("app").await;
}

/// On b, the disk files a copied definition names, as b's own (empty) files: in the
/// split pool b does not see a's, and libvirt checks that files exist before it asks
/// the lock manager. Returns the volumes it created.
fn stand_in_files(b: &Connect, xml: &str) -> Vec<virt::storage_vol::StorageVol> {
    let pool = b.lookup_storage_pool_by_name(POOL).expect("the split pool on b");
    pool.refresh(0).expect("refresh");
    let mut created = Vec::new();
    for part in xml.split("<source file='").skip(1) {
        let path = part.split('\'').next().expect("a quoted path");
        let name = path.rsplit('/').next().expect("a file name");
        if pool.lookup_storage_vol_by_name(name).is_err() {
            let vol = format!(
                "<volume><name>{name}</name><capacity unit='MiB'>1</capacity><target><format type='raw'/></target></volume>"
            );
            created.push(virt::storage_vol::StorageVol::create_xml(&pool, &vol, 0).expect("stand-in file"));
        }
    }
    created
}

/// An agent alive but cut off from the API server: its watchdog destroys the real QEMU
/// guest at fenceAfter, while the server is still bound to the host (before the
/// operator may judge it lost), and the failover copy starts on the other daemon.
#[tokio::test]
async fn a_cut_off_hosts_watchdog_destroys_its_guest_before_the_failover() {
    let _turn = SERIAL.lock().await;
    let netns = NetnsHost::create("lcut").await;
    let mut bed = Bed::with_host_1_in("lease-cut", Some(&netns)).await;
    let uid = bed.server_on_host_1("db").await.uid().expect("uid");
    bed.add_host_2().await;
    let sampler = bed.sampler();
    let peer_a = connect(&bed.uris[0]);

    netns.cut();
    let cut = Instant::now();
    let (destroyed, bound_then) = wait_until("host 1's watchdog to destroy the guest", DEADLINE, || async {
        if active(&peer_a, &uid) == Some(true) {
            return None;
        }
        let server = bed.api.get("db").await.ok()?;
        Some((cut.elapsed(), host_of(&server).map(String::from)))
    })
    .await;
    assert_eq!(bound_then.as_deref(), Some(bed.hosts[0].as_str()), "the guest was destroyed before the failover");
    let on_2 = |s: &VirtualServer| ready(s) && host_of(s) == Some(bed.hosts[1].as_str());
    bed.fleet.wait_server(&bed.api, "db", "to run on host 2", DEADLINE, on_2).await;
    println!(
        "cut off: guest destroyed after {:.1}s, Ready on host 2 after {:.1}s",
        destroyed.as_secs_f64(),
        cut.elapsed().as_secs_f64()
    );
    let (samples, doubles) = sampler.finish().await;
    assert!(samples > 0 && doubles.is_empty(), "servers ran twice: {doubles:?}");

    netns.heal();
    bed.delete("db").await;
}

/// The chaos test on real daemons: guests outlive killed, frozen and stopped agents,
/// so only fencing, the protocol and the disk leases stand between them and a second
/// copy. Sampled through libvirt itself, every 100 ms.
#[tokio::test]
async fn chaos_on_real_libvirt_daemons_never_runs_a_server_twice() {
    let _turn = SERIAL.lock().await;
    let mut rng = covi_tests::Rng::seeded();
    let uris = split_pool_on_both_peers();
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, "lease-chaos").await;
    // Short timings so twenty rounds fit in a few minutes: lost after 4 s.
    let mut spec = qemu_pool(POOL, true);
    spec["failover"] = json!({"renewSeconds": 1, "leaseDurationSeconds": 3, "fenceAfterSeconds": 2, "graceSeconds": 1});
    let pool = fleet.apply_pool(&client, spec).await;
    let flags = ["--stop-grace-seconds", "3", "--restart-grace-seconds", "3"];
    for (n, uri) in uris.iter().enumerate() {
        fleet.start_agent_uri(n + 1, uri, &flags);
    }
    fleet.start_operator();
    fleet.wait_pool_ready(&client, &pool, 2).await;
    let ns = namespace(&client, "lease-chaos").await;
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    let names: Vec<String> = (1..=3).map(|i| format!("ha-{i}")).collect();
    for name in &names {
        apply_server(&api, name, &pool, json!({"highAvailability": true})).await;
    }
    let all_ready = || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        (list.items.len() == names.len() && list.items.iter().all(ready)).then_some(())
    };
    covi_tests::all_ready_again(&api, DEADLINE, "at the start", all_ready).await;
    let hosts = [fleet.host_name(1), fleet.host_name(2)];
    let sampler = Sampler::on_daemons(hosts.iter().cloned().zip(uris.iter().cloned()).collect());

    let rounds = 20;
    for round in 1..=rounds {
        let n = rng.below(2) as usize;
        let action = ["kill", "freeze", "stop"][rng.below(3) as usize];
        // Sometimes within the lease, sometimes long past a lost host.
        let hold = Duration::from_millis(500 + rng.below(7_500));
        let pid = fleet.agents[n].pid().expect("agent runs") as i32;
        match action {
            "kill" => fleet.agents[n].kill(),
            // SAFETY: plain signals to our own child process.
            "freeze" => unsafe {
                libc::kill(pid, libc::SIGSTOP);
            },
            _ => assert!(fleet.agents[n].terminate(Duration::from_secs(10)), "the agent exits on SIGTERM"),
        }
        tokio::time::sleep(hold).await;
        match action {
            // SAFETY: as above.
            "freeze" => unsafe {
                libc::kill(pid, libc::SIGCONT);
            },
            _ => fleet.agents[n].start(),
        }
        let resumed = k8s_openapi::jiff::Timestamp::now();
        println!("round {round}: {action} {} for {:.1}s", hosts[n], hold.as_secs_f64());
        fleet.wait_lease_renewed_after(&client, n + 1, resumed).await;
        covi_tests::all_ready_again(&api, DEADLINE, &format!("round {round}"), all_ready).await;
    }
    let (samples, doubles) = sampler.finish().await;
    let mut failovers = 0;
    for s in api.list(&ListParams::default()).await.expect("list").items {
        failovers += s.status.map(|st| st.failovers.len()).unwrap_or(0);
    }
    let mut held = 0;
    for name in &names {
        held += event_reasons(&client, &ns, name).await.iter().filter(|r| *r == READY_DISK_LEASE_HELD).count();
    }
    println!(
        "chaos on libvirtd: {rounds} rounds, {} servers, {failovers} failovers, {held} starts held back by a disk lease, {samples} samples, {} double runs",
        names.len(),
        doubles.len()
    );
    assert!(samples > 100, "the sampler ran ({samples} samples)");
    assert!(doubles.is_empty(), "servers ran twice: {doubles:?}");
    for name in &names {
        covi_tests::delete_and_wait(&api, name, DEADLINE).await;
    }
}

/// The peer's folder in the test bed, from its socket DIR/run/libvirt/libvirt-sock.
fn peer_dir(socket: &str) -> PathBuf {
    PathBuf::from(socket).ancestors().nth(3).expect("DIR/run/libvirt/libvirt-sock").to_path_buf()
}

/// `xml` without its first `<tag>…</tag>` element.
fn without_element(xml: &str, tag: &str) -> String {
    let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
    match (xml.find(&open), xml.find(&close)) {
        (Some(start), Some(end)) => format!("{}{}", &xml[..start], &xml[end + close.len()..]),
        _ => xml.to_string(),
    }
}
