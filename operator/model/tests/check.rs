//! The protocol checked exhaustively within bounds that finish in CI; larger bounds
//! run by hand (`hack/model-check.sh`).

use covi_model::{
    DELETED, FAILS_OVER, MIGRATES, Protocol, Races, SAFETY, SAFETY_PROPERTIES, SETTLES, first_violation, trace,
};
use stateright::{Checker, Model};

/// Checks `protocol` to the end; returns each of `properties` that fails, with its
/// counterexample as a readable trace, and the number of states.
fn check(protocol: Protocol, properties: &[&'static str]) -> (Vec<String>, usize) {
    covi_model::check(protocol, properties, trace)
}

fn holds(protocol: Protocol, properties: &[&'static str]) -> usize {
    let (found, count) = check(protocol, properties);
    assert!(found.is_empty(), "after {count} states:\n{}", found.join("\n"));
    println!("{count} states");
    count
}

#[test]
fn without_disk_leases_the_fixed_protocol_keeps_every_safety_property() {
    holds(Protocol::new(2, false, Races::default(), 2), &SAFETY_PROPERTIES);
}

#[test]
fn a_deletion_at_any_point_leaves_no_domain_running_and_no_disk_in_use_deleted() {
    holds(Protocol::new(2, false, Races::default(), 1).with_deletion(), &SAFETY_PROPERTIES);
}

#[test]
fn failover_and_deletion_happen_in_the_model() {
    let checker = Protocol::new(2, false, Races::default(), 1).with_deletion().checker().spawn_bfs().join();
    assert!(checker.discovery(FAILS_OVER).is_some(), "the model can fail over");
    assert!(checker.discovery(DELETED).is_some(), "the model can delete the server");
}

#[test]
fn each_race_of_never_two_copies_is_found_without_disk_leases() {
    for (name, races) in Races::each() {
        let (found, count) = check(Protocol::new(2, false, races, 2), &[SAFETY]);
        let trace = found.first().unwrap_or_else(|| panic!("{name}: no counterexample in {count} states"));
        println!("{name}:\n{trace}");
    }
}

#[test]
fn disk_leases_hold_even_with_every_race_back() {
    let all = Races::each().into_iter().fold(Races::default(), |all, (_, r)| all.with(r));
    holds(Protocol::new(2, true, all, 2), &[SAFETY]);
}

#[test]
fn with_disk_leases_a_libvirt_that_hangs_never_runs_two_copies() {
    holds(Protocol::new(2, true, Races::default(), 2).with_hangs(), &SAFETY_PROPERTIES);
}

/// The assumption fencing rests on, made visible: without disk leases, a libvirt that
/// does not answer the watchdog's destroy lets the guest outlive the host's deadline
/// while the operator restarts it elsewhere (docs/model.md).
#[test]
fn without_disk_leases_a_libvirt_that_hangs_is_the_hole_left() {
    let (found, count) = check(Protocol::new(2, false, Races::default(), 1).with_hangs(), &[SAFETY]);
    let trace = found.first().unwrap_or_else(|| panic!("no counterexample in {count} states"));
    assert!(trace.contains("stops answering"), "{trace}");
    println!("{trace}");
}

#[test]
fn once_faults_stop_every_state_settles() {
    holds(Protocol::new(2, false, Races::default(), 1).with_liveness(), &[SETTLES]);
}

/// A host put in maintenance at any point moves the server off it, live (QEMU) or cold
/// (the test driver), while renewals, caches and steps interleave in every order
/// (without crash, power or partition faults: with one, the bound outgrows CI).
#[test]
fn a_move_at_any_point_keeps_every_safety_property() {
    for live in [true, false] {
        let protocol = Protocol::new(2, false, Races::default(), 0).with_migration(live);
        let checker = protocol.checker().threads(2).spawn_bfs().join();
        let count = checker.unique_state_count();
        for p in SAFETY_PROPERTIES {
            if let Some(path) = checker.discovery(p) {
                let path = first_violation(checker.model(), p, path.into_vec());
                panic!("live {live}, {p}, after {count} states:\n{}", trace(&path));
            }
        }
        assert!(checker.discovery(MIGRATES).is_some(), "live {live}: a move succeeds in the model");
        println!("live {live}: {count} states");
    }
}

/// A live hand-off to a target that is not Ready, sent back to its source though the
/// guest already runs on the target (a race of a move covi fixed), runs two copies.
#[test]
fn a_live_move_sent_back_is_found() {
    let races = Races { live_sent_back: true, ..Races::default() };
    let (found, count) = check(Protocol::new(2, false, races, 0).with_migration(true), &[SAFETY]);
    let trace = found.first().unwrap_or_else(|| panic!("no counterexample in {count} states"));
    println!("{trace}");
}

/// Once faults stop, every live move ends (Succeeded or Failed), the server runs and no
/// host stays fenced, from every state the interleavings reach.
#[test]
fn once_faults_stop_every_move_ends() {
    holds(Protocol::new(2, false, Races::default(), 0).with_migration(true).with_liveness(), &[SETTLES]);
}
