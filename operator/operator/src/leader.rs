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
//!
//! An API server that answers slowly (thousands of hosts renewing, a burst of
//! servers) must not cost the fleet its scheduler: the leader paces its Lease as the
//! agents pace theirs. A renewal answered late or not at all doubles the duration (up
//! to 8×), three answered quickly in a row halve it again; each renewal records the
//! duration it was sent with in the Lease's `leaseDurationSeconds`, the leader acts by
//! the duration of its last successful renewal, and a standby waits the longer of its
//! own and the one recorded in the renewal it last saw. The campaign runs on a thread
//! and a connection of its own, so the leader's busiest moments (listing 20,000
//! servers) cannot hold up its renewals either.
//!
//! A leader asked to stop (SIGTERM: a rolling update) stops acting, then gives the
//! Lease up; a standby takes a given-up Lease a third of the duration after it saw it
//! given up, the margin it leaves a leader that just stopped renewing.

use std::time::{Duration, Instant};

use covi_api::host_pool::Pace;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
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
    /// The duration the holder recorded with this renewal (`leaseDurationSeconds`).
    pub duration: Option<Duration>,
    pub changed_at: Instant,
}

impl Sighting {
    /// Records a new reading at `now`; the clock restarts only when something changed.
    pub fn update(
        previous: Option<&Sighting>,
        holder: Option<String>,
        instance: Option<String>,
        renew_time: Option<String>,
        duration: Option<Duration>,
        now: Instant,
    ) -> Sighting {
        match previous {
            Some(p)
                if p.holder == holder
                    && p.instance == instance
                    && p.renew_time == renew_time
                    && p.duration == duration =>
            {
                p.clone()
            }
            _ => Sighting { holder, instance, renew_time, duration, changed_at: now },
        }
    }
}

/// Whether a standby may take the Lease: this replica has seen it unchanged for the
/// whole duration (its own, or the longer one the holder recorded with that renewal),
/// or, given up by a leader that stopped ([`Election::release`]), for a third of it.
/// A leader stops acting two thirds into its duration, so a standby that waits it out
/// leaves a third between the two for the old leader's last writes to land; a leader
/// gives the Lease up only after it stopped acting, and the same third is left.
pub fn may_acquire(seen: &Sighting, now: Instant, duration: Duration) -> bool {
    let duration = seen.duration.map_or(duration, |recorded| recorded.max(duration));
    let silent = now.saturating_duration_since(seen.changed_at);
    match seen.holder.as_deref() {
        None | Some("") => silent >= duration / 3,
        Some(_) => silent >= duration,
    }
}

/// How often the leader renews: a fifth of its (stretched) duration. Its pace follows
/// the agents' rule ([`Pace`]) on this interval: a round answered after more than a
/// tenth of the duration, or not at all, doubles the stretch; three within a fiftieth
/// in a row halve it.
pub fn renew_interval(duration: Duration) -> Duration {
    duration / 5
}

/// Whether the leader may act: its last successful renewal was sent less than two
/// thirds of the duration ago. A standby waits the whole duration from when it saw
/// that renewal, which was no earlier than it was sent.
pub fn may_act(last_renewal_sent: Option<Instant>, now: Instant, duration: Duration) -> bool {
    last_renewal_sent.is_some_and(|sent| now.saturating_duration_since(sent) < duration * 2 / 3)
}

/// A replica's campaign, running on a thread of its own.
pub struct Election {
    /// True while this replica may act as leader.
    pub leading: Receiver<bool>,
    stop: tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<()>>,
}

impl Election {
    /// Ends the campaign. A replica that holds the Lease gives it up (no holder, as
    /// client-go's ReleaseOnCancel does), so a standby or the next replica of a rolling
    /// update takes over a third of the duration later (see [`may_acquire`]) instead
    /// of a whole one, up to 8× stretched. Call it only once this replica has stopped
    /// acting. Waits at most `within` for the write.
    pub async fn release(self, within: Duration) {
        let (done, released) = tokio::sync::oneshot::channel();
        if self.stop.send(done).is_ok() && tokio::time::timeout(within, released).await.is_err() {
            tracing::warn!(
                ?within,
                "the API server did not take the leader lease back in time; a standby waits it out"
            );
        }
    }
}

