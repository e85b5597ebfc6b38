//! The test bed as tests see it: clients for the control plane that `hack/test.sh`
//! started, the CRDs installed, and waiting for conditions with a deadline.
//!
//! Tests never skip: without a test bed every helper panics with instructions.

pub mod console;
pub mod events;
pub mod fleet;
pub mod guests;
pub mod sampler;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Config};

/// Field manager of everything the tests write.
pub const FIELD_MANAGER: &str = "covi-tests";

/// Tests of one test binary that start operators and agents take turns: they share the
/// test bed's processes, policies and CPU. (Each binary has its own.)
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NO_TESTBED: &str = "no covi test bed: KUBECONFIG and COVI_TESTBED_DIR are unset. \
Run the tests through `hack/test.sh`, which starts etcd, kube-apiserver and \
kube-controller-manager and sets them (or `hack/test.sh -- cargo test -p covi-tests NAME` \
for one test).";

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The test bed's state folder; panics with instructions when there is none.
pub fn testbed_dir() -> PathBuf {
    match std::env::var_os("COVI_TESTBED_DIR") {
        Some(dir) if std::env::var_os("KUBECONFIG").is_some() => PathBuf::from(dir),
        _ => panic!("{NO_TESTBED}"),
    }
}

async fn config() -> Config {
    testbed_dir();
    let kubeconfig = Kubeconfig::read().expect("KUBECONFIG names a readable kubeconfig");
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("the test bed's kubeconfig is valid")
}

/// A client with the test bed's admin credentials.
pub async fn admin() -> Client {
    Client::try_from(config().await).expect("client from the test bed's kubeconfig")
}

/// A client that acts as `user` in `groups`, through impersonation by the admin.
pub async fn client_as(user: &str, groups: &[&str]) -> Client {
    let mut config = config().await;
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    Client::try_from(config).expect("impersonating client")
}

/// Polls `check` until it returns `Some`, panicking with `what` after `deadline`.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match poll(deadline, check).await {
        Some(value) => value,
        None => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// Polls `check` every 100 ms until it returns `Some`; `None` after `deadline`.
pub async fn poll<T, F, Fut>(deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if start.elapsed() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The CRDs of `crds/` as committed, parsed.
pub fn committed_crds() -> Vec<CustomResourceDefinition> {
    let dir = repo_root().join("crds");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).expect("CRD file is readable");
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

/// Applies every CRD in `crds/` and waits until the API server reports each Established.
pub async fn install_crds(client: &Client) -> Vec<String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in committed_crds() {
        let name = crd.metadata.name.clone().expect("CRDs are named");
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        names.push(name);
    }
    for name in &names {
        wait_until(&format!("CRD {name} to be Established"), Duration::from_secs(30), || async {
            let crd = api.get(name).await.ok()?;
            let established = crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        })
        .await;
    }
    names
}

/// Creates a namespace with a unique name starting with `prefix`.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
    }))
    .expect("namespace object");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    name
}

/// A dynamic API for the kind of `object` (its apiVersion and kind), namespaced in `ns`
/// when the kind is namespaced.
pub fn api_for(client: &Client, object: &DynamicObject, ns: &str) -> Api<DynamicObject> {
    let types = object.types.as_ref().expect("object has apiVersion and kind");
    let (group, version) = types.api_version.split_once('/').unwrap_or(("", &types.api_version));
    let gvk = GroupVersionKind::gvk(group, version, &types.kind);
    let resource = ApiResource::from_gvk(&gvk);
    if is_cluster_scoped(&types.kind) {
        Api::all_with(client.clone(), &resource)
    } else {
        Api::namespaced_with(client.clone(), ns, &resource)
    }
}

fn is_cluster_scoped(kind: &str) -> bool {
    if matches!(kind, "Namespace" | "CustomResourceDefinition") {
        return true;
    }
    covi_api::crds().iter().any(|crd| crd.spec.names.kind == kind && crd.spec.scope == "Cluster")
}

/// Applies JSON merge patch `patch` (RFC 7386: null removes a field) to `target`.
pub fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// Runs the test bed's kubectl with `args` and returns (success, stdout + stderr).
pub fn kubectl(args: &[&str]) -> (bool, String) {
    testbed_dir();
    let output = Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl runs (hack/test.sh puts the pinned kubectl on PATH)");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// PATH with covi's binaries first, so `kubectl covi` finds the plugin.
pub fn plugin_path() -> String {
    let bin = fleet::bin("kubectl-covi");
    let dir = bin.parent().expect("bin dir").display().to_string();
    format!("{dir}:{}", std::env::var("PATH").unwrap_or_default())
}

/// Runs kubectl with covi's binaries first on PATH, so `kubectl covi` finds the plugin;
/// returns success and stdout followed by stderr.
pub fn kubectl_covi(args: &[&str]) -> (bool, String) {
    let out =
        std::process::Command::new("kubectl").args(args).env("PATH", plugin_path()).output().expect("kubectl runs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs `program args` in the repository's root, feeding `stdin`; returns (success,
/// stdout, stderr).
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} runs (hack/test.sh puts it on PATH): {e}"));
    child.stdin.take().expect("stdin").write_all(stdin.unwrap_or_default().as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Parses a YAML document into a dynamic object.
pub fn object_from_yaml(yaml: &str) -> DynamicObject {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("test object is valid YAML: {e}\n{yaml}"))
}

/// A small deterministic random number generator for chaos tests (xorshift).
pub struct Rng(u64);

impl Rng {
    /// Seeded from COVI_CHAOS_SEED, else the clock; prints the seed, so a failed
    /// run can be repeated.
    pub fn seeded() -> Rng {
        let seed = std::env::var("COVI_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        println!("chaos seed {seed}");
        Rng(seed)
    }

    fn step(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.step() % n
    }
}

/// Waits up to `deadline` until `all_ready` holds; on timeout the panic lists every
/// server's status.
pub async fn all_ready_again<F, Fut>(api: &Api<covi_api::VirtualServer>, deadline: Duration, when: &str, all_ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    if poll(deadline, all_ready).await.is_none() {
        let states: Vec<_> = api
            .list(&kube::api::ListParams::default())
            .await
            .map(|l| l.items.iter().map(|s| format!("{:?}: {:?}", s.metadata.name, s.status)).collect())
            .unwrap_or_default();
        panic!("{when}: servers not all Ready again\n{}", states.join("\n"));
    }
}

/// Deletes server `name` and waits up to `deadline` until it is gone (its agent has
/// removed the domain and released the finalizer).
pub async fn delete_and_wait(api: &Api<covi_api::VirtualServer>, name: &str, deadline: Duration) {
    api.delete(name, &kube::api::DeleteParams::default()).await.unwrap_or_else(|e| panic!("delete {name}: {e}"));
    wait_until(&format!("{name} to be deleted"), deadline, || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}
