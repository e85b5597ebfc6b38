//! A model of two operator replicas electing a leader through a Lease, and of the
//! addresses the leader gives servers: no two servers of a pool may ever hold one
//! address, though each binding is a write of its own server only.
//!
//! Actors: two replicas (each with its clock, its reading of the leader Lease, and,
//! while it leads, its watch cache of the servers), the API server (the Lease and each
//! server's address), the user (who creates each of two servers at any point), and faults
//! up to a bound: a replica crashes (its Deployment starts it again, as a standby with
//! nothing remembered), is stopped (SIGTERM: it stops acting, then gives the Lease up,
//! and starts again), or is cut off from the API server, and heals.
//!
//! The decisions are covi's: when a standby may take the Lease
//! ([`covi_operator::leader::may_acquire`] on a [`covi_operator::leader::Sighting`]),
//! when the leader may act ([`covi_operator::leader::may_act`]), and which address the
//! scheduling pass gives a server ([`covi_operator::scheduler::pass`]). A pass writes
//! each binding conditional on the server's version, in the step it decides: a write
//! that lands later than the margin between `may_act` and `may_acquire` (a third of
//! the lease) is not modelled.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use covi_api::{Host as HostObject, HostPool, VirtualServer};
use covi_operator::leader::{Sighting, may_acquire, may_act};
use covi_operator::scheduler::{Decision, PoolView};
use serde_json::json;
use stateright::{Model, Property};

use crate::Memo;

/// Mistakes a leader election can make, put back one at a time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Races {
    /// A replica keeps the watch cache it filled while standing by, instead of listing
    /// afresh when it starts to lead: its cache may miss the last leader's bindings.
    pub standby_cache_kept: bool,
    /// "Mine" judged by the Lease's holder identity, not the process's instance: two
    /// replicas given one identity (a copied manifest) both believe they hold it.
    pub holder_by_identity: bool,
}

impl Races {
    pub fn each() -> Vec<(&'static str, Races)> {
        let none = Races::default();
        vec![
            ("standby_cache_kept", Races { standby_cache_kept: true, ..none }),
            ("holder_by_identity", Races { holder_by_identity: true, ..none }),
        ]
    }
}

/// What is checked.
#[derive(Clone, Debug)]
pub struct Election {
    pub races: Races,
    /// Both replicas run under one identity (their instances differ).
    pub one_identity: bool,
    pub max_faults: u8,
    /// The Lease's duration in seconds.
    pub duration: u8,
    pool: HostPool,
    host: Arc<HostObject>,
    server: VirtualServer,
    /// A fixed point on the monotonic clock; every clock of the model counts back from
    /// `base + NOW`.
    base: Instant,
    passes: Memo<Servers, [Option<u8>; 2]>,
}

const NOW: Duration = Duration::from_secs(1000);

/// Each server's address as the API server or a cache holds it (None: the server does
/// not exist; Some(None): no address yet), by the last octet.
pub type Servers = [Option<Option<u8>>; 2];

/// One operator replica.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Replica {
    /// The process runs.
    pub alive: bool,
    pub cut_off: bool,
    /// Seconds since its last successful renewal was sent; None while it holds nothing.
    pub renewed_ago: Option<u8>,
    /// The holder it last read (the replica's index: the instance), if it read one.
    pub seen_holder: Option<Option<u8>>,
    /// The Lease was written since this replica last read it.
    pub lease_changed: bool,
    /// Seconds since it saw the Lease change.
    pub silent: u8,
    /// It runs the leader's loop (it acted since it started).
    pub leading: bool,
    /// Its watch cache of the servers (None: not listed yet).
    pub cache: Option<Servers>,
}

/// The whole system.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct State {
    pub replicas: [Replica; 2],
    /// The Lease's holder: a replica's index (its instance).
    pub holder: Option<u8>,
    /// The servers in the API server.
    pub servers: Servers,
    pub faults: u8,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Action {
    Tick,
    /// The replica's campaign step: read the Lease, renew or take it if it may.
    Campaign(u8),
    /// The replica notices whether it may act: it starts or stops leading.
    Notice(u8),
    /// The leader's watch catches up (or makes its first list).
    Sync(u8),
    /// The leader's scheduling pass, writing every binding it decides.
    Pass(u8),
    UserCreates(u8),
    /// The replica is asked to stop (SIGTERM): it stops acting, gives the Lease up if it
    /// holds it and can reach the API server, and exits.
    Stop(u8),
    Crash(u8),
    Restart(u8),
    Cut(u8),
    Heal(u8),
}

