//! The API as a user meets it: CRDs installed on a real API server, examples accepted,
//! bad input refused at admission with a message that says what is wrong, and kubectl
//! showing the docs and columns.

use std::time::Duration;

use covi_tests::{
    FIELD_MANAGER, admin, api_for, install_crds, kubectl, merge, namespace, object_from_yaml, repo_root, wait_until,
};
use kube::ResourceExt;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn virtual_server() -> Value {
    json!({
        "apiVersion": "covi.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "vs"},
        "spec": {
            "hostPool": "lab",
            "resources": {"cpus": 2, "memory": "2Gi", "disk": "20Gi"},
            "boot": {"image": "debian-12"},
            "owner": "team-a",
            "purpose": "validation test"
        }
    })
}

fn vm_request() -> Value {
    json!({
        "apiVersion": "covi.io/v1alpha1",
        "kind": "VmRequest",
        "metadata": {"name": "vmr"},
        "spec": {
            "replicas": 2,
            "reason": "validation test",
            "lifetime": "24h",
            "requester": "alice",
            "template": {"spec": virtual_server()["spec"].clone()}
        }
    })
}

fn host_pool() -> Value {
    json!({
        "apiVersion": "covi.io/v1alpha1",
        "kind": "HostPool",
        "metadata": {"name": "hp"},
        "spec": {
            "hypervisor": "test",
            "storage": {"pool": "default-pool"},
            "network": {"bridge": "br0", "cidr": "10.20.0.0/24", "gateway": "10.20.0.1"}
        }
    })
}

fn disruption() -> Value {
    json!({
        "apiVersion": "covi.io/v1alpha1",
        "kind": "Disruption",
        "metadata": {"name": "split"},
        "spec": {
            "selector": {"matchLabels": {"side": "a"}},
            "fault": {"kind": "Partition", "partition": {"from": {"matchLabels": {"side": "b"}}}},
            "duration": "60s"
        }
    })
}

fn with(mut base: Value, patch: Value) -> DynamicObject {
    merge(&mut base, &patch);
    serde_json::from_value(base).expect("test object")
}

/// One bad input and a fragment of the message the API server must answer with.
struct Case {
    what: &'static str,
    object: DynamicObject,
    /// For transition rules: a merge patch applied to `object` after it was created.
    update: Option<Value>,
    expect: &'static str,
}

fn create(what: &'static str, object: DynamicObject, expect: &'static str) -> Case {
    Case { what, object, update: None, expect }
}

fn update(what: &'static str, object: DynamicObject, update: Value, expect: &'static str) -> Case {
    Case { what, object, update: Some(update), expect }
}

