//! This host in the API: its Host object (facts and Ready) and its Lease (heartbeat).

use std::collections::BTreeMap;
use std::time::Duration;

use covi_api::condition::{ConditionStatus, set_condition};
use covi_api::contract::{condition_type, manager, status_patch};
use covi_api::{Condition, Host, HostPool};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, GetParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::error::Result;
use crate::libvirt::NodeFacts;

/// Renewal period when the host's pool does not say.
pub const DEFAULT_RENEW: Duration = Duration::from_secs(2);

/// Writes this host's Host object: labels from the agent's flags, status from
/// libvirt's facts and the agent's conditions. The spec (cordon, maintenance) is the
/// administrator's.
pub struct HostReporter {
    pub client: Client,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub address: Option<String>,
    /// Where the operator reaches this agent's console server.
    pub console: Option<String>,
    conditions: tokio::sync::Mutex<Vec<Condition>>,
    /// The status this agent last found on (or wrote to) its Host, and when: the same
    /// report again within [`VERIFY_EVERY`] (free storage aside) is neither read nor
    /// written.
    verified: std::sync::Mutex<Option<(serde_json::Value, std::time::Instant)>>,
    /// The pool's free storage last reported: a reading that fails keeps it.
    storage: std::sync::Mutex<Option<u64>>,
}

/// How long an unchanged report is taken as still on the Host without reading it: the
/// operator may have overwritten Ready (it judged the host lost) and is put right within
/// this. Reading every resync cost 2,000 hosts 200 GETs a second.
pub const VERIFY_EVERY: Duration = Duration::from_secs(60);

impl HostReporter {
    pub fn new(
        client: Client,
        node: String,
        labels: BTreeMap<String, String>,
        address: Option<String>,
        console: Option<String>,
    ) -> Self {
        HostReporter {
            client,
            node,
            labels,
            address,
            console,
            conditions: Default::default(),
            verified: Default::default(),
            storage: Default::default(),
        }
    }

    /// Creates or updates the Host; `Ready=True` since the agent reaches both libvirt
    /// and the API. `fenced`, when given, records a self-fencing in the Fenced condition.
    pub async fn report(&self, facts: &NodeFacts, storage: Option<u64>, fenced: Option<String>) -> Result<()> {
        let api: Api<Host> = Api::all(self.client.clone());
        let node = self.node.as_str();
        let params = PatchParams::apply(manager::AGENT).force();
        let storage = {
            let mut known = self.storage.lock().expect("storage lock");
            *known = storage.or(*known);
            *known
        };
        let mut conditions = self.conditions.lock().await;
        let now = Timestamp::now();
        let message = format!(
            "covi-agent reaches {} {} through libvirt {}",
            facts.driver, facts.hypervisor_version, facts.libvirt_version
        );
        set_condition(&mut conditions, condition_type::READY, ConditionStatus::True, "AgentReady", message, None, now);
        match fenced {
            Some(message) => {
                set_condition(&mut conditions, "Fenced", ConditionStatus::True, "SelfFenced", message, None, now)
            }
            None if conditions.iter().any(|c| c.type_ == "Fenced") => set_condition(
                &mut conditions,
                "Fenced",
                ConditionStatus::False,
                "Recovered",
                "the host renews its lease again; domains bound elsewhere were removed",
                None,
                now,
            ),
            None => false,
        };
        let status = status_patch::<Host>(json!({
            "hypervisor": {"type": facts.driver, "version": facts.hypervisor_version},
            "libvirtVersion": facts.libvirt_version,
            "address": self.address,
            "consoleEndpoint": self.console,
            "capacity": {
                "cpus": facts.cpus,
                "memory": format!("{}Mi", facts.memory_kib / 1024),
                "storage": storage.map(|bytes| format!("{}Gi", bytes >> 30)),
            },
            "conditions": *conditions,
        }));
        // Every host reports every resync: most reports change nothing, and at a few
        // hundred hosts the writes alone would load the API server. A report like the
        // last one verified is skipped for a while; otherwise the Host is read from the
        // API server's cache and written only when it differs, so a Ready the operator
        // overwrote (host lost) is still put right.
        if let Some((said, at)) = &*self.verified.lock().expect("verified lock")
            && at.elapsed() < VERIFY_EVERY
            && same_but_storage(said, &status["status"])
        {
            return Ok(());
        }
        let current = api.get_with(node, &GetParams::any()).await.ok();
        let labelled = current.as_ref().is_some_and(|c| self.labels.iter().all(|(k, v)| c.labels().get(k) == Some(v)));
        if !labelled {
            let host = json!({
                "apiVersion": Host::api_version(&()), "kind": Host::kind(&()),
                "metadata": {"name": node, "labels": self.labels},
                "spec": {}
            });
            api.patch(node, &params, &Patch::Apply(&host)).await?;
        }
        let have = current.as_ref().map(|c| serde_json::to_value(&c.status).unwrap_or_default());
        let reported = have.as_ref().is_some_and(|have| status_matches(&status["status"], have));
        if !reported {
            tracing::debug!(want = %status["status"], ?have, "the Host's status differs from the agent's: writing it");
            api.patch_status(node, &params, &Patch::Apply(&status)).await?;
        }
        *self.verified.lock().expect("verified lock") = Some((status["status"].clone(), std::time::Instant::now()));
        Ok(())
    }
}

