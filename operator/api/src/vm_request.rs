//! VmRequest: a request for servers that an approver grants.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::virtual_server::VirtualServerSpec;

/// A request for `replicas` servers made from one template.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "covi.io",
    version = "v1alpha1",
    kind = "VmRequest",
    namespaced,
    status = "VmRequestStatus",
    shortname = "vmr",
    category = "covi",
    doc = "A request for virtual servers. An approver approves or denies it through the status subresource; covi-operator then creates the servers, reports Fulfilled, and reclaims them when the lifetime ends.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Approval and fulfilment state"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Requester", type_ = "string", json_path = ".spec.requester"),
    // A string, not a date: kubectl shows a date as an age, and a future one as <invalid>.
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    derive = "PartialEq",
    validation = Rule::new("self.metadata.name.size() <= 58").message("a request's name is at most 58 characters: its servers are named NAME-0 to NAME-999 and carry NAME in the covi.io/request label")
)]
#[x_kube(validation = Rule::new("has(self.requester) == has(oldSelf.requester) && (!has(self.requester) || self.requester == oldSelf.requester)").message("requester is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct VmRequestSpec {
    /// How many servers to create, 0 to 1000. `kubectl scale` changes it.
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// The servers to create.
    pub template: ServerTemplate,

    /// Why the servers are needed; the approver reads it.
    #[x_kube(validation = Rule::new("self.trim() != ''").message("reason must say why the servers are needed"))]
    #[schemars(length(max = 4096))]
    pub reason: String,

    /// How long the servers live after the request is fulfilled, as a duration such as
    /// 168h; empty means until the request is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) > duration('0s')").message("lifetime must be a positive duration such as 168h or 90m"))]
    #[schemars(length(max = 64))]
    pub lifetime: Option<String>,

    /// The user who made the request, as the API server knows them. It must be the
    /// creating user and cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub requester: Option<String>,
}

/// Template of the servers a request creates.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerTemplate {
    /// Labels and annotations given to each server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
    /// The specification of each server.
    pub spec: VirtualServerSpec,
}

/// Metadata copied to each server of a request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMetadata {
    /// Labels given to each server: Kubernetes label keys and values; keys under
    /// `covi.io/` are covi's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new(LABEL_KEYS_RULE).message(LABEL_KEYS_MESSAGE))]
    #[x_kube(validation = Rule::new(LABEL_VALUES_RULE).message(LABEL_VALUES_MESSAGE))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('covi.io/'))").message("labels under covi.io/ are set by covi, not by a template"))]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    pub labels: BTreeMap<String, String>,
    /// Annotations given to each server: Kubernetes annotation keys, values up to 64 KiB.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new(LABEL_KEYS_RULE).message("annotation keys must be qualified names such as example.com/note: an optional DNS subdomain prefix and '/', then up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"))]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": 65536}))]
    pub annotations: BTreeMap<String, String>,
}

/// A label or annotation key is a qualified name: an optional DNS subdomain prefix of at
/// most 253 characters and '/', then a name of at most 63.
const LABEL_KEYS_RULE: &str = "self.all(k, k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$') && (k.contains('/') ? k.split('/')[0].size() <= 253 && k.split('/')[1].size() <= 63 : k.size() <= 63))";
const LABEL_KEYS_MESSAGE: &str = "label keys must be qualified names such as app or example.com/tier: an optional DNS subdomain prefix and '/', then up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit";
const LABEL_VALUES_RULE: &str = "self.all(k, self[k].matches('^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$'))";
const LABEL_VALUES_MESSAGE: &str =
    "label values are letters, digits, '-', '_' or '.', starting and ending with a letter or digit";

/// Observed state of a request. Approvers write only the Approved or Denied
/// condition; covi-operator writes the rest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmRequestStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending (waiting for approval), Approved, Denied, Provisioning, Fulfilled or Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VmRequestPhase>,
    /// Servers that exist for this request.
    #[serde(default)]
    pub replicas: i32,
    /// Servers of this request that are Ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector matching the request's servers, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// When the servers are reclaimed: fulfilment time plus lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// What the Approved condition covers, recorded by covi-operator when it acts on an
    /// approval. The request may shrink within it; growing past its replicas or changing
    /// the template or lifetime waits for a new approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<ApprovedSpec>,
    /// Conditions: Approved, Denied, Fulfilled, Expired; one entry per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// The part of a request an approval covers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApprovedSpec {
    /// The generation of the request that was approved.
    pub generation: i64,
    /// The most servers the approval allows.
    pub replicas: i32,
    /// The lifetime that was approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,
    /// The template that was approved, as it was then.
    #[schemars(schema_with = "any_object")]
    pub template: ServerTemplate,
}

/// The schema of an object covi writes and validates itself: kept as written.
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

impl VmRequest {
    /// What an approval of the request as it is now would cover.
    pub fn approvable(&self) -> ApprovedSpec {
        ApprovedSpec {
            generation: self.metadata.generation.unwrap_or_default(),
            replicas: self.spec.replicas,
            lifetime: self.spec.lifetime.clone(),
            template: self.spec.template.clone(),
        }
    }
}

/// Approval and fulfilment state of a request.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRequestPhase {
    /// Waiting for an approver.
    Pending,
    /// Approved; servers are not created yet.
    Approved,
    /// Denied by an approver; nothing is created.
    Denied,
    /// Servers are being created.
    Provisioning,
    /// All servers are Ready.
    Fulfilled,
    /// The lifetime ended and the servers were reclaimed.
    Expired,
}
