//! Self-fencing, all of it: the state and decisions here (pure), the watchdog's own
//! libvirt connection in [`link`], and the watchdog thread that acts in [`watchdog`].
//!
//! A host that cannot renew its Lease for `fenceAfter` (by its own
//! monotonic clock) destroys every covi domain before the operator, which waits
//! `leaseDuration + grace` by its clock, may restart them elsewhere. It keeps
//! destroying whatever becomes active while it is overdue (an incoming live migration,
//! a start that raced the deadline), and starts nothing again until it reaches the API
//! and has removed domains now bound elsewhere.

pub mod link;
pub mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Whether a host that last renewed `since` ago must fence itself.
pub fn overdue(since: Duration, fence_after: Duration) -> bool {
    since >= fence_after
}

/// Whether a host may start domains: its agent renewed since it started
/// (`renewed_once`), it is not fenced, and its last renewal was less than
/// `fence_after` ago (`since`).
pub fn may_start(renewed_once: bool, fenced: bool, since: Duration, fence_after: Duration) -> bool {
    renewed_once && !fenced && !overdue(since, fence_after)
}

/// Whether a start announced on its server (`status.lastStart`) when the host had had
/// `announced` gaps in its renewals may go ahead now that it has had `gaps`: only if
/// none came between. The announcement is a write on the server's version the start
/// was decided on, so a failover decided on an older version is refused; one decided
/// on a newer version read the host's Lease after the announcement, and can judge the
/// host lost only after a gap that followed it. `None`: nothing was announced (a server
/// the operator never fails over).
pub fn announcement_holds(announced: Option<u64>, gaps: u64) -> bool {
    announced.is_none_or(|a| a == gaps)
}

/// When the agent's cache of its servers was last listed, by the host's standing then:
/// the watch's Init (sent before its list) records the standing, its InitDone (the list
/// in the cache) makes it the cache's. Until then, and during a relist, nothing is
/// vouched for.
#[derive(Default)]
pub struct Listing {
    pending: Mutex<Option<u64>>,
    current: Mutex<Option<u64>>,
}

impl Listing {
    /// A list is about to be sent.
    pub fn init(&self, fence: &Fence) {
        *self.current.lock().expect("listing lock") = None;
        *self.pending.lock().expect("listing lock") = fence.standing();
    }

    /// The list is in the cache.
    pub fn init_done(&self) {
        let pending = self.pending.lock().expect("listing lock").take();
        *self.current.lock().expect("listing lock") = pending;
    }

    /// The standing the cache was listed at, if it vouches for anything.
    pub fn listed(&self) -> Option<u64> {
        *self.current.lock().expect("listing lock")
    }
}

/// The fencing state shared by the lease loop, the watchdog and every reconcile.
pub struct Fence {
    last_renewal: Mutex<Instant>,
    /// Wakes a watchdog waiting for the deadline ([`Fence::wait_for_deadline`]) when it
    /// may have come nearer: a shorter fenceAfter, an older renewal carried over.
    deadline_moved: Condvar,
    fence_after_ms: AtomicU64,
    /// The fenceAfter a previous agent process recorded on the Lease: it holds until
    /// this process renews, so a restart inside a graceful stop's window is not overdue
    /// by the pool's shorter timings.
    carried_ms: AtomicU64,
    fenced: AtomicBool,
    /// Whether any renewal succeeded since this process started: until then the host
    /// may have been declared lost (and its servers restarted elsewhere) while no agent
    /// ran here, so it starts nothing.
    renewed_once: AtomicBool,
    /// Turns true with the first renewal of this process.
    first_renewal: tokio::sync::watch::Sender<bool>,
    /// Gaps in the renewals so far: fencings, and renewals that came after the host was
    /// overdue. The host may have been judged lost in any of them.
    gaps: AtomicU64,
    /// Held while fencing, and across a start's last check and the start itself: a
    /// start never slips in between the deadline and the destroy.
    acting: Mutex<()>,
}

impl Fence {
    /// Counting starts now, as if the agent had just renewed: a host that never
    /// reaches the API after starting fences `fence_after` later.
    pub fn new(fence_after: Duration) -> Fence {
        Fence {
            last_renewal: Mutex::new(Instant::now()),
            deadline_moved: Condvar::new(),
            fence_after_ms: AtomicU64::new(fence_after.as_millis() as u64),
            carried_ms: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            renewed_once: AtomicBool::new(false),
            first_renewal: tokio::sync::watch::Sender::new(false),
            gaps: AtomicU64::new(0),
            acting: Mutex::new(()),
        }
    }

