//! The Events about one object, as `kubectl describe` shows them. Events are published
//! in the background, after the status write they describe: a test that expects one
//! waits for it with a deadline instead of reading once.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams};

/// (reason, message) of every Event about `name` in namespace `ns`, oldest first as
/// the API server lists them.
pub async fn of(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let params = ListParams::default().fields(&format!("involvedObject.name={name}"));
    let list = api.list(&params).await.expect("list events");
    list.items.into_iter().map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default())).collect()
}

/// The Events of `name` once `done` says they are all there, or as they are at
/// `deadline` (for the caller's assertion to show them).
pub async fn wait(
    client: &Client,
    ns: &str,
    name: &str,
    deadline: Duration,
    done: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let until = Instant::now() + deadline;
    loop {
        let events = of(client, ns, name).await;
        if done(&events) || Instant::now() >= until {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The reasons of `name`'s Events once every one of `wanted` is there, or as they are
/// at `deadline`.
pub async fn reasons_including(
    client: &Client,
    ns: &str,
    name: &str,
    deadline: Duration,
    wanted: &[&str],
) -> Vec<String> {
    let all = |events: &[(String, String)]| wanted.iter().all(|w| events.iter().any(|(r, _)| r == w));
    wait(client, ns, name, deadline, all).await.into_iter().map(|(reason, _)| reason).collect()
}
