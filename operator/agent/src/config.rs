//! The agent's settings, from flags with environment fallbacks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use covi_daemon::flags::Flags;

use crate::error::{Error, Result};

pub const USAGE: &str = "usage: covi-agent --node-name NAME [options]

  --node-name NAME        this host's Kubernetes node name; names the Host and its Lease
                          (env COVI_NODE_NAME, else NODE_NAME)
  --libvirt-uri URI       xen:///system (default), qemu:///system, test:///path/node.xml
                          (env COVI_LIBVIRT_URI)
  --kubeconfig PATH       kubeconfig to use; default: KUBECONFIG, then in-cluster
  --namespace NS          namespace of the host Leases (env COVI_NAMESPACE, default covi-system)
  --label KEY=VALUE       label for the Host, repeatable (env COVI_HOST_LABELS=k=v,k=v);
                          a HostPool's nodeSelector matches these
  --address ADDR          address other hosts reach this one at (env COVI_HOST_ADDRESS)
  --resync-seconds N      full comparison of domains with servers every N seconds (default 10)
  --metrics-addr ADDR     serve /metrics, /healthz and /readyz here (default 127.0.0.1:9464;
                          port 0 picks one); never an address guests can reach
  --domains-endpoint      test beds only: also serve /domains, the covi domains libvirt has
                          here with their servers' names, unauthenticated (default off)
  --work-dir PATH         scratch space for seed ISOs (default /var/lib/covi-agent)
  --stop-grace-seconds N  a guest asked to shut down is forced off after N seconds (default 30)
  --restart-grace-seconds N
                          on SIGTERM (a rolling update, a restart), the last renewal asks
                          the operator to wait N seconds more before it declares the host
                          lost; the next agent must be back within that, or it fences the
                          host when it starts (default 120)
  --peer-uri TEMPLATE     libvirt URI of another host for live migration; {address} is that
                          Host's address (env COVI_PEER_URI; default from --libvirt-uri,
                          e.g. xen+tls://{address}/system)
  --fleet DIR             benchmarks and scale tests: run one simulated host per libvirt
                          test-driver inventory DIR/NAME.xml (host NAME), each with its
                          own Host, Lease, connection and endpoint, in this one process
                          (--node-name and --libvirt-uri are then not used)
  --usage-sample-seconds N
                          collect every guest's and the host's statistics every N seconds,
                          in one bulk libvirt call (default 10)
  --usage-interval-seconds N
                          summarize usage (mean, p95, the daily profile) over intervals of
                          N seconds and write it to each server's and the Host's status once
                          per interval (default 3600: one hour; shorter only in test beds,
                          where an hour of the profile is then N seconds)
  --console-addr ADDR     serve the guests' serial consoles to covi-operator here, mutual TLS with
                          certificates of covi's console CA (Secret covi-console-agent in
                          --namespace); reported in the Host's status as host:port, with
                          --address as the host when ADDR is 0.0.0.0 (default: no console)
  --unsafe-migration      labs only: live-migrate even where libvirt cannot tell that the
                          disks are on shared storage (VIR_MIGRATE_UNSAFE), e.g. two
                          libvirt daemons on one machine sharing a local folder";

/// Everything the agent needs to know to start.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub node_name: String,
    pub libvirt_uri: String,
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub address: Option<String>,
    pub resync: Duration,
    pub metrics_addr: SocketAddr,
    pub work_dir: PathBuf,
    pub stop_grace: Duration,
    /// How long a gracefully stopped agent asks the operator to wait for its successor.
    pub restart_grace: Duration,
    pub peer_uri: String,
    pub unsafe_migration: bool,
    /// Whether the endpoint also serves `/domains` (test beds).
    pub domains_endpoint: bool,
    /// Fleet mode: a folder of test-driver inventories, one simulated host each.
    pub fleet: Option<PathBuf>,
    /// How often usage is sampled.
    pub usage_sample: Duration,
    /// The interval usage is summarized and written over (an hour).
    pub usage_interval: Duration,
    /// Where consoles are served, if they are.
    pub console_addr: Option<SocketAddr>,
}