fn invalid_cases() -> Vec<Case> {
    let vs = virtual_server;
    let res = |r: Value| json!({"spec": {"resources": r}});
    vec![
        create("memory below 128Mi", with(vs(), res(json!({"memory": "100Mi"}))), "memory must be at least 128Mi"),
        create(
            "memory not whole MiB",
            with(vs(), res(json!({"memory": "1.5G"}))),
            "memory must be a whole number of MiB",
        ),
        create(
            "memory not a quantity",
            with(vs(), res(json!({"memory": "lots"}))),
            "memory must be a quantity such as 512Mi",
        ),
        create(
            "zero cpus",
            with(vs(), res(json!({"cpus": 0}))),
            "spec.resources.cpus: Invalid value: 0: spec.resources.cpus in body should be greater than or equal to 1",
        ),
        create("too many cpus", with(vs(), res(json!({"cpus": 257}))), "should be less than or equal to 256"),
        create("disk below 1Gi", with(vs(), res(json!({"disk": "512Mi"}))), "disk must be at least 1Gi"),
        create("zero bandwidth", with(vs(), res(json!({"bandwidth": "0"}))), "bandwidth must be a positive quantity"),
        create(
            "hostname with capitals and underscore",
            with(vs(), json!({"spec": {"hostname": "Web_1"}})),
            "hostname must be an RFC 1123 label",
        ),
        create(
            "hostname too long",
            with(vs(), json!({"spec": {"hostname": "a".repeat(64)}})),
            "spec.hostname: Too long",
        ),
        create(
            "two boot sources",
            with(vs(), json!({"spec": {"boot": {"iso": "install.iso"}}})),
            "exactly one boot source must be set",
        ),
        create(
            "no boot source",
            with(vs(), json!({"spec": {"boot": {"image": null}}})),
            "exactly one boot source must be set",
        ),
        create(
            "class and resources",
            with(vs(), json!({"spec": {"class": "small"}})),
            "class and resources are mutually exclusive",
        ),
        create(
            "neither class nor resources",
            with(vs(), json!({"spec": {"resources": null}})),
            "one of class or resources is required",
        ),
        create(
            "address not an IP",
            with(vs(), json!({"spec": {"network": {"address": "10.20.0.300"}}})),
            "address must be 'auto' or an IPv4 address",
        ),
        create(
            "IPv6 static address",
            with(vs(), json!({"spec": {"network": {"address": "fd00::10"}}})),
            "address must be 'auto' or an IPv4 address",
        ),
        create(
            "user data over 64 KiB",
            with(vs(), json!({"spec": {"userData": "x".repeat(65537)}})),
            "spec.userData: Too long",
        ),
        create(
            "empty purpose",
            with(vs(), json!({"spec": {"purpose": ""}})),
            "purpose must say what the server is for",
        ),
        create(
            "blank purpose",
            with(vs(), json!({"spec": {"purpose": "   "}})),
            "purpose must say what the server is for",
        ),
        create("missing purpose", with(vs(), json!({"spec": {"purpose": null}})), "spec.purpose: Required value"),
        create("blank owner", with(vs(), json!({"spec": {"owner": " "}})), "owner must name a person or team"),
        create(
            "unknown run policy",
            with(vs(), json!({"spec": {"runPolicy": "Paused"}})),
            "Unsupported value: \"Paused\"",
        ),
        update(
            "hostPool changed",
            with(vs(), json!({})),
            json!({"spec": {"hostPool": "other"}}),
            "hostPool is immutable",
        ),
        create(
            "too many replicas",
            with(vm_request(), json!({"spec": {"replicas": 1001}})),
            "should be less than or equal to 1000",
        ),
        create(
            "negative replicas",
            with(vm_request(), json!({"spec": {"replicas": -1}})),
            "should be greater than or equal to 0",
        ),
        create(
            "negative lifetime",
            with(vm_request(), json!({"spec": {"lifetime": "-1h"}})),
            "lifetime must be a positive duration",
        ),
        create(
            "lifetime in days",
            with(vm_request(), json!({"spec": {"lifetime": "7d"}})),
            "lifetime must be a positive duration",
        ),
        create(
            "zero lifetime",
            with(vm_request(), json!({"spec": {"lifetime": "0s"}})),
            "lifetime must be a positive duration",
        ),
        create(
            "blank reason",
            with(vm_request(), json!({"spec": {"reason": ""}})),
            "reason must say why the servers are needed",
        ),
        create(
            "bad template",
            with(vm_request(), json!({"spec": {"template": {"spec": {"resources": {"memory": "64Mi"}}}}})),
            "memory must be at least 128Mi",
        ),
        create(
            "template label key with a space",
            with(vm_request(), json!({"spec": {"template": {"metadata": {"labels": {"my app": "x"}}}}})),
            "label keys must be qualified names",
        ),
        create(
            "template label value too long",
            with(vm_request(), json!({"spec": {"template": {"metadata": {"labels": {"app": "x".repeat(64)}}}}})),
            "spec.template.metadata.labels.app: Too long",
        ),
        create(
            "template label in covi's prefix",
            with(vm_request(), json!({"spec": {"template": {"metadata": {"labels": {"covi.io/request": "other"}}}}})),
            "labels under covi.io/ are set by covi",
        ),
        create(
            "template annotation key with a slash too many",
            with(vm_request(), json!({"spec": {"template": {"metadata": {"annotations": {"a/b/c": "x"}}}}})),
            "annotation keys must be qualified names",
        ),
        create(
            "request name too long for its servers",
            with(vm_request(), json!({"metadata": {"name": "r".repeat(59)}})),
            "a request's name is at most 58 characters",
        ),
        create(
            "relative storage path",
            with(host_pool(), json!({"spec": {"storage": {"path": "images/../../etc"}}})),
            "storage.path must be an absolute directory",
        ),
        update(
            "requester changed",
            with(vm_request(), json!({})),
            json!({"spec": {"requester": "mallory"}}),
            "requester is immutable",
        ),
        update(
            "requester removed",
            with(vm_request(), json!({})),
            json!({"spec": {"requester": null}}),
            "requester is immutable",
        ),
        create(
            "CIDR prefix too long",
            with(host_pool(), json!({"spec": {"network": {"cidr": "10.20.0.0/33"}}})),
            "cidr must be an IPv4 CIDR",
        ),
        create(
            "IPv6 CIDR",
            with(host_pool(), json!({"spec": {"network": {"cidr": "fd00::/64", "gateway": null}}})),
            "cidr must be an IPv4 CIDR",
        ),
        create(
            "gateway outside CIDR",
            with(host_pool(), json!({"spec": {"network": {"gateway": "10.30.0.1"}}})),
            "gateway must be an IPv4 address inside cidr",
        ),
        create(
            "zero CPU overcommit",
            with(host_pool(), json!({"spec": {"overcommit": {"cpu": 0}}})),
            "overcommit.cpu must be greater than 0 and at most 64",
        ),
        create(
            "memory overcommit above 64",
            with(host_pool(), json!({"spec": {"overcommit": {"memory": 65}}})),
            "overcommit.memory must be greater than 0 and at most 64",
        ),
        create(
            "a consolidation window that is no time range",
            with(host_pool(), json!({"spec": {"consolidation": {"mode": "Automatic", "window": "1am-5am"}}})),
            "consolidation.window must be HH:MM-HH:MM (UTC), such as 01:00-05:00",
        ),
        create(
            "a consolidation mode covi does not know",
            with(host_pool(), json!({"spec": {"consolidation": {"mode": "Aggressive"}}})),
            "supported values: \"Disabled\", \"Recommend\", \"Automatic\"",
        ),
        create(
            "fencing not before lease expiry",
            with(host_pool(), json!({"spec": {"failover": {"leaseDurationSeconds": 10, "fenceAfterSeconds": 10}}})),
            "fenceAfterSeconds plus renewSeconds must not exceed leaseDurationSeconds",
        ),
        create(
            "an ISO that is a host path",
            with(vs(), json!({"spec": {"boot": {"image": null, "iso": "/etc/shadow"}}})),
            "spec.boot.iso: Invalid value: \"/etc/shadow\": must be the name of a volume in the pool's storage pool",
        ),
        create(
            "an ISO that climbs out of the pool",
            with(vs(), json!({"spec": {"boot": {"image": null, "iso": "../../../etc/shadow"}}})),
            "spec.boot.iso: Invalid value: \"../../../etc/shadow\": must be the name of a volume",
        ),
        create(
            "an image volume that is a path",
            with(host_pool(), json!({"spec": {"images": [{"name": "x", "volume": "../../etc/passwd"}]}})),
            "spec.images[0].volume: Invalid value: \"../../etc/passwd\": must be the name of a volume",
        ),
        create(
            "a reserved entry that is no address",
            with(host_pool(), json!({"spec": {"network": {"reserved": ["banana"]}}})),
            "every reserved entry must be an IPv4 address inside cidr",
        ),
        create(
            "a reserved address outside the network",
            with(host_pool(), json!({"spec": {"network": {"reserved": ["192.0.2.1"]}}})),
            "every reserved entry must be an IPv4 address inside cidr",
        ),
        create(
            "a reserved range backwards",
            with(host_pool(), json!({"spec": {"network": {"reserved": ["10.20.0.9-10.20.0.2"]}}})),
            "a reserved range A-B must go from the lower address to the higher",
        ),
        create(
            "a grace shorter than one renewal",
            with(
                host_pool(),
                json!({"spec": {"failover": {"renewSeconds": 5, "leaseDurationSeconds": 30, "fenceAfterSeconds": 20, "graceSeconds": 2}}}),
            ),
            "graceSeconds must be at least renewSeconds",
        ),
        create(
            "no grace at all",
            with(host_pool(), json!({"spec": {"failover": {"graceSeconds": 0}}})),
            "spec.failover.graceSeconds: Invalid value: 0: spec.failover.graceSeconds in body should be greater than or equal to 1",
        ),
        create(
            "unknown hypervisor",
            with(host_pool(), json!({"spec": {"hypervisor": "vmware"}})),
            "Unsupported value: \"vmware\"",
        ),
        create(
            "webhook not http",
            with(host_pool(), json!({"spec": {"approval": {"webhookUrl": "ftp://example.com/hook"}}})),
            "webhookUrl must be an http:// URL (https is not supported yet)",
        ),
        create(
            "https webhook",
            with(host_pool(), json!({"spec": {"approval": {"webhookUrl": "https://hooks.example.com/covi"}}})),
            "webhookUrl must be an http:// URL (https is not supported yet)",
        ),
        create(
            "empty selector",
            with(disruption(), json!({"spec": {"selector": {"matchLabels": null}}})),
            "a selector names servers or matches labels; an empty one would select every server",
        ),
        create(
            "duration in days",
            with(disruption(), json!({"spec": {"duration": "1d"}})),
            "duration must be a positive duration such as 30s or 5m",
        ),
        create(
            "every shorter than duration",
            with(disruption(), json!({"spec": {"every": "30s"}})),
            "every must be longer than duration: a fault ends before it starts again",
        ),
        create(
            "partition without its other side",
            with(disruption(), json!({"spec": {"fault": {"partition": null}}})),
            "partition is required for, and only for, kind Partition",
        ),
        create(
            "network fault without a degradation",
            with(disruption(), json!({"spec": {"fault": {"kind": "Network", "partition": null, "network": {}}}})),
            "network needs at least one of delay, lossPercent, duplicatePercent, corruptPercent, rateKbit",
        ),
        create(
            "loss above 100%",
            with(
                disruption(),
                json!({"spec": {"fault": {"kind": "Network", "partition": null, "network": {"lossPercent": 101}}}}),
            ),
            "should be less than or equal to 100",
        ),
        create(
            "expiry warning in days",
            with(host_pool(), json!({"spec": {"approval": {"expiryWarning": "1d"}}})),
            "expiryWarning must be a positive duration such as 24h",
        ),
    ]
}

