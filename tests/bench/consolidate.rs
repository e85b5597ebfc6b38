//! Consolidation on traces: a trace format, a generator of synthetic day/night fleets,
//! and the evaluation that plans on the first days and replays the rest.
//!
//!   covi-bench trace --servers 2000 --days 7 --seed 1 > fleet.csv
//!   covi-bench consolidate --trace fleet.csv --theta 0.8 --train-days 5
//!
//! The trace (CSV, one row per server per hour of each day, header required):
//!   server,cpus,memory_mib,group,day,hour,cpu_millicores,memory_used_mib
//! `cpus` and `memory_mib` are the allocation; `group` an anti-affinity group (may be
//! empty); `day` counts from 0 (day % 7 < 5 are weekdays); `hour` 0–23; the last two
//! columns the demand in that hour.

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Parser;
use covi_placement::consolidate::{HOURS, Input, Server, Use, plan};
use covi_placement::{Demand, HostFacts, PoolRules, Ranking};
use serde_json::{Value, json};

/// One server of a trace: allocation, group and demand per day and hour.
#[derive(Clone, Debug)]
pub struct TraceServer {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub group: Option<String>,
    pub days: Vec<[Use; HOURS]>,
}

/// Parses a trace; errors name the line.
pub fn parse(text: &str) -> Result<Vec<TraceServer>, String> {
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, l)| l.trim()).unwrap_or_default();
    if header != "server,cpus,memory_mib,group,day,hour,cpu_millicores,memory_used_mib" {
        return Err(format!(
            "line 1: expected the header server,cpus,memory_mib,group,day,hour,cpu_millicores,memory_used_mib, found {header:?}"
        ));
    }
    let mut servers: BTreeMap<String, TraceServer> = BTreeMap::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        let bad = |what: &str| format!("line {}: {what}: {line:?}", i + 1);
        if f.len() != 8 {
            return Err(bad("8 columns expected"));
        }
        let num = |j: usize| f[j].trim().parse::<u64>().map_err(|_| bad(&format!("column {} is not a number", j + 1)));
        let (cpus, memory, day, hour, cpu, used) =
            (num(1)?, num(2)?, num(4)? as usize, num(5)? as usize, num(6)?, num(7)?);
        if hour >= HOURS {
            return Err(bad("hour must be 0 to 23"));
        }
        let s = servers.entry(f[0].to_string()).or_insert_with(|| TraceServer {
            name: f[0].to_string(),
            cpus: cpus as u32,
            memory_mib: memory,
            group: Some(f[3].trim().to_string()).filter(|g| !g.is_empty()),
            days: Vec::new(),
        });
        if s.days.len() <= day {
            s.days.resize(day + 1, [Use::default(); HOURS]);
        }
        s.days[day][hour] = Use { cpu_millis: cpu as u32, memory_mib: used as u32 };
    }
    Ok(servers.into_values().collect())
}

/// A small deterministic generator (PCG-style LCG).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() * items.len() as f64) as usize % items.len()]
    }
}

/// Servers of four shapes: office hours (busy 8–18 on weekdays), nightly batch (busy
/// 0–6), flat, and noisy; CPU demand as a share of the allocation with noise, memory
/// mostly steady.
pub fn generate(servers: usize, days: usize, seed: u64) -> Vec<TraceServer> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..servers)
        .map(|i| {
            let shape = rng.pick(&["office", "office", "batch", "batch", "flat", "noisy"]);
            let cpus = rng.pick(&[2u32, 4, 4, 8]);
            let memory_mib = u64::from(cpus) * rng.pick(&[2048u64, 4096]);
            let (busy, idle) = (0.55 + rng.next() * 0.35, 0.03 + rng.next() * 0.07);
            let memory_share = 0.4 + rng.next() * 0.3;
            let days = (0..days)
                .map(|day| {
                    let mut hours = [Use::default(); HOURS];
                    for (hour, u) in hours.iter_mut().enumerate() {
                        let weekday = day % 7 < 5;
                        let share = match shape {
                            "office" if weekday && (8..18).contains(&hour) => busy,
                            "batch" if hour < 6 => busy,
                            "flat" => 0.3 + busy * 0.2,
                            "noisy" => 0.1 + rng.next() * 0.6,
                            _ => idle,
                        };
                        let noisy = (share * (0.9 + rng.next() * 0.2)).min(1.0);
                        let active = if share > idle * 2.0 { 1.1 } else { 1.0 };
                        u.cpu_millis = (noisy * f64::from(cpus) * 1000.0) as u32;
                        u.memory_mib = (memory_mib as f64 * (memory_share * active).min(1.0)) as u32;
                    }
                    hours
                })
                .collect();
            TraceServer {
                name: format!("{shape}-{i}"),
                cpus,
                memory_mib,
                group: (rng.next() < 0.1).then(|| format!("g{}", i % 50)),
                days,
            }
        })
        .collect()
}

