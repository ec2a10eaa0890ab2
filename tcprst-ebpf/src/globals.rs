//! Values the loader writes before loading (`EbpfLoader::override_global`).
//! They live in .rodata, so the verifier sees them as constants; the volatile
//! reads stop the compiler from folding in the placeholders below.

use tcprst_common::{
    FUNCTION_HOOKS, FunctionArgs, KernelFilter, KernelOffsets, ResetFields, StateFields,
    SyscallFields,
};

#[unsafe(no_mangle)]
static SEND_RESET_FIELDS: ResetFields = ResetFields::UNSET;
#[unsafe(no_mangle)]
static RECEIVE_RESET_FIELDS: ResetFields = ResetFields::UNSET;
#[unsafe(no_mangle)]
static STATE_FIELDS: StateFields = StateFields::UNSET;
#[unsafe(no_mangle)]
static SYSCALL_FIELDS: SyscallFields = SyscallFields::UNSET;
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets::UNSET;
#[unsafe(no_mangle)]
static FUNCTION_ARGS: [FunctionArgs; FUNCTION_HOOKS.len()] =
    [FunctionArgs::UNSET; FUNCTION_HOOKS.len()];
#[unsafe(no_mangle)]
static FILTER: KernelFilter = KernelFilter {
    netns: 0,
    tgid: 0,
    port: 0,
    _pad: 0,
};

#[inline(always)]
pub fn send_reset_fields() -> ResetFields {
    unsafe { core::ptr::read_volatile(&SEND_RESET_FIELDS) }
}

#[inline(always)]
pub fn receive_reset_fields() -> ResetFields {
    unsafe { core::ptr::read_volatile(&RECEIVE_RESET_FIELDS) }
}

#[inline(always)]
pub fn kernel_offsets() -> KernelOffsets {
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

#[inline(always)]
pub fn filter() -> KernelFilter {
    unsafe { core::ptr::read_volatile(&FILTER) }
}

#[inline(always)]
pub fn state_fields() -> StateFields {
    unsafe { core::ptr::read_volatile(&STATE_FIELDS) }
}

#[inline(always)]
pub fn syscall_fields() -> SyscallFields {
    unsafe { core::ptr::read_volatile(&SYSCALL_FIELDS) }
}

#[inline(always)]
pub fn function_args(index: usize) -> FunctionArgs {
    unsafe { core::ptr::read_volatile(&FUNCTION_ARGS[index]) }
}
