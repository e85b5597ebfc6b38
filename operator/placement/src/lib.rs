//! Placement: which host of a pool runs each server.
//!
//! A pure function of the pool's rules, its hosts and what is already bound to them.
//! The operator feeds it from its watches and writes the result; nothing here does I/O,
//! so every rule is proven by a plain unit test.

pub mod consolidate;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// How the scheduler ranks hosts that fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Ranking {
    /// Prefer the least-allocated host.
    #[default]
    Spread,
    /// Prefer the most-allocated host that still fits.
    Pack,
}

/// The pool's rules for using its hosts.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolRules {
    pub name: String,
    pub cpu_ratio: f64,
    pub memory_ratio: f64,
    pub reserve_cpus: u32,
    pub reserve_memory_mib: u64,
    pub max_servers_per_host: Option<u32>,
    pub ranking: Ranking,
    /// Hosts the pool must be able to lose and still restart every highly-available
    /// server (N+1 admission); 0 turns the check off.
    pub reserve_hosts: u32,
}

/// What the scheduler knows of one host.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HostFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The agent reports Ready and its Lease is fresh.
    pub ready: bool,
    /// Not cordoned and not in maintenance.
    pub schedulable: bool,
    /// Physical CPUs.
    pub cpus: u32,
    /// Physical memory in MiB.
    pub memory_mib: u64,
}

/// What a server asks of its host.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Demand {
    pub cpus: u32,
    pub memory_mib: u64,
    pub anti_affinity_group: Option<String>,
    pub host_selector: BTreeMap<String, String>,
    /// Only this host may run the server.
    pub pinned_host: Option<String>,
    /// Restarted elsewhere when its host is lost.
    pub high_availability: bool,
    /// The server is being restarted after its host was lost: it may use the room
    /// N+1 admission keeps for exactly that.
    pub failover: bool,
}

/// A server already bound to a host.
#[derive(Clone, Debug, PartialEq)]
pub struct Bound {
    pub host: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub anti_affinity_group: Option<String>,
    pub high_availability: bool,
}

/// Allocation of one host.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HostLoad {
    pub cpus: u32,
    pub memory_mib: u64,
    pub servers: u32,
    pub groups: BTreeSet<String>,
    /// The part of the load that must restart elsewhere if the host is lost.
    pub ha_cpus: u32,
    pub ha_memory_mib: u64,
}

impl HostLoad {
    fn add(&mut self, cpus: u32, memory_mib: u64, group: Option<&String>, ha: bool) {
        self.cpus += cpus;
        self.memory_mib += memory_mib;
        self.servers += 1;
        if let Some(group) = group {
            self.groups.insert(group.clone());
        }
        if ha {
            self.ha_cpus += cpus;
            self.ha_memory_mib += memory_mib;
        }
    }
}

/// Capacity of a host after the pool's reserve and overcommit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedulable {
    pub cpus: u32,
    pub memory_mib: u64,
}

impl PoolRules {
    /// What a host may hold: (physical - reserve) × overcommit ratio, rounded down.
    pub fn schedulable(&self, host: &HostFacts) -> Schedulable {
        let cpus = f64::from(host.cpus.saturating_sub(self.reserve_cpus)) * self.cpu_ratio;
        let memory = host.memory_mib.saturating_sub(self.reserve_memory_mib) as f64 * self.memory_ratio;
        Schedulable { cpus: cpus.floor() as u32, memory_mib: memory.floor() as u64 }
    }
}

/// Why a host cannot take a server, in the order the filters run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Misfit {
    NotPinned,
    NotReady,
    Cordoned,
    SelectorMismatch,
    AntiAffinity,
    TooManyServers,
    InsufficientCpu,
    InsufficientMemory,
    FailoverReserve,
}

impl Misfit {
    fn describe(self, count: usize, demand: &Demand) -> String {
        let hosts = if count == 1 { "host" } else { "hosts" };
        match self {
            Misfit::NotPinned => format!("{count} {hosts} not the pinned host"),
            Misfit::NotReady => format!("{count} {hosts} not ready"),
            Misfit::Cordoned => format!("{count} {hosts} cordoned"),
            Misfit::SelectorMismatch => format!("{count} {hosts} not matching hostSelector"),
            Misfit::AntiAffinity => format!(
                "{count} {hosts} already running a member of anti-affinity group {}",
                demand.anti_affinity_group.as_deref().unwrap_or_default()
            ),
            Misfit::TooManyServers => format!("{count} {hosts} at maxServersPerHost"),
            Misfit::InsufficientCpu => format!("{count} {hosts} short of CPUs"),
            Misfit::InsufficientMemory => format!("{count} {hosts} short of memory"),
            Misfit::FailoverReserve => {
                format!(
                    "{count} {hosts} would leave too little room to restart the highly-available servers of lost hosts"
                )
            }
        }
    }

