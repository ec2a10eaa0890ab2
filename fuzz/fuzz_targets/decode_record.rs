//! Ring-buffer bytes from the kernel: any length, any content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcprst::{clock::WallClock, decode::Decoder, layout::ReasonNames};

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new(ReasonNames::default(), WallClock::now());
    let _ = decoder.decode(data);
});
