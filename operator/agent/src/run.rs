//! Wiring: connect to libvirt and the API, register the host, renew its Lease, and run
//! the server controller with lifecycle events and a periodic resync as triggers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use covi_api::host_pool::Failover;

use covi_api::HostPool;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use tokio_stream::wrappers::{IntervalStream, UnboundedReceiverStream};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fence::Fence;
use crate::fence::link::FencingLink;
use crate::fence::watchdog::{fence_if_due, watchdog};
use crate::host::HostReporter;
use crate::libvirt::Libvirt;
use crate::reconcile::{Context, error_policy, reconcile};

pub async fn client(config: &Config) -> Result<Client> {
    covi_daemon::kube_client(config.kubeconfig.as_deref()).await.map_err(Error::Config)
}

/// The agent's entry point: one host, or with `--fleet` many simulated ones.
pub async fn main(config: Config) -> Result<()> {
    match config.fleet.clone() {
        Some(dir) => run_fleet(config, &dir).await,
        None => run(config).await,
    }
}

/// Fleet mode: one host per test-driver inventory `DIR/NAME.xml`, each running exactly
/// the agent's code (its own libvirt connection, Host, Lease, watches, endpoint on a
/// free port and work folder), in one process. Returns when every host has stopped.
pub async fn run_fleet(config: Config, dir: &std::path::Path) -> Result<()> {
    let hosts = fleet_hosts(&config, dir)?;
    tracing::info!(hosts = hosts.len(), dir = %dir.display(), "fleet mode");
    let mut tasks = tokio::task::JoinSet::new();
    for host in hosts {
        tasks.spawn(async move {
            let node = host.node_name.clone();
            if let Err(e) = run(host).await {
                tracing::error!(%node, error = %e, "simulated host stopped");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// One host configuration per `*.xml` file of `dir`, sorted by name.
pub fn fleet_hosts(config: &Config, dir: &std::path::Path) -> Result<Vec<Config>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Config(format!("--fleet {}: {e}", dir.display())))?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Config(format!("--fleet {}: no NAME.xml inventories there", dir.display())));
    }
    Ok(files
        .into_iter()
        .map(|path| {
            let node = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            Config {
                libvirt_uri: format!("test://{}", path.display()),
                work_dir: config.work_dir.join(&node),
                // Every host its own endpoint, on a port the system picks.
                metrics_addr: std::net::SocketAddr::new(config.metrics_addr.ip(), 0),
                node_name: node,
                fleet: None,
                console_addr: None,
                ..config.clone()
            }
        })
        .collect())
}

pub async fn run(config: Config) -> Result<()> {
    // The watchdog comes first, on its own libvirt connection: from here on, whatever
    // fails, a host that does not renew its Lease fences itself.
    let fence = Arc::new(Fence::new(Failover::default_fence_after()));
    let link = Arc::new(Mutex::new(FencingLink::new(&config.libvirt_uri)));
    let health = covi_daemon::Health::default();
    let serving = Arc::new(AtomicBool::new(false));
    watchdog(link.clone(), fence.clone(), health.clone(), serving.clone());
    let result = serve(config, fence.clone(), link.clone(), health, serving).await;
    if let Err(e) = &result {
        // Exiting now would leave the guests running with nobody to fence them (a
        // crash-looping agent renews nothing): wait until the watchdog has fenced.
        tracing::error!(error = %e, "the agent cannot run; it renews nothing and exits once the host is fenced");
        // Done once fenced, or once due with libvirt unreachable (nothing to destroy
        // with then: the next agent, overdue, fences as it starts).
        let gave_up = || fence.due() && !link.lock().unwrap_or_else(|p| p.into_inner()).reachable();
        while !fence.is_fenced() && !gave_up() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    result
}

async fn serve(
    config: Config,
    fence: Arc<Fence>,
    link: Arc<Mutex<FencingLink>>,
    health: covi_daemon::Health,
    serving: Arc<AtomicBool>,
) -> Result<()> {
    if crate::libvirt::MigrationTransport::of(&config.peer_uri) == crate::libvirt::MigrationTransport::Plain {
        tracing::warn!(
            peer_uri = %config.peer_uri,
            "live migration sends guest memory unencrypted to this peer URI; use a +tls or +ssh one outside a lab"
        );
    }
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let hypervisor = Libvirt::open(&config.libvirt_uri, events_tx).await?;
    link.lock().unwrap_or_else(|p| p.into_inner()).share(hypervisor.connection()?);
    let facts = hypervisor.facts().await?;
    tracing::info!(node = %config.node_name, uri = %config.libvirt_uri, ?facts, "connected to libvirt");
    tokio::fs::create_dir_all(&config.work_dir)
        .await
        .map_err(|e| Error::Config(format!("creating --work-dir {}: {e}", config.work_dir.display())))?;

    let mut registry = covi_daemon::prometheus_client::registry::Registry::default();
    let metrics = crate::metrics::Metrics::new(&mut registry);
    let bound = covi_daemon::serve(
        config.metrics_addr,
        registry,
        health,
        config.domains_endpoint.then(|| domain_route(&hypervisor, &link, &fence)),
    )
    .await
    .map_err(|source| Error::Serve { addr: config.metrics_addr, source })?;
    tracing::info!(%bound, "metrics endpoint");
    let console = match config.console_addr {
        Some(addr) => Some(crate::console::bind(addr, config.address.as_deref()).await?),
        None => None,
    };

    let client = client(&config).await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    // A restarted agent keeps its predecessor's promise: if that agent's deadline has
    // passed (it crashed, or a graceful stop outlasted its window) the host may have
    // been declared lost, and the watchdog fences at once.
    if let Some((age, recorded)) = crate::host::predecessor(&leases, &config.node_name).await {
        let fence_after = recorded.unwrap_or_else(|| fence.fence_after());
        fence.carry_over(age, fence_after);
        tracing::info!(?age, ?fence_after, overdue = fence.due(), "the previous agent's last renewal");
    }
    let reporter = Arc::new(HostReporter::new(
        client.clone(),
        config.node_name.clone(),
        config.labels.clone(),
        config.address.clone(),
        console.as_ref().map(|(_, endpoint)| endpoint.clone()),
    ));
    // Cut off at start: keep trying (the watchdog fences meanwhile if it must), less
    // often each time and at random within that, so a fleet started together does not
    // retry in step against an API server it already overloads.
    let mut retry = REGISTER_RETRY;
    while let Err(e) = reporter.report(&facts, None, None).await {
        let pause = crate::host::jittered(retry, 2);
        tracing::warn!(error = %e, ?pause, "registering the Host failed; retrying");
        tokio::time::sleep(pause).await;
        retry = (retry * 2).min(REGISTER_RETRY_MAX);
    }

    // Pools: every agent needs its pool's images, storage, network and timings.
    let (pools, pool_writer) = reflector::store::<HostPool>();
    let pool_watch = reflector(pool_writer, watcher(Api::<HostPool>::all(client.clone()), watcher::Config::default()))
        .default_backoff()
        .applied_objects()
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(pool_watch);
    pools.wait_until_ready().await.map_err(|source| Error::Watch { what: "HostPools", source })?;

    let recovered = Arc::new(tokio::sync::Notify::new());
    let renewer = crate::host::LeaseRenewer {
        api: leases,
        node: config.node_name.clone(),
        labels: config.labels.clone(),
        pools: pools.clone(),
        fence: fence.clone(),
        recovered: recovered.clone(),
        metrics: metrics.clone(),
        fence_if_due: {
            let (link, fence) = (link.clone(), fence.clone());
            Arc::new(move || fence_if_due(&link, &fence))
        },
        restart_grace: config.restart_grace,
    };
    let (stopping, stop_rx) = tokio::sync::watch::channel(false);
    let mut renewing = tokio::spawn(renewer.run(stop_rx));

    // The servers bound here, from the host's Assignment (read once this process has
    // renewed: it starts nothing before anyway). Each list of it records the host's
    // standing: a cache listed since the host's last gap in renewals suffices to start
    // a server without reading it again.
    let listing = Arc::new(crate::fence::Listing::default());
    let (servers, writer) = reflector::store();
    let (watch, seen) =
        crate::assigned::servers(client.clone(), config.node_name.clone(), fence.clone(), listing.clone());
    let controller = Controller::for_stream(reflector(writer, watch).applied_objects(), servers.clone());

    // A lifecycle event names a domain by UUID, which is the server's UID.
    let store = servers.clone();
    let lifecycle = UnboundedReceiverStream::new(events_rx).filter_map(move |event| {
        let found = store.state().into_iter().find(|s| s.uid().as_deref() == Some(event.uuid.as_str()));
        futures::future::ready(found.map(|s| ObjectRef::from_obj(s.as_ref())))
    });
    let ticks = IntervalStream::new(tokio::time::interval(config.resync)).map(|_| ());

    let reported = Arc::new(crate::reconcile::Reported::default());
    let host = HostLoop {
        client: client.clone(),
        node: config.node_name.clone(),
        hypervisor: hypervisor.clone(),
        servers: servers.clone(),
        pools: pools.clone(),
        reporter,
        fence: fence.clone(),
        metrics: metrics.clone(),
        reported: reported.clone(),
    };
    tokio::spawn(host.run(config.resync, recovered));
    let usage = crate::usage::report::UsageLoop {
        client: client.clone(),
        node: config.node_name.clone(),
        hypervisor: hypervisor.clone(),
        servers: servers.clone(),
        host_cpus: facts.cpus,
        metrics: metrics.usage.clone(),
        seen: seen.clone(),
        collect_seconds: metrics.usage_collect_seconds.clone(),
        sample_every: config.usage_sample,
        interval: config.usage_interval,
    };
    tokio::spawn(Arc::new(usage).run());
    let faults = crate::fault::controller::FaultLoop {
        client: client.clone(),
        node: config.node_name.clone(),
        hypervisor: hypervisor.clone(),
        servers: servers.clone(),
        every: config.resync,
    };
    tokio::spawn(faults.run());
    if let Some((listener, endpoint)) = console {
        let console = crate::console::Console {
            client: client.clone(),
            namespace: config.namespace.clone(),
            node: config.node_name.clone(),
            libvirt_uri: config.libvirt_uri.clone(),
            servers: servers.clone(),
        };
        tracing::info!(%endpoint, "serving consoles");
        tokio::spawn(Arc::new(console).run(listener));
    }

    let reporter = Reporter { controller: "covi-agent".into(), instance: Some(config.node_name.clone()) };
    let ctx = Arc::new(Context {
        client: client.clone(),
        node: config.node_name.clone(),
        hypervisor,
        driver: facts.driver.clone(),
        pools,
        recorder: Recorder::new(client, reporter),
        work_dir: config.work_dir.clone(),
        resync: config.resync,
        stop_grace: config.stop_grace,
        peer_uri: config.peer_uri.clone(),
        unsafe_migration: config.unsafe_migration,
        stops: Mutex::new(Default::default()),
        reported,
        metrics,
        fence: fence.clone(),
        listing,
        seen,
    });
    serving.store(true, Ordering::SeqCst);
    let stop = futures::FutureExt::shared(covi_daemon::stop_requested());
    let controller = controller
        .reconcile_on(lifecycle)
        .reconcile_all_on(ticks)
        .graceful_shutdown_on(stop.clone())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
            futures::future::ready(())
        });
    // On a stop the controller takes no new work and waits for the reconciles under
    // way, but a reconcile stuck on a slow or hung libvirtd must not hold the host's
    // last renewal, nor the pod past its grace period: after SHUTDOWN_DRAIN it is
    // abandoned, as a killed agent's would be (the next agent finds what it left).
    let drained = async {
        stop.await;
        tokio::time::sleep(SHUTDOWN_DRAIN).await;
    };
    tokio::select! {
        _ = controller => {}
        _ = drained => tracing::warn!(after = ?SHUTDOWN_DRAIN, "stopping: a reconcile still under way is abandoned"),
    }
    // SIGTERM or Ctrl-C: the guests stay. One last renewal asks the operator to wait
    // --restart-grace-seconds for the next agent; until it succeeds the watchdog keeps
    // its deadline, and if that passes the host is fenced before this process exits.
    tracing::info!(restart_grace = ?config.restart_grace, "stopping; the guests keep running");
    let _ = stopping.send(true);
    loop {
        tokio::select! {
            _ = &mut renewing => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if fence.is_fenced() {
                    tracing::warn!("stopping: the last renewal did not get through before fenceAfter; the host fenced");
                    return Ok(());
                }
            }
        }
    }
}

