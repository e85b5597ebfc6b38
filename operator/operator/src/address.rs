//! Address management: each server's IPv4 address from its pool's CIDR. Pure: the
//! addresses in use come from the servers' status (so nothing is handed out twice,
//! also across operator restarts) plus bindings written but not yet seen.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use covi_api::host_pool::PoolNetwork;

/// Why a server's address cannot be given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressError {
    /// Condition reason: AddressOutsideNetwork, AddressTaken, AddressReserved, NetworkFull, InvalidNetwork.
    pub reason: &'static str,
    pub message: String,
}

fn err(reason: &'static str, message: String) -> AddressError {
    AddressError { reason, message }
}

/// A pool's network, parsed.
#[derive(Clone, Debug)]
pub struct Network {
    first: u32,
    last: u32,
    prefix: u8,
    cidr: String,
    excluded: BTreeSet<u32>,
    dns: BTreeSet<u32>,
    reserved: Vec<(u32, u32)>,
}

impl Network {
    pub fn parse(net: &PoolNetwork) -> Result<Network, AddressError> {
        let invalid = |what: &str| err("InvalidNetwork", format!("{what} of the pool's network is invalid"));
        let (base, prefix) = net.cidr.split_once('/').ok_or_else(|| invalid("cidr"))?;
        let base: Ipv4Addr = base.parse().map_err(|_| invalid("cidr"))?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(|| invalid("cidr"))?;
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        let network = u32::from(base) & mask;
        let broadcast = network | !mask;
        // /31 and /32 have no network or broadcast address to skip (RFC 3021).
        let (first, last) = if prefix >= 31 { (network, broadcast) } else { (network + 1, broadcast - 1) };
        let mut excluded = BTreeSet::new();
        if let Some(gw) = &net.gateway {
            excluded.insert(u32::from(gw.parse::<Ipv4Addr>().map_err(|_| invalid("gateway"))?));
        }
        // The pool's DNS servers, where they sit inside its network, are taken too.
        let dns = net.dns.iter().filter_map(|d| d.parse::<Ipv4Addr>().ok()).map(u32::from).collect();
        let mut reserved = Vec::new();
        for r in &net.reserved {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let a: Ipv4Addr = a.trim().parse().map_err(|_| invalid(&format!("reserved range {r:?}")))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| invalid(&format!("reserved range {r:?}")))?;
            reserved.push((u32::from(a).min(u32::from(b)), u32::from(a).max(u32::from(b))));
        }
        Ok(Network { first, last, prefix, cidr: net.cidr.clone(), excluded, dns, reserved })
    }

    fn is_reserved(&self, a: u32) -> bool {
        self.excluded.contains(&a) || self.dns.contains(&a) || self.reserved_range(a).is_some()
    }

    fn reserved_range(&self, a: u32) -> Option<(u32, u32)> {
        self.reserved.iter().copied().find(|(lo, hi)| (*lo..=*hi).contains(&a))
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Checks a static address: inside the CIDR, not the network or broadcast address,
    /// not the gateway, a DNS server or in a reserved range (they are the network's own:
    /// routers, resolvers, DHCP), and not used by another server.
    pub fn check_static(&self, address: &str, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, AddressError> {
        let ip: Ipv4Addr =
            address.parse().map_err(|_| err("AddressOutsideNetwork", format!("{address} is not an IPv4 address")))?;
        let a = u32::from(ip);
        if a < self.first || a > self.last {
            return Err(err(
                "AddressOutsideNetwork",
                format!(
                    "address {ip} is outside the pool's network {} (usable range {}-{})",
                    self.cidr,
                    Ipv4Addr::from(self.first),
                    Ipv4Addr::from(self.last)
                ),
            ));
        }
        if self.excluded.contains(&a) {
            return Err(err("AddressReserved", format!("address {ip} is the pool's gateway")));
        }
        if self.dns.contains(&a) {
            return Err(err("AddressReserved", format!("address {ip} is one of the pool's DNS servers")));
        }
        if let Some((lo, hi)) = self.reserved_range(a) {
            let range = if lo == hi {
                Ipv4Addr::from(lo).to_string()
            } else {
                format!("{}-{}", Ipv4Addr::from(lo), Ipv4Addr::from(hi))
            };
            return Err(err("AddressReserved", format!("address {ip} is in the pool's reserved range {range}")));
        }
        if used.contains(&ip) {
            return Err(err("AddressTaken", format!("address {ip} is already used by another server")));
        }
        Ok(ip)
    }

    /// The lowest free address outside the reserved ranges.
    pub fn allocate(&self, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, AddressError> {
        (self.first..=self.last)
            .find(|a| !self.is_reserved(*a) && !used.contains(&Ipv4Addr::from(*a)))
            .map(Ipv4Addr::from)
            .ok_or_else(|| err("NetworkFull", format!("no free address is left in {}", self.cidr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(cidr: &str) -> Network {
        Network::parse(&PoolNetwork {
            bridge: "br0".into(),
            cidr: cidr.into(),
            gateway: Some("10.20.0.1".into()),
            dns: vec!["10.20.0.53".into(), "192.0.2.53".into()],
            reserved: vec!["10.20.0.2-10.20.0.4".into(), "10.20.0.6".into()],
        })
        .unwrap()
    }

    fn used(list: &[&str]) -> BTreeSet<Ipv4Addr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn skips_network_gateway_reserved_and_used() {
        let n = network("10.20.0.0/24");
        assert_eq!(n.allocate(&used(&[])).unwrap().to_string(), "10.20.0.5");
        assert_eq!(n.allocate(&used(&["10.20.0.5"])).unwrap().to_string(), "10.20.0.7");
    }

    #[test]
    fn a_full_network_says_so() {
        let n = network("10.20.0.0/29");
        // .1 gateway, .2-.4 and .6 reserved, .7 broadcast: only .5 is usable.
        let e = n.allocate(&used(&["10.20.0.5"])).unwrap_err();
        assert_eq!(e.reason, "NetworkFull");
        assert_eq!(e.message, "no free address is left in 10.20.0.0/29");
    }

    #[test]
    fn static_addresses_are_checked() {
        let n = network("10.20.0.0/24");
        assert_eq!(n.check_static("10.20.0.50", &used(&[])).unwrap().to_string(), "10.20.0.50");
        let reserved = n.check_static("10.20.0.3", &used(&[])).unwrap_err();
        assert_eq!(reserved.reason, "AddressReserved");
        assert_eq!(reserved.message, "address 10.20.0.3 is in the pool's reserved range 10.20.0.2-10.20.0.4");
        let dns = n.check_static("10.20.0.53", &used(&[])).unwrap_err();
        assert_eq!(dns.message, "address 10.20.0.53 is one of the pool's DNS servers");
        let outside = n.check_static("10.30.0.5", &used(&[])).unwrap_err();
        assert_eq!(outside.reason, "AddressOutsideNetwork");
        assert!(outside.message.contains("outside the pool's network 10.20.0.0/24"), "{}", outside.message);
        assert_eq!(n.check_static("10.20.0.255", &used(&[])).unwrap_err().reason, "AddressOutsideNetwork");
        assert_eq!(n.check_static("10.20.0.1", &used(&[])).unwrap_err().reason, "AddressReserved");
        assert_eq!(n.check_static("10.20.0.9", &used(&["10.20.0.9"])).unwrap_err().reason, "AddressTaken");
    }
}
