//! A socket the kernel aborts at close because there are more orphaned
//! sockets than `net.ipv4.tcp_max_orphans` allows. That sysctl is global
//! (a child namespace has no copy), so this test binary holds only this
//! test: cargo runs test binaries one after another, and no other test
//! closes sockets while the limit is 0.

mod common;

use std::{fs, thread, time::Duration};

use common::{Netns, Tracer, find};

const MAX_ORPHANS: &str = "/proc/sys/net/ipv4/tcp_max_orphans";

/// Sets the sysctl for the test and puts it back, even on a panic.
struct Sysctl(String);

impl Sysctl {
    fn set(value: &str) -> Self {
        let old = fs::read_to_string(MAX_ORPHANS).unwrap();
        fs::write(MAX_ORPHANS, value).unwrap();
        Self(old)
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(MAX_ORPHANS, self.0.trim());
    }
}

#[test]
fn a_close_past_the_orphan_limit_names_the_sysctl() {
    let ns = Netns::new();
    let mut tracer = Tracer::start(&["--netns", &ns.name]);
    let listener = ns.listen("127.0.0.1:5010");
    let first = ns.connect("127.0.0.1:40400", "127.0.0.1:5010").unwrap();
    let second = ns.connect("127.0.0.1:40401", "127.0.0.1:5010").unwrap();
    let (_held_first, _) = listener.accept().unwrap();
    let (_held_second, _) = listener.accept().unwrap();
    // Past 60 s an orphan in FIN_WAIT2 stays a full socket (shorter, it
    // becomes a timewait one, which is no orphan); this one is per netns.
    ns.enter(|| fs::write("/proc/sys/net/ipv4/tcp_fin_timeout", "120").unwrap());
    let _limit = Sysctl::set("0");
    // The first close leaves an orphan in FIN_WAIT2 (the server holds its
    // end open); the kernel recounts orphans every 100 ms.
    drop(first);
    thread::sleep(Duration::from_millis(300));
    // close() sends FIN first, then finds the orphan limit passed and
    // aborts: the server sees EOF, then the reset.
    drop(second);
    tracer.wait_for("the abort", |v| {
        v["kind"] == "rst_sent" && v["reason"] == "TCP_ABORT_ON_MEMORY"
    });
    let events = tracer.stop();
    let sent = find(&events, "rst_sent");
    assert_eq!(sent["cause"], "orphan_limit", "{sent:#}");
    assert!(
        sent["diagnosis"]
            .as_str()
            .unwrap()
            .contains("net.ipv4.tcp_max_orphans (0)"),
        "{sent:#}"
    );
}
