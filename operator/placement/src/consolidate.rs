//! Consolidation: fewer hosts, by packing servers whose busy hours differ.
//!
//! A pure planner. Each server brings its allocation (hard limits: a host's allocated
//! CPUs and memory never exceed what the pool's overcommit and reserve allow) and its
//! daily profile: demand per hour of day. A host is full when, in *some* hour, the
//! demand of its servers would pass θ of its capacity — so a server busy by day and one
//! busy by night share a host that neither could share with its own kind.
//!
//! The method, chosen for speed at 2,000 hosts (measured by `covi-bench consolidate`):
//! servers without a host are placed first-fit decreasing (largest peak first, onto
//! the fullest host that fits), then hosts are emptied one at a time, least loaded
//! first, by moving each of their servers to the fullest other host that takes it
//! (best fit); a host is emptied only if all its servers fit elsewhere, the
//! failover reserve still holds, and the moves stay within the budget. Hosts over θ
//! are relieved first. The same rules as scheduling apply (pinning, readiness, cordons,
//! host selectors, anti-affinity, servers per host, N+1 reserve).

use std::collections::BTreeMap;

use crate::{Demand, HostFacts, PoolRules};

/// Hours of the daily profile.
pub const HOURS: usize = 24;

/// Demand in one hour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Use {
    pub cpu_millis: u32,
    pub memory_mib: u32,
}

/// A server as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    pub name: String,
    /// Allocation and constraints, as for scheduling.
    pub demand: Demand,
    /// Demand per hour of day (the profile's peak per hour; the allocation where a
    /// server has no profile yet).
    pub profile: [Use; HOURS],
    /// Where it runs now; `None` for a server to be placed.
    pub host: Option<String>,
    /// Whether it may move (live migration possible, not pinned by the user's choice).
    pub movable: bool,
}

impl Server {
    /// The profile of a server without measurements: its whole allocation every hour.
    pub fn flat_profile(demand: &Demand) -> [Use; HOURS] {
        let u = Use { cpu_millis: demand.cpus * 1000, memory_mib: demand.memory_mib as u32 };
        [u; HOURS]
    }

    fn peak(&self) -> Use {
        Use {
            cpu_millis: self.profile.iter().map(|u| u.cpu_millis).max().unwrap_or(0),
            memory_mib: self.profile.iter().map(|u| u.memory_mib).max().unwrap_or(0),
        }
    }
}

/// What to plan.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub rules: &'a PoolRules,
    pub hosts: &'a [HostFacts],
    pub servers: &'a [Server],
    /// Target utilisation: a host's summed demand stays under θ × its capacity in
    /// every hour.
    pub theta: f64,
    /// The most servers the plan may move (servers without a host don't count).
    pub budget: usize,
}

/// One server to move (or, `from: None`, to place).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub server: String,
    pub from: Option<String>,
    pub to: String,
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Server → host, for every server placed.
    pub placement: BTreeMap<String, String>,
    /// What changes from the current placement, in order.
    pub moves: Vec<Move>,
    /// Hosts running at least one server.
    pub hosts_used: usize,
    /// Hosts that ran servers before and run none in the plan (free to power off).
    pub emptied: Vec<String>,
    /// Servers no host can take.
    pub unplaced: Vec<String>,
    /// Hosts over θ in some hour that the plan could not relieve within the budget.
    pub overloaded: Vec<String>,
}

#[derive(Clone, Debug, Default)]
struct Load {
    cpus: u32,
    memory_mib: u64,
    servers: u32,
    groups: BTreeMap<String, u32>,
    ha_cpus: u32,
    ha_memory_mib: u64,
    cpu: [u64; HOURS],
    memory: [u64; HOURS],
    /// Servers on the host (indices).
    on: Vec<usize>,
    /// The busiest hour's demand, per resource (kept with every change).
    peak_cpu: u64,
    peak_memory: u64,
}

/// The packing being planned: every host's load.
struct Packing<'a> {
    input: &'a Input<'a>,
    loads: Vec<Load>,
    /// Per server index: host index.
    at: Vec<Option<usize>>,
    /// Per host: θ × capacity (CPU millicores, memory MiB) and allocation limits.
    limits: Vec<(u64, u64, u32, u64)>,
    /// Per server: its profile's peak.
    peaks: Vec<Use>,
}

