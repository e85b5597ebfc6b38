//! What a server or host actually uses, as its agent measured it: the last completed
//! interval ("hour") and a compact daily profile, hour of day by hour of day.
//!
//! The agent samples every domain in one bulk libvirt call every few seconds, keeps
//! the samples of the current hour in memory, and writes this status once per hour
//! per server: the write rate stays one per server per hour at any fleet size. Live
//! values are the agent's Prometheus metrics.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Days of hourly values each profile bucket keeps.
pub const PROFILE_DAYS: usize = 7;

/// Measured use of a server (or a host), written by the agent that runs it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// End of the last completed interval this describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at: Option<Time>,
    /// Length of an interval in seconds (3600 but in test beds).
    #[serde(default)]
    pub interval_seconds: u32,
    /// The host that measured the last interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Samples the last interval is made of.
    #[serde(default)]
    pub samples: u32,
    /// CPU in the last interval, in millicores (1000 = one CPU busy all the time).
    #[serde(default)]
    pub cpu: Stat,
    /// Memory in use (resident) in the last interval, in MiB.
    #[serde(default)]
    pub memory: Stat,
    /// The daily profile: for each hour of day (UTC) that has been measured, the 95th
    /// percentile of that hour's samples on each of the last days, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 24))]
    pub profile: Vec<HourProfile>,
}

/// Mean and 95th percentile of one interval's samples.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stat {
    pub mean: u32,
    pub p95: u32,
}

/// One hour of day of the profile.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HourProfile {
    /// Hour of day, 0 to 23 (UTC).
    #[schemars(range(max = 23))]
    pub hour: u8,
    /// p95 CPU of this hour in millicores, one value per day, newest first.
    #[schemars(length(max = 7))]
    pub cpu: Vec<u32>,
    /// p95 memory of this hour in MiB, one value per day, newest first.
    #[schemars(length(max = 7))]
    pub memory: Vec<u32>,
}

impl HourProfile {
    /// The demand this hour plans with: the highest daily p95 kept.
    pub fn peak(&self) -> (u32, u32) {
        (self.cpu.iter().copied().max().unwrap_or(0), self.memory.iter().copied().max().unwrap_or(0))
    }
}

impl Usage {
    /// The profile with one more completed hour: that hour's values go first in its
    /// bucket and the oldest day beyond `PROFILE_DAYS` drops out. Buckets stay sorted
    /// by hour.
    pub fn record_hour(&mut self, hour: u8, cpu_p95: u32, memory_p95: u32) {
        let bucket = match self.profile.iter().position(|h| h.hour == hour) {
            Some(i) => &mut self.profile[i],
            None => {
                self.profile.push(HourProfile { hour, ..Default::default() });
                self.profile.sort_by_key(|h| h.hour);
                let i = self.profile.iter().position(|h| h.hour == hour).expect("just added");
                &mut self.profile[i]
            }
        };
        bucket.cpu.insert(0, cpu_p95);
        bucket.memory.insert(0, memory_p95);
        bucket.cpu.truncate(PROFILE_DAYS);
        bucket.memory.truncate(PROFILE_DAYS);
    }
}

/// Mean and p95 (nearest rank) of samples; zeros for none.
pub fn summarize(samples: &[u32]) -> Stat {
    if samples.is_empty() {
        return Stat::default();
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (sorted.len() * 95).div_ceil(100).max(1);
    let sum: u64 = sorted.iter().map(|&v| u64::from(v)).sum();
    Stat { mean: (sum / sorted.len() as u64) as u32, p95: sorted[rank - 1] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_the_nearest_rank_and_mean_is_the_average() {
        let samples: Vec<u32> = (1..=100).collect();
        assert_eq!(summarize(&samples), Stat { mean: 50, p95: 95 });
        assert_eq!(summarize(&[7]), Stat { mean: 7, p95: 7 });
        assert_eq!(summarize(&[]), Stat::default());
        // One spike in twenty samples is above the 95th percentile.
        let mut spiky = vec![100; 19];
        spiky.push(4000);
        assert_eq!(summarize(&spiky).p95, 100);
    }

    #[test]
    fn each_hour_keeps_the_last_days_newest_first() {
        let mut u = Usage::default();
        u.record_hour(13, 500, 100);
        u.record_hour(2, 50, 90);
        for day in 0..PROFILE_DAYS as u32 + 2 {
            u.record_hour(13, 600 + day, 110);
        }
        let hours: Vec<u8> = u.profile.iter().map(|h| h.hour).collect();
        assert_eq!(hours, [2, 13], "sorted by hour");
        let thirteen = &u.profile[1];
        assert_eq!(thirteen.cpu.len(), PROFILE_DAYS);
        assert_eq!(thirteen.cpu[0], 600 + PROFILE_DAYS as u32 + 1, "newest first");
        assert!(!thirteen.cpu.contains(&500), "the oldest day dropped out");
        assert_eq!(thirteen.peak(), (608, 110));
    }
}
