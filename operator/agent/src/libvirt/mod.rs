//! The libvirt layer: one connection per host for the agent's work (reopened when
//! libvirtd restarts), every call run off the async runtime, and the operations the
//! agent needs in the vocabulary of servers and volumes. The fencing watchdog has a
//! connection of its own (`fencing`).

pub mod events;

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use crate::domain_xml::{Ownership, ownership, sizing};
use crate::error::{Error, Result};
pub use events::DomainEvent;

/// Facts about the host as libvirt reports them.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeFacts {
    /// libvirt's driver name: "Xen", "QEMU" or "TEST".
    pub driver: String,
    /// The hypervisor's version, e.g. "4.17.5".
    pub hypervisor_version: String,
    pub libvirt_version: String,
    pub cpus: u32,
    pub memory_kib: u64,
}

/// A domain on the host that covi defined.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedDomain {
    pub uuid: String,
    pub name: String,
    pub active: bool,
    /// Active and executing: not paused (an incoming live migration, a frozen guest).
    pub running: bool,
    pub owner: Ownership,
    pub vcpus: u32,
    pub memory_kib: u64,
}

/// Why a volume could not be prepared; the reason becomes the server's condition.
#[derive(Debug, PartialEq, Eq)]
pub enum VolumeError {
    StoragePoolNotFound(String),
    ImageNotFound(String),
    Failed(String),
}

/// Why a start did not happen; the reason becomes the server's condition.
#[derive(Debug, PartialEq, Eq)]
pub enum StartRefused {
    /// The host may not start anything now (fenced, overdue, not yet renewed).
    Fenced,
    /// The lock manager refused: a running copy somewhere holds a lease on a disk.
    DiskLeaseHeld(String),
    /// Any other failure, with libvirt's message.
    Failed(String),
}

/// The agent's connection to libvirt on this host; it reopens itself after a libvirtd restart.
#[derive(Clone)]
pub struct Libvirt {
    conn: Arc<Mutex<Arc<Connect>>>,
    uri: String,
    events: UnboundedSender<DomainEvent>,
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1_000) % 1_000, v % 1_000)
}

pub(crate) fn is(e: &virt::error::Error, code: ErrorNumber) -> bool {
    matches!(e.code(), virt::enumutil::Enum::Known(c) if c == code)
}

impl Libvirt {
    /// Opens `uri` and sends every domain lifecycle event to `events`.
    pub async fn open(uri: &str, events: UnboundedSender<DomainEvent>) -> Result<Libvirt> {
        events::start_event_loop();
        // libvirt's default error handler prints every error, including expected
        // look-up misses, to stderr; errors reach us as values instead.
        virt::error::clear_error_callback();
        let (target, sender) = (uri.to_string(), events.clone());
        let conn = tokio::task::spawn_blocking(move || connect(&target, sender))
            .await
            .map_err(|e| Error::Join(e.to_string()))??;
        Ok(Libvirt { conn: Arc::new(Mutex::new(Arc::new(conn))), uri: uri.to_string(), events })
    }

