//! What the console's HTTP side answers, as pure functions: which route a path is, the
//! discovery documents the API server reads, and `metav1.Status` bodies for refusals
//! (kubectl and kube-rs show their message).

use covi_api::console::{GROUP, PROTOCOL, RESOURCE, SUBRESOURCE, VERSION};
use serde_json::{Value, json};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/apis/subresources.covi.io`
    Group,
    /// `/apis/subresources.covi.io/v1alpha1`: what the API server's discovery and
    /// availability check read.
    Resources,
    /// A server's console.
    Console {
        namespace: String,
        name: String,
    },
    NotFound,
}

pub fn route(path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/apis/").and_then(|p| p.strip_prefix(GROUP)) else {
        return Route::NotFound;
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Route::Group;
    }
    let Some(rest) = rest.strip_prefix('/').and_then(|p| p.strip_prefix(VERSION)) else {
        return Route::NotFound;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [""] => Route::Resources,
        ["", "namespaces", namespace, resource, name, sub]
            if *resource == RESOURCE && *sub == SUBRESOURCE && !namespace.is_empty() && !name.is_empty() =>
        {
            Route::Console { namespace: namespace.to_string(), name: name.to_string() }
        }
        _ => Route::NotFound,
    }
}

pub fn group() -> Value {
    let version = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [version], "preferredVersion": version})
}

pub fn resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [{
            "name": format!("{RESOURCE}/{SUBRESOURCE}"),
            "singularName": "",
            "namespaced": true,
            "kind": "VirtualServer",
            "verbs": ["get"],
        }],
    })
}

/// A failed `metav1.Status`.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

/// The subprotocol to answer with, if the client offered it.
pub fn protocol(offered: Option<&str>) -> Option<&'static str> {
    offered?.split(',').map(str::trim).any(|p| p == PROTOCOL).then_some(PROTOCOL)
}

/// `?force=true`: take the console over from another session.
pub fn force(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|kv| kv == "force=true" || kv == "force=1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let base = "/apis/subresources.covi.io/v1alpha1";
        assert_eq!(route("/apis/subresources.covi.io"), Route::Group);
        assert_eq!(route(base), Route::Resources);
        assert_eq!(route(&format!("{base}/")), Route::Resources);
        assert_eq!(
            route(&format!("{base}/namespaces/team-a/virtualservers/web-1/console")),
            Route::Console { namespace: "team-a".into(), name: "web-1".into() }
        );
        for other in [
            "/apis",
            "/apis/subresources.covi.io.evil/v1alpha1",
            "/apis/subresources.covi.io/v2",
            &format!("{base}/namespaces/team-a/virtualservers/web-1"),
            &format!("{base}/namespaces/team-a/hosts/web-1/console"),
            &format!("{base}/namespaces//virtualservers/web-1/console"),
            &format!("{base}/namespaces/a/virtualservers/b/console/extra"),
        ] {
            assert_eq!(route(other), Route::NotFound, "{other}");
        }
    }

    #[test]
    fn protocols_and_flags() {
        assert_eq!(protocol(Some("v5.channel.k8s.io, v4.channel.k8s.io")), Some(PROTOCOL));
        assert_eq!(protocol(Some("base64.channel.k8s.io")), None);
        assert_eq!(protocol(None), None);
        assert!(force(Some("a=b&force=true")) && !force(Some("force=false")) && !force(None));
        assert_eq!(resources()["resources"][0]["name"], "virtualservers/console");
        assert_eq!(status(403, "Forbidden", "no")["code"], 403);
    }
}
