//! A model of covi's failover protocol, checked exhaustively with `stateright`.
//!
//! Actors: the operator leader (its caches of Leases and bindings, its clock), two or
//! three hosts, each with an agent process (its watch cache, its fencing state, its
//! clock) and libvirt (whether the server's domain runs there), and the API server
//! (the binding, the Leases). Nondeterminism: every step of every actor in any order,
//! caches that lag (an agent's or the operator's view is brought up to date by a step
//! of its own), clock ticks, and faults up to a bound: agent crash and restart with
//! guests alive, host power loss and return, partition from the API server and heal,
//! and (when enabled) a libvirt that stops answering and answers again. The user may
//! delete the server at any point (when enabled): agents and the operator then clean
//! up its domain and volumes and release its finalizer.
//!
//! The decisions are covi's own functions, not copies: the operator's liveness
//! judgement ([`covi_operator::health::judge`]) and scheduling pass
//! ([`covi_operator::scheduler::pass`]), the agent's plan and converge steps
//! ([`covi_agent::server::plan`], [`covi_agent::converge::steps`]), its orphan
//! judgement ([`covi_agent::sweep::judge`]) and its fencing decisions
//! ([`covi_agent::fence::overdue`], [`covi_agent::fence::may_start`]), and the
//! operator's rule for releasing the finalizer of a server being deleted
//! ([`covi_operator::scheduler::release_reason`]).
//!
//! Time: a tick advances every clock by one second. Timings are the pool's
//! (`renewSeconds` 1, `fenceAfterSeconds` 2, `leaseDurationSeconds` 3, `graceSeconds` 1
//! by default). Two rules make time honest: a tick never passes a due watchdog (it
//! acts within milliseconds of its deadline, far inside the margin between
//! fenceAfter and lease + grace), and, without disk leases, a crashed agent is
//! restarted (by its DaemonSet) before its deadline passes — the one assumption the
//! disk leases remove. A watchdog whose libvirt hangs cannot act, and time passes it.

pub mod leaders;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use covi_agent::converge::{Step, steps};
use covi_agent::libvirt::ObservedDomain;
use covi_agent::sweep::{Orphan, judge as judge_orphan};
use covi_api::host_pool::{Failover, Hypervisor, LeaseTimings};
use covi_api::virtual_server::{
    FailoverRecord, MigrationPhase, MigrationStatus, READY_HANDED_OFF, READY_MIGRATION_FAILED, VirtualServerPhase,
};
use covi_api::{Host as HostObject, HostPool, VirtualServer};
use covi_operator::health::{Liveness, judge};
use covi_operator::migration::{Action as MoveAction, plan_moves};
use covi_operator::scheduler::{Decision, PoolView, release_reason};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use stateright::{Expectation, Model, Property};

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
    /// An agent starts the HA server without announcing the start on the server
    /// first: on its cache while listed since the host's last gap, after a fresh read
    /// otherwise (covi before the chaos test found the failover that lands late).
    pub no_start_announcement: bool,
    /// As `no_start_announcement`, and without the fresh read before the start.
    pub no_pre_start_read: bool,
    /// As `no_start_announcement`, and the agent keeps trusting its cache to start
    /// across a gap in its renewals (it fenced or was overdue, so it may have been
    /// judged lost and its server restarted elsewhere meanwhile).
    pub cache_kept_after_gap: bool,
    /// The operator acts on a host's loss as its cache of Leases shows it, without a
    /// fresh read (found by this model: a cache that lags declares a live host lost).
    pub lease_cache_trusted: bool,
    /// The watchdog fences once and then stops, though domains may become active
    /// later (an incoming live migration).
    pub fence_once: bool,
    /// A live hand-off to a target that is not Ready is failed and the server sent
    /// back to its source, though the guest already runs on the target.
    pub live_sent_back: bool,
}

impl Races {
    /// Both sets of races.
    pub fn with(self, other: Races) -> Races {
        Races {
            restart_forgets_deadline: self.restart_forgets_deadline || other.restart_forgets_deadline,
            start_check_not_held: self.start_check_not_held || other.start_check_not_held,
            no_start_announcement: self.no_start_announcement || other.no_start_announcement,
            no_pre_start_read: self.no_pre_start_read || other.no_pre_start_read,
            cache_kept_after_gap: self.cache_kept_after_gap || other.cache_kept_after_gap,
            lease_cache_trusted: self.lease_cache_trusted || other.lease_cache_trusted,
            fence_once: self.fence_once || other.fence_once,
            live_sent_back: self.live_sent_back || other.live_sent_back,
        }
    }

    /// Each race of the issue "Never two copies" alone, by name.
    pub fn each() -> Vec<(&'static str, Races)> {
        let none = Races::default();
        vec![
            ("restart_forgets_deadline", Races { restart_forgets_deadline: true, ..none }),
            ("start_check_not_held", Races { start_check_not_held: true, ..none }),
            ("no_start_announcement", Races { no_start_announcement: true, ..none }),
            ("no_pre_start_read", Races { no_start_announcement: true, no_pre_start_read: true, ..none }),
            ("cache_kept_after_gap", Races { no_start_announcement: true, cache_kept_after_gap: true, ..none }),
            ("lease_cache_trusted", Races { lease_cache_trusted: true, ..none }),
        ]
    }

