//! Requests: approval, the servers a request owns, scaling, fulfilment and expiry,
//! with the real operator and agents.

use std::collections::BTreeSet;
use std::time::Duration;

use covi_api::condition::find_condition;
use covi_api::vm_request::VmRequestPhase;
use covi_api::{VirtualServer, VmRequest};
use covi_tests::fleet::Fleet;
use covi_tests::{FIELD_MANAGER, admin, client_as, install_crds, kubectl, kubectl_covi, namespace, wait_until};
use k8s_openapi::api::core::v1::Event;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use covi_tests::SERIAL;
const DEADLINE: Duration = Duration::from_secs(45);

struct Scene {
    client: Client,
    _fleet: Fleet,
    pool: String,
    ns: String,
    requests: Api<VmRequest>,
    servers: Api<VirtualServer>,
}

async fn scene(id: &str, approval: Value) -> Scene {
    scene_in(id, |_| approval.clone()).await
}

/// A scene whose pool's approval policy may name the test's namespace.
async fn scene_in(id: &str, approval: impl Fn(&str) -> Value) -> Scene {
    let client = admin().await;
    install_crds(&client).await;
    let ns = namespace(&client, id).await;
    let mut fleet = Fleet::new(&client, id).await;
    let pool = fleet.apply_pool(&client, json!({"approval": approval(&ns)})).await;
    fleet.start_agent(1, 16, 32);
    fleet.start_agent(2, 16, 32);
    fleet.start_operator();
    fleet.wait_pool_ready(&client, &pool, 2).await;
    Scene {
        requests: Api::namespaced(client.clone(), &ns),
        servers: Api::namespaced(client.clone(), &ns),
        client,
        _fleet: fleet,
        pool,
        ns,
    }
}

impl Scene {
    async fn request(&self, name: &str, replicas: i32, lifetime: Option<&str>) {
        let mut spec = json!({
            "replicas": replicas, "reason": "integration test", "requester": "covi-admin",
            "template": {"metadata": {"labels": {"app": name}}, "spec": {
                "hostPool": self.pool, "class": "small", "boot": {"image": "debian-12"},
                "owner": "team-test", "purpose": "requested in a test"
            }}
        });
        if let Some(l) = lifetime {
            spec["lifetime"] = json!(l);
        }
        let body =
            json!({"apiVersion": "covi.io/v1alpha1", "kind": "VmRequest", "metadata": {"name": name}, "spec": spec});
        self.requests
            .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
            .await
            .expect("apply request");
    }

    async fn wait_request(&self, name: &str, what: &str, check: impl Fn(&VmRequest) -> bool) -> VmRequest {
        wait_until(&format!("request {name} {what}"), DEADLINE, || async {
            let r = self.requests.get_opt(name).await.ok()??;
            check(&r).then_some(r)
        })
        .await
    }

    async fn server_names(&self, request: &str) -> BTreeSet<String> {
        let list = self
            .servers
            .list(&ListParams::default().labels(&format!("covi.io/request={request}")))
            .await
            .expect("list");
        list.items
            .into_iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter_map(|s| s.metadata.name)
            .collect()
    }

    async fn events(&self, name: &str) -> BTreeSet<String> {
        covi_tests::events::of(&self.client, &self.ns, name).await.into_iter().map(|(reason, _)| reason).collect()
    }

    /// The reasons of `name`'s Events once all of `wanted` are there, or as they are at
    /// the deadline.
    async fn events_including(&self, name: &str, wanted: &[&str]) -> BTreeSet<String> {
        covi_tests::events::reasons_including(&self.client, &self.ns, name, DEADLINE, wanted)
            .await
            .into_iter()
            .collect()
    }
}

fn phase(r: &VmRequest) -> Option<VmRequestPhase> {
    r.status.as_ref().and_then(|s| s.phase)
}

fn condition(r: &VmRequest, type_: &str) -> Option<covi_api::Condition> {
    r.status.as_ref().and_then(|s| find_condition(&s.conditions, type_).cloned())
}

