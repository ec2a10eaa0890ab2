//! The functions that send resets, hooked directly: tcp_send_active_reset,
//! tcp_v4/v6_send_reset and netfilter's nf_send_reset/nf_send_reset6.
//! Before 6.10 the `tcp:tcp_send_reset` tracepoint misses every reset sent
//! without a full socket (closed ports, TIME_WAIT), and netfilter's REJECT
//! has no tracepoint at all. Each function has an fentry and a kprobe
//! program; the loader attaches the best one the kernel allows and tells the
//! tracepoint program to skip what these report.

use core::{mem::MaybeUninit, ptr::addr_of};

// The argument registers below are x86-64's (rdi, rsi, rdx, rcx, r8), the
// only architecture this has run on.
#[cfg(not(bpf_target_arch = "x86_64"))]
compile_error!("kprobe argument registers are only mapped for x86_64");

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_probe_read_kernel, generated::bpf_get_func_arg},
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use tcprst_common::{ABSENT, AttachTier, FUNCTION_HOOKS, RecordKind, ResetHook, rst_flags};

use crate::{
    failure::tuple_unread,
    globals::function_args,
    kernel::{TCP_FLAG_RST, reply_tuple, sock_state, sock_tuple},
    netns::{netns_of_net, skb_netns, sock_netns},
    reset::{ResetContext, blank, finish, sock_details},
};

/// Reads argument `n` of the hooked function, at a position the loader
/// found at run time; 0 when it cannot.
pub trait ArgReader: ResetContext {
    fn arg_u64(&self, n: u32) -> u64;
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

#[inline(always)]
fn arg_at(ctx: &impl ArgReader, n: u32) -> Option<u64> {
    (n != ABSENT).then(|| ctx.arg_u64(n))
}

#[inline(always)]
fn report_function(ctx: &impl ArgReader, hook: ResetHook, tier: AttachTier) {
    let Some(index) = FUNCTION_HOOKS.iter().position(|h| *h == hook) else {
        return;
    };
    let at = function_args(index);
    let args = ResetArgs {
        sk: arg_at(ctx, at.sk).unwrap_or(0),
        skb: arg_at(ctx, at.skb).unwrap_or(0),
        reason: arg_at(ctx, at.reason),
        net: arg_at(ctx, at.net),
        nf_hook: arg_at(ctx, at.hook),
    };
    report(ctx, hook, tier, args);
}

/// What a reset-sending function (or tracepoint) was called with.
pub struct ResetArgs {
    /// The socket resetting, or 0 for an answer to a segment no socket took.
    pub sk: u64,
    /// The segment answered, or 0 for an active reset.
    pub skb: u64,
    pub reason: Option<u64>,
    /// netfilter's `struct net *`.
    pub net: Option<u64>,
    /// netfilter's hook number.
    pub nf_hook: Option<u64>,
}

/// Reports a reset from the arguments of the function (or tracepoint)
/// that sends it.
#[inline(always)]
pub fn report(ctx: &impl ResetContext, hook: ResetHook, tier: AttachTier, args: ResetArgs) {
    let mem = ctx.memory();
    let ResetArgs { sk, skb, .. } = args;
    let mut slot = MaybeUninit::uninit();
    let rec = blank(&mut slot, RecordKind::RstSent, hook);
    rec.tier = tier as u8;
    if skb != 0 {
        // An answer to a segment: the kernel never answers a reset, and
        // returns before sending anything when asked to.
        match reply_tuple(mem, skb, &mut rec.tuple) {
            Ok(flags) if flags & TCP_FLAG_RST == 0 => {}
            Ok(_) => return,
            Err(unread) => return tuple_unread(ctx, hook, tier, unread),
        }
    } else if let Err(unread) = sock_tuple(mem, sk, &mut rec.tuple) {
        return tuple_unread(ctx, hook, tier, unread);
    }
    if sk == 0 {
        rec.flags |= rst_flags::NO_SOCKET;
    } else if let Some(state) = sock_state(mem, sk) {
        rec.state = state;
        rec.flags |= rst_flags::HAS_STATE;
    }
    if let Some(reason) = args.reason {
        rec.reason = reason as u32;
        rec.flags |= rst_flags::HAS_REASON;
    }
    if let Some(nf_hook) = args.nf_hook {
        rec.nf_hook = nf_hook as u8;
        rec.flags |= rst_flags::HAS_NF_HOOK;
    }
    let netns = match args.net {
        Some(net) => netns_of_net(mem, net),
        None if sk != 0 => sock_netns(mem, sk),
        None => skb_netns(mem, skb),
    };
    finish(ctx, rec, netns, |rec| {
        sock_details(mem, sk, rec);
        if sk != 0 { ctx.close_facts(rec) } else { None }
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
