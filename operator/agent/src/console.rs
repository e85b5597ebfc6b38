//! The agent's end of a serial console session. covi-operator connects over mutual TLS
//! (certificates of covi's console CA, from the Secret the operator keeps), names a
//! server in one JSON line, and — if that server's guest runs here — gets its console,
//! opened through libvirt (`virDomainOpenConsole`, in safe mode so two sessions never
//! share it), as raw bytes both ways until either side closes.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use covi_api::VirtualServer;
use covi_api::console::{AGENT_SECRET, AgentAnswer, AgentRequest, OPERATOR_CLIENT_NAME};
use covi_daemon::tls::rustls::ServerConfig;
use covi_daemon::tls::tokio_rustls::TlsAcceptor;
use covi_daemon::tls::tokio_rustls::server::TlsStream;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, Result};

/// The request line must arrive within this after the handshake.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// The certificates are read again this often (the operator renews them).
const RELOAD: Duration = Duration::from_secs(600);
const RETRY: Duration = Duration::from_secs(5);

/// The `host:port` the operator dials: the bound address, or `address` when bound to
/// every address.
pub fn endpoint(bound: SocketAddr, address: Option<&str>) -> String {
    match address {
        Some(host) if bound.ip().is_unspecified() => {
            if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{}", bound.port())
            } else {
                format!("{host}:{}", bound.port())
            }
        }
        _ => bound.to_string(),
    }
}

/// Binds `addr`; returns the listener and the endpoint to report on the Host.
pub async fn bind(addr: SocketAddr, address: Option<&str>) -> Result<(TcpListener, String)> {
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Serve { addr, source })?;
    let bound = listener.local_addr().map_err(|source| Error::Serve { addr, source })?;
    Ok((listener, endpoint(bound, address)))
}

pub struct Console {
    pub client: Client,
    /// Where the operator keeps the agents' console Secret.
    pub namespace: String,
    pub node: String,
    pub libvirt_uri: String,
    /// The servers bound to this host.
    pub servers: Store<VirtualServer>,
}

fn refused(code: u16, reason: &str, message: String) -> AgentAnswer {
    AgentAnswer::Refused { code, reason: reason.into(), message }
}

/// The answer for libvirt's refusal to open a console.
pub fn console_refusal(server: &str, libvirt_message: &str) -> AgentAnswer {
    if libvirt_message.contains("Active console session") {
        refused(
            409,
            "ConsoleBusy",
            format!("another session holds the console of {server}; `kubectl covi console --force` takes it over"),
        )
    } else {
        refused(500, "InternalError", format!("libvirt cannot open the console of {server}: {libvirt_message}"))
    }
}

/// A libvirt console stream and the connection it belongs to (dropped after it).
struct Line {
    stream: virt::stream::Stream,
    _conn: virt::connect::Connect,
}

impl Console {
    /// Serves sessions on `listener` until the process ends.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let config: Arc<RwLock<Option<Arc<ServerConfig>>>> = Arc::default();
        {
            let (me, config) = (self.clone(), config.clone());
            tokio::spawn(async move {
                loop {
                    let next = match me.load().await {
                        Ok(c) => {
                            *config.write().unwrap_or_else(|p| p.into_inner()) = Some(c);
                            RELOAD
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "no console until the console certificate is readable; retrying");
                            RETRY
                        }
                    };
                    tokio::time::sleep(next).await;
                }
            });
        }
        loop {
            let Ok((tcp, peer)) = listener.accept().await else { continue };
            let current = config.read().unwrap_or_else(|p| p.into_inner()).clone();
            let Some(current) = current else { continue };
            let me = self.clone();
            tokio::spawn(async move {
                match TlsAcceptor::from(current).accept(tcp).await {
                    Ok(tls) => me.session(tls).await,
                    Err(e) => tracing::debug!(%peer, error = %e, "console connection refused in the TLS handshake"),
                }
            });
        }
    }

    async fn load(&self) -> std::result::Result<Arc<ServerConfig>, String> {
        let secret = Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(AGENT_SECRET)
            .await
            .map_err(|e| format!("reading Secret {}/{AGENT_SECRET}: {e}", self.namespace))?
            .ok_or_else(|| format!("Secret {}/{AGENT_SECRET} is missing (covi-operator writes it)", self.namespace))?;
        let data = secret.data.unwrap_or_default();
        let text = |key: &str| {
            data.get(key)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
                .ok_or_else(|| format!("Secret {AGENT_SECRET} has no {key}"))
        };
        let identity = covi_daemon::tls::Identity::from_pem(&text("tls.crt")?, &text("tls.key")?, AGENT_SECRET)
            .map_err(|e| e.to_string())?;
        covi_daemon::tls::server(identity, &text("ca.crt")?, AGENT_SECRET).map_err(|e| e.to_string())
    }

    async fn session(self: Arc<Self>, tls: TlsStream<TcpStream>) {
        let name = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(covi_daemon::tls::common_name);
        if name.as_deref() != Some(OPERATOR_CLIENT_NAME) {
            tracing::warn!(?name, "a console client with a certificate of covi's CA that is not the operator's");
            return;
        }
        let mut stream = BufReader::new(tls);
        let mut line = String::new();
        let read = tokio::time::timeout(REQUEST_DEADLINE, (&mut stream).take(4096).read_line(&mut line)).await;
        let Ok(Ok(_)) = read else { return };
        let request: AgentRequest = match serde_json::from_str(line.trim()) {
            Ok(r) => r,
            Err(e) => {
                let _ = answer(&mut stream, &refused(400, "BadRequest", format!("unreadable request: {e}"))).await;
                return;
            }
        };
        let server = format!("virtualserver {}/{}", request.namespace, request.name);
        let opened = match self.open(&request, &server).await {
            Ok(line) => line,
            Err(refusal) => {
                let _ = answer(&mut stream, &refusal).await;
                return;
            }
        };
        if answer(&mut stream, &AgentAnswer::Ok).await.is_err() {
            return;
        }
        tracing::info!(%server, force = request.force, "console session opened");
        relay(stream, Arc::new(opened)).await;
        tracing::info!(%server, "console session closed");
    }

    /// The server's guest, if it runs here, and its console.
    async fn open(&self, request: &AgentRequest, server: &str) -> std::result::Result<Line, AgentAnswer> {
        let bound = self.servers.state().into_iter().find(|s| {
            s.namespace().as_deref() == Some(request.namespace.as_str())
                && s.name_any() == request.name
                && s.bound_to(&self.node)
        });
        let Some(uid) = bound.and_then(|s| s.uid()) else {
            return Err(refused(404, "NotFound", format!("{server} is not on host {}", self.node)));
        };
        let (uri, server, node) = (self.libvirt_uri.clone(), server.to_string(), self.node.clone());
        let force = request.force;
        tokio::task::spawn_blocking(move || {
            let internal =
                |e: virt::error::Error| refused(500, "InternalError", format!("libvirt on host {node}: {e}"));
            let conn = virt::connect::Connect::open(Some(&uri)).map_err(internal)?;
            let not_running =
                || refused(409, "NotRunning", format!("the guest of {server} is not running on host {node}"));
            let domain = conn.lookup_domain_by_uuid_string(&uid).map_err(|_| not_running())?;
            if !domain.is_active().unwrap_or(false) {
                return Err(not_running());
            }
            let stream = virt::stream::Stream::new(&conn, 0).map_err(internal)?;
            let mut flags = virt::sys::VIR_DOMAIN_CONSOLE_SAFE;
            if force {
                flags |= virt::sys::VIR_DOMAIN_CONSOLE_FORCE;
            }
            domain.open_console(None, &stream, flags).map_err(|e| console_refusal(&server, &e.to_string()))?;
            Ok(Line { stream, _conn: conn })
        })
        .await
        .unwrap_or_else(|e| Err(refused(500, "InternalError", format!("opening the console: {e}"))))
    }
}

