//! The cloud-init NoCloud seed: what a new server learns at first boot (host name, SSH
//! keys, user data, its address). The documents are a pure function of the server;
//! the ISO around them is made by xorriso.

use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};

/// The network a server's interface is configured with.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedNetwork {
    pub mac: String,
    /// Address with prefix length, e.g. 10.20.0.15/24.
    pub address_cidr: String,
    pub gateway: Option<String>,
    pub dns: Vec<String>,
}

/// What goes into a seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Seed {
    pub instance_id: String,
    pub hostname: String,
    pub ssh_authorized_keys: Vec<String>,
    pub user_data: Option<String>,
    pub network: Option<SeedNetwork>,
}

/// The seed's files: (name, content). YAML is produced by a serializer, so no field
/// can break out of its place.
pub fn documents(seed: &Seed) -> Vec<(&'static str, String)> {
    let meta = json!({
        "instance-id": seed.instance_id,
        "local-hostname": seed.hostname,
        "public-keys": seed.ssh_authorized_keys,
    });
    let user = seed.user_data.clone().unwrap_or_else(|| "#cloud-config\n{}\n".to_string());
    let mut files = vec![("meta-data", to_yaml(&meta)), ("user-data", user)];
    if let Some(net) = &seed.network {
        let mut eth0 = json!({
            "match": {"macaddress": net.mac},
            "set-name": "eth0",
            "addresses": [net.address_cidr],
        });
        if let Some(gw) = &net.gateway {
            eth0["routes"] = json!([{"to": "default", "via": gw}]);
        }
        if !net.dns.is_empty() {
            eth0["nameservers"] = json!({"addresses": net.dns});
        }
        files.push(("network-config", to_yaml(&json!({"version": 2, "ethernets": {"eth0": eth0}}))));
    }
    files
}

fn to_yaml(value: &serde_json::Value) -> String {
    serde_yaml::to_string(value).expect("JSON values always serialise as YAML")
}

/// Builds the seed ISO (volume label "cidata", as NoCloud looks for) in `scratch`.
pub async fn build_iso(seed: &Seed, scratch: &Path) -> Result<Vec<u8>> {
    let dir = scratch.join(format!("seed-{}", seed.instance_id));
    let files = dir.join("files");
    let iso = dir.join("seed.iso");
    let io = |what: &str, e: std::io::Error| Error::Seed(format!("{what} in {}: {e}", dir.display()));
    tokio::fs::create_dir_all(&files).await.map_err(|e| io("creating the folder", e))?;
    for (name, content) in documents(seed) {
        tokio::fs::write(files.join(name), content).await.map_err(|e| io("writing a file", e))?;
    }
    let out = tokio::process::Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
        .arg(&iso)
        .arg(&files)
        .output()
        .await
        .map_err(|e| Error::Seed(format!("running xorriso (is it installed?): {e}")))?;
    if !out.status.success() {
        return Err(Error::Seed(format!("xorriso failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    let bytes = tokio::fs::read(&iso).await.map_err(|e| io("reading the ISO", e))?;
    tokio::fs::remove_dir_all(&dir).await.ok();
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Seed {
        Seed {
            instance_id: "uid-1".into(),
            hostname: "web-1".into(),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA alice".into()],
            user_data: Some("#cloud-config\npackages: [nginx]\n".into()),
            network: Some(SeedNetwork {
                mac: "52:54:00:01:02:03".into(),
                address_cidr: "10.20.0.15/24".into(),
                gateway: Some("10.20.0.1".into()),
                dns: vec!["10.20.0.1".into()],
            }),
        }
    }

    fn parse(files: &[(&str, String)], name: &str) -> serde_json::Value {
        let text = &files.iter().find(|(n, _)| *n == name).expect(name).1;
        serde_yaml::from_str(text).expect("valid YAML")
    }

    #[test]
    fn carries_hostname_keys_address_and_user_data() {
        let files = documents(&seed());
        let meta = parse(&files, "meta-data");
        assert_eq!(meta["local-hostname"], "web-1");
        assert_eq!(meta["instance-id"], "uid-1");
        assert_eq!(meta["public-keys"][0], "ssh-ed25519 AAAA alice");
        let net = parse(&files, "network-config");
        assert_eq!(net["ethernets"]["eth0"]["addresses"][0], "10.20.0.15/24");
        assert_eq!(net["ethernets"]["eth0"]["routes"][0]["via"], "10.20.0.1");
        assert_eq!(net["ethernets"]["eth0"]["match"]["macaddress"], "52:54:00:01:02:03");
        let user = &files.iter().find(|(n, _)| *n == "user-data").unwrap().1;
        assert!(user.starts_with("#cloud-config\npackages: [nginx]"));
    }

    #[test]
    fn hostile_values_stay_inside_their_field() {
        let mut s = seed();
        s.hostname = "x\ninstance-id: stolen".into();
        let meta = parse(&documents(&s), "meta-data");
        assert_eq!(meta["instance-id"], "uid-1");
        assert_eq!(meta["local-hostname"], "x\ninstance-id: stolen");
    }

    #[test]
    fn without_user_data_an_empty_cloud_config_is_written() {
        let mut s = seed();
        s.user_data = None;
        s.network = None;
        let files = documents(&s);
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].1, "#cloud-config\n{}\n");
    }

    #[tokio::test]
    async fn builds_an_iso_labelled_cidata() {
        let scratch = std::env::temp_dir().join(format!("covi-seed-test-{}", std::process::id()));
        let iso = build_iso(&seed(), &scratch).await.expect("xorriso builds the ISO");
        // ISO 9660: the primary volume descriptor at sector 16 holds the volume id at 40..72;
        // cloud-init looks for the label cidata in either case.
        assert_eq!(&iso[0x8001..0x8006], b"CD001");
        assert_eq!(std::str::from_utf8(&iso[0x8028..0x802e]).unwrap(), "cidata");
        std::fs::remove_dir_all(&scratch).ok();
    }
}
