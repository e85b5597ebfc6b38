//! The servers bound to this host, learnt from its Assignment (see
//! [`covi_api::assignment`]): one watched object, dispatched by the API server to
//! this agent alone, instead of a watch of every VirtualServer filtered by host.
//!
//! The Assignment's events become the watcher events of a server cache, so the
//! reflector, the controller and every reader of the cache stay as they were:
//!
//! - Each (re)list of the Assignment reads every server it names (one GET each) and
//!   replaces the cache with them: `Init`, `InitApply`…, `InitDone`. The host's
//!   standing is taken at the Assignment's `Init`, before any of those reads.
//! - Afterwards a server is read again only when its digest in the Assignment differs
//!   from the digest of the copy in the cache: someone else changed it.
//! - A server that leaves the Assignment is read too, and leaves the cache when that
//!   read finds it gone or bound elsewhere.
//! - The answers to the agent's own writes go into the cache as they are ([`Seen`]),
//!   so it never lags behind what the agent wrote itself.
//!
//! Copies only ever move forward: a copy older than the cached one (a read answered
//! after a later write) is dropped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use covi_api::assignment::{Assigned, digest};
use covi_api::{Assignment, VirtualServer};
use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::fence::{Fence, Listing};

/// Where the agent hands the server its write returned.
pub type Seen = UnboundedSender<VirtualServer>;

/// Reads of servers at once.
const READS_AT_ONCE: usize = 8;

/// Pause before a failed read is tried again (it doubles up to [`READ_RETRY_MAX`]).
const READ_RETRY: Duration = Duration::from_millis(500);
const READ_RETRY_MAX: Duration = Duration::from_secs(10);

type ServerEvent = Result<watcher::Event<VirtualServer>, watcher::Error>;

/// The server cache's events for host `node`, from the first renewal on, and the
/// sender of the agent's own writes.
pub fn servers(
    client: Client,
    node: String,
    fence: Arc<Fence>,
    listing: Arc<Listing>,
) -> (impl Stream<Item = ServerEvent>, Seen) {
    let (events, out) = unbounded_channel();
    let (seen, own) = unbounded_channel();
    let follower = Follower {
        client,
        node,
        out: events,
        versions: HashMap::new(),
        listed: HashMap::new(),
        copies: HashMap::new(),
    };
    tokio::spawn(follower.run(fence, listing, own));
    (UnboundedReceiverStream::new(out), seen)
}

struct Follower {
    client: Client,
    node: String,
    out: UnboundedSender<ServerEvent>,
    /// The newest version of each server sent into the cache or seen gone or bound
    /// elsewhere, by UID: kept for good (a few bytes per server ever bound here).
    versions: HashMap<String, u64>,
    /// The Assignment's entries as last seen, by UID.
    listed: HashMap<String, Assigned>,
    /// The copy of each server last sent into the cache, by UID.
    copies: HashMap<String, VirtualServer>,
}

