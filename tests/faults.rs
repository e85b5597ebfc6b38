//! Faults on purpose (Disruptions) on real QEMU/TCG guests with a network stack: the
//! test guest (hack/guest.sh) in `net,shell` mode configures the address covi gave it
//! and runs what is typed on its console, so the test pings one guest from the other
//! through `kubectl covi console`. Traffic flows, stops under a partition and flows
//! again when the Disruption is deleted; a pause stops a guest until its window ends;
//! a kill destroys the guest, which its run policy brings back; and the host's rules
//! (nftables, tc, links) are gone after the agent is killed with -9 mid-fault and its
//! Disruptions deleted meanwhile.

use std::time::Duration;

use covi_api::VirtualServer;
use covi_api::disruption::{Disruption, TargetState};
use covi_tests::console::{Session, front_door, wait_available};
use covi_tests::fleet::Fleet;
use covi_tests::guests::{GuestsOf, apply_server, fixtures_in, guest_files, qemu_pool};
use covi_tests::{FIELD_MANAGER, SERIAL, admin, client_as, install_crds, namespace, poll, wait_until};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use virt::connect::Connect;

const STORAGE_POOL: &str = "covi-test-faults";
/// Under TCG a Debian kernel takes tens of seconds to reach its init.
const DEADLINE: Duration = Duration::from_secs(180);

/// Pings `to` from the guest behind `session` (3 tries, 1 s each): whether any reply
/// came, or None when the guest gave no verdict in time (still booting: the line was
/// typed before its shell read the console).
async fn ping(session: &Session, to: &str, n: &mut u32) -> Option<bool> {
    *n += 1;
    let tag = *n;
    let line = format!("ping -c 3 -W 1 {to} >/dev/null && echo PING-OK-{tag} || echo PING-FAIL-{tag}\n");
    session.type_bytes(line.as_bytes()).await;
    poll(Duration::from_secs(20), || async {
        let out = session.output();
        out.lines().map(|l| l.trim()).find_map(|l| {
            if l == format!("PING-OK-{tag}") {
                Some(true)
            } else if l == format!("PING-FAIL-{tag}") {
                Some(false)
            } else {
                None
            }
        })
    })
    .await
}

/// Pings until the answer is `want` (the guest boots, a rule takes effect).
async fn ping_until(session: &Session, to: &str, want: bool, n: &mut u32, what: &str) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while ping(session, to, n).await != Some(want) {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}:\n{}", session.output());
    }
}

async fn disrupt(api: &Api<Disruption>, name: &str, spec: Value) {
    let object =
        json!({"apiVersion": "covi.io/v1alpha1", "kind": "Disruption", "metadata": {"name": name}, "spec": spec});
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object))
        .await
        .unwrap_or_else(|e| panic!("applying Disruption {name}: {e}"));
}

/// Waits until the Disruption's status shows `server` in `state`; returns its message.
async fn target_state(api: &Api<Disruption>, name: &str, server: &str, state: TargetState) -> String {
    wait_until(&format!("Disruption {name} to show {server} {state:?}"), DEADLINE, || async {
        let d = api.get(name).await.ok()?;
        let target = d.status?.targets.into_iter().find(|t| t.server == server)?;
        (target.state == state).then_some(target.message)
    })
    .await
}

/// The guest's host-side interfaces, from its live XML.
fn interfaces(conn: &Connect, uid: &str) -> Vec<String> {
    let dom = conn.lookup_domain_by_uuid_string(uid).expect("the guest's domain");
    covi_agent::fault::apply::interfaces(&dom.xml_desc(0).expect("XML"))
}

/// A command on the host: success, and stdout followed by stderr.
fn host(program: &str, args: &[&str]) -> (bool, String) {
    let (ok, out, err) = covi_tests::run(program, args, None);
    (ok, out + &err)
}

