//! The records that reach the ring buffer while tracing starts. The reset
//! programs attach before the event loop can read the ring: the kernel's
//! symbols are read after them (they must name the programs' own JIT
//! images), the container runtimes may take up to 3 s to answer, and the
//! first scan walks every namespace. A storm traced a line per reset
//! overflowed the default ring in that time: tcprst started during one lost
//! about 17,000 records of its first 2 s here. So startup copies the ring
//! into memory while it waits, and the event loop reads those copies first,
//! copying the ring behind them as it goes.

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

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The oldest record copied, no longer kept.
    pub fn pop(&mut self) -> Option<Box<[u8]>> {
        let record = self.records.pop_front()?;
        self.bytes -= record.len();
        Some(record)
    }
}
