//! HostPool: the hypervisors of one data centre and the rules for using them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::virtual_server::Resources;

/// Desired state of a pool of hypervisors.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "covi.io",
    version = "v1alpha1",
    kind = "HostPool",
    status = "HostPoolStatus",
    shortname = "hp",
    category = "covi",
    doc = "A pool of hypervisor hosts, usually one per data centre: which hosts belong, how far they may be overcommitted, the shared storage, the image catalog, the standard sizes and the network.",
    printcolumn(name = "Hypervisor", type_ = "string", json_path = ".spec.hypervisor"),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyHosts",
        description = "Hosts that are Ready"
    ),
    printcolumn(
        name = "Hosts",
        type_ = "integer",
        json_path = ".status.totalHosts",
        description = "Hosts in the pool"
    ),
    printcolumn(
        name = "Servers",
        type_ = "integer",
        json_path = ".status.servers",
        description = "Servers bound to the pool's hosts"
    ),
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
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct HostPoolSpec {
    /// Hosts whose labels include all of these belong to the pool. An empty selector
    /// selects every Host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// The hypervisor of the pool's hosts: xen (the default) for production, kvm or
    /// qemu for labs, test for libvirt's in-memory test driver in CI.
    #[serde(default)]
    pub hypervisor: Hypervisor,

    /// How far allocations may exceed physical capacity: 4 lets a host with 16 CPUs
    /// hold 64 virtual CPUs.
    #[serde(default)]
    pub overcommit: Overcommit,

    /// Capacity kept back on every host for dom0 and the host's own services.
    #[serde(default)]
    pub reserve: HostReserve,

    /// Most servers one host may hold; empty means no limit beyond capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_servers_per_host: Option<u32>,

    /// Storage shared by the pool's hosts, where images and server disks live.
    pub storage: PoolStorage,

    /// Images servers can boot from, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 256))]
    pub images: Vec<Image>,

    /// Standard server sizes, by name; a VirtualServer names one in `class`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 64))]
    pub classes: Vec<ServerClass>,

    /// The network servers are attached to, and the range addresses are taken from.
    pub network: PoolNetwork,

    /// How lost hosts are detected and their highly-available servers restarted.
    #[serde(default)]
    pub failover: Failover,

    /// How the scheduler chooses among hosts that fit: Spread (the default) balances
    /// load, Pack fills hosts one after another.
    #[serde(default)]
    pub strategy: Strategy,

    /// How servers move between hosts (placement.host changes, maintenance).
    #[serde(default)]
    pub migration: MigrationPolicy,

    /// Consolidation: planning fewer hosts from the servers' daily usage profiles
    /// (docs/consolidation.md). Disabled unless asked for.
    #[serde(default)]
    pub consolidation: Consolidation,

    /// Which VmRequests for this pool are approved without a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalPolicy>,
}

/// How the pool plans consolidation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Consolidation {
    /// Disabled (the default); Recommend: plan every interval and report the plan in the
    /// pool's status and an Event, moving nothing; Automatic: also carry the plan's
    /// moves out through live migration (migration.maxConcurrent at a time) and mark
    /// the hosts it empties (label covi.io/consolidation=free, condition Freed).
    #[serde(default)]
    pub mode: ConsolidationMode,
    /// In every hour of the day, the servers a host would run may use at most this
    /// percent of its CPU and of its memory (their profiles' peaks for that hour).
    #[serde(default = "default_target_utilization")]
    #[schemars(range(min = 10, max = 100))]
    pub target_utilization_percent: u32,
    /// Most moves one plan may contain.
    #[serde(default = "default_max_moves")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_moves: u32,
    /// Plan every this many seconds.
    #[serde(default = "default_consolidation_interval")]
    #[schemars(range(min = 10, max = 604800))]
    pub interval_seconds: u32,
    /// Automatic mode starts moves only in this daily window, UTC, as "HH:MM-HH:MM"
    /// (it may pass midnight, e.g. "22:00-04:00"); moves under way finish. Unset: any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$')").message("consolidation.window must be HH:MM-HH:MM (UTC), such as 01:00-05:00"))]
    pub window: Option<String>,
}

