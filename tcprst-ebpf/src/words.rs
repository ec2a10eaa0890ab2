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
    if const { word::<T>() == 8 } {
        // SAFETY: the caller's, and `word` tiles `T` with u64s.
        unsafe { copy_words(dst.cast::<u64>(), src.cast::<u64>(), size_of::<T>() / 8) };
    } else {
        // SAFETY: the caller's, and `word` tiles `T` with u32s.
        unsafe { copy_words(dst.cast::<u32>(), src.cast::<u32>(), size_of::<T>() / 4) };
    }
}

/// Copies `words` words from `src` to `dst`.
///
/// # Safety
/// Both must be valid for that many words, and not overlap.
#[inline(always)]
unsafe fn copy_words<W: Copy>(dst: *mut W, src: *const W, words: usize) {
    for i in 0..words {
        // SAFETY: within what the caller lends. Volatile, so LLVM does not
        // turn the loop back into a call of `memmove`.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
    }
}