#[tokio::test]
async fn an_approved_request_creates_its_servers_and_is_fulfilled() {
    let _turn = SERIAL.lock().await;
    let s = scene("approve", json!({})).await;
    s.request("web", 2, None).await;
    s.wait_request("web", "to wait for approval", |r| phase(r) == Some(VmRequestPhase::Pending)).await;
    assert!(s.server_names("web").await.is_empty(), "nothing is created before approval");

    // An approver approves through the status subresource, under their own field manager.
    let bob = client_as("bob", &["system:masters"]).await;
    let approval = json!({"apiVersion": "covi.io/v1alpha1", "kind": "VmRequest", "status": {"conditions": [{
        "type": "Approved", "status": "True", "reason": "ApprovedByBob", "message": "go ahead",
        "observedGeneration": 1, "lastTransitionTime": "2026-11-27T00:00:00Z"}]}});
    Api::<VmRequest>::namespaced(bob, &s.ns)
        .patch_status("web", &PatchParams::apply("bob").force(), &Patch::Apply(&approval))
        .await
        .expect("approve");

    let r = s.wait_request("web", "to be fulfilled", |r| phase(r) == Some(VmRequestPhase::Fulfilled)).await;
    let st = r.status.clone().unwrap();
    assert_eq!((st.replicas, st.ready_replicas), (2, 2));
    assert_eq!(st.selector.as_deref(), Some("covi.io/request=web"));
    assert_eq!(condition(&r, "Fulfilled").map(|c| c.status), Some("True".into()));
    assert_eq!(
        condition(&r, "Approved").map(|c| c.reason),
        Some("ApprovedByBob".into()),
        "the approver's condition is kept"
    );
    assert_eq!(s.server_names("web").await, ["web-0", "web-1"].map(String::from).into());
    let server = s.servers.get("web-0").await.expect("server");
    assert_eq!(server.metadata.labels.unwrap().get("app").map(String::as_str), Some("web"));
    let events = s.events_including("web", &["Approved", "Provisioning", "Fulfilled"]).await;
    for reason in ["Approved", "Provisioning", "Fulfilled"] {
        assert!(events.contains(reason), "missing Event {reason}: {events:?}");
    }
    // A request's servers bound together are one Scheduled Event on the request, naming
    // each server and its host, not one per server; each server keeps its agent's.
    let api: Api<Event> = Api::namespaced(s.client.clone(), &s.ns);
    let notes = wait_until("the request's Scheduled Event", DEADLINE, || async {
        let fields = ListParams::default().fields("involvedObject.name=web,reason=Scheduled");
        let notes: Vec<String> = api.list(&fields).await.ok()?.items.into_iter().filter_map(|e| e.message).collect();
        let all = notes.join("\n");
        (all.contains("web-0 on ") && all.contains("web-1 on ")).then_some(notes)
    })
    .await;
    assert!(notes.iter().all(|n| n.starts_with("scheduled ")), "{notes:?}");
    let server_events = wait_until("web-0's Started Event", DEADLINE, || async {
        let events = s.events("web-0").await;
        events.contains("Started").then_some(events)
    })
    .await;
    assert!(!server_events.contains("Scheduled"), "no per-server Scheduled Event: {server_events:?}");
}

#[tokio::test]
async fn auto_approval_within_policy_and_a_larger_request_waits() {
    let _turn = SERIAL.lock().await;
    // A local listener stands in for the team's chat hook.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listener");
    let hook = format!("http://{}/covi", listener.local_addr().expect("addr"));
    let received = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut conn, _) = listener.accept().await.expect("a webhook call");
        let mut buf = vec![0u8; 16384];
        let mut text = String::new();
        while !text.contains("\r\n\r\n") || !text.trim_end().ends_with('}') {
            let n = conn.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await.expect("answer");
        text
    });
    let s = scene("auto", json!({"autoApprove": {"maxServers": 2, "maxCpus": 4}, "webhookUrl": hook})).await;
    s.request("small", 2, None).await;
    s.request("large", 3, None).await;
    let r = s.wait_request("small", "to be fulfilled", |r| phase(r) == Some(VmRequestPhase::Fulfilled)).await;
    assert_eq!(condition(&r, "Approved").map(|c| c.reason), Some("AutoApproved".into()));
    let call = tokio::time::timeout(DEADLINE, received).await.expect("the webhook was called").expect("listener");
    assert!(call.starts_with("POST /covi HTTP/1.1"), "{call}");
    let body: Value = serde_json::from_str(call.split("\r\n\r\n").nth(1).expect("body")).expect("JSON body");
    assert_eq!((body["event"].as_str(), body["request"].as_str()), (Some("Fulfilled"), Some("small")));
    assert_eq!(body["servers"].as_array().map(Vec::len), Some(2));
    let large = s.wait_request("large", "to wait for a person", |r| phase(r) == Some(VmRequestPhase::Pending)).await;
    assert!(condition(&large, "Approved").is_none());
    assert!(s.server_names("large").await.is_empty());
}

/// A webhook that accepts and never answers holds up nothing: while covi still waits
/// for it, a new server is scheduled.
#[tokio::test]
async fn a_hanging_webhook_holds_up_no_pass() {
    let _turn = SERIAL.lock().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listener");
    let hook = format!("http://{}/covi", listener.local_addr().expect("addr"));
    let s = scene("hook", json!({"autoApprove": {"maxServers": 2}, "webhookUrl": hook})).await;
    s.request("notified", 1, None).await;
    // covi calls on Fulfilled; the call is held open, unanswered.
    let (mut held, _) =
        tokio::time::timeout(DEADLINE, listener.accept()).await.expect("a webhook call").expect("accept");
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16384];
    let mut call = String::new();
    while !call.contains("\r\n\r\n") || !call.trim_end().ends_with('}') {
        let n = held.read(&mut buf).await.expect("read the call");
        assert!(n > 0, "covi hung up before sending its call: {call}");
        call.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let image = json!({"boot": {"image": "debian-12"}});
    covi_tests::guests::apply_server(&s.servers, "meanwhile", &s.pool, image).await;
    wait_until("a server to be scheduled while the webhook hangs", DEADLINE, || async {
        let server = s.servers.get_opt("meanwhile").await.ok()??;
        server.status?.host.map(|_| ())
    })
    .await;
    // Still waiting for an answer: covi has not given up on the call (its deadline is 5 s).
    let still_open = tokio::time::timeout(Duration::from_millis(50), held.read(&mut buf)).await;
    assert!(still_open.is_err(), "the webhook call was over before the server was scheduled: the pass waited for it");
}