/// Whether `have` says what `want` says; an absent field and null are the same.
fn same(want: &serde_json::Value, have: &serde_json::Value) -> bool {
    let null = serde_json::Value::Null;
    match want {
        serde_json::Value::Object(fields) => {
            fields.iter().all(|(k, w)| same(w, have.get(k).unwrap_or(&null)))
                && have.as_object().is_some_and(|h| h.keys().all(|k| fields.contains_key(k)))
        }
        _ => want == have,
    }
}

/// Whether the Host's status already says what `desired` (the agent's part) says:
/// every field equal (absent counts as null), and every condition with the same
/// status, reason and message (its transition time aside).
pub fn status_matches(desired: &serde_json::Value, current: &serde_json::Value) -> bool {
    let Some(fields) = desired.as_object() else { return false };
    let null = serde_json::Value::Null;
    fields.iter().all(|(key, want)| {
        let have = current.get(key).unwrap_or(&null);
        if key != "conditions" {
            return same(want, have);
        }
        let empty = vec![];
        let have = have.as_array().unwrap_or(&empty);
        want.as_array()
            .unwrap_or(&empty)
            .iter()
            .all(|w| have.iter().any(|h| ["type", "status", "reason", "message"].iter().all(|f| h.get(f) == w.get(f))))
    })
}

/// Whether two reports of a Host's status differ in nothing but the amount of free
/// storage. It changes with every volume created or removed and nothing is scheduled
/// by it, so a report that differs from the last one verified in that alone waits for
/// the next verification ([`VERIFY_EVERY`]): in a burst of new servers every host would
/// otherwise write its Host at every resync. Storage becoming known (or unknown) is
/// reported at once.
pub fn same_but_storage(said: &serde_json::Value, now: &serde_json::Value) -> bool {
    let storage = |v: &serde_json::Value| v.pointer("/capacity/storage").filter(|s| !s.is_null()).cloned();
    if storage(said).is_some() != storage(now).is_some() {
        return false;
    }
    let without = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(capacity) = v.get_mut("capacity").and_then(|c| c.as_object_mut()) {
            capacity.remove("storage");
        }
        v
    };
    without(said) == without(now)
}

/// The pool this host belongs to (see `covi_api::host_pool::pool_for_labels`).
pub fn pool_of<'a>(pools: &'a [std::sync::Arc<HostPool>], labels: &BTreeMap<String, String>) -> Option<&'a HostPool> {
    covi_api::host_pool::pool_for_labels(pools, labels)
}

/// Renews the host's Lease until a graceful stop. Each success moves the fencing clock
/// to when that renewal was sent; a success after the host fenced itself wakes
/// `recovered`. A renewal that hangs (a partition) is abandoned after fenceAfter and
/// sent again. Every renewal records the agent's fenceAfter on the Lease, so the
/// operator never judges the host by shorter timings than the agent keeps.
pub struct LeaseRenewer {
    pub api: Api<Lease>,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub pools: Store<HostPool>,
    pub fence: std::sync::Arc<crate::fence::Fence>,
    pub recovered: std::sync::Arc<tokio::sync::Notify>,
    pub metrics: crate::metrics::Metrics,
    /// Fences the host now if it is overdue (the same function the watchdog runs).
    pub fence_if_due: std::sync::Arc<dyn Fn() + Send + Sync>,
    /// How much longer the last renewal of a graceful stop asks the operator to wait.
    pub restart_grace: Duration,
}