    /// Each race of a migration alone, by name (they show only with migration on).
    pub fn each_of_a_move() -> Vec<(&'static str, Races)> {
        let none = Races::default();
        vec![
            ("fence_once", Races { fence_once: true, ..none }),
            ("live_sent_back", Races { live_sent_back: true, ..none }),
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
    /// The user may delete the server.
    pub deletion: bool,
    /// libvirt may stop answering on a host (a fault) and answer again.
    pub hangs: bool,
    /// The user may put a host in maintenance, which moves the server off it.
    pub migration: bool,
    /// The hosts' libvirt driver, as libvirt names it.
    driver: &'static str,
    /// Check, from every reachable state, that the system settles once faults stop.
    pub liveness: bool,
    /// Built once: the pool, the server unbound, a host, and the server's domain.
    pool: HostPool,
    server: VirtualServer,
    host: HostObject,
    domain: ObservedDomain,
    /// covi's functions are deterministic: each answer is computed once per input.
    memo: Memos,
}

/// A function's answers by input, shared by the checker's threads.
pub(crate) struct Memo<K, V>(Arc<RwLock<HashMap<K, V>>>);

impl<K, V> Clone for Memo<K, V> {
    fn clone(&self) -> Self {
        Memo(self.0.clone())
    }
}

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Memo(Arc::default())
    }
}

impl<K: Hash + Eq, V: Clone> Memo<K, V> {
    pub(crate) fn get(&self, key: K, compute: impl FnOnce() -> V) -> V {
        if let Some(v) = self.0.read().expect("memo lock").get(&key) {
            return v.clone();
        }
        let v = compute();
        self.0.write().expect("memo lock").insert(key, v.clone());
        v
    }
}

/// What the operator's pass depends on: the server as it sees it, and each host's
/// liveness, readiness and maintenance.
type PassInput = (Server, Vec<(Liveness, bool, bool)>);

/// The operator's pass, for the model's one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OperatorStep {
    Nothing,
    /// Bind it to a host (`failover`: away from a lost one).
    Bind {
        to: u8,
        failover: bool,
    },
    /// Write this migration record.
    Record(Move),
    Cancel,
    /// The source handed it off: bind it to the target.
    HandOver(u8),
    /// The target could not run it: back to the source, with the record.
    Return {
        to: u8,
        record: Move,
    },
}

#[derive(Clone, Debug, Default)]
struct Memos {
    /// The operator's pass, by what it sees.
    pass: Memo<PassInput, OperatorStep>,
    /// Whether the agent's plan and converge steps start the server.
    start: Memo<(Server, bool), bool>,
    /// The orphan judgement of the domain on a host.
    orphan: Memo<(Option<Server>, usize), Orphan>,
    /// Whether the operator releases the finalizer.
    release: Memo<(Server, Vec<bool>), bool>,
}

impl<K, V> std::fmt::Debug for Memo<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo")
    }
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
        Protocol {
            hosts,
            disk_leases,
            races,
            max_faults,
            failover,
            deletion: false,
            hangs: false,
            migration: false,
            driver: "test",
            liveness: false,
            pool,
            server,
            host: host(),
            domain,
            memo: Memos::default(),
        }
    }

    /// The user may delete the server at any point.
    pub fn with_deletion(self) -> Protocol {
        Protocol { deletion: true, ..self }
    }

    /// The user may put a host in maintenance (once per run), which moves the server
    /// off it: live on a QEMU pool (`live`), cold on a test-driver pool.
    pub fn with_migration(self, live: bool) -> Protocol {
        let mut pool = self.pool.clone();
        pool.spec.hypervisor = if live { Hypervisor::Qemu } else { Hypervisor::Test };
        let driver = if live { "QEMU" } else { "test" };
        Protocol { migration: true, pool, driver, ..self }
    }

    /// libvirt may hang on any host (each hang counts as a fault).
    pub fn with_hangs(self) -> Protocol {
        Protocol { hangs: true, ..self }
    }

    /// Also checks that every reachable state settles once faults stop (see
    /// [`Protocol::settle`]).
    pub fn with_liveness(self) -> Protocol {
        Protocol { liveness: true, ..self }
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
    /// libvirt does not answer.
    pub hung: bool,
    /// The Host's `spec.maintenance`: servers move off it.
    pub maintenance: bool,
    /// The agent's watch cache of the server (None: not synced since start; Some(None):
    /// the server is gone).
    pub sees: Option<Option<Server>>,
    /// The agent's cache was brought up to date after a renewal of this process, and it
    /// has not been overdue or fenced since: its cache then suffices to start (the
    /// agent's `Fence::cache_suffices`); otherwise it reads the server fresh first.
    pub clean: bool,
    pub renewed_once: bool,
    pub fenced: bool,
    /// The agent's clock: seconds since its last renewal.
    pub since_renewal: u8,
    /// Passed the start's check, not yet started: with `start_check_not_held`, or a
    /// start sent to a libvirt that hangs (which holds the fencing lock meanwhile).
    pub starting: bool,
    /// The Lease changed since the operator last read it.
    pub lease_changed: bool,
    /// The operator's clock: seconds since it saw this Lease change.
    pub silent: u8,
    /// The operator has seen this Lease change since it leads.
    pub seen_renewing: bool,
}

