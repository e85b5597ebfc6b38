//! Objects for unit tests, written as the API server would return them: a base
//! object with `extra` merged over it (objects merge key by key, anything else
//! replaces).

use std::sync::Arc;

use covi_api::{Host, HostPool, VirtualServer, VmRequest};
use serde_json::{Value, json};

/// `extra` merged into `base`.
pub fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(base), Value::Object(extra)) => {
            for (k, v) in extra {
                merge(base.entry(k).or_insert(Value::Null), v);
            }
        }
        (base, extra) => *base = extra,
    }
}

fn object<K: serde::de::DeserializeOwned>(mut base: Value, extra: Value) -> K {
    merge(&mut base, extra);
    serde_json::from_value(base).expect("a valid test object")
}

/// A condition at generation 1, set at the start of 2026.
pub fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

/// Pool idc-a: hosts labelled covi.io/pool=a, class small (1 CPU, 1 GiB), no overcommit.
pub fn pool(extra: Value) -> HostPool {
    object(
        json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "HostPool",
            "metadata": {"name": "idc-a", "generation": 1},
            "spec": {
                "nodeSelector": {"covi.io/pool": "a"},
                "overcommit": {"cpu": 1, "memory": 1}, "reserve": {"cpus": 0, "memory": "0"},
                "storage": {"pool": "p", "shared": true},
                "images": [{"name": "debian-12", "volume": "d.img"}],
                "classes": [{"name": "small", "cpus": 1, "memory": "1Gi", "disk": "10Gi"}],
                "network": {"bridge": "br0", "cidr": "10.20.0.0/24", "gateway": "10.20.0.1"}
            }
        }),
        extra,
    )
}

/// Host `name` of pool idc-a, 4 CPUs and 64 GiB, Ready.
pub fn host(name: &str, extra: Value) -> Arc<Host> {
    Arc::new(object(
        json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "Host",
            "metadata": {"name": name, "labels": {"covi.io/pool": "a"}},
            "spec": {},
            "status": {"capacity": {"cpus": 4, "memory": "64Gi"},
                       "conditions": [condition("Ready", "True", "AgentReady", "ok")]}
        }),
        extra,
    ))
}

/// Server `name` in namespace ns of pool idc-a, class small, at generation 1.
pub fn server(name: &str, extra: Value) -> Arc<VirtualServer> {
    Arc::new(object(
        json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "generation": 1,
                         "resourceVersion": "7", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"hostPool": "idc-a", "class": "small", "boot": {"image": "debian-12"},
                     "owner": "o", "purpose": "p"}
        }),
        extra,
    ))
}

/// Request web in namespace ns for `replicas` small servers of pool idc-a.
pub fn request(replicas: i32, extra: Value) -> VmRequest {
    object(
        json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "VmRequest",
            "metadata": {"name": "web", "namespace": "ns", "uid": "uid-web", "generation": 1},
            "spec": {"replicas": replicas, "reason": "r",
                     "template": {"spec": {"hostPool": "idc-a", "class": "small", "boot": {"image": "debian-12"},
                                           "owner": "o", "purpose": "p"}}}
        }),
        extra,
    )
}

/// The keys of `value`'s top-level object, sorted.
pub fn keys(value: &impl serde::Serialize) -> Vec<String> {
    let mut keys: Vec<String> = serde_json::to_value(value).unwrap().as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}