#[tokio::test]
async fn crds_become_established() {
    let client = admin().await;
    let names = install_crds(&client).await;
    assert_eq!(
        names,
        [
            "assignments.covi.io",
            "disruptions.covi.io",
            "hostpools.covi.io",
            "hosts.covi.io",
            "virtualservers.covi.io",
            "vmrequests.covi.io"
        ]
    );
}

#[tokio::test]
async fn examples_are_accepted() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = namespace(&client, "examples").await;
    let dir = repo_root().join("examples");
    let mut applied = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/ exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for path in files {
        let object = object_from_yaml(&std::fs::read_to_string(&path).expect("readable"));
        let name = object.metadata.name.clone().expect("examples are named");
        api_for(&client, &object, &ns)
            .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("{} was refused: {e}", path.display()));
        applied.push(object.types.expect("typed").kind);
    }
    applied.sort();
    assert_eq!(applied, ["Disruption", "Host", "HostPool", "VirtualServer", "VmRequest"]);
}

#[tokio::test]
async fn invalid_objects_are_rejected_with_clear_messages() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = namespace(&client, "invalid").await;
    let dry_run = PostParams { dry_run: true, field_manager: None };

    // The bases must be valid, or every case would pass for the wrong reason.
    for base in [virtual_server(), vm_request(), host_pool(), disruption()] {
        let object: DynamicObject = serde_json::from_value(base).expect("base object");
        api_for(&client, &object, &ns)
            .create(&dry_run, &object)
            .await
            .unwrap_or_else(|e| panic!("valid base object refused: {e}"));
    }

    let cases = invalid_cases();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for (i, case) in cases.into_iter().enumerate() {
        let mut object = case.object;
        // Unique names, except where the name is what is tested.
        if object.metadata.name.as_ref().is_none_or(|n| n.len() <= 16) {
            object.metadata.name = Some(format!("case-{i}"));
        }
        let api = api_for(&client, &object, &ns);
        let result = match &case.update {
            None => api.create(&dry_run, &object).await.map(drop),
            Some(patch) => {
                api.create(&PostParams::default(), &object)
                    .await
                    .unwrap_or_else(|e| panic!("{}: creating the original failed: {e}", case.what));
                let params = PatchParams { dry_run: true, ..PatchParams::default() };
                api.patch(&object.name_any(), &params, &Patch::Merge(patch)).await.map(drop)
            }
        };
        match result {
            Ok(()) => failures.push(format!("{}: accepted, expected {:?}", case.what, case.expect)),
            Err(kube::Error::Api(status)) if status.message.contains(case.expect) => {}
            Err(e) => failures.push(format!("{}: expected {:?}, got: {e}", case.what, case.expect)),
        }
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test]
async fn kubectl_explain_prints_field_docs() {
    let client = admin().await;
    install_crds(&client).await;
    // Discovery can lag behind Established by a moment; explain reads the OpenAPI.
    let text = wait_until("kubectl explain to know VirtualServer", Duration::from_secs(30), || async {
        let (ok, text) = kubectl(&["explain", "virtualserver.spec.resources"]);
        ok.then_some(text)
    })
    .await;
    for doc in [
        "Explicit size of the server",
        "Number of virtual CPUs, 1 to 256.",
        "at least 128Mi and a whole",
        "Size of the boot disk",
        "bits per second",
    ] {
        assert!(text.contains(doc), "explain output lacks {doc:?}:\n{text}");
    }
}

