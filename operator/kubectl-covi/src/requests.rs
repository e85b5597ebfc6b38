//! Approving, denying, listing and describing VmRequests.
//!
//! Decisions are written by server-side apply of the Approved or Denied condition
//! under the user's own field manager; covi's admission policy checks who may decide.
//! An approval names the generation of the request it approves: the one `pending` showed
//! (`--generation`), or the one read just before writing; a request changed in between
//! is refused, never approved unseen.

use covi_api::condition::find_condition;
use covi_api::contract::condition_type;
use covi_api::{VirtualServer, VmRequest};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::table::{Output, Table};
use crate::{Scope, api_message};

/// The user the API server sees, for the field manager and the message.
pub async fn whoami(client: &Client) -> Result<String, String> {
    let review: SelfSubjectReview =
        serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}))
            .map_err(|e| e.to_string())?;
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await.map_err(|e| format!("asking who you are: {e}"))?;
    answer
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .ok_or_else(|| "the API server did not say who you are".to_string())
}

/// Writes the decision for the generation the approver saw: `seen` when given, else the
/// one read here. The write is conditional on the object read, so a request changed in
/// between is refused rather than decided unseen.
pub async fn decide(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    message: &str,
    seen: Option<i64>,
) -> Result<String, String> {
    let user = whoami(client).await?;
    let api: Api<VmRequest> = Api::namespaced(client.clone(), ns);
    let reason = if type_ == condition_type::APPROVED { "ApprovedByUser" } else { "DeniedByUser" };
    let manager = format!("kubectl-covi/{user}");
    let mut seen = seen;
    // The operator writes status too: a write that lost only to one of its updates is
    // tried again, as long as the request itself is still the generation seen.
    for _ in 0..3 {
        let request = api.get(name).await.map_err(|e| format!("vmrequest/{name}: {}", api_message(e)))?;
        let generation = request.metadata.generation.unwrap_or_default();
        let saw = *seen.get_or_insert(generation);
        if saw != generation {
            return Err(format!(
                "vmrequest/{name} changed since you read it: you saw generation {saw}, it is now at {generation}; \
                 nothing was written: run kubectl covi describe {name} and decide again"
            ));
        }
        let patch = json!({"apiVersion": VmRequest::api_version(&()), "kind": VmRequest::kind(&()),
        "metadata": {"resourceVersion": request.resource_version()},
        "status": {"conditions": [{
            "type": type_, "status": "True", "reason": reason,
            "message": format!("{message} ({user})"),
            "observedGeneration": generation,
            "lastTransitionTime": Timestamp::now().to_string(),
        }]}});
        match api.patch_status(name, &PatchParams::apply(&manager).force(), &Patch::Apply(&patch)).await {
            Ok(_) => return Ok(format!("vmrequest/{name} {} (generation {generation})\n", type_.to_lowercase())),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(api_message(e)),
        }
    }
    Err(format!("vmrequest/{name} kept changing while you decided; nothing was written: try again"))
}

/// Requests waiting for a person: in every namespace you may list (falling back to
/// your current namespace when you may not list cluster-wide), or in `-n NAMESPACE`.
pub async fn pending(client: &Client, scope: &Scope, output: Output) -> Result<String, String> {
    let requests = scope.list::<VmRequest>(client, "requests").await?;
    let mut table = Table::new(&["NAMESPACE", "NAME", "GENERATION", "REQUESTER", "REPLICAS", "WAITING", "REASON"]);
    for r in requests {
        let status = r.status.clone().unwrap_or_default();
        if status.phase != Some(covi_api::vm_request::VmRequestPhase::Pending) {
            continue;
        }
        // A request that outgrew its approval says what changed; a quota holds others.
        let waiting = find_condition(&status.conditions, condition_type::APPROVAL_OUTDATED)
            .filter(|c| c.status == "True")
            .map(|c| format!("re-approval: {}", c.message))
            .or_else(|| {
                find_condition(&status.conditions, condition_type::QUOTA_EXCEEDED)
                    .filter(|c| c.status == "True")
                    .map(|c| format!("quota: {}", c.message))
            })
            .unwrap_or_else(|| "approval".into());
        table.push(vec![
            r.namespace().unwrap_or_default(),
            r.name_any(),
            r.metadata.generation.unwrap_or_default().to_string(),
            r.spec.requester.clone().unwrap_or_else(|| "-".into()),
            r.spec.replicas.to_string(),
            waiting,
            r.spec.reason.clone(),
        ]);
    }
    Ok(table.render(output))
}

pub async fn describe(client: &Client, ns: &str, name: &str) -> Result<String, String> {
    let r = Api::<VmRequest>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| format!("vmrequest/{name}: {e}"))?;
    let status = r.status.clone().unwrap_or_default();
    let mut out = format!(
        "Name:       {}\nNamespace:  {ns}\nGeneration: {}\nRequester:  {}\nReason:     {}\nReplicas:   {} ({} ready)\nLifetime:   {}\nPhase:      {}\nExpires:    {}\n",
        r.name_any(),
        r.metadata.generation.unwrap_or_default(),
        r.spec.requester.as_deref().unwrap_or("-"),
        r.spec.reason,
        r.spec.replicas,
        status.ready_replicas,
        r.spec.lifetime.as_deref().unwrap_or("-"),
        status.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "-".into()),
        status.expires_at.map(|t| t.0.to_string()).unwrap_or_else(|| "-".into()),
    );
    out.push_str("Conditions:\n");
    use condition_type::*;
    for t in [APPROVED, APPROVAL_OUTDATED, DENIED, QUOTA_EXCEEDED, FULFILLED, EXPIRING_SOON, EXPIRED] {
        if let Some(c) = find_condition(&status.conditions, t) {
            let at = c.observed_generation.map(|g| format!(" (generation {g})")).unwrap_or_default();
            out.push_str(&format!("  {t}={} {}: {}{at}\n", c.status, c.reason, c.message));
        }
    }
    let servers = Api::<VirtualServer>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("covi.io/request={name}")))
        .await
        .map_err(|e| format!("listing servers: {e}"))?;
    out.push_str("Servers:\n");
    for s in servers.items {
        let st = s.status.clone().unwrap_or_default();
        out.push_str(&format!(
            "  {}\t{}\t{}\t{}\n",
            s.name_any(),
            st.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "-".into()),
            st.host.unwrap_or_else(|| "-".into()),
            st.address.unwrap_or_else(|| "-".into())
        ));
    }
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    out.push_str("Events:\n");
    for e in events {
        out.push_str(&format!("  {}\t{}\n", e.reason.unwrap_or_default(), e.message.unwrap_or_default()));
    }
    Ok(out)
}
