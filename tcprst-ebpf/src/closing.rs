//! Who started closing a socket, and its steps since.
//!
//! One tp_btf program on `inet_sock_set_state` returns at its first compare
//! for every state change but the few a close goes through. By default it
//! writes a `CloseNote` into its CPU's ring when a process shuts down or
//! closes an open connection (or exits holding it), and at the steps after
//! (FIN_WAIT2, CLOSING), and when such a close ends (CLOSE): no
//! allocation and nothing to free. A close that answers the peer's FIN
//! (CLOSE_WAIT to LAST_ACK) gets no note: it is how a server's connection
//! ends when its client closes first, and only the peer can leave it stuck
//! (by never acknowledging our FIN), which a scan finds. Its start and end
//! were two of the five notes of such a connection, and the dearer of its
//! two starts (#10). Userspace reads the rings as they fill
//! and keeps the notes of the closes that have not ended. With `--history`
//! (`Settings::every_transition`) every state change of every socket goes
//! into a `CloseMark` in the socket's own storage, freed with the socket;
//! the reset programs add it to their record, and userspace reads it
//! through sock_diag (`INET_DIAG_REQ_SK_BPF_STORAGES`) when it scans.

use core::{mem::MaybeUninit, ptr::write_volatile};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_SK_STORAGE_GET_F_CREATE, pt_regs},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_task_btf, bpf_get_socket_cookie, bpf_sk_storage_get, bpf_task_pt_regs,
        },
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::Array,
    programs::BtfTracePointContext,
};
use tcprst_common::{
    CloseMark, CloseNote, MARK_STEPS, NOTE_HEAD_STRIDE, NOTE_WRITING, TaskInfo, close_op,
};

use crate::{
    context::fill_comm,
    globals::global,
    kernel::{
        TypedLoad, sock_cookie, sock_protocol, sock_socket, task_comm, task_is_exiting,
        task_is_kthread,
    },
    words,
};

#[btf_map]
static MARKS: SkStorage<CloseMark> = SkStorage::new();

/// The map as helpers take it: the definition's address, which the loader
/// relocates to the map (aya-ebpf keeps its own `as_ptr` private).
#[inline(always)]
fn marks() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&MARKS).cast_mut().cast()
}

const IPPROTO_TCP: u16 = 6;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_FIN_WAIT2: i32 = 5;
const TCP_CLOSE: i32 = 7;
const TCP_LAST_ACK: i32 = 9;
const TCP_LISTEN: i32 = 10;
const TCP_CLOSING: i32 = 11;

// x86-64 system call numbers, as `orig_ax` holds them.
const SYS_CLOSE: u64 = 3;
const SYS_SHUTDOWN: u64 = 48;
const SYS_CLOSE_RANGE: u64 = 436;

/// The mark of `sk`, if it has one. `sk` must come straight from a tp_btf
/// argument: the helper only takes a pointer the verifier knows is a socket.
#[inline(always)]
pub fn mark_of(sk: *mut core::ffi::c_void) -> Option<CloseMark> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: a lookup without F_CREATE; the helper checks `sk` itself.
    let mark = unsafe { bpf_sk_storage_get(marks(), sk, core::ptr::null_mut(), 0) };
    // SAFETY: a non-NULL result points at this socket's CloseMark.
    (!mark.is_null()).then(|| unsafe { *mark.cast::<CloseMark>() })
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcprst_close_mark(ctx: BtfTracePointContext) -> i32 {
    // (const struct sock *sk, const int oldstate, const int newstate)
    let new: i32 = ctx.arg(2);
    let every = global!(SETTINGS.every_transition) != 0;
    let starts_close = new == TCP_FIN_WAIT1 || (every && new == TCP_LAST_ACK);
    let follows_close = new == TCP_FIN_WAIT2 || new == TCP_CLOSING;
    if !(starts_close || follows_close || new == TCP_CLOSE || every) {
        return 0;
    }
    let old: i32 = ctx.arg(1);
    if old == TCP_LISTEN || new == TCP_LISTEN {
        return 0;
    }
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    // By default a death is noted only as the end of a noted close, so
    // that userspace can forget its notes (and need not scan sockets to
    // learn which it may forget).
    if new == TCP_CLOSE && !every && !ends_close(old, sk) {
        return 0;
    }
    // SCTP shares the tracepoint; MPTCP's subflows are TCP sockets.
    if sock_protocol(TypedLoad, sk as u64).is_some_and(|p| p != IPPROTO_TCP) {
        return 0;
    }
    let mut slot = MaybeUninit::<TaskInfo>::uninit();
    // SAFETY: all zero bytes is a valid TaskInfo: integers and a byte array.
    let task = unsafe { words::zeroed(&mut slot) };
    let op = if starts_close { closing_op(task) } else { None };
    let step = Step {
        old: old as u8,
        new: new as u8,
        op,
    };
    if every {
        keep_in_storage(sk, &step, task);
    } else if op.is_some() || follows_close || new == TCP_CLOSE {
        // A close no process started (a kernel thread's) gets no note, as
        // it got no mark, and so neither do its later steps, unless
        // something else asked for the socket's cookie (`close_cookie`):
        // userspace drops the steps of sockets whose start it has no note
        // of. A step to CLOSE that got here is the end of a noted close.
        note(sk, &step, task);
    }
    0
}

