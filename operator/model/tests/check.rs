//! The protocol checked exhaustively within a bound that finishes in CI; a larger
//! bound runs by hand (`hack/model-check.sh`).

use covi_model::{Protocol, Races, trace};
use stateright::{Checker, Model};

const SAFETY: &str = "at most one running copy";

/// Checks `protocol` to the end and returns the counterexample to safety, if any,
/// as a readable trace.
fn check(protocol: Protocol) -> (Option<String>, usize) {
    let checker = protocol.checker().threads(2).spawn_bfs().join();
    let count = checker.unique_state_count();
    let found = checker.discovery(SAFETY).map(|path| trace(&path.into_vec()));
    (found, count)
}

#[test]
fn without_disk_leases_the_fixed_protocol_never_runs_two_copies() {
    let (found, count) = check(Protocol::new(2, false, Races::default(), 2));
    assert!(found.is_none(), "two copies after {count} states:\n{}", found.unwrap_or_default());
    println!("{count} states");
}

#[test]
fn failover_happens_in_the_model() {
    let checker = Protocol::new(2, false, Races::default(), 1).checker().spawn_bfs().join();
    assert!(checker.discovery("the server fails over and runs elsewhere").is_some(), "the model can fail over");
}

#[test]
fn each_race_of_never_two_copies_is_found_without_disk_leases() {
    for (name, races) in Races::each() {
        let (found, count) = check(Protocol::new(2, false, races, 2));
        let trace = found.unwrap_or_else(|| panic!("{name}: no counterexample in {count} states"));
        println!("{name}:\n{trace}");
    }
}

#[test]
fn disk_leases_hold_even_with_every_race_back() {
    let all = Races::each().into_iter().fold(Races::default(), |all, (_, r)| all.with(r));
    let (found, count) = check(Protocol::new(2, true, all, 2));
    assert!(found.is_none(), "two copies after {count} states:\n{}", found.unwrap_or_default());
}
