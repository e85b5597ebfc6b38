//! covi-model: checks the failover protocol to a bound given on the command line and
//! prints what it found, the number of states and the time taken.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use covi_model::{Protocol, Races, SAFETY_PROPERTIES, SETTLES, trace};
use stateright::{Checker, Model};

/// Checks covi's failover protocol exhaustively to a bound: at most one running copy
/// of the server, no disk deleted and no finalizer released while its domain runs, in
/// every reachable state; with --liveness, also that every state settles once faults
/// stop.
#[derive(Parser)]
#[command(name = "covi-model", version)]
struct Args {
    /// Hosts in the pool.
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Faults in one run (agent crash or restart, power loss or return, partition or
    /// heal, libvirt hanging or answering).
    #[arg(long, default_value_t = 3)]
    faults: u8,
    /// libvirt's lock manager guards the disk.
    #[arg(long)]
    disk_leases: bool,
    /// The user may delete the server at any point.
    #[arg(long)]
    deletion: bool,
    /// libvirt may stop answering on a host (a fault).
    #[arg(long)]
    hangs: bool,
    /// Also check that every reachable state settles once faults stop (slower).
    #[arg(long)]
    liveness: bool,
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
    let mut protocol = Protocol::new(args.hosts, args.disk_leases, races, args.faults);
    if args.deletion {
        protocol = protocol.with_deletion();
    }
    if args.hangs {
        protocol = protocol.with_hangs();
    }
    if args.liveness {
        protocol = protocol.with_liveness();
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let checker = protocol.clone().checker().threads(threads).spawn_bfs().join();
    println!(
        "hosts {}, faults {}, disk leases {}, deletion {}, hangs {}, liveness {}, races {:?}: {} states in {:.1}s",
        args.hosts,
        args.faults,
        args.disk_leases,
        args.deletion,
        args.hangs,
        args.liveness,
        args.races,
        checker.unique_state_count(),
        started.elapsed().as_secs_f64()
    );
    let mut failed = false;
    let mut checked: Vec<&str> = SAFETY_PROPERTIES.to_vec();
    if args.liveness {
        checked.push(SETTLES);
    }
    for property in checked {
        match checker.discovery(property) {
            Some(path) => {
                failed = true;
                let path = path.into_vec();
                println!("COUNTEREXAMPLE to \"{property}\":\n{}", trace(&path));
                if property == SETTLES
                    && let Some((last, _)) = path.last()
                {
                    println!("and from there, with faults stopped, a fair run:\n{}", trace(&protocol.settle(last).0));
                }
            }
            None => println!("holds: {property}"),
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
