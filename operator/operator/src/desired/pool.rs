//! A HostPool's status as the operator decides it: ready and total hosts, servers,
//! allocation, Ready and FailoverPaused.

use std::collections::BTreeSet;
use std::sync::Arc;

use covi_api::condition::{ConditionStatus, set_condition};
use covi_api::contract::{condition_type, manager};
use covi_api::{Host, HostPool, HostPoolStatus, VirtualServer};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use super::{StatusWrite, only};
use crate::scheduler::{host_facts, rules};

/// "allocated/schedulable" CPUs and memory over `hosts` for `servers`.
pub fn allocation(
    pool: &HostPool,
    hosts: &[Arc<Host>],
    servers: &[&Arc<VirtualServer>],
) -> (Option<String>, Option<String>) {
    let rules = rules(pool);
    let (mut cap_cpu, mut cap_mem) = (0u64, 0u64);
    for h in hosts {
        let cap = rules.schedulable(&host_facts(h));
        cap_cpu += u64::from(cap.cpus);
        cap_mem += cap.memory_mib;
    }
    let (mut cpu, mut mem) = (0u64, 0u64);
    for s in servers {
        if let Ok(size) = pool.size_of(&s.spec) {
            cpu += u64::from(size.cpus);
            mem += size.memory_mib;
        }
    }
    (
        Some(format!("{cpu}/{cap_cpu}")),
        Some(format!("{}/{}", covi_placement::format_mib(mem), covi_placement::format_mib(cap_mem))),
    )
}

/// What the pass knows about one pool.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    pub pool: &'a HostPool,
    /// Hosts its nodeSelector matches.
    pub members: &'a [Arc<Host>],
    /// Servers of the pool bound to one of them.
    pub servers: &'a [&'a Arc<VirtualServer>],
    /// Hosts that are not Alive by their Lease, and those Lost.
    pub unready: &'a BTreeSet<String>,
    pub lost: &'a BTreeSet<String>,
    /// Failover waits: too many hosts lost at once (see [`crate::health::mass_failure`]).
    pub failover_paused: bool,
}

/// The pool's status, or None when it already says it.
pub fn update(facts: Facts, now: Timestamp) -> Option<StatusWrite<HostPoolStatus>> {
    let Facts { pool, members, servers, unready, lost, failover_paused } = facts;
    let ready =
        members.iter().filter(|h| crate::scheduler::host_ready(h) && !unready.contains(&h.name_any())).count() as u32;
    let (cpu, memory) = allocation(pool, members, servers);
    let status = pool.status.clone().unwrap_or_default();
    let mut conditions = status.conditions.clone();
    let total = members.len();
    let (ok, reason, message) = if ready > 0 {
        (ConditionStatus::True, "HostsReady", format!("{ready} of {total} hosts are ready"))
    } else if members.is_empty() {
        (ConditionStatus::False, "NoHosts", "no Host matches the pool's nodeSelector".to_string())
    } else {
        (ConditionStatus::False, "NoReadyHost", format!("none of the pool's {total} hosts is ready"))
    };
    let generation = pool.meta().generation;
    let mut changed = set_condition(&mut conditions, condition_type::READY, ok, reason, message, generation, now);
    let lost_here = members.iter().filter(|h| lost.contains(&h.name_any())).count();
    let (paused, reason, message) = if failover_paused {
        let max = pool.spec.failover.max_lost_percent;
        let message = format!(
            "{lost_here} of {total} hosts are lost at once, more than {max}%: failover waits (the operator itself may be cut off)"
        );
        (ConditionStatus::True, "MassFailure", message)
    } else {
        (ConditionStatus::False, "WithinLimits", format!("{lost_here} of {total} hosts are lost"))
    };
    changed |=
        set_condition(&mut conditions, condition_type::FAILOVER_PAUSED, paused, reason, message, generation, now);
    let desired = HostPoolStatus {
        observed_generation: generation,
        ready_hosts: ready,
        total_hosts: total as u32,
        servers: servers.len() as u32,
        cpu_allocation: cpu,
        memory_allocation: memory,
        conditions: only(&conditions, &[condition_type::READY, condition_type::FAILOVER_PAUSED]),
        // Written under its own field manager (see crate::consolidation).
        consolidation: None,
    };
    let unchanged = !changed
        && status.observed_generation == desired.observed_generation
        && status.ready_hosts == desired.ready_hosts
        && status.total_hosts == desired.total_hosts
        && status.servers == desired.servers
        && status.cpu_allocation == desired.cpu_allocation
        && status.memory_allocation == desired.memory_allocation;
    (!unchanged).then(|| StatusWrite::new(manager::OPERATOR, desired))
}

#[cfg(test)]
mod tests;