/// Whether a step from `old` to CLOSE ends a close that was noted: one
/// that began in FIN_WAIT1, never LAST_ACK (see the module). From
/// FIN_WAIT2, a socket a process still holds goes on to TIME_WAIT (the
/// peer's FIN came) or dies; an orphan may instead live on as a timewait
/// socket still in FIN_WAIT2 (`tcp_time_wait(sk, TCP_FIN_WAIT2, …)`, until
/// tcp_fin_timeout), which scans find half-closed and which no state change
/// marks the end of: its notes stay until a scan no longer finds it. Where
/// `sk_socket` cannot be read, every such step is an end, so that what
/// userspace keeps does not grow with churn.
#[inline(always)]
fn ends_close(old: i32, sk: *mut core::ffi::c_void) -> bool {
    match old {
        TCP_FIN_WAIT1 | TCP_CLOSING => true,
        TCP_FIN_WAIT2 => sock_socket(TypedLoad, sk as u64).is_none_or(|socket| socket != 0),
        _ => false,
    }
}

/// A state change of a closing socket, and the op that made it, if a
/// process's.
struct Step {
    old: u8,
    new: u8,
    op: Option<(u8, u8)>,
}

/// Each CPU's ring of `CloseNote`s, one after the other; userspace maps
/// them. The loader sizes it (`Settings::note_slots_shift`).
#[map]
static CLOSE_NOTES: Array<CloseNote> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The number of the next note of each CPU's ring: its notes so far, each
/// CPU's `NOTE_HEAD_STRIDE` u64s from the last.
#[map]
static CLOSE_NOTE_HEADS: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Writes `step` as the next note of this CPU's ring. The head takes no
/// atomic add (a fetching one needs a newer BPF instruction set than the
/// object is built for): kernels from late 2022 on (about 6.1) never run
/// a tp_btf program twice at once on one CPU (a run that would nest, in a
/// preempting task or an interrupt, is skipped and counted as a missed
/// run, which tcprst reports). On older ones a softirq that interrupts this
/// program between reading the head and bumping it takes the same slot,
/// and one of the two notes is lost: a window of two instructions.
#[inline(always)]
fn note(sk: *mut core::ffi::c_void, step: &Step, task: &TaskInfo) {
    let Some(cookie) = close_cookie(sk, step) else {
        return;
    };
    // SAFETY: reads this CPU's number.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(head) = CLOSE_NOTE_HEADS.get_ptr_mut(cpu * NOTE_HEAD_STRIDE) else {
        return;
    };
    // SAFETY: this CPU's head, which only this program on this CPU writes.
    let seq = unsafe {
        let seq = *head;
        *head = seq + 1;
        seq
    };
    let shift = u32::from(global!(SETTINGS.note_slots_shift));
    let index = (cpu << shift) | (seq as u32 & ((1 << shift) - 1));
    let Some(slot) = CLOSE_NOTES.get_ptr_mut(index) else {
        return;
    };
    let (op, how) = step.op.unwrap_or((close_op::NONE, 0));
    // SAFETY: reads the monotonic clock.
    let at_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `slot` is this note's slot of a live map value. The volatile
    // writes keep `seq` first and last (x86-64 keeps stores in order), so a
    // reader that sees the same `seq` before and after its copy has a whole
    // note.
    unsafe {
        write_volatile(&raw mut (*slot).seq, NOTE_WRITING);
        (*slot).cookie = cookie;
        (*slot).at_ns = at_ns;
        (*slot).tgid = task.tgid;
        (*slot).op = op;
        (*slot).how = how;
        (*slot).old_state = step.old;
        (*slot).new_state = step.new;
        (*slot).comm = task.comm;
        write_volatile(&raw mut (*slot).seq, seq);
    }
}

