//! This host in the API: its Host object (facts and Ready) and its Lease (heartbeat).

use std::collections::BTreeMap;
use std::time::Duration;

use covi_api::condition::{ConditionStatus, set_condition};
use covi_api::{Condition, Host, HostPool};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::error::Result;
use crate::libvirt::HostFacts;

/// Field manager of everything the agent writes.
pub const MANAGER: &str = "covi-agent";

/// Renewal period when the host's pool does not say.
pub const DEFAULT_RENEW: Duration = Duration::from_secs(2);

/// Creates or updates this host's Host object: labels from the agent's flags, status
/// from libvirt's facts. The spec (cordon, maintenance) is the administrator's.
pub async fn register(
    client: &Client,
    node: &str,
    labels: &BTreeMap<String, String>,
    address: Option<&str>,
    facts: &HostFacts,
    conditions: &mut Vec<Condition>,
) -> Result<()> {
    let api: Api<Host> = Api::all(client.clone());
    let host = json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "Host",
        "metadata": {"name": node, "labels": labels},
        "spec": {}
    });
    let params = PatchParams::apply(MANAGER).force();
    api.patch(node, &params, &Patch::Apply(&host)).await?;
    set_condition(
        conditions,
        "Ready",
        ConditionStatus::True,
        "AgentReady",
        format!(
            "covi-agent reaches {} {} through libvirt {}",
            facts.driver, facts.hypervisor_version, facts.libvirt_version
        ),
        None,
        Timestamp::now(),
    );
    let status = json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "Host",
        "status": {
            "hypervisor": {"type": facts.driver, "version": facts.hypervisor_version},
            "libvirtVersion": facts.libvirt_version,
            "address": address,
            "capacity": {
                "cpus": facts.cpus,
                "memory": format!("{}Mi", facts.memory_kib / 1024),
            },
            "conditions": conditions,
        }
    });
    api.patch_status(node, &params, &Patch::Apply(&status)).await?;
    Ok(())
}

/// The pool whose nodeSelector matches these labels (the first by name, if several do).
pub fn pool_of<'a>(pools: &'a [std::sync::Arc<HostPool>], labels: &BTreeMap<String, String>) -> Option<&'a HostPool> {
    pools
        .iter()
        .filter(|p| p.spec.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
        .min_by_key(|p| p.name_any())
        .map(|p| p.as_ref())
}

/// Renews the host's Lease for ever; a failed renewal is logged and retried at the
/// next tick (self-fencing watches the time since the last success).
pub async fn renew_lease(
    client: Client,
    namespace: String,
    node: String,
    labels: BTreeMap<String, String>,
    pools: Store<HostPool>,
    renewed: tokio::sync::watch::Sender<Option<std::time::Instant>>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    loop {
        let failover = pool_of(&pools.state(), &labels).map(|p| p.spec.failover.clone()).unwrap_or_default();
        let renew = Duration::from_secs(failover.renew_seconds.into());
        let started = std::time::Instant::now();
        match renew_once(&api, &node, failover.lease_duration_seconds).await {
            Ok(()) => {
                let _ = renewed.send(Some(started));
            }
            Err(e) => tracing::warn!(error = %e, "renewing the host lease failed"),
        }
        tokio::time::sleep(renew).await;
    }
}

async fn renew_once(api: &Api<Lease>, node: &str, duration: u32) -> Result<()> {
    let now = MicroTime(Timestamp::now());
    let patch = json!({"spec": {
        "holderIdentity": node,
        "leaseDurationSeconds": duration,
        "renewTime": now,
    }});
    match api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": node},
                "spec": {
                    "holderIdentity": node,
                    "leaseDurationSeconds": duration,
                    "acquireTime": now,
                    "renewTime": now,
                }
            }))
            .expect("a valid Lease");
            api.create(&PostParams::default(), &lease).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pool(name: &str, selector: &[(&str, &str)]) -> Arc<HostPool> {
        let selector: BTreeMap<_, _> = selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": name},
                "spec": {"nodeSelector": selector, "storage": {"pool": "p"},
                         "network": {"bridge": "br0", "cidr": "10.0.0.0/24"}}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_host_belongs_to_the_pool_whose_selector_matches() {
        let pools = [pool("b", &[("covi.io/pool", "b")]), pool("a", &[("covi.io/pool", "a")])];
        let labels: BTreeMap<_, _> = [("covi.io/pool".to_string(), "a".to_string())].into();
        assert_eq!(pool_of(&pools, &labels).unwrap().name_any(), "a");
        assert!(pool_of(&pools, &BTreeMap::new()).is_none());
    }
}
