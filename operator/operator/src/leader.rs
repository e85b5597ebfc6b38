//! Leader election through a coordination Lease: one replica schedules, the others
//! stand by and take over within the lease duration.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch::Receiver;

use crate::error::Result;

/// Name of the operator's leader Lease.
pub const LEASE: &str = "covi-operator";

/// Starts campaigning; the receiver turns true while this replica leads.
pub async fn campaign(client: Client, namespace: &str, identity: &str, duration: Duration) -> Result<Receiver<bool>> {
    let secs = duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client, LEASE)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(secs)
        // Renew a third of the way before expiry, so one slow call does not lose the lead.
        .with_grace((secs / 3).max(1))
        .build()
        .await?;
    let (leading, _task) = manager.watch().await;
    Ok(leading)
}