impl Consolidation {
    /// Whether automatic moves may start at `now`: inside the window, or no window.
    pub fn in_window(&self, now: k8s_openapi::jiff::Timestamp) -> bool {
        let Some(window) = &self.window else { return true };
        let minutes = |hm: &str| -> Option<i64> {
            let (h, m) = hm.split_once(':')?;
            Some(h.parse::<i64>().ok()? * 60 + m.parse::<i64>().ok()?)
        };
        let Some((start, end)) = window.split_once('-').and_then(|(a, b)| Some((minutes(a)?, minutes(b)?))) else {
            return false;
        };
        let at = now.as_second().rem_euclid(86_400) / 60;
        if start <= end { (start..end).contains(&at) } else { at >= start || at < end }
    }
}

fn default_target_utilization() -> u32 {
    80
}

fn default_max_moves() -> u32 {
    5
}

fn default_consolidation_interval() -> u32 {
    3600
}

impl Default for Consolidation {
    fn default() -> Self {
        Consolidation {
            mode: ConsolidationMode::Disabled,
            target_utilization_percent: default_target_utilization(),
            max_moves: default_max_moves(),
            interval_seconds: default_consolidation_interval(),
            window: None,
        }
    }
}

/// Whether a pool plans consolidation.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConsolidationMode {
    // Not "Off": YAML 1.1 (kubectl, Helm) reads an unquoted Off as the boolean false.
    #[default]
    Disabled,
    Recommend,
    Automatic,
}

/// The last consolidation plan of a pool.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsolidationStatus {
    /// When it was planned.
    pub planned_at: Time,
    /// Hosts running servers now.
    pub hosts_used: u32,
    /// Hosts the plan would run them on.
    pub planned_hosts: u32,
    /// The moves, at most maxMoves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<PlannedMove>,
    /// Hosts the plan empties: free to power off once the moves are made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emptied_hosts: Vec<String>,
    /// Servers planned at their allocation because they have no usage profile yet.
    #[serde(default)]
    pub without_profile: u32,
}

/// One move of a consolidation plan.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PlannedMove {
    /// The server, as namespace/name.
    pub server: String,
    pub from: String,
    pub to: String,
}

/// Limits on moving servers between the pool's hosts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPolicy {
    /// Most migrations running at once in the pool (default 2); the others wait, Pending.
    #[serde(default = "default_max_concurrent")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent: u32,
}

fn default_max_concurrent() -> u32 {
    2
}

impl Default for MigrationPolicy {
    fn default() -> Self {
        MigrationPolicy { max_concurrent: default_max_concurrent() }
    }
}

/// The hypervisor a pool runs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    /// Xen through libvirt's libxl driver (xen:///system).
    #[default]
    Xen,
    /// KVM through libvirt's QEMU driver.
    Kvm,
    /// QEMU without hardware acceleration (TCG), for laptops and CI.
    Qemu,
    /// libvirt's in-memory test driver: no guests run; for tests at scale.
    Test,
}

/// Overcommit ratios, each greater than 0 and at most 64.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Overcommit {
    /// Virtual CPUs allowed per physical CPU (default 4).
    #[serde(default = "default_cpu_ratio")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 64.0").message("overcommit.cpu must be greater than 0 and at most 64"))]
    pub cpu: f64,
    /// Memory allowed per byte of physical memory (default 1: no overcommit).
    #[serde(default = "default_memory_ratio")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 64.0").message("overcommit.memory must be greater than 0 and at most 64"))]
    pub memory: f64,
}

fn default_cpu_ratio() -> f64 {
    4.0
}
fn default_memory_ratio() -> f64 {
    1.0
}

impl Default for Overcommit {
    fn default() -> Self {
        Overcommit { cpu: default_cpu_ratio(), memory: default_memory_ratio() }
    }
}

/// Capacity kept back on every host.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostReserve {
    /// Physical CPUs kept for dom0 (default 1).
    #[serde(default = "default_reserve_cpus")]
    #[schemars(range(max = 1024))]
    pub cpus: u32,
    /// Memory kept for dom0 as a quantity (default 1Gi).
    #[serde(default = "default_reserve_memory")]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("reserve.memory must be a quantity such as 1Gi"))]
    #[schemars(length(max = 32))]
    pub memory: String,
}

fn default_reserve_cpus() -> u32 {
    1
}
fn default_reserve_memory() -> String {
    "1Gi".to_string()
}

