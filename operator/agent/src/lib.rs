//! covi-agent: runs on every hypervisor host and converges its libvirt domains to the
//! VirtualServers bound to the host.

pub mod assigned;
pub mod config;
pub mod console;
pub mod converge;
pub mod domain_xml;
pub mod error;
pub mod fault;
pub mod fence;
pub mod host;
pub mod libvirt;
pub mod metrics;
pub mod reconcile;
pub mod run;
pub mod seed;
pub mod server;
pub mod sweep;
pub mod usage;
