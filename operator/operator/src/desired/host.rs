//! A Host's status as the operator decides it: its pool and allocation, Lost and
//! Stalled from its Lease, Evacuated while in maintenance, and Ready for a silent
//! agent.

use covi_api::condition::{ConditionStatus, find_condition, is_condition_true, set_condition};
use covi_api::contract::{condition_type, manager};
use covi_api::host::UnmovableServer;
use covi_api::{Condition, Host, HostStatus};
use k8s_openapi::jiff::Timestamp;

use super::{Conditions, Note, StatusWrite, only};
use crate::health::Liveness;

/// What the pass knows about one host.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    pub host: &'a Host,
    /// The pool whose nodeSelector matches it.
    pub pool: Option<String>,
    /// Servers bound to it.
    pub servers: usize,
    /// Servers handed over to another host but not yet running there.
    pub leaving: usize,
    /// "allocated/schedulable" CPUs and memory (see [`super::pool::allocation`]).
    pub allocation: (Option<String>, Option<String>),
    pub liveness: Liveness,
    /// Seconds since its Lease was last seen renewed.
    pub silent_secs: u64,
    /// Servers that cannot leave it (reported only in maintenance).
    pub unmovable: Vec<UnmovableServer>,
    /// How long ago this operator last wrote the host's status, if it did.
    pub since_written: Option<std::time::Duration>,
}

/// A change of counts alone (servers, allocation) waits this long after the host's
/// last write: while a burst lands, a host filling up would otherwise be written once
/// per server. Conditions, pool and evacuation are written at once. The operator's
/// full pass (at least every resync, 10 s by default) writes what waited.
pub const COALESCE_COUNTS: std::time::Duration = std::time::Duration::from_secs(10);

/// The host's writes, in order, and Events.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    /// Ready, spoken for a silent (or returning) agent; written first, so whoever
    /// sees Lost=True also sees Ready=False HostLost.
    pub readiness: Option<StatusWrite<Conditions>>,
    pub summary: StatusWrite<HostStatus>,
    pub notes: Vec<Note>,
}

/// The host's status, or None when it already says all of it.
pub fn update(facts: Facts, now: Timestamp) -> Option<Update> {
    let host = facts.host;
    let status = host.status.clone().unwrap_or_default();
    let mut conditions = status.conditions.clone();
    let transition = liveness_conditions(&mut conditions, facts.liveness, facts.silent_secs, now);
    let stuck = if host.spec.maintenance { facts.unmovable } else { vec![] };
    let was_evacuated = is_condition_true(&conditions, condition_type::EVACUATED);
    let evacuation = crate::migration::evacuation(host.spec.maintenance, facts.servers + facts.leaving, &stuck);
    let evacuation_changed = match &evacuation {
        Some((st, reason, message)) => {
            set_condition(&mut conditions, condition_type::EVACUATED, *st, reason, message.clone(), None, now)
        }
        None => {
            let had = conditions.iter().any(|c| c.type_ == condition_type::EVACUATED);
            conditions.retain(|c| c.type_ != condition_type::EVACUATED);
            had
        }
    };
    let (cpu, memory) = facts.allocation;
    let settled = transition.is_none() && !evacuation_changed && status.unmovable == stuck && status.pool == facts.pool;
    let counted =
        status.servers == facts.servers as u32 && status.cpu_allocation == cpu && status.memory_allocation == memory;
    let recently = facts.since_written.is_some_and(|d| d < COALESCE_COUNTS);
    if settled && (counted || recently) {
        return None;
    }
    // Ready is the agent's condition; the operator speaks for a silent agent.
    let readiness = transition.as_ref().map(|_| {
        let conditions = only(&conditions, &[condition_type::READY]);
        StatusWrite::new(manager::OPERATOR_FOR_AGENT, Conditions { conditions })
    });
    let summary = HostStatus {
        pool: facts.pool,
        servers: facts.servers as u32,
        cpu_allocation: cpu,
        memory_allocation: memory,
        conditions: only(&conditions, &[condition_type::LOST, condition_type::STALLED, condition_type::EVACUATED]),
        unmovable: stuck,
        ..Default::default()
    };
    let evacuated = match evacuation {
        Some((ConditionStatus::True, _, message)) if !was_evacuated => {
            Some(Note::normal("Evacuated", message, "Heartbeat"))
        }
        _ => None,
    };
    let notes = transition.into_iter().chain(evacuated).collect();
    Some(Update { readiness, summary: StatusWrite::new(manager::OPERATOR, summary), notes })
}

/// Sets a host's Ready, Lost and Stalled conditions from its liveness; returns the
/// Event to publish when something changed.
fn liveness_conditions(
    conditions: &mut Vec<Condition>,
    liveness: Liveness,
    silent: u64,
    now: Timestamp,
) -> Option<Note> {
    use ConditionStatus::{False, True};
    use condition_type::{LOST, READY, STALLED};
    let ready_reason = find_condition(conditions, READY).map(|c| (c.status.clone(), c.reason.clone()));
    let was_lost = find_condition(conditions, LOST).is_some_and(|c| c.status == "True");
    let mut set = |changes: &[(&str, ConditionStatus)], reason: &str, message: &str| {
        for (type_, status) in changes {
            set_condition(conditions, type_, *status, reason, message, None, now);
        }
    };
    match liveness {
        Liveness::Lost if !was_lost => {
            let message = format!(
                "no lease renewal seen for {silent}s: the host is lost and its highly-available servers restart elsewhere"
            );
            set(&[(LOST, True), (STALLED, True), (READY, False)], "HostLost", &message);
            Some(Note::warning("HostLost", message, "Heartbeat"))
        }
        Liveness::HeartbeatMissed if ready_reason.as_ref().is_none_or(|(s, _)| s == "True") => {
            let message = format!("no lease renewal seen for {silent}s");
            set(&[(READY, False)], "HeartbeatMissed", &message);
            Some(Note::warning("HeartbeatMissed", message, "Heartbeat"))
        }
        Liveness::Alive
            if was_lost
                || ready_reason
                    .as_ref()
                    .is_some_and(|(s, r)| s == "False" && (r == "HeartbeatMissed" || r == "HostLost")) =>
        {
            let message = "the host renews its lease again";
            set(&[(LOST, False), (STALLED, False), (READY, True)], "LeaseRenewed", message);
            Some(Note::normal("HostRecovered", message, "Heartbeat"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