impl Default for HostReserve {
    fn default() -> Self {
        HostReserve { cpus: default_reserve_cpus(), memory: default_reserve_memory() }
    }
}

/// The libvirt storage pool that holds images and server disks on every host.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolStorage {
    /// Name of the libvirt storage pool on each host.
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    /// Directory of the pool on each host, an absolute path. When set and the pool is
    /// missing, the agent defines it as a directory pool here (for example the mount
    /// point of NFS or CephFS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.contains('/../') && !self.endsWith('/..')").message("storage.path must be an absolute directory without '..', such as /var/lib/covi/images"))]
    #[schemars(length(min = 1, max = 4096))]
    pub path: Option<String>,
    /// Whether every host sees the same volumes (NFS, Ceph, a shared directory). Live
    /// migration and failover of a server need shared storage.
    #[serde(default)]
    pub shared: bool,
}

/// One image of the catalog.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    /// Name servers use in `boot.image`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Name of the volume in the pool's storage pool that is cloned for each server: a
    /// volume name, not a path.
    #[x_kube(validation = Rule::new(crate::VOLUME_NAME_RULE).message(crate::VOLUME_NAME_MESSAGE))]
    #[schemars(length(min = 1, max = 253))]
    pub volume: String,
    /// Disk format of the volume: raw (the default) or qcow2.
    #[serde(default)]
    pub format: DiskFormat,
    /// For direct kernel boot (Xen PV without a boot loader): path of the kernel on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub kernel: Option<String>,
    /// For direct kernel boot: path of the initramfs on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub initrd: Option<String>,
    /// For direct kernel boot: the kernel command line; covi appends the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub cmdline: Option<String>,
}

/// Disk format of a volume.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

/// A standard server size.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerClass {
    /// Name servers use in `class`, for example "small".
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// CPUs, memory, disk and bandwidth of the class.
    #[serde(flatten)]
    pub resources: Resources,
}

/// The pool's network.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.gateway) || !isCIDR(self.cidr) || (isIP(self.gateway) && cidr(self.cidr).containsIP(self.gateway))").message("gateway must be an IPv4 address inside cidr"))]
#[x_kube(validation = Rule::new("!isCIDR(self.cidr) || !has(self.reserved) || self.reserved.all(r, r.split('-').size() <= 2 && r.split('-').all(a, isIP(a) && ip(a).family() == 4 && cidr(self.cidr).containsIP(a)))").message("every reserved entry must be an IPv4 address inside cidr, or a range A-B of two"))]
#[x_kube(validation = Rule::new(RESERVED_ORDER_RULE).message("a reserved range A-B must go from the lower address to the higher"))]
#[serde(rename_all = "camelCase")]
pub struct PoolNetwork {
    /// Name of the Linux bridge on each host that server interfaces join.
    #[schemars(length(min = 1, max = 15))]
    pub bridge: String,
    /// IPv4 range servers take addresses from, for example 10.20.0.0/24.
    #[x_kube(validation = Rule::new("isCIDR(self) && cidr(self).ip().family() == 4").message("cidr must be an IPv4 CIDR such as 10.20.0.0/24"))]
    #[schemars(length(max = 64))]
    pub cidr: String,
    /// The default gateway handed to servers; never given to a server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub gateway: Option<String>,
    /// DNS servers handed to servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(a, isIP(a))").message("every dns entry must be an IP address"))]
    #[schemars(length(max = 8))]
    pub dns: Vec<String>,
    /// Addresses of the CIDR never handed out automatically: single addresses
    /// ("10.20.0.5") or inclusive ranges, lower address first ("10.20.0.1-10.20.0.20").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 31)))]
    pub reserved: Vec<String>,
}

/// A reserved range's ends in order: each IPv4 address as a number (CEL has no order
/// on addresses). Entries that are not well-formed ranges are left to the rule above.
const RESERVED_ORDER_RULE: &str = "!has(self.reserved) || self.reserved.all(r, !(r.split('-').size() == 2 && r.split('-').all(a, a.matches('^[0-9]{1,3}([.][0-9]{1,3}){3}$'))) || \
  int(r.split('-')[0].split('.')[0]) * 16777216 + int(r.split('-')[0].split('.')[1]) * 65536 + int(r.split('-')[0].split('.')[2]) * 256 + int(r.split('-')[0].split('.')[3]) <= \
  int(r.split('-')[1].split('.')[0]) * 16777216 + int(r.split('-')[1].split('.')[1]) * 65536 + int(r.split('-')[1].split('.')[2]) * 256 + int(r.split('-')[1].split('.')[3]))";