/// Whether this kernel has netem (a throwaway veth pair is asked for one).
fn netem() -> bool {
    let _ = host("ip", &["link", "add", "covi-netem0", "type", "veth", "peer", "name", "covi-netem1"]);
    let (ok, _) = host("tc", &["qdisc", "add", "dev", "covi-netem0", "root", "netem", "delay", "1ms"]);
    let _ = host("ip", &["link", "del", "covi-netem0"]);
    ok
}

/// The average round trip of 3 pings from the guest behind `session` to `to`, in ms.
async fn round_trip(session: &Session, to: &str, n: &mut u32) -> f64 {
    *n += 1;
    let tag = *n;
    session.type_bytes(format!("ping -c 3 {to} | tail -n 1 | sed 's/^/RTT-{tag} /'\n").as_bytes()).await;
    wait_until("round trips", Duration::from_secs(30), || async {
        // busybox: "round-trip min/avg/max = 200.1/200.4/200.9 ms"
        let out = session.output();
        let line = out.lines().find(|l| l.trim_start().starts_with(&format!("RTT-{tag} round-trip")))?.to_string();
        line.split('=').nth(1)?.trim().split('/').nth(1)?.parse().ok()
    })
    .await
}

fn partition_table() -> bool {
    host("nft", &["list", "table", "bridge", covi_agent::fault::apply::NFT_TABLE]).0
}

fn covi_qdisc(interface: &str) -> bool {
    host("tc", &["qdisc", "show", "dev", interface, "root"]).1.contains(covi_agent::fault::apply::QDISC_HANDLE)
}

fn link_up(interface: &str) -> bool {
    let (_, out) = host("ip", &["-o", "link", "show", "dev", interface]);
    out.split('<').nth(1).and_then(|f| f.split('>').next()).is_some_and(|f| f.split(',').any(|x| x == "UP"))
}

