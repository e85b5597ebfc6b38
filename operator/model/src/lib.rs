//! A model of covi's failover protocol, checked exhaustively with `stateright`.
//!
//! Actors: the operator leader (its caches of Leases and bindings, its clock), two or
//! three hosts, each with an agent process (its watch cache, its fencing state, its
//! clock) and libvirt (whether the server's domain runs there), and the API server
//! (the binding, the Leases). Nondeterminism: every step of every actor in any order,
//! caches that lag (an agent's or the operator's view is brought up to date by a step
//! of its own), clock ticks, and faults up to a bound: agent crash and restart with
//! guests alive, host power loss and return, partition from the API server and heal.
//!
//! The decisions are covi's own functions, not copies: the operator's liveness
//! judgement ([`covi_operator::health::judge`]) and scheduling pass
//! ([`covi_operator::scheduler::pass`]), the agent's plan and converge steps
//! ([`covi_agent::server::plan`], [`covi_agent::converge::steps`]), its orphan
//! judgement ([`covi_agent::sweep::judge`]) and its fencing decisions
//! ([`covi_agent::fence::overdue`], [`covi_agent::fence::may_start`]).
//!
//! Time: a tick advances every clock by one second. Timings are the pool's
//! (`renewSeconds` 1, `fenceAfterSeconds` 2, `leaseDurationSeconds` 3, `graceSeconds` 1
//! by default). Two rules make time honest: a tick never passes a due watchdog (it
//! acts within milliseconds of its deadline, far inside the margin between
//! fenceAfter and lease + grace), and, without disk leases, a crashed agent is
//! restarted (by its DaemonSet) before its deadline passes — the one assumption the
//! disk leases remove.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use covi_agent::converge::{Step, steps};
use covi_agent::libvirt::ObservedDomain;
use covi_agent::sweep::{Orphan, judge as judge_orphan};
use covi_api::host_pool::{Failover, LeaseTimings};
use covi_api::{Host as HostObject, HostPool, VirtualServer};
use covi_operator::health::{Liveness, judge};
use covi_operator::scheduler::{Decision, PoolView};
use serde_json::json;
use stateright::{Model, Property};

/// Protocol bugs covi had (the issue "Never two copies"), put back one at a time to
/// show that the checker finds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Races {
    /// A restarted agent counts its fencing deadline from its own start instead of
    /// taking over the last renewal's (before the Lease carried it over).
    pub restart_forgets_deadline: bool,
    /// The start's last check is not held across the start: the watchdog may fence in
    /// between, and the start follows anyway.
    pub start_check_not_held: bool,
    /// An agent starts what its watch cache says is bound here, without the fresh
    /// read before the start.
    pub no_pre_start_read: bool,
    /// The operator acts on a host's loss as its cache of Leases shows it, without a
    /// fresh read (found by this model: a cache that lags declares a live host lost).
    pub lease_cache_trusted: bool,
}

impl Races {
    /// Both sets of races.
    pub fn with(self, other: Races) -> Races {
        Races {
            restart_forgets_deadline: self.restart_forgets_deadline || other.restart_forgets_deadline,
            start_check_not_held: self.start_check_not_held || other.start_check_not_held,
            no_pre_start_read: self.no_pre_start_read || other.no_pre_start_read,
            lease_cache_trusted: self.lease_cache_trusted || other.lease_cache_trusted,
        }
    }

    /// Each race alone, by name.
    pub fn each() -> Vec<(&'static str, Races)> {
        let none = Races::default();
        vec![
            ("restart_forgets_deadline", Races { restart_forgets_deadline: true, ..none }),
            ("start_check_not_held", Races { start_check_not_held: true, ..none }),
            ("no_pre_start_read", Races { no_pre_start_read: true, ..none }),
            ("lease_cache_trusted", Races { lease_cache_trusted: true, ..none }),
        ]
    }
}

/// What is checked: the fleet, the guard and the faults allowed.
#[derive(Clone, Debug)]
pub struct Protocol {
    pub hosts: usize,
    /// libvirt's lock manager holds each disk for the domain using it (virtlockd).
    pub disk_leases: bool,
    pub races: Races,
    /// Faults (crash, restart, power loss, power on, partition, heal) in one run.
    pub max_faults: u8,
    pub failover: Failover,
    /// Built once: the pool, the server unbound, a host, and the server's domain.
    pool: HostPool,
    server: VirtualServer,
    host: HostObject,
    domain: ObservedDomain,
}

