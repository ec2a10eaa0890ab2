//! Values the loader writes before loading (`EbpfLoader::override_global`).
//! They live in .rodata, which the loader freezes, so the verifier sees each
//! one-field load from them as a constant (which `TypedLoad` offsets must
//! be); the volatile reads stop the compiler from folding in the
//! placeholders below.

use tcprst_common::{
    FUNCTION_HOOKS, FunctionArgs, KernelFilter, KernelOffsets, ResetFields, Settings,
};

#[unsafe(no_mangle)]
static SEND_RESET_FIELDS: ResetFields = ResetFields::UNSET;
#[unsafe(no_mangle)]
static RECEIVE_RESET_FIELDS: ResetFields = ResetFields::UNSET;
#[unsafe(no_mangle)]
pub static KERNEL_OFFSETS: KernelOffsets = KernelOffsets::UNSET;
#[unsafe(no_mangle)]
static FUNCTION_ARGS: [FunctionArgs; FUNCTION_HOOKS.len()] =
    [FunctionArgs::UNSET; FUNCTION_HOOKS.len()];
#[unsafe(no_mangle)]
pub static FILTER: KernelFilter = KernelFilter {
    netns: 0,
    tgid: 0,
    port: 0,
    _pad: 0,
};
#[unsafe(no_mangle)]
pub static SETTINGS: Settings = Settings {
    every_transition: 0,
    send_reset_has_reason: 0,
    whole_stacks: 0,
    note_slots_shift: 0,
    wakeup_bytes: 0,
    detail_per_period: 0,
    task_stack_size: 0,
    user_orig_ax: 0,
};

/// One field of a loader-written global: a single load at a constant
/// offset into .rodata, which the verifier knows the value of. (Reading
/// the whole struct loads every field, and narrow stack spills of them do
/// not stay constants on every kernel.)
macro_rules! global {
    ($global:ident . $field:ident) => {
        // SAFETY: a plain-data static; volatile so the loader's value is read.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::globals::$global.$field)) }
    };
}
pub(crate) use global;

/// Reads a loader-written global.
macro_rules! global_reader {
    ($($name:ident: $ty:ty = $global:ident;)+) => {$(
        #[inline(always)]
        pub fn $name() -> $ty {
            // SAFETY: a plain-data static; volatile so the loader's value is read.
            unsafe { core::ptr::read_volatile(&$global) }
        }
    )+};
}

global_reader! {
    send_reset_fields: ResetFields = SEND_RESET_FIELDS;
    receive_reset_fields: ResetFields = RECEIVE_RESET_FIELDS;
}

#[inline(always)]
pub fn function_args(index: usize) -> FunctionArgs {
    // SAFETY: a plain-data static; volatile so the loader's value is read.
    unsafe { core::ptr::read_volatile(&FUNCTION_ARGS[index]) }
}
