//! covi installed the way users install it: `helm install` of the chart, unmodified but
//! for the values a user sets (images, libvirt URI, host label), onto the test bed's
//! real node — kubelet, containerd, kube-proxy and kube-scheduler (hack/node.sh) — with
//! images built from this repository (hack/build-images.sh). The operator and the agent
//! run as pods with the chart's service accounts, RBAC, probes, security contexts and
//! hostPath mount of libvirtd's socket; the agent drives the node's real libvirtd, whose
//! QEMU/TCG guests outlive agent pods.

use std::time::{Duration, Instant};

use covi_api::VirtualServer;
use covi_tests::console::{ESCAPE, Session, wait_available};
use covi_tests::fleet::get;
use covi_tests::guests::{apply_server, fixtures_in, qemu_pool, testbed_env};
use covi_tests::{admin, poll, run, wait_until};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use virt::connect::Connect;

const RELEASE: &str = "covi";
const SYSTEM: &str = "covi-system";
const POOL_LABEL: &str = "node-test";
const STORAGE_POOL: &str = "covi-node-test";
const DEADLINE: Duration = Duration::from_secs(120);

/// What `helm install` and `helm upgrade` are given: the images the test bed imported
/// into the node's containerd, the node's libvirtd, and a label for the test's pool.
fn values(tag: &str) -> Vec<String> {
    [
        format!("image.registry={}", testbed_env("COVI_IMAGE_REGISTRY")),
        format!("image.tag={tag}"),
        "agent.libvirtUri=qemu:///system".to_string(),
        format!("agent.hostLabels.covi\\.io/pool={POOL_LABEL}"),
    ]
    .into_iter()
    .flat_map(|v| ["--set".to_string(), v])
    .collect()
}

/// `kubectl get events` of one object: the reasons, space-separated.
fn event_reasons(namespace: &str, name: &str) -> (bool, String, String) {
    let selector = format!("--field-selector=involvedObject.name={name}");
    run("kubectl", &["get", "events", "-n", namespace, &selector, "-o=jsonpath={.items[*].reason}"], None)
}

fn helm(args: &[&str]) -> String {
    let (ok, out, err) = run("helm", args, None);
    assert!(ok, "helm {}:\n{out}\n{err}\n{}", args.join(" "), diagnose());
    out
}

/// The state of covi's pods, their logs and the node's kubelet, for a failure message.
fn diagnose() -> String {
    let (_, pods, _) = run("kubectl", &["get", "pods", "-n", SYSTEM, "-o", "wide"], None);
    let (_, events, _) = run("kubectl", &["get", "events", "-n", SYSTEM, "--sort-by=.lastTimestamp"], None);
    let (_, op, _) = run("kubectl", &["logs", "-n", SYSTEM, "deploy/covi-operator", "--tail=20"], None);
    let (_, agent, _) = run("kubectl", &["logs", "-n", SYSTEM, "ds/covi-agent", "--tail=20"], None);
    let kubelet = std::fs::read_to_string(covi_tests::testbed_dir().join("logs/kubelet.log")).unwrap_or_default();
    let kubelet: Vec<&str> = kubelet.lines().rev().take(15).collect();
    format!(
        "--- pods:\n{pods}\n--- events:\n{events}\n--- operator:\n{op}\n--- agent:\n{agent}\n--- kubelet:\n{}",
        kubelet.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// Removes the release and what the test made, also when the test failed midway: an
/// agent left running would remove the next test's domains from qemu:///system.
struct Installed {
    conn: Connect,
    namespace: String,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("helm", &["uninstall", RELEASE, "-n", SYSTEM, "--wait", "--timeout=60s"], None);
        // With covi gone, nothing releases the servers' finalizers or removes their
        // guests: the test does.
        let (_, uids, _) = run(
            "kubectl",
            &["get", "virtualservers", "-n", &self.namespace, "-o=jsonpath={.items[*].metadata.uid}"],
            None,
        );
        for uid in uids.split_whitespace() {
            if let Ok(dom) = self.conn.lookup_domain_by_uuid_string(uid) {
                let _ = dom.destroy();
                let _ = dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM);
            }
        }
        let (_, names, _) = run("kubectl", &["get", "virtualservers", "-n", &self.namespace, "-o", "name"], None);
        for name in names.lines() {
            let _ = run(
                "kubectl",
                &["patch", name, "-n", &self.namespace, "--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#],
                None,
            );
        }
        let _ = run("kubectl", &["delete", "namespace", &self.namespace, "--wait=false"], None);
        let _ = run("kubectl", &["delete", "hostpool", format!("{POOL_LABEL}-pool").as_str()], None);
    }
}

fn server_ready(s: &VirtualServer) -> bool {
    s.is_ready()
}

async fn leader(client: &Client) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), SYSTEM).get_opt("covi-operator").await.ok()??;
    lease.spec?.holder_identity
}

