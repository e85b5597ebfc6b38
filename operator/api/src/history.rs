//! The record covi keeps of every deleted server: who, what, where, from when to when,
//! and how it ended. The operator writes it before the server's last finalizer goes,
//! into one ConfigMap per tenant namespace in the operator's own namespace
//! (`covi-history-<namespace>`, key `servers.jsonl`, one JSON record per line, oldest
//! first), where tenants cannot edit it. Each ConfigMap keeps the newest
//! `MAX_RECORDS` records; how many older ones were dropped is its `covi.io/dropped`
//! annotation.

use serde::{Deserialize, Serialize};

/// The finalizer under which the operator records a deleted server's history.
pub const FINALIZER: &str = "covi.io/history";
/// The data key of a history ConfigMap.
pub const KEY: &str = "servers.jsonl";
/// Label on every history ConfigMap, and the one naming the namespace it records.
pub const LABEL: &str = "covi.io/history";
pub const NAMESPACE_LABEL: &str = "covi.io/history-namespace";
/// Annotation: records dropped to keep the ConfigMap bounded.
pub const DROPPED: &str = "covi.io/dropped";
/// Annotation on a server created by a request: who approved the request, as the
/// approval named them when the server was created (a template cannot set it).
pub const APPROVED_BY: &str = "covi.io/approved-by";
/// Records kept per namespace (well under a ConfigMap's 1 MiB at a few hundred bytes each).
pub const MAX_RECORDS: usize = 1500;

/// The name of the history ConfigMap of `namespace`.
pub fn config_map_name(namespace: &str) -> String {
    format!("covi-history-{namespace}")
}

/// One deleted server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServerRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub owner: String,
    pub purpose: String,
    pub pool: String,
    /// The host it last ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The VmRequest that created it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Who approved that request, as the approval names them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
    /// Creation time (RFC 3339).
    pub created: String,
    /// When its deletion was asked for (RFC 3339).
    pub deleted: String,
    /// How it ended: Deleted (by itself, or scaled away from its request), Expired
    /// (its or its request's lifetime ended), or RequestDeleted (with its request).
    pub ended: String,
    /// Times it was restarted on another host after losing its own.
    #[serde(default)]
    pub failovers: u32,
}

/// `existing` history text with `record` appended, keeping the newest `max` records;
/// returns the text and how many records were dropped. A record already there (same
/// UID: an append retried after a lost response) is not added twice.
pub fn append(existing: &str, record: &ServerRecord, max: usize) -> (String, usize) {
    let mut lines: Vec<&str> = existing.lines().filter(|l| !l.trim().is_empty()).collect();
    let uid = format!("\"uid\":{}", serde_json::to_string(&record.uid).unwrap_or_default());
    let new_line = serde_json::to_string(record).unwrap_or_default();
    if !lines.iter().any(|l| l.contains(&uid)) {
        lines.push(&new_line);
    }
    let dropped = lines.len().saturating_sub(max);
    let kept = &lines[dropped..];
    (kept.iter().map(|l| format!("{l}\n")).collect(), dropped)
}

/// The records of a history text; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<ServerRecord> {
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The approver named by an Approved condition's message, which `kubectl covi approve`
/// ends with the approver's user name in parentheses: "for the report (bob)" → bob.
pub fn approver_from_message(message: &str) -> Option<String> {
    let inner = message.trim_end().strip_suffix(')')?;
    let (_, name) = inner.rsplit_once('(')?;
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: &str) -> ServerRecord {
        ServerRecord { namespace: "shop".into(), name: format!("web-{uid}"), uid: uid.into(), ..Default::default() }
    }

    #[test]
    fn appends_once_and_keeps_the_newest() {
        let (text, dropped) = append("", &record("a"), 2);
        assert_eq!(dropped, 0);
        let (text, _) = append(&text, &record("a"), 2);
        assert_eq!(parse(&text).len(), 1, "a retried append adds nothing");
        let (text, _) = append(&text, &record("b"), 2);
        let (text, dropped) = append(&text, &record("c"), 2);
        assert_eq!(dropped, 1);
        let uids: Vec<_> = parse(&text).into_iter().map(|r| r.uid).collect();
        assert_eq!(uids, ["b", "c"], "oldest dropped, order kept");
    }

    #[test]
    fn the_approver_is_the_name_in_parentheses_at_the_end() {
        assert_eq!(approver_from_message("for the quarterly report (bob)").as_deref(), Some("bob"));
        assert_eq!(approver_from_message("ok (see ticket 4) (system:admin)").as_deref(), Some("system:admin"));
        assert_eq!(approver_from_message("approved"), None);
        assert_eq!(approver_from_message("()"), None);
    }
}
