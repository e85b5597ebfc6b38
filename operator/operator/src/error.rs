//! The operator's one error type: each variant says what failed. Variant names double
//! as metric labels.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or environment setting is wrong.
    #[error("configuration: {0}")]
    Config(String),

    /// No Kubernetes client could be built (kubeconfig, in-cluster settings).
    #[error("Kubernetes client: {0}")]
    Client(String),

    /// The /metrics and /healthz endpoint could not listen.
    #[error("serving metrics on {addr}: {source}")]
    Serve { addr: std::net::SocketAddr, source: std::io::Error },

    /// This replica stopped leading (Lease lost or election ended): it exits so a
    /// fresh one stands by.
    #[error("leadership: {0}")]
    Leadership(&'static str),

    /// A watch ended before its cache was filled.
    #[error("the watch of {0} ended before it synced")]
    WatchEnded(&'static str),

    /// A VmRequest's template does not make a VirtualServer.
    #[error("server from the template of {request}: {message}")]
    Template { request: String, message: String },

    /// A write to the API server failed; `what` names the write and its object.
    #[error("{what}: {source}")]
    Write { what: String, source: kube::Error },

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Client(_) => "client",
            Error::Serve { .. } => "serve",
            Error::Leadership(_) => "leadership",
            Error::WatchEnded(_) => "watch_ended",
            Error::Template { .. } => "template",
            Error::Write { .. } => "write",
            Error::Kube(_) => "kube",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
