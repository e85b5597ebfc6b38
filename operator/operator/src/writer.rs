//! The operator's one writer: it applies the status writes [`crate::desired`]
//! decides, under the field manager each names, and publishes their Events and
//! webhook calls in the background, a bounded number at a time. Everything the
//! operator writes to the API server goes through here.

use std::fmt::Debug;
use std::sync::Arc;

use covi_api::contract::status_patch;
use covi_api::{Assignment, AssignmentSpec, Host, HostPool, VirtualServer, VmRequest};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use crate::desired::{Note, StatusWrite};
use crate::error::{Error, Result};

/// Status writes in flight at once, per batch.
pub const WRITES_AT_ONCE: usize = 64;

/// A write for [`Writer::apply_each`]: a tag the caller gets back with the result,
/// the object, its status write and the Event that announces it.
pub type Tagged<T, K, S> = (T, Arc<K>, StatusWrite<S>, Option<Note>);

/// A kind whose objects know their own API path.
pub trait Located: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug {
    fn api(&self, client: Client) -> Api<Self>;

    /// "Kind namespace/name", for messages.
    fn describe(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {ns}/{}", Self::kind(&()), self.name_any()),
            None => format!("{} {}", Self::kind(&()), self.name_any()),
        }
    }
}

impl Located for VirtualServer {
    fn api(&self, client: Client) -> Api<Self> {
        Api::namespaced(client, &self.namespace().unwrap_or_default())
    }
}

impl Located for VmRequest {
    fn api(&self, client: Client) -> Api<Self> {
        Api::namespaced(client, &self.namespace().unwrap_or_default())
    }
}

impl Located for Host {
    fn api(&self, client: Client) -> Api<Self> {
        Api::all(client)
    }
}

impl Located for Assignment {
    fn api(&self, client: Client) -> Api<Self> {
        Api::all(client)
    }
}

impl Located for HostPool {
    fn api(&self, client: Client) -> Api<Self> {
        Api::all(client)
    }
}

#[derive(Clone)]
pub struct Writer {
    client: Client,
    recorder: Recorder,
    /// Events published at once, in the background.
    event_slots: Arc<Semaphore>,
    /// Webhook calls at once, in the background.
    webhook_slots: Arc<Semaphore>,
}

impl Writer {
    pub fn new(client: Client, reporter: Reporter) -> Writer {
        Writer {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            event_slots: Arc::new(Semaphore::new(16)),
            webhook_slots: Arc::new(Semaphore::new(4)),
        }
    }

    /// Applies `write` to `object`'s status (conditionally, if it names a version).
    pub async fn apply<K: Located, S: Serialize>(&self, object: &K, write: &StatusWrite<S>) -> Result<()> {
        let mut patch = status_patch::<K>(&write.status);
        if let Some(version) = &write.resource_version {
            patch["metadata"] = serde_json::json!({"resourceVersion": version});
        }
        let params = PatchParams::apply(write.manager).force();
        match object.api(self.client.clone()).patch_status(&object.name_any(), &params, &Patch::Apply(&patch)).await {
            Ok(_) => Ok(()),
            Err(source) => Err(Error::Write { what: format!("status of {}", object.describe()), source }),
        }
    }

