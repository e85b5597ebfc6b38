//! One pool as a scheduling pass sees it: built once per pool per pass and read by the
//! scheduler, the migration planner and status, so each need not be handed the same
//! pack of snapshots.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use covi_api::{Host, HostPool, VirtualServer};

/// A binding written to the API but perhaps not yet seen by the watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assumed {
    pub host: String,
    pub address: Option<Ipv4Addr>,
}

/// One pool in one pass.
pub struct PoolView<'a> {
    pub pool: &'a HostPool,
    /// The pool's hosts.
    pub hosts: Vec<Arc<Host>>,
    /// The servers that name the pool.
    pub servers: Vec<Arc<VirtualServer>>,
    /// Bindings this leader wrote that the store may not show yet, by server UID.
    pub assumed: &'a HashMap<String, Assumed>,
    /// Hosts whose Lease is not fresh: not schedulable.
    pub unready: &'a BTreeSet<String>,
    /// Hosts declared lost: their servers may run elsewhere.
    pub lost: &'a BTreeSet<String>,
}
