use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};

/// Every record for the loader. The loader resizes it (`--buffer-pages`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 4096, 0);

/// Records that did not fit in `EVENTS`, per CPU, so none is lost silently.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `ResetHook::covered_bit`s of the reset functions whose own programs are
/// attached. A map, not a global: the loader learns which attach only after
/// loading, and sets it before attaching the tracepoint.
#[map]
static TRACEPOINT_COVERED: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn tracepoint_covered() -> u32 {
    TRACEPOINT_COVERED.get(0).copied().unwrap_or(0)
}

/// Emits `record`, or counts it as lost.
#[inline(always)]
pub fn emit<T>(record: &T) {
    if EVENTS.output::<T>(record, 0).is_err()
        && let Some(lost) = LOST.get_ptr_mut(tcprst_common::LOST_RECORDS)
    {
        // Per-CPU slot: no other writer can race with us.
        unsafe { *lost += 1 };
    }
}
