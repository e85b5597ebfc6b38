//! Day two on real QEMU/TCG guests that do something (hack/guest.sh): one spins its
//! CPU, one idles. What they use shows in the agent's metrics, in each server's and the
//! Host's `status.usage` (summarized over a short test interval instead of an hour),
//! and in `kubectl covi top`.

use std::time::Duration;

use covi_api::VirtualServer;
use covi_tests::fleet::{Fleet, scrape};
use covi_tests::guests::{GuestsOf, apply_server, fixtures_in, guest_files, qemu_pool};
use covi_tests::{SERIAL, admin, install_crds, kubectl_covi, namespace, wait_until};
use kube::api::Api;
use serde_json::{Value, json};

const STORAGE_POOL: &str = "covi-test-usage";
/// Under TCG a Debian kernel takes tens of seconds to reach its init.
const DEADLINE: Duration = Duration::from_secs(180);
/// The agent samples every 2 s and summarizes every 20 s (an "hour" of the profile).
const AGENT_FLAGS: &[&str] = &["--usage-sample-seconds=2", "--usage-interval-seconds=20", "--stop-grace-seconds=3"];

/// The value of the series `name` whose labels include `server="NAME"`-style `labels`.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\""))).then(|| value.parse().ok())?
    })
}

#[tokio::test]
async fn a_busy_guest_uses_a_cpu_and_an_idle_one_almost_none() {
    let _turn = SERIAL.lock().await;
    let uri = std::env::var("COVI_QEMU_URI").expect("COVI_QEMU_URI: run through hack/test.sh");
    let conn = virt::connect::Connect::open(Some(&uri)).expect("libvirt");
    fixtures_in(&conn, STORAGE_POOL, "/var/lib/covi-test/usage-pool");
    let (kernel, initrd) = guest_files();
    let client = admin().await;
    install_crds(&client).await;
    // Declared before the fleet: its guests go after the agent that would restart them.
    let _guests;
    let mut fleet = Fleet::new(&client, "usage").await;
    let mut pool_spec = qemu_pool(STORAGE_POOL, false);
    pool_spec["images"] = json!([
        {"name": "burn", "volume": "tiny.img", "kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 covi.guest=burn"},
        {"name": "idle", "volume": "tiny.img", "kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 covi.guest=idle"},
    ]);
    let pool = fleet.apply_pool(&client, pool_spec).await;
    let agent = fleet.start_agent_uri(1, &uri, AGENT_FLAGS);
    fleet.start_operator();
    fleet.wait_ready_hosts(&client, 1).await;
    let ns = namespace(&client, "usage").await;
    _guests = GuestsOf::new(&uri, &ns);
    let api: Api<VirtualServer> = Api::namespaced(client.clone(), &ns);
    apply_server(&api, "busy", &pool, json!({"boot": {"image": "burn"}})).await;
    apply_server(&api, "quiet", &pool, json!({"boot": {"image": "idle"}})).await;
    for name in ["busy", "quiet"] {
        fleet.wait_server(&api, name, "to run", DEADLINE, |s| s.is_ready()).await;
    }

    // The metrics: libvirt's cumulative CPU time; its rate over 10 s is the use.
    let host = fleet.host_name(1);
    let labels = |name: &'static str| [("namespace", ns.clone()), ("name", name.to_string()), ("host", host.clone())];
    let cpu_of = |metrics: &str, name: &'static str| {
        let l = labels(name);
        let refs: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        sample(metrics, "covi_server_cpu_seconds_total", &refs)
    };
    let agent = &fleet.agents[agent];
    let first = wait_until("both guests in the agent's metrics", DEADLINE, || async {
        let m = scrape(agent, "/metrics").await;
        (cpu_of(&m, "busy").is_some() && cpu_of(&m, "quiet").is_some()).then_some(m)
    })
    .await;
    // Both guests boot their kernel first (busy work under TCG): wait, with a deadline,
    // for a 10-s window in which the spinning guest uses most of a CPU and the idle one
    // almost none.
    let previous = std::sync::Mutex::new((first, std::time::Instant::now()));
    let (busy_rate, quiet_rate, metrics) =
        wait_until("a window with one guest spinning and one idle", DEADLINE, || {
            let previous = &previous;
            async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let m = scrape(agent, "/metrics").await;
                let (before, at) = previous.lock().unwrap().clone();
                let elapsed = at.elapsed().as_secs_f64();
                *previous.lock().unwrap() = (m.clone(), std::time::Instant::now());
                let busy = (cpu_of(&m, "busy")? - cpu_of(&before, "busy")?) / elapsed;
                let quiet = (cpu_of(&m, "quiet")? - cpu_of(&before, "quiet")?) / elapsed;
                println!("over {elapsed:.0} s: busy {busy:.2} cores, quiet {quiet:.2} cores");
                (busy > 0.6 && quiet < 0.25).then_some((busy, quiet, m))
            }
        })
        .await;
    println!("busy {busy_rate:.2} cores, idle {quiet_rate:.2} cores");
    for series in ["covi_server_memory_used_bytes", "covi_server_vcpus", "covi_host_cpus"] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
    assert!(
        sample(&metrics, "covi_agent_usage_collect_duration_seconds_count", &[]).is_some_and(|n| n > 0.0),
        "the collection's cost is measured"
    );

    // The status: each server's last interval, written once per interval, and the
    // profile's bucket for it; the Host's too.
    let usage_of = |name: &'static str| {
        let api = api.clone();
        async move { api.get(name).await.ok()?.status?.usage.filter(|u| u.cpu.mean > 0 || u.samples > 3) }
    };
    let busy = wait_until("the busy guest's usage in its status", DEADLINE, || async {
        usage_of("busy").await.filter(|u| u.cpu.mean >= 600)
    })
    .await;
    assert_eq!(busy.host.as_deref(), Some(host.as_str()));
    assert_eq!(busy.interval_seconds, 20);
    assert!(busy.cpu.p95 >= busy.cpu.mean && busy.cpu.p95 <= 1300, "one vCPU: {busy:?}");
    assert!(busy.memory.p95 > 0 && busy.memory.p95 < 1024, "resident memory of a 256Mi guest: {busy:?}");
    assert!(busy.profile.iter().any(|h| h.cpu.first().is_some_and(|c| *c >= 600)), "{busy:?}");
    // Its first interval may hold its boot; a later one shows it idle.
    let quiet = wait_until("the idle guest's usage near zero", DEADLINE, || async {
        usage_of("quiet").await.filter(|u| u.cpu.mean < 250)
    })
    .await;
    assert!(quiet.samples >= 5 && quiet.memory.p95 > 0, "{quiet:?}");
    let host_usage = wait_until("the Host's usage", DEADLINE, || async {
        let h = Api::<covi_api::Host>::all(client.clone()).get(&host).await.ok()?;
        h.status?.usage.filter(|u| u.samples > 0)
    })
    .await;
    assert!(host_usage.cpu.mean >= 600, "the host runs the busy guest at least: {host_usage:?}");

    // kubectl covi top shows it beside the allocation.
    let (ok, out) = kubectl_covi(&["covi", "top", "servers", "-n", &ns, "-o", "json"]);
    assert!(ok, "{out}");
    let rows: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let row = |name: &str| rows.as_array().and_then(|r| r.iter().find(|r| r["name"] == name)).cloned();
    let millicores = |v: &Value| v.as_str().and_then(|s| s.strip_suffix('m')).and_then(|s| s.parse::<u32>().ok());
    let busy_row = row("busy").unwrap_or_else(|| panic!("no busy row:\n{out}"));
    assert!(millicores(&busy_row["cpuCores"]).is_some_and(|m| m >= 600), "{busy_row}");
    assert!(busy_row["cpu"].as_str().is_some_and(|p| p.ends_with('%')), "{busy_row}");
    let quiet_row = row("quiet").unwrap_or_else(|| panic!("no quiet row:\n{out}"));
    assert!(millicores(&quiet_row["cpuCores"]).is_some_and(|m| m < 250), "{quiet_row}");
    let (ok, out) = kubectl_covi(&["covi", "top", "hosts"]);
    let line = out.lines().find(|l| l.starts_with(&host)).unwrap_or_else(|| panic!("no {host} in:\n{out}"));
    assert!(ok && !line.contains("never"), "{line}");
}