/// Starts campaigning on a thread of its own, with its own connection to the API
/// server (`kubeconfig` as the operator's).
pub async fn campaign(
    kubeconfig: Option<std::path::PathBuf>,
    namespace: &str,
    identity: &str,
    duration: Duration,
) -> Result<Election> {
    let base = duration.max(Duration::from_secs(3));
    let (leading, rx) = tokio::sync::watch::channel(false);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (ready, connected) = tokio::sync::oneshot::channel();
    let (namespace, identity) = (namespace.to_string(), identity.to_string());
    std::thread::Builder::new()
        .name("leader-election".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready.send(Err(crate::error::Error::Config(format!("leader election runtime: {e}"))));
                    return;
                }
            };
            runtime.block_on(async move {
                let client = match covi_daemon::kube_client(kubeconfig.as_deref()).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready.send(Err(crate::error::Error::Client(e)));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                let candidate = Candidate {
                    api: Api::namespaced(client, &namespace),
                    instance: format!("{identity}-{:x}", rand_u64()),
                    identity,
                    base,
                };
                candidate.run(leading, stopped).await
            })
        })
        .map_err(|e| crate::error::Error::Config(format!("leader election thread: {e}")))?;
    connected.await.map_err(|_| crate::error::Error::Leadership("leader election stopped"))??;
    Ok(Election { leading: rx, stop })
}

struct Candidate {
    api: Api<Lease>,
    identity: String,
    instance: String,
    /// The configured duration; the pace stretches it.
    base: Duration,
}

