//! The serial console end to end, on a real QEMU/TCG guest (hack/guest.sh) that echoes
//! every line its console receives: `kubectl covi console` goes through the real API
//! server's aggregation layer (authentication, RBAC on `virtualservers/console`),
//! covi-operator (the front proxy's client certificate, a SubjectAccessReview) and the
//! host's agent (mutual TLS) to libvirt's console of the guest. A line typed comes back
//! from the guest; a user without the permission is refused with a clear message.

use std::time::Duration;

use covi_api::VirtualServer;
use covi_tests::console::{Session, apply, front_door, wait_available};
use covi_tests::fleet::Fleet;
use covi_tests::guests::{GuestsOf, apply_server, fixtures_in, guest_files, qemu_pool};
use covi_tests::{SERIAL, admin, install_crds, kubectl_covi, namespace, wait_until};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::json;

const STORAGE_POOL: &str = "covi-test-console";
/// Under TCG a Debian kernel takes tens of seconds to reach its init.
const DEADLINE: Duration = Duration::from_secs(180);
#[tokio::test]
async fn a_user_types_into_a_guests_console_and_one_without_the_permission_is_refused() {
    let _turn = SERIAL.lock().await;
    let uri = std::env::var("COVI_QEMU_URI").expect("COVI_QEMU_URI: run through hack/test.sh");
    let conn = virt::connect::Connect::open(Some(&uri)).expect("libvirt");
    fixtures_in(&conn, STORAGE_POOL, "/var/lib/covi-test/console-pool");
    let (kernel, initrd) = guest_files();
    let client = admin().await;
    install_crds(&client).await;
    // Declared before the fleet: its guests go after the agent that would restart them.
    let _guests;
    let mut fleet = Fleet::new(&client, "console").await;

    // The operator serves the console behind the API server, on the node's address.
    let (_unregister, console_flags) = front_door(&client, &fleet).await;

    let mut pool_spec = qemu_pool(STORAGE_POOL, false);
    pool_spec["images"] = json!([
        {"name": "echo", "volume": "tiny.img", "kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 covi.guest=idle"},
    ]);
    let pool = fleet.apply_pool(&client, pool_spec).await;
    fleet.start_agent_uri(1, &uri, &["--console-addr=127.0.0.1:0", "--stop-grace-seconds=3"]);
    fleet.start_operator_with(&console_flags.iter().map(String::as_str).collect::<Vec<_>>());
    fleet.wait_ready_hosts(&client, 1).await;
    let ns = namespace(&client, "console").await;
    _guests = GuestsOf::new(&uri, &ns);
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    apply_server(&api, "web", &pool, json!({"boot": {"image": "echo"}})).await;
    fleet.wait_server(&api, "web", "to run", DEADLINE, |s| s.is_ready()).await;

    // The API server takes the console API as available once the operator answers it
    // over TLS its caBundle vouches for, to the front proxy's client certificate.
    wait_available(DEADLINE).await;

    // carol may open consoles in the namespace; eve may not.
    apply(&client, ("rbac.authorization.k8s.io", "v1", "Role"), "roles", Some(&ns), json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "console"},
        "rules": [{"apiGroups": ["subresources.covi.io"], "resources": ["virtualservers/console"], "verbs": ["get"]}],
    }))
    .await;
    apply(
        &client,
        ("rbac.authorization.k8s.io", "v1", "RoleBinding"),
        "rolebindings",
        Some(&ns),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "console"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "console"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "carol"}],
        }),
    )
    .await;

    let (ok, out) = kubectl_covi(&["covi", "console", "web", "-n", &ns, "--as=eve"]);
    assert!(!ok, "eve is refused:\n{out}");
    assert!(
        out.contains("you may not open the console of virtualserver")
            && out.contains("User \"eve\" cannot get resource \"virtualservers/console\""),
        "the refusal says who may not do what:\n{out}"
    );

    // carol types a line until the guest (booting meanwhile) echoes one back.
    let first = Session::start(&["covi", "console", "web", "-n", &ns, "--as=carol"]);
    let echoed = first.echo("hello from carol", DEADLINE).await;
    println!("the guest answered: {echoed}");

    // One session at a time: a second is refused, and told how to take over.
    let (ok, out) = kubectl_covi(&["covi", "console", "web", "-n", &ns, "--as=carol"]);
    assert!(!ok && out.contains("another session holds the console") && out.contains("--force"), "{out}");
    // --force takes the console over; the first session ends, saying why.
    let second = Session::start(&["covi", "console", "web", "-n", &ns, "--as=carol", "--force"]);
    second.echo("taken over", DEADLINE).await;
    let (status, out) = first.ended().await;
    assert!(!status.success() && out.contains("the console closed on the host"), "{status:?}:\n{out}");

    // Ctrl-] ends the session, and kubectl covi exits cleanly.
    second.type_bytes(&[covi_tests::console::ESCAPE]).await;
    let (status, out) = second.ended().await;
    assert!(status.success(), "exit {status:?}:\n{out}");

    let (ok, out) = kubectl_covi(&["covi", "console", "nosuch", "-n", &ns, "--as=carol"]);
    assert!(!ok && out.contains("virtualservers.covi.io \"nosuch\" not found"), "{out}");

    // Who opened the console is on record on the server.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    wait_until("a ConsoleOpened Event naming carol", Duration::from_secs(30), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("ConsoleOpened")
                && e.message.as_deref().is_some_and(|m| m.starts_with("carol opened"))
        })
    })
    .await;
}
