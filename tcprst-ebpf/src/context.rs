//! Softirq bookkeeping, so a reset sent while handling a packet or a timer is
//! not blamed on whichever task the softirq interrupted. Tracepoint programs
//! cannot see `preempt_count` portably, so each CPU records whether it is
//! between `softirq_entry` and `softirq_exit` (softirqs do not nest on a CPU).

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid,
    },
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use tcprst_common::{ExecContext, TaskInfo};

use crate::kernel::{ProbeRead, task_is_kthread};

#[map]
static IN_SOFTIRQ: PerCpuArray<u8> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn set_in_softirq(value: u8) {
    if let Some(slot) = IN_SOFTIRQ.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; softirqs do not nest on a CPU.
        unsafe { *slot = value };
    }
}

#[raw_tracepoint(tracepoint = "softirq_entry")]
pub fn tcprst_sirq_in(_ctx: RawTracePointContext) -> i32 {
    set_in_softirq(1);
    0
}

#[raw_tracepoint(tracepoint = "softirq_exit")]
pub fn tcprst_sirq_out(_ctx: RawTracePointContext) -> i32 {
    set_in_softirq(0);
    0
}

/// Whether this CPU is between softirq_entry and softirq_exit.
#[inline(always)]
pub fn in_softirq() -> bool {
    IN_SOFTIRQ.get(0).is_some_and(|v| *v != 0)
}

#[inline(always)]
pub fn current_context() -> ExecContext {
    if in_softirq() {
        return ExecContext::Softirq;
    }
    // pid 0 is the idle task: only interrupts run "in" it.
    if bpf_get_current_pid_tgid() as u32 == 0 {
        return ExecContext::Softirq;
    }
    // SAFETY: bpf_get_current_task returns the current task's address.
    if task_is_kthread(ProbeRead, unsafe { bpf_get_current_task() }) {
        return ExecContext::KernelThread;
    }
    ExecContext::Process
}

/// Where the kernel runs now, with the current task filled in unless that
/// is softirq (where the task is whoever was interrupted).
#[inline(always)]
pub fn context_and_task(task: &mut TaskInfo) -> ExecContext {
    let context = current_context();
    if context != ExecContext::Softirq {
        fill_task(task);
    }
    context
}

#[inline(always)]
pub fn fill_task(task: &mut TaskInfo) {
    let pid_tgid = bpf_get_current_pid_tgid();
    task.tgid = (pid_tgid >> 32) as u32;
    task.tid = pid_tgid as u32;
    task.uid = bpf_get_current_uid_gid() as u32;
    task.comm = bpf_get_current_comm().unwrap_or_default();
}
