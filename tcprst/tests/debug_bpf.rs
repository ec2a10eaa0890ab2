//! Failed reads in the kernel programs are counted, and with `--debug-bpf`
//! logged with the hook, the member and its offset. The failure is real: a
//! copy of this kernel's BTF with `sock_common.skc_family` renamed leaves
//! the loader without that offset, so every received reset's tuple read
//! fails on it.

mod common;

use std::{thread, time::Duration};

use common::{Netns, Tracer, summary_count};

const LOGGED: &str = "tcp:tcp_receive_reset (tracepoint): reading the connection's ends failed at sock_common.skc_family (offset 4294967295)";

/// The N of "N resets dropped because their ends could not be read".
fn dropped(stderr: &str) -> u64 {
    summary_count(
        stderr,
        " resets dropped because their ends could not be read",
    )
}

fn trace_refusals_until_the_stop(btf: &str, extra: &[&str]) -> String {
    let ns = Netns::new();
    let mut args = vec!["--netns", ns.name.as_str(), "--btf", btf];
    args.extend_from_slice(extra);
    let mut tracer = Tracer::start(&args);
    assert!(ns.connect("127.0.0.1:40300", "127.0.0.1:9").is_err());
    // The sent reset is still read (from the segment); wait for it.
    tracer.wait_for("the sent reset", |v| v["kind"] == "rst_sent");
    // Failures right up to the stop: the last ones logged must still come
    // out, as the summary counts them. Paced, so that the log ring (128 KiB)
    // cannot fill: past that, aya-log drops lines, and only the count is
    // whole.
    let (status, _, stderr) = thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..1000 {
                assert!(ns.connect("127.0.0.1:0", "127.0.0.1:9").is_err());
                thread::sleep(Duration::from_millis(1));
            }
        });
        thread::sleep(Duration::from_millis(500));
        tracer.stop_with(libc::SIGTERM)
    });
    assert!(status.success(), "{stderr}");
    stderr
}

#[test]
fn unreadable_tuples_are_counted_and_logged_on_request() {
    let vmlinux = std::fs::read("/sys/kernel/btf/vmlinux").unwrap();
    let mut bytes = vmlinux.clone();
    let at = vmlinux
        .windows(12)
        .position(|w| w == b"\0skc_family\0")
        .expect("this kernel's BTF names sock_common.skc_family");
    bytes[at + 5] = b'X';
    let path = std::env::temp_dir().join(format!("tcprst-doctored-{}.btf", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let btf = path.to_str().unwrap();

    let logged = trace_refusals_until_the_stop(btf, &["--debug-bpf"]);
    let n = dropped(&logged);
    assert!(n >= 1, "{logged}");
    assert_eq!(logged.matches(LOGGED).count() as u64, n, "{logged}");

    let quiet = trace_refusals_until_the_stop(btf, &[]);
    assert!(dropped(&quiet) >= 1, "{quiet}");
    assert!(
        !quiet.contains("reading the connection's ends failed"),
        "{quiet}"
    );
    std::fs::remove_file(&path).unwrap();
}
