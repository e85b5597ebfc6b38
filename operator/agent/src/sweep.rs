//! Removing covi domains whose server is gone or bound elsewhere, at every resync.

use covi_api::{HostPool, VirtualServer};
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};

use crate::error::Result;
use crate::libvirt::{Libvirt, ObservedDomain};
use crate::server::volume_names;

/// What to do with a covi domain no server on this host claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orphan {
    /// The server still exists and is bound here: the watch has not caught up.
    Keep,
    /// The server is bound to another host: remove the domain, keep its disks (they
    /// are on shared storage and now in use elsewhere).
    RemoveDomain,
    /// The server no longer exists: remove the domain and its disks.
    RemoveAll,
}

/// Decides an orphan's fate from the server the API holds under its name, if any.
pub fn judge(domain: &ObservedDomain, server: Option<&VirtualServer>, node: &str) -> Orphan {
    match server {
        Some(s) if s.uid().as_deref() == Some(domain.owner.uid.as_str()) => {
            let status = s.status.as_ref();
            // A live migration lands the domain here before the server is bound here.
            let arriving = status
                .and_then(|st| st.migration.as_ref())
                .is_some_and(|m| m.phase == covi_api::virtual_server::MigrationPhase::Running && m.target == node);
            if status.and_then(|st| st.host.as_deref()) == Some(node) || arriving {
                Orphan::Keep
            } else {
                Orphan::RemoveDomain
            }
        }
        // Another server now has the name, or none does: the owner is gone.
        _ => Orphan::RemoveAll,
    }
}

/// What a sweep found and did.
pub struct Swept {
    /// Covi domains on the host when the sweep looked.
    pub domains: usize,
    /// Those it removed.
    pub removed: usize,
}

pub async fn sweep(
    client: &Client,
    node: &str,
    hv: &Libvirt,
    servers: &Store<VirtualServer>,
    pools: &Store<HostPool>,
) -> Result<Swept> {
    let known: std::collections::HashSet<String> = servers.state().iter().filter_map(|s| s.uid()).collect();
    let domains = hv.observe().await?;
    tracing::debug!(domains = domains.len(), known = known.len(), "sweeping");
    let mut removed = 0;
    for domain in domains.iter().filter(|d| !known.contains(&d.owner.uid)) {
        let api: Api<VirtualServer> = Api::namespaced(client.clone(), &domain.owner.namespace);
        let server = api.get_opt(&domain.owner.name).await?;
        let verdict = judge(domain, server.as_ref(), node);
        if verdict == Orphan::Keep {
            continue;
        }
        tracing::info!(domain = %domain.name, uid = %domain.owner.uid, ?verdict, "removing a domain no server here claims");
        hv.remove(&domain.uuid).await?;
        if verdict == Orphan::RemoveAll {
            let (disk, seed) = volume_names(&domain.owner.namespace, &domain.owner.name, &domain.owner.uid);
            for pool in pools.state() {
                hv.delete_volumes(&pool.spec.storage.pool, vec![disk.clone(), seed.clone()]).await?;
            }
        }
        removed += 1;
    }
    Ok(Swept { domains: domains.len(), removed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain_xml::Ownership;

    fn domain() -> ObservedDomain {
        ObservedDomain {
            uuid: "u1".into(),
            name: "ns.s".into(),
            active: true,
            running: true,
            owner: Ownership { uid: "u1".into(), namespace: "ns".into(), name: "s".into(), generation: 1 },
            vcpus: 1,
            memory_kib: 1024,
        }
    }

    fn server(uid: &str, host: &str) -> VirtualServer {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
            "metadata": {"name": "s", "namespace": "ns", "uid": uid},
            "spec": {"hostPool": "p", "class": "c", "boot": {"image": "i"}, "owner": "o", "purpose": "p"},
            "status": {"host": host}
        }))
        .unwrap()
    }

    #[test]
    fn orphans_are_judged_by_uid_and_binding() {
        assert_eq!(judge(&domain(), None, "h1"), Orphan::RemoveAll);
        assert_eq!(judge(&domain(), Some(&server("u2", "h1")), "h1"), Orphan::RemoveAll);
        assert_eq!(judge(&domain(), Some(&server("u1", "h2")), "h1"), Orphan::RemoveDomain);
        assert_eq!(judge(&domain(), Some(&server("u1", "h1")), "h1"), Orphan::Keep);
    }

    #[test]
    fn a_domain_arriving_by_live_migration_is_kept() {
        let mut s = server("u1", "h1");
        s.status.as_mut().unwrap().migration = Some(
            serde_json::from_value(serde_json::json!(
                {"source": "h1", "target": "h2", "phase": "Running"}
            ))
            .unwrap(),
        );
        assert_eq!(judge(&domain(), Some(&s), "h2"), Orphan::Keep);
        s.status.as_mut().unwrap().migration.as_mut().unwrap().phase = covi_api::virtual_server::MigrationPhase::Failed;
        assert_eq!(judge(&domain(), Some(&s), "h2"), Orphan::RemoveDomain);
    }
}