/// The trace as CSV.
pub fn to_csv(servers: &[TraceServer]) -> String {
    let mut out = String::from("server,cpus,memory_mib,group,day,hour,cpu_millicores,memory_used_mib\n");
    for s in servers {
        for (day, hours) in s.days.iter().enumerate() {
            for (hour, u) in hours.iter().enumerate() {
                out.push_str(&format!(
                    "{},{},{},{},{day},{hour},{},{}\n",
                    s.name,
                    s.cpus,
                    s.memory_mib,
                    s.group.as_deref().unwrap_or(""),
                    u.cpu_millis,
                    u.memory_mib
                ));
            }
        }
    }
    out
}

/// The fleet's hosts and the pool's rules for an evaluation.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub host_cpus: u32,
    pub host_memory_mib: u64,
    pub cpu_overcommit: f64,
    pub theta: f64,
    pub train_days: usize,
}

fn rules(f: &Fleet) -> PoolRules {
    PoolRules {
        name: "trace".into(),
        cpu_ratio: f.cpu_overcommit,
        memory_ratio: 1.0,
        reserve_cpus: 0,
        reserve_memory_mib: 0,
        max_servers_per_host: None,
        ranking: Ranking::Pack,
        reserve_hosts: 0,
    }
}

fn hosts(f: &Fleet, n: usize) -> Vec<HostFacts> {
    (0..n)
        .map(|i| HostFacts {
            name: format!("h{i:05}"),
            ready: true,
            schedulable: true,
            cpus: f.host_cpus,
            memory_mib: f.host_memory_mib,
            ..Default::default()
        })
        .collect()
}

/// Each hour's peak over the training days.
fn profile(s: &TraceServer, train_days: usize) -> [Use; HOURS] {
    let mut p = [Use::default(); HOURS];
    for day in s.days.iter().take(train_days.max(1)) {
        for (h, u) in day.iter().enumerate() {
            p[h].cpu_millis = p[h].cpu_millis.max(u.cpu_millis);
            p[h].memory_mib = p[h].memory_mib.max(u.memory_mib);
        }
    }
    p
}

fn demand(s: &TraceServer) -> Demand {
    Demand { cpus: s.cpus, memory_mib: s.memory_mib, anti_affinity_group: s.group.clone(), ..Default::default() }
}

