//! What to do to bring one server's domain to its plan: a pure decision from the
//! plan and what libvirt shows. Running it twice in a row yields nothing the second time.

use std::time::Duration;

use crate::libvirt::ObservedDomain;
use crate::server::ServerPlan;

/// One action on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Another covi domain holds this server's name (a deleted server's leftover):
    /// remove it first.
    RemoveStale {
        uuid: String,
    },
    /// Prepare the volumes and (re)define the domain.
    Define,
    Start,
    /// Shut the guest down; `force` once the grace period is over.
    Stop {
        force: bool,
    },
}

/// `observed` is every covi domain on the host; `stop_waited` is how long ago a
/// graceful stop of this server was requested, if one was; after `stop_grace` the
/// guest is forced off.
pub fn steps(
    plan: &ServerPlan,
    observed: &[ObservedDomain],
    stop_waited: Option<Duration>,
    stop_grace: Duration,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let d = &plan.domain;
    for other in observed.iter().filter(|o| o.name == d.name && o.uuid != d.uuid) {
        steps.push(Step::RemoveStale { uuid: other.uuid.clone() });
    }
    let current = observed.iter().find(|o| o.uuid == d.uuid);
    let drifted = match current {
        None => true,
        Some(o) => {
            o.owner.generation != d.owner.generation
                || o.vcpus != d.cpus
                || o.memory_kib != d.memory_mib * 1024
                || o.name != d.name
        }
    };
    if drifted {
        steps.push(Step::Define);
    }
    let active = current.is_some_and(|o| o.active);
    match (plan.run, active) {
        (true, false) => steps.push(Step::Start),
        (false, true) => steps.push(Step::Stop { force: stop_waited.is_some_and(|w| w >= stop_grace) }),
        _ => {}
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain_xml::Ownership;
    use crate::server::DiskPlan;

    fn plan(run: bool) -> ServerPlan {
        use crate::domain_xml::*;
        let owner = Ownership { uid: "u1".into(), namespace: "ns".into(), name: "s".into(), generation: 2 };
        ServerPlan {
            domain: DomainSpec {
                name: "ns.s".into(),
                uuid: "u1".into(),
                owner,
                hostname: "s".into(),
                driver: Driver::Test,
                guest: Guest::Hvm,
                cpus: 2,
                memory_mib: 1024,
                disk_path: String::new(),
                disk_format: "raw".into(),
                seed_path: None,
                boot: Boot::Disk,
                bridge: "br0".into(),
                mac: "52:54:00:00:00:01".into(),
                bandwidth_kib: None,
                description: String::new(),
            },
            disk: DiskPlan {
                storage_pool: "p".into(),
                storage_path: None,
                volume: "v".into(),
                image_volume: None,
                format: "raw".into(),
                capacity: 1,
            },
            seed_volume: "seed".into(),
            seed: crate::seed::Seed {
                instance_id: "u1".into(),
                hostname: "s".into(),
                ssh_authorized_keys: vec![],
                user_data: None,
                network: None,
            },
            run,
        }
    }

    const GRACE: Duration = Duration::from_secs(30);

    fn steps(plan: &ServerPlan, observed: &[ObservedDomain], waited: Option<Duration>) -> Vec<Step> {
        super::steps(plan, observed, waited, GRACE)
    }

    fn observed(uuid: &str, active: bool, generation: i64) -> ObservedDomain {
        ObservedDomain {
            uuid: uuid.into(),
            name: "ns.s".into(),
            active,
            running: active,
            owner: Ownership { uid: uuid.into(), namespace: "ns".into(), name: "s".into(), generation },
            vcpus: 2,
            memory_kib: 1024 * 1024,
        }
    }

    #[test]
    fn a_new_server_is_defined_and_started() {
        assert_eq!(steps(&plan(true), &[], None), [Step::Define, Step::Start]);
        assert_eq!(steps(&plan(false), &[], None), [Step::Define]);
    }

    #[test]
    fn a_converged_server_needs_nothing() {
        assert_eq!(steps(&plan(true), &[observed("u1", true, 2)], None), []);
        assert_eq!(steps(&plan(false), &[observed("u1", false, 2)], None), []);
    }

    #[test]
    fn a_destroyed_domain_is_started_again() {
        assert_eq!(steps(&plan(true), &[observed("u1", false, 2)], None), [Step::Start]);
    }

    #[test]
    fn a_new_generation_or_edited_definition_is_redefined() {
        assert_eq!(steps(&plan(true), &[observed("u1", true, 1)], None), [Step::Define]);
        let mut edited = observed("u1", true, 2);
        edited.vcpus = 8;
        assert_eq!(steps(&plan(true), &[edited], None), [Step::Define]);
    }

    #[test]
    fn stopping_is_graceful_then_forced() {
        let running = [observed("u1", true, 2)];
        assert_eq!(steps(&plan(false), &running, None), [Step::Stop { force: false }]);
        assert_eq!(steps(&plan(false), &running, Some(Duration::from_secs(5))), [Step::Stop { force: false }]);
        assert_eq!(steps(&plan(false), &running, Some(GRACE)), [Step::Stop { force: true }]);
    }

    #[test]
    fn a_leftover_with_the_same_name_is_removed_first() {
        let leftover = observed("old", true, 7);
        assert_eq!(
            steps(&plan(true), &[leftover], None),
            [Step::RemoveStale { uuid: "old".into() }, Step::Define, Step::Start]
        );
    }
}
