//! covi's own processes in the test bed: the operator and agents on libvirt's test
//! driver, each killed when its handle drops (or the test thread dies).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::{FIELD_MANAGER, testbed_dir};

/// Where the covi binaries are: COVI_BIN_DIR (set by hack/test.sh), else target/debug.
pub fn bin(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("COVI_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| crate::repo_root().join("target/debug"));
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build it with `cargo build --workspace --bins`", path.display());
    path
}

/// A running covi process; killed on drop.
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
    command: Vec<String>,
}

impl Process {
    pub fn spawn(name: &str, program: PathBuf, args: Vec<String>) -> Process {
        let logs = testbed_dir().join("logs");
        std::fs::create_dir_all(&logs).expect("log folder");
        let log = logs.join(format!("{name}.log"));
        let mut command = vec![program.display().to_string()];
        command.extend(args);
        let mut p = Process { name: name.to_string(), log, child: None, command };
        p.start();
        p
    }

    /// Starts (again) with the same command, appending to the same log.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .env("RUST_LOG", std::env::var("COVI_TEST_LOG").unwrap_or_else(|_| "info,kube=warn".into()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out);
        // SAFETY: prctl is async-signal-safe; the child dies with the test thread.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", self.name)));
    }

    /// `kill -9`: no chance to clean up, as on power loss.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as a DaemonSet's rolling update does, and waits up to `deadline` for
    /// the process to exit; returns whether it did (it is killed otherwise).
    pub fn terminate(&mut self, deadline: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let until = std::time::Instant::now() + deadline;
        while std::time::Instant::now() < until {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process has ended (by itself, or never started).
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A libvirt test-driver inventory from `hack/test-node.xml` (as `hack/testbed.sh`
/// writes it): CPUs, memory, and a storage pool holding the image volume debian-12.img.
/// Each `test://PATH` open has its own state.
pub fn node_xml(name: &str, cpus: u32, memory_gib: u64) -> PathBuf {
    let path = testbed_dir().join(format!("{name}-node.xml"));
    let xml = include_str!("../../hack/test-node.xml")
        .replace("@CPUS@", &cpus.to_string())
        .replace("@MEMORY_KIB@", &(memory_gib * 1024 * 1024).to_string())
        .replace("@UUID@", &uuid_for(name));
    std::fs::write(&path, xml).expect("node XML");
    path
}

fn uuid_for(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (h >> 4) & 0xfff,
        h & 0xffff_ffff_ffff
    )
}

/// Creates the namespace if it is missing.
pub async fn ensure_namespace(client: &Client, name: &str) {
    let ns: Namespace =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
            .expect("namespace");
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&ns))
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
}

/// One test's slice of the test bed: a lease namespace, a pool label, host names.
pub struct Fleet {
    pub id: String,
    pub lease_namespace: String,
    pub operator: Option<Process>,
    pub agents: Vec<Process>,
}

impl Fleet {
    pub async fn new(client: &Client, id: &str) -> Fleet {
        let lease_namespace = format!("covi-{id}");
        ensure_namespace(client, &lease_namespace).await;
        Fleet { id: id.to_string(), lease_namespace, operator: None, agents: Vec::new() }
    }

    pub fn host_name(&self, n: usize) -> String {
        format!("{}-host-{n}", self.id)
    }

    /// The label value hosts of this fleet's pool carry under covi.io/pool.
    pub fn pool_label(&self) -> String {
        self.id.clone()
    }