/// How long a stopping agent waits for the reconciles under way.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

/// The first pause between attempts to register the Host at start (a backoff, not a
/// wait for state: the API server may be unreachable for as long as the host is cut
/// off); it doubles up to [`REGISTER_RETRY_MAX`].
const REGISTER_RETRY: Duration = Duration::from_secs(1);
const REGISTER_RETRY_MAX: Duration = Duration::from_secs(30);

/// `/domains`: the covi domains libvirt has on this host, as JSON. A host that is due
/// to fence does so before answering, so nobody reads a list it must not have.
fn domain_route(
    hypervisor: &Libvirt,
    link: &Arc<Mutex<FencingLink>>,
    fence: &Arc<Fence>,
) -> covi_daemon::endpoint::Routes {
    let (hypervisor, link, fence) = (hypervisor.clone(), link.clone(), fence.clone());
    Arc::new(move |path: &str| {
        if path != "/domains" {
            return None;
        }
        let (hv, link, fence) = (hypervisor.clone(), link.clone(), fence.clone());
        Some(Box::pin(async move {
            let checked = {
                let fence = fence.clone();
                tokio::task::spawn_blocking(move || fence_if_due(&link, &fence)).await.is_ok()
            };
            let domains = if checked { hv.observe().await.unwrap_or_default() } else { Vec::new() };
            let list: Vec<_> = domains
                .iter()
                .map(|d| serde_json::json!({"uuid": d.uuid, "name": d.name, "active": d.active, "running": d.running, "server": format!("{}/{}", d.owner.namespace, d.owner.name)}))
                .collect();
            serde_json::json!({"fenced": fence.is_fenced(), "domains": list}).to_string()
        }) as covi_daemon::endpoint::JsonFuture)
    })
}