#[tokio::test]
async fn faults_cut_pause_kill_and_leave_nothing_behind() {
    let _turn = SERIAL.lock().await;
    let uri = std::env::var("COVI_QEMU_URI").expect("COVI_QEMU_URI: run through hack/test.sh");
    let conn = Connect::open(Some(&uri)).expect("libvirt");
    fixtures_in(&conn, STORAGE_POOL, "/var/lib/covi-test/faults-pool");
    let (kernel, initrd) = guest_files();
    let client = admin().await;
    install_crds(&client).await;
    // Declared before the fleet: its guests go after the agent that would restart them.
    let _guests;
    let mut fleet = Fleet::new(&client, "faults").await;
    // The operator serves the console behind the API server, on the node's address.
    let (_unregister, console_flags) = front_door(&client, &fleet).await;

    let mut pool_spec = qemu_pool(STORAGE_POOL, false);
    pool_spec["network"]["cidr"] = json!("10.79.0.0/24");
    pool_spec["network"]["gateway"] = json!("10.79.0.1");
    pool_spec["images"] = json!([
        {"name": "net", "volume": "tiny.img", "kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 covi.guest=net,shell"},
    ]);
    let pool = fleet.apply_pool(&client, pool_spec).await;
    let agent = fleet.start_agent_uri(1, &uri, &["--console-addr=127.0.0.1:0", "--stop-grace-seconds=3"]);
    fleet.start_operator_with(&console_flags.iter().map(String::as_str).collect::<Vec<_>>());
    fleet.wait_ready_hosts(&client, 1).await;
    let ns = namespace(&client, "faults").await;
    _guests = GuestsOf::new(&uri, &ns);
    let servers: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    for (name, side) in [("a", "a"), ("b", "b")] {
        apply_server(&servers, name, &pool, json!({"boot": {"image": "net"}})).await;
        let labelled = json!({"metadata": {"labels": {"side": side}}});
        servers.patch(name, &PatchParams::default(), &Patch::Merge(&labelled)).await.expect("label");
    }
    let mut ready = Vec::new();
    for name in ["a", "b"] {
        ready.push(
            fleet
                .wait_server(&servers, name, "to run", DEADLINE, |s| {
                    s.is_ready() && s.status.as_ref().is_some_and(|st| st.address.is_some())
                })
                .await,
        );
    }
    let b_address = ready[1].status.as_ref().and_then(|s| s.address.clone()).expect("b's address");
    let b_uid = ready[1].metadata.uid.clone().expect("uid");
    wait_available(DEADLINE).await;
    let a = Session::start(&["covi", "console", "a", "-n", &ns]);
    let mut n = 0;
    ping_until(&a, &b_address, true, &mut n, "a to reach b (both guests booting)").await;

    // Only users with RBAC on Disruptions in the namespace may disrupt it.
    let eve: Api<Disruption> = Api::namespaced(client_as("eve", &[]).await, &ns);
    let object: Disruption = serde_json::from_value(json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "Disruption", "metadata": {"name": "eve"},
        "spec": {"selector": {"names": ["a"]}, "fault": {"kind": "Kill"}, "duration": "1m"},
    }))
    .expect("disruption");
    let refused = eve.create(&PostParams::default(), &object).await;
    assert!(matches!(&refused, Err(kube::Error::Api(e)) if e.code == 403), "eve may not disrupt: {refused:?}");

    let disruptions: Api<Disruption> = Api::namespaced(client.clone(), &ns);
    // A partition between the sides: no traffic until its window ends.
    let split = json!({
        "selector": {"matchLabels": {"side": "a"}},
        "fault": {"kind": "Partition", "partition": {"from": {"matchLabels": {"side": "b"}}}},
        "duration": "25s",
    });
    disrupt(&disruptions, "split", split.clone()).await;
    target_state(&disruptions, "split", "a", TargetState::Applied).await;
    assert!(partition_table(), "covi's nftables table is in place");
    ping_until(&a, &b_address, false, &mut n, "the partition to cut a from b").await;
    target_state(&disruptions, "split", "a", TargetState::Removed).await;
    ping_until(&a, &b_address, true, &mut n, "traffic to flow again once the window ended").await;
    assert!(!partition_table(), "the table is gone with the last partition");
    disruptions.delete("split", &DeleteParams::default()).await.expect("delete");

    // A link down on b: no traffic; deleting the Disruption ends it at once.
    disrupt(
        &disruptions,
        "unplug",
        json!({"selector": {"names": ["b"]}, "fault": {"kind": "LinkDown"}, "duration": "10m"}),
    )
    .await;
    target_state(&disruptions, "unplug", "b", TargetState::Applied).await;
    ping_until(&a, &b_address, false, &mut n, "b's link to go down").await;
    disruptions.delete("unplug", &DeleteParams::default()).await.expect("delete");
    ping_until(&a, &b_address, true, &mut n, "b's link to come back once the Disruption is gone").await;

    // A delay on the traffic to b shows in a's round trips; where the kernel has no
    // netem (this test machine's), the Disruption says so instead.
    disrupt(&disruptions, "slow", json!({"selector": {"names": ["b"]}, "fault": {"kind": "Network", "network": {"delay": "200ms"}}, "duration": "10m"})).await;
    if netem() {
        target_state(&disruptions, "slow", "b", TargetState::Applied).await;
        let rtt = round_trip(&a, &b_address, &mut n).await;
        assert!(rtt >= 200.0, "round trips to b take the 200 ms delay: {rtt} ms");
    } else {
        let message = target_state(&disruptions, "slow", "b", TargetState::Failed).await;
        assert!(message.contains("netem") && message.contains("Specified qdisc kind is unknown"), "{message}");
    }
    disruptions.delete("slow", &DeleteParams::default()).await.expect("delete");

    // A pause stops b until its window ends; then it runs on and answers again.
    disrupt(&disruptions, "nap", json!({"selector": {"names": ["b"]}, "fault": {"kind": "Pause"}, "duration": "20s"}))
        .await;
    target_state(&disruptions, "nap", "b", TargetState::Applied).await;
    let paused = conn.lookup_domain_by_uuid_string(&b_uid).expect("b").info().expect("info").state;
    assert!(
        matches!(paused, virt::enumutil::Enum::Known(virt::domain::DomainState::Paused)),
        "b is paused: {paused:?}"
    );
    assert_eq!(ping(&a, &b_address, &mut n).await, Some(false), "a paused guest does not answer:\n{}", a.output());
    target_state(&disruptions, "nap", "b", TargetState::Removed).await;
    let running = conn.lookup_domain_by_uuid_string(&b_uid).expect("b").info().expect("info").state;
    assert!(
        matches!(running, virt::enumutil::Enum::Known(virt::domain::DomainState::Running)),
        "b runs again: {running:?}"
    );
    ping_until(&a, &b_address, true, &mut n, "b to answer after its pause").await;

    // A kill destroys b once; its run policy (Running) brings it back.
    let before = conn.lookup_domain_by_uuid_string(&b_uid).expect("b").id().expect("a running domain has an id");
    disrupt(&disruptions, "cut", json!({"selector": {"names": ["b"]}, "fault": {"kind": "Kill"}, "duration": "5m"}))
        .await;
    let message = target_state(&disruptions, "cut", "b", TargetState::Applied).await;
    assert!(message.contains("killed"), "{message}");
    wait_until("b to come back by its run policy", DEADLINE, || async {
        let dom = conn.lookup_domain_by_uuid_string(&b_uid).ok()?;
        (dom.is_active().ok()? && dom.id()? != before).then_some(())
    })
    .await;
    ping_until(&a, &b_address, true, &mut n, "b to answer after it was killed and restarted").await;
    let again = conn.lookup_domain_by_uuid_string(&b_uid).expect("b").id().expect("a running domain has an id");
    disruptions.delete("cut", &DeleteParams::default()).await.expect("delete");

    // Mid-fault, the agent dies with kill -9 and the Disruptions are deleted meanwhile:
    // the faults outlive the agent, and the next agent finds and removes them.
    let mut split = split;
    split["duration"] = json!("10m");
    disrupt(&disruptions, "split", split).await;
    disrupt(&disruptions, "slow", json!({"selector": {"names": ["b"]}, "fault": {"kind": "Network", "network": {"rateKbit": 800}}, "duration": "10m"})).await;
    disrupt(
        &disruptions,
        "unplug",
        json!({"selector": {"names": ["b"]}, "fault": {"kind": "LinkDown"}, "duration": "10m"}),
    )
    .await;
    for (name, server) in [("split", "a"), ("slow", "b"), ("unplug", "b")] {
        target_state(&disruptions, name, server, TargetState::Applied).await;
    }
    let taps = interfaces(&conn, &b_uid);
    assert!(
        !taps.is_empty() && taps.iter().all(|t| covi_qdisc(t) && !link_up(t)),
        "b's links are down and shaped: {taps:?}"
    );
    fleet.agents[agent].kill();
    for name in ["split", "slow", "unplug"] {
        disruptions.delete(name, &DeleteParams::default()).await.expect("delete");
    }
    assert!(partition_table() && taps.iter().all(|t| covi_qdisc(t)), "the faults outlive the killed agent");
    fleet.agents[agent].start();
    wait_until("the restarted agent to remove every fault it has no Disruption for", DEADLINE, || async {
        let clean = !partition_table() && taps.iter().all(|t| !covi_qdisc(t) && link_up(t));
        clean.then_some(())
    })
    .await;
    let id = conn.lookup_domain_by_uuid_string(&b_uid).expect("b").id().expect("a running domain has an id");
    assert_eq!(id, again, "the guests kept running through the agent's restart");
    // The console went through the killed agent: a new session, through the new one.
    let a = Session::start(&["covi", "console", "a", "-n", &ns]);
    ping_until(&a, &b_address, true, &mut n, "traffic to flow after the cleanup").await;
}