/// Failure detection and high-availability restarts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.fenceAfterSeconds + self.renewSeconds <= self.leaseDurationSeconds").message("fenceAfterSeconds plus renewSeconds must not exceed leaseDurationSeconds, so a cut-off host fences itself before the operator may restart its servers"))]
#[x_kube(validation = Rule::new("self.fenceAfterSeconds >= 2 * self.renewSeconds").message("fenceAfterSeconds must be at least twice renewSeconds, so one slow renewal does not fence a host"))]
#[x_kube(validation = Rule::new("self.graceSeconds >= self.renewSeconds").message("graceSeconds must be at least renewSeconds, so a renewal sent just before the lease ran out is seen before the host is declared lost"))]
#[serde(rename_all = "camelCase")]
pub struct Failover {
    /// Restart highly-available servers of lost hosts elsewhere (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How often an agent renews its host's Lease (default 2).
    #[serde(default = "default_renew")]
    #[schemars(range(min = 1, max = 60))]
    pub renew_seconds: u32,
    /// The Lease's duration (default 10).
    #[serde(default = "default_lease_duration")]
    #[schemars(range(min = 3, max = 600))]
    pub lease_duration_seconds: u32,
    /// An agent that could not renew for this long destroys its servers (default 6).
    #[serde(default = "default_fence_after")]
    #[schemars(range(min = 2, max = 600))]
    pub fence_after_seconds: u32,
    /// Extra time the operator waits after the Lease expired before it declares the
    /// host lost (default 3).
    #[serde(default = "default_grace")]
    #[schemars(range(min = 1, max = 600))]
    pub grace_seconds: u32,
    /// Hosts the pool must be able to lose and still restart every highly-available
    /// server: the scheduler refuses placements that break this (N+1 admission).
    #[serde(default)]
    #[schemars(range(max = 100))]
    pub reserve_hosts: u32,
    /// When more than this percentage of a pool's hosts is lost at once, failover
    /// pauses instead of stampeding (default 50).
    #[serde(default = "default_max_lost_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub max_lost_percent: u32,
}

fn default_true() -> bool {
    true
}
fn default_renew() -> u32 {
    2
}
fn default_lease_duration() -> u32 {
    10
}
fn default_fence_after() -> u32 {
    6
}
fn default_grace() -> u32 {
    3
}
fn default_max_lost_percent() -> u32 {
    50
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            enabled: true,
            renew_seconds: default_renew(),
            lease_duration_seconds: default_lease_duration(),
            fence_after_seconds: default_fence_after(),
            grace_seconds: default_grace(),
            reserve_hosts: 0,
            max_lost_percent: default_max_lost_percent(),
        }
    }
}

/// How the scheduler ranks hosts that fit.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Prefer the least-allocated host.
    #[default]
    Spread,
    /// Prefer the most-allocated host that still fits.
    Pack,
}

/// Which requests are approved automatically.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalPolicy {
    /// Requests within these limits are approved without a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_approve: Option<AutoApprove>,
    /// http:// URL that receives a JSON POST when a request is fulfilled or about to
    /// expire (for example an in-cluster Service that relays to chat). https is not
    /// supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() == 'http'").message("webhookUrl must be an http:// URL (https is not supported yet)"))]
    #[schemars(length(max = 2048))]
    pub webhook_url: Option<String>,
    /// How long before a request's servers expire its requester is warned (an
    /// ExpiringSoon Event), as a duration such as 24h (the default). Never more than half
    /// the lifetime, so short lifetimes are warned too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) > duration('0s')").message("expiryWarning must be a positive duration such as 24h"))]
    #[schemars(length(max = 64))]
    pub expiry_warning: Option<String>,
    /// Per-namespace limits on what requests may hold in this pool, checked when a
    /// request is approved and when it scales up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["namespace".into()]))]
    #[schemars(length(max = 1000))]
    pub quotas: Vec<NamespaceQuota>,
}