#[tokio::test]
async fn scaling_keeps_the_right_servers_and_deleting_returns_them_all() {
    let _turn = SERIAL.lock().await;
    let s = scene("scale", json!({"autoApprove": {"maxServers": 10}})).await;
    s.request("burst", 1, None).await;
    s.wait_request("burst", "to be fulfilled", |r| phase(r) == Some(VmRequestPhase::Fulfilled)).await;

    let (ok, out) = kubectl(&["scale", "-n", &s.ns, "vmrequest/burst", "--replicas=5"]);
    assert!(ok, "{out}");
    s.wait_request("burst", "to be fulfilled with 5", |r| {
        phase(r) == Some(VmRequestPhase::Fulfilled) && r.status.as_ref().is_some_and(|st| st.ready_replicas == 5)
    })
    .await;
    assert_eq!(s.server_names("burst").await.len(), 5);

    let (ok, out) = kubectl(&["scale", "-n", &s.ns, "vmrequest/burst", "--replicas=2"]);
    assert!(ok, "{out}");
    wait_until("the three newest servers to be gone", DEADLINE, || async {
        let all = s.servers.list(&ListParams::default().labels("covi.io/request=burst")).await.ok()?;
        let names: BTreeSet<String> = all.items.into_iter().filter_map(|x| x.metadata.name).collect();
        (names == ["burst-0", "burst-1"].map(String::from).into()).then_some(())
    })
    .await;

    s.requests.delete("burst", &DeleteParams::foreground()).await.expect("delete request");
    wait_until("every server of the request to be gone", DEADLINE, || async {
        let all = s.servers.list(&ListParams::default().labels("covi.io/request=burst")).await.ok()?;
        all.items.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_short_lifetime_warns_then_expires_and_keeps_the_request() {
    let _turn = SERIAL.lock().await;
    let s = scene("expiry", json!({"autoApprove": {"maxServers": 5}})).await;
    s.request("trial", 2, Some("8s")).await;
    let r = s.wait_request("trial", "to be fulfilled", |r| phase(r) == Some(VmRequestPhase::Fulfilled)).await;
    let expires = r.status.unwrap().expires_at.expect("the lifetime starts at fulfilment");
    // `kubectl get` shows when, not "<invalid>" (what a date column shows for the future).
    let (ok, table) = kubectl(&["get", "vmrequest", "trial", "-n", &s.ns]);
    assert!(ok, "{table}");
    assert!(table.contains(&expires.0.to_string()) && !table.contains("<invalid>"), "{table}");
    let r = s.wait_request("trial", "to expire", |r| phase(r) == Some(VmRequestPhase::Expired)).await;
    assert_eq!(condition(&r, "Expired").map(|c| c.status), Some("True".into()));
    wait_until("its servers to be gone", DEADLINE, || async {
        let all = s.servers.list(&ListParams::default().labels("covi.io/request=trial")).await.ok()?;
        all.items.is_empty().then_some(())
    })
    .await;
    // Events are posted after the status write that they describe: wait for them.
    let seen = covi_tests::poll(DEADLINE, || async {
        let events = s.events("trial").await;
        (events.contains("ExpiringSoon") && events.contains("Expired")).then_some(())
    })
    .await;
    assert!(seen.is_some(), "ExpiringSoon and Expired Events; seen: {:?}", s.events("trial").await);
    assert!(s.requests.get_opt("trial").await.expect("get").is_some(), "the request is kept for the record");
}

/// Removes covi's admission policies when dropped, so other tests in this test bed
/// are not subject to them.
struct Policies;

impl Policies {
    fn install() -> Policies {
        let root = covi_tests::repo_root();
        for file in [
            "deploy/base/namespace.yaml",
            "deploy/base/policies.yaml",
            "deploy/base/rbac.yaml",
            "deploy/base/roles.yaml",
        ] {
            let (ok, out) = kubectl(&["apply", "--server-side", "-f", &root.join(file).display().to_string()]);
            assert!(ok, "applying {file}: {out}");
        }
        Policies
    }
}

impl Drop for Policies {
    fn drop(&mut self) {
        let dir = covi_tests::repo_root().join("deploy/base/policies.yaml").display().to_string();
        let _ = kubectl(&["delete", "--ignore-not-found", "-f", &dir]);
    }
}

async fn bind(client: &Client, ns: &str, user: &str, role: &str, kind: &str) {
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{user}-{role}"), "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))
    .expect("binding");
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(client.clone(), ns)
        .create(&Default::default(), &binding)
        .await
        .expect("create binding");
}

/// A request `name` for `replicas` small servers of `pool`, made by user `requester`.
fn request_by(requester: &str, name: &str, pool: &str, replicas: i32) -> Value {
    json!({"apiVersion": "covi.io/v1alpha1", "kind": "VmRequest", "metadata": {"name": name}, "spec": {
        "replicas": replicas, "reason": "requested in a test", "requester": requester,
        "template": {"spec": {"hostPool": pool, "class": "small", "boot": {"image": "debian-12"},
                              "owner": requester, "purpose": "a test"}}
    }})
}

/// A decision for generation 1, a request as created.
fn approval(type_: &str, reason: &str) -> Value {
    decision_for(type_, reason, 1)
}

fn decision_for(type_: &str, reason: &str, generation: i64) -> Value {
    json!({"apiVersion": "covi.io/v1alpha1", "kind": "VmRequest", "status": {"conditions": [{
        "type": type_, "status": "True", "reason": reason, "message": "decided in a test",
        "observedGeneration": generation, "lastTransitionTime": "2026-11-27T00:00:00Z"}]}})
}

#[tokio::test]
async fn only_an_approver_who_is_not_the_requester_can_approve() {
    let _turn = SERIAL.lock().await;
    let s = scene("approvers", json!({})).await;
    let _policies = Policies::install();
    bind(&s.client, &s.ns, "alice", "covi-requester", "ClusterRole").await;
    bind(&s.client, &s.ns, "alice", "covi-approver", "ClusterRole").await;
    bind(&s.client, &s.ns, "bob", "covi-approver", "ClusterRole").await;
    // carol may write request status but holds no approve verb.
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "status-writer", "namespace": s.ns},
        "rules": [{"apiGroups": ["covi.io"], "resources": ["vmrequests", "vmrequests/status"], "verbs": ["get", "update", "patch"]}]
    }))
    .expect("role");
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(s.client.clone(), &s.ns)
        .create(&Default::default(), &role)
        .await
        .expect("role");
    bind(&s.client, &s.ns, "carol", "status-writer", "Role").await;

    let ns = s.ns.clone();
    let as_user = |user: &'static str| {
        let ns = ns.clone();
        async move { Api::<VmRequest>::namespaced(client_as(user, &[]).await, &ns) }
    };
    let body = |requester: &str| request_by(requester, "db", &s.pool, 1);
    let alice = as_user("alice").await;
    // The policy is active once a forged requester is refused (policies load asynchronously).
    let forged = wait_until("the requester policy to refuse a forged requester", DEADLINE, || async {
        match alice.patch("db", &PatchParams::apply("alice"), &Patch::Apply(&body("mallory"))).await {
            Err(kube::Error::Api(status)) if status.code == 403 || status.code == 422 => Some(status.message),
            Ok(_) => {
                let _ = alice.delete("db", &DeleteParams::default()).await;
                None
            }
            Err(_) => None,
        }
    })
    .await;
    assert!(forged.contains("spec.requester must be the user creating the request: alice"), "{forged}");
    alice
        .patch("db", &PatchParams::apply("alice"), &Patch::Apply(&body("alice")))
        .await
        .expect("alice requests for herself");
    // The approval policy loads on its own, after the requester policy or not: it is in
    // force once alice's self-approval is refused, tried as a dry run so that an early
    // one changes nothing.
    let dry_run = PatchParams::apply("alice").force().dry_run();
    wait_until("the approval policy to refuse a self-approval", DEADLINE, || async {
        match alice.patch_status("db", &dry_run, &Patch::Apply(&approval("Approved", "Mine"))).await {
            Err(kube::Error::Api(status)) if status.code == 403 || status.code == 422 => Some(()),
            _ => None,
        }
    })
    .await;

    let refused = |r: Result<VmRequest, kube::Error>| match r {
        Err(kube::Error::Api(status)) => status.message,
        Ok(_) => panic!("the approval was accepted"),
        Err(e) => panic!("unexpected error {e}"),
    };
    let own = alice
        .patch_status("db", &PatchParams::apply("alice").force(), &Patch::Apply(&approval("Approved", "Mine")))
        .await;
    assert!(refused(own).contains("a requester cannot approve or deny their own request"));
    let carol = as_user("carol").await;
    let unauthorised = carol
        .patch_status("db", &PatchParams::apply("carol").force(), &Patch::Apply(&approval("Approved", "Carol")))
        .await;
    let message = refused(unauthorised);
    assert!(
        message.contains("needs the approve verb on vmrequests in namespace") && message.contains("carol"),
        "{message}"
    );
    assert!(s.server_names("db").await.is_empty(), "nothing was created");

    let bob = as_user("bob").await;
    bob.patch_status("db", &PatchParams::apply("bob").force(), &Patch::Apply(&approval("Approved", "ApprovedByBob")))
        .await
        .expect("bob approves");
    s.wait_request("db", "to be fulfilled", |r| phase(r) == Some(VmRequestPhase::Fulfilled)).await;
}

