use super::*;

pub(crate) fn spec(driver: Driver, guest: Guest) -> DomainSpec {
    DomainSpec {
        name: "shop.web-1".into(),
        uuid: "6f1c1f44-0a57-4e38-9a3b-3d1f7c6f9a01".into(),
        owner: Ownership {
            uid: "6f1c1f44-0a57-4e38-9a3b-3d1f7c6f9a01".into(),
            namespace: "shop".into(),
            name: "web-1".into(),
            generation: 3,
        },
        hostname: "web-1".into(),
        driver,
        guest,
        cpus: 2,
        memory_mib: 2048,
        disk_path: "/var/lib/covi/shop.web-1.img".into(),
        disk_format: "raw".into(),
        seed_path: Some("/var/lib/covi/shop.web-1-seed.iso".into()),
        boot: Boot::Disk,
        bridge: "br-covi".into(),
        mac: mac_address(guest, None, "6f1c1f44-0a57-4e38-9a3b-3d1f7c6f9a01"),
        bandwidth_kib: Some(12_207),
        description: "front-end web server".into(),
    }
}

#[test]
fn carries_cpus_memory_bandwidth_and_hostname() {
    let xml = render(&spec(Driver::Kvm, Guest::Hvm));
    assert!(xml.contains("<vcpu placement=\"static\">2</vcpu>"), "{xml}");
    assert!(xml.contains("<memory unit=\"MiB\">2048</memory>"), "{xml}");
    assert!(xml.contains("<inbound average=\"12207\"/>"), "{xml}");
    assert!(xml.contains("<outbound average=\"12207\"/>"), "{xml}");
    assert!(xml.contains("hostname=\"web-1\""), "{xml}");
    assert!(xml.contains("<domain type=\"kvm\">"), "{xml}");
}

#[test]
fn ownership_survives_a_round_trip() {
    let s = spec(Driver::Xen, Guest::XenPv);
    assert_eq!(ownership(&render(&s)), Some(s.owner));
}

#[test]
fn ownership_survives_libvirts_reprefixing() {
    // libvirt stores metadata under the namespace URI with the prefix it was given,
    // but a domain defined by hand may use another prefix.
    let xml = format!(
        "<domain><metadata><x:server xmlns:x=\"{METADATA_NS}\" uid=\"u1\" namespace=\"n\" name=\"s\" generation=\"2\"/></metadata></domain>"
    );
    let owner = ownership(&xml).expect("owned");
    assert_eq!((owner.uid.as_str(), owner.generation), ("u1", 2));
}

#[test]
fn domains_without_covi_metadata_are_not_owned() {
    assert_eq!(ownership("<domain type='kvm'><name>other</name></domain>"), None);
    let foreign = "<domain><metadata><server xmlns=\"https://example.com/other\" uid=\"u1\"/></metadata></domain>";
    assert_eq!(ownership(foreign), None);
}

#[test]
fn names_and_paths_cannot_inject_markup() {
    let mut s = spec(Driver::Qemu, Guest::Hvm);
    s.name = "a</name><on_poweroff>preserve</on_poweroff><name>b".into();
    s.description = "<script>&amp;".into();
    s.disk_path = "/x\"/><source file='/etc/shadow".into();
    let xml = render(&s);
    assert!(!xml.contains("<on_poweroff>preserve"), "{xml}");
    assert!(xml.contains("a&lt;/name&gt;"), "{xml}");
    assert!(!xml.contains("file='/etc/shadow'"), "{xml}");
    assert_eq!(xml.matches("<on_poweroff>").count(), 1);
}

#[test]
fn xen_pv_boots_through_pygrub_or_a_kernel() {
    let xml = render(&spec(Driver::Xen, Guest::XenPv));
    assert!(xml.contains("<domain type=\"xen\">"), "{xml}");
    assert!(xml.contains("machine=\"xenpv\">linux</type>"), "{xml}");
    assert!(xml.contains("<bootloader>pygrub</bootloader>"), "{xml}");
    assert!(xml.contains("<target dev=\"xvda\" bus=\"xen\"/>"), "{xml}");

    let mut direct = spec(Driver::Xen, Guest::XenPv);
    direct.boot = Boot::Kernel {
        kernel: "/boot/vmlinuz".into(),
        initrd: Some("/boot/initrd.img".into()),
        cmdline: "console=hvc0 hostname=web-1".into(),
    };
    let xml = render(&direct);
    assert!(!xml.contains("bootloader"), "{xml}");
    assert!(xml.contains("<kernel>/boot/vmlinuz</kernel>"), "{xml}");
    assert!(xml.contains("<cmdline>console=hvc0 hostname=web-1</cmdline>"), "{xml}");
}

#[test]
fn xen_hvm_uses_hvmloader_and_netfront() {
    let xml = render(&spec(Driver::Xen, Guest::XenHvm));
    assert!(xml.contains("machine=\"xenfv\">hvm</type>"), "{xml}");
    assert!(xml.contains("hvmloader"), "{xml}");
    assert!(xml.contains("<model type=\"netfront\"/>"), "{xml}");
}

#[test]
fn mac_addresses_are_stable_and_use_the_hypervisors_prefix() {
    let a = mac_address(Guest::XenPv, None, "uid-1");
    assert_eq!(a, mac_address(Guest::XenPv, None, "uid-1"));
    assert!(a.starts_with("00:16:3e:"));
    assert!(mac_address(Guest::Hvm, None, "uid-1").starts_with("52:54:00:"));
    assert_ne!(a, mac_address(Guest::XenPv, None, "uid-2"));
}

#[test]
fn every_address_of_a_pool_gets_its_own_mac() {
    // A /16 pool: 65,536 addresses, where 23 random bits collide with 6% odds at 1,000.
    for guest in [Guest::XenPv, Guest::Hvm] {
        let mut seen = std::collections::HashSet::new();
        for n in 0..=u16::MAX {
            let [hi, lo] = n.to_be_bytes();
            let address = std::net::Ipv4Addr::new(10, 20, hi, lo);
            assert!(seen.insert(mac_address(guest, Some(address), "same-uid")), "{address} repeats a MAC");
        }
    }
    let ip = std::net::Ipv4Addr::new(10, 20, 0, 15);
    assert_eq!(mac_address(Guest::Hvm, Some(ip), "u"), "52:54:00:14:00:0f");
    assert_eq!(mac_address(Guest::XenPv, Some(ip), "u"), "00:16:3e:14:00:0f");
}

#[test]
fn the_test_driver_gets_the_same_devices_with_its_own_os_type() {
    let xen = render(&spec(Driver::Xen, Guest::XenPv));
    let test = render(&spec(Driver::Test, Guest::XenPv));
    assert!(test.contains("<domain type=\"test\">"), "{test}");
    assert!(test.contains("<type>xen</type>"), "{test}");
    let devices = |xml: &str| xml[xml.find("<devices>").unwrap()..].to_string();
    assert_eq!(devices(&xen), devices(&test));
}

#[test]
fn sizing_reads_cpus_and_memory_back() {
    let libvirt = "<domain type='test'><name>x</name><memory unit='KiB'>2097152</memory>\
        <currentMemory unit='KiB'>1048576</currentMemory><vcpu placement='static'>3</vcpu>\
        <devices><memory model='dimm'><target><size unit='KiB'>1</size></target></memory></devices></domain>";
    assert_eq!(sizing(libvirt), Some((3, 2_097_152)));
    assert_eq!(sizing(&render(&spec(Driver::Kvm, Guest::Hvm))), Some((2, 2048 * 1024)));
}