/// Plans on the training days and replays the others: see the module documentation.
pub fn evaluate(trace: &[TraceServer], f: &Fleet) -> Value {
    let rules = rules(f);
    let hosts = hosts(f, trace.len().max(1));
    let profiles: Vec<[Use; HOURS]> = trace.iter().map(|s| profile(s, f.train_days)).collect();
    // Today's way: every server at its peak, packed first-fit decreasing.
    let at_peak: Vec<Server> = trace
        .iter()
        .zip(&profiles)
        .map(|(s, p)| {
            let peak = Use {
                cpu_millis: p.iter().map(|u| u.cpu_millis).max().unwrap_or(0),
                memory_mib: p.iter().map(|u| u.memory_mib).max().unwrap_or(0),
            };
            Server { name: s.name.clone(), demand: demand(s), profile: [peak; HOURS], host: None, movable: true }
        })
        .collect();
    let ffd = plan(&Input { rules: &rules, hosts: &hosts, servers: &at_peak, theta: f.theta, budget: 0 });
    // covi: the profiles, packed from scratch (a plan made on the training days) and,
    // as the rebalancer would with an unlimited budget, from today's placement.
    let servers: Vec<Server> = trace
        .iter()
        .zip(&profiles)
        .map(|(s, p)| Server { name: s.name.clone(), demand: demand(s), profile: *p, host: None, movable: true })
        .collect();
    let started = Instant::now();
    let planned = plan(&Input { rules: &rules, hosts: &hosts, servers: &servers, theta: f.theta, budget: usize::MAX });
    let planner_seconds = started.elapsed().as_secs_f64();
    let from_today: Vec<Server> =
        servers.iter().map(|s| Server { host: ffd.placement.get(&s.name).cloned(), ..s.clone() }).collect();
    let rebalanced =
        plan(&Input { rules: &rules, hosts: &hosts, servers: &from_today, theta: f.theta, budget: usize::MAX });
    let moves = planned.placement.iter().filter(|(s, h)| ffd.placement.get(*s) != Some(*h)).count();
    // Lower bound: the busiest hour's total over θ × capacity, the scarcer resource deciding.
    let bound = (0..HOURS)
        .map(|h| {
            let cpu: u64 = profiles.iter().map(|p| u64::from(p[h].cpu_millis)).sum();
            let mem: u64 = profiles.iter().map(|p| u64::from(p[h].memory_mib)).sum();
            let by_cpu = cpu as f64 / (f.theta * f64::from(f.host_cpus) * 1000.0);
            let by_mem = mem as f64 / (f.theta * f.host_memory_mib as f64);
            by_cpu.max(by_mem)
        })
        .fold(0.0, f64::max)
        .ceil() as usize;
    // Held-out days: a host over its capacity (not θ) in an hour is an overload.
    let index: BTreeMap<&str, usize> = trace.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let days = trace.iter().map(|s| s.days.len()).max().unwrap_or(0);
    let mut by_host: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (server, host) in &planned.placement {
        by_host.entry(host.as_str()).or_default().push(index[server.as_str()]);
    }
    let mut overload_hours = 0;
    for day in f.train_days..days {
        for h in 0..HOURS {
            for members in by_host.values() {
                let at = |i: usize| trace[i].days.get(day).map(|d| d[h]).unwrap_or_default();
                let cpu: u64 = members.iter().map(|&i| u64::from(at(i).cpu_millis)).sum();
                let mem: u64 = members.iter().map(|&i| u64::from(at(i).memory_mib)).sum();
                if cpu > u64::from(f.host_cpus) * 1000 || mem > f.host_memory_mib {
                    overload_hours += 1;
                }
            }
        }
    }
    let fewer = 1.0 - planned.hosts_used as f64 / ffd.hosts_used.max(1) as f64;
    json!({
        "servers": trace.len(), "days": days, "trainDays": f.train_days, "theta": f.theta,
        "host": {"cpus": f.host_cpus, "memoryMiB": f.host_memory_mib, "cpuOvercommit": f.cpu_overcommit},
        "hostsUsed": planned.hosts_used, "hostsFfdOnPeak": ffd.hosts_used, "lowerBound": bound,
        "fewerHostsThanFfd": fewer, "overLowerBound": planned.hosts_used as f64 / bound.max(1) as f64 - 1.0,
        "overloadHostHoursHeldOut": overload_hours, "movesFromFfd": moves,
        "rebalancedFromFfd": {"hostsUsed": rebalanced.hosts_used, "moves": rebalanced.moves.len()},
        "unplaced": planned.unplaced.len(), "plannerSeconds": planner_seconds,
    })
}

/// Planner time alone on a large pool: `hosts` hosts, `servers` servers of a
/// generated one-day fleet, from scratch.
pub fn planner_time(hosts_n: usize, servers_n: usize) -> Value {
    let f = Fleet { host_cpus: 32, host_memory_mib: 262_144, cpu_overcommit: 4.0, theta: 0.8, train_days: 1 };
    let trace = generate(servers_n, 1, 2);
    let (rules, hosts) = (rules(&f), hosts(&f, hosts_n));
    let servers: Vec<Server> = trace
        .iter()
        .map(|s| Server { name: s.name.clone(), demand: demand(s), profile: s.days[0], host: None, movable: true })
        .collect();
    let started = Instant::now();
    let planned = plan(&Input { rules: &rules, hosts: &hosts, servers: &servers, theta: f.theta, budget: usize::MAX });
    json!({"hosts": hosts_n, "servers": servers_n, "plannerSeconds": started.elapsed().as_secs_f64(),
           "hostsUsed": planned.hosts_used, "unplaced": planned.unplaced.len()})
}

