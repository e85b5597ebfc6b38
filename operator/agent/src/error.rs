//! The agent's one error type. Variant names double as metric labels.

/// What went wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag, environment setting or local file the agent was pointed at is wrong.
    #[error("configuration: {0}")]
    Config(String),

    /// Something did not happen in time: a Lease renewal, fencing's destroys.
    #[error("{what}: no result within {after:?}")]
    Timeout { what: &'static str, after: std::time::Duration },

    /// libvirt does not answer at all (the daemon is down or its socket gone).
    #[error("libvirt at {0} is unreachable")]
    Unreachable(String),

    /// The /metrics and /healthz endpoint, or the console, could not listen.
    #[error("listening on {addr}: {source}")]
    Serve { addr: std::net::SocketAddr, source: std::io::Error },

    /// A watch failed before its cache was filled.
    #[error("watching {what}: {source}")]
    Watch { what: &'static str, source: kube::runtime::reflector::store::WriterDropped },

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("libvirt: {0}")]
    Libvirt(#[from] virt::error::Error),

    #[error("building the cloud-init seed ISO: {0}")]
    Seed(String),

    #[error("a libvirt worker thread failed: {0}")]
    Join(String),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Timeout { .. } => "timeout",
            Error::Unreachable(_) => "unreachable",
            Error::Serve { .. } => "serve",
            Error::Watch { .. } => "watch",
            Error::Kube(_) => "kube",
            Error::Libvirt(_) => "libvirt",
            Error::Seed(_) => "seed",
            Error::Join(_) => "join",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
