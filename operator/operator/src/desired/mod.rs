//! What the operator wants each object's status to say, decided without I/O: every
//! function here takes objects as the pass saw them and returns typed status writes
//! and the Events that go with them, or nothing when the object already says it.
//! [`crate::writer`] applies them; the field manager of each write is part of the
//! decision (see [`covi_api::contract::manager`]).

pub mod assignment;
pub mod host;
pub mod pool;
pub mod request;
pub mod server;

use covi_api::Condition;
use kube::runtime::events::EventType;
use serde::Serialize;

/// One server-side apply of an object's status.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusWrite<S> {
    /// Owns exactly the fields in `status`.
    pub manager: &'static str,
    /// The kind's own status type with only the fields this manager owns set; its
    /// serializer leaves out the rest.
    pub status: S,
    /// Write only if the object is still at this version (a binding decided on it).
    pub resource_version: Option<String>,
}

impl<S> StatusWrite<S> {
    pub fn new(manager: &'static str, status: S) -> Self {
        StatusWrite { manager, status, resource_version: None }
    }
}

/// An Event about the object a write is for.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub type_: EventType,
    pub reason: String,
    pub message: String,
    /// What covi was doing (Schedule, Failover, Request, …).
    pub action: &'static str,
}

impl Note {
    pub fn normal(reason: impl Into<String>, message: impl Into<String>, action: &'static str) -> Note {
        Note { type_: EventType::Normal, reason: reason.into(), message: message.into(), action }
    }

    pub fn warning(reason: impl Into<String>, message: impl Into<String>, action: &'static str) -> Note {
        Note { type_: EventType::Warning, reason: reason.into(), message: message.into(), action }
    }
}

/// A status made of conditions alone, for managers that own a condition or two and
/// nothing else (HostStatus would carry its `servers` count along).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Conditions {
    pub conditions: Vec<Condition>,
}

/// The conditions of `types` in `all`, in their order.
pub fn only(all: &[Condition], types: &[&str]) -> Vec<Condition> {
    all.iter().filter(|c| types.contains(&c.type_.as_str())).cloned().collect()
}
