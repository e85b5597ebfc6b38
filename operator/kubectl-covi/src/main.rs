//! `kubectl covi`: covi's kubectl plugin — approve, deny, list and describe VmRequests;
//! see what servers and hosts use (`top`); list the inventory.
//!
//! Flags follow kubectl: `-n/--namespace`, `-A/--all-namespaces`, `-o/--output`,
//! `--as` and `--as-group` (which kubectl leaves to plugins), each as `--flag value` or
//! `--flag=value`; `--help` on every command.

mod console;
mod inventory;
mod requests;
mod table;
mod top;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kube::api::{Api, ListParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use table::Output;

#[derive(Parser, Debug)]
#[command(
    name = "kubectl covi",
    bin_name = "kubectl covi",
    version,
    about = "covi's kubectl plugin: requests and approvals, usage, inventory",
    after_help = "Every command takes the flags above; see `kubectl covi COMMAND --help`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: Global,
}

#[derive(Args, Debug)]
struct Global {
    /// The namespace to use (default: your kubeconfig's).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// List across every namespace you may list (the default where a command lists).
    #[arg(short = 'A', long, global = true)]
    all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Act as this user (impersonation, as kubectl --as).
    #[arg(long = "as", global = true, value_name = "USER")]
    as_user: Option<String>,
    /// Act as a member of this group (repeatable, as kubectl --as-group).
    #[arg(long = "as-group", global = true, value_name = "GROUP")]
    as_group: Vec<String>,
    /// The namespace covi is installed in (where it keeps history).
    #[arg(long, global = true, value_name = "NAMESPACE", default_value = "covi-system", env = "COVI_NAMESPACE")]
    covi_namespace: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Approve a VmRequest (you may not approve your own).
    Approve {
        /// The request.
        name: String,
        /// Why, for the record.
        #[arg(short = 'm', long, default_value = "approved")]
        message: String,
        /// Approve only if the request is still at this generation (as `pending` showed).
        #[arg(long)]
        generation: Option<i64>,
    },
    /// Deny a VmRequest, saying why.
    Deny {
        /// The request.
        name: String,
        /// Why: the requester reads it.
        #[arg(short = 'm', long)]
        message: String,
        /// Deny only if the request is still at this generation.
        #[arg(long)]
        generation: Option<i64>,
    },
    /// VmRequests waiting for approval (every namespace you may list, or -n).
    Pending,
    /// One VmRequest: its spec, conditions, servers and Events.
    Describe {
        /// The request.
        name: String,
    },
    /// What servers or hosts use beside what they are allocated, as measured by covi's
    /// agents over the last completed interval (an hour).
    Top {
        /// servers (the default) or hosts.
        #[arg(value_enum, default_value_t = top::What::Servers)]
        what: top::What,
    },
    /// Every server with its owner, purpose, place, size, dates, request and approver,
    /// and every host; with --history also servers deleted since, from covi's history.
    Inventory {
        /// Also list deleted servers from covi's history (who, what, where, from when
        /// to when, how it ended).
        #[arg(long)]
        history: bool,
        /// Servers only, or hosts only.
        #[arg(long, value_enum)]
        only: Option<inventory::Only>,
    },
    /// Attach this terminal to a server's serial console; Ctrl-] ends the session.
    /// Needs RBAC `get` on `virtualservers/console` in API group subresources.covi.io.
    Console {
        /// The server.
        name: String,
        /// Take the console over from another session.
        #[arg(long)]
        force: bool,
    },
}

/// Where a listing looks: one namespace (`-n`), or every namespace the user may list,
/// falling back to the current namespace when they may not list cluster-wide.
pub struct Scope {
    pub namespace: String,
    pub explicit: bool,
    /// covi's own namespace.
    pub covi_namespace: String,
}

impl Scope {
    pub async fn list<K>(&self, client: &Client, what: &str) -> Result<Vec<K>, String>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let lp = ListParams::default();
        let list = if self.explicit {
            Api::<K>::namespaced(client.clone(), &self.namespace).list(&lp).await
        } else {
            match Api::<K>::all(client.clone()).list(&lp).await {
                Err(kube::Error::Api(s)) if s.code == 403 => {
                    eprintln!("(you may not list {what} cluster-wide; showing namespace {})", self.namespace);
                    Api::<K>::namespaced(client.clone(), &self.namespace).list(&lp).await
                }
                other => other,
            }
        };
        list.map(|l| l.items).map_err(|e| format!("listing {what}: {}", api_message(e)))
    }
}