    /// Takes over the deadline of the agent process before this one: its last renewal
    /// was `age` ago and it promised to fence after `fence_after`. Overdue already (it
    /// crashed, or a graceful stop outlasted its window): the watchdog fences at once.
    pub fn carry_over(&self, age: Duration, fence_after: Duration) {
        // A renewal older than the machine's monotonic clock predates a reboot, which
        // no guest outlived: nothing to carry over then.
        if let Some(then) = Instant::now().checked_sub(age) {
            *self.last_renewal.lock().expect("fence lock") = then;
        }
        self.carried_ms.store(fence_after.as_millis() as u64, Ordering::SeqCst);
        self.deadline_may_be_nearer();
    }

    /// Records a successful renewal whose request started at `started`.
    pub fn renewed(&self, started: Instant) {
        let mut last = self.last_renewal.lock().expect("fence lock");
        // Overdue at some point before this answer came (by the deadline in force until
        // now): a gap, even if the watchdog did not get to fence in it.
        if overdue(last.elapsed(), self.fence_after()) {
            self.gaps.fetch_add(1, Ordering::SeqCst);
        }
        if !self.renewed_once.swap(true, Ordering::SeqCst) {
            self.first_renewal.send_replace(true);
        }
        // Ending a predecessor's longer window may bring the deadline nearer.
        let carried = self.carried_ms.swap(0, Ordering::SeqCst);
        if started > *last {
            *last = started;
        }
        drop(last);
        if carried != 0 {
            self.deadline_may_be_nearer();
        }
    }

    pub fn set_fence_after(&self, d: Duration) {
        let before = self.fence_after_ms.swap(d.as_millis() as u64, Ordering::SeqCst);
        if d.as_millis() as u64 != before {
            self.deadline_may_be_nearer();
        }
    }

    /// Wakes a watchdog waiting for the old deadline, to wait for the new one.
    fn deadline_may_be_nearer(&self) {
        // Taking the lock orders this after the waiter's look at the deadline: it is
        // either waiting (and woken) or has not looked yet (and sees the change).
        drop(self.last_renewal.lock().expect("fence lock"));
        self.deadline_moved.notify_all();
    }

    /// Waits until the host is due to fence, or `at_most`, whichever comes first; at
    /// once when it is due already. A change of the deadline wakes it early (the caller
    /// looks again), so it never sleeps past a deadline that came nearer.
    pub fn wait_for_deadline(&self, at_most: Duration) {
        let last = self.last_renewal.lock().expect("fence lock");
        let left = self.fence_after().saturating_sub(last.elapsed());
        if left.is_zero() {
            return;
        }
        let _ = self.deadline_moved.wait_timeout(last, left.min(at_most)).expect("fence lock");
    }

    /// The pool's fenceAfter, or a previous process's longer one until this one renews.
    pub fn fence_after(&self) -> Duration {
        let own = self.fence_after_ms.load(Ordering::SeqCst);
        Duration::from_millis(own.max(self.carried_ms.load(Ordering::SeqCst)))
    }

    pub fn since_renewal(&self) -> Duration {
        self.last_renewal.lock().expect("fence lock").elapsed()
    }

    /// The host must fence now: overdue. Fencing repeats for as long as this holds.
    pub fn due(&self) -> bool {
        overdue(self.since_renewal(), self.fence_after())
    }

    /// Whether any renewal succeeded since this process started.
    pub fn renewed_once(&self) -> bool {
        self.renewed_once.load(Ordering::SeqCst)
    }

