//! Whose socket it is: the last process that acted on it in process
//! context. A reset or a state change often runs in softirq, where the
//! current task is unrelated; this map remembers the owner until then.
//! Sends are not hooked: they are the hottest path, and the process that
//! connected or accepted a socket is almost always the one sending on it.

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST},
    helpers::bpf_get_current_task,
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::TracePointContext,
};
use tcprst_common::{SocketOwner, TaskInfo, owner_counts};

use crate::{
    globals::{state_fields, syscall_fields},
    kernel::fd_sock,
    tracepoint::field,
};

/// struct sock * → owner.
#[map]
static OWNERS: LruHashMap<u64, SocketOwner> = LruHashMap::with_max_entries(65536, 0);

#[map]
static OWNER_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(owner_counts::SLOTS, 0);

#[inline(always)]
fn count(slot: u32) {
    if let Some(n) = OWNER_COUNTS.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer can race with us.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
pub fn note_owner(sk: u64, task: &TaskInfo) {
    let owner = SocketOwner {
        tgid: task.tgid,
        comm: task.comm,
    };
    if OWNERS.insert(&sk, &owner, BPF_NOEXIST as u64).is_ok() {
        count(owner_counts::ADDED);
    } else {
        let _ = OWNERS.insert(&sk, &owner, BPF_EXIST as u64);
    }
}

/// The kernel frees the socket: forget its owner, so the map holds live
/// sockets only (no LRU evictions on the hot path) and a reused pointer
/// never inherits an owner.
#[tracepoint]
pub fn tcprst_destroy(ctx: TracePointContext) -> u32 {
    if let Some(sk) = field::<u64>(&ctx, state_fields().destroy_skaddr) {
        if OWNERS.remove(&sk).is_ok() {
            count(owner_counts::REMOVED);
        }
    }
    0
}

#[inline(always)]
pub fn owner_of(sk: u64) -> Option<SocketOwner> {
    unsafe { OWNERS.get(&sk) }.copied()
}

/// accept() and accept4() return the new socket's descriptor.
#[tracepoint]
pub fn tcprst_accepted(ctx: TracePointContext) -> u32 {
    let Some(fd) = field::<i64>(&ctx, syscall_fields().accept_ret) else {
        return 0;
    };
    if fd < 0 {
        return 0;
    }
    if let Some(sk) = fd_sock(unsafe { bpf_get_current_task() }, fd as i32) {
        // SAFETY: TaskInfo is plain integers and bytes.
        let mut task: TaskInfo = unsafe { core::mem::zeroed() };
        crate::context::fill_task(&mut task);
        note_owner(sk, &task);
    }
    0
}
