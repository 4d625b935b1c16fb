//! When to sync: kube-proxy's bounded-frequency rule (`--min-sync-period`) as a token bucket.
//!
//! An idle proxy syncs a change at once; a burst of changes is coalesced into at most one sync
//! per `min_interval` after the first `BURST` syncs. The health state records the oldest change
//! not yet synced, which is what kube-proxy's `/healthz` judges.

use std::time::{Duration, Instant, SystemTime};

/// Syncs allowed back to back before the minimum interval applies (kube-proxy uses 2).
pub const BURST: f64 = 2.0;

#[derive(Debug)]
pub struct SyncRunner {
    min_interval: Duration,
    tokens: f64,
    refilled_at: Instant,
    pending_since: Option<Instant>,
}

impl SyncRunner {
    pub fn new(min_interval: Duration, now: Instant) -> Self {
        Self { min_interval, tokens: BURST, refilled_at: now, pending_since: None }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at);
        self.refilled_at = now;
        if self.min_interval.is_zero() {
            self.tokens = BURST;
        } else {
            self.tokens = (self.tokens + elapsed.as_secs_f64() / self.min_interval.as_secs_f64()).min(BURST);
        }
    }

    /// A change arrived that the maps do not have yet.
    pub fn queue(&mut self, now: Instant) {
        self.pending_since.get_or_insert(now);
    }

    pub fn pending_since(&self) -> Option<Instant> {
        self.pending_since
    }

    /// When the pending change may be synced: `None` when nothing is pending.
    pub fn next_sync(&mut self, now: Instant) -> Option<Instant> {
        self.pending_since?;
        self.refill(now);
        if self.tokens >= 1.0 {
            return Some(now);
        }
        Some(now + self.min_interval.mul_f64(1.0 - self.tokens))
    }

    /// A sync ran (it covered everything queued before it started).
    pub fn synced(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
        self.pending_since = None;
    }
}

/// What `/healthz` and `/livez` report, in kube-proxy's terms.
#[derive(Debug, Clone)]
pub struct HealthState {
    /// When the maps last matched the source.
    pub last_updated: Option<SystemTime>,
    /// The oldest change not yet in the maps (wall clock, for the report).
    pub oldest_pending: Option<SystemTime>,
    /// False while this node is being deleted: load balancers should stop sending here.
    pub node_eligible: bool,
    /// A queued change older than this makes the proxy unhealthy (2 x sync period).
    pub timeout: Duration,
    /// Since when the source has been unreachable (API server watches failing): the data path
    /// serves the state it last got, which may be stale. `None` while it is reachable.
    pub source_stale_since: Option<SystemTime>,
}

impl HealthState {
    pub fn new(timeout: Duration) -> Self {
        // Starting counts as a queued change: unhealthy if the first sync never happens.
        Self {
            last_updated: None,
            oldest_pending: Some(SystemTime::now()),
            node_eligible: true,
            timeout,
            source_stale_since: None,
        }
    }

    pub fn healthy(&self, now: SystemTime) -> bool {
        // Before the first sync, waiting on an API server that cannot be reached: healthy, as
        // kube-proxy is before its first sync (it queues nothing until its informers have
        // synced). A restart would not bring the server back; the pinned data path serves.
        if self.last_updated.is_none() && self.source_stale_since.is_some() {
            return true;
        }
        match self.oldest_pending {
            None => true,
            Some(queued) => now.duration_since(queued).unwrap_or_default() < self.timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_idle_runner_syncs_at_once_and_a_burst_is_bounded() {
        let start = Instant::now();
        let mut runner = SyncRunner::new(1000 * MS, start);
        assert_eq!(runner.next_sync(start), None, "nothing pending");
        runner.queue(start);
        assert_eq!(runner.next_sync(start), Some(start));
        runner.synced(start);
        runner.queue(start + MS);
        assert_eq!(runner.next_sync(start + MS), Some(start + MS), "second of the burst");
        runner.synced(start + MS);
        runner.queue(start + 2 * MS);
        let next = runner.next_sync(start + 2 * MS).unwrap();
        assert!(next > start + 900 * MS && next <= start + 1001 * MS, "{:?}", next - start);
        // Long idle: the bucket is full again.
        let later = start + 10_000 * MS;
        runner.synced(next);
        runner.queue(later);
        assert_eq!(runner.next_sync(later), Some(later));
    }

    #[test]
    fn zero_min_interval_never_waits() {
        let start = Instant::now();
        let mut runner = SyncRunner::new(Duration::ZERO, start);
        for i in 0..5 {
            runner.queue(start + i * MS);
            assert_eq!(runner.next_sync(start + i * MS), Some(start + i * MS));
            runner.synced(start + i * MS);
        }
    }

    #[test]
    fn health_turns_bad_when_a_change_waits_too_long() {
        let mut health = HealthState::new(Duration::from_secs(60));
        let now = SystemTime::now();
        assert!(health.healthy(now));
        health.oldest_pending = Some(now - Duration::from_secs(61));
        assert!(!health.healthy(now));
        health.oldest_pending = None;
        assert!(health.healthy(now));
    }
}