async fn answer(stream: &mut BufReader<TlsStream<TcpStream>>, answer: &AgentAnswer) -> std::io::Result<()> {
    let mut line = serde_json::to_string(answer).unwrap_or_default();
    line.push('\n');
    stream.write_all(line.as_bytes()).await?;
    stream.flush().await
}

/// Copies bytes between the operator's stream and the console until either ends.
/// libvirt's stream calls block, so each direction has a thread of its own; aborting
/// the stream at the end releases the one waiting for output.
async fn relay(stream: BufReader<TlsStream<TcpStream>>, line: Arc<Line>) {
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let output = line.clone();
    let reader = std::thread::Builder::new().name("console-out".into()).spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = output.stream.recv(&mut buf) {
            if n <= 0 || out_tx.blocking_send(buf[..n as usize].to_vec()).is_err() {
                break;
            }
        }
    });
    let (in_tx, in_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let input = line.clone();
    let writer = std::thread::Builder::new().name("console-in".into()).spawn(move || {
        while let Ok(data) = in_rx.recv() {
            let mut sent = 0;
            while sent < data.len() {
                match input.stream.send(&data[sent..]) {
                    Ok(n) if n > 0 => sent += n as usize,
                    _ => return,
                }
            }
        }
    });
    if reader.is_err() || writer.is_err() {
        tracing::warn!("no thread for a console session");
    }
    let (mut from_operator, mut to_operator) = tokio::io::split(stream);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            output = out_rx.recv() => match output {
                Some(data) => if to_operator.write_all(&data).await.is_err() { break },
                None => break,
            },
            read = from_operator.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => if in_tx.send(buf[..n].to_vec()).is_err() { break },
            },
        }
    }
    drop(in_tx);
    // SAFETY: the stream is valid while `line` is held; aborting it ends a blocked
    // virStreamRecv in the output thread, which then drops its reference.
    unsafe { virt::sys::virStreamAbort(line.stream.as_ptr()) };
    let _ = to_operator.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_names_an_address_the_operator_can_dial() {
        let any: SocketAddr = "0.0.0.0:8444".parse().unwrap();
        assert_eq!(endpoint(any, Some("10.0.0.5")), "10.0.0.5:8444");
        assert_eq!(endpoint(any, Some("fd00::5")), "[fd00::5]:8444");
        let one: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(endpoint(one, Some("10.0.0.5")), "127.0.0.1:40000", "a specific bind address is the one");
    }

    #[test]
    fn a_busy_console_says_how_to_take_it_over() {
        let AgentAnswer::Refused { code, reason, message } =
            console_refusal("virtualserver a/b", "operation failed: Active console session exists for this domain")
        else {
            panic!("refused")
        };
        assert_eq!((code, reason.as_str()), (409, "ConsoleBusy"));
        assert!(message.contains("--force"), "{message}");
    }
}
