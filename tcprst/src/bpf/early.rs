//! The records that reach the ring buffer while tracing starts. The reset
//! programs attach before the event loop can read the ring: the kernel's
//! symbols are read after them (they must name the programs' own JIT
//! images), the container runtimes may take up to 3 s to answer, and the
//! first scan walks every namespace. A storm traced a line per reset
//! overflowed the default ring in that time: tcprst started during one lost
//! 2,000–17,700 records of its first 2 s here. So startup copies the ring
//! into memory while it waits, and the event loop reads those copies first,
//! copying the ring behind them until startup's own are read.

use std::{collections::VecDeque, future::Future, time::Duration};

use aya::maps::{MapData, RingBuf};

/// The most startup keeps: some 2 s of an unpaced storm's records here.
/// Past it the ring fills, and the kernel counts what it drops as lost, as
/// it would without these copies.
const KEPT_BYTES: usize = 32 << 20;
/// How often the ring is copied while startup waits: the default ring
/// holds some 60 ms of an unpaced storm on this machine.
const COPY_EVERY: Duration = Duration::from_millis(5);

/// Records copied out of the ring before the event loop ran, oldest first.
#[derive(Default)]
pub struct EarlyRecords {
    records: VecDeque<Box<[u8]>>,
    bytes: usize,
    /// Of the records startup copied, those still to read: while any are
    /// left, the event loop copies the ring behind them. Only while: under
    /// a storm it cannot keep up with, copying on would hold up to
    /// `KEPT_BYTES` for as long as the storm lasts.
    from_startup: usize,
}

impl EarlyRecords {
    /// Copies what the ring holds, up to `KEPT_BYTES` in all.
    pub fn copy(&mut self, ring: &mut RingBuf<MapData>) {
        while self.bytes < KEPT_BYTES {
            let Some(item) = ring.next() else { break };
            self.bytes += item.len();
            self.records.push_back(Box::from(&*item));
        }
    }

    /// Runs `work` to its end, copying the ring every `COPY_EVERY` meanwhile
    /// and once more as it ends.
    pub async fn during<F: Future>(&mut self, ring: &mut RingBuf<MapData>, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        let mut copy_tick = tokio::time::interval(COPY_EVERY);
        loop {
            tokio::select! {
                done = &mut work => {
                    self.copy(ring);
                    return done;
                }
                _ = copy_tick.tick() => self.copy(ring),
            }
        }
    }

    /// Startup is over: what it copied is to be read, and the ring copied
    /// behind it only until it is.
    pub fn startup_done(&mut self) {
        self.from_startup = self.records.len();
    }

    /// Whether startup's own copies are still being read.
    pub fn catching_up(&self) -> bool {
        self.from_startup > 0
    }

    /// The oldest record copied, no longer kept.
    pub fn pop(&mut self) -> Option<Box<[u8]>> {
        let record = self.records.pop_front()?;
        self.bytes -= record.len();
        self.from_startup = self.from_startup.saturating_sub(1);
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(early: &mut EarlyRecords, byte: u8) {
        early.records.push_back(vec![byte; 8].into());
        early.bytes += 8;
    }

    #[test]
    fn the_ring_is_copied_behind_startup_s_own_records_only() {
        let mut early = EarlyRecords::default();
        assert!(!early.catching_up(), "nothing to catch up on");
        for byte in 0..3 {
            keep(&mut early, byte);
        }
        early.startup_done();
        // What the event loop copied behind them.
        keep(&mut early, 9);
        for byte in 0..3 {
            assert!(early.catching_up(), "startup's record {byte} is unread");
            assert_eq!(early.pop().as_deref(), Some(&[byte; 8][..]));
        }
        assert!(!early.catching_up(), "startup's three are read");
        assert_eq!(early.pop().as_deref(), Some(&[9; 8][..]));
        assert_eq!(early.bytes, 0);
        assert_eq!(early.pop(), None);
        assert!(!early.catching_up());
    }
}
