//! The kernel's reset tallies (`tcprst-ebpf/src/tally.rs`), read once a
//! period. Two maps take turns: each tick empties the map the programs left
//! a whole period ago, then points the programs at it. No program writes a
//! map while it is drained, so every count is read exactly once.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, MapData};
use tcprst_common::{RstKey, RstTally};

pub struct Tallies {
    maps: [HashMap<MapData, RstKey, RstTally>; 2],
    turn: Array<MapData, u32>,
    /// The map the programs count into now.
    current: u32,
}

impl Tallies {
    /// How often the maps turn: the `--detail-per-sec` budget is per period.
    pub const PERIOD: Duration = Duration::from_secs(1);

    pub fn new(maps: [HashMap<MapData, RstKey, RstTally>; 2], turn: Array<MapData, u32>) -> Self {
        Self {
            maps,
            turn,
            current: 0,
        }
    }

    /// Empties the idle map and makes it the programs' map: what they
    /// counted two periods ago to one ago. Keys whose resets all got their
    /// own record are dropped here too, so their budgets start again.
    pub fn turn(&mut self) -> Result<Vec<(RstKey, RstTally)>> {
        let idle = 1 - self.current;
        let counted = self.drain(idle)?;
        self.turn
            .set(0, idle, 0)
            .context("switching the reset tally map")?;
        self.current = idle;
        Ok(counted)
    }

    /// Everything counted, when tracing stops: after a turn, the map the
    /// programs just left is drained too, racing only resets that happen
    /// as tracing stops.
    pub fn finish(&mut self) -> Result<Vec<(RstKey, RstTally)>> {
        let mut counted = self.turn()?;
        counted.extend(self.drain(1 - self.current)?);
        Ok(counted)
    }

    fn drain(&mut self, index: u32) -> Result<Vec<(RstKey, RstTally)>> {
        let map = &mut self.maps[index as usize];
        let entries = map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading the reset tallies")?;
        for (key, _) in &entries {
            map.remove(key).context("emptying the reset tallies")?;
        }
        Ok(entries
            .into_iter()
            .filter(|(_, tally)| tally.counted > 0)
            .collect())
    }
}
