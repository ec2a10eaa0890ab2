//! cgroup paths, as runtimes and the kubelet name them or otherwise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcprst::host::cgroup::parse_path;

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = std::str::from_utf8(data) {
        let info = parse_path(path);
        assert_eq!(info.path, path);
    }
});
