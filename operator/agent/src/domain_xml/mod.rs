//! libvirt domain XML as a pure function of (server, host facts).
//!
//! Built with an XML writer, never by string formatting: names, host names and paths
//! are escaped, so a server's fields cannot inject markup into the domain definition.
//! Every domain covi defines carries a `<covi:server>` element in covi's own XML
//! namespace; domains without it are not covi's and are never touched.

use std::io::Cursor;

use quick_xml::Reader;
use quick_xml::Writer;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};

/// covi's XML namespace for domain metadata.
pub const METADATA_NS: &str = "https://covi.io/xmlns/domain/v1";
/// Prefix used for that namespace in the XML covi writes.
pub const METADATA_PREFIX: &str = "covi";

/// The libvirt driver that runs the domain: the `type` of `<domain>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// Xen through libxl (xen:///system).
    Xen,
    /// KVM through QEMU (qemu:///system).
    Kvm,
    /// QEMU without acceleration (TCG).
    Qemu,
    /// libvirt's test driver: accepts any guest kind, runs nothing.
    Test,
}

/// How a guest is virtualised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    /// Xen paravirtualised guest (pygrub or direct kernel boot).
    XenPv,
    /// Xen PVH guest (direct kernel boot).
    XenPvh,
    /// Xen fully virtualised guest (hvmloader, PV drivers for disks and NICs).
    XenHvm,
    /// A PC guest of KVM or QEMU (q35, virtio).
    Hvm,
}

impl Guest {
    pub fn is_xen(self) -> bool {
        matches!(self, Guest::XenPv | Guest::XenPvh | Guest::XenHvm)
    }

    /// PV and PVH guests have no emulated devices: no firmware, no CD-ROM, no NIC model.
    fn is_paravirtual(self) -> bool {
        matches!(self, Guest::XenPv | Guest::XenPvh)
    }
}

/// Which device the guest boots from first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// The boot disk (an image clone).
    Disk,
    /// An installer ISO attached as a CD-ROM.
    Cdrom { iso: String },
    /// PXE.
    Network,
    /// A kernel and initramfs on the host (Xen PV/PVH direct boot).
    Kernel { kernel: String, initrd: Option<String>, cmdline: String },
}

/// Who owns a domain: the VirtualServer it was defined for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ownership {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The spec generation the definition was built from.
    pub generation: i64,
}

/// Everything the XML depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainSpec {
    pub name: String,
    pub uuid: String,
    pub owner: Ownership,
    pub hostname: String,
    pub driver: Driver,
    pub guest: Guest,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_path: String,
    pub disk_format: String,
    /// The cloud-init NoCloud seed ISO, when there is one.
    pub seed_path: Option<String>,
    pub boot: Boot,
    pub bridge: String,
    pub mac: String,
    /// Inbound and outbound average, in KiB/s as libvirt counts it.
    pub bandwidth_kib: Option<u64>,
    /// The purpose, shown by `virsh desc`.
    pub description: String,
}

type W = Writer<Cursor<Vec<u8>>>;

fn open(w: &mut W, name: &str, attrs: &[(&str, &str)]) {
    let mut start = BytesStart::new(name);
    for (k, v) in attrs {
        start.push_attribute((*k, *v));
    }
    w.write_event(Event::Start(start)).expect("writing to memory cannot fail");
}

fn close(w: &mut W, name: &str) {
    w.write_event(Event::End(BytesEnd::new(name))).expect("writing to memory cannot fail");
}

fn empty(w: &mut W, name: &str, attrs: &[(&str, &str)]) {
    let mut start = BytesStart::new(name);
    for (k, v) in attrs {
        start.push_attribute((*k, *v));
    }
    w.write_event(Event::Empty(start)).expect("writing to memory cannot fail");
}

fn text(w: &mut W, name: &str, attrs: &[(&str, &str)], value: &str) {
    open(w, name, attrs);
    w.write_event(Event::Text(BytesText::new(value))).expect("writing to memory cannot fail");
    close(w, name);
}

fn domain_type(driver: Driver) -> &'static str {
    match driver {
        Driver::Xen => "xen",
        Driver::Kvm => "kvm",
        Driver::Qemu => "qemu",
        Driver::Test => "test",
    }
}

/// Renders the domain definition.
pub fn render(spec: &DomainSpec) -> String {
    let mut w = Writer::new_with_indent(Cursor::new(Vec::new()), b' ', 2);
    open(&mut w, "domain", &[("type", domain_type(spec.driver))]);
    text(&mut w, "name", &[], &spec.name);
    text(&mut w, "uuid", &[], &spec.uuid);
    text(&mut w, "description", &[], &spec.description);
    metadata(&mut w, spec);
    let memory = spec.memory_mib.to_string();
    text(&mut w, "memory", &[("unit", "MiB")], &memory);
    text(&mut w, "currentMemory", &[("unit", "MiB")], &memory);
    text(&mut w, "vcpu", &[("placement", "static")], &spec.cpus.to_string());
    os(&mut w, spec);
    if !spec.guest.is_paravirtual() && spec.driver != Driver::Test {
        open(&mut w, "features", &[]);
        empty(&mut w, "acpi", &[]);
        empty(&mut w, "apic", &[]);
        close(&mut w, "features");
    }
    // A crashed guest is destroyed rather than restarted by the hypervisor, so the
    // agent sees it, reports it and restarts it under its own rules.
    text(&mut w, "on_poweroff", &[], "destroy");
    text(&mut w, "on_reboot", &[], "restart");
    text(&mut w, "on_crash", &[], "destroy");
    devices(&mut w, spec);
    close(&mut w, "domain");
    String::from_utf8(w.into_inner().into_inner()).expect("the writer emits UTF-8")
}