    /// Returns once a renewal of this process has succeeded.
    pub async fn first_renewal(&self) {
        let mut renewed = self.first_renewal.subscribe();
        let _ = renewed.wait_for(|r| *r).await;
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    pub fn set_fenced(&self, fenced: bool) {
        if fenced {
            self.gaps.fetch_add(1, Ordering::SeqCst);
        }
        self.fenced.store(fenced, Ordering::SeqCst);
    }

    /// Where the host stands now, for a list of its servers about to be sent: the
    /// count of gaps so far if it renewed in this process and is neither fenced nor
    /// overdue, None otherwise.
    pub fn standing(&self) -> Option<u64> {
        let gaps = self.gaps.load(Ordering::SeqCst);
        (self.renewed_once() && !self.is_fenced() && !self.due()).then_some(gaps)
    }

    /// Whether a cache filled by a consistent list sent when the host stood at `listed`
    /// ([`Fence::standing`]), and kept up by its watch, suffices to start a server it
    /// shows bound here, without reading the server fresh: the host has had no gap in
    /// its renewals since. The operator restarts a server elsewhere only after judging
    /// its host lost, which needs such a gap (the host fences first), and a list sent
    /// after the host's first renewal shows every restart judged before it. Moves are
    /// no exception: the watch shows them in order, and the source acts on each step.
    pub fn cache_suffices(&self, listed: Option<u64>) -> bool {
        listed == Some(self.gaps.load(Ordering::SeqCst))
    }

    /// Whether the agent may start domains: renewed in this process, not fenced, not
    /// overdue.
    pub fn may_start(&self) -> bool {
        may_start(self.renewed_once.load(Ordering::SeqCst), self.is_fenced(), self.since_renewal(), self.fence_after())
    }

    /// Gaps in the renewals so far (fencings, renewals that came overdue).
    pub fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::SeqCst)
    }

    /// Runs `start` only if the agent may start and a start announced when the host
    /// had had `announced` gaps still holds ([`announcement_holds`]), holding the
    /// fencing lock across the checks and the start; `None` when it may not.
    pub fn start_if_allowed<T>(&self, announced: Option<u64>, start: impl FnOnce() -> T) -> Option<T> {
        let _held = self.hold();
        (self.may_start() && announcement_holds(announced, self.gaps())).then(start)
    }

    /// The fencing lock: the watchdog holds it while it destroys.
    pub fn hold(&self) -> MutexGuard<'_, ()> {
        self.acting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

    /// The watchdog waits for the deadline (up to its health tick, 30 s here): it must
    /// wake by then, also when the deadline came nearer while it waited.
    #[test]
    fn a_watchdog_waiting_for_the_deadline_wakes_by_it() {
        let waiter = |fence: &std::sync::Arc<Fence>| {
            let fence = fence.clone();
            std::thread::spawn(move || {
                let waiting = Instant::now();
                while !fence.due() {
                    fence.wait_for_deadline(Duration::from_secs(30));
                }
                waiting.elapsed()
            })
        };
        let fence = std::sync::Arc::new(Fence::new(Duration::from_millis(200)));
        fence.renewed(Instant::now());
        let waited = waiter(&fence).join().unwrap();
        assert!(fence.due() && waited < Duration::from_secs(10), "woke after {waited:?}");

        // A shorter fenceAfter from the pool.
        let fence = std::sync::Arc::new(Fence::new(Duration::from_secs(60)));
        fence.renewed(Instant::now());
        let waiting = waiter(&fence);
        std::thread::sleep(Duration::from_millis(100));
        fence.set_fence_after(Duration::from_millis(200));
        let waited = waiting.join().unwrap();
        assert!(waited < Duration::from_secs(10), "woke after {waited:?}, not at the nearer deadline");

        // A predecessor's last renewal, older than this process's start.
        let fence = std::sync::Arc::new(Fence::new(Duration::from_secs(20)));
        let waiting = waiter(&fence);
        std::thread::sleep(Duration::from_millis(100));
        fence.carry_over(Duration::from_secs(30), Duration::from_secs(6));
        let waited = waiting.join().unwrap();
        assert!(waited < Duration::from_secs(10), "woke after {waited:?}, not at the carried deadline");
    }

    #[test]
    fn a_cache_listed_in_good_standing_suffices_until_a_gap() {
        let fence = Fence::new(Duration::from_secs(6));
        let listing = Listing::default();
        let relist = |fence: &Fence| {
            listing.init(fence);
            listing.init_done();
        };
        // Listed before this process renewed: the host may have been judged lost
        // while no agent ran, so the list vouches for nothing.
        relist(&fence);
        fence.renewed(Instant::now());
        assert!(!fence.cache_suffices(listing.listed()));
        // Listed after: it suffices; a relist vouches for nothing until its list is in.
        relist(&fence);
        assert!(fence.cache_suffices(listing.listed()));
        listing.init(&fence);
        assert!(!fence.cache_suffices(listing.listed()), "a relist under way");
        listing.init_done();
        assert!(fence.cache_suffices(listing.listed()));
        // A renewal answered after the host was overdue (its last one 7 s ago, with
        // fenceAfter 6 s) closes a gap, fenced or not.
        fence.carry_over(Duration::from_secs(7), Duration::from_secs(6));
        fence.renewed(Instant::now());
        assert!(fence.may_start() && !fence.cache_suffices(listing.listed()));
        // A fencing is a gap, though the next renewal comes in time.
        relist(&fence);
        assert!(fence.cache_suffices(listing.listed()));
        fence.set_fenced(true);
        fence.renewed(Instant::now());
        fence.set_fenced(false);
        assert!(fence.may_start() && !fence.cache_suffices(listing.listed()));
        // A list sent while fenced vouches for nothing, even once the fencing is over.
        fence.set_fenced(true);
        relist(&fence);
        fence.set_fenced(false);
        assert!(fence.may_start() && !fence.cache_suffices(listing.listed()));
    }

    #[test]
    fn a_fenced_host_starts_nothing_until_cleared() {
        let fence = Fence::new(Duration::from_secs(6));
        fence.set_fenced(true);
        fence.renewed(Instant::now());
        assert!(!fence.may_start() && !fence.due());
        assert_eq!(fence.start_if_allowed(None, || "started"), None);
        fence.set_fenced(false);
        assert!(fence.may_start());
        assert_eq!(fence.start_if_allowed(None, || "started"), Some("started"));
    }

    #[test]
    fn an_announced_start_goes_ahead_only_without_a_gap_since() {
        let fence = Fence::new(Duration::from_millis(20));
        fence.renewed(Instant::now());
        let announced = Some(fence.gaps());
        assert_eq!(fence.start_if_allowed(announced, || "started"), Some("started"));
        // Overdue after the announcement, then renewed: a failover may have been
        // judged in between, on the version the announcement wrote.
        std::thread::sleep(Duration::from_millis(30));
        fence.renewed(Instant::now());
        assert!(fence.may_start());
        assert_eq!(fence.start_if_allowed(announced, || "started"), None);
        assert_eq!(fence.start_if_allowed(Some(fence.gaps()), || "started"), Some("started"));
        assert_eq!(fence.start_if_allowed(None, || "started"), Some("started"), "nothing announced: not checked");
    }

    #[test]
    fn an_overdue_host_keeps_fencing_until_it_renews() {
        let fence = Fence::new(Duration::from_millis(20));
        fence.renewed(Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        assert!(fence.due());
        fence.set_fenced(true);
        assert!(fence.due(), "a domain that became active since must be destroyed too");
        fence.renewed(Instant::now());
        assert!(!fence.due());
    }

    #[test]
    fn a_start_waits_for_a_fencing_in_progress() {
        let fence = std::sync::Arc::new(Fence::new(Duration::from_millis(50)));
        fence.renewed(Instant::now());
        let held = fence.hold();
        let starter = {
            let fence = fence.clone();
            std::thread::spawn(move || fence.start_if_allowed(None, || "started"))
        };
        // The deadline passes while the watchdog holds the lock: the waiting start,
        // checked after the lock is released, is refused.
        std::thread::sleep(Duration::from_millis(60));
        fence.set_fenced(true);
        drop(held);
        assert_eq!(starter.join().unwrap(), None);
    }

    #[test]
    fn a_restarted_agent_inherits_its_predecessors_deadline() {
        // Stopped gracefully 60 s ago with a 126 s window: not overdue, though the
        // pool fences after 6 s.
        let fence = Fence::new(Duration::from_secs(6));
        fence.carry_over(Duration::from_secs(60), Duration::from_secs(126));
        assert!(!fence.due());
        assert!(fence.since_renewal() >= Duration::from_secs(60));
        // Crashed 30 s ago, promising 6 s: fence at once.
        let fence = Fence::new(Duration::from_secs(6));
        fence.carry_over(Duration::from_secs(30), Duration::from_secs(6));
        assert!(fence.due());
        // The first renewal of the new process ends the inherited window.
        let fence = Fence::new(Duration::from_secs(6));
        fence.carry_over(Duration::from_secs(60), Duration::from_secs(126));
        fence.renewed(Instant::now());
        assert_eq!(fence.fence_after(), Duration::from_secs(6));
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
