//! `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`: every RST this host's
//! TCP stack sends or receives. Where the kernel allows (tp_btf with socket
//! storage), the tp_btf programs serve these tracepoints and add what finds
//! the socket's close (`ResetContext::close_facts`); elsewhere the classic
//! tracepoint programs do.

use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_ktime_get_ns,
        generated::{bpf_get_current_task_btf, bpf_get_socket_cookie},
    },
    macros::{btf_tracepoint, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, ProbeContext, TracePointContext,
        tracing::StackIdContext,
    },
};
use tcprst_common::{
    AttachTier, CloseMark, ExecContext, RecordKind, ResetHook, RstRecord, rst_flags,
};

use crate::{
    closing::mark_of,
    context::{Current, context_and_task},
    failure::tuple_unread,
    function::{ResetArgs, report},
    globals::{global, receive_reset_fields, send_reset_fields},
    kernel::{
        KernelMemory, ProbeRead, TypedLoad, is_full_sock, segment_ip_version, sock_cgroup_id,
        sock_state, sock_tuple, socket_facts,
    },
    maps::{emit, emit_marked, tracepoint_covered},
    netns::{skb_netns, sock_netns},
    stack::{caller_frames, stack_id},
    tally::{Budget, tally},
    tracepoint::{field, read_tuple, tuple_wanted},
    words,
};

/// What the reset paths need of a program's context beyond its stack: how
/// it reads kernel memory, where the context lies, and what finds its
/// socket's close, where the verifier types the socket.
pub trait ResetContext: StackIdContext {
    type Memory: KernelMemory;
    const MEMORY: Self::Memory;
    /// Whether the kernel builds this context on the stack the program runs
    /// on: tp_btf's argument array, a kprobe's saved registers, fentry's
    /// trampoline frame. A classic tracepoint's record is a per-CPU buffer.
    const ON_KERNEL_STACK: bool;

    /// The context's address, where it tells softirq (`context.rs`).
    #[inline(always)]
    fn stack_address(&self) -> Option<u64> {
        Self::ON_KERNEL_STACK.then(|| self.as_ptr() as u64)
    }

    #[inline(always)]
    fn memory(&self) -> Self::Memory {
        Self::MEMORY
    }

    /// The current task, to be read as `memory()` reads.
    fn current(&self) -> Current<Self::Memory>;

    /// What finds the close of the record's socket, which the details of a
    /// reset on a full socket add: its cookie, by which userspace finds its
    /// `CloseNote`s, and with `--history` its `CloseMark`. Only where the
    /// verifier knows the socket's type.
    fn close_facts(&self, _rec: &mut RstRecord) -> Option<CloseMark> {
        None
    }

    /// The socket's cookie, where the verifier knows the socket's type.
    fn socket_cookie(&self, _rec: &mut RstRecord) {}
}

/// Contexts whose addresses the verifier does not type: the classic
/// tracepoints hand over their record, kprobes registers, and fentry's
/// arguments (typed, but read through bpf_get_func_arg at positions known
/// only at run time) plain numbers.
macro_rules! probe_read_contexts {
    ($($context:ty: $on_stack:expr),+) => {$(
        impl ResetContext for $context {
            type Memory = ProbeRead;
            const MEMORY: ProbeRead = ProbeRead;
            const ON_KERNEL_STACK: bool = $on_stack;

            #[inline(always)]
            fn current(&self) -> Current<ProbeRead> {
                Current {
                    mem: ProbeRead,
                    // SAFETY: returns the current task's address.
                    task: unsafe { bpf_get_current_task() },
                }
            }
        }
    )+};
}

probe_read_contexts!(TracePointContext: false, ProbeContext: true, FEntryContext: true);

/// tp_btf arguments are typed pointers: their members are plain loads.
impl ResetContext for BtfTracePointContext {
    type Memory = TypedLoad;
    const MEMORY: TypedLoad = TypedLoad;
    const ON_KERNEL_STACK: bool = true;

    /// Typed: telling softirq reads the task's stack pointer with one load
    /// where a probe read was a helper call, in every reset of a storm
    /// (#11).
    #[inline(always)]
    fn current(&self) -> Current<TypedLoad> {
        Current {
            mem: TypedLoad,
            // SAFETY: returns the current task, typed by the verifier.
            task: unsafe { bpf_get_current_task_btf() } as u64,
        }
    }