/// The server as the API server holds it, and as caches show it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Server {
    /// `status.host`.
    pub bound: Option<u8>,
    /// The user deleted it (`deletionTimestamp`); it stays while covi's finalizer does.
    pub deleting: bool,
    /// `status.migration`.
    pub moving: Option<Move>,
    /// What the agent last reported (`status.phase` and the Ready condition).
    pub report: Report,
    /// Failover rebound it from the source of its running migration.
    pub failed_over: bool,
}

impl Server {
    fn at(bound: Option<u8>) -> Server {
        Server { bound, deleting: false, moving: None, report: Report::Running, failed_over: false }
    }
}

/// A migration record.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Move {
    pub source: u8,
    pub target: u8,
    pub phase: MigrationPhase,
    pub live: bool,
}

/// The agent's report on the server.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Report {
    /// Running, Ready.
    Running,
    /// Migrating, Ready=False HandedOff: the domain left the source.
    HandedOff,
    /// Running, Ready=True MigrationFailed: the move failed, it still runs on the source.
    MigrationFailed,
}

/// The whole system.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct State {
    pub hosts: Vec<Host>,
    /// The server in the API server (None: deleted and its finalizer released).
    pub server: Option<Server>,
    /// The operator's cache of it.
    pub operator_sees: Option<Server>,
    /// The failover the operator's last pass decided (the host it binds the server
    /// to), in flight to the API server while nobody wrote the server since: any other
    /// write (an announced start included) makes the API server refuse it, and it is
    /// dropped then.
    pub in_flight: Option<u8>,
    /// Its disk on the pool's shared storage exists.
    pub volume: bool,
    pub faults: u8,
}

impl State {
    pub fn bound(&self) -> Option<u8> {
        self.server.and_then(|s| s.bound)
    }

    pub fn running(&self) -> impl Iterator<Item = usize> + '_ {
        self.hosts.iter().enumerate().filter(|(_, h)| h.running).map(|(i, _)| i)
    }
}

