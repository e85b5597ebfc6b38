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
//!   so it never lags behind what the agent wrote itself; one that shows the server
//!   bound elsewhere takes it out.
//!
//! Copies only ever move forward: a copy older than one sent before, or than the
//! version a server was seen gone or bound elsewhere at, is dropped. [`Book`] keeps that
//! account without I/O; [`Follower`] does the watching and reading.

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
    let follower = Follower { client, out: events, book: Book::new(node) };
    tokio::spawn(follower.run(fence, listing, own));
    (UnboundedReceiverStream::new(out), seen)
}

/// A server as a read found it.
#[derive(Clone, Debug)]
pub enum Read {
    /// Bound to this host.
    Here(VirtualServer),
    /// Bound elsewhere, or to no host.
    Elsewhere(VirtualServer),
    /// Deleted (by UID: another server may have its name now).
    Gone(String),
}

/// The account of what went into the server cache: which copies, up to which
/// versions, and what the Assignment said last. Every method returns the cache's
/// events in the order they must be applied.
pub struct Book {
    node: String,
    /// The newest version of each server sent into the cache or seen gone or bound
    /// elsewhere, by UID: kept for good (a few bytes per server ever bound here).
    versions: HashMap<String, u64>,
    /// The Assignment's entries as last seen, by UID.
    listed: HashMap<String, Assigned>,
    /// The copy of each server last sent into the cache, by UID (the cache itself may
    /// not have taken it yet).
    copies: HashMap<String, VirtualServer>,
}

impl Book {
    pub fn new(node: String) -> Book {
        Book { node, versions: HashMap::new(), listed: HashMap::new(), copies: HashMap::new() }
    }

    /// The servers of a changed Assignment to read: those that left it, and those whose
    /// digest changed and differs from the cached copy's.
    pub fn to_read(&self, entries: &[Assigned]) -> Vec<Assigned> {
        let uids: HashSet<&str> = entries.iter().map(|e| e.uid.as_str()).collect();
        let mut stale: Vec<Assigned> =
            self.listed.values().filter(|e| !uids.contains(e.uid.as_str())).cloned().collect();
        stale.extend(
            entries
                .iter()
                .filter(|e| self.listed.get(&e.uid).is_none_or(|before| before.digest != e.digest))
                .filter(|e| self.copies.get(&e.uid).is_none_or(|s| digest(s) != e.digest))
                .cloned(),
        );
        stale
    }

    /// A new list of the Assignment, `entries`, with a read of each: the cache is
    /// replaced by the servers bound here.
    pub fn relisted(&mut self, entries: Vec<Assigned>, reads: Vec<Read>) -> Vec<watcher::Event<VirtualServer>> {
        let mut events = vec![watcher::Event::Init];
        let before = std::mem::take(&mut self.copies);
        for read in reads {
            match read {
                Read::Here(server) => {
                    // An answer to the agent's own write can be newer than this read.
                    let newer = before.get(&server.uid().unwrap_or_default()).filter(|c| version(c) > version(&server));
                    events.extend(self.send_newer(newer.cloned().unwrap_or(server), true));
                }
                other => self.note(&other),
            }
        }
        events.push(watcher::Event::InitDone);
        self.listed = entries.into_iter().map(|e| (e.uid.clone(), e)).collect();
        events
    }

    /// A changed Assignment, `entries`, and the reads of [`Book::to_read`]'s servers.
    pub fn followed(
        &mut self,
        entries: Vec<Assigned>,
        read: &[Assigned],
        reads: Vec<Read>,
    ) -> Vec<watcher::Event<VirtualServer>> {
        let mut events = Vec::new();
        for (entry, found) in read.iter().zip(reads) {
            match found {
                Read::Here(server) => events.extend(self.send_newer(server, false)),
                other => {
                    self.note(&other);
                    events.extend(self.forget(&entry.uid));
                }
            }
        }
        self.listed = entries.into_iter().map(|e| (e.uid.clone(), e)).collect();
        events
    }

    /// A server the agent wrote or read itself: into the cache if bound here and newer,
    /// out of it if bound elsewhere.
    pub fn own(&mut self, server: VirtualServer) -> Vec<watcher::Event<VirtualServer>> {
        if self.bound_here(&server) {
            return self.send_newer(server, false).into_iter().collect();
        }
        let uid = server.uid().unwrap_or_default();
        if version(&server) < self.versions.get(&uid).copied().unwrap_or(0) {
            return Vec::new();
        }
        self.note(&Read::Elsewhere(server));
        self.forget(&uid).into_iter().collect()
    }

    fn bound_here(&self, server: &VirtualServer) -> bool {
        server.bound_to(&self.node)
    }

