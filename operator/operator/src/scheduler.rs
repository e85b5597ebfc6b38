//! One scheduling pass over a pool's view of the world, as a pure function: which
//! pending servers bind where, which wait (and why), which are invalid. The operator
//! loop feeds it from its watches and writes the decisions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use covi_api::condition::is_condition_true;
use covi_api::contract::condition_type;
use covi_api::host_pool::Strategy;
use covi_api::{Host, HostPool, VirtualServer};
use covi_placement::{Bound, Demand, HostFacts, Pool, PoolRules, Ranking};
use kube::{Resource, ResourceExt};

use crate::address::Network;

pub use crate::view::{Assumed, PoolView};

/// What the pass decided for one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Bind to `host`; `failover_from` names the lost host it leaves, if any;
    /// `migrated_from` the host a migration moves it from.
    Bind {
        host: String,
        address: Option<Ipv4Addr>,
        cpus: u32,
        memory: String,
        failover_from: Option<String>,
        migrated_from: Option<String>,
    },
    /// Bound to a lost host and not highly available: it stays there, Failed.
    HostLost { host: String },
    /// Valid, but no host can take it now.
    Pending { reason: &'static str, message: String },
    /// Cannot run as specified; fixing the spec (or the pool) is needed.
    Invalid { reason: &'static str, message: String },
}

/// Whether the host may run servers: its agent reports Ready.
pub fn host_ready(host: &Host) -> bool {
    host.status.as_ref().is_some_and(|s| is_condition_true(&s.conditions, condition_type::READY))
}

/// Whether `host` belongs to `pool`, among `pools`: a host belongs to one pool only.
pub fn in_pool(pools: &[Arc<HostPool>], pool: &HostPool, host: &Host) -> bool {
    covi_api::host_pool::pool_for_labels(pools, host.labels()).is_some_and(|p| p.metadata.name == pool.metadata.name)
}

pub fn rules(pool: &HostPool) -> PoolRules {
    let reserve_memory_mib = covi_api::quantity::parse_mib(&pool.spec.reserve.memory).unwrap_or(0);
    PoolRules {
        name: pool.name_any(),
        cpu_ratio: pool.spec.overcommit.cpu,
        memory_ratio: pool.spec.overcommit.memory,
        reserve_cpus: pool.spec.reserve.cpus,
        reserve_memory_mib,
        max_servers_per_host: pool.spec.max_servers_per_host,
        reserve_hosts: pool.spec.failover.reserve_hosts,
        ranking: match pool.spec.strategy {
            Strategy::Spread => Ranking::Spread,
            Strategy::Pack => Ranking::Pack,
        },
    }
}

pub fn host_facts(host: &Host) -> HostFacts {
    let capacity = host.status.as_ref().and_then(|s| s.capacity.as_ref());
    HostFacts {
        name: host.name_any(),
        labels: host.labels().clone(),
        ready: host_ready(host),
        schedulable: !host.spec.unschedulable && !host.spec.maintenance,
        cpus: capacity.map(|c| c.cpus).unwrap_or(0),
        memory_mib: capacity.and_then(|c| covi_api::quantity::parse_mib(&c.memory).ok()).unwrap_or(0),
    }
}

/// The pool's hosts as placement sees them: a host whose Lease this operator has not
/// seen renew lately (`unready`) takes nothing.
pub fn live_facts(members: &[Arc<Host>], unready: &BTreeSet<String>) -> Vec<HostFacts> {
    members
        .iter()
        .map(|h| {
            let mut f = host_facts(h);
            f.ready &= !unready.contains(&f.name);
            f
        })
        .collect()
}

/// The room a server bound to `host` holds: there, and on its target while a migration
/// from there is running. Nothing for a server whose size the pool cannot resolve.
pub fn holds(pool: &HostPool, server: &VirtualServer, host: &str) -> Vec<Bound> {
    let Ok(size) = pool.size_of(&server.spec) else { return Vec::new() };
    let hold = |host: &str| Bound {
        host: host.to_string(),
        cpus: size.cpus,
        memory_mib: size.memory_mib,
        anti_affinity_group: server.spec.placement.as_ref().and_then(|p| p.anti_affinity_group.clone()),
        high_availability: server.spec.high_availability,
    };
    let mut held = vec![hold(host)];
    if let Some(m) = server.active_migration()
        && m.phase == covi_api::virtual_server::MigrationPhase::Running
        && m.source == host
    {
        held.push(hold(&m.target));
    }
    held
}

/// What `server` of `size` asks of a host: its size and its placement rules, pinned
/// to `spec.placement.host` if set.
pub fn demand(server: &VirtualServer, size: &covi_api::host_pool::Size, failover: bool) -> Demand {
    let placement = server.spec.placement.clone().unwrap_or_default();
    Demand {
        cpus: size.cpus,
        memory_mib: size.memory_mib,
        anti_affinity_group: placement.anti_affinity_group,
        host_selector: placement.host_selector,
        pinned_host: placement.host,
        high_availability: server.spec.high_availability,
        failover,
    }
}

/// Where a server is bound: a binding written but not yet seen wins over the status.
pub fn bound_host<'a>(server: &'a VirtualServer, assumed: &'a HashMap<String, Assumed>) -> Option<&'a str> {
    // Not `uid()`, which clones: a pass asks this of every server several times.
    server
        .metadata
        .uid
        .as_deref()
        .and_then(|uid| assumed.get(uid))
        .map(|a| a.host.as_str())
        .or_else(|| server.status.as_ref().and_then(|s| s.host.as_deref()))
}

/// Why the operator, not an agent, releases covi's finalizer of a server being deleted,
/// or None while an agent must: never bound; bound to a Host that no longer exists; or
/// bound to a lost host, which fenced itself (no domain runs there, and its agent, back,
/// removes what is left of a server that is gone). Not while a move is under way: the
/// target may run it, and the move's own hand-over decides.
pub fn release_reason(
    server: &VirtualServer,
    assumed: &HashMap<String, Assumed>,
    hosts: &BTreeSet<String>,
    lost: &BTreeSet<String>,
) -> Option<String> {
    let moving = server.active_migration().is_some();
    match bound_host(server, assumed) {
        None => Some("it was never bound to a host".into()),
        Some(host) if !hosts.contains(host) => Some(format!("its host {host} no longer exists")),
        Some(host) if lost.contains(host) && !moving => {
            Some(format!("its host {host} is lost and has fenced itself; its agent removes the disks when it is back"))
        }
        Some(_) => None,
    }
}

/// Addresses that more than one of one pool's `servers` holds (two leaders at once, or an
/// address claimed by hand), each with those servers ("namespace/name"), sorted.
pub fn duplicate_addresses(
    servers: &[Arc<VirtualServer>],
    assumed: &HashMap<String, Assumed>,
) -> BTreeMap<Ipv4Addr, Vec<String>> {
    // Names are written out only for the duplicates: a pass looks at every server.
    let mut holders: HashMap<Ipv4Addr, Vec<&VirtualServer>> = HashMap::new();
    for server in servers.iter().filter(|s| s.meta().deletion_timestamp.is_none()) {
        if let Some(a) = address_of(server, assumed) {
            holders.entry(a).or_default().push(server);
        }
    }
    holders
        .into_iter()
        .filter(|(_, holders)| holders.len() > 1)
        .map(|(a, holders)| {
            let mut names: Vec<String> = holders
                .iter()
                .map(|s| format!("{}/{}", s.metadata.namespace.as_deref().unwrap_or_default(), s.name_any()))
                .collect();
            names.sort();
            (a, names)
        })
        .collect()
}

fn address_of(server: &VirtualServer, assumed: &HashMap<String, Assumed>) -> Option<Ipv4Addr> {
    server
        .status
        .as_ref()
        .and_then(|s| s.address.as_deref())
        .and_then(|a| a.parse().ok())
        .or_else(|| server.metadata.uid.as_deref().and_then(|uid| assumed.get(uid)).and_then(|a| a.address))
}

/// Decides for every pending server of `pool`. `members` are the pool's hosts and
/// `servers` all servers of the pool;
/// `unready` the hosts whose Lease is not fresh, `lost` the hosts declared lost. With `failover`, highly-available servers of lost
/// hosts are placed again and the others marked HostLost; without it (disabled, or
/// paused by the mass-failure guard) they are left where they are.
pub fn pass(view: &PoolView, failover: bool) -> Vec<(Arc<VirtualServer>, Decision)> {
    let PoolView { pool, hosts: members, servers, assumed, unready, lost } = view;
    let (pool, assumed, unready, lost) = (*pool, *assumed, *unready, *lost);
    let facts = live_facts(members, unready);
    let rules = rules(pool);

    let mut bound = Vec::new();
    let mut used: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut pending: Vec<(Arc<VirtualServer>, Option<String>)> = Vec::new();
    let mut decisions = Vec::new();
    for server in servers {
        if let Some(a) = address_of(server, assumed) {
            used.insert(a);
        }
        match bound_host(server, assumed) {
            Some(host) if failover && lost.contains(host) && server.meta().deletion_timestamp.is_none() => {
                // Lost in the middle of a live migration: the guest may already run on
                // the target, so the server goes there (any server, HA or not), never
                // to a third host beside that copy.
                if let Some(decision) = to_live_target(pool, server, host, lost) {
                    decisions.push((server.clone(), decision));
                    continue;
                }
                // Failover restarts a server from its disk: without shared storage the
                // disk stays on the lost host, and a restart elsewhere would be blank.
                if server.spec.high_availability && pool.spec.storage.shared {
                    pending.push((server.clone(), Some(host.to_string())));
                } else if server.status.as_ref().and_then(|s| s.phase)
                    != Some(covi_api::virtual_server::VirtualServerPhase::Failed)
                {
                    decisions.push((server.clone(), Decision::HostLost { host: host.to_string() }));
                }
            }
            Some(host) => bound.extend(holds(pool, server, host)),
            None if server.meta().deletion_timestamp.is_none() => pending.push((server.clone(), None)),
            None => {}
        }
    }
    // Oldest first, so a steady stream of new servers cannot starve an old one.
    // Servers failing over first, then the oldest, so a steady stream of new servers
    // cannot starve an old one.
    pending.sort_by(|(a, fa), (b, fb)| {
        (fa.is_none(), a.creation_timestamp().map(|t| t.0), a.name_any()).cmp(&(
            fb.is_none(),
            b.creation_timestamp().map(|t| t.0),
            b.name_any(),
        ))
    });

    let network = Network::parse(&pool.spec.network);
    let mut placement = Pool::new(&rules, &facts, &bound);
    for (server, from) in pending {
        let decision = match decide(pool, &server, &network, &mut placement, &mut used, from.is_some()) {
            Decision::Bind { host, address, cpus, memory, .. } => {
                Decision::Bind { host, address, cpus, memory, failover_from: from, migrated_from: None }
            }
            other => other,
        };
        decisions.push((server, decision));
    }
    decisions
}

/// The binding of a server whose host `source` was lost while a live migration took
/// it to a target that is not lost: to that target, with its address. `None` when no
/// such migration runs.
fn to_live_target(pool: &HostPool, server: &VirtualServer, source: &str, lost: &BTreeSet<String>) -> Option<Decision> {
    let status = server.status.as_ref()?;
    let m = status.migration.as_ref()?;
    let live = m.phase == covi_api::virtual_server::MigrationPhase::Running && m.mode.as_deref() == Some("Live");
    if !live || m.source != source || lost.contains(&m.target) {
        return None;
    }
    let size = pool.size_of(&server.spec).ok()?;
    Some(Decision::Bind {
        host: m.target.clone(),
        address: status.address.as_deref().and_then(|a| a.parse().ok()),
        cpus: size.cpus,
        memory: covi_placement::format_mib(size.memory_mib),
        failover_from: Some(source.to_string()),
        migrated_from: None,
    })
}

fn decide(
    pool: &HostPool,
    server: &VirtualServer,
    network: &Result<Network, crate::address::AddressError>,
    placement: &mut Pool<'_>,
    used: &mut BTreeSet<Ipv4Addr>,
    failover: bool,
) -> Decision {
    let spec = &server.spec;
    let size = match pool.size_of(spec) {
        Ok(size) => size,
        Err(e) => {
            return Decision::Invalid { reason: e.reason, message: e.message };
        }
    };
    if let Some(image) = &spec.boot.image
        && pool.image(image).is_none()
    {
        let known: Vec<_> = pool.spec.images.iter().map(|i| i.name.as_str()).collect();
        return Decision::Invalid {
            reason: "ImageNotFound",
            message: format!(
                "image {image} is not in the catalog of pool {}; it has: {}",
                pool.name_any(),
                if known.is_empty() { "no images".to_string() } else { known.join(", ") }
            ),
        };
    }
    let network = match network {
        Ok(n) => n,
        Err(e) => {
            return Decision::Invalid { reason: e.reason, message: e.message.clone() };
        }
    };
    let wanted = spec.network.as_ref().map(|n| n.address.as_str()).filter(|a| *a != "auto");
    // A server moving to another host keeps the address it has.
    let current: Option<Ipv4Addr> =
        server.status.as_ref().and_then(|s| s.address.as_deref()).and_then(|a| a.parse().ok());
    let address = match (current, wanted) {
        (Some(ip), _) => ip,
        (None, Some(a)) => match network.check_static(a, used) {
            Ok(ip) => ip,
            Err(e) => return Decision::Invalid { reason: e.reason, message: e.message },
        },
        (None, None) => match network.allocate(used) {
            Ok(ip) => ip,
            Err(e) => return Decision::Pending { reason: e.reason, message: e.message },
        },
    };
    let demand = demand(server, &size, failover);
    match placement.place(&demand) {
        Ok(host) => {
            used.insert(address);
            Decision::Bind {
                host,
                address: Some(address),
                cpus: size.cpus,
                memory: covi_placement::format_mib(size.memory_mib),
                failover_from: None,
                migrated_from: None,
            }
        }
        Err(u) => Decision::Pending { reason: u.reason, message: u.message },
    }
}

#[cfg(test)]
mod tests;
