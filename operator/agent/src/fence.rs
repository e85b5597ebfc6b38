//! Self-fencing: a host that cannot renew its Lease for `fenceAfter` (by its own
//! monotonic clock) destroys every covi domain before the operator, which waits
//! `leaseDuration + grace` by its clock, may restart them elsewhere. It starts nothing
//! again until it reaches the API and has removed domains now bound elsewhere.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Whether a host that last renewed `since` ago must fence itself.
pub fn overdue(since: Duration, fence_after: Duration) -> bool {
    since >= fence_after
}

/// The fencing state shared by the lease loop, the watchdog and every reconcile.
pub struct Fence {
    last_renewal: Mutex<Instant>,
    fence_after_ms: AtomicU64,
    fenced: AtomicBool,
    /// Whether any renewal succeeded since this process started: until then the host
    /// may have been declared lost (and its servers restarted elsewhere) while no agent
    /// ran here, so it starts nothing.
    renewed_once: AtomicBool,
}

impl Fence {
    /// Counting starts now, as if the agent had just renewed: a host that never
    /// reaches the API after starting fences `fence_after` later.
    pub fn new(fence_after: Duration) -> Fence {
        Fence {
            last_renewal: Mutex::new(Instant::now()),
            fence_after_ms: AtomicU64::new(fence_after.as_millis() as u64),
            fenced: AtomicBool::new(false),
            renewed_once: AtomicBool::new(false),
        }
    }

    /// Records a successful renewal whose request started at `started`.
    pub fn renewed(&self, started: Instant) {
        self.renewed_once.store(true, Ordering::SeqCst);
        let mut last = self.last_renewal.lock().expect("fence lock");
        if started > *last {
            *last = started;
        }
    }

    pub fn set_fence_after(&self, d: Duration) {
        self.fence_after_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn fence_after(&self) -> Duration {
        Duration::from_millis(self.fence_after_ms.load(Ordering::Relaxed))
    }

    pub fn since_renewal(&self) -> Duration {
        self.last_renewal.lock().expect("fence lock").elapsed()
    }

    /// The host must fence now: overdue and not fenced yet.
    pub fn due(&self) -> bool {
        !self.is_fenced() && overdue(self.since_renewal(), self.fence_after())
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::SeqCst);
    }

    /// Whether the agent may start domains: not fenced and not overdue.
    pub fn may_start(&self) -> bool {
        self.renewed_once.load(Ordering::SeqCst)
            && !self.is_fenced()
            && !overdue(self.since_renewal(), self.fence_after())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_only_once_overdue() {
        assert!(!overdue(Duration::from_millis(5999), Duration::from_secs(6)));
        assert!(overdue(Duration::from_secs(6), Duration::from_secs(6)));
    }

    #[test]
    fn a_fresh_renewal_keeps_the_host_running() {
        let fence = Fence::new(Duration::from_millis(50));
        fence.renewed(Instant::now());
        assert!(fence.may_start() && !fence.due());
        std::thread::sleep(Duration::from_millis(60));
        assert!(fence.due() && !fence.may_start());
        fence.renewed(Instant::now());
        assert!(!fence.due() && fence.may_start());
    }

    #[test]
    fn a_fenced_host_starts_nothing_until_cleared() {
        let fence = Fence::new(Duration::from_secs(6));
        fence.set_fenced(true);
        fence.renewed(Instant::now());
        assert!(!fence.may_start() && !fence.due());
        fence.set_fenced(false);
        assert!(fence.may_start());
    }

    #[test]
    fn an_old_renewal_never_moves_the_clock_back() {
        let fence = Fence::new(Duration::from_secs(6));
        let earlier = Instant::now();
        fence.renewed(Instant::now());
        let before = fence.since_renewal();
        fence.renewed(earlier);
        assert!(fence.since_renewal() >= before);
    }

    #[test]
    fn a_new_process_starts_nothing_before_its_first_renewal() {
        let fence = Fence::new(Duration::from_secs(60));
        assert!(!fence.may_start(), "the host may have been lost while no agent ran");
        assert!(!fence.due(), "nor does it fence a host it just started on");
        fence.renewed(Instant::now());
        assert!(fence.may_start());
    }
}