/// The live-migration peer URI template that matches a local libvirt URI: the same
/// driver and path over TLS, e.g. `xen:///system` → `xen+tls://{address}/system`.
pub fn default_peer_uri(libvirt_uri: &str) -> String {
    let (scheme, rest) = libvirt_uri.split_once("://").unwrap_or((libvirt_uri, ""));
    let driver = scheme.split('+').next().unwrap_or(scheme);
    let path = rest.split_once('/').map(|(_, p)| p).unwrap_or("system");
    let path = path.split('?').next().unwrap_or(path);
    format!("{driver}+tls://{{address}}/{path}")
}

fn parse_label(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(Error::Config(format!("label {s:?} is not KEY=VALUE"))),
    }
}

impl Config {
    /// Reads flags (without the program name) and, for what they leave open, `env`.
    pub fn parse(args: impl IntoIterator<Item = String>, env: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut node_name = env("COVI_NODE_NAME").or_else(|| env("NODE_NAME"));
        let mut libvirt_uri = env("COVI_LIBVIRT_URI").unwrap_or_else(|| "xen:///system".into());
        let mut kubeconfig = None;
        let mut namespace = env("COVI_NAMESPACE").unwrap_or_else(|| "covi-system".into());
        let mut labels = BTreeMap::new();
        if let Some(list) = env("COVI_HOST_LABELS") {
            for item in list.split(',').filter(|s| !s.is_empty()) {
                let (k, v) = parse_label(item)?;
                labels.insert(k, v);
            }
        }
        let mut address = env("COVI_HOST_ADDRESS");
        let mut resync = Duration::from_secs(10);
        let mut metrics_addr: SocketAddr = "127.0.0.1:9464".parse().expect("valid default");
        let mut work_dir = PathBuf::from("/var/lib/covi-agent");
        let mut stop_grace = Duration::from_secs(30);
        let mut restart_grace = Duration::from_secs(120);
        let mut peer_uri = env("COVI_PEER_URI");
        let mut unsafe_migration = false;
        let mut domains_endpoint = false;
        let mut fleet = None;
        let mut usage_sample = Duration::from_secs(10);
        let mut usage_interval = Duration::from_secs(3600);
        let mut console_addr = None;

        let mut flags = Flags::new(args, USAGE);
        while let Some(flag) = flags.next_flag().map_err(Error::Config)? {
            match flag.name.as_str() {
                "--node-name" => node_name = Some(flags.value(&flag).map_err(Error::Config)?),
                "--libvirt-uri" => libvirt_uri = flags.value(&flag).map_err(Error::Config)?,
                "--kubeconfig" => kubeconfig = Some(PathBuf::from(flags.value(&flag).map_err(Error::Config)?)),
                "--namespace" => namespace = flags.value(&flag).map_err(Error::Config)?,
                "--label" => {
                    let (k, v) = parse_label(&flags.value(&flag).map_err(Error::Config)?)?;
                    labels.insert(k, v);
                }
                "--address" => address = Some(flags.value(&flag).map_err(Error::Config)?),
                "--resync-seconds" => resync = flags.seconds(&flag).map_err(Error::Config)?,
                "--stop-grace-seconds" => stop_grace = flags.seconds(&flag).map_err(Error::Config)?,
                "--restart-grace-seconds" => restart_grace = flags.seconds(&flag).map_err(Error::Config)?,
                "--metrics-addr" => metrics_addr = flags.address(&flag).map_err(Error::Config)?,
                "--work-dir" => work_dir = PathBuf::from(flags.value(&flag).map_err(Error::Config)?),
                "--peer-uri" => peer_uri = Some(flags.value(&flag).map_err(Error::Config)?),
                "--unsafe-migration" => unsafe_migration = true,
                "--domains-endpoint" => domains_endpoint = true,
                "--usage-sample-seconds" => usage_sample = flags.seconds(&flag).map_err(Error::Config)?,
                "--usage-interval-seconds" => usage_interval = flags.seconds(&flag).map_err(Error::Config)?,
                "--console-addr" => console_addr = Some(flags.address(&flag).map_err(Error::Config)?),
                "--fleet" => fleet = Some(PathBuf::from(flags.value(&flag).map_err(Error::Config)?)),
                _ => return Err(Error::Config(flags.unknown(&flag))),
            }
        }
        // In fleet mode every host is named after its inventory file.
        let node_name = match (&fleet, node_name.filter(|n| !n.is_empty())) {
            (_, Some(n)) => n,
            (Some(_), None) => "fleet".to_string(),
            (None, None) => {
                return Err(Error::Config(format!("--node-name (or COVI_NODE_NAME) is required\n\n{USAGE}")));
            }
        };
        let peer_uri = peer_uri.unwrap_or_else(|| default_peer_uri(&libvirt_uri));
        if !peer_uri.contains("{address}") {
            return Err(Error::Config(format!("--peer-uri {peer_uri:?} must contain {{address}}")));
        }
        if usage_interval < usage_sample * 2 {
            return Err(Error::Config(format!(
                "--usage-interval-seconds {} must be at least twice --usage-sample-seconds {}: a rate needs two samples",
                usage_interval.as_secs(),
                usage_sample.as_secs()
            )));
        }
        if let Some(addr) = console_addr
            && addr.ip().is_unspecified()
            && address.is_none()
        {
            return Err(Error::Config(format!(
                "--console-addr {addr} listens on every address: give --address (the one the operator reaches) too"
            )));
        }
        Ok(Config {
            node_name,
            libvirt_uri,
            kubeconfig,
            namespace,
            labels,
            address,
            resync,
            metrics_addr,
            work_dir,
            stop_grace,
            restart_grace,
            peer_uri,
            unsafe_migration,
            domains_endpoint,
            fleet,
            usage_sample,
            usage_interval,
            console_addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_peer_uri_follows_the_local_driver() {
        assert_eq!(default_peer_uri("xen:///system"), "xen+tls://{address}/system");
        assert_eq!(default_peer_uri("qemu+unix:///system?socket=/run/x"), "qemu+tls://{address}/system");
        assert_eq!(default_peer_uri("qemu:///session"), "qemu+tls://{address}/session");
    }

    #[test]
    fn flags_override_environment() {
        let env = |k: &str| match k {
            "COVI_NODE_NAME" => Some("from-env".to_string()),
            "COVI_HOST_LABELS" => Some("covi.io/pool=a,rack=r1".to_string()),
            _ => None,
        };
        let c = Config::parse(
            args(&["--node-name", "host-1", "--libvirt-uri=test:///tmp/h.xml", "--label", "covi.io/pool=b"]),
            env,
        )
        .unwrap();
        assert_eq!(c.node_name, "host-1");
        assert_eq!(c.libvirt_uri, "test:///tmp/h.xml");
        assert_eq!(c.labels["covi.io/pool"], "b");
        assert_eq!(c.labels["rack"], "r1");
        assert_eq!(c.namespace, "covi-system");
        // Nothing listens where guests could reach it, nor lists tenants, unless asked.
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9464");
        assert!(!c.domains_endpoint);
    }

    #[test]
    fn defaults_to_xen() {
        let c = Config::parse(args(&["--node-name", "h"]), |_| None).unwrap();
        assert_eq!(c.libvirt_uri, "xen:///system");
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        let err = |a: &[&str]| Config::parse(args(a), |_| None).unwrap_err().to_string();
        assert!(err(&[]).contains("--node-name (or COVI_NODE_NAME) is required"));
        assert!(err(&["--node-name", "h", "--resync-seconds", "0"]).contains("not a positive number"));
        assert!(err(&["--node-name", "h", "--label", "novalue"]).contains("is not KEY=VALUE"));
        assert!(err(&["--node-name", "h", "--bogus"]).contains("unknown flag --bogus"));
        assert!(err(&["--node-name"]).contains("--node-name needs a value"));
        assert!(err(&["--node-name", "h", "--usage-interval-seconds=15"]).contains("at least twice"));
    }
}
