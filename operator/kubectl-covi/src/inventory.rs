//! `kubectl covi inventory`: the record the old CMDB kept — every server with owner,
//! purpose, pool, host, address, size, dates, request and approver, and every host
//! with its hypervisor, versions and capacity; with `--history` also the servers
//! deleted since, from the history the operator keeps (see `covi_api::history`).

use std::collections::BTreeMap;

use clap::ValueEnum;
use covi_api::condition::find_condition;
use covi_api::contract::{REQUEST_LABEL, condition_type};
use covi_api::history::{self, ServerRecord};
use covi_api::{Host, VirtualServer, VmRequest};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::table::{Output, Table};
use crate::{Scope, api_message};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Only {
    Servers,
    Hosts,
}

const SERVER_COLUMNS: &[&str] = &[
    "NAMESPACE",
    "NAME",
    "OWNER",
    "PURPOSE",
    "POOL",
    "HOST",
    "ADDRESS",
    "SIZE",
    "CREATED",
    "EXPIRES",
    "REQUEST",
    "APPROVER",
    "STATUS",
    "DELETED",
];

const HOST_COLUMNS: &[&str] =
    &["NAME", "POOL", "HYPERVISOR", "VERSION", "LIBVIRT", "CPUS", "MEMORY", "STORAGE FREE", "SERVERS", "READY"];

pub async fn inventory(
    client: &Client,
    scope: &Scope,
    with_history: bool,
    only: Option<Only>,
    output: Output,
) -> Result<String, String> {
    let servers = match only {
        Some(Only::Hosts) => None,
        _ => Some(server_table(client, scope, with_history).await?),
    };
    let hosts = match only {
        Some(Only::Servers) => None,
        _ => host_table(client, only == Some(Only::Hosts)).await?,
    };
    Ok(match output {
        Output::Json => {
            let mut object = serde_json::Map::new();
            for (key, table) in [("servers", &servers), ("hosts", &hosts)] {
                if let Some(t) = table {
                    let rows: Value = serde_json::from_str(&t.render(Output::Json)).unwrap_or(json!([]));
                    object.insert(key.into(), rows);
                }
            }
            serde_json::to_string_pretty(&object).unwrap_or_default() + "\n"
        }
        // One section each, a blank line between (use --only for a single CSV table).
        _ => [servers, hosts].iter().flatten().map(|t| t.render(output)).collect::<Vec<_>>().join("\n"),
    })
}

async fn server_table(client: &Client, scope: &Scope, with_history: bool) -> Result<Table, String> {
    let mut servers = scope.list::<VirtualServer>(client, "servers").await?;
    servers.sort_by_key(|s| (s.namespace(), s.name_any()));
    let requests: BTreeMap<(String, String), VmRequest> = scope
        .list::<VmRequest>(client, "requests")
        .await?
        .into_iter()
        .map(|r| ((r.namespace().unwrap_or_default(), r.name_any()), r))
        .collect();
    let mut table = Table::new(SERVER_COLUMNS);
    let dash = || "-".to_string();
    for s in &servers {
        let status = s.status.clone().unwrap_or_default();
        let ns = s.namespace().unwrap_or_default();
        let request_name = s.labels().get(REQUEST_LABEL).cloned();
        let request = request_name.as_ref().and_then(|n| requests.get(&(ns.clone(), n.clone())));
        // As the operator stamped it on the server, else as the request names it now.
        let approver = s.annotations().get(history::APPROVED_BY).cloned().or_else(|| {
            let conditions = request?.status.as_ref()?.conditions.as_slice();
            find_condition(conditions, condition_type::APPROVED)
                .filter(|c| c.status == "True")
                .and_then(|c| history::approver_from_message(&c.message))
        });
        let expires = s
            .spec
            .expires_at
            .as_ref()
            .or_else(|| request.and_then(|r| r.status.as_ref()?.expires_at.as_ref()))
            .map(|t| t.0.to_string());
        let disk = s.spec.resources.as_ref().map(|r| r.disk.clone());
        table.push(vec![
            ns,
            s.name_any(),
            s.spec.owner.clone(),
            s.spec.purpose.clone(),
            s.spec.host_pool.clone(),
            status.host.clone().unwrap_or_else(dash),
            status.address.clone().unwrap_or_else(dash),
            size(status.cpus, status.memory.as_deref(), disk.as_deref()),
            s.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_else(dash),
            expires.unwrap_or_else(dash),
            request_name.unwrap_or_else(dash),
            approver.unwrap_or_else(dash),
            if s.metadata.deletion_timestamp.is_some() {
                "Terminating".into()
            } else {
                status.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "Pending".into())
            },
            dash(),
        ]);
    }
    if with_history {
        for r in history_records(client, scope).await? {
            table.push(record_row(r));
        }
    }
    Ok(table)
}

