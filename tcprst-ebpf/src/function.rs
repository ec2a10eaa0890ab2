//! The functions that send resets, hooked directly: tcp_send_active_reset,
//! tcp_v4/v6_send_reset and netfilter's nf_send_reset/nf_send_reset6.
//! Before 6.10 the `tcp:tcp_send_reset` tracepoint misses every reset sent
//! without a full socket (closed ports, TIME_WAIT), and netfilter's REJECT
//! has no tracepoint at all. Each function has an fentry and a kprobe
//! program; the loader attaches the best one the kernel allows and tells the
//! tracepoint program to skip what these report.

use core::ptr::addr_of;

// The argument registers below are x86-64's (rdi, rsi, rdx, rcx, r8), the
// only architecture this has run on.
#[cfg(not(bpf_target_arch = "x86_64"))]
compile_error!("kprobe argument registers are only mapped for x86_64");

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_probe_read_kernel, generated::bpf_get_func_arg},
    macros::{fentry, kprobe},
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, tracing::StackIdContext},
};
use tcprst_common::{
    ABSENT, AttachTier, CloseMark, FUNCTION_HOOKS, FunctionArgs, RecordKind, ResetHook, rst_flags,
};

use crate::{
    closing::mark_of,
    failure::tuple_unread,
    globals::function_args,
    kernel::{
        TCP_FLAG_RST, netns_of_net, reply_tuple, skb_netns, sock_netns, sock_state, sock_tuple,
    },
    reset::{blank, finish, sock_details},
};

/// Reads argument `n` of the hooked function or tracepoint; 0 when it cannot.
pub trait ArgReader: StackIdContext {
    fn arg_u64(&self, n: u32) -> u64;

    /// The close mark of the socket in argument 0, where this program type
    /// may read socket storage with a typed socket pointer.
    fn mark(&self) -> Option<CloseMark> {
        None
    }
}

impl ArgReader for ProbeContext {
    #[inline(always)]
    fn arg_u64(&self, n: u32) -> u64 {
        // Through a helper: the verifier refuses a load from the context at
        // a computed offset, which is what LLVM makes of a match on `n`.
        let regs = self.regs;
        // SAFETY: only addresses are taken here, nothing is read.
        let reg = unsafe {
            match n {
                0 => addr_of!((*regs).rdi),
                1 => addr_of!((*regs).rsi),
                2 => addr_of!((*regs).rdx),
                3 => addr_of!((*regs).rcx),
                4 => addr_of!((*regs).r8),
                _ => return 0,
            }
        };
        // SAFETY: a probe read of the saved register, which fails cleanly.
        unsafe { bpf_probe_read_kernel(reg) }.unwrap_or(0)
    }
}

impl ArgReader for FEntryContext {
    #[inline(always)]
    fn arg_u64(&self, n: u32) -> u64 {
        // bpf_get_func_arg (5.17+) takes the index at run time, which the
        // prototype-dependent positions need.
        let mut value = 0u64;
        // SAFETY: the helper checks `n` against the function's arguments
        // and writes one u64 to `value`.
        let ret = unsafe { bpf_get_func_arg(self.as_ptr(), n, &mut value) };
        if ret == 0 { value } else { 0 }
    }
}

impl ArgReader for BtfTracePointContext {
    #[inline(always)]
    fn arg_u64(&self, n: u32) -> u64 {
        // Through a helper, for the same reason as kprobes: the index is a
        // run-time value, and the result is a plain number either way.
        let slot = self.as_ptr().cast::<u64>().wrapping_add(n as usize);
        // SAFETY: reads one slot of the tracepoint's argument array.
        unsafe { bpf_probe_read_kernel(slot) }.unwrap_or(0)
    }

    #[inline(always)]
    fn mark(&self) -> Option<CloseMark> {
        // Both reset tracepoints pass the socket first.
        mark_of(self.arg(0))
    }
}

#[inline(always)]
fn arg_at(ctx: &impl ArgReader, n: u32) -> Option<u64> {
    (n != ABSENT).then(|| ctx.arg_u64(n))
}

#[inline(always)]
fn report_function(ctx: &impl ArgReader, hook: ResetHook, tier: AttachTier) {
    if let Some(index) = FUNCTION_HOOKS.iter().position(|h| *h == hook) {
        report(ctx, hook, tier, function_args(index));
    }
}

/// Reports a reset from the arguments of the function (or tracepoint)
/// that sends it, at the positions `args` gives.
#[inline(always)]
pub fn report(ctx: &impl ArgReader, hook: ResetHook, tier: AttachTier, args: FunctionArgs) {
    let sk = arg_at(ctx, args.sk).unwrap_or(0);
    let skb = arg_at(ctx, args.skb).unwrap_or(0);
    let mut rec = blank(RecordKind::RstSent, hook);
    rec.tier = tier as u8;
    if skb != 0 {
        // An answer to a segment: the kernel never answers a reset, and
        // returns before sending anything when asked to.
        match reply_tuple(skb, &mut rec.tuple) {
            Ok(flags) if flags & TCP_FLAG_RST == 0 => {}
            Ok(_) => return,
            Err(unread) => return tuple_unread(ctx, hook, tier, unread),
        }
    } else if let Err(unread) = sock_tuple(sk, &mut rec.tuple) {
        return tuple_unread(ctx, hook, tier, unread);
    }
    if sk == 0 {
        rec.flags |= rst_flags::NO_SOCKET;
    } else if let Some(state) = sock_state(sk) {
        rec.state = state;
        rec.flags |= rst_flags::HAS_STATE;
    }
    if let Some(reason) = arg_at(ctx, args.reason) {
        rec.reason = reason as u32;
        rec.flags |= rst_flags::HAS_REASON;
    }
    if let Some(nf_hook) = arg_at(ctx, args.hook) {
        rec.nf_hook = nf_hook as u8;
        rec.flags |= rst_flags::HAS_NF_HOOK;
    }
    let netns = match arg_at(ctx, args.net) {
        Some(net) => netns_of_net(net),
        None if sk != 0 => sock_netns(sk),
        None => skb_netns(skb),
    };
    finish(ctx, &mut rec, netns, |rec| {
        sock_details(sk, rec);
        if sk != 0 { ctx.mark() } else { None }
    });
}

macro_rules! reset_function_programs {
    ($($function:literal: $hook:ident => $kprobe:ident, $fentry:ident;)+) => {$(
        #[kprobe]
        pub fn $kprobe(ctx: ProbeContext) -> u32 {
            report_function(&ctx, ResetHook::$hook, AttachTier::Kprobe);
            0
        }

        #[fentry(function = $function)]
        pub fn $fentry(ctx: FEntryContext) -> u32 {
            report_function(&ctx, ResetHook::$hook, AttachTier::Fentry);
            0
        }
    )+};
}

reset_function_programs! {
    "tcp_send_active_reset": ActiveReset => tcprst_kp_active_reset, tcprst_fe_active_reset;
    "tcp_v4_send_reset": V4SendReset => tcprst_kp_v4_send_reset, tcprst_fe_v4_send_reset;
    "tcp_v6_send_reset": V6SendReset => tcprst_kp_v6_send_reset, tcprst_fe_v6_send_reset;
    "nf_send_reset": NfSendReset => tcprst_kp_nf_send_reset, tcprst_fe_nf_send_reset;
    "nf_send_reset6": NfSendReset6 => tcprst_kp_nf_send_reset6, tcprst_fe_nf_send_reset6;
}
