//! Faults on purpose (Disruptions), on this host. The decision is pure: from the
//! Disruptions, the servers bound here, their peers' addresses and the clock, the
//! faults that must be in place now ([`plan`]); [`apply`] compares them with what the
//! host shows and adds or removes the difference. Nothing is remembered in memory that
//! the host or the API does not show, so an agent restarted after `kill -9` removes
//! every fault it finds no Disruption for.

pub mod apply;
pub mod controller;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use covi_api::disruption::{Direction, Disruption, FaultKind, NetworkFault};
use covi_api::{VirtualServer, duration};
use kube::ResourceExt;

/// The active window of a Disruption at `now` (Unix seconds): its start and end.
/// `created` is when it was created; it applies for `duration` from then, and again
/// every `every` when given.
pub fn window(created: i64, duration: Duration, every: Option<Duration>, now: i64) -> Option<(i64, i64)> {
    let length = duration.as_secs().max(1) as i64;
    if now < created {
        return None;
    }
    let start = match every {
        None => created,
        Some(every) => {
            let every = every.as_secs().max(1) as i64;
            created + (now - created) / every * every
        }
    };
    (now < start + length).then_some((start, start + length))
}

/// One fault that must be in place on this host now.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    /// The Disruption, as namespace/name.
    pub disruption: String,
    pub namespace: String,
    /// The server's name and UID (its domain's UUID).
    pub server: String,
    pub uid: String,
    pub effect: Effect,
    /// The window, Unix seconds.
    pub since: i64,
    pub until: i64,
}

/// What is done to the server's guest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Effect {
    Kill,
    Pause,
    LinkDown,
    /// `tc` on the guest's interface: a netem or tbf qdisc.
    Network(Shaping),
    /// Drop IPv4 traffic between `address` (the server) and `peers`.
    Partition {
        address: String,
        peers: Vec<String>,
        direction: DirectionKey,
    },
}

/// [`Direction`], ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DirectionKey {
    Both,
    Outgoing,
    Incoming,
}

impl From<Direction> for DirectionKey {
    fn from(d: Direction) -> Self {
        match d {
            Direction::Both => DirectionKey::Both,
            Direction::Outgoing => DirectionKey::Outgoing,
            Direction::Incoming => DirectionKey::Incoming,
        }
    }
}

/// Traffic shaping, as `tc` arguments after `root handle c0f1:`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Shaping(pub Vec<String>);

impl Shaping {
    /// A rate limit alone is a token bucket (tbf); anything else needs netem.
    pub fn of(fault: &NetworkFault) -> Shaping {
        let only_rate = fault.delay.is_none()
            && fault.loss_percent.is_none()
            && fault.duplicate_percent.is_none()
            && fault.corrupt_percent.is_none();
        let mut args: Vec<String> = Vec::new();
        let ms = |d: &str| duration::parse(d).map(|d| format!("{}ms", d.as_millis().max(1)));
        if let (true, Some(rate)) = (only_rate, fault.rate_kbit) {
            // A burst of a tenth of a second of traffic, at least an MTU and a bit.
            let burst = (rate / 8 / 10).max(2) * 1024;
            args.extend(["tbf".into(), "rate".into(), format!("{rate}kbit")]);
            args.extend(["burst".into(), burst.to_string(), "latency".into(), "400ms".into()]);
            return Shaping(args);
        }
        args.push("netem".into());
        if let Some(delay) = fault.delay.as_deref().and_then(ms) {
            args.extend(["delay".into(), delay]);
            if let Some(jitter) = fault.jitter.as_deref().and_then(ms) {
                args.push(jitter);
            }
        }
        for (word, value) in
            [("loss", fault.loss_percent), ("duplicate", fault.duplicate_percent), ("corrupt", fault.corrupt_percent)]
        {
            if let Some(p) = value {
                args.extend([word.to_string(), format!("{p}%")]);
            }
        }
        if let Some(rate) = fault.rate_kbit {
            args.extend(["rate".into(), format!("{rate}kbit")]);
        }
        Shaping(args)
    }
}

