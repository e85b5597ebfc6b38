//! What both covi daemons (covi-operator and covi-agent) need around their own work:
//! reading flags, a Kubernetes client, logging, and the /metrics and /healthz endpoint.

pub mod endpoint;
pub mod flags;
pub mod tls;

pub use endpoint::{Health, serve};
pub use prometheus_client;

use std::path::Path;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Logs to stdout at the level RUST_LOG sets (default info); colours only on a terminal,
/// so `kubectl logs` and log collectors get plain text.
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}

/// A client from `kubeconfig` when given, else from KUBECONFIG or the in-cluster
/// service account. Errors say which source failed.
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?,
    };
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// Resolves when the process is asked to stop: SIGTERM (a pod deleted, a rolling
/// update) or SIGINT (Ctrl-C). The SIGTERM handler is installed by this call, not at
/// the first poll, so a signal that arrives before the future is awaited still counts.
pub fn stop_requested() -> impl std::future::Future<Output = ()> + Send + 'static {
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        match terminate {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot catch SIGTERM; only Ctrl-C stops gracefully");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// The body of a covi daemon's `main`: logging, then `run` with the parsed
/// configuration. A configuration error prints its message (often the usage) and
/// exits 2; a run that ends in an error logs it and exits 1.
pub async fn run_main<C, E1, E2, F>(
    name: &str,
    config: Result<C, E1>,
    run: impl FnOnce(C) -> F,
) -> std::process::ExitCode
where
    E1: std::fmt::Display,
    E2: std::fmt::Display,
    F: std::future::Future<Output = Result<(), E2>>,
{
    init_logging();
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{name} stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
