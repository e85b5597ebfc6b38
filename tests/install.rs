//! Installing covi on a cluster: the Helm chart lints and renders, and what it renders
//! (and each kustomize overlay) is accepted by the real API server (`--dry-run=server`:
//! schema, admission, RBAC escalation checks) without creating anything.

use covi_tests::{admin, client_as, install_crds, namespace, run, wait_until};

use covi_tests::SERIAL;

fn helm_template(ns: &str, set: &[&str]) -> String {
    let kube_version = std::env::var("KUBERNETES_VERSION").expect("hack/lib.sh exports KUBERNETES_VERSION");
    let mut args = vec!["template", "covi", "charts/covi", "--namespace", ns, "--kube-version", &kube_version];
    args.push("--include-crds");
    for s in set {
        args.extend(["--set", s]);
    }
    let (ok, out, err) = run("helm", &args, None);
    assert!(ok, "helm template {set:?} failed: {err}");
    out
}

/// Applies `manifests` with a server-side dry run; returns what kubectl printed.
fn dry_run(what: &str, manifests: &str) -> String {
    let args = ["apply", "--server-side", "--force-conflicts", "--field-manager=covi-install-test", "--dry-run=server"];
    let (ok, out, err) = run("kubectl", &[&args[..], &["-f", "-"]].concat(), Some(manifests));
    assert!(ok, "{what}: the API server refused it:\n{err}\n{out}");
    out
}

/// `kubectl kustomize DIR`, applied with a server-side dry run: (manifests, kubectl's output).
fn kustomize_dry_run(dir: &str) -> (String, String) {
    let (ok, manifests, err) = run("kubectl", &["kustomize", dir], None);
    assert!(ok, "kubectl kustomize {dir}: {err}");
    let out = dry_run(dir, &manifests);
    (manifests, out)
}

