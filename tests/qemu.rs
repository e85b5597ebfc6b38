//! Real guests: covi-agent on libvirtd with QEMU/TCG (no KVM). The guests have no
//! operating system; a guest that runs its firmware counts. These tests also see
//! libvirt's own view of each domain (`virsh dumpxml`), and survive agent restarts
//! because libvirtd keeps the domains.

use std::time::{Duration, Instant};

use covi_api::VirtualServer;
use covi_api::virtual_server::{MigrationPhase, READY_HANDED_OFF, VirtualServerPhase};
use covi_tests::fleet::Fleet;
use covi_tests::guests::{apply_server, fixtures_in, peer_sockets, qemu_pool, ready};
use covi_tests::{admin, install_crds, namespace, wait_until};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use virt::connect::Connect;

// One agent at a time owns qemu:///system: an agent removes covi domains it does
// not run, which would include another test's.
use covi_tests::SERIAL;

const STORAGE_POOL: &str = "covi-test";
const DEADLINE: Duration = Duration::from_secs(60);

fn qemu_uri() -> String {
    std::env::var("COVI_QEMU_URI").unwrap_or_else(|_| {
        panic!("COVI_QEMU_URI is unset: run through hack/test.sh, which starts libvirtd (qemu:///system)")
    })
}

/// The test's fixtures in libvirt: a bridge, a transient directory pool, and a small
/// raw image (no OS: the guest stops in its firmware).
fn fixtures(conn: &Connect) {
    fixtures_in(conn, STORAGE_POOL, "/var/lib/covi-test/pool");
}

async fn setup(id: &str) -> (Client, Fleet, String, Api<VirtualServer>, Connect) {
    let uri = qemu_uri();
    let conn = Connect::open(Some(&uri)).unwrap_or_else(|e| panic!("opening {uri}: {e}"));
    fixtures(&conn);
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, id).await;
    let pool = fleet.apply_pool(&client, qemu_pool(STORAGE_POOL, false)).await;
    fleet.start_agent_uri(1, &uri, &["--stop-grace-seconds", "3"]);
    fleet.start_operator();
    fleet.wait_ready_hosts(&client, 1).await;
    fleet.wait_pool_ready(&client, &pool, 1).await;
    let ns = namespace(&client, id).await;
    (client.clone(), fleet, pool, Api::namespaced(client, &ns), conn)
}

fn phase(s: &VirtualServer) -> Option<VirtualServerPhase> {
    s.status.as_ref().and_then(|st| st.phase)
}

/// Domains in libvirt named like this server, with their active state.
fn domains_named(conn: &Connect, name: &str) -> Vec<bool> {
    conn.list_all_domains(0)
        .expect("list domains")
        .into_iter()
        .filter(|d| d.name().ok().as_deref() == Some(name))
        .map(|d| d.is_active().expect("state"))
        .collect()
}

