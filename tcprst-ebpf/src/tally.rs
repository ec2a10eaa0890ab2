//! Reset storms counted in the kernel. Each `RstKey` gets
//! `detail_per_period` records per tally period (a second); past that a
//! reset only adds one to its key's `RstTally`, which costs a hash lookup
//! and an atomic add instead of the task, the stack and a ring-buffer
//! record. Userspace turns every tally into one aggregate record, so the
//! detailed records and the tallies add up to every reset, exactly.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap},
};
use tcprst_common::{RstKey, RstRecord, RstTally, TALLY_KEYS, TALLY_PORTS, counters, rst_flags};

use crate::{globals::global, maps::count};

#[map]
static TALLIES_A: HashMap<RstKey, RstTally> = HashMap::with_max_entries(TALLY_KEYS, 0);
#[map]
static TALLIES_B: HashMap<RstKey, RstTally> = HashMap::with_max_entries(TALLY_KEYS, 0);
/// Which tally map the programs count into: userspace flips it each
/// period, then drains the other one.
#[map]
static TALLY_TURN: Array<u32> = Array::with_max_entries(1, 0);
/// A zeroed tally to create keys from: the BPF stack has no room for one
/// beside the record.
#[map]
static BLANK_TALLY: Array<RstTally> = Array::with_max_entries(1, 0);

/// What `tally` decided for one reset.
pub enum Budget {
    /// It was counted in its key's tally: emit nothing.
    Counted,
    /// It gets its own record; store the record as the key's sample.
    Detailed(*mut RstTally),
    /// Counting is off, or the map is full: it gets its own record.
    Untallied,
}

/// The reset's key, and its ephemeral port, which the key leaves out.
#[inline(always)]
fn key_of(rec: &RstRecord) -> (RstKey, u16) {
    let mut ends = rec.tuple;
    let ephemeral = if ends.local_port <= ends.remote_port {
        core::mem::take(&mut ends.remote_port)
    } else {
        core::mem::take(&mut ends.local_port)
    };
    let key = RstKey {
        ends,
        netns: rec.netns,
        reason: rec.reason,
        kind: rec.kind,
        hook: rec.hook,
        state: rec.state,
        flags: rec.flags & (rst_flags::NO_SOCKET | rst_flags::HAS_REASON | rst_flags::HAS_STATE),
    };
    (key, ephemeral)
}

/// Charges one reset, whose tuple, namespace, state and reason `rec`
/// already holds, to its key's budget.
#[inline(always)]
pub fn tally(rec: &RstRecord) -> Budget {
    let budget = global!(SETTINGS.detail_per_period);
    if budget == 0 {
        return Budget::Untallied;
    }
    let map = match TALLY_TURN.get(0) {
        Some(1) => &TALLIES_B,
        _ => &TALLIES_A,
    };
    let (key, ephemeral) = key_of(rec);
    let tally = match map.get_ptr_mut(key) {
        Some(tally) => tally,
        None => {
            let Some(blank) = BLANK_TALLY.get(0) else {
                return Budget::Untallied;
            };
            // Another CPU may create the key first (EEXIST): look it up
            // again either way.
            let _ = map.insert(key, blank, u64::from(BPF_NOEXIST));
            match map.get_ptr_mut(key) {
                Some(tally) => tally,
                None => {
                    count(counters::TALLY_FULL);
                    return Budget::Untallied;
                }
            }
        }
    };
    // SAFETY: a map value lives until userspace deletes it, which it does
    // only a whole period after the programs stopped writing this map.
    // Other CPUs update it concurrently: the counts use atomic adds, and
    // the rest is advisory.
    // The bpf target's core has no atomic types, so the adds use the
    // intrinsic directly; their results go unused, which compiles to the
    // plain atomic add every kernel's verifier takes.
    unsafe {
        if (*tally).detailed < budget {
            atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut (*tally).detailed, 1);
            return Budget::Detailed(tally);
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*tally).counted, 1);
        let now = aya_ebpf::helpers::bpf_ktime_get_ns();
        if (*tally).first_ns == 0 {
            (*tally).first_ns = now;
        }
        (*tally).last_ns = now;
        sample_port(&mut (*tally).ports, ephemeral);
    }
    Budget::Counted
}

/// Keeps `port` if it is new and there is room.
#[inline(always)]
fn sample_port(ports: &mut [u16; TALLY_PORTS], port: u16) {
    for slot in ports.iter_mut() {
        if *slot == port {
            return;
        }
        if *slot == 0 {
            *slot = port;
            return;
        }
    }
}