fn kinds(manifests: &str) -> Vec<String> {
    let mut kinds: Vec<String> =
        manifests.lines().filter_map(|l| l.strip_prefix("kind: ")).map(|k| k.trim().to_string()).collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

#[test]
fn the_chart_passes_helm_lint() {
    let (ok, out, err) = run("helm", &["lint", "--strict", "charts/covi"], None);
    assert!(ok, "helm lint failed:\n{out}\n{err}");
    assert!(out.contains("1 chart(s) linted, 0 chart(s) failed"), "{out}");
}

#[tokio::test]
async fn the_rendered_chart_is_accepted_by_the_api_server() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    let ns = namespace(&client, "helm").await;

    let all = helm_template(&ns, &[]);
    let want = [
        "APIService",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "CustomResourceDefinition",
        "DaemonSet",
        "Deployment",
        "FlowSchema",
        "PodDisruptionBudget",
        "PriorityClass",
        "PriorityLevelConfiguration",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    assert_eq!(kinds(&all), want, "what the chart installs by default");
    // The Grafana dashboard: a ConfigMap with the sidecar's label and JSON that parses.
    let dashboard = serde_yaml::Deserializer::from_str(&all)
        .filter_map(|d| <serde_json::Value as serde::Deserialize>::deserialize(d).ok())
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "covi-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let board: serde_json::Value =
        serde_json::from_str(dashboard["data"]["covi.json"].as_str().unwrap_or_default()).expect("dashboard JSON");
    assert!(board["panels"].as_array().is_some_and(|p| p.len() > 5), "{board}");
    let without = helm_template(&ns, &["grafanaDashboard.enabled=false"]);
    assert!(!kinds(&without).contains(&"ConfigMap".to_string()), "the dashboard can be left out");
    let out = dry_run("helm template (defaults)", &all);
    assert!(out.contains("daemonset.apps/covi-agent serverside-applied (server dry run)"), "{out}");
    assert!(out.contains("validatingadmissionpolicy.admissionregistration.k8s.io/covi-agent-own-host"), "{out}");
    // The agent's admission policy names the service account of this release's namespace.
    assert!(all.contains(&format!("system:serviceaccount:{ns}:covi-agent")), "policy follows the namespace");

    // Pods off the host network and under the runtime's seccomp profile unless asked.
    let agent_pod = |manifests: &str| -> serde_yaml::Value {
        let ds = manifests
            .split("\n---")
            .filter_map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).ok())
            .find(|d| d["kind"] == "DaemonSet")
            .expect("the agent DaemonSet");
        ds["spec"]["template"]["spec"].clone()
    };
    let pod = agent_pod(&all);
    assert!(pod.get("hostNetwork").is_none(), "no host network by default: {pod:?}");
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let host = agent_pod(&helm_template(&ns, &["agent.hostNetwork=true"]));
    assert_eq!(host["hostNetwork"], true);
    let args = serde_yaml::to_string(&host["containers"][0]["args"]).expect("args");
    assert!(args.contains("--metrics-addr=$(COVI_HOST_ADDRESS):9464"), "the node's address only: {args}");
    assert!(args.contains("--console-addr=$(COVI_HOST_ADDRESS):8444"), "consoles on the node's address only: {args}");
    let args = serde_yaml::to_string(&pod["containers"][0]["args"]).expect("args");
    assert!(args.contains("--console-addr=$(POD_IP):8444"), "consoles on the pod's address: {args}");

    // The README's install line: images from your registry, the pool label on every Host.
    let readme = helm_template(
        &ns,
        &[
            "image.registry=registry.example.com/platform",
            "image.tag=0.1.0",
            "agent.hostLabels.covi\\.io/pool=production",
        ],
    );
    assert!(readme.contains("image: registry.example.com/platform/covi-agent:0.1.0"), "agent image");
    assert!(readme.contains("image: registry.example.com/platform/covi-operator:0.1.0"), "operator image");
    assert!(readme.contains("- --label=covi.io/pool=production"), "host label");
    dry_run("helm template (README values)", &readme);

    // The optional parts off, and an existing priority class: still valid.
    let lean = helm_template(
        &ns,
        &[
            "policies=false",
            "userRoles=false",
            "apiPriority.enabled=false",
            "metrics.services=false",
            "operator.podDisruptionBudget.enabled=false",
            "agent.priorityClass.create=false",
            "agent.priorityClass.name=system-node-critical",
            "console.enabled=false",
        ],
    );
    for gone in
        ["ValidatingAdmissionPolicy", "PodDisruptionBudget", "PriorityClass", "Service", "FlowSchema", "APIService"]
    {
        assert!(!kinds(&lean).contains(&gone.to_string()), "{gone} is optional");
    }
    dry_run("helm template (lean)", &lean);

    // ServiceMonitors (the test bed has no Prometheus Operator CRDs, so only rendered):
    // they select the metrics Services by the components' labels.
    let monitored =
        helm_template(&ns, &["metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom"]);
    let docs: Vec<serde_yaml::Value> = monitored
        .split("\n---")
        .filter_map(|d| serde_yaml::from_str(d).ok())
        .filter(|d: &serde_yaml::Value| d["kind"] == "ServiceMonitor" || d["kind"] == "Service")
        .collect();
    for component in ["operator", "agent"] {
        let monitor = docs
            .iter()
            .find(|d| d["kind"] == "ServiceMonitor" && d["metadata"]["name"] == format!("covi-{component}").as_str())
            .unwrap_or_else(|| panic!("a ServiceMonitor for the {component}"));
        assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
        let service = docs
            .iter()
            .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == format!("covi-{component}-metrics").as_str())
            .expect("its Service");
        let selector = monitor["spec"]["selector"]["matchLabels"].as_mapping().expect("matchLabels");
        for (k, v) in selector {
            assert_eq!(&service["metadata"]["labels"][k], v, "the {component} monitor selects its Service");
        }
        assert_eq!(monitor["spec"]["endpoints"][0]["port"], service["spec"]["ports"][0]["name"]);
    }
}