/// A requester approved for 2 servers scales to 4 and edits
/// the template; nothing grows until an approver approves the generation they saw, an
/// approval of an older generation is refused, and scaling down never needs approval.
#[tokio::test]
async fn growing_or_changing_an_approved_request_waits_for_a_new_approval() {
    let _turn = SERIAL.lock().await;
    let s = scene("reapprove", json!({})).await;
    let _policies = Policies::install();
    bind(&s.client, &s.ns, "alice", "covi-requester", "ClusterRole").await;
    bind(&s.client, &s.ns, "bob", "covi-approver", "ClusterRole").await;
    let alice = Api::<VmRequest>::namespaced(client_as("alice", &[]).await, &s.ns);
    let body = request_by("alice", "grow", &s.pool, 2);
    wait_until("alice's request to be admitted", DEADLINE, || async {
        alice.patch("grow", &PatchParams::apply("alice"), &Patch::Apply(&body)).await.ok()
    })
    .await;
    // The approval policy is in force once a probe approval of a generation that never
    // existed is refused (each attempt names another, so an early one cannot stick).
    s.request("probe", 1, None).await;
    let bob = Api::<VmRequest>::namespaced(client_as("bob", &[]).await, &s.ns);
    let mut attempt = 100;
    wait_until("the approval policy to refuse a wrong generation", DEADLINE, || {
        attempt += 1;
        let probe = decision_for("Approved", "Probe", attempt);
        let bob = bob.clone();
        async move {
            match bob.patch_status("probe", &PatchParams::apply("probe").force(), &Patch::Apply(&probe)).await {
                Err(kube::Error::Api(status)) if status.message.contains("only the current one") => Some(()),
                _ => None,
            }
        }
    })
    .await;
    let covi = |args: &[&str]| {
        let mut all = vec!["covi"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-n", &s.ns]);
        kubectl_covi(&all)
    };
    let (ok, out) = covi(&["approve", "grow", "--generation=1", "--as=bob"]);
    assert!(ok, "{out}");
    s.wait_request("grow", "to be fulfilled with 2", |r| phase(r) == Some(VmRequestPhase::Fulfilled)).await;

    // The requester grows the request: it keeps its 2 servers and waits, saying why.
    let (ok, out) = kubectl(&["scale", "-n", &s.ns, "vmrequest/grow", "--replicas=4", "--as=alice"]);
    assert!(ok, "{out}");
    let r = s
        .wait_request("grow", "to wait for re-approval", |r| {
            condition(r, "ApprovalOutdated").is_some_and(|c| c.status == "True")
        })
        .await;
    assert_eq!(phase(&r), Some(VmRequestPhase::Pending));
    let message = condition(&r, "ApprovalOutdated").unwrap().message;
    assert_eq!(
        message,
        "changed since generation 1 was approved: replicas 2 -> 4; an approver must approve generation 2"
    );
    assert_eq!(s.server_names("grow").await.len(), 2, "nothing beyond the approval is created");
    assert!(s.events_including("grow", &["ChangedSinceApproval"]).await.contains("ChangedSinceApproval"));
    let (ok, out) = covi(&["pending"]);
    let row = out.lines().find(|l| l.contains("grow")).unwrap_or_else(|| panic!("not listed:\n{out}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert!(ok && columns[2] == "2" && row.contains("re-approval: changed since generation 1"), "{row}");

    // An approval of what bob saw before the change is refused by the plugin.
    let (ok, out) = covi(&["approve", "grow", "--generation=1", "--as=bob"]);
    assert!(!ok && out.contains("you saw generation 1, it is now at 2"), "{out}");

    // A template change is another change to approve. bob, who read generation 2, writes
    // his approval by hand after it: the policy refuses it.
    let relabel = json!({"spec": {"template": {"metadata": {"labels": {"tier": "web"}}}}});
    alice.patch("grow", &PatchParams::default(), &Patch::Merge(&relabel)).await.expect("alice edits the template");
    let r = s
        .wait_request("grow", "to name the template change", |r| {
            condition(r, "ApprovalOutdated").is_some_and(|c| c.message.contains("template.metadata changed"))
        })
        .await;
    assert_eq!(r.metadata.generation, Some(3));
    let stale = bob
        .patch_status("grow", &PatchParams::apply("bob").force(), &Patch::Apply(&decision_for("Approved", "Seen", 2)))
        .await;
    let refusal = match stale {
        Err(kube::Error::Api(status)) => status.message,
        other => panic!("a stale approval was accepted: {other:?}"),
    };
    assert!(refusal.contains("only the current one, 3"), "{refusal}");
    assert_eq!(s.server_names("grow").await.len(), 2);
    let (ok, out) = covi(&["approve", "grow", "--generation=3", "--as=bob"]);
    assert!(ok, "{out}");
    s.wait_request("grow", "to be fulfilled with 4", |r| {
        phase(r) == Some(VmRequestPhase::Fulfilled) && r.status.as_ref().is_some_and(|st| st.ready_replicas == 4)
    })
    .await;

    // Scaling down, and back up within what was approved, needs nobody.
    for (replicas, generation) in [(1, 4), (3, 5)] {
        let (ok, out) =
            kubectl(&["scale", "-n", &s.ns, "vmrequest/grow", &format!("--replicas={replicas}"), "--as=alice"]);
        assert!(ok, "{out}");
        let r = s
            .wait_request("grow", &format!("to be fulfilled with {replicas}"), |r| {
                r.status.as_ref().is_some_and(|st| {
                    st.observed_generation == Some(generation)
                        && st.phase == Some(VmRequestPhase::Fulfilled)
                        && st.replicas == replicas
                })
            })
            .await;
        assert_eq!(condition(&r, "ApprovalOutdated").map(|c| c.status), Some("False".into()));
        assert_eq!(r.status.unwrap().approved.map(|a| (a.generation, a.replicas)), Some((3, 4)));
    }
}

#[tokio::test]
async fn kubectl_covi_lists_approves_and_describes_requests() {
    let _turn = SERIAL.lock().await;
    let s = scene("plugin", json!({})).await;
    s.request("analytics", 1, Some("168h")).await;
    s.wait_request("analytics", "to wait for approval", |r| phase(r) == Some(VmRequestPhase::Pending)).await;

    let (ok, out) = kubectl_covi(&["covi", "pending", "-n", &s.ns]);
    assert!(ok, "{out}");
    let row = out.lines().find(|l| l.contains("analytics")).unwrap_or_else(|| panic!("not listed:\n{out}"));
    assert!(row.contains("covi-admin") && row.contains("integration test"), "{row}");

    // bob approves: an approver who is not the requester.
    let (ok, out) = kubectl_covi(&[
        "covi",
        "approve",
        "analytics",
        "-m",
        "for the quarterly report",
        "-n",
        &s.ns,
        "--as",
        "bob",
        "--as-group",
        "system:masters",
    ]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "vmrequest/analytics approved (generation 1)");
    s.wait_request("analytics", "to be fulfilled", |r| phase(r) == Some(VmRequestPhase::Fulfilled)).await;
    let (ok, out) = kubectl_covi(&["covi", "pending", "-n", &s.ns]);
    assert!(ok && !out.contains("analytics"), "no longer pending:\n{out}");

    let (ok, out) = kubectl_covi(&["covi", "describe", "analytics", "-n", &s.ns]);
    assert!(ok, "{out}");
    for expected in [
        "Requester:  covi-admin",
        "Phase:      Fulfilled",
        "Approved=True ApprovedByUser: for the quarterly report (bob)",
        "analytics-0",
    ] {
        assert!(out.contains(expected), "describe lacks {expected:?}:\n{out}");
    }
    let (ok, out) = kubectl_covi(&["covi", "deny", "analytics", "-n", &s.ns]);
    assert!(!ok && out.contains("--message <MESSAGE>"), "a denial says why:\n{out}");
    let (ok, out) = kubectl_covi(&["covi", "deny", "--help"]);
    assert!(ok && out.contains("Usage: kubectl covi deny"), "{out}");
}

/// The inventory: a requested server with its owner, request and approver, the hosts,
/// and after deletion the server's record in covi's history, which a tenant cannot read.
#[tokio::test]
async fn the_inventory_lists_servers_and_hosts_and_remembers_deleted_servers() {
    let _turn = SERIAL.lock().await;
    let s = scene("inventory", json!({})).await;
    let covi_ns = format!("--covi-namespace={}", s._fleet.lease_namespace);
    s.request("ledger", 1, Some("168h")).await;
    s.wait_request("ledger", "to wait for approval", |r| phase(r) == Some(VmRequestPhase::Pending)).await;
    let (ok, out) = kubectl_covi(&[
        "covi",
        "approve",
        "ledger",
        "-m",
        "for the audit",
        "-n",
        &s.ns,
        "--as=bob",
        "--as-group=system:masters",
    ]);
    assert!(ok, "{out}");
    s.wait_request("ledger", "to be fulfilled", |r| phase(r) == Some(VmRequestPhase::Fulfilled)).await;

    let (ok, out) = kubectl_covi(&["covi", "inventory", "-n", &s.ns, "-o", "json", &covi_ns]);
    assert!(ok, "{out}");
    let inventory: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let server = &inventory["servers"][0];
    assert_eq!(server["name"], "ledger-0", "{inventory}");
    for (key, expected) in [
        ("namespace", s.ns.as_str()),
        ("owner", "team-test"),
        ("purpose", "requested in a test"),
        ("pool", s.pool.as_str()),
        ("request", "ledger"),
        ("approver", "bob"),
        ("status", "Running"),
        ("deleted", "-"),
    ] {
        assert_eq!(server[key], expected, "{key} in {server}");
    }
    assert!(server["host"].as_str().is_some_and(|h| h.starts_with("inventory-host-")), "{server}");
    assert!(server["expires"].as_str().is_some_and(|e| e.starts_with("20")), "the request's lifetime: {server}");
    assert!(server["size"].as_str().is_some_and(|z| z.starts_with("1cpu/")), "{server}");
    let hosts = inventory["hosts"].as_array().expect("hosts");
    let host = hosts.iter().find(|h| h["name"] == "inventory-host-1").unwrap_or_else(|| panic!("{inventory}"));
    assert_eq!((&host["hypervisor"], &host["cpus"], &host["ready"]), (&json!("TEST"), &json!("16"), &json!("True")));

    // The table is aligned: every row's columns start where the header's do.
    let (ok, out) = kubectl_covi(&["covi", "inventory", "--only=servers", "-n", &s.ns, &covi_ns]);
    assert!(ok, "{out}");
    let header = out.lines().next().expect("header");
    let row = out.lines().find(|l| l.contains("ledger-0")).unwrap_or_else(|| panic!("{out}"));
    for column in ["OWNER", "REQUEST", "APPROVER", "STATUS"] {
        let at = header.find(column).unwrap_or_else(|| panic!("no {column} in {header}"));
        assert!(row.len() > at && row.as_bytes()[at - 1] == b' ' && row.as_bytes()[at] != b' ', "{column}:\n{out}");
    }

    // Deleted with its request: the record stays, with who, where, when and how it ended.
    s.requests.delete("ledger", &DeleteParams::default()).await.expect("delete request");
    wait_until("the server to be gone", DEADLINE, || async {
        s.servers.get_opt("ledger-0").await.ok()?.is_none().then_some(())
    })
    .await;
    let (ok, out) =
        kubectl_covi(&["covi", "inventory", "--history", "--only=servers", "-n", &s.ns, "-o", "json", &covi_ns]);
    assert!(ok, "{out}");
    let rows: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let record = rows["servers"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "ledger-0"))
        .unwrap_or_else(|| panic!("no record of ledger-0:\n{out}"));
    assert_eq!(
        (&record["status"], &record["approver"], &record["owner"]),
        (&json!("RequestDeleted"), &json!("bob"), &json!("team-test"))
    );
    assert!(record["deleted"].as_str().is_some_and(|d| d.starts_with("20")) && record["host"] != "-", "{record}");
    let (ok, out) =
        kubectl_covi(&["covi", "inventory", "--history", "--only=servers", "-o=csv", "-n", &s.ns, &covi_ns]);
    assert!(ok && out.starts_with("NAMESPACE,NAME,OWNER,") && out.contains(",RequestDeleted,"), "{out}");

    // A tenant reads servers but not covi's history.
    bind(&s.client, &s.ns, "alice", "covi-requester", "ClusterRole").await;
    let (ok, out) = kubectl_covi(&["covi", "inventory", "--history", "-n", &s.ns, "--as", "alice", &covi_ns]);
    assert!(!ok && out.contains("covi-history-reader"), "{out}");
}

#[tokio::test]
async fn a_request_over_the_namespace_quota_is_refused_whole() {
    let _turn = SERIAL.lock().await;
    let s = scene_in(
        "quota",
        |ns| json!({"autoApprove": {"maxServers": 10}, "quotas": [{"namespace": ns, "maxServers": 3}]}),
    )
    .await;
    s.request("first", 2, None).await;
    s.wait_request("first", "to be fulfilled", |r| phase(r) == Some(VmRequestPhase::Fulfilled)).await;
    s.request("second", 2, None).await;
    let r = s
        .wait_request("second", "to be held by the quota", |r| {
            condition(r, "QuotaExceeded").is_some_and(|c| c.status == "True")
        })
        .await;
    let c = condition(&r, "QuotaExceeded").unwrap();
    assert!(c.message.contains("may hold 3 servers") && c.message.contains("this would make 4"), "{}", c.message);
    assert_eq!(phase(&r), Some(VmRequestPhase::Pending));
    assert!(s.server_names("second").await.is_empty(), "never half-fulfilled");
    assert!(s.events_including("second", &["QuotaExceeded"]).await.contains("QuotaExceeded"));
}

/// Two requests the operator first sees in one pass: the quota counts the servers the
/// first is given before judging the second, so exactly one of them fits.
#[tokio::test]
async fn two_requests_in_one_pass_share_the_quota() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    let ns = namespace(&client, "quotapass").await;
    let mut fleet = Fleet::new(&client, "quotapass").await;
    let approval = json!({"autoApprove": {"maxServers": 10}, "quotas": [{"namespace": ns, "maxServers": 3}]});
    let pool = fleet.apply_pool(&client, json!({"approval": approval})).await;
    fleet.start_agent(1, 16, 32);
    let mut s = Scene {
        requests: Api::namespaced(client.clone(), &ns),
        servers: Api::namespaced(client.clone(), &ns),
        client,
        _fleet: fleet,
        pool,
        ns,
    };
    // Both exist before the operator's first pass.
    s.request("first", 2, None).await;
    s.request("second", 2, None).await;
    s._fleet.start_operator();
    let held = |r: &VmRequest| condition(r, "QuotaExceeded").is_some_and(|c| c.status == "True");
    let settled = |r: &VmRequest| phase(r) == Some(VmRequestPhase::Fulfilled) || held(r);
    let first = s.wait_request("first", "to be fulfilled or held", settled).await;
    let second = s.wait_request("second", "to be fulfilled or held", settled).await;
    assert!(held(&first) != held(&second), "exactly one is held by the quota: {:?} {:?}", first.status, second.status);
    let all = s.servers.list(&ListParams::default()).await.expect("servers");
    assert_eq!(all.items.len(), 2, "the quota of 3 is never exceeded");
}

/// Binds the chart's covi-agent role to the group covi:agents, as a user running
/// agents with client certificates does; the caller deletes binding `name` at the end.
async fn bind_agents(client: &Client, name: &str) -> Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> {
    let crb: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "covi-agent"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "covi:agents"}]
    }))
    .expect("binding");
    let crbs: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(client.clone());
    let _ = crbs.delete(name, &DeleteParams::default()).await;
    crbs.create(&Default::default(), &crb).await.expect("bind agents");
    crbs
}