fn metadata(w: &mut W, spec: &DomainSpec) {
    open(w, "metadata", &[]);
    let generation = spec.owner.generation.to_string();
    let element = format!("{METADATA_PREFIX}:server");
    let xmlns = format!("xmlns:{METADATA_PREFIX}");
    empty(
        w,
        &element,
        &[
            (xmlns.as_str(), METADATA_NS),
            ("uid", &spec.owner.uid),
            ("namespace", &spec.owner.namespace),
            ("name", &spec.owner.name),
            ("generation", &generation),
            ("hostname", &spec.hostname),
        ],
    );
    close(w, "metadata");
}

fn os(w: &mut W, spec: &DomainSpec) {
    open(w, "os", &[]);
    match (spec.driver, spec.guest) {
        // The test driver offers only i686 "xen" and "hvm" guests and knows no machine
        // types: the OS type alone, with every device below exactly as on Xen or KVM.
        (Driver::Test, guest) => text(w, "type", &[], if guest.is_paravirtual() { "xen" } else { "hvm" }),
        (_, Guest::XenPv) => text(w, "type", &[("arch", "x86_64"), ("machine", "xenpv")], "linux"),
        (_, Guest::XenPvh) => text(w, "type", &[("arch", "x86_64"), ("machine", "xenpvh")], "xenpvh"),
        (_, Guest::XenHvm) => {
            text(w, "type", &[("arch", "x86_64"), ("machine", "xenfv")], "hvm");
            text(w, "loader", &[("type", "rom")], "/usr/lib/xen/boot/hvmloader");
        }
        (_, Guest::Hvm) => text(w, "type", &[("arch", "x86_64"), ("machine", "q35")], "hvm"),
    }
    match &spec.boot {
        Boot::Kernel { kernel, initrd, cmdline } => {
            text(w, "kernel", &[], kernel);
            if let Some(initrd) = initrd {
                text(w, "initrd", &[], initrd);
            }
            text(w, "cmdline", &[], cmdline);
        }
        // A PV guest boots through pygrub (see bootloader below), not a boot order.
        _ if spec.guest.is_paravirtual() => {}
        Boot::Disk => empty(w, "boot", &[("dev", "hd")]),
        Boot::Cdrom { .. } => {
            empty(w, "boot", &[("dev", "cdrom")]);
            empty(w, "boot", &[("dev", "hd")]);
        }
        Boot::Network => {
            empty(w, "boot", &[("dev", "network")]);
            empty(w, "boot", &[("dev", "hd")]);
        }
    }
    close(w, "os");
    if spec.guest.is_paravirtual() && !matches!(spec.boot, Boot::Kernel { .. }) {
        text(w, "bootloader", &[], "pygrub");
    }
}