pub fn api_message(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message,
        other => other.to_string(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and succeed; mistakes print usage and fail.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match run(cli).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<String, String> {
    let g = cli.global;
    let mut config = kube::Config::infer().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    if g.as_user.is_some() {
        config.auth_info.impersonate = g.as_user.clone();
        config.auth_info.impersonate_groups = Some(g.as_group.clone()).filter(|g| !g.is_empty());
    } else if !g.as_group.is_empty() {
        return Err("--as-group needs --as USER, as in kubectl".into());
    }
    let namespace = g.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| e.to_string())?;
    let scope = Scope {
        namespace: namespace.clone(),
        explicit: g.namespace.is_some() && !g.all_namespaces,
        covi_namespace: g.covi_namespace.clone(),
    };
    use covi_api::contract::condition_type::{APPROVED, DENIED};
    match cli.command {
        Command::Approve { name, message, generation } => {
            requests::decide(&client, &namespace, &name, APPROVED, &message, generation).await
        }
        Command::Deny { name, message, generation } => {
            requests::decide(&client, &namespace, &name, DENIED, &message, generation).await
        }
        Command::Pending => requests::pending(&client, &scope, g.output).await,
        Command::Describe { name } => requests::describe(&client, &namespace, &name).await,
        Command::Top { what } => top::top(&client, &scope, what, g.output).await,
        Command::Inventory { history, only } => inventory::inventory(&client, &scope, history, only, g.output).await,
        Command::Console { name, force } => console::attach(&client, &namespace, &name, force).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kubectl-covi").chain(args.iter().copied()))
    }

    #[test]
    fn flags_read_as_kubectl_reads_them() {
        let cli = parse(&["approve", "web", "-m", "ok", "-n", "shop"]).unwrap();
        assert!(matches!(&cli.command, Command::Approve { name, message, .. } if name == "web" && message == "ok"));
        assert_eq!(cli.global.namespace.as_deref(), Some("shop"));
        // --flag=value and --flag value alike, global flags before or after the command.
        let cli = parse(&["--as=bob", "approve", "web", "--generation=4", "--namespace=shop", "-m", "a=b"]).unwrap();
        assert!(matches!(&cli.command, Command::Approve { generation: Some(4), message, .. } if message == "a=b"));
        assert_eq!(cli.global.as_user.as_deref(), Some("bob"));
        let cli = parse(&["inventory", "-o", "csv", "--as", "bob", "--as-group=g1", "--as-group", "g2"]).unwrap();
        assert_eq!(cli.global.output, Output::Csv);
        assert_eq!(cli.global.as_group, ["g1", "g2"]);
        assert!(parse(&["pending", "-A"]).unwrap().global.all_namespaces);
        assert!(matches!(parse(&["top", "hosts"]).unwrap().command, Command::Top { what: top::What::Hosts }));
        assert!(matches!(parse(&["top"]).unwrap().command, Command::Top { what: top::What::Servers }));
    }

    #[test]
    fn mistakes_are_explained() {
        let err = |args: &[&str]| parse(args).unwrap_err().to_string();
        assert!(err(&["deny", "a"]).contains("--message"), "deny needs a reason");
        assert!(err(&["deny", "a", "b", "-m", "x"]).contains("unexpected argument 'b'"));
        assert!(err(&["approve", "web", "--generation", "four"]).contains("invalid value 'four'"));
        assert!(err(&["pending", "-o", "yaml"]).contains("possible values: table, csv, json"));
        assert!(err(&["bogus"]).contains("unrecognized subcommand 'bogus'"));
        // --help is an answer, not an error.
        for args in [&["--help"][..], &["top", "--help"], &["inventory", "-h"], &["approve", "--help"]] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{args:?}");
            assert!(e.to_string().contains("Usage: kubectl covi"), "{e}");
        }
    }
}