#[tokio::test]
async fn real_qemu_guests_are_created_restored_stopped_and_deleted() {
    let _turn = SERIAL.lock().await;
    let (_client, fleet, pool, api, conn) = setup("qemu").await;
    apply_server(&api, "guest", &pool, json!({"hostname": "qemu-guest-one"})).await;
    let s = fleet.wait_server(&api, "guest", "to run", DEADLINE, ready).await;
    let uid = s.uid().expect("uid");

    // libvirt's own view of the domain carries what was asked for.
    let dom = conn.lookup_domain_by_uuid_string(&uid).expect("the domain exists in libvirt");
    assert!(dom.is_active().expect("state"));
    let xml = dom.xml_desc(0).expect("dumpxml");
    assert!(xml.contains("<domain type='qemu'"), "TCG, not KVM:\n{xml}");
    assert!(xml.contains("<vcpu placement='static'>1</vcpu>"), "{xml}");
    assert!(xml.contains("<memory unit='KiB'>262144</memory>"), "{xml}");
    assert!(xml.contains("hostname=\"qemu-guest-one\""), "{xml}");
    assert!(xml.contains(&format!("<source bridge='{}'/>", covi_tests::guests::BRIDGE)), "{xml}");
    // The guest executes: QEMU accumulates CPU time in the firmware.
    let first = dom.info().expect("info").cpu_time;
    wait_until("the guest to use CPU", DEADLINE, || async { (dom.info().ok()?.cpu_time > first).then_some(()) }).await;

    // Destroyed behind covi's back: running again within the resync period.
    let destroyed_at = Instant::now();
    dom.destroy().expect("virsh destroy");
    wait_until("the domain to run again", DEADLINE, || async {
        let d = conn.lookup_domain_by_uuid_string(&uid).ok()?;
        d.is_active().ok()?.then_some(())
    })
    .await;
    println!("destroyed domain running again after {:?}", destroyed_at.elapsed());
    assert_eq!(domains_named(&conn, &dom.name().expect("name")), [true], "exactly one domain");

    // Changed behind covi's back (two CPUs in the persistent definition): restored.
    let edited = dom
        .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        .expect("inactive XML")
        .replace("<vcpu placement='static'>1</vcpu>", "<vcpu placement='static'>2</vcpu>");
    conn.define_domain_xml(&edited).expect("edit the definition like `virsh edit`");
    wait_until("the definition to be restored to one CPU", DEADLINE, || async {
        let xml = dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE).ok()?;
        xml.contains("<vcpu placement='static'>1</vcpu>").then_some(())
    })
    .await;

    // Stop (the guest has no OS to obey ACPI, so the grace period ends in a forced off) and start.
    apply_server(&api, "guest", &pool, json!({"runPolicy": "Stopped"})).await;
    fleet.wait_server(&api, "guest", "to stop", DEADLINE, |s| phase(s) == Some(VirtualServerPhase::Stopped)).await;
    assert!(!dom.is_active().expect("state"), "libvirt shows it shut off");
    apply_server(&api, "guest", &pool, json!({"runPolicy": "Running"})).await;
    fleet
        .wait_server(&api, "guest", "to run again", DEADLINE, |s| {
            ready(s) && phase(s) == Some(VirtualServerPhase::Running)
        })
        .await;
    assert!(dom.is_active().expect("state"));

    // Delete: domain and volumes are gone before the object is.
    covi_tests::delete_and_wait(&api, "guest", DEADLINE).await;
    assert!(conn.lookup_domain_by_uuid_string(&uid).is_err(), "the domain is undefined");
    let pool = conn.lookup_storage_pool_by_name(STORAGE_POOL).expect("pool");
    pool.refresh(0).expect("refresh");
    let short_uid = uid.split('-').next().expect("uid");
    let left: Vec<_> = pool.list_volumes().expect("volumes").into_iter().filter(|v| v.contains(short_uid)).collect();
    assert!(left.is_empty(), "volumes left behind: {left:?}");
    drop(fleet);
}

