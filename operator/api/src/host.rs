//! Host: one hypervisor, named after its Kubernetes node.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;

/// Annotation on a host's Lease, written with every renewal: the fenceAfter (seconds)
/// its agent keeps. The operator never declares the host lost sooner than this plus
/// its pool's margin (`Failover::loss_after`), whatever the pool says now.
pub const LEASE_FENCE_AFTER: &str = "covi.io/fence-after-seconds";

/// The timings an agent recorded on its Lease.
pub fn lease_timings(lease: &k8s_openapi::api::coordination::v1::Lease) -> crate::host_pool::LeaseTimings {
    let fence_after = lease.metadata.annotations.as_ref().and_then(|a| a.get(LEASE_FENCE_AFTER)?.parse().ok());
    let duration = lease.spec.as_ref().and_then(|s| s.lease_duration_seconds).and_then(|d| u32::try_from(d).ok());
    crate::host_pool::LeaseTimings { lease_duration_seconds: duration, fence_after_seconds: fence_after }
}

/// The administrator's wishes for one hypervisor host.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "covi.io",
    version = "v1alpha1",
    kind = "Host",
    status = "HostStatus",
    category = "covi",
    doc = "A hypervisor host, named after its Kubernetes node. Its status is written by the host's covi-agent; its liveness is the Lease of the same name in the agent's namespace.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".status.pool"),
    printcolumn(name = "Hypervisor", type_ = "string", json_path = ".status.hypervisor.type"),
    printcolumn(name = "Servers", type_ = "integer", json_path = ".status.servers"),
    printcolumn(
        name = "CPU",
        type_ = "string",
        json_path = ".status.cpuAllocation",
        description = "Virtual CPUs allocated / schedulable"
    ),
    printcolumn(
        name = "Memory",
        type_ = "string",
        json_path = ".status.memoryAllocation",
        description = "Memory allocated / schedulable"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct HostSpec {
    /// Cordon: no new servers are placed on the host; running ones stay.
    #[serde(default)]
    pub unschedulable: bool,
    /// Maintenance: cordon the host and migrate every server off it.
    #[serde(default)]
    pub maintenance: bool,
}

/// Observed state of a host, written by its agent (facts, Ready) and by covi-operator
/// (pool, allocation, Lost).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The HostPool whose nodeSelector selects this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The hypervisor as libvirt reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<HypervisorInfo>,
    /// Version of the libvirt library the agent runs against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_version: Option<String>,
    /// Address at which other hosts reach this one (for migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Where the operator reaches this host's agent to open a server's serial console
    /// (`host:port`, mutual TLS); absent when the agent serves no console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_endpoint: Option<String>,
    /// Physical capacity as the hypervisor reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<HostCapacity>,
    /// Servers bound to the host.
    #[serde(default)]
    pub servers: u32,
    /// Virtual CPUs allocated and schedulable after overcommit and reserve, as "12/64".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_allocation: Option<String>,
    /// Memory allocated and schedulable after overcommit and reserve, as "24Gi/120Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_allocation: Option<String>,
    /// Conditions: Ready, Fenced, Lost, Evacuated; one entry per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// In maintenance: the servers that cannot move off the host, and why. They keep
    /// running where they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmovable: Vec<UnmovableServer>,
    /// What the host used in all (every process, not only covi's guests), as its agent
    /// measured it: the last completed hour and the daily profile. Written once an hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::Usage>,
}

/// A server that maintenance cannot move off its host.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UnmovableServer {
    /// The server, as namespace/name.
    pub server: String,
    /// Why, as a CamelCase word: NoSharedStorage, PinnedToHost, NotRunning,
    /// MigrationFailed, or the placement's reason (InsufficientCPU, AntiAffinity, ...).
    pub reason: String,
    /// Why, for people.
    pub message: String,
}

/// The hypervisor of a host.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorInfo {
    /// libvirt's name for the driver: Xen, QEMU or TEST.
    #[serde(rename = "type")]
    pub type_: String,
    /// The hypervisor's version, for example 4.17.5.
    pub version: String,
}

/// Physical capacity of a host.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostCapacity {
    /// Physical CPUs (threads).
    pub cpus: u32,
    /// Physical memory as a quantity.
    pub memory: String,
    /// Free space of the pool's storage as a quantity, when known. Refreshed at least
    /// once a minute, not with every volume: nothing is scheduled by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}
