use super::*;

fn rules(ranking: Ranking) -> PoolRules {
    PoolRules {
        name: "idc-a".into(),
        cpu_ratio: 1.0,
        memory_ratio: 1.0,
        reserve_cpus: 0,
        reserve_memory_mib: 0,
        max_servers_per_host: None,
        ranking,
        reserve_hosts: 0,
    }
}

fn host(name: &str, cpus: u32, memory_gib: u64) -> HostFacts {
    HostFacts {
        name: name.into(),
        labels: BTreeMap::new(),
        ready: true,
        schedulable: true,
        cpus,
        memory_mib: memory_gib * 1024,
    }
}

fn demand(cpus: u32, memory_gib: u64) -> Demand {
    Demand { cpus, memory_mib: memory_gib * 1024, ..Demand::default() }
}

fn grouped(cpus: u32, group: &str) -> Demand {
    Demand { anti_affinity_group: Some(group.into()), ..demand(cpus, 1) }
}

#[test]
fn spread_prefers_the_emptiest_host() {
    let rules = rules(Ranking::Spread);
    let hosts = [host("a", 8, 16), host("b", 8, 16)];
    let bound =
        [Bound { host: "a".into(), cpus: 4, memory_mib: 4096, anti_affinity_group: None, high_availability: false }];
    let mut pool = Pool::new(&rules, &hosts, &bound);
    assert_eq!(pool.place(&demand(1, 1)), Ok("b".into()));
}

#[test]
fn pack_fills_the_fullest_host_that_fits() {
    let rules = rules(Ranking::Pack);
    let hosts = [host("a", 8, 16), host("b", 8, 16)];
    let bound =
        [Bound { host: "b".into(), cpus: 4, memory_mib: 4096, anti_affinity_group: None, high_availability: false }];
    let mut pool = Pool::new(&rules, &hosts, &bound);
    assert_eq!(pool.place(&demand(4, 4)), Ok("b".into()));
    assert_eq!(pool.place(&demand(4, 4)), Ok("a".into()), "b is full now");
}

#[test]
fn overcommit_and_reserve_set_capacity() {
    let mut rules = rules(Ranking::Spread);
    rules.cpu_ratio = 4.0;
    rules.memory_ratio = 1.5;
    rules.reserve_cpus = 2;
    rules.reserve_memory_mib = 2048;
    let cap = rules.schedulable(&host("a", 10, 10));
    assert_eq!(cap, Schedulable { cpus: 32, memory_mib: 12288 });
}

#[test]
fn a_batch_never_overcommits_a_host() {
    let rules = rules(Ranking::Spread);
    let hosts = [host("a", 4, 64), host("b", 4, 64), host("c", 2, 64)];
    let mut pool = Pool::new(&rules, &hosts, &[]);
    let results: Vec<_> = (0..12).map(|_| pool.place(&demand(1, 1))).collect();
    let placed = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(placed, 10, "exactly the 10 CPUs of the pool are handed out");
    for h in &hosts {
        let load = pool.load(&h.name).unwrap();
        assert!(load.cpus <= h.cpus, "{} holds {} CPUs of {}", h.name, load.cpus, h.cpus);
    }
    let err = results.last().unwrap().clone().unwrap_err();
    assert_eq!(err.reason, "InsufficientCPU");
}

#[test]
fn hundred_servers_bind_in_one_pass_and_spread_evenly() {
    let rules = rules(Ranking::Spread);
    let hosts: Vec<_> = (0..10).map(|i| host(&format!("h{i}"), 32, 64)).collect();
    let mut pool = Pool::new(&rules, &hosts, &[]);
    for _ in 0..100 {
        pool.place(&demand(1, 1)).expect("fits");
    }
    for h in &hosts {
        assert_eq!(pool.load(&h.name).unwrap().servers, 10);
    }
}

#[test]
fn anti_affinity_members_never_share_a_host() {
    let rules = rules(Ranking::Pack);
    let hosts = [host("a", 16, 16), host("b", 16, 16), host("c", 16, 16)];
    let mut pool = Pool::new(&rules, &hosts, &[]);
    let mut chosen: Vec<_> = (0..3).map(|_| pool.place(&grouped(1, "web")).unwrap()).collect();
    chosen.sort();
    assert_eq!(chosen, ["a", "b", "c"]);
    let fourth = pool.place(&grouped(1, "web")).unwrap_err();
    assert_eq!(fourth.reason, "AntiAffinity");
    assert!(fourth.message.contains("anti-affinity group web"), "{}", fourth.message);
    assert!(pool.place(&grouped(1, "db")).is_ok(), "other groups are unaffected");
}

#[test]
fn existing_members_count_for_anti_affinity() {
    let rules = rules(Ranking::Spread);
    let hosts = [host("a", 16, 16), host("b", 16, 16)];
    let bound = [Bound {
        host: "b".into(),
        cpus: 1,
        memory_mib: 1024,
        anti_affinity_group: Some("web".into()),
        high_availability: false,
    }];
    let mut pool = Pool::new(&rules, &hosts, &bound);
    assert_eq!(pool.place(&grouped(1, "web")), Ok("a".into()));
}