    pub fn operator_args(&self, identity: &str, lease_seconds: u32) -> Vec<String> {
        vec![
            "--namespace".into(),
            self.lease_namespace.clone(),
            "--identity".into(),
            identity.into(),
            "--leader-lease-seconds".into(),
            lease_seconds.to_string(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--resync-seconds".into(),
            "2".into(),
        ]
    }

    pub fn start_operator(&mut self) {
        self.start_operator_with(&[]);
    }

    /// Starts the operator with `extra` flags after the usual ones.
    pub fn start_operator_with(&mut self, extra: &[&str]) {
        let mut args = self.operator_args(&format!("{}-operator", self.id), 5);
        args.extend(extra.iter().map(|s| s.to_string()));
        self.operator = Some(Process::spawn(&format!("{}-operator", self.id), bin("covi-operator"), args));
    }

    /// Starts an agent for host `n` on its own test-driver inventory.
    pub fn start_agent(&mut self, n: usize, cpus: u32, memory_gib: u64) -> usize {
        let node = self.host_name(n);
        let uri = format!("test://{}", node_xml(&node, cpus, memory_gib).display());
        self.start_agent_uri(n, &uri, &[])
    }

    pub fn start_agent_uri(&mut self, n: usize, uri: &str, extra: &[&str]) -> usize {
        self.start_agent_wrapped(n, uri, extra, &[])
    }

    /// Starts agent `n` on `uri` inside `netns`: it reaches the API server only through
    /// the namespace's link and serves its endpoint on the namespace's address.
    pub fn start_agent_in(&mut self, n: usize, uri: &str, extra: &[&str], netns: &NetnsHost) -> usize {
        let kubeconfig = netns.kubeconfig.display().to_string();
        let listen = format!("{NETNS_HOST_ADDR}:9464");
        let mut args = vec!["--kubeconfig", kubeconfig.as_str(), "--metrics-addr", listen.as_str()];
        args.extend_from_slice(extra);
        self.start_agent_wrapped(n, uri, &args, &netns.wrapper())
    }

    /// Starts an agent through `wrapper` (e.g. `ip netns exec NS`); later flags in
    /// `extra` override the defaults.
    pub fn start_agent_wrapped(&mut self, n: usize, uri: &str, extra: &[&str], wrapper: &[&str]) -> usize {
        let node = self.host_name(n);
        let mut args = vec![
            "--node-name".to_string(),
            node.clone(),
            "--libvirt-uri".into(),
            uri.into(),
            "--label".into(),
            format!("covi.io/pool={}", self.pool_label()),
            "--namespace".into(),
            self.lease_namespace.clone(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--work-dir".into(),
            testbed_dir().join(format!("work-{node}")).display().to_string(),
            "--resync-seconds".into(),
            "2".into(),
            // The sampler reads every host's domains there.
            "--domains-endpoint".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (program, args) = match wrapper.split_first() {
            None => (bin("covi-agent"), args),
            Some((first, rest)) => {
                let mut wrapped: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
                wrapped.push(bin("covi-agent").display().to_string());
                wrapped.extend(args);
                (PathBuf::from(first), wrapped)
            }
        };
        self.agents.push(Process::spawn(&format!("agent-{node}"), program, args));
        self.agents.len() - 1
    }

    /// Applies a HostPool selecting this fleet's hosts, with `spec` merged over defaults.
    pub async fn apply_pool(&self, client: &Client, spec: serde_json::Value) -> String {
        let name = format!("{}-pool", self.id);
        let mut base = json!({
            "nodeSelector": {"covi.io/pool": self.pool_label()},
            "hypervisor": "test",
            "overcommit": {"cpu": 1, "memory": 1},
            "reserve": {"cpus": 0, "memory": "0"},
            "storage": {"pool": "default-pool", "shared": true},
            "images": [{"name": "debian-12", "volume": "debian-12.img"}],
            "classes": [{"name": "small", "cpus": 1, "memory": "1Gi", "disk": "4Gi", "bandwidth": "100M"}],
            "network": {"bridge": "br-covi", "cidr": "10.77.0.0/24", "gateway": "10.77.0.1"}
        });
        crate::merge(&mut base, &spec);
        let pool =
            json!({"apiVersion": "covi.io/v1alpha1", "kind": "HostPool", "metadata": {"name": name}, "spec": base});
        let api: Api<kube::api::DynamicObject> = Api::all_with(
            client.clone(),
            &kube::core::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk("covi.io", "v1alpha1", "HostPool")),
        );
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&pool))
            .await
            .unwrap_or_else(|e| panic!("applying pool {name}: {e}"));
        name
    }

    /// Waits until `count` hosts of this fleet report Ready.
    pub async fn wait_ready_hosts(&self, client: &Client, count: usize) {
        let api: Api<covi_api::Host> = Api::all(client.clone());
        let prefix = format!("{}-host-", self.id);
        let found = crate::poll(Duration::from_secs(30), || async {
            let hosts = api.list(&Default::default()).await.ok()?;
            let ready = hosts
                .items
                .iter()
                .filter(|h| h.metadata.name.as_deref().is_some_and(|n| n.starts_with(&prefix)))
                .filter(|h| {
                    h.status.as_ref().is_some_and(|s| covi_api::condition::is_condition_true(&s.conditions, "Ready"))
                })
                .count();
            (ready >= count).then_some(())
        })
        .await;
        if found.is_none() {
            let logs: Vec<_> = self.agents.iter().map(|a| format!("--- {}:\n{}", a.name, a.log_tail())).collect();
            panic!("timed out waiting for {count} Ready hosts in fleet {}\n{}", self.id, logs.join("\n"));
        }
    }
}