impl Follower {
    async fn run(mut self, fence: Arc<Fence>, listing: Arc<Listing>, mut own: UnboundedReceiver<VirtualServer>) {
        // Nothing starts before the first renewal anyway; a list from before it would
        // vouch for nothing.
        fence.first_renewal().await;
        let api: Api<Assignment> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.node));
        let mut assignments = watcher(api, config).default_backoff().boxed();
        let mut initial: Option<Assignment> = None;
        loop {
            tokio::select! {
                event = assignments.next() => match event {
                    None => return,
                    Some(Err(e)) => tracing::debug!(error = %e, "watching the Assignment"),
                    Some(Ok(watcher::Event::Init)) => {
                        listing.init(&fence);
                        initial = None;
                    }
                    Some(Ok(watcher::Event::InitApply(a))) => initial = Some(a),
                    Some(Ok(watcher::Event::InitDone)) => {
                        self.relist(entries(initial.take())).await;
                        listing.init_done();
                    }
                    Some(Ok(watcher::Event::Apply(a))) => self.follow(entries(Some(a))).await,
                    Some(Ok(watcher::Event::Delete(_))) => self.follow(Vec::new()).await,
                },
                Some(server) = own.recv() => self.own(server),
            }
            if self.out.is_closed() {
                return;
            }
        }
    }

    /// A new list: every server named is read, and the cache replaced by them.
    async fn relist(&mut self, entries: Vec<Assigned>) {
        let read = self.read_all(&entries).await;
        tracing::debug!(
            listed = entries.len(),
            bound = read.iter().filter(|r| matches!(r, Read::Here(_))).count(),
            "listing the servers of the Assignment"
        );
        let _ = self.out.send(Ok(watcher::Event::Init));
        let before = std::mem::take(&mut self.copies);
        for server in read {
            match server {
                Read::Here(server) => {
                    // An answer to the agent's own write can be newer than this read.
                    let newest =
                        before.get(&server.uid().unwrap_or_default()).filter(|c| version(c) > version(&server));
                    self.send_newer(newest.cloned().unwrap_or(server), true);
                }
                other => self.note(&other),
            }
        }
        let _ = self.out.send(Ok(watcher::Event::InitDone));
        self.listed = entries.into_iter().map(|e| (e.uid.clone(), e)).collect();
    }

    /// A changed Assignment: servers that left go, and those whose digest differs from
    /// the cached copy's are read again. A server leaves the cache only on a read that
    /// finds it gone or bound elsewhere, whose version is kept: an answer to one of the
    /// agent's own writes from before that read can never bring it back.
    async fn follow(&mut self, entries: Vec<Assigned>) {
        let uids: HashSet<&str> = entries.iter().map(|e| e.uid.as_str()).collect();
        let mut stale: Vec<Assigned> =
            self.listed.values().filter(|e| !uids.contains(e.uid.as_str())).cloned().collect();
        stale.extend(
            entries
                .iter()
                .filter(|e| self.listed.get(&e.uid).is_none_or(|before| before.digest != e.digest))
                .filter(|e| self.cached(e).is_none_or(|s| digest(s) != e.digest))
                .cloned(),
        );
        let read = self.read_all(&stale).await;
        tracing::debug!(listed = entries.len(), read = stale.len(), "following the Assignment");
        for (entry, server) in stale.iter().zip(read) {
            match server {
                Read::Here(server) => self.send_newer(server, false),
                other => {
                    self.note(&other);
                    self.forget(entry);
                }
            }
        }
        self.listed = entries.into_iter().map(|e| (e.uid.clone(), e)).collect();
    }

    /// Keeps the version at which a server was seen gone or bound elsewhere.
    fn note(&mut self, read: &Read) {
        let (uid, version) = match read {
            Read::Here(_) => return,
            Read::Elsewhere(server) => (
                server.uid().unwrap_or_default(),
                server.resource_version().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0),
            ),
            // UIDs are never reused: nothing of this one may come back.
            Read::Gone(uid) => (uid.clone(), u64::MAX),
        };
        let newest = self.versions.entry(uid).or_insert(0);
        *newest = (*newest).max(version);
    }

    /// The copy last sent into the cache (the cache itself may not have taken it yet).
    fn cached(&self, entry: &Assigned) -> Option<&VirtualServer> {
        self.copies.get(&entry.uid)
    }

    /// The server leaves the cache (it is no longer bound here).
    fn forget(&mut self, entry: &Assigned) {
        if let Some(server) = self.copies.remove(&entry.uid) {
            tracing::debug!(server = %entry.name, "no longer bound here");
            let _ = self.out.send(Ok(watcher::Event::Delete(server)));
        }
    }

    /// A server the agent wrote or read itself: into the cache if bound here, out of it
    /// otherwise.
    fn own(&mut self, server: VirtualServer) {
        let uid = server.uid().unwrap_or_default();
        if server.status.as_ref().and_then(|s| s.host.as_deref()) == Some(self.node.as_str()) {
            return self.send_newer(server, false);
        }
        if version(&server) >= self.versions.get(&uid).copied().unwrap_or(0) {
            let entry = Assigned::of(&server);
            self.note(&Read::Elsewhere(server));
            self.forget(&entry);
        }
    }

    /// Sends `server` into the cache unless a newer copy of it is there already.
    fn send_newer(&mut self, server: VirtualServer, initial: bool) {
        let uid = server.uid().unwrap_or_default();
        let version = server.resource_version().and_then(|v| v.parse::<u64>().ok());
        // Only a server bound here enters the cache (an answer to the agent's own write
        // may come after a move the agent has not heard of: its version tells).
        if server.status.as_ref().and_then(|s| s.host.as_deref()) != Some(self.node.as_str()) {
            return;
        }
        if let (Some(v), Some(newest)) = (version, self.versions.get(&uid))
            && v < *newest
        {
            tracing::debug!(server = %server.name_any(), version = v, newest, "dropping an older copy");
            return;
        }
        tracing::debug!(server = %server.name_any(), version = ?version, initial, "into the cache");
        if let Some(v) = version {
            self.versions.insert(uid.clone(), v);
        }
        self.copies.insert(uid, server.clone());
        let event = if initial { watcher::Event::InitApply(server) } else { watcher::Event::Apply(server) };
        let _ = self.out.send(Ok(event));
    }

    /// Each entry's server as the API server has it now, if it is still bound here
    /// (None: deleted, replaced, or bound elsewhere). A failed read is tried again.
    async fn read_all(&self, entries: &[Assigned]) -> Vec<Read> {
        let reads: Vec<_> =
            entries.iter().map(|entry| read(self.client.clone(), self.node.clone(), entry.clone())).collect();
        futures::stream::iter(reads).buffered(READS_AT_ONCE).collect().await
    }
}

/// A server as a read found it.
enum Read {
    /// Bound to this host.
    Here(VirtualServer),
    /// Bound elsewhere, or to no host.
    Elsewhere(VirtualServer),
    /// Deleted (by UID: another server may have its name now).
    Gone(String),
}

/// The entry's server as the API server has it now. A failed read is tried again.
async fn read(client: Client, node: String, entry: Assigned) -> Read {
    let api: Api<VirtualServer> = Api::namespaced(client, &entry.namespace);
    let mut pause = READ_RETRY;
    loop {
        match api.get_opt(&entry.name).await {
            Ok(Some(s)) if s.uid().as_deref() == Some(entry.uid.as_str()) => {
                let here = s.status.as_ref().and_then(|st| st.host.as_deref()) == Some(node.as_str());
                return if here { Read::Here(s) } else { Read::Elsewhere(s) };
            }
            Ok(_) => return Read::Gone(entry.uid),
            Err(e) => {
                let server = format!("{}/{}", entry.namespace, entry.name);
                tracing::warn!(%server, error = %e, ?pause, "reading an assigned server failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(READ_RETRY_MAX);
            }
        }
    }
}

fn version(server: &VirtualServer) -> u64 {
    server.resource_version().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn entries(assignment: Option<Assignment>) -> Vec<Assigned> {
    assignment.map(|a| a.spec.servers).unwrap_or_default()
}