    /// The condition reason when this is what stops a server most often.
    pub fn reason(self) -> &'static str {
        match self {
            Misfit::NotPinned => "PinnedHostUnavailable",
            Misfit::NotReady => "NoReadyHost",
            Misfit::Cordoned => "HostsCordoned",
            Misfit::SelectorMismatch => "NoMatchingHost",
            Misfit::AntiAffinity => "AntiAffinity",
            Misfit::TooManyServers => "MaxServersPerHost",
            Misfit::InsufficientCpu => "InsufficientCPU",
            Misfit::InsufficientMemory => "InsufficientMemory",
            Misfit::FailoverReserve => "FailoverReserve",
        }
    }
}

/// A server no host can take, with what a person needs to know to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    /// Condition reason, e.g. InsufficientCPU.
    pub reason: &'static str,
    /// For example "no host in pool idc-a has 8 free CPUs; the largest free is 4".
    pub message: String,
}

/// The outcome for one pending server.
pub type Decision = Result<String, Unschedulable>;

/// The state of a pool during one scheduling pass: every host's load so far.
#[derive(Clone, Debug)]
pub struct Pool<'a> {
    rules: &'a PoolRules,
    hosts: &'a [HostFacts],
    loads: BTreeMap<&'a str, HostLoad>,
}

impl<'a> Pool<'a> {
    /// A pool whose hosts already hold `bound`. Servers bound to hosts outside `hosts`
    /// are ignored (their host left the pool).
    pub fn new(rules: &'a PoolRules, hosts: &'a [HostFacts], bound: &[Bound]) -> Self {
        let mut loads: BTreeMap<&str, HostLoad> =
            hosts.iter().map(|h| (h.name.as_str(), HostLoad::default())).collect();
        for b in bound {
            if let Some(load) = loads.get_mut(b.host.as_str()) {
                load.add(b.cpus, b.memory_mib, b.anti_affinity_group.as_ref(), b.high_availability);
            }
        }
        Pool { rules, hosts, loads }
    }

    /// The current load of `host`.
    pub fn load(&self, host: &str) -> Option<&HostLoad> {
        self.loads.get(host)
    }

    fn check(&self, host: &HostFacts, demand: &Demand) -> Result<f64, Misfit> {
        if demand.pinned_host.as_ref().is_some_and(|p| *p != host.name) {
            return Err(Misfit::NotPinned);
        }
        if !host.ready {
            return Err(Misfit::NotReady);
        }
        if !host.schedulable {
            return Err(Misfit::Cordoned);
        }
        if !demand.host_selector.iter().all(|(k, v)| host.labels.get(k) == Some(v)) {
            return Err(Misfit::SelectorMismatch);
        }
        let load = &self.loads[host.name.as_str()];
        if demand.anti_affinity_group.as_ref().is_some_and(|g| load.groups.contains(g)) {
            return Err(Misfit::AntiAffinity);
        }
        if self.rules.max_servers_per_host.is_some_and(|max| load.servers >= max) {
            return Err(Misfit::TooManyServers);
        }
        let cap = self.rules.schedulable(host);
        let cpus = load.cpus + demand.cpus;
        let memory = load.memory_mib + demand.memory_mib;
        if cpus > cap.cpus {
            return Err(Misfit::InsufficientCpu);
        }
        if memory > cap.memory_mib {
            return Err(Misfit::InsufficientMemory);
        }
        if self.rules.reserve_hosts > 0 && !demand.failover && !self.keeps_failover_reserve(&host.name, demand) {
            return Err(Misfit::FailoverReserve);
        }
        // Fullness after placement: the scarcer of the two resources decides.
        let fullness =
            f64::max(f64::from(cpus) / f64::from(cap.cpus.max(1)), memory as f64 / cap.memory_mib.max(1) as f64);
        Ok(fullness)
    }

