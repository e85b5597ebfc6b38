//! Consolidation, recommend mode: for each pool that asks, every interval, the
//! planner's answer (`covi_placement::consolidate`) from the caches, written to the
//! pool's `status.consolidation` with an Event when the plan changes. Nothing moves.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use covi_api::host_pool::{ConsolidationMode, ConsolidationStatus, PlannedMove};
use covi_api::virtual_server::{MigrationPhase, VirtualServerPhase};
use covi_api::{Host, HostPool, VirtualServer};
use covi_placement::consolidate::{HOURS, Input, Server, Use, plan};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use crate::desired::Note;
use crate::scheduler::{Assumed, bound_host, live_facts, rules};

/// When each pool was last planned.
#[derive(Default)]
pub struct Consolidator {
    last: HashMap<String, Instant>,
}

impl Consolidator {
    /// Whether `pool` asks for a plan now.
    pub fn due(&mut self, pool: &HostPool) -> bool {
        let c = &pool.spec.consolidation;
        if c.mode == ConsolidationMode::Disabled {
            self.last.remove(&pool.name_any());
            return false;
        }
        let every = Duration::from_secs(u64::from(c.interval_seconds));
        match self.last.get(&pool.name_any()) {
            Some(at) if at.elapsed() < every => false,
            _ => {
                self.last.insert(pool.name_any(), Instant::now());
                true
            }
        }
    }
}

/// The plan for one pool from its hosts and the servers bound to them; the Event to
/// publish when it differs from the one in the pool's status.
pub fn recommend(
    pool: &HostPool,
    members: &[Arc<Host>],
    servers: &[Arc<VirtualServer>],
    assumed: &HashMap<String, Assumed>,
    unready: &BTreeSet<String>,
    now: Timestamp,
) -> (ConsolidationStatus, Option<Note>) {
    let facts = live_facts(members, unready);
    let names: BTreeSet<String> = facts.iter().map(|f| f.name.clone()).collect();
    let mut without_profile = 0;
    let planned: Vec<Server> = servers
        .iter()
        .filter(|s| s.meta().deletion_timestamp.is_none())
        .filter_map(|s| {
            let host = bound_host(s, assumed).filter(|h| names.contains(*h))?;
            let size = pool.size_of(&s.spec).ok()?;
            let demand = crate::scheduler::demand(s, &size, false);
            let status = s.status.as_ref();
            let profile = status.and_then(|st| st.usage.as_ref()).filter(|u| !u.profile.is_empty());
            if profile.is_none() {
                without_profile += 1;
            }
            let profile = match profile {
                // Hours never measured count at the allocation.
                Some(u) => {
                    let mut hours = Server::flat_profile(&demand);
                    for h in &u.profile {
                        let (cpu, memory) = h.peak();
                        hours[usize::from(h.hour) % HOURS] = Use { cpu_millis: cpu, memory_mib: memory };
                    }
                    hours
                }
                None => Server::flat_profile(&demand),
            };
            // Only running servers on shared storage move live; others stay put.
            let running = status.and_then(|st| st.phase) == Some(VirtualServerPhase::Running);
            let movable = running && pool.spec.storage.shared && s.active_migration().is_none();
            Some(Server {
                name: format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
                demand,
                profile,
                host: Some(host.to_string()),
                movable,
            })
        })
        .collect();
    let c = &pool.spec.consolidation;
    let rules = rules(pool);
    let theta = f64::from(c.target_utilization_percent) / 100.0;
    let result = plan(&Input { rules: &rules, hosts: &facts, servers: &planned, theta, budget: c.max_moves as usize });
    let hosts_used = planned.iter().filter_map(|s| s.host.as_deref()).collect::<BTreeSet<_>>().len() as u32;
    let moves: Vec<PlannedMove> = result
        .moves
        .iter()
        .filter_map(|m| Some(PlannedMove { server: m.server.clone(), from: m.from.clone()?, to: m.to.clone() }))
        .collect();
    let status = ConsolidationStatus {
        planned_at: Time(now),
        hosts_used,
        planned_hosts: result.hosts_used as u32,
        moves,
        emptied_hosts: result.emptied,
        without_profile,
    };
    let previous = pool.status.as_ref().and_then(|s| s.consolidation.as_ref());
    let changed = previous.is_none_or(|p| (p.planned_hosts, &p.moves) != (status.planned_hosts, &status.moves));
    let note = changed.then(|| {
        let moves: Vec<String> = status.moves.iter().map(|m| format!("{} {} -> {}", m.server, m.from, m.to)).collect();
        let hosts = |n: u32| if n == 1 { "1 host".to_string() } else { format!("{n} hosts") };
        let message = if status.moves.is_empty() {
            format!("{} run the pool's servers; no move frees one", hosts(status.hosts_used))
        } else {
            format!(
                "{} could run what {} run now (target {}%): {}; frees {}",
                hosts(status.planned_hosts),
                status.hosts_used,
                c.target_utilization_percent,
                moves.join(", "),
                if status.emptied_hosts.is_empty() { "none yet".into() } else { status.emptied_hosts.join(", ") }
            )
        };
        Note::normal("ConsolidationPlanned", message, "Consolidate")
    });
    (status, note)
}