/// The benchmark's consolidation section: a mixed day/night fleet and the planner's
/// time at 2,000 hosts and 20,000 servers.
pub fn bench() -> Value {
    let f = Fleet { host_cpus: 32, host_memory_mib: 262_144, cpu_overcommit: 4.0, theta: 0.8, train_days: 5 };
    let trace = generate(2000, 7, 1);
    json!({"mixedFleet": evaluate(&trace, &f), "scale": planner_time(2000, 20_000)})
}

#[derive(Parser, Debug)]
#[command(name = "covi-bench", about = "covi's benchmark; these subcommands need no cluster")]
pub enum Command {
    /// Prints a synthetic trace (CSV) of a day/night fleet.
    Trace {
        #[arg(long, default_value_t = 2000)]
        servers: usize,
        #[arg(long, default_value_t = 7)]
        days: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Times the planner alone on a generated fleet placed from scratch.
    PlanTime {
        #[arg(long, default_value_t = 2000)]
        hosts: usize,
        #[arg(long, default_value_t = 20_000)]
        servers: usize,
    },
    /// Plans a trace's first days and replays the rest; prints a JSON report.
    Consolidate {
        /// The trace file (CSV; see `covi-bench trace`).
        #[arg(long)]
        trace: std::path::PathBuf,
        /// Target utilisation θ of a host in every hour.
        #[arg(long, default_value_t = 0.8)]
        theta: f64,
        /// Days the plan is made on; the rest are replayed.
        #[arg(long, default_value_t = 5)]
        train_days: usize,
        #[arg(long, default_value_t = 32)]
        host_cpus: u32,
        #[arg(long, default_value_t = 262_144)]
        host_memory_mib: u64,
        #[arg(long, default_value_t = 4.0)]
        cpu_overcommit: f64,
    },
}

/// Runs a subcommand; `Err` with the message to print.
pub fn run(args: &[String]) -> Result<String, String> {
    let command = Command::try_parse_from(args).map_err(|e| e.to_string())?;
    match command {
        Command::Trace { servers, days, seed } => Ok(to_csv(&generate(servers, days, seed))),
        Command::PlanTime { hosts, servers } => Ok(planner_time(hosts, servers).to_string() + "\n"),
        Command::Consolidate { trace, theta, train_days, host_cpus, host_memory_mib, cpu_overcommit } => {
            if !(theta > 0.0 && theta <= 1.0) {
                return Err(format!("--theta {theta}: must be above 0 and at most 1"));
            }
            let text = std::fs::read_to_string(&trace).map_err(|e| format!("{}: {e}", trace.display()))?;
            let servers = parse(&text).map_err(|e| format!("{}: {e}", trace.display()))?;
            let f = Fleet { host_cpus, host_memory_mib, cpu_overcommit, theta, train_days };
            Ok(serde_json::to_string_pretty(&evaluate(&servers, &f)).unwrap_or_default() + "\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_trace_reads_back_and_bad_lines_are_named() {
        let trace = generate(20, 2, 3);
        let back = parse(&to_csv(&trace)).unwrap();
        assert_eq!(back.len(), 20);
        let first = trace.iter().find(|s| s.name == back[0].name).unwrap();
        assert_eq!((back[0].cpus, back[0].days.len(), back[0].days[1][5]), (first.cpus, 2, first.days[1][5]));
        assert_eq!(generate(20, 2, 3)[7].days, trace[7].days, "the same seed, the same fleet");
        let err = parse("server,cpus,memory_mib,group,day,hour,cpu_millicores,memory_used_mib\na,1,2,,0,24,5,5\n");
        assert!(err.unwrap_err().starts_with("line 2: hour must be 0 to 23"));
        assert!(parse("name,cpu\n").unwrap_err().starts_with("line 1: expected the header"));
    }
}
