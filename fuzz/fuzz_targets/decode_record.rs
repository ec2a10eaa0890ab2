//! Ring-buffer bytes from the kernel: any length, any content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcprst::{pipeline::clock::WallClock, pipeline::decode::Decoder, bpf::layout::ReasonNames};

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new(ReasonNames::default(), WallClock::now());
    let _ = decoder.decode(data);
});
