//! From a VirtualServer and its pool to what the host must have: a pure function.
//! Validation and building live here; the reconcile only executes the result.

use covi_api::host_pool::{HostPool, Hypervisor};
use covi_api::virtual_server::{RunPolicy, VirtualServer};

use crate::domain_xml::{Boot, DomainSpec, Driver, Guest, Ownership, mac_address};
use crate::seed::{Seed, SeedNetwork};

/// A reason the server cannot be built on this host, for its Ready condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Failure { reason, message: message.into() }
    }
}

/// The boot disk: a clone of a catalog image, or an empty volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskPlan {
    pub storage_pool: String,
    /// Where to define the storage pool as a directory when a host lacks it.
    pub storage_path: Option<String>,
    pub volume: String,
    pub image_volume: Option<String>,
    pub format: String,
    pub capacity: u64,
}

/// Everything the host must have for one server. Paths are filled in by the
/// reconcile once the volumes exist.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerPlan {
    pub domain: DomainSpec,
    pub disk: DiskPlan,
    pub seed_volume: String,
    pub seed: Seed,
    pub run: bool,
}

impl ServerPlan {
    /// Every volume the server owns, for cleanup.
    pub fn volumes(&self) -> Vec<String> {
        vec![self.disk.volume.clone(), self.seed_volume.clone()]
    }
}

/// libvirt's driver name for a pool's hypervisor, to catch an agent attached to the
/// wrong kind of host.
fn expected_driver(h: Hypervisor) -> (&'static str, Driver) {
    match h {
        Hypervisor::Xen => ("Xen", Driver::Xen),
        Hypervisor::Kvm => ("QEMU", Driver::Kvm),
        Hypervisor::Qemu => ("QEMU", Driver::Qemu),
        Hypervisor::Test => ("TEST", Driver::Test),
    }
}

/// The libvirt domain name: readable in `virsh list`, unique per host because
/// namespaces cannot contain dots.
pub fn domain_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// Volume names carry the UID, so a server recreated under the same name never
/// inherits an old disk.
pub fn volume_names(namespace: &str, name: &str, uid: &str) -> (String, String) {
    let short = uid.split('-').next().unwrap_or(uid);
    (format!("{namespace}.{name}-{short}.img"), format!("{namespace}.{name}-{short}-seed.iso"))
}