#[tokio::test]
async fn an_agent_identity_cannot_write_another_hosts_status() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    let _policies = Policies::install();
    let crbs = bind_agents(&client, "covi-agents-test").await;

    let agent = Api::<covi_api::Host>::all(client_as("covi-agent:own-a", &["covi:agents"]).await);
    let host =
        |name: &str| json!({"apiVersion": "covi.io/v1alpha1", "kind": "Host", "metadata": {"name": name}, "spec": {}});
    // Its own Host: allowed (once RBAC and the policy are both in force).
    wait_until("the agent to register its own Host", DEADLINE, || async {
        agent.patch("own-a", &PatchParams::apply("covi-agent"), &Patch::Apply(&host("own-a"))).await.ok()
    })
    .await;
    let status = json!({"apiVersion": "covi.io/v1alpha1", "kind": "Host", "status": {"servers": 0}});
    agent.patch_status("own-a", &PatchParams::apply("covi-agent"), &Patch::Apply(&status)).await.expect("own status");
    // Another host's: refused by the policy, with its message.
    Api::<covi_api::Host>::all(client.clone())
        .patch("own-b", &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&host("own-b")))
        .await
        .expect("admin creates host b");
    let message = wait_until("the policy to refuse another host's status", DEADLINE, || async {
        match agent.patch_status("own-b", &PatchParams::apply("covi-agent"), &Patch::Apply(&status)).await {
            Err(kube::Error::Api(s)) if s.message.contains("may only write its own") => Some(s.message),
            _ => None,
        }
    })
    .await;
    assert!(message.contains("a covi agent may only write its own Host and Lease (own-a), not own-b"), "{message}");

    // Its Lease: in the release namespace only, never kube-node-lease or a tenant's.
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "own-a"},
                       "spec": {"holderIdentity": "own-a", "leaseDurationSeconds": 10}});
    let identity = client_as("covi-agent:own-a", &["covi:agents"]).await;
    let leases = |ns: &str| Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(identity.clone(), ns);
    wait_until("the agent to write its Lease in covi-system", DEADLINE, || async {
        leases("covi-system").patch("own-a", &PatchParams::apply("covi-agent"), &Patch::Apply(&lease)).await.ok()
    })
    .await;
    for ns in ["kube-node-lease", "default"] {
        match leases(ns).patch("own-a", &PatchParams::apply("covi-agent"), &Patch::Apply(&lease)).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{ns}: {}", s.message),
            other => panic!("an agent wrote a Lease in {ns}: {other:?}"),
        }
    }
    let _ = crbs.delete("covi-agents-test", &DeleteParams::default()).await;
}

