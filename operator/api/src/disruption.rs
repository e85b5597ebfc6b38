//! Disruption: a fault injected into servers on purpose, for testing distributed
//! software — a kill, a pause, a link down, a degraded network or a partition between
//! groups of servers — for a while, once or on a schedule.
//!
//! A resource of its own rather than a field of VirtualServer: faults are not the
//! server's desired state (a GitOps tool would fight a fault written into the spec and
//! put it back after every sync), they need their own permission (who may disrupt a
//! namespace is not who may edit its servers), one fault spans many servers (a
//! partition is between groups), and deleting the Disruption must end every fault it
//! made, at once, whatever the servers' specs say.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

const DURATION_RULE: &str =
    "self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) > duration('0s')";

/// A fault applied to the selected servers of this namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "covi.io",
    version = "v1alpha1",
    kind = "Disruption",
    namespaced,
    status = "DisruptionStatus",
    shortname = "dis",
    category = "covi",
    doc = "A fault injected into servers of this namespace on purpose: kill, pause, link down, a degraded network or a partition, for `duration`, once or every `every`. Each host's agent applies it to its servers and lists them in the status; the fault ends when the window ends, the Disruption is deleted, or the server moves.",
    printcolumn(name = "Fault", type_ = "string", json_path = ".spec.fault.kind"),
    printcolumn(name = "Duration", type_ = "string", json_path = ".spec.duration"),
    printcolumn(name = "Every", type_ = "string", json_path = ".spec.every"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    derive = "PartialEq",
    validation = Rule::new("!has(self.spec.every) || duration(self.spec.every) > duration(self.spec.duration)").message("every must be longer than duration: a fault ends before it starts again")
)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionSpec {
    /// The servers of this namespace the fault hits.
    pub selector: ServerSelector,

    /// What happens to them.
    pub fault: Fault,

    /// How long each application lasts, such as 30s or 5m.
    #[x_kube(validation = Rule::new(DURATION_RULE).message("duration must be a positive duration such as 30s or 5m"))]
    #[schemars(length(max = 64))]
    pub duration: String,

    /// Apply the fault again this often (from the Disruption's creation); absent: once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("every must be a positive duration such as 10m"))]
    #[schemars(length(max = 64))]
    pub every: Option<String>,
}

/// Servers of the Disruption's namespace, by name or by labels (both: a server must
/// match both). A selector never reaches another namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("(has(self.names) && size(self.names) > 0) || (has(self.matchLabels) && size(self.matchLabels) > 0)").message("a selector names servers or matches labels; an empty one would select every server"))]
#[serde(rename_all = "camelCase")]
pub struct ServerSelector {
    /// Server names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub names: Vec<String>,
    /// Labels a server must all have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl ServerSelector {
    /// Whether a server with this name and these labels is selected.
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.names.is_empty() || self.names.iter().any(|n| n == name))
            && self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The kinds of fault.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// Destroy the guest at the start of each window, as a power cut; it comes back by
    /// its run policy (spec.runPolicy Running: at once).
    Kill,
    /// Suspend the guest for the window (its vCPUs stop; memory and network state stay),
    /// then resume it.
    Pause,
    /// Take the guest's network link down for the window (host side: works on Xen,
    /// where libxl has no live link update).
    LinkDown,
    /// Degrade the traffic delivered to the guest: delay, loss, duplication, corruption,
    /// a rate limit (host side, `tc` on the guest's interface).
    Network,
    /// Drop the traffic between the selected servers and the servers of `partition.from`
    /// (host side, filtering on the bridge).
    Partition,
}

/// What to do, and its parameters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(self.kind == 'Network') == has(self.network)").message("network is required for, and only for, kind Network"))]
#[x_kube(validation = Rule::new("(self.kind == 'Partition') == has(self.partition)").message("partition is required for, and only for, kind Partition"))]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub kind: FaultKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionFault>,
}

/// Degradations of the traffic delivered to each selected server; any combination.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.delay) || has(self.lossPercent) || has(self.duplicatePercent) || has(self.corruptPercent) || has(self.rateKbit)").message("network needs at least one of delay, lossPercent, duplicatePercent, corruptPercent, rateKbit"))]
#[x_kube(validation = Rule::new("!has(self.jitter) || has(self.delay)").message("jitter needs a delay"))]
#[serde(rename_all = "camelCase")]
pub struct NetworkFault {
    /// Added to every packet, such as 100ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("delay must be a positive duration such as 100ms"))]
    #[schemars(length(max = 64))]
    pub delay: Option<String>,
    /// Random variation of the delay, such as 10ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("jitter must be a positive duration such as 10ms"))]
    #[schemars(length(max = 64))]
    pub jitter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub loss_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub duplicate_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub corrupt_percent: Option<u32>,
    /// A rate limit in kilobits per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8, max = 100000000))]
    pub rate_kbit: Option<u32>,
}

/// Which way traffic is dropped between the selected servers and the others.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Direction {
    /// Neither side reaches the other.
    #[default]
    Both,
    /// The selected servers' packets to the others are dropped; theirs arrive.
    Outgoing,
    /// The others' packets to the selected servers are dropped; theirs leave.
    Incoming,
}

/// The other side of a partition.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PartitionFault {
    /// The servers (of this namespace) cut off from the selected ones.
    pub from: ServerSelector,
    #[serde(default)]
    pub direction: Direction,
}

/// What the agents did.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionStatus {
    /// Every server the fault was applied to in the current or last window, written by
    /// the agent of the server's host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["server"]))]
    pub targets: Vec<FaultTarget>,
}

/// The fault on one server.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultTarget {
    pub server: String,
    pub host: String,
    pub state: TargetState,
    /// When this window's fault was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// When it ends (or ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Time>,
    /// Why it failed, or what was done.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetState {
    /// The fault is in place.
    Applied,
    /// The window ended and the fault was removed.
    Removed,
    /// The host could not apply it; `message` says why.
    Failed,
}