impl<'a> Packing<'a> {
    fn new(input: &'a Input<'a>) -> Packing<'a> {
        let limits = input
            .hosts
            .iter()
            .map(|h| {
                let cap = input.rules.schedulable(h);
                let cpus = h.cpus.saturating_sub(input.rules.reserve_cpus);
                let memory = h.memory_mib.saturating_sub(input.rules.reserve_memory_mib);
                (
                    (f64::from(cpus) * 1000.0 * input.theta) as u64,
                    (memory as f64 * input.theta) as u64,
                    cap.cpus,
                    cap.memory_mib,
                )
            })
            .collect();
        let mut p = Packing {
            input,
            loads: vec![Load::default(); input.hosts.len()],
            at: vec![None; input.servers.len()],
            limits,
            peaks: input.servers.iter().map(Server::peak).collect(),
        };
        let index: BTreeMap<&str, usize> = input.hosts.iter().enumerate().map(|(i, h)| (h.name.as_str(), i)).collect();
        for (s, server) in input.servers.iter().enumerate() {
            if let Some(h) = server.host.as_deref().and_then(|h| index.get(h)) {
                p.add(s, *h);
            }
        }
        p
    }

    fn add(&mut self, s: usize, h: usize) {
        let server = &self.input.servers[s];
        let l = &mut self.loads[h];
        l.cpus += server.demand.cpus;
        l.memory_mib += server.demand.memory_mib;
        l.servers += 1;
        if let Some(g) = &server.demand.anti_affinity_group {
            *l.groups.entry(g.clone()).or_default() += 1;
        }
        if server.demand.high_availability {
            l.ha_cpus += server.demand.cpus;
            l.ha_memory_mib += server.demand.memory_mib;
        }
        for (hour, u) in server.profile.iter().enumerate() {
            l.cpu[hour] += u64::from(u.cpu_millis);
            l.memory[hour] += u64::from(u.memory_mib);
        }
        l.on.push(s);
        l.peak_cpu = l.cpu.iter().copied().max().unwrap_or(0);
        l.peak_memory = l.memory.iter().copied().max().unwrap_or(0);
        self.at[s] = Some(h);
    }

    fn remove(&mut self, s: usize) {
        let Some(h) = self.at[s].take() else { return };
        let server = &self.input.servers[s];
        let l = &mut self.loads[h];
        l.cpus -= server.demand.cpus;
        l.memory_mib -= server.demand.memory_mib;
        l.servers -= 1;
        if let Some(g) = &server.demand.anti_affinity_group
            && let Some(n) = l.groups.get_mut(g)
        {
            *n -= 1;
            if *n == 0 {
                l.groups.remove(g);
            }
        }
        if server.demand.high_availability {
            l.ha_cpus -= server.demand.cpus;
            l.ha_memory_mib -= server.demand.memory_mib;
        }
        for (hour, u) in server.profile.iter().enumerate() {
            l.cpu[hour] -= u64::from(u.cpu_millis);
            l.memory[hour] -= u64::from(u.memory_mib);
        }
        if let Some(i) = l.on.iter().position(|&x| x == s) {
            l.on.swap_remove(i);
        }
        l.peak_cpu = l.cpu.iter().copied().max().unwrap_or(0);
        l.peak_memory = l.memory.iter().copied().max().unwrap_or(0);
    }

    /// Whether host `h` may take server `s` (which is not on it).
    fn fits(&self, s: usize, h: usize) -> bool {
        let (server, host, l) = (&self.input.servers[s], &self.input.hosts[h], &self.loads[h]);
        let d = &server.demand;
        let (theta_cpu, theta_memory, max_cpus, max_memory) = self.limits[h];
        if d.pinned_host.as_ref().is_some_and(|p| *p != host.name)
            || !host.ready
            || !host.schedulable
            || !d.host_selector.iter().all(|(k, v)| host.labels.get(k) == Some(v))
            || d.anti_affinity_group.as_ref().is_some_and(|g| l.groups.contains_key(g))
            || self.input.rules.max_servers_per_host.is_some_and(|m| l.servers >= m)
            || l.cpus + d.cpus > max_cpus
            || l.memory_mib + d.memory_mib > max_memory
        {
            return false;
        }
        // Cheap first: the server's peak fits beside the host's busiest hour, so every
        // hour fits.
        let peak = &self.peaks[s];
        if l.peak_cpu + u64::from(peak.cpu_millis) <= theta_cpu
            && l.peak_memory + u64::from(peak.memory_mib) <= theta_memory
        {
            return true;
        }
        server.profile.iter().enumerate().all(|(hour, u)| {
            l.cpu[hour] + u64::from(u.cpu_millis) <= theta_cpu
                && l.memory[hour] + u64::from(u.memory_mib) <= theta_memory
        })
    }

    /// How full host `h` is: its busiest hour's share of θ × capacity, the scarcer
    /// resource deciding.
    fn fullness(&self, h: usize) -> f64 {
        let (l, (tc, tm, _, _)) = (&self.loads[h], self.limits[h]);
        (l.peak_cpu as f64 / tc.max(1) as f64).max(l.peak_memory as f64 / tm.max(1) as f64)
    }

    fn over_theta(&self, h: usize) -> bool {
        let (l, (tc, tm, _, _)) = (&self.loads[h], self.limits[h]);
        l.peak_cpu > tc || l.peak_memory > tm
    }

    /// N+1: the highly-available servers of the `reserve_hosts` hosts with the most of
    /// them fit in the allocation left free on the other hosts that run servers
    /// (empty hosts may be powered off, so they do not count).
    fn keeps_reserve(&self) -> bool {
        let n = self.input.rules.reserve_hosts as usize;
        if n == 0 {
            return true;
        }
        let mut used: Vec<usize> = (0..self.loads.len()).filter(|&h| self.loads[h].servers > 0).collect();
        used.sort_by_key(|&h| std::cmp::Reverse((self.loads[h].ha_cpus, self.loads[h].ha_memory_mib)));
        let (lost, rest) = used.split_at(n.min(used.len()));
        let need: (u64, u64) = lost
            .iter()
            .fold((0, 0), |(c, m), &h| (c + u64::from(self.loads[h].ha_cpus), m + self.loads[h].ha_memory_mib));
        let free: (u64, u64) = rest.iter().filter(|&&h| self.input.hosts[h].ready).fold((0, 0), |(c, m), &h| {
            let (_, _, max_cpus, max_memory) = self.limits[h];
            (
                c + u64::from(max_cpus.saturating_sub(self.loads[h].cpus)),
                m + max_memory.saturating_sub(self.loads[h].memory_mib),
            )
        });
        need.0 <= free.0 && need.1 <= free.1
    }

    /// How much server `s` would raise host `h`'s busiest hour, as a share of θ ×
    /// capacity (the two resources added): near zero where its busy hours are the
    /// host's quiet ones.
    fn raise(&self, s: usize, h: usize) -> f64 {
        let (l, (tc, tm, _, _), server) = (&self.loads[h], self.limits[h], &self.input.servers[s]);
        let (mut cpu, mut memory) = (0u64, 0u64);
        for (hour, u) in server.profile.iter().enumerate() {
            cpu = cpu.max(l.cpu[hour] + u64::from(u.cpu_millis));
            memory = memory.max(l.memory[hour] + u64::from(u.memory_mib));
        }
        (cpu - l.peak_cpu) as f64 / tc.max(1) as f64 + (memory - l.peak_memory) as f64 / tm.max(1) as f64
    }

    /// The host but `except` that takes server `s` with the least rise of its busiest
    /// hour (complementary profiles first), the fullest on a tie.
    fn best_fit(&self, s: usize, except: &[usize], only_used: bool) -> Option<usize> {
        let mut best: Option<(f64, f64, usize)> = None;
        for h in 0..self.loads.len() {
            if except.contains(&h) || (only_used && self.loads[h].servers == 0) || !self.fits(s, h) {
                continue;
            }
            let (r, f) = (self.raise(s, h), self.fullness(h));
            if best.is_none_or(|(br, bf, _)| r < br - 1e-9 || (r <= br + 1e-9 && f > bf)) {
                best = Some((r, f, h));
            }
        }
        best.map(|(_, _, h)| h)
    }
}