#[tokio::test]
async fn kubectl_get_covi_lists_all_four_kinds() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = namespace(&client, "category").await;
    let suffix = ns.rsplit('-').next().expect("suffix").to_string();
    let mut objects = vec![virtual_server(), vm_request(), host_pool()];
    objects.push(json!({"apiVersion": "covi.io/v1alpha1", "kind": "Host", "metadata": {"name": "h"}, "spec": {}}));
    for mut value in objects {
        let kind = value["kind"].as_str().expect("kind").to_lowercase();
        value["metadata"]["name"] = json!(format!("category-{kind}-{suffix}"));
        let object: DynamicObject = serde_json::from_value(value).expect("object");
        api_for(&client, &object, &ns)
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("creating {kind}: {e}"));
    }
    let text = wait_until("kubectl get covi to list every kind", Duration::from_secs(30), || async {
        let (ok, text) = kubectl(&["get", "covi", "-n", &ns, "-o", "name"]);
        let all = ["virtualserver", "vmrequest", "hostpool", "host"]
            .iter()
            .all(|kind| text.contains(&format!("{kind}.covi.io/category-{kind}-{suffix}")));
        (ok && all).then_some(text)
    })
    .await;
    assert!(text.contains("hostpool.covi.io/"), "{text}");

    // The printer columns answer the first questions.
    let (ok, table) = kubectl(&["get", "vs", "-n", &ns]);
    assert!(ok, "{table}");
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "PHASE", "HOST", "IP", "CPUS", "MEMORY", "PURPOSE", "AGE"] {
        assert!(header.contains(column), "vs columns lack {column}: {header}");
    }
    assert!(table.contains("validation test"), "purpose is shown:\n{table}");
    let (ok, table) = kubectl(&["get", "vmr", "-n", &ns]);
    assert!(ok, "{table}");
    let header = table.lines().next().unwrap_or_default();
    for column in ["PHASE", "REPLICAS", "READY", "REQUESTER", "EXPIRES"] {
        assert!(header.contains(column), "vmr columns lack {column}: {header}");
    }
    assert!(table.contains("alice"), "requester is shown:\n{table}");
}

