//! Two operator replicas, one leader Lease, and the addresses the leader gives: checked
//! exhaustively within a bound that finishes in CI.

use covi_model::leaders::{ADDRESSES, Election, HANDED_OVER, ONE_LEADER, Races, trace};
use stateright::{Checker, Model};

fn check(election: Election, properties: &[&'static str]) -> (Vec<String>, usize) {
    covi_model::check(election, properties, trace)
}

#[test]
fn one_leader_at_a_time_and_no_address_given_twice() {
    for one_identity in [false, true] {
        let (found, count) = check(Election::new(Races::default(), one_identity, 2), &[ADDRESSES, ONE_LEADER]);
        assert!(found.is_empty(), "one identity {one_identity}, after {count} states:\n{}", found.join("\n"));
        println!("one identity {one_identity}: {count} states");
    }
}

#[test]
fn leadership_changes_hands_in_the_model() {
    let checker = Election::new(Races::default(), false, 1).checker().spawn_bfs().join();
    assert!(checker.discovery(HANDED_OVER).is_some(), "the standby can take over and bind");
}

#[test]
fn each_mistake_of_a_leader_election_is_found() {
    for (name, races, property) in [
        ("standby_cache_kept", Races { standby_cache_kept: true, ..Races::default() }, ADDRESSES),
        ("holder_by_identity", Races { holder_by_identity: true, ..Races::default() }, ONE_LEADER),
    ] {
        let (found, count) = check(Election::new(races, true, 2), &[property]);
        let trace = found.first().unwrap_or_else(|| panic!("{name}: no counterexample in {count} states"));
        println!("{name}:\n{trace}");
    }
}
