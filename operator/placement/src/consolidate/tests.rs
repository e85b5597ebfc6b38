use super::*;
use crate::Ranking;

fn rules(reserve_hosts: u32) -> PoolRules {
    PoolRules {
        name: "p".into(),
        cpu_ratio: 2.0,
        memory_ratio: 1.0,
        reserve_cpus: 0,
        reserve_memory_mib: 0,
        max_servers_per_host: None,
        ranking: Ranking::Pack,
        reserve_hosts,
    }
}

fn hosts(n: usize, cpus: u32, memory_mib: u64) -> Vec<HostFacts> {
    (1..=n)
        .map(|i| HostFacts {
            name: format!("h{i}"),
            ready: true,
            schedulable: true,
            cpus,
            memory_mib,
            ..Default::default()
        })
        .collect()
}

/// A server of `cpus` vCPUs and 1 GiB using `busy` millicores in hours `from..to`
/// (wrapping past midnight; `to` = 24 for all day) and 100 otherwise, on `host`.
fn server(name: &str, cpus: u32, busy: u32, from: usize, to: usize, host: Option<&str>) -> Server {
    let mut profile = [Use { cpu_millis: 100, memory_mib: 512 }; HOURS];
    let hours = if to >= HOURS { HOURS } else { (to + HOURS - from) % HOURS };
    for h in from..from + hours {
        profile[h % HOURS].cpu_millis = busy;
    }
    Server {
        name: name.into(),
        demand: Demand { cpus, memory_mib: 1024, ..Default::default() },
        profile,
        host: host.map(str::to_string),
        movable: true,
    }
}

fn input<'a>(rules: &'a PoolRules, hosts: &'a [HostFacts], servers: &'a [Server], budget: usize) -> Input<'a> {
    Input { rules, hosts, servers, theta: 0.9, budget }
}

#[test]
fn a_day_server_and_a_night_server_share_a_host() {
    let (r, h) = (rules(0), hosts(2, 4, 8192));
    let servers = [server("office", 4, 3400, 8, 18, Some("h1")), server("batch", 4, 3400, 20, 6, Some("h2"))];
    let plan = plan(&input(&r, &h, &servers, 10));
    assert_eq!(plan.hosts_used, 1, "{plan:?}");
    assert_eq!(plan.moves.len(), 1);
    assert_eq!(plan.emptied.len(), 1);
    // Two servers busy at the same hours do not fit together under θ.
    let both_day = [server("a", 4, 3400, 8, 18, Some("h1")), server("b", 4, 3400, 9, 17, Some("h2"))];
    let plan = super::plan(&input(&r, &h, &both_day, 10));
    assert_eq!((plan.hosts_used, plan.moves.len()), (2, 0), "{plan:?}");
}

#[test]
fn allocation_limits_hold_whatever_the_profile_says() {
    // Idle servers, but 4 + 6 vCPUs on a host that may hold 8 (4 CPUs × 2).
    let (r, h) = (rules(0), hosts(2, 4, 8192));
    let servers = [server("a", 4, 10, 0, 1, Some("h1")), server("b", 6, 10, 0, 1, Some("h2"))];
    let plan = plan(&input(&r, &h, &servers, 10));
    assert_eq!((plan.hosts_used, plan.moves.len()), (2, 0), "{plan:?}");
}

#[test]
fn anti_affinity_pinning_and_unmovable_servers_are_respected() {
    let (r, h) = (rules(0), hosts(3, 8, 16384));
    let mut a = server("a", 1, 100, 0, 1, Some("h1"));
    let mut b = server("b", 1, 100, 0, 1, Some("h2"));
    a.demand.anti_affinity_group = Some("web".into());
    b.demand.anti_affinity_group = Some("web".into());
    let mut pinned = server("pinned", 1, 100, 0, 1, Some("h3"));
    pinned.demand.pinned_host = Some("h3".into());
    let plan = plan(&input(&r, &h, &[a.clone(), b.clone(), pinned.clone()], 10));
    assert_ne!(plan.placement["a"], plan.placement["b"], "{plan:?}");
    assert_eq!(plan.placement["pinned"], "h3");
    // Without the pin the third host empties; a server that may not move keeps it.
    pinned.demand.pinned_host = None;
    let plan = super::plan(&input(&r, &h, &[a.clone(), b.clone(), pinned.clone()], 10));
    assert_eq!(plan.hosts_used, 2, "{plan:?}");
    pinned.movable = false;
    let plan = super::plan(&input(&r, &h, &[a, b, pinned], 10));
    assert_eq!(plan.placement["pinned"], "h3");
}

#[test]
fn the_budget_bounds_the_moves() {
    let (r, h) = (rules(0), hosts(4, 8, 16384));
    let servers: Vec<Server> =
        (0..8).map(|i| server(&format!("s{i}"), 1, 200, 0, 1, Some(&format!("h{}", i % 4 + 1)))).collect();
    for budget in [0, 1, 2, 3, 6] {
        let plan = plan(&input(&r, &h, &servers, budget));
        assert!(plan.moves.len() <= budget, "budget {budget}: {plan:?}");
    }
    let all = plan(&input(&r, &h, &servers, 100));
    assert_eq!(all.hosts_used, 1, "eight small servers fit on one host: {all:?}");
}

