//! The endpoint both covi binaries serve: Prometheus metrics at `/metrics`, liveness
//! at `/healthz`. A few lines of HTTP/1.1 rather than a web framework: two GET routes
//! are all a scraper and a kubelet probe need.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub use prometheus_client;

/// Whether the process is healthy, as `/healthz` reports it.
#[derive(Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    pub fn set(&self, healthy: bool) {
        self.0.store(healthy, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A JSON body for a path, computed on request.
pub type JsonFuture = std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>;
/// Extra GET routes: the path's JSON body, or `None` when the path is not theirs.
pub type Routes = Arc<dyn Fn(&str) -> Option<JsonFuture> + Send + Sync>;

/// Binds `addr` and serves `registry`, `health` and `routes` until the process ends.
/// Returns the bound address (useful when `addr` has port 0).
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    health: Health,
    routes: Option<Routes>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let (registry, health, routes) = (registry.clone(), health.clone(), routes.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = match stream.read(&mut buf).await {
                    Ok(n) => n,
                    Err(_) => return,
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let extra = routes.as_ref().and_then(|r| r(path));
                let (status, content_type, body) = match extra {
                    Some(body) => ("200 OK", "application/json", body.await),
                    None => respond(path, &registry, &health),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            });
        }
    });
    tracing::info!(%bound, "serving /metrics and /healthz");
    Ok(bound)
}

fn respond(path: &str, registry: &Registry, health: &Health) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => {
            let mut body = String::new();
            match encode(&mut body, registry) {
                Ok(()) => ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", body),
                Err(e) => ("500 Internal Server Error", "text/plain", e.to_string()),
            }
        }
        "/healthz" | "/readyz" if health.get() => ("200 OK", "text/plain", "ok\n".into()),
        "/healthz" | "/readyz" => ("503 Service Unavailable", "text/plain", "not healthy\n".into()),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn serves_metrics_and_health() {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("covi_test", "a test counter", counter.clone());
        counter.inc();
        let health = Health::default();
        let (status, _, body) = respond("/metrics", &registry, &health);
        assert_eq!(status, "200 OK");
        assert!(body.contains("covi_test_total 1"), "{body}");
        assert_eq!(respond("/healthz", &registry, &health).0, "503 Service Unavailable");
        health.set(true);
        assert_eq!(respond("/healthz", &registry, &health).0, "200 OK");
        assert_eq!(respond("/nope", &registry, &health).0, "404 Not Found");
    }
}