/// covi's pods of one component (operator or agent).
async fn pods_of(client: &Client, component: &str) -> Vec<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), SYSTEM);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/component={component}"));
    pods.list(&lp).await.map(|l| l.items).unwrap_or_default()
}

async fn operator_pods(client: &Client) -> Vec<Pod> {
    pods_of(client, "operator").await
}

/// The agent pod that runs and is not being deleted.
async fn agent_pod(client: &Client) -> Option<Pod> {
    pods_of(client, "agent")
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
}

fn host_ready(client: &Client, node: &str) -> impl std::future::Future<Output = Option<()>> {
    let hosts = Api::<covi_api::Host>::all(client.clone());
    let node = node.to_string();
    async move {
        let h = hosts.get_opt(&node).await.ok()??;
        covi_api::condition::is_condition_true(&h.status?.conditions, "Ready").then_some(())
    }
}

#[tokio::test]
async fn helm_installs_covi_on_a_real_node() {
    let node = testbed_env("COVI_NODE_NAME");
    let tag = testbed_env("COVI_IMAGE_TAG");
    let next_tag = testbed_env("COVI_IMAGE_NEXT_TAG");
    let uri = "qemu:///system";
    let conn = Connect::open(Some(uri)).unwrap_or_else(|e| panic!("opening {uri}: {e}"));
    fixtures_in(&conn, STORAGE_POOL, "/var/lib/covi-test/node-pool");
    let client = admin().await;
    let namespace = "node-test".to_string();
    let installed = Installed { conn, namespace: namespace.clone() };

    // Installed as the README says, with the locally built images.
    let started = Instant::now();
    let mut install =
        vec!["install", RELEASE, "charts/covi", "--namespace", SYSTEM, "--create-namespace", "--wait", "--timeout=3m"];
    let set = values(&tag);
    install.extend(set.iter().map(String::as_str));
    helm(&install);
    println!("helm install --wait returned after {:?}", started.elapsed());

    // The operator: 2 replicas Available, one of them leads.
    let deployments = Api::<Deployment>::namespaced(client.clone(), SYSTEM);
    let d = deployments.get("covi-operator").await.expect("the operator Deployment");
    let available = d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
    assert_eq!(available, 2, "both operator replicas Available:\n{}", diagnose());
    let pods: Vec<String> = operator_pods(&client).await.iter().map(|p| p.name_any()).collect();
    let first_leader = wait_until("an operator replica to lead", DEADLINE, || async {
        leader(&client).await.filter(|l| pods.contains(l))
    })
    .await;
    println!("operator pods {pods:?}; {first_leader} leads");

    // The agent: the DaemonSet's pod runs on the node, reaches the node's libvirtd
    // through the chart's hostPath mount and registers its Host Ready.
    let agent = agent_pod(&client).await.unwrap_or_else(|| panic!("an agent pod runs\n{}", diagnose()));
    assert_eq!(agent.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(node.as_str()));
    if poll(DEADLINE, || host_ready(&client, &node)).await.is_none() {
        panic!("Host {node} never became Ready\n{}", diagnose());
    }

    // A server runs a real QEMU guest on the node; `kubectl wait` returns.
    let pool_name = format!("{POOL_LABEL}-pool");
    let mut pool_spec = qemu_pool(STORAGE_POOL, false);
    covi_tests::merge(
        &mut pool_spec,
        &json!({
            "nodeSelector": {"covi.io/pool": POOL_LABEL},
            "network": {"cidr": "10.78.0.0/24", "gateway": "10.78.0.1"},
        }),
    );
    let pool = json!({"apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": pool_name}, "spec": pool_spec});
    let (ok, out, err) = run("kubectl", &["apply", "-f", "-"], Some(&pool.to_string()));
    assert!(ok, "kubectl apply the pool: {out}{err}");
    covi_tests::fleet::ensure_namespace(&client, &namespace).await;
    let servers = Api::<VirtualServer>::namespaced(client.clone(), &namespace);
    apply_server(&servers, "web", &pool_name, json!({})).await;
    let (ok, out, err) = run(
        "kubectl",
        &["wait", "--for=condition=Ready", "virtualserver/web", "-n", &namespace, "--timeout=120s"],
        None,
    );
    assert!(ok, "kubectl wait for the server: {out}{err}\n{}", diagnose());
    let web = servers.get("web").await.expect("server");
    let uid = web.uid().expect("uid");
    let dom = installed.conn.lookup_domain_by_uuid_string(&uid).expect("the guest exists in the node's libvirtd");
    assert!(dom.is_active().expect("state"), "the guest runs");
    let guest_id = dom.id().expect("a running domain has an id");

    // Metrics answer through their Services: the operator's ClusterIP (kube-proxy's
    // rules), each agent at its pod's address from the headless Service's endpoints.
    let services = Api::<Service>::namespaced(client.clone(), SYSTEM);
    let svc = services.get("covi-operator-metrics").await.expect("operator metrics Service");
    let ip = svc.spec.and_then(|s| s.cluster_ip).expect("a ClusterIP");
    let metrics = wait_until("the operator's metrics through its Service", DEADLINE, || async {
        get(&format!("{ip}:9465"), "/metrics", Duration::from_secs(5)).await.filter(|m| m.contains("covi_servers"))
    })
    .await;
    assert!(metrics.contains("covi_operator_leader"), "{metrics}");
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), SYSTEM);
    // The agent counts its domains at its next resync (10 s in the chart).
    wait_until("the agent's metrics through its headless Service", DEADLINE, || async {
        let lp = ListParams::default().labels("kubernetes.io/service-name=covi-agent-metrics");
        let slice = slices.list(&lp).await.ok()?.items.into_iter().next()?;
        let addr = slice.endpoints.first()?.addresses.first()?.clone();
        get(&format!("{addr}:9464"), "/metrics", Duration::from_secs(5))
            .await
            .filter(|m| m.contains("covi_agent_domains 1"))
    })
    .await;

    // The console through the chart's objects: the API server reaches an operator pod
    // through the covi-console Service (the operator made the certificates and wrote
    // the caBundle with the chart's RBAC), the operator reaches the agent's pod with
    // the certificate it read from its Secret, and the session opens on the node's
    // libvirtd. (tests/console.rs types into a guest that answers.)
    wait_available(DEADLINE).await;
    let session = Session::start(&["covi", "console", "web", "-n", &namespace]);
    let opened = poll(DEADLINE, || async {
        let (ok, reasons, _) = event_reasons(&namespace, "web");
        (ok && reasons.contains("ConsoleOpened")).then_some(())
    })
    .await;
    assert!(opened.is_some(), "the console session opened:\n{}\n{}", session.output(), diagnose());
    session.type_bytes(&[ESCAPE]).await;
    let (status, out) = session.ended().await;
    assert!(status.success(), "kubectl covi console ends on Ctrl-]: {status:?}\n{out}");

    // Logs and Events are readable with kubectl, through the kubelet.
    let (ok, logs, err) = run("kubectl", &["logs", "-n", SYSTEM, &agent.name_any()], None);
    assert!(ok && !logs.trim().is_empty(), "kubectl logs of the agent: {err}");
    let (ok, events, err) = event_reasons(&namespace, "web");
    assert!(ok && !events.trim().is_empty(), "the server's Events: {events}{err}");
    println!("the server's Events: {events}");

    // Killing the leader's pod hands over to the standby.
    let killed_at = Instant::now();
    let (ok, out, err) =
        run("kubectl", &["delete", "pod", &first_leader, "-n", SYSTEM, "--grace-period=0", "--force"], None);
    assert!(ok, "kubectl delete the leader's pod: {out}{err}");
    // The standby, or the pod that replaced the killed one, takes the Lease over.
    let second_leader = poll(DEADLINE, || async { leader(&client).await.filter(|l| *l != first_leader) }).await;
    let Some(second_leader) = second_leader else {
        panic!("no other replica took over from {first_leader} (holder: {:?})\n{}", leader(&client).await, diagnose());
    };
    let running: Vec<String> = operator_pods(&client).await.iter().map(|p| p.name_any()).collect();
    assert!(running.contains(&second_leader), "the new leader {second_leader} is a running pod: {running:?}");
    println!("{second_leader} leads {:?} after the leader's pod was killed", killed_at.elapsed());
    // The new leader schedules: a second server runs.
    apply_server(&servers, "db", &pool_name, json!({})).await;
    if poll(DEADLINE, || async { servers.get("db").await.ok().filter(server_ready) }).await.is_none() {
        panic!("the new leader did not bring up server db\n{}", diagnose());
    }

    // helm upgrade to new images rolls the agent: the guests keep running (same QEMU
    // process), the host is never lost, no server moves or is started twice.
    let old_agent = agent_pod(&client).await.expect("agent pod").uid().expect("uid");
    let watch = tokio::spawn(watch_servers(servers.clone(), vec!["web".into(), "db".into()]));
    let mut upgrade = vec!["upgrade", RELEASE, "charts/covi", "--namespace", SYSTEM, "--wait", "--timeout=3m"];
    let set = values(&next_tag);
    upgrade.extend(set.iter().map(String::as_str));
    helm(&upgrade);
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), SYSTEM);
    let rolled = wait_until("the agent pod to be replaced", DEADLINE, || async {
        let ds = daemonsets.get("covi-agent").await.ok()?;
        let st = ds.status?;
        let done = st.updated_number_scheduled == Some(1) && st.number_available == Some(1);
        let pod = agent_pod(&client).await?;
        (done && pod.uid()? != old_agent).then_some(pod)
    })
    .await;
    let image = rolled.spec.as_ref().map(|s| s.containers[0].image.clone().unwrap_or_default()).unwrap_or_default();
    assert!(image.ends_with(&format!(":{next_tag}")), "the new agent runs the new image: {image}");
    if poll(DEADLINE, || host_ready(&client, &node)).await.is_none() {
        panic!("Host {node} not Ready after the upgrade\n{}", diagnose());
    }
    // The watch goes on until the new agent has compared its host's domains with the
    // servers (its first resync counts both guests).
    let pod_ip = rolled.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("the new agent pod's address");
    let resynced = poll(DEADLINE, || async {
        get(&format!("{pod_ip}:9464"), "/metrics", Duration::from_secs(5))
            .await
            .filter(|m| m.contains("covi_agent_domains 2"))
    })
    .await;
    assert!(resynced.is_some(), "the new agent counts both guests\n{}", diagnose());
    watch.abort();
    if let Err(e) = watch.await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
    let dom = installed.conn.lookup_domain_by_uuid_string(&uid).expect("the guest still exists");
    assert!(dom.is_active().expect("state"), "the guest kept running through the upgrade");
    assert_eq!(dom.id().expect("id"), guest_id, "the same QEMU process, never restarted");
    for name in ["web", "db"] {
        let s = servers.get(name).await.expect("server");
        assert!(server_ready(&s), "{name} Ready after the upgrade: {:?}", s.status);
        assert_eq!(s.status.as_ref().and_then(|st| st.host.clone()).as_deref(), Some(node.as_str()));
    }
    // Neither the servers (FailedOver) nor the Host (HeartbeatMissed, HostLost) have
    // Events of a missed heartbeat (other tests' objects share the test bed: only ours).
    let (ok, events, err) = run(
        "kubectl",
        &[
            "get",
            "events",
            "-A",
            "-o=jsonpath={range .items[*]}{.involvedObject.namespace}/{.involvedObject.name} {.reason}{\"\\n\"}{end}",
        ],
        None,
    );
    assert!(ok, "kubectl get events: {err}");
    let ours = [format!("/{node}"), format!("{namespace}/web"), format!("{namespace}/db")];
    let ours: Vec<&str> = events.lines().filter(|l| ours.iter().any(|o| l.starts_with(&format!("{o} ")))).collect();
    for bad in ["FailedOver", "HeartbeatMissed", "HostLost"] {
        assert!(
            !ours.iter().any(|l| l.ends_with(&format!(" {bad}"))),
            "no {bad} Event through a rolling update:\n{}",
            ours.join("\n")
        );
    }

    // Uninstalling while keeping the guests, as the README says: the agents stop first,
    // with their credentials (their last renewal records the restart grace, so nothing
    // fences); a bare `helm uninstall` deletes their RBAC with them, they cannot renew,
    // and fence their hosts like any cut-off agent. Then helm uninstall: the operator
    // goes; CRDs, servers and running guests stay. The agent's last words are kept: its
    // pod, and so `kubectl logs`, goes with it.
    let agent_log = covi_tests::testbed_dir().join("logs/node-agent-at-uninstall.log");
    let mut follow = std::process::Command::new("kubectl")
        .args(["logs", "--follow", "-n", SYSTEM, "ds/covi-agent"])
        .stdout(std::fs::File::create(&agent_log).expect("log file"))
        .spawn()
        .expect("kubectl logs --follow");
    let (ok, out, err) = run(
        "kubectl",
        &["delete", "daemonset", "covi-agent", "-n", SYSTEM, "--cascade=foreground", "--timeout=2m"],
        None,
    );
    assert!(ok, "kubectl delete the agents: {out}{err}\n{}", diagnose());
    helm(&["uninstall", RELEASE, "--namespace", SYSTEM, "--wait", "--timeout=2m"]);
    let gone = poll(DEADLINE, || async {
        let pods = Api::<Pod>::namespaced(client.clone(), SYSTEM);
        pods.list(&ListParams::default().labels("app.kubernetes.io/name=covi"))
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "covi's pods are gone after helm uninstall\n{}", diagnose());
    let (ok, out, err) = run("kubectl", &["get", "crd", "virtualservers.covi.io"], None);
    assert!(ok, "the CRDs stay: {out}{err}");
    assert!(servers.get_opt("web").await.expect("get").is_some(), "the servers stay");
    // The stream ended with the pod; stop it in any case.
    let _ = follow.kill();
    let _ = follow.wait();
    let last_words = std::fs::read_to_string(&agent_log).unwrap_or_default();
    let running = installed.conn.lookup_domain_by_uuid_string(&uid).expect("guest").is_active().expect("state");
    assert!(running, "the guest keeps running after helm uninstall; the agent's last log:\n{last_words}");
    assert!(
        last_words.contains("stopping; the guests keep running") && !last_words.contains("fenced"),
        "the agent stopped without fencing:\n{last_words}"
    );
    drop(installed);
}

/// Watches servers `names` until aborted; panics (failing the task) the moment one is
/// not Ready or leaves its host.
async fn watch_servers(api: Api<VirtualServer>, names: Vec<String>) {
    let mut hosts = std::collections::BTreeMap::new();
    loop {
        for name in &names {
            if let Ok(s) = api.get(name).await {
                let host = s.status.as_ref().and_then(|st| st.host.clone());
                let first = hosts.entry(name.clone()).or_insert_with(|| host.clone());
                assert_eq!(*first, host, "{name} moved during the rolling update");
                assert!(server_ready(&s), "{name} not Ready during the rolling update: {:?}", s.status);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
