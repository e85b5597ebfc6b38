//! The domain XML covi builds, checked by libvirt itself: `virt-xml-validate` against
//! libvirt's schema for every hypervisor, and the test driver defining and starting
//! each Xen guest kind (no Xen host is needed for either).

use std::process::Command;

use covi_agent::domain_xml::{Boot, DomainSpec, Driver, Guest, Ownership, mac_address, ownership, render};
use virt::connect::Connect;

fn spec(name: &str, driver: Driver, guest: Guest, boot: Boot) -> DomainSpec {
    let hash = name.bytes().fold(7u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)));
    let uid = format!("00000000-0000-4000-8000-{:012x}", hash & 0xffff_ffff_ffff);
    DomainSpec {
        name: format!("xmltest.{name}"),
        uuid: uid.clone(),
        owner: Ownership { uid: uid.clone(), namespace: "xmltest".into(), name: name.into(), generation: 1 },
        hostname: name.into(),
        driver,
        guest,
        cpus: 2,
        memory_mib: 512,
        disk_path: format!("/var/lib/covi/{name}.img"),
        disk_format: "raw".into(),
        seed_path: Some(format!("/var/lib/covi/{name}-seed.iso")),
        boot,
        bridge: "br-covi".into(),
        mac: mac_address(guest, None, &uid),
        bandwidth_kib: Some(12_800),
        description: "domain XML test <&>".into(),
    }
}

fn kernel() -> Boot {
    Boot::Kernel {
        kernel: "/var/lib/covi/kernels/vmlinuz".into(),
        initrd: Some("/var/lib/covi/kernels/initrd.img".into()),
        cmdline: "console=hvc0 covi.hostname=pv".into(),
    }
}

fn guests(driver: Driver) -> Vec<DomainSpec> {
    let xen = vec![
        spec("pv-pygrub", driver, Guest::XenPv, Boot::Disk),
        spec("pv-kernel", driver, Guest::XenPv, kernel()),
        spec("pvh", driver, Guest::XenPvh, kernel()),
        spec("hvm", driver, Guest::XenHvm, Boot::Disk),
        spec("hvm-iso", driver, Guest::XenHvm, Boot::Cdrom { iso: "/var/lib/covi/install.iso".into() }),
    ];
    let pc = vec![spec("pc", driver, Guest::Hvm, Boot::Disk), spec("pc-pxe", driver, Guest::Hvm, Boot::Network)];
    match driver {
        Driver::Xen => xen,
        Driver::Kvm | Driver::Qemu => pc,
        Driver::Test => xen.into_iter().chain(pc).collect(),
    }
}

#[test]
fn every_hypervisors_xml_passes_virt_xml_validate() {
    let dir = std::env::temp_dir().join(format!("covi-xml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut checked = 0;
    for driver in [Driver::Xen, Driver::Kvm, Driver::Qemu, Driver::Test] {
        for spec in guests(driver) {
            let path = dir.join(format!("{driver:?}-{}.xml", spec.owner.name));
            std::fs::write(&path, render(&spec)).expect("write XML");
            let out = Command::new("virt-xml-validate")
                .arg(&path)
                .arg("domain")
                .output()
                .expect("virt-xml-validate runs (libvirt-clients, installed by hack/install-deps.sh)");
            assert!(
                out.status.success(),
                "{} fails libvirt's schema:\n{}{}\n{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                render(&spec)
            );
            checked += 1;
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(checked, 5 + 2 + 2 + 7);
}

#[test]
fn the_test_driver_defines_and_starts_every_guest_kind() {
    // Each open of a test:/// file URI has its own in-memory state, so this test
    // shares nothing with others.
    let node = std::env::temp_dir().join(format!("covi-xml-node-{}.xml", std::process::id()));
    std::fs::write(&node, "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu><memory>8388608</memory></node>").expect("node file");
    let conn = Connect::open(Some(&format!("test://{}", node.display()))).expect("open the test driver");
    for spec in guests(Driver::Test) {
        let domain = conn
            .define_domain_xml(&render(&spec))
            .unwrap_or_else(|e| panic!("{} refused: {e}\n{}", spec.name, render(&spec)));
        domain.create().unwrap_or_else(|e| panic!("{} did not start: {e}", spec.name));
        assert!(domain.is_active().expect("state"), "{} runs", spec.name);
        let stored = domain.xml_desc(0).expect("XML back from libvirt");
        assert_eq!(ownership(&stored), Some(spec.owner.clone()), "{} keeps covi's metadata", spec.name);
        assert!(stored.contains("<vcpu placement='static'>2</vcpu>"), "{stored}");
        assert!(stored.contains("average='12800'"), "{stored}");
    }
    drop(conn);
    std::fs::remove_file(&node).ok();
}
