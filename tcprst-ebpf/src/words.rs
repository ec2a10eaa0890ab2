//! Zeroing and copying records a word at a time. Left to LLVM, zeroing or
//! copying a record becomes a call to compiler_builtins' `memset` or
//! `memmove`, which on BPF move one byte per turn of a loop: zeroing a reset
//! record ran about 740 instructions, some 100 ns of every reset, even one
//! only counted (docs/performance.md). These take one store a word,
//! unrolled.

use core::mem::{MaybeUninit, align_of, size_of};

/// The widest word that tiles `T`: 8 or 4 bytes.
const fn word<T>() -> usize {
    if align_of::<T>() >= 8 && size_of::<T>().is_multiple_of(8) {
        8
    } else {
        assert!(align_of::<T>() >= 4 && size_of::<T>().is_multiple_of(4));
        4
    }
}

/// Zeroes `slot` and lends it as a `T`.
///
/// # Safety
/// All zero bytes must be a valid `T`.
#[inline(always)]
pub unsafe fn zeroed<T: Copy>(slot: &mut MaybeUninit<T>) -> &mut T {
    let place = slot.as_mut_ptr();
    // The stores are volatile so LLVM does not turn a loop back into a call
    // of `memset`.
    if const { word::<T>() == 8 } {
        for i in 0..size_of::<T>() / 8 {
            // SAFETY: within `*place`, which `word` tiles.
            unsafe { place.cast::<u64>().add(i).write_volatile(0) };
        }
    } else {
        for i in 0..size_of::<T>() / 4 {
            // SAFETY: within `*place`, which `word` tiles.
            unsafe { place.cast::<u32>().add(i).write_volatile(0) };
        }
    }
    // SAFETY: every byte is zero, a valid `T` by the caller's word.
    unsafe { slot.assume_init_mut() }
}

/// Copies `*src` to `*dst`, which must not overlap.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of a `T`.
#[inline(always)]
pub unsafe fn copy<T: Copy>(dst: *mut T, src: *const T) {
    let words = const {
        assert!(word::<T>() == 8);
        size_of::<T>() / 8
    };
    let (dst, src) = (dst.cast::<u64>(), src.cast::<u64>());
    for i in 0..words {
        // SAFETY: within `*src` and `*dst`, which the caller lends and `word`
        // tiles. Volatile, so LLVM does not turn the loop back into a call
        // of `memmove`.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
    }
}
