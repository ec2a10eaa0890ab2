//! `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`: every RST this host's
//! TCP stack sends or receives.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::tracepoint,
    programs::{TracePointContext, tracing::StackIdContext},
};
use tcprst_common::{AttachTier, ExecContext, RecordKind, ResetHook, RstRecord, rst_flags};

use crate::{
    context::origin,
    globals::{filter, receive_reset_fields, send_reset_fields},
    kernel::{is_full_sock, segment_ip_version, skb_netns, sock_cgroup_id, sock_netns, sock_state},
    maps::{emit, tracepoint_covered},
    owner::owner_of,
    stack::stack_id,
    tracepoint::{field, read_tuple, tuple_wanted},
};

#[tracepoint]
pub fn tcprst_rst_sent(ctx: TracePointContext) -> u32 {
    let fields = send_reset_fields();
    let sk = field::<u64>(&ctx, fields.skaddr).unwrap_or(0);
    let skb = field::<u64>(&ctx, fields.skbaddr).unwrap_or(0);
    if reported_by_function(skb) {
        return 0;
    }
    let mut rec = blank(RecordKind::RstSent, ResetHook::SendResetTracepoint);
    if read_tuple(&ctx, &fields.tuple, &mut rec.tuple).is_none() {
        return 0;
    }
    rec.skaddr = sk;
    let netns = if sk == 0 {
        // A reply to a segment that matched no socket: the tuple came from
        // that segment, and so does the namespace.
        rec.flags |= rst_flags::NO_SOCKET;
        skb_netns(skb)
    } else {
        if let Some(state) = field::<i32>(&ctx, fields.state) {
            rec.state = state as u8;
            rec.flags |= rst_flags::HAS_STATE;
            if is_full_sock(rec.state) {
                rec.cgroup_id = sock_cgroup_id(sk);
            }
        }
        sock_netns(sk)
    };
    if let Some(reason) = field::<u32>(&ctx, fields.reason) {
        rec.reason = reason;
        rec.flags |= rst_flags::HAS_REASON;
    }
    finish(&ctx, &mut rec, netns);
    0
}

#[tracepoint]
pub fn tcprst_rst_recv(ctx: TracePointContext) -> u32 {
    let fields = receive_reset_fields();
    let mut rec = blank(RecordKind::RstReceived, ResetHook::ReceiveResetTracepoint);
    if read_tuple(&ctx, &fields.tuple, &mut rec.tuple).is_none() {
        return 0;
    }
    let sk = field::<u64>(&ctx, fields.skaddr).unwrap_or(0);
    rec.skaddr = sk;
    // The tracepoint fires before tcp_reset() changes the state, so this is
    // the state the application was in when the RST hit it.
    if let Some(state) = sock_state(sk) {
        rec.state = state;
        rec.flags |= rst_flags::HAS_STATE;
    }
    // tcp_reset() only ever runs on full sockets.
    rec.cgroup_id = sock_cgroup_id(sk);
    if let Some(cookie) = field::<u64>(&ctx, fields.sock_cookie) {
        rec.sock_cookie = cookie;
        rec.flags |= rst_flags::HAS_COOKIE;
    }
    finish(&ctx, &mut rec, sock_netns(sk));
    0
}

/// Whether the function this tracepoint fires in has its own program
/// attached, which reported the reset already: tcp_send_active_reset passes
/// no segment, tcp_v4/v6_send_reset the IPv4/IPv6 segment they answer.
#[inline(always)]
fn reported_by_function(skb: u64) -> bool {
    let covered = tracepoint_covered();
    if covered == 0 {
        return false;
    }
    let function = match skb {
        0 => ResetHook::ActiveReset,
        skb if segment_ip_version(skb) == 6 => ResetHook::V6SendReset,
        _ => ResetHook::V4SendReset,
    };
    covered & function.covered_bit() != 0
}

#[inline(always)]
pub fn blank(kind: RecordKind, hook: ResetHook) -> RstRecord {
    // SAFETY: RstRecord is plain integers and byte arrays.
    let mut rec: RstRecord = unsafe { core::mem::zeroed() };
    rec.kind = kind as u8;
    rec.hook = hook as u8;
    rec.tier = AttachTier::Tracepoint as u8;
    rec
}

/// Applies the kernel-side filters, adds who was running, and emits.
#[inline(always)]
pub fn finish(ctx: &impl StackIdContext, rec: &mut RstRecord, netns: u32) {
    if !tuple_wanted(&rec.tuple, netns) {
        return;
    }
    rec.netns = netns;
    let context = origin(&mut rec.task);
    rec.context = context as u8;
    if rec.skaddr != 0
        && let Some(owner) = owner_of(rec.skaddr)
    {
        rec.owner = owner;
    }
    let tgid = filter().tgid;
    if tgid != 0 && (context != ExecContext::Process || rec.task.tgid != tgid) {
        return;
    }
    rec.stack_id = stack_id(ctx);
    rec.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    emit(rec);
}
