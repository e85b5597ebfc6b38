//! Leader election through a coordination Lease: one replica schedules, the others
//! stand by and take over within the lease duration.
//!
//! Both sides judge time by their own monotonic clock, never by timestamps another
//! machine wrote. A standby takes over only after it has seen the Lease unchanged for
//! the lease duration. The leader acts only while its last successful renewal, counted
//! from when it was sent, is younger than two thirds of the duration: a leader whose
//! renewals fail stops before any standby may start. Every write of the Lease is
//! conditional on the version read, and carries this process's instance, so two
//! processes under one identity (a forged or copied Lease) cannot both lead.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch::{Receiver, Sender};

use crate::error::Result;

/// Name of the operator's leader Lease.
pub const LEASE: &str = "covi-operator";

/// Annotation naming the process (not just the identity) that holds the Lease.
pub const INSTANCE: &str = "covi.io/leader-instance";

/// What a replica last saw of the Lease, and when by its own clock it saw it change.
#[derive(Clone, Debug, PartialEq)]
pub struct Sighting {
    pub holder: Option<String>,
    pub instance: Option<String>,
    pub renew_time: Option<String>,
    pub changed_at: Instant,
}

impl Sighting {
    /// Records a new reading at `now`; the clock restarts only when something changed.
    pub fn update(
        previous: Option<&Sighting>,
        holder: Option<String>,
        instance: Option<String>,
        renew_time: Option<String>,
        now: Instant,
    ) -> Sighting {
        match previous {
            Some(p) if p.holder == holder && p.instance == instance && p.renew_time == renew_time => p.clone(),
            _ => Sighting { holder, instance, renew_time, changed_at: now },
        }
    }
}

/// Whether a standby may take the Lease: nobody holds it, or this replica has seen
/// it unchanged for the whole duration.
pub fn may_acquire(seen: &Sighting, now: Instant, duration: Duration) -> bool {
    seen.holder.as_deref().is_none_or(str::is_empty) || now.saturating_duration_since(seen.changed_at) >= duration
}

/// Whether the leader may act: its last successful renewal was sent less than two
/// thirds of the duration ago. A standby waits the whole duration from when it saw
/// that renewal, which was no earlier than it was sent.
pub fn may_act(last_renewal_sent: Option<Instant>, now: Instant, duration: Duration) -> bool {
    last_renewal_sent.is_some_and(|sent| now.saturating_duration_since(sent) < duration * 2 / 3)
}

/// Starts campaigning; the receiver is true while this replica may act as leader.
pub async fn campaign(client: Client, namespace: &str, identity: &str, duration: Duration) -> Result<Receiver<bool>> {
    let duration = duration.max(Duration::from_secs(3));
    let (leading, rx) = tokio::sync::watch::channel(false);
    let candidate = Candidate {
        api: Api::namespaced(client, namespace),
        identity: identity.to_string(),
        instance: format!("{identity}-{:x}", rand_u64()),
        duration,
    };
    tokio::spawn(candidate.run(leading));
    Ok(rx)
}

struct Candidate {
    api: Api<Lease>,
    identity: String,
    instance: String,
    duration: Duration,
}

