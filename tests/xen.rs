//! Real Xen: a Xen 4.17 hypervisor with a Debian dom0 boots under QEMU/TCG
//! (`hack/xen-lab.sh`); covi-agent in dom0 reaches the test bed's API server through
//! QEMU's user network (10.0.2.2) with its own client certificate, registers its Host,
//! and converges a VirtualServer of a Xen pool into a PV guest that boots a kernel and
//! initramfs directly. The lab prints `xl list` and the guests' console logs (written
//! by xenconsoled) on dom0's console, which QEMU writes to a file the test reads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use covi_api::condition::find_condition;
use covi_api::{Host, VirtualServer};
use covi_tests::fleet::{Fleet, Process};
use covi_tests::{FIELD_MANAGER, admin, install_crds, kubectl, namespace, poll, repo_root, testbed_dir};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

const NODE: &str = "xen-lab-1";

/// The lab's folder and QEMU (a child with a parent-death signal); the lab is powered
/// off when this is dropped.
struct Lab {
    dir: PathBuf,
    qemu: Process,
}

impl Lab {
    fn script(args: &[&str]) -> (bool, String) {
        let out = Command::new(repo_root().join("hack/xen-lab.sh")).args(args).output().expect("hack/xen-lab.sh runs");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn boot(dir: &Path) -> Lab {
        let qemu = Process::spawn(
            "xen-lab",
            repo_root().join("hack/xen-lab.sh"),
            vec!["boot".into(), dir.display().to_string()],
        );
        Lab { dir: dir.to_path_buf(), qemu }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.join("serial.log")).unwrap_or_default()
    }