/// Automatic mode: each host of the pool whose Freed mark must change — freed when the
/// pool's plan empties it, no server is bound to it any more and no move off it is
/// unfinished, no longer when a server is bound to it again — with its new Freed
/// condition and the Event to publish.
pub fn freed_marks(
    pool: &HostPool,
    members: &[Arc<Host>],
    servers: &[Arc<VirtualServer>],
    assumed: &HashMap<String, Assumed>,
    now: Timestamp,
) -> Vec<(Arc<Host>, bool, covi_api::Condition, Option<Note>)> {
    use covi_api::condition::{ConditionStatus, find_condition, set_condition};
    use covi_api::contract::condition_type::FREED;
    let automatic = pool.spec.consolidation.mode == ConsolidationMode::Automatic;
    let emptied: BTreeSet<&str> = pool
        .status
        .as_ref()
        .and_then(|s| s.consolidation.as_ref())
        .map(|c| c.emptied_hosts.iter().map(String::as_str).collect())
        .unwrap_or_default();
    // A host is busy while a server is bound to it, and while a move off it is not
    // finished: until the migration record says Succeeded, the move may still fail back
    // to it, so it is not yet free to power off.
    let busy: BTreeSet<&str> = servers
        .iter()
        .filter(|s| Some(s.spec.host_pool.as_str()) == pool.metadata.name.as_deref())
        .flat_map(|s| {
            let moving_off = s
                .status
                .as_ref()
                .and_then(|st| st.migration.as_ref())
                .filter(|m| matches!(m.phase, MigrationPhase::Pending | MigrationPhase::Running));
            bound_host(s, assumed).into_iter().chain(moving_off.map(|m| m.source.as_str()))
        })
        .collect();
    let mut out = Vec::new();
    for host in members {
        let name = host.name_any();
        let freed = automatic && emptied.contains(name.as_str()) && !busy.contains(name.as_str());
        let mut conditions = host.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
        let was = find_condition(&conditions, FREED).is_some_and(|c| c.status == "True");
        let labelled = host.labels().contains_key(covi_api::contract::FREED_LABEL);
        if freed == was && freed == labelled {
            continue;
        }
        // A host never marked stays unmarked.
        if !freed && find_condition(&conditions, FREED).is_none() && !labelled {
            continue;
        }
        let (status, reason, message) = if freed {
            (ConditionStatus::True, "Consolidated", "consolidation moved every server off this host: free to power off")
        } else {
            (ConditionStatus::False, "InUse", "servers run on this host")
        };
        set_condition(&mut conditions, FREED, status, reason, message, None, now);
        let condition = find_condition(&conditions, FREED).cloned().expect("just set");
        let note = (freed && !was).then(|| Note::normal("HostFreed", message, "Consolidate"));
        out.push((host.clone(), freed, condition, note));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{host, pool, server};
    use serde_json::json;

    fn automatic_pool_emptying(host: &str) -> HostPool {
        pool(json!({"spec": {"consolidation": {"mode": "Automatic"}},
                    "status": {"consolidation": {"emptiedHosts": [host], "hostsUsed": 2, "plannedHosts": 1,
                                                "plannedAt": "2026-01-01T00:00:00Z"}}}))
    }

    fn moved(phase: &str) -> Arc<VirtualServer> {
        server(
            "office",
            json!({"status": {"phase": "Running", "host": "h2",
                   "migration": {"source": "h1", "target": "h2", "phase": phase, "mode": "Cold"}}}),
        )
    }

    #[test]
    fn a_host_is_freed_only_once_the_move_off_it_has_succeeded() {
        let pool = automatic_pool_emptying("h1");
        let members = [host("h1", json!({})), host("h2", json!({}))];
        let now = Timestamp::now();
        // Bound to the target already, but the move is still under way: the source is
        // not yet free to power off.
        let marks = freed_marks(&pool, &members, &[moved("Running")], &HashMap::new(), now);
        assert!(marks.is_empty(), "{marks:?}");
        let marks = freed_marks(&pool, &members, &[moved("Succeeded")], &HashMap::new(), now);
        let freed: Vec<_> = marks.iter().map(|(h, f, c, _)| (h.name_any(), *f, c.reason.clone())).collect();
        assert_eq!(freed, [("h1".to_string(), true, "Consolidated".to_string())]);
    }
}
