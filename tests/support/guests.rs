//! Real QEMU/TCG guests for the tests on real libvirt daemons: the fixtures a pool
//! needs in libvirt, a pool spec and a server spec for them, and the test bed's two
//! libvirt peers (`testbed_libvirt_peers` in hack/testbed.sh).

use covi_api::VirtualServer;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use virt::connect::Connect;

use crate::FIELD_MANAGER;

/// The bridge every test guest's NIC is on.
pub const BRIDGE: &str = "br-covi-test";

/// A bridge, a transient directory storage pool `name` on folder `dir`, and a small
/// raw image tiny.img in it (no OS: the guest stops in its firmware).
pub fn fixtures_in(conn: &Connect, name: &str, dir: &str) {
    // Expected misses (a domain already gone) come back as values; don't print them.
    virt::error::clear_error_callback();
    let bridge = std::process::Command::new("ip").args(["link", "show", BRIDGE]).output().expect("ip runs");
    if !bridge.status.success() {
        for args in [vec!["link", "add", BRIDGE, "type", "bridge"], vec!["link", "set", BRIDGE, "up"]] {
            let out = std::process::Command::new("ip").args(&args).output().expect("ip runs");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    std::fs::create_dir_all(dir).expect("pool directory");
    let pool = match conn.lookup_storage_pool_by_name(name) {
        Ok(p) => p,
        Err(_) => conn
            .create_storage_pool_xml(
                &format!("<pool type='dir'><name>{name}</name><target><path>{dir}</path></target></pool>"),
                0,
            )
            .expect("transient storage pool"),
    };
    pool.refresh(0).expect("refresh pool");
    // Earlier runs' servers leave their volumes behind (the test bed stops before their
    // finalizers run): 1 GiB each, they would fill the disk over warm runs. Whatever no
    // defined domain uses goes.
    let in_use: String = conn
        .list_all_domains(0)
        .map(|domains| domains.iter().filter_map(|d| d.xml_desc(0).ok()).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default();
    for volume in pool.list_all_volumes(0).unwrap_or_default() {
        let (Ok(name), Ok(path)) = (volume.name(), volume.path()) else { continue };
        if name != "tiny.img" && !in_use.contains(&path) {
            let _ = volume.delete(0);
        }
    }
    if pool.lookup_storage_vol_by_name("tiny.img").is_err() {
        virt::storage_vol::StorageVol::create_xml(
            &pool,
            "<volume><name>tiny.img</name><capacity unit='MiB'>16</capacity><target><format type='raw'/></target></volume>",
            0,
        )
        .expect("image volume");
    }
}

/// A QEMU pool spec booting the tiny image from storage pool `storage` on the bridge.
pub fn qemu_pool(storage: &str, shared: bool) -> Value {
    json!({
        "hypervisor": "qemu",
        "storage": {"pool": storage, "shared": shared},
        "images": [{"name": "tiny", "volume": "tiny.img"}],
        "network": {"bridge": BRIDGE},
    })
}

/// Applies a one-CPU server booting the tiny image, with `extra` merged into its spec.
pub async fn apply_server(api: &Api<VirtualServer>, name: &str, pool: &str, extra: Value) {
    let mut spec = json!({
        "hostPool": pool,
        // No bandwidth here: libvirt enforces it with tc's sfq qdisc, which this
        // machine's kernel lacks. tests/domain_xml.rs checks bandwidth in libvirt's XML.
        "resources": {"cpus": 1, "memory": "256Mi", "disk": "1Gi"},
        "boot": {"image": "tiny"}, "owner": "team-test", "purpose": "real QEMU guest"
    });
    crate::merge(&mut spec, &extra);
    let server =
        json!({"apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer", "metadata": {"name": name}, "spec": spec});
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&server)).await.expect("apply server");
}

pub fn ready(s: &VirtualServer) -> bool {
    s.is_ready()
}

/// The test bed's libvirt peers a and b: daemons in their own mount namespaces with
/// virtlockd and a shared lockspace. Their sockets.
pub fn peer_sockets() -> (String, String) {
    (testbed_env("COVI_PEER_A_SOCKET"), testbed_env("COVI_PEER_B_SOCKET"))
}

/// The libvirt URI of a peer's socket.
pub fn peer_uri(socket: &str) -> String {
    format!("qemu+unix:///system?socket={socket}")
}

/// A variable `hack/test.sh` sets when it starts the peers or the node (as root).
pub fn testbed_env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is unset: run through hack/test.sh as root, which starts the libvirt peers and the node")
    })
}

/// The test guest's kernel and initramfs (hack/guest.sh), copied where libvirt's QEMU
/// may read them.
pub fn guest_files() -> (String, String) {
    let dir = std::env::var("COVI_GUEST_DIR")
        .unwrap_or_else(|_| panic!("COVI_GUEST_DIR is unset: run through hack/test.sh, which builds the guest"));
    let target = "/var/lib/covi-test/guest";
    std::fs::create_dir_all(target).expect("guest folder");
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(format!("{dir}/{f}"), format!("{target}/{f}")).unwrap_or_else(|e| panic!("copying {f}: {e}"));
    }
    (format!("{target}/vmlinuz"), format!("{target}/initrd.img"))
}

/// Destroys and undefines, when dropped, every covi domain of `namespace` on the
/// libvirtd at `uri`. The test bed's libvirtd outlives each test and covi's guests
/// outlive their agents by design, so without this a test's guests would keep running
/// (a CPU-burning one for the rest of the suite) after the test, passed or failed.
pub struct GuestsOf {
    uri: String,
    namespace: String,
}

impl GuestsOf {
    pub fn new(uri: &str, namespace: &str) -> GuestsOf {
        GuestsOf { uri: uri.to_string(), namespace: namespace.to_string() }
    }
}

impl Drop for GuestsOf {
    fn drop(&mut self) {
        let Ok(conn) = Connect::open(Some(&self.uri)) else { return };
        for dom in conn.list_all_domains(0).unwrap_or_default() {
            let owner = dom.xml_desc(0).ok().and_then(|xml| covi_agent::domain_xml::ownership(&xml));
            if owner.is_some_and(|o| o.namespace == self.namespace) {
                let _ = dom.destroy();
                let _ = dom.undefine();
            }
        }
    }
}
