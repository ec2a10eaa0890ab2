//! BTF blobs, and every member lookup tcprst makes in them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcprst::bpf::btf::KernelBtf;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = KernelBtf::from_bytes(data) else {
        return;
    };
    let _ = btf.kernel_offsets();
    let _ = btf.enum_values("sk_rst_reason");
});
