//! `sock:inet_sock_set_state`: every TCP state change, with who caused it
//! when a process did.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use tcprst_common::{ExecContext, RecordKind, StateRecord};

use crate::{
    context::origin,
    globals::state_fields,
    kernel::{sock_cgroup_id, sock_netns},
    maps::emit,
    owner::note_owner,
    syscalls::take_close_op,
    tracepoint::{field, read_tuple, tuple_wanted},
};

const IPPROTO_TCP: u16 = 6;
const TCP_SYN_SENT: u8 = 2;
const TCP_FIN_WAIT1: u8 = 4;
const TCP_CLOSE: u8 = 7;
const TCP_LAST_ACK: u8 = 9;
const TCP_LISTEN: u8 = 10;

#[tracepoint]
pub fn tcprst_state(ctx: TracePointContext) -> u32 {
    let f = state_fields();
    // SCTP and MPTCP share this tracepoint.
    if field::<u16>(&ctx, f.protocol).is_some_and(|p| p != IPPROTO_TCP) {
        return 0;
    }
    let (Some(old), Some(new)) = (
        field::<i32>(&ctx, f.oldstate),
        field::<i32>(&ctx, f.newstate),
    ) else {
        return 0;
    };
    let (old, new) = (old as u8, new as u8);
    // Listeners have no peer; their transitions say nothing about connections.
    if old == TCP_LISTEN || new == TCP_LISTEN {
        return 0;
    }
    // SAFETY: StateRecord is plain integers and byte arrays.
    let mut rec: StateRecord = unsafe { core::mem::zeroed() };
    rec.kind = RecordKind::StateChange as u8;
    rec.old_state = old;
    rec.new_state = new;
    rec.fd = -1;
    if read_tuple(&ctx, &f.tuple, &mut rec.tuple).is_none() {
        return 0;
    }
    let sk = field::<u64>(&ctx, f.skaddr).unwrap_or(0);
    rec.skaddr = sk;
    let netns = sock_netns(sk);
    if !tuple_wanted(&rec.tuple, netns) {
        return 0;
    }
    rec.netns = netns;
    rec.cgroup_id = sock_cgroup_id(sk);
    let context = origin(&mut rec.task);
    rec.context = context as u8;
    if context == ExecContext::Process {
        // connect(), shutdown() and close() all change state in the caller.
        note_owner(sk, &rec.task);
    }
    // Only a process starts the close sequence or aborts a connection; a
    // connect() that fails (SYN_SENT → CLOSE) is not a close.
    if context == ExecContext::Process
        && old != TCP_SYN_SENT
        && matches!(new, TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_CLOSE)
    {
        (rec.op, rec.how, rec.fd) = take_close_op(sk);
    }
    rec.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    emit(&rec);
    0
}