fn record_row(r: ServerRecord) -> Vec<String> {
    let dash = || "-".to_string();
    vec![
        r.namespace,
        r.name,
        r.owner,
        r.purpose,
        r.pool,
        r.host.unwrap_or_else(dash),
        r.address.unwrap_or_else(dash),
        size(r.cpus, r.memory.as_deref(), r.disk.as_deref()),
        r.created,
        dash(),
        r.request.unwrap_or_else(dash),
        r.approver.unwrap_or_else(dash),
        r.ended,
        r.deleted,
    ]
}

/// "2cpu/4Gi/20Gi" (CPUs, memory, disk).
fn size(cpus: Option<u32>, memory: Option<&str>, disk: Option<&str>) -> String {
    format!(
        "{}/{}/{}",
        cpus.map(|c| format!("{c}cpu")).unwrap_or_else(|| "-".into()),
        memory.unwrap_or("-"),
        disk.unwrap_or("-")
    )
}

/// Deleted servers' records: of every namespace (cluster-wide listing), or of `-n`'s.
async fn history_records(client: &Client, scope: &Scope) -> Result<Vec<ServerRecord>, String> {
    let covi = &scope.covi_namespace;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), covi);
    let refused = |e: kube::Error| match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "--history reads ConfigMaps in namespace {covi}, where covi keeps it out of tenants' reach \
             (role covi-history-reader); you may not: {}",
            s.message
        ),
        other => format!("reading history: {}", api_message(other)),
    };
    let maps = if scope.explicit {
        api.get_opt(&history::config_map_name(&scope.namespace)).await.map_err(refused)?.into_iter().collect()
    } else {
        api.list(&ListParams::default().labels(&format!("{}=true", history::LABEL))).await.map_err(refused)?.items
    };
    let mut records: Vec<ServerRecord> = maps
        .iter()
        .filter_map(|cm| cm.data.as_ref()?.get(history::KEY))
        .flat_map(|text| history::parse(text))
        .collect();
    records.sort_by(|a, b| (&a.namespace, &a.deleted).cmp(&(&b.namespace, &b.deleted)));
    Ok(records)
}

/// Hosts, or `None` (with a note) for a user who may not list them unless asked for
/// hosts only.
async fn host_table(client: &Client, required: bool) -> Result<Option<Table>, String> {
    let hosts = match Api::<Host>::all(client.clone()).list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 403 && !required => {
            eprintln!("(you may not list hosts; showing servers only)");
            return Ok(None);
        }
        Err(e) => return Err(format!("listing hosts: {}", api_message(e))),
    };
    let mut table = Table::new(HOST_COLUMNS);
    let dash = || "-".to_string();
    for h in hosts {
        let st = h.status.clone().unwrap_or_default();
        let ready = find_condition(&st.conditions, condition_type::READY).map(|c| c.status.clone());
        table.push(vec![
            h.name_any(),
            st.pool.clone().unwrap_or_else(dash),
            st.hypervisor.as_ref().map(|v| v.type_.clone()).unwrap_or_else(dash),
            st.hypervisor.as_ref().map(|v| v.version.clone()).unwrap_or_else(dash),
            st.libvirt_version.clone().unwrap_or_else(dash),
            st.capacity.as_ref().map(|c| c.cpus.to_string()).unwrap_or_else(dash),
            st.capacity.as_ref().map(|c| c.memory.clone()).unwrap_or_else(dash),
            st.capacity.as_ref().and_then(|c| c.storage.clone()).unwrap_or_else(dash),
            st.servers.to_string(),
            ready.unwrap_or_else(|| "Unknown".into()),
        ]);
    }
    Ok(Some(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_record_fills_every_column() {
        let r = ServerRecord {
            namespace: "shop".into(),
            name: "web-0".into(),
            owner: "team-web".into(),
            purpose: "storefront".into(),
            pool: "general".into(),
            host: Some("h1".into()),
            cpus: Some(2),
            memory: Some("4Gi".into()),
            disk: Some("20Gi".into()),
            request: Some("web".into()),
            approver: Some("bob".into()),
            created: "2026-01-01T00:00:00Z".into(),
            deleted: "2026-02-01T00:00:00Z".into(),
            ended: "Expired".into(),
            ..Default::default()
        };
        let row = record_row(r);
        assert_eq!(row.len(), SERVER_COLUMNS.len());
        assert_eq!(row[7], "2cpu/4Gi/20Gi");
        assert_eq!((row[11].as_str(), row[12].as_str(), row[13].as_str()), ("bob", "Expired", "2026-02-01T00:00:00Z"));
    }
}