    /// Keeps the version at which a server was seen gone or bound elsewhere.
    fn note(&mut self, read: &Read) {
        let (uid, seen_at) = match read {
            Read::Here(_) => return,
            Read::Elsewhere(server) => (server.uid().unwrap_or_default(), version(server)),
            // UIDs are never reused: nothing of this one may come back.
            Read::Gone(uid) => (uid.clone(), u64::MAX),
        };
        let newest = self.versions.entry(uid).or_insert(0);
        *newest = (*newest).max(seen_at);
    }

    /// The server leaves the cache (it is no longer bound here).
    fn forget(&mut self, uid: &str) -> Option<watcher::Event<VirtualServer>> {
        let server = self.copies.remove(uid)?;
        tracing::debug!(server = %server.name_any(), "no longer bound here");
        Some(watcher::Event::Delete(server))
    }

    /// `server` into the cache, if bound here and not older than what was sent or
    /// seen of it before.
    fn send_newer(&mut self, server: VirtualServer, initial: bool) -> Option<watcher::Event<VirtualServer>> {
        if !self.bound_here(&server) {
            return None;
        }
        let uid = server.uid().unwrap_or_default();
        let v = version(&server);
        if let Some(newest) = self.versions.get(&uid)
            && v < *newest
        {
            tracing::debug!(server = %server.name_any(), version = v, newest, "dropping an older copy");
            return None;
        }
        tracing::debug!(server = %server.name_any(), version = v, initial, "into the cache");
        self.versions.insert(uid.clone(), v);
        self.copies.insert(uid, server.clone());
        Some(if initial { watcher::Event::InitApply(server) } else { watcher::Event::Apply(server) })
    }
}

/// Watches the host's Assignment, reads the servers it names, and feeds the cache.
struct Follower {
    client: Client,
    out: UnboundedSender<ServerEvent>,
    book: Book,
}

impl Follower {
    async fn run(mut self, fence: Arc<Fence>, listing: Arc<Listing>, mut own: UnboundedReceiver<VirtualServer>) {
        // Nothing starts before the first renewal anyway; a list from before it would
        // vouch for nothing.
        fence.first_renewal().await;
        let api: Api<Assignment> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.book.node));
        let mut assignments = watcher(api, config).default_backoff().boxed();
        let mut initial: Option<Assignment> = None;
        loop {
            let events = tokio::select! {
                event = assignments.next() => match event {
                    None => return,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "watching the Assignment");
                        Vec::new()
                    }
                    Some(Ok(watcher::Event::Init)) => {
                        listing.init(&fence);
                        initial = None;
                        Vec::new()
                    }
                    Some(Ok(watcher::Event::InitApply(a))) => {
                        initial = Some(a);
                        Vec::new()
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        let entries = entries(initial.take());
                        let reads = self.read_all(&entries).await;
                        tracing::debug!(listed = entries.len(), "listed the servers of the Assignment");
                        let events = self.book.relisted(entries, reads);
                        self.send(events);
                        listing.init_done();
                        Vec::new()
                    }
                    Some(Ok(watcher::Event::Apply(a))) => self.follow(entries(Some(a))).await,
                    Some(Ok(watcher::Event::Delete(_))) => self.follow(Vec::new()).await,
                },
                Some(server) = own.recv() => self.book.own(server),
            };
            self.send(events);
            if self.out.is_closed() {
                return;
            }
        }
    }

    async fn follow(&mut self, entries: Vec<Assigned>) -> Vec<watcher::Event<VirtualServer>> {
        let stale = self.book.to_read(&entries);
        let reads = self.read_all(&stale).await;
        tracing::debug!(listed = entries.len(), read = stale.len(), "following the Assignment");
        self.book.followed(entries, &stale, reads)
    }

    fn send(&self, events: Vec<watcher::Event<VirtualServer>>) {
        for event in events {
            let _ = self.out.send(Ok(event));
        }
    }

    async fn read_all(&self, entries: &[Assigned]) -> Vec<Read> {
        let reads: Vec<_> =
            entries.iter().map(|entry| read(self.client.clone(), self.book.node.clone(), entry.clone())).collect();
        futures::stream::iter(reads).buffered(READS_AT_ONCE).collect().await
    }
}

