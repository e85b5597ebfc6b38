//! The fencing watchdog's own libvirt connection. It shares nothing with the agent's
//! work: a fence never queues behind a clone or a migration on the same connection
//! (libvirtd limits requests per client), and a libvirtd restart is noticed and the
//! connection reopened within a second.

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

use crate::domain_xml::ownership;
use crate::error::{Error, Result};
use crate::libvirt::is;

/// A connection that reopens itself.
pub struct FencingLink {
    uri: String,
    conn: Option<Arc<Connect>>,
    /// Whether this link opens its own connection. libvirt's test driver keeps each
    /// connection's domains apart, so there the agent's own connection is shared.
    own: bool,
}

impl FencingLink {
    /// Opens nothing yet: the first `reachable` does (or, on the test driver, `share`).
    pub fn new(uri: &str) -> FencingLink {
        FencingLink { uri: uri.to_string(), conn: None, own: !uri.starts_with("test:") }
    }

    /// Gives the link the agent's connection, where it cannot have its own.
    pub fn share(&mut self, conn: Arc<Connect>) {
        if !self.own {
            self.conn = Some(conn);
        }
    }

    /// Whether the link opens its own connection, or has been given the agent's.
    pub fn connected_or_own(&self) -> bool {
        self.own || self.conn.is_some()
    }

    /// Whether libvirt answers, reopening the connection when it was closed.
    pub fn reachable(&mut self) -> bool {
        if self.conn.as_ref().is_some_and(|c| c.is_alive().unwrap_or(false)) {
            return true;
        }
        if !self.own {
            return false;
        }
        // Dropping the dead connection closes it.
        self.conn = None;
        match Connect::open(Some(&self.uri)) {
            Ok(c) => {
                self.conn = Some(Arc::new(c));
                true
            }
            Err(e) => {
                tracing::debug!(uri = %self.uri, error = %e, "libvirt unreachable");
                false
            }
        }
    }

    /// Destroys every active covi domain, all at once, each on a thread of its own;
    /// returns how many it destroyed. An error when libvirt is unreachable, when a
    /// domain's ownership cannot be read (it may be covi's), when a destroy fails, or
    /// when the destroys are not done within `deadline`: the watchdog tries again.
    pub fn fence(&mut self, deadline: Duration) -> Result<usize> {
        if !self.reachable() {
            return Err(Error::Unreachable(self.uri.clone()));
        }
        let conn = self.conn.as_ref().expect("reachable means connected");
        let mut owned = Vec::new();
        for dom in conn.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)? {
            match dom.xml_desc(0) {
                Ok(xml) if ownership(&xml).is_some() => owned.push(dom),
                Ok(_) => {}
                Err(e) if is(&e, ErrorNumber::NoDomain) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let count = owned.len();
        let (done, results) = mpsc::channel();
        for dom in owned {
            let done = done.clone();
            std::thread::spawn(move || {
                let _ = done.send(destroy(&dom));
            });
        }
        drop(done);
        let until = Instant::now() + deadline;
        let mut destroyed = 0;
        for _ in 0..count {
            let left = until.saturating_duration_since(Instant::now());
            match results.recv_timeout(left) {
                Ok(Ok(true)) => destroyed += 1,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::Timeout { what: "destroying every covi domain", after: deadline });
                }
            }
        }
        Ok(destroyed)
    }
}

/// Destroys one domain; `false` when it was already off or gone.
fn destroy(dom: &Domain) -> Result<bool> {
    match dom.destroy() {
        Ok(()) => Ok(true),
        Err(e) if is(&e, ErrorNumber::OperationInvalid) || is(&e, ErrorNumber::NoDomain) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