#[tokio::test]
async fn a_standalone_server_honours_expires_at() {
    let _turn = SERIAL.lock().await;
    let s = scene("vsexpiry", json!({})).await;
    let at = k8s_openapi::jiff::Timestamp::now() + Duration::from_secs(8);
    let server = json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer", "metadata": {"name": "trial"}, "spec": {
        "hostPool": s.pool, "class": "small", "boot": {"image": "debian-12"},
        "owner": "team-test", "purpose": "a one-off trial", "expiresAt": at.to_string()
    }});
    s.servers.patch("trial", &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&server)).await.expect("create server");
    let warned = wait_until("the server to be warned", DEADLINE, || async {
        let v = s.servers.get_opt("trial").await.ok()??;
        find_condition(&v.status?.conditions, "ExpiringSoon").filter(|c| c.status == "True").cloned()
    })
    .await;
    assert!(warned.message.contains("spec.expiresAt"), "{}", warned.message);
    wait_until("the server to be deleted at expiry", DEADLINE, || async {
        s.servers.get_opt("trial").await.ok()?.is_none().then_some(())
    })
    .await;
    let events = s.events_including("trial", &["ExpiringSoon", "Expired"]).await;
    assert!(events.contains("ExpiringSoon") && events.contains("Expired"), "{events:?}");
}

