//! One console session: the user's right to it, the way to the server's host, and the
//! relay between the user's WebSocket and the agent's TLS stream.

use std::sync::Arc;
use std::time::Duration;

use covi_api::console::{
    AGENT_SERVER_NAME, AgentAnswer, AgentRequest, ERROR, GROUP, RESOURCE, STDIN, STDOUT, SUBRESOURCE,
};
use covi_api::{Host, VirtualServer};
use covi_daemon::tls::rustls::ClientConfig;
use covi_daemon::tls::rustls::pki_types::ServerName;
use covi_daemon::tls::tokio_rustls::TlsConnector;
use covi_daemon::tls::tokio_rustls::client::TlsStream;
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::front_proxy::User;
use super::route;

/// Reaching the agent and hearing its answer: each within this.
const AGENT_DEADLINE: Duration = Duration::from_secs(10);

/// Why a session was not opened: an HTTP status the user sees, with a reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: String,
    pub message: String,
}

impl Refusal {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> Refusal {
        Refusal { code, reason: reason.into(), message: message.into() }
    }
    pub fn body(&self) -> serde_json::Value {
        route::status(self.code, &self.reason, &self.message)
    }
}

/// Asks the API server whether `user` may open this server's console (RBAC: `get` on
/// `virtualservers/console` in `subresources.covi.io`). The API server checked the same
/// before proxying; asking again means no request the proxy did not authorize is served.
pub async fn authorize(client: &Client, user: &User, namespace: &str, name: &str) -> Result<(), Refusal> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(RESOURCE.into()),
                subresource: Some(SUBRESOURCE.into()),
                verb: Some("get".into()),
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Refusal::new(500, "InternalError", format!("checking the console permission: {e}")))?;
    let status = answer.status.unwrap_or_default();
    if status.allowed {
        return Ok(());
    }
    Err(Refusal::new(
        403,
        "Forbidden",
        format!(
            "{RESOURCE}.{GROUP} \"{name}\" is forbidden: User \"{}\" cannot get resource \"{RESOURCE}/{SUBRESOURCE}\" \
             in API group \"{GROUP}\" in the namespace \"{namespace}\"{}",
            user.name,
            status.reason.filter(|r| !r.is_empty()).map(|r| format!(": {r}")).unwrap_or_default()
        ),
    ))
}

/// The agent's stream, past its answer.
pub type AgentStream = BufReader<TlsStream<TcpStream>>;

/// Finds the server's host, reaches its agent over mutual TLS and asks for the console.
/// Returns the open stream and the host's name.
pub async fn open(
    client: &Client,
    tls: Arc<ClientConfig>,
    namespace: &str,
    name: &str,
    force: bool,
) -> Result<(AgentStream, String), Refusal> {
    let unavailable = |message: String| Refusal::new(503, "ServiceUnavailable", message);
    let server = Api::<VirtualServer>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| unavailable(format!("reading virtualserver {namespace}/{name}: {e}")))?
        .ok_or_else(|| Refusal::new(404, "NotFound", format!("virtualservers.covi.io \"{name}\" not found")))?;
    let status = server.status.unwrap_or_default();
    let host = status.host.ok_or_else(|| {
        Refusal::new(
            409,
            "Conflict",
            format!(
                "virtualserver {namespace}/{name} is not on a host yet (phase {}); it has no console",
                status.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "unknown".into())
            ),
        )
    })?;
    let endpoint = Api::<Host>::all(client.clone())
        .get_opt(&host)
        .await
        .map_err(|e| unavailable(format!("reading host {host}: {e}")))?
        .and_then(|h| h.status?.console_endpoint)
        .ok_or_else(|| {
            unavailable(format!("the agent of host {host} serves no console (it runs without --console-addr)"))
        })?;
    let cannot_reach = |e: String| unavailable(format!("cannot reach the agent of host {host} at {endpoint}: {e}"));
    let exchange = async {
        let tcp = TcpStream::connect(&endpoint).await.map_err(|e| e.to_string())?;
        let sni = ServerName::try_from(AGENT_SERVER_NAME).map_err(|e| e.to_string())?;
        let stream = TlsConnector::from(tls).connect(sni, tcp).await.map_err(|e| e.to_string())?;
        let mut stream = BufReader::new(stream);
        let request = AgentRequest { namespace: namespace.into(), name: name.into(), force };
        let mut line = serde_json::to_string(&request).map_err(|e| e.to_string())?;
        line.push('\n');
        stream.write_all(line.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut answer = String::new();
        (&mut stream).take(4096).read_line(&mut answer).await.map_err(|e| e.to_string())?;
        let answer: AgentAnswer =
            serde_json::from_str(answer.trim()).map_err(|e| format!("unreadable answer {answer:?}: {e}"))?;
        Ok::<_, String>((stream, answer))
    };
    let (stream, answer) = tokio::time::timeout(AGENT_DEADLINE, exchange)
        .await
        .map_err(|_| cannot_reach(format!("no answer within {AGENT_DEADLINE:?}")))?
        .map_err(cannot_reach)?;
    match answer {
        AgentAnswer::Ok => Ok((stream, host)),
        AgentAnswer::Refused { code, reason, message } => Err(Refusal { code, reason, message }),
    }
}

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The user closed the WebSocket (or it broke).
    ByUser,
    /// The host side closed: the guest stopped, the agent went away, or another session
    /// took the console over.
    ByHost(String),
}

/// Copies console bytes between the user's WebSocket (channel protocol) and the agent
/// until either side ends. When the host side ends, the user is told why on the error
/// channel before the WebSocket closes.
pub async fn relay<S, A>(ws: WebSocketStream<S>, agent: A) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let (mut to_user, mut from_user) = ws.split();
    let (mut from_agent, mut to_agent) = tokio::io::split(agent);
    let mut buf = vec![0u8; 16 * 1024];
    let ended = loop {
        tokio::select! {
            read = from_agent.read(&mut buf[1..]) => match read {
                Ok(0) => break Ended::ByHost("the console closed on the host (the guest stopped, or another session took it over)".into()),
                Err(e) => break Ended::ByHost(format!("the host's agent went away: {e}")),
                Ok(n) => {
                    buf[0] = STDOUT;
                    if to_user.send(Message::Binary(Bytes::copy_from_slice(&buf[..=n]))).await.is_err() {
                        break Ended::ByUser;
                    }
                }
            },
            message = from_user.next() => match message {
                Some(Ok(Message::Binary(data))) => {
                    if data.first() == Some(&STDIN) && to_agent.write_all(&data[1..]).await.is_err() {
                        break Ended::ByHost("the host's agent went away".into());
                    }
                }
                // Pings are answered by the WebSocket layer; other channels (a terminal
                // resize) mean nothing to a serial line.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break Ended::ByUser,
                Some(Ok(_)) => {}
            },
        }
    };
    let _ = to_agent.shutdown().await;
    if let Ended::ByHost(message) = &ended {
        let mut frame = vec![ERROR];
        frame.extend(route::status(410, "Gone", message).to_string().into_bytes());
        let _ = to_user.send(Message::Binary(Bytes::from(frame))).await;
    }
    let _ = to_user.send(Message::Close(None)).await;
    ended
}
