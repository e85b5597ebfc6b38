//! The inventory's memory: before a deleted server's last finalizer goes, its record
//! (see [`covi_api::history`]) is appended to its namespace's history ConfigMap in the
//! operator's namespace. The server keeps the history finalizer until the record is
//! written, so none is lost to a crash or a partition.

use std::collections::BTreeMap;

use covi_api::condition::find_condition;
use covi_api::contract::condition_type;
use covi_api::history::{self, ServerRecord};
use covi_api::{VirtualServer, VmRequest};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};

use crate::error::{Error, Result};

/// Where history is kept: the operator's namespace.
#[derive(Clone)]
pub struct History {
    client: Client,
    config_maps: Api<ConfigMap>,
    namespace: String,
}

impl History {
    pub fn new(client: Client, namespace: &str) -> History {
        History { config_maps: Api::namespaced(client.clone(), namespace), client, namespace: namespace.to_string() }
    }

    /// Appends the record of `server`, which is being deleted.
    pub async fn record(&self, server: &VirtualServer) -> Result<()> {
        let request = match server.labels().get(covi_api::contract::REQUEST_LABEL) {
            Some(name) => {
                let api: Api<VmRequest> = Api::namespaced(self.client.clone(), &server.namespace().unwrap_or_default());
                Some((name.clone(), api.get_opt(name).await.map_err(|source| self.failed("reading", source))?))
            }
            None => None,
        };
        let record = record_of(server, request.as_ref().map(|(n, r)| (n.as_str(), r.as_ref())));
        let name = history::config_map_name(&record.namespace);
        // Conditional writes: a conflict (another writer, a stale read) is read again.
        let mut conflict = None;
        for _ in 0..5 {
            let existing = self.config_maps.get_opt(&name).await.map_err(|source| self.failed("reading", source))?;
            let result = match existing {
                None => {
                    let (text, _) = history::append("", &record, history::MAX_RECORDS);
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            namespace: Some(self.namespace.clone()),
                            labels: Some(BTreeMap::from([
                                (history::LABEL.to_string(), "true".to_string()),
                                (history::NAMESPACE_LABEL.to_string(), record.namespace.clone()),
                            ])),
                            ..Default::default()
                        },
                        data: Some(BTreeMap::from([(history::KEY.to_string(), text)])),
                        ..Default::default()
                    };
                    self.config_maps.create(&PostParams::default(), &cm).await.map(drop)
                }
                Some(mut cm) => {
                    let data = cm.data.get_or_insert_with(Default::default);
                    let (text, dropped) = history::append(
                        data.get(history::KEY).map(String::as_str).unwrap_or(""),
                        &record,
                        history::MAX_RECORDS,
                    );
                    data.insert(history::KEY.to_string(), text);
                    if dropped > 0 {
                        let annotations = cm.metadata.annotations.get_or_insert_with(Default::default);
                        let before: usize = annotations.get(history::DROPPED).and_then(|d| d.parse().ok()).unwrap_or(0);
                        annotations.insert(history::DROPPED.to_string(), (before + dropped).to_string());
                    }
                    self.config_maps.replace(&name, &PostParams::default(), &cm).await.map(drop)
                }
            };
            match result {
                Ok(()) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => conflict = Some(kube::Error::Api(s)),
                Err(source) => return Err(self.failed("writing", source)),
            }
        }
        Err(self.failed("writing (it kept changing)", conflict.expect("five conflicts")))
    }

    fn failed(&self, what: &str, source: kube::Error) -> Error {
        Error::Write { what: format!("{what} history in namespace {}", self.namespace), source }
    }
}