#[tokio::test]
async fn an_agent_killed_mid_create_adopts_its_domain_and_leaves_others_alone() {
    let _turn = SERIAL.lock().await;
    let (_client, mut fleet, pool, api, conn) = setup("adopt").await;

    // A domain covi did not define: never touched.
    if let Ok(old) = conn.lookup_domain_by_name("not-covi") {
        old.undefine().expect("remove a foreign domain left by an earlier run");
    }
    let foreign = conn
        .define_domain_xml(
            "<domain type='qemu'><name>not-covi</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type></os></domain>",
        )
        .expect("define a foreign domain");

    apply_server(&api, "adopted", &pool, json!({})).await;
    let name = format!("{}.adopted", api.namespace().unwrap_or_default());
    // Kill the agent as soon as the domain exists, before it reported anything.
    wait_until("the domain to be defined", DEADLINE, || async {
        (!domains_named(&conn, &name).is_empty()).then_some(())
    })
    .await;
    fleet.agents[0].kill();
    fleet.agents[0].start();

    let s = fleet.wait_server(&api, "adopted", "to run after the restart", DEADLINE, ready).await;
    assert_eq!(domains_named(&conn, &name), [true], "exactly one domain, running");
    assert_eq!(s.status.and_then(|st| st.domain_uuid), s.metadata.uid);

    // A covi domain whose server does not exist is swept; the foreign one, in the
    // same sweep, is not.
    let orphan = conn
        .define_domain_xml(&format!(
            "<domain type='qemu'><name>orphan.left-behind</name><uuid>5e0c2f0a-1111-4222-8333-444455556666</uuid>\
             <metadata><covi:server xmlns:covi='{}' uid='5e0c2f0a-1111-4222-8333-444455556666' \
             namespace='{}' name='left-behind' generation='1'/></metadata>\
             <memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os></domain>",
            covi_agent::domain_xml::METADATA_NS,
            api.namespace().unwrap_or_default()
        ))
        .expect("define an orphaned covi domain");
    wait_until("the orphaned covi domain to be swept", DEADLINE, || async {
        orphan.is_persistent().is_err().then_some(())
    })
    .await;
    assert!(foreign.is_persistent().expect("the foreign domain is untouched"));
    foreign.undefine().expect("clean up the foreign domain");

    covi_tests::delete_and_wait(&api, "adopted", DEADLINE).await;
}

/// The live-migration set-up: hosts 1 and 2 on the test bed's libvirt peers a and b,
/// sharing a folder as storage, and an operator.
struct LiveBed {
    fleet: Fleet,
    pool: String,
    api: Api<VirtualServer>,
    conns: [Connect; 2],
    hosts: [String; 2],
}

/// The live-migration tests' storage pool, on a folder both peers share.
const LIVE_POOL: &str = "covi-shared";

async fn live_bed(id: &str) -> LiveBed {
    let (a, b) = peer_sockets();
    let uri = |socket: &str| format!("qemu+unix:///system?socket={socket}");
    let conns = [Connect::open(Some(&uri(&a))).expect("peer a"), Connect::open(Some(&uri(&b))).expect("peer b")];
    let shared = covi_tests::testbed_dir().join("shared-pool").display().to_string();
    for conn in &conns {
        fixtures_in(conn, LIVE_POOL, &shared);
    }
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, id).await;
    let pool = fleet.apply_pool(&client, qemu_pool(LIVE_POOL, true)).await;
    // Each Host's address is its daemon's socket, and the peer URI template points there.
    let peer_uri = "qemu+unix:///system?socket={address}";
    for (n, socket) in [(1, &a), (2, &b)] {
        let extra = ["--address", socket.as_str(), "--peer-uri", peer_uri, "--unsafe-migration"];
        fleet.start_agent_uri(n, &uri(socket), &extra);
    }
    fleet.start_operator();
    fleet.wait_pool_ready(&client, &pool, 2).await;
    let ns = namespace(&client, id).await;
    let hosts = [fleet.host_name(1), fleet.host_name(2)];
    LiveBed { fleet, pool, api: Api::namespaced(client, &ns), conns, hosts }
}

/// A guest pinned to host 1 and Running there; its UID, and a sampler reading both
/// daemons directly (an agent of the test may die).
async fn guest_on_host_1(
    fleet: &Fleet,
    api: &Api<VirtualServer>,
    pool: &str,
    [h1, h2]: [&String; 2],
) -> (String, covi_tests::sampler::Sampler) {
    apply_server(api, "guest", pool, json!({"placement": {"host": h1}})).await;
    let before = fleet.wait_server(api, "guest", "to run on host 1", DEADLINE, ready).await;
    let (a, b) = peer_sockets();
    let daemons = [(h1.clone(), a), (h2.clone(), b)].map(|(h, s)| (h, format!("qemu+unix:///system?socket={s}")));
    (before.uid().expect("uid"), covi_tests::sampler::Sampler::on_daemons(daemons.into()))
}