/// The cookie a note of `step` is filed under. A start asks for it (the
/// helper makes one the first time). A later step only reads it: a socket
/// no one asked the cookie of had no close noted, so its step gets no note
/// (userspace would drop it unmatched), and the read is a plain load where
/// the helper was a call (#10).
#[inline(always)]
fn close_cookie(sk: *mut core::ffi::c_void, step: &Step) -> Option<u64> {
    if step.op.is_none()
        && let Some(cookie) = sock_cookie(TypedLoad, sk as u64)
    {
        return (cookie != 0).then_some(cookie);
    }
    // SAFETY: `sk` is the tracepoint's typed socket, as the helper requires.
    Some(unsafe { bpf_get_socket_cookie(sk) })
}

/// Adds `step` to the socket's `CloseMark`, creating it. `--history`.
#[inline(always)]
fn keep_in_storage(sk: *mut core::ffi::c_void, step: &Step, task: &TaskInfo) {
    // SAFETY: `sk` is the tracepoint's typed socket; a NULL value pointer
    // makes F_CREATE start from zeroes.
    let mark = unsafe {
        bpf_sk_storage_get(
            marks(),
            sk,
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    };
    if mark.is_null() {
        return;
    }
    // SAFETY: the helper returned this socket's CloseMark, which lives as
    // long as the socket; concurrent writers only race on advisory fields.
    let mark = unsafe { &mut *mark.cast::<CloseMark>() };
    // SAFETY: reads the monotonic clock.
    let now = unsafe { bpf_ktime_get_ns() };
    if mark.steps == 0 {
        mark.first_state = step.old;
    }
    if let Some((op, how)) = step.op
        && mark.op == close_op::NONE
    {
        mark.op = op;
        mark.how = how;
        mark.op_at_ns = now;
        mark.tgid = task.tgid;
        mark.comm = task.comm;
    }
    // A later close() after shutdown() keeps the first op and its caller:
    // the socket itself says it is orphaned now.
    let i = (mark.steps as usize).min(MARK_STEPS - 1);
    mark.step_state[i] = step.new;
    mark.step_at_ns[i] = now;
    if (mark.steps as usize) < MARK_STEPS {
        mark.steps += 1;
    }
}

/// The close a process is doing now: shutdown() (and how), close(), or its
/// exit; None when a kernel thread acts or the process does something
/// else. A close starts (FIN_WAIT1, LAST_ACK) only in tcp_close() and
/// tcp_shutdown(), which a task calls, never a softirq: so the current
/// task is the one closing, and unlike a reset this needs no softirq check
/// (a map lookup and a probe read each time a connection closes, #10).
#[inline(always)]
fn closing_op(task: &mut TaskInfo) -> Option<(u8, u8)> {
    // SAFETY: the current task, typed by the verifier as `struct
    // task_struct *`, so its flags are a checked load.
    let current = unsafe { bpf_get_current_task_btf() };
    if task_is_kthread(TypedLoad, current as u64) {
        return None;
    }
    // SAFETY: the current task's saved user registers; the verifier types
    // the result as `struct pt_regs *`, so the loads below are checked.
    let regs = unsafe { bpf_task_pt_regs(current) } as *const pt_regs;
    if regs.is_null() {
        return None;
    }
    // SAFETY: checked non-NULL, and typed by the verifier as above.
    let (nr, how) = unsafe { ((*regs).orig_rax, (*regs).rsi) };
    let op = match nr {
        SYS_SHUTDOWN => (close_op::SHUTDOWN, how as u8),
        SYS_CLOSE | SYS_CLOSE_RANGE => (close_op::CLOSE, 0),
        _ if task_is_exiting(TypedLoad, current as u64) => (close_op::EXIT, 0),
        _ => return None,
    };
    // Only now, for a close that gets a note, and only what a note keeps:
    // the tgid and the name. The name by two plain loads where the loader
    // found where it lies: the helper's call and padded copy were about
    // 0.2 µs of each connection's close (#10).
    task.tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !task_comm(TypedLoad, current as u64, &mut task.comm) {
        fill_comm(&mut task.comm);
    }
    Some(op)
}
