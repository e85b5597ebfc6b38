//! Assignment: the servers bound to one host, as the operator publishes them for that
//! host's agent.
//!
//! An agent that watched VirtualServers with a field selector on `status.host` would
//! cost the API server every server event times every agent: its watch cache indexes
//! watchers by namespace and name only, so each such watch receives every event and
//! filters it. An Assignment is one object per host, named after it, which its agent
//! watches by `metadata.name`: the API server hands it to that one watcher. It names
//! each bound server with a digest of what the agent acts on, so the agent reads a
//! server (one GET) only when someone else changed it.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::VirtualServer;
use crate::contract::condition_type;
use crate::virtual_server::READY_HOST_LOST;

/// The servers bound to a host, written by covi-operator only. Not in the `covi`
/// category: it names servers of every namespace, which a namespace's viewers must
/// not list (covi-admin reads it).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "covi.io",
    version = "v1alpha1",
    kind = "Assignment",
    doc = "The VirtualServers bound to one Host (of the same name), published by covi-operator for that host's agent. Read-only for everyone else: the truth stays each server's status.host.",
    printcolumn(name = "Servers", type_ = "integer", json_path = ".spec.count"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentSpec {
    /// How many servers are bound to the host.
    #[serde(default)]
    pub count: u32,
    /// The servers whose status.host names the host, ordered by namespace and name.
    #[serde(default)]
    pub servers: Vec<Assigned>,
}

/// One server bound to the host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Assigned {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Changes whenever anything the agent acts on changes (see [`digest`]): not when
    /// only the fields the agent reports itself do.
    pub digest: String,
}

impl Assigned {
    pub fn of(server: &VirtualServer) -> Assigned {
        Assigned {
            namespace: server.metadata.namespace.clone().unwrap_or_default(),
            name: server.metadata.name.clone().unwrap_or_default(),
            uid: server.metadata.uid.clone().unwrap_or_default(),
            digest: digest(server),
        }
    }
}

/// A digest of a server without what its agent reports itself (phase, domain UUID,
/// observed generation, the Ready condition, usage, its last start) and without bookkeeping that
/// changes with every write (resourceVersion, managedFields). The agent's own status
/// writes therefore leave it unchanged, and the operator has nothing to publish for
/// them; everything written by anyone else (spec, labels, deletion, finalizers, the
/// binding, a migration step, an address) changes it.
///
/// The operator writes phase and Ready of a bound server itself only when it binds it
/// (the binding changes the digest) or says for the silent agent of a lost host that
/// the server is down (Ready reason [`READY_HOST_LOST`]): that Ready condition is in the
/// digest, so the agent learns of it and takes phase and Ready back once it runs the
/// server again (which in turn changes the digest once).
///
/// FNV-1a over the JSON with sorted keys: the same on every build.
pub fn digest(server: &VirtualServer) -> String {
    let mut value = serde_json::to_value(server).unwrap_or_default();
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        for field in ["resourceVersion", "managedFields"] {
            meta.remove(field);
        }
    }
    if let Some(status) = value.get_mut("status").and_then(|s| s.as_object_mut()) {
        for field in ["phase", "domainUuid", "observedGeneration", "usage", "lastStart"] {
            status.remove(field);
        }
        if let Some(conditions) = status.get_mut("conditions").and_then(|c| c.as_array_mut()) {
            conditions.retain(|c| {
                c.get("type").and_then(|t| t.as_str()) != Some(condition_type::READY)
                    || c.get("reason").and_then(|r| r.as_str()) == Some(READY_HOST_LOST)
            });
        }
    }
    let text = serde_json::to_string(&sorted(value)).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The same value with every object's keys in order, whatever map serde_json uses.
fn sorted(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let ordered: std::collections::BTreeMap<_, _> = map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            serde_json::Value::Object(ordered.into_iter().collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(patch: serde_json::Value) -> VirtualServer {
        let mut value = json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
            "metadata": {"name": "web", "namespace": "team", "uid": "u1", "resourceVersion": "10", "generation": 1,
                         "labels": {"app": "web"}, "finalizers": ["covi.io/domain"]},
            "spec": {"hostPool": "p", "class": "small", "boot": {"image": "debian"}, "owner": "o", "purpose": "p"},
            "status": {"host": "h1", "phase": "Scheduled", "observedGeneration": 1, "address": "10.0.0.5",
                       "conditions": [
                           {"type": "Scheduled", "status": "True", "reason": "Bound", "message": "bound to host h1",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"},
                           {"type": "Ready", "status": "False", "reason": "Scheduled", "message": "waiting",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        });
        merge(&mut value, &patch);
        serde_json::from_value(value).unwrap()
    }

    fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
            (t, p) => *t = p.clone(),
        }
    }

    #[test]
    fn what_the_agent_reports_itself_leaves_the_digest_alone() {
        let before = digest(&server(json!({})));
        let reported = server(json!({
            "metadata": {"resourceVersion": "11", "managedFields": [{"manager": "covi-agent"}]},
            "status": {"phase": "Running", "domainUuid": "u1", "observedGeneration": 1,
                       "usage": {"intervalSeconds": 3600, "samples": 12},
                       "lastStart": {"host": "h1", "at": "2026-01-01T00:00:30Z", "count": 2},
                       "conditions": [
                           {"type": "Scheduled", "status": "True", "reason": "Bound", "message": "bound to host h1",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"},
                           {"type": "Ready", "status": "True", "reason": "Running", "message": "running on h1",
                            "lastTransitionTime": "2026-01-01T00:01:00Z"}]}
        }));
        assert_eq!(digest(&reported), before);
    }

    #[test]
    fn what_anyone_else_writes_changes_the_digest() {
        let before = digest(&server(json!({})));
        let changes = [
            json!({"metadata": {"generation": 2}, "spec": {"class": "large"}}),
            json!({"metadata": {"labels": {"app": "db"}}}),
            json!({"metadata": {"deletionTimestamp": "2026-01-01T00:02:00Z"}}),
            json!({"metadata": {"finalizers": []}}),
            json!({"status": {"host": "h2"}}),
            json!({"status": {"address": "10.0.0.6"}}),
            json!({"status": {"migration": {"source": "h1", "target": "h2", "phase": "Running"}}}),
        ];
        for change in changes {
            assert_ne!(digest(&server(change.clone())), before, "{change} left the digest unchanged");
        }
    }

    #[test]
    fn what_the_operator_says_for_a_silent_agent_changes_the_digest() {
        let before = digest(&server(json!({})));
        let lost = server(json!({"status": {"phase": "Failed", "conditions": [
            {"type": "Scheduled", "status": "True", "reason": "Bound", "message": "bound to host h1",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Ready", "status": "False", "reason": "HostLost", "message": "host h1 was lost",
             "lastTransitionTime": "2026-01-01T00:03:00Z"}]}}));
        assert_ne!(digest(&lost), before, "the agent must see the operator's HostLost to take it back");
    }

    #[test]
    fn the_digest_does_not_depend_on_key_order() {
        let a: VirtualServer = server(json!({"metadata": {"labels": {"a": "1", "b": "2"}}}));
        let b: VirtualServer = server(json!({"metadata": {"labels": {"b": "2", "a": "1"}}}));
        assert_eq!(digest(&a), digest(&b));
        assert_eq!(digest(&a).len(), 16);
    }
}