/// A server the plan cannot fault, and why (it becomes the target's Failed state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplannable {
    pub disruption: String,
    pub server: String,
    pub message: String,
}

/// The faults that must be in place on this host at `now`: every Disruption's window,
/// applied to its selected servers among `here` (those bound to this host, running
/// there). `peers` gives, per namespace, every server's name, labels and address, for
/// partitions.
pub fn plan(
    disruptions: &[Disruption],
    here: &[VirtualServer],
    peers: &BTreeMap<String, Vec<Peer>>,
    now: i64,
) -> (Vec<Wanted>, Vec<Unplannable>) {
    let mut wanted = Vec::new();
    let mut unplannable = Vec::new();
    for d in disruptions {
        if d.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(namespace) = d.namespace() else { continue };
        let Some(created) = d.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()) else { continue };
        let Some(length) = duration::parse(&d.spec.duration) else { continue };
        let every = d.spec.every.as_deref().and_then(duration::parse);
        let Some((since, until)) = window(created, length, every, now) else { continue };
        let key = format!("{namespace}/{}", d.name_any());
        let selected = here.iter().filter(|s| {
            s.namespace().as_deref() == Some(namespace.as_str()) && d.spec.selector.matches(&s.name_any(), s.labels())
        });
        for server in selected {
            let Some(uid) = server.uid() else { continue };
            let effect = match d.spec.fault.kind {
                FaultKind::Kill => Effect::Kill,
                FaultKind::Pause => Effect::Pause,
                FaultKind::LinkDown => Effect::LinkDown,
                FaultKind::Network => match &d.spec.fault.network {
                    Some(n) => Effect::Network(Shaping::of(n)),
                    None => continue,
                },
                FaultKind::Partition => {
                    let Some(partition) = &d.spec.fault.partition else { continue };
                    let Some(address) = server.status.as_ref().and_then(|s| s.address.clone()) else {
                        unplannable.push(Unplannable {
                            disruption: key.clone(),
                            server: server.name_any(),
                            message: "the server has no address (its pool has no network.cidr): a partition is \
                                      between addresses"
                                .into(),
                        });
                        continue;
                    };
                    let peers: BTreeSet<String> = peers
                        .get(&namespace)
                        .into_iter()
                        .flatten()
                        .filter(|p| p.name != server.name_any() && partition.from.matches(&p.name, &p.labels))
                        .filter_map(|p| p.address.clone())
                        .collect();
                    Effect::Partition {
                        address,
                        peers: peers.into_iter().collect(),
                        direction: partition.direction.into(),
                    }
                }
            };
            wanted.push(Wanted {
                disruption: key.clone(),
                namespace: namespace.clone(),
                server: server.name_any(),
                uid,
                effect,
                since,
                until,
            });
        }
    }
    wanted.sort();
    (wanted, unplannable)
}

/// A server of the namespace as a partition's other side sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub address: Option<String>,
}

/// The nftables ruleset for every partition in `wanted`: one table of covi's own on
/// the bridge family, dropping the partitioned pairs as frames cross any bridge of this
/// host. `None` when no partition is wanted (the table is then deleted).
pub fn partition_rules(wanted: &[Wanted]) -> Option<String> {
    let mut rules = BTreeSet::new();
    for w in wanted {
        let Effect::Partition { address, peers, direction } = &w.effect else { continue };
        if peers.is_empty() {
            continue;
        }
        let set = format!("{{ {} }}", peers.join(", "));
        if matches!(direction, DirectionKey::Both | DirectionKey::Outgoing) {
            rules.insert(format!("ip saddr {address} ip daddr {set} drop"));
        }
        if matches!(direction, DirectionKey::Both | DirectionKey::Incoming) {
            rules.insert(format!("ip saddr {set} ip daddr {address} drop"));
        }
    }
    if rules.is_empty() {
        return None;
    }
    let mut text = String::from("chain forward {\n    type filter hook forward priority -10; policy accept;\n");
    for rule in rules {
        text.push_str("    ");
        text.push_str(&rule);
        text.push('\n');
    }
    text.push_str("  }");
    Some(text)
}

#[cfg(test)]
mod tests;