/// Builds the plan for `server` from its pool, on a host whose libvirt driver is
/// `driver_name`.
pub fn plan(server: &VirtualServer, pool: &HostPool, driver_name: &str) -> Result<ServerPlan, Failure> {
    let meta = &server.metadata;
    let (Some(name), Some(namespace), Some(uid)) = (&meta.name, &meta.namespace, &meta.uid) else {
        return Err(Failure::new("Invalid", "the server has no name, namespace or UID"));
    };
    let spec = &server.spec;
    let pool_name = pool.metadata.name.clone().unwrap_or_default();

    let (wanted, driver) = expected_driver(pool.spec.hypervisor);
    if !driver_name.eq_ignore_ascii_case(wanted) {
        return Err(Failure::new(
            "HypervisorMismatch",
            format!("pool {pool_name} runs {wanted} but this host's libvirt driver is {driver_name}"),
        ));
    }
    let size = pool.size_of(spec).map_err(|e| Failure::new(e.reason, e.message))?;
    let status = server.status.as_ref();
    let address = status.and_then(|s| s.address.clone());

    let image = match &spec.boot.image {
        Some(image_name) => Some(pool.image(image_name).ok_or_else(|| {
            let known: Vec<_> = pool.spec.images.iter().map(|i| i.name.as_str()).collect();
            Failure::new(
                "ImageNotFound",
                format!(
                    "image {image_name} is not in the catalog of pool {pool_name}; it has: {}",
                    if known.is_empty() { "no images".to_string() } else { known.join(", ") }
                ),
            )
        })?),
        None => None,
    };
    let hostname = spec.hostname.clone().unwrap_or_else(|| name.clone());

    let (boot, guest) = match (image, &spec.boot.iso, driver) {
        (Some(img), _, _) if img.kernel.is_some() => {
            // A kernel-booted guest has no cloud-init seed to read: its name and, when
            // covi assigned one, its address (and gateway) are on its command line.
            let mut cmdline = format!("{} covi.hostname={hostname}", img.cmdline.as_deref().unwrap_or_default());
            if let Some(addr) = &address {
                let prefix = pool.spec.network.cidr.split_once('/').map(|(_, p)| p).unwrap_or("24");
                cmdline.push_str(&format!(" covi.address={addr}/{prefix}"));
                if let Some(gateway) = &pool.spec.network.gateway {
                    cmdline.push_str(&format!(" covi.gateway={gateway}"));
                }
            }
            let boot = Boot::Kernel {
                kernel: img.kernel.clone().unwrap_or_default(),
                initrd: img.initrd.clone(),
                cmdline: cmdline.trim().to_string(),
            };
            (boot, if driver == Driver::Xen { Guest::XenPv } else { Guest::Hvm })
        }
        // Xen PV guests boot disks through pygrub; ISOs and PXE need an HVM guest.
        (Some(_), _, Driver::Xen) => (Boot::Disk, Guest::XenPv),
        (Some(_), _, _) => (Boot::Disk, Guest::Hvm),
        (None, Some(iso), _) => (Boot::Cdrom { iso: iso.clone() }, hvm_for(driver)),
        (None, None, _) => (Boot::Network, hvm_for(driver)),
    };

    let (disk_volume, seed_volume) = volume_names(namespace, name, uid);
    let mac = mac_address(guest, address.as_deref().and_then(|a| a.parse().ok()), uid);
    let network = match &address {
        Some(addr) => {
            let prefix = pool.spec.network.cidr.split_once('/').map(|(_, p)| p).unwrap_or("24");
            Some(SeedNetwork {
                mac: mac.clone(),
                address_cidr: format!("{addr}/{prefix}"),
                gateway: pool.spec.network.gateway.clone(),
                dns: pool.spec.network.dns.clone(),
            })
        }
        None => None,
    };
    let domain = DomainSpec {
        name: domain_name(namespace, name),
        uuid: uid.clone(),
        owner: Ownership {
            uid: uid.clone(),
            namespace: namespace.clone(),
            name: name.clone(),
            generation: meta.generation.unwrap_or(0),
        },
        hostname: hostname.clone(),
        driver,
        guest,
        cpus: size.cpus,
        memory_mib: size.memory_mib,
        disk_path: String::new(),
        disk_format: image.map(|i| format_name(i.format)).unwrap_or("raw").to_string(),
        seed_path: None,
        boot,
        bridge: pool.spec.network.bridge.clone(),
        mac,
        // libvirt counts bandwidth in KiB/s; a limit never rounds down to "unlimited".
        bandwidth_kib: size.bandwidth_bps.map(|bps| (bps / 8 / 1024).max(1)),
        description: spec.purpose.clone(),
    };
    Ok(ServerPlan {
        disk: DiskPlan {
            storage_pool: pool.spec.storage.pool.clone(),
            storage_path: pool.spec.storage.path.clone(),
            volume: disk_volume,
            image_volume: image.map(|i| i.volume.clone()),
            format: domain.disk_format.clone(),
            capacity: size.disk_bytes,
        },
        seed_volume,
        seed: Seed {
            instance_id: uid.clone(),
            hostname,
            ssh_authorized_keys: spec.ssh_authorized_keys.clone(),
            user_data: spec.user_data.clone(),
            network,
        },
        run: spec.run_policy == RunPolicy::Running,
        domain,
    })
}

fn hvm_for(driver: Driver) -> Guest {
    if driver == Driver::Xen { Guest::XenHvm } else { Guest::Hvm }
}

fn format_name(f: covi_api::host_pool::DiskFormat) -> &'static str {
    match f {
        covi_api::host_pool::DiskFormat::Raw => "raw",
        covi_api::host_pool::DiskFormat::Qcow2 => "qcow2",
    }
}

#[cfg(test)]
mod tests;
