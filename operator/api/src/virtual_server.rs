//! VirtualServer: one virtual machine in a HostPool.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::contract::condition_type;

/// Desired state of one virtual server.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "covi.io",
    version = "v1alpha1",
    kind = "VirtualServer",
    namespaced,
    status = "VirtualServerStatus",
    shortname = "vs",
    category = "covi",
    doc = "A virtual server: one VM on a hypervisor of a HostPool, scheduled by covi-operator and run by covi-agent.",
    selectable = ".status.host",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(
        name = "Host",
        type_ = "string",
        json_path = ".status.host",
        description = "Host the server is bound to"
    ),
    printcolumn(name = "IP", type_ = "string", json_path = ".status.address", description = "Assigned IPv4 address"),
    printcolumn(
        name = "CPUs",
        type_ = "integer",
        json_path = ".status.cpus",
        description = "Virtual CPUs, after resolving the class"
    ),
    printcolumn(
        name = "Memory",
        type_ = "string",
        json_path = ".status.memory",
        description = "Memory, after resolving the class"
    ),
    printcolumn(
        name = "Purpose",
        type_ = "string",
        json_path = ".spec.purpose",
        description = "What the server is for"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    derive = "PartialEq"
)]
#[x_kube(validation = Rule::new("has(self.class) || has(self.resources)").message("one of class or resources is required: name a class of the pool, or give cpus, memory and disk"))]
#[x_kube(validation = Rule::new("!(has(self.class) && has(self.resources))").message("class and resources are mutually exclusive: set one of them"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualServerSpec {
    /// Name of the HostPool (data centre) this server lives in. Immutable: to change
    /// pools, create a new server.
    #[x_kube(validation = Rule::new("self == oldSelf").message("hostPool is immutable"))]
    #[schemars(length(min = 1, max = 253))]
    pub host_pool: String,

    /// Name of a standard size from the pool's `classes` (for example "small").
    /// Set either `class` or `resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub class: Option<String>,

    /// Explicit size of the server. Set either `class` or `resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,

    /// What the server boots from: exactly one of an image of the pool's catalog, an
    /// ISO, or the network.
    pub boot: BootSource,

    /// Host name given to the guest through cloud-init; an RFC 1123 label.
    /// Defaults to the object's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("hostname must be an RFC 1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit"))]
    #[schemars(length(max = 63))]
    pub hostname: Option<String>,

    /// Network settings of the server's one interface on the pool's bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<ServerNetwork>,

    /// Public SSH keys installed for the default user through cloud-init.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ssh_authorized_keys: Vec<String>,

    /// cloud-init user data (for example a `#cloud-config` document), at most 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub user_data: Option<String>,

    /// Whether the server should be running (Running, the default) or shut off (Stopped).
    #[serde(default)]
    pub run_policy: RunPolicy,

    /// Restart this server on another host of the pool when its host is lost.
    #[serde(default)]
    pub high_availability: bool,

    /// Constraints on which host runs the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,

    /// Who is responsible for this server (a person or team). Shown by `kubectl get`.
    #[x_kube(validation = Rule::new("self.trim() != ''").message("owner must name a person or team"))]
    #[schemars(length(max = 253))]
    pub owner: String,

    /// What the server is for, in a few words. Shown by `kubectl get`.
    #[x_kube(validation = Rule::new("self.trim() != ''").message("purpose must say what the server is for"))]
    #[schemars(length(max = 253))]
    pub purpose: String,

    /// When covi reclaims the server: a warning Event is sent beforehand and the server
    /// is deleted at this time. Empty means the server is kept until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

/// Explicit size of a virtual server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Number of virtual CPUs, 1 to 256.
    #[schemars(range(min = 1, max = 256))]
    pub cpus: u32,

    /// Memory as a quantity (for example 512Mi or 4Gi): at least 128Mi and a whole
    /// number of MiB.
    #[x_kube(validation = Rule::new("isQuantity(self)").message("memory must be a quantity such as 512Mi or 4Gi"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || quantity(self).compareTo(quantity('128Mi')) >= 0").message("memory must be at least 128Mi"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || quantity(self).compareTo(quantity('128Mi')) < 0 || quantity(self).compareTo(quantity('16Ti')) > 0 || quantity(self).asInteger() % 1048576 == 0").message("memory must be a whole number of MiB, for example 1536Mi rather than 1.5G"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || quantity(self).compareTo(quantity('16Ti')) <= 0").message("memory must be at most 16Ti"))]
    #[schemars(length(max = 32))]
    pub memory: String,

    /// Size of the boot disk as a quantity (for example 20Gi), at least 1Gi. An image
    /// is cloned and grown to this size.
    #[x_kube(validation = Rule::new("isQuantity(self)").message("disk must be a quantity such as 20Gi"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || quantity(self).compareTo(quantity('1Gi')) >= 0").message("disk must be at least 1Gi"))]
    #[schemars(length(max = 32))]
    pub disk: String,

    /// Network bandwidth limit in bits per second as a quantity (for example 100M for
    /// 100 Mbit/s). Empty means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("bandwidth must be a positive quantity of bits per second, such as 100M"))]
    #[schemars(length(max = 32))]
    pub bandwidth: Option<String>,
}

/// Where a server boots from. Exactly one field is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("(has(self.image) ? 1 : 0) + (has(self.iso) ? 1 : 0) + (has(self.network) ? 1 : 0) == 1").message("exactly one boot source must be set: image, iso or network"))]
#[serde(rename_all = "camelCase")]
pub struct BootSource {
    /// Name of an image in the pool's catalog; it is cloned as the server's boot disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub image: Option<String>,

