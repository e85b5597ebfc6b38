//! The agent's one error type. Variant names double as metric labels.

/// What went wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),

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
            Error::Kube(_) => "kube",
            Error::Libvirt(_) => "libvirt",
            Error::Seed(_) => "seed",
            Error::Join(_) => "join",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
