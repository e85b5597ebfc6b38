//! The serial console's server side in the operator: an aggregated API
//! (`subresources.covi.io`) behind the Kubernetes API server, as KubeVirt's virt-api
//! serves `virtctl console`. Every replica serves it (not only the leader); see
//! `covi_api::console` for the whole path and docs/console.md for the design.
//!
//! The listener speaks TLS with the serving certificate the APIService's caBundle
//! vouches for and accepts only the API server's front-proxy client certificate. A
//! console request is authorized (SubjectAccessReview), its server's host found, that
//! host's agent asked over mutual TLS, and only then is the WebSocket accepted, so every
//! refusal reaches the user as a `Status` with a clear message.

pub mod certs;
pub mod front_proxy;
pub mod route;
pub mod session;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use covi_daemon::tls::rustls::{ClientConfig, ServerConfig};
use covi_daemon::tls::tokio_rustls::TlsAcceptor;
use covi_daemon::tls::{Identity, TlsError};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use front_proxy::FrontProxy;
use route::Route;
use session::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Certificates(String),
    #[error("the API server's front proxy (ConfigMap kube-system/extension-apiserver-authentication): {0}")]
    FrontProxy(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("listening for consoles on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Where and as what the console is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    pub addr: SocketAddr,
    /// The Service the APIService points at; its DNS name is in the serving certificate.
    pub service: String,
}

/// What a connection needs, loaded from the cluster and reloaded now and then (the
/// front proxy's CA may rotate; the certificates are issued afresh).
struct Loaded {
    server: Arc<ServerConfig>,
    proxy: FrontProxy,
    agents: Arc<ClientConfig>,
}

/// Certificates are issued again, and the front proxy's settings read again, this often.
const RELOAD: Duration = Duration::from_secs(600);
/// After a failed load, the next try.
const RETRY: Duration = Duration::from_secs(5);
/// The TLS handshake of a new connection, within this.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

async fn load(client: &Client, namespace: &str, service: &str) -> Result<Loaded, ConsoleError> {
    let (ns, name) = front_proxy::CONFIG_MAP;
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|source| ConsoleError::Kube { what: format!("reading ConfigMap {ns}/{name}"), source })?
        .ok_or_else(|| ConsoleError::FrontProxy("the ConfigMap is missing".into()))?;
    let proxy = FrontProxy::from_data(&config_map.data.unwrap_or_default()).map_err(ConsoleError::FrontProxy)?;
    let certs = certs::ensure(client, namespace, service).await?;
    let serving = Identity::from_pem(&certs.serving.cert, &certs.serving.key, "console serving certificate")?;
    let server = covi_daemon::tls::server(serving, &proxy.client_ca, "the front proxy's client CA")?;
    let own = Identity::from_pem(&certs.client.cert, &certs.client.key, "console client certificate")?;
    let agents = covi_daemon::tls::client(own, &certs.ca, "covi's console CA")?;
    Ok(Loaded { server, proxy, agents })
}

/// Binds `config.addr` and serves consoles until the process ends. Certificates and the
/// front proxy's settings load in the background; until they have, connections are
/// closed (the API server reports the APIService unavailable meanwhile).
pub async fn serve(
    client: Client,
    namespace: String,
    identity: String,
    config: ConsoleConfig,
) -> Result<SocketAddr, ConsoleError> {
    let listener =
        TcpListener::bind(config.addr).await.map_err(|source| ConsoleError::Bind { addr: config.addr, source })?;
    let bound = listener.local_addr().map_err(|source| ConsoleError::Bind { addr: config.addr, source })?;
    let loaded: Arc<RwLock<Option<Arc<Loaded>>>> = Arc::default();
    {
        let (client, loaded) = (client.clone(), loaded.clone());
        tokio::spawn(async move {
            loop {
                let next = match load(&client, &namespace, &config.service).await {
                    Ok(l) => {
                        *loaded.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(l));
                        RELOAD
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the console cannot serve yet; retrying");
                        RETRY
                    }
                };
                tokio::time::sleep(next).await;
            }
        });
    }
    let recorder =
        Recorder::new(client.clone(), Reporter { controller: "covi-operator".into(), instance: Some(identity) });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else { continue };
            let current = loaded.read().unwrap_or_else(|p| p.into_inner()).clone();
            let Some(current) = current else { continue };
            let (client, recorder) = (client.clone(), recorder.clone());
            tokio::spawn(async move {
                let accepted =
                    tokio::time::timeout(HANDSHAKE_DEADLINE, TlsAcceptor::from(current.server.clone()).accept(tcp))
                        .await;
                let Ok(Ok(tls)) = accepted else {
                    tracing::debug!(%peer, "console connection without a valid TLS handshake");
                    return;
                };
                let name =
                    tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(covi_daemon::tls::common_name);
                if !current.proxy.allows(name.as_deref()) {
                    tracing::warn!(%peer, ?name, "a client certificate of the front proxy's CA with a name it may not use");
                    return;
                }
                let service = hyper::service::service_fn(move |req| {
                    let (client, current, recorder) = (client.clone(), current.clone(), recorder.clone());
                    async move { Ok::<_, Infallible>(handle(req, client, current, recorder).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .with_upgrades();
                if let Err(e) = connection.await {
                    tracing::debug!(%peer, error = %e, "console connection ended");
                }
            });
        }
    });
    tracing::info!(%bound, "serving consoles (aggregated API {})", covi_api::console::GROUP);
    Ok(bound)
}

