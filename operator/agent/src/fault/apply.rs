//! Puts [`super::plan`]'s faults in place on this host and takes away every other fault
//! of covi's it finds: libvirt for kill and pause, `ip` for a link down, `tc` for
//! shaping (a root qdisc with covi's handle), `nft` for partitions (a table of covi's
//! own). What counts as "in place" is read from the host each time, never remembered,
//! so faults left by an agent that died are found and removed.

use std::collections::{BTreeMap, BTreeSet};

use tokio::process::Command;

use super::{Effect, Shaping, Wanted};
use crate::error::Result;
use crate::libvirt::Libvirt;

/// The handle of covi's root qdisc on a guest's interface.
pub const QDISC_HANDLE: &str = "c0f1:";
/// covi's nftables table (family bridge).
pub const NFT_TABLE: &str = "covi_faults";

/// A covi guest as the fault applier sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guest {
    pub uuid: String,
    pub active: bool,
    /// Paused by a suspend (not by a migration or an error).
    pub paused_by_user: bool,
    /// Its host-side network interfaces (taps, vifs).
    pub interfaces: Vec<String>,
}

/// Every active covi guest's state and interfaces.
pub async fn guests(hypervisor: &Libvirt) -> Result<Vec<Guest>> {
    hypervisor
        .run(|c| {
            let mut found = Vec::new();
            for dom in c.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)? {
                let Ok(xml) = dom.xml_desc(0) else { continue };
                if !xml.contains("covi.io") {
                    continue;
                }
                let Ok(uuid) = dom.uuid_string() else { continue };
                let (mut state, mut reason) = (0, 0);
                // SAFETY: a valid domain and two ints to fill in.
                unsafe { virt::sys::virDomainGetState(dom.as_ptr(), &mut state, &mut reason, 0) };
                found.push(Guest {
                    uuid,
                    active: true,
                    paused_by_user: state == virt::sys::VIR_DOMAIN_PAUSED as i32
                        && reason == virt::sys::VIR_DOMAIN_PAUSED_USER as i32,
                    interfaces: interfaces(&xml),
                });
            }
            Ok(found)
        })
        .await
}

/// The `<target dev=…>` of every `<interface>` in a domain's XML.
pub fn interfaces(xml: &str) -> Vec<String> {
    let mut found = Vec::new();
    for block in xml.split("<interface").skip(1) {
        let block = block.split("</interface>").next().unwrap_or_default();
        if let Some(at) = block.find("<target dev=") {
            let rest = &block[at + "<target dev=".len()..];
            let quote = rest.chars().next().unwrap_or('\'');
            if let Some(name) = rest[1..].split(quote).next() {
                found.push(name.to_string());
            }
        }
    }
    found
}

