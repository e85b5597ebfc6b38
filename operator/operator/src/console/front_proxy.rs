//! Whom the operator believes about the user: the API server's front proxy. The API
//! server publishes how it proxies to aggregated APIs in the ConfigMap
//! `kube-system/extension-apiserver-authentication`: the CA of its client certificate,
//! the names that certificate may carry, and the headers naming the user. A request
//! whose client certificate does not chain to that CA never reaches a handler; one whose
//! certificate has another name is refused; the headers of anything else are not read.

use std::collections::BTreeMap;

use http::HeaderMap;

/// The ConfigMap the API server keeps for aggregated API servers.
pub const CONFIG_MAP: (&str, &str) = ("kube-system", "extension-apiserver-authentication");

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontProxy {
    pub client_ca: String,
    /// Common names the proxy's certificate may have; empty: any the CA signed.
    pub allowed_names: Vec<String>,
    pub user_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_prefixes: Vec<String>,
}

/// The user the API server authenticated, as it tells an aggregated server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

fn list(data: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>, String> {
    match data.get(key) {
        None => Ok(Vec::new()),
        Some(text) => serde_json::from_str(text).map_err(|e| format!("{key} is not a JSON list of strings: {e}")),
    }
}

impl FrontProxy {
    /// From the ConfigMap's data; an error when the API server has no front proxy.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<FrontProxy, String> {
        let client_ca = data.get("requestheader-client-ca-file").filter(|ca| !ca.trim().is_empty()).ok_or(
            "the API server has no --requestheader-client-ca-file, so it proxies to no aggregated API \
             (the aggregation layer is off)",
        )?;
        let user_headers = list(data, "requestheader-username-headers")?;
        if user_headers.is_empty() {
            return Err("the API server names no --requestheader-username-headers".into());
        }
        Ok(FrontProxy {
            client_ca: client_ca.clone(),
            allowed_names: list(data, "requestheader-allowed-names")?,
            user_headers,
            group_headers: list(data, "requestheader-group-headers")?,
            extra_prefixes: list(data, "requestheader-extra-headers-prefix")?,
        })
    }

    /// Whether a client certificate with this common name may speak for users.
    pub fn allows(&self, common_name: Option<&str>) -> bool {
        self.allowed_names.is_empty() || common_name.is_some_and(|cn| self.allowed_names.iter().any(|n| n == cn))
    }

    /// The user the headers name, or None when they name nobody.
    pub fn user(&self, headers: &HeaderMap) -> Option<User> {
        let values = |name: &str| -> Vec<String> {
            headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).map(str::to_string).collect()
        };
        let name = self.user_headers.iter().flat_map(|h| values(h)).find(|v| !v.is_empty())?;
        let groups = self.group_headers.iter().flat_map(|h| values(h)).collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (header, value) in headers {
            let lower = header.as_str();
            for prefix in &self.extra_prefixes {
                if let Some(key) = lower.strip_prefix(&prefix.to_ascii_lowercase())
                    && let Ok(value) = value.to_str()
                {
                    extra.entry(unescape(key)).or_default().push(value.to_string());
                }
            }
        }
        Some(User { name, groups, extra })
    }
}

/// Extra keys arrive percent-encoded (`X-Remote-Extra-Acme.com%2Fproject`).
fn unescape(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = key.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> BTreeMap<String, String> {
        [
            ("requestheader-client-ca-file", "-----BEGIN CERTIFICATE-----\n..."),
            ("requestheader-allowed-names", r#"["front-proxy-client"]"#),
            ("requestheader-username-headers", r#"["X-Remote-User"]"#),
            ("requestheader-group-headers", r#"["X-Remote-Group"]"#),
            ("requestheader-extra-headers-prefix", r#"["X-Remote-Extra-"]"#),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn the_user_comes_from_the_headers_the_api_server_names() {
        let proxy = FrontProxy::from_data(&data()).unwrap();
        assert!(proxy.allows(Some("front-proxy-client")));
        assert!(!proxy.allows(Some("someone-else")) && !proxy.allows(None));
        let mut headers = HeaderMap::new();
        headers.append("x-remote-user", "bob".parse().unwrap());
        headers.append("x-remote-group", "team-a".parse().unwrap());
        headers.append("x-remote-group", "system:authenticated".parse().unwrap());
        headers.append("x-remote-extra-acme.com%2fproject", "p1".parse().unwrap());
        let user = proxy.user(&headers).unwrap();
        assert_eq!(user.name, "bob");
        assert_eq!(user.groups, ["team-a", "system:authenticated"]);
        assert_eq!(user.extra["acme.com/project"], ["p1"]);
        assert_eq!(proxy.user(&HeaderMap::new()), None, "no user header: nobody");
    }

    #[test]
    fn an_api_server_without_a_front_proxy_is_named_as_the_cause() {
        let mut d = data();
        d.remove("requestheader-client-ca-file");
        assert!(FrontProxy::from_data(&d).unwrap_err().contains("--requestheader-client-ca-file"));
        let mut d = data();
        d.insert("requestheader-allowed-names".into(), "front-proxy-client".into());
        assert!(FrontProxy::from_data(&d).unwrap_err().contains("requestheader-allowed-names"));
    }
}
