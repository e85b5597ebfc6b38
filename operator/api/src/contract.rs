//! The contract between covi-operator and the agents (and anything else that reads
//! covi's objects): the finalizer, the request label, the field managers each side
//! writes under and the condition types. One definition here; both sides import it.

/// The finalizer that keeps a VirtualServer until its domain and disks are gone: the
/// bound host's agent releases it after cleaning up, the operator when no agent will
/// (never bound, Host gone, host lost).
pub const FINALIZER: &str = "covi.io/domain";

/// Label every server of a VmRequest carries, with the request's name.
pub const REQUEST_LABEL: &str = "covi.io/request";

/// Field managers of covi's server-side applies. Each owns a distinct set of fields,
/// so one writer's apply never drops another's.
pub mod manager {
    /// Everything the operator writes but the sets below: bindings, Host and HostPool
    /// status, request status.
    pub const OPERATOR: &str = "covi-operator";
    /// What the operator writes for a silent agent (a host's Ready, a lost server's
    /// phase); the agent's forced applies take those fields back.
    pub const OPERATOR_FOR_AGENT: &str = "covi-operator-for-agent";
    /// A server's Stalled condition, derived from its phase whoever wrote it.
    pub const OPERATOR_STALLED: &str = "covi-operator-stalled";
    /// A server's `status.migration`.
    pub const OPERATOR_MIGRATION: &str = "covi-operator-migration";
    /// A HostPool's `status.consolidation`.
    pub const OPERATOR_CONSOLIDATION: &str = "covi-operator-consolidation";
    /// A standalone server's ExpiringSoon condition (`spec.expiresAt`).
    pub const OPERATOR_EXPIRY: &str = "covi-operator-expiry";
    /// Everything an agent writes: its Host, its Lease, its servers' phase, Ready and
    /// domain UUID.
    pub const AGENT: &str = "covi-agent";
    /// A highly-available server's `status.lastStart`, written just before each start.
    pub const AGENT_START: &str = "covi-agent-start";
    /// A server's and a Host's `status.usage`, written once per interval by the agent
    /// that measured it.
    pub const AGENT_USAGE: &str = "covi-agent-usage";
}

/// Label on a Host that automatic consolidation emptied: free to power off (by a person
/// or a hook; covi never powers hosts off).
pub const FREED_LABEL: &str = "covi.io/consolidation";

/// Condition types covi writes, one entry per type in each object's `conditions`.
pub mod condition_type {
    /// Every kind: whether the object is what its spec asks (kstatus reads it).
    pub const READY: &str = "Ready";
    /// Every kind: progress stopped until something changes; the reason says what.
    pub const STALLED: &str = "Stalled";
    /// VirtualServer: bound to a host with an address (the operator's).
    pub const SCHEDULED: &str = "Scheduled";
    /// Host: no Lease renewal for longer than the lease and grace.
    pub const LOST: &str = "Lost";
    /// Host: drained for maintenance.
    pub const EVACUATED: &str = "Evacuated";
    /// Host: emptied by automatic consolidation; free to power off.
    pub const FREED: &str = "Freed";
    /// HostPool: failover waits because too many hosts are lost at once.
    pub const FAILOVER_PAUSED: &str = "FailoverPaused";
    /// VmRequest: an approver's (or the pool policy's) approval of one generation.
    pub const APPROVED: &str = "Approved";
    /// VmRequest: an approver's refusal.
    pub const DENIED: &str = "Denied";
    /// VmRequest: grown or changed beyond what was approved.
    pub const APPROVAL_OUTDATED: &str = "ApprovalOutdated";
    /// VmRequest: growth held by the namespace's quota in the pool.
    pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
    /// VmRequest: all servers Ready.
    pub const FULFILLED: &str = "Fulfilled";
    /// VmRequest: the lifetime ends soon.
    pub const EXPIRING_SOON: &str = "ExpiringSoon";
    /// VmRequest: the lifetime ended and the servers were deleted.
    pub const EXPIRED: &str = "Expired";
}

/// A server-side apply patch of a `K`'s status, `{apiVersion, kind, status}`, with the
/// group, version and kind taken from the type rather than typed out by hand.
pub fn status_patch<K: kube::Resource<DynamicType = ()>>(status: impl serde::Serialize) -> serde_json::Value {
    serde_json::json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status})
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_patches_name_their_kind() {
        let patch = super::status_patch::<crate::Host>(serde_json::json!({"servers": 1}));
        assert_eq!(
            patch,
            serde_json::json!({"apiVersion": "covi.io/v1alpha1", "kind": "Host", "status": {"servers": 1}})
        );
    }
}
