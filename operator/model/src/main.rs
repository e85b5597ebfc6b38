//! covi-model: checks covi's protocols to a bound given on the command line and prints
//! what it found, the number of states and the time taken.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use covi_model::leaders::{self, Election};
use covi_model::{Protocol, Races, SAFETY_PROPERTIES, SETTLES, Trace, first_violation, trace};
use stateright::{Checker, Model};

/// Checks covi's protocols exhaustively to a bound (docs/model.md).
#[derive(Parser)]
#[command(name = "covi-model", version)]
struct Cli {
    #[command(subcommand)]
    model: Which,
}

#[derive(Subcommand)]
enum Which {
    /// Failover of one highly-available server: at most one running copy, no disk
    /// deleted and no finalizer released while its domain runs, in every reachable
    /// state; with --liveness, every state settles once faults stop.
    Failover(FailoverArgs),
    /// Two operator replicas and the leader Lease: at most one acts at a time, and no
    /// address is given to two servers.
    Election(ElectionArgs),
}

#[derive(Args)]
struct FailoverArgs {
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
    /// The user may put a host in maintenance, which moves the server off it: live (a
    /// QEMU pool) or cold (a test-driver pool).
    #[arg(long, value_parser = ["live", "cold"])]
    migration: Option<String>,
    /// Also check that every reachable state settles once faults stop (slower).
    #[arg(long)]
    liveness: bool,
    /// Put back a race that covi fixed (repeatable).
    #[arg(long = "race", value_parser = failover_races())]
    races: Vec<String>,
}

#[derive(Args)]
struct ElectionArgs {
    /// Faults in one run (a replica crashes, is cut off, heals).
    #[arg(long, default_value_t = 3)]
    faults: u8,
    /// Both replicas run under one identity.
    #[arg(long)]
    one_identity: bool,
    /// Put back a mistake covi avoids (repeatable).
    #[arg(long = "race", value_parser = election_races())]
    races: Vec<String>,
}

fn failover_races() -> Vec<&'static str> {
    Races::each().into_iter().chain(Races::each_of_a_move()).map(|(name, _)| name).collect()
}

fn election_races() -> Vec<&'static str> {
    leaders::Races::each().into_iter().map(|(name, _)| name).collect()
}

fn main() -> ExitCode {
    match Cli::parse().model {
        Which::Failover(args) => failover(args),
        Which::Election(args) => election(args),
    }
}

/// Runs the checker on `model` with every core and reports each of `properties`;
/// `explain` adds to a counterexample.
fn report<M>(
    model: M,
    what: String,
    properties: &[&'static str],
    trace: Trace<M>,
    explain: impl Fn(&str, &M::State) -> String,
) -> ExitCode
where
    M: Model + Clone + Send + Sync + 'static,
    M::State: Clone + std::fmt::Debug + std::hash::Hash + PartialEq + Send + Sync + 'static,
    M::Action: Clone + std::fmt::Debug + PartialEq + Send + Sync + 'static,
{
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let checker = model.clone().checker().threads(threads).spawn_bfs().join();
    println!("{what}: {} states in {:.1}s", checker.unique_state_count(), started.elapsed().as_secs_f64());
    let mut failed = false;
    for property in properties {
        match checker.discovery(property) {
            Some(path) => {
                failed = true;
                let path = first_violation(&model, property, path.into_vec());
                let last = path.last().map(|(s, _)| explain(property, s)).unwrap_or_default();
                println!("COUNTEREXAMPLE to \"{property}\":\n{}{last}", trace(&path));
            }
            None => println!("holds: {property}"),
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn failover(args: FailoverArgs) -> ExitCode {
    let mut races = Races::default();
    for (name, r) in Races::each().into_iter().chain(Races::each_of_a_move()) {
        if args.races.iter().any(|a| a == name) {
            races = races.with(r);
        }
    }
    let mut protocol = Protocol::new(args.hosts, args.disk_leases, races, args.faults);
    if args.deletion {
        protocol = protocol.with_deletion();
    }
    if args.hangs {
        protocol = protocol.with_hangs();
    }
    if let Some(mode) = &args.migration {
        protocol = protocol.with_migration(mode == "live");
    }
    if args.liveness {
        protocol = protocol.with_liveness();
    }
    let mut properties: Vec<&'static str> = SAFETY_PROPERTIES.to_vec();
    if args.liveness {
        properties.push(SETTLES);
    }
    let what = format!(
        "failover: hosts {}, faults {}, disk leases {}, deletion {}, hangs {}, migration {}, liveness {}, races {:?}",
        args.hosts,
        args.faults,
        args.disk_leases,
        args.deletion,
        args.hangs,
        args.migration.as_deref().unwrap_or("none"),
        args.liveness,
        args.races
    );
    let settle = protocol.clone();
    report(protocol, what, &properties, trace, move |property, last| match property {
        SETTLES => format!("and from there, with faults stopped, a fair run:\n{}", trace(&settle.settle(last).0)),
        _ => String::new(),
    })
}

fn election(args: ElectionArgs) -> ExitCode {
    let mut races = leaders::Races::default();
    for (name, r) in leaders::Races::each() {
        if args.races.iter().any(|a| a == name) {
            races = leaders::Races {
                standby_cache_kept: races.standby_cache_kept || r.standby_cache_kept,
                holder_by_identity: races.holder_by_identity || r.holder_by_identity,
            };
        }
    }
    let what = format!("election: faults {}, one identity {}, races {:?}", args.faults, args.one_identity, args.races);
    let election = Election::new(races, args.one_identity, args.faults);
    report(election, what, &[leaders::ADDRESSES, leaders::ONE_LEADER], leaders::trace, |_, _| String::new())
}
