//! The serial console's contract. A user's `kubectl covi console` goes through the
//! Kubernetes API server, which authenticates the user, checks RBAC on the subresource
//! `virtualservers/console` of the aggregated group below, and proxies the WebSocket to
//! covi-operator; the operator relays it over mutual TLS to the agent on the server's
//! host, which opens the domain's console through libvirt. Both ends of every hop are
//! authenticated: user ↔ API server (kubeconfig), API server ↔ operator (the front
//! proxy's client certificate, the operator's serving certificate in the APIService's
//! caBundle), operator ↔ agent (certificates of covi's console CA).

/// The aggregated API group that serves consoles; never stored, only proxied.
pub const GROUP: &str = "subresources.covi.io";
pub const VERSION: &str = "v1alpha1";
/// The APIService that registers the group with the API server.
pub const API_SERVICE: &str = "v1alpha1.subresources.covi.io";
/// The resource and subresource RBAC rules name: `virtualservers/console`, verb `get`.
pub const RESOURCE: &str = "virtualservers";
pub const SUBRESOURCE: &str = "console";
/// WebSocket subprotocol: Kubernetes' channel protocol, as `kubectl exec` speaks it.
/// Every binary message starts with its channel: [`STDIN`] to the guest, [`STDOUT`]
/// from it, [`ERROR`] a `metav1.Status` saying why the session ended.
pub const PROTOCOL: &str = "v4.channel.k8s.io";
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const ERROR: u8 = 3;

/// Secret (operator namespace) holding covi's console CA; written once by the operator.
pub const CA_SECRET: &str = "covi-console-ca";
/// Secret (operator namespace) holding the agents' serving certificate and the CA;
/// written by the operator, read by agents.
pub const AGENT_SECRET: &str = "covi-console-agent";
/// The name every agent's console certificate carries and the operator verifies.
/// Agents share one certificate: it proves "a covi agent", the Host's status says where.
pub const AGENT_SERVER_NAME: &str = "covi-agent.console.covi.io";
/// The common name of the operator's client certificate, the one agents accept.
pub const OPERATOR_CLIENT_NAME: &str = "covi-operator";

/// The URL path of a server's console on the API server.
pub fn path(namespace: &str, name: &str) -> String {
    format!("/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{RESOURCE}/{name}/{SUBRESOURCE}")
}

/// What the operator asks an agent for: one line of JSON, then raw console bytes both
/// ways once the agent answers [`AgentAnswer::Ok`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentRequest {
    pub namespace: String,
    pub name: String,
    /// Take the console over from another session (as `virsh console --force`).
    #[serde(default)]
    pub force: bool,
}

/// The agent's one-line JSON answer to an [`AgentRequest`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum AgentAnswer {
    Ok,
    /// `code` is the HTTP status the user sees (404 no such server here, 409 not
    /// running or console busy, 500 libvirt failed).
    Refused {
        code: u16,
        reason: String,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_answers() {
        assert_eq!(
            path("team-a", "web-1"),
            "/apis/subresources.covi.io/v1alpha1/namespaces/team-a/virtualservers/web-1/console"
        );
        let refused = AgentAnswer::Refused { code: 409, reason: "NotRunning".into(), message: "stopped".into() };
        let line = serde_json::to_string(&refused).unwrap();
        assert_eq!(line, r#"{"result":"refused","code":409,"reason":"NotRunning","message":"stopped"}"#);
        assert_eq!(serde_json::from_str::<AgentAnswer>(r#"{"result":"ok"}"#).unwrap(), AgentAnswer::Ok);
    }
}