impl Protocol {
    pub fn new(hosts: usize, disk_leases: bool, races: Races, max_faults: u8) -> Protocol {
        let failover = Failover {
            renew_seconds: 1,
            fence_after_seconds: 2,
            lease_duration_seconds: 3,
            grace_seconds: 1,
            ..Failover::default()
        };
        let pool = pool(&failover);
        let server = server();
        let plan = covi_agent::server::plan(&server, &pool, "test").expect("a plan of the model's server");
        let domain = ObservedDomain {
            uuid: plan.domain.uuid.clone(),
            name: plan.domain.name.clone(),
            active: true,
            running: true,
            owner: plan.domain.owner.clone(),
            vcpus: plan.domain.cpus,
            memory_kib: plan.domain.memory_mib * 1024,
        };
        Protocol { hosts, disk_leases, races, max_faults, failover, pool, server, host: host(), domain }
    }

    fn fence_after(&self) -> Duration {
        Duration::from_secs(self.failover.fence_after_seconds.into())
    }

    /// Lease + grace, as the agents record them on their Leases.
    fn lost_after(&self) -> Duration {
        let recorded = LeaseTimings {
            lease_duration_seconds: Some(self.failover.lease_duration_seconds),
            fence_after_seconds: Some(self.failover.fence_after_seconds),
        };
        self.failover.loss_after(&recorded)
    }

    /// Clocks stop counting here: every decision is the same beyond it.
    fn clock_cap(&self) -> u8 {
        (self.lost_after().as_secs() + 1).min(u64::from(u8::MAX)) as u8
    }
}

/// One host as the model sees it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Host {
    pub power: bool,
    /// The agent process runs.
    pub agent: bool,
    /// Cut off from the API server (and the operator).
    pub cut_off: bool,
    /// The server's domain runs here.
    pub running: bool,
    /// The agent's watch cache of the server's binding (None: not synced since start).
    pub sees: Option<Option<u8>>,
    pub renewed_once: bool,
    pub fenced: bool,
    /// The agent's clock: seconds since its last renewal.
    pub since_renewal: u8,
    /// Passed the start's check, not yet started (only with `start_check_not_held`).
    pub starting: bool,
    /// The Lease changed since the operator last read it.
    pub lease_changed: bool,
    /// The operator's clock: seconds since it saw this Lease change.
    pub silent: u8,
    /// The operator has seen this Lease change since it leads.
    pub seen_renewing: bool,
}

/// The whole system.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct State {
    pub hosts: Vec<Host>,
    /// The server's `status.host` in the API server.
    pub bound: Option<u8>,
    /// The operator's cache of it.
    pub operator_sees: Option<u8>,
    pub faults: u8,
}

/// Who did what.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Action {
    Tick,
    Renew(u8),
    OperatorReadsLeases,
    OperatorSyncs,
    OperatorPass,
    AgentSyncs(u8),
    AgentConverges(u8),
    AgentStartsNow(u8),
    Watchdog(u8),
    AgentCrash(u8),
    AgentRestart(u8),
    PowerOff(u8),
    PowerOn(u8),
    Cut(u8),
    Heal(u8),
}

fn pool(failover: &Failover) -> HostPool {
    serde_json::from_value(json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": "model"},
        "spec": {
            "nodeSelector": {"covi.io/pool": "model"}, "hypervisor": "test",
            "storage": {"pool": "shared", "shared": true},
            "images": [{"name": "debian-12", "volume": "debian-12.img"}],
            "classes": [{"name": "small", "cpus": 1, "memory": "1Gi", "disk": "10Gi"}],
            "network": {"bridge": "br0", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"},
            "failover": failover,
        }
    }))
    .expect("the model's pool")
}

fn host() -> HostObject {
    serde_json::from_value(json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "Host",
        "metadata": {"name": "host", "labels": {"covi.io/pool": "model"}},
        "spec": {},
        "status": {"capacity": {"cpus": 4, "memory": "8Gi"},
                   "conditions": [{"type": "Ready", "status": "True", "reason": "Model", "message": "",
                                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    }))
    .expect("a model host")
}

/// The highly-available server of the model, running, bound nowhere yet.
fn server() -> VirtualServer {
    serde_json::from_value(json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
        "metadata": {"name": "db", "namespace": "model", "uid": "uid-db", "generation": 1,
                     "resourceVersion": "1", "finalizers": ["covi.io/domain"]},
        "spec": {"hostPool": "model", "class": "small", "boot": {"image": "debian-12"},
                 "highAvailability": true, "owner": "o", "purpose": "p"},
        "status": {"phase": "Running", "address": "10.0.0.5", "cpus": 1, "memory": "1Gi"}
    }))
    .expect("the model's server")
}