#[tokio::test]
async fn the_kustomize_base_and_overlay_are_accepted_by_the_api_server() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    // A dry run creates nothing, so the namespace the base creates must already exist.
    covi_tests::fleet::ensure_namespace(&client, "covi-system").await;
    for dir in ["deploy/base", "deploy/overlays/example"] {
        let (manifests, out) = kustomize_dry_run(dir);
        assert!(out.contains("deployment.apps/covi-operator serverside-applied (server dry run)"), "{dir}: {out}");
        if dir.ends_with("example") {
            assert!(manifests.contains("image: registry.example.com/platform/covi-agent:0.1.0"), "overlay images");
            assert!(manifests.contains("value: covi.io/pool=production"), "overlay host labels");
            assert!(!manifests.contains("covi.io/hypervisor: \"true\""), "overlay node selector replaces the base's");
        }
    }
}

#[tokio::test]
async fn the_gitops_example_folders_are_accepted_by_the_api_server() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    install_crds(&client).await;
    covi_tests::fleet::ensure_namespace(&client, "checkout").await;
    for dir in ["examples/gitops/platform", "examples/gitops/teams/checkout"] {
        kustomize_dry_run(dir);
    }
}

/// The FlowSchema and priority level (their UIDs) API Priority and Fairness put a
/// Lease read in `ns` by `client` under, from the response's headers.
async fn classified(client: &kube::Client, ns: &str) -> (String, String) {
    classified_at(client, &format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/some-host")).await
}

/// The same for a GET of `uri`.
async fn classified_at(client: &kube::Client, uri: &str) -> (String, String) {
    let uri = uri.to_string();
    let req = http::Request::get(uri).body(kube::client::Body::empty()).expect("request");
    let res = client.send(req).await.expect("the API server answers");
    let header = |h: &str| res.headers().get(h).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (header("X-Kubernetes-PF-FlowSchema-UID"), header("X-Kubernetes-PF-PriorityLevel-UID"))
}

#[tokio::test]
async fn agents_heartbeats_get_a_priority_level_of_their_own() {
    let _turn = SERIAL.lock().await;
    let client = admin().await;
    let ns = namespace(&client, "apf").await;
    // Only the priority levels and FlowSchemas are applied for real (the schemas name
    // this test's namespace).
    let rendered = helm_template(&ns, &[]);
    let documents: Vec<&str> = rendered
        .split("\n---")
        .filter(|d| d.contains("\nkind: FlowSchema") || d.contains("\nkind: PriorityLevelConfiguration"))
        .collect();
    assert_eq!(documents.len(), 6, "two levels; the agents' two, the operator's and its leader Lease's FlowSchemas");
    let args = ["apply", "--server-side", "--force-conflicts", "--field-manager=covi-install-test", "-f", "-"];
    let (ok, out, err) = run("kubectl", &args, Some(&documents.join("\n---\n")));
    assert!(ok, "applying the priority levels and FlowSchemas: {err}{out}");

    use k8s_openapi::api::flowcontrol::v1::{FlowSchema, PriorityLevelConfiguration};
    let schemas: kube::Api<FlowSchema> = kube::Api::all(client.clone());
    let levels: kube::Api<PriorityLevelConfiguration> = kube::Api::all(client.clone());
    fn uid<K: kube::Resource>(o: &K) -> String {
        o.meta().uid.clone().unwrap_or_default()
    }
    let heartbeat = schemas.get("covi-agent-heartbeat").await.expect("FlowSchema");
    let agent_rest = schemas.get("covi-agent").await.expect("FlowSchema");
    let operator = schemas.get("covi-operator").await.expect("FlowSchema");
    let leader = schemas.get("covi-operator-leader-election").await.expect("FlowSchema");
    let heartbeats = levels.get("covi-heartbeats").await.expect("covi's heartbeat priority level");
    let agents = levels.get("covi-agents").await.expect("covi's priority level of agents' other requests");
    let leader_election = levels.get("leader-election").await.expect("the cluster's leader-election priority level");
    let workload_high = levels.get("workload-high").await.expect("the cluster's workload-high priority level");
    let deadline = std::time::Duration::from_secs(30);

    // The API server gives each level seats, and the agents' other requests no more
    // than their own (they never borrow): its metrics say so.
    let seats = wait_until("the API server to give covi's levels their seats", deadline, || async {
        let metrics = client.request_text(http::Request::get("/metrics").body(Vec::new()).ok()?).await.ok()?;
        let value = |metric: &str, level: &str| -> Option<f64> {
            let prefix = format!("apiserver_flowcontrol_{metric}{{priority_level=\"{level}\"}} ");
            metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
        };
        let agents = (value("nominal_limit_seats", "covi-agents")?, value("upper_limit_seats", "covi-agents")?);
        Some((value("nominal_limit_seats", "covi-heartbeats")?, agents))
    })
    .await;
    let (heartbeat_seats, (agent_seats, agent_upper)) = seats;
    assert!(
        heartbeat_seats > agent_seats && agent_seats >= 1.0,
        "seats: heartbeats {heartbeat_seats}, agents {agent_seats}"
    );
    assert_eq!(agent_upper, agent_seats, "the agents' other requests borrow no seats");

    let sa = |name: &str| format!("system:serviceaccount:{ns}:{name}");
    let sa_groups = ["system:serviceaccounts".to_string(), format!("system:serviceaccounts:{ns}")];
    let groups: Vec<&str> = sa_groups.iter().map(String::as_str).chain(["system:authenticated"]).collect();
    let agent = client_as(&sa("covi-agent"), &groups).await;
    wait_until("the agent's Lease request to be classified as its heartbeat", deadline, || async {
        let (schema, level) = classified(&agent, &ns).await;
        (schema == uid(&heartbeat) && level == uid(&heartbeats)).then_some(())
    })
    .await;
    // Its other requests wait on their own level, not beside the heartbeats.
    let servers = format!("/apis/covi.io/v1alpha1/namespaces/{ns}/virtualservers");
    wait_until("the agent's other requests to be classified at covi-agents", deadline, || async {
        let (schema, level) = classified_at(&agent, &servers).await;
        (schema == uid(&agent_rest) && level == uid(&agents)).then_some(())
    })
    .await;
    // An agent outside the cluster, by its group.
    let outside = client_as("host-7", &["covi:agents", "system:authenticated"]).await;
    assert_eq!(classified(&outside, &ns).await, (uid(&heartbeat), uid(&heartbeats)), "covi:agents' renewals");
    assert_eq!(classified_at(&outside, "/apis/covi.io/v1alpha1/hosts").await, (uid(&agent_rest), uid(&agents)));
    // Another namespace's Leases are not covi's heartbeats.
    let other = namespace(&client, "apf-other").await;
    assert_eq!(classified(&agent, &other).await, (uid(&agent_rest), uid(&agents)), "only Leases in covi's namespace");

    let operator_client = client_as(&sa("covi-operator"), &groups).await;
    wait_until("the operator's requests to be classified at workload-high", deadline, || async {
        let (schema, level) = classified_at(&operator_client, &servers).await;
        (schema == uid(&operator) && level == uid(&workload_high)).then_some(())
    })
    .await;
    wait_until("the operator's leader Lease to be classified at leader-election", deadline, || async {
        let (schema, level) = classified(&operator_client, &ns).await;
        (schema == uid(&leader) && level == uid(&leader_election)).then_some(())
    })
    .await;
    // Its list of the hosts' Leases (liveness) is not leader election.
    let leases = format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases");
    assert_eq!(classified_at(&operator_client, &leases).await, (uid(&operator), uid(&workload_high)), "a LIST");
    // Anyone else's service account keeps the cluster's default rules.
    let stranger = client_as(&sa("someone"), &groups).await;
    let (schema, level) = classified(&stranger, &ns).await;
    assert!(!schema.is_empty() && ![uid(&heartbeat), uid(&agent_rest), uid(&operator)].contains(&schema), "{schema}");
    assert!(![uid(&heartbeats), uid(&agents)].contains(&level), "{level}");
    for name in ["covi-agent-heartbeat", "covi-agent", "covi-operator", "covi-operator-leader-election"] {
        let _ = schemas.delete(name, &Default::default()).await;
    }
    for name in ["covi-heartbeats", "covi-agents"] {
        let _ = levels.delete(name, &Default::default()).await;
    }
}