/// Who did what.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Action {
    Tick,
    Renew(u8),
    OperatorReadsLeases,
    OperatorSyncs,
    OperatorPass,
    OperatorWrites,
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
    Hang(u8),
    Answer(u8),
    UserDeletes,
    Maintenance(u8),
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
        host.spec.maintenance = h.maintenance;
        Arc::new(host)
    }

    /// The server object as `seen`.
    fn server(&self, seen: Server) -> VirtualServer {
        let mut server = self.server.clone();
        if let Some(status) = server.status.as_mut() {
            status.host = seen.bound.map(|b| host_name(b.into()));
            let (phase, ready, reason) = match seen.report {
                Report::Running => (VirtualServerPhase::Running, "True", "Running"),
                Report::HandedOff => (VirtualServerPhase::Migrating, "False", READY_HANDED_OFF),
                Report::MigrationFailed => (VirtualServerPhase::Running, "True", READY_MIGRATION_FAILED),
            };
            status.phase = Some(phase);
            status.conditions = vec![covi_api::Condition {
                type_: covi_api::contract::condition_type::READY.into(),
                status: ready.into(),
                reason: reason.into(),
                message: String::new(),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }];
            // Times in order: the move started, a failover, the move finished, now.
            let at = |secs: i64| Some(Time(Timestamp::from_second(secs).expect("a time")));
            status.migration = seen.moving.map(|m| MigrationStatus {
                source: host_name(m.source.into()),
                target: host_name(m.target.into()),
                phase: m.phase,
                mode: Some(if m.live { "Live" } else { "Cold" }.into()),
                started_at: at(1),
                finished_at: matches!(m.phase, MigrationPhase::Succeeded | MigrationPhase::Failed)
                    .then(|| at(3))
                    .flatten(),
                reason: None,
            });
            status.failovers = match (seen.failed_over, seen.moving, seen.bound) {
                (true, Some(m), Some(b)) => vec![FailoverRecord {
                    from: host_name(m.source.into()),
                    to: host_name(b.into()),
                    at: Time(Timestamp::from_second(2).expect("a time")),
                    reason: "HostLost".into(),
                }],
                _ => vec![],
            };
        }
        if seen.deleting {
            server.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
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

    fn lost_hosts(&self, state: &State) -> BTreeSet<String> {
        let liveness = self.liveness(state);
        liveness.iter().enumerate().filter(|(_, l)| **l == Liveness::Lost).map(|(i, _)| host_name(i)).collect()
    }

    /// What the operator's pass does with the server as its caches show it: covi's
    /// scheduling pass (failover), then its migration planner.
    fn operator_step(&self, state: &State) -> OperatorStep {
        let Some(seen) = state.operator_sees else { return OperatorStep::Nothing };
        let liveness = self.liveness(state);
        let ready = |h: &Host| h.agent && h.power && !h.cut_off;
        let key = (seen, liveness.iter().zip(&state.hosts).map(|(l, h)| (*l, ready(h), h.maintenance)).collect());
        self.memo.pass.get(key, || {
            let names = |want: &dyn Fn(Liveness) -> bool| -> BTreeSet<String> {
                liveness.iter().enumerate().filter(|(_, l)| want(**l)).map(|(i, _)| host_name(i)).collect()
            };
            let unready = names(&|l| l != Liveness::Alive);
            let lost = names(&|l| l == Liveness::Lost);
            let hosts: Vec<_> = state.hosts.iter().enumerate().map(|(i, h)| self.host_object(i, h)).collect();
            let assumed = HashMap::new();
            let view = PoolView {
                pool: &self.pool,
                hosts,
                servers: vec![Arc::new(self.server(seen))],
                assumed: &assumed,
                unready: &unready,
                lost: &lost,
            };
            let index = |name: &str| (0..state.hosts.len()).find(|j| host_name(*j) == name).map(|j| j as u8);
            let paused =
                covi_operator::health::mass_failure(lost.len(), state.hosts.len(), self.failover.max_lost_percent);
            if let Some(Decision::Bind { host, failover_from, .. }) =
                covi_operator::scheduler::pass(&view, !paused).into_iter().map(|(_, d)| d).next()
            {
                return index(&host)
                    .map_or(OperatorStep::Nothing, |to| OperatorStep::Bind { to, failover: failover_from.is_some() });
            }
            let Some((_, action)) = plan_moves(&view, &BTreeSet::new(), Timestamp::from_second(4).expect("a time"))
                .actions
                .into_iter()
                .next()
            else {
                return OperatorStep::Nothing;
            };
            let record = |m: &MigrationStatus| -> Option<Move> {
                Some(Move {
                    source: index(&m.source)?,
                    target: index(&m.target)?,
                    phase: m.phase,
                    live: m.mode.as_deref() == Some("Live"),
                })
            };
            let step = match action {
                MoveAction::Record(m) => record(&m).map(OperatorStep::Record),
                MoveAction::Cancel => Some(OperatorStep::Cancel),
                MoveAction::HandOver { target, .. } => index(&target).map(OperatorStep::HandOver),
                MoveAction::Return { target, record: m } => {
                    index(&target).zip(record(&m)).map(|(to, record)| OperatorStep::Return { to, record })
                }
            };
            step.unwrap_or(OperatorStep::Nothing)
        })
    }

    /// Whether the operator releases the finalizer of the server it sees being deleted:
    /// covi's own rule.
    fn operator_releases(&self, state: &State) -> bool {
        let Some(seen) = state.operator_sees.filter(|s| s.deleting) else { return false };
        let liveness = self.liveness(state);
        let key = (seen, liveness.iter().map(|l| *l == Liveness::Lost).collect());
        self.memo.release.get(key, || {
            let hosts: BTreeSet<String> = (0..state.hosts.len()).map(host_name).collect();
            release_reason(&self.server(seen), &HashMap::new(), &hosts, &self.lost_hosts(state)).is_some()
        })
    }

    /// What the agent on `i` does with the server as its cache shows it: start it
    /// (covi's plan and converge steps), clean up after a deletion, remove a domain no
    /// server here claims (covi's orphan judgement), or nothing.
    fn converge(&self, state: &State, i: usize) -> Converge {
        let h = &state.hosts[i];
        // A start in flight holds up the agent's reconcile of the server until it returns.
        let Some(sees) = h.sees.filter(|_| !h.starting) else { return Converge::Nothing };
        let me = i as u8;
        if let Some(seen) = sees.filter(|s| s.bound == Some(me)) {
            // The agent's reconcile: a server being deleted is cleaned up.
            if seen.deleting {
                return Converge::CleanUp(seen);
            }
            // A migration taking the server away: the source hands it off.
            if let Some(m) = seen.moving.filter(|m| m.phase == MigrationPhase::Running && m.source == me) {
                return Converge::HandOff(m);
            }
            let start = self.memo.start.get((seen, h.running), || {
                let plan = covi_agent::server::plan(&self.server(seen), &self.pool, self.driver).expect("a plan");
                let observed = if h.running { vec![self.domain.clone()] } else { vec![] };
                steps(&plan, &observed, None, Duration::from_secs(30)).contains(&Step::Start)
            });
            if start {
                return if self.races.no_start_announcement { Converge::Start } else { Converge::Announce(seen) };
            }
            // Running here as it should: the agent says so.
            if h.running && seen.report != Report::Running && !h.cut_off {
                return Converge::Report;
            }
            return Converge::Nothing;
        }
        if h.running {
            // The sweep reads the server fresh; cut off, it cannot.
            if h.cut_off {
                return Converge::Nothing;
            }
            let verdict = self.memo.orphan.get((state.server, i), || {
                let server = state.server.map(|s| self.server(s));
                judge_orphan(&self.domain, server.as_ref(), &host_name(i))
            });
            return match verdict {
                Orphan::Keep => Converge::Nothing,
                Orphan::RemoveDomain => Converge::Remove { volume: false },
                Orphan::RemoveAll => Converge::Remove { volume: true },
            };
        }
        Converge::Nothing
    }

    /// Whether the agent on `i` may start now: covi's fencing rule, the start's
    /// announcement (or, in the races before it, the fresh read), and the disk lease.
    fn may_start(&self, state: &State, i: usize) -> bool {
        let h = &state.hosts[i];
        let since = Duration::from_secs(h.since_renewal.into());
        if !covi_agent::fence::may_start(h.renewed_once, h.fenced, since, self.fence_after()) {
            return false;
        }
        if !self.races.no_start_announcement {
            return self.disk_free(state, i);
        }
        let fresh = state.server.is_some_and(|s| s.bound == Some(i as u8) && !s.deleting);
        if !self.races.no_pre_start_read && !h.clean && (h.cut_off || !fresh) {
            return false;
        }
        self.disk_free(state, i)
    }

    fn disk_free(&self, state: &State, i: usize) -> bool {
        !self.disk_leases || !state.hosts.iter().enumerate().any(|(j, o)| j != i && o.running)
    }

    /// The watchdog must fence now (overdue, and a domain runs or it has not fenced).
    fn watchdog_due(&self, h: &Host) -> bool {
        let overdue = covi_agent::fence::overdue(Duration::from_secs(h.since_renewal.into()), self.fence_after());
        // Fencing repeats while overdue: a domain may become active after the first.
        let again = h.running && !self.races.fence_once;
        h.agent && h.power && overdue && (again || !h.fenced)
    }

    /// Due, and able to: libvirt answers, and no start holds the fencing lock.
    fn watchdog_acts(&self, h: &Host) -> bool {
        let lock_held = h.starting && !self.races.start_check_not_held;
        self.watchdog_due(h) && !h.hung && !lock_held
    }

    fn tick_allowed(&self, state: &State) -> bool {
        let deadline = self.failover.fence_after_seconds.saturating_sub(1) as u8;
        state.hosts.iter().all(|h| {
            !self.watchdog_acts(h)
                && (self.disk_leases || h.agent || !h.power || !h.running || h.since_renewal < deadline)
        })
    }

    /// The actions that are not faults, in a fixed order: what a fair scheduler picks
    /// from once faults stop.
    fn steps(&self, state: &State, actions: &mut Vec<Action>) {
        if self.tick_allowed(state) {
            actions.push(Action::Tick);
        }
        actions.push(Action::OperatorReadsLeases);
        actions.push(Action::OperatorSyncs);
        actions.push(Action::OperatorPass);
        if state.in_flight.is_some() {
            actions.push(Action::OperatorWrites);
        }
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
                if self.watchdog_acts(h) {
                    actions.push(Action::Watchdog(i));
                }
            }
            // The DaemonSet restarts a crashed agent, faults or not.
            if h.power && !h.agent {
                actions.push(Action::AgentRestart(i));
            }
        }
    }

    /// Everything broken is mended, in order: power, network, libvirt.
    fn repairs(&self, state: &State) -> Vec<Action> {
        let mut out = Vec::new();
        for (i, h) in state.hosts.iter().enumerate() {
            let i = i as u8;
            if !h.power {
                out.push(Action::PowerOn(i));
            }
            if h.cut_off {
                out.push(Action::Heal(i));
            }
            if h.hung {
                out.push(Action::Answer(i));
            }
        }
        out
    }

    /// The server is gone and nothing of it runs or can start again: nothing that
    /// follows concerns it, so the run ends here.
    fn finished(&self, state: &State) -> bool {
        let may_start = |h: &Host| h.starting || h.sees.flatten().is_some_and(|s| !s.deleting);
        state.server.is_none() && state.running().next().is_none() && !state.hosts.iter().any(may_start)
    }

    /// Where the system must get to once faults stop: the server runs on the host it is
    /// bound to and nowhere else (or is deleted and runs nowhere), and no host stays
    /// fenced.
    pub fn settled(&self, state: &State) -> bool {
        let placed = match state.server {
            None => state.running().next().is_none(),
            Some(s) => s.bound.is_some_and(|b| state.hosts[b as usize].running) && state.running().count() == 1,
        };
        let moving = state
            .server
            .and_then(|s| s.moving)
            .is_some_and(|m| matches!(m.phase, MigrationPhase::Pending | MigrationPhase::Running));
        placed && !moving && state.in_flight.is_none() && state.hosts.iter().all(|h| !h.fenced && !h.starting)
    }

    /// Liveness, checked from one state: faults stop and what they broke is mended, then
    /// a fair scheduler (every enabled action in turn, round-robin, a second passing as
    /// one of them) runs until the system has [`settled`](Protocol::settled). Returns the
    /// run, and whether it settled within the bound.
    pub fn settle(&self, from: &State) -> (Vec<(State, Option<Action>)>, bool) {
        const BOUND: usize = 400;
        let mut state = from.clone();
        state.faults = self.max_faults;
        let mut run = Vec::new();
        for repair in self.repairs(&state) {
            if let Some(next) = self.next_state(&state, repair) {
                run.push((state, Some(repair)));
                state = next;
            }
        }
        let mut turn = 0usize;
        let mut actions = Vec::new();
        while run.len() < BOUND {
            if self.settled(&state) {
                run.push((state, None));
                return (run, true);
            }
            actions.clear();
            self.steps(&state, &mut actions);
            let enabled: Vec<(Action, State)> =
                actions.iter().filter_map(|a| Some((*a, self.next_state(&state, *a)?))).collect();
            if enabled.is_empty() {
                break;
            }
            let (action, next) = enabled[turn % enabled.len()].clone();
            turn += 1;
            run.push((state, Some(action)));
            state = next;
        }
        run.push((state, None));
        (run, false)
    }
}