    /// The open connection, reopened first if libvirtd closed it (a restart): the
    /// Lease keeps renewing meanwhile, so a dead connection would leave a host that
    /// looks healthy while nothing it asks of libvirt works.
    pub fn connection(&self) -> Result<Arc<Connect>> {
        let mut current = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_alive().unwrap_or(false) {
            return Ok(current.clone());
        }
        let fresh = Arc::new(connect(&self.uri, self.events.clone())?);
        tracing::warn!(uri = %self.uri, "the libvirt connection had closed; reconnected");
        *current = fresh.clone();
        Ok(fresh)
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this.connection()?;
            f(&conn)
        })
        .await
        .map_err(|e| Error::Join(e.to_string()))?
    }

    pub async fn facts(&self) -> Result<NodeFacts> {
        self.run(|c| {
            let info = c.node_info()?;
            Ok(NodeFacts {
                driver: c.driver_type()?,
                hypervisor_version: version_string(c.hyp_version()?),
                libvirt_version: version_string(c.lib_version()?),
                cpus: info.cpus,
                memory_kib: info.memory,
            })
        })
        .await
    }

    /// Every domain on the host that carries covi's ownership metadata.
    pub async fn observe(&self) -> Result<Vec<ObservedDomain>> {
        self.run(|c| {
            let mut found = Vec::new();
            for dom in c.list_all_domains(0)? {
                match describe(&dom) {
                    Ok(Some(d)) => found.push(d),
                    Ok(None) => {}
                    // A domain undefined while we looked is simply gone.
                    Err(Error::Libvirt(e)) if is(&e, ErrorNumber::NoDomain) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(found)
        })
        .await
    }

    /// The covi domains that matter to one server: the one with its UUID and one with
    /// its name but another UUID (a leftover), read without reading every other domain
    /// on the host (a host's servers reconcile one by one at every resync).
    pub async fn observe_server(&self, name: &str, uuid: &str) -> Result<Vec<ObservedDomain>> {
        let (name, uuid) = (name.to_string(), uuid.to_string());
        self.run(move |c| {
            let mut found: Vec<ObservedDomain> = Vec::new();
            for dom in [c.lookup_domain_by_uuid_string(&uuid), c.lookup_domain_by_name(&name)] {
                match dom.map_err(Error::from).and_then(|d| describe(&d)) {
                    Ok(Some(d)) if !found.iter().any(|f| f.uuid == d.uuid) => found.push(d),
                    Ok(_) => {}
                    // Not there, or undefined while we looked.
                    Err(Error::Libvirt(e)) if is(&e, ErrorNumber::NoDomain) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(found)
        })
        .await
    }

    /// The covi domain with this UUID, if it exists.
    pub async fn domain(&self, uuid: &str) -> Result<Option<ObservedDomain>> {
        let uuid = uuid.to_string();
        self.run(move |c| match c.lookup_domain_by_uuid_string(&uuid) {
            Ok(dom) => describe(&dom),
            Err(e) if is(&e, ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(e.into()),
        })
        .await
    }

    /// Makes sure storage pool `pool` exists: when it is missing and the HostPool gives
    /// a directory, defines it there as a directory pool (built, started, autostarted),
    /// as for the mount point of NFS or CephFS.
    pub async fn ensure_pool(&self, pool: &str, path: Option<&str>) -> Result<std::result::Result<(), VolumeError>> {
        let (pool, path) = (pool.to_string(), path.map(str::to_string));
        self.run(move |c| match (find_pool(c, &pool)?, path) {
            (Ok(_), _) => Ok(Ok(())),
            (Err(missing), None) => Ok(Err(missing)),
            (Err(_), Some(path)) => {
                let xml = format!(
                    "<pool type='dir'><name>{}</name><target><path>{}</path></target></pool>",
                    quick_xml::escape::escape(pool.as_str()),
                    quick_xml::escape::escape(path.as_str())
                );
                let defined = c
                    .define_storage_pool_xml(&xml, 0)
                    .and_then(|p| {
                        p.build(0)?;
                        p.create(0)?;
                        p.set_autostart(true)?;
                        Ok(p)
                    })
                    .map_err(|e| format!("defining storage pool {pool} at {path}: {e}"));
                tracing::info!(%pool, %path, ok = defined.is_ok(), "storage pool was missing; defined it as a directory");
                Ok(defined.map(drop).map_err(VolumeError::Failed))
            }
        })
        .await
    }

    /// Makes sure volume `name` exists in storage pool `pool` with at least `capacity`
    /// bytes: a clone of `image` when given, else empty. Returns its path.
    pub async fn ensure_volume(
        &self,
        pool: &str,
        name: &str,
        image: Option<&str>,
        format: &str,
        capacity: u64,
    ) -> Result<std::result::Result<String, VolumeError>> {
        let (pool, name, image, format) =
            (pool.to_string(), name.to_string(), image.map(str::to_string), format.to_string());
        self.run(move |c| {
            let pool = match find_pool(c, &pool)? {
                Ok(p) => p,
                Err(e) => return Ok(Err(e)),
            };
            // On shared storage another host may have created the volume since this
            // host last listed the pool (a failover, a move): look again before cloning.
            let existing = pool.lookup_storage_vol_by_name(&name).or_else(|_| {
                let _ = pool.refresh(0);
                pool.lookup_storage_vol_by_name(&name)
            });
            if let Ok(vol) = existing {
                let info = vol.info()?;
                if info.capacity < capacity {
                    vol.resize(capacity, 0)?;
                }
                return Ok(Ok(vol.path()?));
            }
            let xml = volume_xml(&name, &format, capacity);
            let created = match &image {
                Some(image) => match pool.lookup_storage_vol_by_name(image) {
                    Ok(source) => StorageVol::create_xml_from(&pool, &xml, &source, 0),
                    Err(e) if is(&e, ErrorNumber::NoStorageVolume) => {
                        return Ok(Err(VolumeError::ImageNotFound(format!(
                            "volume {image} is not in storage pool {}",
                            pool.name()?
                        ))));
                    }
                    Err(e) => return Err(e.into()),
                },
                None => StorageVol::create_xml(&pool, &xml, 0),
            };
            match created {
                Ok(vol) => Ok(Ok(vol.path()?)),
                Err(e) => Ok(Err(VolumeError::Failed(e.to_string()))),
            }
        })
        .await
    }

    /// Writes `content` into volume `name` of `pool`, creating it. Drivers that cannot
    /// upload (the test driver keeps no volume content) get an empty volume of that size.
    pub async fn ensure_file_volume(
        &self,
        pool: &str,
        name: &str,
        content: Vec<u8>,
    ) -> Result<std::result::Result<String, VolumeError>> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.run(move |c| {
            let pool = match find_pool(c, &pool)? {
                Ok(p) => p,
                Err(e) => return Ok(Err(e)),
            };
            if let Ok(vol) = pool.lookup_storage_vol_by_name(&name) {
                return Ok(Ok(vol.path()?));
            }
            let vol = match StorageVol::create_xml(&pool, &volume_xml(&name, "raw", content.len() as u64), 0) {
                Ok(vol) => vol,
                Err(e) => return Ok(Err(VolumeError::Failed(e.to_string()))),
            };
            let stream = Stream::new(c, 0)?;
            match vol.upload(&stream, 0, content.len() as u64, 0) {
                Ok(()) => {
                    let mut sent = 0;
                    while sent < content.len() {
                        sent += stream.send(&content[sent..])? as usize;
                    }
                    stream.finish()?;
                }
                Err(e) if is(&e, ErrorNumber::NoSupport) => {}
                Err(e) => {
                    vol.delete(0).ok();
                    return Ok(Err(VolumeError::Failed(e.to_string())));
                }
            }
            Ok(Ok(vol.path()?))
        })
        .await
    }

    /// The path of volume `name` in storage pool `pool`, re-reading the pool when it
    /// is not listed yet; `None` when it is not there.
    pub async fn volume_path(&self, pool: &str, name: &str) -> Result<Option<String>> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.run(move |c| {
            let Ok(pool) = find_pool(c, &pool)? else { return Ok(None) };
            let vol = pool.lookup_storage_vol_by_name(&name).or_else(|_| {
                let _ = pool.refresh(0);
                pool.lookup_storage_vol_by_name(&name)
            });
            Ok(match vol {
                Ok(vol) => Some(vol.path()?),
                Err(_) => None,
            })
        })
        .await
    }

    /// Whether volume `name` is in storage pool `pool`, after re-reading the pool (on
    /// shared storage another host may have created it).
    pub async fn volume_exists(&self, pool: &str, name: &str) -> Result<bool> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.run(move |c| {
            let Ok(pool) = find_pool(c, &pool)? else { return Ok(false) };
            // A failed refresh leaves the last listing, which is still worth a look.
            let _ = pool.refresh(0);
            Ok(pool.lookup_storage_vol_by_name(&name).is_ok())
        })
        .await
    }

    /// Live-migrates the domain peer to peer to the libvirt at `dest_uri`: it keeps
    /// running there, defined persistently, and is undefined here. Returns libvirt's
    /// message on failure, when the domain still runs here.
    pub async fn migrate_live(
        &self,
        uuid: &str,
        dest_uri: &str,
        unsafe_storage: bool,
    ) -> Result<std::result::Result<(), String>> {
        let dest = dest_uri.to_string();
        let migrated = self
            .with_domain(uuid, move |d| {
                let mut flags = virt::sys::VIR_MIGRATE_LIVE
                    | virt::sys::VIR_MIGRATE_PEER2PEER
                    | virt::sys::VIR_MIGRATE_PERSIST_DEST
                    | virt::sys::VIR_MIGRATE_UNDEFINE_SOURCE
                    | MigrationTransport::of(&dest).flags();
                if unsafe_storage {
                    flags |= virt::sys::VIR_MIGRATE_UNSAFE;
                }
                let params = virt::domain::MigrateParameters::default();
                Ok(d.migrate_to_uri3(Some(&dest), params, flags).map_err(|e| e.to_string()))
            })
            .await?;
        Ok(migrated.unwrap_or_else(|| Err("the domain is not defined here".to_string())))
    }

    /// Whether libvirt runs a job (a migration) on the domain with this UUID now: a
    /// restarted agent must not issue a second migration, nor call the first failed,
    /// while libvirt is still moving the guest.
    pub async fn job_running(&self, uuid: &str) -> Result<bool> {
        let job = self.with_domain(uuid, |d| Ok(d.job_info()?.r#type != virt::sys::VIR_DOMAIN_JOB_NONE as i32)).await?;
        Ok(job.unwrap_or(false))
    }

    /// Free bytes in storage pool `pool`, when it exists.
    pub async fn pool_available(&self, pool: &str) -> Result<Option<u64>> {
        let pool = pool.to_string();
        self.run(move |c| match find_pool(c, &pool)? {
            Ok(p) => Ok(Some(p.info()?.available)),
            Err(_) => Ok(None),
        })
        .await
    }

    /// Deletes the named volumes of `pool` that exist; returns those it deleted.
    pub async fn delete_volumes(&self, pool: &str, names: Vec<String>) -> Result<Vec<String>> {
        let pool = pool.to_string();
        self.run(move |c| {
            let pool = match find_pool(c, &pool)? {
                Ok(p) => p,
                Err(_) => return Ok(Vec::new()),
            };
            let mut deleted = Vec::new();
            for name in names {
                match pool.lookup_storage_vol_by_name(&name) {
                    Ok(vol) => {
                        vol.delete(0)?;
                        deleted.push(name);
                    }
                    Err(e) if is(&e, ErrorNumber::NoStorageVolume) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(deleted)
        })
        .await
    }

    /// Defines (or redefines) a domain; returns libvirt's error message on failure.
    pub async fn define(&self, xml: String) -> Result<std::result::Result<(), String>> {
        self.run(move |c| Ok(c.define_domain_xml(&xml).map(drop).map_err(|e| e.to_string()))).await
    }

    /// Starts a defined domain if `fence` allows it, holding the fencing lock across
    /// that last check and the start.
    pub async fn start(
        &self,
        uuid: &str,
        fence: Arc<crate::fence::Fence>,
        announced: Option<u64>,
    ) -> Result<std::result::Result<(), StartRefused>> {
        let started = self
            .with_domain(uuid, move |d| {
                Ok(match fence.start_if_allowed(announced, || d.create()) {
                    None => Err(StartRefused::Fenced),
                    Some(Ok(_)) => Ok(()),
                    Some(Err(e)) if is(&e, ErrorNumber::ResourceBusy) => {
                        Err(StartRefused::DiskLeaseHeld(e.to_string()))
                    }
                    Some(Err(e)) => Err(StartRefused::Failed(e.to_string())),
                })
            })
            .await?;
        Ok(started.unwrap_or_else(|| Err(StartRefused::Failed("the domain is not defined".to_string()))))
    }

    /// Suspends (`pause`) or resumes the domain; a domain that is gone is left alone.
    pub async fn set_paused(&self, uuid: &str, pause: bool) -> Result<()> {
        self.with_domain(uuid, move |d| {
            if pause {
                d.suspend()?
            } else {
                d.resume()?
            }
            Ok(())
        })
        .await
        .map(drop)
    }

    /// Asks the guest to shut down (ACPI), or forces it off when `force`.
    pub async fn stop(&self, uuid: &str, force: bool) -> Result<()> {
        self.with_domain(uuid, move |d| {
            let result = if force { d.destroy() } else { d.shutdown() };
            match result {
                Ok(()) => Ok(()),
                // Already off.
                Err(e) if is(&e, ErrorNumber::OperationInvalid) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await
        .map(drop)
    }

    /// Forces the domain off and removes its definition.
    pub async fn remove(&self, uuid: &str) -> Result<()> {
        self.with_domain(uuid, |d| {
            if d.is_active()? {
                match d.destroy() {
                    Ok(()) => {}
                    Err(e) if is(&e, ErrorNumber::OperationInvalid) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if d.is_persistent()? {
                d.undefine()?;
            }
            Ok(())
        })
        .await
        .map(drop)
    }

    /// Runs `f` on the domain with this UUID; `None` when there is no such domain.
    async fn with_domain<T, F>(&self, uuid: &str, f: F) -> Result<Option<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Domain) -> Result<T> + Send + 'static,
    {
        let uuid = uuid.to_string();
        self.run(move |c| match c.lookup_domain_by_uuid_string(&uuid) {
            Ok(dom) => f(&dom).map(Some),
            Err(e) if is(&e, ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(e.into()),
        })
        .await
    }
}

/// Opens `uri` and subscribes `events` to its domains' lifecycle events.
fn connect(uri: &str, events: UnboundedSender<DomainEvent>) -> Result<Connect> {
    let conn = Connect::open(Some(uri))?;
    events::subscribe(&conn, events)?;
    Ok(conn)
}

fn find_pool(c: &Connect, name: &str) -> Result<std::result::Result<StoragePool, VolumeError>> {
    match c.lookup_storage_pool_by_name(name) {
        Ok(pool) => {
            if !pool.is_active()? {
                pool.create(0)?;
            }
            Ok(Ok(pool))
        }
        Err(e) if is(&e, ErrorNumber::NoStoragePool) => {
            Ok(Err(VolumeError::StoragePoolNotFound(format!("storage pool {name} does not exist on this host"))))
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads a domain's persistent definition: what it will be after its next start,
/// which is what covi compares with the server's spec.
fn describe(dom: &Domain) -> Result<Option<ObservedDomain>> {
    let xml = dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
    let Some(owner) = ownership(&xml) else {
        return Ok(None);
    };
    let (vcpus, memory_kib) = sizing(&xml).unwrap_or_default();
    Ok(Some(ObservedDomain {
        uuid: dom.uuid_string()?,
        name: dom.name()?,
        active: dom.is_active()?,
        running: matches!(dom.state()?.0, virt::enumutil::Enum::Known(virt::domain::DomainState::Running)),
        owner,
        vcpus,
        memory_kib,
    }))
}

/// A volume definition. Names are escaped by the XML writer like domain XML.
fn volume_xml(name: &str, format: &str, capacity: u64) -> String {
    use quick_xml::Writer;
    use quick_xml::events::BytesText;
    let mut w = Writer::new(std::io::Cursor::new(Vec::new()));
    let write = |w: &mut Writer<_>| -> std::io::Result<()> {
        w.create_element("volume").write_inner_content(|w| {
            w.create_element("name").write_text_content(BytesText::new(name))?;
            w.create_element("capacity")
                .with_attribute(("unit", "bytes"))
                .write_text_content(BytesText::new(&capacity.to_string()))?;
            w.create_element("target").write_inner_content(|w| {
                w.create_element("format").with_attribute(("type", format)).write_empty()?;
                Ok(())
            })?;
            Ok(())
        })?;
        Ok(())
    };
    write(&mut w).expect("writing to memory cannot fail");
    String::from_utf8(w.into_inner().into_inner()).expect("UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_like_people_write_them() {
        assert_eq!(version_string(4_017_005), "4.17.5");
        assert_eq!(version_string(11_003_000), "11.3.0");
    }

    /// On libvirt's test driver: a server's observation holds its own domain and a
    /// leftover under its name, and nothing else on the host.
    #[tokio::test]
    async fn a_server_observes_its_domain_and_a_leftover_of_its_name_only() {
        use crate::domain_xml::{Driver, Guest, render};
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let hv = Libvirt::open("test:///default", events).await.expect("test driver");
        let domain = |name: &str, uuid: &str| {
            let mut d = crate::domain_xml::tests::spec(Driver::Test, Guest::Hvm);
            (d.name, d.uuid, d.owner.uid) = (name.into(), uuid.into(), uuid.into());
            render(&d)
        };
        let (old, new, other) = (
            "0b3f2c52-1111-4e38-9a3b-3d1f7c6f9a01",
            "0b3f2c52-2222-4e38-9a3b-3d1f7c6f9a01",
            "0b3f2c52-3333-4e38-9a3b-3d1f7c6f9a01",
        );
        for (name, uuid) in [("shop.web-1", old), ("shop.web-2", other)] {
            hv.define(domain(name, uuid)).await.unwrap().expect("defined");
        }
        let uuids = |found: Vec<ObservedDomain>| found.into_iter().map(|d| d.uuid).collect::<Vec<_>>();
        // web-1 deleted and created again (a new UID) before the leftover was swept.
        assert_eq!(uuids(hv.observe_server("shop.web-1", new).await.unwrap()), [old]);
        hv.define(domain("shop.web-3", new)).await.unwrap().expect("defined");
        assert_eq!(uuids(hv.observe_server("shop.web-3", new).await.unwrap()), [new]);
        assert_eq!(uuids(hv.observe_server("shop.web-1", new).await.unwrap()), [new, old]);
        assert!(hv.observe_server("shop.web-4", "0b3f2c52-4444-4e38-9a3b-3d1f7c6f9a01").await.unwrap().is_empty());
        assert_eq!(hv.observe().await.unwrap().len(), 3, "the whole host, for comparison");
    }

    #[test]
    fn volume_names_are_escaped() {
        let xml = volume_xml("a</name><x/>", "raw", 1024);
        assert!(xml.contains("<name>a&lt;/name&gt;&lt;x/&gt;</name>"), "{xml}");
        assert!(xml.contains("<capacity unit=\"bytes\">1024</capacity>"), "{xml}");
    }
}

/// How a live migration's memory crosses the network, chosen from the peer URI: what
/// the control connection to the peer is protected by, the memory is too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationTransport {
    /// QEMU's own migration stream over TLS (`+tls` peers; qemu.conf's migrate_tls_x509
    /// certificates, as for libvirtd's own TLS).
    QemuTls,
    /// Through the libvirtd connection: libxl has no TLS stream of its own, and over
    /// `+ssh` the tunnel is what encrypts.
    Tunnelled,
    /// Plain TCP (`+tcp` peers, as in a lab): the guest's memory crosses unencrypted.
    Plain,
}

impl MigrationTransport {
    pub fn of(peer_uri: &str) -> MigrationTransport {
        let scheme = peer_uri.split("://").next().unwrap_or_default();
        let (driver, transport) = scheme.split_once('+').unwrap_or((scheme, ""));
        match (driver, transport) {
            ("qemu", "tls") => MigrationTransport::QemuTls,
            (_, "tls" | "ssh" | "libssh" | "libssh2") => MigrationTransport::Tunnelled,
            _ => MigrationTransport::Plain,
        }
    }

    pub fn flags(self) -> u32 {
        match self {
            MigrationTransport::QemuTls => virt::sys::VIR_MIGRATE_TLS,
            MigrationTransport::Tunnelled => virt::sys::VIR_MIGRATE_TUNNELLED,
            MigrationTransport::Plain => 0,
        }
    }
}

#[cfg(test)]
mod transport_tests {
    use super::MigrationTransport::{self, *};

    #[test]
    fn memory_is_encrypted_whenever_the_peer_uri_is() {
        assert_eq!(MigrationTransport::of("qemu+tls://10.0.0.2/system"), QemuTls);
        assert_eq!(MigrationTransport::of("xen+tls://10.0.0.2/system"), Tunnelled);
        assert_eq!(MigrationTransport::of("qemu+ssh://root@10.0.0.2/system"), Tunnelled);
        assert_eq!(MigrationTransport::of("qemu+tcp://10.0.0.2/system"), Plain);
        assert_eq!(QemuTls.flags(), virt::sys::VIR_MIGRATE_TLS);
        assert_eq!(Plain.flags(), 0);
    }
}