impl Fleet {
    /// Waits until host `n`'s agent renews its Lease after `since`: by then it has run
    /// its fencing check (the renewer fences first when overdue), so a disturbance is over.
    pub async fn wait_lease_renewed_after(&self, client: &Client, n: usize, since: k8s_openapi::jiff::Timestamp) {
        let api: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), &self.lease_namespace);
        let node = self.host_name(n);
        let renewed = crate::poll(Duration::from_secs(30), || async {
            let lease = api.get(&node).await.ok()?;
            let renew = lease.spec?.renew_time?.0;
            (renew > since).then_some(())
        })
        .await;
        if renewed.is_none() {
            let agent = self.agents.get(n - 1).map(|a| a.log_tail()).unwrap_or_default();
            panic!("host {node} did not renew its Lease after {since}\n{agent}");
        }
    }

    /// Waits until the operator counts `count` ready hosts in `pool` (agent Ready and
    /// its Lease seen renewing), so scheduling decisions are final.
    pub async fn wait_pool_ready(&self, client: &Client, pool: &str, count: u32) {
        let api: Api<covi_api::HostPool> = Api::all(client.clone());
        let found = crate::poll(Duration::from_secs(30), || async {
            let p = api.get(pool).await.ok()?;
            (p.status?.ready_hosts >= count).then_some(())
        })
        .await;
        if found.is_none() {
            let op = self.operator.as_ref().map(|o| o.log_tail()).unwrap_or_default();
            panic!("timed out waiting for pool {pool} to count {count} ready hosts\n{op}");
        }
    }

    /// Waits until server `name` passes `check`; on timeout the panic shows the
    /// server's status and the tails of the fleet's logs.
    pub async fn wait_server<F>(
        &self,
        api: &Api<covi_api::VirtualServer>,
        name: &str,
        what: &str,
        deadline: Duration,
        check: F,
    ) -> covi_api::VirtualServer
    where
        F: Fn(&covi_api::VirtualServer) -> bool,
    {
        let found = crate::poll(deadline, || async {
            let s = api.get_opt(name).await.ok()??;
            check(&s).then_some(s)
        })
        .await;
        match found {
            Some(s) => s,
            None => {
                let status = api.get_opt(name).await.ok().flatten().map(|s| format!("{:#?}", s.status));
                let mut logs: Vec<_> =
                    self.agents.iter().map(|a| format!("--- {}:\n{}", a.name, a.log_tail())).collect();
                if let Some(op) = &self.operator {
                    logs.push(format!("--- {}:\n{}", op.name, op.log_tail()));
                }
                panic!(
                    "timed out after {deadline:?} waiting for server {name} {what}\nstatus: {}\n{}",
                    status.unwrap_or_else(|| "(gone)".into()),
                    logs.join("\n")
                );
            }
        }
    }
}

/// The address of the metrics endpoint a covi process last logged ("bound=ADDR").
pub fn endpoint_of(process: &Process) -> Option<String> {
    endpoint_in_log(&process.log)
}

/// GETs `path` from the metrics endpoint a covi process logged.
pub async fn scrape(process: &Process, path: &str) -> String {
    let addr = endpoint_of(process).unwrap_or_else(|| panic!("{} logged no metrics address", process.name));
    get(&addr, path, Duration::from_secs(10)).await.unwrap_or_else(|| panic!("GET {path} from {addr} failed"))
}

/// A plain HTTP GET with a deadline; `None` when nothing answered in time.
pub async fn get(addr: &str, path: &str, deadline: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        response.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
    };
    tokio::time::timeout(deadline, exchange).await.ok().flatten()
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The metrics endpoint address last logged in `log`.
pub fn endpoint_in_log(log: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    strip_ansi(&text)
        .lines()
        .rev()
        .find_map(|l| l.contains("serving /metrics").then(|| l.split("bound=").nth(1)).flatten())
        .map(|a| a.trim().to_string())
}

/// A host in its own network namespace, reaching the API server only through a proxy
/// on its veth link, so a test can cut that link while the agent keeps running.
pub struct NetnsHost {
    pub netns: String,
    pub kubeconfig: PathBuf,
    /// The proxy's port on the root side (10.201.0.1).
    pub proxy_port: u16,
    proxy: tokio::task::JoinHandle<()>,
}

