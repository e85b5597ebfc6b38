//! Host liveness by the operator's own clock: it never compares timestamps another
//! machine wrote. It notes when it *saw* each host's Lease renewTime change; a host is
//! lost once it has seen no change for `leaseDuration + grace`, stretched to the
//! timings the agent recorded on its Lease (`Failover::loss_after`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use covi_api::host_pool::{Failover, LeaseTimings};

/// What the operator believes of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Liveness {
    /// No Lease seen yet: not schedulable, and nothing to fail over.
    Unknown,
    /// A Lease seen but not yet seen renewing (this operator just started, or the host
    /// just stopped): not schedulable, not yet lost.
    Unconfirmed,
    Alive,
    /// No renewal seen for longer than the lease duration, still within the grace.
    HeartbeatMissed,
    /// No renewal seen for `leaseDuration + grace`: its servers may run elsewhere.
    Lost,
}

#[derive(Clone, Debug)]
struct Seen {
    renew_time: Option<String>,
    /// What the agent recorded with that renewal.
    timings: LeaseTimings,
    at: Instant,
    /// Whether this operator has seen renewTime change: only then is the host known alive.
    renewed: bool,
}

/// The operator's observations of host Leases.
#[derive(Clone, Debug, Default)]
pub struct Leases {
    seen: HashMap<String, Seen>,
}

impl Leases {
    /// Records the Lease of `host` as read now. The clock starts at the first sight
    /// (so a new leader gives every host a full lease before judging it) and restarts
    /// whenever renewTime changes.
    pub fn observe(&mut self, host: &str, renew_time: Option<String>, timings: LeaseTimings, now: Instant) {
        match self.seen.get_mut(host) {
            Some(seen) if seen.renew_time == renew_time => seen.timings = timings,
            Some(seen) => *seen = Seen { renew_time, timings, at: now, renewed: true },
            None => {
                self.seen.insert(host.to_string(), Seen { renew_time, timings, at: now, renewed: false });
            }
        }
    }

    /// How long ago the operator saw `host` renew, if it ever saw its Lease.
    pub fn silent_for(&self, host: &str, now: Instant) -> Option<Duration> {
        self.seen.get(host).map(|s| now.saturating_duration_since(s.at))
    }

    /// `failover` is the timings of the host's pool; the host's own recorded timings
    /// may stretch them, never shorten them.
    pub fn liveness(&self, host: &str, now: Instant, failover: &Failover) -> Liveness {
        let Some(seen) = self.seen.get(host) else { return Liveness::Unknown };
        judge(now.saturating_duration_since(seen.at), seen.renewed, failover.loss_after(&seen.timings), failover)
    }
}

/// The liveness of a host whose Lease this operator has seen unchanged for `silent`
/// (`renewed`: it has also seen it change), lost after `lost` (see
/// [`Failover::loss_after`]).
pub fn judge(silent: Duration, renewed: bool, lost: Duration, failover: &Failover) -> Liveness {
    let missed = lost.saturating_sub(Duration::from_secs(failover.grace_seconds.into()));
    match silent {
        silent if silent >= lost => Liveness::Lost,
        silent if silent > missed => Liveness::HeartbeatMissed,
        _ if !renewed => Liveness::Unconfirmed,
        _ => Liveness::Alive,
    }
}

/// Whether failover must pause because too much of the pool is lost at once (the
/// operator may be the one cut off): more than `max_percent` of `total` hosts.
pub fn mass_failure(lost: usize, total: usize, max_percent: u32) -> bool {
    total > 0 && lost * 100 > total * max_percent as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Failover {
        Failover::default() // lease 10, fence 6, grace 3
    }

    const NONE: LeaseTimings = LeaseTimings { lease_duration_seconds: None, fence_after_seconds: None };

    #[test]
    fn a_host_is_lost_only_after_lease_plus_grace_without_a_renewal() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.observe("h", Some("r0".into()), NONE, t0);
        leases.observe("h", Some("r1".into()), NONE, t0);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(9), &pool()), Liveness::Alive);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(11), &pool()), Liveness::HeartbeatMissed);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(13), &pool()), Liveness::Lost);
    }

    #[test]
    fn seeing_the_same_renew_time_again_does_not_reset_the_clock() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.observe("h", Some("r1".into()), NONE, t0);
        leases.observe("h", Some("r1".into()), NONE, t0 + Duration::from_secs(12));
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(13), &pool()), Liveness::Lost);
        leases.observe("h", Some("r2".into()), NONE, t0 + Duration::from_secs(14));
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(15), &pool()), Liveness::Alive);
    }

    #[test]
    fn a_new_leader_gives_every_host_a_full_lease() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        // The renewTime may be minutes old; what counts is when this operator saw it.
        // Until it sees a renewal the host takes no new server, but is not lost either.
        leases.observe("h", Some("2020-01-01T00:00:00Z".into()), NONE, t0);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(5), &pool()), Liveness::Unconfirmed);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(13), &pool()), Liveness::Lost);
        leases.observe("h", Some("2020-01-01T00:00:02Z".into()), NONE, t0 + Duration::from_secs(2));
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(3), &pool()), Liveness::Alive);
        assert_eq!(leases.liveness("unseen", t0, &pool()), Liveness::Unknown);
    }

    #[test]
    fn failover_pauses_when_more_than_the_share_is_lost() {
        assert!(!mass_failure(1, 3, 50));
        assert!(!mass_failure(1, 2, 50));
        assert!(mass_failure(2, 3, 50));
        assert!(mass_failure(1, 1, 50));
        assert!(!mass_failure(0, 0, 50));
    }

    #[test]
    fn a_gracefully_stopped_agent_is_given_the_time_it_asked_for() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.observe("h", Some("r1".into()), NONE, t0);
        // Its last renewal before a restart asks for 130 s (and fences after 126).
        let stopping = LeaseTimings { lease_duration_seconds: Some(130), fence_after_seconds: Some(126) };
        leases.observe("h", Some("r2".into()), stopping, t0);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(60), &pool()), Liveness::Alive);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(131), &pool()), Liveness::HeartbeatMissed);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(133), &pool()), Liveness::Lost);
        // Back with the pool's timings: judged by them again.
        leases.observe("h", Some("r3".into()), NONE, t0 + Duration::from_secs(100));
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(113), &pool()), Liveness::Lost);
    }
}
