//! /proc/kallsyms text, symbol lookups in it, and caller selection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcprst::bpf::stacks::{Kallsyms, caller};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let syms = Kallsyms::parse(text);
    for addr in [0, 1, u64::MAX, 0xffff_ffff_8100_0000] {
        let _ = syms.symbol(addr);
    }
    let _ = caller(text.lines());
});
