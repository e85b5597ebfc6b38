//! What each host's Assignment should list: the servers whose `status.host` names it,
//! with their digests ([`covi_api::assignment::digest`]), and which Assignments must
//! be written for that.
//!
//! Kept up to date from the servers' versions rather than rebuilt: the operator looks
//! after every change of any server, and at twenty thousand servers rebuilding every
//! list (cloned, sorted and compared) on each look took a core through a burst.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use covi_api::assignment::Assigned;
use covi_api::{Assignment, AssignmentSpec, VirtualServer};
use kube::ResourceExt;

/// Every host's list of servers, as the servers say it should be.
#[derive(Default)]
pub struct Board {
    /// Each server by UID: the version last looked at, its host and its entry.
    servers: HashMap<String, Placed>,
    /// Each host's entries, ordered by namespace and name (a host without servers is
    /// absent).
    hosts: HashMap<String, BTreeSet<Assigned>>,
    /// Which look this is: a server not seen in the latest is gone.
    round: u64,
}

struct Placed {
    version: String,
    host: Option<String>,
    entry: Assigned,
    round: u64,
}

impl Board {
    /// Takes in the servers as they are now and returns the hosts whose list changed.
    /// A server is serialised and hashed again only when its version changed.
    pub fn update(&mut self, servers: &[Arc<VirtualServer>]) -> BTreeSet<String> {
        self.round += 1;
        let round = self.round;
        let mut changed = BTreeSet::new();
        for server in servers {
            let (uid, version) = (server.uid().unwrap_or_default(), server.resource_version().unwrap_or_default());
            if let Some(placed) = self.servers.get_mut(&uid)
                && placed.version == version
            {
                placed.round = round;
                continue;
            }
            let host = server.status.as_ref().and_then(|s| s.host.clone());
            let entry = Assigned::of(server);
            let placed = Placed { version, host: host.clone(), entry: entry.clone(), round };
            if let Some(old) = self.servers.insert(uid, placed) {
                if old.host == host && old.entry == entry {
                    continue;
                }
                self.remove(old, &mut changed);
            }
            if let Some(host) = host {
                self.hosts.entry(host.clone()).or_default().insert(entry);
                changed.insert(host);
            }
        }
        let gone: Vec<String> = self.servers.iter().filter(|(_, p)| p.round != round).map(|(u, _)| u.clone()).collect();
        for uid in gone {
            if let Some(old) = self.servers.remove(&uid) {
                self.remove(old, &mut changed);
            }
        }
        changed
    }

    fn remove(&mut self, old: Placed, changed: &mut BTreeSet<String>) {
        let Some(host) = old.host else { return };
        if let Some(entries) = self.hosts.get_mut(&host) {
            entries.remove(&old.entry);
            if entries.is_empty() {
                self.hosts.remove(&host);
            }
        }
        changed.insert(host);
    }

    /// Host `host`'s Assignment as it should be (empty for a host without servers).
    pub fn spec(&self, host: &str) -> AssignmentSpec {
        let servers: Vec<Assigned> = self.hosts.get(host).map(|e| e.iter().cloned().collect()).unwrap_or_default();
        AssignmentSpec { count: servers.len() as u32, servers }
    }

    /// Whether `current` (None: no Assignment) says what host `host`'s should.
    fn says(&self, host: &str, current: Option<&AssignmentSpec>) -> bool {
        let entries = self.hosts.get(host);
        match current {
            None => entries.is_none(),
            Some(spec) => {
                let want = entries.map_or(0, BTreeSet::len);
                spec.count as usize == want
                    && spec.servers.len() == want
                    && entries.is_none_or(|e| e.iter().eq(spec.servers.iter()))
            }
        }
    }

    /// Every host with servers.
    pub fn hosts(&self) -> impl Iterator<Item = &String> {
        self.hosts.keys()
    }
}