impl Candidate {
    async fn run(self, leading: Sender<bool>) {
        let mut seen: Option<Sighting> = None;
        let mut last_ok: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut next_try = Instant::now();
        loop {
            tick.tick().await;
            let now = Instant::now();
            // Checked every tick, not only after a renewal: a renewal that hangs must
            // not keep this replica acting.
            let acting = may_act(last_ok, now, self.duration);
            leading.send_if_modified(|l| std::mem::replace(l, acting) != acting);
            if now < next_try {
                continue;
            }
            next_try = now + self.duration / 5;
            let sent = Instant::now();
            let attempt = tokio::time::timeout(self.duration / 3, self.step(&mut seen, last_ok.is_some()));
            tokio::pin!(attempt);
            // The check goes on while the step waits for the API server: a leader whose
            // renewal hangs past its deadline stops then, not when the step gives up
            // (up to a third of the duration later, which is the whole margin a
            // standby leaves).
            let result = loop {
                tokio::select! {
                    result = &mut attempt => break result,
                    _ = tick.tick() => {
                        let acting = may_act(last_ok, Instant::now(), self.duration);
                        leading.send_if_modified(|l| std::mem::replace(l, acting) != acting);
                    }
                }
            };
            match result {
                Ok(Ok(true)) => last_ok = Some(sent),
                Ok(Ok(false)) => {
                    if last_ok.take().is_some() {
                        tracing::warn!(identity = %self.identity, "another replica holds the leader lease now");
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "reading or renewing the leader lease failed"),
                Err(_) => tracing::warn!("the API server did not answer about the leader lease in time"),
            }
        }
    }

    /// One round: renew if this process holds the Lease, take it if it may. Returns
    /// whether this process holds it after the round.
    async fn step(&self, seen: &mut Option<Sighting>, held: bool) -> Result<bool> {
        let Some(lease) = self.api.get_opt(LEASE).await? else {
            return self.create().await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let instance = lease.annotations().get(INSTANCE).cloned();
        let renew_time = spec.renew_time.as_ref().map(|t| t.0.to_string());
        let now = Instant::now();
        let sighting = Sighting::update(seen.as_ref(), spec.holder_identity.clone(), instance.clone(), renew_time, now);
        *seen = Some(sighting.clone());
        let mine = instance.as_deref() == Some(self.instance.as_str());
        if spec.holder_identity.as_deref() == Some(self.identity.as_str()) && !mine && held {
            // My identity, another process: two replicas were given one name.
            tracing::error!(identity = %self.identity, other = ?instance, "another process leads under this identity; standing down");
            return Ok(false);
        }
        if !mine && !may_acquire(&sighting, now, self.duration) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time.clone() } else { Some(MicroTime(Timestamp::now())) };
        let held = self.lease(lease.resource_version(), acquired, transitions);
        let written = written(self.api.replace(LEASE, &PostParams::default(), &held).await)?;
        if written && !mine {
            tracing::info!(identity = %self.identity, "took the leader lease");
        }
        Ok(written)
    }

    async fn create(&self) -> Result<bool> {
        let lease = self.lease(None, Some(MicroTime(Timestamp::now())), 0);
        written(self.api.create(&PostParams::default(), &lease).await)
    }

    /// The Lease held by this process, renewed now; conditional on `resource_version`
    /// when given.
    fn lease(&self, resource_version: Option<String>, acquired: Option<MicroTime>, transitions: i32) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": LEASE, "resourceVersion": resource_version, "annotations": {INSTANCE: self.instance}},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.duration.as_secs(),
                "acquireTime": acquired,
                "renewTime": MicroTime(Timestamp::now()),
                "leaseTransitions": transitions,
            }
        }))
        .expect("a valid Lease")
    }
}

/// Whether a write of the Lease took: a conflict means someone wrote it since it was
/// read (they renewed, or took it first).
fn written<T>(result: std::result::Result<T, kube::Error>) -> Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A random number for the instance name, from the kernel.
fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    u64::from_le_bytes(bytes) ^ u64::from(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn a_standby_waits_a_whole_duration_from_the_last_change_it_saw() {
        let t0 = Instant::now();
        let seen = Sighting::update(None, Some("a".into()), Some("a-1".into()), Some("r1".into()), t0);
        assert!(!may_acquire(&seen, t0 + Duration::from_secs(14), D));
        // The same reading again does not restart the clock...
        let again = Sighting::update(
            Some(&seen),
            Some("a".into()),
            Some("a-1".into()),
            Some("r1".into()),
            t0 + Duration::from_secs(10),
        );
        assert!(may_acquire(&again, t0 + D, D));
        // ...a renewal does, whatever time the leader wrote into it.
        let renewed = Sighting::update(
            Some(&again),
            Some("a".into()),
            Some("a-1".into()),
            Some("1999-01-01".into()),
            t0 + Duration::from_secs(12),
        );
        assert!(!may_acquire(&renewed, t0 + D, D));
        let free = Sighting::update(None, None, None, None, t0);
        assert!(may_acquire(&free, t0, D), "nobody holds it");
    }

    #[test]
    fn a_leader_stops_acting_well_before_a_standby_may_start() {
        let sent = Instant::now();
        assert!(!may_act(None, sent, D), "never renewed: not leading");
        assert!(may_act(Some(sent), sent + Duration::from_secs(9), D));
        assert!(!may_act(Some(sent), sent + Duration::from_secs(10), D), "two thirds of 15 s");
    }
}
