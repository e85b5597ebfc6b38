//! The Argo CD health checks covi ships (deploy/gitops/argocd/*.lua), run by Debian's
//! Lua 5.4 against recorded objects in each state, as Argo CD runs them.

use std::process::Command;

use serde_json::{Value, json};

/// A JSON value as a Lua table constructor.
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let escaped: String = s
                .chars()
                .map(|c| match c {
                    '\\' => "\\\\".to_string(),
                    '"' => "\\\"".to_string(),
                    '\n' => "\\n".to_string(),
                    c => c.to_string(),
                })
                .collect();
            format!("\"{escaped}\"")
        }
        Value::Array(items) => format!("{{{}}}", items.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => {
            format!(
                "{{{}}}",
                map.iter().map(|(k, v)| format!("[{}] = {}", lua(&json!(k)), lua(v))).collect::<Vec<_>>().join(", ")
            )
        }
    }
}

/// Runs `script` for `obj`; returns (status, message).
fn health(script: &str, obj: &Value) -> (String, String) {
    let path = covi_tests::repo_root().join("deploy/gitops/argocd").join(script);
    let program = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(hs.status, \"\\t\", hs.message or \"\")",
        lua(obj),
        lua(&json!(path.display().to_string()))
    );
    let out = Command::new("lua5.4")
        .arg("-e")
        .arg(&program)
        .output()
        .expect("lua5.4 runs (installed by hack/install-deps.sh)");
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, message) = text.split_once('\t').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

/// Each object must get `status` and a message containing its fragment.
fn assert_cases<const N: usize>(script: &str, cases: [(Value, &str, &str); N]) {
    for (obj, status, fragment) in cases {
        let (got, message) = health(script, &obj);
        assert_eq!(got, status, "{script}: {obj}");
        assert!(message.contains(fragment), "{script}: {message:?} lacks {fragment:?}");
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": "2026-11-27T00:00:00Z"})
}

fn object(generation: i64, status: Value) -> Value {
    json!({"metadata": {"name": "x", "generation": generation}, "spec": {"replicas": 3}, "status": status})
}

#[test]
fn virtual_server_health_follows_its_lifecycle() {
    let cases = [
        (json!({"metadata": {"name": "x", "generation": 1}}), "Progressing", "Waiting for covi"),
        (
            object(
                2,
                json!({"observedGeneration": 1, "phase": "Running", "conditions": [condition("Ready", "True", "Running", "up")]}),
            ),
            "Progressing",
            "generation 2",
        ),
        (
            object(
                1,
                json!({"observedGeneration": 1, "phase": "Pending", "conditions": [condition("Scheduled", "False", "InsufficientCPU", "no host in pool lab has 8 free CPUs")]}),
            ),
            "Progressing",
            "InsufficientCPU: no host",
        ),
        (
            object(
                1,
                json!({"observedGeneration": 1, "phase": "Running", "conditions": [condition("Ready", "True", "Running", "domain shop.web runs on host-1")]}),
            ),
            "Healthy",
            "runs on host-1",
        ),
        (
            object(
                1,
                json!({"observedGeneration": 1, "phase": "Failed", "conditions": [condition("Scheduled", "False", "ImageNotFound", "image w is not in the catalog")]}),
            ),
            "Degraded",
            "ImageNotFound: image w",
        ),
        (
            object(
                1,
                json!({"observedGeneration": 1, "phase": "Failed", "conditions": [condition("Scheduled", "True", "Bound", "b"), condition("Ready", "False", "HostLost", "host h1 was lost")]}),
            ),
            "Degraded",
            "HostLost",
        ),
        (
            object(
                1,
                json!({"observedGeneration": 1, "phase": "Stopped", "conditions": [condition("Ready", "True", "Stopped", "off")]}),
            ),
            "Suspended",
            "runPolicy is Stopped",
        ),
    ];
    assert_cases("virtualserver.lua", cases);
}

#[test]
fn vm_request_health_follows_approval_and_fulfilment() {
    let cases = [
        (object(1, json!({"observedGeneration": 1, "phase": "Pending"})), "Suspended", "Waiting for an approver"),
        (
            object(1, json!({"observedGeneration": 1, "phase": "Provisioning", "readyReplicas": 1})),
            "Progressing",
            "1 of 3 servers Ready",
        ),
        (object(1, json!({"observedGeneration": 1, "phase": "Fulfilled"})), "Healthy", "Fulfilled"),
        (object(1, json!({"observedGeneration": 1, "phase": "Expired"})), "Healthy", "Expired"),
        (
            object(
                1,
                json!({"observedGeneration": 1, "phase": "Denied", "conditions": [condition("Denied", "True", "DeniedByUser", "use the shared pool")]}),
            ),
            "Degraded",
            "use the shared pool",
        ),
        (
            object(
                1,
                json!({"observedGeneration": 1, "phase": "Pending", "conditions": [condition("QuotaExceeded", "True", "OverQuota", "may hold 3 servers")]}),
            ),
            "Degraded",
            "QuotaExceeded",
        ),
    ];
    assert_cases("vmrequest.lua", cases);
}

#[test]
fn pool_and_host_health_report_readiness() {
    let pool = |conditions: Value| object(1, json!({"observedGeneration": 1, "conditions": conditions}));
    assert_eq!(health("hostpool.lua", &pool(json!([condition("Ready", "True", "HostsReady", "3 of 3")]))).0, "Healthy");
    assert_eq!(
        health("hostpool.lua", &pool(json!([condition("Ready", "False", "NoReadyHost", "none")]))).0,
        "Degraded"
    );
    let paused = pool(json!([
        condition("Ready", "True", "HostsReady", "1 of 3"),
        condition("FailoverPaused", "True", "MassFailure", "2 of 3 hosts are lost")
    ]));
    assert_eq!(health("hostpool.lua", &paused), ("Degraded".into(), "2 of 3 hosts are lost".into()));

    let host = |spec: Value, conditions: Value| json!({"metadata": {"name": "h"}, "spec": spec, "status": {"conditions": conditions}});
    assert_eq!(
        health("host.lua", &host(json!({}), json!([condition("Ready", "True", "AgentReady", "ok")]))).0,
        "Healthy"
    );
    assert_eq!(
        health("host.lua", &host(json!({}), json!([condition("Ready", "False", "HostLost", "silent")]))),
        ("Degraded".into(), "HostLost: silent".into())
    );
    assert_eq!(
        health("host.lua", &host(json!({"maintenance": true}), json!([]))),
        ("Suspended".into(), "in maintenance".into())
    );
    assert_eq!(health("host.lua", &json!({"metadata": {"name": "h"}, "spec": {}})).0, "Progressing");
}
