//! Usage: what the host and each covi guest on it use, sampled in one bulk libvirt call
//! per interval. The pure part lives here: turning cumulative counters into rates and
//! samples into one summary per completed hour. `collect` does the I/O.

pub mod collect;
pub mod exporter;
pub mod report;

use std::collections::HashMap;

use covi_api::usage::{Stat, summarize};

/// Cumulative counters of one domain, as libvirt's domain statistics give them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DomainCounters {
    /// The domain's UUID (the server's UID).
    pub uuid: String,
    /// libvirt's domain id: it changes when the domain restarts, which resets counters.
    pub id: u32,
    /// CPU time of the whole domain (vCPUs and emulator), nanoseconds.
    pub cpu_time_ns: u64,
    /// vCPUs online.
    pub vcpus: u32,
    /// Memory in use on the host (resident set, else the balloon's current size), KiB.
    pub memory_kib: Option<u64>,
    /// Memory the guest has (balloon current, else its maximum), KiB.
    pub memory_assigned_kib: Option<u64>,
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// Cumulative CPU time and current memory of the whole host.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostCounters {
    pub cpu_busy_ns: u64,
    pub cpu_total_ns: u64,
    pub memory_used_kib: u64,
    pub memory_total_kib: u64,
}

/// One bulk collection.
#[derive(Clone, Debug, Default)]
pub struct Collection {
    /// Wall clock of the collection, seconds since the epoch.
    pub at: f64,
    pub domains: Vec<DomainCounters>,
    pub host: Option<HostCounters>,
}

/// A completed interval: the summaries of everything measured in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Completed {
    /// Hour of day (0..24) of the interval; with the default one-hour interval the
    /// UTC hour.
    pub hour: u8,
    /// End of the interval, seconds since the epoch.
    pub ended_at: f64,
    /// Per domain UUID: (CPU millicores, memory MiB, samples).
    pub domains: HashMap<String, (Stat, Stat, u32)>,
    pub host: Option<(Stat, Stat, u32)>,
}

#[derive(Default)]
struct Series {
    cpu: Vec<u32>,
    memory: Vec<u32>,
}

impl Series {
    fn summary(&self) -> (Stat, Stat, u32) {
        (summarize(&self.cpu), summarize(&self.memory), self.cpu.len() as u32)
    }
}

/// Turns successive collections into per-interval summaries. A CPU rate needs two
/// collections of the same domain run (same id, counters not going back): the first
/// collection after an agent start, a domain (re)start or a migration only sets the
/// baseline.
pub struct Tracker {
    interval_seconds: u64,
    bucket: Option<u64>,
    previous: HashMap<String, (u32, u64, f64)>,
    previous_host: Option<(HostCounters, f64)>,
    domains: HashMap<String, Series>,
    host: Series,
}

impl Tracker {
    pub fn new(interval_seconds: u64) -> Tracker {
        Tracker {
            interval_seconds: interval_seconds.max(1),
            bucket: None,
            previous: HashMap::new(),
            previous_host: None,
            domains: HashMap::new(),
            host: Series::default(),
        }
    }

    /// Adds one collection; returns the interval it closed, if its time is in a new one.
    pub fn observe(&mut self, c: &Collection) -> Option<Completed> {
        let bucket = (c.at.max(0.0) as u64) / self.interval_seconds;
        let completed = match self.bucket {
            Some(b) if b != bucket => Some(self.complete(b)),
            _ => None,
        };
        self.bucket = Some(bucket);

        let mut seen = HashMap::with_capacity(c.domains.len());
        for d in &c.domains {
            if let Some(&(id, cpu, at)) = self.previous.get(&d.uuid)
                && id == d.id
                && d.cpu_time_ns >= cpu
                && c.at > at
            {
                let cores = (d.cpu_time_ns - cpu) as f64 / 1e9 / (c.at - at);
                let series = self.domains.entry(d.uuid.clone()).or_default();
                series.cpu.push((cores * 1000.0).round() as u32);
                series.memory.push(d.memory_kib.map(|k| k.div_ceil(1024) as u32).unwrap_or(0));
            }
            seen.insert(d.uuid.clone(), (d.id, d.cpu_time_ns, c.at));
        }
        // Domains gone from the host leave no baseline: one that comes back starts anew.
        self.previous = seen;

        if let Some(h) = c.host {
            if let Some((p, at)) = self.previous_host
                && h.cpu_busy_ns >= p.cpu_busy_ns
                && c.at > at
            {
                let cores = (h.cpu_busy_ns - p.cpu_busy_ns) as f64 / 1e9 / (c.at - at);
                self.host.cpu.push((cores * 1000.0).round() as u32);
                self.host.memory.push(h.memory_used_kib.div_ceil(1024) as u32);
            }
            self.previous_host = Some((h, c.at));
        }
        completed
    }