impl Candidate {
    async fn run(
        self,
        leading: Sender<bool>,
        mut stop: tokio::sync::oneshot::Receiver<tokio::sync::oneshot::Sender<()>>,
    ) {
        let mut seen: Option<Sighting> = None;
        // When the last successful renewal was sent, and the duration it recorded.
        let mut last_ok: Option<(Instant, Duration)> = None;
        let mut pace = Pace::default();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut next_try = Instant::now();
        let acting_now = |last_ok: Option<(Instant, Duration)>| {
            last_ok.is_some_and(|(sent, recorded)| may_act(Some(sent), Instant::now(), recorded))
        };
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                asked = &mut stop => {
                    leading.send_replace(false);
                    if let Ok(done) = asked {
                        if last_ok.is_some() {
                            self.release().await;
                        }
                        let _ = done.send(());
                    }
                    return;
                }
            }
            let now = Instant::now();
            // Checked every tick, not only after a renewal: a renewal that hangs must
            // not keep this replica acting.
            let acting = acting_now(last_ok);
            leading.send_if_modified(|l| std::mem::replace(l, acting) != acting);
            if now < next_try {
                continue;
            }
            let duration = self.base * pace.stretch();
            next_try = now + renew_interval(duration);
            let sent = Instant::now();
            let attempt = tokio::time::timeout(duration / 3, self.step(&mut seen, last_ok.is_some(), duration));
            tokio::pin!(attempt);
            // The check goes on while the step waits for the API server: a leader whose
            // renewal hangs past its deadline stops then, not when the step gives up
            // (up to a third of the duration later, which is the whole margin a
            // standby leaves).
            let result = loop {
                tokio::select! {
                    result = &mut attempt => break result,
                    _ = tick.tick() => {
                        let acting = acting_now(last_ok);
                        leading.send_if_modified(|l| std::mem::replace(l, acting) != acting);
                    }
                }
            };
            let was = pace;
            // A failed round counts as late: the API server may be refusing under load.
            pace = pace.after(matches!(result, Ok(Ok(_))).then(|| sent.elapsed()), renew_interval(duration));
            if pace.stretch() != was.stretch() {
                tracing::warn!(
                    seconds = (self.base * pace.stretch()).as_secs(),
                    took_ms = sent.elapsed().as_millis() as u64,
                    "the API server answers the leader lease slowly: its duration is now {}x",
                    pace.stretch()
                );
            }
            match result {
                Ok(Ok(true)) => last_ok = Some((sent, duration)),
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
    async fn step(&self, seen: &mut Option<Sighting>, held: bool, duration: Duration) -> Result<bool> {
        let Some(lease) = self.api.get_opt(LEASE).await? else {
            return self.create(duration).await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let instance = lease.annotations().get(INSTANCE).cloned();
        let renew_time = spec.renew_time.as_ref().map(|t| t.0.to_string());
        let now = Instant::now();
        let recorded = spec.lease_duration_seconds.map(|s| Duration::from_secs(s.max(0) as u64));
        let sighting =
            Sighting::update(seen.as_ref(), spec.holder_identity.clone(), instance.clone(), renew_time, recorded, now);
        *seen = Some(sighting.clone());
        let mine = instance.as_deref() == Some(self.instance.as_str());
        if spec.holder_identity.as_deref() == Some(self.identity.as_str()) && !mine && held {
            // My identity, another process: two replicas were given one name.
            tracing::error!(identity = %self.identity, other = ?instance, "another process leads under this identity; standing down");
            return Ok(false);
        }
        if !mine && !may_acquire(&sighting, now, self.base) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time.clone() } else { Some(MicroTime(Timestamp::now())) };
        let held = self.lease(lease.resource_version(), acquired, transitions, duration);
        let written = written(self.api.replace(LEASE, &PostParams::default(), &held).await)?;
        if written && !mine {
            tracing::info!(identity = %self.identity, "took the leader lease");
        }
        Ok(written)
    }

    /// Gives the Lease up if this process still holds it: no holder, renewed now with
    /// the duration it holds it by, conditional on the version read (a standby that
    /// took it meanwhile keeps it).
    async fn release(&self) {
        let result = async {
            let Some(lease) = self.api.get_opt(LEASE).await? else { return Ok(false) };
            if lease.annotations().get(INSTANCE) != Some(&self.instance) {
                return Ok(false);
            }
            let spec = lease.spec.clone().unwrap_or_default();
            let released: Lease = serde_json::from_value(json!({
                "metadata": {"name": LEASE, "resourceVersion": lease.resource_version()},
                "spec": {
                    "leaseDurationSeconds": spec.lease_duration_seconds,
                    "renewTime": MicroTime(Timestamp::now()),
                    "leaseTransitions": spec.lease_transitions,
                }
            }))
            .expect("a valid Lease");
            written(self.api.replace(LEASE, &PostParams::default(), &released).await)
        };
        match result.await {
            Ok(true) => {
                tracing::info!(identity = %self.identity, "gave up the leader lease: another replica may lead a third of its duration from now")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "giving up the leader lease failed; a standby takes over once it runs out")
            }
        }
    }

    async fn create(&self, duration: Duration) -> Result<bool> {
        let lease = self.lease(None, Some(MicroTime(Timestamp::now())), 0, duration);
        written(self.api.create(&PostParams::default(), &lease).await)
    }