#[test]
fn too_large_a_server_names_what_is_short() {
    let rules = rules(Ranking::Spread);
    let hosts = [host("a", 4, 16), host("b", 2, 16)];
    let err = Pool::new(&rules, &hosts, &[]).place(&demand(8, 1)).unwrap_err();
    assert_eq!(err.reason, "InsufficientCPU");
    assert!(err.message.starts_with("no host in pool idc-a has 8 free CPUs; the largest free is 4"), "{}", err.message);
    let err = Pool::new(&rules, &hosts, &[]).place(&demand(1, 32)).unwrap_err();
    assert_eq!(err.reason, "InsufficientMemory");
    assert!(err.message.contains("has 32Gi free memory; the largest free is 16Gi"), "{}", err.message);
}

#[test]
fn unready_cordoned_and_full_hosts_are_skipped() {
    let mut rules = rules(Ranking::Spread);
    rules.max_servers_per_host = Some(1);
    let mut down = host("down", 64, 64);
    down.ready = false;
    let mut cordoned = host("cordoned", 64, 64);
    cordoned.schedulable = false;
    let hosts = [down, cordoned, host("full", 64, 64)];
    let bound =
        [Bound { host: "full".into(), cpus: 1, memory_mib: 1, anti_affinity_group: None, high_availability: false }];
    let err = Pool::new(&rules, &hosts, &bound).place(&demand(1, 1)).unwrap_err();
    assert!(err.message.contains("1 host not ready"), "{}", err.message);
    assert!(err.message.contains("1 host cordoned"), "{}", err.message);
    assert!(err.message.contains("1 host at maxServersPerHost"), "{}", err.message);
}

#[test]
fn host_selector_and_pin_restrict_candidates() {
    let rules = rules(Ranking::Spread);
    let mut ssd = host("ssd", 8, 8);
    ssd.labels.insert("disk".into(), "ssd".into());
    let hosts = [host("plain", 8, 8), ssd];
    let mut pool = Pool::new(&rules, &hosts, &[]);
    let mut wants_ssd = demand(1, 1);
    wants_ssd.host_selector.insert("disk".into(), "ssd".into());
    assert_eq!(pool.place(&wants_ssd), Ok("ssd".into()));
    let pinned = Demand { pinned_host: Some("plain".into()), ..demand(1, 1) };
    assert_eq!(pool.place(&pinned), Ok("plain".into()));
    wants_ssd.cpus = 64;
    let err = pool.place(&wants_ssd).unwrap_err();
    assert!(err.message.contains("not matching hostSelector"), "{}", err.message);
}

#[test]
fn an_empty_pool_says_so() {
    let rules = rules(Ranking::Spread);
    let err = Pool::new(&rules, &[], &[]).place(&demand(1, 1)).unwrap_err();
    assert_eq!(err, Unschedulable { reason: "NoHostInPool", message: "pool idc-a has no hosts".into() });
}

#[test]
fn servers_on_hosts_outside_the_pool_are_ignored() {
    let rules = rules(Ranking::Spread);
    let hosts = [host("a", 2, 2)];
    let bound =
        [Bound { host: "gone".into(), cpus: 2, memory_mib: 2048, anti_affinity_group: None, high_availability: false }];
    assert_eq!(Pool::new(&rules, &hosts, &bound).place(&demand(2, 2)), Ok("a".into()));
}

#[test]
fn reserve_hosts_keeps_room_to_restart_ha_servers() {
    let mut rules = rules(Ranking::Pack);
    rules.reserve_hosts = 1;
    let hosts = [host("a", 4, 64), host("b", 4, 64)];
    let mut pool = Pool::new(&rules, &hosts, &[]);
    let ha = Demand { high_availability: true, ..demand(2, 1) };
    // Two HA servers of 2 CPUs: one host's worth must always stay free on the other.
    assert!(pool.place(&ha).is_ok());
    assert!(pool.place(&ha).is_ok());
    let err = pool.place(&ha).unwrap_err();
    assert_eq!(err.reason, "FailoverReserve");
    assert!(
        err.message.contains("unable to restart every highly-available server after losing its 1 largest host(s)"),
        "{}",
        err.message
    );
    // Without the reserve the third fits.
    rules.reserve_hosts = 0;
    let mut pool = Pool::new(&rules, &hosts, &[]);
    for _ in 0..3 {
        assert!(pool.place(&ha).is_ok());
    }
}

#[test]
fn failover_may_use_the_reserve() {
    let mut rules = rules(Ranking::Pack);
    rules.reserve_hosts = 1;
    let hosts = [host("a", 4, 64), host("b", 4, 64)];
    let bound = [
        Bound { host: "a".into(), cpus: 4, memory_mib: 1024, anti_affinity_group: None, high_availability: true },
        Bound { host: "b".into(), cpus: 2, memory_mib: 1024, anti_affinity_group: None, high_availability: true },
    ];
    let mut pool = Pool::new(&rules, &hosts, &bound);
    let restart = Demand { high_availability: true, failover: true, ..demand(2, 1) };
    assert_eq!(pool.place(&restart), Ok("b".into()));
}
