//! Wiring: connect to libvirt and the API, register the host, renew its Lease, and run
//! the server controller with lifecycle events and a periodic resync as triggers.

use std::sync::{Arc, Mutex};

use covi_api::{HostPool, VirtualServer};
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use tokio_stream::wrappers::{IntervalStream, UnboundedReceiverStream};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::libvirt::Hypervisor;
use crate::reconcile::{Context, error_policy, reconcile};

pub async fn client(config: &Config) -> Result<Client> {
    covi_daemon::kube_client(config.kubeconfig.as_deref()).await.map_err(Error::Config)
}

pub async fn run(config: Config) -> Result<()> {
    let mut registry = covi_daemon::prometheus_client::registry::Registry::default();
    let metrics = crate::metrics::Metrics::new(&mut registry);
    let health = covi_daemon::Health::default();
    let bound = covi_daemon::serve(config.metrics_addr, registry, health.clone())
        .await
        .map_err(|e| Error::Config(format!("serving metrics on {}: {e}", config.metrics_addr)))?;
    tracing::info!(%bound, "metrics endpoint");

    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let hypervisor = Hypervisor::open(&config.libvirt_uri, events_tx).await?;
    let facts = hypervisor.facts().await?;
    tracing::info!(node = %config.node_name, uri = %config.libvirt_uri, ?facts, "connected to libvirt");
    tokio::fs::create_dir_all(&config.work_dir)
        .await
        .map_err(|e| Error::Config(format!("creating --work-dir {}: {e}", config.work_dir.display())))?;

    let client = client(&config).await?;
    let mut host_conditions = Vec::new();
    crate::host::register(
        &client,
        &config.node_name,
        &config.labels,
        config.address.as_deref(),
        &facts,
        &mut host_conditions,
    )
    .await?;

    // Pools: every agent needs its pool's images, storage and network.
    let (pools, pool_writer) = reflector::store::<HostPool>();
    let pool_watch = reflector(pool_writer, watcher(Api::<HostPool>::all(client.clone()), watcher::Config::default()))
        .applied_objects()
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(pool_watch);
    pools.wait_until_ready().await.map_err(|e| Error::Config(format!("watching HostPools: {e}")))?;

    let (renewed_tx, _renewed_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(crate::host::renew_lease(
        client.clone(),
        config.namespace.clone(),
        config.node_name.clone(),
        config.labels.clone(),
        pools.clone(),
        renewed_tx,
    ));

    let servers_api: Api<VirtualServer> = Api::all(client.clone());
    let selector = format!("status.host={}", config.node_name);
    let controller = Controller::new(servers_api, watcher::Config::default().fields(&selector));
    let servers = controller.store();

    // A lifecycle event names a domain by UUID, which is the server's UID.
    let store = servers.clone();
    let lifecycle = UnboundedReceiverStream::new(events_rx).filter_map(move |event| {
        let found = store.state().into_iter().find(|s| s.uid().as_deref() == Some(event.uuid.as_str()));
        futures::future::ready(found.map(|s| ObjectRef::from_obj(s.as_ref())))
    });
    let ticks = IntervalStream::new(tokio::time::interval(config.resync)).map(|_| ());

    // Resync of the host itself: facts, orphans.
    {
        let (client, node, hv, servers, pools, resync) = (
            client.clone(),
            config.node_name.clone(),
            hypervisor.clone(),
            servers.clone(),
            pools.clone(),
            config.resync,
        );
        let (labels, address, metrics) = (config.labels.clone(), config.address.clone(), metrics.clone());
        tokio::spawn(async move {
            let mut conditions = host_conditions;
            let mut interval = tokio::time::interval(resync);
            loop {
                interval.tick().await;
                // No need to wait for the server cache: a domain it does not know is
                // judged by reading its server from the API.
                match crate::sweep::sweep(&client, &node, &hv, &servers, &pools).await {
                    Ok(n) if n > 0 => tracing::info!(removed = n, "swept domains no server claims"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "sweeping orphaned domains failed"),
                }
                match hv.observe().await {
                    Ok(domains) => {
                        metrics.domains.set(domains.len() as i64);
                    }
                    Err(e) => tracing::warn!(error = %e, "listing domains failed"),
                }
                if let Ok(facts) = hv.facts().await
                    && let Err(e) =
                        crate::host::register(&client, &node, &labels, address.as_deref(), &facts, &mut conditions)
                            .await
                {
                    tracing::warn!(error = %e, "updating the Host failed");
                }
            }
        });
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
        stops: Mutex::new(Default::default()),
        metrics,
    });
    health.set(true);
    controller
        .reconcile_on(lifecycle)
        .reconcile_all_on(ticks)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                tracing::warn!(error = %e, "controller event");
            }
            futures::future::ready(())
        })
        .await;
    Ok(())
}
