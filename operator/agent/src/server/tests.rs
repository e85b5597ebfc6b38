use super::*;
use covi_api::VirtualServerStatus;

fn pool(hypervisor: &str) -> HostPool {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "HostPool",
        "metadata": {"name": "lab"},
        "spec": {
            "hypervisor": hypervisor,
            "storage": {"pool": "default-pool"},
            "images": [
                {"name": "debian-12", "volume": "debian-12.img"},
                {"name": "tiny", "volume": "tiny.img", "kernel": "/k/vmlinuz", "initrd": "/k/initrd", "cmdline": "console=hvc0"}
            ],
            "classes": [{"name": "small", "cpus": 1, "memory": "512Mi", "disk": "10Gi", "bandwidth": "100M"}],
            "network": {"bridge": "br-covi", "cidr": "10.20.0.0/24", "gateway": "10.20.0.1", "dns": ["10.20.0.1"]}
        }
    }))
    .unwrap()
}

fn server(spec: serde_json::Value) -> VirtualServer {
    let mut base = serde_json::json!({
        "hostPool": "lab", "class": "small", "boot": {"image": "debian-12"},
        "owner": "team", "purpose": "web"
    });
    for (k, v) in spec.as_object().unwrap() {
        base[k] = v.clone();
    }
    let mut vs: VirtualServer = serde_json::from_value(serde_json::json!({
        "apiVersion": "covi.io/v1alpha1", "kind": "VirtualServer",
        "metadata": {"name": "web-1", "namespace": "shop", "uid": "0f1e2d3c-aaaa-4bbb-8ccc-000000000001", "generation": 4},
        "spec": base
    }))
    .unwrap();
    vs.status = Some(VirtualServerStatus { address: Some("10.20.0.15".into()), ..Default::default() });
    vs
}

#[test]
fn a_class_server_on_the_test_driver() {
    let p = plan(&server(serde_json::json!({})), &pool("test"), "TEST").unwrap();
    assert_eq!(p.domain.name, "shop.web-1");
    assert_eq!(p.domain.uuid, "0f1e2d3c-aaaa-4bbb-8ccc-000000000001");
    assert_eq!((p.domain.cpus, p.domain.memory_mib), (1, 512));
    assert_eq!(p.domain.bandwidth_kib, Some(12_207));
    assert_eq!(p.domain.owner.generation, 4);
    assert_eq!(p.domain.driver, Driver::Test);
    assert_eq!(p.disk.image_volume.as_deref(), Some("debian-12.img"));
    assert_eq!(p.disk.capacity, 10 << 30);
    assert_eq!(p.disk.volume, "shop.web-1-0f1e2d3c.img");
    assert_eq!(p.seed.network.as_ref().unwrap().address_cidr, "10.20.0.15/24");
    assert_eq!(p.seed.hostname, "web-1");
    assert!(p.run);
}

#[test]
fn xen_images_with_a_kernel_boot_pv_directly_with_the_hostname_and_address() {
    let p =
        plan(&server(serde_json::json!({"boot": {"image": "tiny"}, "hostname": "pv-1"})), &pool("xen"), "Xen").unwrap();
    assert_eq!(p.domain.guest, Guest::XenPv);
    match &p.domain.boot {
        // No cloud-init seed reaches a kernel-booted guest: its address is on the command line.
        Boot::Kernel { cmdline, .. } => {
            assert_eq!(cmdline, "console=hvc0 covi.hostname=pv-1 covi.address=10.20.0.15/24 covi.gateway=10.20.0.1")
        }
        other => panic!("expected a kernel boot, got {other:?}"),
    }
}

#[test]
fn xen_iso_and_network_boot_need_hvm() {
    let iso = plan(&server(serde_json::json!({"boot": {"iso": "debian.iso"}})), &pool("xen"), "Xen").unwrap();
    assert_eq!(iso.domain.guest, Guest::XenHvm);
    assert_eq!(iso.disk.image_volume, None);
    let pxe = plan(&server(serde_json::json!({"boot": {"network": {}}})), &pool("xen"), "Xen").unwrap();
    assert_eq!(pxe.domain.boot, Boot::Network);
}

#[test]
fn unknown_image_or_class_is_a_clear_failure() {
    let err = plan(&server(serde_json::json!({"boot": {"image": "windows"}})), &pool("test"), "TEST").unwrap_err();
    assert_eq!(err.reason, "ImageNotFound");
    assert_eq!(err.message, "image windows is not in the catalog of pool lab; it has: debian-12, tiny");
    let err = plan(&server(serde_json::json!({"class": "huge"})), &pool("test"), "TEST").unwrap_err();
    assert_eq!(err.reason, "ClassNotFound");
    assert!(err.message.contains("class huge is not defined in pool lab; it defines: small"), "{}", err.message);
}

#[test]
fn an_agent_on_the_wrong_hypervisor_refuses() {
    let err = plan(&server(serde_json::json!({})), &pool("xen"), "QEMU").unwrap_err();
    assert_eq!(err.reason, "HypervisorMismatch");
}

#[test]
fn stopped_policy_plans_no_run() {
    let p = plan(&server(serde_json::json!({"runPolicy": "Stopped"})), &pool("qemu"), "QEMU").unwrap();
    assert!(!p.run);
    assert_eq!(p.domain.driver, Driver::Qemu);
}