/// The host's own periodic work: recover after fencing, sweep orphans, refresh facts.
struct HostLoop {
    client: Client,
    node: String,
    hypervisor: Libvirt,
    servers: kube::runtime::reflector::Store<covi_api::VirtualServer>,
    pools: kube::runtime::reflector::Store<HostPool>,
    reporter: Arc<HostReporter>,
    fence: Arc<Fence>,
    metrics: crate::metrics::Metrics,
    reported: Arc<crate::reconcile::Reported>,
}

impl HostLoop {
    async fn run(self, resync: Duration, recovered: Arc<tokio::sync::Notify>) {
        let mut interval = tokio::time::interval(resync);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = recovered.notified() => {}
            }
            if self.fence.is_fenced() && self.fence.since_renewal() < self.fence.fence_after() {
                self.recover().await;
                continue;
            }
            // No need to wait for the server cache: a domain it does not know is
            // judged by reading its server from the API.
            match crate::sweep::sweep(&self.client, &self.node, &self.hypervisor, &self.servers, &self.pools).await {
                Ok(swept) => {
                    if swept.removed > 0 {
                        tracing::info!(removed = swept.removed, "swept domains no server claims");
                    }
                    self.metrics.domains.set((swept.domains - swept.removed) as i64);
                }
                Err(e) => tracing::warn!(error = %e, "sweeping orphaned domains failed"),
            }
            // Servers that left this host (moved, deleted elsewhere) leave the cache.
            let here: std::collections::HashSet<String> = self.servers.state().iter().filter_map(|s| s.uid()).collect();
            self.reported.retain(|uid| here.contains(uid));
            if let Ok(facts) = self.hypervisor.facts().await
                && let Err(e) = self.reporter.report(&facts, self.storage().await, None).await
            {
                tracing::warn!(error = %e, "updating the Host failed");
            }
        }
    }

    /// Free space of this host's pool's storage, as libvirt reports it.
    async fn storage(&self) -> Option<u64> {
        let pool = crate::host::pool_of(&self.pools.state(), &self.reporter.labels)?.spec.storage.pool.clone();
        self.hypervisor.pool_available(&pool).await.ok().flatten()
    }

    /// Back in touch after fencing: remove domains now bound elsewhere before anything
    /// starts, record the fencing on the Host, then allow starts again.
    async fn recover(&self) {
        if let Err(e) =
            crate::sweep::sweep(&self.client, &self.node, &self.hypervisor, &self.servers, &self.pools).await
        {
            tracing::warn!(error = %e, "sweeping after fencing failed; staying fenced");
            return;
        }
        let message =
            "the host lost contact with the API server for longer than fenceAfter and destroyed its covi domains"
                .to_string();
        match self.hypervisor.facts().await {
            Ok(facts) => {
                if let Err(e) = self.reporter.report(&facts, self.storage().await, Some(message)).await {
                    tracing::warn!(error = %e, "recording the fencing on the Host failed; staying fenced");
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading host facts failed; staying fenced");
                return;
            }
        }
        self.fence.set_fenced(false);
        tracing::info!("recovered from fencing: servers bound here may start again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_is_one_host_per_inventory_file() {
        let dir = std::env::temp_dir().join(format!("covi-fleet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["b-2.xml", "b-1.xml", "notes.txt"] {
            std::fs::write(dir.join(f), "<node/>").unwrap();
        }
        let args = ["--fleet", dir.to_str().unwrap(), "--metrics-addr", "127.0.0.1:9000", "--label", "covi.io/pool=b"];
        let config = Config::parse(args.iter().map(|s| s.to_string()), |_| None).unwrap();
        let hosts = fleet_hosts(&config, &dir).unwrap();
        let names: Vec<_> = hosts.iter().map(|h| h.node_name.as_str()).collect();
        assert_eq!(names, ["b-1", "b-2"]);
        assert_eq!(hosts[0].libvirt_uri, format!("test://{}", dir.join("b-1.xml").display()));
        assert_eq!(hosts[0].metrics_addr.port(), 0, "each host its own port");
        assert_eq!(hosts[1].labels.get("covi.io/pool").map(String::as_str), Some("b"));
        assert!(hosts.iter().all(|h| h.fleet.is_none()));
        std::fs::remove_dir_all(&dir).unwrap();
        let empty = std::env::temp_dir().join(format!("covi-fleet-empty-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        assert!(fleet_hosts(&config, &empty).is_err());
        std::fs::remove_dir_all(&empty).unwrap();
    }
}