/// The Assignments to write among `hosts`, by host: those that differ from what this
/// leader last wrote (or, for hosts it has not written, from the cache), including
/// those of hosts left without servers, emptied. An Assignment is never deleted here:
/// its agent watches it, and an empty list says the same as none.
pub fn changes(
    board: &Board,
    hosts: &BTreeSet<String>,
    cached: &HashMap<String, Arc<Assignment>>,
    written: &HashMap<String, AssignmentSpec>,
) -> Vec<(String, AssignmentSpec)> {
    hosts
        .iter()
        .filter_map(|host| {
            let current = written.get(host).or_else(|| cached.get(host).map(|a| &a.spec));
            (!board.says(host, current)).then(|| (host.clone(), board.spec(host)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::server;
    use serde_json::json;

    fn cache(assignments: &[(&str, &AssignmentSpec)]) -> HashMap<String, Arc<Assignment>> {
        assignments.iter().map(|(h, s)| (h.to_string(), Arc::new(Assignment::new(h, (*s).clone())))).collect()
    }

    fn all(board: &Board, cached: &HashMap<String, Arc<Assignment>>) -> BTreeSet<String> {
        board.hosts().cloned().chain(cached.keys().cloned()).collect()
    }

    #[test]
    fn each_host_lists_the_servers_bound_to_it() {
        let servers = vec![
            server("b", json!({"status": {"host": "h1"}})),
            server("a", json!({"status": {"host": "h1"}})),
            server("c", json!({"status": {"host": "h2"}})),
            server("pending", json!({"status": {"phase": "Pending"}})),
        ];
        let mut board = Board::default();
        assert_eq!(board.update(&servers), ["h1".to_string(), "h2".to_string()].into());
        let names = |h: &str| board.spec(h).servers.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names("h1"), ["a", "b"]);
        assert_eq!(board.spec("h1").count, 2);
        assert_eq!(names("h2"), ["c"]);
        assert_eq!(board.spec("h2").servers[0].uid, "uid-c");
        assert_eq!(board.spec("h3"), AssignmentSpec::default(), "a host without servers");
    }

    #[test]
    fn only_hosts_whose_servers_changed_are_looked_at_again() {
        let mut board = Board::default();
        let a = server("a", json!({"status": {"host": "h1"}}));
        let b = server("b", json!({"status": {"host": "h2"}}));
        board.update(&[a.clone(), b.clone()]);
        assert!(board.update(&[a.clone(), b.clone()]).is_empty(), "nothing changed");

        // The agent reports Running: a new version, the same entry.
        let running = server(
            "a",
            json!({"metadata": {"resourceVersion": "8"}, "status": {"host": "h1", "phase": "Running", "domainUuid": "d"}}),
        );
        assert!(board.update(&[running.clone(), b.clone()]).is_empty(), "the agent's own report");

        // Its spec changes: only its host.
        let resized = server(
            "a",
            json!({"metadata": {"resourceVersion": "9"}, "spec": {"class": "large"}, "status": {"host": "h1"}}),
        );
        assert_eq!(board.update(&[resized.clone(), b.clone()]), ["h1".to_string()].into());

        // It moves to h2: both hosts; then it is deleted: h2.
        let moved = server("a", json!({"metadata": {"resourceVersion": "10"}, "status": {"host": "h2"}}));
        assert_eq!(board.update(&[moved, b.clone()]), ["h1".to_string(), "h2".to_string()].into());
        assert_eq!(board.spec("h2").count, 2);
        assert_eq!(board.update(std::slice::from_ref(&b)), ["h2".to_string()].into());
        assert_eq!((board.spec("h1").count, board.spec("h2").count), (0, 1));
        assert_eq!(board.servers.len(), 1, "deleted servers are forgotten");
        assert_eq!(board.hosts().collect::<Vec<_>>(), ["h2"], "a host left without servers is dropped");
    }

    #[test]
    fn only_what_changed_is_written_and_a_host_left_empty_is_emptied() {
        let mut board = Board::default();
        board.update(&[server("a", json!({"status": {"host": "h1"}}))]);
        let cached = cache(&[("h1", &board.spec("h1"))]);
        assert!(changes(&board, &all(&board, &cached), &cached, &HashMap::new()).is_empty(), "nothing changed");

        // The server moves to h2: h2 gets it, h1 is emptied.
        let touched =
            board.update(&[server("a", json!({"metadata": {"resourceVersion": "9"}, "status": {"host": "h2"}}))]);
        let writes = changes(&board, &touched, &cached, &HashMap::new());
        assert_eq!(writes.iter().map(|(h, s)| (h.as_str(), s.count)).collect::<Vec<_>>(), [("h1", 0), ("h2", 1)]);

        // What this leader wrote counts even before the cache shows it.
        let written: HashMap<_, _> = writes.into_iter().collect();
        assert!(changes(&board, &all(&board, &cached), &cached, &written).is_empty());

        // An Assignment someone else changed is put right when looked at.
        let mut edited = board.spec("h2");
        edited.servers[0].digest = "0".into();
        let cached = cache(&[("h1", &AssignmentSpec::default()), ("h2", &edited)]);
        let writes = changes(&board, &all(&board, &cached), &cached, &HashMap::new());
        assert_eq!(writes, [("h2".to_string(), board.spec("h2"))]);
        // A host without servers and without an Assignment needs none.
        assert!(changes(&board, &["h9".to_string()].into(), &cached, &HashMap::new()).is_empty());
    }

    #[test]
    fn a_digest_is_taken_again_only_of_a_new_version() {
        let mut board = Board::default();
        let a = server("a", json!({"status": {"host": "h1"}}));
        board.update(std::slice::from_ref(&a));
        let first = board.spec("h1").servers[0].digest.clone();
        // Same version, different content: the digest stands (a version names one
        // content on the API server).
        let same_version = server("a", json!({"spec": {"class": "large"}, "status": {"host": "h1"}}));
        board.update(&[same_version]);
        assert_eq!(board.spec("h1").servers[0].digest, first);
        let new_version = server(
            "a",
            json!({"metadata": {"resourceVersion": "8"}, "spec": {"class": "large"}, "status": {"host": "h1"}}),
        );
        board.update(&[new_version]);
        assert_ne!(board.spec("h1").servers[0].digest, first);
    }
}