    #[inline(always)]
    fn close_facts(&self, rec: &mut RstRecord) -> Option<CloseMark> {
        // Both reset tracepoints pass the socket first.
        let sk: *mut core::ffi::c_void = self.arg(0);
        if sk.is_null() {
            return None;
        }
        // One or the other, by a constant the verifier prunes on: both in
        // one program took the sent reset's past a million instructions.
        if global!(SETTINGS.every_transition) != 0 {
            return mark_of(sk);
        }
        self.socket_cookie(rec);
        None
    }

    #[inline(always)]
    fn socket_cookie(&self, rec: &mut RstRecord) {
        // Both reset tracepoints pass the socket first.
        let sk: *mut core::ffi::c_void = self.arg(0);
        if sk.is_null() || rec.flags & rst_flags::HAS_COOKIE != 0 {
            return;
        }
        // SAFETY: the typed socket argument, checked non-NULL.
        rec.sock_cookie = unsafe { bpf_get_socket_cookie(sk) };
        rec.flags |= rst_flags::HAS_COOKIE;
    }
}

#[tracepoint]
pub fn tcprst_rst_sent(ctx: TracePointContext) -> u32 {
    let fields = send_reset_fields();
    let sk = field::<u64>(&ctx, fields.skaddr).unwrap_or(0);
    let skb = field::<u64>(&ctx, fields.skbaddr).unwrap_or(0);
    if reported_by_function(ProbeRead, skb) {
        return 0;
    }
    let mut slot = MaybeUninit::uninit();
    let rec = blank(
        &mut slot,
        RecordKind::RstSent,
        ResetHook::SendResetTracepoint,
    );
    if let Err(unread) = read_tuple(&ctx, &fields.tuple, &mut rec.tuple) {
        tuple_unread(
            &ctx,
            ResetHook::SendResetTracepoint,
            AttachTier::Tracepoint,
            unread,
        );
        return 0;
    }
    let netns = if sk == 0 {
        // A reply to a segment that matched no socket: the tuple came from
        // that segment, and so does the namespace.
        rec.flags |= rst_flags::NO_SOCKET;
        skb_netns(ProbeRead, skb)
    } else {
        if let Some(state) = field::<i32>(&ctx, fields.state) {
            rec.state = state as u8;
            rec.flags |= rst_flags::HAS_STATE;
        }
        sock_netns(ProbeRead, sk)
    };
    if let Some(reason) = field::<u32>(&ctx, fields.reason) {
        rec.reason = reason;
        rec.flags |= rst_flags::HAS_REASON;
    }
    finish(&ctx, rec, netns, |rec| {
        sock_details(ProbeRead, sk, rec);
        None
    });
    0
}

#[tracepoint]
pub fn tcprst_rst_recv(ctx: TracePointContext) -> u32 {
    let fields = receive_reset_fields();
    let mut slot = MaybeUninit::uninit();
    let rec = blank(
        &mut slot,
        RecordKind::RstReceived,
        ResetHook::ReceiveResetTracepoint,
    );
    if let Err(unread) = read_tuple(&ctx, &fields.tuple, &mut rec.tuple) {
        tuple_unread(
            &ctx,
            ResetHook::ReceiveResetTracepoint,
            AttachTier::Tracepoint,
            unread,
        );
        return 0;
    }
    let sk = field::<u64>(&ctx, fields.skaddr).unwrap_or(0);
    if let Some(cookie) = field::<u64>(&ctx, fields.sock_cookie) {
        rec.sock_cookie = cookie;
        rec.flags |= rst_flags::HAS_COOKIE;
    }
    received(&ctx, sk, rec);
    0
}

/// `tcp:tcp_send_reset` as tp_btf: (sk, skb[, reason]). Its arguments are
/// the reset functions' own, so the function tiers' report serves it.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcprst_rst_sent_btf(ctx: BtfTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(1);
    if reported_by_function(TypedLoad, skb) {
        return 0;
    }
    let args = ResetArgs {
        sk: ctx.arg(0),
        skb,
        reason: (global!(SETTINGS.send_reset_has_reason) != 0).then(|| ctx.arg(2)),
        net: None,
        nf_hook: None,
    };
    report(
        &ctx,
        ResetHook::SendResetTracepoint,
        AttachTier::Tracepoint,
        args,
    );
    0
}

/// `tcp:tcp_receive_reset` as tp_btf: (sk).
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcprst_rst_recv_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let mut slot = MaybeUninit::uninit();
    let rec = blank(
        &mut slot,
        RecordKind::RstReceived,
        ResetHook::ReceiveResetTracepoint,
    );
    if let Err(unread) = sock_tuple(TypedLoad, sk, &mut rec.tuple) {
        tuple_unread(
            &ctx,
            ResetHook::ReceiveResetTracepoint,
            AttachTier::Tracepoint,
            unread,
        );
        return 0;
    }
    received(&ctx, sk, rec);
    0
}