enum Converge {
    Nothing,
    /// Announce a start on the server as the cache shows it (a conditional write).
    Announce(Server),
    Start,
    /// Remove the domain, and the volume with it when the server is gone.
    Remove {
        volume: bool,
    },
    /// The server being deleted: remove the domain, the volumes, then the finalizer.
    CleanUp(Server),
    /// The source's side of a migration.
    HandOff(Move),
    /// Report the server Running.
    Report,
}

/// The agent on `h` starts the server's domain; a libvirt that hangs (or, with the
/// race, a start whose check is not held) takes it and answers later.
fn start(h: &mut Host, check_not_held: bool) {
    if check_not_held || h.hung {
        h.starting = true;
    } else {
        h.running = true;
    }
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
            hung: false,
            maintenance: false,
            sees: Some(Some(Server::at(Some(0)))),
            clean: true,
            renewed_once: true,
            fenced: false,
            since_renewal: 0,
            starting: false,
            lease_changed: false,
            silent: 0,
            seen_renewing: true,
        };
        let server = Some(Server::at(Some(0)));
        vec![State {
            hosts: (0..self.hosts).map(host).collect(),
            server,
            operator_sees: server,
            in_flight: None,
            volume: true,
            faults: 0,
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        if self.finished(state) {
            return;
        }
        self.steps(state, actions);
        if self.deletion && state.server.is_some_and(|s| !s.deleting) {
            actions.push(Action::UserDeletes);
        }
        if self.migration {
            // One host, once per run (more would not fit the bound CI checks).
            if !state.hosts.iter().any(|h| h.maintenance) {
                for i in 0..state.hosts.len() {
                    actions.push(Action::Maintenance(i as u8));
                }
            }
        }
        for (i, h) in state.hosts.iter().enumerate() {
            let i = i as u8;
            if self.hangs && h.hung {
                actions.push(Action::Answer(i));
            }
            if state.faults >= self.max_faults {
                continue;
            }
            if h.power && h.agent {
                actions.push(Action::AgentCrash(i));
            }
            actions.push(if h.power { Action::PowerOff(i) } else { Action::PowerOn(i) });
            actions.push(if h.cut_off { Action::Heal(i) } else { Action::Cut(i) });
            if self.hangs && h.power && !h.hung {
                actions.push(Action::Hang(i));
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
                let fence_after = self.fence_after();
                let h = &mut s.hosts[i as usize];
                // A renewal after the host was overdue closes a gap in which it may
                // have been judged lost: its cache no longer suffices.
                let gap = covi_agent::fence::overdue(Duration::from_secs(h.since_renewal.into()), fence_after);
                h.clean &= !gap || self.races.cache_kept_after_gap;
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
            Action::OperatorSyncs => s.operator_sees = s.server,
            Action::OperatorPass => {
                // A host with the server that the cache shows lost is read fresh first.
                if !self.races.lease_cache_trusted {
                    let liveness = self.liveness(&s);
                    let occupied = s.operator_sees.and_then(|o| o.bound);
                    for (i, h) in s.hosts.iter_mut().enumerate() {
                        if liveness[i] == Liveness::Lost && occupied == Some(i as u8) && h.lease_changed {
                            h.lease_changed = false;
                            h.silent = 0;
                            h.seen_renewing = true;
                        }
                    }
                }
                // Passes are sequential: the next waits for this one's writes.
                if s.in_flight.is_some() {
                    return None;
                }
                // Writes are conditional on the version decided on: a stale cache conflicts.
                let current = s.operator_sees == s.server;
                if self.operator_releases(&s) {
                    if current {
                        s.server = None;
                        s.operator_sees = None;
                    }
                } else if current {
                    let step = self.operator_step(&s);
                    let unready = self.liveness(&s).iter().map(|l| *l != Liveness::Alive).collect::<Vec<_>>();
                    let server = s.server.as_mut()?;
                    match step {
                        OperatorStep::Nothing => {}
                        // A failover is decided now and taken by the API server later, if
                        // nobody wrote the server in between. (Other writes of the pass
                        // take effect at once here: the model's server is bound from the
                        // start, and its moves wait for the source's part.)
                        OperatorStep::Bind { to, failover: true } => s.in_flight = Some(to),
                        OperatorStep::Bind { to, failover: false } => server.bound = Some(to),
                        OperatorStep::Record(m) => {
                            if m.phase == MigrationPhase::Running {
                                server.failed_over = false;
                            }
                            server.moving = Some(m);
                        }
                        OperatorStep::Cancel => server.moving = None,
                        OperatorStep::HandOver(to) => {
                            let live = server.moving.is_some_and(|m| m.live);
                            if self.races.live_sent_back && live && unready[to as usize] {
                                // The old rule: a target not Ready fails the move.
                                server.moving = server.moving.map(|m| Move { phase: MigrationPhase::Failed, ..m });
                            } else {
                                server.bound = Some(to);
                            }
                        }
                        OperatorStep::Return { to, record } => {
                            server.bound = Some(to);
                            server.moving = Some(record);
                        }
                    }
                    s.operator_sees = s.server;
                }
            }
            Action::OperatorWrites => {
                let to = s.in_flight.take()?;
                let server = s.server.as_mut()?;
                let from_source =
                    server.moving.is_some_and(|m| m.phase == MigrationPhase::Running && Some(m.source) == server.bound);
                server.failed_over |= from_source;
                server.bound = Some(to);
                s.operator_sees = s.server;
            }
            Action::AgentSyncs(i) => {
                // Modelled as a relist each time (a watch's catch-up is no fresher), so
                // the model allows a start from the cache at least as often as the
                // agent does.
                let h = &mut s.hosts[i as usize];
                h.sees = Some(s.server);
                h.clean = h.renewed_once && !h.fenced;
            }
            Action::AgentConverges(i) => match self.converge(&s, i as usize) {
                Converge::Nothing => return None,
                Converge::Remove { .. } | Converge::CleanUp(_) if s.hosts[i as usize].hung => return None,
                Converge::Remove { volume } => {
                    s.hosts[i as usize].running = false;
                    s.volume &= !volume;
                }
                Converge::CleanUp(seen) => {
                    s.hosts[i as usize].running = false;
                    s.volume = false;
                    // The finalizer's release is conditional on the version the agent saw.
                    if !s.hosts[i as usize].cut_off && s.server == Some(seen) {
                        s.server = None;
                    }
                }
                Converge::Report => {
                    if let Some(server) = s.server.as_mut() {
                        server.report = Report::Running;
                    }
                }
                Converge::HandOff(m) => {
                    let me = i as usize;
                    let report = |s: &mut State, r: Report| {
                        if !s.hosts[me].cut_off
                            && let Some(server) = s.server.as_mut()
                        {
                            server.report = r;
                        }
                    };
                    if !s.hosts[me].running {
                        report(&mut s, Report::HandedOff);
                    } else if s.hosts[me].hung {
                        return None;
                    } else if !m.live {
                        // Cold: shut down (and undefine); the hand-off is reported next.
                        s.hosts[me].running = false;
                    } else if s.hosts[me].cut_off {
                        // The agent reads the target's address before it migrates.
                        return None;
                    } else {
                        let target = m.target as usize;
                        if s.hosts[target].power && !s.hosts[target].hung {
                            // libvirt moves the running guest: it never runs on both.
                            s.hosts[me].running = false;
                            s.hosts[target].running = true;
                            report(&mut s, Report::HandedOff);
                        } else {
                            report(&mut s, Report::MigrationFailed);
                        }
                    }
                }
                Converge::Announce(seen) => {
                    if s.hosts[i as usize].cut_off || !self.may_start(&s, i as usize) {
                        return None;
                    }
                    // Conditional on the version the agent decided on; refused, it reads
                    // the server again and starts nothing.
                    s.hosts[i as usize].sees = Some(s.server);
                    if s.server != Some(seen) {
                        return Some(s);
                    }
                    // A new version: a failover decided on the one before is refused.
                    s.in_flight = None;
                    // The start follows the announcement's answer in the same reconcile
                    // (one step here; the gap check between the two is unit-tested).
                    start(&mut s.hosts[i as usize], self.races.start_check_not_held);
                }
                Converge::Start => {
                    if !self.may_start(&s, i as usize) {
                        return None;
                    }
                    start(&mut s.hosts[i as usize], self.races.start_check_not_held);
                }
            },
            Action::AgentStartsNow(i) => {
                if s.hosts[i as usize].hung {
                    return None;
                }
                let free = self.disk_free(&s, i as usize);
                let h = &mut s.hosts[i as usize];
                h.starting = false;
                h.running |= free;
            }
            Action::Watchdog(i) => {
                let h = &mut s.hosts[i as usize];
                h.running = false;
                h.fenced = true;
                h.clean &= self.races.cache_kept_after_gap;
            }
            Action::AgentCrash(i) => {
                s.faults += 1;
                let h = &mut s.hosts[i as usize];
                h.agent = false;
                h.sees = None;
                h.clean = false;
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
                h.hung = false;
                h.sees = None;
                h.clean = false;
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
            Action::Hang(i) => {
                s.faults += 1;
                s.hosts[i as usize].hung = true;
            }
            Action::Answer(i) => {
                if s.faults < self.max_faults {
                    s.faults += 1;
                }
                s.hosts[i as usize].hung = false;
            }
            Action::UserDeletes => {
                if let Some(server) = s.server.as_mut() {
                    server.deleting = true;
                }
            }
            Action::Maintenance(i) => s.hosts[i as usize].maintenance = true,
        }
        if s.faults > self.max_faults {
            s.faults = self.max_faults;
        }
        // Any other write of the server makes the API server refuse a failover in flight.
        if action != Action::OperatorWrites && s.server != last.server {
            s.in_flight = None;
        }
        (s != *last).then_some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties = vec![
            Property::always(SAFETY, |_, s: &State| s.running().count() <= 1),
            Property::always(VOLUME, |_, s: &State| s.volume || s.running().next().is_none()),
            Property::always(FINALIZER, |_, s: &State| s.server.is_some() || s.running().next().is_none()),
            // Not vacuous: failover does happen in the model.
            Property::sometimes(FAILS_OVER, |_, s: &State| {
                s.bound().is_some_and(|b| b != 0) && s.running().any(|i| i != 0)
            }),
        ];
        if self.deletion {
            properties.push(Property::sometimes(DELETED, |_, s: &State| s.server.is_none()));
        }
        if self.migration {
            properties.push(Property::sometimes(MIGRATES, |_, s: &State| {
                s.server.and_then(|s| s.moving).is_some_and(|m| m.phase == MigrationPhase::Succeeded)
            }));
        }
        if self.liveness {
            properties.push(Property::always(SETTLES, |model: &Protocol, s: &State| model.settle(s).1));
        }
        properties
    }
}

/// At most one running copy of the server in every reachable state.
pub const SAFETY: &str = "at most one running copy";
/// No volume deleted while a domain using it runs.
pub const VOLUME: &str = "no volume deleted while its domain runs";
/// The finalizer is released only when no domain of the server runs.
pub const FINALIZER: &str = "finalizer released only when no domain runs";
/// Every safety property.
pub const SAFETY_PROPERTIES: [&str; 3] = [SAFETY, VOLUME, FINALIZER];
pub const FAILS_OVER: &str = "the server fails over and runs elsewhere";
pub const DELETED: &str = "the server is deleted and cleaned up";
pub const MIGRATES: &str = "a migration succeeds";
/// Once faults stop, the server runs again on its host (or is gone), every migration
/// has ended, and no host stays fenced.
pub const SETTLES: &str = "once faults stop, the server runs again, migrations end and no host stays fenced";

/// A model's run in words.
pub type Trace<M> = fn(&[(<M as Model>::State, Option<<M as Model>::Action>)]) -> String;

/// Checks `model` to the end on two threads: each of `properties` that fails, with its
/// first counterexample as a readable trace, and the number of states.
pub fn check<M>(model: M, properties: &[&'static str], trace: Trace<M>) -> (Vec<String>, usize)
where
    M: Model + Send + Sync + 'static,
    M::State: Clone + std::fmt::Debug + Hash + PartialEq + Send + Sync + 'static,
    M::Action: Clone + std::fmt::Debug + PartialEq + Send + Sync + 'static,
{
    use stateright::Checker;
    let checker = model.checker().threads(2).spawn_bfs().join();
    let count = checker.unique_state_count();
    let found = properties
        .iter()
        .filter_map(|p| {
            let path = first_violation(checker.model(), p, checker.discovery(p)?.into_vec());
            Some(format!("{p}:\n{}", trace(&path)))
        })
        .collect();
    (found, count)
}

/// The path to a property's first counterexample: stateright keeps checking a property
/// it has found broken (while others are still open) and records the last state that
/// breaks it; the first one is the shortest story.
pub fn first_violation<M: Model>(
    model: &M,
    property: &str,
    mut path: Vec<(M::State, Option<M::Action>)>,
) -> Vec<(M::State, Option<M::Action>)> {
    let Some(p) = model.properties().into_iter().find(|p| p.name == property) else { return path };
    if p.expectation != Expectation::Always {
        return path;
    }
    if let Some(at) = path.iter().position(|(s, _)| !(p.condition)(model, s)) {
        path.truncate(at + 1);
        if let Some(last) = path.last_mut() {
            last.1 = None;
        }
    }
    path
}

/// A counterexample as a readable trace: who did what, in order, and what ran where.
pub fn trace(path: &[(State, Option<Action>)]) -> String {
    let mut out = String::new();
    for (n, (state, action)) in path.iter().enumerate() {
        let running: Vec<_> = state.running().map(host_name).collect();
        let server = match state.server {
            None => "gone".to_string(),
            Some(s) => {
                let bound = s.bound.map(|b| host_name(b.into())).unwrap_or_else(|| "nowhere".into());
                let mut text = format!("bound to {bound}{}", if s.deleting { ", being deleted" } else { "" });
                if let Some(m) = s.moving {
                    let mode = if m.live { "live" } else { "cold" };
                    let (from, to) = (host_name(m.source.into()), host_name(m.target.into()));
                    let _ = write!(text, ", {mode} move {from} to {to} {:?}", m.phase);
                }
                if s.report != Report::Running {
                    let _ = write!(text, ", reported {:?}", s.report);
                }
                text
            }
        };
        let fenced: Vec<_> =
            state.hosts.iter().enumerate().filter(|(_, h)| h.fenced).map(|(i, _)| host_name(i)).collect();
        let _ = write!(out, "{n:>3}. server {server}; running on {running:?}");
        if !fenced.is_empty() {
            let _ = write!(out, "; fenced {fenced:?}");
        }
        if !state.volume {
            let _ = write!(out, "; disk deleted");
        }
        if let Some(to) = state.in_flight {
            let _ = write!(out, "; the operator's failover to {} in flight", host_name(to.into()));
        }
        let _ = writeln!(out);
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
        Action::OperatorWrites => "the operator's failover reaches the API server".into(),
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
        Action::Hang(i) => format!("libvirt on {} stops answering", h(i)),
        Action::Answer(i) => format!("libvirt on {} answers again", h(i)),
        Action::UserDeletes => "the user deletes the server".into(),
        Action::Maintenance(i) => format!("the user puts {} in maintenance", h(i)),
    }
}
