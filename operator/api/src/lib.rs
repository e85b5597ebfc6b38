//! covi's Kubernetes API: the custom resources of group `covi.io`, version `v1alpha1`.
//!
//! This crate holds types and pure helpers only (no client, no runtime), so the
//! operator, the agent, `crdgen` and the tests share one definition of the API.
//! Every field's doc comment becomes its `kubectl explain` text.

// kube's `printcolumn(type_ = ...)` repeats keys on purpose; clippy reads them as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod condition;
pub mod host;
pub mod host_pool;
pub mod quantity;
pub mod virtual_server;
pub mod vm_request;

pub use condition::{Condition, ConditionStatus};
pub use host::{Host, HostSpec, HostStatus};
pub use host_pool::{HostPool, HostPoolSpec, HostPoolStatus};
pub use virtual_server::{VirtualServer, VirtualServerSpec, VirtualServerStatus};
pub use vm_request::{VmRequest, VmRequestSpec, VmRequestStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every covi resource.
pub const GROUP: &str = "covi.io";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";

/// The CustomResourceDefinitions of all four kinds, in the order they are installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![HostPool::crd(), Host::crd(), VirtualServer::crd(), VmRequest::crd()]
}
