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
    /// Everything an agent writes: its Host, its Lease, its servers' phase, Ready and
    /// domain UUID.
    pub const AGENT: &str = "covi-agent";
}
