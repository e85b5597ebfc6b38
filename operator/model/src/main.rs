//! covi-model: checks the failover protocol to a bound given on the command line and
//! prints what it found, the number of states and the time taken.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use covi_model::{Protocol, Races, trace};
use stateright::{Checker, Model};

/// Checks covi's failover protocol exhaustively to a bound: at most one running copy
/// of the server in every reachable state.
#[derive(Parser)]
#[command(name = "covi-model", version)]
struct Args {
    /// Hosts in the pool.
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Faults in one run (agent crash or restart, power loss or return, partition or heal).
    #[arg(long, default_value_t = 3)]
    faults: u8,
    /// libvirt's lock manager guards the disk.
    #[arg(long)]
    disk_leases: bool,
    /// Put back a race that covi fixed (repeatable).
    #[arg(long = "race", value_parser = race_names())]
    races: Vec<String>,
}

fn race_names() -> Vec<&'static str> {
    Races::each().into_iter().map(|(name, _)| name).collect()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut races = Races::default();
    for (name, r) in Races::each() {
        if args.races.iter().any(|a| a == name) {
            races = races.with(r);
        }
    }
    let started = Instant::now();
    let protocol = Protocol::new(args.hosts, args.disk_leases, races, args.faults);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let checker = protocol.checker().threads(threads).spawn_bfs().join();
    println!(
        "hosts {}, faults {}, disk leases {}, races {:?}: {} states in {:.1}s",
        args.hosts,
        args.faults,
        args.disk_leases,
        args.races,
        checker.unique_state_count(),
        started.elapsed().as_secs_f64()
    );
    match checker.discovery("at most one running copy") {
        Some(path) => {
            println!("COUNTEREXAMPLE: two copies run\n{}", trace(&path.into_vec()));
            ExitCode::FAILURE
        }
        None => {
            println!("no reachable state runs two copies");
            ExitCode::SUCCESS
        }
    }
}
