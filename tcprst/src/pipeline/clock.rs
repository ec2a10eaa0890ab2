//! Kernel timestamps are CLOCK_MONOTONIC; users want wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Converts monotonic nanoseconds to wall-clock time. `refresh` picks up
/// NTP steps; the loader calls it every second.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// Wall-clock nanoseconds minus monotonic nanoseconds.
    offset_ns: i128,
}

/// CLOCK_MONOTONIC now, in nanoseconds, as the kernel's timestamps are.
pub(crate) fn monotonic_ns() -> u64 {
    now_ns(libc::CLOCK_MONOTONIC) as u64
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // clock_gettime cannot fail for these clocks with a valid pointer.
    // SAFETY: `ts` is a live, writable timespec for the call's duration.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl WallClock {
    /// The offset as of now.
    pub fn now() -> Self {
        Self {
            offset_ns: now_ns(libc::CLOCK_REALTIME) - now_ns(libc::CLOCK_MONOTONIC),
        }
    }

    pub(crate) fn refresh(&mut self) {
        *self = Self::now();
    }

    pub(crate) fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        let ns = (i128::from(monotonic_ns) + self.offset_ns).max(0) as u128;
        UNIX_EPOCH + Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_now_to_now() {
        let clock = WallClock::now();
        let wall = clock.wall_time(now_ns(libc::CLOCK_MONOTONIC) as u64);
        let skew = SystemTime::now()
            .duration_since(wall)
            .unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_millis(100), "{skew:?}");
    }
}
