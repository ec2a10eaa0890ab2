//! `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`: every RST this host's
//! TCP stack sends or receives.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tcprst_common::{
    ABSENT, AF_INET, ExecContext, RecordKind, RstRecord, TupleFields, rst_flags, tuple_style,
};

use crate::{
    context::current_context,
    globals::{filter, receive_reset_fields, send_reset_fields},
    kernel::{skb_netns, sock_netns, sock_state},
    maps::emit,
};

#[tracepoint]
pub fn tcprst_rst_sent(ctx: TracePointContext) -> u32 {
    let fields = send_reset_fields();
    let mut rec = blank(RecordKind::RstSent);
    if read_tuple(&ctx, &fields.tuple, &mut rec).is_none() {
        return 0;
    }
    let sk = field::<u64>(&ctx, fields.skaddr).unwrap_or(0);
    rec.skaddr = sk;
    let netns = if sk == 0 {
        // A reply to a segment that matched no socket: the tuple came from
        // that segment, and so does the namespace.
        rec.flags |= rst_flags::NO_SOCKET;
        field::<u64>(&ctx, fields.skbaddr).and_then(skb_netns)
    } else {
        if let Some(state) = field::<i32>(&ctx, fields.state) {
            rec.state = state as u8;
            rec.flags |= rst_flags::HAS_STATE;
        }
        sock_netns(sk)
    };
    set_netns(&mut rec, netns);
    if let Some(reason) = field::<u32>(&ctx, fields.reason) {
        rec.reason = reason;
        rec.flags |= rst_flags::HAS_REASON;
    }
    finish(&mut rec);
    0
}

#[tracepoint]
pub fn tcprst_rst_recv(ctx: TracePointContext) -> u32 {
    let fields = receive_reset_fields();
    let mut rec = blank(RecordKind::RstReceived);
    if read_tuple(&ctx, &fields.tuple, &mut rec).is_none() {
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
    set_netns(&mut rec, sock_netns(sk));
    if let Some(cookie) = field::<u64>(&ctx, fields.sock_cookie) {
        rec.sock_cookie = cookie;
        rec.flags |= rst_flags::HAS_COOKIE;
    }
    finish(&mut rec);
    0
}

#[inline(always)]
fn blank(kind: RecordKind) -> RstRecord {
    // SAFETY: RstRecord is plain integers and byte arrays.
    let mut rec: RstRecord = unsafe { core::mem::zeroed() };
    rec.kind = kind as u8;
    rec
}

#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    if offset == ABSENT {
        return None;
    }
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

#[inline(always)]
fn set_netns(rec: &mut RstRecord, netns: Option<u32>) {
    if let Some(netns) = netns {
        rec.netns = netns;
        rec.flags |= rst_flags::HAS_NETNS;
    }
}

#[inline(always)]
fn read_tuple(ctx: &TracePointContext, t: &TupleFields, rec: &mut RstRecord) -> Option<()> {
    if t.style == tuple_style::SOCKADDR {
        // struct sockaddr_in{,6}: family, then the port in network order,
        // then the address at 4 (IPv4) or 8 (IPv6, after the flow info).
        let family = field::<u16>(ctx, t.saddr)?;
        rec.family = family;
        rec.local_port = u16::from_be(field::<u16>(ctx, t.saddr + 2)?);
        rec.remote_port = u16::from_be(field::<u16>(ctx, t.daddr + 2)?);
        if family == AF_INET {
            copy_v4(&mut rec.local_addr, field::<[u8; 4]>(ctx, t.saddr + 4)?);
            copy_v4(&mut rec.remote_addr, field::<[u8; 4]>(ctx, t.daddr + 4)?);
        } else {
            rec.local_addr = field::<[u8; 16]>(ctx, t.saddr + 8)?;
            rec.remote_addr = field::<[u8; 16]>(ctx, t.daddr + 8)?;
        }
    } else {
        // Old kernels have no family field; the IPv6 fields then hold
        // v4-mapped addresses, which the loader recognises.
        let family = field::<u16>(ctx, t.family).unwrap_or(0);
        rec.family = family;
        rec.local_port = field::<u16>(ctx, t.sport)?;
        rec.remote_port = field::<u16>(ctx, t.dport)?;
        if family == AF_INET {
            copy_v4(&mut rec.local_addr, field::<[u8; 4]>(ctx, t.saddr)?);
            copy_v4(&mut rec.remote_addr, field::<[u8; 4]>(ctx, t.daddr)?);
        } else {
            rec.local_addr = field::<[u8; 16]>(ctx, t.saddr_v6)?;
            rec.remote_addr = field::<[u8; 16]>(ctx, t.daddr_v6)?;
        }
    }
    Some(())
}

#[inline(always)]
fn copy_v4(dst: &mut [u8; 16], src: [u8; 4]) {
    dst[0] = src[0];
    dst[1] = src[1];
    dst[2] = src[2];
    dst[3] = src[3];
}

/// Applies the kernel-side filters, adds who was running, and emits.
#[inline(always)]
fn finish(rec: &mut RstRecord) {
    let f = filter();
    if f.port != 0 && rec.local_port != f.port && rec.remote_port != f.port {
        return;
    }
    if f.netns != 0 && (rec.flags & rst_flags::HAS_NETNS == 0 || rec.netns != f.netns) {
        return;
    }
    let context = current_context();
    rec.context = context as u8;
    if context != ExecContext::Softirq {
        let pid_tgid = bpf_get_current_pid_tgid();
        rec.tgid = (pid_tgid >> 32) as u32;
        rec.tid = pid_tgid as u32;
        rec.uid = bpf_get_current_uid_gid() as u32;
        rec.comm = bpf_get_current_comm().unwrap_or_default();
    }
    if f.tgid != 0 && (context != ExecContext::Process || rec.tgid != f.tgid) {
        return;
    }
    rec.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    emit(rec);
}
