//! Reset storms counted in the kernel. Each `RstKey` gets
//! `detail_per_period` records per tally period (a second); past that a
//! reset only adds one to this CPU's `RstCount` for its key, which costs a
//! hash lookup and an add to this CPU's memory instead of the task, the
//! stack and a ring-buffer record. Userspace turns every key's counts into
//! one aggregate record, so the detailed records and the counts add up to
//! every reset, exactly.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem::MaybeUninit,
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap, PerCpuHashMap},
};
use tcprst_common::{
    COUNTED_KEYS, RstBudget, RstCount, RstKey, RstRecord, TALLY_KEYS, TALLY_PORTS, counters,
    rst_flags,
};

use crate::{globals::global, maps::count, words};

#[map]
static BUDGETS_A: HashMap<RstKey, RstBudget> = HashMap::with_max_entries(TALLY_KEYS, 0);
#[map]
static BUDGETS_B: HashMap<RstKey, RstBudget> = HashMap::with_max_entries(TALLY_KEYS, 0);
#[map]
static COUNTS_A: PerCpuHashMap<RstKey, RstCount> = PerCpuHashMap::with_max_entries(COUNTED_KEYS, 0);
#[map]
static COUNTS_B: PerCpuHashMap<RstKey, RstCount> = PerCpuHashMap::with_max_entries(COUNTED_KEYS, 0);
/// Which set of tally maps the programs count into: userspace flips it
/// each period, then drains the other one.
#[map]
static TALLY_TURN: Array<u32> = Array::with_max_entries(1, 0);
/// A zeroed budget to create keys from: the BPF stack has no room for one
/// beside the record.
#[map]
static BLANK_BUDGET: Array<RstBudget> = Array::with_max_entries(1, 0);

/// What `tally` decided for one reset.
pub enum Budget {
    /// It was counted in its key's tally: emit nothing.
    Counted,
    /// It gets its own record; store the record as the key's sample.
    Detailed(*mut RstRecord),
    /// Counting is off, or a map is full: it gets its own record.
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

/// The tally maps of one turn. Each lookup names its map directly: a map
/// chosen at run time makes the verifier call the lookup through the map's
/// operations, where a fixed one it inlines.
#[derive(Clone, Copy)]
enum Turn {
    A,
    B,
}

impl Turn {
    #[inline(always)]
    fn now() -> Self {
        match TALLY_TURN.get(0) {
            Some(1) => Turn::B,
            _ => Turn::A,
        }
    }

    #[inline(always)]
    fn count(self, key: &RstKey) -> Option<*mut RstCount> {
        match self {
            Turn::A => COUNTS_A.get_ptr_mut(key),
            Turn::B => COUNTS_B.get_ptr_mut(key),
        }
    }

    /// This CPU's count of `key`, created if new. A new key's other CPUs
    /// start at zero.
    #[inline(always)]
    fn new_count(self, key: &RstKey) -> Option<*mut RstCount> {
        let mut slot = MaybeUninit::uninit();
        // SAFETY: all zero bytes is a valid RstCount: plain integers.
        let blank = unsafe { words::zeroed(&mut slot) };
        // Another program on this CPU may create it first (EEXIST): look it
        // up again either way.
        let _ = match self {
            Turn::A => COUNTS_A.insert(key, &*blank, u64::from(BPF_NOEXIST)),
            Turn::B => COUNTS_B.insert(key, &*blank, u64::from(BPF_NOEXIST)),
        };
        self.count(key)
    }

    #[inline(always)]
    fn budget(self, key: &RstKey) -> Option<*mut RstBudget> {
        let found = match self {
            Turn::A => BUDGETS_A.get_ptr_mut(key),
            Turn::B => BUDGETS_B.get_ptr_mut(key),
        };
        if found.is_some() {
            return found;
        }
        let blank = BLANK_BUDGET.get(0)?;
        // Another CPU may create the key first (EEXIST): look it up again
        // either way.
        match self {
            Turn::A => {
                let _ = BUDGETS_A.insert(key, blank, u64::from(BPF_NOEXIST));
                BUDGETS_A.get_ptr_mut(key)
            }
            Turn::B => {
                let _ = BUDGETS_B.insert(key, blank, u64::from(BPF_NOEXIST));
                BUDGETS_B.get_ptr_mut(key)
            }
        }
    }
}

/// Charges one reset, whose tuple, namespace, state and reason `rec`
/// already holds, to its key's budget.
#[inline(always)]
pub fn tally(rec: &RstRecord) -> Budget {
    let budget = global!(SETTINGS.detail_per_period);
    if budget == 0 {
        return Budget::Untallied;
    }
    let turn = Turn::now();
    let (key, ephemeral) = key_of(rec);
    let mine = turn.count(&key);
    // SAFETY (every dereference below): a map value lives until userspace
    // deletes it, which it does only a whole period after the programs
    // stopped writing this turn's maps. A count is this CPU's own; a
    // budget is shared, its `detailed` added to atomically, its sample
    // advisory.
    if let Some(mine) = mine
        && unsafe { (*mine).spent } != 0
    {
        unsafe { add(mine, ephemeral) };
        return Budget::Counted;
    }
    let Some(shared) = turn.budget(&key) else {
        count(counters::TALLY_FULL);
        return Budget::Untallied;
    };
    // The bpf target's core has no atomic types, so the adds use the
    // intrinsic directly; their results go unused, which compiles to the
    // plain atomic add every kernel's verifier takes.
    unsafe {
        if (*shared).detailed < budget {
            atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut (*shared).detailed, 1);
            return Budget::Detailed(&raw mut (*shared).sample);
        }
    }
    let Some(mine) = mine.or_else(|| turn.new_count(&key)) else {
        count(counters::TALLY_FULL);
        return Budget::Untallied;
    };
    unsafe {
        (*mine).spent = 1;
        add(mine, ephemeral);
    }
    Budget::Counted
}

/// Counts one reset past its budget on this CPU.
///
/// # Safety
/// `mine` is this CPU's live count (see `tally`).
#[inline(always)]
unsafe fn add(mine: *mut RstCount, ephemeral: u16) {
    // SAFETY: the caller's. A program interrupting another on this CPU
    // (a softirq's) may count the same key: the add is atomic, the rest is
    // advisory.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*mine).counted, 1);
        let now = aya_ebpf::helpers::bpf_ktime_get_ns();
        if (*mine).first_ns == 0 {
            (*mine).first_ns = now;
        }
        (*mine).last_ns = now;
        sample_port(&mut (*mine).ports, ephemeral);
    }
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
