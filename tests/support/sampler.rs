//! A sampler of every host's running domains, for tests that must show a server never
//! runs twice (failover, migration). It reads all hosts at once every 100 ms and reports
//! a server seen running on two hosts in two samples in a row: the reads of two hosts
//! are milliseconds apart, so a hand-over inside that gap shows up in one sample only,
//! while a double run that lasts longer than two periods (200 ms) is always caught.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fleet::get;

/// Samples every host's domain list and remembers any server seen active twice.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    doubles: Arc<Mutex<Vec<String>>>,
    samples: Arc<Mutex<u64>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Sampler {
    /// `hosts` maps a host name to its agent's log (where the endpoint address is).
    pub fn start(hosts: Arc<Mutex<BTreeMap<String, std::path::PathBuf>>>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let doubles = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(Mutex::new(0));
        let (s, d, n) = (stop.clone(), doubles.clone(), samples.clone());
        let task = tokio::spawn(async move {
            let mut previous: BTreeSet<String> = BTreeSet::new();
            while !s.load(Ordering::Relaxed) {
                let tick = Instant::now();
                let targets: Vec<(String, Option<String>)> = hosts
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(h, log)| (h.clone(), crate::fleet::endpoint_in_log(log)))
                    .collect();
                let reads = targets.into_iter().map(|(host, addr)| async move {
                    let body = match addr {
                        Some(a) => get(&a, "/domains", Duration::from_millis(90)).await,
                        None => None,
                    };
                    (host, body)
                });
                let mut running: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (host, body) in futures::future::join_all(reads).await {
                    let Some(body) = body else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(&body) else { continue };
                    for dom in v["domains"].as_array().cloned().unwrap_or_default() {
                        // Running, not merely active: the target of a live migration
                        // holds the guest paused until the source has stopped it.
                        if dom["running"] == json!(true) {
                            running
                                .entry(dom["server"].as_str().unwrap_or_default().to_string())
                                .or_default()
                                .push(host.clone());
                        }
                    }
                }
                previous = tally(&running, &previous, &d);
                *n.lock().unwrap() += 1;
                tokio::time::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed())).await;
            }
        });
        Sampler { stop, doubles, samples, task: Some(task) }
    }

    /// Samples libvirt daemons directly (`daemons` maps a host name to its libvirt
    /// URI), so that guests are seen whether or not their agent lives: the test of a
    /// killed agent whose guests run on. A server is a covi domain's name
    /// (`namespace.name`), running meaning executing, not paused.
    pub fn on_daemons(daemons: Vec<(String, String)>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let doubles = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(Mutex::new(0));
        let (s, d, n) = (stop.clone(), doubles.clone(), samples.clone());
        let task = tokio::task::spawn_blocking(move || {
            let conns: Vec<(String, virt::connect::Connect)> = daemons
                .into_iter()
                .map(|(host, uri)| {
                    let conn =
                        virt::connect::Connect::open(Some(&uri)).unwrap_or_else(|e| panic!("sampler: {uri}: {e}"));
                    (host, conn)
                })
                .collect();
            let mut previous: BTreeSet<String> = BTreeSet::new();
            while !s.load(Ordering::Relaxed) {
                let tick = Instant::now();
                let mut running: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (host, conn) in &conns {
                    let active = conn.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_RUNNING).unwrap_or_default();
                    for dom in active {
                        if let Ok(name) = dom.name() {
                            running.entry(name).or_default().push(host.clone());
                        }
                    }
                }
                previous = tally(&running, &previous, &d);
                *n.lock().unwrap() += 1;
                std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
            }
        });
        Sampler { stop, doubles, samples, task: Some(task) }
    }

    /// Stops sampling; returns (samples taken, double runs seen).
    pub async fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let n = *self.samples.lock().unwrap();
        (n, self.doubles.lock().unwrap().clone())
    }

    /// Stops sampling and fails the test if any server was seen running twice.
    pub async fn assert_never_twice(self) {
        let (samples, doubles) = self.finish().await;
        assert!(samples > 0, "the sampler read no host");
        assert!(doubles.is_empty(), "servers ran on two hosts at once: {doubles:?} ({samples} samples)");
    }
}

impl Drop for Sampler {
    /// A test that fails before `finish` stops the sampler too: a sampling thread left
    /// running would keep the test's runtime from shutting down.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Records servers running on more than one host in this sample and the one before:
/// twice in a row, so at least one sampling period. A hand-over (a live migration's
/// few milliseconds of switch-over) can fall between the reads of two hosts in one
/// sample; a split brain lasts far longer. Returns this sample's doubles.
fn tally(
    running: &BTreeMap<String, Vec<String>>,
    previous: &BTreeSet<String>,
    doubles: &Mutex<Vec<String>>,
) -> BTreeSet<String> {
    let twice: BTreeSet<String> = running.iter().filter(|(_, h)| h.len() > 1).map(|(s, _)| s.clone()).collect();
    for server in twice.intersection(previous) {
        doubles.lock().unwrap().push(format!("{server} on {:?}", running[server]));
    }
    twice
}
