//! What each host's Assignment should list: the servers whose `status.host` names it,
//! with their digests ([`covi_api::assignment::digest`]), and which Assignments must
//! be written for that.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use covi_api::assignment::Assigned;
use covi_api::{Assignment, AssignmentSpec, VirtualServer};
use kube::ResourceExt;

/// Each server's entry by UID, with the version it was taken of: a server is
/// serialised and hashed again only when it changed.
#[derive(Default)]
pub struct Digests(HashMap<String, (String, Assigned)>);

impl Digests {
    fn of(&mut self, server: &VirtualServer) -> Assigned {
        let uid = server.uid().unwrap_or_default();
        let version = server.resource_version().unwrap_or_default();
        match self.0.get(&uid) {
            Some((v, entry)) if *v == version => entry.clone(),
            _ => {
                let entry = Assigned::of(server);
                self.0.insert(uid, (version, entry.clone()));
                entry
            }
        }
    }

    /// Forgets the servers not in `keep`.
    fn retain(&mut self, keep: &HashSet<String>) {
        self.0.retain(|uid, _| keep.contains(uid));
    }
}

/// Every host's Assignment as the servers say it should be, ordered by namespace and
/// name (a host without servers is absent).
pub fn desired(servers: &[Arc<VirtualServer>], digests: &mut Digests) -> BTreeMap<String, AssignmentSpec> {
    let mut hosts: BTreeMap<String, AssignmentSpec> = BTreeMap::new();
    for server in servers {
        let Some(host) = server.status.as_ref().and_then(|s| s.host.clone()) else { continue };
        hosts.entry(host).or_default().servers.push(digests.of(server));
    }
    for spec in hosts.values_mut() {
        spec.servers.sort();
        spec.count = spec.servers.len() as u32;
    }
    digests.retain(&servers.iter().filter_map(|s| s.uid()).collect());
    hosts
}

/// The Assignments to write, by host: those that differ from what this leader last
/// wrote (or, for hosts it has not written, from the cache), and those of hosts left
/// without servers, emptied. An Assignment is never deleted here: its agent watches
/// it, and an empty list says the same as none.
pub fn changes(
    desired: &BTreeMap<String, AssignmentSpec>,
    cached: &[Arc<Assignment>],
    written: &HashMap<String, AssignmentSpec>,
) -> Vec<(String, AssignmentSpec)> {
    let current: HashMap<String, &AssignmentSpec> = cached
        .iter()
        .map(|a| (a.name_any(), &a.spec))
        .chain(written.iter().map(|(host, spec)| (host.clone(), spec)))
        .collect();
    let empty = AssignmentSpec::default();
    let mut out: Vec<(String, AssignmentSpec)> = desired
        .iter()
        .filter(|(host, spec)| current.get(*host) != Some(spec))
        .map(|(host, spec)| (host.clone(), spec.clone()))
        .collect();
    for (host, spec) in &current {
        if !desired.contains_key(host) && **spec != empty {
            out.push((host.clone(), empty.clone()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::server;
    use serde_json::json;

    fn assignment(host: &str, spec: &AssignmentSpec) -> Arc<Assignment> {
        Arc::new(Assignment::new(host, spec.clone()))
    }

    #[test]
    fn each_host_lists_the_servers_bound_to_it() {
        let servers = vec![
            server("b", json!({"status": {"host": "h1"}})),
            server("a", json!({"status": {"host": "h1"}})),
            server("c", json!({"status": {"host": "h2"}})),
            server("pending", json!({"status": {"phase": "Pending"}})),
        ];
        let hosts = desired(&servers, &mut Digests::default());
        let names = |h: &str| hosts[h].servers.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(hosts.keys().collect::<Vec<_>>(), ["h1", "h2"]);
        assert_eq!(names("h1"), ["a", "b"]);
        assert_eq!(hosts["h1"].count, 2);
        assert_eq!(names("h2"), ["c"]);
        assert_eq!(hosts["h2"].servers[0].uid, "uid-c");
    }

    #[test]
    fn only_what_changed_is_written_and_a_host_left_empty_is_emptied() {
        let mut digests = Digests::default();
        let before = desired(&[server("a", json!({"status": {"host": "h1"}}))], &mut digests);
        let cached = vec![assignment("h1", &before["h1"])];
        assert!(changes(&before, &cached, &HashMap::new()).is_empty(), "nothing changed");

        // The agent reports Running: nothing for the operator to publish.
        let running = server(
            "a",
            json!({"metadata": {"resourceVersion": "8"}, "status": {"host": "h1", "phase": "Running", "domainUuid": "uid-a"}}),
        );
        assert!(changes(&desired(&[running], &mut digests), &cached, &HashMap::new()).is_empty());

        // The server moves to h2: h2 gets it, h1 is emptied.
        let moved = desired(
            &[server("a", json!({"metadata": {"resourceVersion": "9"}, "status": {"host": "h2"}}))],
            &mut digests,
        );
        let writes = changes(&moved, &cached, &HashMap::new());
        assert_eq!(writes.iter().map(|(h, s)| (h.as_str(), s.count)).collect::<Vec<_>>(), [("h1", 0), ("h2", 1)]);

        // What this leader wrote counts even before the cache shows it.
        let written: HashMap<_, _> = writes.into_iter().collect();
        assert!(changes(&moved, &cached, &written).is_empty());
    }

    #[test]
    fn a_digest_is_taken_again_only_of_a_new_version() {
        let mut digests = Digests::default();
        let a = server("a", json!({"status": {"host": "h1"}}));
        let first = desired(std::slice::from_ref(&a), &mut digests)["h1"].servers[0].digest.clone();
        // Same version, different content: the cached digest stands (a version names
        // one content on the API server).
        let same_version = server("a", json!({"spec": {"class": "large"}, "status": {"host": "h1"}}));
        assert_eq!(desired(&[same_version], &mut digests)["h1"].servers[0].digest, first);
        let new_version = server(
            "a",
            json!({"metadata": {"resourceVersion": "8"}, "spec": {"class": "large"}, "status": {"host": "h1"}}),
        );
        assert_ne!(desired(&[new_version], &mut digests)["h1"].servers[0].digest, first);
        desired(&[], &mut digests);
        assert!(digests.0.is_empty(), "deleted servers are forgotten");
    }
}