/// A reset arrived on `sk`, a full socket: tcp_reset() only ever runs on one.
#[inline(always)]
fn received(ctx: &impl ResetContext, sk: u64, rec: &mut RstRecord) {
    let mem = ctx.memory();
    // The tracepoint fires before tcp_reset() changes the state, so this is
    // the state the application was in when the RST hit it.
    if let Some(state) = sock_state(mem, sk) {
        rec.state = state;
        rec.flags |= rst_flags::HAS_STATE;
    }
    finish(ctx, rec, sock_netns(mem, sk), |rec| {
        rec.cgroup_id = sock_cgroup_id(mem, sk);
        socket_facts(mem, sk, rec);
        // With `--history` too: only the sent reset's program has no room
        // for both the cookie and the mark.
        ctx.socket_cookie(rec);
        ctx.close_facts(rec)
    });
}

/// What a full socket says of itself, for a reset that gets its own record:
/// its cgroup, and its shutdown bits, orphan state and inode.
#[inline(always)]
pub fn sock_details(mem: impl KernelMemory, sk: u64, rec: &mut RstRecord) {
    if sk != 0 && rec.flags & rst_flags::HAS_STATE != 0 && is_full_sock(rec.state) {
        rec.cgroup_id = sock_cgroup_id(mem, sk);
        socket_facts(mem, sk, rec);
    }
}

/// Whether the function this tracepoint fires in has its own program
/// attached, which reported the reset already: tcp_send_active_reset passes
/// no segment, tcp_v4/v6_send_reset the IPv4/IPv6 segment they answer.
#[inline(always)]
fn reported_by_function(mem: impl KernelMemory, skb: u64) -> bool {
    let covered = tracepoint_covered();
    if covered == 0 {
        return false;
    }
    let function = match skb {
        0 => ResetHook::ActiveReset,
        skb if segment_ip_version(mem, skb) == 6 => ResetHook::V6SendReset,
        _ => ResetHook::V4SendReset,
    };
    covered & function.covered_bit() != 0
}

/// A zeroed record of `kind` from `hook`, in `slot`: in place, since a
/// record returned by value is copied, and two do not fit the BPF stack.
#[inline(always)]
pub fn blank(
    slot: &mut MaybeUninit<RstRecord>,
    kind: RecordKind,
    hook: ResetHook,
) -> &mut RstRecord {
    // SAFETY: all zero bytes is a valid RstRecord: plain integers and
    // byte arrays.
    let rec = unsafe { words::zeroed(slot) };
    rec.kind = kind as u8;
    rec.hook = hook as u8;
    rec.tier = AttachTier::Tracepoint as u8;
    rec
}

/// Applies the kernel-side filters and charges the reset to its key's
/// budget. Only a reset that gets its own record pays for the rest: its
/// `details` (what the socket says, and its close mark), who was running,
/// and the caller; it is emitted with the mark when there is one.
#[inline(always)]
pub fn finish(
    ctx: &impl ResetContext,
    rec: &mut RstRecord,
    netns: u32,
    details: impl FnOnce(&mut RstRecord) -> Option<CloseMark>,
) {
    if !tuple_wanted(&rec.tuple, netns) {
        return;
    }
    rec.netns = netns;
    let tgid = global!(FILTER.tgid);
    if tgid != 0 {
        // The pid filter needs the task before the reset may count.
        let context = context_and_task(&mut rec.task, ctx.stack_address(), ctx.current());
        rec.context = context as u8;
        if context != ExecContext::Process || rec.task.tgid != tgid {
            return;
        }
    }
    let sample = match tally(rec) {
        Budget::Counted => return,
        Budget::Detailed(sample) => Some(sample),
        Budget::Untallied => None,
    };
    if tgid == 0 {
        rec.context = context_and_task(&mut rec.task, ctx.stack_address(), ctx.current()) as u8;
    }
    let mark = details(rec);
    rec.stack_id = stack_id(ctx);
    // SAFETY: reads the monotonic clock.
    rec.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    caller_frames(ctx, rec);
    if let Some(sample) = sample {
        // SAFETY: `sample` is in this key's live budget (see `tally`).
        unsafe { words::copy(sample, rec) };
    }
    match mark {
        Some(mark) => {
            rec.flags |= rst_flags::HAS_MARK;
            emit_marked(rec, &mark);
        }
        None => emit(rec),
    }
}
