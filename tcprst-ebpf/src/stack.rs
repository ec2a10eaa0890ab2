//! Kernel stacks of resets, so userspace can name the function that
//! decided to reset (tcp_close, tcp_keepalive_timer, tcp_v4_rcv, …).

use aya_ebpf::{macros::map, maps::StackTrace, programs::tracing::StackIdContext};

/// Without BPF_F_REUSE_STACKID a stack id keeps naming one stack, so the
/// loader can cache what it symbolized; a colliding new stack gets none.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(2048, 0);

#[inline(always)]
pub fn stack_id(ctx: &impl StackIdContext) -> i32 {
    ctx.get_stackid(&STACKS, 0).map_or(-1, |id| id as i32)
}
