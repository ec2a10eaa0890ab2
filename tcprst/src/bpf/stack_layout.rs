//! Whether the reset programs can tell softirq from process context by
//! whether their context lies on the current task's stack (tcprst-ebpf's
//! `context.rs` says how), and the two numbers that needs. Where they
//! cannot, two programs on `softirq_entry` and `softirq_exit` keep a per-CPU
//! flag instead, and run on every softirq of the host, which on a busy node
//! may be hundreds of thousands a second.

use tcprst_common::{ABSENT, KernelOffsets};

use super::btf::KernelBtf;

/// Where a task's kernel stack ends and what its top holds, on x86-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackLayout {
    /// `THREAD_SIZE`: 16 KiB, twice that with KASAN.
    pub task_stack_size: u32,
    /// From the bottom of a task's stack to the `orig_ax` of the user
    /// registers at its top (`task_pt_regs`).
    pub user_orig_ax: u32,
}

/// What the layout depends on in the kernel's build config.
const PREEMPT_RT: &str = "CONFIG_PREEMPT_RT";
const KASAN: &str = "CONFIG_KASAN";
const FRED: &str = "CONFIG_X86_FRED";

impl StackLayout {
    /// This kernel's, from its build config (`/proc/config.gz`, or
    /// `/boot/config-RELEASE`) and BTF; the error says why the softirq
    /// programs run instead.
    pub fn of_this_kernel(btf: &KernelBtf, offsets: &KernelOffsets) -> Result<Self, String> {
        if !cfg!(target_arch = "x86_64") {
            return Err("only x86-64's stacks are known".to_owned());
        }
        if offsets.task_stack == ABSENT || offsets.task_flags == ABSENT {
            return Err("the kernel BTF has no task_struct.stack or .flags".to_owned());
        }
        let config = procfs::kernel_config().map_err(|e| {
            format!("the kernel's build config is unreadable (/proc/config.gz, /boot/config-RELEASE: {e})")
        })?;
        let pt_regs = btf
            .size_of("pt_regs")
            .and_then(|size| Ok((size, btf.offset_of("pt_regs", &["orig_ax"])?)))
            .map_err(|e| format!("{e:#}"))?;
        Self::new(
            |option| matches!(config.get(option), Some(procfs::ConfigSetting::Yes)),
            pt_regs,
        )
    }

    /// From what the config sets and `struct pt_regs`' (size, offset of
    /// `orig_ax`).
    fn new(set: impl Fn(&str) -> bool, (regs_size, orig_ax): (u32, u32)) -> Result<Self, String> {
        if set(PREEMPT_RT) {
            return Err("PREEMPT_RT runs softirqs in tasks, on their stacks".to_owned());
        }
        // arch/x86/include/asm/page_64_types.h: THREAD_SIZE_ORDER is
        // 2 + KASAN_STACK_ORDER.
        let task_stack_size = if set(KASAN) { 32 << 10 } else { 16 << 10 };
        // asm/thread_info.h: FRED keeps 16 bytes above the saved registers
        // (TOP_OF_KERNEL_STACK_PADDING).
        let padding = if set(FRED) { 16 } else { 0 };
        Ok(Self {
            task_stack_size,
            user_orig_ax: task_stack_size - padding - regs_size + orig_ax,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x86-64's `struct pt_regs`: 21 registers, `orig_ax` the 16th.
    const PT_REGS: (u32, u32) = (168, 120);

    fn layout(set: &[&str]) -> Result<StackLayout, String> {
        StackLayout::new(|option| set.contains(&option), PT_REGS)
    }

    #[test]
    fn a_plain_kernel_has_16_kib_stacks_with_the_registers_at_the_top() {
        assert_eq!(
            layout(&[]),
            Ok(StackLayout {
                task_stack_size: 16384,
                user_orig_ax: 16384 - 48,
            })
        );
    }

    #[test]
    fn kasan_doubles_the_stack_and_fred_pads_its_top() {
        assert_eq!(layout(&[KASAN]).unwrap().task_stack_size, 32768);
        assert_eq!(layout(&[KASAN]).unwrap().user_orig_ax, 32768 - 48);
        assert_eq!(layout(&[FRED]).unwrap().user_orig_ax, 16384 - 16 - 48);
    }

    #[test]
    fn preempt_rt_keeps_the_softirq_programs() {
        let why = layout(&[PREEMPT_RT, KASAN]).unwrap_err();
        assert!(why.contains("PREEMPT_RT"), "{why}");
    }
}