fn json(code: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = code;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn refuse(refusal: &Refusal) -> Response<Full<Bytes>> {
    json(StatusCode::from_u16(refusal.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &refusal.body())
}

async fn handle(
    mut req: Request<Incoming>,
    client: Client,
    current: Arc<Loaded>,
    recorder: Recorder,
) -> Response<Full<Bytes>> {
    let (namespace, name) = match route::route(req.uri().path()) {
        Route::Group => return json(StatusCode::OK, &route::group()),
        Route::Resources => return json(StatusCode::OK, &route::resources()),
        Route::NotFound => {
            return refuse(&Refusal::new(404, "NotFound", "the server could not find the requested resource"));
        }
        Route::Console { namespace, name } => (namespace, name),
    };
    let Some(user) = current.proxy.user(req.headers()) else {
        return refuse(&Refusal::new(401, "Unauthorized", "the request names no user"));
    };
    if req.method() != Method::GET {
        return refuse(&Refusal::new(405, "MethodNotAllowed", "a console is opened with GET"));
    }
    let header = |name: header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let websocket = header(header::UPGRADE).is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let (Some(key), true) = (header(header::SEC_WEBSOCKET_KEY), websocket) else {
        return refuse(&Refusal::new(
            400,
            "BadRequest",
            "a console is a WebSocket: open it with `kubectl covi console`",
        ));
    };
    let Some(protocol) = route::protocol(header(header::SEC_WEBSOCKET_PROTOCOL).as_deref()) else {
        let message = format!("the console speaks the WebSocket subprotocol {}", covi_api::console::PROTOCOL);
        return refuse(&Refusal::new(400, "BadRequest", message));
    };
    if let Err(refusal) = session::authorize(&client, &user, &namespace, &name).await {
        tracing::info!(user = %user.name, %namespace, %name, "console refused: no permission");
        return refuse(&refusal);
    }
    let force = route::force(req.uri().query());
    let (agent, host) = match session::open(&client, current.agents.clone(), &namespace, &name, force).await {
        Ok(opened) => opened,
        Err(refusal) => {
            tracing::info!(user = %user.name, %namespace, %name, reason = %refusal.reason, message = %refusal.message, "console not opened");
            return refuse(&refusal);
        }
    };
    tracing::info!(user = %user.name, %namespace, %name, %host, force, "console session opened");
    note(
        &recorder,
        &namespace,
        &name,
        "ConsoleOpened",
        format!("{} opened the serial console on host {host}", user.name),
    );
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "the console's WebSocket upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let ended = session::relay(ws, agent).await;
        tracing::info!(user = %user.name, %namespace, %name, ?ended, "console session closed");
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// An Event on the server: who opened its console, for `kubectl describe` (the API
/// server's audit log records the request itself).
fn note(recorder: &Recorder, namespace: &str, name: &str, reason: &str, message: String) {
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(format!("{}/{}", covi_api::GROUP, covi_api::VERSION)),
        kind: Some("VirtualServer".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(message),
        action: "Console".into(),
        secondary: None,
    };
    let recorder = recorder.clone();
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::debug!(error = %e, "publishing the console event failed");
        }
    });
}
