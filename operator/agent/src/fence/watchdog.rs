//! The fencing watchdog: a plain thread, its own libvirt connection. It wakes at the
//! fencing deadline to fence, every 100 ms while the host stays overdue, and once a
//! second to keep `/healthz` honest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Fence;
use super::link::FencingLink;

/// The fencing watchdog: a plain thread with its own libvirt connection, so neither a
/// stalled async runtime nor a busy connection can delay it. It also keeps `/healthz`
/// honest: healthy only while the agent serves and libvirt answers.
pub fn watchdog(
    link: Arc<Mutex<FencingLink>>,
    fence: Arc<Fence>,
    health: covi_daemon::Health,
    serving: Arc<AtomicBool>,
) {
    std::thread::Builder::new()
        .name("fence-watchdog".into())
        .spawn(move || {
            let mut was_reachable = true;
            loop {
                // Overdue: fence again soon (a domain may become active meanwhile).
                // Otherwise sleep until the deadline, or the next look at libvirt.
                match fence.due() {
                    true => std::thread::sleep(OVERDUE_TICK),
                    false => fence.wait_for_deadline(HEALTH_TICK),
                }
                let (reachable, shared_yet) = {
                    let mut link = link.lock().unwrap_or_else(|p| p.into_inner());
                    (link.reachable(), link.connected_or_own())
                };
                // A link waiting for the agent's connection (libvirt's test driver,
                // a fleet starting) is not yet a libvirt that went away.
                if reachable != was_reachable && shared_yet {
                    match reachable {
                        true => tracing::info!("libvirt answers again"),
                        false => tracing::error!("libvirt is unreachable; /healthz fails until it answers"),
                    }
                    was_reachable = reachable;
                }
                health.set(reachable && serving.load(Ordering::SeqCst));
                fence_if_due(&link, &fence);
            }
        })
        .expect("spawning the fencing watchdog");
}

/// How often an overdue host fences again, for domains that became active since.
const OVERDUE_TICK: Duration = Duration::from_millis(100);

/// How often the watchdog checks that libvirt answers (and reconnects) when no
/// deadline wakes it: a fleet of simulated hosts runs one watchdog each.
const HEALTH_TICK: Duration = Duration::from_secs(1);

/// How long one fencing may take before it counts as failed and is tried again: the
/// pool's margin between fenceAfter and the lease is a few seconds.
const FENCE_DEADLINE: Duration = Duration::from_secs(1);

/// Fences now if the host is overdue, and again on every call while it stays overdue
/// (a domain may have become active since); safe to call from any thread. Starts wait
/// for it: they take the same lock.
pub fn fence_if_due(link: &Mutex<FencingLink>, fence: &Fence) {
    let _held = fence.hold();
    if !fence.due() {
        return;
    }
    let first = !fence.is_fenced();
    let since = fence.since_renewal();
    match link.lock().unwrap_or_else(|p| p.into_inner()).fence(FENCE_DEADLINE) {
        // Overdue before this process ever renewed, and no covi domain here: nothing to
        // fence, and nothing starts before a renewal anyway (a fleet starting against
        // a busy API server would otherwise report thousands of empty fencings). A
        // domain that appears meanwhile (an incoming migration) is fenced on the next
        // tick, still overdue.
        Ok(0) if !fence.renewed_once() => {}
        Ok(n) => {
            fence.set_fenced(true);
            if first || n > 0 {
                tracing::warn!(
                    destroyed = n,
                    ?since,
                    "no lease renewal within fenceAfter: fenced, every covi domain destroyed"
                );
            }
        }
        Err(e) => tracing::error!(error = %e, "fencing failed; retrying"),
    }
}
