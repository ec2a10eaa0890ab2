//! Kernel stacks of resets, so userspace can name the function that
//! decided to reset (tcp_close, tcp_keepalive_timer, tcp_v4_rcv, …): the
//! innermost frames go into the record, and the kernel unwinds only that
//! deep; whole stacks go to `STACKS` only with `--stack`.
//!
//! Unwinding even those few frames costs about 3 µs, most of what a reset
//! with its own record costs. Where a reset's kind settles the code path it
//! came by (`path_is_settled`), the frames of the last unwind for that kind
//! are reused for a second.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::generated::bpf_get_stack,
    macros::map,
    maps::{Array, HashMap, StackTrace},
    programs::tracing::StackIdContext,
};
use tcprst_common::{CALLER_FRAMES, RecordKind, ResetHook, RstRecord, counters, rst_flags};

use crate::{globals::global, maps::count, words};

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

/// A kind of reset whose code path is settled: everything the record says
/// of how it was sent, short of its ends.
#[repr(C)]
#[derive(Clone, Copy)]
struct PathKey {
    reason: u32,
    /// tcp:tcp_send_reset serves IPv4 and IPv6: tcp_v4_rcv or tcp_v6_rcv.
    family: u16,
    kind: u8,
    hook: u8,
    tier: u8,
    state: u8,
    context: u8,
    flags: u8,
}

/// The frames of the last unwind for a `PathKey`, as the record keeps
/// them, and when it was taken.
#[repr(C)]
#[derive(Clone, Copy)]
struct KnownPath {
    frames: [u32; CALLER_FRAMES],
    at_ns: u64,
}

/// Kinds of resets are few (hooks × reasons × states); a full map only
/// means unwinding every time.
#[map]
static KNOWN_PATHS: HashMap<PathKey, KnownPath> = HashMap::with_max_entries(1024, 0);
/// A zeroed entry to create keys from: the BPF stack has no room for one
/// beside the record.
#[map]
static BLANK_PATH: Array<KnownPath> = Array::with_max_entries(1, 0);

/// How long a path's frames are reused before the stack is unwound again.
const KNOWN_PATH_NS: u64 = 1_000_000_000;

/// The record flags that are part of a path's kind. A few reasons come
/// from more than one call site, and the orphan bit tells those apart:
/// tcp_disconnect gives TCP_STATE and TCP_DISCONNECT_WITH_DATA both for a
/// close() with SO_LINGER 0, whose socket still has its `struct socket`,
/// and for a listener closing its accept queue, whose children never had
/// one. (TCP_ABORT_ON_MEMORY from tcp_close and from the timers differs in
/// context instead.) A mask, not a compare: the older verifiers walk no
/// more paths for it.
const PATH_FLAGS: u8 =
    rst_flags::NO_SOCKET | rst_flags::HAS_REASON | rst_flags::HAS_STATE | rst_flags::ORPHANED;

const TCP_SYN_SENT: u8 = 2;
/// `SK_RST_REASON_NOT_SPECIFIED`: said by several paths.
const REASON_NOT_SPECIFIED: u32 = 0;

/// Whether the record's kind alone tells which code path sent or took the
/// reset. A reply to a segment no socket took comes from tcp_v4_rcv or
/// tcp_v6_rcv; a named reason (6.10+) belongs to one call site, given the
/// rest of the key (`PATH_FLAGS`); a reset received in SYN_SENT answers our
/// SYN, which one path handles. Without reasons, tcp_close and
/// tcp_disconnect both reset a socket in CLOSE, and netfilter's callers are
/// whichever reject rule matched: those unwind.
#[inline(always)]
fn path_is_settled(rec: &RstRecord) -> bool {
    if rec.kind == RecordKind::RstReceived as u8 {
        return rec.flags & rst_flags::HAS_STATE != 0 && rec.state == TCP_SYN_SENT;
    }
    if rec.hook == ResetHook::NfSendReset as u8 || rec.hook == ResetHook::NfSendReset6 as u8 {
        return false;
    }
    rec.flags & rst_flags::NO_SOCKET != 0
        || (rec.flags & rst_flags::HAS_REASON != 0 && rec.reason != REASON_NOT_SPECIFIED)
}

/// Fills `rec.frames` with the innermost kernel frames: from the last
/// unwind of a settled path under a second old, or by unwinding. A failed
/// unwind is counted (`caller: null` is never silent). A function of its
/// own (a BPF subprogram): inlined, its three ways out multiplied every
/// path after it that the verifier explores, close to its limit.
#[inline(never)]
pub fn caller_frames(ctx: &impl EbpfContext, rec: &mut RstRecord) {
    let settled = path_is_settled(rec);
    let key = PathKey {
        reason: rec.reason,
        family: rec.tuple.family,
        kind: rec.kind,
        hook: rec.hook,
        tier: rec.tier,
        state: rec.state,
        context: rec.context,
        flags: rec.flags & PATH_FLAGS,
    };
    if settled && let Some(known) = KNOWN_PATHS.get_ptr(key) {
        // SAFETY: a live map value. A CPU refreshing it concurrently
        // writes the same frames: the path is settled.
        unsafe {
            if rec.timestamp_ns.wrapping_sub((*known).at_ns) < KNOWN_PATH_NS {
                words::copy(&raw mut rec.frames, &raw const (*known).frames);
                return;
            }
        }
    }
    // Whole addresses, of which the record keeps the low halves
    // (`RstRecord::frames`). On this function's own stack, not in a per-CPU
    // map: a reset program in a softirq can interrupt another between its
    // unwind and its copy on the same CPU.
    let mut unwound = MaybeUninit::<[u64; CALLER_FRAMES]>::uninit();
    let size = core::mem::size_of_val(&unwound) as u32;
    // SAFETY: `unwound` is writable for `size` bytes; flags 0: the kernel
    // stack.
    let taken = unsafe { bpf_get_stack(ctx.as_ptr(), unwound.as_mut_ptr().cast(), size, 0) };
    if taken <= 0 {
        count(counters::STACK_FAILURES);
        return;
    }
    // SAFETY: the helper wrote all `size` bytes: the frames it took, and
    // zeroes after them.
    let unwound = unsafe { unwound.assume_init_ref() };
    for (frame, address) in rec.frames.iter_mut().zip(unwound) {
        *frame = *address as u32;
    }
    if settled {
        remember(&key, rec);
    }
}

/// Keeps `rec`'s frames for its path.
#[inline(always)]
fn remember(key: &PathKey, rec: &RstRecord) {
    let known = match KNOWN_PATHS.get_ptr_mut(key) {
        Some(known) => known,
        None => {
            let Some(blank) = BLANK_PATH.get(0) else {
                return;
            };
            // Another CPU may create it first (EEXIST), or the map is full.
            let _ = KNOWN_PATHS.insert(key, blank, u64::from(BPF_NOEXIST));
            let Some(known) = KNOWN_PATHS.get_ptr_mut(key) else {
                return;
            };
            known
        }
    };
    // SAFETY: a live map value; concurrent writers write the same frames.
    unsafe {
        words::copy(&raw mut (*known).frames, &raw const rec.frames);
        (*known).at_ns = rec.timestamp_ns;
    }
}
