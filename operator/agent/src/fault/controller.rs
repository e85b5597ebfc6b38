//! The agent's fault loop: on every change of a Disruption and at every resync, plan
//! this host's faults, converge the host to them, and write what was done into each
//! Disruption's status (this host's entries only, under a field manager of its own).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use covi_api::VirtualServer;
use covi_api::contract::status_patch;
use covi_api::disruption::{Disruption, FaultKind, FaultTarget, TargetState};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::Notify;

use super::{Peer, apply, plan};
use crate::libvirt::Libvirt;

pub struct FaultLoop {
    pub client: Client,
    pub node: String,
    pub hypervisor: Libvirt,
    /// The servers bound to this host.
    pub servers: Store<VirtualServer>,
    pub every: Duration,
}

/// The field manager of one host's entries in Disruptions' status.
pub fn manager(node: &str) -> String {
    format!("covi-agent-faults.{node}")
}

/// Whether `d` is in one of its windows at `now`.
fn active(d: &Disruption, now: i64) -> bool {
    let created = d.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second());
    let length = covi_api::duration::parse(&d.spec.duration);
    let every = d.spec.every.as_deref().and_then(covi_api::duration::parse);
    matches!((created, length), (Some(c), Some(l)) if super::window(c, l, every, now).is_some())
}

fn time(seconds: i64) -> Option<Time> {
    Timestamp::from_second(seconds).ok().map(Time)
}

