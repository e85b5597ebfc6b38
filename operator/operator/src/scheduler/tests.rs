use super::*;
use serde_json::json;

fn pool() -> HostPool {
    serde_json::from_value(json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": "idc-a"},
        "spec": {
            "nodeSelector": {"covi.io/pool": "a"},
            "overcommit": {"cpu": 1, "memory": 1},
            "reserve": {"cpus": 0, "memory": "0"},
            "storage": {"pool": "p", "shared": true},
            "images": [{"name": "debian-12", "volume": "d.img"}],
            "classes": [{"name": "small", "cpus": 1, "memory": "1Gi", "disk": "10Gi"}],
            "network": {"bridge": "br0", "cidr": "10.20.0.0/24", "gateway": "10.20.0.1"}
        }
    }))
    .unwrap()
}

fn host(name: &str, cpus: u32, ready: bool) -> Arc<Host> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "Host",
            "metadata": {"name": name, "labels": {"covi.io/pool": "a"}},
            "spec": {},
            "status": {
                "capacity": {"cpus": cpus, "memory": "64Gi"},
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                    "reason": "r", "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
            }
        }))
        .unwrap(),
    )
}

fn server(name: &str, extra: serde_json::Value) -> Arc<VirtualServer> {
    let mut spec =
        json!({"hostPool": "idc-a", "class": "small", "boot": {"image": "debian-12"}, "owner": "o", "purpose": "p"});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec
        }))
        .unwrap(),
    )
}

/// The view a pass has of `pool`, from test fixtures.
fn view<'a>(
    pool: &'a HostPool,
    hosts: &[Arc<Host>],
    servers: &[Arc<VirtualServer>],
    assumed: &'a HashMap<String, Assumed>,
    unready: &'a BTreeSet<String>,
    lost: &'a BTreeSet<String>,
) -> PoolView<'a> {
    PoolView { pool, hosts: hosts.to_vec(), servers: servers.to_vec(), assumed, unready, lost }
}

fn bind_of(d: &Decision) -> (&str, String) {
    match d {
        Decision::Bind { host, address, .. } => (host.as_str(), address.unwrap().to_string()),
        other => panic!("expected a binding, got {other:?}"),
    }
}

#[test]
fn pending_servers_get_a_host_and_distinct_addresses() {
    let hosts = [host("h1", 4, true), host("h2", 4, true)];
    let servers: Vec<_> = (0..4).map(|i| server(&format!("s{i}"), json!({}))).collect();
    let decisions = pass(&view(&pool(), &hosts, &servers, &HashMap::new(), &BTreeSet::new(), &BTreeSet::new()), true);
    let addresses: BTreeSet<_> = decisions.iter().map(|(_, d)| bind_of(d).1).collect();
    assert_eq!(addresses.len(), 4);
    assert!(addresses.contains("10.20.0.2"), "{addresses:?}");
    let on_h1 = decisions.iter().filter(|(_, d)| bind_of(d).0 == "h1").count();
    assert_eq!(on_h1, 2, "spread evenly");
}