/// What the requests of one namespace may hold in a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceQuota {
    /// The namespace the limits apply to.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Most servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_servers: Option<u32>,
    /// Most virtual CPUs over all servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u32>,
    /// Most memory over all servers, as a quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("maxMemory must be a quantity such as 64Gi"))]
    #[schemars(length(max = 32))]
    pub max_memory: Option<String>,
}

/// Limits of automatic approval; a request over any of them waits for a person.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoApprove {
    /// Most servers in one request.
    #[schemars(range(max = 1000))]
    pub max_servers: u32,
    /// Most virtual CPUs in one request, over all its servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u32>,
    /// Most memory in one request, over all its servers, as a quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("maxMemory must be a quantity such as 64Gi"))]
    #[schemars(length(max = 32))]
    pub max_memory: Option<String>,
    /// Only requests in these namespaces; empty means every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub namespaces: Vec<String>,
}

/// Observed state of a pool, written by covi-operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HostPoolStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Hosts that are Ready.
    #[serde(default)]
    pub ready_hosts: u32,
    /// Hosts in the pool.
    #[serde(default)]
    pub total_hosts: u32,
    /// Servers bound to the pool's hosts.
    #[serde(default)]
    pub servers: u32,
    /// Virtual CPUs allocated and schedulable after overcommit and reserve, as "12/64".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_allocation: Option<String>,
    /// Memory allocated and schedulable after overcommit and reserve, as "24Gi/120Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_allocation: Option<String>,
    /// Conditions: Ready, FailoverPaused, and others; one entry per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The last consolidation plan (spec.consolidation.mode Recommend or Automatic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consolidation: Option<ConsolidationStatus>,
}

/// Why a server's size cannot be worked out from its spec and pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeError {
    /// Condition reason: ClassNotFound or InvalidQuantity.
    pub reason: &'static str,
    pub message: String,
}

/// A server's size in whole units, after resolving its class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    /// Bits per second, when limited.
    pub bandwidth_bps: Option<u64>,
}

impl HostPool {
    /// The size of `server`: its `resources`, or the pool's class it names.
    pub fn size_of(&self, server: &crate::VirtualServerSpec) -> Result<Size, SizeError> {
        let resources = match (&server.resources, &server.class) {
            (Some(r), _) => r,
            (None, Some(class)) => {
                &self
                    .spec
                    .classes
                    .iter()
                    .find(|c| &c.name == class)
                    .ok_or_else(|| {
                        let known: Vec<_> = self.spec.classes.iter().map(|c| c.name.as_str()).collect();
                        SizeError {
                            reason: "ClassNotFound",
                            message: format!(
                                "class {class} is not defined in pool {}; it defines: {}",
                                self.metadata.name.as_deref().unwrap_or_default(),
                                if known.is_empty() { "none".to_string() } else { known.join(", ") }
                            ),
                        }
                    })?
                    .resources
            }
            (None, None) => {
                return Err(SizeError { reason: "NoSize", message: "neither class nor resources is set".into() });
            }
        };
        let quantity = |what: &str, q: &str| {
            crate::quantity::parse(q)
                .map_err(|e| SizeError { reason: "InvalidQuantity", message: format!("{what}: {e}") })
        };
        Ok(Size {
            cpus: resources.cpus,
            memory_mib: quantity("memory", &resources.memory)?.div_ceil(1 << 20),
            disk_bytes: quantity("disk", &resources.disk)?,
            bandwidth_bps: resources.bandwidth.as_deref().map(|b| quantity("bandwidth", b)).transpose()?,
        })
    }

    /// The catalog image named `name`.
    pub fn image(&self, name: &str) -> Option<&Image> {
        self.spec.images.iter().find(|i| i.name == name)
    }
}

impl Failover {
    /// fenceAfterSeconds when no pool says otherwise.
    pub fn default_fence_after() -> std::time::Duration {
        std::time::Duration::from_secs(default_fence_after().into())
    }