impl Protocol {
    fn host_object(&self, i: usize, h: &Host) -> Arc<HostObject> {
        let mut host = self.host.clone();
        host.metadata.name = Some(host_name(i));
        if let Some(ready) = host.status.as_mut().and_then(|s| s.conditions.first_mut()) {
            ready.status = if h.agent && h.power && !h.cut_off { "True" } else { "False" }.into();
        }
        Arc::new(host)
    }

    fn server(&self, bound: Option<u8>) -> VirtualServer {
        let mut server = self.server.clone();
        if let Some(status) = server.status.as_mut() {
            status.host = bound.map(|b| host_name(b.into()));
        }
        server
    }

    /// The operator's view of every host, by its clock.
    fn liveness(&self, state: &State) -> Vec<Liveness> {
        let lost = self.lost_after();
        state
            .hosts
            .iter()
            .map(|h| judge(Duration::from_secs(h.silent.into()), h.seen_renewing, lost, &self.failover))
            .collect()
    }

    /// The operator's scheduling pass over its caches: covi's own.
    fn scheduling_pass(&self, state: &State) -> Option<Decision> {
        let pool = &self.pool;
        let liveness = self.liveness(state);
        let names = |want: &dyn Fn(Liveness) -> bool| -> BTreeSet<String> {
            liveness.iter().enumerate().filter(|(_, l)| want(**l)).map(|(i, _)| host_name(i)).collect()
        };
        let unready = names(&|l| l != Liveness::Alive);
        let lost = names(&|l| l == Liveness::Lost);
        let hosts: Vec<_> = state.hosts.iter().enumerate().map(|(i, h)| self.host_object(i, h)).collect();
        let assumed = HashMap::new();
        let view = PoolView {
            pool,
            hosts,
            servers: vec![Arc::new(self.server(state.operator_sees))],
            assumed: &assumed,
            unready: &unready,
            lost: &lost,
        };
        let paused = covi_operator::health::mass_failure(lost.len(), state.hosts.len(), self.failover.max_lost_percent);
        covi_operator::scheduler::pass(&view, !paused).into_iter().map(|(_, d)| d).next()
    }

    /// What the agent on `i` does with the server as its cache shows it: start it
    /// (covi's plan and converge steps), remove it (covi's orphan judgement), or nothing.
    fn converge(&self, state: &State, i: usize) -> Converge {
        let h = &state.hosts[i];
        let Some(sees) = h.sees else { return Converge::Nothing };
        let me = i as u8;
        if sees == Some(me) {
            let plan = covi_agent::server::plan(&self.server(sees), &self.pool, "test").expect("a plan");
            let observed = if h.running { vec![self.domain.clone()] } else { vec![] };
            if steps(&plan, &observed, None, Duration::from_secs(30)).contains(&Step::Start) {
                return Converge::Start;
            }
            return Converge::Nothing;
        }
        if h.running {
            // The sweep reads the server fresh; cut off, it cannot.
            if h.cut_off {
                return Converge::Nothing;
            }
            let server = self.server(state.bound);
            return match judge_orphan(&self.domain, Some(&server), &host_name(i)) {
                Orphan::Keep => Converge::Nothing,
                Orphan::RemoveDomain | Orphan::RemoveAll => Converge::Remove,
            };
        }
        Converge::Nothing
    }

    /// Whether the agent on `i` may start now: covi's fencing rule, the fresh read
    /// before the start, and the disk lease.
    fn may_start(&self, state: &State, i: usize) -> bool {
        let h = &state.hosts[i];
        let since = Duration::from_secs(h.since_renewal.into());
        if !covi_agent::fence::may_start(h.renewed_once, h.fenced, since, self.fence_after()) {
            return false;
        }
        if !self.races.no_pre_start_read && (h.cut_off || state.bound != Some(i as u8)) {
            return false;
        }
        self.disk_free(state, i)
    }

    fn disk_free(&self, state: &State, i: usize) -> bool {
        !self.disk_leases || !state.hosts.iter().enumerate().any(|(j, o)| j != i && o.running)
    }

