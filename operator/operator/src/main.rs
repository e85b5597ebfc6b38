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
    let election =
        leader::campaign(config.kubeconfig.clone(), &config.namespace, &config.identity, config.leader_lease).await?;
    // SIGTERM or Ctrl-C: stop scheduling, then hand the Lease over.
    let stop = covi_daemon::stop_requested();
    tokio::pin!(stop);
    let mut leading = election.leading.clone();
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
            _ = &mut stop => {
                election.release(RELEASE_WITHIN).await;
                return Ok(());
            }
        }
        metrics.leader.set(1);
        let ended = tokio::select! {
            result = run::run_leader(client.clone(), &config, metrics.clone()) => Ended::Failed(result),
            // Another replica may lead now: stop at once rather than schedule beside it
            // (dropping the leader's loop ends its watches and controllers), and stand by
            // again. Exiting instead would leave a fleet without any operator when every
            // replica's renewal was late at once, as when thousands of agents reconnect
            // to a slow API server together.
            _ = async { while leading.changed().await.is_ok() && *leading.borrow() {} } => Ended::Lost,
            _ = &mut stop => Ended::Stopping,
        };
        metrics.leader.set(0);
        // The leader's loop is dropped by now (its watches, writers and controllers
        // stopped), so the Lease may say nobody leads.
        match ended {
            Ended::Lost => tracing::warn!("lost the leader lease: stopped scheduling"),
            Ended::Stopping => {
                tracing::info!("stopping: scheduling stopped; handing the leader lease over");
                election.release(RELEASE_WITHIN).await;
                return Ok(());
            }
            Ended::Failed(result) => {
                election.release(RELEASE_WITHIN).await;
                return result;
            }
        }
    }
}

/// Why a term as leader ended.
enum Ended {
    /// Another replica may lead: this one stands by again.
    Lost,
    /// SIGTERM or Ctrl-C.
    Stopping,
    /// The leader's loop returned (it runs until an error).
    Failed(covi_operator::error::Result<()>),
}

/// How long a stopping operator waits for the API server to take its Lease back: well
/// within a pod's default 30 s grace, and long enough for a loaded API server.
const RELEASE_WITHIN: std::time::Duration = std::time::Duration::from_secs(15);