    /// How long the operator waits without seeing a renewal before it declares a host
    /// lost: this pool's lease and grace, stretched to what the host's agent recorded
    /// on its Lease (`recorded`). An agent that keeps a longer fenceAfter than the pool
    /// says (its labels changed, the pool was edited, or it stopped gracefully and
    /// promised to be back) is given that fenceAfter plus the pool's margin between
    /// fencing and the lease, so it has always fenced before its servers restart
    /// elsewhere.
    pub fn loss_after(&self, recorded: &LeaseTimings) -> std::time::Duration {
        let margin = self.lease_duration_seconds.saturating_sub(self.fence_after_seconds);
        let lease = [
            self.lease_duration_seconds,
            recorded.lease_duration_seconds.unwrap_or(0),
            recorded.fence_after_seconds.map_or(0, |f| f.saturating_add(margin)),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        std::time::Duration::from_secs(u64::from(lease) + u64::from(self.grace_seconds))
    }
}

/// Lease renewals a second the whole fleet may send the API server at its pools'
/// timings; a larger fleet stretches them (see [`Failover::for_fleet`]). 100 a second
/// is 200 hosts at the default 2 s, which one small control plane answers in time
/// while it also takes a burst of a thousand servers.
pub const HEARTBEATS_PER_SECOND: u32 = 100;

impl Failover {
    /// How many times the pool's timings are stretched in a fleet of `hosts`: enough
    /// that renewing every `renewSeconds × factor` keeps the fleet within
    /// [`HEARTBEATS_PER_SECOND`]; 1 up to that size.
    pub fn fleet_factor(&self, hosts: u32) -> u32 {
        hosts.div_ceil(HEARTBEATS_PER_SECOND.saturating_mul(self.renew_seconds.max(1))).max(1)
    }

    /// The timings in force in a fleet of `hosts` (the sum of every pool's hosts):
    /// renewal, lease, fenceAfter and grace all multiplied by [`Failover::fleet_factor`],
    /// so every rule between them still holds and failover slows in proportion.
    /// Agents renew and fence by these, and record them on their Lease; the operator
    /// judges by them (and by what a Lease records, whichever is longer).
    pub fn for_fleet(&self, hosts: u32) -> Failover {
        self.times(self.fleet_factor(hosts))
    }

    /// Renewal, lease, fenceAfter and grace multiplied by `k`: the rules between them
    /// hold at any `k`, and failover slows in proportion.
    pub fn times(&self, k: u32) -> Failover {
        Failover {
            renew_seconds: self.renew_seconds.saturating_mul(k),
            lease_duration_seconds: self.lease_duration_seconds.saturating_mul(k),
            fence_after_seconds: self.fence_after_seconds.saturating_mul(k),
            grace_seconds: self.grace_seconds.saturating_mul(k),
            ..self.clone()
        }
    }
}

/// How far an agent stretches its timings because the API server answers its renewals
/// slowly (a whole fleet starting at once, an overloaded control plane): the stretch
/// doubles after a renewal that failed or took more than half the renewal interval,
/// and halves again after [`Pace::QUICK_IN_A_ROW`] renewals in a row answered within a
/// tenth of it; from 1 to [`Pace::MAX`]. The agent records the stretched timings on its
/// Lease like any others (a longer fenceAfter holds only once recorded), so the operator
/// judges it by them: failover slows down with the API server instead of hosts whose
/// renewals queue up behind each other fencing themselves. The operator's leader paces
/// its own Lease by the same rule (`covi_operator::leader`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    stretch: u32,
    quick: u32,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace { stretch: 1, quick: 0 }
    }
}

impl Pace {
    /// The longest stretch: at the default timings, renewal every 16 s and failover
    /// after about 100 s.
    pub const MAX: u32 = 8;
    pub const QUICK_IN_A_ROW: u32 = 3;

    /// What the timings are multiplied by now.
    pub fn stretch(&self) -> u32 {
        self.stretch
    }

    /// The pace after a renewal sent at interval `renew` (already stretched) that was
    /// answered after `answered`, or not at all (`None`: it failed or timed out).
    pub fn after(self, answered: Option<std::time::Duration>, renew: std::time::Duration) -> Pace {
        match answered {
            Some(took) if took <= renew / 2 => match took < renew / 10 {
                true if self.quick + 1 >= Pace::QUICK_IN_A_ROW => Pace { stretch: (self.stretch / 2).max(1), quick: 0 },
                true => Pace { quick: self.quick + 1, ..self },
                false => Pace { quick: 0, ..self },
            },
            _ => Pace { stretch: (self.stretch * 2).min(Pace::MAX), quick: 0 },
        }
    }
}

