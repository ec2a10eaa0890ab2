//! tcprst's kernel programs. Each hook family has its own module; they share
//! the ring buffer and counters in `maps`, the loader-filled globals in
//! `globals`, and the offset-driven readers in `kernel` and `netns`.
#![no_std]
#![no_main]
// Atomic adds: the bpf target's core has no atomic types.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod closing;
mod context;
mod failure;
mod function;
mod globals;
mod kernel;
mod maps;
mod netns;
mod reset;
mod stack;
mod tally;
mod tracepoint;
mod words;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_kernel is GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