    fn complete(&mut self, bucket: u64) -> Completed {
        let domains = self.domains.drain().filter(|(_, s)| !s.cpu.is_empty()).map(|(u, s)| (u, s.summary())).collect();
        let host = (!self.host.cpu.is_empty()).then(|| self.host.summary());
        self.host = Series::default();
        Completed { hour: (bucket % 24) as u8, ended_at: ((bucket + 1) * self.interval_seconds) as f64, domains, host }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(uuid: &str, id: u32, cpu_s: f64, mem_mib: u64) -> DomainCounters {
        DomainCounters {
            uuid: uuid.into(),
            id,
            cpu_time_ns: (cpu_s * 1e9) as u64,
            vcpus: 1,
            memory_kib: Some(mem_mib * 1024),
            ..Default::default()
        }
    }

    fn at(t: f64, domains: Vec<DomainCounters>) -> Collection {
        Collection { at: t, domains, host: None }
    }

    #[test]
    fn a_busy_and_an_idle_domain_over_one_interval() {
        let mut t = Tracker::new(60);
        // Every 10 s: "busy" adds 10 s of CPU (one core), "idle" 0.1 s.
        for i in 0..6 {
            let s = f64::from(i) * 10.0;
            let done = t.observe(&at(s, vec![domain("busy", 1, s, 512), domain("idle", 2, s / 100.0, 64)]));
            assert_eq!(done, None, "still in the first interval at {s}");
        }
        let done = t.observe(&at(60.0, vec![])).expect("the interval closed");
        assert_eq!(done.hour, 0);
        assert_eq!(done.ended_at, 60.0);
        let (cpu, memory, samples) = done.domains["busy"];
        assert_eq!((cpu.mean, cpu.p95, memory.p95, samples), (1000, 1000, 512, 5));
        assert_eq!(done.domains["idle"].0.p95, 10);
    }

    #[test]
    fn restarts_and_agent_starts_set_a_baseline_instead_of_a_rate() {
        let mut t = Tracker::new(3600);
        // The first sight of a domain (agent start, migration in) is no rate.
        t.observe(&at(0.0, vec![domain("a", 1, 5000.0, 100)]));
        t.observe(&at(10.0, vec![domain("a", 1, 5005.0, 100)]));
        // Restarted: new id and counters from zero; no negative or huge rate.
        t.observe(&at(20.0, vec![domain("a", 7, 1.0, 100)]));
        t.observe(&at(30.0, vec![domain("a", 7, 3.0, 100)]));
        // Gone and back with the same id (migrated away and back): a baseline again.
        t.observe(&at(40.0, vec![]));
        t.observe(&at(50.0, vec![domain("a", 7, 900.0, 100)]));
        let done = t.observe(&at(3600.0, vec![])).unwrap();
        let (cpu, _, samples) = done.domains["a"];
        assert_eq!(samples, 2, "only the two same-run intervals count");
        assert_eq!(cpu.p95, 500);
    }

    #[test]
    fn the_hour_of_day_follows_the_clock() {
        let mut t = Tracker::new(3600);
        let ten_past_13 = 1_800_000_000.0 - (1_800_000_000 % 86400) as f64 + 13.0 * 3600.0 + 600.0;
        t.observe(&at(ten_past_13, vec![domain("a", 1, 0.0, 1)]));
        t.observe(&at(ten_past_13 + 10.0, vec![domain("a", 1, 1.0, 1)]));
        let done = t.observe(&at(ten_past_13 + 3000.0, vec![domain("a", 1, 2.0, 1)])).unwrap();
        assert_eq!(done.hour, 13);
        assert!(done.domains.contains_key("a"));
        assert_eq!(t.observe(&at(ten_past_13 + 3010.0, vec![])), None);
    }

    #[test]
    fn the_host_rate_is_busy_time_over_wall_time() {
        let mut t = Tracker::new(100);
        let host = |busy_s: f64| HostCounters {
            cpu_busy_ns: (busy_s * 1e9) as u64,
            cpu_total_ns: 0,
            memory_used_kib: 2048 * 1024,
            memory_total_kib: 0,
        };
        t.observe(&Collection { at: 0.0, domains: vec![], host: Some(host(0.0)) });
        t.observe(&Collection { at: 10.0, domains: vec![], host: Some(host(15.0)) });
        let done = t.observe(&Collection { at: 100.0, domains: vec![], host: None }).unwrap();
        let (cpu, memory, _) = done.host.unwrap();
        assert_eq!((cpu.p95, memory.p95), (1500, 2048));
    }
}