#[test]
fn the_failover_reserve_keeps_a_host_worth_of_room() {
    let (h, servers) = (hosts(3, 4, 8192), {
        let mut s: Vec<Server> =
            (0..3).map(|i| server(&format!("s{i}"), 2, 500, 0, 1, Some(&format!("h{}", i + 1)))).collect();
        for x in &mut s {
            x.demand.high_availability = true;
        }
        s
    });
    let (without, with) = (rules(0), rules(1));
    assert_eq!(plan(&input(&without, &h, &servers, 10)).hosts_used, 1);
    let plan = plan(&input(&with, &h, &servers, 10));
    // On one host, losing it would leave no used host to restart anything on.
    assert!(plan.hosts_used >= 2, "{plan:?}");
}

#[test]
fn an_overloaded_host_is_relieved_first_and_new_servers_are_placed() {
    let (r, h) = (rules(0), hosts(2, 4, 8192));
    let servers = [
        server("hot-1", 2, 2000, 0, 24, Some("h1")),
        server("hot-2", 2, 2000, 0, 24, Some("h1")),
        server("new", 1, 100, 0, 1, None),
    ];
    let plan = plan(&input(&r, &h, &servers, 10));
    assert_ne!(plan.placement["hot-1"], plan.placement["hot-2"], "4000m on a 3600m host: {plan:?}");
    assert!(plan.overloaded.is_empty());
    assert!(plan.placement.contains_key("new") && plan.unplaced.is_empty());
    assert!(plan.moves.iter().any(|m| m.server == "new" && m.from.is_none()));
}

/// A small deterministic generator for the property test.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Every host's allocation and hourly demand in `placement`.
fn check_limits(input: &Input, plan: &Plan) -> Result<(), String> {
    for host in input.hosts {
        let on: Vec<&Server> =
            input.servers.iter().filter(|s| plan.placement.get(&s.name) == Some(&host.name)).collect();
        let cap = input.rules.schedulable(host);
        let cpus: u32 = on.iter().map(|s| s.demand.cpus).sum();
        let memory: u64 = on.iter().map(|s| s.demand.memory_mib).sum();
        if cpus > cap.cpus || memory > cap.memory_mib {
            return Err(format!("{} allocated {cpus} CPUs / {memory} MiB over {cap:?}", host.name));
        }
        let mut groups = std::collections::BTreeSet::new();
        for s in &on {
            if let Some(g) = &s.demand.anti_affinity_group
                && !groups.insert(g)
            {
                return Err(format!("{} holds two of group {g}", host.name));
            }
        }
        if plan.overloaded.contains(&host.name) {
            continue;
        }
        for hour in 0..HOURS {
            let c: u64 = on.iter().map(|s| u64::from(s.profile[hour].cpu_millis)).sum();
            if c as f64 > f64::from(host.cpus) * 1000.0 * input.theta {
                return Err(format!("{} at hour {hour}: {c}m over θ", host.name));
            }
        }
    }
    Ok(())
}

#[test]
fn random_pools_keep_every_rule_the_budget_and_settle() {
    let mut rng = Rng(7);
    for case in 0..300 {
        let n_hosts = 2 + rng.below(6) as usize;
        let h = hosts(n_hosts, 4 + 4 * rng.below(2) as u32, 16384);
        let r = rules(rng.below(2) as u32);
        let servers: Vec<Server> = (0..(1 + rng.below(14)))
            .map(|i| {
                let from = rng.below(24) as usize;
                let len = 1 + rng.below(12) as usize;
                let mut s = server(
                    &format!("s{i}"),
                    1 + rng.below(4) as u32,
                    100 + rng.below(3000) as u32,
                    from,
                    (from + len) % HOURS,
                    None,
                );
                if rng.below(4) == 0 {
                    s.demand.anti_affinity_group = Some(format!("g{}", rng.below(2)));
                }
                s.demand.high_availability = rng.below(2) == 0;
                s
            })
            .collect();
        // Placed from scratch, then consolidated from that placement under a budget.
        let first = plan(&input(&r, &h, &servers, usize::MAX));
        check_limits(&input(&r, &h, &servers, 0), &first).map_err(|e| format!("case {case}: {e}")).unwrap();
        let placed: Vec<Server> =
            servers.iter().map(|s| Server { host: first.placement.get(&s.name).cloned(), ..s.clone() }).collect();
        let budget = rng.below(4) as usize;
        let next = plan(&input(&r, &h, &placed, budget));
        assert!(next.moves.iter().filter(|m| m.from.is_some()).count() <= budget, "case {case}: {next:?}");
        check_limits(&input(&r, &h, &placed, 0), &next).map_err(|e| format!("case {case}: {e}")).unwrap();
        assert!(next.hosts_used <= first.hosts_used, "case {case}: never more hosts");
        // A consolidated pool stays as it is.
        let settled: Vec<Server> =
            placed.iter().map(|s| Server { host: next.placement.get(&s.name).cloned(), ..s.clone() }).collect();
        let again = plan(&input(&r, &h, &settled, usize::MAX));
        let again_settled: Vec<Server> =
            settled.iter().map(|s| Server { host: again.placement.get(&s.name).cloned(), ..s.clone() }).collect();
        let third = plan(&input(&r, &h, &again_settled, usize::MAX));
        assert!(third.moves.is_empty(), "case {case}: a balanced pool moves nothing: {third:?}");
    }
}
