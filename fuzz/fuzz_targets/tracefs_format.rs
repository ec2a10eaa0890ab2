//! tracefs format files, and the layouts built from them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcprst::{bpf::layout::{self, ReasonNames}, bpf::tracefs::EventFormat};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(format) = EventFormat::parse(text) else {
        return;
    };
    let _ = format.symbolic_values("reason");
    let _ = layout::reset_fields(&format);
    let _ = ReasonNames::load(&format, None);
});