    /// The end of dom0's console (or of the boot script's output), for failure messages,
    /// with how long the console has been silent (dom0 prints every 5 s, so a long
    /// silence means dom0 or Xen stopped, not a slow guest) and what else used the CPU.
    fn tail(&self) -> String {
        let serial = self.serial();
        let lines: Vec<&str> = serial.lines().collect();
        let silent = std::fs::metadata(self.dir.join("serial.log"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map_or_else(|| "unknown".to_string(), |d| format!("{:.0?}", d));
        let top = Command::new("ps")
            .args(["-eo", "pid,pcpu,etime,rss,comm", "--sort=-pcpu"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().take(8).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        let disk = Command::new("df")
            .args(["-h", &self.dir.display().to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        // Crashes in dom0 scroll away behind the 5-s pulse: gather them.
        let crashes: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| {
                l.contains("COVI-LAB libvirtd exited")
                    || l.contains("COVI-LAB-LIBVIRTD")
                    || l.contains("segfault at")
                    || l.contains("general protection")
                    || l.contains("Out of memory")
            })
            .collect();
        format!(
            "{}\n--- crashes in dom0 ({} lines):\n{}\n--- dom0's console silent for {silent}; QEMU says {}; the busiest processes here:\n{top}\n{disk}--- xen-lab.sh:\n{}",
            lines[lines.len().saturating_sub(60)..].join("\n"),
            crashes.len(),
            crashes[crashes.len().saturating_sub(40)..].join("\n"),
            self.monitor("info status").unwrap_or_else(|| "nothing (no monitor)".into()),
            self.qemu.log_tail()
        )
    }

    /// A command to QEMU's monitor and its answer (`info status` tells a VM that runs
    /// from one QEMU paused, for example on a host disk that filled up).
    fn monitor(&self, command: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut socket = std::os::unix::net::UnixStream::connect(self.dir.join("monitor.sock")).ok()?;
        socket.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        socket.write_all(format!("{command}\n").as_bytes()).ok()?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // The banner, the echo and the answer arrive in pieces; read until it goes quiet.
        while let Ok(n) = socket.read(&mut buf) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        let line = text
            .lines()
            .map(|l| l.trim_matches(|c: char| c.is_control() || c == ' '))
            .find(|l| l.starts_with("VM status"));
        Some(line.unwrap_or(text.trim()).to_string())
    }

    /// The latest `xl list` dom0 printed.
    fn xl_list(&self) -> Option<String> {
        let serial = self.serial();
        let start = serial.rfind("COVI-LAB-XL-BEGIN")?;
        let rest = &serial[start..];
        Some(rest[..rest.find("COVI-LAB-XL-END")?].to_string())
    }

    fn qemu_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("qemu.pid")).ok()?.trim().parse().ok()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Lab::script(&["stop", &self.dir.display().to_string()]);
        self.qemu.kill();
    }
}

/// A client certificate for the agent (hack/testbed.sh's `testbed_user`), with the API
/// server addressed as QEMU's user network shows it to dom0.
fn agent_kubeconfig(user: &str, group: &str) -> String {
    let script = format!(". hack/lib.sh && . hack/testbed.sh && testbed_user '{user}' '{group}'");
    let out = Command::new("bash").arg("-c").arg(&script).current_dir(repo_root()).output().expect("bash runs");
    assert!(out.status.success(), "testbed_user: {}", String::from_utf8_lossy(&out.stderr));
    let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    // dom0 cannot read the test bed's files: embed the certificates.
    let (ok, flat) = kubectl(&["config", "view", "--raw", "--flatten", "--kubeconfig", &path]);
    assert!(ok, "{flat}");
    flat.replace("https://127.0.0.1:", "https://10.0.2.2:")
}

fn is_ready(conditions: &[covi_api::Condition]) -> bool {
    find_condition(conditions, "Ready").is_some_and(|c| c.status == "True")
}

#[tokio::test]
async fn a_server_runs_as_a_pv_guest_on_a_real_xen_host() {
    let client = admin().await;
    install_crds(&client).await;
    // The agent's least-privilege role, bound to the group its certificate names; its
    // Lease rights are a Role in the release namespace, which must exist first.
    covi_tests::fleet::ensure_namespace(&client, "covi-system").await;
    let rbac = repo_root().join("deploy/base/rbac.yaml").display().to_string();
    let (ok, out) = kubectl(&["apply", "--server-side", "-f", &rbac]);
    assert!(ok, "{out}");
    let (ok, out) = kubectl(&[
        "create",
        "clusterrolebinding",
        "covi-agents-xen",
        "--clusterrole=covi-agent",
        "--group=covi:agents-xen",
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    assert!(ok, "{out}");
    let binding = testbed_dir().join("xen-binding.yaml");
    std::fs::write(&binding, out).unwrap();
    let (ok, out) = kubectl(&["apply", "--server-side", "-f", &binding.display().to_string()]);
    assert!(ok, "{out}");

    let mut fleet = Fleet::new(&client, "xen").await;
    // Its Leases live in this test's namespace, not the release namespace the chart's
    // Lease role is in: grant them there, as a user running agents elsewhere does.
    for args in [
        vec![
            "create",
            "role",
            "covi-agent-leases",
            "--verb=get,create,patch,update",
            "--resource=leases.coordination.k8s.io",
        ],
        vec!["create", "rolebinding", "covi-agent-leases", "--role=covi-agent-leases", "--group=covi:agents-xen"],
    ] {
        let mut args = args;
        args.extend(["-n", &fleet.lease_namespace]);
        let (ok, out) = kubectl(&args);
        assert!(ok || out.contains("AlreadyExists"), "{out}");
    }
    let pool = fleet
        .apply_pool(
            &client,
            json!({
                "nodeSelector": {"covi.io/pool": "xen-lab"},
                "hypervisor": "xen",
                "storage": {"pool": "covi", "shared": false},
                "images": [{"name": "pv-initramfs", "volume": "boot.img", "kernel": "/var/lib/covi/guest-vmlinuz",
                            "initrd": "/var/lib/covi/guest-initrd.img", "cmdline": "console=hvc0"}],
                "network": {"bridge": "xenbr0"},
                "failover": {"enabled": false}
            }),
        )
        .await;
    let dir = testbed_dir().join("xen-lab");
    std::fs::create_dir_all(dir.join("etc-covi")).unwrap();
    std::fs::write(dir.join("etc-covi/kubeconfig"), agent_kubeconfig(&format!("covi-agent:{NODE}"), "covi:agents-xen"))
        .unwrap();
    std::fs::write(
        dir.join("etc-covi/agent.env"),
        format!(
            "COVI_NODE_NAME={NODE}\nCOVI_NAMESPACE=covi-xen\nCOVI_HOST_LABELS=covi.io/pool=xen-lab\nCOVI_AGENT_ARGS=\"--resync-seconds 5\"\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("etc-covi/node"), NODE).unwrap();
    let lab = Lab::boot(&dir);
    fleet.start_operator();

    // dom0 boots (about 30 s under TCG), libvirtd answers, the agent registers.
    let hosts: Api<Host> = Api::all(client.clone());
    let host = poll(Duration::from_secs(300), || async {
        let h = hosts.get_opt(NODE).await.ok()??;
        let status = h.status.as_ref()?;
        is_ready(&status.conditions).then(|| h.clone())
    })
    .await
    .unwrap_or_else(|| panic!("the Xen host never registered Ready; dom0's console:\n{}", lab.tail()));
    let status = host.status.unwrap();
    let hv = status.hypervisor.expect("hypervisor facts");
    println!(
        "Xen host: {} {}, libvirt {:?}, capacity {:?}",
        hv.type_, hv.version, status.libvirt_version, status.capacity
    );
    assert_eq!(hv.type_, "Xen");
    assert!(hv.version.starts_with("4.17"), "Xen 4.17, got {}", hv.version);
    assert!(status.libvirt_version.as_deref().is_some_and(|v| v.starts_with("11.")), "{:?}", status.libvirt_version);
    fleet.wait_pool_ready(&client, &pool, 1).await;

    let ns = namespace(&client, "xen").await;
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    let server = json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer", "metadata": {"name": "pv-1"},
        "spec": {"hostPool": pool, "resources": {"cpus": 1, "memory": "128Mi", "disk": "1Gi"},
                 "boot": {"image": "pv-initramfs"}, "hostname": "covi-pv-one",
                 "owner": "team-test", "purpose": "a PV guest on real Xen"}});
    api.patch("pv-1", &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&server)).await.unwrap();
    let running = poll(Duration::from_secs(240), || async {
        let s = api.get("pv-1").await.ok()?;
        is_ready(&s.status.as_ref()?.conditions).then_some(s)
    })
    .await;
    let Some(running) = running else {
        let s = api.get("pv-1").await.ok().and_then(|s| s.status);
        panic!("pv-1 never ran on Xen: {s:#?}\ndom0's console:\n{}", lab.tail());
    };
    assert_eq!(running.status.as_ref().unwrap().host.as_deref(), Some(NODE));
    let domain = format!("{ns}.pv-1");

    // dom0's own view: xl lists the domain, and the guest's console shows the marker
    // its initramfs prints, with the host name covi put on the kernel command line.
    // A PV guest under Xen under TCG boots in about a minute here and took over two on
    // a CI machine half as fast: the deadline leaves room for that.
    let booting = std::time::Instant::now();
    let seen = poll(Duration::from_secs(420), || async {
        let listed = lab.xl_list().is_some_and(|l| l.contains(&domain));
        let marker = lab.serial().lines().any(|l| {
            l.starts_with("COVI-LAB-CONSOLE") && l.contains(&domain) && l.contains("COVI-GUEST-UP hostname=covi-pv-one")
        });
        (listed && marker).then_some(())
    })
    .await;
    assert!(seen.is_some(), "xl list and the guest console in dom0:\n{}", lab.tail());
    println!("the guest printed its marker {:.0?} after the server was Ready", booting.elapsed());
    println!("QEMU's monitor: {}", lab.monitor("info status").unwrap_or_default());
    println!("{}", lab.xl_list().unwrap_or_default());
    let serial = lab.serial();
    let console = serial.lines().rfind(|l| l.contains("COVI-GUEST-UP")).unwrap_or_default();
    println!("{console}");

    api.delete("pv-1", &DeleteParams::default()).await.unwrap();
    let gone =
        poll(Duration::from_secs(120), || async { api.get_opt("pv-1").await.ok()?.is_none().then_some(()) }).await;
    assert!(gone.is_some(), "the agent removes the domain and releases the server:\n{}", lab.tail());

    let pid = lab.qemu_pid().expect("QEMU runs");
    drop(lab);
    // SAFETY: signal 0 only checks whether the process exists.
    assert!(unsafe { libc::kill(pid, 0) } != 0, "QEMU is gone after power-off");
}