#[test]
fn assumed_bindings_count_for_capacity_and_addresses() {
    let hosts = [host("h1", 1, true)];
    let servers = [server("old", json!({})), server("new", json!({}))];
    let assumed: HashMap<_, _> =
        [("uid-old".to_string(), Assumed { host: "h1".into(), address: Some("10.20.0.2".parse().unwrap()) })].into();
    let decisions = pass(&view(&pool(), &hosts, &servers, &assumed, &BTreeSet::new(), &BTreeSet::new()), true);
    assert_eq!(decisions.len(), 1);
    match &decisions[0].1 {
        Decision::Pending { reason, message } => {
            assert_eq!(*reason, "InsufficientCPU");
            assert!(message.starts_with("no host in pool idc-a has 1 free CPUs; the largest free is 0"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_input_is_invalid_with_a_reason() {
    let hosts = [host("h1", 8, true)];
    let servers = [
        server("a", json!({"class": "huge"})),
        server("b", json!({"boot": {"image": "windows"}})),
        server("c", json!({"network": {"address": "10.99.0.5"}})),
        server("d", json!({"network": {"address": "10.20.0.50"}})),
        server("e", json!({"network": {"address": "10.20.0.50"}})),
    ];
    let decisions = pass(&view(&pool(), &hosts, &servers, &HashMap::new(), &BTreeSet::new(), &BTreeSet::new()), true);
    let reasons: Vec<_> = decisions
        .iter()
        .map(|(_, d)| match d {
            Decision::Invalid { reason, .. } | Decision::Pending { reason, .. } => *reason,
            Decision::Bind { .. } => "Bind",
            Decision::HostLost { .. } => "HostLost",
        })
        .collect();
    assert_eq!(reasons, ["ClassNotFound", "ImageNotFound", "AddressOutsideNetwork", "Bind", "AddressTaken"]);
}

#[test]
fn unready_hosts_take_nothing() {
    let hosts = [host("h1", 8, false)];
    let decisions = pass(
        &view(&pool(), &hosts, &[server("a", json!({}))], &HashMap::new(), &BTreeSet::new(), &BTreeSet::new()),
        true,
    );
    assert!(matches!(&decisions[0].1, Decision::Pending { reason: "NoReadyHost", .. }), "{decisions:?}");
}

fn bound(name: &str, host: &str, ha: bool) -> Arc<VirtualServer> {
    let mut s = (*server(name, json!({"highAvailability": ha}))).clone();
    s.status = Some(covi_api::VirtualServerStatus {
        host: Some(host.into()),
        address: Some(format!("10.20.0.{}", 10 + name.len())),
        ..Default::default()
    });
    Arc::new(s)
}

#[test]
fn lost_host_servers_restart_elsewhere_or_fail() {
    let hosts = [host("h1", 8, true), host("h2", 8, true)];
    let servers = [bound("ha", "h1", true), bound("plain", "h1", false)];
    let lost: BTreeSet<String> = ["h1".to_string()].into();
    let decisions = pass(&view(&pool(), &hosts, &servers, &HashMap::new(), &lost, &lost), true);
    let by_name: HashMap<_, _> = decisions.iter().map(|(s, d)| (s.name_any(), d.clone())).collect();
    match &by_name["ha"] {
        Decision::Bind { host, address, failover_from, .. } => {
            assert_eq!(host, "h2");
            assert_eq!(failover_from.as_deref(), Some("h1"));
            assert_eq!(address.unwrap().to_string(), "10.20.0.12", "the server keeps its address");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(by_name["plain"], Decision::HostLost { host: "h1".into() });
}

#[test]
fn a_source_lost_during_a_live_migration_hands_the_server_to_the_target() {
    let hosts = [host("h1", 8, true), host("h2", 8, true), host("h3", 8, true)];
    let moving = |ha: bool| {
        let mut s = (*bound("web", "h1", ha)).clone();
        let status = s.status.as_mut().unwrap();
        status.migration = Some(covi_api::virtual_server::MigrationStatus {
            source: "h1".into(),
            target: "h3".into(),
            phase: covi_api::virtual_server::MigrationPhase::Running,
            mode: Some("Live".into()),
            started_at: None,
            finished_at: None,
            reason: None,
        });
        Arc::new(s)
    };
    let lost: BTreeSet<String> = ["h1".to_string()].into();
    // Highly available or not, the guest may already run on h3: the server goes there
    // (h2 would be the emptier choice), keeping its address.
    for ha in [true, false] {
        let decisions = pass(&view(&pool(), &hosts, &[moving(ha)], &HashMap::new(), &lost, &lost), true);
        match &decisions[0].1 {
            Decision::Bind { host, address, failover_from, .. } => {
                assert_eq!(host, "h3", "ha={ha}");
                assert_eq!(failover_from.as_deref(), Some("h1"));
                assert_eq!(address.unwrap().to_string(), "10.20.0.13");
            }
            other => panic!("ha={ha}: {other:?}"),
        }
    }
    // The target lost too: the usual failover.
    let both: BTreeSet<String> = ["h1".to_string(), "h3".to_string()].into();
    let decisions = pass(&view(&pool(), &hosts, &[moving(true)], &HashMap::new(), &both, &both), true);
    assert!(matches!(&decisions[0].1, Decision::Bind { host, .. } if host == "h2"), "{decisions:?}");
}

#[test]
fn without_shared_storage_highly_available_servers_are_not_restarted_blank() {
    let mut local = pool();
    local.spec.storage.shared = false;
    let hosts = [host("h1", 8, true), host("h2", 8, true)];
    let servers = [bound("ha", "h1", true)];
    let lost: BTreeSet<String> = ["h1".to_string()].into();
    let decisions = pass(&view(&local, &hosts, &servers, &HashMap::new(), &lost, &lost), true);
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0].1, Decision::HostLost { host: "h1".into() }, "its disk stays on h1");
}

#[test]
fn without_failover_servers_of_lost_hosts_stay_put() {
    let hosts = [host("h1", 8, true), host("h2", 8, true)];
    let servers = [bound("ha", "h1", true)];
    let lost: BTreeSet<String> = ["h1".to_string()].into();
    assert!(pass(&view(&pool(), &hosts, &servers, &HashMap::new(), &lost, &lost), false).is_empty());
}

#[test]
fn a_failover_that_fits_nowhere_waits_with_the_reason() {
    let hosts = [host("h1", 8, true), host("h2", 0, true)];
    let servers = [bound("ha", "h1", true)];
    let lost: BTreeSet<String> = ["h1".to_string()].into();
    let decisions = pass(&view(&pool(), &hosts, &servers, &HashMap::new(), &lost, &lost), true);
    match &decisions[0].1 {
        Decision::Pending { message, .. } => {
            assert!(message.contains("1 host not ready, 1 host short of CPUs"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_assumed_binding_wins_over_the_stale_status() {
    let hosts = [host("h1", 8, true), host("h2", 8, true)];
    let servers = [bound("ha", "h1", true)];
    let lost: BTreeSet<String> = ["h1".to_string()].into();
    let assumed: HashMap<_, _> = [("uid-ha".to_string(), Assumed { host: "h2".into(), address: None })].into();
    assert!(pass(&view(&pool(), &hosts, &servers, &assumed, &lost, &lost), true).is_empty(), "no second failover");
}

#[test]
fn an_address_two_servers_hold_is_found() {
    let a = bound("a", "h1", false); // 10.20.0.11
    let b = bound("b", "h2", false); // 10.20.0.11 as well
    let cc = bound("cc", "h1", false); // 10.20.0.12
    let found = duplicate_addresses(&[a, b, cc], &HashMap::new());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[&"10.20.0.11".parse().unwrap()], ["ns/a", "ns/b"]);
}

#[test]
fn a_deleted_server_on_a_lost_host_is_released_unless_it_is_moving() {
    let bound = |host: &str, extra: serde_json::Value| {
        let mut s = (*server("s", json!({}))).clone();
        let mut status = json!({"host": host});
        for (k, v) in extra.as_object().unwrap() {
            status[k] = v.clone();
        }
        s.status = Some(serde_json::from_value(status).unwrap());
        s
    };
    let hosts: BTreeSet<String> = ["h1".to_string(), "h2".to_string()].into();
    let lost: BTreeSet<String> = ["h2".to_string()].into();
    let none = HashMap::new();
    assert_eq!(release_reason(&bound("h1", json!({})), &none, &hosts, &lost), None, "its agent releases it");
    let on_lost = release_reason(&bound("h2", json!({})), &none, &hosts, &lost).unwrap();
    assert!(on_lost.contains("its host h2 is lost"), "{on_lost}");
    assert!(release_reason(&bound("gone", json!({})), &none, &hosts, &lost).unwrap().contains("no longer exists"));
    assert!(release_reason(&server("s", json!({})), &none, &hosts, &lost).is_some(), "never bound");
    let moving = bound("h2", json!({"migration": {"source": "h2", "target": "h1", "phase": "Running"}}));
    assert_eq!(release_reason(&moving, &none, &hosts, &lost), None, "the target may run it");
}