    /// Publishes host `host`'s Assignment: a merge patch of its spec (the list is
    /// replaced whole) if it `exists` as far as the caller knows, a create otherwise
    /// (each falls back to the other). Not a server-side apply: only the operator
    /// writes Assignments, and an apply costs the API server more than a merge patch
    /// (one is written per binding in a burst).
    pub async fn assign(&self, host: &str, spec: &AssignmentSpec, exists: bool) -> Result<()> {
        let object = Assignment::new(host, spec.clone());
        let api = object.api(self.client.clone());
        let (patch, params) = (Patch::Merge(serde_json::json!({"spec": spec})), PatchParams::default());
        let merge = || api.patch(host, &params, &patch);
        let result = if exists {
            match merge().await {
                Err(kube::Error::Api(s)) if s.code == 404 => api.create(&PostParams::default(), &object).await,
                other => other,
            }
        } else {
            match api.create(&PostParams::default(), &object).await {
                Err(kube::Error::Api(s)) if s.code == 409 => merge().await,
                other => other,
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(source) => Err(Error::Write { what: object.describe(), source }),
        }
    }

    /// Sets (`Some`) or removes (`None`) label `key` on `object`.
    pub async fn set_label<K: Located>(&self, object: &K, key: &str, value: Option<&str>) -> Result<()> {
        let patch = serde_json::json!({"metadata": {"labels": {key: value}}});
        match object
            .api(self.client.clone())
            .patch(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(source) => Err(Error::Write { what: format!("label {key} of {}", object.describe()), source }),
        }
    }

    /// Applies many writes, [`WRITES_AT_ONCE`] at a time, each with its Event; a
    /// failure is logged and returned beside its tag.
    pub async fn apply_each<T, K: Located, S: serde::Serialize>(
        &self,
        writes: Vec<Tagged<T, K, S>>,
    ) -> Vec<(T, Arc<K>, Result<()>)> {
        let writes = writes.into_iter().map(|(tag, object, write, note)| async move {
            let result = self.apply_and_note(object.as_ref(), &write, note).await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, "status write failed");
            }
            (tag, object, result)
        });
        futures::stream::iter(writes).buffer_unordered(WRITES_AT_ONCE).collect().await
    }

    /// Applies `write` and then publishes `note` about the object.
    pub async fn apply_and_note<K: Located, S: Serialize>(
        &self,
        object: &K,
        write: &StatusWrite<S>,
        note: Option<Note>,
    ) -> Result<()> {
        self.apply(object, write).await?;
        if let Some(note) = note {
            self.publish(object.object_ref(&()), note);
        }
        Ok(())
    }

    /// Merges `finalizers` into `object`'s, conditional on its version. A conflict is
    /// no error: the object moved on and the next pass sees the new one.
    pub async fn set_finalizers<K: Located>(&self, object: &K, finalizers: &[&str]) -> Result<bool> {
        let patch =
            serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": object.resource_version()}});
        match object
            .api(self.client.clone())
            .patch(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(_)) => Ok(false),
            Err(source) => Err(Error::Write { what: format!("finalizers of {}", object.describe()), source }),
        }
    }

    /// Creates `object`; one that exists already counts as created.
    pub async fn create<K: Located + Serialize>(&self, object: &K) -> Result<()> {
        match object.api(self.client.clone()).create(&PostParams::default(), object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(source) => Err(Error::Write { what: format!("creating {}", object.describe()), source }),
        }
    }

    /// Deletes `object`; one that is gone already counts as deleted.
    pub async fn delete<K: Located>(&self, object: &K) -> Result<()> {
        match object.api(self.client.clone()).delete(&object.name_any(), &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(source) => Err(Error::Write { what: format!("deleting {}", object.describe()), source }),
        }
    }

    /// Publishes an Event in the background: the write it follows is not held up by
    /// it (a burst of binds would wait for twice as many round trips). A failure to
    /// publish is logged, never fatal.
    pub fn publish(&self, object: ObjectReference, note: Note) {
        let event = Event {
            type_: note.type_,
            reason: note.reason,
            note: Some(note.message),
            action: note.action.into(),
            secondary: None,
        };
        let (recorder, slots) = (self.recorder.clone(), self.event_slots.clone());
        tokio::spawn(async move {
            let _slot = slots.acquire().await;
            if let Err(e) = recorder.publish(&event, &object).await {
                tracing::warn!(error = %e, "publishing an event failed");
            }
        });
    }

    /// POSTs to a pool's webhook in the background, a few at a time: a slow or
    /// unreachable URL never holds up a pass (and with it failover). A failure is a
    /// WebhookFailed Event on `object`.
    pub fn notify(&self, url: String, body: serde_json::Value, object: ObjectReference) {
        let (recorder, slots) = (self.recorder.clone(), self.webhook_slots.clone());
        tokio::spawn(async move {
            let _slot = slots.acquire().await;
            if let Err(e) = crate::webhook::post(&url, &body).await {
                let event = Event {
                    type_: EventType::Warning,
                    reason: "WebhookFailed".into(),
                    note: Some(format!("{url}: {e}")),
                    action: "Notify".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &object).await {
                    tracing::warn!(error = %e, "publishing an event failed");
                }
            }
        });
    }
}