/// The record of a server being deleted; `request` is its VmRequest's name and the
/// request, if it still exists.
pub fn record_of(server: &VirtualServer, request: Option<(&str, Option<&VmRequest>)>) -> ServerRecord {
    let status = server.status.clone().unwrap_or_default();
    let time = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.map(|t| t.0.to_string()).unwrap_or_default()
    };
    let deleted = server.metadata.deletion_timestamp.as_ref().map(|t| t.0).unwrap_or_else(Timestamp::now);
    let expired_itself = server.spec.expires_at.as_ref().is_some_and(|e| e.0 <= deleted);
    let stamped = server.annotations().get(history::APPROVED_BY).cloned();
    let (approver, ended) = match request {
        None => (None, if expired_itself { "Expired" } else { "Deleted" }),
        Some((_, None)) => (None, "RequestDeleted"),
        Some((_, Some(r))) => {
            let conditions = r.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
            let approver = crate::requests::approver(r);
            let expired = find_condition(conditions, condition_type::EXPIRED).is_some_and(|c| c.status == "True");
            let ended = if expired || expired_itself {
                "Expired"
            } else if r.metadata.deletion_timestamp.is_some() {
                "RequestDeleted"
            } else {
                "Deleted"
            };
            (approver, ended)
        }
    };
    ServerRecord {
        namespace: server.namespace().unwrap_or_default(),
        name: server.name_any(),
        uid: server.uid().unwrap_or_default(),
        owner: server.spec.owner.clone(),
        purpose: server.spec.purpose.clone(),
        pool: server.spec.host_pool.clone(),
        host: status.host.clone(),
        address: status.address.clone(),
        cpus: status.cpus,
        memory: status.memory.clone(),
        disk: server.spec.resources.as_ref().map(|r| r.disk.clone()),
        request: request.map(|(n, _)| n.to_string()),
        approver: stamped.or(approver),
        created: time(server.metadata.creation_timestamp.as_ref()),
        deleted: deleted.to_string(),
        ended: ended.to_string(),
        failovers: status.failovers.len() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(extra: serde_json::Value) -> VirtualServer {
        let mut s = json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "u1",
                "creationTimestamp": "2026-01-01T00:00:00Z", "deletionTimestamp": "2026-03-01T00:00:00Z",
                "annotations": {history::APPROVED_BY: "bob"}},
            "spec": {"hostPool": "general", "owner": "team-web", "purpose": "storefront", "boot": {"image": "d"},
                "resources": {"cpus": 2, "memory": "4Gi", "disk": "20Gi"}},
            "status": {"host": "h1", "address": "10.0.0.5", "cpus": 2, "memory": "4Gi",
                "failovers": [{"from": "h0", "to": "h1", "at": "2026-02-01T00:00:00Z", "reason": "HostLost"}]}});
        crate::fixtures::merge(&mut s, extra);
        serde_json::from_value(s).unwrap()
    }

    fn request(conditions: serde_json::Value, deleting: bool) -> VmRequest {
        let mut r = json!({"apiVersion": "covi.io/v1alpha1", "kind": "VmRequest",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"replicas": 1, "reason": "r", "template": {"spec": {"hostPool": "general", "owner": "o",
                "purpose": "p", "boot": {"image": "d"}}}},
            "status": {"conditions": conditions}});
        if deleting {
            r["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
        }
        serde_json::from_value(r).unwrap()
    }

    #[test]
    fn a_record_says_who_what_where_when_and_how_it_ended() {
        let r = record_of(&server(json!({})), None);
        assert_eq!((r.owner.as_str(), r.purpose.as_str(), r.pool.as_str()), ("team-web", "storefront", "general"));
        assert_eq!(
            (r.host.as_deref(), r.address.as_deref(), r.cpus, r.disk.as_deref()),
            (Some("h1"), Some("10.0.0.5"), Some(2), Some("20Gi"))
        );
        assert_eq!((r.created.as_str(), r.deleted.as_str()), ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"));
        assert_eq!((r.ended.as_str(), r.failovers, r.approver.as_deref()), ("Deleted", 1, Some("bob")));

        let expired = server(json!({"spec": {"expiresAt": "2026-02-15T00:00:00Z"}}));
        assert_eq!(record_of(&expired, None).ended, "Expired");
        let gone = record_of(&server(json!({})), Some(("web", None)));
        assert_eq!((gone.ended.as_str(), gone.request.as_deref()), ("RequestDeleted", Some("web")));
        let deleting = request(json!([]), true);
        assert_eq!(record_of(&server(json!({})), Some(("web", Some(&deleting)))).ended, "RequestDeleted");
        let lapsed = request(
            json!([{"type": "Expired", "status": "True", "reason": "LifetimeEnded", "message": "m",
                    "lastTransitionTime": "2026-03-01T00:00:00Z"}]),
            false,
        );
        assert_eq!(record_of(&server(json!({})), Some(("web", Some(&lapsed)))).ended, "Expired");
        let scaled_down = request(json!([]), false);
        assert_eq!(record_of(&server(json!({})), Some(("web", Some(&scaled_down)))).ended, "Deleted");
    }
}