/// The entry's server as the API server has it now. A failed read is tried again.
async fn read(client: Client, node: String, entry: Assigned) -> Read {
    let api: Api<VirtualServer> = Api::namespaced(client, &entry.namespace);
    let mut pause = READ_RETRY;
    loop {
        match api.get_opt(&entry.name).await {
            Ok(Some(s)) if s.uid().as_deref() == Some(entry.uid.as_str()) => {
                return if s.bound_to(&node) { Read::Here(s) } else { Read::Elsewhere(s) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(name: &str, version: u64, host: &str) -> VirtualServer {
        serde_json::from_value(json!({
            "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                         "resourceVersion": version.to_string(), "generation": 1},
            "spec": {"hostPool": "p", "class": "small", "boot": {"image": "debian"}, "owner": "o", "purpose": "p"},
            "status": {"host": host}
        }))
        .unwrap()
    }

    fn names(events: &[watcher::Event<VirtualServer>]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                watcher::Event::Init => "init".to_string(),
                watcher::Event::InitDone => "done".to_string(),
                watcher::Event::InitApply(s) => format!("list {}@{}", s.name_any(), version(s)),
                watcher::Event::Apply(s) => format!("apply {}@{}", s.name_any(), version(s)),
                watcher::Event::Delete(s) => format!("delete {}", s.name_any()),
            })
            .collect()
    }

    /// A book that has listed `a` at version 10 on h1.
    fn listed() -> Book {
        let mut book = Book::new("h1".into());
        let a = server("a", 10, "h1");
        let events = book.relisted(vec![Assigned::of(&a)], vec![Read::Here(a)]);
        assert_eq!(names(&events), ["init", "list a@10", "done"]);
        book
    }

    #[test]
    fn a_late_answer_to_an_own_write_cannot_bring_back_a_server_that_moved() {
        let mut book = listed();
        // The operator moved it to h2 at version 12; the Assignment dropped it.
        let read = book.to_read(&[]);
        assert_eq!(read.len(), 1, "a server that left the Assignment is read");
        let events = book.followed(vec![], &read, vec![Read::Elsewhere(server("a", 12, "h2"))]);
        assert_eq!(names(&events), ["delete a"]);
        // The answer to a write this agent sent before the move arrives now.
        assert!(book.own(server("a", 11, "h1")).is_empty());
        // Nor does an older read of a deleted server come back.
        let b = server("b", 20, "h1");
        book.followed(vec![Assigned::of(&b)], &[Assigned::of(&b)], vec![Read::Here(b.clone())]);
        book.followed(vec![], &[Assigned::of(&b)], vec![Read::Gone("uid-b".into())]);
        assert!(book.own(server("b", 25, "h1")).is_empty(), "a deleted server's UID never comes back");
    }

    #[test]
    fn an_own_answer_that_shows_the_server_elsewhere_takes_it_out() {
        let mut book = listed();
        assert_eq!(names(&book.own(server("a", 11, "h1"))), ["apply a@11"]);
        assert_eq!(names(&book.own(server("a", 13, "h2"))), ["delete a"]);
        assert!(book.own(server("a", 12, "h1")).is_empty(), "older than what showed it elsewhere");
        // Moved back later: a newer copy bound here enters again.
        assert_eq!(names(&book.own(server("a", 20, "h1"))), ["apply a@20"]);
    }

    #[test]
    fn a_relist_keeps_an_own_answer_newer_than_its_read() {
        let mut book = listed();
        book.own(server("a", 15, "h1"));
        let a = server("a", 14, "h1");
        let events = book.relisted(vec![Assigned::of(&a)], vec![Read::Here(a)]);
        assert_eq!(names(&events), ["init", "list a@15", "done"]);
    }

    #[test]
    fn only_changes_by_others_are_read() {
        let mut book = listed();
        let a = server("a", 10, "h1");
        assert!(book.to_read(&[Assigned::of(&a)]).is_empty(), "the same digest: nothing to read");
        // The agent's own answer is in the cache; the Assignment names the same digest.
        let mut running = server("a", 11, "h1");
        running.status.as_mut().unwrap().phase = Some(covi_api::virtual_server::VirtualServerPhase::Running);
        book.own(running.clone());
        assert!(book.to_read(&[Assigned::of(&running)]).is_empty());
        // Someone else changed the spec: read it.
        let mut changed = server("a", 12, "h1");
        changed.spec.hostname = Some("web".into());
        assert_eq!(book.to_read(&[Assigned::of(&changed)]).len(), 1);
        // A read that still finds it here keeps it; a new server is read too.
        let b = server("b", 3, "h1");
        let entries = vec![Assigned::of(&changed), Assigned::of(&b)];
        let read = book.to_read(&entries);
        assert_eq!(read.len(), 2);
        let events = book.followed(entries, &read, vec![Read::Here(changed), Read::Here(b)]);
        assert_eq!(names(&events), ["apply a@12", "apply b@3"]);
    }

    #[test]
    fn a_read_of_a_server_bound_elsewhere_never_enters() {
        let mut book = Book::new("h1".into());
        let a = server("a", 10, "h2");
        // The Assignment lags behind a move: it still names a, the read finds it on h2.
        let events = book.relisted(vec![Assigned::of(&a)], vec![Read::Elsewhere(a)]);
        assert_eq!(names(&events), ["init", "done"]);
    }
}
