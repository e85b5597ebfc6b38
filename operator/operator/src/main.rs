//! covi-operator: campaign for the leader Lease, then schedule until leadership ends.

use std::process::ExitCode;

use covi_operator::config::Config;
use covi_operator::{leader, metrics::Metrics, run};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse(std::env::args().skip(1), |k| std::env::var(k).ok());
    covi_daemon::run_main("covi-operator", config, operate).await
}

async fn operate(config: Config) -> covi_operator::error::Result<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let health = covi_daemon::Health::default();
    covi_daemon::serve(config.metrics_addr, registry, health.clone(), None)
        .await
        .map_err(|source| covi_operator::error::Error::Serve { addr: config.metrics_addr, source })?;
    let client = run::client(&config).await?;
    if let Some(console) = config.console.clone() {
        // Every replica serves consoles, the standbys too.
        covi_operator::console::serve(client.clone(), config.namespace.clone(), config.identity.clone(), console)
            .await
            .map_err(|e| covi_operator::error::Error::Config(e.to_string()))?;
    }
    health.set(true);
    let mut leading =
        leader::campaign(config.kubeconfig.clone(), &config.namespace, &config.identity, config.leader_lease).await?;
    loop {
        tracing::info!(identity = %config.identity, "standing by for the leader lease");
        let stopped = async {
            while !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    return true;
                }
            }
            false
        };
        tokio::select! {
            stopped = stopped => if stopped {
                return Err(covi_operator::error::Error::Leadership("leader election stopped"));
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        metrics.leader.set(1);
        let result = tokio::select! {
            result = run::run_leader(client.clone(), &config, metrics.clone()) => Some(result),
            // Another replica may lead now: stop at once rather than schedule beside it
            // (dropping the leader's loop ends its watches and controllers), and stand by
            // again. Exiting instead would leave a fleet without any operator when every
            // replica's renewal was late at once, as when thousands of agents reconnect
            // to a slow API server together.
            _ = async { while leading.changed().await.is_ok() && *leading.borrow() {} } => None,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        metrics.leader.set(0);
        match result {
            Some(result) => return result,
            None => tracing::warn!("lost the leader lease: stopped scheduling"),
        }
    }
}