    /// Name of a volume in the pool's storage pool holding an installer ISO, attached
    /// as a CD-ROM; the boot disk starts empty. A volume name, never a path on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(crate::VOLUME_NAME_RULE).message(crate::VOLUME_NAME_MESSAGE))]
    #[schemars(length(min = 1, max = 253))]
    pub iso: Option<String>,

    /// Boot from the network (PXE); the boot disk starts empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkBoot>,
}

/// Network (PXE) boot. It has no settings yet; `network: {}` selects it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct NetworkBoot {}

/// A server's network interface.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerNetwork {
    /// "auto" (the default) takes a free address from the pool's CIDR; an IPv4
    /// address inside that CIDR pins it.
    #[serde(default = "auto")]
    #[x_kube(validation = Rule::new("self == 'auto' || (isIP(self) && ip(self).family() == 4)").message("address must be 'auto' or an IPv4 address such as 10.20.0.15"))]
    #[schemars(length(max = 64))]
    pub address: String,
}

fn auto() -> String {
    "auto".to_string()
}

/// Whether the server should run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RunPolicy {
    /// The server is kept running and restarted if it stops.
    #[default]
    Running,
    /// The server is shut off; its disk is kept.
    Stopped,
}

/// Constraints on where a server runs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Run on this host (a Host's name). Changing it on a running server migrates the
    /// server; empty lets the scheduler choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,

    /// Servers with the same group name in a pool never share a host, so that one host
    /// failure takes down at most one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub anti_affinity_group: Option<String>,

    /// Only hosts whose labels include all of these are considered.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_selector: BTreeMap<String, String>,
}

/// Observed state of a virtual server, written by covi-operator and covi-agent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServerStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Lifecycle phase: Pending, Scheduled, Provisioning, Running, Stopped, Migrating,
    /// Failed or Terminating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VirtualServerPhase>,

    /// The Host the server is bound to. Set by the scheduler; the agent of that host
    /// runs the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,

    /// The server's IPv4 address in the pool's network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,

    /// Virtual CPUs in effect, after resolving the class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,

    /// Memory in effect, after resolving the class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,

    /// UUID of the libvirt domain on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_uuid: Option<String>,

    /// Conditions: Scheduled, Ready, and others; one entry per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The current or last migration between hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,

    /// Every restart of this server on another host after its host was lost, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failovers: Vec<FailoverRecord>,

    /// What the server used, as its host's agent measured it: the last completed hour
    /// and the daily profile. Written once an hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::Usage>,

    /// The agent's announcement that it starts a highly-available server's domain,
    /// written by the agent of `host` before the start, on the version of the server
    /// the start was decided on: a failover the operator decided on an older version is
    /// then refused by the API server instead of landing beside the running copy. One
    /// announcement covers the host's starts of the server until its next gap in lease
    /// renewals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_start: Option<StartRecord>,
}

impl VirtualServer {
    /// Whether the server is bound to `host` (its `status.host`): that host's agent runs it.
    pub fn bound_to(&self, host: &str) -> bool {
        self.status.as_ref().and_then(|s| s.host.as_deref()) == Some(host)
    }

    /// Whether the server's Ready condition is True: it runs as its spec asks.
    pub fn is_ready(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| crate::condition::find_condition(&s.conditions, condition_type::READY))
            .is_some_and(|c| c.status == "True")
    }

    /// The migration in progress, if any (Pending or Running).
    pub fn active_migration(&self) -> Option<&MigrationStatus> {
        self.status
            .as_ref()
            .and_then(|s| s.migration.as_ref())
            .filter(|m| matches!(m.phase, MigrationPhase::Pending | MigrationPhase::Running))
    }
}

/// Lifecycle phase of a virtual server.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtualServerPhase {
    /// Waiting for a host.
    Pending,
    /// Bound to a host; the agent has not started work yet.
    Scheduled,
    /// The agent is preparing disks and defining the domain.
    Provisioning,
    /// The domain is running.
    Running,
    /// The domain is defined and shut off.
    Stopped,
    /// Moving to another host.
    Migrating,
    /// The server cannot run; the Ready condition says why.
    Failed,
    /// Being deleted.
    Terminating,
}

/// Ready reason of a server whose source agent has shut it down and undefined it, or
/// live-migrated it, for a migration: the operator may now bind it to the target.
pub const READY_HANDED_OFF: &str = "HandedOff";
/// Ready reason of a server whose live migration failed: it still runs on the source.
pub const READY_MIGRATION_FAILED: &str = "MigrationFailed";
/// Ready reason of a server whose start the lock manager refused: another copy still
/// runs somewhere and holds its disk lease. The agent retries until that copy stops.
pub const READY_DISK_LEASE_HELD: &str = "DiskLeaseHeld";
/// Ready reason the operator writes for the silent agent of a lost host (with phase
/// Failed) when the server is not restarted elsewhere; the agent takes both back once
/// it runs the server again.
pub const READY_HOST_LOST: &str = "HostLost";

/// A migration of a server between hosts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Host the server moves from.
    pub source: String,
    /// Host the server moves to.
    pub target: String,
    /// Pending, Running, Succeeded or Failed.
    pub phase: MigrationPhase,
    /// Live (memory copied while running) or Cold (shut down and started again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// When the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the migration ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Phase of a migration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// A start of a server's domain, announced before it happens.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StartRecord {
    /// The host that started it.
    pub host: String,
    /// When the start was announced.
    pub at: Time,
    /// Announcements so far, counting this one: every announcement changes the
    /// server, even two in the same second.
    pub count: u64,
}

/// One restart of a server on another host after its host was lost.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    /// The lost host.
    pub from: String,
    /// The host the server was restarted on.
    pub to: String,
    /// When the server was rebound.
    pub at: Time,
    /// Why, for example HostLost.
    pub reason: String,
}