/// Disk target names and buses: (boot disk, its bus, CD-ROM devices, their bus).
fn disk_targets(guest: Guest) -> (&'static str, &'static str, [&'static str; 2], &'static str) {
    match guest {
        Guest::XenPv | Guest::XenPvh => ("xvda", "xen", ["xvdb", "xvdc"], "xen"),
        Guest::XenHvm => ("xvda", "xen", ["hdc", "hdd"], "ide"),
        Guest::Hvm => ("vda", "virtio", ["sda", "sdb"], "sata"),
    }
}

fn devices(w: &mut W, spec: &DomainSpec) {
    let guest = spec.guest;
    let (disk_dev, disk_bus, cd_devs, cd_bus) = disk_targets(guest);
    open(w, "devices", &[]);
    open(w, "disk", &[("type", "file"), ("device", "disk")]);
    empty(w, "driver", &[("name", "qemu"), ("type", &spec.disk_format)]);
    empty(w, "source", &[("file", &spec.disk_path)]);
    empty(w, "target", &[("dev", disk_dev), ("bus", disk_bus)]);
    close(w, "disk");
    let mut cds = Vec::new();
    if let Boot::Cdrom { iso } = &spec.boot {
        cds.push(iso.as_str());
    }
    if let Some(seed) = &spec.seed_path {
        cds.push(seed.as_str());
    }
    for (path, dev) in cds.into_iter().zip(cd_devs) {
        // PV guests have no emulated CD-ROM: the ISO is a read-only xen disk.
        let device = if guest.is_paravirtual() { "disk" } else { "cdrom" };
        open(w, "disk", &[("type", "file"), ("device", device)]);
        empty(w, "driver", &[("name", "qemu"), ("type", "raw")]);
        empty(w, "source", &[("file", path)]);
        empty(w, "target", &[("dev", dev), ("bus", cd_bus)]);
        empty(w, "readonly", &[]);
        close(w, "disk");
    }
    open(w, "interface", &[("type", "bridge")]);
    empty(w, "mac", &[("address", &spec.mac)]);
    empty(w, "source", &[("bridge", &spec.bridge)]);
    if !guest.is_paravirtual() {
        empty(w, "model", &[("type", if guest.is_xen() { "netfront" } else { "virtio" })]);
    }
    if let Some(kib) = spec.bandwidth_kib {
        let kib = kib.to_string();
        open(w, "bandwidth", &[]);
        empty(w, "inbound", &[("average", &kib)]);
        empty(w, "outbound", &[("average", &kib)]);
        close(w, "bandwidth");
    }
    close(w, "interface");
    empty(w, "console", &[("type", "pty")]);
    close(w, "devices");
}

/// Reads covi's ownership element out of a domain's XML. `None` for domains covi did
/// not define (no element, or an element without a uid).
pub fn ownership(domain_xml: &str) -> Option<Ownership> {
    let mut reader = Reader::from_str(domain_xml);
    let mut in_metadata = false;
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) if e.local_name().as_ref() == "metadata" => in_metadata = true,
            Event::End(e) if e.local_name().as_ref() == "metadata" => in_metadata = false,
            Event::Start(e) | Event::Empty(e) if in_metadata && e.local_name().as_ref() == "server" => {
                // libvirt may re-prefix our element; the namespace URI is what identifies it.
                let mut owner =
                    Ownership { uid: String::new(), namespace: String::new(), name: String::new(), generation: 0 };
                let mut ours = false;
                for attr in e.attributes().flatten() {
                    let value = attr.normalized_value(quick_xml::XmlVersion::Implicit1_0).ok()?.into_owned();
                    let key = attr.key.as_ref();
                    if key.starts_with("xmlns") {
                        ours |= value == METADATA_NS;
                        continue;
                    }
                    match attr.key.local_name().as_ref() {
                        "uid" => owner.uid = value,
                        "namespace" => owner.namespace = value,
                        "name" => owner.name = value,
                        "generation" => owner.generation = value.parse().unwrap_or(0),
                        _ => {}
                    }
                }
                if ours && !owner.uid.is_empty() {
                    return Some(owner);
                }
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

/// The CPUs and memory (KiB) a domain definition asks for, as libvirt writes them
/// back (`<vcpu>N</vcpu>`, `<memory unit='KiB'>N</memory>`).
pub fn sizing(domain_xml: &str) -> Option<(u32, u64)> {
    let mut reader = Reader::from_str(domain_xml);
    let (mut vcpus, mut memory) = (None, None);
    let mut depth = 0;
    let mut current: Option<(String, u64)> = None;
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) => {
                depth += 1;
                let name = e.local_name().as_ref().to_string();
                // Only the domain's own <vcpu> and <memory>, not nested elements.
                if depth == 2 && (name == "vcpu" || name == "memory") {
                    let mut multiplier = 1;
                    for attr in e.attributes().flatten() {
                        if attr.key.local_name().as_ref() == "unit" {
                            let unit = attr.normalized_value(quick_xml::XmlVersion::Implicit1_0).ok()?;
                            multiplier = match unit.as_ref() {
                                "KiB" | "k" | "K" => 1,
                                "MiB" | "M" => 1024,
                                "GiB" | "G" => 1024 * 1024,
                                _ => return None,
                            };
                        }
                    }
                    current = Some((name, multiplier));
                }
            }
            Event::Text(t) => {
                if let Some((name, multiplier)) = &current {
                    let value: u64 = t.xml_content(quick_xml::XmlVersion::Implicit1_0).trim().parse().ok()?;
                    match name.as_str() {
                        "vcpu" => vcpus = Some(value as u32),
                        _ => memory = Some(value * multiplier),
                    }
                }
            }
            Event::End(_) => {
                depth -= 1;
                current = None;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Some((vcpus?, memory?))
}

/// A stable MAC address for a server, unique in its pool by construction: the
/// hypervisor's prefix (Xen's 00:16:3e or QEMU's locally administered 52:54:00) and the
/// low bits of its pool address, which the scheduler hands out once per pool (23 bits
/// on Xen, whose upper half of the prefix's range is not for guests; 24 on QEMU), so
/// two servers of one pool of /9 or smaller never share a MAC. A server without an
/// address takes three bytes of its UID.
pub fn mac_address(guest: Guest, address: Option<std::net::Ipv4Addr>, uid: &str) -> String {
    let [_, a, b, c] = match address {
        Some(ip) => ip.octets(),
        None => {
            // FNV-1a: stable across releases and platforms, unlike std's hasher.
            let mut hash: u32 = 0x811c_9dc5;
            for byte in uid.bytes() {
                hash ^= u32::from(byte);
                hash = hash.wrapping_mul(0x0100_0193);
            }
            hash.to_be_bytes()
        }
    };
    if guest.is_xen() {
        format!("00:16:3e:{:02x}:{b:02x}:{c:02x}", a & 0x7f)
    } else {
        format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
    }
}

#[cfg(test)]
pub(crate) mod tests;
