//! Record times as RFC 3339, UTC, with microseconds:
//! "2026-11-18T11:06:40.123456Z". Every NDJSON record carries one or two.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

/// "YYYY-MM-DDTHH:MM:SS"
const PREFIX: usize = 19;
/// The prefix, ".", six digits and "Z".
const LEN: usize = PREFIX + 8;

/// One formatted time, on the stack.
#[derive(Clone, Copy)]
pub struct Stamp([u8; LEN]);

impl Stamp {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Built only from humantime's ASCII output and ASCII digits.
        std::str::from_utf8(&self.0).expect("an ASCII timestamp")
    }
}

impl Serialize for Stamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Formats times, the date and time of day once a second: records come in
/// time order, thousands a second in a storm, and only their microseconds
/// differ within a second.
#[derive(Default)]
pub struct StampCache {
    /// The second since the epoch `prefix` spells, if any yet.
    second: Option<u64>,
    prefix: [u8; PREFIX],
}

impl StampCache {
    pub fn stamp(&mut self, t: SystemTime) -> Stamp {
        let since_epoch = t
            .duration_since(UNIX_EPOCH)
            .expect("record times are after the epoch");
        let second = since_epoch.as_secs();
        if self.second != Some(second) {
            let whole = UNIX_EPOCH + std::time::Duration::from_secs(second);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            self.prefix.copy_from_slice(&text.as_bytes()[..PREFIX]);
            self.second = Some(second);
        }
        let mut out = [0; LEN];
        out[..PREFIX].copy_from_slice(&self.prefix);
        out[PREFIX] = b'.';
        let mut micros = since_epoch.subsec_micros();
        for digit in out[PREFIX + 1..LEN - 1].iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        out[LEN - 1] = b'Z';
        Stamp(out)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(micros: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(micros)
    }

    /// What humantime prints for the whole time, which records printed
    /// before the cache.
    fn humantime(t: SystemTime) -> String {
        humantime::format_rfc3339_micros(t).to_string()
    }

    #[test]
    fn matches_humantime_across_a_second_boundary() {
        let mut cache = StampCache::default();
        // Up to a second's last microsecond, over it, and back (the wall
        // clock can be stepped back).
        for micros in [
            1_795_000_000_123_456,
            1_795_000_000_999_999,
            1_795_000_001_000_000,
            1_795_000_001_000_007,
            1_795_000_000_500_000,
            1_795_086_400_000_001,
        ] {
            assert_eq!(cache.stamp(at(micros)).as_str(), humantime(at(micros)));
        }
        assert_eq!(
            cache.stamp(at(1_795_000_001_000_007)).as_str(),
            "2026-11-18T11:06:41.000007Z"
        );
    }

    #[test]
    fn the_epoch_and_sub_microseconds() {
        let mut cache = StampCache::default();
        assert_eq!(
            cache.stamp(UNIX_EPOCH).as_str(),
            "1970-01-01T00:00:00.000000Z"
        );
        let t = UNIX_EPOCH + Duration::new(1_795_000_000, 999_999_999);
        assert_eq!(cache.stamp(t).as_str(), humantime(t));
    }
}