/// An agent's identity (a client certificate user `covi-agent:<node>` in covi:agents, as
/// the chart's covi-agent role binds it) may write only what its own host runs.
#[tokio::test]
async fn an_agent_identity_writes_only_its_own_servers() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    let _policies = Policies::install();
    let crbs = bind_agents(&client, "covi-agents-servers-test").await;

    // Three servers, as the operator would leave them: bound to srv-a, bound to srv-b,
    // and bound to srv-b while moving to srv-a.
    let ns = namespace(&client, "agentpolicy").await;
    let admin_api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    for (name, status) in [
        ("mine", json!({"host": "srv-a", "address": "10.77.0.5", "phase": "Scheduled"})),
        ("theirs", json!({"host": "srv-b", "address": "10.77.0.6", "phase": "Running"})),
        (
            "moving",
            json!({"host": "srv-b", "phase": "Migrating",
                          "migration": {"source": "srv-b", "target": "srv-a", "phase": "Running"}}),
        ),
    ] {
        let server = json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
            "metadata": {"name": name, "finalizers": [covi_api::contract::FINALIZER]},
            "spec": {"hostPool": "p", "class": "small", "boot": {"image": "debian-12"}, "owner": "o", "purpose": "p"}});
        admin_api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&server)).await.expect("server");
        admin_api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&json!({"status": status})))
            .await
            .expect("bind");
    }

    let agent: Api<VirtualServer> = Api::namespaced(client_as("covi-agent:srv-a", &["covi:agents"]).await, &ns);
    let ready = |reason: &str| {
        json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "reason": reason,
            "message": "m", "lastTransitionTime": "2026-12-01T00:00:00Z"}]}})
    };
    let refusal = |result: Result<VirtualServer, kube::Error>| match result {
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => s.message,
        other => panic!("the write was allowed: {other:?}"),
    };
    // Another host's server: refused (once RBAC and the policy are both in force).
    let message = wait_until("the policy to refuse another host's server", DEADLINE, || async {
        match agent.patch_status("theirs", &PatchParams::default(), &Patch::Merge(&ready("Running"))).await {
            Err(kube::Error::Api(s)) if s.message.contains("bound to its own host") => Some(s.message),
            _ => None,
        }
    })
    .await;
    assert!(message.contains(&format!("(srv-a); {ns}/theirs is bound to srv-b")), "{message}");
    let steal = json!({"spec": {"placement": {"host": "srv-a"}}});
    assert!(refusal(agent.patch("theirs", &PatchParams::default(), &Patch::Merge(&steal)).await).contains("bound to"));
    let strip = json!({"metadata": {"finalizers": []}});
    assert!(refusal(agent.patch("theirs", &PatchParams::default(), &Patch::Merge(&strip)).await).contains("bound to"));

    // Its own server: its phase and Ready condition, nothing of the operator's.
    agent.patch_status("mine", &PatchParams::default(), &Patch::Merge(&ready("Running"))).await.expect("own status");
    let readdress = json!({"status": {"address": "10.77.0.99"}});
    let message = refusal(agent.patch_status("mine", &PatchParams::default(), &Patch::Merge(&readdress)).await);
    assert!(message.contains("host, address, size, migration, failovers and other conditions are the operator's"));
    let reboot = json!({"spec": {"boot": {"image": "other"}}});
    let message = refusal(agent.patch("mine", &PatchParams::default(), &Patch::Merge(&reboot)).await);
    assert!(message.contains("only by removing the covi.io/domain finalizer"), "{message}");

    // The target of a move may report on it, but only the source hands it off.
    let message =
        refusal(agent.patch_status("moving", &PatchParams::default(), &Patch::Merge(&ready("HandedOff"))).await);
    assert!(message.contains("only the agent of the host a server is bound to may hand it off"), "{message}");
    agent
        .patch_status("moving", &PatchParams::default(), &Patch::Merge(&ready("Running")))
        .await
        .expect("the target reports");

    // Releasing covi's finalizer on its own server, after cleaning up: allowed.
    agent.patch("mine", &PatchParams::default(), &Patch::Merge(&strip)).await.expect("release the finalizer");
    let _ = crbs.delete("covi-agents-servers-test", &DeleteParams::default()).await;
}