/// Runs a host command; its stderr as the error.
async fn run(program: &str, args: &[String]) -> std::result::Result<String, String> {
    let output = Command::new(program).args(args).output().await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{program} is not installed on this host"),
        _ => format!("{program}: {e}"),
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The root qdisc covi put on `interface`, as `tc qdisc show` prints it, if any.
async fn covi_qdisc(interface: &str) -> Option<String> {
    let shown = run("tc", &strings(&["qdisc", "show", "dev", interface, "root"])).await.ok()?;
    shown.lines().find(|l| l.split_whitespace().nth(2) == Some(QDISC_HANDLE)).map(str::to_string)
}

/// Whether `interface` is administratively up.
async fn link_up(interface: &str) -> Option<bool> {
    let shown = run("ip", &strings(&["-o", "link", "show", "dev", interface])).await.ok()?;
    let flags = shown.split('<').nth(1)?.split('>').next()?;
    Some(flags.split(',').any(|f| f == "UP"))
}

/// What happened to one wanted fault: `Ok` with what was done, or why it failed.
pub type Outcome = std::result::Result<String, String>;

/// Makes the host match `wanted` (the active faults). `killed` names the windows whose
/// kill was already done (disruption, server, window start): a kill happens once per
/// window. `last_rules` is the ruleset this agent last wrote (None after a start: it is
/// then written, or the table deleted, whatever the host has). Returns each wanted
/// fault's outcome, keyed like `killed`, and the ruleset now in place.
pub async fn converge(
    hypervisor: &Libvirt,
    wanted: &[Wanted],
    killed: &BTreeSet<(String, String, i64)>,
    last_rules: Option<&Option<String>>,
) -> Result<(BTreeMap<(String, String, i64), Outcome>, Option<String>)> {
    let guests = guests(hypervisor).await?;
    let by_uuid: BTreeMap<&str, &Guest> = guests.iter().map(|g| (g.uuid.as_str(), g)).collect();
    let mut outcomes = BTreeMap::new();
    let key = |w: &Wanted| (w.disruption.clone(), w.server.clone(), w.since);
    let wants = |uuid: &str, f: &dyn Fn(&Effect) -> bool| wanted.iter().any(|w| w.uid == uuid && f(&w.effect));

    for w in wanted {
        let guest = by_uuid.get(w.uid.as_str()).copied();
        let outcome: Outcome = match (&w.effect, guest) {
            (Effect::Kill, _) if killed.contains(&key(w)) => Ok("killed at the window's start".into()),
            (Effect::Kill, Some(_)) => hypervisor
                .stop(&w.uid, true)
                .await
                .map(|()| "killed (destroyed); it comes back by its run policy".to_string())
                .map_err(|e| format!("destroying the guest: {e}")),
            (Effect::Kill, None) => Ok("not running at the window's start: nothing to kill".into()),
            (_, None) => Err("the guest is not running on this host".into()),
            (Effect::Pause, Some(g)) if g.paused_by_user => Ok("paused".into()),
            (Effect::Pause, Some(_)) => hypervisor
                .set_paused(&w.uid, true)
                .await
                .map(|()| "paused".to_string())
                .map_err(|e| format!("suspending the guest: {e}")),
            (Effect::LinkDown, Some(g)) => set_links(&g.interfaces, false).await.map(|()| "link down".into()),
            (Effect::Network(shaping), Some(g)) => shape(&g.interfaces, shaping).await,
            (Effect::Partition { peers, .. }, Some(_)) if peers.is_empty() => {
                Err("no server of the other side has an address yet".into())
            }
            (Effect::Partition { .. }, Some(_)) => Ok("partitioned".into()),
        };
        match &outcome {
            Ok(done) => tracing::debug!(disruption = %w.disruption, server = %w.server, %done, "fault in place"),
            // Said once, when the status changes (the controller): this repeats every pass.
            Err(e) => tracing::debug!(disruption = %w.disruption, server = %w.server, error = %e, "fault not applied"),
        }
        outcomes.insert(key(w), outcome);
    }

    // Everything covi put on a guest that no wanted fault explains goes.
    for g in &guests {
        if g.paused_by_user && !wants(&g.uuid, &|e| matches!(e, Effect::Pause)) {
            match hypervisor.set_paused(&g.uuid, false).await {
                Ok(()) => tracing::info!(uuid = %g.uuid, "resumed a guest no pause is wanted for"),
                Err(e) => tracing::warn!(uuid = %g.uuid, error = %e, "resuming a guest no pause is wanted for"),
            }
        }
        if !wants(&g.uuid, &|e| matches!(e, Effect::LinkDown)) {
            for interface in &g.interfaces {
                if link_up(interface).await == Some(false) {
                    match set_links(std::slice::from_ref(interface), true).await {
                        Ok(()) => tracing::info!(%interface, "brought a guest's link back up"),
                        Err(e) => tracing::warn!(%interface, error = %e, "bringing a guest's link back up"),
                    }
                }
            }
        }
        if !wants(&g.uuid, &|e| matches!(e, Effect::Network(_))) {
            for interface in &g.interfaces {
                if covi_qdisc(interface).await.is_some() {
                    match run("tc", &strings(&["qdisc", "del", "dev", interface, "root"])).await {
                        Ok(_) => tracing::info!(%interface, "removed covi's qdisc"),
                        Err(e) => tracing::warn!(%interface, error = %e, "removing covi's qdisc"),
                    }
                }
            }
        }
    }

    let rules = super::partition_rules(wanted);
    let written = match last_rules {
        Some(last) if *last == rules => rules,
        _ => match write_rules(rules.as_deref()).await {
            Ok(()) => {
                tracing::info!(partitions = rules.is_some(), "wrote covi's nftables table");
                rules
            }
            Err(e) => {
                for w in wanted.iter().filter(|w| matches!(w.effect, Effect::Partition { .. })) {
                    outcomes.insert(key(w), Err(e.clone()));
                }
                // Unknown: written again next time.
                Some(format!("unwritten: {e}"))
            }
        },
    };
    Ok((outcomes, written))
}

async fn set_links(interfaces: &[String], up: bool) -> std::result::Result<(), String> {
    if interfaces.is_empty() {
        return Err("the guest has no network interface".into());
    }
    for interface in interfaces {
        run("ip", &strings(&["link", "set", "dev", interface, if up { "up" } else { "down" }])).await?;
    }
    Ok(())
}

async fn shape(interfaces: &[String], shaping: &Shaping) -> Outcome {
    if interfaces.is_empty() {
        return Err("the guest has no network interface".into());
    }
    for interface in interfaces {
        // Only when it differs: replacing a netem qdisc would reset its queue.
        let current = covi_qdisc(interface).await;
        if current.as_deref().is_some_and(|c| c.split_whitespace().nth(1) == shaping.0.first().map(String::as_str)) {
            continue;
        }
        let mut args = strings(&["qdisc", "replace", "dev", interface, "root", "handle", QDISC_HANDLE]);
        args.extend(shaping.0.iter().cloned());
        run("tc", &args).await.map_err(|e| format!("shaping {interface}: {e}"))?;
    }
    Ok(format!("tc {}", shaping.0.join(" ")))
}

/// Writes covi's table atomically (one `nft -f` transaction), or deletes it.
async fn write_rules(rules: Option<&str>) -> std::result::Result<(), String> {
    let script = match rules {
        Some(chain) => format!(
            "table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\ntable bridge {NFT_TABLE} {{\n  {chain}\n}}\n"
        ),
        // Declaring it first makes the delete succeed whether or not it existed.
        None => format!("table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\n"),
    };
    // On standard input: the agent's root file system is read-only.
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "nft is not installed on this host".to_string(),
            _ => format!("nft: {e}"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(script.as_bytes()).await.map_err(|e| format!("nft: {e}"))?;
    }
    let output = child.wait_with_output().await.map_err(|e| format!("nft: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("nft -f -: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_come_from_the_live_xml() {
        let xml = "<domain><devices><interface type='bridge'><mac address='52:54:00:00:00:01'/>\
                   <source bridge='br0'/><target dev='vnet3'/><model type='virtio'/></interface>\
                   <interface type=\"bridge\"><target dev=\"vif4.0\"/></interface><console type='pty'>\
                   <target type='serial' port='0'/></console></devices></domain>";
        assert_eq!(interfaces(xml), ["vnet3", "vif4.0"]);
    }
}