    fn watchdog_due(&self, h: &Host) -> bool {
        let overdue = covi_agent::fence::overdue(Duration::from_secs(h.since_renewal.into()), self.fence_after());
        h.agent && h.power && overdue && (h.running || !h.fenced)
    }

    fn tick_allowed(&self, state: &State) -> bool {
        let deadline = self.failover.fence_after_seconds.saturating_sub(1) as u8;
        state.hosts.iter().all(|h| {
            !self.watchdog_due(h)
                && (self.disk_leases || h.agent || !h.power || !h.running || h.since_renewal < deadline)
        })
    }
}

enum Converge {
    Nothing,
    Start,
    Remove,
}

pub fn host_name(i: usize) -> String {
    format!("host-{i}")
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let host = |i: usize| Host {
            power: true,
            agent: true,
            cut_off: false,
            running: i == 0,
            sees: Some(Some(0)),
            renewed_once: true,
            fenced: false,
            since_renewal: 0,
            starting: false,
            lease_changed: false,
            silent: 0,
            seen_renewing: true,
        };
        vec![State { hosts: (0..self.hosts).map(host).collect(), bound: Some(0), operator_sees: Some(0), faults: 0 }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        if self.tick_allowed(state) {
            actions.push(Action::Tick);
        }
        actions.push(Action::OperatorReadsLeases);
        actions.push(Action::OperatorSyncs);
        actions.push(Action::OperatorPass);
        let faults_left = state.faults < self.max_faults;
        for (i, h) in state.hosts.iter().enumerate() {
            let i = i as u8;
            if h.agent && h.power {
                if !h.cut_off {
                    actions.push(Action::Renew(i));
                    actions.push(Action::AgentSyncs(i));
                }
                actions.push(Action::AgentConverges(i));
                if h.starting {
                    actions.push(Action::AgentStartsNow(i));
                }
                if self.watchdog_due(h) {
                    actions.push(Action::Watchdog(i));
                }
            }
            if faults_left {
                match (h.power, h.agent) {
                    (true, true) => actions.push(Action::AgentCrash(i)),
                    (true, false) => actions.push(Action::AgentRestart(i)),
                    _ => {}
                }
                actions.push(if h.power { Action::PowerOff(i) } else { Action::PowerOn(i) });
                actions.push(if h.cut_off { Action::Heal(i) } else { Action::Cut(i) });
            } else if h.power && !h.agent {
                // The DaemonSet restarts a crashed agent, faults or not.
                actions.push(Action::AgentRestart(i));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        let cap = self.clock_cap();
        match action {
            Action::Tick => {
                for h in &mut s.hosts {
                    h.since_renewal = (h.since_renewal + 1).min(cap);
                    h.silent = (h.silent + 1).min(cap);
                }
            }
            Action::Renew(i) => {
                let h = &mut s.hosts[i as usize];
                h.since_renewal = 0;
                h.renewed_once = true;
                h.fenced = false;
                h.lease_changed = true;
            }
            Action::OperatorReadsLeases => {
                for h in &mut s.hosts {
                    if h.lease_changed {
                        h.lease_changed = false;
                        h.silent = 0;
                        h.seen_renewing = true;
                    }
                }
            }
            Action::OperatorSyncs => s.operator_sees = s.bound,
            Action::OperatorPass => {
                // A host with the server that the cache shows lost is read fresh first.
                if !self.races.lease_cache_trusted {
                    let liveness = self.liveness(&s);
                    for (i, h) in s.hosts.iter_mut().enumerate() {
                        let occupied = s.operator_sees == Some(i as u8);
                        if liveness[i] == Liveness::Lost && occupied && h.lease_changed {
                            h.lease_changed = false;
                            h.silent = 0;
                            h.seen_renewing = true;
                        }
                    }
                }
                if let Some(Decision::Bind { host, .. }) = self.scheduling_pass(&s) {
                    // Conditional on the version decided on: a stale cache conflicts.
                    if s.operator_sees == s.bound {
                        let to = (0..s.hosts.len()).find(|j| host_name(*j) == host).map(|j| j as u8);
                        s.bound = to;
                        s.operator_sees = to;
                    }
                }
            }
            Action::AgentSyncs(i) => s.hosts[i as usize].sees = Some(s.bound),
            Action::AgentConverges(i) => match self.converge(&s, i as usize) {
                Converge::Nothing => return None,
                Converge::Remove => s.hosts[i as usize].running = false,
                Converge::Start => {
                    if !self.may_start(&s, i as usize) {
                        return None;
                    }
                    if self.races.start_check_not_held {
                        s.hosts[i as usize].starting = true;
                    } else {
                        s.hosts[i as usize].running = true;
                    }
                }
            },
            Action::AgentStartsNow(i) => {
                let free = self.disk_free(&s, i as usize);
                let h = &mut s.hosts[i as usize];
                h.starting = false;
                h.running |= free;
            }
            Action::Watchdog(i) => {
                let h = &mut s.hosts[i as usize];
                h.running = false;
                h.fenced = true;
            }
            Action::AgentCrash(i) => {
                s.faults += 1;
                let h = &mut s.hosts[i as usize];
                h.agent = false;
                h.sees = None;
                h.starting = false;
            }
            Action::AgentRestart(i) => {
                if s.faults < self.max_faults {
                    s.faults += 1;
                }
                let h = &mut s.hosts[i as usize];
                h.agent = true;
                h.renewed_once = false;
                h.fenced = false;
                if self.races.restart_forgets_deadline {
                    h.since_renewal = 0;
                }
            }
            Action::PowerOff(i) => {
                s.faults += 1;
                let h = &mut s.hosts[i as usize];
                h.power = false;
                h.agent = false;
                h.running = false;
                h.sees = None;
                h.starting = false;
            }
            Action::PowerOn(i) => {
                s.faults += 1;
                let h = &mut s.hosts[i as usize];
                h.power = true;
                h.agent = true;
                h.renewed_once = false;
                h.fenced = false;
                h.since_renewal = 0;
            }
            Action::Cut(i) => {
                s.faults += 1;
                s.hosts[i as usize].cut_off = true;
            }
            Action::Heal(i) => {
                s.faults += 1;
                s.hosts[i as usize].cut_off = false;
            }
        }
        (s != *last).then_some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("at most one running copy", |_, s: &State| {
                s.hosts.iter().filter(|h| h.running).count() <= 1
            }),
            // Not vacuous: failover does happen in the model.
            Property::sometimes("the server fails over and runs elsewhere", |_, s: &State| {
                s.bound.is_some_and(|b| b != 0) && s.hosts.iter().enumerate().any(|(i, h)| i != 0 && h.running)
            }),
        ]
    }
}

/// A counterexample as a readable trace: who did what, in order, and what ran where.
pub fn trace(path: &[(State, Option<Action>)]) -> String {
    let mut out = String::new();
    for (n, (state, action)) in path.iter().enumerate() {
        let running: Vec<_> =
            state.hosts.iter().enumerate().filter(|(_, h)| h.running).map(|(i, _)| host_name(i)).collect();
        let bound = state.bound.map(|b| host_name(b.into())).unwrap_or_else(|| "nowhere".into());
        let _ = writeln!(out, "{n:>3}. bound to {bound}; running on {running:?}");
        if let Some(action) = action {
            let _ = writeln!(out, "     then: {}", describe(*action));
        }
    }
    out
}

/// One step in words.
pub fn describe(action: Action) -> String {
    let h = |i: u8| host_name(i.into());
    match action {
        Action::Tick => "a second passes".into(),
        Action::Renew(i) => format!("the agent on {} renews its Lease", h(i)),
        Action::OperatorReadsLeases => "the operator reads the Leases".into(),
        Action::OperatorSyncs => "the operator's watch catches up with the server".into(),
        Action::OperatorPass => "the operator runs a scheduling pass".into(),
        Action::AgentSyncs(i) => format!("the agent on {}'s watch catches up with the server", h(i)),
        Action::AgentConverges(i) => format!("the agent on {} converges the server", h(i)),
        Action::AgentStartsNow(i) => format!("the agent on {} carries out the start it checked", h(i)),
        Action::Watchdog(i) => format!("the watchdog on {} fences the host", h(i)),
        Action::AgentCrash(i) => format!("the agent on {} crashes (its guests keep running)", h(i)),
        Action::AgentRestart(i) => format!("the agent on {} restarts", h(i)),
        Action::PowerOff(i) => format!("{} loses power (its guests die)", h(i)),
        Action::PowerOn(i) => format!("{} powers on", h(i)),
        Action::Cut(i) => format!("{} is cut off from the API server", h(i)),
        Action::Heal(i) => format!("{}'s network heals", h(i)),
    }
}
