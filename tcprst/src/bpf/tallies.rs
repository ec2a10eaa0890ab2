//! The kernel's reset tallies (`tcprst-ebpf/src/tally.rs`), read once a
//! period. Two sets of maps take turns: each tick empties the set the
//! programs left a whole period ago, then points the programs at it. No
//! program writes a set while it is drained, so every count is read exactly
//! once.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuHashMap};
use tcprst_common::{RstBudget, RstCount, RstKey, RstRecord, TALLY_PORTS};

/// One key's resets past its budget in one period, all CPUs together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub counted: u64,
    /// CLOCK_MONOTONIC ns of the first and the last counted reset.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Distinct ephemeral ports of counted resets; 0 is unused.
    pub ports: [u16; TALLY_PORTS],
    /// The key's last detailed record, whose attribution the aggregate
    /// reports; all zero when it was still being written as the period
    /// ended.
    pub sample: RstRecord,
}

impl Tally {
    /// The CPUs' counts of one key added up; None when no CPU counted any.
    pub fn of(per_cpu: &[RstCount], sample: RstRecord) -> Option<Self> {
        let counting = || per_cpu.iter().filter(|c| c.counted > 0);
        let mut ports = [0; TALLY_PORTS];
        let mut kept = 0;
        for port in counting().flat_map(|c| c.ports).filter(|p| *p != 0) {
            if kept < TALLY_PORTS && !ports[..kept].contains(&port) {
                ports[kept] = port;
                kept += 1;
            }
        }
        Some(Self {
            counted: counting().map(|c| c.counted).sum(),
            first_ns: counting().map(|c| c.first_ns).min()?,
            last_ns: counting().map(|c| c.last_ns).max()?,
            ports,
            sample,
        })
    }
}

/// One turn's maps: the shared budgets and the per-CPU counts.
pub struct TallyMaps {
    pub budgets: HashMap<MapData, RstKey, RstBudget>,
    pub counts: PerCpuHashMap<MapData, RstKey, RstCount>,
}

pub struct Tallies {
    turns: [TallyMaps; 2],
    turn: Array<MapData, u32>,
    /// The set the programs count into now.
    current: u32,
}

impl Tallies {
    /// How often the maps turn: the `--detail-per-sec` budget is per period.
    pub const PERIOD: Duration = Duration::from_secs(1);

    pub fn new(turns: [TallyMaps; 2], turn: Array<MapData, u32>) -> Self {
        Self {
            turns,
            turn,
            current: 0,
        }
    }

    /// Empties the idle set and makes it the programs' set: what they
    /// counted two periods ago to one ago. Keys whose resets all got their
    /// own record are dropped here too, so their budgets start again.
    pub fn turn(&mut self) -> Result<Vec<(RstKey, Tally)>> {
        let idle = 1 - self.current;
        let counted = self.drain(idle)?;
        self.turn
            .set(0, idle, 0)
            .context("switching the reset tally maps")?;
        self.current = idle;
        Ok(counted)
    }

    /// Everything counted, when tracing stops: after a turn, the set the
    /// programs just left is drained too, racing only resets that happen
    /// as tracing stops.
    pub fn finish(&mut self) -> Result<Vec<(RstKey, Tally)>> {
        let mut counted = self.turn()?;
        counted.extend(self.drain(1 - self.current)?);
        Ok(counted)
    }

    fn drain(&mut self, index: u32) -> Result<Vec<(RstKey, Tally)>> {
        let TallyMaps { budgets, counts } = &mut self.turns[index as usize];
        let counted = counts
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading the reset counts")?;
        let samples = budgets
            .iter()
            .collect::<Result<std::collections::HashMap<_, _>, _>>()
            .context("reading the reset budgets")?;
        for key in counted.iter().map(|(key, _)| key) {
            counts.remove(key).context("emptying the reset counts")?;
        }
        for key in samples.keys() {
            budgets.remove(key).context("emptying the reset budgets")?;
        }
        Ok(counted
            .into_iter()
            .filter_map(|(key, per_cpu)| {
                // A key is counted only past its budget, which is in the
                // same set; the zero record stands in should it be gone.
                let sample = samples.get(&key).map_or(ZERO_RECORD, |b| b.sample);
                Some((key, Tally::of(&per_cpu, sample)?))
            })
            .collect())
    }
}

/// A sample no detailed record left.
const ZERO_RECORD: RstRecord = {
    // SAFETY: RstRecord is plain integers and byte arrays, for which all
    // zero bytes are valid.
    unsafe { std::mem::zeroed() }
};

#[cfg(test)]
mod tests {
    use super::*;

    fn count(counted: u64, first_ns: u64, last_ns: u64, ports: [u16; 4]) -> RstCount {
        RstCount {
            counted,
            first_ns,
            last_ns,
            ports,
            spent: 1,
            _pad: 0,
        }
    }

    #[test]
    fn the_cpus_counts_of_a_key_add_up() {
        let per_cpu = [
            count(300, 5_000, 9_000, [40001, 40002, 0, 0]),
            // A CPU that never counted this key: its times are not the
            // key's.
            RstCount::default(),
            count(200, 2_000, 7_000, [40002, 40003, 40004, 40005]),
        ];
        let tally = Tally::of(&per_cpu, ZERO_RECORD).unwrap();
        assert_eq!(tally.counted, 500);
        assert_eq!((tally.first_ns, tally.last_ns), (2_000, 9_000));
        assert_eq!(tally.ports, [40001, 40002, 40003, 40004]);
    }

    #[test]
    fn a_key_no_cpu_counted_has_no_tally() {
        assert_eq!(Tally::of(&[RstCount::default(); 2], ZERO_RECORD), None);
        assert_eq!(Tally::of(&[], ZERO_RECORD), None);
    }
}
