//! Where a reset is sent from, so one sent while handling a packet or a
//! timer is not blamed on whichever task the softirq interrupted.
//! Tracepoint programs cannot see `preempt_count` portably. Where the
//! loader knows the kernel's stack layout (`Settings::task_stack_size`) and
//! the program's context lies on the kernel stack it runs on, a reset
//! program tells softirq by where that context lies, and nothing runs per
//! softirq. Elsewhere (the classic tracepoint programs, whose context is a
//! per-CPU buffer) two programs keep a per-CPU "in softirq" flag between
//! `softirq_entry` and `softirq_exit`, on every softirq of the host.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid, generated::bpf_get_current_comm},
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use tcprst_common::{ExecContext, TaskInfo};

use crate::{
    globals::global,
    kernel::{KernelMemory, ProbeRead, task_is_exiting, task_is_kthread},
};

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
fn softirq_flag() -> bool {
    IN_SOFTIRQ.get(0).is_some_and(|v| *v != 0)
}

/// The current task, and how its members are read: tp_btf programs get it
/// typed (`bpf_get_current_task_btf`), so each member is one load where a
/// probe read is a helper call.
#[derive(Clone, Copy)]
pub struct Current<M: KernelMemory> {
    pub mem: M,
    pub task: u64,
}

/// By the flag the softirq programs keep.
#[inline(always)]
fn context_by_flag(current: Current<impl KernelMemory>) -> ExecContext {
    if softirq_flag() {
        return ExecContext::Softirq;
    }
    // pid 0 is the idle task: only interrupts run "in" it.
    if bpf_get_current_pid_tgid() as u32 == 0 {
        return ExecContext::Softirq;
    }
    if task_is_kthread(current.mem, current.task) {
        return ExecContext::KernelThread;
    }
    ExecContext::Process
}

/// By where `context` lies (x86-64): the program's context, which the
/// kernel built on the stack it runs on. (The program's own frame may be
/// elsewhere: since 6.14 the JIT may give a program a per-CPU stack.) A
/// softirq runs on the CPU's interrupt stack, whether an interrupt's exit or
/// `local_bh_enable()` runs it, except right after an interrupt from user
/// mode: since 5.12 that one runs on the interrupted task's stack, which is
/// empty then. Such a task entered the kernel by an interrupt, which its
/// saved `orig_ax` says (a negative vector), while a task sends a reset
/// itself only inside a system call (`orig_ax` its number) or while it
/// exits (a fatal signal may arrive at an interrupt's return).
#[inline(always)]
fn context_by_stack(
    current: Current<impl KernelMemory>,
    context: u64,
    stack_size: u32,
) -> ExecContext {
    let Current { mem, task } = current;
    let Some(stack) = mem.read::<u64>(task, global!(KERNEL_OFFSETS.task_stack)) else {
        return ExecContext::Process;
    };
    // A pointer compared with a number: allowed to the privileged loaders
    // tcprst needs anyway (allow_ptr_leaks).
    if context < stack || context >= stack + u64::from(stack_size) {
        return ExecContext::Softirq;
    }
    if task_is_kthread(mem, task) {
        return ExecContext::KernelThread;
    }
    // The stack is a plain number even to a typed task (`void *`).
    let orig_ax = ProbeRead
        .read::<i64>(stack, global!(SETTINGS.user_orig_ax))
        .unwrap_or(0);
    if orig_ax < 0 && !task_is_exiting(mem, task) {
        return ExecContext::Softirq;
    }
    ExecContext::Process
}

/// Where the kernel runs now, with the current task filled in unless that
/// is softirq (where the task is whoever was interrupted). `context` is the
/// address of the program's context when that lies on the kernel stack.
#[inline(always)]
pub fn context_and_task(
    task: &mut TaskInfo,
    context: Option<u64>,
    current: Current<impl KernelMemory>,
) -> ExecContext {
    let stack_size = global!(SETTINGS.task_stack_size);
    let context = match context {
        Some(context) if stack_size != 0 => context_by_stack(current, context, stack_size),
        _ => context_by_flag(current),
    };
    // ksoftirqd, which runs softirqs on its own stack when they pile up, is
    // a kernel thread here: userspace tells it by name, which costs the
    // verifier no path more on every older kernel.
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
    fill_comm(&mut task.comm);
}

/// The current task's name, through the helper.
#[inline(always)]
pub fn fill_comm(comm: &mut [u8; 16]) {
    // Straight into the record: aya's wrapper zeroes a buffer of its own
    // first, a call of the byte-wise `memset` (see `words`), and the helper
    // pads the name with zeros anyway.
    // SAFETY: `comm` is writable for its length.
    unsafe { bpf_get_current_comm(comm.as_mut_ptr().cast(), size_of_val(comm) as u32) };
}