#[tokio::test]
async fn kubectl_scale_changes_request_replicas() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = namespace(&client, "scale").await;
    let object: DynamicObject = serde_json::from_value(vm_request()).expect("object");
    let api = api_for(&client, &object, &ns);
    api.create(&PostParams::default(), &object).await.expect("create request");
    let (ok, text) = kubectl(&["scale", "-n", &ns, "vmrequest/vmr", "--replicas=7"]);
    assert!(ok, "kubectl scale failed: {text}");
    let after = api.get("vmr").await.expect("get request");
    assert_eq!(after.data["spec"]["replicas"], json!(7));
    let (ok, text) = kubectl(&["scale", "-n", &ns, "vmrequest/vmr", "--replicas=1001"]);
    assert!(!ok && text.contains("1000"), "scaling past 1000 must fail: {text}");
}

#[tokio::test]
async fn conditions_from_two_writers_merge_by_type() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = namespace(&client, "conditions").await;
    let object: DynamicObject = serde_json::from_value(virtual_server()).expect("object");
    let api = api_for(&client, &object, &ns);
    api.create(&PostParams::default(), &object).await.expect("create server");
    let condition = |type_: &str| {
        json!({"type": type_, "status": "True", "reason": "Test", "message": "set by test",
               "lastTransitionTime": "2026-01-01T00:00:00Z"})
    };
    for (manager, type_) in [("covi-operator", "Scheduled"), ("covi-agent", "Ready")] {
        let patch = json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
            "status": {"conditions": [condition(type_)]}
        });
        api.patch_status("vs", &PatchParams::apply(manager).force(), &Patch::Apply(&patch))
            .await
            .unwrap_or_else(|e| panic!("{manager} status apply: {e}"));
    }
    let after = api.get_status("vs").await.expect("get");
    let types: Vec<_> = after.data["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| c["type"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(types, ["Scheduled", "Ready"], "each writer keeps its own condition");
}

