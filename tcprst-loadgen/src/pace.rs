//! Pacing by schedule: the n-th start is due at `start + n / rate`, so a
//! late wake-up is caught up on rather than lost, and the achieved rate
//! converges on the target instead of drifting below it.

use std::time::{Duration, Instant};

pub(crate) struct Pacer {
    start: Instant,
    /// None: unpaced, everything is due at once.
    per_sec: Option<f64>,
}

impl Pacer {
    pub(crate) fn new(per_sec: Option<f64>) -> Self {
        Self {
            start: Instant::now(),
            per_sec,
        }
    }

    /// How many more starts are due by `now`, after `issued` so far.
    pub(crate) fn due(&self, issued: u64, now: Instant) -> u64 {
        match self.per_sec {
            None => u64::MAX,
            Some(rate) => {
                let allowed = (now - self.start).as_secs_f64() * rate;
                (allowed as u64 + 1).saturating_sub(issued)
            }
        }
    }

    /// When the start after `issued` is due; None when unpaced.
    pub(crate) fn next_at(&self, issued: u64) -> Option<Instant> {
        let rate = self.per_sec?;
        Some(self.start + Duration::from_secs_f64(issued as f64 / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_schedule_catches_up_and_unpaced_is_unbounded() {
        let p = Pacer::new(Some(1000.0));
        let later = p.start + Duration::from_millis(10);
        // 10 ms at 1000/s: starts 0..=10 are due.
        assert_eq!(p.due(0, later), 11);
        assert_eq!(p.due(11, later), 0);
        assert_eq!(p.next_at(20), Some(p.start + Duration::from_millis(20)));
        let free = Pacer::new(None);
        assert_eq!(free.due(1 << 40, Instant::now()), u64::MAX);
        assert_eq!(free.next_at(5), None);
    }
}