    /// N+1 admission: with `demand` placed on `host`, could the pool still restart
    /// every highly-available server of its `reserve_hosts` largest hosts on the rest?
    /// Aggregate capacity is compared, as vSphere's percentage-based admission does.
    fn keeps_failover_reserve(&self, host: &str, demand: &Demand) -> bool {
        let mut loads = self.loads.clone();
        loads.get_mut(host).expect("every host has a load").add(
            demand.cpus,
            demand.memory_mib,
            None,
            demand.high_availability,
        );
        let mut by_size: Vec<&HostFacts> = self.hosts.iter().filter(|h| h.ready).collect();
        by_size.sort_by(|a, b| {
            let (ca, cb) = (self.rules.schedulable(a), self.rules.schedulable(b));
            (cb.cpus, cb.memory_mib, &a.name).cmp(&(ca.cpus, ca.memory_mib, &b.name))
        });
        let n = self.rules.reserve_hosts as usize;
        let (lost, rest) = by_size.split_at(n.min(by_size.len()));
        let (mut need_cpu, mut need_mem) = (0u64, 0u64);
        for h in lost {
            let l = &loads[h.name.as_str()];
            need_cpu += u64::from(l.ha_cpus);
            need_mem += l.ha_memory_mib;
        }
        let (mut free_cpu, mut free_mem) = (0u64, 0u64);
        for h in rest {
            let (cap, l) = (self.rules.schedulable(h), &loads[h.name.as_str()]);
            free_cpu += u64::from(cap.cpus.saturating_sub(l.cpus));
            free_mem += cap.memory_mib.saturating_sub(l.memory_mib);
        }
        need_cpu <= free_cpu && need_mem <= free_mem
    }

    /// Chooses a host for `demand` and records the placement, so the next call in the
    /// same pass sees it: a batch of servers never over-commits a host.
    pub fn place(&mut self, demand: &Demand) -> Decision {
        let mut best: Option<(f64, &HostFacts)> = None;
        let mut misfits: BTreeMap<Misfit, usize> = BTreeMap::new();
        for host in self.hosts {
            match self.check(host, demand) {
                Ok(fullness) => {
                    let better = match best {
                        None => true,
                        Some((current, _)) => match self.rules.ranking {
                            Ranking::Spread => fullness < current,
                            Ranking::Pack => fullness > current,
                        },
                    };
                    if better {
                        best = Some((fullness, host));
                    }
                }
                Err(misfit) => *misfits.entry(misfit).or_default() += 1,
            }
        }
        match best {
            Some((_, host)) => {
                let load = self.loads.get_mut(host.name.as_str()).expect("every host has a load");
                load.add(demand.cpus, demand.memory_mib, demand.anti_affinity_group.as_ref(), demand.high_availability);
                Ok(host.name.clone())
            }
            None => Err(self.explain(demand, &misfits)),
        }
    }

    fn explain(&self, demand: &Demand, misfits: &BTreeMap<Misfit, usize>) -> Unschedulable {
        let pool = &self.rules.name;
        if self.hosts.is_empty() {
            return Unschedulable { reason: "NoHostInPool", message: format!("pool {pool} has no hosts") };
        }
        // Capacity is what people can act on: say how far the best candidate falls short.
        let candidates = || {
            self.hosts
                .iter()
                .filter(|h| matches!(self.check(h, demand), Err(Misfit::InsufficientCpu | Misfit::InsufficientMemory)))
        };
        let free_cpus =
            candidates().map(|h| self.rules.schedulable(h).cpus.saturating_sub(self.loads[h.name.as_str()].cpus)).max();
        let free_memory = candidates()
            .map(|h| self.rules.schedulable(h).memory_mib.saturating_sub(self.loads[h.name.as_str()].memory_mib))
            .max();
        // On a tie, name the misfit of the host that came closest to fitting (filters
        // run in enum order): "short of CPUs" says more than "not ready".
        let (top, _) = misfits
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)))
            .expect("a pool with hosts and no fit has misfits");
        let mut message = match top {
            Misfit::InsufficientCpu => format!(
                "no host in pool {pool} has {} free CPUs; the largest free is {}",
                demand.cpus,
                free_cpus.unwrap_or(0)
            ),
            Misfit::InsufficientMemory => format!(
                "no host in pool {pool} has {} free memory; the largest free is {}",
                format_mib(demand.memory_mib),
                format_mib(free_memory.unwrap_or(0))
            ),
            Misfit::FailoverReserve => format!(
                "placing the server would leave pool {pool} unable to restart every highly-available server after losing its {} largest host(s) (failover.reserveHosts)",
                self.rules.reserve_hosts
            ),
            _ => format!("no host in pool {pool} can take the server"),
        };
        let summary: Vec<String> = misfits.iter().map(|(m, n)| m.describe(*n, demand)).collect();
        let _ = write!(
            message,
            " ({} of {} hosts: {})",
            misfits.values().sum::<usize>(),
            self.hosts.len(),
            summary.join(", ")
        );
        Unschedulable { reason: top.reason(), message }
    }
}

/// Formats MiB the way a person writes it: "4Gi" when whole, else "1536Mi".
pub fn format_mib(mib: u64) -> String {
    if mib != 0 && mib.is_multiple_of(1024) { format!("{}Gi", mib / 1024) } else { format!("{mib}Mi") }
}

#[cfg(test)]
mod tests;