#[tokio::test]
async fn users_act_with_their_own_rights() {
    use covi_tests::client_as;
    let client = admin().await;
    install_crds(&client).await;
    let ns = namespace(&client, "rbac").await;
    let object: DynamicObject = serde_json::from_value(virtual_server()).expect("object");

    let bob = client_as("bob", &["covi:testers"]).await;
    match api_for(&bob, &object, &ns).create(&PostParams::default(), &object).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("bob has no role yet and must be forbidden, got {other:?}"),
    }

    let grant = |kind: &str, body: Value| {
        let mut object: DynamicObject = serde_json::from_value(body).expect("rbac object");
        object.metadata.namespace = Some(ns.clone());
        (kind.to_string(), object)
    };
    for (kind, object) in [
        grant(
            "Role",
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "servers"},
                "rules": [{"apiGroups": ["covi.io"], "resources": ["virtualservers"], "verbs": ["create", "get"]}]
            }),
        ),
        grant(
            "RoleBinding",
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "bob-servers"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "servers"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}]
            }),
        ),
    ] {
        api_for(&client, &object, &ns)
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("creating {kind}: {e}"));
    }
    // The RBAC authorizer learns of new bindings through a watch: allow it a moment.
    let bob_api = api_for(&bob, &object, &ns);
    wait_until("bob to be allowed once granted", Duration::from_secs(10), || async {
        bob_api.create(&PostParams::default(), &object).await.ok()
    })
    .await;
}