pub const NETNS_ROOT_ADDR: &str = "10.201.0.1";
pub const NETNS_HOST_ADDR: &str = "10.201.0.2";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl NetnsHost {
    pub async fn create(name: &str) -> NetnsHost {
        let netns = format!("covi-{name}");
        let (root, peer) = (format!("vr-{name}"), format!("vn-{name}"));
        // A namespace left by an earlier run (a failed test does not clean up): deleting
        // it removes its veth pair, but the kernel does so later, so wait for the root
        // side to go before adding it again.
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let gone = || !Command::new("ip").args(["link", "show", &root]).output().is_ok_and(|o| o.status.success());
        let since = std::time::Instant::now();
        while !gone() && since.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ip(&["netns", "add", &netns]);
        ip(&["link", "add", &root, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &netns]);
        ip(&["addr", "add", &format!("{NETNS_ROOT_ADDR}/30"), "dev", &root]);
        ip(&["link", "set", &root, "up"]);
        ip(&["netns", "exec", &netns, "ip", "addr", "add", &format!("{NETNS_HOST_ADDR}/30"), "dev", &peer]);
        ip(&["netns", "exec", &netns, "ip", "link", "set", &peer, "up"]);
        ip(&["netns", "exec", &netns, "ip", "link", "set", "lo", "up"]);

        let api = std::env::var("COVI_APISERVER").expect("COVI_APISERVER is set by hack/test.sh");
        let upstream = api.trim_start_matches("https://").to_string();
        let listener = tokio::net::TcpListener::bind((NETNS_ROOT_ADDR, 0)).await.expect("bind the proxy on the veth");
        let proxy_port = listener.local_addr().expect("addr").port();
        let proxy = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        let admin = std::fs::read_to_string(testbed_dir().join("admin.kubeconfig")).expect("admin kubeconfig");
        let kubeconfig = testbed_dir().join(format!("{netns}.kubeconfig"));
        std::fs::write(&kubeconfig, admin.replace(&api, &format!("https://{NETNS_ROOT_ADDR}:{proxy_port}")))
            .expect("write kubeconfig");
        NetnsHost { netns, kubeconfig, proxy_port, proxy }
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.netns]
    }

    /// Drops the host's packets to the API server; everything else still flows.
    pub fn cut(&self) {
        self.iptables("-A");
    }

    pub fn heal(&self) {
        self.iptables("-D");
    }

    fn iptables(&self, op: &str) {
        let port = self.proxy_port.to_string();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "iptables",
                op,
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                NETNS_ROOT_ADDR,
                "--dport",
                &port,
                "-j",
                "DROP",
            ])
            .output()
            .expect("iptables runs");
        assert!(out.status.success(), "iptables {op}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for NetnsHost {
    fn drop(&mut self) {
        self.proxy.abort();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
    }
}

/// A kubeconfig that acts as `user` in `groups` (impersonation by the test bed's admin),
/// so a covi process runs with the rights of those identities only.
pub fn kubeconfig_as(name: &str, user: &str, groups: &[&str]) -> PathBuf {
    let admin = std::fs::read_to_string(testbed_dir().join("admin.kubeconfig")).expect("admin kubeconfig");
    let mut extra = format!("    as: {user}\n");
    if !groups.is_empty() {
        extra.push_str("    as-groups:\n");
        for g in groups {
            extra.push_str(&format!("    - \"{g}\"\n"));
        }
    }
    // The admin kubeconfig's user block ends with its client key line.
    let text = admin.replacen("    client-key: ", &format!("{extra}    client-key: "), 1);
    let path = testbed_dir().join(format!("{name}.kubeconfig"));
    std::fs::write(&path, text).expect("kubeconfig");
    path
}

/// Applies a server of a test-driver fleet's pool: class small, image debian-12, with
/// `extra` merged into the spec (a null removes a field).
pub async fn apply_server(api: &Api<covi_api::VirtualServer>, name: &str, pool: &str, extra: serde_json::Value) {
    let mut spec = json!({
        "hostPool": pool, "class": "small", "boot": {"image": "debian-12"},
        "owner": "team-test", "purpose": "integration test"
    });
    crate::merge(&mut spec, &extra);
    let server =
        json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer", "metadata": {"name": name}, "spec": spec});
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&server))
        .await
        .unwrap_or_else(|e| panic!("applying server {name}: {e}"));
}
