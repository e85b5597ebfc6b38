//! `kubectl covi`: approve, deny, list and describe VmRequests.
//!
//!   kubectl covi approve NAME [-m MESSAGE] [--generation N] [-n NAMESPACE]
//!   kubectl covi deny NAME -m MESSAGE [-n NAMESPACE]
//!   kubectl covi pending [-n NAMESPACE]   (default: every namespace you may list)
//!   kubectl covi describe NAME [-n NAMESPACE]
//!
//! Decisions are written by server-side apply of the Approved or Denied condition
//! under the user's own field manager; covi's admission policy checks who may decide.
//! An approval names the generation of the request it approves: the one `pending` showed
//! (`--generation`), or the one read just before writing; a request changed in between
//! is refused, never approved unseen.

use std::process::ExitCode;

use covi_api::condition::find_condition;
use covi_api::contract::condition_type;
use covi_api::{VirtualServer, VmRequest};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

const USAGE: &str = "usage:
  kubectl covi approve NAME [-m MESSAGE] [--generation N] [-n NAMESPACE]
      --generation N: approve only if the request is still at generation N (as pending showed)
  kubectl covi deny NAME -m MESSAGE [-n NAMESPACE]
  kubectl covi pending [-n NAMESPACE]   (default: every namespace you may list)
  kubectl covi describe NAME [-n NAMESPACE]
every command also takes --as USER and --as-group GROUP, as kubectl does";

#[derive(Debug)]
struct Args {
    command: String,
    name: Option<String>,
    message: Option<String>,
    generation: Option<i64>,
    namespace: Option<String>,
    all_namespaces: bool,
    /// kubectl's --as and --as-group, which kubectl leaves to plugins.
    impersonate: Option<String>,
    impersonate_groups: Vec<String>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut it = args.iter();
    let command = it.next().cloned().ok_or_else(|| USAGE.to_string())?;
    let mut a = Args {
        command,
        name: None,
        message: None,
        generation: None,
        namespace: None,
        all_namespaces: false,
        impersonate: None,
        impersonate_groups: Vec::new(),
    };
    while let Some(arg) = it.next() {
        // --flag=value is --flag value, as kubectl reads it.
        let (flag, mut inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |what: &str| inline.take().or_else(|| it.next().cloned()).ok_or(format!("{flag} needs {what}"));
        match flag {
            "-m" | "--message" => a.message = Some(value("a message")?),
            "-n" | "--namespace" => a.namespace = Some(value("a namespace")?),
            "--generation" => {
                let n = value("a generation")?;
                a.generation = Some(n.parse().map_err(|_| format!("--generation needs a number, not {n:?}"))?);
            }
            "-A" | "--all-namespaces" => a.all_namespaces = true,
            "--as" => a.impersonate = Some(value("a user")?),
            "--as-group" => a.impersonate_groups.push(value("a group")?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other if other.starts_with('-') => return Err(format!("unknown flag {other}\n{USAGE}")),
            other if a.name.is_none() => a.name = Some(other.to_string()),
            other => return Err(format!("unexpected argument {other}\n{USAGE}")),
        }
        if inline.is_some() {
            return Err(format!("{flag} takes no value\n{USAGE}"));
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<String, String> {
    let a = parse(args)?;
    let mut config = kube::Config::infer().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    if a.impersonate.is_some() {
        config.auth_info.impersonate = a.impersonate.clone();
        config.auth_info.impersonate_groups = Some(a.impersonate_groups.clone()).filter(|g| !g.is_empty());
    }
    let namespace = a.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| e.to_string())?;
    let name = || a.name.clone().ok_or_else(|| format!("{} needs a request name\n{USAGE}", a.command));
    match a.command.as_str() {
        "approve" => {
            let message = a.message.clone().unwrap_or_else(|| "approved".into());
            decide(&client, &namespace, &name()?, condition_type::APPROVED, &message, a.generation).await
        }
        "deny" => {
            let message = a.message.clone().ok_or("deny needs -m MESSAGE: say why")?;
            decide(&client, &namespace, &name()?, condition_type::DENIED, &message, a.generation).await
        }
        "pending" => pending(&client, &namespace, a.namespace.is_some() && !a.all_namespaces).await,
        "describe" => describe(&client, &namespace, &name()?).await,
        other => Err(format!("unknown command {other}\n{USAGE}")),
    }
}

/// The user the API server sees, for the field manager and the message.
async fn whoami(client: &Client) -> Result<String, String> {
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
async fn decide(
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

fn api_message(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message,
        other => other.to_string(),
    }
}

/// Requests waiting for a person: in every namespace you may list (falling back to
/// your current namespace when you may not list cluster-wide), or in `-n NAMESPACE`.
async fn pending(client: &Client, ns: &str, explicit_namespace: bool) -> Result<String, String> {
    let mut note = String::new();
    let list = if explicit_namespace {
        Api::<VmRequest>::namespaced(client.clone(), ns).list(&ListParams::default()).await
    } else {
        match Api::<VmRequest>::all(client.clone()).list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) if s.code == 403 => {
                note = format!("(you may not list requests cluster-wide; showing namespace {ns})\n");
                Api::<VmRequest>::namespaced(client.clone(), ns).list(&ListParams::default()).await
            }
            other => other,
        }
    }
    .map_err(|e| format!("listing requests: {e}"))?;
    let mut out = String::from("NAMESPACE\tNAME\tGENERATION\tREQUESTER\tREPLICAS\tWAITING\tREASON\n");
    for r in list.items {
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
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            r.namespace().unwrap_or_default(),
            r.name_any(),
            r.metadata.generation.unwrap_or_default(),
            r.spec.requester.as_deref().unwrap_or("-"),
            r.spec.replicas,
            waiting,
            r.spec.reason
        ));
    }
    Ok(note + &out)
}

async fn describe(client: &Client, ns: &str, name: &str) -> Result<String, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_commands_and_flags() {
        let a = parse(&args(&["approve", "web", "-m", "ok", "-n", "shop"])).unwrap();
        assert_eq!(
            (a.command.as_str(), a.name.as_deref(), a.message.as_deref(), a.namespace.as_deref()),
            ("approve", Some("web"), Some("ok"), Some("shop"))
        );
        assert!(parse(&args(&["pending", "-A"])).unwrap().all_namespaces);
        assert!(parse(&args(&[])).unwrap_err().starts_with("usage:"));
        assert!(parse(&args(&["deny", "a", "b"])).unwrap_err().starts_with("unexpected argument b"));
        let a = parse(&args(&["approve", "web", "--generation=4", "--namespace=shop", "-m", "a=b"])).unwrap();
        assert_eq!((a.generation, a.namespace.as_deref(), a.message.as_deref()), (Some(4), Some("shop"), Some("a=b")));
        assert!(parse(&args(&["approve", "web", "--generation", "four"])).unwrap_err().contains("needs a number"));
        assert!(parse(&args(&["pending", "--all-namespaces=yes"])).unwrap_err().contains("takes no value"));
    }
}
