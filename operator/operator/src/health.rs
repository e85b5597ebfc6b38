//! Host liveness by the operator's own clock: it never compares timestamps another
//! machine wrote. It notes when it *saw* each host's Lease renewTime change; a host is
//! lost once it has seen no change for `leaseDuration + grace`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What the operator believes of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    pub fn observe(&mut self, host: &str, renew_time: Option<String>, now: Instant) {
        match self.seen.get_mut(host) {
            Some(seen) if seen.renew_time == renew_time => {}
            Some(seen) => *seen = Seen { renew_time, at: now, renewed: true },
            None => {
                self.seen.insert(host.to_string(), Seen { renew_time, at: now, renewed: false });
            }
        }
    }

    /// How long ago the operator saw `host` renew, if it ever saw its Lease.
    pub fn silent_for(&self, host: &str, now: Instant) -> Option<Duration> {
        self.seen.get(host).map(|s| now.saturating_duration_since(s.at))
    }

    pub fn liveness(&self, host: &str, now: Instant, lease: Duration, grace: Duration) -> Liveness {
        let Some(seen) = self.seen.get(host) else { return Liveness::Unknown };
        match now.saturating_duration_since(seen.at) {
            silent if silent >= lease + grace => Liveness::Lost,
            silent if silent > lease => Liveness::HeartbeatMissed,
            _ if !seen.renewed => Liveness::Unconfirmed,
            _ => Liveness::Alive,
        }
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

    const LEASE: Duration = Duration::from_secs(10);
    const GRACE: Duration = Duration::from_secs(3);

    #[test]
    fn a_host_is_lost_only_after_lease_plus_grace_without_a_renewal() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.observe("h", Some("r0".into()), t0);
        leases.observe("h", Some("r1".into()), t0);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(9), LEASE, GRACE), Liveness::Alive);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(11), LEASE, GRACE), Liveness::HeartbeatMissed);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(13), LEASE, GRACE), Liveness::Lost);
    }

    #[test]
    fn seeing_the_same_renew_time_again_does_not_reset_the_clock() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.observe("h", Some("r1".into()), t0);
        leases.observe("h", Some("r1".into()), t0 + Duration::from_secs(12));
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(13), LEASE, GRACE), Liveness::Lost);
        leases.observe("h", Some("r2".into()), t0 + Duration::from_secs(14));
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(15), LEASE, GRACE), Liveness::Alive);
    }

    #[test]
    fn a_new_leader_gives_every_host_a_full_lease() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        // The renewTime may be minutes old; what counts is when this operator saw it.
        // Until it sees a renewal the host takes no new server, but is not lost either.
        leases.observe("h", Some("2020-01-01T00:00:00Z".into()), t0);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(5), LEASE, GRACE), Liveness::Unconfirmed);
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(13), LEASE, GRACE), Liveness::Lost);
        leases.observe("h", Some("2020-01-01T00:00:02Z".into()), t0 + Duration::from_secs(2));
        assert_eq!(leases.liveness("h", t0 + Duration::from_secs(3), LEASE, GRACE), Liveness::Alive);
        assert_eq!(leases.liveness("unseen", t0, LEASE, GRACE), Liveness::Unknown);
    }

    #[test]
    fn failover_pauses_when_more_than_the_share_is_lost() {
        assert!(!mass_failure(1, 3, 50));
        assert!(!mass_failure(1, 2, 50));
        assert!(mass_failure(2, 3, 50));
        assert!(mass_failure(1, 1, 50));
        assert!(!mass_failure(0, 0, 50));
    }
}
