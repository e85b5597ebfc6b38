//! `kubectl covi console` driven by a test: a child process whose output is collected
//! and whose input the test types.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::FIELD_MANAGER;

const API_SERVICE: &str = covi_api::console::API_SERVICE;

use crate::wait_until;

/// Ctrl-]: ends a console session.
pub const ESCAPE: u8 = 0x1d;

/// `kubectl covi console` as a child process with its stdout collected.
pub struct Session {
    child: tokio::process::Child,
    stdin: Arc<tokio::sync::Mutex<tokio::process::ChildStdin>>,
    output: Arc<Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Session {
    pub fn start(args: &[&str]) -> Session {
        let mut child = tokio::process::Command::new("kubectl")
            .args(args)
            .env("PATH", crate::plugin_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("kubectl runs");
        let output = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        for mut pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = output.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }));
        }
        let stdin = Arc::new(tokio::sync::Mutex::new(child.stdin.take().expect("stdin")));
        Session { child, stdin, output, readers }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Types `tag` and a number every few seconds until the guest echoes such a line;
    /// returns the echo.
    pub async fn echo(&self, tag: &str, deadline: Duration) -> String {
        let typed = Mutex::new(Instant::now() - Duration::from_secs(60));
        let n = std::sync::atomic::AtomicU32::new(0);
        wait_until(&format!("the guest to echo {tag:?} typed into its console"), deadline, || async {
            let wanted = format!("guest got: {tag}");
            if let Some(line) = self.output().lines().find(|l| l.contains(&wanted)) {
                return Some(line.to_string());
            }
            let due = typed.lock().unwrap().elapsed() > Duration::from_secs(3);
            if due {
                *typed.lock().unwrap() = Instant::now();
                let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.type_bytes(format!("{tag} {n}\n").as_bytes()).await;
            }
            None
        })
        .await
    }

    /// Waits for the command to exit; its status and everything it printed.
    pub async fn ended(mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("kubectl covi console did not end:\n{}", self.output()))
            .expect("exit status");
        // Its pipes closed with it: the readers finish with its last bytes.
        for reader in self.readers.drain(..) {
            let _ = reader.await;
        }
        (status, self.output())
    }

    pub async fn type_bytes(&self, bytes: &[u8]) {
        let mut stdin = self.stdin.lock().await;
        stdin.write_all(bytes).await.expect("typing into kubectl covi console");
        stdin.flush().await.expect("flush");
    }
}

/// Removes the APIService when the test ends, however it ends: an APIService whose
/// server is gone makes every later `kubectl` discovery warn.
pub struct Unregister;

impl Drop for Unregister {
    fn drop(&mut self) {
        let _ = crate::kubectl(&["delete", "apiservice", API_SERVICE, "--ignore-not-found", "--wait=false"]);
    }
}

pub async fn apply(
    client: &kube::Client,
    gvk: (&str, &str, &str),
    plural: &str,
    ns: Option<&str>,
    object: serde_json::Value,
) {
    let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(gvk.0, gvk.1, gvk.2), plural);
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let name = object["metadata"]["name"].as_str().expect("named").to_string();
    let object: DynamicObject = serde_json::from_value(object).expect("object");
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object))
        .await
        .unwrap_or_else(|e| panic!("applying {plural}/{name}: {e}"));
}

/// What the chart installs in a cluster, by hand: the console's Service (no selector:
/// the operator is a test process), its endpoint on the node's address, which the API
/// server dials directly (--enable-aggregator-routing), and the APIService. The operator
/// fills in the caBundle.
pub async fn register_console_api(client: &kube::Client, ns: &str, address: &str, port: u16) {
    apply(
        client,
        ("", "v1", "Service"),
        "services",
        Some(ns),
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "covi-console"},
            "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP"}]},
        }),
    )
    .await;
    apply(
        client,
        ("discovery.k8s.io", "v1", "EndpointSlice"),
        "endpointslices",
        Some(ns),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "covi-console-test", "labels": {
                "kubernetes.io/service-name": "covi-console",
                "endpointslice.kubernetes.io/managed-by": "covi-tests",
            }},
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        }),
    )
    .await;
    apply(
        client,
        ("apiregistration.k8s.io", "v1", "APIService"),
        "apiservices",
        None,
        json!({
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": API_SERVICE},
            "spec": {
                "group": covi_api::console::GROUP, "version": covi_api::console::VERSION,
                "groupPriorityMinimum": 1000, "versionPriority": 100,
                "service": {"namespace": ns, "name": "covi-console", "port": 443},
            },
        }),
    )
    .await;
}

/// Waits until the API server takes the console API as available: the operator
/// answers it over TLS the caBundle vouches for, to the front proxy's certificate.
pub async fn wait_available(deadline: Duration) {
    wait_until("the console's APIService to be Available", deadline, || async {
        let (ok, out) = crate::kubectl(&[
            "get",
            "apiservice",
            API_SERVICE,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Available')].status}",
        ]);
        (ok && out.trim() == "True").then_some(())
    })
    .await;
}

/// The console's front door for a test fleet: the Service, endpoint and APIService
/// pointing at the node's address on a free port. Returns the guard that unregisters it
/// and the flags that make the fleet's operator serve there.
pub async fn front_door(client: &kube::Client, fleet: &crate::fleet::Fleet) -> (Unregister, Vec<String>) {
    let address = crate::guests::testbed_env("COVI_NODE_IP");
    let port = std::net::TcpListener::bind((address.as_str(), 0)).expect("a free port").local_addr().unwrap().port();
    let guard = Unregister;
    register_console_api(client, &fleet.lease_namespace, &address, port).await;
    (guard, vec![format!("--console-addr={address}:{port}"), "--console-service=covi-console".into()])
}
