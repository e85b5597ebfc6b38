//! The bulk collection: `virConnectGetAllDomainStats` for every running domain in one
//! call, and the node's CPU and memory statistics. The `virt` crate's wrapper of the
//! bulk call frees the record list with the wrong function and reads no field, so this
//! calls libvirt directly and frees with `virDomainStatsRecordListFree`.

use std::ffi::{CStr, c_char, c_int, c_uint};
use std::ptr;

use virt::connect::Connect;
use virt::sys;

use super::{Collection, DomainCounters, HostCounters};
use crate::error::Result;

/// The statistics groups asked for: state, CPU, balloon (memory), vCPUs, interfaces
/// and block devices; only running domains.
const GROUPS: c_uint = sys::VIR_DOMAIN_STATS_STATE
    | sys::VIR_DOMAIN_STATS_CPU_TOTAL
    | sys::VIR_DOMAIN_STATS_BALLOON
    | sys::VIR_DOMAIN_STATS_VCPU
    | sys::VIR_DOMAIN_STATS_INTERFACE
    | sys::VIR_DOMAIN_STATS_BLOCK;

/// Collects every running domain's counters and the host's, now.
pub fn collect(conn: &Connect, at: f64) -> Result<Collection> {
    let domains = domain_stats(conn)?;
    // Not every driver reports node statistics (the test driver does not).
    let host = host_counters(conn);
    Ok(Collection { at, domains, host })
}

fn domain_stats(conn: &Connect) -> Result<Vec<DomainCounters>> {
    let mut records: *mut sys::virDomainStatsRecordPtr = ptr::null_mut();
    let n = unsafe {
        sys::virConnectGetAllDomainStats(
            conn.as_ptr(),
            GROUPS,
            &mut records,
            sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE,
        )
    };
    if n < 0 {
        return Err(virt::error::Error::last_error().into());
    }
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: libvirt returned `n` valid records; they live until the list is freed below.
        let record = unsafe { &**records.add(i) };
        let mut uuid = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
        if unsafe { sys::virDomainGetUUIDString(record.dom, uuid.as_mut_ptr()) } != 0 {
            continue;
        }
        let id = unsafe { sys::virDomainGetID(record.dom) };
        let params = if record.params.is_null() || record.nparams <= 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(record.params, record.nparams as usize) }
        };
        let mut d = DomainCounters {
            uuid: unsafe { CStr::from_ptr(uuid.as_ptr()) }.to_string_lossy().into_owned(),
            id: if id == u32::MAX { 0 } else { id },
            ..Default::default()
        };
        let (mut rss, mut balloon, mut maximum) = (None, None, None);
        for p in params {
            let field = unsafe { CStr::from_ptr(p.field.as_ptr()) }.to_bytes();
            let Some(value) = number(p) else { continue };
            match field {
                b"cpu.time" => d.cpu_time_ns = value,
                b"vcpu.current" => d.vcpus = value as u32,
                b"balloon.rss" => rss = Some(value),
                b"balloon.current" => balloon = Some(value),
                b"balloon.maximum" => maximum = Some(value),
                f if f.starts_with(b"block.") && f.ends_with(b".rd.bytes") => d.block_read_bytes += value,
                f if f.starts_with(b"block.") && f.ends_with(b".wr.bytes") => d.block_write_bytes += value,
                f if f.starts_with(b"net.") && f.ends_with(b".rx.bytes") => d.net_rx_bytes += value,
                f if f.starts_with(b"net.") && f.ends_with(b".tx.bytes") => d.net_tx_bytes += value,
                _ => {}
            }
        }
        d.memory_kib = rss.or(balloon);
        d.memory_assigned_kib = balloon.or(maximum);
        out.push(d);
    }
    unsafe { sys::virDomainStatsRecordListFree(records) };
    Ok(out)
}

/// A numeric typed parameter's value.
fn number(p: &sys::virTypedParameter) -> Option<u64> {
    // SAFETY: the union member read is the one `type_` names.
    unsafe {
        match p.type_ as u32 {
            sys::VIR_TYPED_PARAM_ULLONG => Some(p.value.ul),
            sys::VIR_TYPED_PARAM_LLONG => u64::try_from(p.value.l).ok(),
            sys::VIR_TYPED_PARAM_UINT => Some(u64::from(p.value.ui)),
            sys::VIR_TYPED_PARAM_INT => u64::try_from(p.value.i).ok(),
            _ => None,
        }
    }
}

/// The host's cumulative CPU time (busy and total) and memory, from libvirt's node
/// statistics (on Linux hosts: /proc/stat and /proc/meminfo of the hypervisor host).
fn host_counters(conn: &Connect) -> Option<HostCounters> {
    let cpu = node_stats(|params, n| unsafe {
        sys::virNodeGetCPUStats(conn.as_ptr(), sys::VIR_NODE_CPU_STATS_ALL_CPUS, params, n, 0)
    })?;
    let memory = node_stats(|params, n| unsafe {
        sys::virNodeGetMemoryStats(
            conn.as_ptr(),
            sys::VIR_NODE_MEMORY_STATS_ALL_CELLS,
            params as *mut sys::virNodeMemoryStats,
            n,
            0,
        )
    })?;
    let get = |list: &[(String, u64)], name: &str| list.iter().find(|(f, _)| f == name).map(|(_, v)| *v);
    let idle = get(&cpu, "idle")? + get(&cpu, "iowait").unwrap_or(0);
    let busy = get(&cpu, "kernel").unwrap_or(0) + get(&cpu, "user").unwrap_or(0);
    let total = get(&memory, "total")?;
    let available =
        get(&memory, "free").unwrap_or(0) + get(&memory, "buffers").unwrap_or(0) + get(&memory, "cached").unwrap_or(0);
    Some(HostCounters {
        cpu_busy_ns: busy,
        cpu_total_ns: busy + idle,
        memory_used_kib: total.saturating_sub(available),
        memory_total_kib: total,
    })
}

/// Calls a `virNodeGet*Stats` function twice (the count, then the values); the two
/// structs have the same layout (a field name and an unsigned long long).
fn node_stats(call: impl Fn(*mut sys::virNodeCPUStats, *mut c_int) -> c_int) -> Option<Vec<(String, u64)>> {
    let mut n: c_int = 0;
    if call(ptr::null_mut(), &mut n) < 0 || n <= 0 {
        virt::error::clear_error_callback();
        return None;
    }
    let mut params: Vec<sys::virNodeCPUStats> =
        (0..n).map(|_| sys::virNodeCPUStats { field: [0; 80], value: 0 }).collect();
    if call(params.as_mut_ptr(), &mut n) < 0 {
        return None;
    }
    Some(
        params
            .iter()
            .take(n as usize)
            .map(|p| (unsafe { CStr::from_ptr(p.field.as_ptr()) }.to_string_lossy().into_owned(), p.value))
            .collect(),
    )
}
