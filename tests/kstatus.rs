//! Flux reads covi's resources through kstatus (sigs.k8s.io/cli-utils): InProgress
//! while covi has not observed the spec or Ready is not True, Current when Ready,
//! Failed when Stalled. `covi-kstatus` (hack/kstatus, built by hack/build-tools.sh)
//! runs the library itself on live objects of the test bed.

use std::process::Command;
use std::time::Duration;

use covi_api::{VirtualServer, VmRequest};
use covi_tests::fleet::Fleet;
use covi_tests::fleet::apply_server;
use covi_tests::guests::ready;
use covi_tests::{FIELD_MANAGER, admin, install_crds, namespace, poll};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);
const GROUP: &str = "covi.io/v1alpha1";

/// What kstatus computes for one object: (status, message).
fn kstatus(resource: &str, name: &str) -> (String, String) {
    let kubeconfig = std::env::var("KUBECONFIG").expect("the test bed sets KUBECONFIG");
    let out = Command::new("covi-kstatus")
        .args(["--kubeconfig", &kubeconfig, &format!("{GROUP}/{resource}"), name])
        .output()
        .expect("covi-kstatus runs (hack/build-tools.sh builds it; hack/test.sh puts it on PATH)");
    assert!(out.status.success(), "covi-kstatus failed: {}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("covi-kstatus prints JSON");
    (answer["status"].as_str().unwrap_or_default().into(), answer["message"].as_str().unwrap_or_default().into())
}

/// Waits until kstatus says `want` for the object; the panic shows what it said last.
async fn wait_kstatus(resource: &str, name: &str, want: &str) -> String {
    let mut last = (String::new(), String::new());
    let found = poll(DEADLINE, || {
        last = kstatus(resource, name);
        let hit = (last.0 == want).then(|| last.1.clone());
        async move { hit }
    })
    .await;
    found.unwrap_or_else(|| panic!("kstatus of {resource} {name}: wanted {want}, last said {} ({})", last.0, last.1))
}

#[tokio::test]
async fn kstatus_reads_servers_pools_hosts_and_requests() {
    let client = admin().await;
    install_crds(&client).await;
    let mut fleet = Fleet::new(&client, "kstatus").await;
    // Short timings, so the lost host below is declared lost within seconds.
    let timings =
        json!({"failover": {"renewSeconds": 1, "leaseDurationSeconds": 4, "fenceAfterSeconds": 2, "graceSeconds": 1}});
    let pool = fleet.apply_pool(&client, timings).await;
    fleet.start_operator();
    let ns = namespace(&client, "kstatus").await;
    let servers: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    let web = format!("{ns}/web");

    // No host yet: the pool is not Ready and the server waits for room.
    wait_kstatus("hostpools", &pool, "InProgress").await;
    apply_server(&servers, "web", &pool, json!({"boot": {"image": "debian-12"}})).await;
    let pending = wait_kstatus("virtualservers", &web, "InProgress").await;
    assert!(!ready(&servers.get("web").await.unwrap()), "InProgress while not Ready ({pending})");

    // A host arrives: the server is bound, converged and Ready, and only then Current.
    fleet.start_agent(1, 8, 16);
    let host = fleet.host_name(1);
    wait_kstatus("virtualservers", &web, "Current").await;
    assert!(ready(&servers.get("web").await.unwrap()), "Current only once Ready");
    wait_kstatus("hostpools", &pool, "Current").await;
    wait_kstatus("hosts", &host, "Current").await;

    // An image the pool does not carry: Stalled, so Failed, with the reason.
    apply_server(&servers, "old", &pool, json!({"boot": {"image": "windows-95"}})).await;
    let failed = wait_kstatus("virtualservers", &format!("{ns}/old"), "Failed").await;
    assert!(failed.contains("windows-95"), "the message says why: {failed}");

    // Requests: waiting for an approver is InProgress, denied is Failed, approved and
    // fulfilled is Current.
    let requests: Api<VmRequest> = Api::namespaced(client.clone(), &ns);
    for name in ["denied", "approved"] {
        let request = json!({"apiVersion": "covi.io/v1alpha1", "kind": "VmRequest", "metadata": {"name": name},
            "spec": {"replicas": 1, "reason": "kstatus test", "requester": "covi-admin",
                     "template": {"spec": {"hostPool": pool, "class": "small", "boot": {"image": "debian-12"},
                                           "owner": "team-test", "purpose": "requested"}}}});
        requests.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&request)).await.unwrap();
        wait_kstatus("vmrequests", &format!("{ns}/{name}"), "InProgress").await;
    }
    let decide = |type_: &str, message: &str| {
        json!({"apiVersion": "covi.io/v1alpha1", "kind": "VmRequest", "status": {"conditions": [{
            "type": type_, "status": "True", "reason": "ByTest", "message": message,
            "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    };
    let approver = PatchParams::apply("approver").force();
    requests.patch_status("denied", &approver, &Patch::Apply(decide("Denied", "not this quarter"))).await.unwrap();
    let denied = wait_kstatus("vmrequests", &format!("{ns}/denied"), "Failed").await;
    assert!(denied.contains("not this quarter"), "{denied}");
    requests.patch_status("approved", &approver, &Patch::Apply(decide("Approved", "go"))).await.unwrap();
    wait_kstatus("vmrequests", &format!("{ns}/approved"), "Current").await;
    let list = servers.list(&Default::default()).await.expect("servers");
    let mine: Vec<_> =
        list.items.iter().filter(|s| s.metadata.name.as_deref().is_some_and(|n| n.starts_with("approved-"))).collect();
    assert_eq!(mine.len(), 1, "the request's one server");
    assert!(ready(mine[0]), "the request is Current once its server is Ready");

    // Losing the host: it is Failed (Stalled, HostLost) until it renews again.
    fleet.agents[0].kill();
    let lost = wait_kstatus("hosts", &host, "Failed").await;
    assert!(lost.contains("lost"), "{lost}");
    fleet.agents[0].start();
    wait_kstatus("hosts", &host, "Current").await;
}