/// No two servers hold one address.
pub const ADDRESSES: &str = "no two servers with the same address";
/// At most one replica acts as leader at any time.
pub const ONE_LEADER: &str = "at most one replica acts as leader";
pub const HANDED_OVER: &str = "the second replica takes over and binds";

impl Election {
    pub fn new(races: Races, one_identity: bool, max_faults: u8) -> Election {
        let pool: HostPool = serde_json::from_value(json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": "model"},
            "spec": {
                "nodeSelector": {"covi.io/pool": "model"}, "hypervisor": "test",
                "storage": {"pool": "shared", "shared": true},
                "images": [{"name": "debian-12", "volume": "debian-12.img"}],
                "classes": [{"name": "small", "cpus": 1, "memory": "1Gi", "disk": "10Gi"}],
                "network": {"bridge": "br0", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"},
            }
        }))
        .expect("the model's pool");
        let host: HostObject = serde_json::from_value(json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "Host",
            "metadata": {"name": "host-0", "labels": {"covi.io/pool": "model"}},
            "spec": {},
            "status": {"capacity": {"cpus": 8, "memory": "16Gi"},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Model", "message": "",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .expect("the model's host");
        let server: VirtualServer = serde_json::from_value(json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
            "metadata": {"name": "s", "namespace": "model", "uid": "uid", "generation": 1, "resourceVersion": "1"},
            "spec": {"hostPool": "model", "class": "small", "boot": {"image": "debian-12"},
                     "owner": "o", "purpose": "p"},
        }))
        .expect("the model's server");
        Election {
            races,
            one_identity,
            max_faults,
            duration: 3,
            pool,
            host: Arc::new(host),
            server,
            base: Instant::now(),
            passes: Memo::default(),
        }
    }

    fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.duration.into())
    }

    fn now(&self) -> Instant {
        self.base + NOW
    }

    fn ago(&self, secs: u8) -> Instant {
        self.now() - Duration::from_secs(secs.into())
    }

    /// Whether replica `r` may act now: covi's rule.
    fn may_act(&self, r: &Replica) -> bool {
        r.alive && may_act(r.renewed_ago.map(|a| self.ago(a)), self.now(), self.lease_duration())
    }

    /// Whether the replica leads or stands by other than covi's rule says it may.
    fn notice_due(&self, r: &Replica) -> bool {
        r.alive && r.leading != self.may_act(r)
    }

    fn identity(&self, r: u8) -> &'static str {
        if self.one_identity || r == 0 { "covi-operator-a" } else { "covi-operator-b" }
    }

    /// The addresses covi's scheduling pass gives the servers `cache` shows: the last
    /// octet of each server's address after the pass.
    fn pass(&self, cache: Servers) -> [Option<u8>; 2] {
        self.passes.get(cache, || self.compute_pass(cache))
    }

    fn compute_pass(&self, cache: Servers) -> [Option<u8>; 2] {
        let servers: Vec<_> = cache
            .iter()
            .enumerate()
            .filter_map(|(k, s)| {
                let address = (*s)?;
                let mut server = self.server.clone();
                server.metadata.name = Some(format!("s{k}"));
                server.metadata.uid = Some(format!("uid-{k}"));
                if let Some(a) = address {
                    server.status = serde_json::from_value(json!({
                        "phase": "Running", "host": "host-0", "address": format!("10.0.0.{a}"), "cpus": 1, "memory": "1Gi"
                    }))
                    .ok();
                }
                Some(Arc::new(server))
            })
            .collect();
        let (assumed, none) = (HashMap::new(), BTreeSet::new());
        let view = PoolView {
            pool: &self.pool,
            hosts: vec![self.host.clone()],
            servers,
            assumed: &assumed,
            unready: &none,
            lost: &none,
        };
        let mut out = cache.map(|s| s.flatten());
        for (server, decision) in covi_operator::scheduler::pass(&view, true) {
            if let Decision::Bind { address: Some(a), .. } = decision {
                let k: usize = server
                    .metadata
                    .uid
                    .as_deref()
                    .and_then(|u| u.strip_prefix("uid-")?.parse().ok())
                    .expect("a model server");
                out[k] = Some(a.octets()[3]);
            }
        }
        out
    }
}

