//! covi's Kubernetes API: the custom resources of group `covi.io`, version `v1alpha1`.
//!
//! This crate holds types and pure helpers only (no client, no runtime), so the
//! operator, the agent, `crdgen` and the tests share one definition of the API.
//! Every field's doc comment becomes its `kubectl explain` text.

// kube's `printcolumn(type_ = ...)` repeats keys on purpose; clippy reads them as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod assignment;
pub mod condition;
pub mod console;
pub mod contract;
pub mod disruption;
pub mod duration;
pub mod history;
pub mod host;
pub mod host_pool;
pub mod quantity;
pub mod usage;
pub mod virtual_server;
pub mod vm_request;

pub use assignment::{Assignment, AssignmentSpec};
pub use condition::{Condition, ConditionStatus};
pub use disruption::{Disruption, DisruptionSpec, DisruptionStatus};
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

/// The CustomResourceDefinitions of all six kinds, in the order they are installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    [HostPool::crd(), Host::crd(), VirtualServer::crd(), VmRequest::crd(), Disruption::crd(), Assignment::crd()]
        .into_iter()
        .map(unwrap_descriptions)
        .collect()
}

/// Doc comments are wrapped at 100 columns in the source; `kubectl explain` wraps text
/// itself, so single line breaks become spaces (blank lines still separate paragraphs).
fn unwrap_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    match v {
                        serde_json::Value::String(text) if key == "description" => {
                            *text = text.split("\n\n").map(|p| p.replace('\n', " ")).collect::<Vec<_>>().join("\n\n");
                        }
                        _ => walk(v),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD serialises");
    walk(&mut value);
    serde_json::from_value(value).expect("a CRD with edited descriptions deserialises")
}

/// CEL rule for a volume name of a storage pool (a server's ISO, a catalog image):
/// letters, digits, '.', '_' and '-', starting with a letter or digit, so never a path
/// ('/', '..') outside the pool.
pub const VOLUME_NAME_RULE: &str = "self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*$')";
/// The message of [`VOLUME_NAME_RULE`].
pub const VOLUME_NAME_MESSAGE: &str =
    "must be the name of a volume in the pool's storage pool (letters, digits, '.', '_', '-'), not a path";

#[cfg(test)]
mod tests {
    #[test]
    fn descriptions_read_as_prose() {
        for crd in super::crds() {
            let yaml = serde_json::to_string(&crd).unwrap();
            let value: serde_json::Value = serde_json::from_str(&yaml).unwrap();
            let mut stack = vec![&value];
            while let Some(v) = stack.pop() {
                match v {
                    serde_json::Value::Object(map) => {
                        if let Some(serde_json::Value::String(d)) = map.get("description") {
                            assert!(!d.replace("\n\n", "").contains('\n'), "wrapped description: {d:?}");
                        }
                        stack.extend(map.values());
                    }
                    serde_json::Value::Array(items) => stack.extend(items),
                    _ => {}
                }
            }
        }
    }
}