    /// The Lease held by this process, renewed now; conditional on `resource_version`
    /// when given.
    fn lease(
        &self,
        resource_version: Option<String>,
        acquired: Option<MicroTime>,
        transitions: i32,
        duration: Duration,
    ) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": LEASE, "resourceVersion": resource_version, "annotations": {INSTANCE: self.instance}},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": duration.as_secs(),
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
        let seen = Sighting::update(None, Some("a".into()), Some("a-1".into()), Some("r1".into()), None, t0);
        assert!(!may_acquire(&seen, t0 + Duration::from_secs(14), D));
        // The same reading again does not restart the clock...
        let again = Sighting::update(
            Some(&seen),
            Some("a".into()),
            Some("a-1".into()),
            Some("r1".into()),
            None,
            t0 + Duration::from_secs(10),
        );
        assert!(may_acquire(&again, t0 + D, D));
        // ...a renewal does, whatever time the leader wrote into it.
        let renewed = Sighting::update(
            Some(&again),
            Some("a".into()),
            Some("a-1".into()),
            Some("1999-01-01".into()),
            None,
            t0 + Duration::from_secs(12),
        );
        assert!(!may_acquire(&renewed, t0 + D, D));
    }

    #[test]
    fn a_lease_given_up_is_taken_a_third_of_the_duration_after_it_was_seen() {
        let t0 = Instant::now();
        let held = Sighting::update(None, Some("a".into()), Some("a-1".into()), Some("r1".into()), None, t0);
        // The leader stops and gives it up (no holder) four seconds later.
        let released = Sighting::update(Some(&held), None, None, Some("r2".into()), None, t0 + Duration::from_secs(4));
        assert!(!may_acquire(&released, t0 + Duration::from_secs(8), D), "a write of the old leader may be under way");
        assert!(may_acquire(&released, t0 + Duration::from_secs(9), D), "a third of 15 s after it was seen");
        // Given up with a stretched duration recorded: a third of that.
        let stretched = Some(Duration::from_secs(120));
        let late = Sighting::update(Some(&held), None, None, Some("r2".into()), stretched, t0);
        assert!(!may_acquire(&late, t0 + Duration::from_secs(39), D));
        assert!(may_acquire(&late, t0 + Duration::from_secs(40), D));
    }

    #[test]
    fn a_standby_waits_the_longer_duration_the_leader_recorded() {
        let t0 = Instant::now();
        let stretched = Some(Duration::from_secs(60));
        let seen = Sighting::update(None, Some("a".into()), Some("a-1".into()), Some("r1".into()), stretched, t0);
        assert!(!may_acquire(&seen, t0 + D, D), "15 s is not enough when 60 s were recorded");
        assert!(may_acquire(&seen, t0 + Duration::from_secs(60), D));
        // A shorter recorded duration never shortens the standby's own.
        let short = Sighting::update(
            None,
            Some("a".into()),
            Some("a-1".into()),
            Some("r1".into()),
            Some(Duration::from_secs(5)),
            t0,
        );
        assert!(!may_acquire(&short, t0 + Duration::from_secs(14), D));
        // A new recorded duration is a change: the clock restarts.
        let again =
            Sighting::update(Some(&seen), Some("a".into()), Some("a-1".into()), Some("r1".into()), Some(D), t0 + D);
        assert_eq!(again.changed_at, t0 + D);
    }

    #[test]
    fn the_leader_stretches_its_duration_when_answers_come_late_and_shrinks_it_when_quick() {
        let late = Some(Duration::from_secs(2));
        let quick = Some(Duration::from_millis(100));
        let mut pace = Pace::default();
        pace = pace.after(late, renew_interval(D));
        assert_eq!(pace.stretch(), 2, "more than a tenth of 15 s");
        pace = pace.after(None, renew_interval(D * 2));
        assert_eq!(pace.stretch(), 4, "no answer in time");
        for _ in 0..5 {
            pace = pace.after(None, renew_interval(D * pace.stretch()));
        }
        assert_eq!(pace.stretch(), Pace::MAX);
        pace = pace.after(quick, renew_interval(D * 8)).after(quick, renew_interval(D * 8));
        assert_eq!(pace.stretch(), 8, "two quick answers are not yet three");
        pace = pace.after(quick, renew_interval(D * 8));
        assert_eq!(pace.stretch(), 4);
        pace = pace
            .after(quick, renew_interval(D * 4))
            .after(Some(Duration::from_secs(3)), renew_interval(D * 4))
            .after(quick, renew_interval(D * 4));
        assert_eq!(pace.stretch(), 4, "an answer in between that is not quick starts the count again");
    }

    #[test]
    fn a_leader_stops_acting_well_before_a_standby_may_start() {
        let sent = Instant::now();
        assert!(!may_act(None, sent, D), "never renewed: not leading");
        assert!(may_act(Some(sent), sent + Duration::from_secs(9), D));
        assert!(!may_act(Some(sent), sent + Duration::from_secs(10), D), "two thirds of 15 s");
    }
}