/// The fleet's size as the pools' statuses count it.
pub fn fleet_hosts<P>(pools: &[P]) -> u32
where
    P: std::ops::Deref<Target = HostPool>,
{
    pools.iter().filter_map(|p| p.status.as_ref()).map(|s| s.total_hosts).fold(0, u32::saturating_add)
}

/// The failover timings in force for a host with `labels`: its pool's (or the
/// defaults), stretched for the fleet's size.
pub fn failover_for<P>(pools: &[P], labels: &std::collections::BTreeMap<String, String>) -> Failover
where
    P: std::ops::Deref<Target = HostPool>,
{
    let failover = pool_for_labels(pools, labels).map(|p| p.spec.failover.clone()).unwrap_or_default();
    failover.for_fleet(fleet_hosts(pools))
}

/// The timings an agent recorded on its host's Lease with its last renewal: the
/// lease duration (`spec.leaseDurationSeconds`) and its fenceAfter (the annotation
/// [`crate::host::LEASE_FENCE_AFTER`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseTimings {
    pub lease_duration_seconds: Option<u32>,
    pub fence_after_seconds: Option<u32>,
}

/// The pool a host with `labels` belongs to. A host belongs to one pool only: of the
/// pools whose nodeSelector matches, the most specific (most selector entries) wins,
/// then the first by name, so an empty catch-all selector never steals a host.
pub fn pool_for_labels<'a, P>(
    pools: &'a [P],
    labels: &std::collections::BTreeMap<String, String>,
) -> Option<&'a HostPool>
where
    P: std::ops::Deref<Target = HostPool>,
{
    pools
        .iter()
        .map(|p| &**p)
        .filter(|p| p.spec.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
        .min_by_key(|p| (std::cmp::Reverse(p.spec.node_selector.len()), p.metadata.name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timings_stretch_with_the_fleet_and_keep_their_rules() {
        let pool = Failover::default(); // renew 2, lease 10, fence 6, grace 3
        assert_eq!(pool.for_fleet(0), pool);
        assert_eq!(pool.for_fleet(200), pool, "200 hosts at 2 s is the budget itself");
        let big = pool.for_fleet(2000);
        assert_eq!(
            (big.renew_seconds, big.lease_duration_seconds, big.fence_after_seconds, big.grace_seconds),
            (20, 100, 60, 30)
        );
        assert!(2000 / big.renew_seconds <= HEARTBEATS_PER_SECOND);
        // The CRD's rules between the timings still hold.
        assert!(big.fence_after_seconds + big.renew_seconds <= big.lease_duration_seconds);
        assert!(big.fence_after_seconds >= 2 * big.renew_seconds);
        assert!(big.grace_seconds >= big.renew_seconds);
        assert_eq!(pool.for_fleet(201).renew_seconds, 4, "one host over the budget doubles");
        let slow = Failover {
            renew_seconds: 10,
            lease_duration_seconds: 40,
            fence_after_seconds: 25,
            grace_seconds: 10,
            ..pool
        };
        assert_eq!(slow.for_fleet(1000), slow, "a pool that already renews slowly is left alone");
    }

    #[test]
    fn a_slow_api_server_stretches_the_pace_and_a_quick_one_brings_it_back() {
        let renew = |p: Pace| Duration::from_secs(2 * u64::from(p.stretch()));
        let ms = Duration::from_millis;
        let mut pace = Pace::default();
        // Answers within half the interval keep the pace.
        pace = pace.after(Some(ms(900)), renew(pace));
        assert_eq!(pace.stretch(), 1);
        // A slow answer, then a failed renewal: 2, then 4.
        pace = pace.after(Some(ms(1500)), renew(pace));
        assert_eq!(pace.stretch(), 2);
        pace = pace.after(None, renew(pace));
        assert_eq!(pace.stretch(), 4);
        for _ in 0..10 {
            pace = pace.after(None, renew(pace));
        }
        assert_eq!(pace.stretch(), Pace::MAX, "never beyond the cap");
        // Quick answers halve it, three in a row each time; a middling one resets the count.
        pace = pace.after(Some(ms(100)), renew(pace));
        pace = pace.after(Some(ms(100)), renew(pace));
        pace = pace.after(Some(ms(5000)), renew(pace));
        assert_eq!(pace.stretch(), Pace::MAX);
        for _ in 0..3 {
            pace = pace.after(Some(ms(100)), renew(pace));
        }
        assert_eq!(pace.stretch(), Pace::MAX / 2);
        for _ in 0..30 {
            pace = pace.after(Some(ms(10)), renew(pace));
        }
        assert_eq!(pace.stretch(), 1, "back to the pool's own timings");
        // Stretched timings keep the CRD's rules.
        let t = Failover::default().times(Pace::MAX);
        assert!(t.fence_after_seconds + t.renew_seconds <= t.lease_duration_seconds);
        assert!(t.fence_after_seconds >= 2 * t.renew_seconds && t.grace_seconds >= t.renew_seconds);
    }

    fn pool(name: &str, selector: &[(&str, &str)]) -> HostPool {
        let selector: BTreeMap<_, _> = selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": name},
            "spec": {"nodeSelector": selector, "storage": {"pool": "p"}, "network": {"bridge": "b", "cidr": "10.0.0.0/24"}}
        }))
        .unwrap()
    }

    #[test]
    fn a_host_belongs_to_the_most_specific_matching_pool() {
        let pools = vec![
            Box::new(pool("catch-all", &[])),
            Box::new(pool("idc-b", &[("covi.io/pool", "b")])),
            Box::new(pool("idc-a", &[("covi.io/pool", "a")])),
            Box::new(pool("idc-a-ssd", &[("covi.io/pool", "a"), ("disk", "ssd")])),
        ];
        let labels =
            |l: &[(&str, &str)]| l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        let name = |l: &[(&str, &str)]| pool_for_labels(&pools, &labels(l)).and_then(|p| p.metadata.name.clone());
        assert_eq!(name(&[("covi.io/pool", "a")]).as_deref(), Some("idc-a"));
        assert_eq!(name(&[("covi.io/pool", "a"), ("disk", "ssd")]).as_deref(), Some("idc-a-ssd"));
        assert_eq!(name(&[("rack", "r1")]).as_deref(), Some("catch-all"));
    }

    #[test]
    fn a_host_is_lost_no_sooner_than_its_agent_promised_to_fence() {
        let pool = Failover::default(); // lease 10, fence 6, grace 3: a margin of 4
        let secs = |s| std::time::Duration::from_secs(s);
        assert_eq!(pool.loss_after(&LeaseTimings::default()), secs(13));
        // The agent keeps the pool's timings: nothing changes.
        let same = LeaseTimings { lease_duration_seconds: Some(10), fence_after_seconds: Some(6) };
        assert_eq!(pool.loss_after(&same), secs(13));
        // The agent still fences after 20 s (its pool was just edited, or it has other
        // labels): the operator waits 20 + 4 + 3.
        let slower = LeaseTimings { lease_duration_seconds: Some(10), fence_after_seconds: Some(20) };
        assert_eq!(pool.loss_after(&slower), secs(27));
        // A gracefully stopped agent asked for a 130 s lease.
        let stopping = LeaseTimings { lease_duration_seconds: Some(130), fence_after_seconds: Some(126) };
        assert_eq!(pool.loss_after(&stopping), secs(133));
        // A shorter recording never shortens the pool's own wait.
        let faster = LeaseTimings { lease_duration_seconds: Some(3), fence_after_seconds: Some(2) };
        assert_eq!(pool.loss_after(&faster), secs(13));
    }
}

#[cfg(test)]
mod consolidation_tests {
    use super::Consolidation;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn the_window_is_daily_utc_and_may_pass_midnight() {
        let at =
            |hh: i64, mm: i64| Timestamp::from_second(1_800_000_000 / 86_400 * 86_400 + hh * 3600 + mm * 60).unwrap();
        let night = Consolidation { window: Some("22:00-04:00".into()), ..Default::default() };
        assert!(night.in_window(at(23, 30)) && night.in_window(at(3, 59)));
        assert!(!night.in_window(at(4, 0)) && !night.in_window(at(12, 0)));
        let early = Consolidation { window: Some("01:00-05:00".into()), ..Default::default() };
        assert!(early.in_window(at(1, 0)) && !early.in_window(at(0, 59)) && !early.in_window(at(5, 0)));
        assert!(Consolidation::default().in_window(at(12, 0)), "no window: any time");
    }
}
