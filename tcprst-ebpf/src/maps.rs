use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use tcprst_common::{CloseMark, MarkedRstRecord, RstRecord, counters};

use crate::globals::global;

/// Every record for the loader. The loader resizes it (`--buffer-pages`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 4096, 0);

/// What the programs could not do (`counters::*`), so none of it is lost
/// silently: per CPU.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::SLOTS, 0);

/// `ResetHook::covered_bit`s of the reset functions whose own programs are
/// attached. A map, not a global: the loader learns which attach only after
/// loading, and sets it before attaching the tracepoint.
#[map]
static TRACEPOINT_COVERED: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn tracepoint_covered() -> u32 {
    TRACEPOINT_COVERED.get(0).copied().unwrap_or(0)
}

/// Adds one to `counter`. A softirq can interrupt a process-context program
/// on the same CPU mid-update, so the add is atomic (the intrinsic: the bpf
/// target's core has no atomic types; its result unused, it is the plain
/// atomic add every kernel's verifier takes).
#[inline(always)]
pub fn count(counter: u32) {
    if let Some(n) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: this CPU's slot of a live map value.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1) };
    }
}

#[inline(always)]
fn count_lost() {
    count(counters::LOST_RECORDS);
}

/// Waking the reader for every record costs more than the record (an
/// irq_work, an interrupt in a VM): wake it only as a batch builds up, once
/// per `wakeup_bytes` that come to wait in the ring (the pending bytes went
/// from `before` to `after` with this record). Waking every record once a
/// batch waits, as this did, woke the reader for every record of a storm
/// it trails: the self-IPI of each took 2 % of the generator's CPU
/// (docs/performance.md). A record from another CPU at the same moment
/// can hide a crossing from both; the next multiple then wakes the reader,
/// which also drains on a short timer, so a lone record is not held long.
#[inline(always)]
fn wakeup_flags(before: u64, after: u64) -> u64 {
    let every = u64::from(global!(SETTINGS.wakeup_bytes)).max(1);
    if before / every != after / every {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// The bytes waiting for the reader.
#[inline(always)]
fn waiting() -> u64 {
    EVENTS.query(u64::from(BPF_RB_AVAIL_DATA))
}

/// Emits `record`, or counts it as lost.
#[inline(always)]
pub fn emit(record: &RstRecord) {
    let before = waiting();
    let flags = wakeup_flags(before, before + core::mem::size_of::<RstRecord>() as u64);
    if EVENTS.output::<RstRecord>(record, flags).is_err() {
        count_lost();
    }
}

/// Emits a reset with its socket's close mark, written in place: the pair
/// is too large to assemble on the BPF stack beside the record.
#[inline(always)]
pub fn emit_marked(record: &RstRecord, mark: &CloseMark) {
    match EVENTS.reserve::<MarkedRstRecord>(0) {
        Some(mut entry) => {
            let slot = entry.as_mut_ptr();
            // SAFETY: `slot` is the reserved, writable ring-buffer space.
            unsafe {
                (*slot).rst = *record;
                (*slot).mark = *mark;
            }
            // The reservation already counts as waiting.
            let after = waiting();
            let before = after.saturating_sub(core::mem::size_of::<MarkedRstRecord>() as u64);
            entry.submit(wakeup_flags(before, after));
        }
        None => count_lost(),
    }
}
