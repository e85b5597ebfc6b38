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
    // Bounded: a scraper or a probe needs one connection at a time; a flood of them
    // must not grow tasks and memory without limit, nor a slow one hold a slot forever.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Full: close at once rather than queue.
                drop(stream);
                continue;
            };
            let (registry, health, routes) = (registry.clone(), health.clone(), routes.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let _ =
                    tokio::time::timeout(REQUEST_DEADLINE, answer(stream, &registry, &health, routes.as_ref())).await;
            });
        }
    });
    tracing::info!(%bound, "serving /metrics and /healthz");
    Ok(bound)
}

/// At most this many connections are served at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 32;
/// Reading the request, computing and writing the answer: all within this, or dropped.
const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

async fn answer(mut stream: tokio::net::TcpStream, registry: &Registry, health: &Health, routes: Option<&Routes>) {
    let mut buf = [0u8; 1024];
    let n = match stream.read(&mut buf).await {
        Ok(n) => n,
        Err(_) => return,
    };
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let extra = routes.and_then(|r| r(path));
    let (status, content_type, body) = match extra {
        Some(body) => ("200 OK", "application/json", body.await),
        None => respond(path, registry, health),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
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

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = stream.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()).await;
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        answer
    }

    #[tokio::test]
    async fn a_flood_of_idle_connections_is_bounded_and_passes() {
        let health = Health::default();
        health.set(true);
        let addr = serve("127.0.0.1:0".parse().unwrap(), Registry::default(), health, None).await.expect("serve");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200 OK"));
        // Connections that never send a request hold every slot...
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        // ...so the next is closed unanswered, not queued behind them.
        let refused = tokio::time::timeout(std::time::Duration::from_secs(5), get(addr, "/healthz")).await;
        assert_eq!(refused.as_deref(), Ok(""), "closed without an answer");
        // Once they go, it answers again.
        drop(idle);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if get(addr, "/healthz").await.starts_with("HTTP/1.1 200 OK") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the endpoint never recovered");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