/// Moves the guest by pinning it to `host`.
async fn pin(api: &Api<VirtualServer>, host: &str) {
    let patch = json!({"spec": {"placement": {"host": host}}});
    api.patch("guest", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("pin the guest");
}

#[tokio::test]
async fn a_running_guest_moves_live_between_two_libvirt_daemons() {
    // Its operator schedules every pool: one test at a time.
    let _turn = SERIAL.lock().await;
    let LiveBed { fleet, pool, api, conns: [conn_a, conn_b], hosts: [h1, h2] } = live_bed("live").await;
    apply_server(&api, "guest", &pool, json!({"placement": {"host": h1}})).await;
    let before = fleet.wait_server(&api, "guest", "to run on host 1", DEADLINE, ready).await;
    let uid = before.uid().expect("uid");
    assert!(conn_a.lookup_domain_by_uuid_string(&uid).expect("on a").is_active().unwrap());
    let hosts = [(h1.clone(), fleet.agents[0].log.clone()), (h2.clone(), fleet.agents[1].log.clone())];
    let sampler = covi_tests::sampler::Sampler::start(std::sync::Arc::new(std::sync::Mutex::new(hosts.into())));

    pin(&api, &h2).await;
    let after = fleet
        .wait_server(&api, "guest", "to run on host 2 after a live migration", DEADLINE, |s| {
            ready(s)
                && s.status.as_ref().and_then(|st| st.host.as_deref()) == Some(h2.as_str())
                && s.status
                    .as_ref()
                    .and_then(|st| st.migration.as_ref())
                    .is_some_and(|m| m.phase == covi_api::virtual_server::MigrationPhase::Succeeded)
        })
        .await;
    let m = after.status.as_ref().unwrap().migration.clone().unwrap();
    assert_eq!(m.mode.as_deref(), Some("Live"));

    // The same guest, never restarted: running on b because it migrated there, gone from a.
    let dom = conn_b.lookup_domain_by_uuid_string(&uid).expect("the domain is on b");
    let (state, reason) = dom.state().expect("state");
    assert_eq!(format!("{state:?}"), "Known(Running)");
    assert!(format!("{reason:?}").contains("Migrated"), "running because it migrated: {reason:?}");
    assert!(conn_a.lookup_domain_by_uuid_string(&uid).is_err(), "undefined on a");
    assert_eq!(after.status.as_ref().unwrap().domain_uuid.as_deref(), Some(uid.as_str()));
    let stats = dom.job_stats(virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED).expect("completed job stats");
    println!(
        "live migration: downtime {} ms, total {} ms, {} bytes moved",
        stats.downtime.unwrap_or_default(),
        stats.time_elapsed.unwrap_or_default(),
        stats.data_processed.unwrap_or_default()
    );
    sampler.assert_never_twice().await;

    covi_tests::delete_and_wait(&api, "guest", DEADLINE).await;
    assert!(conn_b.lookup_domain_by_uuid_string(&uid).is_err(), "removed from b");
}

#[tokio::test]
async fn a_new_leader_during_a_live_migration_hands_the_guest_to_its_target() {
    let _turn = SERIAL.lock().await;
    let LiveBed { mut fleet, pool, api, conns: [conn_a, conn_b], hosts: [h1, h2] } = live_bed("live-leader").await;
    apply_server(&api, "guest", &pool, json!({"placement": {"host": h1}})).await;
    let before = fleet.wait_server(&api, "guest", "to run on host 1", DEADLINE, ready).await;
    let uid = before.uid().expect("uid");
    let hosts = [(h1.clone(), fleet.agents[0].log.clone()), (h2.clone(), fleet.agents[1].log.clone())];
    let sampler = covi_tests::sampler::Sampler::start(std::sync::Arc::new(std::sync::Mutex::new(hosts.into())));

    // The leader records the move, then dies: the source hands the guest off with no
    // operator running, and the next leader's first pass has confirmed no host yet.
    pin(&api, &h2).await;
    fleet
        .wait_server(&api, "guest", "the migration to be recorded", DEADLINE, |s| {
            s.status.as_ref().and_then(|st| st.migration.as_ref()).is_some_and(|m| m.phase == MigrationPhase::Running)
        })
        .await;
    fleet.operator.as_mut().expect("operator").kill();
    fleet
        .wait_server(&api, "guest", "the source to hand the guest off", DEADLINE, |s| {
            s.status.as_ref().and_then(|st| find_ready(st)).is_some_and(|r| r == READY_HANDED_OFF)
        })
        .await;
    fleet.operator.as_mut().expect("operator").start();
    let after = fleet
        .wait_server(&api, "guest", "to run on host 2 under the new leader", DEADLINE, |s| {
            ready(s) && s.status.as_ref().and_then(|st| st.host.as_deref()) == Some(h2.as_str())
        })
        .await;
    let m = after.status.as_ref().and_then(|s| s.migration.clone()).expect("migration record");
    assert_eq!(m.mode.as_deref(), Some("Live"));
    // The same guest, moved, never started again on a.
    let (state, reason) = conn_b.lookup_domain_by_uuid_string(&uid).expect("on b").state().expect("state");
    assert_eq!(format!("{state:?}"), "Known(Running)");
    assert!(format!("{reason:?}").contains("Migrated"), "running because it migrated: {reason:?}");
    assert!(conn_a.lookup_domain_by_uuid_string(&uid).is_err(), "nothing of it left on a");
    sampler.assert_never_twice().await;
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(admin().await, api.namespace().unwrap_or_default());
    let params = kube::api::ListParams::default().fields("involvedObject.name=guest");
    let reasons: Vec<_> =
        events.list(&params).await.expect("events").items.into_iter().filter_map(|e| e.reason).collect();
    assert!(
        !reasons.iter().any(|r| r == "DiskLeaseHeld" || r == "StartFailed"),
        "no start was attempted on a: {reasons:?}"
    );
    covi_tests::delete_and_wait(&api, "guest", DEADLINE).await;
}

fn find_ready(status: &covi_api::VirtualServerStatus) -> Option<&str> {
    covi_api::condition::find_condition(&status.conditions, "Ready").map(|c| c.reason.as_str())
}

#[tokio::test]
async fn a_source_lost_during_a_live_migration_leaves_the_guest_on_its_target() {
    let _turn = SERIAL.lock().await;
    let LiveBed { mut fleet, pool, api, conns: [conn_a, conn_b], hosts: [h1, h2] } = live_bed("live-lost").await;
    // Not highly available: before, the target destroyed the copy it had received.
    let (uid, sampler) = guest_on_host_1(&fleet, &api, &pool, [&h1, &h2]).await;

    // The source's agent dies once libvirt is moving the guest: the move completes
    // without it, and its host is lost after lease + grace.
    pin(&api, &h2).await;
    let dom_a = conn_a.lookup_domain_by_uuid_string(&uid).expect("on a");
    wait_until("libvirt to start migrating the guest", DEADLINE, || async {
        let job = dom_a.job_info().ok()?;
        (job.r#type != virt::sys::VIR_DOMAIN_JOB_NONE as i32).then_some(())
    })
    .await;
    fleet.agents[0].kill();
    let after = fleet
        .wait_server(&api, "guest", "to be handed to host 2 after host 1 was lost", DEADLINE, |s| {
            ready(s) && s.status.as_ref().and_then(|st| st.host.as_deref()) == Some(h2.as_str())
        })
        .await;
    let (state, reason) = conn_b.lookup_domain_by_uuid_string(&uid).expect("on b").state().expect("state");
    assert_eq!(format!("{state:?}"), "Known(Running)");
    assert!(format!("{reason:?}").contains("Migrated"), "the migrated guest, never restarted: {reason:?}");
    assert!(conn_a.lookup_domain_by_uuid_string(&uid).is_err(), "nothing of it left on a");
    let m = fleet
        .wait_server(&api, "guest", "the move to be recorded", DEADLINE, |s| {
            s.status.as_ref().and_then(|st| st.migration.as_ref()).is_some_and(|m| m.phase == MigrationPhase::Failed)
        })
        .await
        .status
        .and_then(|s| s.migration)
        .expect("record");
    assert!(m.reason.as_deref().is_some_and(|r| r.contains("continues on")), "{m:?}");
    assert_eq!(after.status.as_ref().map(|s| s.failovers.len()), Some(1), "recorded as a failover from host 1");
    sampler.assert_never_twice().await;
    covi_tests::delete_and_wait(&api, "guest", DEADLINE).await;
}

#[tokio::test]
async fn a_target_failing_after_a_live_hand_off_keeps_the_guest() {
    let _turn = SERIAL.lock().await;
    let LiveBed { fleet, pool, api, conns: [conn_a, conn_b], hosts: [h1, h2] } = live_bed("live-sick").await;
    let (uid, sampler) = guest_on_host_1(&fleet, &api, &pool, [&h1, &h2]).await;

    // Once the move runs, the server's image leaves the catalog: the source hands the
    // guest off all the same, and the target, receiving it, cannot plan it and reports
    // a failure.
    pin(&api, &h2).await;
    fleet
        .wait_server(&api, "guest", "the move to start", DEADLINE, |s| {
            s.status.as_ref().and_then(|st| st.migration.as_ref()).is_some_and(|m| m.phase == MigrationPhase::Running)
        })
        .await;
    let client = admin().await;
    let mut spec = qemu_pool(LIVE_POOL, true);
    spec["images"] = json!([{"name": "other", "volume": "tiny.img"}]);
    fleet.apply_pool(&client, spec).await;
    let failed = fleet
        .wait_server(&api, "guest", "the move to be recorded as failed", DEADLINE, |s| {
            s.status.as_ref().and_then(|st| st.migration.as_ref()).is_some_and(|m| m.phase == MigrationPhase::Failed)
        })
        .await;
    let m = failed.status.as_ref().and_then(|s| s.migration.clone()).expect("record");
    assert!(m.reason.as_deref().is_some_and(|r| r.contains("ImageNotFound") && r.contains("stays on")), "{m:?}");
    // It stays where it runs: bound to host 2, the same guest running on b, for a while.
    let moved_back = covi_tests::poll(Duration::from_secs(6), || async {
        let s = api.get("guest").await.ok()?;
        let on_b = conn_b.lookup_domain_by_uuid_string(&uid).ok().and_then(|d| d.is_active().ok());
        let host = s.status.as_ref()?.host.clone();
        (host.as_deref() != Some(h2.as_str()) || on_b != Some(true))
            .then(|| format!("bound to {host:?}, active on b: {on_b:?}"))
    })
    .await;
    assert!(moved_back.is_none(), "the server left the guest it had: {moved_back:?}");
    assert!(conn_a.lookup_domain_by_uuid_string(&uid).is_err(), "nothing started again on a");

    // The catalog is put right: the target converges, the guest still the migrated one.
    fleet.apply_pool(&client, qemu_pool(LIVE_POOL, true)).await;
    fleet
        .wait_server(&api, "guest", "to be Ready on host 2", DEADLINE, |s| {
            ready(s) && s.status.as_ref().and_then(|st| st.host.as_deref()) == Some(h2.as_str())
        })
        .await;
    let (_, reason) = conn_b.lookup_domain_by_uuid_string(&uid).expect("on b").state().expect("state");
    assert!(format!("{reason:?}").contains("Migrated"), "never restarted: {reason:?}");
    sampler.assert_never_twice().await;
    covi_tests::delete_and_wait(&api, "guest", DEADLINE).await;
}

/// Automatic consolidation on real libvirt daemons: two guests with day and night
/// profiles on two hosts end up on one, moved live by the migration path, never
/// running twice, and the emptied host is marked free.
#[tokio::test]
async fn automatic_consolidation_moves_a_guest_live_and_frees_its_host() {
    let _turn = SERIAL.lock().await;
    let LiveBed { fleet, pool, api, conns, hosts: [h1, h2] } = live_bed("live-consolidate").await;
    for name in ["office", "batch"] {
        apply_server(&api, name, &pool, json!({})).await;
        fleet.wait_server(&api, name, "to run", DEADLINE, ready).await;
    }
    let host_of = |s: &VirtualServer| s.status.as_ref().and_then(|st| st.host.clone());
    let before = [api.get("office").await.unwrap(), api.get("batch").await.unwrap()];
    assert_ne!(host_of(&before[0]), host_of(&before[1]), "spread over both hosts");
    // Busy by day and by night: 1.2 of a host's 2 CPUs each, never at once.
    let profile = |from: u8, to: u8| {
        let hours: Vec<_> = (0..24u8)
            .map(|h| {
                let on = if from < to { h >= from && h < to } else { h >= from || h < to };
                json!({"hour": h, "cpu": [if on { 1200 } else { 100 }], "memory": [200]})
            })
            .collect();
        json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer", "status": {"usage": {
            "intervalSeconds": 3600, "samples": 360, "cpu": {"mean": 100, "p95": 100},
            "memory": {"mean": 200, "p95": 200}, "profile": hours}}})
    };
    let usage = PatchParams::apply("covi-agent-usage").force();
    api.patch_status("office", &usage, &Patch::Apply(profile(8, 18))).await.expect("office usage");
    api.patch_status("batch", &usage, &Patch::Apply(profile(20, 6))).await.expect("batch usage");
    let (a, b) = peer_sockets();
    let daemons = [(h1.clone(), a), (h2.clone(), b)].map(|(h, s)| (h, format!("qemu+unix:///system?socket={s}")));
    let sampler = covi_tests::sampler::Sampler::on_daemons(daemons.into());

    let client = admin().await;
    let pools: Api<covi_api::HostPool> = Api::all(client.clone());
    let automatic = json!({"spec": {"consolidation": {"mode": "Automatic", "intervalSeconds": 10}}});
    pools.patch(&pool, &PatchParams::default(), &Patch::Merge(&automatic)).await.expect("automatic");
    let (moved, target) = wait_until("one guest moved live onto the other's host", DEADLINE * 3, || async {
        let (o, b) = (api.get("office").await.ok()?, api.get("batch").await.ok()?);
        let together = ready(&o) && ready(&b) && host_of(&o).is_some() && host_of(&o) == host_of(&b);
        let moved = [o, b].into_iter().find(|s| {
            s.status.as_ref().and_then(|st| st.migration.as_ref()).is_some_and(|m| {
                m.phase == covi_api::virtual_server::MigrationPhase::Succeeded && m.mode.as_deref() == Some("Live")
            })
        })?;
        together.then(|| (moved.clone(), host_of(&moved).unwrap_or_default()))
    })
    .await;
    let uid = moved.uid().expect("uid");
    let conn = if target == h1 { &conns[0] } else { &conns[1] };
    let (_, reason) = conn.lookup_domain_by_uuid_string(&uid).expect("on the target").state().expect("state");
    assert!(format!("{reason:?}").contains("Migrated"), "the same guest, moved live: {reason:?}");
    let freed = if target == h1 { &h2 } else { &h1 };
    let hosts: Api<covi_api::Host> = Api::all(client);
    wait_until("the emptied host marked free", DEADLINE, || async {
        let h = hosts.get(freed).await.ok()?;
        let label = h.metadata.labels.as_ref()?.get("covi.io/consolidation").cloned();
        let c = covi_api::condition::find_condition(&h.status.as_ref()?.conditions, "Freed")?.clone();
        (label.as_deref() == Some("free") && c.status == "True").then_some(())
    })
    .await;
    sampler.assert_never_twice().await;
    let disabled = json!({"spec": {"consolidation": {"mode": "Disabled"}}});
    pools.patch(&pool, &PatchParams::default(), &Patch::Merge(&disabled)).await.expect("disable");
    for name in ["office", "batch"] {
        covi_tests::delete_and_wait(&api, name, DEADLINE).await;
    }
}