impl FaultLoop {
    pub async fn run(self) {
        let changed = Arc::new(Notify::new());
        let (store, writer) = reflector::store::<Disruption>();
        let poke = changed.clone();
        let watch = reflector(writer, watcher(Api::<Disruption>::all(self.client.clone()), watcher::Config::default()))
            .default_backoff()
            .touched_objects()
            .for_each(move |_| {
                poke.notify_one();
                futures::future::ready(())
            });
        tokio::spawn(watch);
        if store.wait_until_ready().await.is_err() {
            tracing::error!("the Disruption watch ended before it synced: no faults on this host");
            return;
        }
        // None: this agent has not written the partition table yet, so it is written
        // (or removed) whatever an earlier agent left.
        let mut rules: Option<Option<String>> = None;
        // Whether the last pass wanted no fault and left the host clean: while that
        // holds and nothing is wanted, the host is not scanned again (a scan reads every
        // guest's interfaces, a cost worth paying only while faults exist).
        let mut clean = false;
        // Kills done by this agent: the status says the same, but the watch may not
        // have delivered this agent's own write yet when the next pass starts.
        let mut killed = BTreeSet::new();
        loop {
            match self.pass(&store, rules.as_ref(), clean, &mut killed).await {
                Ok(Some((written, now_clean))) => {
                    rules = Some(written);
                    clean = now_clean;
                }
                Ok(None) => {}
                Err(e) => {
                    clean = false;
                    tracing::warn!(error = %e, "fault pass failed; retrying");
                }
            }
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep(self.every) => {}
            }
        }
    }

    /// One pass; the ruleset written and whether the host is clean, or None when the
    /// host was clean and stays so (not scanned).
    async fn pass(
        &self,
        store: &Store<Disruption>,
        rules: Option<&Option<String>>,
        clean: bool,
        killed_here: &mut BTreeSet<(String, String, i64)>,
    ) -> crate::error::Result<Option<(Option<String>, bool)>> {
        let now = Timestamp::now().as_second();
        let disruptions: Vec<Disruption> = store.state().iter().map(|d| (**d).clone()).collect();
        let here: Vec<VirtualServer> =
            self.servers.state().iter().filter(|s| s.bound_to(&self.node)).map(|s| (**s).clone()).collect();
        let mut peers: BTreeMap<String, Vec<Peer>> = BTreeMap::new();
        // Peers are read only for partitions in their window: a list per namespace.
        let partitioned: BTreeSet<String> = disruptions
            .iter()
            .filter(|d| d.spec.fault.kind == FaultKind::Partition && active(d, now))
            .filter_map(|d| d.namespace())
            .collect();
        for ns in partitioned {
            let list = Api::<VirtualServer>::namespaced(self.client.clone(), &ns).list(&ListParams::default()).await?;
            let side = list
                .items
                .iter()
                .map(|s| Peer {
                    name: s.name_any(),
                    labels: s.labels().clone(),
                    address: s.status.as_ref().and_then(|st| st.address.clone()),
                })
                .collect();
            peers.insert(ns, side);
        }
        let (wanted, unplannable) = plan(&disruptions, &here, &peers, now);
        let mine = |d: &Disruption| -> Vec<FaultTarget> {
            d.status
                .as_ref()
                .map(|s| s.targets.iter().filter(|t| t.host == self.node).cloned().collect())
                .unwrap_or_default()
        };
        let mut killed: BTreeSet<(String, String, i64)> = disruptions
            .iter()
            .filter(|d| d.spec.fault.kind == FaultKind::Kill)
            .flat_map(|d| {
                let key = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
                mine(d)
                    .into_iter()
                    .filter(|t| t.state == TargetState::Applied)
                    .filter_map(move |t| Some((key.clone(), t.server, t.since?.0.as_second())))
            })
            .collect();
        killed.extend(killed_here.iter().cloned());
        let scan = !(clean && wanted.is_empty() && rules.is_some());
        let (outcomes, written) = if scan {
            let (outcomes, written) = apply::converge(&self.hypervisor, &wanted, &killed, rules).await?;
            for w in wanted.iter().filter(|w| w.effect == super::Effect::Kill) {
                let key = (w.disruption.clone(), w.server.clone(), w.since);
                if outcomes.get(&key).is_some_and(|o| o.is_ok()) {
                    killed_here.insert(key);
                }
            }
            // Only the windows still open matter.
            killed_here.retain(|(d, s, since)| {
                wanted.iter().any(|w| &w.disruption == d && &w.server == s && w.since == *since)
            });
            (outcomes, written)
        } else {
            (BTreeMap::new(), rules.cloned().flatten())
        };

        let names_here: BTreeSet<String> =
            here.iter().map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any())).collect();
        for d in &disruptions {
            let ns = d.namespace().unwrap_or_default();
            let key = format!("{ns}/{}", d.name_any());
            let mut targets: BTreeMap<String, FaultTarget> = BTreeMap::new();
            for w in wanted.iter().filter(|w| w.disruption == key) {
                let outcome = outcomes.get(&(w.disruption.clone(), w.server.clone(), w.since));
                let (state, message) = match outcome {
                    Some(Ok(m)) => (TargetState::Applied, m.clone()),
                    Some(Err(e)) => (TargetState::Failed, e.clone()),
                    None => (TargetState::Failed, "not applied".into()),
                };
                targets.insert(
                    w.server.clone(),
                    FaultTarget {
                        server: w.server.clone(),
                        host: self.node.clone(),
                        state,
                        since: time(w.since),
                        until: time(w.until),
                        message,
                    },
                );
            }
            for u in unplannable.iter().filter(|u| u.disruption == key) {
                targets.insert(
                    u.server.clone(),
                    FaultTarget {
                        server: u.server.clone(),
                        host: self.node.clone(),
                        state: TargetState::Failed,
                        since: None,
                        until: None,
                        message: u.message.clone(),
                    },
                );
            }
            // Faults this host had that no longer apply: removed, while the server is here.
            for old in mine(d) {
                if targets.contains_key(&old.server) || !names_here.contains(&format!("{ns}/{}", old.server)) {
                    continue;
                }
                let message = match old.state {
                    TargetState::Removed => old.message.clone(),
                    _ => "removed: the window ended".into(),
                };
                targets.insert(old.server.clone(), FaultTarget { state: TargetState::Removed, message, ..old });
            }
            let targets: Vec<FaultTarget> = targets.into_values().collect();
            let before = mine(d);
            if targets == before || d.metadata.deletion_timestamp.is_some() {
                continue;
            }
            for t in targets.iter().filter(|t| t.state == TargetState::Failed && !before.contains(t)) {
                tracing::warn!(disruption = %key, server = %t.server, reason = %t.message, "fault not applied");
            }
            let patch = status_patch::<Disruption>(serde_json::json!({ "targets": targets }));
            let api: Api<Disruption> = Api::namespaced(self.client.clone(), &ns);
            let params = PatchParams::apply(&manager(&self.node)).force();
            if let Err(e) = api.patch_status(&d.name_any(), &params, &Patch::Apply(&patch)).await {
                tracing::warn!(disruption = %key, error = %e, "writing the fault status failed");
            }
        }
        Ok(scan.then(|| {
            let now_clean = wanted.is_empty() && written.is_none();
            (written, now_clean)
        }))
    }
}