/// Largest first: the peak's share of a typical host, the scarcer resource deciding.
fn size_order(input: &Input, indices: &mut [usize]) {
    let (cpu, memory) = input.hosts.iter().map(|h| (u64::from(h.cpus) * 1000, h.memory_mib)).max().unwrap_or((1, 1));
    let size = |s: usize| {
        let p = input.servers[s].peak();
        (f64::from(p.cpu_millis) / cpu.max(1) as f64).max(f64::from(p.memory_mib) / memory.max(1) as f64)
    };
    indices.sort_by(|&a, &b| size(b).total_cmp(&size(a)).then(input.servers[a].name.cmp(&input.servers[b].name)));
}

/// Plans the pool: see the module documentation.
pub fn plan(input: &Input) -> Plan {
    let mut p = Packing::new(input);
    let before: Vec<Option<usize>> = p.at.clone();
    let mut moved = 0usize;
    let mut overloaded = Vec::new();

    // 1. Hosts over θ: move their largest movable servers elsewhere until they are not.
    for h in 0..input.hosts.len() {
        while p.over_theta(h) {
            let mut here: Vec<usize> = p.loads[h].on.iter().copied().filter(|&s| input.servers[s].movable).collect();
            size_order(input, &mut here);
            let relieved = here.into_iter().find_map(|s| {
                if moved >= input.budget {
                    return None;
                }
                let to = p.best_fit(s, &[h], false)?;
                p.remove(s);
                p.add(s, to);
                if p.keeps_reserve() {
                    Some(())
                } else {
                    p.remove(s);
                    p.add(s, h);
                    None
                }
            });
            if relieved.is_none() {
                overloaded.push(input.hosts[h].name.clone());
                break;
            }
            moved += 1;
        }
    }

    // 2. Servers without a host: first-fit decreasing onto the fullest host that fits.
    let mut unplaced_idx: Vec<usize> = (0..input.servers.len()).filter(|&s| p.at[s].is_none()).collect();
    size_order(input, &mut unplaced_idx);
    let mut unplaced = Vec::new();
    for s in unplaced_idx {
        match p.best_fit(s, &[], true).or_else(|| p.best_fit(s, &[], false)) {
            Some(h) => p.add(s, h),
            None => unplaced.push(input.servers[s].name.clone()),
        }
    }

    // 3. Empty hosts, least loaded first, while the budget lasts; passes until one
    //    empties none.
    loop {
        let mut candidates: Vec<usize> = (0..input.hosts.len()).filter(|&h| p.loads[h].servers > 0).collect();
        candidates.sort_by(|&a, &b| p.fullness(a).total_cmp(&p.fullness(b)).then(a.cmp(&b)));
        let mut progress = false;
        for h in candidates {
            if p.loads[h].servers == 0 {
                continue;
            }
            let mut here: Vec<usize> = p.loads[h].on.clone();
            let counted = here.iter().filter(|&&s| before[s].is_some()).count();
            if here.iter().any(|&s| !input.servers[s].movable) || moved + counted > input.budget {
                continue;
            }
            size_order(input, &mut here);
            let mut done = Vec::new();
            // Emptied hosts are empty, so `only_used` keeps them out.
            for &s in &here {
                match p.best_fit(s, &[h], true) {
                    Some(to) => {
                        p.remove(s);
                        p.add(s, to);
                        done.push(s);
                    }
                    None => break,
                }
            }
            if done.len() == here.len() && p.keeps_reserve() {
                moved += counted;
                progress = true;
                continue;
            }
            // Undo: every server back on h.
            for s in done {
                p.remove(s);
                p.add(s, h);
            }
        }
        if !progress {
            break;
        }
    }

    let mut placement = BTreeMap::new();
    let mut moves = Vec::new();
    for (s, server) in input.servers.iter().enumerate() {
        let Some(h) = p.at[s] else { continue };
        placement.insert(server.name.clone(), input.hosts[h].name.clone());
        if before[s] != Some(h) {
            moves.push(Move {
                server: server.name.clone(),
                from: before[s].map(|b| input.hosts[b].name.clone()),
                to: input.hosts[h].name.clone(),
            });
        }
    }
    let used_before: Vec<bool> = (0..input.hosts.len()).map(|h| before.contains(&Some(h))).collect();
    let emptied = (0..input.hosts.len())
        .filter(|&h| used_before[h] && p.loads[h].servers == 0)
        .map(|h| input.hosts[h].name.clone())
        .collect();
    Plan {
        hosts_used: p.loads.iter().filter(|l| l.servers > 0).count(),
        placement,
        moves,
        emptied,
        unplaced,
        overloaded,
    }
}

#[cfg(test)]
mod tests;
