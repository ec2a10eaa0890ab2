//! Kernel stacks of resets, so userspace can name the function that
//! decided to reset (tcp_close, tcp_keepalive_timer, tcp_v4_rcv, …): the
//! innermost frames go into the record, and the kernel unwinds only that
//! deep; whole stacks go to `STACKS` only with `--stack`.

use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_stack, macros::map, maps::StackTrace,
    programs::tracing::StackIdContext,
};
use tcprst_common::{CALLER_FRAMES, counters};

use crate::{globals::global, maps::count};

/// Without BPF_F_REUSE_STACKID a stack id keeps naming one stack, so the
/// loader can cache what it symbolized; a colliding new stack gets none.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(2048, 0);

/// The whole stack's id with `--stack`; -1 otherwise or when it failed.
#[inline(always)]
pub fn stack_id(ctx: &impl StackIdContext) -> i32 {
    if global!(SETTINGS.whole_stacks) == 0 {
        return -1;
    }
    ctx.get_stackid(&STACKS, 0).map_or(-1, |id| id as i32)
}

/// Fills `frames` with the innermost kernel frames; counts a failure.
#[inline(always)]
pub fn caller_frames(ctx: &impl EbpfContext, frames: &mut [u64; CALLER_FRAMES]) {
    let size = core::mem::size_of_val(frames) as u32;
    // SAFETY: `frames` is writable for `size` bytes; flags 0: kernel stack.
    let taken = unsafe { bpf_get_stack(ctx.as_ptr(), frames.as_mut_ptr().cast(), size, 0) };
    if taken <= 0 {
        count(counters::STACK_FAILURES);
    }
}
