//! Who started closing a socket. `shutdown(2)` changes the state inside the
//! syscall, so the thread is marked between enter and exit. `close(2)` may
//! finish the socket inside the syscall (6.15+) or later in task_work, so the
//! socket itself is marked at entry and the state change consumes the mark;
//! a per-thread mark would also catch unrelated transitions, such as a reset
//! processed from the socket backlog.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use tcprst_common::close_op;

use crate::{
    globals::syscall_fields,
    kernel::{fd_sock, task_is_exiting},
    tracepoint::field,
};

/// pid_tgid → (how << 32 | fd) while the thread is inside shutdown().
#[map]
static IN_SHUTDOWN: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// struct sock * → fd, for sockets whose close() has started.
#[map]
static CLOSING: LruHashMap<u64, i32> = LruHashMap::with_max_entries(16384, 0);

#[tracepoint]
pub fn tcprst_shut_in(ctx: TracePointContext) -> u32 {
    let f = syscall_fields();
    let fd = field::<i64>(&ctx, f.shutdown_fd).unwrap_or(-1) as i32;
    let how = field::<i64>(&ctx, f.shutdown_how).unwrap_or(-1) as u32;
    let value = (u64::from(how) << 32) | u64::from(fd as u32);
    let _ = IN_SHUTDOWN.insert(&bpf_get_current_pid_tgid(), &value, 0);
    0
}

#[tracepoint]
pub fn tcprst_shut_out(_ctx: TracePointContext) -> u32 {
    let _ = IN_SHUTDOWN.remove(&bpf_get_current_pid_tgid());
    0
}

#[tracepoint]
pub fn tcprst_close_in(ctx: TracePointContext) -> u32 {
    let Some(fd) = field::<i64>(&ctx, syscall_fields().close_fd) else {
        return 0;
    };
    let fd = fd as i32;
    if let Some(sk) = fd_sock(unsafe { bpf_get_current_task() }, fd) {
        let _ = CLOSING.insert(&sk, &fd, 0);
    }
    0
}

/// What a process did that made `sk` change state in its context now:
/// (close_op, how, fd).
#[inline(always)]
pub fn take_close_op(sk: u64) -> (u8, u8, i32) {
    if let Some(v) = unsafe { IN_SHUTDOWN.get(&bpf_get_current_pid_tgid()) } {
        return (close_op::SHUTDOWN, (*v >> 32) as u8, *v as u32 as i32);
    }
    if let Some(fd) = unsafe { CLOSING.get(&sk) } {
        let fd = *fd;
        let _ = CLOSING.remove(&sk);
        return (close_op::CLOSE, 0, fd);
    }
    if task_is_exiting(unsafe { bpf_get_current_task() }) {
        return (close_op::EXIT, 0, -1);
    }
    (close_op::NONE, 0, -1)
}
