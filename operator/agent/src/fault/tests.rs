use super::*;
use covi_api::disruption::{DisruptionSpec, Fault, PartitionFault, ServerSelector};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

const T0: i64 = 1_700_000_000;

#[test]
fn windows_once_and_on_a_schedule() {
    let min = Duration::from_secs(60);
    assert_eq!(window(T0, min, None, T0 - 1), None, "not before it exists");
    assert_eq!(window(T0, min, None, T0), Some((T0, T0 + 60)));
    assert_eq!(window(T0, min, None, T0 + 59), Some((T0, T0 + 60)));
    assert_eq!(window(T0, min, None, T0 + 60), None, "once: over");
    let every = Some(Duration::from_secs(600));
    assert_eq!(window(T0, min, every, T0 + 700), None, "between windows");
    assert_eq!(window(T0, min, every, T0 + 1210), Some((T0 + 1200, T0 + 1260)), "the third window");
}

fn disruption(name: &str, kind: FaultKind, selector: ServerSelector, partition: Option<PartitionFault>) -> Disruption {
    let mut d = Disruption::new(
        name,
        DisruptionSpec {
            selector,
            fault: Fault { kind, network: None, partition },
            duration: "60s".into(),
            every: None,
        },
    );
    d.metadata.namespace = Some("db".into());
    d.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(T0).unwrap()));
    d
}

fn server(ns: &str, name: &str, labels: &[(&str, &str)], address: Option<&str>) -> VirtualServer {
    let mut s: VirtualServer = serde_json::from_value(serde_json::json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
        "spec": {"hostPool": "p", "resources": {"cpus": 1, "memory": "1Gi", "disk": "1Gi"}, "boot": {"image": "i"}, "owner": "o", "purpose": "p"},
    }))
    .unwrap();
    s.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    s.status = Some(covi_api::VirtualServerStatus { address: address.map(str::to_string), ..Default::default() });
    s
}

fn names(names: &[&str]) -> ServerSelector {
    ServerSelector { names: names.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

#[test]
fn a_selector_never_reaches_another_namespace_nor_servers_elsewhere() {
    let here = [server("db", "a", &[("role", "db")], None), server("web", "a", &[("role", "db")], None)];
    let by_label =
        ServerSelector { match_labels: [("role".to_string(), "db".to_string())].into(), ..Default::default() };
    let (wanted, _) = plan(&[disruption("k", FaultKind::Kill, by_label, None)], &here, &BTreeMap::new(), T0 + 1);
    assert_eq!(wanted.len(), 1, "{wanted:?}");
    assert_eq!((wanted[0].namespace.as_str(), wanted[0].uid.as_str()), ("db", "uid-a"));
    let (wanted, _) = plan(&[disruption("k", FaultKind::Kill, names(&["b"]), None)], &here, &BTreeMap::new(), T0 + 1);
    assert!(wanted.is_empty(), "b is not on this host");
    let (wanted, _) = plan(&[disruption("k", FaultKind::Pause, names(&["a"]), None)], &here, &BTreeMap::new(), T0 + 61);
    assert!(wanted.is_empty(), "the window is over");
    let mut deleted = disruption("k", FaultKind::Pause, names(&["a"]), None);
    deleted.metadata.deletion_timestamp = deleted.metadata.creation_timestamp.clone();
    assert!(plan(&[deleted], &here, &BTreeMap::new(), T0 + 1).0.is_empty(), "a deleted Disruption ends its faults");
}

#[test]
fn a_partition_drops_both_ways_between_addresses() {
    let here = [server("db", "a", &[], Some("10.77.0.5")), server("db", "c", &[], None)];
    let peer = |name: &str, address: Option<&str>| Peer {
        name: name.into(),
        labels: [("side".to_string(), "b".to_string())].into(),
        address: address.map(str::to_string),
    };
    let peers = BTreeMap::from([(
        "db".to_string(),
        vec![peer("a", Some("10.77.0.5")), peer("b", Some("10.77.0.6")), peer("b2", None)],
    )]);
    let from = ServerSelector { match_labels: [("side".to_string(), "b".to_string())].into(), ..Default::default() };
    let partition = PartitionFault { from, direction: Direction::Both };
    let d = disruption("split", FaultKind::Partition, names(&["a", "c"]), Some(partition));
    let (wanted, unplannable) = plan(&[d], &here, &peers, T0 + 1);
    assert_eq!(wanted.len(), 1);
    assert_eq!(
        wanted[0].effect,
        Effect::Partition {
            address: "10.77.0.5".into(),
            peers: vec!["10.77.0.6".into()],
            direction: DirectionKey::Both
        },
        "not itself, not a peer without an address"
    );
    assert_eq!(unplannable.len(), 1, "c has no address: {unplannable:?}");
    assert!(unplannable[0].message.contains("network.cidr"));
    let rules = partition_rules(&wanted).unwrap();
    assert!(rules.contains("ip saddr 10.77.0.5 ip daddr { 10.77.0.6 } drop"), "{rules}");
    assert!(rules.contains("ip saddr { 10.77.0.6 } ip daddr 10.77.0.5 drop"), "{rules}");
    assert_eq!(partition_rules(&[]), None, "no partition: no table");
}

#[test]
fn shaping_uses_a_token_bucket_for_a_rate_alone_and_netem_otherwise() {
    let rate = NetworkFault { rate_kbit: Some(800), ..Default::default() };
    assert_eq!(Shaping::of(&rate).0[..3], ["tbf", "rate", "800kbit"]);
    let delay = NetworkFault {
        delay: Some("100ms".into()),
        jitter: Some("10ms".into()),
        loss_percent: Some(5),
        rate_kbit: Some(800),
        ..Default::default()
    };
    assert_eq!(Shaping::of(&delay).0.join(" "), "netem delay 100ms 10ms loss 5% rate 800kbit");
}