impl LeaseRenewer {
    /// Returns once `stopping` turned true and a renewal asking for `restart_grace`
    /// more succeeded: the operator then waits that long before it may declare the
    /// host lost, so a restarted agent finds its guests still its own.
    pub async fn run(self, mut stopping: tokio::sync::watch::Receiver<bool>) {
        let mut pace = covi_api::host_pool::Pace::default();
        loop {
            // The pool's timings, stretched when the fleet is too large to renew at them,
            // and further while the API server answers renewals slowly.
            let failover = covi_api::host_pool::failover_for(&self.pools.state(), &self.labels).times(pace.stretch());
            let renew = Duration::from_secs(failover.renew_seconds.into());
            // A shorter fenceAfter holds at once. A longer one (the pool was edited, the
            // fleet grew) only once a renewal has recorded it on the Lease: until then
            // the operator may still judge the host by the shorter one, and a host cut
            // off meanwhile must fence by that.
            let wanted = Duration::from_secs(failover.fence_after_seconds.into());
            if wanted < self.fence.fence_after() {
                self.fence.set_fence_after(wanted);
            }
            let started = std::time::Instant::now();
            // A renewal sent after the fencing deadline may reach the API server after
            // the operator declared the host lost: it never rescues the host. Fence
            // first (after a freeze this thread may wake before the watchdog does).
            if self.fence.due() {
                let fence_if_due = self.fence_if_due.clone();
                let _ = tokio::task::spawn_blocking(move || fence_if_due()).await;
            }
            let stop = *stopping.borrow_and_update();
            let extra = if stop { self.restart_grace.as_secs() } else { 0 };
            let timings = Recorded {
                lease_duration_seconds: u64::from(failover.lease_duration_seconds) + extra,
                fence_after_seconds: wanted.max(self.fence.fence_after()).as_secs() + extra,
            };
            // A slow answer still counts, from when the renewal was sent (the operator
            // saw it no earlier): an API server answering in 3 s under load must not
            // make healthy hosts fence. Past fenceAfter the host fences anyway, so a
            // renewal is given up then and sent afresh.
            let patience = renew.max(self.fence.fence_after());
            let attempt = renew_once(&self.api, &self.node, timings);
            let result = match tokio::time::timeout(patience, attempt).await {
                Ok(result) => result,
                Err(_) => Err(crate::error::Error::Timeout { what: "renewing the Lease", after: patience }),
            };
            let before = pace.stretch();
            pace = pace.after(result.is_ok().then(|| started.elapsed()), renew);
            if pace.stretch() != before {
                tracing::info!(
                    stretch = pace.stretch(),
                    took = ?started.elapsed(),
                    ?renew,
                    "the API server's answers set a new pace for this host's heartbeat"
                );
                self.metrics.heartbeat_stretch.set(pace.stretch().into());
            }
            let label = match &result {
                Ok(()) => {
                    self.fence.renewed(started);
                    if wanted > self.fence.fence_after() {
                        self.fence.set_fence_after(wanted);
                    }
                    if self.fence.is_fenced() {
                        self.recovered.notify_one();
                    }
                    "ok"
                }
                Err(e) => {
                    tracing::warn!(error = %e, since = ?self.fence.since_renewal(), "renewing the host lease failed");
                    "failed"
                }
            };
            self.metrics.lease_renewals.get_or_create(&crate::metrics::ResultLabel { result: label.into() }).inc();
            if stop && result.is_ok() {
                tracing::info!(
                    lease_seconds = timings.lease_duration_seconds,
                    "stopping: the operator waits this long for the next agent before it declares the host lost"
                );
                return;
            }
            // Up to a tenth early, at random: hosts started together (a rack powered
            // on, an upgraded DaemonSet) drift apart instead of renewing in one spike.
            let pause = jittered(renew, 10).saturating_sub(started.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stopping.changed(), if !stop => {}
            }
        }
    }
}

/// `pause` shortened by up to one `nth` of it, at random: never longer (a renewal
/// jittered this way still comes before the timings the Lease records run out).
pub fn jittered(pause: Duration, nth: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // RandomState's keys are random per process and differ per instance.
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    pause.mul_f64(1.0 - (random % 1000) as f64 / (1000.0 * f64::from(nth.max(1))))
}

/// What one renewal records on the Lease.
#[derive(Clone, Copy, Debug)]
struct Recorded {
    lease_duration_seconds: u64,
    fence_after_seconds: u64,
}