impl Model for Election {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let replica = |r: u8| Replica {
            alive: true,
            cut_off: false,
            renewed_ago: (r == 0).then_some(0),
            seen_holder: Some(Some(0)),
            lease_changed: false,
            silent: 0,
            leading: r == 0,
            cache: (r == 0 || self.races.standby_cache_kept).then_some([None, None]),
        };
        vec![State { replicas: [replica(0), replica(1)], holder: Some(0), servers: [None, None], faults: 0 }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        // A replica notices within 100 ms whether it may act (its campaign checks
        // before every step and while a step is under way): before a second passes.
        if !state.replicas.iter().any(|r| self.notice_due(r)) {
            actions.push(Action::Tick);
        }
        for k in 0..2 {
            if state.servers[k].is_none() {
                actions.push(Action::UserCreates(k as u8));
            }
        }
        let faults_left = state.faults < self.max_faults;
        for (r, replica) in state.replicas.iter().enumerate() {
            let r = r as u8;
            if !replica.alive {
                actions.push(Action::Restart(r));
                continue;
            }
            if self.notice_due(replica) {
                actions.push(Action::Notice(r));
            } else if !replica.cut_off {
                actions.push(Action::Campaign(r));
            }
            if (replica.leading || self.races.standby_cache_kept) && !replica.cut_off {
                actions.push(Action::Sync(r));
            }
            if replica.leading && self.may_act(replica) && replica.cache.is_some() && !replica.cut_off {
                actions.push(Action::Pass(r));
            }
            if faults_left {
                actions.push(Action::Stop(r));
                actions.push(Action::Crash(r));
                actions.push(if replica.cut_off { Action::Heal(r) } else { Action::Cut(r) });
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        let cap = self.duration + 1;
        match action {
            Action::Tick => {
                for r in &mut s.replicas {
                    r.renewed_ago = r.renewed_ago.map(|a| (a + 1).min(cap));
                    r.silent = (r.silent + 1).min(cap);
                }
            }
            Action::Campaign(i) => {
                let me = i as usize;
                let holder = s.holder;
                let r = &s.replicas[me];
                // covi's Sighting: the clock restarts only when the reading changed.
                let renew = |changed: bool| Some(if changed { "renewed" } else { "seen" }.to_string());
                let instance = |h: Option<u8>| h.map(|h| format!("instance-{h}"));
                let previous = r.seen_holder.map(|seen| Sighting {
                    holder: seen.map(|h| self.identity(h).to_string()),
                    instance: instance(seen),
                    renew_time: renew(false),
                    duration: None,
                    changed_at: self.ago(r.silent),
                });
                let sighting = Sighting::update(
                    previous.as_ref(),
                    holder.map(|h| self.identity(h).to_string()),
                    instance(holder),
                    renew(r.lease_changed),
                    None,
                    self.now(),
                );
                let mine = match self.races.holder_by_identity {
                    true => holder.is_some_and(|h| self.identity(h) == self.identity(i)),
                    false => holder == Some(i),
                };
                let held = r.renewed_ago.is_some();
                let same_identity_elsewhere = holder.is_some_and(|h| self.identity(h) == self.identity(i)) && !mine;
                let r = &mut s.replicas[me];
                r.seen_holder = Some(holder);
                r.lease_changed = false;
                r.silent = (self.now().saturating_duration_since(sighting.changed_at).as_secs() as u8).min(cap);
                let writes = if same_identity_elsewhere && held {
                    false
                } else {
                    mine || may_acquire(&sighting, self.now(), self.lease_duration())
                };
                if writes {
                    // A write conditional on the version just read; it takes the Lease
                    // for this process (its instance).
                    s.holder = Some(i);
                    let r = &mut s.replicas[me];
                    r.renewed_ago = Some(0);
                    r.seen_holder = Some(Some(i));
                    r.silent = 0;
                    s.replicas[1 - me].lease_changed = true;
                } else if held {
                    s.replicas[me].renewed_ago = None;
                }
            }
            Action::Notice(i) => {
                let r = &mut s.replicas[i as usize];
                if r.leading {
                    // Lost the Lease: the process exits rather than act beside another.
                    *r = Replica { alive: false, leading: false, cache: None, ..r.clone() };
                } else {
                    r.leading = true;
                    if !self.races.standby_cache_kept {
                        r.cache = None;
                    }
                }
            }
            Action::Sync(i) => s.replicas[i as usize].cache = Some(s.servers),
            Action::Pass(i) => {
                let r = &s.replicas[i as usize];
                let cache = r.cache.expect("a pass needs a listed cache");
                let decided = self.pass(cache);
                let mut cache = cache;
                for k in 0..2 {
                    // Conditional on the version the cache holds: a stale one conflicts.
                    if decided[k] != cache[k].flatten() && cache[k] == s.servers[k] {
                        s.servers[k] = Some(decided[k]);
                        cache[k] = Some(decided[k]);
                    }
                }
                s.replicas[i as usize].cache = Some(cache);
            }
            Action::UserCreates(k) => s.servers[k as usize] = Some(None),
            Action::Stop(i) => {
                s.faults += 1;
                let r = &mut s.replicas[i as usize];
                // covi-operator's main: the leader's loop is dropped first, then the
                // Lease is written with no holder (conditional on the version read).
                r.leading = false;
                let reaches = !r.cut_off;
                r.alive = false;
                if reaches && s.holder == Some(i) {
                    s.holder = None;
                    s.replicas[1 - i as usize].lease_changed = true;
                }
            }
            Action::Crash(i) => {
                s.faults += 1;
                s.replicas[i as usize].alive = false;
            }
            Action::Restart(i) => {
                let cached = self.races.standby_cache_kept.then_some(s.servers);
                s.replicas[i as usize] = Replica {
                    alive: true,
                    cut_off: s.replicas[i as usize].cut_off,
                    renewed_ago: None,
                    seen_holder: None,
                    lease_changed: false,
                    silent: 0,
                    leading: false,
                    cache: cached,
                };
            }
            Action::Cut(i) => {
                s.faults += 1;
                s.replicas[i as usize].cut_off = true;
            }
            Action::Heal(i) => {
                s.faults += 1;
                s.replicas[i as usize].cut_off = false;
            }
        }
        (s != *last).then_some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(ADDRESSES, |_, s: &State| match s.servers {
                [Some(Some(a)), Some(Some(b))] => a != b,
                _ => true,
            }),
            Property::always(ONE_LEADER, |m: &Election, s: &State| {
                s.replicas.iter().filter(|r| r.leading && m.may_act(r)).count() <= 1
            }),
            Property::sometimes(HANDED_OVER, |_, s: &State| {
                s.replicas[1].leading && s.servers.iter().all(|a| a.flatten().is_some())
            }),
        ]
    }
}

/// A counterexample in words.
pub fn trace(path: &[(State, Option<Action>)]) -> String {
    let mut out = String::new();
    for (n, (state, action)) in path.iter().enumerate() {
        let leading: Vec<_> =
            state.replicas.iter().enumerate().filter(|(_, r)| r.leading).map(|(i, _)| replica_name(i as u8)).collect();
        let addresses: Vec<String> = state
            .servers
            .iter()
            .enumerate()
            .filter_map(|(k, a)| {
                Some(format!("s{k}: {}", a.as_ref()?.map(|a| format!("10.0.0.{a}")).unwrap_or("-".into())))
            })
            .collect();
        let holder = state.holder.map(replica_name).unwrap_or_else(|| "nobody".into());
        let _ = writeln!(out, "{n:>3}. Lease held by {holder}; leading {leading:?}; addresses {addresses:?}");
        if let Some(action) = action {
            let _ = writeln!(out, "     then: {}", describe(*action));
        }
    }
    out
}

fn replica_name(r: u8) -> String {
    format!("operator-{r}")
}

pub fn describe(action: Action) -> String {
    let r = replica_name;
    match action {
        Action::Tick => "a second passes".into(),
        Action::Campaign(i) => format!("{} reads the leader Lease and renews or takes it if it may", r(i)),
        Action::Notice(i) => format!("{} notices whether it may act, and starts or stops leading", r(i)),
        Action::Sync(i) => format!("{}'s watch of the servers catches up", r(i)),
        Action::Pass(i) => format!("{} runs a scheduling pass and writes its bindings", r(i)),
        Action::UserCreates(k) => format!("the user creates server s{k}"),
        Action::Stop(i) => format!("{} is stopped (SIGTERM) and gives the Lease up", r(i)),
        Action::Crash(i) => format!("{} crashes", r(i)),
        Action::Restart(i) => format!("{} starts (again), standing by", r(i)),
        Action::Cut(i) => format!("{} is cut off from the API server", r(i)),
        Action::Heal(i) => format!("{}'s network heals", r(i)),
    }
}
