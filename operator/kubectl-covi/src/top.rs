//! `kubectl covi top`: use beside allocation, like `kubectl top`, from the usage covi's
//! agents write to each server's and Host's status once per interval (an hour). Live
//! values are the agents' Prometheus metrics (`covi_server_cpu_seconds` and others).

use clap::ValueEnum;
use covi_api::usage::Usage;
use covi_api::{Host, VirtualServer};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::table::{Output, Table};
use crate::{Scope, api_message};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum What {
    Servers,
    Hosts,
}

pub async fn top(client: &Client, scope: &Scope, what: What, output: Output) -> Result<String, String> {
    match what {
        What::Servers => servers(client, scope, output).await,
        What::Hosts => hosts(client, output).await,
    }
}

async fn servers(client: &Client, scope: &Scope, output: Output) -> Result<String, String> {
    let mut list = scope.list::<VirtualServer>(client, "servers").await?;
    list.sort_by_key(|s| (s.namespace(), s.name_any()));
    let mut t = Table::new(&[
        "NAMESPACE",
        "NAME",
        "HOST",
        "CPU(cores)",
        "CPU%",
        "CPU P95",
        "MEMORY(bytes)",
        "MEMORY%",
        "MEASURED",
    ]);
    let now = Timestamp::now();
    let mut missing = 0;
    for s in &list {
        let status = s.status.clone().unwrap_or_default();
        let Some(u) = status.usage.as_ref().filter(|u| u.samples > 0) else {
            missing += 1;
            continue;
        };
        let cpus = status.cpus.unwrap_or(0);
        let memory_mib = status.memory.as_deref().and_then(|m| covi_api::quantity::parse_mib(m).ok()).unwrap_or(0);
        t.push(vec![
            s.namespace().unwrap_or_default(),
            s.name_any(),
            u.host.clone().unwrap_or_else(|| "-".into()),
            millicores(u.cpu.mean),
            percent(u.cpu.mean.into(), u64::from(cpus) * 1000),
            millicores(u.cpu.p95),
            mib(u.memory.p95),
            percent(u.memory.p95.into(), memory_mib),
            measured(u, now),
        ]);
    }
    let mut out = t.render(output);
    if missing > 0 && output == Output::Table {
        out.push_str(&format!("({missing} servers have no usage yet: agents write it once per interval)\n"));
    }
    Ok(out)
}

async fn hosts(client: &Client, output: Output) -> Result<String, String> {
    let mut list = Api::<Host>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing hosts: {}", api_message(e)))?
        .items;
    list.sort_by_key(|h| h.name_any());
    let mut t = Table::new(&[
        "NAME",
        "POOL",
        "CPU(cores)",
        "CPU%",
        "MEMORY(bytes)",
        "MEMORY%",
        "CPU ALLOCATED",
        "MEMORY ALLOCATED",
        "MEASURED",
    ]);
    let now = Timestamp::now();
    for h in &list {
        let status = h.status.clone().unwrap_or_default();
        let usage = status.usage.as_ref().filter(|u| u.samples > 0);
        let (cpus, memory_mib) = status
            .capacity
            .as_ref()
            .map(|c| (c.cpus, covi_api::quantity::parse_mib(&c.memory).unwrap_or(0)))
            .unwrap_or((0, 0));
        let dash = || "-".to_string();
        t.push(vec![
            h.name_any(),
            status.pool.clone().unwrap_or_else(dash),
            usage.map(|u| millicores(u.cpu.mean)).unwrap_or_else(dash),
            usage.map(|u| percent(u.cpu.mean.into(), u64::from(cpus) * 1000)).unwrap_or_else(dash),
            usage.map(|u| mib(u.memory.p95)).unwrap_or_else(dash),
            usage.map(|u| percent(u.memory.p95.into(), memory_mib)).unwrap_or_else(dash),
            status.cpu_allocation.clone().unwrap_or_else(dash),
            status.memory_allocation.clone().unwrap_or_else(dash),
            usage.map(|u| measured(u, now)).unwrap_or_else(|| "never".into()),
        ]);
    }
    Ok(t.render(output))
}

fn millicores(m: u32) -> String {
    format!("{m}m")
}

fn mib(m: u32) -> String {
    format!("{m}Mi")
}

fn percent(used: u64, of: u64) -> String {
    (used * 100 + of / 2).checked_div(of).map(|p| format!("{p}%")).unwrap_or_else(|| "-".into())
}

/// How long ago the interval ended, and how long it was: "2m ago/1h".
fn measured(u: &Usage, now: Timestamp) -> String {
    let age = u.sampled_at.as_ref().map(|t| (now.as_second() - t.0.as_second()).max(0)).unwrap_or(0);
    format!("{} ago/{}", short(age as u64), short(u.interval_seconds.into()))
}

fn short(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_kubectl_top_prints_them() {
        assert_eq!((millicores(950), mib(212)), ("950m".to_string(), "212Mi".to_string()));
        assert_eq!(percent(950, 1000), "95%");
        assert_eq!(percent(1, 0), "-");
        assert_eq!(
            (short(45), short(600), short(3600), short(86400)),
            ("45s".into(), "10m".into(), "60m".into(), "24h".into())
        );
    }
}
