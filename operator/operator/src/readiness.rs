//! The Ready and Stalled conditions that GitOps tools read. Flux's kstatus takes a
//! resource as InProgress while `observedGeneration` lags or Ready is not True,
//! Current when Ready is True and Failed when Stalled is True; these rules decide
//! what covi says, so a GitOps pipeline waits exactly as long as it should.

use covi_api::condition::find_condition;
use covi_api::contract::condition_type;
use covi_api::virtual_server::{VirtualServerPhase, VirtualServerStatus};
use covi_api::vm_request::VmRequestPhase;
use covi_api::{Condition, ConditionStatus};

/// A condition's desired status, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub status: ConditionStatus,
    pub reason: String,
    pub message: String,
}

impl Desired {
    fn new(status: ConditionStatus, reason: &str, message: impl Into<String>) -> Desired {
        Desired { status, reason: reason.into(), message: message.into() }
    }

    /// Whether `current` already says this (the transition time aside).
    pub fn matches(&self, current: Option<&Condition>) -> bool {
        current
            .is_some_and(|c| c.status == self.status.as_str() && c.reason == self.reason && c.message == self.message)
    }
}

/// A server's Stalled condition: True while it is Failed (with the reason of the
/// condition that failed), back to False once it recovers, absent for a server that
/// never failed (so healthy servers cost no extra write). None: leave it as it is.
pub fn server_stalled(status: &VirtualServerStatus) -> Option<Desired> {
    let failed_condition = || {
        [condition_type::READY, condition_type::SCHEDULED]
            .iter()
            .filter_map(|t| find_condition(&status.conditions, t))
            .find(|c| c.status == "False")
    };
    let stalled = find_condition(&status.conditions, condition_type::STALLED);
    if status.phase == Some(VirtualServerPhase::Failed) {
        return Some(match failed_condition() {
            Some(c) => Desired::new(ConditionStatus::True, &c.reason, c.message.clone()),
            None => Desired::new(ConditionStatus::True, "Failed", "the server failed"),
        });
    }
    stalled
        .filter(|c| c.status == "True")
        .map(|_| Desired::new(ConditionStatus::False, "Recovered", "the server is no longer Failed"))
}

/// A request's Ready and Stalled conditions from its phase: Ready once every server
/// is Ready (and still after expiry: the request did its job); Stalled when only a
/// person can move it on (denied, or over its namespace's quota).
pub fn request_conditions(phase: VmRequestPhase, conditions: &[Condition]) -> [(&'static str, Desired); 2] {
    let over_quota = find_condition(conditions, condition_type::QUOTA_EXCEEDED).filter(|c| c.status == "True");
    let ready = match phase {
        VmRequestPhase::Fulfilled => Desired::new(ConditionStatus::True, "Fulfilled", "every server is Ready"),
        VmRequestPhase::Expired => {
            Desired::new(ConditionStatus::True, "Expired", "the lifetime ended and the servers were reclaimed")
        }
        VmRequestPhase::Pending => Desired::new(ConditionStatus::False, "AwaitingApproval", "waiting for an approver"),
        VmRequestPhase::Denied => Desired::new(ConditionStatus::False, "Denied", "the request was denied"),
        VmRequestPhase::Approved | VmRequestPhase::Provisioning => {
            Desired::new(ConditionStatus::False, "Provisioning", "servers are being created")
        }
    };
    let stalled = match (phase, over_quota) {
        (VmRequestPhase::Denied, _) => {
            let message =
                find_condition(conditions, condition_type::DENIED).map(|c| c.message.clone()).unwrap_or_default();
            Desired::new(ConditionStatus::True, "Denied", message)
        }
        (_, Some(c)) => Desired::new(ConditionStatus::True, "QuotaExceeded", c.message.clone()),
        _ => Desired::new(ConditionStatus::False, "Progressing", "nothing blocks the request"),
    };
    [(condition_type::READY, ready), (condition_type::STALLED, stalled)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(phase: &str, conditions: serde_json::Value) -> VirtualServerStatus {
        serde_json::from_value(json!({"phase": phase, "conditions": conditions})).unwrap()
    }

    fn condition(type_: &str, status: &str, reason: &str, message: &str) -> serde_json::Value {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastTransitionTime": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn a_failed_server_is_stalled_for_the_reason_that_failed_it() {
        let missing = server("Failed", json!([condition("Ready", "False", "ImageNotFound", "no image x")]));
        let d = server_stalled(&missing).unwrap();
        assert_eq!(
            (d.status, d.reason.as_str(), d.message.as_str()),
            (ConditionStatus::True, "ImageNotFound", "no image x")
        );

        let invalid = server(
            "Failed",
            json!([
                condition("Scheduled", "False", "PoolNotFound", "no pool p"),
                condition("Ready", "True", "Running", "")
            ]),
        );
        assert_eq!(server_stalled(&invalid).unwrap().reason, "PoolNotFound");
    }

    #[test]
    fn a_healthy_server_needs_no_stalled_condition_until_it_recovers_from_one() {
        assert_eq!(server_stalled(&server("Running", json!([condition("Ready", "True", "Running", "")]))), None);
        let recovered = server("Running", json!([condition("Stalled", "True", "HostLost", "gone")]));
        let d = server_stalled(&recovered).unwrap();
        assert_eq!((d.status, d.reason.as_str()), (ConditionStatus::False, "Recovered"));
        let settled = server("Running", json!([condition("Stalled", "False", "Recovered", "")]));
        assert_eq!(server_stalled(&settled), None);
    }

    #[test]
    fn a_request_is_ready_when_fulfilled_and_stalled_when_a_person_must_act() {
        let [(_, ready), (_, stalled)] = request_conditions(VmRequestPhase::Fulfilled, &[]);
        assert_eq!((ready.status, stalled.status), (ConditionStatus::True, ConditionStatus::False));

        let denied = [serde_json::from_value(condition("Denied", "True", "ByApprover", "too big")).unwrap()];
        let [(_, ready), (_, stalled)] = request_conditions(VmRequestPhase::Denied, &denied);
        assert_eq!((ready.status, stalled.status), (ConditionStatus::False, ConditionStatus::True));
        assert_eq!(stalled.message, "too big");

        let quota = [serde_json::from_value(condition("QuotaExceeded", "True", "OverQuota", "cpu 9 > 8")).unwrap()];
        let [(_, ready), (_, stalled)] = request_conditions(VmRequestPhase::Pending, &quota);
        assert_eq!((ready.reason.as_str(), stalled.reason.as_str()), ("AwaitingApproval", "QuotaExceeded"));

        let [(_, ready), _] = request_conditions(VmRequestPhase::Provisioning, &[]);
        assert_eq!(ready.status, ConditionStatus::False);
    }
}
