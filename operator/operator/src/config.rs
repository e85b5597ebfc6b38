//! The operator's settings, from flags with environment fallbacks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use covi_daemon::flags::Flags;

use crate::error::{Error, Result};

pub const USAGE: &str = "usage: covi-operator [options]

  --kubeconfig PATH        kubeconfig to use; default: KUBECONFIG, then in-cluster
  --namespace NS           namespace of the leader Lease (env COVI_NAMESPACE, default covi-system)
  --identity ID            this replica's name in the leader Lease (env POD_NAME, else the host name)
  --leader-lease-seconds N a standby takes over this long after the leader stops renewing (default 15);
                           a leader stopped by SIGTERM gives the Lease up, and the next takes it at once
  --resync-seconds N       full scheduling pass at least this often (default 10)
  --metrics-addr ADDR      serve /metrics and /healthz here (default 0.0.0.0:9465; port 0 picks one)
  --console-addr ADDR      serve servers' serial consoles here, behind the API server as the aggregated
                           API subresources.covi.io (default: no console)
  --console-service NAME   the Service the console's APIService points at, in --namespace
                           (default covi-console)";

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub identity: String,
    pub leader_lease: Duration,
    pub resync: Duration,
    pub metrics_addr: SocketAddr,
    pub console: Option<crate::console::ConsoleConfig>,
}

impl Config {
    pub fn parse(args: impl IntoIterator<Item = String>, env: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut kubeconfig = None;
        let mut namespace = env("COVI_NAMESPACE").unwrap_or_else(|| "covi-system".into());
        let mut identity = env("POD_NAME").or_else(|| env("HOSTNAME")).unwrap_or_else(|| "covi-operator".into());
        let mut leader_lease = Duration::from_secs(15);
        let mut resync = Duration::from_secs(10);
        let mut metrics_addr: SocketAddr = "0.0.0.0:9465".parse().expect("valid default");
        let mut console_addr = None;
        let mut console_service = "covi-console".to_string();
        let mut flags = Flags::new(args, USAGE);
        while let Some(flag) = flags.next_flag().map_err(Error::Config)? {
            match flag.name.as_str() {
                "--kubeconfig" => kubeconfig = Some(PathBuf::from(flags.value(&flag).map_err(Error::Config)?)),
                "--namespace" => namespace = flags.value(&flag).map_err(Error::Config)?,
                "--identity" => identity = flags.value(&flag).map_err(Error::Config)?,
                "--leader-lease-seconds" => leader_lease = flags.seconds(&flag).map_err(Error::Config)?,
                "--resync-seconds" => resync = flags.seconds(&flag).map_err(Error::Config)?,
                "--metrics-addr" => metrics_addr = flags.address(&flag).map_err(Error::Config)?,
                "--console-addr" => console_addr = Some(flags.address(&flag).map_err(Error::Config)?),
                "--console-service" => console_service = flags.value(&flag).map_err(Error::Config)?,
                _ => return Err(Error::Config(flags.unknown(&flag))),
            }
        }
        let console = console_addr.map(|addr| crate::console::ConsoleConfig { addr, service: console_service });
        Ok(Config { kubeconfig, namespace, identity, leader_lease, resync, metrics_addr, console })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_flags() {
        let c = Config::parse(vec![], |k| (k == "POD_NAME").then(|| "op-0".to_string())).unwrap();
        assert_eq!((c.identity.as_str(), c.namespace.as_str()), ("op-0", "covi-system"));
        let c = Config::parse(["--leader-lease-seconds=5".to_string()], |_| None).unwrap();
        assert_eq!(c.leader_lease, Duration::from_secs(5));
        assert_eq!(c.console, None, "no console unless asked");
        let c = Config::parse(["--console-addr=0.0.0.0:8443".to_string()], |_| None).unwrap();
        assert_eq!(c.console.unwrap().service, "covi-console");
        let e = Config::parse(["--resync-seconds".to_string(), "x".to_string()], |_| None).unwrap_err();
        assert!(e.to_string().contains("--resync-seconds \"x\" is not a positive number"));
    }
}
