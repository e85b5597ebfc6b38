//! Kubernetes-style conditions, shared by every status in covi.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// The three values a condition's `status` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { ConditionStatus::True } else { ConditionStatus::False }
    }
}

/// Sets condition `type_` in `conditions`, keeping `lastTransitionTime` when the status
/// did not change, so that kubectl and GitOps tools show when something really changed.
/// Returns whether anything but the observed generation changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let changed =
                existing.status != status.as_str() || existing.reason != reason || existing.message != message;
            if existing.status != status.as_str() {
                existing.last_transition_time = Time(now);
            }
            existing.status = status.as_str().to_string();
            existing.reason = reason.to_string();
            existing.message = message;
            existing.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status: status.as_str().to_string(),
                reason: reason.to_string(),
                message,
                observed_generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// The condition of type `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether condition `type_` is present with status True.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut conditions = vec![];
        assert!(set_condition(&mut conditions, "Ready", ConditionStatus::False, "Pending", "waiting", Some(1), at(10)));
        assert!(set_condition(&mut conditions, "Ready", ConditionStatus::False, "Binding", "binding", Some(2), at(20)));
        assert_eq!(conditions[0].last_transition_time, Time(at(10)));
        assert!(set_condition(&mut conditions, "Ready", ConditionStatus::True, "Running", "up", Some(2), at(30)));
        assert_eq!(conditions[0].last_transition_time, Time(at(30)));
        assert_eq!(conditions.len(), 1);
    }

    #[test]
    fn unchanged_condition_reports_no_change() {
        let mut conditions = vec![];
        set_condition(&mut conditions, "Ready", ConditionStatus::True, "Running", "up", Some(1), at(10));
        assert!(!set_condition(&mut conditions, "Ready", ConditionStatus::True, "Running", "up", Some(2), at(20)));
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert!(is_condition_true(&conditions, "Ready"));
        assert!(!is_condition_true(&conditions, "Scheduled"));
    }
}