async fn renew_once(api: &Api<Lease>, node: &str, timings: Recorded) -> Result<()> {
    let now = MicroTime(Timestamp::now());
    let annotations = json!({ covi_api::host::LEASE_FENCE_AFTER: timings.fence_after_seconds.to_string() });
    let patch = json!({
        "metadata": {"annotations": annotations},
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": timings.lease_duration_seconds,
            "renewTime": now,
        }
    });
    match api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": node, "annotations": annotations},
                "spec": {
                    "holderIdentity": node,
                    "leaseDurationSeconds": timings.lease_duration_seconds,
                    "acquireTime": now,
                    "renewTime": now,
                }
            }))
            .expect("a valid Lease");
            api.create(&PostParams::default(), &lease).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// What the previous agent process of this host left on its Lease: how long ago it
/// last renewed (by this host's own clock, which wrote that time) and the fenceAfter
/// it recorded. `None` when there is no Lease or the API cannot be read now.
pub async fn predecessor(api: &Api<Lease>, node: &str) -> Option<(Duration, Option<Duration>)> {
    let lease = api.get_opt(node).await.ok()??;
    let renewed = lease.spec.as_ref()?.renew_time.as_ref()?.0;
    let age = Timestamp::now().duration_since(renewed);
    let age = Duration::try_from(age).unwrap_or_default();
    let fence_after = covi_api::host::lease_timings(&lease).fence_after_seconds.map(|s| Duration::from_secs(s.into()));
    Some((age, fence_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;
    use std::sync::Arc;

    fn pool(name: &str, selector: &[(&str, &str)]) -> Arc<HostPool> {
        let selector: BTreeMap<_, _> = selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": name},
                "spec": {"nodeSelector": selector, "storage": {"pool": "p"},
                         "network": {"bridge": "br0", "cidr": "10.0.0.0/24"}}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn an_unchanged_host_status_is_not_written_again() {
        let desired = json!({
            "hypervisor": {"type": "test", "version": "2.0.0"}, "address": null,
            "capacity": {"cpus": 4, "memory": "8192Mi", "storage": null},
            "conditions": [{"type": "Ready", "status": "True", "reason": "AgentReady", "message": "m",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        });
        // The operator's fields and conditions beside the agent's, an older transition time.
        let current = json!({
            "hypervisor": {"type": "test", "version": "2.0.0"},
            "capacity": {"cpus": 4, "memory": "8192Mi"}, "pool": "p", "servers": 3,
            "conditions": [{"type": "Lost", "status": "False", "reason": "LeaseRenewed", "message": ""},
                           {"type": "Ready", "status": "True", "reason": "AgentReady", "message": "m",
                            "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        });
        assert!(status_matches(&desired, &current));
        // The operator said the host was lost: Ready must be written again.
        let mut lost = current.clone();
        lost["conditions"][1]["status"] = json!("False");
        lost["conditions"][1]["reason"] = json!("HostLost");
        assert!(!status_matches(&desired, &lost));
        let mut grown = current.clone();
        grown["capacity"]["cpus"] = json!(8);
        assert!(!status_matches(&desired, &grown));
        assert!(!status_matches(&desired, &json!({})), "a Host without status is written");
    }

    #[test]
    fn a_change_of_free_storage_alone_waits_for_the_next_verification() {
        let report = |storage: &str, ready: &str| {
            json!({
                "capacity": {"cpus": 8, "memory": "16384Mi", "storage": storage},
                "conditions": [{"type": "Ready", "status": ready, "reason": "AgentReady", "message": "m"}],
            })
        };
        assert!(same_but_storage(&report("100Gi", "True"), &report("100Gi", "True")));
        assert!(same_but_storage(&report("100Gi", "True"), &report("92Gi", "True")), "storage alone");
        assert!(!same_but_storage(&report("100Gi", "True"), &report("100Gi", "False")), "Ready changed");
        assert!(!same_but_storage(&report("100Gi", "True"), &report("92Gi", "False")), "Ready and storage");
        let mut unknown = report("100Gi", "True");
        unknown["capacity"]["storage"] = json!(null);
        assert!(!same_but_storage(&unknown, &report("100Gi", "True")), "storage becoming known");
        let mut more_memory = report("100Gi", "True");
        more_memory["capacity"]["memory"] = json!("32768Mi");
        assert!(!same_but_storage(&report("100Gi", "True"), &more_memory), "memory is scheduled by");
    }

    #[test]
    fn a_host_belongs_to_the_pool_whose_selector_matches() {
        let pools = [pool("b", &[("covi.io/pool", "b")]), pool("a", &[("covi.io/pool", "a")])];
        let labels: BTreeMap<_, _> = [("covi.io/pool".to_string(), "a".to_string())].into();
        assert_eq!(pool_of(&pools, &labels).unwrap().name_any(), "a");
        assert!(pool_of(&pools, &BTreeMap::new()).is_none());
    }
}
